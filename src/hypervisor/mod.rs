//! The hypervisor interface: what handoff asks of whatever runs the VMs.
//!
//! [`Hypervisor`] is the one place the rest of handoff (`vm::Ctl`, the CLI's status and
//! `lg --on-vm-start`) reaches a hypervisor through. The trait lives here, in the core,
//! which links no libvirt; the implementations live in the `handoff-libvirt` crate
//! (`libvirt/`), which does:
//!
//! - `handoff_libvirt::libvirt::Libvirt`: any libvirt URI. It is the only code that
//!   calls libvirt's API, besides libvirt's lifecycle-event source
//!   (`handoff_libvirt::events`, which its subscriptions use).
//! - `handoff_libvirt::simulated::Simulated`: `handoff demo`'s hypervisor. It wraps
//!   `Libvirt` on libvirt's in-process test driver, which runs no hooks, and runs the
//!   hook's logic ([`crate::hook::run_event`]) in the process where libvirtd would run the
//!   hook. The demo picks it when it builds its context (`handoff_libvirt::open`); no
//!   config key selects it.
//!
//! # Which implementation
//!
//! `handoff_libvirt::open` returns `Libvirt` unless the process runs inside `handoff demo`:
//! the demo starts its tray, block and agent with [`SIMULATED_ENV`] set, and the demo's own
//! walkthrough builds a `Simulated` directly. `Simulated::new` refuses a config whose
//! roots are the real ones (`/sys`, `/dev`, `/proc`) or whose VMs are not on a `test://`
//! URI, so that variable cannot make a real host run the hook in-process.
//!
//! # The model, and how Proxmox VE maps onto it (the next implementation)
//!
//! | here | libvirt | Proxmox VE |
//! |---|---|---|
//! | [`VmRef`] | `at` = URI, `name` = domain name, `id` = None | `at` = API endpoint (`https://pve:8006`, node), `id` = VMID (140), `name` = the VM's `name` |
//! | [`Hypervisor::list`] | `virConnectListAllDomains` | `GET /cluster/resources?type=vm` (or `/nodes/{node}/qemu`) |
//! | [`Hypervisor::probe`] | `virDomainGetState` + reason | `GET /nodes/{node}/qemu/{vmid}/status/current` (`status`, `qmpstatus`, `lock`) |
//! | [`Hypervisor::start`] | `virDomainCreate`; a refusal of our hook comes back in libvirt's error text, parsed into [`Start::Refused`] here only | `POST …/status/start` → a UPID in [`Task::upid`]; the hookscript's `pre-start` refusal is a failed task whose log holds its output, so it arrives on a poll: [`TaskState::Refused`] |
//! | [`Hypervisor::shutdown`] | `virDomainShutdown` (ACPI) | `POST …/status/shutdown` (with `timeout`, no `forceStop`) → UPID |
//! | [`Hypervisor::destroy`] | `virDomainDestroy` | `POST …/status/stop` → UPID |
//! | [`Hypervisor::poll`] | the domain's state (libvirt's calls are synchronous) | `GET /nodes/{node}/tasks/{upid}/status` (+ `…/log` for progress and the failure's last lines) |
//! | [`Hypervisor::describe`] | `<hostdev type='pci'>` and `<shmem>` of the live XML | `hostpciN` of `/etc/pve/qemu-server/<vmid>.conf` (`GET …/config`): `0000:01:00` = every function, `0000:01:00.0`, `mapping=NAME` via `/cluster/mapping/pci`; Looking Glass = an `ivshmem` in `args` |
//! | [`Hypervisor::guest`] | `virDomainGetInfo`, interface addresses, the QEMU pid file | `status/current` (`uptime`, `cpus`, `mem`, `maxmem`, `pid` — on the node), `agent/network-get-interfaces` when the guest agent answers |
//! | [`Hypervisor::subscribe`] | `virConnectDomainEventRegisterAny(LIFECYCLE)` + the close callback | no event stream: a thread polls `status/current` at a configured interval and sends the differences; stops when the [`Subscription`] drops |
//! | the guard | the qemu hook (`prepare`/`release`), run by libvirtd | the hookscript, called as `<vmid> <phase>` with phases `pre-start`, `post-start`, `pre-stop`, `post-stop`; `pre-start` ↔ `prepare`, `post-stop` ↔ `release` |
//!
//! Every call that acts returns a [`Task`] that [`Hypervisor::poll`] follows to its end,
//! so a caller says progress the same way whether the hypervisor answers at once
//! (libvirt) or runs a background job (PVE's UPIDs).

pub mod piped;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::live::DomainEvent;
use crate::pci::PciAddress;
use crate::status::{VmState, VmStatus};

/// Set (to `1`) by `handoff demo` on the processes it starts: their VM actions go through
/// `handoff_libvirt::simulated::Simulated`. Ignored, with a warning, where that refuses the config.
pub const SIMULATED_ENV: &str = "HANDOFF_SIMULATED_HYPERVISOR";

/// One VM as a hypervisor knows it: libvirt names domains, PVE numbers VMs (and names them
/// too). `at` says where: a libvirt URI, or a PVE endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct VmRef {
    pub at: String,
    pub name: String,
    /// PVE's VMID; None for libvirt, whose domains have no stable number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
}

impl VmRef {
    pub fn named(at: &str, name: &str) -> Self {
        Self {
            at: at.to_owned(),
            name: name.to_owned(),
            id: None,
        }
    }
}

impl From<&VmConfig> for VmRef {
    fn from(vm: &VmConfig) -> Self {
        Self {
            id: vm.vmid,
            ..Self::named(&vm.uri, &vm.name)
        }
    }
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.id {
            Some(id) => write!(f, "{} (VM {id})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A VM's state and the hypervisor's reason for it, in plain words ("booted", "shut down").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub state: VmState,
    pub reason: Option<String>,
}

/// What a start did at once: begun (follow the task), or refused by handoff's guard (the
/// libvirt hook, PVE's hookscript), with the guard's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Begun(Task),
    Refused(Refusal),
}

/// The guard said no: something holds the GPU, or another VM has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The guard's message (`not handing GPU … to win11: 1 process uses it: …`), without
    /// the hypervisor's wrapping.
    pub message: String,
    /// The guard's `warning:` lines, apart.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Start,
    Shutdown,
    Destroy,
}

/// An action under way. libvirt's calls return when done, so its tasks only wait for the
/// state to settle; PVE's carry the UPID of the API's background task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub vm: VmRef,
    pub action: Action,
    /// PVE's task id (`UPID:node:…`); None for libvirt.
    pub upid: Option<String>,
    /// Lines the hypervisor (or the simulated hook) said while issuing it.
    pub notes: Vec<String>,
}

impl Task {
    pub fn new(vm: &VmRef, action: Action) -> Self {
        Self {
            vm: vm.clone(),
            action,
            upid: None,
            notes: Vec::new(),
        }
    }
}

/// Where a [`Task`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    /// Still going; the VM is in `state` (say it as progress).
    Pending { state: VmState },
    /// Done: the VM is running (start) or off (shutdown, destroy). `notes`: what happened
    /// on the way (the simulated hook's lines).
    Done { state: VmState, notes: Vec<String> },
    /// The hypervisor's task failed (PVE: its exit status and last log lines).
    Failed { message: String },
    /// A start task that handoff's guard refused after it had begun (PVE runs the
    /// hookscript inside the start task; libvirt's refusal comes at once, as
    /// [`Start::Refused`]).
    Refused(Refusal),
}

/// Which devices a VM takes from the host, from its definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Description {
    /// Every PCI device the VM passes through (libvirt `<hostdev>`, PVE `hostpciN`).
    pub passthrough: Vec<PciAddress>,
    /// The Looking Glass shared memory device, when it has one.
    pub looking_glass: Option<Shmem>,
    /// The definition as the hypervisor gave it (libvirt's live domain XML, PVE's config),
    /// for checks that read more of it (`handoff lg-test`).
    pub definition: String,
}

/// The Looking Glass shared memory device of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shmem {
    pub name: String,
    /// `ivshmem-plain`, `ivshmem-doorbell`, or None when the definition names none.
    pub model: Option<String>,
    /// Bytes, when the definition says.
    pub size_bytes: Option<u64>,
}

/// What can be read about a running guest; every field is best effort.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guest {
    /// The QEMU process on this machine.
    pub pid: Option<u32>,
    pub vcpus: Option<u32>,
    pub memory_kib: Option<u64>,
    pub max_memory_kib: Option<u64>,
    /// Seconds it has run, when the hypervisor says (PVE's `uptime`; libvirt's comes from
    /// the age of the local QEMU process instead).
    pub uptime_s: Option<u64>,
    pub ip: Option<GuestIp>,
}

/// The guest's address and who told us.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestIp {
    pub address: String,
    pub interface: String,
    /// `agent` (QEMU guest agent, libvirt's or PVE's) or `lease` (libvirt's DHCP lease).
    pub source: &'static str,
}

/// A lifecycle change of a subscribed VM, or of the connection that reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    Lifecycle {
        vm: VmRef,
        event: DomainEvent,
    },
    /// Events from `at` stopped (libvirtd went away); until [`VmEvent::Back`], states may
    /// be stale.
    Lost {
        at: String,
        why: String,
    },
    Back {
        at: String,
    },
    /// A start of a subscribed VM that the guard refused, found after the fact: Proxmox
    /// VE's task list, read at each poll ([`Hypervisor::refused_starts`]). libvirt's
    /// subscriptions never send it (the libvirt hook logs its refusals on the host itself).
    Refused(RefusedStart),
}

/// A start task the guard refused, whoever asked for it (the PVE web UI, `qm start`, a
/// script with another token): what [`Hypervisor::refused_starts`] finds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedStart {
    /// The VM (as subscribed: the `[[vm]]`'s name and VMID).
    pub vm: String,
    pub vmid: u32,
    /// The task's id (`UPID:node:…`): one refusal per task.
    pub upid: String,
    /// Who started it (`root@pam`, `handoff@pve!desk`).
    pub user: String,
    /// When the task started (Unix time, the node's clock).
    pub at: u64,
    /// The guard's own words from the task's log; None when the task failed for another
    /// reason (only listed so that it is not looked at again).
    pub message: Option<String>,
    /// The PCI devices the VM passes through (its config), to say which GPU was refused.
    pub passthrough: Vec<PciAddress>,
}

/// What a poller has already looked at, for [`Hypervisor::refused_starts`]: the first
/// listing is history (a surface that starts does not tell old refusals), later ones are
/// news once each.
#[derive(Debug, Default)]
pub struct RefusalWatch {
    known: std::collections::BTreeSet<String>,
    listed: bool,
}

impl RefusalWatch {
    /// The UPIDs already looked at.
    pub fn known(&self) -> Vec<String> {
        self.known.iter().cloned().collect()
    }

    /// Whether the next listing is the first (history: read no logs).
    pub fn first(&self) -> bool {
        !self.listed
    }

    /// Takes a listing's answer: the refusals that are news (none from the first listing).
    pub fn take(&mut self, found: Vec<RefusedStart>) -> Vec<RefusedStart> {
        let first = !std::mem::replace(&mut self.listed, true);
        let mut news = Vec::new();
        for r in found {
            if self.known.insert(r.upid.clone()) && !first && r.message.is_some() {
                news.push(r);
            }
        }
        // A listing holds PVE's last few tasks; this only has to outlast them.
        while self.known.len() > 1024 {
            let oldest = self.known.iter().next().cloned().expect("not empty");
            self.known.remove(&oldest);
        }
        news.sort_by_key(|r| r.at);
        news
    }
}

/// Where a subscription delivers. Returns `false` once nobody listens. Runs on the
/// hypervisor's event thread: it must not block.
pub type EventSink = Arc<dyn Fn(VmEvent) -> bool + Send + Sync>;

/// A running subscription; dropping it stops the events.
pub struct Subscription {
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl Subscription {
    pub fn new(stop: impl FnOnce() + Send + 'static) -> Self {
        Self {
            stop: Some(Box::new(stop)),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

/// Errors of a hypervisor, with the VM and where it lives, and what to check.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error(
        "cannot connect to libvirt at {uri}: {message}\n  check: is libvirtd running (systemctl status libvirtd)? \
         is your user in group libvirt (id -nG)? does polkit allow it?"
    )]
    Connect { uri: String, message: String },
    #[error("no domain {name:?} at {uri}; `virsh -c {uri} list --all` lists the defined ones")]
    NoDomain { uri: String, name: String },
    #[error("libvirt at {uri}, domain {name:?}: {message}")]
    Domain {
        uri: String,
        name: String,
        message: String,
    },
    /// The hypervisor would not start the VM, and not because the guard refused.
    #[error("{} at {uri} could not start {name}: {message}", name_of(uri))]
    Start {
        uri: String,
        name: String,
        message: String,
    },
    /// The hypervisor would not shut the VM down or off, and it is still running.
    #[error("{} at {uri} could not stop {name}: {message}", name_of(uri))]
    Stop {
        uri: String,
        name: String,
        message: String,
    },
    #[error("cannot watch VMs at {uri}: {message}")]
    Events { uri: String, message: String },
    /// A remote API (Proxmox VE) said no or could not be asked; `message` says what to fix.
    #[error("{message}")]
    Api { at: String, message: String },
    /// The remote API does not know the VM (Proxmox VE: no such VMID).
    #[error("{message}")]
    NoVm { at: String, message: String },
    /// `handoff demo`'s hypervisor asked for where it must not run.
    #[error(
        "the simulated hypervisor runs only on a simulated host with test:// VMs: {why}; \
         unset {SIMULATED_ENV} (only `handoff demo` sets it)"
    )]
    NotSimulated { why: String },
}

/// Who answers at `at`, for messages: a PVE endpoint is `https://…`, anything else a
/// libvirt URI.
pub fn name_of(at: &str) -> &'static str {
    if at.starts_with("https://") {
        "Proxmox VE"
    } else {
        "libvirt"
    }
}

/// Start, stop, describe and watch VMs. See the module docs for how each method maps onto
/// libvirt and Proxmox VE.
pub trait Hypervisor: Send {
    /// Which implementation ("libvirt", "simulated"), for logs.
    fn kind(&self) -> &'static str;
    /// Every VM defined at `at`, with its state.
    fn list(&mut self, at: &str) -> Result<Vec<(VmRef, VmState)>, HypervisorError>;
    /// One VM's state and why.
    fn probe(&mut self, vm: &VmRef) -> Result<Probe, HypervisorError>;
    /// Begin starting `vm`; a refusal of handoff's guard is [`Start::Refused`], not an error.
    fn start(&mut self, vm: &VmRef) -> Result<Start, HypervisorError>;
    /// Ask the guest to shut down (graceful; it may ignore it).
    fn shutdown(&mut self, vm: &VmRef) -> Result<Task, HypervisorError>;
    /// Turn it off at once: unsaved work in the guest is lost.
    fn destroy(&mut self, vm: &VmRef) -> Result<Task, HypervisorError>;
    /// Where `task` is now; callers poll it until it is done or their own timeout ends.
    fn poll(&mut self, task: &Task) -> Result<TaskState, HypervisorError>;
    /// The PCI devices `vm` passes through and its Looking Glass device.
    fn describe(&mut self, vm: &VmRef) -> Result<Description, HypervisorError>;
    /// Facts about the running guest; what cannot be read is None.
    fn guest(&mut self, vm: &VmRef) -> Guest;
    /// Lifecycle events of `vms` until the returned subscription is dropped.
    fn subscribe(&mut self, vms: &[VmRef], sink: EventSink) -> Result<Subscription, HypervisorError>;
    /// The failed start tasks of `vms` the hypervisor still lists, but for those in
    /// `known`; with `read_logs`, each with the guard's words when the guard refused it.
    /// Proxmox VE only (its hookscript's refusal is a task of the node's, whoever started
    /// it); libvirt's hook logs its refusals on the host, so none here.
    fn refused_starts(
        &mut self,
        vms: &[VmRef],
        known: &[String],
        read_logs: bool,
    ) -> Result<Vec<RefusedStart>, HypervisorError> {
        let _ = (vms, known, read_logs);
        Ok(Vec::new())
    }
}

/// [`vm_status`] with the PCI devices the VM's definition passes through, for `handoff
/// status`'s "could take it" (one more request per VM; a definition that cannot be read
/// leaves them unknown).
pub fn vm_status_with_devices(hv: &mut dyn Hypervisor, vm: &VmConfig) -> VmStatus {
    let mut s = vm_status(hv, vm);
    if !matches!(s.state, VmState::Unknown | VmState::Undefined) {
        s.passthrough = hv.describe(&VmRef::from(vm)).ok().map(|d| d.passthrough);
    }
    s
}

/// `vm`'s status for [`crate::status::collect`]: a VM the hypervisor does not know is
/// `undefined`, one it cannot be asked about `unknown`, each with why.
pub fn vm_status(hv: &mut dyn Hypervisor, vm: &VmConfig) -> VmStatus {
    match hv.probe(&VmRef::from(vm)) {
        Ok(p) => VmStatus::new(vm, p.state, None),
        Err(e @ (HypervisorError::NoDomain { .. } | HypervisorError::NoVm { .. })) => {
            VmStatus::new(vm, VmState::Undefined, Some(e.to_string()))
        }
        Err(e) => VmStatus::new(vm, VmState::Unknown, Some(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_listing_of_refused_starts_is_history_and_each_later_task_news_once() {
        let task = |upid: &str, at: u64, refused: bool| RefusedStart {
            vm: "linux-ai".into(),
            vmid: 141,
            upid: upid.into(),
            user: "root@pam".into(),
            at,
            message: refused.then(|| "not starting Linux AI (VM 141): …".into()),
            passthrough: Vec::new(),
        };
        let mut w = RefusalWatch::default();
        assert!(w.first());
        assert!(w.take(vec![task("UPID:a", 1, true)]).is_empty(), "history");
        assert!(!w.first());
        // A new refused task is news; one that failed for another reason is not; neither twice.
        let news = w.take(vec![
            task("UPID:c", 3, true),
            task("UPID:b", 2, false),
            task("UPID:a", 1, true),
        ]);
        assert_eq!(
            news.iter().map(|r| r.upid.as_str()).collect::<Vec<_>>(),
            ["UPID:c"]
        );
        assert_eq!(w.known(), ["UPID:a", "UPID:b", "UPID:c"]);
        assert!(w.take(vec![task("UPID:c", 3, true)]).is_empty());
    }
}
