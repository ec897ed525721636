//! Proxmox VE's own files, read on the PVE host without its API, and the hookscript PVE
//! runs there as root: `handoff pve-hook <vmid> <phase>` (docs/proxmox.md).
//!
//! Nothing here speaks HTTP: the REST client lives in the `handoff-proxmox` crate, so the
//! hookscript (and everything else in this library) links no TLS stack. The hookscript
//! must not call the API anyway: it runs inside PVE's start task, which holds the VM's
//! config lock.
//!
//! What PVE does around the hookscript, from its sources (qemu-server
//! `PVE::QemuServer::vm_start_nolock`, pve-guest-common `PVE::GuestHelpers::exec_hookscript`):
//! `pre-start` runs before the PCI devices are reserved and prepared, with
//! `stop_on_error`, so a non-zero exit aborts the start and the output lands in the task
//! log (`hookscript error for 141 on pre-start: command '…' failed: exit code 1`);
//! `post-start`, `pre-stop` and `post-stop` only warn. `post-stop` runs from
//! `vm_stop_cleanup`, after `cleanup_pci_devices` has dropped the VM's reservations.
//!
//! Which GPU a VM takes is read from its config, never configured twice: every
//! `hostpciN` of the main section (`0000:01:00` is every function of the slot,
//! `0000:01:00.0` one, several joined by `;`), and PVE 8's `mapping=NAME` resolved through
//! `/etc/pve/mapping/pci.cfg` for this node.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{Config, GpuConfig, VmConfig};
use crate::gpu::{self, Owner};
use crate::pci::PciAddress;

/// A `hostpci` device: one function, or every function of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciSel {
    Function(PciAddress),
    Slot(PciAddress),
}

impl PciSel {
    /// `0000:01:00.0`, `01:00.0`, `0000:01:00` or `01:00`.
    pub fn parse(s: &str) -> Option<PciSel> {
        let s = s.trim().to_ascii_lowercase();
        if s.contains('.') {
            return s.parse().ok().map(PciSel::Function);
        }
        format!("{s}.0").parse().ok().map(PciSel::Slot)
    }

    /// Whether this device is (or includes) a function of `gpu`'s slot.
    pub fn touches(&self, gpu: &PciAddress) -> bool {
        match self {
            PciSel::Function(a) | PciSel::Slot(a) => a.same_slot(gpu),
        }
    }

    /// The function it names, or the slot's function 0.
    pub fn address(&self) -> PciAddress {
        match self {
            PciSel::Function(a) | PciSel::Slot(a) => *a,
        }
    }
}

/// One `hostpciN` value: its host devices, or the name of a resource mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPci {
    pub devices: Vec<PciSel>,
    pub mapping: Option<String>,
}

/// Parses a `hostpciN` value (`0000:01:00,pcie=1,x-vga=1`, `host=01:00.0;01:00.1`,
/// `mapping=rtx5070,pcie=1`). None when it names neither host devices nor a mapping.
pub fn parse_hostpci(value: &str) -> Option<HostPci> {
    let mut devices = Vec::new();
    let mut mapping = None;
    for (i, part) in value.split(',').enumerate() {
        let (key, val) = match part.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            // The default key (`host`) may be given without its name, first.
            None if i == 0 => ("host", part.trim()),
            None => continue,
        };
        match key {
            "host" => devices.extend(val.split(';').filter_map(PciSel::parse)),
            "mapping" => mapping = Some(val.to_owned()),
            _ => {}
        }
    }
    (!devices.is_empty() || mapping.is_some()).then_some(HostPci { devices, mapping })
}

/// The Looking Glass device of a PVE VM: PVE has no IVSHMEM option of its own, so it is
/// raw QEMU arguments in the config's `args` (the Looking Glass docs' way:
/// `-device ivshmem-plain,memdev=ivshmem,bus=pcie.0 -object
/// memory-backend-file,id=ivshmem,share=on,mem-path=/dev/shm/looking-glass,size=32M`).
/// Its name is the file's (`looking-glass`), which is on the node. None without an
/// `ivshmem` device.
pub fn looking_glass(conf: &BTreeMap<String, String>) -> Option<crate::hypervisor::Shmem> {
    let args = conf.get("args")?;
    let words: Vec<&str> = args.split_whitespace().collect();
    let value_of = |flag: &str, kind: &str| {
        words
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1])
            .find(|v| v.split(',').next().is_some_and(|k| k.starts_with(kind)))
    };
    let device = value_of("-device", "ivshmem")?;
    let model = device.split(',').next().map(str::to_owned);
    let backend = value_of("-object", "memory-backend-file");
    let opt = |key: &str| {
        backend?
            .split(',')
            .find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    let name = opt("mem-path")
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned())
        .unwrap_or_else(|| "ivshmem".to_owned());
    let size_bytes = opt("size").and_then(qemu_size);
    Some(crate::hypervisor::Shmem {
        name,
        model,
        size_bytes,
    })
}

/// QEMU's sizes: `32M`, `64M`, `1G`, bytes without a suffix.
fn qemu_size(s: &str) -> Option<u64> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// The main section of a `qemu-server/<vmid>.conf`: `key: value` lines up to the first
/// `[snapshot]` or `[PENDING]` section (those are not what runs).
pub fn parse_conf(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.starts_with('[') {
            break;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            out.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    out
}

/// `/etc/pve/mapping/pci.cfg`: each mapping's host paths on `node` (a section per
/// mapping id, `map node=…,path=…,id=…` lines; a path may list several devices by `;`).
pub fn parse_pci_mapping(text: &str, node: &str) -> BTreeMap<String, Vec<PciSel>> {
    let mut out: BTreeMap<String, Vec<PciSel>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.starts_with([' ', '\t']) {
            let id = line.trim().to_owned();
            out.entry(id.clone()).or_default();
            current = Some(id);
            continue;
        }
        let Some(id) = &current else { continue };
        let Some(rest) = line.trim().strip_prefix("map ") else {
            continue;
        };
        let props: BTreeMap<&str, &str> = rest
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        if props.get("node") != Some(&node) {
            continue;
        }
        if let Some(path) = props.get("path") {
            out.entry(id.clone())
                .or_default()
                .extend(path.split(';').filter_map(PciSel::parse));
        }
    }
    out
}

/// Every host PCI device a VM config passes through, with mappings resolved by `mappings`.
pub fn passthrough(conf: &BTreeMap<String, String>, mappings: &BTreeMap<String, Vec<PciSel>>) -> Vec<PciSel> {
    let mut out = Vec::new();
    for (key, value) in conf {
        let Some(n) = key.strip_prefix("hostpci") else {
            continue;
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Some(h) = parse_hostpci(value) else { continue };
        out.extend(h.devices);
        if let Some(m) = h.mapping {
            out.extend(mappings.get(&m).into_iter().flatten().copied());
        }
    }
    out
}

/// Where PVE keeps its files on the host; tests point `root` at a temp tree.
#[derive(Debug, Clone)]
pub struct PveHost {
    /// `/` on a PVE host.
    pub root: PathBuf,
    /// This node's name (`hostname`), for resource mappings.
    pub node: String,
}

impl PveHost {
    pub fn system() -> Self {
        Self {
            root: PathBuf::from("/"),
            // PVE's node name is the short host name (PVE::INotify::nodename).
            node: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().split('.').next().unwrap_or_default().to_owned())
                .unwrap_or_default(),
        }
    }

    fn etc_pve(&self) -> PathBuf {
        self.root.join("etc/pve")
    }

    /// `/etc/pve/qemu-server`: this node's VM configs (a link into `nodes/<node>/`).
    pub fn qemu_server(&self) -> PathBuf {
        self.etc_pve().join("qemu-server")
    }

    pub fn conf_path(&self, vmid: u32) -> PathBuf {
        self.qemu_server().join(format!("{vmid}.conf"))
    }

    /// A VM's config, main section.
    pub fn conf(&self, vmid: u32) -> std::io::Result<BTreeMap<String, String>> {
        let text = crate::bounded::read_to_string(&self.conf_path(vmid), crate::bounded::Links::Follow)?;
        Ok(parse_conf(&text))
    }

    /// This node's PCI resource mappings (none when the file does not exist).
    pub fn mappings(&self) -> BTreeMap<String, Vec<PciSel>> {
        let path = self.etc_pve().join("mapping/pci.cfg");
        crate::bounded::read_to_string(&path, crate::bounded::Links::Follow)
            .map(|t| parse_pci_mapping(&t, &self.node))
            .unwrap_or_default()
    }

    /// The VMs with a config on this node.
    pub fn vmids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = std::fs::read_dir(self.qemu_server())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".conf")?.parse().ok())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Whether `vmid`'s QEMU runs here: `/var/run/qemu-server/<vmid>.pid` names a live
    /// process (qemu-server's own `check_running` reads the same file).
    pub fn running(&self, vmid: u32, procfs: &Path) -> Option<u32> {
        let path = self.root.join(format!("var/run/qemu-server/{vmid}.pid"));
        let text = crate::bounded::read_to_string(&path, crate::bounded::Links::Follow).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        procfs.join(pid.to_string()).exists().then_some(pid)
    }
}

/// The hookscript's phases (`<script> <vmid> <phase>`).
pub const PHASES: [&str; 4] = ["pre-start", "post-start", "pre-stop", "post-stop"];

/// The label of a VM for messages: the config's, else `VM <vmid>`.
fn label(cfg: &Config, vmid: u32, conf: Option<&BTreeMap<String, String>>) -> String {
    let name = conf.and_then(|c| c.get("name")).cloned();
    match cfg.vms.iter().find(|v| v.vmid == Some(vmid)) {
        Some(v) if v.label.is_some() => format!("{} (VM {vmid})", v.label()),
        _ => match name {
            Some(n) => format!("{n} (VM {vmid})"),
            None => format!("VM {vmid}"),
        },
    }
}

/// What PVE runs: `handoff pve-hook <vmid> <phase>`. `pre-start` refuses (exit 1, the
/// reason on `err`, which PVE puts in the task log) when another running VM passes one of
/// the same GPUs through, or — a GPU on a host driver — when anything holds it; otherwise it
/// hands the GPUs to vfio-pci with the libvirt hook's engine. `post-stop` returns them.
/// A GPU already on vfio-pci is left there; with `host_driver = "vfio-pci"` it is never
/// returned either (the card lives on vfio-pci between VMs). One on a host driver (CUDA on
/// the host or in a container) goes through the holder check first, as with libvirt.
///
/// Which GPUs: every configured `[[gpu]]` a `hostpciN` of the VM names (any function of its
/// slot), all of them or none, as [`crate::hook::prepare`] hands a libvirt domain's; a
/// `[[vm]]` that passes none through takes the primary GPU, as with libvirt. Devices no
/// `[[gpu]]` names are PVE's own business and left alone.
pub fn run_hookscript(cfg: &Config, pve: &PveHost, vmid: u32, phase: &str, err: &mut dyn Write) -> i32 {
    if !PHASES.contains(&phase) {
        let _ = writeln!(
            err,
            "handoff pve-hook: unknown phase {phase:?}; PVE calls it with one of {}",
            PHASES.join(", ")
        );
        return 0;
    }
    if phase != "pre-start" && phase != "post-stop" {
        return 0;
    }
    let mappings = pve.mappings();
    let conf = match pve.conf(vmid) {
        Ok(c) => c,
        Err(e) if phase == "pre-start" => {
            let msg = format!(
                "not starting VM {vmid}: cannot read {}: {e}, so handoff cannot tell whether it passes GPU {} through",
                pve.conf_path(vmid).display(),
                cfg.gpu.address
            );
            let _ = writeln!(err, "handoff: {msg}");
            log_refusal(cfg, cfg.gpu.address, &vm_name(cfg, vmid), &msg, err);
            return 1;
        }
        Err(_) => return 0,
    };
    let configured = cfg.vms.iter().any(|v| v.vmid == Some(vmid));
    let takes = |conf: &BTreeMap<String, String>| -> Vec<&GpuConfig> {
        let devices: Vec<PciAddress> = passthrough(conf, &mappings).iter().map(PciSel::address).collect();
        crate::gpus::taken_by(cfg, &devices)
    };
    let mut gpus = takes(&conf);
    if gpus.is_empty() && !configured {
        return 0;
    }
    let me = label(cfg, vmid, Some(&conf));
    if gpus.is_empty() {
        if phase == "pre-start" {
            let _ = writeln!(
                err,
                "handoff: warning: {me} is a [[vm]] in the config but passes no function of {} through (no hostpciN with it)",
                cfg.gpu.address
            );
        }
        gpus.push(&cfg.gpu);
    }
    if phase == "pre-start" {
        // Another running VM with one of the same GPUs: PVE would refuse too, later and with
        // "PCI device '…' already in use by VMID '…'"; this says what to do.
        for other in pve.vmids().into_iter().filter(|&o| o != vmid) {
            let Ok(oconf) = pve.conf(other) else { continue };
            let theirs = takes(&oconf);
            let Some(shared) = gpus
                .iter()
                .find(|g| theirs.iter().any(|t| t.address == g.address))
            else {
                continue;
            };
            let gpu = shared.address;
            if pve.running(other, &cfg.host.procfs).is_some() {
                let msg = if conf.get("lock").map(String::as_str) == Some("backup") {
                    // vzdump starts a stopped VM's QEMU (paused) with its hostpci devices
                    // to read its disks; nothing a hookscript does changes that command line.
                    format!(
                        "not starting {me} for its backup: PVE starts a stopped VM with its PCI devices \
                         to back it up, and GPU {gpu} is passed through to {}, which is running. Back {me} up \
                         while that VM is off, or exclude it from this job (docs/proxmox.md, \"Backups\")",
                        label(cfg, other, Some(&oconf))
                    )
                } else {
                    format!(
                        "not starting {me}: GPU {gpu} is passed through to {}, which is running. \
                         `handoff switch {vmid}` shuts it down gracefully and then starts {me}",
                        label(cfg, other, Some(&oconf))
                    )
                };
                let _ = writeln!(err, "handoff: {msg}");
                log_refusal(cfg, gpu, &vm_name(cfg, vmid), &msg, err);
                return 1;
            }
        }
    }
    if phase == "pre-start" {
        for w in kind_warnings(cfg, &me, &conf, &mappings, &gpus) {
            let _ = writeln!(err, "handoff: warning: {w}");
        }
    }
    let owner = |a: PciAddress| gpu::read_gpu(&cfg.host, a).map(|g| g.owner);
    // The GPUs that stay on vfio-pci between VMs (`host_driver = "vfio-pci"`): nothing is
    // rebound for them, but their state file says which VM has them, as the libvirt hook's
    // does, so that the block on the node (which asks no API) can tell "free on vfio-pci"
    // from "in Linux AI (VM 141)".
    let resting: Vec<PciAddress>;
    if phase == "pre-start" {
        // A restore record names a VM that has stopped but whose post-stop has not run
        // yet (after a shutdown from inside the guest, qmeventd runs it once QEMU is gone):
        // return the GPU for that VM now, so that this VM takes it with a record of its own
        // instead of the late post-stop finding this VM's QEMU on the card.
        for g in gpus.iter().filter(|g| g.host_driver != "vfio-pci") {
            if !matches!(owner(g.address), Ok(Owner::Vfio)) {
                continue;
            }
            if let Ok(Some(r)) = crate::bind::record::RestoreRecord::load(&cfg.host, g.address)
                && let Some(prev) = r.vm.clone()
                && let Some(prev_id) = cfg
                    .vms
                    .iter()
                    .find(|v| v.name == prev)
                    .and_then(|v| v.vmid)
                    .or_else(|| prev.parse().ok())
                && prev_id != vmid
                && pve.running(prev_id, &cfg.host.procfs).is_none()
            {
                let mut prev_cfg = cfg.clone();
                if !prev_cfg.vms.iter().any(|v| v.name == prev) {
                    let mut v = VmConfig::named(&prev, &prev);
                    v.vmid = Some(prev_id);
                    prev_cfg.vms.push(v);
                }
                crate::hook::release(&prev_cfg, &prev, &[g.address], err);
            }
        }
        // Already on vfio-pci (the seed's set-up keeps the card there between VMs, and
        // another VM using it was refused above): nothing to rebind for those.
        resting = gpus
            .iter()
            .filter(|g| matches!(owner(g.address), Ok(Owner::Vfio)))
            .map(|g| g.address)
            .collect();
        gpus.retain(|g| !resting.contains(&g.address));
    } else {
        // "The GPU stays on vfio-pci between VMs" is the normal state, not a failure; a GPU
        // already home has nothing to return (the engine acts on restore records only).
        resting = gpus
            .iter()
            .filter(|g| g.host_driver == "vfio-pci")
            .map(|g| g.address)
            .collect();
        gpus.retain(|g| g.host_driver != "vfio-pci" && !matches!(owner(g.address), Ok(Owner::Host)));
    }
    let name = vm_name(cfg, vmid);
    let addresses: Vec<PciAddress> = gpus.iter().map(|g| g.address).collect();
    let mut cfg = cfg.clone();
    if !configured {
        // Guarded anyway, as the libvirt hook guards a domain whose XML passes the GPU.
        let pve_name = conf.get("name").cloned().unwrap_or_else(|| name.clone());
        let mut vm = VmConfig::named(&name, &pve_name);
        vm.vmid = Some(vmid);
        cfg.vms.push(vm);
    }
    if phase == "post-stop" {
        // The engine returns each only when its restore record names this VM.
        if !addresses.is_empty() {
            crate::hook::release(&cfg, &name, &addresses, err);
        }
        note_resting(&cfg, &resting, &name, false, err);
        return 0;
    }
    let code = if addresses.is_empty() {
        0
    } else {
        crate::hook::prepare(&cfg, &name, &addresses, err)
    };
    // All or none: the resting GPUs are this VM's only when the others were handed.
    if code == 0 {
        note_resting(&cfg, &resting, &name, true, err);
    }
    code
}

/// The name a VM's refusals and records go by: its `[[vm]]`'s, else its VMID.
fn vm_name(cfg: &Config, vmid: u32) -> String {
    match cfg.vms.iter().find(|v| v.vmid == Some(vmid)) {
        Some(v) => v.name.clone(),
        None => vmid.to_string(),
    }
}

/// A refusal the hookscript decided itself (another running VM has the GPU, a backup, an
/// unreadable config), appended to `refusals.json` under the GPU's lock, as the libvirt
/// hook logs its own ([`crate::refusals`]), and kept as the state file's last refusal, so
/// that a tray or block on the node tells it once. The refusals of [`crate::hook::prepare`]
/// (holders, nothing checkable) are logged there. A file that cannot be written costs the
/// notification only: the refusal stands.
fn log_refusal(cfg: &Config, gpu: PciAddress, vm: &str, message: &str, err: &mut dyn Write) {
    let host = &cfg.host;
    let gc = cfg.gpu.at(gpu).unwrap_or(&cfg.gpu);
    let wait = crate::bind::lock::wait_for(std::time::Duration::from_secs(gc.watchdog_s));
    let _lock = match crate::bind::lock::GpuLock::acquire(host, gpu, wait) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(
                err,
                "handoff: warning: the refusal was not logged for the desktop: {e}"
            );
            return;
        }
    };
    if let Err(e) = crate::refusals::RefusalLog::record(host, gpu, vm, &[], message) {
        let _ = writeln!(
            err,
            "handoff: warning: cannot write {}: {e}",
            crate::refusals::path(host).display()
        );
    }
    let primary = gpu == cfg.gpu.address;
    let mut state =
        crate::state::HookState::load_gpu(host, gpu).unwrap_or_else(|| crate::state::HookState::new(gpu));
    state.last_refusal = Some(crate::state::Refusal {
        vm: vm.to_owned(),
        at: crate::bind::record::now(),
        holders: Vec::new(),
        message: message.to_owned(),
    });
    let _ = state.save_gpu(host, primary);
}

/// The state file of each GPU that rests on vfio-pci (nothing is rebound for it): `vfio`
/// with `vm` when it starts, `host` (home, which for this card is vfio-pci) when `vm`
/// stops — only when the file still names `vm`: a late post-stop of another VM, or of a
/// start that was refused, leaves the VM that has the card on it. Under the GPU's lock, as
/// the hook writes it; a file that cannot be written is said and changes nothing else (the
/// guard's decisions come from PVE's pid files, not from this file).
fn note_resting(cfg: &Config, gpus: &[PciAddress], vm: &str, starting: bool, err: &mut dyn Write) {
    use crate::state::{HookPhase, HookState};
    let host = &cfg.host;
    for &a in gpus {
        let gc = cfg.gpu.at(a).unwrap_or(&cfg.gpu);
        let wait = crate::bind::lock::wait_for(std::time::Duration::from_secs(gc.watchdog_s));
        let _lock = match crate::bind::lock::GpuLock::acquire(host, a, wait) {
            Ok(l) => l,
            Err(e) => {
                let _ = writeln!(err, "handoff: warning: the state of GPU {a} was not updated: {e}");
                continue;
            }
        };
        let mut state = HookState::load_gpu(host, a).unwrap_or_else(|| HookState::new(a));
        if starting {
            state.phase = HookPhase::Vfio;
            state.vm = Some(vm.to_owned());
            state.last_error = None;
        } else if state.vm.as_deref() == Some(vm) {
            state.phase = HookPhase::Host;
            state.vm = None;
            // The first start from a host driver left a record of this VM (the card was
            // bound then); on vfio-pci it is home now, so the record would only say
            // "restore required" to the surfaces.
            if let Ok(Some(r)) = crate::bind::record::RestoreRecord::load(host, a)
                && r.vm.as_deref() == Some(vm)
                && r.phase == crate::bind::record::Phase::Bound
                && matches!(gpu::read_gpu(host, a).map(|g| g.owner), Ok(Owner::Vfio))
                && let Err(e) = crate::bind::record::RestoreRecord::remove(host, a)
            {
                let _ = writeln!(err, "handoff: warning: {e}");
            }
        } else {
            continue;
        }
        if let Err(e) = state.save_gpu(host, a == cfg.gpu.address) {
            let _ = writeln!(
                err,
                "handoff: warning: cannot write {}: {e}",
                HookState::path_for(host, a, a == cfg.gpu.address).display()
            );
        }
    }
}

/// What the VM will lack with the GPUs it takes, said in `pre-start` as warnings (the start
/// itself is safe, so never a refusal; PVE puts them in the start task's log): a macOS guest
/// ([`crate::gpus::pve_is_macos`]) given an NVIDIA card newer than Kepler, and what its
/// config lacks for an Intel iGPU ([`crate::gpus::pve_igpu_missing`]).
fn kind_warnings(
    cfg: &Config,
    me: &str,
    conf: &BTreeMap<String, String>,
    mappings: &BTreeMap<String, Vec<PciSel>>,
    gpus: &[&GpuConfig],
) -> Vec<String> {
    let mut out = Vec::new();
    let macos = crate::gpus::pve_is_macos(conf);
    for g in gpus {
        if macos && let Some(w) = crate::hook::macos_nvidia_warning(&cfg.host, me, g.address) {
            out.push(w);
        }
        if gpu::read_gpu(&cfg.host, g.address).is_ok_and(|gpu| crate::gpus::is_intel_igpu(&gpu)) {
            let missing = crate::gpus::pve_igpu_missing(conf, mappings, g.address);
            if !missing.is_empty() {
                out.push(format!(
                    "{me} takes the Intel iGPU {}, but {}",
                    g.address,
                    missing.join("; ")
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looking_glass_from_the_vms_args() {
        let conf = parse_conf(
            "args: -device ivshmem-plain,memdev=ivshmem,bus=pcie.0 -object memory-backend-file,id=ivshmem,share=on,mem-path=/dev/shm/looking-glass,size=32M\n",
        );
        let lg = looking_glass(&conf).unwrap();
        assert_eq!(lg.name, "looking-glass");
        assert_eq!(lg.model.as_deref(), Some("ivshmem-plain"));
        assert_eq!(lg.size_bytes, Some(32 << 20));
        assert_eq!(looking_glass(&parse_conf("args: -cpu host,kvm=off\n")), None);
        assert_eq!(looking_glass(&parse_conf("cores: 8\n")), None);
    }

    #[test]
    fn hostpci_forms() {
        let a = |s: &str| s.parse::<PciAddress>().unwrap();
        assert_eq!(
            parse_hostpci("0000:01:00,pcie=1,x-vga=1").unwrap().devices,
            vec![PciSel::Slot(a("0000:01:00.0"))]
        );
        assert_eq!(
            parse_hostpci("host=01:00.0;01:00.1,pcie=1").unwrap().devices,
            vec![
                PciSel::Function(a("0000:01:00.0")),
                PciSel::Function(a("0000:01:00.1"))
            ]
        );
        let m = parse_hostpci("mapping=rtx5070,pcie=1").unwrap();
        assert_eq!(m.mapping.as_deref(), Some("rtx5070"));
        assert!(parse_hostpci("pcie=1").is_none());
    }

    #[test]
    fn conf_main_section_only_and_mappings_for_this_node() {
        let conf = parse_conf("name: win11\nhostpci0: mapping=rtx,pcie=1\n\n[snap1]\nhostpci1: 0000:02:00\n");
        let maps = parse_pci_mapping(
            "rtx\n\tmap id=10de:2c05,node=pve1,path=0000:01:00\n\tmap id=10de:2c05,node=pve2,path=0000:03:00\n",
            "pve1",
        );
        let devs = passthrough(&conf, &maps);
        assert_eq!(devs, vec![PciSel::Slot("0000:01:00.0".parse().unwrap())]);
    }
}
