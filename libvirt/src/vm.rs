//! Starting, stopping and switching the configured VMs, and their health: what `handoff start`, `stop`, `switch` and `vm-health` do.
//!
//! Talks to libvirt at each `[[vm]]`'s URI (any URI: `qemu:///system`,
//! `qemu+ssh://host/system`, `test:///default`), reads sysfs and `/proc` through the
//! config's [`Host`](handoff::Host) to see where the GPU went, and reads (never writes) the
//! hook's restore record. It never binds or unbinds anything itself: the libvirt hook does
//! that when libvirt starts or stops the domain. The hypervisor is reached only through
//! [`handoff::hypervisor::Hypervisor`] (libvirt, or `handoff demo`'s simulated one), which
//! reports a refusal of the hook as a value with the hook's own words.
//!
//! Nothing here waits for a desktop (no D-Bus, no display): every command works over SSH.
//! Progress goes to a caller-supplied sink, one line at a time; the outcome is a value the
//! caller renders (text or JSON) and acts on — [`StartOutcome::after_start`] is where
//! "then open Looking Glass" hooks in.
//!
//! The GPU checks only make sense when the VM runs on this machine: for a remote URI the
//! local sysfs says nothing about that host's GPU, so they are skipped and said to be.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::libvirt::VirtError;
use handoff::action::Action;
use handoff::bind::record::{Phase, RestoreRecord};
use handoff::config::{Config, VmConfig};
use handoff::gpu::{self, Owner};
use handoff::hook_install::{self, InstalledShim};
use handoff::hypervisor::{Hypervisor, HypervisorError, Start, Task, TaskState, VmRef};
use handoff::pci::PciAddress;
use handoff::status::VmState;

/// How often a wait looks again. Short: a person is watching.
const POLL: Duration = Duration::from_millis(250);
/// A line of progress this often while a graceful shutdown is pending.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no VM {name:?} in the config; configured: {}", known_list(known))]
    NotConfigured { name: String, known: Vec<String> },
    #[error("the config lists no [[vm]]; add one with the libvirt domain's name")]
    NoVms,
    #[error("no [[gpu]] is {name:?}: name one by its address or label ({known})")]
    NoSuchGpu { name: String, known: String },
    #[error(
        "no [[vm]] takes GPU {gpu}: none of their definitions passes it through{unread}. Add its \
         <hostdev> to a VM's definition (`handoff setup --dry-run` prints the lines), or start a VM by name"
    )]
    NoVmForGpu { gpu: String, unread: String },
    #[error(transparent)]
    Virt(#[from] VirtError),
    /// Something holds the GPU, seen by our own scan before anything was started.
    #[error("{text}")]
    Busy { vm: String, text: String },
    #[error(
        "not starting {label} ({vm}): GPU {gpu} is with {other_label} ({other}), which is {state}. \
         `handoff switch {vm}` stops {other_label} gracefully and then starts {label}"
    )]
    OtherVmHolds {
        vm: String,
        label: String,
        gpu: PciAddress,
        other: String,
        other_label: String,
        state: &'static str,
    },
    /// The libvirt hook refused the start; `message` is the hook's own.
    #[error("{message}")]
    HookRefused {
        vm: String,
        message: String,
        warnings: Vec<String>,
    },
    #[error(
        "{} at {uri} could not start {vm}: {message}{}",
        handoff::hypervisor::name_of(uri),
        access_hint(uri, message)
    )]
    StartFailed {
        vm: String,
        uri: String,
        message: String,
    },
    #[error(
        "{vm} was started but is {state} after {waited_s} s, not running; `virsh -c {uri} domstate --reason {vm}` says why"
    )]
    NotRunning {
        vm: String,
        uri: String,
        state: &'static str,
        waited_s: u64,
    },
    #[error(
        "{} at {uri} could not stop {vm}: {message}{}",
        handoff::hypervisor::name_of(uri),
        access_hint(uri, message)
    )]
    StopFailed {
        vm: String,
        uri: String,
        message: String,
    },
    #[error(
        "{label} ({vm}) did not stop within {waited_s} s: the guest ignored the shutdown request \
         (is it at a login or lock screen? does it have the QEMU guest agent?). It is still running. \
         Wait longer (--timeout SECONDS), shut it down from inside, or force it off — losing unsaved \
         work in the VM — with `handoff stop --force {vm}`"
    )]
    StopTimeout {
        vm: String,
        label: String,
        waited_s: u64,
    },
    #[error(
        "GPU {gpu} did not come back to {driver}{}: it is {phrase}.{}\n  \
         Return it by hand: `sudo gpu-rebind-nvidia` (the same as `sudo handoff rebind --force`)",
        // 0: the hook had already given up (a stuck record); nothing was waited for.
        if *waited_s == 0 { String::new() } else { format!(" within {waited_s} s") },
        problem.as_ref().map(|p| format!("\n  The restore record says: {p}")).unwrap_or_default()
    )]
    GpuNotHome {
        gpu: PciAddress,
        driver: String,
        phrase: String,
        waited_s: u64,
        problem: Option<String>,
    },
    #[error(transparent)]
    Sysfs(#[from] gpu::SysfsError),
    #[error(
        "switching to {target} stopped at step {step} ({what}): {source}{}",
        if matches!(**source, VmError::StopTimeout { .. }) {
            format!("\n  Or switch anyway, forcing it off: `handoff switch --force {target}`")
        } else {
            String::new()
        }
    )]
    Switch {
        target: String,
        step: String,
        what: String,
        source: Box<VmError>,
    },
}

impl VmError {
    /// 2 for a usage or config error, 1 for everything else (DESIGN: "the answer is a problem").
    pub fn exit_code(&self) -> u8 {
        match self {
            VmError::NotConfigured { .. }
            | VmError::NoVms
            | VmError::NoSuchGpu { .. }
            | VmError::NoVmForGpu { .. } => 2,
            VmError::Switch { source, .. } => source.exit_code().max(1),
            _ => 1,
        }
    }
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    }
}

/// What to check when libvirt says no for a reason of access.
pub(crate) fn access_hint(uri: &str, message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    // PVE's errors carry their own fix (token, privilege); this one is libvirt's.
    if handoff::hypervisor::name_of(uri) != "libvirt" {
        ""
    } else if m.contains("polkit")
        || m.contains("authentication")
        || m.contains("access denied")
        || m.contains("permission denied")
    {
        "\n  check: is your user in group libvirt (id -nG; sudo usermod -aG libvirt $USER, then log in again)? \
         over SSH there is no polkit agent to ask for a password, so polkit must allow it without one"
    } else {
        ""
    }
}

/// The configured VM called `name` (domain name or label), or the first one.
pub fn resolve<'a>(cfg: &'a Config, name: Option<&str>) -> Result<&'a VmConfig, VmError> {
    if cfg.vms.is_empty() {
        return Err(VmError::NoVms);
    }
    cfg.vm(name).ok_or_else(|| VmError::NotConfigured {
        name: name.unwrap_or_default().to_owned(),
        known: cfg
            .vms
            .iter()
            .map(|v| format!("{} ({})", v.name, v.label()))
            .collect(),
    })
}

/// The host part of a libvirt URI: `qemu+ssh://ducati/system` → `ducati`; none for
/// `qemu:///system` and `test:///default`.
pub fn uri_host(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    let host = host.split(':').next().unwrap_or("");
    (!host.is_empty()).then_some(host)
}

/// Whether a VM at `uri` runs on this machine, so this machine's sysfs shows its GPU.
pub fn is_local(uri: &str) -> bool {
    matches!(uri_host(uri), None | Some("localhost" | "127.0.0.1" | "::1"))
}

/// The hook's own words inside libvirt's error for a refused start: (message, warnings).
/// The parsing lives with the libvirt implementation
/// ([`crate::libvirt::hook_message`]); this is its old name.
pub fn hook_message(libvirt_error: &str) -> Option<(String, Vec<String>)> {
    crate::libvirt::hook_message(libvirt_error).map(|r| (r.message, r.warnings))
}

pub use crate::libvirt::{reason_words, shmem};
pub use handoff::hypervisor::{GuestIp, Shmem};

/// Where the GPU is, as far as this machine can tell.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    pub address: PciAddress,
    /// None when the VM is on another host (its GPU is not in this sysfs).
    pub owner: Option<Owner>,
    /// "on vfio-pci", "on Linux (nvidia)", or why it is unknown.
    pub phrase: String,
    /// After `stop`: it was with the VM and came back (None: it was not the VM's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub returned: Option<bool>,
}

impl GpuReport {
    fn read(host: &handoff::host::Host, gc: &handoff::config::GpuConfig, uri: &str) -> Result<Self, VmError> {
        if !is_local(uri) {
            return Ok(Self::remote(gc, uri));
        }
        let g = gpu::read_gpu(host, gc.address)?;
        let phrase = if g.owner == Owner::Absent {
            "absent: this machine has no PCI device there".to_owned()
        } else {
            g.owner_phrase()
        };
        Ok(Self {
            address: g.address,
            owner: Some(g.owner),
            phrase,
            returned: None,
        })
    }

    fn remote(gc: &handoff::config::GpuConfig, uri: &str) -> Self {
        Self {
            address: gc.address,
            owner: None,
            phrase: format!(
                "on {} (not visible from here)",
                uri_host(uri).unwrap_or("another host")
            ),
            returned: None,
        }
    }
}

/// What `handoff start` did.
#[derive(Debug, Clone, Serialize)]
pub struct StartOutcome {
    pub vm: String,
    pub label: String,
    pub uri: String,
    pub state: VmState,
    /// It was running before we were asked; nothing was done.
    pub already_running: bool,
    /// The VM's first GPU (in address order): what a surface that shows one GPU shows.
    pub gpu: GpuReport,
    /// Every GPU the VM takes (its definition's, in address order; `gpu` is the first).
    pub gpus: Vec<GpuReport>,
    /// Every GPU it takes is on vfio-pci (None: cannot tell, the VM is remote).
    pub gpu_on_vfio: Option<bool>,
    /// Said to the person besides progress: why the GPU did not move, the hook's warnings.
    pub warnings: Vec<String>,
    /// The Looking Glass shared memory device in the live XML, when there is one.
    pub looking_glass: Option<Shmem>,
}

impl StartOutcome {
    /// Where each of its GPUs is, for the line a person reads: "GPU 0000:01:00.0 is on
    /// vfio-pci and GPU 0000:00:02.0 is on vfio-pci".
    pub fn gpus_words(&self) -> String {
        let each: Vec<String> = self
            .gpus
            .iter()
            .map(|g| match g.owner {
                Some(Owner::Vfio) => format!("GPU {} is on vfio-pci", g.address),
                Some(Owner::Host) if !self.already_running => {
                    format!("GPU {} is still {}", g.address, g.phrase)
                }
                _ => format!("GPU {} is {}", g.address, g.phrase),
            })
            .collect();
        each.join(" and ")
    }
}

impl StopOutcome {
    /// Where each of its GPUs is now: "GPU 0000:01:00.0 is back on Linux (nvidia) and …".
    pub fn gpus_words(&self) -> String {
        let each: Vec<String> = self
            .gpus
            .iter()
            .map(|g| match g.returned {
                Some(true) => format!("GPU {} is back {}", g.address, g.phrase),
                _ => format!("GPU {} is {}", g.address, g.phrase),
            })
            .collect();
        each.join(" and ")
    }
}

/// What to do once the VM runs: the hook point for "then open Looking Glass".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterStart {
    /// The VM runs with the GPU and has Looking Glass's shared memory: open the client.
    OpenLookingGlass,
    /// Nothing to open, and why (said only with -v).
    Nothing(String),
}

impl StartOutcome {
    pub fn after_start(&self) -> AfterStart {
        if self.state != VmState::Running {
            return AfterStart::Nothing(format!("{} is {}", self.label, self.state.words()));
        }
        if self.gpu_on_vfio == Some(false) {
            return AfterStart::Nothing("the GPU did not move to the VM".into());
        }
        if self.looking_glass.is_none() {
            return AfterStart::Nothing(format!(
                "{} has no Looking Glass shared memory device (<shmem name='looking-glass'>)",
                self.vm
            ));
        }
        AfterStart::OpenLookingGlass
    }
}

/// What `handoff stop` did.
#[derive(Debug, Clone, Serialize)]
pub struct StopOutcome {
    pub vm: String,
    pub label: String,
    pub uri: String,
    pub was_running: bool,
    pub forced: bool,
    /// Seconds until the VM was off.
    pub waited_s: f64,
    /// The VM's first GPU (in address order).
    pub gpu: GpuReport,
    /// Every GPU the VM takes (`gpu` is the first), where each is now.
    pub gpus: Vec<GpuReport>,
    /// Every GPU that was with this VM came back to its host driver (None: none was this
    /// VM's).
    pub gpu_returned: Option<bool>,
}

/// What `handoff switch` did.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchOutcome {
    pub stopped: Vec<StopOutcome>,
    pub started: StartOutcome,
}

/// Timeouts and where things are; [`Ctl::new`] has the defaults.
pub struct Ctl<'a> {
    pub cfg: &'a Config,
    /// libvirt's hooks directory, to tell whether our hook is installed.
    pub hooks_dir: PathBuf,
    /// How long a started domain may take to read "running".
    pub start_wait: Duration,
    /// How long the GPU may take to come home after the VM stopped.
    pub gpu_wait: Duration,
    progress: &'a mut dyn FnMut(&str),
    hv: Box<dyn Hypervisor>,
    /// The GPU the current operation is about: the one the VM's definition passes through
    /// (its first, in address order, when it takes several), else the primary one.
    gpu: handoff::config::GpuConfig,
}

/// What a VM action of [`Action`] did.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Done {
    Started(StartOutcome),
    Stopped(StopOutcome),
    Switched(SwitchOutcome),
}

impl Done {
    /// The warnings of the VM that started, if one did.
    pub fn warnings(&self) -> &[String] {
        match self {
            Done::Started(out) => &out.warnings,
            Done::Switched(out) => &out.started.warnings,
            Done::Stopped(_) => &[],
        }
    }
}

impl<'a> Ctl<'a> {
    /// The one implementation of the VM actions of [`Action`] (start, stop, force stop,
    /// switch, force switch): what `handoff start`/`stop`/`switch`, the tray's agent and the
    /// details window's buttons run. `timeout` bounds a graceful shutdown (default: the VM's
    /// `shutdown_timeout_s`). None for an action that is not a VM's: those have their own
    /// one implementation ([`handoff::action`], [`handoff::lg`]).
    pub fn act(&mut self, action: &Action, timeout: Option<Duration>) -> Option<Result<Done, VmError>> {
        let name = action.vm()?;
        let cfg = self.cfg;
        let vm = match resolve(cfg, Some(name)) {
            Ok(vm) => vm,
            Err(e) => return Some(Err(e)),
        };
        Some(match action {
            Action::Start { .. } => self.start(vm).map(Done::Started),
            Action::Stop { .. } | Action::ForceStop { .. } => {
                let force = matches!(action, Action::ForceStop { .. });
                let timeout = timeout.unwrap_or(Duration::from_secs(vm.shutdown_timeout_s));
                self.stop(vm, force, timeout).map(Done::Stopped)
            }
            _ => {
                let force = matches!(action, Action::ForceSwitch { .. });
                self.switch(vm, force, timeout).map(Done::Switched)
            }
        })
    }

    /// For `cfg`'s VMs through [`crate::open`]: libvirt, or the demo's simulated
    /// hypervisor in a process `handoff demo` started.
    pub fn new(cfg: &'a Config, progress: &'a mut dyn FnMut(&str)) -> Self {
        Self::with_hypervisor(cfg, progress, crate::open(cfg))
    }

    /// For `cfg`'s VMs through `hv` (`handoff demo` passes its simulated hypervisor).
    pub fn with_hypervisor(
        cfg: &'a Config,
        progress: &'a mut dyn FnMut(&str),
        hv: Box<dyn Hypervisor>,
    ) -> Self {
        Self {
            cfg,
            hooks_dir: PathBuf::from(hook_install::DEFAULT_HOOKS_DIR),
            start_wait: Duration::from_secs(60),
            gpu_wait: Duration::from_secs(15),
            progress,
            hv,
            gpu: cfg.gpu.primary().clone(),
        }
    }

    /// The configured GPUs `vm` takes, read from its definition as the hook reads them
    /// ([`handoff::hook::gpus_used`]'s rule: none passed through means the primary one). With
    /// one GPU configured that is it, and the hypervisor is not asked.
    fn gpus_of(&mut self, vm: &VmConfig) -> Vec<PciAddress> {
        if self.cfg.gpu.len() < 2 {
            return vec![self.cfg.gpu.address];
        }
        let passed = match self.hv.describe(&VmRef::from(vm)) {
            Ok(d) => d.passthrough,
            Err(e) => {
                tracing::info!("cannot read the definition of {}: {e}", vm.name);
                Vec::new()
            }
        };
        let gpus: Vec<PciAddress> = handoff::gpus::taken_by(self.cfg, &passed)
            .iter()
            .map(|g| g.address)
            .collect();
        if gpus.is_empty() {
            vec![self.cfg.gpu.address]
        } else {
            gpus
        }
    }

    /// The first configured VM that takes the GPU `gpu` names (its address or label), by
    /// the hook's rule (`Ctl::gpus_of`): what `handoff start --gpu` starts, and so the bar
    /// block's right click on that GPU. A VM whose definition cannot be read is passed over.
    pub fn vm_for_gpu(&mut self, gpu: &str) -> Result<VmConfig, VmError> {
        let cfg = self.cfg;
        if cfg.vms.is_empty() {
            return Err(VmError::NoVms);
        }
        let Some(wanted) = cfg.gpu.find(gpu) else {
            let known = handoff::status::chosen_gpus(cfg, Some(gpu))
                .err()
                .map(|e| match e {
                    handoff::status::StatusError::NoSuchGpu { known, .. } => known,
                    other => other.to_string(),
                })
                .unwrap_or_default();
            return Err(VmError::NoSuchGpu {
                name: handoff::escape::plain(gpu),
                known,
            });
        };
        let mut unread = Vec::new();
        for vm in &cfg.vms {
            if cfg.gpu.len() < 2 {
                return Ok(vm.clone());
            }
            let passed = match self.hv.describe(&VmRef::from(vm)) {
                Ok(d) => d.passthrough,
                Err(e) => {
                    tracing::info!("cannot read the definition of {}: {e}", vm.name);
                    unread.push(handoff::escape::plain(&vm.name));
                    continue;
                }
            };
            let taken = handoff::gpus::taken_by(cfg, &passed);
            let takes = if taken.is_empty() {
                wanted.address == cfg.gpu.address
            } else {
                taken.iter().any(|g| g.address == wanted.address)
            };
            if takes {
                return Ok(vm.clone());
            }
        }
        Err(VmError::NoVmForGpu {
            gpu: match &wanted.label {
                Some(l) => format!("{} ({})", handoff::escape::plain(l), wanted.address),
                None => wanted.address.to_string(),
            },
            unread: if unread.is_empty() {
                String::new()
            } else {
                format!(" (could not read {})", unread.join(", "))
            },
        })
    }

    /// Makes `vm`'s (first) GPU the one this operation is about.
    fn focus(&mut self, vm: &VmConfig) {
        let first = self.gpus_of(vm)[0];
        self.gpu = self.cfg.gpu.at(first).unwrap_or(&self.cfg.gpu).clone();
    }

    fn say(&mut self, line: &str) {
        (self.progress)(line);
    }

    fn state(&mut self, vm: &VmConfig) -> Result<(VmState, Option<String>), VirtError> {
        let p = self.hv.probe(&VmRef::from(vm))?;
        Ok((p.state, p.reason))
    }

    /// The other configured VMs that are active and take a GPU `vm` takes (with one GPU
    /// configured: every other active VM).
    fn active_others(&mut self, vm: &VmConfig) -> Vec<(VmConfig, VmState)> {
        let others: Vec<VmConfig> = self
            .cfg
            .vms
            .iter()
            .filter(|o| o.name != vm.name)
            .cloned()
            .collect();
        let mine = self.gpus_of(vm);
        let mut active = Vec::new();
        for o in others {
            if self.cfg.gpu.len() > 1 && !self.gpus_of(&o).iter().any(|g| mine.contains(g)) {
                continue;
            }
            // A VM we cannot ask (its host is down) cannot be proven to hold the GPU; the
            // hook still refuses if it does.
            match self.state(&o) {
                Ok((s, _)) if s.is_active() => active.push((o, s)),
                Ok(_) => {}
                Err(e) => tracing::info!("cannot ask about {}: {e}", o.name),
            }
        }
        active
    }

    fn hook_installed(&self) -> bool {
        matches!(
            hook_install::installed_shim(&self.hooks_dir),
            Ok(InstalledShim::Ours { .. })
        )
    }

    /// `handoff start [VM]`: check, start, wait until running, say where the GPU went.
    pub fn start(&mut self, vm: &VmConfig) -> Result<StartOutcome, VmError> {
        self.focus(vm);
        let (state, _) = self.state(vm)?;
        if state.is_active() {
            let mut out = self.outcome(vm, state, true)?;
            out.warnings.retain(|w| !w.starts_with("the libvirt hook"));
            return Ok(out);
        }
        if let Some((other, s)) = self.active_others(vm).into_iter().next() {
            // The GPU both take (the first, when they share several).
            let mine = self.gpus_of(vm);
            let gpu = self
                .gpus_of(&other)
                .into_iter()
                .find(|g| mine.contains(g))
                .unwrap_or(self.gpu.address);
            return Err(VmError::OtherVmHolds {
                vm: vm.name.clone(),
                label: vm.label().to_owned(),
                gpu,
                other: other.name.clone(),
                other_label: other.label().to_owned(),
                state: s.words(),
            });
        }
        if is_local(&vm.uri) {
            // Every GPU it takes: the hook hands all or none, so a holder of any one stops it.
            for address in self.gpus_of(vm) {
                self.gpu = self.cfg.gpu.at(address).unwrap_or(&self.cfg.gpu).clone();
                self.check_holders(vm)?;
            }
            self.focus(vm);
        }
        self.say(&format!("Starting {} ({})…", vm.label(), vm.name));
        let task = match self.hv.start(&VmRef::from(vm)) {
            Ok(Start::Begun(task)) => task,
            Ok(Start::Refused(r)) => {
                return Err(VmError::HookRefused {
                    vm: vm.name.clone(),
                    message: r.message,
                    warnings: r.warnings,
                });
            }
            Err(HypervisorError::Start { message, .. }) => {
                return Err(VmError::StartFailed {
                    vm: vm.name.clone(),
                    uri: vm.uri.clone(),
                    message,
                });
            }
            Err(e) => return Err(e.into()),
        };
        for line in &task.notes {
            self.say(line);
        }
        // What the hypervisor relayed (the demo's in-process hook says its warnings): not
        // said twice below.
        let mut heard = task.notes.clone();
        let started = Instant::now();
        let state = loop {
            match self.hv.poll(&task)? {
                TaskState::Done { state, notes } => {
                    for line in &notes {
                        self.say(line);
                    }
                    heard.extend(notes);
                    break state;
                }
                TaskState::Pending { state } if started.elapsed() >= self.start_wait => break state,
                TaskState::Pending { .. } => std::thread::sleep(POLL),
                TaskState::Failed { message } => {
                    return Err(VmError::StartFailed {
                        vm: vm.name.clone(),
                        uri: vm.uri.clone(),
                        message,
                    });
                }
                TaskState::Refused(r) => {
                    return Err(VmError::HookRefused {
                        vm: vm.name.clone(),
                        message: r.message,
                        warnings: r.warnings,
                    });
                }
            }
        };
        if state != VmState::Running {
            return Err(VmError::NotRunning {
                vm: vm.name.clone(),
                uri: vm.uri.clone(),
                state: state.words(),
                waited_s: started.elapsed().as_secs(),
            });
        }
        let out = self.outcome(vm, state, false)?;
        for w in &out.warnings {
            if !heard.iter().any(|h| h.contains(w.as_str())) {
                (self.progress)(&format!("warning: {w}"));
            }
        }
        Ok(out)
    }

    /// Our own scan for holders (as this user: the hook, as root, sees the rest). A holder
    /// seen here refuses at once; a partial look (other users' processes, which an
    /// unprivileged scan can never read) does not, because the hook checks again as root
    /// and refuses on what it cannot see itself.
    fn check_holders(&mut self, vm: &VmConfig) -> Result<(), VmError> {
        use handoff::holders::Verdict;
        let host = &self.cfg.host;
        let g = gpu::read_gpu(host, self.gpu.address)?;
        if g.owner != Owner::Host {
            return Ok(());
        }
        let nodes = handoff::holders::gpu_nodes(host, &g);
        let scan = handoff::holders::scan(host, &g, &nodes);
        match scan.verdict() {
            Verdict::Clear => return Ok(()),
            Verdict::Unchecked { what } => {
                tracing::info!(
                    "not everything could be checked for holders here; the hook checks again as root: {}",
                    what.join("; ")
                );
                return Ok(());
            }
            Verdict::Held { .. } => {}
        }
        let text = handoff::bind::refusal_text(g.address, Some(&vm.name), &scan.holders, &scan.framebuffers);
        Err(VmError::Busy {
            vm: vm.name.clone(),
            text: text.strip_prefix("handoff: ").unwrap_or(&text).to_owned(),
        })
    }

    fn outcome(&mut self, vm: &VmConfig, state: VmState, already: bool) -> Result<StartOutcome, VmError> {
        let mut gpus = Vec::new();
        for address in self.gpus_of(vm) {
            let gc = self.cfg.gpu.at(address).unwrap_or(&self.cfg.gpu);
            gpus.push(GpuReport::read(&self.cfg.host, gc, &vm.uri)?);
        }
        let description = self.hv.describe(&VmRef::from(vm)).ok();
        let macos = description
            .as_ref()
            .is_some_and(|d| handoff::gpus::is_macos_definition(&d.definition));
        // A Proxmox VE VM's IVSHMEM file is on the node, not here: nothing to open.
        let looking_glass = description
            .and_then(|d| d.looking_glass)
            .filter(|_| handoff::hypervisor::name_of(&vm.uri) == "libvirt");
        let on_vfio = |gpu: &GpuReport| {
            gpu.owner
                .filter(|o| *o != Owner::Absent)
                .map(|o| o == Owner::Vfio)
        };
        // All of them or, as soon as one is known not to be, not.
        let each: Vec<Option<bool>> = gpus.iter().map(on_vfio).collect();
        let gpu_on_vfio = if each.contains(&Some(false)) {
            Some(false)
        } else if each.iter().all(|e| *e == Some(true)) {
            Some(true)
        } else {
            None
        };
        let mut warnings = Vec::new();
        // The hook says it too, but where a person starting the VM does not read it
        // (libvirtd's log, PVE's task log).
        if macos && is_local(&vm.uri) {
            let name = handoff::escape::plain(&vm.name);
            warnings.extend(
                gpus.iter()
                    .filter_map(|g| handoff::hook::macos_nvidia_warning(&self.cfg.host, &name, g.address)),
            );
        }
        for (gpu, on) in gpus.iter().zip(&each) {
            if *on != Some(false) {
                continue;
            }
            warnings.push(if self.hook_installed() {
                format!(
                    "GPU {} is still {}: the hook did not hand it to {} (is {} a [[vm]] in {}? `handoff doctor` checks)",
                    gpu.address,
                    gpu.phrase,
                    vm.name,
                    vm.name,
                    handoff::config::SYSTEM_CONFIG
                )
            } else {
                format!(
                    "the libvirt hook is not installed, so GPU {} stays {} (`sudo handoff install-hooks`)",
                    gpu.address, gpu.phrase
                )
            });
        }
        Ok(StartOutcome {
            vm: vm.name.clone(),
            label: vm.label().to_owned(),
            uri: vm.uri.clone(),
            state,
            already_running: already,
            gpu: gpus[0].clone(),
            gpus,
            gpu_on_vfio,
            warnings,
            looking_glass,
        })
    }

    /// `handoff stop [VM]`: graceful (ACPI) with a timeout, or `force` (destroy); then wait
    /// for the GPU to come home when it was this VM's.
    pub fn stop(&mut self, vm: &VmConfig, force: bool, timeout: Duration) -> Result<StopOutcome, VmError> {
        self.focus(vm);
        let (state, _) = self.state(vm)?;
        // Each GPU the VM takes, and whether it is with this VM now (then it is waited for).
        let mut mine = Vec::new();
        for address in self.gpus_of(vm) {
            self.gpu = self.cfg.gpu.at(address).unwrap_or(&self.cfg.gpu).clone();
            mine.push((self.gpu.clone(), self.gpu_is_with(vm)?));
        }
        let started = Instant::now();
        let stop_failed = |e: HypervisorError| match e {
            HypervisorError::Stop { message, .. } => VmError::StopFailed {
                vm: vm.name.clone(),
                uri: vm.uri.clone(),
                message,
            },
            e => e.into(),
        };
        if !state.is_active() {
            self.say(&format!(
                "{} ({}) is not running ({}).",
                vm.label(),
                vm.name,
                state.words()
            ));
        } else if force {
            self.say(&format!(
                "Forcing {} ({}) off, like pulling its power cord: unsaved work in the VM is lost.",
                vm.label(),
                vm.name
            ));
            let task = self.hv.destroy(&VmRef::from(vm)).map_err(stop_failed)?;
            for line in &task.notes {
                self.say(line);
            }
        } else {
            self.say(&format!(
                "Asking {} ({}) to shut down (ACPI power button); waiting up to {} s…",
                vm.label(),
                vm.name,
                timeout.as_secs()
            ));
            let task = self.hv.shutdown(&VmRef::from(vm)).map_err(stop_failed)?;
            self.wait_stopped(vm, &task, started, timeout)?;
        }
        let waited_s = started.elapsed().as_secs_f64();
        let mut gpus = Vec::new();
        let mut gpu_returned = None;
        // One after the other: the hook returns them in one release, so the later waits
        // are short. The first that does not come home is the error (it names its GPU).
        for (gc, was_ours) in mine {
            self.gpu = gc;
            if was_ours {
                gpus.push(self.wait_gpu_home()?);
                gpu_returned = Some(true);
            } else {
                gpus.push(GpuReport::read(&self.cfg.host, &self.gpu, &vm.uri)?);
            }
        }
        self.focus(vm);
        Ok(StopOutcome {
            vm: vm.name.clone(),
            label: vm.label().to_owned(),
            uri: vm.uri.clone(),
            was_running: state.is_active(),
            forced: force && state.is_active(),
            waited_s,
            gpu: gpus[0].clone(),
            gpus,
            gpu_returned,
        })
    }

    /// Follows a graceful shutdown until the VM is off, a line of progress every
    /// [`PROGRESS_EVERY`]; gives up after `timeout` (the VM still runs).
    fn wait_stopped(
        &mut self,
        vm: &VmConfig,
        task: &Task,
        started: Instant,
        timeout: Duration,
    ) -> Result<(), VmError> {
        for line in &task.notes {
            self.say(line);
        }
        let mut next_note = PROGRESS_EVERY;
        loop {
            let s = match self.hv.poll(task)? {
                TaskState::Done { notes, .. } => {
                    for line in &notes {
                        self.say(line);
                    }
                    return Ok(());
                }
                TaskState::Pending { state } => state,
                TaskState::Failed { message }
                | TaskState::Refused(handoff::hypervisor::Refusal { message, .. }) => {
                    return Err(VmError::StopFailed {
                        vm: vm.name.clone(),
                        uri: vm.uri.clone(),
                        message,
                    });
                }
            };
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(VmError::StopTimeout {
                    vm: vm.name.clone(),
                    label: vm.label().to_owned(),
                    waited_s: waited.as_secs(),
                });
            }
            if waited >= next_note {
                self.say(&format!(
                    "  {} is still {} after {} s (of {} s)…",
                    vm.label(),
                    s.words(),
                    waited.as_secs(),
                    timeout.as_secs()
                ));
                next_note += PROGRESS_EVERY;
            }
            std::thread::sleep(POLL.min(timeout.saturating_sub(waited)));
        }
    }

    /// Whether the GPU is off the host for this VM: on this machine, not on the host
    /// driver, and the restore record names this VM (or no other).
    fn gpu_is_with(&self, vm: &VmConfig) -> Result<bool, VmError> {
        // `host_driver = "vfio-pci"` (a PVE host that keeps the card isolated): the GPU
        // never leaves vfio-pci, so there is nothing to wait for after a VM.
        if !is_local(&vm.uri) || self.gpu.host_driver == "vfio-pci" {
            return Ok(false);
        }
        let host = &self.cfg.host;
        let g = gpu::read_gpu(host, self.gpu.address)?;
        if matches!(g.owner, Owner::Host | Owner::Absent) {
            return Ok(false);
        }
        Ok(match RestoreRecord::load(host, g.address) {
            Ok(Some(r)) => r.vm.as_deref().is_none_or(|v| v == vm.name),
            // An isolated card rests on vfio-pci: only a record gives it to a VM.
            Ok(None) if self.gpu.isolated() => false,
            _ => true,
        })
    }

    /// Wait (bounded by `gpu_wait`) for the GPU to be on the host driver with no restore
    /// record left (the hook removes it once the GPU is verified home).
    fn wait_gpu_home(&mut self) -> Result<GpuReport, VmError> {
        let host = self.cfg.host.clone();
        let address = self.gpu.address;
        self.say(&format!(
            "Waiting for GPU {address} to return to {}…",
            self.gpu.host_driver
        ));
        let started = Instant::now();
        loop {
            let g = gpu::read_gpu(&host, address)?;
            let record = RestoreRecord::load(&host, address);
            // A card isolated on vfio-pci (`host_driver = "vfio-pci"`) is home once its
            // record is gone.
            let rests = g.owner == Owner::Host || (self.gpu.isolated() && g.owner == Owner::Vfio);
            let home = rests && matches!(record, Ok(None));
            if home {
                let phrase = g.owner_phrase();
                return Ok(GpuReport {
                    address,
                    owner: Some(g.owner),
                    phrase,
                    returned: Some(true),
                });
            }
            // A stuck record: the hook has given up, and nothing will retry; waiting on
            // would only delay saying so.
            let stuck = matches!(&record, Ok(Some(r)) if r.phase == Phase::Stuck);
            if stuck || started.elapsed() >= self.gpu_wait {
                let problem = match record {
                    Ok(Some(r)) => r
                        .problem
                        .or(Some(format!("the handoff is in phase {:?}", r.phase))),
                    Ok(None) => None,
                    Err(e) => Some(e.to_string()),
                };
                return Err(VmError::GpuNotHome {
                    gpu: address,
                    driver: self.gpu.host_driver.clone(),
                    phrase: g.owner_phrase(),
                    waited_s: started.elapsed().as_secs(),
                    problem,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// `handoff switch <VM>`: stop whichever configured VM is active (gracefully unless
    /// `force`), wait for the GPU, start `target`. Each step is said before it runs.
    pub fn switch(
        &mut self,
        target: &VmConfig,
        force: bool,
        timeout: Option<Duration>,
    ) -> Result<SwitchOutcome, VmError> {
        let (state, _) = self.state(target)?;
        let holders: Vec<VmConfig> = if state.is_active() {
            Vec::new()
        } else {
            self.active_others(target).into_iter().map(|(o, _)| o).collect()
        };
        let total = holders.len() + 1;
        let mut stopped = Vec::new();
        for (i, other) in holders.iter().enumerate() {
            let what = format!(
                "{} {} ({})",
                if force { "force off" } else { "stop" },
                other.label(),
                other.name
            );
            self.say(&format!("Step {}/{total}: {what}", i + 1));
            let t = timeout.unwrap_or(Duration::from_secs(other.shutdown_timeout_s));
            match self.stop(other, force, t) {
                Ok(o) => stopped.push(o),
                Err(e) => {
                    return Err(VmError::Switch {
                        target: target.name.clone(),
                        step: format!("{}/{total}", i + 1),
                        what,
                        source: Box::new(e),
                    });
                }
            }
        }
        let what = format!("start {} ({})", target.label(), target.name);
        self.say(&format!("Step {total}/{total}: {what}"));
        match self.start(target) {
            Ok(started) => Ok(SwitchOutcome { stopped, started }),
            Err(e) => Err(VmError::Switch {
                target: target.name.clone(),
                step: format!("{total}/{total}"),
                what,
                source: Box::new(e),
            }),
        }
    }

    /// `handoff vm-health [VM]`. Only a missing connection or domain is an error; every
    /// other fact that cannot be read is "unknown".
    pub fn health(&mut self, vm: &VmConfig) -> Result<Health, VmError> {
        self.focus(vm);
        let (state, reason) = self.state(vm)?;
        let r = VmRef::from(vm);
        let description = self.hv.describe(&r).ok();
        let guest = self.hv.guest(&r);
        // PVE says how long its guest has run; a libvirt guest's QEMU is a local process
        // (a PVE VM's pid is on the node: never read it here).
        let uptime_s = guest.uptime_s.or_else(|| {
            (handoff::hypervisor::name_of(&vm.uri) == "libvirt")
                .then(|| guest.pid.and_then(|p| process_age(&self.cfg.host.procfs, p)))
                .flatten()
        });
        let local_gpu = if is_local(&vm.uri) {
            gpu::read_gpu(&self.cfg.host, self.gpu.address).ok()
        } else {
            None
        };
        let functions: Vec<PciAddress> = match &local_gpu {
            Some(g) if g.owner != Owner::Absent => g.functions.iter().map(|f| f.address).collect(),
            _ => vec![self.gpu.address],
        };
        let passthrough = Passthrough::judge(
            self.gpu.address,
            &functions,
            local_gpu.as_ref().is_some_and(|g| g.owner != Owner::Absent),
            description.as_ref().map(|d| &d.passthrough[..]).unwrap_or(&[]),
        );
        Ok(Health {
            name: vm.name.clone(),
            label: vm.label().to_owned(),
            uri: vm.uri.clone(),
            state,
            reason,
            pid: guest.pid,
            uptime_s,
            vcpus: guest.vcpus,
            memory_kib: guest.memory_kib,
            max_memory_kib: guest.max_memory_kib,
            gpu: passthrough,
            looking_glass: description.and_then(|d| d.looking_glass),
            ip: guest.ip,
        })
    }
}

/// Whether the live XML passes the configured GPU through, function by function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Passthrough {
    pub gpu: PciAddress,
    /// Every `<hostdev type='pci'>` in the XML, and whether it is a function of the GPU.
    pub hostdevs: Vec<Hostdev>,
    /// Functions of the GPU's slot (as sysfs shows them) that the XML leaves out.
    pub missing: Vec<PciAddress>,
    /// `all`, `partial` or `none`.
    pub verdict: &'static str,
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hostdev {
    pub address: PciAddress,
    pub part_of_gpu: bool,
}

impl Passthrough {
    /// `functions`: the GPU slot's functions (from sysfs when `from_sysfs`, else just the
    /// configured address).
    pub fn judge(
        gpu: PciAddress,
        functions: &[PciAddress],
        from_sysfs: bool,
        hostdevs: &[PciAddress],
    ) -> Self {
        let hostdevs: Vec<Hostdev> = hostdevs
            .iter()
            .map(|a| Hostdev {
                address: *a,
                part_of_gpu: a.same_slot(&gpu),
            })
            .collect();
        let missing: Vec<PciAddress> = functions
            .iter()
            .filter(|f| !hostdevs.iter().any(|h| h.address == **f))
            .copied()
            .collect();
        let passed = hostdevs.iter().filter(|h| h.part_of_gpu).count();
        let (verdict, summary) = if passed == 0 {
            (
                "none",
                format!(
                    "the configured GPU {gpu} is not passed through (no <hostdev> for it in the domain XML)"
                ),
            )
        } else if missing.is_empty() {
            (
                "all",
                if from_sysfs {
                    format!("all {passed} function(s) of GPU {gpu} are passed through")
                } else {
                    format!(
                        "GPU {gpu} is passed through ({passed} function(s); its other functions are not visible from here)"
                    )
                },
            )
        } else {
            let list: Vec<String> = missing.iter().map(|m| m.to_string()).collect();
            (
                "partial",
                format!(
                    "GPU {gpu} is passed through without {} (every function of the slot must go to the VM together)",
                    list.join(", ")
                ),
            )
        };
        Self {
            gpu,
            hostdevs,
            missing,
            verdict,
            summary,
        }
    }
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks after boot.
pub fn parse_stat_starttime(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// How long `pid` has been running, in seconds, from `<proc>/<pid>/stat` and `<proc>/uptime`.
pub fn process_age(procfs: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(procfs.join(format!("{pid}/stat"))).ok()?;
    let start = parse_stat_starttime(&stat)?;
    let uptime: f64 = std::fs::read_to_string(procfs.join("uptime"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    if hz <= 0 {
        return None;
    }
    Some((uptime - start as f64 / hz as f64).max(0.0) as u64)
}

/// `handoff vm-health`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub name: String,
    pub label: String,
    pub uri: String,
    pub state: VmState,
    /// libvirt's reason for the state ("booted", "shut down", …).
    pub reason: Option<String>,
    /// The QEMU process, when its pid file is readable.
    pub pid: Option<u32>,
    pub uptime_s: Option<u64>,
    pub vcpus: Option<u32>,
    pub memory_kib: Option<u64>,
    pub max_memory_kib: Option<u64>,
    pub gpu: Passthrough,
    pub looking_glass: Option<Shmem>,
    pub ip: Option<GuestIp>,
}

/// 3 d 4 h, 2 h 5 min, 4 min 3 s, 12 s.
pub fn duration_words(s: u64) -> String {
    let (d, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else if m > 0 {
        format!("{m} min {sec} s")
    } else {
        format!("{sec} s")
    }
}

/// 32 MiB, 16 GiB.
pub fn size_words(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if bytes >= GIB && bytes % GIB == 0 {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

impl Health {
    pub fn render_text(&self) -> String {
        use std::fmt::Write;
        const UNKNOWN: &str = "unknown";
        let mut s = String::new();
        let reason = self
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        let _ = writeln!(s, "{} ({}) at {}", self.label, self.name, self.uri);
        let _ = writeln!(s, "  state     {}{reason}", self.state.words());
        let uptime = match (self.state.is_active(), self.uptime_s) {
            (false, _) => "not running".to_owned(),
            (true, Some(u)) => duration_words(u),
            (true, None) if handoff::hypervisor::name_of(&self.uri) != "libvirt" => {
                format!("{UNKNOWN} (its QEMU runs on the Proxmox VE node)")
            }
            (true, None) => format!("{UNKNOWN} (no readable QEMU pid file under /run/libvirt/qemu)"),
        };
        let _ = writeln!(s, "  uptime    {uptime}");
        let _ = writeln!(
            s,
            "  vCPUs     {}",
            self.vcpus.map(|v| v.to_string()).unwrap_or(UNKNOWN.into())
        );
        let memory = match (self.memory_kib, self.max_memory_kib) {
            (Some(m), Some(max)) if max != m => {
                format!("{} (max {})", size_words(m * 1024), size_words(max * 1024))
            }
            (Some(m), _) => size_words(m * 1024),
            _ => UNKNOWN.to_owned(),
        };
        let _ = writeln!(s, "  memory    {memory}");
        let _ = writeln!(s, "  GPU       {}", self.gpu.summary);
        for h in &self.gpu.hostdevs {
            let what = if h.part_of_gpu {
                "function of the GPU"
            } else {
                "another device"
            };
            let _ = writeln!(s, "            hostdev {} ({what})", h.address);
        }
        let pve = handoff::hypervisor::name_of(&self.uri) != "libvirt";
        let lg = match &self.looking_glass {
            // Its IVSHMEM file is on the node that runs the VM's QEMU: a desktop has none.
            Some(m) if pve => format!(
                "shared memory {:?}{}{} in the VM's args: a file on the Proxmox VE node, so the \
                 client runs on the node, not on a desktop",
                m.name,
                m.model.as_deref().map(|t| format!(", {t}")).unwrap_or_default(),
                m.size_bytes
                    .map(|b| format!(", {}", size_words(b)))
                    .unwrap_or_default()
            ),
            Some(m) => format!(
                "shared memory {:?}{}{}",
                m.name,
                m.model.as_deref().map(|t| format!(", {t}")).unwrap_or_default(),
                m.size_bytes
                    .map(|b| format!(", {}", size_words(b)))
                    .unwrap_or_default()
            ),
            None if pve => "none: no ivshmem device in the VM's args. On Proxmox VE, Looking Glass \
                            reads an IVSHMEM file on the node itself, so a desktop cannot open it; \
                            use the GPU's own display output there"
                .to_owned(),
            None => "no shared memory device (<shmem name='looking-glass'>) in the XML".to_owned(),
        };
        let _ = writeln!(s, "  Looking Glass  {lg}");
        let ip = match &self.ip {
            Some(ip) => format!(
                "{} ({}, from the {})",
                ip.address,
                ip.interface,
                match ip.source {
                    "agent" => "guest agent",
                    _ => "DHCP lease",
                }
            ),
            None => UNKNOWN.to_owned(),
        };
        let _ = writeln!(s, "  IP        {ip}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_inside_libvirts_error_is_the_hooks_own_words() {
        let err = "Hook script execution failed: internal error: Child process (LC_ALL=C \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            /etc/libvirt/hooks/qemu.d/handoff win11 prepare begin -) unexpected exit status 1: \
            handoff: warning: win11 is a [[vm]] in the config but its XML passes no function of 0000:01:00.0 through\n\
            handoff: not handing GPU 0000:01:00.0 to win11: 1 process uses it:\n  \
            sleep (pid 42, user root) holds /dev/nvidia0\nNothing was changed.\n";
        let (msg, warnings) = hook_message(err).unwrap();
        assert_eq!(
            msg,
            "not handing GPU 0000:01:00.0 to win11: 1 process uses it:\n  sleep (pid 42, user root) holds /dev/nvidia0\nNothing was changed."
        );
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("win11 is a [[vm]]"));
        assert_eq!(
            hook_message("Requested operation is not valid: domain is already running"),
            None
        );
    }

    #[test]
    fn uri_hosts() {
        assert_eq!(uri_host("qemu:///system"), None);
        assert_eq!(uri_host("test:///default"), None);
        assert_eq!(
            uri_host("qemu+ssh://me@ducati:22/system?keyfile=x"),
            Some("ducati")
        );
        assert!(is_local("qemu:///system"));
        assert!(!is_local("qemu+ssh://ducati/system"));
        assert!(is_local("qemu+ssh://localhost/system"));
    }

    #[test]
    fn looking_glass_shmem_with_size() {
        let xml = "<domain><devices><shmem name='looking-glass'><model type='ivshmem-plain'/>\
                   <size unit='M'>32</size></shmem></devices></domain>";
        assert_eq!(
            shmem(xml),
            Some(Shmem {
                name: "looking-glass".into(),
                model: Some("ivshmem-plain".into()),
                size_bytes: Some(32 << 20)
            })
        );
        assert_eq!(shmem("<domain><devices/></domain>"), None);
    }

    #[test]
    fn stat_start_time_survives_a_command_with_spaces_and_parens() {
        let stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 123456 1000 20";
        assert_eq!(parse_stat_starttime(stat), Some(123456));
    }

    #[test]
    fn passthrough_verdicts() {
        let gpu = PciAddress::new(0, 1, 0, 0);
        let all = [gpu, gpu.with_function(1)];
        assert_eq!(Passthrough::judge(gpu, &all, true, &[]).verdict, "none");
        assert_eq!(Passthrough::judge(gpu, &all, true, &all).verdict, "all");
        let p = Passthrough::judge(gpu, &all, true, &[gpu, PciAddress::new(0, 2, 0, 0)]);
        assert_eq!(p.verdict, "partial");
        assert_eq!(p.missing, [gpu.with_function(1)]);
        assert!(!p.hostdevs[1].part_of_gpu);
    }
}
