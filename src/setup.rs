//! `handoff setup`: the first run writes the config (docs/setup.md, "handoff setup").
//!
//! Everything the system config says is already on the machine: the GPUs (sysfs, display
//! class 0x03), which one drives the host's display ([`crate::gpus::display_use`]), each
//! one's functions, IOMMU group and host driver, and the VMs that pass each through
//! (libvirt's `<hostdev>`, Proxmox VE's `hostpciN`). This module turns what was found
//! ([`Machine`]) and what the person asked ([`Options`]) into a [`Plan`] — a value: which
//! GPUs to hand and why, which VMs with which labels, what blocks passthrough, the file it
//! would write and how that differs from the file there — without any I/O of its own;
//! [`discover_gpus`], [`discover_vms`] and [`discover_pve_files`] read the machine, and
//! [`write_config`] writes the file. The binaries ask the person and install the hooks.
//!
//! # Re-runs and hand edits
//!
//! A file that exists is never rewritten: setup only *adds* to it, as text appended at its
//! end (a `[[gpu]]` it lacks, a `[[vm]]` it lacks, a `[proxmox]` or `[host]` section it
//! lacks; a single `[gpu]` table becomes `[[gpu]]` when a second GPU is added). Every key
//! already there, its comments and its order stay as they are, edited by hand or not; what
//! the machine no longer has (a GPU, a VM) is reported and left in the file for the person
//! to remove. So a second run on an unchanged machine leaves the file byte-identical, and
//! the diff shown before asking is exactly the lines added.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, GpuConfig, ProxmoxConfig, VmConfig};
use crate::doctor::{Check, Level};
use crate::gpu::{self, Owner};
use crate::host::Host;
use crate::hypervisor::{Hypervisor, VmRef};
use crate::pci::PciAddress;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{path}: {message}")]
    Existing { path: PathBuf, message: String },
    #[error(
        "{path}: {why}; setup writes the root-owned system config only through a real directory owned by root"
    )]
    Unsafe { path: PathBuf, why: String },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "setup built a config that does not read back ({0}); this is a bug in handoff, nothing was written"
    )]
    Invalid(String),
}

/// One member of a GPU's IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub address: PciAddress,
    pub class: String,
    pub driver: Option<String>,
    /// `gpu` (a function of the card), `bridge`, or `other` (would have to go to the VM too).
    pub role: &'static str,
}

/// A GPU found on the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FoundGpu {
    pub address: PciAddress,
    pub name: Option<String>,
    pub vendor: u16,
    /// The graphics function's driver now.
    pub driver: Option<String>,
    /// Every function of its slot.
    pub functions: Vec<PciAddress>,
    pub iommu_group: Option<u32>,
    pub group_members: Vec<Member>,
    /// How it drives the host's display, when it does.
    pub display: Option<String>,
}

impl FoundGpu {
    fn shared_with(&self) -> Vec<&Member> {
        self.group_members.iter().filter(|m| m.role == "other").collect()
    }

    fn title(&self) -> String {
        match &self.name {
            Some(n) => format!("{n} at {}", self.address),
            None => format!("GPU {}", self.address),
        }
    }
}

/// A VM found at a hypervisor, with what it passes through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FoundVm {
    /// The libvirt domain name, or PVE's VM name (the VMID when it has none).
    pub name: String,
    pub vmid: Option<u32>,
    /// The libvirt URI or the PVE API's URL.
    pub at: String,
    pub passthrough: Vec<PciAddress>,
    /// The label setup proposes (`Windows`, `macOS`, else the name).
    pub label: String,
}

impl FoundVm {
    fn title(&self) -> String {
        match self.vmid {
            Some(id) if self.name != id.to_string() => format!("VM {id} ({})", self.name),
            Some(id) => format!("VM {id}"),
            None => format!("libvirt domain {}", self.name),
        }
    }
}

/// What was found on the machine.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    /// Entries under `kernel/iommu_groups` (0: the IOMMU is off).
    pub iommu_groups: usize,
    pub kernel_flags: String,
    pub gpus: Vec<FoundGpu>,
    pub vms: Vec<FoundVm>,
    /// VMs on a Proxmox VE node found in its files while no `[proxmox]` endpoint is known:
    /// their hookscript guards them, but a `[[vm]]` with a `vmid` needs the API.
    pub pve_node_vms: Vec<FoundVm>,
    /// What could not be looked at (libvirt unreachable, …), said in the plan.
    pub notes: Vec<String>,
}

/// What the person asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Hand GPUs that drive the host's display too (all of them).
    pub allow_display: bool,
    /// Display GPUs the person agreed to hand (asked on a terminal).
    pub allowed: Vec<PciAddress>,
    /// Only these GPUs (`--gpu`); empty: every GPU that is not the display's.
    pub gpus: Vec<PciAddress>,
    /// The roots to write in `[host]` (the defaults are left out of the file's meaning).
    pub host: Host,
    /// `[proxmox]` to write, when the PVE API is where the VMs are.
    pub proxmox: Option<ProxmoxConfig>,
}

/// Which GPU setup hands, and why (or why not).
#[derive(Debug, Clone, Serialize)]
pub struct GpuChoice {
    pub gpu: FoundGpu,
    pub hand: bool,
    pub why: String,
    pub host_driver: String,
    pub host_driver_why: String,
    /// The VMs (names) that pass it through.
    pub vms: Vec<String>,
    /// For a GPU no VM passes through: what to add to a VM (libvirt `<hostdev>` XML and PVE's `qm set`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_add: Option<String>,
}

/// The plan: what was found, what setup would write and do.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub machine: Machine,
    pub gpus: Vec<GpuChoice>,
    /// What stops setup before anything is written, each with what to do.
    pub blockers: Vec<Check>,
    /// The config setup proposes (whole, as a fresh file would have it).
    #[serde(skip)]
    pub proposed: Option<Config>,
    /// The file setup would leave (the existing one with additions, or a new one).
    pub text: String,
    /// The file there now.
    pub existing: Option<String>,
    /// What changed on the machine since the file was written (re-runs).
    pub changes: Vec<String>,
    /// The lines setup would add (or remove: never, see the module docs), `+ `/`- `.
    pub diff: Vec<String>,
}

impl Plan {
    /// Whether the file would stay as it is.
    pub fn unchanged(&self) -> bool {
        self.existing.as_deref() == Some(self.text.as_str())
    }

    pub fn blocked(&self) -> bool {
        !self.blockers.is_empty()
    }

    /// The config the file holds after setup (what the hooks are installed for).
    pub fn config(&self) -> Result<Config, SetupError> {
        Config::parse(&self.text, Path::new("(setup)")).map_err(|e| SetupError::Invalid(e.to_string()))
    }

    /// What was found and chosen, in words: every GPU with its group, driver, VMs and the
    /// choice, then the blockers (as `doctor` prints them).
    pub fn render_found(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        if m.iommu_groups > 0 {
            let _ = writeln!(
                s,
                "IOMMU: on, {} groups (kernel flags: {})",
                m.iommu_groups, m.kernel_flags
            );
        }
        if self.gpus.is_empty() {
            s += "GPUs: none found (no display controller, PCI class 0x03, under /sys/bus/pci/devices)\n";
        }
        for c in &self.gpus {
            let g = &c.gpu;
            let _ = writeln!(s, "GPU {}", g.title());
            let _ = writeln!(
                s,
                "  functions   {}",
                g.functions
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let _ = writeln!(s, "  driver      {}", g.driver.as_deref().unwrap_or("(none)"));
            match g.iommu_group {
                Some(id) => {
                    let members: Vec<String> = g
                        .group_members
                        .iter()
                        .map(|m| {
                            let what = match m.role {
                                "gpu" => "function of the GPU",
                                "bridge" => "bridge",
                                _ => "not part of the GPU!",
                            };
                            format!(
                                "{} ({what}, {})",
                                m.address,
                                m.driver.as_deref().unwrap_or("no driver")
                            )
                        })
                        .collect();
                    let _ = writeln!(s, "  IOMMU group {id}: {}", members.join(", "));
                }
                None => s += "  IOMMU group none\n",
            }
            if let Some(d) = &g.display {
                let _ = writeln!(s, "  display     drives this host's display: {d}");
            }
            let vms = if c.vms.is_empty() {
                "none passes it through".to_owned()
            } else {
                c.vms.join(", ")
            };
            let _ = writeln!(s, "  VMs         {vms}");
            let _ = writeln!(
                s,
                "  → {}: {}",
                if c.hand { "hand it" } else { "not handed" },
                c.why
            );
            if c.hand {
                let _ = writeln!(s, "    host_driver = {:?}: {}", c.host_driver, c.host_driver_why);
            }
            if let Some(add) = &c.to_add {
                for l in add.lines() {
                    let _ = writeln!(s, "    {l}");
                }
            }
        }
        for v in m.vms.iter().chain(&m.pve_node_vms) {
            let label = if v.label != v.name {
                format!(", label {:?}", v.label)
            } else {
                String::new()
            };
            let devices = if v.passthrough.is_empty() {
                "passes no PCI device through".to_owned()
            } else {
                format!(
                    "passes through {}",
                    v.passthrough
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let _ = writeln!(s, "{} at {}: {devices}{label}", v.title(), v.at);
        }
        for n in &m.notes {
            let _ = writeln!(s, "note: {n}");
        }
        if !self.changes.is_empty() {
            s += "\nChanged on this machine since the config was written:\n";
            for c in &self.changes {
                let _ = writeln!(s, "  {c}");
            }
        }
        if !self.blockers.is_empty() {
            s += "\n";
            s += &crate::doctor::render_checks(&self.blockers);
            let _ = writeln!(
                s,
                "\nNothing was written: {} before a VM can take a GPU.",
                if self.blockers.len() == 1 {
                    "fix this".to_owned()
                } else {
                    format!("fix these {}", self.blockers.len())
                }
            );
        }
        s
    }
}

/// The GPUs on the machine: every display-class function (its slot's graphics function),
/// with its slot, group, driver and whether it drives the host's display.
pub fn discover_gpus(host: &Host) -> Vec<FoundGpu> {
    let mut addresses: Vec<PciAddress> = std::fs::read_dir(host.pci_devices())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|a| crate::gpus::class_of(host, *a).is_some_and(crate::gpus::is_display_class))
        .collect();
    addresses.sort();
    // One per slot: the first display function (a card's 3D controller beside its VGA one
    // is the same card).
    addresses.dedup_by(|b, a| a.same_slot(b));
    addresses
        .into_iter()
        .filter_map(|a| {
            let g = gpu::read_gpu(host, a).ok()?;
            if g.owner == Owner::Absent {
                return None;
            }
            let nodes = crate::holders::gpu_nodes(host, &g);
            let scan = crate::holders::scan(host, &g, &nodes);
            let display = crate::gpus::display_use(host, a, &scan.holders);
            let vga = g.graphics();
            Some(FoundGpu {
                address: a,
                name: g.name.clone(),
                vendor: vga.map_or(0, |f| f.vendor),
                driver: vga.and_then(|f| f.driver.clone()),
                functions: g.functions.iter().map(|f| f.address).collect(),
                iommu_group: g.iommu_group.as_ref().map(|gr| gr.id),
                group_members: g
                    .iommu_group
                    .iter()
                    .flat_map(|gr| &gr.members)
                    .map(|m| Member {
                        address: m.address,
                        class: format!("0x{:06x}", m.class),
                        driver: m.driver.clone(),
                        role: if m.gpu_function {
                            "gpu"
                        } else if m.bridge {
                            "bridge"
                        } else {
                            "other"
                        },
                    })
                    .collect(),
                display,
            })
        })
        .collect()
}

/// The IOMMU's groups and the kernel's IOMMU flags.
pub fn discover_iommu(host: &Host) -> (usize, String) {
    let n = std::fs::read_dir(host.sysfs.join("kernel/iommu_groups"))
        .map(|d| d.count())
        .unwrap_or(0);
    let cmdline = std::fs::read_to_string(host.procfs.join("cmdline")).unwrap_or_default();
    let flags: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|w| w.starts_with("intel_iommu=") || w.starts_with("amd_iommu=") || w.starts_with("iommu="))
        .collect();
    (
        n,
        if flags.is_empty() {
            "none".into()
        } else {
            flags.join(" ")
        },
    )
}

/// The label setup proposes for a VM: what its OS is, when its definition says (libvirt's
/// libosinfo id, PVE's `ostype`) or its name suggests it, else its name.
pub fn propose_label(name: &str, definition: &str) -> String {
    let lower = name.to_ascii_lowercase();
    let libosinfo = crate::gpus::libosinfo_id(definition);
    let ostype = definition
        .lines()
        .find_map(|l| l.strip_prefix("ostype:"))
        .map(|v| v.trim().to_owned());
    let windows = libosinfo
        .as_deref()
        .is_some_and(|id| id.starts_with("http://microsoft.com/win"))
        || ostype
            .as_deref()
            .is_some_and(|o| o.starts_with("win") || o == "wxp" || o == "w2k")
        || lower.starts_with("win");
    let macos = libosinfo.as_deref().is_some_and(crate::gpus::is_macos_id)
        || lower.contains("macos")
        || lower.contains("osx");
    if windows {
        "Windows".into()
    } else if macos {
        "macOS".into()
    } else {
        name.to_owned()
    }
}

/// Every VM at `at` with what it passes through, through the hypervisor interface (libvirt's
/// domains and their `<hostdev>`, or PVE's VMs and their `hostpciN` through `handoff-pve`).
/// A VM whose definition cannot be read is said in `notes` and passed over.
pub fn discover_vms(
    hv: &mut dyn Hypervisor,
    at: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<FoundVm>, String> {
    let list = hv.list(at).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (vm, _) in list {
        match hv.describe(&vm) {
            Ok(d) => out.push(found_vm(&vm, d.passthrough, &d.definition)),
            Err(e) => notes.push(format!("cannot read the definition of {vm} at {at}: {e}")),
        }
    }
    out.sort_by(|a, b| (a.vmid, &a.name).cmp(&(b.vmid, &b.name)));
    Ok(out)
}

fn found_vm(vm: &VmRef, passthrough: Vec<PciAddress>, definition: &str) -> FoundVm {
    let name = if vm.name.is_empty() {
        vm.id.map(|i| i.to_string()).unwrap_or_default()
    } else {
        vm.name.clone()
    };
    FoundVm {
        label: propose_label(&name, definition),
        name,
        vmid: vm.id,
        at: vm.at.clone(),
        passthrough,
    }
}

/// The VMs of a Proxmox VE node from its own files (`/etc/pve/qemu-server/*.conf`, the PCI
/// mappings for this node): the node's view, without the API.
pub fn discover_pve_files(pve: &crate::pve::PveHost) -> Vec<FoundVm> {
    let mappings = pve.mappings();
    pve.vmids()
        .into_iter()
        .filter_map(|id| {
            let conf = pve.conf(id).ok()?;
            let passthrough = crate::pve::passthrough(&conf, &mappings)
                .into_iter()
                .map(|s| s.address())
                .collect();
            let definition: String = conf.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
            let vm = VmRef {
                at: format!("{}", pve.root.join("etc/pve").display()),
                name: conf.get("name").cloned().unwrap_or_else(|| id.to_string()),
                id: Some(id),
            };
            Some(found_vm(&vm, passthrough, &definition))
        })
        .collect()
}

/// The host driver a GPU returns to, and why: the driver it has now (vfio-pci now: kept
/// isolated on vfio-pci between VMs); without one, its vendor's usual driver.
fn host_driver(g: &FoundGpu) -> (String, String) {
    match g.driver.as_deref() {
        Some(crate::gpu::VFIO_DRIVER) => (
            crate::gpu::VFIO_DRIVER.into(),
            "it is on vfio-pci now, so it stays isolated there between VMs (no rebinding)".into(),
        ),
        Some(d) => (
            d.to_owned(),
            format!("the driver it is bound to now; it goes back to {d} after a VM"),
        ),
        None => {
            let d = match g.vendor {
                0x10de => "nvidia",
                0x1002 => "amdgpu",
                0x8086 => "i915",
                _ => "vfio-pci",
            };
            (
                d.into(),
                format!(
                    "it has no driver now; {d} is its vendor's usual driver (change it if yours differs)"
                ),
            )
        }
    }
}

/// What to add to a VM so it passes `g` through (never done by setup): libvirt's
/// `<hostdev>` elements, one per function, and PVE's `qm set`.
pub fn passthrough_lines(g: &FoundGpu) -> String {
    let mut s = String::from(
        "to give it to a libvirt VM, add inside <devices> (virsh edit VM; setup never edits a VM):\n",
    );
    for f in &g.functions {
        let _ = writeln!(
            s,
            "  <hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x{:04x}' bus='0x{:02x}' slot='0x{:02x}' function='0x{:x}'/></source></hostdev>",
            f.domain, f.bus, f.device, f.function
        );
    }
    let slot = g.address.to_string();
    let slot = slot.rsplit_once('.').map_or(slot.as_str(), |(s, _)| s);
    let _ = write!(s, "on Proxmox VE: qm set VMID -hostpci0 {slot},pcie=1");
    s
}

/// Builds the plan from what was found, what was asked and the file there now (`existing`).
pub fn plan(machine: Machine, opts: &Options, existing: Option<&str>) -> Plan {
    let mut blockers = Vec::new();
    if machine.iommu_groups == 0 {
        blockers.push(
            Check {
                id: "iommu",
                level: Level::Fail,
                summary: format!(
                    "IOMMU is off: {} is empty (kernel flags: {})",
                    opts.host.sysfs.join("kernel/iommu_groups").display(),
                    machine.kernel_flags
                ),
                fix: None,
            }
            .with_fix(crate::doctor::IOMMU_FIX),
        );
    }
    let all_vms: Vec<&FoundVm> = machine.vms.iter().chain(&machine.pve_node_vms).collect();
    let mut choices = Vec::new();
    for g in &machine.gpus {
        let vms: Vec<String> = all_vms
            .iter()
            .filter(|v| v.passthrough.iter().any(|a| a.same_slot(&g.address)))
            .map(|v| v.title())
            .collect();
        let explicit = opts.gpus.iter().any(|a| a.same_slot(&g.address));
        let allowed = opts.allow_display || opts.allowed.iter().any(|a| a.same_slot(&g.address));
        let (host_driver, host_driver_why) = host_driver(g);
        let mut c = GpuChoice {
            gpu: g.clone(),
            hand: false,
            why: String::new(),
            host_driver,
            host_driver_why,
            vms: vms.clone(),
            to_add: None,
        };
        let wanted = if opts.gpus.is_empty() {
            g.display.is_none() || allowed
        } else {
            explicit
        };
        if !wanted {
            c.why = match &g.display {
                _ if !opts.gpus.is_empty() => "not among --gpu".into(),
                Some(d) => format!(
                    "it drives this host's display ({d}); handing it takes the console and local desktop away. \
                     `handoff setup --allow-display` (or yes when asked) hands it anyway"
                ),
                None => String::new(),
            };
            choices.push(c);
            continue;
        }
        let shared = g.shared_with();
        if !shared.is_empty() || g.iommu_group.is_none() {
            let summary = match g.iommu_group {
                Some(id) => format!(
                    "IOMMU group {id} of GPU {} also holds {}: they would have to go to the VM too",
                    g.address,
                    shared
                        .iter()
                        .map(|m| format!("{} ({})", m.address, m.driver.as_deref().unwrap_or("no driver")))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => format!("GPU {} is in no IOMMU group", g.address),
            };
            blockers.push(
                Check {
                    id: "iommu-group",
                    level: Level::Fail,
                    summary,
                    fix: None,
                }
                .with_fix(crate::doctor::IOMMU_GROUP_FIX),
            );
            c.why = "its IOMMU group is shared (see below)".into();
            choices.push(c);
            continue;
        }
        if vms.is_empty() {
            c.to_add = Some(passthrough_lines(g));
            c.why = "no VM passes it through yet".into();
            if explicit {
                blockers.push(
                    Check {
                        id: "no-vm",
                        level: Level::Fail,
                        summary: format!("No VM passes GPU {} through", g.address),
                        fix: None,
                    }
                    .with_fix(passthrough_lines(g)),
                );
            }
            choices.push(c);
            continue;
        }
        c.hand = true;
        let pass = if vms.len() == 1 { "passes" } else { "pass" };
        c.why = match &g.display {
            Some(_) => format!(
                "{} {pass} it through; allowed although it drives the display",
                vms.join(", ")
            ),
            None => format!("{} {pass} it through", vms.join(", ")),
        };
        choices.push(c);
    }
    if blockers.is_empty() && !choices.iter().any(|c| c.hand) {
        let mut fix = String::new();
        for c in choices.iter().filter(|c| c.to_add.is_some()) {
            let _ = writeln!(
                fix,
                "GPU {}: {}",
                c.gpu.address,
                c.to_add.as_deref().unwrap_or_default()
            );
        }
        for n in &machine.notes {
            let _ = writeln!(fix, "{n}");
        }
        if fix.is_empty() {
            fix = if machine.gpus.is_empty() {
                "this machine shows no GPU in sysfs; check `lspci -Dnn | grep -Ei 'vga|3d'`".into()
            } else {
                "every GPU here drives the display: `handoff setup --allow-display` to hand one anyway".into()
            };
        }
        blockers.push(
            Check {
                id: "no-vm",
                level: Level::Fail,
                summary: "No VM passes a GPU this host can hand through yet".into(),
                fix: None,
            }
            .with_fix(fix.trim_end()),
        );
    }

    let mut out = Plan {
        machine,
        gpus: choices,
        blockers,
        proposed: None,
        text: existing.unwrap_or_default().to_owned(),
        existing: existing.map(str::to_owned),
        changes: Vec::new(),
        diff: Vec::new(),
    };
    if out.blocked() {
        return out;
    }
    let proposed = proposal(&out, opts);
    let comments = Comments::of(&out, &proposed);
    match existing {
        None => {
            out.text = render(&proposed, &comments);
        }
        Some(text) => match merge(text, &proposed, &comments, &out.machine) {
            Ok((merged, changes)) => {
                out.text = merged;
                out.changes = changes;
            }
            Err(message) => {
                out.blockers.push(
                    Check {
                        id: "config",
                        level: Level::Fail,
                        summary: format!("The config there now does not read: {message}"),
                        fix: None,
                    }
                    .with_fix("fix it (`handoff config check FILE` names the line), or move it away to start afresh"),
                );
                return out;
            }
        },
    }
    out.diff = diff(existing.unwrap_or_default(), &out.text);
    out.proposed = Some(proposed);
    out
}

/// The config a fresh file would hold.
fn proposal(p: &Plan, opts: &Options) -> Config {
    let mut handed: Vec<&GpuChoice> = p.gpus.iter().filter(|c| c.hand).collect();
    // The card that does not drive the display first: the first [[gpu]] is primary.
    handed.sort_by_key(|c| (c.gpu.display.is_some(), c.gpu.address));
    let list: Vec<GpuConfig> = handed
        .iter()
        .map(|c| GpuConfig {
            address: c.gpu.address,
            host_driver: c.host_driver.clone(),
            allow_display: c.gpu.display.is_some(),
            ..GpuConfig::default()
        })
        .collect();
    let mut cfg = Config {
        host: opts.host.clone(),
        proxmox: opts.proxmox.clone(),
        ..Config::default()
    };
    if !list.is_empty() {
        cfg.gpu = crate::config::Gpus::new(list);
    }
    let api = opts.proxmox.as_ref().map(|p| p.url.clone());
    let mut labels = std::collections::HashSet::new();
    for v in &p.machine.vms {
        if !v.passthrough.iter().any(|a| cfg.gpu.at(*a).is_some()) {
            continue;
        }
        if v.vmid.is_some() && api.is_none() {
            continue;
        }
        // Two VMs would be called the same: the second keeps its name.
        let label = if labels.insert(v.label.clone()) {
            v.label.clone()
        } else {
            v.name.clone()
        };
        cfg.vms.push(VmConfig {
            name: v.name.clone(),
            vmid: v.vmid,
            label: Some(label),
            uri: v.at.clone(),
            ..VmConfig::named(&v.name, &v.label)
        });
    }
    cfg
}

/// The comment above each `[[gpu]]` and `[[vm]]` a file gets, and at its top.
struct Comments {
    top: String,
    gpu: Vec<(PciAddress, String)>,
    vm: Vec<(String, String)>,
}

impl Comments {
    fn of(p: &Plan, cfg: &Config) -> Comments {
        let mut top = String::from(
            "# Written by `handoff setup` from what it found on this machine; a comment above each choice\n\
             # says why. Edit freely: `handoff setup` run again only adds what is new and keeps your edits.\n",
        );
        for c in p.gpus.iter().filter(|c| !c.hand) {
            let _ = writeln!(top, "# Not handed: {}: {}.", c.gpu.title(), c.why);
        }
        for v in &p.machine.pve_node_vms {
            let _ = writeln!(
                top,
                "# {} on this Proxmox VE node is guarded by the hookscript; add [proxmox] (docs/proxmox.md) to start and stop it from handoff.",
                v.title()
            );
        }
        let gpu = p
            .gpus
            .iter()
            .filter(|c| c.hand)
            .map(|c| {
                let g = &c.gpu;
                let mut s = format!("# {}: handed to {}.\n", g.title(), c.vms.join(", "));
                let _ = writeln!(s, "# host_driver {:?}: {}.", c.host_driver, c.host_driver_why);
                let members = g.group_members.len();
                let _ = writeln!(
                    s,
                    "# IOMMU group {}: only its {} function(s) and bridges ({members} device(s)).",
                    g.iommu_group.map_or("?".into(), |i| i.to_string()),
                    g.functions.len()
                );
                if let Some(d) = &g.display {
                    let _ = writeln!(
                        s,
                        "# allow_display: it drives this host's display ({d}); you chose to hand it anyway."
                    );
                }
                (g.address, s)
            })
            .collect();
        let vm = cfg
            .vms
            .iter()
            .filter_map(|v| {
                let f = p
                    .machine
                    .vms
                    .iter()
                    .find(|f| f.name == v.name && f.vmid == v.vmid)?;
                let gpus: Vec<String> = f
                    .passthrough
                    .iter()
                    .filter(|a| cfg.gpu.at(**a).is_some())
                    .map(|a| a.to_string())
                    .collect();
                let label = if v.label() == v.name {
                    "label: its name".to_owned()
                } else {
                    format!("label {:?}: from its OS", v.label())
                };
                Some((
                    v.name.clone(),
                    format!("# {} passes through {}; {label}.\n", f.title(), gpus.join(", ")),
                ))
            })
            .collect();
        Comments { top, gpu, vm }
    }
}

/// `cfg` as `config show` prints it, with the comments above each choice.
fn render(cfg: &Config, comments: &Comments) -> String {
    let body = toml::to_string_pretty(cfg).expect("a config renders");
    format!("{}\n{}", comments.top, annotate(&body, cfg, comments))
}

/// Puts each comment above its `[[gpu]]` / `[[vm]]` header in `body` (rendered from `cfg`'s
/// lists, in order).
fn annotate(body: &str, cfg: &Config, comments: &Comments) -> String {
    annotate_lists(
        body,
        &cfg.gpu.iter().map(|g| g.address).collect::<Vec<_>>(),
        &cfg.vms.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
        comments,
    )
}

fn annotate_lists(body: &str, gpus: &[PciAddress], vms: &[String], comments: &Comments) -> String {
    let (mut gi, mut vi) = (0, 0);
    let mut out = String::new();
    for line in body.lines() {
        match line.trim() {
            "[[gpu]]" => {
                if let Some((_, c)) = gpus
                    .get(gi)
                    .and_then(|a| comments.gpu.iter().find(|(g, _)| g == a))
                {
                    out += c;
                }
                gi += 1;
            }
            "[[vm]]" => {
                if let Some((_, c)) = vms.get(vi).and_then(|n| comments.vm.iter().find(|(v, _)| v == n)) {
                    out += c;
                }
                vi += 1;
            }
            _ => {}
        }
        out += line;
        out += "\n";
    }
    out
}

/// What setup adds to an existing file: only what it lacks (module docs).
#[derive(Serialize)]
struct Additions<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a Host>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxmox: Option<&'a ProxmoxConfig>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    gpu: Vec<&'a GpuConfig>,
    #[serde(rename = "vm", skip_serializing_if = "Vec::is_empty")]
    vms: Vec<&'a VmConfig>,
}

/// The existing file with what it lacks appended, and what changed on the machine since.
fn merge(
    text: &str,
    proposed: &Config,
    comments: &Comments,
    machine: &Machine,
) -> Result<(String, Vec<String>), String> {
    let there = Config::parse(text, Path::new("config")).map_err(|e| e.to_string())?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let has_gpu = table.contains_key("gpu");
    let single_gpu = table.get("gpu").is_some_and(|v| v.is_table());
    let mut changes = Vec::new();

    // A file without any `gpu` key reads as the built-in default GPU: that is not a choice.
    let new_gpus: Vec<&GpuConfig> = proposed
        .gpu
        .iter()
        .filter(|g| !has_gpu || there.gpu.at(g.address).is_none())
        .collect();
    for g in &new_gpus {
        changes.push(format!("new: GPU {} (added as a [[gpu]])", g.address));
    }
    if has_gpu {
        for g in there.gpu.iter() {
            if !machine.gpus.iter().any(|f| f.address.same_slot(&g.address)) {
                changes.push(format!(
                    "GPU {} of your config is not on this machine any more; left in the file (remove its [[gpu]] by hand)",
                    g.address
                ));
            }
        }
    }
    let same_vm = |a: &VmConfig, b: &VmConfig| match (a.vmid, b.vmid) {
        (Some(x), Some(y)) => x == y,
        (None, None) => a.name == b.name,
        _ => false,
    };
    let new_vms: Vec<&VmConfig> = proposed
        .vms
        .iter()
        .filter(|v| !there.vms.iter().any(|t| same_vm(t, v)))
        .collect();
    for v in &new_vms {
        changes.push(format!("new: VM {} (added as a [[vm]])", v.name));
    }
    for t in &there.vms {
        match proposed.vms.iter().find(|v| same_vm(t, v)) {
            Some(v) if v.label() != t.label() => changes.push(format!(
                "kept your label {:?} for VM {} (setup would propose {:?})",
                t.label(),
                t.name,
                v.label()
            )),
            Some(_) => {}
            None => {
                let listed = machine
                    .vms
                    .iter()
                    .any(|f| f.at == t.uri || (t.vmid.is_some() && f.vmid.is_some()));
                let found = machine.vms.iter().find(|f| match t.vmid {
                    Some(id) => f.vmid == Some(id),
                    None => f.name == t.name && f.at == t.uri,
                });
                match found {
                    Some(_) => changes.push(format!(
                        "VM {} no longer passes a configured GPU through; left in the file",
                        t.name
                    )),
                    None if listed => changes.push(format!(
                        "VM {} of your config is not defined at {} any more; left in the file (remove its [[vm]] by hand)",
                        t.name, t.uri
                    )),
                    None => {}
                }
            }
        }
    }
    let add_host = !table.contains_key("host") && proposed.host != Host::default();
    let add_proxmox = !table.contains_key("proxmox") && proposed.proxmox.is_some();
    if add_proxmox {
        changes.push("new: the [proxmox] endpoint".into());
    }
    if new_gpus.is_empty() && new_vms.is_empty() && !add_host && !add_proxmox {
        return Ok((text.to_owned(), changes));
    }
    let adds = Additions {
        host: add_host.then_some(&proposed.host),
        proxmox: if add_proxmox {
            proposed.proxmox.as_ref()
        } else {
            None
        },
        gpu: new_gpus.clone(),
        vms: new_vms.clone(),
    };
    let body = toml::to_string_pretty(&adds).map_err(|e| e.to_string())?;
    let body = annotate_lists(
        &body,
        &new_gpus.iter().map(|g| g.address).collect::<Vec<_>>(),
        &new_vms.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
        comments,
    );
    let mut merged = String::new();
    let mut converted = false;
    for line in text.lines() {
        if single_gpu && !new_gpus.is_empty() && !converted && line.trim_start().starts_with("[gpu]") {
            merged += &line.replacen("[gpu]", "[[gpu]]", 1);
            converted = true;
        } else {
            merged += line;
        }
        merged += "\n";
    }
    merged += "\n# Added by `handoff setup`:\n";
    merged += &body;
    Config::parse(&merged, Path::new("(setup)")).map_err(|e| format!("adding to it failed: {e}"))?;
    Ok((merged, changes))
}

/// The lines that differ, `- ` removed and `+ ` added, in file order (a longest common
/// subsequence; the files are small).
pub fn diff(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut l = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            l[i][j] = if a[i] == b[j] {
                l[i + 1][j + 1] + 1
            } else {
                l[i + 1][j].max(l[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || l[i][j + 1] >= l[i + 1][j]) {
            out.push(format!("+ {}", b[j]));
            j += 1;
        } else {
            out.push(format!("- {}", a[i]));
            i += 1;
        }
    }
    out
}

/// Reads the system config there now as text (None: nothing there). A symbolic link is
/// refused: setup writes through this path as root.
pub fn read_existing(path: &Path) -> Result<Option<String>, SetupError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SetupError::Write {
            path: path.to_owned(),
            source,
        }),
        Ok(m) if m.file_type().is_symlink() => Err(SetupError::Unsafe {
            path: path.to_owned(),
            why: "it is a symbolic link".into(),
        }),
        Ok(_) => crate::bounded::read_to_string(path, crate::bounded::Links::Refuse)
            .map(Some)
            .map_err(|e| SetupError::Existing {
                path: path.to_owned(),
                message: e.to_string(),
            }),
    }
}

/// Writes the system config: its directory created (0755) when missing and checked (a real
/// directory, owned by root, writable by nobody else), the text written to a new file
/// (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0644) beside it and renamed over the old one, so a
/// reader sees the old file or the new one, never half of one.
pub fn write_config(path: &Path, text: &str) -> Result<(), SetupError> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let err = |source| SetupError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(err)?;
    let why = if !meta.file_type().is_dir() {
        Some("its directory is not a directory (a symbolic link?)".to_owned())
    } else if meta.uid() != 0 {
        Some(format!("its directory is owned by uid {}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "its directory's mode {:o} lets others write in it",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    if let Some(why) = why {
        return Err(SetupError::Unsafe {
            path: path.to_owned(),
            why,
        });
    }
    let tmp = dir.join(format!(
        ".{}.setup-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("config.toml"),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(err)?;
    let done = f
        .write_all(text.as_bytes())
        .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(0o644)))
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(a: &str, display: bool) -> FoundGpu {
        let address: PciAddress = a.parse().unwrap();
        FoundGpu {
            address,
            name: Some("Card".into()),
            vendor: 0x10de,
            driver: Some("nvidia".into()),
            functions: vec![address, address.with_function(1)],
            iommu_group: Some(13),
            group_members: vec![Member {
                address,
                class: "0x030000".into(),
                driver: Some("nvidia".into()),
                role: "gpu",
            }],
            display: display.then(|| "boot_vga".into()),
        }
    }

    fn vm(name: &str, a: &str) -> FoundVm {
        FoundVm {
            name: name.into(),
            vmid: None,
            at: "qemu:///system".into(),
            passthrough: vec![a.parse().unwrap()],
            label: propose_label(name, ""),
        }
    }

    fn machine() -> Machine {
        Machine {
            iommu_groups: 20,
            kernel_flags: "intel_iommu=on".into(),
            gpus: vec![gpu("0000:00:02.0", true), gpu("0000:01:00.0", false)],
            vms: vec![vm("win11", "0000:01:00.0")],
            ..Machine::default()
        }
    }

    #[test]
    fn the_display_gpu_is_left_out_and_the_file_reads_back_as_proposed() {
        let p = plan(machine(), &Options::default(), None);
        assert!(!p.blocked(), "{}", p.render_found());
        let cfg = p.config().unwrap();
        assert_eq!(cfg.gpu.len(), 1);
        assert_eq!(cfg.gpu.address.to_string(), "0000:01:00.0");
        assert_eq!(cfg.vms[0].label(), "Windows");
        assert_eq!(&cfg, p.proposed.as_ref().unwrap());
        assert!(
            p.text.contains("# Not handed: Card at 0000:00:02.0"),
            "{}",
            p.text
        );
        // The file is `config show`'s text with comments.
        let shown = toml::to_string_pretty(&cfg).unwrap();
        let uncommented: String = p
            .text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(uncommented.trim(), shown.trim());
    }

    #[test]
    fn a_rerun_keeps_the_file_and_adds_only_what_is_new() {
        let first = plan(machine(), &Options::default(), None);
        let again = plan(machine(), &Options::default(), Some(&first.text));
        assert!(again.unchanged() && again.diff.is_empty(), "{:?}", again.diff);

        let edited = first.text.replace("label = \"Windows\"", "label = \"Gaming\"") + "\n[block]\n";
        let edited = edited.replace("[block]\nmiddle_click = []\n", "");
        let mut m = machine();
        m.vms.push(vm("linux-ai", "0000:01:00.0"));
        let p = plan(m, &Options::default(), Some(&edited));
        assert!(p.text.starts_with(&edited), "{}", p.text);
        assert!(p.diff.iter().all(|l| l.starts_with("+ ")), "{:?}", p.diff);
        assert!(
            p.diff.iter().any(|l| l == "+ name = \"linux-ai\""),
            "{:?}",
            p.diff
        );
        assert!(
            p.changes.iter().any(|c| c.contains("kept your label \"Gaming\"")),
            "{:?}",
            p.changes
        );
        assert_eq!(p.config().unwrap().vms[0].label(), "Gaming");
    }

    #[test]
    fn a_shared_group_or_no_iommu_blocks_with_what_to_do() {
        let mut m = machine();
        m.gpus[1].group_members.push(Member {
            address: "0000:02:00.0".parse().unwrap(),
            class: "0x010601".into(),
            driver: Some("ahci".into()),
            role: "other",
        });
        m.iommu_groups = 0;
        let p = plan(m, &Options::default(), None);
        let ids: Vec<&str> = p.blockers.iter().map(|b| b.id).collect();
        assert_eq!(ids, ["iommu", "iommu-group"]);
        assert!(
            p.blockers[1].summary.contains("0000:02:00.0 (ahci)"),
            "{:?}",
            p.blockers
        );
        assert!(p.render_found().contains("Nothing was written"));
    }

    #[test]
    fn a_gpu_no_vm_passes_through_gets_the_lines_to_add() {
        let mut m = machine();
        m.vms.clear();
        let p = plan(m, &Options::default(), None);
        assert_eq!(p.blockers.len(), 1);
        let fix = p.blockers[0].fix.as_deref().unwrap();
        assert!(fix.contains("bus='0x01' slot='0x00' function='0x1'"), "{fix}");
        assert!(fix.contains("qm set VMID -hostpci0 0000:01:00,pcie=1"), "{fix}");
    }

    #[test]
    fn the_diff_marks_added_and_removed_lines() {
        assert_eq!(diff("a\nb\nc\n", "a\nc\nd\n"), ["- b", "+ d"]);
    }
}
