//! `handoff install-hooks --pve`: put handoff's hookscript on a Proxmox VE host and set it
//! on the configured VMs, or take exactly that away again.
//!
//! What it writes: one snippet, `<storage path>/snippets/handoff` (mode 0755, carrying
//! [`SNIPPET_MARKER`]), a `#!/bin/sh` script that `exec`s `<handoff> pve-hook "$@"`, in a
//! storage whose `content` includes `snippets` (PVE runs hookscripts only from there:
//! `PVE::GuestHelpers::check_hookscript`); and, in each VM's
//! `/etc/pve/qemu-server/<vmid>.conf`, the line `hookscript: <storage>:snippets/handoff`.
//! That is what `qm set <vmid> --hookscript …` writes. It edits the file itself because
//! PVE lets only `root@pam` set `hookscript` through the API (never an API token), and
//! this runs as root on the node anyway; it takes qemu-server's own per-VM lock
//! (`flock` on `/var/lock/qemu-server/lock-<vmid>.conf`, as `PVE::QemuConfig::lock_config`)
//! and replaces the file by rename, as PVE's `file_set_contents` does on pmxcfs.
//!
//! What it never does: replace a VM's different hookscript. It says what it found and how
//! to call handoff from that script instead. `--uninstall` removes the `hookscript` line
//! only where it names handoff's snippet, and the snippet only when it carries the marker.
//!
//! Like `hooks`, it is a plan first ([`plan`]), shown by `--dry-run`, walked by [`apply`];
//! running it twice finds nothing to do.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The snippet's file name.
pub const SNIPPET_NAME: &str = "handoff";
/// The line that makes a snippet handoff's own.
pub const SNIPPET_MARKER: &str = "# handoff-pve-hookscript: written by `handoff install-hooks --pve`";

#[derive(Debug, thiserror::Error)]
pub enum PveHooksError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "no storage in {path} holds snippets, and PVE runs hookscripts only from one. Enable them on a \
         directory storage, keeping what it already holds, e.g. `pvesm set {example} --content {content}`, \
         then run this again (or name one with --storage)"
    )]
    NoSnippets {
        path: PathBuf,
        example: String,
        content: String,
    },
    #[error(
        "storage {name:?} is not in {path} as a directory storage with snippets (`pvesm status` lists storages)"
    )]
    NoSuchStorage { name: String, path: PathBuf },
    #[error("VM {vmid} has no config at {path}: is it on this node (`qm list`)?")]
    NoVm { vmid: u32, path: PathBuf },
    #[error(
        "{exe} can be changed by someone other than root ({why}); PVE runs the hookscript as root, so install \
         handoff root-owned (e.g. `make install prefix=/usr`) and run install-hooks from there"
    )]
    UnsafeExe { exe: PathBuf, why: String },
    #[error("no VM to guard: the config lists no [[vm]] with a vmid (or pass --vmid)")]
    NoVms,
}

/// One change on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    WriteSnippet { path: PathBuf, contents: String },
    RemoveSnippet { path: PathBuf },
    SetHookscript { vmid: u32, conf: PathBuf, volid: String },
    RemoveHookscript { vmid: u32, conf: PathBuf, volid: String },
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::WriteSnippet { path, .. } => write!(f, "write the hookscript {}", path.display()),
            Action::RemoveSnippet { path } => write!(f, "remove {}", path.display()),
            Action::SetHookscript { vmid, volid, .. } => write!(f, "set VM {vmid}'s hookscript to {volid}"),
            Action::RemoveHookscript { vmid, volid, .. } => {
                write!(f, "remove hookscript {volid} from VM {vmid}")
            }
        }
    }
}

/// A VM whose hookscript is someone else's: left alone, with how to combine them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Foreign {
    pub vmid: u32,
    pub hookscript: String,
    pub advice: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    pub volid: String,
    pub actions: Vec<Action>,
    pub foreign: Vec<Foreign>,
}

/// Where the host's files are (`/` on a PVE host; a temp tree in tests).
#[derive(Debug, Clone)]
pub struct Roots {
    pub root: PathBuf,
}

impl Roots {
    fn at(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }
}

/// `storage.cfg`'s directory storages: (name, path, content list).
fn dir_storages(text: &str) -> Vec<(String, String, Vec<String>)> {
    let mut out: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut current: Option<(String, String, Vec<String>)> = None;
    for line in text.lines() {
        if !line.starts_with([' ', '\t']) {
            if let Some(c) = current.take() {
                out.push(c);
            }
            if let Some(name) = line.trim().strip_prefix("dir:") {
                current = Some((name.trim().to_owned(), String::new(), Vec::new()));
            }
            continue;
        }
        let Some(c) = current.as_mut() else { continue };
        let line = line.trim();
        if let Some(p) = line.strip_prefix("path ") {
            c.1 = p.trim().to_owned();
        } else if let Some(list) = line.strip_prefix("content ") {
            c.2 = list.split(',').map(|s| s.trim().to_owned()).collect();
        }
    }
    out.extend(current);
    out
}

/// The snippet's text.
pub fn snippet(handoff_exe: &Path) -> String {
    format!(
        "#!/bin/sh\n{SNIPPET_MARKER}\n# PVE runs it as `<this script> <vmid> <phase>`; see docs/proxmox.md.\n\
         exec '{}' pve-hook \"$@\"\n",
        handoff_exe.display().to_string().replace('\'', r"'\''")
    )
}

fn check_exe(exe: &Path) -> Result<(), PveHooksError> {
    let meta = fs::metadata(exe).map_err(|source| PveHooksError::Read {
        path: exe.to_owned(),
        source,
    })?;
    let why = if meta.uid() != 0 {
        Some(format!("it is owned by uid {}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!("mode {:o} lets others write it", meta.mode() & 0o777))
    } else {
        None
    };
    match why {
        Some(why) => Err(PveHooksError::UnsafeExe {
            exe: exe.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// The `hookscript` value of a config's main section, if any.
fn hookscript_of(text: &str) -> Option<String> {
    crate::pve::parse_conf(text).get("hookscript").cloned()
}

fn read(path: &Path) -> Result<String, PveHooksError> {
    fs::read_to_string(path).map_err(|source| PveHooksError::Read {
        path: path.to_owned(),
        source,
    })
}

/// What `install-hooks --pve` (or `--uninstall`) would change.
pub fn plan(
    roots: &Roots,
    vmids: &[u32],
    storage: Option<&str>,
    handoff_exe: &Path,
    uninstall: bool,
) -> Result<Plan, PveHooksError> {
    if vmids.is_empty() && !uninstall {
        return Err(PveHooksError::NoVms);
    }
    let storage_cfg = roots.at("/etc/pve/storage.cfg");
    let storages = dir_storages(&read(&storage_cfg)?);
    let chosen = match storage {
        Some(name) => storages
            .iter()
            .find(|s| s.0 == name && s.2.iter().any(|c| c == "snippets"))
            .ok_or_else(|| PveHooksError::NoSuchStorage {
                name: name.to_owned(),
                path: storage_cfg.clone(),
            })?,
        None => storages
            .iter()
            .find(|s| s.2.iter().any(|c| c == "snippets"))
            .ok_or_else(|| {
                let (example, mut content) = storages
                    .first()
                    .map(|s| (s.0.clone(), s.2.clone()))
                    .unwrap_or_else(|| {
                        (
                            "local".into(),
                            vec!["iso".into(), "vztmpl".into(), "backup".into()],
                        )
                    });
                content.push("snippets".into());
                PveHooksError::NoSnippets {
                    path: storage_cfg.clone(),
                    example,
                    content: content.join(","),
                }
            })?,
    };
    let volid = format!("{}:snippets/{SNIPPET_NAME}", chosen.0);
    let snippet_path = roots.at(&chosen.1).join("snippets").join(SNIPPET_NAME);
    let mut p = Plan {
        volid: volid.clone(),
        ..Plan::default()
    };
    let existing = fs::read_to_string(&snippet_path).ok();
    if uninstall {
        // Every VM config on this node that names our snippet, not only the configured
        // ones: the config may have changed since.
        let ids: Vec<u32> = fs::read_dir(roots.at("/etc/pve/qemu-server"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".conf")?.parse().ok())
            .collect();
        for vmid in ids {
            let conf = roots.at(&format!("/etc/pve/qemu-server/{vmid}.conf"));
            if hookscript_of(&read(&conf)?).as_deref() == Some(&volid) {
                p.actions.push(Action::RemoveHookscript {
                    vmid,
                    conf,
                    volid: volid.clone(),
                });
            }
        }
        if existing.is_some_and(|t| t.contains(SNIPPET_MARKER)) {
            p.actions.push(Action::RemoveSnippet { path: snippet_path });
        }
        return Ok(p);
    }
    check_exe(handoff_exe)?;
    let contents = snippet(handoff_exe);
    if existing.as_deref() != Some(contents.as_str()) {
        p.actions.push(Action::WriteSnippet {
            path: snippet_path,
            contents,
        });
    }
    for &vmid in vmids {
        let conf = roots.at(&format!("/etc/pve/qemu-server/{vmid}.conf"));
        if !conf.exists() {
            return Err(PveHooksError::NoVm { vmid, path: conf });
        }
        match hookscript_of(&read(&conf)?) {
            None => p.actions.push(Action::SetHookscript { vmid, conf, volid: volid.clone() }),
            Some(v) if v == volid => {}
            Some(other) => p.foreign.push(Foreign {
                vmid,
                advice: format!(
                    "VM {vmid} already has hookscript {other}; handoff left it in place. To combine them, have that \
                     script call handoff first and stop on its refusal: `{} pve-hook \"$1\" \"$2\" || exit $?` near \
                     its top (pre-start must pass the exit status on, or PVE starts the VM anyway)",
                    handoff_exe.display()
                ),
                hookscript: other,
            }),
        }
    }
    Ok(p)
}

/// Rewrites the main section's `hookscript` line of a config (`Some`: set, `None`: remove).
fn edit_conf(text: &str, value: Option<&str>) -> String {
    let mut out = String::new();
    let mut in_main = true;
    let mut done = false;
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with('[') {
            in_main = false;
        }
        if in_main && line.split(':').next().map(str::trim) == Some("hookscript") {
            if let Some(v) = value {
                out += &format!("hookscript: {v}\n");
                done = true;
            }
            continue;
        }
        // Insert before the blank line that ends the main section, or at its end.
        let ends_main = in_main
            && (i + 1 == lines.len()
                || (line.is_empty() && lines.get(i + 1).is_some_and(|n| n.starts_with('['))));
        if ends_main && !done && line.is_empty() {
            if let Some(v) = value {
                out += &format!("hookscript: {v}\n");
            }
            done = true;
        }
        out += line;
        out.push('\n');
        if ends_main && !done {
            if let Some(v) = value {
                out += &format!("hookscript: {v}\n");
            }
            done = true;
        }
    }
    if !done && let Some(v) = value {
        out += &format!("hookscript: {v}\n");
    }
    out
}

/// Replaces `path` by rename from a temp file beside it, under qemu-server's lock of `vmid`.
fn rewrite_conf(roots: &Roots, vmid: u32, path: &Path, value: Option<&str>) -> Result<(), PveHooksError> {
    let werr = |source| PveHooksError::Write {
        path: path.to_owned(),
        source,
    };
    let lock_dir = roots.at("/var/lock/qemu-server");
    fs::create_dir_all(&lock_dir).map_err(werr)?;
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_dir.join(format!("lock-{vmid}.conf")))
        .map_err(werr)?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| werr(std::io::Error::from(e)))?;
    let text = read(path)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o640)
            .open(&tmp)
            .map_err(werr)?;
        f.write_all(edit_conf(&text, value).as_bytes()).map_err(werr)?;
    }
    fs::rename(&tmp, path).map_err(werr)
}

/// Carries out a plan, in order.
pub fn apply(roots: &Roots, plan: &Plan) -> Result<(), PveHooksError> {
    for a in &plan.actions {
        match a {
            Action::WriteSnippet { path, contents } => {
                let werr = |source| PveHooksError::Write {
                    path: path.clone(),
                    source,
                };
                fs::create_dir_all(path.parent().expect("has a parent")).map_err(werr)?;
                let tmp = path.with_extension("tmp");
                let _ = fs::remove_file(&tmp);
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o755)
                    .open(&tmp)
                    .map_err(werr)?;
                f.write_all(contents.as_bytes()).map_err(werr)?;
                f.set_permissions(fs::Permissions::from_mode(0o755))
                    .map_err(werr)?;
                drop(f);
                fs::rename(&tmp, path).map_err(werr)?;
            }
            Action::RemoveSnippet { path } => {
                fs::remove_file(path).map_err(|source| PveHooksError::Write {
                    path: path.clone(),
                    source,
                })?
            }
            Action::SetHookscript { vmid, conf, volid } => rewrite_conf(roots, *vmid, conf, Some(volid))?,
            Action::RemoveHookscript { vmid, conf, .. } => rewrite_conf(roots, *vmid, conf, None)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hookscript_line_goes_in_the_main_section_and_comes_out_exactly() {
        let conf = "boot: order=scsi0\nname: win11\n\n[snap1]\nname: win11\n";
        let set = edit_conf(conf, Some("local:snippets/handoff"));
        assert_eq!(
            set,
            "boot: order=scsi0\nname: win11\nhookscript: local:snippets/handoff\n\n[snap1]\nname: win11\n"
        );
        assert_eq!(edit_conf(&set, None), conf);
        assert_eq!(edit_conf("name: a\n", Some("x")), "name: a\nhookscript: x\n");
    }
}
