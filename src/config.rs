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
    /// The GPUs handoff hands: `[[gpu]]` entries, or one `[gpu]` table. `cfg.gpu.address`
    /// and the like read the primary one (see [`Gpus`]).
    pub gpu: Gpus,
    /// No VM unless one is configured: a made-up "win11" at qemu:///system would have a
    /// right click start a domain nobody named (issue 17).
    #[serde(rename = "vm")]
    pub vms: Vec<VmConfig>,
    pub looking_glass: LookingGlassConfig,
    pub block: BlockConfig,
    pub tray: TrayConfig,
    pub host: Host,
    /// The Proxmox VE API that `[[vm]]` entries with a `vmid` live behind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxmox: Option<ProxmoxConfig>,
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
    /// What menus, the bar and `status GPU` call it; unset: the name from pci.ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// This GPU may be handed to a VM even though it drives the host's display (it was the
    /// boot VGA device, or a display server holds its card node). Off by default: the hook
    /// refuses such a GPU, since the host loses its console and local desktop.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_display: bool,
    /// The GPU that surfaces showing one GPU show (the tray's icon colour, the bar block's
    /// default). At most one; unset everywhere: the first `[[gpu]]`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub primary: bool,
    /// Start the units stopped to free the GPU (`systemctl [--user] stop` from the tray,
    /// the details window or `start --stop-holders`) again when it is back on Linux.
    pub restart_stopped_units: bool,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            address: PciAddress::new(0, 1, 0, 0),
            host_driver: "nvidia".into(),
            watchdog_s: 10,
            label: None,
            allow_display: false,
            primary: false,
            restart_stopped_units: true,
        }
    }
}

impl GpuConfig {
    /// The card stays on vfio-pci between VMs (`host_driver = "vfio-pci"`): handing it
    /// changes no binding, but the record and the lock still give it to one VM at a time.
    pub fn isolated(&self) -> bool {
        self.host_driver == crate::bind::plan::VFIO
    }
}

/// The configured GPUs, in file order, and which one is primary.
///
/// The file says either `[gpu]` (one table, the form before several GPUs) or `[[gpu]]`
/// (an array); both read into this, and `config show` prints the array. It dereferences
/// to the primary GPU so that code about "the GPU" (`cfg.gpu.address`, the tray's icon)
/// keeps meaning the primary one, and code about each GPU iterates [`Gpus::iter`].
#[derive(Debug, Clone)]
pub struct Gpus {
    list: Vec<GpuConfig>,
    primary: usize,
    /// Written as one `[gpu]` table: errors keep naming `[gpu] key` as they always did.
    single_table: bool,
}

/// The same GPUs, whichever form the file wrote them in.
impl PartialEq for Gpus {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list && self.primary == other.primary
    }
}

impl Default for Gpus {
    fn default() -> Self {
        Self {
            list: vec![GpuConfig::default()],
            primary: 0,
            single_table: true,
        }
    }
}

impl Gpus {
    /// `list` (non-empty) with its primary: the one marked `primary`, else the first.
    pub fn new(list: Vec<GpuConfig>) -> Self {
        assert!(!list.is_empty(), "at least one GPU");
        let primary = list.iter().position(|g| g.primary).unwrap_or(0);
        Self {
            list,
            primary,
            single_table: false,
        }
    }

    /// Every GPU, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, GpuConfig> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn primary(&self) -> &GpuConfig {
        &self.list[self.primary]
    }

    /// The GPU at `address` (any function of its slot).
    pub fn at(&self, address: PciAddress) -> Option<&GpuConfig> {
        self.list.iter().find(|g| g.address.same_slot(&address))
    }

    /// The GPU a person named: its address (any function of its slot, short form too) or
    /// its label.
    pub fn find(&self, name: &str) -> Option<&GpuConfig> {
        if let Ok(a) = name.parse::<PciAddress>()
            && let Some(g) = self.at(a)
        {
            return Some(g);
        }
        self.list.iter().find(|g| g.label.as_deref() == Some(name))
    }

    /// The same GPUs with the one at `address` (any function of its slot) as primary.
    pub fn with_primary(&self, address: PciAddress) -> Option<Gpus> {
        let primary = self.list.iter().position(|g| g.address.same_slot(&address))?;
        Some(Gpus {
            primary,
            ..self.clone()
        })
    }

    /// Adds a GPU (tests, the demo).
    pub fn push(&mut self, gpu: GpuConfig) {
        self.list.push(gpu);
        self.single_table = false;
    }
}

impl std::ops::Deref for Gpus {
    type Target = GpuConfig;
    fn deref(&self) -> &GpuConfig {
        self.primary()
    }
}

impl std::ops::DerefMut for Gpus {
    fn deref_mut(&mut self) -> &mut GpuConfig {
        &mut self.list[self.primary]
    }
}

impl Serialize for Gpus {
    /// Always the array form: `config show` prints `[[gpu]]`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.list.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Gpus {
    /// `[gpu]` (a table) or `[[gpu]]` (an array of tables). Each entry is read by
    /// `GpuConfig`'s own derive, so a wrong key or type keeps its line and column.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Gpus;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a [gpu] table or [[gpu]] entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Gpus, A::Error> {
                let one = GpuConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Gpus {
                    list: vec![one],
                    primary: 0,
                    single_table: true,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Gpus, A::Error> {
                let list = Vec::<GpuConfig>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                if list.is_empty() {
                    return Err(serde::de::Error::custom(
                        "gpu is an empty array: give at least one [[gpu]] with its address",
                    ));
                }
                Ok(Gpus::new(list))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The libvirt domain name; for a Proxmox VE VM (`vmid`), a name to call it by
    /// (`handoff switch linux-ai`), defaulting to the VMID.
    #[serde(default)]
    pub name: String,
    /// A Proxmox VE VM's id (140): the VM lives behind `[proxmox]`, not libvirt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
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
            vmid: None,
            uri: default_uri(),
            shutdown_timeout_s: default_shutdown_timeout(),
        }
    }

    pub fn label(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.name)
    }
}

/// `[proxmox]`: where the PVE API is and how handoff proves who it is and who the node is.
/// Only `handoff-proxmox` talks to it; the hookscript on the PVE host reads PVE's files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxConfig {
    /// `https://pve.lan:8006`.
    pub url: String,
    /// The API token's id, `user@realm!tokenid` (`handoff@pve!desk`).
    pub token: String,
    /// A file holding the token's secret (the UUID PVE showed once); readable by its
    /// owner only.
    pub token_secret_file: PathBuf,
    /// The SHA-256 fingerprint of the node's certificate, `AB:CD:…` as
    /// `pvenode cert info` prints it. Either this or `ca_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// A PEM file with the CA (or the certificate itself) that signed the node's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The node the VMs are on; unset: asked of the cluster for each VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How often a tray or `handoff-block --watch` asks the API for changes (PVE has no
    /// event stream).
    #[serde(default = "default_poll_interval")]
    pub poll_interval_s: u64,
}

fn default_poll_interval() -> u64 {
    5
}

/// Whether `s` is a SHA-256 fingerprint in PVE's spelling: 32 hex bytes joined by `:`.
pub fn is_sha256_fingerprint(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 32
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
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

/// The tray (`handoff-tray`): what it tells beyond the changes of state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrayConfig {
    /// A notification when something starts using a GPU while a VM that wants it is about
    /// to start: the tray itself is starting (or switching to) a VM, or a start was refused
    /// within the last `busy_alert_window_s` (the person is about to try again). Off by
    /// default: the icon and the tooltip say "busy" anyway.
    pub busy_alert: bool,
    /// How long after a refused start a new user of the GPU is told (seconds, 1 to 3600).
    pub busy_alert_window_s: u64,
}

impl Default for TrayConfig {
    fn default() -> Self {
        Self {
            busy_alert: false,
            busy_alert_window_s: 120,
        }
    }
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
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
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
        cfg.fill_in_proxmox_vms();
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

    /// A `[[vm]]` with a `vmid` is named by its VMID unless it has a name, and lives at the
    /// `[proxmox] url` (its `uri`), so that everything keyed by name and URI works for it.
    fn fill_in_proxmox_vms(&mut self) {
        let url = self.proxmox.as_ref().map(|p| p.url.clone());
        for vm in &mut self.vms {
            if let Some(id) = vm.vmid {
                if vm.name.is_empty() {
                    vm.name = id.to_string();
                }
                if let Some(url) = &url {
                    vm.uri = url.clone();
                }
            }
        }
    }

    /// Checks serde cannot express. Values that end up in paths are checked here. An
    /// error comes with the key it is about, so that [`Config::parse`] can point at it.
    fn validate(&self) -> Result<(), (String, Vec<KeySeg>)> {
        use KeySeg::{Index, Key};
        self.validate_gpus()?;
        if let Some(p) = &self.proxmox {
            self.validate_proxmox(p)?;
        }
        if !(1..=3600).contains(&self.tray.busy_alert_window_s) {
            return Err((
                format!(
                    "[tray] busy_alert_window_s = {} is out of range: it must be 1 to 3600 (seconds)",
                    self.tray.busy_alert_window_s
                ),
                vec![Key("tray"), Key("busy_alert_window_s")],
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, vm) in self.vms.iter().enumerate() {
            if let Some(id) = vm.vmid {
                if self.proxmox.is_none() {
                    return Err((
                        format!(
                            "[[vm]] vmid = {id} is a Proxmox VE VM, but there is no [proxmox] section \
                             (url, token, token_secret_file, fingerprint); docs/proxmox.md shows one"
                        ),
                        vec![Key("vm"), Index(i), Key("vmid")],
                    ));
                }
                if !(100..=999_999_999).contains(&id) {
                    return Err((
                        format!("[[vm]] vmid = {id} is not a PVE VMID (100 to 999999999)"),
                        vec![Key("vm"), Index(i), Key("vmid")],
                    ));
                }
            }
            let at = vec![Key("vm"), Index(i), Key("name")];
            if vm.name.trim().is_empty() {
                return Err((
                    "a [[vm]] entry has an empty name; it must be the libvirt domain name (or give a Proxmox VE VM's vmid)".into(),
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

    /// [`Config::validate`] for each GPU. A single `[gpu]` table is named `[gpu]` as it
    /// always was; an entry of `[[gpu]]` is named with its address.
    fn validate_gpus(&self) -> Result<(), (String, Vec<KeySeg>)> {
        use KeySeg::{Index, Key};
        let single = self.gpu.single_table;
        let primaries = self.gpu.iter().filter(|g| g.primary).count();
        for (i, g) in self.gpu.iter().enumerate() {
            let at = |key: &'static str| {
                if single {
                    vec![Key("gpu"), Key(key)]
                } else {
                    vec![Key("gpu"), Index(i), Key(key)]
                }
            };
            // The messages say `[gpu] key`, as docs/troubleshooting.md quotes them; an entry
            // of `[[gpu]]` is named by its address instead.
            let named = |m: String| {
                if single {
                    m
                } else {
                    m.replacen("[gpu]", &format!("[[gpu]] {}:", g.address), 1)
                }
            };
            if !is_driver_name(&g.host_driver) {
                return Err((
                    named(format!(
                        "[gpu] host_driver = {:?} is not a kernel driver name (letters, digits, '_' and '-' only), e.g. \"nvidia\"",
                        g.host_driver
                    )),
                    at("host_driver"),
                ));
            }
            // Durations are bounded here, once, so that no deadline computed from them
            // (`Instant + Duration`) can overflow in the middle of a handoff.
            if g.watchdog_s == 0 {
                return Err((
                    named("[gpu] watchdog_s must be at least 1 (seconds)".into()),
                    at("watchdog_s"),
                ));
            }
            if g.watchdog_s > *WATCHDOG_S.end() {
                return Err((
                    // The bound is spelled out so that docs/troubleshooting.md can quote it.
                    named(format!(
                        "[gpu] watchdog_s = {} is too long: it must be at most 600 (seconds)",
                        g.watchdog_s
                    )),
                    at("watchdog_s"),
                ));
            }
            if g.label.as_deref().is_some_and(|l| l.trim().is_empty()) {
                return Err((
                    named("[gpu] label is empty; leave it out to use the name from pci.ids".into()),
                    at("label"),
                ));
            }
            if let Some(j) = self
                .gpu
                .iter()
                .take(i)
                .position(|o| o.address.same_slot(&g.address))
            {
                return Err((
                    format!(
                        "[[gpu]] address = \"{}\" is the slot of GPU {} again; list each card once (its other functions follow it)",
                        g.address, self.gpu.list[j].address
                    ),
                    at("address"),
                ));
            }
            if let Some(l) = &g.label
                && self.gpu.iter().take(i).any(|o| o.label.as_ref() == Some(l))
            {
                return Err((
                    format!("[[gpu]] label = {l:?} is used twice; `status GPU` needs each label once"),
                    at("label"),
                ));
            }
            if g.primary && primaries > 1 {
                return Err((
                    format!(
                        "[[gpu]] primary = true is set on {primaries} GPUs; mark one (or none: the first is primary)"
                    ),
                    at("primary"),
                ));
            }
        }
        Ok(())
    }

    fn validate_proxmox(&self, p: &ProxmoxConfig) -> Result<(), (String, Vec<KeySeg>)> {
        use KeySeg::Key;
        let at = |k: &'static str| vec![Key("proxmox"), Key(k)];
        if !p.url.starts_with("https://") {
            return Err((
                format!(
                    "[proxmox] url = {:?} must be https://HOST:8006 (PVE's API speaks only TLS)",
                    p.url
                ),
                at("url"),
            ));
        }
        let (user, tokenid) = p.token.split_once('!').unwrap_or((&p.token, ""));
        if !user.contains('@') || tokenid.is_empty() {
            return Err((
                format!(
                    "[proxmox] token = {:?} must be the token's id, user@realm!tokenid (e.g. \"handoff@pve!desk\"); \
                     its secret goes in token_secret_file",
                    p.token
                ),
                at("token"),
            ));
        }
        match (&p.fingerprint, &p.ca_file) {
            (None, None) => {
                return Err((
                    "[proxmox] needs fingerprint = \"AB:CD:…\" (the node certificate's SHA-256, from \
                     `pvenode cert info` on the node) or ca_file = \"/path/ca.pem\"; handoff never accepts \
                     any certificate"
                        .into(),
                    vec![Key("proxmox")],
                ));
            }
            (Some(_), Some(_)) => {
                return Err((
                    "[proxmox] has both fingerprint and ca_file; keep one".into(),
                    at("ca_file"),
                ));
            }
            (Some(f), None) if !is_sha256_fingerprint(f) => {
                return Err((
                    format!(
                        "[proxmox] fingerprint = {f:?} is not a SHA-256 fingerprint: 32 hex bytes joined by ':', \
                         as `pvenode cert info` prints it"
                    ),
                    at("fingerprint"),
                ));
            }
            _ => {}
        }
        if !(1..=3600).contains(&p.poll_interval_s) {
            return Err((
                format!(
                    "[proxmox] poll_interval_s = {} is out of range: it must be 1 to 3600 (seconds)",
                    p.poll_interval_s
                ),
                at("poll_interval_s"),
            ));
        }
        Ok(())
    }

    /// This config about the GPU `name` (an address or label, [`Gpus::find`]): that GPU
    /// made primary, for a surface asked to show one GPU (`handoff-block --gpu`).
    pub fn focused_on(&self, name: &str) -> Option<Config> {
        let address = self.gpu.find(name)?.address;
        Some(Config {
            gpu: self.gpu.with_primary(address)?,
            ..self.clone()
        })
    }

    /// "GPU 0000:01:00.0", or "GPUs 0000:00:02.0, 0000:01:00.0" (`config check`).
    pub fn gpus_summary(&self) -> String {
        let list: Vec<String> = self.gpu.iter().map(|g| g.address.to_string()).collect();
        match list.len() {
            1 => format!("GPU {}", list[0]),
            _ => format!("GPUs {}", list.join(", ")),
        }
    }

    /// The VM named `name` (its name, label or PVE VMID), or the first (default) VM when
    /// `name` is None.
    pub fn vm(&self, name: Option<&str>) -> Option<&VmConfig> {
        match name {
            Some(n) => self
                .vms
                .iter()
                .find(|v| v.name == n || v.label() == n || v.vmid.is_some_and(|id| id.to_string() == n)),
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
