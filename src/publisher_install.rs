//! `handoff install-publisher`: put the holder publisher's systemd system unit in place,
//! or (`--uninstall`) take exactly that away. See [`crate::publish`] for what it runs.
//!
//! What it writes: one file, `<root>/etc/systemd/system/handoff-publisher.service`
//! (mode 0644), carrying a marker line ([`MARKER`]); then `systemctl daemon-reload` and
//! `systemctl enable --now` (or `restart` when the unit's text changed). `--uninstall`
//! runs `systemctl disable --now`, removes the unit only when it carries the marker,
//! reloads, and removes the publisher's file under `[host] run` (stale once the publisher
//! stops; readers would ignore it, but nothing of it should stay). A unit file without the
//! marker is someone else's: neither replaced nor removed.
//!
//! The unit runs `<absolute path of this handoff> publish-holders` as root, so, as for the
//! libvirt hook, the binary must be one only root can change
//! (`hook_install::check_exe`).
//!
//! A plan first ([`plan`]), walked by [`apply`]; `--dry-run` shows it. With `--root`
//! (tests) the files go under that directory and no `systemctl` runs.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::hook_install::HooksError;
use crate::publish::UNIT_NAME;

/// The line that makes the unit file handoff's own.
pub const MARKER: &str = "# handoff-publisher: written by `handoff install-publisher`";

/// Where system units go, under the root.
pub const UNIT_DIR: &str = "etc/systemd/system";

#[derive(Debug, thiserror::Error)]
pub enum PublisherInstallError {
    #[error(transparent)]
    Exe(#[from] HooksError),
    #[error(
        "handoff's path {0:?} has a character a systemd unit's ExecStart cannot carry unquoted; \
         install handoff under a plain path such as /usr/local/bin/handoff"
    )]
    ExeUnusable(PathBuf),
    #[error(
        "{0} exists but was not written by handoff (no `{MARKER}` line); move it away and run install-publisher again"
    )]
    Foreign(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}; run as root (sudo handoff install-publisher)")]
    Write { path: PathBuf, source: io::Error },
    #[error("`systemctl {args}` failed: {why}")]
    Systemctl { args: String, why: String },
}

/// One step of an install or uninstall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Step {
    WriteUnit { path: PathBuf, contents: String },
    RemoveFile { path: PathBuf },
    Systemctl { args: Vec<String> },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::WriteUnit { path, .. } => write!(f, "write {}", path.display()),
            Step::RemoveFile { path } => write!(f, "remove {}", path.display()),
            Step::Systemctl { args } => write!(f, "run systemctl {}", args.join(" ")),
        }
    }
}

/// Where and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// `/`, or `--root` for tests.
    pub root: PathBuf,
    /// The binary the unit runs (`current_exe`).
    pub exe: PathBuf,
    /// The publisher's file (`[host] run`/holders.json of the system config).
    pub published: PathBuf,
    pub uninstall: bool,
    /// Run `systemctl` (only for the real root).
    pub systemctl: bool,
}

/// The unit's path under `root`.
pub fn unit_path(root: &Path) -> PathBuf {
    root.join(UNIT_DIR).join(UNIT_NAME)
}

/// The unit's text for `exe`.
pub fn unit_contents(exe: &Path) -> Result<String, PublisherInstallError> {
    let s = exe
        .to_str()
        .filter(|s| {
            s.starts_with('/')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b))
        })
        .ok_or_else(|| PublisherInstallError::ExeUnusable(exe.to_owned()))?;
    Ok(format!(
        "{MARKER}\n\
         [Unit]\n\
         Description=handoff: publish who holds the GPU, for surfaces run by users\n\
         Documentation=man:handoff(1)\n\
         \n\
         [Service]\n\
         Type=exec\n\
         ExecStart={s} publish-holders\n\
         Restart=on-failure\n\
         # It reads /proc and /sys, watches the GPU's nodes and writes one file in [host] run.\n\
         NoNewPrivileges=yes\n\
         PrivateNetwork=yes\n\
         ProtectSystem=full\n\
         ProtectHome=read-only\n\
         CapabilityBoundingSet=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH CAP_DAC_OVERRIDE\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    ))
}

fn read_unit(path: &Path) -> Result<Option<String>, PublisherInstallError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PublisherInstallError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn systemctl(args: &[&str]) -> Step {
    Step::Systemctl {
        args: args.iter().map(|a| a.to_string()).collect(),
    }
}

/// The steps that bring what is on disk to what `opts` asks; empty when it already is.
pub fn plan(opts: &Options) -> Result<Vec<Step>, PublisherInstallError> {
    let path = unit_path(&opts.root);
    let existing = read_unit(&path)?;
    let ours = existing.as_deref().map(|s| s.lines().any(|l| l == MARKER));
    let mut steps = Vec::new();
    if opts.uninstall {
        match ours {
            None => {}
            Some(false) => return Err(PublisherInstallError::Foreign(path)),
            Some(true) => {
                if opts.systemctl {
                    steps.push(systemctl(&["disable", "--now", UNIT_NAME]));
                }
                steps.push(Step::RemoveFile { path });
                if opts.systemctl {
                    steps.push(systemctl(&["daemon-reload"]));
                }
            }
        }
        if fs::symlink_metadata(&opts.published).is_ok() {
            steps.push(Step::RemoveFile {
                path: opts.published.clone(),
            });
        }
        return Ok(steps);
    }
    crate::hook_install::check_exe(&opts.exe)?;
    let contents = unit_contents(&opts.exe)?;
    match ours {
        Some(false) => return Err(PublisherInstallError::Foreign(path)),
        Some(true) if existing.as_deref() == Some(contents.as_str()) => {}
        _ => {
            let changed = ours.is_some();
            steps.push(Step::WriteUnit { path, contents });
            if opts.systemctl {
                steps.push(systemctl(&["daemon-reload"]));
                if changed {
                    steps.push(systemctl(&["restart", UNIT_NAME]));
                }
            }
        }
    }
    if opts.systemctl && !steps.is_empty() {
        steps.push(systemctl(&["enable", "--now", UNIT_NAME]));
    }
    Ok(steps)
}

/// Carry the steps out, in order; stops at the first failure.
pub fn apply(steps: &[Step]) -> Result<(), PublisherInstallError> {
    for step in steps {
        match step {
            Step::WriteUnit { path, contents } => {
                let write = |source| PublisherInstallError::Write {
                    path: path.clone(),
                    source,
                };
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir).map_err(write)?;
                }
                crate::bind::record::write_atomic(path, contents.as_bytes(), 0o644).map_err(write)?;
            }
            Step::RemoveFile { path } => match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PublisherInstallError::Write {
                        path: path.clone(),
                        source,
                    });
                }
            },
            Step::Systemctl { args } => {
                let out = std::process::Command::new("systemctl")
                    .args(args)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .map_err(|e| PublisherInstallError::Systemctl {
                        args: args.join(" "),
                        why: e.to_string(),
                    })?;
                if !out.status.success() {
                    return Err(PublisherInstallError::Systemctl {
                        args: args.join(" "),
                        why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    });
                }
            }
        }
    }
    Ok(())
}
