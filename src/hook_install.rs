//! `handoff install-hooks`: put handoff's libvirt qemu hook in place, or take it away.
//!
//! What it writes: one file, `<hooks dir>/qemu.d/handoff` (mode 0755), a `#!/bin/sh` shim
//! that `exec`s `<absolute path of handoff> hook -- "$@"` (the `--`: a domain called
//! `--help` or `--config=x` is a domain name, never an option). It refuses a handoff binary
//! that anyone but root could change, since libvirt runs the hook as root. libvirt ≥ 6.5 runs every executable
//! in `qemu.d/` as well as `<hooks dir>/qemu`, with `<domain> <operation> <sub-operation>
//! <extra>` as arguments and the domain XML on stdin; a non-zero exit from `prepare`
//! refuses the start, and libvirt puts the hook's stderr into its error.
//!
//! What it never touches: a `qemu` script or any other file in `qemu.d/` that it did not
//! write. The shim carries a marker line ([`SHIM_MARKER`]); `--uninstall` removes a file
//! only when it carries it. Directories are created when missing and left in place on
//! uninstall (an empty `qemu.d/` is harmless to libvirt).
//!
//! What it reads: the existing hook scripts, to warn when a foreign one already binds or
//! unbinds GPUs (two hooks would then fight over the card); `libvirtd --version`
//! (or `virtqemud --version`); `/proc/*/comm` to find the daemon and SIGHUP it.
//!
//! How libvirt 9.0 behaves here (checked against the real daemon, `tests/hooks_libvirtd.rs`):
//! - At start and on SIGHUP libvirtd only notes *whether* any qemu hook exists; `qemu.d/` is
//!   listed again at every call. So with no hook at the daemon's start a new shim is ignored
//!   until SIGHUP; after SIGHUP the very next `virsh start` runs it (no restart needed). With
//!   a foreign `qemu` already present, a new shim runs even without SIGHUP.
//! - An allowed start calls `prepare begin`, `start begin`, `started begin`; destroy calls
//!   `stopped end`, `release end`. A start refused by `prepare` still calls `stopped end`
//!   and `release end`, so `release` must cope with a `prepare` that bound nothing.
//! - The refusal reads `Hook script execution failed: internal error: Child process
//!   (LC_ALL=C PATH=… /etc/libvirt/hooks/qemu.d/handoff <dom> prepare begin -) unexpected
//!   exit status 1: <the hook's stderr>`. The hook's environment is only `LC_ALL`, `PATH`
//!   (and `HOME`) from libvirtd's own.
//!
//! Installing is a plan first ([`plan_install`], [`plan_uninstall`]): a list of file
//! actions computed from what is on disk, shown by `--dry-run` and walked by [`apply`].
//! Running it twice finds nothing to do.

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// Where libvirt looks for hooks.
pub const DEFAULT_HOOKS_DIR: &str = "/etc/libvirt/hooks";

/// The shim's file name inside `qemu.d/`.
pub const SHIM_NAME: &str = "handoff";

/// The line that makes a file handoff's own; `--uninstall` removes only files carrying it.
pub const SHIM_MARKER: &str = "# handoff-hook-shim: written by `handoff install-hooks`";

/// Bumped when the shim's text changes, so an old shim is replaced, not kept.
pub const SHIM_VERSION: u32 = 2;

/// The shim's mode: libvirt runs only executable files.
pub const SHIM_MODE: u32 = 0o755;

/// The first libvirt that runs every script in `qemu.d/` (VFIO-Tools#12).
pub const MIN_LIBVIRT: LibvirtVersion = LibvirtVersion {
    major: 6,
    minor: 5,
    micro: 0,
};

/// Words in a foreign hook script that mean it already moves GPUs between drivers.
const GPU_BINDING_WORDS: &[&str] = &[
    "vfio",
    "nodedev-detach",
    "nodedev-reattach",
    "driver_override",
    "unbind",
    "drivers_probe",
    "remove_id",
    "new_id",
];

#[derive(Debug, thiserror::Error)]
pub enum HooksError {
    #[error(
        "the hook must call handoff by an absolute path, got {path:?}; pass the installed binary, \
         e.g. /usr/local/bin/handoff"
    )]
    ExeNotAbsolute { path: PathBuf },

    #[error(
        "handoff's path {path:?} contains {what}, which cannot go into the hook shim; install \
         handoff under a plain path such as /usr/local/bin/handoff"
    )]
    ExeUnusable { path: PathBuf, what: &'static str },

    #[error(
        "the hook would run {path}, but it is not an executable file ({why}); install handoff there first"
    )]
    ExeMissing { path: PathBuf, why: String },

    #[error(
        "not installing a hook that runs {path}: it is not owned by root and writable only by root \
         ({why}); libvirt runs the hook as root, so whoever can change it could run anything as \
         root. Install handoff root-owned, e.g. `sudo install -m 0755 handoff /usr/local/bin/`, \
         and run install-hooks from there"
    )]
    ExeNotTrusted { path: PathBuf, why: String },

    #[error(
        "{path} exists but was not written by handoff (no `{SHIM_MARKER}` line); move it away \
         and run install-hooks again"
    )]
    ForeignShim { path: PathBuf },

    #[error("{path} exists and is not a directory; libvirt expects its hooks there")]
    NotADirectory { path: PathBuf },

    #[error("cannot read {path}: {source}{}", hint(source))]
    Read { path: PathBuf, source: io::Error },

    #[error("cannot create directory {path}: {source}{}", hint(source))]
    CreateDir { path: PathBuf, source: io::Error },

    #[error("cannot write {path}: {source}{}", hint(source))]
    Write { path: PathBuf, source: io::Error },

    #[error("cannot remove {path}: {source}{}", hint(source))]
    Remove { path: PathBuf, source: io::Error },

    #[error(
        "libvirt {found} runs only /etc/libvirt/hooks/qemu, not the scripts in qemu.d/ (that \
         needs libvirt {MIN_LIBVIRT} or newer); upgrade libvirt, or call `{exe} hook -- \"$@\"` from \
         your own qemu hook script"
    )]
    LibvirtTooOld { found: LibvirtVersion, exe: String },

    #[error(
        "cannot tell which libvirt runs here ({why}); is libvirt-daemon-system installed? \
         The hook needs libvirt {MIN_LIBVIRT} or newer"
    )]
    LibvirtVersionUnknown { why: String },
}

fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            " (libvirt's hooks belong to root: run `sudo handoff install-hooks`)"
        }
        _ => "",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct LibvirtVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl fmt::Display for LibvirtVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl LibvirtVersion {
    /// Parses `libvirtd --version` output: `libvirtd (libvirt) 9.0.0`.
    pub fn from_version_output(text: &str) -> Option<Self> {
        let word = text.split_whitespace().last()?;
        let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
        Some(Self {
            major: parts.next()??,
            minor: parts.next()??,
            micro: parts.next().flatten().unwrap_or(0),
        })
    }
}

/// The installed daemon's version: `libvirtd --version`, else `virtqemud --version`
/// (distributions with modular daemons).
pub fn libvirt_version() -> Result<LibvirtVersion, HooksError> {
    let mut failures = Vec::new();
    for daemon in ["libvirtd", "virtqemud"] {
        match Command::new(daemon).arg("--version").env("LC_ALL", "C").output() {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                return LibvirtVersion::from_version_output(&text).ok_or_else(|| {
                    HooksError::LibvirtVersionUnknown {
                        why: format!("`{daemon} --version` said {:?}", text.trim()),
                    }
                });
            }
            Ok(out) => failures.push(format!("`{daemon} --version` failed: {}", out.status)),
            Err(e) => failures.push(format!("cannot run {daemon}: {e}")),
        }
    }
    Err(HooksError::LibvirtVersionUnknown {
        why: failures.join("; "),
    })
}

/// Refuses libvirt older than [`MIN_LIBVIRT`].
pub fn check_libvirt_version(found: LibvirtVersion, handoff_exe: &Path) -> Result<(), HooksError> {
    if found < MIN_LIBVIRT {
        return Err(HooksError::LibvirtTooOld {
            found,
            exe: handoff_exe.display().to_string(),
        });
    }
    Ok(())
}

/// One change to the file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    CreateDir {
        path: PathBuf,
    },
    /// Write (or replace) the shim atomically, mode [`SHIM_MODE`].
    WriteShim {
        path: PathBuf,
        contents: String,
        replaces_older: bool,
    },
    /// The shim is right but its mode isn't.
    SetMode {
        path: PathBuf,
        mode: u32,
    },
    RemoveShim {
        path: PathBuf,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::CreateDir { path } => write!(f, "create directory {}", path.display()),
            Action::WriteShim {
                path,
                replaces_older: false,
                ..
            } => {
                write!(f, "write {} (mode {SHIM_MODE:o})", path.display())
            }
            Action::WriteShim {
                path,
                replaces_older: true,
                ..
            } => {
                write!(
                    f,
                    "replace {} with the current shim (mode {SHIM_MODE:o})",
                    path.display()
                )
            }
            Action::SetMode { path, mode } => write!(f, "chmod {mode:o} {}", path.display()),
            Action::RemoveShim { path } => write!(f, "remove {}", path.display()),
        }
    }
}

/// Something a person should know that doesn't stop the install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "warning", rename_all = "snake_case")]
pub enum Warning {
    /// Another hook script already binds/unbinds GPUs.
    ForeignGpuHook { path: PathBuf, mentions: Vec<String> },
    /// `--uninstall` found a `qemu.d/handoff` that handoff didn't write; it stays.
    ForeignShimLeft { path: PathBuf },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::ForeignGpuHook { path, mentions } => write!(
                f,
                "{} already binds or unbinds devices (it mentions {}); libvirt runs it as well as \
                 handoff's hook, so the two would fight over the GPU. Remove the GPU part from it \
                 (or move it away) and let handoff do the binding.",
                path.display(),
                mentions.join(", ")
            ),
            Warning::ForeignShimLeft { path } => write!(
                f,
                "{} was not written by handoff (no marker line); left it in place",
                path.display()
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Install,
    Uninstall,
}

/// What install-hooks would do, computed from what is on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstallPlan {
    pub direction: Direction,
    pub hooks_dir: PathBuf,
    pub shim: PathBuf,
    pub actions: Vec<Action>,
    pub warnings: Vec<Warning>,
    /// Files in the hooks directory that are not handoff's and stay as they are.
    pub left_alone: Vec<PathBuf>,
}

impl InstallPlan {
    pub fn is_noop(&self) -> bool {
        self.actions.is_empty()
    }

    /// One line for a person: what the plan does, or that nothing needs doing.
    pub fn summary(&self) -> String {
        match (self.direction, self.is_noop()) {
            (Direction::Install, true) => format!("already installed: {}", self.shim.display()),
            (Direction::Install, false) => format!("installing {}", self.shim.display()),
            (Direction::Uninstall, true) => {
                format!("not installed: no handoff hook at {}", self.shim.display())
            }
            (Direction::Uninstall, false) => format!("removing {}", self.shim.display()),
        }
    }
}

/// `<hooks_dir>/qemu.d/handoff`.
pub fn shim_path(hooks_dir: &Path) -> PathBuf {
    hooks_dir.join("qemu.d").join(SHIM_NAME)
}

/// The shim's exact text for `handoff_exe`, which must be absolute and printable.
pub fn shim_contents(handoff_exe: &Path) -> Result<String, HooksError> {
    let quoted = shell_quote(handoff_exe)?;
    // Inside the double-quoted message only `"`, `$`, `` ` `` and `\\` are special; drop them.
    let printable: String = handoff_exe
        .display()
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '"' | '$' | '`' | '\\'))
        .collect();
    Ok(format!(
        "#!/bin/sh\n\
         {SHIM_MARKER}\n\
         # handoff-hook-shim-version: {SHIM_VERSION}\n\
         # libvirt runs every executable in this directory with <domain> <operation>\n\
         # <sub-operation> <extra> and the domain XML on stdin. `handoff install-hooks --uninstall`\n\
         # removes this file.\n\
         # A missing handoff must say so in virsh's error, not as a bare \"not found\".\n\
         if [ ! -x {quoted} ]; then\n\
         \x20   echo \"handoff's libvirt hook: {printable} is missing; reinstall handoff, or remove $0\" >&2\n\
         \x20   exit 1\n\
         fi\n\
         exec {quoted} hook -- \"$@\"\n"
    ))
}

/// Single-quotes a path for `sh`; refuses what can't sensibly be in a script line.
fn shell_quote(path: &Path) -> Result<String, HooksError> {
    let unusable = |what| HooksError::ExeUnusable {
        path: path.to_owned(),
        what,
    };
    if !path.is_absolute() {
        return Err(HooksError::ExeNotAbsolute {
            path: path.to_owned(),
        });
    }
    let text = path
        .to_str()
        .ok_or_else(|| unusable("bytes that are not UTF-8"))?;
    if text.chars().any(char::is_control) {
        return Err(unusable("a control character (e.g. a newline)"));
    }
    // Inside '…' nothing is special to sh except ' itself, written as '\''.
    Ok(format!("'{}'", text.replace('\'', r"'\''")))
}

/// What installing the shim for `handoff_exe` into `hooks_dir` would do.
pub fn plan_install(hooks_dir: &Path, handoff_exe: &Path) -> Result<InstallPlan, HooksError> {
    let contents = shim_contents(handoff_exe)?;
    let mut plan = empty_plan(Direction::Install, hooks_dir);
    check_exe(handoff_exe)?;

    let qemu_d = hooks_dir.join("qemu.d");
    for dir in [hooks_dir, &qemu_d] {
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(HooksError::NotADirectory { path: dir.to_owned() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                plan.actions.push(Action::CreateDir { path: dir.to_owned() })
            }
            Err(e) => {
                return Err(HooksError::Read {
                    path: dir.to_owned(),
                    source: e,
                });
            }
        }
    }

    survey_foreign_hooks(hooks_dir, &mut plan)?;

    match read_shim(&plan.shim)? {
        None => plan.actions.push(Action::WriteShim {
            path: plan.shim.clone(),
            contents,
            replaces_older: false,
        }),
        Some(Shim::Foreign) => {
            return Err(HooksError::ForeignShim {
                path: plan.shim.clone(),
            });
        }
        Some(Shim::Ours {
            contents: existing,
            mode,
        }) => {
            if existing != contents {
                plan.actions.push(Action::WriteShim {
                    path: plan.shim.clone(),
                    contents,
                    replaces_older: true,
                });
            } else if mode != SHIM_MODE {
                plan.actions.push(Action::SetMode {
                    path: plan.shim.clone(),
                    mode: SHIM_MODE,
                });
            }
        }
    }
    Ok(plan)
}

/// What removing handoff's shim from `hooks_dir` would do. Only a file carrying
/// [`SHIM_MARKER`] is removed; nothing else is.
pub fn plan_uninstall(hooks_dir: &Path) -> Result<InstallPlan, HooksError> {
    let mut plan = empty_plan(Direction::Uninstall, hooks_dir);
    if hooks_dir.is_dir() {
        survey_foreign_hooks(hooks_dir, &mut plan)?;
    }
    match read_shim(&plan.shim)? {
        None => {}
        Some(Shim::Foreign) => plan.warnings.push(Warning::ForeignShimLeft {
            path: plan.shim.clone(),
        }),
        Some(Shim::Ours { .. }) => plan.actions.push(Action::RemoveShim {
            path: plan.shim.clone(),
        }),
    }
    // Uninstalling shouldn't nag about GPU-binding scripts: they stop fighting once ours is gone.
    plan.warnings
        .retain(|w| !matches!(w, Warning::ForeignGpuHook { .. }));
    Ok(plan)
}

fn empty_plan(direction: Direction, hooks_dir: &Path) -> InstallPlan {
    InstallPlan {
        direction,
        hooks_dir: hooks_dir.to_owned(),
        shim: shim_path(hooks_dir),
        actions: Vec::new(),
        warnings: Vec::new(),
        left_alone: Vec::new(),
    }
}

/// The binary the root hook will run must be an executable file that only root (or, for an
/// install by another user into hooks of their own, that user) can change: the file and
/// every directory above it owned so and writable by no one else — a directory others can
/// write lets them rename another binary into its place, unless it is sticky (`/tmp`).
/// Refused like the hook refuses a config others can write.
pub(crate) fn check_exe(exe: &Path) -> Result<(), HooksError> {
    let meta = fs::metadata(exe).map_err(|e| HooksError::ExeMissing {
        path: exe.to_owned(),
        why: e.to_string(),
    })?;
    if !meta.is_file() || meta.mode() & 0o111 == 0 {
        return Err(HooksError::ExeMissing {
            path: exe.to_owned(),
            why: "not an executable file".into(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == me;
    let untrusted = |why: String| HooksError::ExeNotTrusted {
        path: exe.to_owned(),
        why,
    };
    if !trusted(meta.uid()) {
        return Err(untrusted(format!("owned by uid {}", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "mode {:o}: group or others can write it",
            meta.mode() & 0o7777
        )));
    }
    let real = exe.canonicalize().map_err(|e| HooksError::ExeMissing {
        path: exe.to_owned(),
        why: e.to_string(),
    })?;
    for dir in real.ancestors().skip(1) {
        let meta = fs::metadata(dir).map_err(|e| HooksError::Read {
            path: dir.to_owned(),
            source: e,
        })?;
        let sticky = meta.mode() & 0o1000 != 0;
        if !trusted(meta.uid()) {
            return Err(untrusted(format!(
                "its directory {} is owned by uid {}",
                dir.display(),
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 && !sticky {
            return Err(untrusted(format!(
                "its directory {} has mode {:o}: group or others can put another binary there",
                dir.display(),
                meta.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

enum Shim {
    Ours { contents: String, mode: u32 },
    Foreign,
}

fn read_shim(path: &Path) -> Result<Option<Shim>, HooksError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(HooksError::Read {
                path: path.to_owned(),
                source: e,
            });
        }
    };
    if !meta.is_file() {
        return Ok(Some(Shim::Foreign));
    }
    let bytes = fs::read(path).map_err(|e| HooksError::Read {
        path: path.to_owned(),
        source: e,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if text.lines().any(|l| l == SHIM_MARKER) {
        Ok(Some(Shim::Ours {
            contents: text.into_owned(),
            mode: meta.mode() & 0o7777,
        }))
    } else {
        Ok(Some(Shim::Foreign))
    }
}

/// What sits at `<hooks_dir>/qemu.d/handoff` (for `handoff doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstalledShim {
    Missing,
    /// Something there that `install-hooks` did not write.
    Foreign,
    /// Our shim: its mode, and the binary it runs (None when the text was edited).
    Ours {
        mode: u32,
        exe: Option<PathBuf>,
    },
}

/// Reads the shim in `hooks_dir` without changing anything.
pub fn installed_shim(hooks_dir: &Path) -> Result<InstalledShim, HooksError> {
    Ok(match read_shim(&shim_path(hooks_dir))? {
        None => InstalledShim::Missing,
        Some(Shim::Foreign) => InstalledShim::Foreign,
        Some(Shim::Ours { contents, mode }) => InstalledShim::Ours {
            mode,
            exe: shim_exe(&contents),
        },
    })
}

/// The binary a shim written by [`shim_contents`] runs: its `exec '<path>' hook -- "$@"`
/// line (`hook "$@"` in a version 1 shim), unquoted.
pub fn shim_exe(shim: &str) -> Option<PathBuf> {
    let quoted = shim.lines().find_map(|l| {
        let rest = l.strip_prefix("exec '")?;
        rest.strip_suffix("' hook -- \"$@\"")
            .or_else(|| rest.strip_suffix("' hook \"$@\""))
    })?;
    Some(PathBuf::from(quoted.replace(r"'\''", "'")))
}

/// Notes `<hooks_dir>/qemu` and the other files in `qemu.d/` (left alone), and warns about
/// those that already bind GPUs.
fn survey_foreign_hooks(hooks_dir: &Path, plan: &mut InstallPlan) -> Result<(), HooksError> {
    let mut candidates = vec![hooks_dir.join("qemu")];
    let qemu_d = hooks_dir.join("qemu.d");
    match fs::read_dir(&qemu_d) {
        Ok(entries) => {
            let mut names: Vec<PathBuf> = entries
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .map_err(|e| HooksError::Read {
                    path: qemu_d.clone(),
                    source: e,
                })?;
            names.sort();
            candidates.extend(
                names
                    .into_iter()
                    .filter(|p| p.file_name() != Some(OsStr::new(SHIM_NAME))),
            );
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(HooksError::Read {
                path: qemu_d,
                source: e,
            });
        }
    }
    for path in candidates {
        let Ok(meta) = fs::metadata(&path) else { continue };
        if !meta.is_file() {
            continue;
        }
        plan.left_alone.push(path.clone());
        // Only what libvirt would run can fight with us.
        if meta.mode() & 0o111 == 0 {
            continue;
        }
        let bytes = fs::read(&path).map_err(|e| HooksError::Read {
            path: path.clone(),
            source: e,
        })?;
        let mentions = gpu_binding_mentions(&bytes);
        if !mentions.is_empty() {
            plan.warnings.push(Warning::ForeignGpuHook { path, mentions });
        }
    }
    Ok(())
}

/// Which of `GPU_BINDING_WORDS` a script contains (case-insensitive).
pub fn gpu_binding_mentions(script: &[u8]) -> Vec<String> {
    let lower = String::from_utf8_lossy(script).to_lowercase();
    GPU_BINDING_WORDS
        .iter()
        .filter(|w| lower.contains(*w))
        .map(|w| w.to_string())
        .collect()
}

/// Walks the plan's actions in order.
pub fn apply(plan: &InstallPlan) -> Result<(), HooksError> {
    for action in &plan.actions {
        match action {
            Action::CreateDir { path } => fs::create_dir(path)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| HooksError::CreateDir {
                    path: path.clone(),
                    source: e,
                })?,
            Action::WriteShim { path, contents, .. } => write_shim(&plan.hooks_dir, path, contents)?,
            Action::SetMode { path, mode } => fs::set_permissions(path, fs::Permissions::from_mode(*mode))
                .map_err(|e| HooksError::Write {
                    path: path.clone(),
                    source: e,
                })?,
            Action::RemoveShim { path } => fs::remove_file(path).map_err(|e| HooksError::Remove {
                path: path.clone(),
                source: e,
            })?,
        }
    }
    Ok(())
}

/// Writes the shim beside `qemu.d/` (libvirt doesn't run files there) and renames it into
/// place, so libvirt never runs a half-written or non-executable shim.
fn write_shim(hooks_dir: &Path, path: &Path, contents: &str) -> Result<(), HooksError> {
    let tmp = hooks_dir.join(format!(".handoff-shim.{}.tmp", std::process::id()));
    let werr = |source| HooksError::Write {
        path: tmp.clone(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(SHIM_MODE)
            .open(&tmp)?;
        file.write_all(contents.as_bytes())?;
        // The umask may have cut the mode at creation.
        file.set_permissions(fs::Permissions::from_mode(SHIM_MODE))?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(werr(e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        HooksError::Write {
            path: path.to_owned(),
            source: e,
        }
    })
}

/// Pids of live processes that run libvirt's qemu driver (`libvirtd`, or `virtqemud` with
/// modular daemons), found through `<proc_root>/*/comm`.
pub fn libvirt_daemon_pids(proc_root: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let dir = proc_root.join(pid.to_string());
            let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
            // A zombie's comm stays; it must not count as a running daemon.
            let alive = fs::read_to_string(dir.join("stat")).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            });
            matches!(comm.trim_end(), "libvirtd" | "virtqemud") && alive
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// What happened to the daemon after the files changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reload", rename_all = "snake_case")]
pub enum Reload {
    /// SIGHUP sent: libvirt re-reads its hooks.
    Signalled { pids: Vec<u32> },
    /// No daemon runs: it reads the hooks when it starts.
    NotRunning,
    /// Sending SIGHUP failed.
    Failed { pid: u32, error: String },
    /// Not attempted (dry run, nothing changed, or a test hooks directory).
    Skipped,
}

impl fmt::Display for Reload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reload::Signalled { pids } => {
                let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
                write!(f, "libvirtd (pid {}) reloaded its hooks", pids.join(", "))
            }
            Reload::NotRunning => write!(f, "libvirtd is not running; the hook takes effect when it starts"),
            Reload::Failed { pid, error } => write!(
                f,
                "could not tell libvirtd (pid {pid}) to reload its hooks ({error}); run \
                 `sudo kill -HUP {pid}` or restart libvirtd before the next VM start"
            ),
            Reload::Skipped => Ok(()),
        }
    }
}

/// SIGHUPs every libvirt daemon running the qemu driver so it re-reads its hooks.
pub fn reload_libvirt(proc_root: &Path) -> Reload {
    let pids = libvirt_daemon_pids(proc_root);
    if pids.is_empty() {
        return Reload::NotRunning;
    }
    for &pid in &pids {
        let pid_t = nix::unistd::Pid::from_raw(pid as i32);
        if let Err(errno) = nix::sys::signal::kill(pid_t, nix::sys::signal::Signal::SIGHUP) {
            return Reload::Failed {
                pid,
                error: io::Error::from(errno).to_string(),
            };
        }
    }
    Reload::Signalled { pids }
}

/// Everything `handoff install-hooks` needs, as the CLI's flags set it.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// `--hooks-dir` (hidden, for tests); default [`DEFAULT_HOOKS_DIR`].
    pub hooks_dir: PathBuf,
    /// The binary the shim runs; the CLI passes `std::env::current_exe()`.
    pub handoff_exe: PathBuf,
    /// `--uninstall`.
    pub uninstall: bool,
    /// `--dry-run`: plan and report, change nothing, signal nothing.
    pub dry_run: bool,
    /// SIGHUP libvirtd after a change. The CLI sets it unless `--hooks-dir` points elsewhere.
    pub reload_daemon: bool,
    /// Check `libvirtd --version` ≥ 6.5 before installing.
    pub check_version: bool,
    /// Where to look for the daemon's pid (`/proc`; `Host::procfs`).
    pub proc_root: PathBuf,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            hooks_dir: DEFAULT_HOOKS_DIR.into(),
            handoff_exe: PathBuf::new(),
            uninstall: false,
            dry_run: false,
            reload_daemon: true,
            check_version: true,
            proc_root: "/proc".into(),
        }
    }
}

impl InstallOptions {
    /// The options `handoff install-hooks [--uninstall] [--dry-run] [--hooks-dir DIR]` means:
    /// the shim runs this very binary (symlinks resolved), and libvirtd is signalled only when
    /// the real hooks directory changed.
    pub fn for_cli(uninstall: bool, dry_run: bool, hooks_dir: Option<PathBuf>) -> io::Result<Self> {
        let reload_daemon = hooks_dir
            .as_deref()
            .is_none_or(|d| d == Path::new(DEFAULT_HOOKS_DIR));
        Ok(Self {
            hooks_dir: hooks_dir.unwrap_or_else(|| DEFAULT_HOOKS_DIR.into()),
            handoff_exe: std::env::current_exe()?,
            uninstall,
            dry_run,
            reload_daemon,
            ..Self::default()
        })
    }
}

/// What `handoff install-hooks` did; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    pub dry_run: bool,
    pub summary: String,
    pub plan: InstallPlan,
    pub libvirt_version: Option<LibvirtVersion>,
    pub reload: Reload,
}

impl fmt::Display for InstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let would = if self.dry_run { "would " } else { "" };
        writeln!(
            f,
            "{}{}",
            if self.dry_run { "dry run: " } else { "" },
            self.plan.summary()
        )?;
        for action in &self.plan.actions {
            writeln!(f, "  {would}{action}")?;
        }
        for path in &self.plan.left_alone {
            writeln!(f, "  left alone: {}", path.display())?;
        }
        for warning in &self.plan.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        if self.reload != Reload::Skipped {
            writeln!(f, "{}", self.reload)?;
        }
        Ok(())
    }
}

/// `handoff install-hooks [--uninstall] [--dry-run]`: plan, apply, make libvirt notice.
pub fn install_hooks(opts: &InstallOptions) -> Result<InstallReport, HooksError> {
    let mut libvirt_version = None;
    let plan = if opts.uninstall {
        plan_uninstall(&opts.hooks_dir)?
    } else {
        if opts.check_version {
            let found = self::libvirt_version()?;
            check_libvirt_version(found, &opts.handoff_exe)?;
            libvirt_version = Some(found);
        }
        plan_install(&opts.hooks_dir, &opts.handoff_exe)?
    };
    let reload = if opts.dry_run || plan.is_noop() {
        Reload::Skipped
    } else {
        apply(&plan)?;
        if opts.reload_daemon {
            reload_libvirt(&opts.proc_root)
        } else {
            Reload::Skipped
        }
    };
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }
    Ok(InstallReport {
        dry_run: opts.dry_run,
        summary: plan.summary(),
        plan,
        libvirt_version,
        reload,
    })
}
