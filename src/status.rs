//! The one status model every surface shows (ARCHITECTURE.md, "Status"): who owns the GPU, which
//! VM holds it, who keeps it busy, and each configured VM's state.
//!
//! Collecting it is split from rendering it: [`collect`] reads sysfs and `/proc` and asks
//! a caller-supplied probe for VM states (so this module does not link libvirt), and
//! [`Status::headline`] / [`Status::render_text`] turn it into words.

use serde::{Deserialize, Serialize};

use crate::config::{Config, VmConfig};
use crate::gpu::{self, Function, Gpu, IommuGroup, Owner};
use crate::holders::{self, Holder};
use crate::pci::PciAddress;
use crate::verdict::{self, Facts, GpuFacts, HookFiles, State, Verdict, Vms};

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub gpu: GpuStatus,
    pub vms: Vec<VmStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuStatus {
    pub address: PciAddress,
    pub name: Option<String>,
    pub owner: Owner,
    /// The graphics function's driver.
    pub driver: Option<String>,
    /// Every function of the slot, the graphics function first.
    pub functions: Vec<Function>,
    /// The running VM that holds the GPU.
    pub vm: Option<String>,
    pub blockers: Vec<Holder>,
    /// Processes holding the GPU's VFIO group `/dev/vfio/<group>` (a VM's QEMU, with its
    /// `vm`): while there are any, the GPU cannot go back to the host.
    pub vfio_users: Vec<Holder>,
    /// Processes whose fds could not be read; their holders are unknown.
    pub uninspected: usize,
    pub iommu_group: Option<IommuGroup>,
    /// Things the scan could not check, said plainly.
    pub notes: Vec<String>,
    /// For owner `mixed`: which function is on which driver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Functions whose lock the kernel holds (their `driver_override` could not be read in
    /// time): an unbind is probably stuck, so `owner` and `driver` are uncertain. Empty
    /// normally.
    pub locked: Vec<PciAddress>,
    /// `[gpu] host_driver = "vfio-pci"`: the card rests on vfio-pci between VMs (a
    /// Proxmox VE node's usual set-up), so vfio-pci with no VM is free, not orphaned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rests_on_vfio: bool,
    /// What surfaces call it: the `[[gpu]] label`, else pci.ids' short name ("RTX 5070
    /// Ti"); None when neither is known (a desktop without the card, no label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The configured VMs that could take it now: not running, and their definition
    /// (libvirt `<hostdev>`, PVE `hostpciN`) passes a function of its slot through. By
    /// name, as in `vms`. Empty when the VMs' definitions were not read.
    #[serde(default)]
    pub candidates: Vec<String>,
}

/// A libvirt domain state, in `virsh domstate` words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
    Shutdown,
    Shutoff,
    Crashed,
    Suspended,
    /// Defined nowhere at that URI.
    Undefined,
    /// libvirt could not be asked.
    Unknown,
}

impl VmState {
    pub fn words(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shutting down",
            VmState::Shutoff => "shut off",
            VmState::Crashed => "crashed",
            VmState::Suspended => "suspended (pmsuspended)",
            VmState::Undefined => "not defined in libvirt",
            VmState::Unknown => "unknown",
        }
    }

    /// A VM in this state has a QEMU process that may hold the GPU.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Running | VmState::Paused | VmState::Shutdown | VmState::Suspended
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub label: String,
    pub uri: String,
    pub state: VmState,
    /// Why the state is unknown or undefined, with what to check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its Proxmox VE VMID, for a PVE VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
    /// The PCI devices its definition passes through, when that was read (`handoff
    /// status` reads it; surfaces that only need states do not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<Vec<PciAddress>>,
}

impl VmStatus {
    pub fn new(vm: &VmConfig, state: VmState, error: Option<String>) -> Self {
        Self {
            name: vm.name.clone(),
            label: vm.label().to_owned(),
            uri: vm.uri.clone(),
            state,
            error,
            vmid: vm.vmid,
            passthrough: None,
        }
    }

    /// Its state in words for people. A Proxmox VE VM the API does not list is not "not
    /// defined in libvirt": PVE hides a VM from a token without `VM.Audit` on it exactly as
    /// it hides a VMID that does not exist, so say both (`error` has the `pveum` that fixes
    /// the first).
    pub fn words(&self) -> &'static str {
        match (self.state, self.vmid) {
            (VmState::Undefined, Some(_)) => {
                "not visible to the API token (no VM.Audit on it, or no such VMID)"
            }
            (s, _) => s.words(),
        }
    }

    /// "Linux AI (VM 141)" for a PVE VM, "Windows (win11)" for a libvirt one.
    pub fn shown(&self) -> String {
        match self.vmid {
            Some(id) => format!("{} (VM {id})", self.label),
            None => format!("{} ({})", self.label, self.name),
        }
    }

    /// It is off and its definition passes a function of `gpu`'s slot through.
    pub fn could_take(&self, gpu: PciAddress) -> bool {
        matches!(self.state, VmState::Shutoff | VmState::Crashed)
            && self
                .passthrough
                .as_ref()
                .is_some_and(|p| p.iter().any(|a| a.same_slot(&gpu)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Sysfs(#[from] gpu::SysfsError),
    #[error("no [[gpu]] is {name:?}: name one by its address or label ({known})")]
    NoSuchGpu { name: String, known: String },
}

/// Read everything a surface shows about the primary GPU. `probe` answers each VM's state
/// (libvirt in the CLI, the hook's state file in the block).
pub fn collect(cfg: &Config, probe: &mut dyn FnMut(&VmConfig) -> VmStatus) -> Result<Status, StatusError> {
    let vms: Vec<VmStatus> = cfg.vms.iter().map(probe).collect();
    collect_gpu(cfg, &cfg.gpu, vms)
}

/// `status --json`'s schema: 2 added `schema` and `gpus` (every GPU with its verdict); the
/// fields of 1 (`gpu`, `vms`, `verdict`, about the primary GPU or the one asked for) stay.
pub const SCHEMA: u32 = 2;

/// The status of each configured GPU (or only of `only`, an address or label), in file
/// order, the VMs probed once.
pub fn collect_each(
    cfg: &Config,
    only: Option<&str>,
    probe: &mut dyn FnMut(&VmConfig) -> VmStatus,
) -> Result<Vec<Status>, StatusError> {
    let chosen = chosen_gpus(cfg, only)?;
    let vms: Vec<VmStatus> = cfg.vms.iter().map(probe).collect();
    chosen
        .into_iter()
        .map(|g| collect_gpu(cfg, g, vms.clone()))
        .collect()
}

/// The configured GPUs a command is about: all of them, or the one `only` names.
pub fn chosen_gpus<'a>(
    cfg: &'a Config,
    only: Option<&str>,
) -> Result<Vec<&'a crate::config::GpuConfig>, StatusError> {
    match only {
        None => Ok(cfg.gpu.iter().collect()),
        Some(name) => cfg
            .gpu
            .find(name)
            .map(|g| vec![g])
            .ok_or_else(|| StatusError::NoSuchGpu {
                name: crate::escape::plain(name),
                known: cfg
                    .gpu
                    .iter()
                    .map(|g| match &g.label {
                        Some(l) => format!("{} or {l:?}", g.address),
                        None => g.address.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
    }
}

/// One GPU's status with the VMs already probed.
pub fn collect_gpu(
    cfg: &Config,
    gc: &crate::config::GpuConfig,
    vms: Vec<VmStatus>,
) -> Result<Status, StatusError> {
    let host = &cfg.host;
    let g = gpu::read_gpu(host, gc.address)?;
    let (blockers, uninspected, notes, vfio_users) = if g.owner == Owner::Absent {
        (Vec::new(), 0, Vec::new(), holders::vfio_users(host, &g))
    } else {
        let nodes = holders::gpu_nodes(host, &g);
        // One walk over /proc for the GPU's nodes and its VFIO group node.
        let (mut scan, vfio_users) = holders::scan_with_vfio(host, &g, &nodes);
        // Other users' holders, from the holder publisher when it runs.
        crate::publish::complete(host, g.address, &mut scan);
        // The engine's name for a container holder (its CLI, with a deadline; only when
        // there is one): never in the hook, which does not read the status.
        crate::containers::name_all(scan.holders.iter_mut().filter_map(|h| h.container.as_mut()));
        (scan.holders, scan.uninspected, scan.notes, vfio_users)
    };
    // The uncertainty first: it qualifies everything else shown.
    let notes: Vec<String> = g.lock_note().into_iter().chain(notes).collect();
    let label = gpu_label(gc, g.name.as_deref());
    let candidates = vms
        .iter()
        .filter(|v| v.could_take(gc.address))
        .map(|v| v.name.clone())
        .collect();
    // With several GPUs, "the one active VM" may hold another GPU: the restore record
    // names this GPU's VM. libvirt may not know it (the VM is gone, or another URI), but its
    // QEMU still runs.
    let vm = if cfg.gpu.len() > 1 {
        record_vm(host, &g, &vms).or_else(|| vfio_vm(&g, &vfio_users))
    } else {
        holding_vm(&g, &vms).or_else(|| vfio_vm(&g, &vfio_users))
    };
    Ok(Status {
        gpu: GpuStatus {
            address: g.address,
            name: g.name.clone(),
            owner: g.owner,
            driver: g.functions.first().and_then(|f| f.driver.clone()),
            functions: g.functions.clone(),
            vm,
            blockers,
            vfio_users,
            uninspected,
            iommu_group: g.iommu_group.clone(),
            notes,
            split: g.split_description(),
            locked: g.locked_functions(),
            rests_on_vfio: gc.host_driver == "vfio-pci",
            label,
            candidates,
        },
        vms,
    })
}

/// What surfaces call a GPU: its `[[gpu]] label`, else pci.ids' short name (`pci_name`).
pub fn gpu_label(gc: &crate::config::GpuConfig, pci_name: Option<&str>) -> Option<String> {
    gc.label
        .clone()
        .or_else(|| pci_name.map(|n| gpu::short_name(n).to_owned()))
}

/// The VM holding the GPU: the one active configured VM while the GPU is off the host.
/// With several active VMs sharing one GPU we cannot tell from here; say none rather than guess.
fn holding_vm(g: &Gpu, vms: &[VmStatus]) -> Option<String> {
    if !matches!(g.owner, Owner::Vfio | Owner::Mixed) {
        return None;
    }
    let mut active = vms.iter().filter(|v| v.state.is_active());
    match (active.next(), active.next()) {
        (Some(v), None) => Some(v.name.clone()),
        _ => None,
    }
}

/// The active VM the restore record gives the GPU to, while the GPU is off the host.
fn record_vm(host: &crate::host::Host, g: &Gpu, vms: &[VmStatus]) -> Option<String> {
    if !matches!(g.owner, Owner::Vfio | Owner::Mixed) {
        return None;
    }
    let r = crate::bind::record::RestoreRecord::load(host, g.address).ok()??;
    let vm = r.vm?;
    vms.iter()
        .any(|v| v.name == vm && v.state.is_active())
        .then_some(vm)
}

/// The VM whose QEMU holds the GPU's VFIO group while the GPU is off the host, when the
/// holders name exactly one.
fn vfio_vm(g: &Gpu, users: &[Holder]) -> Option<String> {
    if !matches!(g.owner, Owner::Vfio | Owner::Mixed) {
        return None;
    }
    let mut vms: Vec<&String> = users.iter().filter_map(|h| h.vm.as_ref()).collect();
    vms.dedup();
    match vms.as_slice() {
        [one] => Some((*one).clone()),
        _ => None,
    }
}

/// `handoff status --json`: the status with its verdict (`"verdict": {"state":
/// "restore_required", "headline": …, "next": …}`); the status's own fields keep their names.
#[derive(Debug, Clone, Serialize)]
pub struct Report<'a> {
    #[serde(flatten)]
    pub status: &'a Status,
    pub verdict: Verdict,
}

impl Status {
    /// The verdict of a one-shot reader (the CLI, the window): VMs as asked, no grace.
    pub fn verdict(&self, files: &HookFiles) -> Verdict {
        verdict::decide(&self.facts(files, None, None))
    }

    /// The inputs [`verdict::decide`] takes for this status; `doing` and `orphan_seen_for`
    /// come from a surface that acts and watches (the tray).
    pub fn facts<'a>(
        &'a self,
        files: &'a HookFiles,
        doing: Option<&'a str>,
        orphan_seen_for: Option<std::time::Duration>,
    ) -> Facts<'a> {
        Facts {
            gpu: Ok(GpuFacts::from(&self.gpu)),
            files,
            vms: Vms::Known(&self.vms),
            doing,
            orphan_seen_for,
        }
    }

    /// What `handoff status` prints: the verdict's line first when it says something the
    /// facts line does not (a person must act, wait, or fix libvirt), then the facts, then
    /// the next step for those states.
    pub fn report_text(&self, v: &Verdict) -> String {
        // Not in this machine, but the verdict knows where it is (a Proxmox VE node seen
        // from a desktop): say that, then the VMs.
        if self.gpu.owner == Owner::Absent && v.state != State::Absent {
            use std::fmt::Write;
            let mut s = format!("{}\n", v.line());
            s += "\nVMs:\n";
            for vm in &self.vms {
                let _ = writeln!(
                    s,
                    "  {:<16} {:<12} {}",
                    vm.name,
                    format!("({})", vm.label),
                    vm.words()
                );
                if let Some(e) = &vm.error {
                    let _ = writeln!(s, "      {e}");
                }
            }
            if let Some(c) = self.candidates_line() {
                let _ = writeln!(s, "{c}");
            }
            return s;
        }
        // An unseen idle GPU (the verdict's rule 10a) leads with why it is not "free".
        let said_by_facts =
            matches!(v.state, State::Idle | State::Busy | State::InVm | State::Absent) && !v.unseen;
        if said_by_facts {
            // In a VM, or free where it rests: the verdict's words ("RTX 5070 Ti: Windows 11
            // (VM 140)", "RTX 5070 Ti: free on vfio-pci") lead, as on every surface.
            let lead = v.state == State::InVm || (v.state == State::Idle && self.gpu.owner == Owner::Vfio);
            if lead {
                return format!("{}\n{}", v.line(), self.render_text());
            }
            return self.render_text();
        }
        format!(
            "{}
Next: {}
{}",
            v.line(),
            v.next,
            self.render_text()
        )
    }

    /// "Could take it: Linux AI (VM 141)", when a VM could. Nothing when none could: a VM
    /// whose definition names no device may still take the primary GPU through the hook, so
    /// "none" would not be sure.
    fn candidates_line(&self) -> Option<String> {
        if self.gpu.candidates.is_empty() {
            return None;
        }
        // With several GPUs the VMs are listed once, after the last: the others name them.
        let names: Vec<String> = self
            .gpu
            .candidates
            .iter()
            .map(|n| match self.vms.iter().find(|v| &v.name == n) {
                Some(v) => v.shown(),
                None => n.clone(),
            })
            .collect();
        Some(format!("Could take it: {}", names.join(", ")))
    }

    fn gpu_label(&self) -> String {
        match &self.gpu.name {
            Some(n) => format!("GPU {} ({})", self.gpu.address, gpu::short_name(n)),
            None => format!("GPU {}", self.gpu.address),
        }
    }

    fn vm_label(&self, name: &str) -> String {
        self.vms
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.label.clone())
            .unwrap_or_else(|| name.to_owned())
    }

    /// The first line a person reads: who owns the GPU and whether anything holds it.
    pub fn headline(&self) -> String {
        let g = &self.gpu;
        let who = match g.owner {
            Owner::Absent => {
                return format!(
                    "No GPU at {}: this machine has no PCI device there (set [gpu] address; `lspci -D` lists devices)",
                    g.address
                );
            }
            Owner::Host => format!("is on Linux ({})", g.driver.as_deref().unwrap_or("?")),
            Owner::Vfio => match &g.vm {
                Some(vm) => format!("is in the VM {} (vfio-pci)", self.vm_label(vm)),
                None if !g.vfio_users.is_empty() => format!(
                    "is on vfio-pci, no VM known to be running, but {} its VFIO group",
                    match g.vfio_users.len() {
                        1 => "1 process holds".to_owned(),
                        n => format!("{n} processes hold"),
                    }
                ),
                None => "is on vfio-pci, no VM running".to_owned(),
            },
            Owner::Unbound => "has no driver (unbound)".to_owned(),
            Owner::Mixed => format!("is split between drivers: {}", g.split.as_deref().unwrap_or("?")),
        };
        let users = match g.blockers.len() {
            // Only a scan that looked everywhere may say "nothing" (issue 17).
            0 if g.owner == Owner::Host && (g.uninspected > 0 || !g.notes.is_empty()) => {
                "; nothing seen using it, but not everything could be checked".to_owned()
            }
            0 if g.owner == Owner::Host => "; nothing uses it".to_owned(),
            0 => String::new(),
            1 => "; 1 process uses it".to_owned(),
            n => format!("; {n} processes use it"),
        };
        if !g.locked.is_empty() {
            let list: Vec<String> = g.locked.iter().map(ToString::to_string).collect();
            return format!(
                "{} state is uncertain: {} locked in the kernel (an unbind is probably stuck); it {who}{users}",
                self.gpu_label(),
                list.join(", ")
            );
        }
        format!("{} {who}{users}", self.gpu_label())
    }

    /// The whole human report: headline, then details.
    pub fn render_text(&self) -> String {
        use std::fmt::Write;
        let g = &self.gpu;
        let mut s = self.headline();
        s.push('\n');
        if g.owner == Owner::Absent {
            return s;
        }
        s += "\nFunctions:\n";
        for f in &g.functions {
            let _ = writeln!(
                s,
                "  {}  {:<6} {:<14} {:04x}:{:04x}  power {}{}",
                f.address,
                format!("{:?}", f.kind).to_lowercase(),
                f.driver.as_deref().unwrap_or("(no driver)"),
                f.vendor,
                f.device,
                f.runtime_status.as_deref().unwrap_or("?"),
                if f.locked {
                    "  LOCKED (override unreadable)".to_owned()
                } else {
                    f.driver_override
                        .as_deref()
                        .map(|o| format!("  override {o}"))
                        .unwrap_or_default()
                }
            );
        }
        if let Some(group) = &g.iommu_group {
            let members: Vec<String> = group
                .members
                .iter()
                .map(|m| {
                    let what = if m.gpu_function {
                        ""
                    } else if m.bridge {
                        " (bridge)"
                    } else {
                        " (not part of the GPU!)"
                    };
                    format!("{}{what}", m.address)
                })
                .collect();
            let _ = writeln!(s, "IOMMU group {}: {}", group.id, members.join(", "));
        }
        if self.vms.is_empty() {
            s += "\nVMs: none configured (add a [[vm]] with the libvirt domain's name to the config)\n";
        } else {
            s += "\nVMs:\n";
            for v in &self.vms {
                let _ = writeln!(
                    s,
                    "  {:<16} {:<12} {}",
                    v.name,
                    format!("({})", v.label),
                    v.words()
                );
                if let Some(e) = &v.error {
                    let _ = writeln!(s, "      {e}");
                }
            }
        }
        if let Some(c) = self.candidates_line() {
            let _ = writeln!(s, "{c}");
        }
        if !g.blockers.is_empty() {
            s += "\nUsing the GPU:\n";
            for h in &g.blockers {
                let _ = writeln!(s, "  {}", h.summary());
            }
        }
        if !g.vfio_users.is_empty() {
            s += "\nHolding its VFIO group (the GPU cannot return to the host until they exit):\n";
            for h in &g.vfio_users {
                let _ = writeln!(s, "  {}", h.summary());
            }
        }
        if g.uninspected > 0 {
            let _ = writeln!(s, "\n{}", uninspected_line(g.uninspected));
        }
        for n in &g.notes {
            let _ = writeln!(s, "Note: {n}");
        }
        s
    }
}

/// `handoff status --json` with every GPU: the fields of one [`Report`] (the primary GPU,
/// or the one asked for), `schema`, and `gpus`, each with its own verdict.
#[derive(Debug, Clone, Serialize)]
pub struct AllReport<'a> {
    pub schema: u32,
    #[serde(flatten)]
    pub first: Report<'a>,
    pub gpus: Vec<GpuReport<'a>>,
}

/// One GPU of [`AllReport`].
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport<'a> {
    /// The `[[gpu]] label`, when the config gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The GPU surfaces that show one GPU show.
    pub primary: bool,
    pub gpu: &'a GpuStatus,
    pub verdict: Verdict,
}

impl<'a> AllReport<'a> {
    /// `each` as [`collect_each`] returned it, each GPU's verdict from its own hook files.
    pub fn new(cfg: &Config, each: &'a [Status]) -> Option<Self> {
        let verdict = |s: &Status| s.verdict(&HookFiles::load(&cfg.host, s.gpu.address));
        let first = each
            .iter()
            .find(|s| s.gpu.address == cfg.gpu.address)
            .or_else(|| each.first())?;
        Some(AllReport {
            schema: SCHEMA,
            first: Report {
                status: first,
                verdict: verdict(first),
            },
            gpus: each
                .iter()
                .map(|s| GpuReport {
                    label: cfg.gpu.at(s.gpu.address).and_then(|g| g.label.clone()),
                    primary: s.gpu.address == cfg.gpu.address,
                    gpu: &s.gpu,
                    verdict: verdict(s),
                })
                .collect(),
        })
    }

    /// What `handoff status` prints: with one GPU exactly what it printed before there
    /// were several; with more, each GPU's report and the VMs once, at the end.
    pub fn report_text(&self, each: &[Status]) -> String {
        let mut out = String::new();
        for (i, (s, r)) in each.iter().zip(&self.gpus).enumerate() {
            if each.len() > 1 {
                if i > 0 {
                    out.push('\n');
                }
                let name = r.label.clone().or_else(|| s.gpu.name.clone()).unwrap_or_default();
                out += &format!("== GPU {} {} ==\n", s.gpu.address, crate::escape::plain(&name));
            }
            if i + 1 < each.len() {
                let without_vms = Status {
                    gpu: s.gpu.clone(),
                    vms: Vec::new(),
                };
                out += &without_vms.report_text(&r.verdict);
            } else {
                out += &s.report_text(&r.verdict);
            }
        }
        out
    }
}

/// "3 processes could not be inspected: run as root to see them" (see
/// [`crate::holders::uninspected_text`]).
pub fn uninspected_line(n: usize) -> String {
    let root = nix::unistd::geteuid().as_raw() == 0;
    crate::holders::uninspected_text(n, &[], root)
}
