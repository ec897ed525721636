//! The configuration file (TOML), as the README's "Configuration" describes it.
//!
//! Which file: `HANDOFF_CONFIG` when set (it must exist), else the user's
//! `$XDG_CONFIG_HOME/handoff/config.toml` (or `~/.config/…`), else
//! `/etc/handoff/config.toml`, else built-in defaults. The first that exists wins whole;
//! files are not merged, so what a command does never depends on a file you did not
//! name. The libvirt hook reads only the system file (see [`Config::load_system`]).
//!
//! Unknown keys and wrong types are errors that name the file, line and column.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::host::Host;
use crate::pci::PciAddress;

pub const SYSTEM_CONFIG: &str = "/etc/handoff/config.toml";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub gpu: GpuConfig,
    /// No VM unless one is configured: a made-up "win11" at qemu:///system would have a
    /// right click start a domain nobody named (issue 17).
    #[serde(rename = "vm")]
    pub vms: Vec<VmConfig>,
    pub looking_glass: LookingGlassConfig,
    pub block: BlockConfig,
    pub host: Host,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// The graphics function; the other functions of its slot follow it.
    pub address: PciAddress,
    /// The driver the GPU returns to after the VM.
    pub host_driver: String,
    /// How long a write to `unbind`/`bind`/`drivers_probe` may take before it is
    /// reported as hung.
    pub watchdog_s: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            address: PciAddress::new(0, 1, 0, 0),
            host_driver: "nvidia".into(),
            watchdog_s: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The libvirt domain name.
    pub name: String,
    /// Shown in menus and the bar; defaults to the name.
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default = "default_uri")]
    pub uri: String,
    /// Graceful shutdown timeout; forcing is a separate, explicit action.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_s: u64,
}

fn default_uri() -> String {
    "qemu:///system".into()
}

fn default_shutdown_timeout() -> u64 {
    120
}

impl VmConfig {
    pub fn named(name: &str, label: &str) -> Self {
        Self {
            name: name.into(),
            label: Some(label.into()),
            uri: default_uri(),
            shutdown_timeout_s: default_shutdown_timeout(),
        }
    }

    pub fn label(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookingGlassConfig {
    pub command: String,
    pub args: Vec<String>,
    /// The i3 workspace that receives the window.
    pub workspace: String,
    /// The X window class (or instance) the client's window is matched on, or its Wayland
    /// `app_id` under sway.
    pub window_class: String,
    /// The shared-memory file of a `<shmem name='looking-glass'>` device; unset means
    /// `shm/looking-glass` under `[host] dev`. (A kvmfr device's path comes from the
    /// domain XML.) `handoff lg-test` checks it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shm: Option<PathBuf>,
}

impl Default for LookingGlassConfig {
    fn default() -> Self {
        Self {
            command: "looking-glass-client".into(),
            args: Vec::new(),
            workspace: "10".into(),
            window_class: "looking-glass-client".into(),
            shm: None,
        }
    }
}

/// The bar block (`handoff-block`): what its clicks do beyond the built-in ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockConfig {
    /// The command a middle click runs, detached, as an argv list (no shell), e.g.
    /// `["handoff", "switch", "linux-ai"]`. Empty (the default): a middle click only
    /// refreshes the block.
    pub middle_click: Vec<String>,
}

/// Where a configuration came from; shown by `handoff config check` and in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Defaults,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Defaults => f.write_str("built-in defaults (no config file found)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{path}: {why}; the libvirt hook runs as root and reads only a file that root owns and nobody else can write (fix: chown root:root {path}; chmod 644 {path})"
    )]
    Insecure { path: PathBuf, why: String },
    #[error(
        "{path} (from {given_by}) was not read: as root, handoff trusts only the root-owned system config {}, since the config decides which files root writes; put the settings there (owned by root, writable by no one else), or run without {given_by}",
        system.display()
    )]
    NotForRoot {
        path: PathBuf,
        given_by: &'static str,
        system: PathBuf,
    },
    #[error(
        "{path} is a symbolic link to {target}, which cannot be read ({source}); that is not the same as no config, \
         so nothing was done: point the link at the config, or remove the link to use the defaults"
    )]
    BrokenLink {
        path: PathBuf,
        target: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "HANDOFF_CONFIG names {path}, which does not exist; create it, or unset HANDOFF_CONFIG to use ~/.config/handoff/config.toml"
    )]
    EnvMissing { path: PathBuf },
}

impl Config {
    /// Parse a config text; `path` is only used to name the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let span = e.span();
            let (line, column) = span
                .as_ref()
                .map(|s| line_column(text, s.start))
                .unwrap_or((1, 1));
            let mut message = plain_words(e.message().trim());
            // An error about a value (wrong type, bad address) points at the value; say
            // which key it belongs to, since the message only shows the value.
            if let Some(key) = span.and_then(|s| key_of_value(text, s.start)) {
                message = format!("{key}: {message}");
            }
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        })?;
        cfg.validate().map_err(|(message, at)| {
            match locate(text, &at).map(|offset| line_column(text, offset)) {
                Some((line, column)) => ConfigError::Parse {
                    path: path.to_owned(),
                    line,
                    column,
                    message,
                },
                None => ConfigError::Invalid {
                    path: path.to_owned(),
                    message,
                },
            }
        })?;
        Ok(cfg)
    }

    /// Reads and parses one file: a regular file of at most [`crate::bounded::MAX_LEN`]
    /// bytes (a FIFO or a device at the path is an error, never a hang).
    pub fn load_file(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::bounded::read_to_string(path, crate::bounded::Links::Follow).map_err(|source| {
            ConfigError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        Self::parse(&text, path)
    }

    /// The config an interactive command uses: `HANDOFF_CONFIG`, the user file, the
    /// system file, or defaults, whichever comes first.
    pub fn load() -> Result<(Self, Source), ConfigError> {
        Self::load_from(
            std::env::var_os("HANDOFF_CONFIG").map(PathBuf::from),
            user_config_path(),
        )
    }

    /// [`Config::load`] with `HANDOFF_CONFIG` and the user file given.
    pub fn load_from(env: Option<PathBuf>, user: Option<PathBuf>) -> Result<(Self, Source), ConfigError> {
        Self::load_from_paths(env, user, Path::new(SYSTEM_CONFIG))
    }

    /// [`Config::load_from`] with the system file given too (tests, which may not write
    /// to /etc).
    pub fn load_from_paths(
        env: Option<PathBuf>,
        user: Option<PathBuf>,
        system: &Path,
    ) -> Result<(Self, Source), ConfigError> {
        if let Some(path) = env.filter(|p| !p.as_os_str().is_empty()) {
            if !present(&path)? {
                return Err(ConfigError::EnvMissing { path });
            }
            return Ok((Self::load_file(&path)?, Source::File(path)));
        }
        for path in user.into_iter().chain([system.to_owned()]) {
            if present(&path)? {
                return Ok((Self::load_file(&path)?, Source::File(path)));
            }
        }
        Ok((Self::default(), Source::Defaults))
    }

    /// What the root hook reads: only the given system file, and only if root owns it
    /// and neither group nor others can write it. A missing file means defaults.
    pub fn load_system(path: &Path) -> Result<(Self, Source), ConfigError> {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Only a path with nothing at it means defaults: a dangling link is a
                // config someone meant to have, and the defaults act on the real /sys.
                present(path)?;
                return Ok((Self::default(), Source::Defaults));
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        if meta.uid() != 0 {
            return Err(ConfigError::Insecure {
                path: path.to_owned(),
                why: format!("it is owned by uid {}, not root", meta.uid()),
            });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(ConfigError::Insecure {
                path: path.to_owned(),
                why: format!(
                    "its mode {:o} lets group or others write it",
                    meta.mode() & 0o7777
                ),
            });
        }
        Ok((Self::load_file(path)?, Source::File(path.to_owned())))
    }

    /// What a command that writes as root reads (`rebind --force`, `bind`): only the system
    /// file, checked as [`Config::load_system`] checks it, whose `[host]` roots then decide
    /// every path written. `--config` (`explicit`) or `HANDOFF_CONFIG` (`env`) naming another
    /// file is refused rather than ignored, so nobody believes their file was used; the
    /// user's own file is not looked at.
    pub fn load_as_root(
        explicit: Option<&Path>,
        env: Option<PathBuf>,
        system: &Path,
    ) -> Result<(Self, Source), ConfigError> {
        let given = explicit.map(|p| (p.to_owned(), "--config")).or_else(|| {
            env.filter(|p| !p.as_os_str().is_empty())
                .map(|p| (p, "HANDOFF_CONFIG"))
        });
        if let Some((path, given_by)) = given {
            let same = path == system
                || matches!(
                    (path.canonicalize(), system.canonicalize()),
                    (Ok(a), Ok(b)) if a == b
                );
            if !same {
                return Err(ConfigError::NotForRoot {
                    path,
                    given_by,
                    system: system.to_owned(),
                });
            }
        }
        Self::load_system(system)
    }

    /// What a command reads: `--config FILE` (`explicit`) as given, so that a missing one is
    /// reported as that file and not as `HANDOFF_CONFIG`; else the usual search
    /// ([`Config::load`]).
    pub fn load_cli(explicit: Option<PathBuf>) -> Result<(Self, Source), ConfigError> {
        match explicit {
            Some(path) => Ok((Self::load_file(&path)?, Source::File(path))),
            None => Self::load(),
        }
    }

    /// The config of a command that writes as root (`rebind --force`, `bind`): as root
    /// (`as_root`) only the root-owned system file ([`Config::load_as_root`], `system`); as
    /// anyone else [`Config::load_cli`], since their writes are limited to what they may write
    /// anyway.
    pub fn load_to_write(
        explicit: Option<PathBuf>,
        as_root: bool,
        system: &Path,
    ) -> Result<(Self, Source), ConfigError> {
        if !as_root {
            return Self::load_cli(explicit);
        }
        Self::load_as_root(
            explicit.as_deref(),
            std::env::var_os("HANDOFF_CONFIG").map(PathBuf::from),
            system,
        )
    }

    /// Checks serde cannot express. Values that end up in paths are checked here. An
    /// error comes with the key it is about, so that [`Config::parse`] can point at it.
    fn validate(&self) -> Result<(), (String, Vec<KeySeg>)> {
        use KeySeg::{Index, Key};
        if !is_driver_name(&self.gpu.host_driver) {
            return Err((
                format!(
                    "[gpu] host_driver = {:?} is not a kernel driver name (letters, digits, '_' and '-' only), e.g. \"nvidia\"",
                    self.gpu.host_driver
                ),
                vec![Key("gpu"), Key("host_driver")],
            ));
        }
        // Durations are bounded here, once, so that no deadline computed from them
        // (`Instant + Duration`) can overflow in the middle of a handoff.
        if self.gpu.watchdog_s == 0 {
            return Err((
                "[gpu] watchdog_s must be at least 1 (seconds)".into(),
                vec![Key("gpu"), Key("watchdog_s")],
            ));
        }
        if self.gpu.watchdog_s > *WATCHDOG_S.end() {
            return Err((
                // The bound is spelled out so that docs/troubleshooting.md can quote it.
                format!(
                    "[gpu] watchdog_s = {} is too long: it must be at most 600 (seconds)",
                    self.gpu.watchdog_s
                ),
                vec![Key("gpu"), Key("watchdog_s")],
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, vm) in self.vms.iter().enumerate() {
            let at = vec![Key("vm"), Index(i), Key("name")];
            if vm.name.trim().is_empty() {
                return Err((
                    "a [[vm]] entry has an empty name; it must be the libvirt domain name".into(),
                    at,
                ));
            }
            if !SHUTDOWN_TIMEOUT_S.contains(&vm.shutdown_timeout_s) {
                return Err((
                    format!(
                        "[[vm]] shutdown_timeout_s = {} of {:?} is out of range: it must be 1 to 86400 (seconds)",
                        vm.shutdown_timeout_s, vm.name,
                    ),
                    vec![Key("vm"), Index(i), Key("shutdown_timeout_s")],
                ));
            }
            if !seen.insert(vm.name.as_str()) {
                return Err((
                    format!(
                        "[[vm]] name = {:?} appears twice; each domain may be listed once",
                        vm.name
                    ),
                    at,
                ));
            }
        }
        for (key, p, like) in [
            ("sysfs", &self.host.sysfs, "/sys"),
            ("proc", &self.host.procfs, "/proc"),
            ("dev", &self.host.dev, "/dev"),
            ("run", &self.host.run, "/run/handoff"),
        ] {
            if !p.is_absolute() {
                return Err((
                    format!(
                        "[host] {key} = {:?} must be an absolute path, like {like:?}",
                        p.display().to_string()
                    ),
                    vec![Key("host"), Key(key)],
                ));
            }
        }
        Ok(())
    }

    /// The VM named `name`, or the first (default) VM when `name` is None.
    pub fn vm(&self, name: Option<&str>) -> Option<&VmConfig> {
        match name {
            Some(n) => self.vms.iter().find(|v| v.name == n || v.label() == n),
            None => self.vms.first(),
        }
    }
}

/// `[gpu] watchdog_s`: a write to sysfs that takes longer is reported as hung. Ten minutes
/// is already far longer than any healthy unbind (milliseconds) or libvirt's patience.
pub const WATCHDOG_S: std::ops::RangeInclusive<u64> = 1..=600;
const _: () = assert!(
    *WATCHDOG_S.start() == 1 && *WATCHDOG_S.end() == 600,
    "the messages say 1 and 600"
);

/// `[[vm]] shutdown_timeout_s`: how long a graceful shutdown may take; a day at most.
pub const SHUTDOWN_TIMEOUT_S: std::ops::RangeInclusive<u64> = 1..=86_400;
const _: () = assert!(
    *SHUTDOWN_TIMEOUT_S.start() == 1 && *SHUTDOWN_TIMEOUT_S.end() == 86_400,
    "the messages say 1 and 86400"
);
/// Whether a config file is at `path`: false only when nothing is there at all. A symbolic
/// link whose target cannot be reached (dangling, or behind a directory we cannot enter) is
/// an error, not an absent file: falling back to another file or the defaults would act on
/// a config nobody chose.
fn present(path: &Path) -> Result<bool, ConfigError> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(source) => match std::fs::symlink_metadata(path) {
            Ok(link) if link.file_type().is_symlink() => Err(ConfigError::BrokenLink {
                path: path.to_owned(),
                target: std::fs::read_link(path).unwrap_or_default(),
                source,
            }),
            Ok(_) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
                Ok(false)
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        },
    }
}

/// Kernel driver names are used as path components under `/sys/bus/pci/drivers`.
pub fn is_driver_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub fn user_config_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("handoff/config.toml"))
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, Copy)]
enum KeySeg {
    Key(&'static str),
    Index(usize),
}

/// The byte offset of the value at `at` in `text`, when the text sets it.
fn locate(text: &str, at: &[KeySeg]) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let (first, rest) = at.split_first()?;
    let KeySeg::Key(k) = first else { return None };
    let mut value = doc.get_ref().get(*k)?;
    for seg in rest {
        value = match seg {
            KeySeg::Key(k) => value.get_ref().get(*k)?,
            KeySeg::Index(i) => value.get_ref().get(*i)?,
        };
    }
    Some(value.span().start)
}

/// The key whose value starts at `offset`, as a person would find it in the file:
/// `[gpu] watchdog_s`, `[[vm]] name`, `vm`. None when no value starts there (an error
/// about a key, or about the syntax).
fn key_of_value(text: &str, offset: usize) -> Option<String> {
    use toml::de::DeValue;
    fn walk(
        table: &toml::de::DeTable<'_>,
        offset: usize,
        path: &mut Vec<String>,
        in_array: bool,
    ) -> Option<String> {
        for (k, v) in table {
            path.push(k.get_ref().to_string());
            if v.span().start == offset {
                return Some(render(path, in_array));
            }
            let found = match v.get_ref() {
                DeValue::Table(t) => walk(t, offset, path, in_array),
                DeValue::Array(a) => a.iter().find_map(|item| match item.get_ref() {
                    DeValue::Table(t) => walk(t, offset, path, true),
                    _ => (item.span().start == offset).then(|| render(path, in_array)),
                }),
                _ => None,
            };
            if found.is_some() {
                return found;
            }
            path.pop();
        }
        None
    }
    fn render(path: &[String], in_array: bool) -> String {
        match path.split_last() {
            Some((key, [])) => key.clone(),
            Some((key, tables)) if in_array => format!("[[{}]] {key}", tables.join(".")),
            Some((key, tables)) => format!("[{}] {key}", tables.join(".")),
            None => String::new(),
        }
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    walk(doc.get_ref(), offset, &mut Vec::new(), false)
}

/// serde's type names in the words of a TOML file.
fn plain_words(message: &str) -> String {
    message
        .replace("expected u64", "expected a whole number (no quotes), e.g. 10")
        .replace("expected a sequence", "expected an array")
}
