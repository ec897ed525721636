//! `handoff doctor`: is this host ready for passthrough, and what to fix.
//!
//! Each check is a function returning a [`Check`]; [`run`] collects them in the order a
//! person would fix things (firmware and kernel first, then the GPU, then libvirt). Later
//! subsystems (Looking Glass, sleep inhibition) add their checks to [`run`].
//!
//! Besides the config's `[host]` roots it reads libvirt's hooks directory (is the hook
//! installed, and does it run a handoff that exists) and the restore record under
//! `[host] run` (is a restore pending).

use std::path::Path;

use serde::Serialize;

use crate::bind::record::{Phase, RestoreRecord};
use crate::config::{Config, Source, VmConfig};
use crate::gpu::{self, Gpu, Owner};
use crate::holders;
use crate::hook_install::{self, InstalledShim};
use crate::status::{VmState, VmStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier for scripts, e.g. "iommu".
    pub id: &'static str,
    pub level: Level,
    /// One line saying what was found.
    pub summary: String,
    /// What to do about it, when anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(id: &'static str, level: Level, summary: impl Into<String>) -> Self {
        Self {
            id,
            level,
            summary: summary.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    /// This check with what to do about it (`handoff setup`'s blockers).
    pub fn with_fix(self, fix: impl Into<String>) -> Self {
        self.fix(fix)
    }
}

/// What to do when the IOMMU is off (doctor and `handoff setup` say the same).
pub const IOMMU_FIX: &str = "enable VT-d (Intel) or AMD-Vi/IOMMU in the firmware setup, then add intel_iommu=on iommu=pt \
                 (Intel; AMD enables it by default) to GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub, \
                 run update-grub and reboot";

/// What to do when a GPU's IOMMU group holds other devices.
pub const IOMMU_GROUP_FIX: &str = "move the GPU to another slot (often the first x16 slot has its own group), or check for a firmware update; the ACS override patch is a risk to weigh yourself";

/// One line per check (`[ok  ]`, `[warn]`, `[FAIL]` …) with its fix indented below;
/// shared by `doctor` and `lg-test`.
pub fn render_checks(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let mark = match c.level {
            Level::Ok => "ok  ",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        s += &format!("[{mark}] {}\n", c.summary);
        for line in c.fix.iter().flat_map(|f| f.lines()) {
            s += &format!("       → {line}\n");
        }
    }
    s
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn problems(&self) -> usize {
        self.checks.iter().filter(|c| c.level == Level::Fail).count()
    }

    /// 0 when nothing failed, 1 when something must be fixed.
    pub fn exit_code(&self) -> i32 {
        if self.problems() == 0 { 0 } else { 1 }
    }

    pub fn render_text(&self) -> String {
        let mut s = render_checks(&self.checks);
        let n = self.problems();
        s += &match n {
            0 => "\nThis host looks ready for passthrough.\n".to_owned(),
            1 => "\n1 problem to fix before a VM can take the GPU.\n".to_owned(),
            n => format!("\n{n} problems to fix before a VM can take the GPU.\n"),
        };
        s
    }
}

/// Facts about the person running doctor, injected so tests need not be that person.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    pub groups: Vec<String>,
}

impl Caller {
    pub fn current() -> Self {
        let uid = nix::unistd::getuid().as_raw();
        Self {
            uid,
            groups: current_group_names(),
        }
    }
}

fn current_group_names() -> Vec<String> {
    use nix::unistd::{Group, getegid, getgroups};
    let mut gids = match getgroups() {
        Ok(gids) if !gids.is_empty() => gids,
        _ => return Vec::new(),
    };
    gids.push(getegid());
    gids.into_iter()
        .filter_map(|g| Group::from_gid(g).ok().flatten())
        .map(|g| g.name)
        .collect()
}

/// Every check, in fixing order. `hooks_dir` is libvirt's hooks directory
/// ([`hook_install::DEFAULT_HOOKS_DIR`]); `extra` holds checks computed by the binary (libvirt).
pub fn run(cfg: &Config, source: &Source, caller: &Caller, hooks_dir: &Path, extra: Vec<Check>) -> Report {
    let mut checks = vec![Check::new("config", Level::Info, format!("Config: {source}"))];
    checks.push(check_iommu(cfg));
    let g = gpu::read_gpu(&cfg.host, cfg.gpu.address);
    match &g {
        Ok(g) => {
            checks.push(check_gpu_found(cfg, g));
            if let Some(note) = g.lock_note() {
                checks.push(
                    Check::new("gpu-locked", Level::Fail, format!("GPU {}: {note}", g.address)).fix(
                        "`handoff blockers` names what holds the GPU; once it lets go the unbind finishes \
                         (check `dmesg` for NVRM \"usage count\" messages), then `handoff rebind --force`",
                    ),
                );
            }
            if g.owner != Owner::Absent {
                checks.push(check_iommu_group(g));
                checks.push(check_vfio_available(cfg));
                checks.push(check_holders(cfg, g));
            }
            checks.extend(check_restore(cfg));
        }
        Err(e) => checks.push(Check::new(
            "gpu",
            Level::Fail,
            format!("Cannot read the GPU: {e}"),
        )),
    }
    checks.extend(several_gpus_checks(cfg));
    // Every VM on Proxmox VE: the guard is PVE's hookscript on the node (`install-hooks
    // --pve`), and libvirt is not involved.
    let pve_only = !cfg.vms.is_empty() && cfg.vms.iter().all(|v| v.vmid.is_some());
    if pve_only {
        checks.push(Check::new(
            "hook",
            Level::Info,
            "Every VM is on Proxmox VE: its hookscript guards the GPU (`sudo handoff install-hooks --pve` on the node)",
        ));
    } else {
        checks.push(check_libvirt_group(caller));
        checks.push(check_hook(hooks_dir));
    }
    checks.extend(extra);
    Report { checks }
}

fn check_iommu(cfg: &Config) -> Check {
    let groups = cfg.host.sysfs.join("kernel/iommu_groups");
    let n = std::fs::read_dir(&groups).map(|d| d.count()).unwrap_or(0);
    let cmdline = std::fs::read_to_string(cfg.host.procfs.join("cmdline")).unwrap_or_default();
    let flags: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|w| w.starts_with("intel_iommu=") || w.starts_with("amd_iommu=") || w.starts_with("iommu="))
        .collect();
    let flags = if flags.is_empty() {
        "none".to_owned()
    } else {
        flags.join(" ")
    };
    if n > 0 {
        Check::new(
            "iommu",
            Level::Ok,
            format!("IOMMU is on: {n} groups (kernel flags: {flags})"),
        )
    } else {
        Check::new(
            "iommu",
            Level::Fail,
            format!(
                "IOMMU is off: {} is empty (kernel flags: {flags})",
                groups.display()
            ),
        )
        .fix(IOMMU_FIX)
    }
}

fn check_gpu_found(cfg: &Config, g: &Gpu) -> Check {
    let a = cfg.gpu.address;
    if g.owner == Owner::Absent {
        return Check::new("gpu", Level::Fail, format!("No GPU at {a}: this machine has no PCI device at that address"))
            .fix("`lspci -Dnn | grep -Ei 'vga|3d'` lists the GPUs; put the passthrough GPU's address in [gpu] address");
    }
    let vga = g.functions.first();
    if vga.is_none_or(|f| f.kind != gpu::FunctionKind::Vga) {
        return Check::new(
            "gpu",
            Level::Fail,
            format!("The device at {a} is not a display controller"),
        )
        .fix("[gpu] address must be the GPU's graphics function (usually .0)");
    }
    let name = g.name.clone().unwrap_or_else(|| "unknown model".into());
    let others: Vec<String> = g
        .functions
        .iter()
        .skip(1)
        .map(|f| f.address.to_string())
        .collect();
    let with = if others.is_empty() {
        String::new()
    } else {
        format!(", with {}", others.join(", "))
    };
    Check::new(
        "gpu",
        Level::Ok,
        format!("GPU {a} ({name}) found{with}; {}", g.owner_phrase()),
    )
}

fn check_iommu_group(g: &Gpu) -> Check {
    let Some(group) = &g.iommu_group else {
        return Check::new(
            "iommu-group",
            Level::Fail,
            format!("GPU {} is in no IOMMU group", g.address),
        )
        .fix("the IOMMU is off or does not cover this slot; see the IOMMU check above");
    };
    let foreign = group.foreign_members();
    if foreign.is_empty() {
        Check::new(
            "iommu-group",
            Level::Ok,
            format!(
                "IOMMU group {} holds only the GPU's functions and bridges ({} devices)",
                group.id,
                group.members.len()
            ),
        )
    } else {
        let list: Vec<String> = foreign
            .iter()
            .map(|m| format!("{} ({})", m.address, m.driver.as_deref().unwrap_or("no driver")))
            .collect();
        Check::new(
            "iommu-group",
            Level::Fail,
            format!(
                "IOMMU group {} also holds {}: they would have to go to the VM too",
                group.id,
                list.join(", ")
            ),
        )
        .fix(IOMMU_GROUP_FIX)
    }
}

fn check_vfio_available(cfg: &Config) -> Check {
    if cfg.host.pci_drivers().join("vfio-pci").is_dir() {
        return Check::new("vfio-pci", Level::Ok, "vfio-pci is loaded");
    }
    let release = std::fs::read_to_string(cfg.host.procfs.join("sys/kernel/osrelease")).unwrap_or_default();
    let release = release.trim();
    let modules = Path::new("/lib/modules").join(release);
    let listed = |f: &str| std::fs::read_to_string(modules.join(f)).is_ok_and(|t| t.contains("vfio-pci.ko"));
    if listed("modules.dep") || listed("modules.builtin") {
        Check::new(
            "vfio-pci",
            Level::Ok,
            "vfio-pci is available (handoff loads it on the first handoff)",
        )
    } else {
        Check::new(
            "vfio-pci",
            Level::Fail,
            format!("vfio-pci is neither loaded nor in /lib/modules/{release}"),
        )
        .fix("install the kernel's extra modules (e.g. linux-modules-extra-$(uname -r) on Ubuntu)")
    }
}

fn check_holders(cfg: &Config, g: &Gpu) -> Check {
    let nodes = holders::gpu_nodes(&cfg.host, g);
    let scan = holders::scan(&cfg.host, g, &nodes);
    let mut check = if scan.holders.is_empty() {
        Check::new(
            "holders",
            Level::Ok,
            format!("Nothing holds the GPU's {} device nodes", nodes.len()),
        )
    } else {
        let lines: Vec<String> = scan.holders.iter().map(|h| h.summary()).collect();
        Check::new(
            "holders",
            Level::Warn,
            format!(
                "{} the GPU; a VM start would be refused now:\n  {}",
                if scan.holders.len() == 1 {
                    "1 process uses".to_owned()
                } else {
                    format!("{} processes use", scan.holders.len())
                },
                lines.join("\n  ")
            ),
        )
        .fix("stop them (`handoff blockers` lists them with their systemd units) before starting the VM")
    };
    if scan.uninspected > 0 {
        check.summary += &format!("\n  {}", crate::status::uninspected_line(scan.uninspected));
    }
    check
}

fn check_libvirt_group(caller: &Caller) -> Check {
    if caller.uid == 0 {
        Check::new(
            "libvirt-group",
            Level::Ok,
            "Running as root: libvirt and the GPU's sysfs are reachable",
        )
    } else if caller.groups.iter().any(|g| g == "libvirt") {
        Check::new("libvirt-group", Level::Ok, "You are in group libvirt")
    } else {
        Check::new(
            "libvirt-group",
            Level::Fail,
            "You are not in group libvirt: qemu:///system will ask for a password or refuse",
        )
        .fix("sudo usermod -aG libvirt $USER, then log out and in again")
    }
}

/// Is handoff's shim in `hooks_dir`, executable, and running a handoff that exists?
pub fn check_hook(hooks_dir: &Path) -> Check {
    const INSTALL: &str = "sudo handoff install-hooks";
    let shim = hook_install::shim_path(hooks_dir);
    let shim = shim.display();
    let found = match hook_install::installed_shim(hooks_dir) {
        Ok(found) => found,
        Err(e) => {
            return Check::new(
                "hook",
                Level::Warn,
                format!("Cannot tell whether the libvirt hook is installed: {e}"),
            );
        }
    };
    match found {
        InstalledShim::Missing => Check::new(
            "hook",
            Level::Fail,
            format!(
                "The libvirt hook is not installed ({shim} is missing): starting a VM neither checks \
                 for holders nor moves the GPU"
            ),
        )
        .fix(INSTALL),
        InstalledShim::Foreign => Check::new(
            "hook",
            Level::Fail,
            format!("{shim} was not written by `handoff install-hooks`"),
        )
        .fix(format!("move it away, then run `{INSTALL}`")),
        InstalledShim::Ours { mode, .. } if mode & 0o111 == 0 => Check::new(
            "hook",
            Level::Fail,
            format!("{shim} is not executable (mode {mode:o}): libvirt skips it"),
        )
        .fix(format!("`{INSTALL}` puts its mode back")),
        InstalledShim::Ours { exe: None, .. } => Check::new(
            "hook",
            Level::Fail,
            format!("{shim} was edited: it no longer runs `handoff hook`"),
        )
        .fix(format!("`{INSTALL}` rewrites it")),
        InstalledShim::Ours { exe: Some(exe), .. } if !is_executable(&exe) => Check::new(
            "hook",
            Level::Fail,
            format!(
                "{shim} runs {}, which is missing or not executable: every VM start fails",
                exe.display()
            ),
        )
        .fix(format!("run `{INSTALL}` with the handoff you have now")),
        InstalledShim::Ours { exe: Some(exe), .. } => Check::new(
            "hook",
            Level::Ok,
            format!("The libvirt hook is installed: {shim} runs {}", exe.display()),
        ),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A restore record under `[host] run` means a handoff is in place or did not finish.
pub fn check_restore(cfg: &Config) -> Option<Check> {
    let a = cfg.gpu.address;
    const REBIND: &str = "run `handoff rebind --force` (as root: sudo, or pkexec from the tray)";
    match RestoreRecord::load(&cfg.host, a) {
        Ok(None) => None,
        Ok(Some(r)) if r.phase == Phase::Bound => Some(
            Check::new(
                "restore",
                Level::Info,
                format!(
                    "GPU {a} is handed to {}; it returns to the host when that VM stops",
                    r.vm.as_deref().unwrap_or("a VM")
                ),
            )
            .fix(format!("if that VM is not running, {REBIND}")),
        ),
        Ok(Some(r)) => {
            let why = r.problem.unwrap_or_else(|| {
                format!(
                    "a handoff stopped half-way (phase {})",
                    serde_json::to_value(r.phase)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                )
            });
            Some(
                Check::new(
                    "restore",
                    Level::Fail,
                    format!("Restore required for GPU {a}: {why}"),
                )
                .fix(REBIND),
            )
        }
        Err(e) => Some(Check::new("restore", Level::Fail, e.to_string())),
    }
}

/// Doctor's libvirt checks: each configured VM's URI answers and defines the domain. `probe`
/// says what the hypervisor knows of a VM ([`crate::hypervisor::vm_status`] in the CLI).
pub fn libvirt_checks(cfg: &Config, probe: &mut dyn FnMut(&VmConfig) -> VmStatus) -> Vec<Check> {
    cfg.vms
        .iter()
        .map(|vm| {
            let st = probe(vm);
            match st.state {
                VmState::Unknown | VmState::Undefined => Check {
                    id: "libvirt",
                    level: Level::Fail,
                    summary: format!("VM {} at {}: {}", vm.name, vm.uri, st.words()),
                    fix: st.error,
                },
                s => Check {
                    id: "libvirt",
                    level: Level::Ok,
                    summary: format!(
                        "VM {} ({}) at {} is defined, {}",
                        vm.name,
                        vm.label(),
                        vm.uri,
                        s.words()
                    ),
                    fix: None,
                },
            }
        })
        .collect()
}

/// The checks of the GPUs besides the primary one (found, IOMMU group, holders, a restore
/// pending), and for every GPU what kind-specific checks say: whether it drives this host's
/// display (and what the host loses when it is handed), and for an Intel iGPU its host
/// driver.
pub fn several_gpus_checks(cfg: &Config) -> Vec<Check> {
    let host = &cfg.host;
    let mut checks = Vec::new();
    for gc in cfg.gpu.iter() {
        let Ok(g) = gpu::read_gpu(host, gc.address) else {
            continue;
        };
        if gc.address != cfg.gpu.address {
            let mut one = cfg.clone();
            *one.gpu = gc.clone();
            checks.push(check_gpu_found(&one, &g));
            if g.owner == Owner::Absent {
                continue;
            }
            checks.push(check_iommu_group(&g));
            checks.push(check_holders(&one, &g));
            // `rebind` returns the primary GPU unless told which.
            checks.extend(check_restore(&one).map(|mut c| {
                c.fix = c.fix.map(|f| {
                    f.replace(
                        "`handoff rebind --force`",
                        &format!("`handoff rebind --force --gpu {}`", g.address),
                    )
                });
                c
            }));
        }
        if g.owner == Owner::Absent {
            continue;
        }
        let nodes = holders::gpu_nodes(host, &g);
        let scan = holders::scan(host, &g, &nodes);
        if let Some(why) = crate::gpus::display_use(host, g.address, &scan.holders) {
            let loses = "while a VM has it, this host has no console on a screen and no local desktop;                          reach it over SSH (and a display server on it must be stopped first)";
            checks.push(if gc.allow_display {
                Check::new(
                    "display-gpu",
                    Level::Info,
                    format!("GPU {} drives the desktop of this host ({why}); allow_display = true hands it anyway", g.address),
                )
                .fix(loses)
            } else {
                Check::new(
                    "display-gpu",
                    Level::Warn,
                    format!(
                        "GPU {} drives the desktop of this host ({why}): the hook refuses to hand it to a VM",
                        g.address
                    ),
                )
                .fix(format!(
                    "to hand it anyway set allow_display = true in its [[gpu]]; {loses}"
                ))
            });
        }
        if crate::gpus::is_intel_igpu(&g) && !matches!(gc.host_driver.as_str(), "i915" | "xe" | "vfio-pci") {
            checks.push(
                Check::new(
                    "igpu-driver",
                    Level::Warn,
                    format!(
                        "GPU {} is an Intel iGPU but its host_driver is {:?}",
                        g.address, gc.host_driver
                    ),
                )
                .fix("set host_driver = \"i915\" (or \"xe\" on newer iGPUs) in its [[gpu]]"),
            );
        }
    }
    checks
}

/// What the VMs' own definitions say (`doctor` and `config check`): each device a VM passes
/// through that no `[[gpu]]` names (a display controller is a warning: handoff does not
/// guard it), a macOS VM given an NVIDIA card newer than Kepler, and what a VM taking an
/// Intel iGPU lacks to drive it. `definition` describes a VM (libvirt's domain XML, or a
/// Proxmox VE VM's config with its passed-through devices, mappings resolved); one it
/// cannot describe is passed over (the libvirt checks report it).
pub fn vm_definition_checks(
    cfg: &Config,
    definition: &mut dyn FnMut(&VmConfig) -> Result<crate::hypervisor::Description, String>,
) -> Vec<Check> {
    let host = &cfg.host;
    let mut checks = Vec::new();
    for vm in &cfg.vms {
        let Ok(d) = definition(vm) else { continue };
        if vm.vmid.is_some() {
            checks.extend(pve_definition_checks(cfg, vm, &d));
            continue;
        }
        let xml = d.definition;
        let Ok(hostdevs) = crate::hook::domain_hostdevs(&xml) else {
            continue;
        };
        let name = crate::escape::plain(&vm.name);
        checks.extend(unnamed_device_checks(cfg, &name, &hostdevs, "libvirt"));
        let taken = crate::gpus::taken_by(cfg, &hostdevs);
        if crate::gpus::libosinfo_id(&xml).is_some_and(|id| crate::gpus::is_macos_id(&id)) {
            for g in &taken {
                if let Some(w) = crate::hook::macos_nvidia_warning(host, &name, g.address) {
                    checks.push(Check::new("macos-nvidia", Level::Warn, w));
                }
            }
        }
        for g in &taken {
            let Ok(gpu) = gpu::read_gpu(host, g.address) else {
                continue;
            };
            if !crate::gpus::is_intel_igpu(&gpu) {
                continue;
            }
            let missing = crate::gpus::igpu_missing(&xml, g.address);
            if !missing.is_empty() {
                checks.push(
                    Check::new(
                        "igpu-vm",
                        Level::Warn,
                        format!("VM {name} takes the Intel iGPU {}, but {}", g.address, missing.join("; ")),
                    )
                    .fix("add what is missing to the VM's definition (virsh edit); the iGPU's ROM comes from its vendor or the OVMF/IGD project of your choice"),
                );
            }
        }
    }
    checks
}

/// [`vm_definition_checks`] of a Proxmox VE VM: its `hostpciN` devices (as the API
/// resolved them) that no `[[gpu]]` names, a macOS guest (`args` with `isa-applesmc`) given
/// an NVIDIA card newer than Kepler, and what its config lacks for an Intel iGPU it takes
/// ([`crate::gpus::pve_igpu_missing`]).
/// A VM passing through a device no `[[gpu]]` names: a warning for a display controller
/// (handoff does not guard it), a note for anything else (`hypervisor` alone hands it).
fn unnamed_device_checks(
    cfg: &Config,
    name: &str,
    passed: &[crate::pci::PciAddress],
    hypervisor: &str,
) -> Vec<Check> {
    crate::gpus::unnamed(cfg, passed)
        .into_iter()
        .map(|a| {
            if crate::gpus::class_of(&cfg.host, a).is_some_and(crate::gpus::is_display_class) {
                Check::new(
                    "vm-unnamed-device",
                    Level::Warn,
                    format!("VM {name} passes through the display controller {a}, which no [[gpu]] names: handoff does not guard it"),
                )
                .fix(format!("add a [[gpu]] with address = \"{a}\" and its host_driver"))
            } else {
                Check::new(
                    "vm-unnamed-device",
                    Level::Info,
                    format!("VM {name} passes through {a}, which no [[gpu]] names; {hypervisor} alone hands it"),
                )
            }
        })
        .collect()
}

fn pve_definition_checks(cfg: &Config, vm: &VmConfig, d: &crate::hypervisor::Description) -> Vec<Check> {
    let host = &cfg.host;
    let conf = crate::pve::parse_conf(&d.definition);
    let name = crate::escape::plain(vm.label());
    let mut checks = Vec::new();
    checks.extend(unnamed_device_checks(cfg, &name, &d.passthrough, "Proxmox VE"));
    let taken = crate::gpus::taken_by(cfg, &d.passthrough);
    if crate::gpus::pve_is_macos(&conf) {
        for g in &taken {
            if let Some(w) = crate::hook::macos_nvidia_warning(host, &name, g.address) {
                checks.push(Check::new("macos-nvidia", Level::Warn, w));
            }
        }
    }
    // The mappings are resolved in `passthrough` but not per hostpciN: the check reads the
    // iGPU's own hostpciN only when it names the device directly.
    let mappings = std::collections::BTreeMap::new();
    for g in &taken {
        let Ok(gpu) = gpu::read_gpu(host, g.address) else {
            continue;
        };
        if !crate::gpus::is_intel_igpu(&gpu) {
            continue;
        }
        let missing = crate::gpus::pve_igpu_missing(&conf, &mappings, g.address);
        if !missing.is_empty() {
            checks.push(
                Check::new(
                    "igpu-vm",
                    Level::Warn,
                    format!("VM {name} takes the Intel iGPU {}, but {}", g.address, missing.join("; ")),
                )
                .fix(format!(
                    "add what is missing to /etc/pve/qemu-server/{}.conf (qm set); the iGPU's ROM comes from its vendor or the IGD ROM project of your choice",
                    vm.vmid.unwrap_or_default()
                )),
            );
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::bind::record::RecordedFunction;

    fn installed(dir: &Path, exe: &Path) {
        hook_install::apply(&hook_install::plan_install(dir, exe).unwrap()).unwrap();
    }

    fn fake_handoff(dir: &Path) -> std::path::PathBuf {
        let exe = dir.join("it's handoff");
        fs::write(&exe, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        exe
    }

    #[test]
    fn a_missing_hook_fails_and_says_to_install_it() {
        let tmp = tempfile::tempdir().unwrap();
        let c = check_hook(&tmp.path().join("hooks"));
        assert_eq!(c.level, Level::Fail);
        assert!(c.summary.contains("not installed"), "{}", c.summary);
        assert_eq!(c.fix.as_deref(), Some("sudo handoff install-hooks"));
    }

    #[test]
    fn an_installed_hook_is_ok_until_its_binary_or_mode_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let hooks_dir = tmp.path().join("hooks");
        let exe = fake_handoff(tmp.path());
        installed(&hooks_dir, &exe);

        let c = check_hook(&hooks_dir);
        assert_eq!(c.level, Level::Ok, "{c:?}");
        assert!(
            c.summary.ends_with(&format!("runs {}", exe.display())),
            "{}",
            c.summary
        );

        let shim = hook_install::shim_path(&hooks_dir);
        fs::set_permissions(&shim, fs::Permissions::from_mode(0o644)).unwrap();
        let c = check_hook(&hooks_dir);
        assert_eq!(c.level, Level::Fail);
        assert!(c.summary.contains("not executable"), "{}", c.summary);
        fs::set_permissions(&shim, fs::Permissions::from_mode(0o755)).unwrap();

        fs::remove_file(&exe).unwrap();
        let c = check_hook(&hooks_dir);
        assert_eq!(c.level, Level::Fail);
        assert!(c.summary.contains("missing or not executable"), "{}", c.summary);
        assert!(c.fix.unwrap().contains("sudo handoff install-hooks"));
    }

    #[test]
    fn a_foreign_file_in_the_shims_place_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let shim = hook_install::shim_path(tmp.path());
        fs::create_dir_all(shim.parent().unwrap()).unwrap();
        fs::write(&shim, "#!/bin/sh\nexit 0\n").unwrap();
        let c = check_hook(tmp.path());
        assert_eq!(c.level, Level::Fail);
        assert!(c.summary.contains("not written by"), "{}", c.summary);
    }

    fn config_with_run(run: &Path) -> Config {
        let mut cfg = Config::default();
        cfg.host.run = run.to_owned();
        cfg
    }

    fn record(phase: Phase, problem: Option<&str>) -> RestoreRecord {
        let gpu = Config::default().gpu.address;
        RestoreRecord {
            version: 1,
            gpu,
            vm: Some("win11".into()),
            created: 0,
            phase,
            functions: vec![RecordedFunction {
                address: gpu,
                driver: Some("nvidia".into()),
                driver_override: None,
            }],
            problem: problem.map(str::to_owned),
            hung_writer: None,
            hung_writer_start: None,
        }
    }

    #[test]
    fn a_stuck_restore_record_says_restore_required_and_how() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config_with_run(tmp.path());
        assert!(check_restore(&cfg).is_none());

        record(Phase::Stuck, Some("unbinding 0000:01:00.0 from nvidia hung"))
            .save(&cfg.host)
            .unwrap();
        let c = check_restore(&cfg).unwrap();
        assert_eq!(c.level, Level::Fail);
        assert_eq!(
            c.summary,
            "Restore required for GPU 0000:01:00.0: unbinding 0000:01:00.0 from nvidia hung"
        );
        assert!(c.fix.unwrap().starts_with("run `handoff rebind --force`"));

        record(Phase::Returning, None).save(&cfg.host).unwrap();
        let c = check_restore(&cfg).unwrap();
        assert!(c.summary.ends_with("(phase returning)"), "{}", c.summary);

        record(Phase::Bound, None).save(&cfg.host).unwrap();
        let c = check_restore(&cfg).unwrap();
        assert_eq!(c.level, Level::Info);
        assert!(c.summary.contains("handed to win11"), "{}", c.summary);
    }

    fn two_vms() -> Config {
        let mut cfg = Config::default();
        let vm = VmConfig::named("win11", "Windows");
        cfg.vms = vec![
            VmConfig {
                name: "win11".into(),
                label: Some("Windows".into()),
                ..vm.clone()
            },
            VmConfig {
                name: "ai".into(),
                label: None,
                ..vm
            },
        ];
        cfg
    }

    #[test]
    fn libvirt_checks_pass_a_defined_vm_and_fail_an_unreachable_one_with_the_fix() {
        let cfg = two_vms();
        let checks = libvirt_checks(&cfg, &mut |vm| match vm.name.as_str() {
            "win11" => VmStatus::new(vm, VmState::Shutoff, None),
            _ => VmStatus::new(vm, VmState::Unknown, Some("is libvirtd running?".into())),
        });
        assert_eq!(checks.len(), 2);
        assert_eq!((checks[0].id, checks[0].level), ("libvirt", Level::Ok));
        assert_eq!(
            checks[0].summary,
            format!("VM win11 (Windows) at {} is defined, shut off", cfg.vms[0].uri)
        );
        assert_eq!(checks[0].fix, None);
        assert_eq!(checks[1].level, Level::Fail);
        assert_eq!(checks[1].summary, format!("VM ai at {}: unknown", cfg.vms[1].uri));
        assert_eq!(checks[1].fix.as_deref(), Some("is libvirtd running?"));
    }

    #[test]
    fn libvirt_checks_fail_an_undefined_domain() {
        let cfg = two_vms();
        let checks = libvirt_checks(&cfg, &mut |vm| VmStatus::new(vm, VmState::Undefined, None));
        assert!(checks.iter().all(|c| c.level == Level::Fail), "{checks:?}");
    }
}
