//! The verdict: what state one GPU is in, decided once for every surface (issue 12).
//!
//! `handoff status`, the tray, the bar block and the details window used to decide this each
//! on their own, with different rules. They now call [`decide`] and only render the
//! [`Verdict`] it returns. It reads no file itself: the inputs ([`Facts`]) are the GPU's
//! sysfs reading (per GPU: several GPUs each get their own verdict), how many processes use
//! it, the hook's files ([`HookFiles`], loaded here so that no surface names their types),
//! what is known about the VMs, and, for a surface that watches, how long it has seen the
//! GPU orphaned. It links no libvirt: the block, which links none, passes
//! [`Vms::NotAsked`] and the hook's state file stands in for the VMs.
//!
//! ## The rules, in priority order (the first that matches decides)
//!
//! | # | when | state | words (headline) | bar colour / class | tray icon | actions that make sense | next step told |
//! |---|---|---|---|---|---|---|---|
//! | 1 | sysfs or the config could not be read | `unreadable` | "GPU unreadable" | red `#FF0000` / `error`, urgent | restore | none | fix what the error names |
//! | 2 | a function is locked in the kernel (an unbind hangs), the restore record is `stuck`, or the hook's state says `restore-required` | `restore_required` | "Restore required" | red / `restore`, urgent | restore | return the GPU to Linux | `pkexec handoff rebind --force` ("Return GPU to Linux") |
//! | 3b | no PCI device here, and every `[[vm]]` is on a Proxmox VE node (a desktop's view) | `in_vm` with the running VM, `idle` when none runs, `libvirt_unreachable` ("Proxmox VE unreachable") when the API did not answer | "`<GPU>`: `<VM>` (VM `<id>`)" / "`<GPU>`: free on the Proxmox VE node" (`<GPU>` its label, else `GPU <address>`) | as 8 / 10 / 7 | as 8 / 10 / 7 | as 8 (no Looking Glass) / 10 | as 8 / 10 / 7 |
//! | 3 | no PCI device at the address | `absent` | "No GPU at `<address>`" | grey `#888888` / `absent` | offline | none | set `[gpu] address` |
//! | 4 | this surface is acting (the tray's "stopping win11…"), or the hook or the record says `binding`/`returning` | `switching` | "GPU is moving to `<VM>`" / "GPU is moving back to Linux" / "GPU: `<action>`" | yellow `#FFDD00` / `switching` | switching | none (wait) | wait |
//! | 5 | orphaned: the GPU is off the host (vfio-pci — unless `host_driver = "vfio-pci"`, where it rests —, no driver, split) or a restore record is left, and no VM holds it | `restore_required` once the grace ([`ORPHAN_GRACE`]) is over, `switching` within it | "Restore required" | as 2 / as 4 | as 2 / as 4 | return the GPU to Linux | as 2 |
//! | 6 | functions split or unbound while a VM may hold the GPU and the hook's state is not settled (`host`/`vfio`): mid-way; with it settled, `restore_required` as 2 |  `switching` | "GPU is split between drivers" / "GPU has no driver" | as 4 | as 4 | none (wait) | wait |
//! | 7 | VMs were asked and none answered (libvirt down) | `libvirt_unreachable` | "libvirt unreachable" ("Proxmox VE unreachable" when every VM is on a PVE node) | grey / `offline` | offline | none | check libvirtd |
//! | 8 | a VM holds the GPU | `in_vm` | "`<GPU>`: `<VM>`" ("RTX 5070 Ti: Windows 11 (VM 140)" for a PVE VM, "RTX 3090 Ti: Windows" for libvirt's; `<GPU>` its label, else its pci.ids name, else "GPU") | blue `#00AAFF` / `vm` | vm | stop, force stop, open Looking Glass, switch | stop the VM to get it back |
//! | 9 | on the host driver and processes use it | `busy` | "GPU is on Linux (`<driver>`)" | amber `#FFAA00` / `busy` | busy | terminate a process, stop a unit | end them before a VM start |
//! | 10a | as 10, but the holder scan could not look everywhere (processes it may not inspect: another user's, as a normal user; a note such as `[host] dev` wrong) | `idle` with `unseen: true` | "GPU is on Linux (`<driver>`) · ? unseen", the reason what was not checked | grey `#AAAAAA` / `unseen` | offline | start, switch (the hook, as root, checks again) | "N processes could not be checked: `sudo handoff blockers` sees all" |
//! | 10 | on the host driver (or on vfio-pci where it rests), nothing uses it, and the scan looked everywhere | `idle` | "GPU is on Linux (`<driver>`)" / "`<GPU>`: free on vfio-pci" | green `#00CC00` / `linux` | host | start, switch | a VM can take it |
//!
//! Rule 10a is a flag on `idle`, not a state of its own, so that `status --json` keeps its
//! words (`verdict.state` stays `idle`; `verdict.unseen` is added): a scan that could not
//! look everywhere (issue 17) must not be called free, but nothing was seen using the GPU
//! either. As a normal user it is the usual idle: only root sees every process.
//!
//! "No VM holds it" (rule 5) and "a VM holds it" (rule 8): with [`Vms::Known`], an active
//! configured VM (the status model's `gpu.vm`, or any active VM while the GPU is on
//! vfio-pci); with [`Vms::NotAsked`], the hook's state file saying `vfio` with a VM (the
//! hook rewrites it at every VM start and stop). A VM that died while libvirtd was down
//! never ran the hook's `release`, so the bar keeps showing it in the VM until libvirt
//! runs it; the surfaces that ask libvirt say "restore required".
//!
//! The grace (rule 5): right after a VM stops, the GPU sits on vfio-pci with its record
//! until libvirt runs the hook's `release` (well under a second). A surface that watches
//! (the tray) passes how long it has seen that ([`OrphanWatch`]); a one-shot reader (the
//! CLI, the bar, the window's refresh) has no memory and passes `None`, which counts as
//! past the grace: a person asking is told the truth, and the moment is sub-second.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bind::record::{Phase, RestoreRecord};
use crate::config::VmConfig;
use crate::gpu::Owner;
use crate::holders::Holder;
use crate::host::Host;
use crate::pci::PciAddress;
use crate::state::{HookPhase, HookState, Refusal};
use crate::status::{GpuStatus, VmState, VmStatus};

/// The states every surface tells apart. Serialised in `handoff status --json` as
/// `verdict.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Idle,
    Busy,
    InVm,
    Switching,
    RestoreRequired,
    Absent,
    LibvirtUnreachable,
    Unreadable,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Idle,
        State::Busy,
        State::InVm,
        State::Switching,
        State::RestoreRequired,
        State::Absent,
        State::LibvirtUnreachable,
        State::Unreadable,
    ];

    /// The word `--json` uses.
    pub fn word(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Busy => "busy",
            State::InVm => "in_vm",
            State::Switching => "switching",
            State::RestoreRequired => "restore_required",
            State::Absent => "absent",
            State::LibvirtUnreachable => "libvirt_unreachable",
            State::Unreadable => "unreadable",
        }
    }

    /// A person must act (bars mark it urgent).
    pub fn urgent(self) -> bool {
        matches!(self, State::RestoreRequired | State::Unreadable)
    }
}

/// Why a GPU needs `handoff rebind --force` (rules 2 and 5): the bar words some of them
/// differently ("stuck!", "split!").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A function's lock is held by the kernel: an unbind hangs.
    Locked,
    /// The restore record says `stuck`.
    StuckRecord,
    /// The hook's state says `restore-required`.
    HookFailed,
    /// On vfio-pci with no VM.
    LeftOnVfio,
    /// No driver, no VM.
    LeftUnbound,
    /// Functions on different drivers, no VM.
    Split,
    /// A restore record is left with no VM (the GPU may look home).
    RecordLeft,
}

/// An action a person can take on the GPU (the table's "actions" column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Offer {
    Start,
    Switch,
    Stop,
    ForceStop,
    OpenLookingGlass,
    TerminateProcess,
    StopUnit,
    ReturnToLinux,
}

/// One GPU's verdict: what every surface shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub state: State,
    /// The few words: "GPU is on Linux (nvidia)", "GPU is in Windows", "Restore required".
    pub headline: String,
    /// Why, when the headline alone does not say it (restore required, unreachable,
    /// unreadable, what is moving).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What to do next, one sentence.
    pub next: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// The VM holding (or about to hold) the GPU, by libvirt name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Its label (`[[vm]] label`), else its name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_label: Option<String>,
    /// Its Proxmox VE VMID, for a PVE VM: the headline says "Windows 11 (VM 140)".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
    /// What the GPU is called, the headline's first words: its `[[gpu]] label`, else its
    /// pci.ids name ("RTX 5070 Ti"), else "GPU".
    pub gpu_label: String,
    /// Processes using the GPU.
    pub users: usize,
    /// The graphics function's driver, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// What the surface that asked is doing itself ("stopping win11…"), whatever the state:
    /// a title may say it while a restore or an absent GPU decides the colour.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub doing: Option<String>,
    /// What makes sense now.
    pub offers: Vec<Offer>,
    /// Rule 10a: idle as far as the holder scan saw, but it could not look everywhere, so
    /// nobody may call the GPU free (the bar's "? unseen"). Only with `idle`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unseen: bool,
}

/// The GPU part of the inputs: one sysfs reading plus the holder count.
#[derive(Debug, Clone, Copy)]
pub struct GpuFacts<'a> {
    pub address: PciAddress,
    pub owner: Owner,
    /// The graphics function's driver.
    pub driver: Option<&'a str>,
    /// For a split GPU: which function is on which driver.
    pub split: Option<&'a str>,
    pub locked: &'a [PciAddress],
    /// Processes (and framebuffers) using it.
    pub users: usize,
    /// The VM the status model found holding it (`gpu.vm`), when VMs were asked.
    pub vm: Option<&'a str>,
    /// The card rests on vfio-pci between VMs (`host_driver = "vfio-pci"`).
    pub rests_on_vfio: bool,
    /// Processes whose fds the holder scan could not read (`holders::Scan::uninspected`):
    /// what they hold is unknown.
    pub uninspected: usize,
    /// What else the scan could not check (`holders::Scan::notes`), in words.
    pub not_checked: &'a [String],
    /// What the GPU is called ([`GpuStatus::label`]): the config's label, else pci.ids'
    /// short name; None: "GPU".
    pub label: Option<&'a str>,
}

impl<'a> From<&'a GpuStatus> for GpuFacts<'a> {
    fn from(g: &'a GpuStatus) -> Self {
        GpuFacts {
            address: g.address,
            owner: g.owner,
            driver: g.driver.as_deref(),
            split: g.split.as_deref(),
            locked: &g.locked,
            users: g.blockers.len(),
            vm: g.vm.as_deref(),
            rests_on_vfio: g.rests_on_vfio,
            uninspected: g.uninspected,
            not_checked: &g.notes,
            label: g.label.as_deref(),
        }
    }
}

/// What is known about the VMs.
#[derive(Debug, Clone, Copy)]
pub enum Vms<'a> {
    /// libvirt was asked: each configured VM's state (all `unknown` = unreachable).
    Known(&'a [VmStatus]),
    /// Not asked (the bar links no libvirt): the configured VMs, for their labels.
    NotAsked(&'a [VmConfig]),
}

impl Vms<'_> {
    fn label(&self, name: &str) -> String {
        match self {
            Vms::Known(v) => v.iter().find(|v| v.name == name).map(|v| v.label.clone()),
            Vms::NotAsked(v) => v.iter().find(|v| v.name == name).map(|v| v.label().to_owned()),
        }
        .unwrap_or_else(|| name.to_owned())
    }

    /// A Proxmox VE VM's VMID.
    fn vmid(&self, name: &str) -> Option<u32> {
        match self {
            Vms::Known(v) => v.iter().find(|v| v.name == name).and_then(|v| v.vmid),
            Vms::NotAsked(v) => v.iter().find(|v| v.name == name).and_then(|v| v.vmid),
        }
    }

    /// "Windows 11 (VM 140)" for a PVE VM, "Windows" for a libvirt one.
    fn shown(&self, name: &str) -> String {
        vm_words(&self.label(name), self.vmid(name))
    }

    /// libvirt was asked about every VM and answered about none: why.
    fn unreachable(&self) -> Option<String> {
        match self {
            Vms::Known(vms) => libvirt_unreachable(vms),
            Vms::NotAsked(_) => None,
        }
    }
}

/// libvirt was asked about every configured VM and answered about none (daemon down, no
/// permission): why, from the first VM's error. No VMs configured is not unreachable.
pub fn libvirt_unreachable(vms: &[VmStatus]) -> Option<String> {
    if vms.is_empty() || !vms.iter().all(|v| v.state == VmState::Unknown) {
        return None;
    }
    Some(
        vms[0]
            .error
            .clone()
            .unwrap_or_else(|| "libvirt did not answer".into()),
    )
}

/// The hook's two files for one GPU: `state.json` and the restore record. Surfaces get
/// them only through this type (issue 12: no surface names the hook's types).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookFiles {
    pub state: Option<HookState>,
    pub record: Option<RestoreRecord>,
    /// On a desktop whose VMs are on Proxmox VE, the last refused start of this GPU the
    /// agent logged from PVE's task list ([`crate::refusals::user_host`]): the hookscript
    /// refused it on the node, so no state file here has it.
    pub pve_refusal: Option<Refusal>,
}

impl HookFiles {
    /// Reads both; an unreadable or foreign file counts as absent (surfaces fall back to
    /// sysfs alone), as before.
    pub fn load(host: &Host, gpu: PciAddress) -> HookFiles {
        HookFiles::load_state(host, gpu).with_record_of(host, gpu)
    }

    /// [`HookFiles::load`] for a surface of `cfg` (the tray, the details window): on a
    /// desktop whose VMs are on Proxmox VE, with the last refusal of `gpu` logged in the
    /// user's runtime dir too, so that "Last refused start" is the last of either log.
    pub fn load_for(cfg: &crate::Config, gpu: PciAddress) -> HookFiles {
        let files = HookFiles::load(&cfg.host, gpu);
        if crate::refusals::pve_desktop(cfg) {
            files.with_pve_refusals_of(&crate::refusals::user_host(&cfg.host), gpu)
        } else {
            files
        }
    }

    /// These files with the last refusal of `gpu` in the refusal log under `user`'s run dir
    /// (the PVE refusals a desktop logged, [`crate::refusals::user_host`]).
    pub fn with_pve_refusals_of(mut self, user: &Host, gpu: PciAddress) -> HookFiles {
        self.pve_refusal = crate::refusals::last(user, gpu).map(|l| Refusal {
            vm: l.vm,
            at: l.at,
            holders: l.holders,
            message: l.message,
        });
        self
    }

    /// Only the state file (cheap: the bar compares it before and after a reading).
    pub fn load_state(host: &Host, gpu: PciAddress) -> HookFiles {
        HookFiles {
            state: HookState::load_gpu(host, gpu),
            record: None,
            pve_refusal: None,
        }
    }

    /// These files with the restore record read too.
    pub fn with_record_of(mut self, host: &Host, gpu: PciAddress) -> HookFiles {
        self.record = RestoreRecord::load(host, gpu).ok().flatten();
        self
    }

    /// Writes both files as the hook would (for the simulator and tests, which put a
    /// machine in a state without naming the hook's types); an absent one is left alone.
    pub fn save(&self, host: &Host) -> std::io::Result<()> {
        if let Some(s) = &self.state {
            s.clone().save(host)?;
        }
        if let Some(r) = &self.record {
            r.save(host).map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// [`HookFiles::save`] for one of several GPUs: its state file where the hook keeps it
    /// ([`HookState::path_for`]; the primary GPU's is `state.json`).
    pub fn save_gpu(&self, host: &Host, primary: bool) -> std::io::Result<()> {
        if let Some(s) = &self.state {
            s.clone().save_gpu(host, primary)?;
        }
        if let Some(r) = &self.record {
            r.save(host).map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// The last start the hook refused: the later of the state file's and, on a desktop
    /// whose VMs are on Proxmox VE, the last one logged from PVE ([`HookFiles::load_for`]).
    /// Every surface's "Last refused start" is this one.
    pub fn last_refusal(&self) -> Option<&Refusal> {
        let local = self.state.as_ref().and_then(|s| s.last_refusal.as_ref());
        match (local, self.pve_refusal.as_ref()) {
            (Some(l), Some(p)) => Some(if p.at > l.at { p } else { l }),
            (l, p) => l.or(p),
        }
    }

    /// The hook's last failure, in words.
    pub fn last_error(&self) -> Option<&str> {
        self.state.as_ref().and_then(|s| s.last_error.as_deref())
    }

    /// For the surfaces' unit tests, which may not name the hook's types: the state file
    /// with this phase (its `state.json` word: `binding`, `vfio`, `returning`,
    /// `restore-required`, `host`) and VM.
    pub fn with_hook(mut self, gpu: PciAddress, phase: &str, vm: Option<&str>) -> Self {
        let mut s = self.state.take().unwrap_or_else(|| HookState::new(gpu));
        s.phase = serde_json::from_value(serde_json::Value::String(phase.to_owned()))
            .unwrap_or_else(|_| panic!("no hook phase {phase:?}"));
        s.vm = vm.map(str::to_owned);
        self.state = Some(s);
        self
    }

    /// For tests: the hook's last error.
    pub fn with_hook_error(mut self, gpu: PciAddress, error: &str) -> Self {
        let s = self.state.get_or_insert_with(|| HookState::new(gpu));
        s.last_error = Some(error.to_owned());
        self
    }

    /// For tests: the hook's last refusal of `vm`'s start, at unix time `at`.
    pub fn with_refusal(
        mut self,
        gpu: PciAddress,
        vm: &str,
        at: u64,
        holders: Vec<Holder>,
        message: &str,
    ) -> Self {
        let s = self.state.get_or_insert_with(|| HookState::new(gpu));
        s.last_refusal = Some(Refusal {
            vm: vm.to_owned(),
            at,
            holders,
            message: message.to_owned(),
        });
        self
    }

    /// For the surfaces' unit tests: a refusal logged from Proxmox VE's task list (the
    /// desktop's log, [`HookFiles::load_for`]).
    pub fn with_pve_refusal(mut self, vm: &str, at: u64, message: &str) -> Self {
        self.pve_refusal = Some(Refusal {
            vm: vm.to_owned(),
            at,
            holders: Vec::new(),
            message: message.to_owned(),
        });
        self
    }

    /// For tests: a restore record in this phase (`binding`, `bound`, `returning`,
    /// `stuck`) for `vm`.
    pub fn with_record(
        mut self,
        gpu: PciAddress,
        phase: &str,
        vm: Option<&str>,
        problem: Option<&str>,
    ) -> Self {
        self.record = Some(RestoreRecord {
            version: 1,
            gpu,
            vm: vm.map(str::to_owned),
            created: 0,
            phase: serde_json::from_value(serde_json::Value::String(phase.to_owned()))
                .unwrap_or_else(|_| panic!("no record phase {phase:?}")),
            functions: Vec::new(),
            problem: problem.map(str::to_owned),
            hung_writer: None,
            hung_writer_start: None,
        });
        self
    }
}

/// Everything [`decide`] reads.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The GPU, or why it could not be read.
    pub gpu: Result<GpuFacts<'a>, &'a str>,
    pub files: &'a HookFiles,
    pub vms: Vms<'a>,
    /// What this surface itself is doing ("stopping win11…"), shown as switching.
    pub doing: Option<&'a str>,
    /// How long this surface has watched the GPU orphaned ([`OrphanWatch`]); `None`: no
    /// memory (a one-shot reader), counted as past the grace.
    pub orphan_seen_for: Option<Duration>,
}

/// How long a GPU may sit off the host with no VM before that is "restore required":
/// the hook's `release` runs right after a VM stops and takes well under a second.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3);

const RETURN: &str = "Return it to Linux: \u{201c}Return GPU to Linux\u{201d} in the tray or window, or `pkexec handoff rebind --force`.";

impl Verdict {
    fn new(state: State, headline: impl Into<String>, next: impl Into<String>) -> Verdict {
        Verdict {
            state,
            headline: headline.into(),
            reason: None,
            next: next.into(),
            cause: None,
            vm: None,
            vm_label: None,
            vmid: None,
            gpu_label: "GPU".to_owned(),
            users: 0,
            driver: None,
            doing: None,
            offers: Vec::new(),
            unseen: false,
        }
    }

    fn restore(cause: Cause, reason: String) -> Verdict {
        Verdict {
            reason: Some(reason),
            cause: Some(cause),
            offers: vec![Offer::ReturnToLinux],
            ..Verdict::new(State::RestoreRequired, "Restore required", RETURN)
        }
    }

    /// `Restore required: <why>`, "GPU is in Windows": the headline with its reason.
    pub fn line(&self) -> String {
        match &self.reason {
            Some(r) => format!("{}: {}", self.headline, first_line(r)),
            _ => self.headline.clone(),
        }
    }

    /// [`Verdict::line`] for a place titled with the GPU already (a tray or window section
    /// per GPU): without the headline's "`<GPU>`: " — "macOS", not "UHD 630: macOS".
    pub fn line_under_gpu(&self) -> String {
        let line = self.line();
        match line.strip_prefix(&format!("{}: ", self.gpu_label)) {
            Some(rest) => rest.to_owned(),
            None => line,
        }
    }
}

/// A VM as the headline names it: its label, and for a Proxmox VE VM its VMID ("Windows 11
/// (VM 140)"; "VM 140" alone when it has no label).
fn vm_words(label: &str, vmid: Option<u32>) -> String {
    match vmid {
        Some(id) if label == id.to_string() => format!("VM {id}"),
        Some(id) => format!("{label} (VM {id})"),
        None => label.to_owned(),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// What the headline calls the GPU: its label, else "GPU".
fn gpu_words(g: &GpuFacts) -> String {
    g.label.unwrap_or("GPU").to_owned()
}

/// Why the GPU is orphaned (rule 5), or None.
fn orphaned(g: &GpuFacts, files: &HookFiles, vm_holds: bool, vms_unknown: bool) -> Option<(Cause, String)> {
    if vm_holds || vms_unknown {
        return None;
    }
    match g.owner {
        // Where it rests: free, not left behind.
        Owner::Vfio if g.rests_on_vfio => {}
        Owner::Vfio => {
            return Some((
                Cause::LeftOnVfio,
                "the GPU is on vfio-pci and no VM is running".into(),
            ));
        }
        Owner::Unbound => {
            return Some((
                Cause::LeftUnbound,
                "the GPU has no driver and no VM is running".into(),
            ));
        }
        Owner::Mixed => {
            let how = g.split.map(|s| format!(" ({s})")).unwrap_or_default();
            return Some((
                Cause::Split,
                format!("the GPU is split between drivers{how} and no VM is running"),
            ));
        }
        Owner::Host | Owner::Absent => {}
    }
    files.record.as_ref().map(|r| {
        (
            Cause::RecordLeft,
            format!(
                "a restore record is left from {} but no VM is running",
                r.vm.as_deref().unwrap_or("a VM")
            ),
        )
    })
}

/// The verdict of one GPU. See the table in this module's header.
pub fn decide(f: &Facts) -> Verdict {
    let mut v = rules(f);
    v.doing = f.doing.map(str::to_owned);
    if let Ok(g) = &f.gpu {
        v.driver = g.driver.map(str::to_owned);
        v.users = g.users;
        v.gpu_label = gpu_words(g);
    }
    v
}

fn rules(f: &Facts) -> Verdict {
    let files = f.files;
    let hook = files.state.as_ref();
    let record = files.record.as_ref();
    // 1. Unreadable.
    let g = match &f.gpu {
        Ok(g) => g,
        Err(e) => {
            return Verdict {
                reason: Some((*e).to_owned()),
                ..Verdict::new(
                    State::Unreadable,
                    "GPU unreadable",
                    "Fix what the error names (the config's [gpu] address, or read access to sysfs).",
                )
            };
        }
    };
    // 2. A handoff that did not finish.
    if let Some(a) = g.locked.first() {
        return Verdict::restore(
            Cause::Locked,
            format!(
                "{a} is locked in the kernel: an unbind is probably stuck (something still holds the GPU)"
            ),
        );
    }
    if let Some(r) = record.filter(|r| r.phase == Phase::Stuck) {
        return Verdict::restore(
            Cause::StuckRecord,
            r.problem
                .clone()
                .unwrap_or_else(|| "the handoff got stuck".into()),
        );
    }
    if let Some(h) = hook.filter(|h| h.phase == HookPhase::RestoreRequired) {
        return Verdict::restore(
            Cause::HookFailed,
            h.last_error
                .clone()
                .unwrap_or_else(|| "the last handoff did not finish".into()),
        );
    }
    // 3b. Not in this machine, but every VM is on a Proxmox VE node: the GPU is there,
    // with whichever VM runs (a desktop's view of the node).
    if g.owner == Owner::Absent
        && let Vms::Known(vms) = f.vms
        && !vms.is_empty()
        && vms.iter().all(|v| v.uri.starts_with("https://"))
    {
        return on_pve_node(g, vms);
    }
    // 3. Absent.
    if g.owner == Owner::Absent {
        return Verdict::new(
            State::Absent,
            format!("No GPU at {}", g.address),
            "This machine has no PCI device there: set [gpu] address (`lspci -D` lists devices).",
        );
    }
    let with_vm = |mut v: Verdict, vm: Option<&str>| {
        v.vm = vm.map(str::to_owned);
        v.vm_label = vm.map(|n| f.vms.label(n));
        v.vmid = vm.and_then(|n| f.vms.vmid(n));
        v.users = g.users;
        v
    };
    // 4. Switching: this surface, the hook, or the record.
    let hook_vm = hook
        .filter(|h| {
            matches!(
                h.phase,
                HookPhase::Binding | HookPhase::Vfio | HookPhase::Returning
            )
        })
        .and_then(|h| h.vm.as_deref());
    if let Some(doing) = f.doing {
        let v = Verdict::new(
            State::Switching,
            format!("GPU: {doing}"),
            "Wait for it to finish.",
        );
        return with_vm(v, hook_vm);
    }
    let moving = hook
        .map(|h| h.phase)
        .filter(|p| matches!(p, HookPhase::Binding | HookPhase::Returning))
        .or(match record.map(|r| r.phase) {
            Some(Phase::Binding) => Some(HookPhase::Binding),
            Some(Phase::Returning) => Some(HookPhase::Returning),
            _ => None,
        });
    if let Some(p) = moving {
        let vm = hook_vm.or(record.and_then(|r| r.vm.as_deref()));
        let headline = match (p, vm) {
            (HookPhase::Binding, Some(vm)) => format!("GPU is moving to {}", f.vms.label(vm)),
            (HookPhase::Binding, None) => "GPU is moving to vfio-pci".to_owned(),
            _ => "GPU is moving back to Linux".to_owned(),
        };
        let v = Verdict::new(State::Switching, headline, "Wait: the hook is moving it.");
        return with_vm(v, vm);
    }
    // Who holds it.
    let (vm_holds, holding, vms_unknown) = match f.vms {
        Vms::Known(vms) => {
            let active: Vec<&VmStatus> = vms.iter().filter(|v| v.state.is_active()).collect();
            let holds = g.vm.is_some() || (!active.is_empty() && g.owner != Owner::Host);
            (holds, g.vm.map(str::to_owned), f.vms.unreachable().is_some())
        }
        Vms::NotAsked(_) => {
            let vm = hook
                .filter(|h| h.phase == HookPhase::Vfio)
                .and_then(|h| h.vm.clone());
            (vm.is_some() && g.owner != Owner::Host, vm, false)
        }
    };
    // 5. Orphaned.
    if let Some((cause, why)) = orphaned(g, files, vm_holds, vms_unknown) {
        let within_grace = f.orphan_seen_for.is_some_and(|d| d < ORPHAN_GRACE);
        if within_grace {
            let v = Verdict {
                reason: Some(why),
                ..Verdict::new(
                    State::Switching,
                    "GPU is moving back to Linux",
                    "Wait: the hook returns it when a VM stops.",
                )
            };
            return with_vm(v, None);
        }
        return with_vm(Verdict::restore(cause, why), None);
    }
    // 6. Split or unbound while a VM may hold it: mid-way (libvirt detaching a managed
    // device itself, or the hook before its state file said so), unless the hook's state
    // says it has settled: then a function was moved by hand and nothing will finish it.
    let settled = hook.is_some_and(|h| matches!(h.phase, HookPhase::Host | HookPhase::Vfio));
    if settled && g.owner == Owner::Mixed {
        let how = g.split.map(|s| format!(" ({s})")).unwrap_or_default();
        return with_vm(
            Verdict::restore(Cause::Split, format!("the GPU is split between drivers{how}")),
            None,
        );
    }
    if settled && g.owner == Owner::Unbound {
        return with_vm(
            Verdict::restore(Cause::LeftUnbound, "the GPU has no driver".into()),
            None,
        );
    }
    if matches!(g.owner, Owner::Mixed | Owner::Unbound) {
        let headline = if g.owner == Owner::Mixed {
            "GPU is split between drivers"
        } else {
            "GPU has no driver"
        };
        let v = Verdict {
            reason: g.split.map(str::to_owned),
            ..Verdict::new(
                State::Switching,
                headline,
                "Wait: the hook is moving it while a VM starts or stops.",
            )
        };
        return with_vm(v, holding.as_deref());
    }
    // 7. libvirt unreachable.
    if let Some(why) = f.vms.unreachable() {
        // On a Proxmox VE node the VMs are asked through its API, not libvirt.
        let pve = matches!(f.vms, Vms::Known(vms) if vms.iter().all(|v| v.uri.starts_with("https://")));
        let (headline, next) = if pve {
            (
                "Proxmox VE unreachable",
                "Check [proxmox] url, token and fingerprint: `handoff status` says what failed.",
            )
        } else {
            (
                "libvirt unreachable",
                "Check that libvirtd runs (`systemctl status libvirtd`) and that you may use it (group libvirt).",
            )
        };
        let v = Verdict {
            reason: Some(why),
            ..Verdict::new(State::LibvirtUnreachable, headline, next)
        };
        return with_vm(v, None);
    }
    // 8. In a VM.
    if vm_holds || (g.owner == Owner::Vfio && !g.rests_on_vfio) {
        // "RTX 5070 Ti: Windows 11 (VM 140)" (issue 14), "RTX 3090 Ti: Windows".
        let headline = match holding.as_deref() {
            Some(vm) => format!("{}: {}", gpu_words(g), f.vms.shown(vm)),
            None => "GPU is in a VM".to_owned(),
        };
        let v = Verdict {
            offers: vec![
                Offer::Stop,
                Offer::ForceStop,
                Offer::OpenLookingGlass,
                Offer::Switch,
            ],
            ..Verdict::new(
                State::InVm,
                headline,
                if g.rests_on_vfio {
                    "It is free again (on vfio-pci) when the VM stops."
                } else {
                    "It comes back to Linux when the VM stops."
                },
            )
        };
        return with_vm(v, holding.as_deref());
    }
    let on_linux = if g.rests_on_vfio && g.owner == Owner::Vfio {
        format!("{}: free on vfio-pci", gpu_words(g))
    } else {
        format!("GPU is on Linux ({})", g.driver.unwrap_or("?"))
    };
    // 9. Busy.
    if g.users > 0 {
        let who = if g.users == 1 {
            "1 process uses it".to_owned()
        } else {
            format!("{} processes use it", g.users)
        };
        let v = Verdict {
            offers: vec![Offer::TerminateProcess, Offer::StopUnit],
            ..Verdict::new(
                State::Busy,
                on_linux,
                format!("{who}: a VM start would be refused until they let go."),
            )
        };
        return with_vm(v, None);
    }
    // 10a. Idle as far as the scan saw, but it could not look everywhere: not "free".
    if g.uninspected > 0 || !g.not_checked.is_empty() {
        let processes = match g.uninspected {
            1 => "1 process".to_owned(),
            n => format!("{n} processes"),
        };
        let mut why: Vec<String> = Vec::new();
        if g.uninspected > 0 {
            why.push(format!(
                "{processes} could not be inspected; what they hold is unknown"
            ));
        }
        why.extend(g.not_checked.iter().cloned());
        // Not "free on vfio-pci": that is the claim this cannot make.
        let where_ = if g.rests_on_vfio && g.owner == Owner::Vfio {
            "GPU is on vfio-pci".to_owned()
        } else {
            on_linux
        };
        let next = if g.uninspected > 0 {
            format!("{processes} could not be checked: `sudo handoff blockers` sees all.")
        } else {
            "Not everything could be checked: `sudo handoff blockers` says what.".to_owned()
        };
        let v = Verdict {
            reason: Some(why.join("\n")),
            offers: vec![Offer::Start, Offer::Switch],
            unseen: true,
            ..Verdict::new(State::Idle, format!("{where_} · ? unseen"), next)
        };
        return with_vm(v, None);
    }
    // 10. Idle.
    let v = Verdict {
        offers: vec![Offer::Start, Offer::Switch],
        ..Verdict::new(State::Idle, on_linux, "Nothing uses it: a VM can take it.")
    };
    with_vm(v, None)
}

/// Rule 3b: the GPU of a Proxmox VE node seen from elsewhere: with the running VM, free,
/// or unknown when the node's API did not answer.
fn on_pve_node(g: &GpuFacts, vms: &[VmStatus]) -> Verdict {
    if vms.iter().all(|v| v.state == VmState::Unknown) {
        let why = vms.iter().find_map(|v| v.error.clone());
        return Verdict {
            reason: why,
            ..Verdict::new(
                State::LibvirtUnreachable,
                "Proxmox VE unreachable",
                "Check [proxmox] url, token and fingerprint: `handoff status` says what failed.",
            )
        };
    }
    let active: Vec<&VmStatus> = vms.iter().filter(|v| v.state.is_active()).collect();
    match active.as_slice() {
        [vm] => Verdict {
            vm: Some(vm.name.clone()),
            vm_label: Some(vm.label.clone()),
            vmid: vm.vmid,
            offers: vec![Offer::Stop, Offer::ForceStop, Offer::Switch],
            ..Verdict::new(
                State::InVm,
                format!("{}: {}", gpu_words(g), vm_words(&vm.label, vm.vmid)),
                "It is free again when that VM stops (`handoff switch` starts another).",
            )
        },
        [] => Verdict {
            offers: vec![Offer::Start, Offer::Switch],
            ..Verdict::new(
                State::Idle,
                // No pci.ids name here (the card is in the node): its label, else its address.
                match g.label {
                    Some(l) => format!("{l}: free on the Proxmox VE node"),
                    None => format!("GPU {}: free on the Proxmox VE node", g.address),
                },
                "No VM runs: a VM can take it.",
            )
        },
        _ => Verdict {
            offers: vec![Offer::Stop, Offer::Switch],
            ..Verdict::new(
                State::InVm,
                "GPU is in a VM",
                "Several configured VMs run; only one can have the GPU.",
            )
        },
    }
}

/// Tells a VM that just stopped (the GPU sits on vfio-pci until the hook's `release`
/// runs) from a handoff that got stuck, for a surface that watches: how long the GPU has
/// been seen orphaned. The clock is passed in.
#[derive(Debug, Default)]
pub struct OrphanWatch {
    since: Option<Instant>,
}

impl OrphanWatch {
    /// Looks at a fresh reading taken at `now`. `orphaned`: whether [`decide`] found the
    /// GPU orphaned (call it with `orphan_seen_for: Some(ZERO)` to ask). Returns how long
    /// it has been seen so, and, on the first sighting only, when to read again (one
    /// one-shot timer in this transient state; never while idle).
    pub fn observe(&mut self, orphaned: bool, now: Instant) -> (Option<Duration>, Option<Duration>) {
        if !orphaned {
            self.since = None;
            return (None, None);
        }
        match self.since {
            Some(t) => (Some(now.saturating_duration_since(t)), None),
            None => {
                self.since = Some(now);
                (Some(Duration::ZERO), Some(ORPHAN_GRACE))
            }
        }
    }
}

/// Whether the GPU is orphaned (rule 5), whatever the grace: what [`OrphanWatch`] times.
pub fn is_orphaned(f: &Facts) -> bool {
    let d = decide(&Facts {
        orphan_seen_for: None,
        ..*f
    });
    matches!(
        d.cause,
        Some(Cause::LeftOnVfio | Cause::LeftUnbound | Cause::Split | Cause::RecordLeft)
    )
}

#[cfg(test)]
mod tests;
