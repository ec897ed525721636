//! Who holds the GPU: processes with an open fd on one of its device nodes (found by
//! walking `/proc/*/fd`, in Rust, without lsof/fuser), and holders without an fd that can
//! be seen (nvidia-persistenced, a boot framebuffer on the GPU's BAR).
//!
//! The scan never opens a GPU node: opening `/dev/nvidia*` alone keeps the GPU busy. It
//! reads, under the roots of a [`Host`]:
//!
//! - sysfs: `bus/pci/devices/<BDF>/{drm,sound,i2c-*}` to learn which nodes under `dev`
//!   belong to the GPU, and `<BDF>/resource` for its BARs;
//! - procfs: `driver/nvidia/gpus/<BDF>/information` (the device minor), `<pid>/fd/*`
//!   (readlink, and `stat` through the link for candidates), and for matching processes
//!   only `comm`, `cmdline`, `status` and `cgroup`; `iomem` for boot framebuffers.
//!
//! A node is matched by path (the fd's link target against the node's canonical path) and
//! by inode identity (`st_dev`/`st_ino` through `/proc/<pid>/fd/<n>`, for fds whose target
//! has a node's file name but another path: another mount namespace, a bind mount, a hard
//! link). Never by device numbers alone: test nodes are 1:3 like `/dev/null`, and on a real
//! machine the numbers say nothing about which of two GPUs a node is.
//!
//! What the scan reports about itself:
//! - Our own process is reported like any other: if the caller holds a GPU node, it is a
//!   holder too, and hiding that would make a refused start unexplainable.
//! - Processes whose fds cannot be read (EACCES/EPERM: another user's, when we are not
//!   root; PID 1 in some containers) are counted in [`Scan::uninspected`], never dropped.
//!   Processes that exit during the scan are ignored.
//!
//! The gate fails closed: [`Scan::verdict`] is [`Verdict::Clear`] only when the scan looked
//! everywhere it needed to. Anything it could not look at makes it
//! [`Verdict::Unchecked`], which the hook and `handoff bind` refuse on, naming what was
//! not checked: a process whose fds could not be read, `/proc` that could not be listed,
//! `/proc/iomem` unreadable or without addresses (boot framebuffers not checked), and no
//! device node found for a GPU that is on a host driver (`[host] dev` wrong). How the
//! special processes count:
//! - Kernel threads have no fd table: as root their `/proc/<pid>/fd` lists empty, so they
//!   are inspected and hold nothing. Unprivileged, their fd directory is root's like any
//!   other root process's, so they count as uninspected (a non-root scan is never Clear).
//! - PID 1 of a container (or any process a confined root may not trace: AppArmor,
//!   SELinux, another user namespace) whose `fd` is EACCES even for root counts as
//!   uninspected: it could hold the GPU, so a handoff is refused, naming it, until the hook
//!   can read it (host PID namespace, CAP_SYS_PTRACE, no confinement rule denying it) or
//!   the process is gone.
//!
//! Surfaces that run unprivileged (the tray, the bar, `handoff start`'s own pre-check)
//! don't refuse on Unchecked: the hook, as root, checks again. They must not call it
//! "free" either.
//! - `nvidia-persistenced` is a [`Holder`] with its real pid and a `reason`, whether or
//!   not its fds were visible. A boot framebuffer (efifb, simpledrm, …) has no process at
//!   all, so it is a [`Framebuffer`] in [`Scan::framebuffers`]. When something could not
//!   be checked (as non-root `/proc/iomem` shows zero addresses) it goes to
//!   [`Scan::notes`] rather than being reported as "none".
//!
//! Framebuffer devices: `/dev/fbN` is one of the GPU's nodes when `<BDF>/graphics/fbN`
//! exists (DRM's fbdev emulation — nvidia-drm with `fbdev=1`, amdgpu, i915, bochs —
//! registers it with the PCI device as parent), and a process holding it is a holder like
//! one of `/dev/dri/card*`. A *console* bound to that framebuffer (fbcon,
//! `/sys/class/vtconsole/vtcon*/bind`) is not a refusal: in the kernel's sources (6.1 and
//! later) the driver's unbind unregisters the fbdev emulation (drivers/gpu/drm/drm_client.c
//! `drm_client_dev_unregister`, from `drm_dev_unregister`; drm_fb_helper.c), and
//! drivers/video/fbdev/core/fbmem.c `do_unregister_framebuffer` → `unlink_framebuffer` →
//! `unbind_console` → fbcon.c `fbcon_fb_unbind` moves the consoles off it (to another fb or
//! the dummy console) without failing or waiting; an fb still open is only kept alive by
//! its refcount (`put_fb_info`). The single-GPU guides' `vtcon` and `efi-framebuffer`
//! unbinds are about the boot framebuffer, which is a [`Framebuffer`] here. Unproven:
//! nvidia.ko's remove with nvidia-drm's fbdev client (real hardware only).
//!
//! VFIO users ([`vfio_users`]): processes holding `<dev>/vfio/<group>` (a VM's QEMU, named
//! by its `-name guest=<vm>` in [`Holder::vm`]). They are not holders of a GPU on the host
//! (the gate above), but what keeps one on vfio-pci: a return waits for them.
//!
//! Not covered: memory mappings of a node whose fd was closed (`/proc/<pid>/maps`; CUDA and
//! the NVIDIA driver keep their fds open, and reading every process's maps would make the
//! scan as slow as fuser), and threads that unshared their fd table (`CLONE_FILES`).

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::gpu::{Function, Gpu, Owner};
use crate::host::Host;
use crate::pci::PciAddress;

/// A device node that belongs to the GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuNode {
    pub path: PathBuf,
}

/// One process that keeps the GPU from being handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    pub cmdline: Vec<String>,
    pub uid: u32,
    pub user: String,
    /// The systemd unit from `/proc/<pid>/cgroup`, e.g. "ollama.service".
    pub unit: Option<String>,
    /// The GPU's nodes it holds open; empty for holders without an fd.
    pub paths: Vec<PathBuf>,
    /// Why it counts, when not an open node (e.g. "nvidia-persistenced keeps the GPU initialised").
    pub reason: Option<String>,
    /// The VM whose QEMU this is (its `-name guest=<vm>`), when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The Docker or Podman container it runs in, from its cgroup
    /// ([`crate::containers`]); `unit` is then the engine's scope, not one to stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::containers::Container>,
}

/// A firmware/boot framebuffer driver that sits on one of the GPU's BARs. It has no
/// process and no fd, but keeps the memory claimed until the kernel lets go of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Framebuffer {
    /// The name in `/proc/iomem`: efifb, simplefb, simpledrm, vesafb, BOOTFB.
    pub name: String,
    /// The GPU function whose BAR it overlaps.
    pub function: PciAddress,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scan {
    /// Processes holding the GPU, sorted by pid (nvidia-persistenced included).
    pub holders: Vec<Holder>,
    /// Processes whose fds could not be read (not ours and we are not root, or denied even
    /// to root: PID 1 of a container, a confined caller).
    pub uninspected: usize,
    /// The first few of those, by pid, with their command when it could be read: what a
    /// refusal names when even root could not look.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uninspected_examples: Vec<Uninspected>,
    /// Boot framebuffers on the GPU's BARs: holders without a process.
    pub framebuffers: Vec<Framebuffer>,
    /// What could not be checked, in words a person can act on.
    pub notes: Vec<String>,
}

/// A process whose fds could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uninspected {
    pub pid: u32,
    /// Its `comm`, when even that could not be read: None.
    pub command: Option<String>,
}

/// What a scan allows: the gate every handoff goes through. A scan that could not look
/// everywhere it needed to is never [`Verdict::Clear`]: what it did not see may hold the
/// GPU, and an unbind under a holder hangs in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every process and every other kind of holder was looked at; nothing holds the GPU.
    Clear,
    /// Something holds the GPU ([`Scan::holders`], [`Scan::framebuffers`]). `unchecked`
    /// says what else could not be looked at, as in [`Verdict::Unchecked`].
    Held { unchecked: Vec<String> },
    /// Nothing was seen holding the GPU, but the look was partial: one line per thing
    /// that could not be checked, each saying what to do. A handoff must be refused;
    /// a surface running unprivileged shows it as "not known", never as "free".
    Unchecked { what: Vec<String> },
}

impl Verdict {
    /// One word for scripts and JSON: `clear`, `held` or `unchecked`.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Clear => "clear",
            Verdict::Held { .. } => "held",
            Verdict::Unchecked { .. } => "unchecked",
        }
    }

    /// What could not be checked (empty for a full look).
    pub fn unchecked(&self) -> &[String] {
        match self {
            Verdict::Clear => &[],
            Verdict::Held { unchecked } => unchecked,
            Verdict::Unchecked { what } => what,
        }
    }
}

impl Scan {
    /// The gate: [`Verdict::Held`] when anything was seen holding the GPU, else
    /// [`Verdict::Unchecked`] when some process could not be inspected or a note says
    /// something was not checked, else [`Verdict::Clear`].
    pub fn verdict(&self) -> Verdict {
        let unchecked = self.unchecked();
        if !self.holders.is_empty() || !self.framebuffers.is_empty() {
            Verdict::Held { unchecked }
        } else if !unchecked.is_empty() {
            Verdict::Unchecked { what: unchecked }
        } else {
            Verdict::Clear
        }
    }

    /// What this scan could not look at, one line each, in words a person can act on.
    fn unchecked(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.uninspected > 0 {
            out.push(uninspected_text(
                self.uninspected,
                &self.uninspected_examples,
                is_root(),
            ));
        }
        out.extend(self.notes.iter().cloned());
        out
    }

    /// One line per holder of either kind, for an error message or a notification.
    pub fn summary_lines(&self) -> Vec<String> {
        self.holders
            .iter()
            .map(Holder::summary)
            .chain(self.framebuffers.iter().map(Framebuffer::summary))
            .collect()
    }
}

/// Whether this process runs as root (the hook, `bind`, `sudo handoff blockers`).
fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// "3 processes could not be inspected: run as root to see them". As root that advice is
/// useless: what is left is what even root may not read (PID 1 of a container, processes a
/// confined caller may not trace), so the line names them and says how to let root look.
pub fn uninspected_text(n: usize, examples: &[Uninspected], as_root: bool) -> String {
    let what = if n == 1 {
        "1 process".to_owned()
    } else {
        format!("{n} processes")
    };
    if !as_root {
        return format!("{what} could not be inspected: run as root to see them");
    }
    let mut named: Vec<String> = examples
        .iter()
        .map(|u| match &u.command {
            Some(c) => format!("pid {} ({c})", u.pid),
            None => format!("pid {}", u.pid),
        })
        .collect();
    if n > examples.len() && !named.is_empty() {
        named.push(format!("{} more", n - examples.len()));
    }
    let named = if named.is_empty() {
        String::new()
    } else {
        format!(": {}", named.join(", "))
    };
    format!(
        "{what} could not be inspected even as root{named}; what they hold is unknown. \
         Let handoff read their /proc/<pid>/fd (run it in the host's PID namespace, with \
         CAP_SYS_PTRACE and no AppArmor/SELinux rule denying it), or stop them"
    )
}

const PERSISTENCED_COMM: &str = "nvidia-persiste";
const PERSISTENCED_REASON: &str = "nvidia-persistenced keeps the GPU initialised (persistence mode); \
     stop it: systemctl stop nvidia-persistenced";
const NVIDIA_VENDOR: u16 = 0x10de;

/// How every note about boot framebuffers that could not be checked ends; the holder
/// publisher's readers drop such a note when root did check ([`crate::publish::apply`]).
pub const FRAMEBUFFERS_UNCHECKED: &str = "a boot framebuffer (efifb, simpledrm) on the GPU was not checked";

/// Why a process with this `comm` counts without an open node: nvidia-persistenced's
/// reason, else None (for holders known only by name, [`crate::publish`]).
pub fn persistenced_reason(command: &str) -> Option<String> {
    (command == PERSISTENCED_COMM).then(|| PERSISTENCED_REASON.to_owned())
}

impl Holder {
    /// One line, short enough for a `virsh start` error and a notification:
    /// `python3 (pid 4242, user alice, ollama.service) holds /dev/nvidia0, /dev/nvidiactl`.
    ///
    /// The process chose its own name: every part that came from it (command, user, unit,
    /// paths) is escaped for plain text ([`crate::escape::plain`]), so the line stays one
    /// line with no terminal control in it wherever it goes; markup destinations escape
    /// the result again for their markup.
    pub fn summary(&self) -> String {
        use crate::escape::plain;
        let mut s = format!(
            "{} (pid {}, user {}",
            plain(&self.command),
            self.pid,
            plain(&self.user)
        );
        if let Some(c) = &self.container {
            s += &format!(", {} container {}", c.engine.cli(), plain(&c.shown()));
        } else if let Some(unit) = &self.unit {
            s += ", ";
            s += &plain(unit);
        }
        if let Some(vm) = &self.vm {
            s += ", QEMU of VM ";
            s += &plain(vm);
        }
        s += ")";
        if !self.paths.is_empty() {
            const SHOWN: usize = 3;
            s += " holds ";
            let shown: Vec<_> = self
                .paths
                .iter()
                .take(SHOWN)
                .map(|p| plain(&p.display().to_string()))
                .collect();
            s += &shown.join(", ");
            if self.paths.len() > SHOWN {
                s += &format!(" and {} more", self.paths.len() - SHOWN);
            }
        }
        if let Some(reason) = &self.reason {
            s += if self.paths.is_empty() { ": " } else { "; " };
            s += reason;
        }
        s
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

impl Framebuffer {
    /// `efifb (boot framebuffer) holds 0000:01:00.0 memory fb000000-fb2fffff; …`.
    /// Without addresses (0-0: known from the holder publisher, [`crate::publish`]), the
    /// range is left out.
    pub fn summary(&self) -> String {
        let memory = if self.start == 0 && self.end == 0 {
            "memory".to_owned()
        } else {
            format!("memory {:x}-{:x}", self.start, self.end)
        };
        format!(
            "{} (boot framebuffer) holds {} {memory}; boot with \
             initcall_blacklist=sysfb_init or video=efifb:off",
            self.name, self.function
        )
    }
}

impl fmt::Display for Framebuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

// ---------------------------------------------------------------------------------------
// Which nodes belong to the GPU.

fn is_nvidia(gpu: &Gpu) -> bool {
    gpu.functions
        .iter()
        .any(|f| f.vendor == NVIDIA_VENDOR || f.driver.as_deref() == Some("nvidia"))
}

/// `name` is `prefix` followed by one or more decimal digits.
fn numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn dir_names(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// The minor of `/dev/nvidia<minor>` from the driver's
/// `/proc/driver/nvidia/gpus/<BDF>/information` ("Device Minor: 0").
pub fn parse_nvidia_minor(information: &str) -> Option<u32> {
    information.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "Device Minor")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

fn nvidia_nodes(host: &Host, gpu: &Gpu, out: &mut Vec<PathBuf>) {
    let minors: Vec<u32> = gpu
        .functions
        .iter()
        .filter_map(|f| {
            let info = host
                .procfs
                .join("driver/nvidia/gpus")
                .join(f.address.to_string())
                .join("information");
            parse_nvidia_minor(&fs::read_to_string(info).ok()?)
        })
        .collect();
    if minors.is_empty() {
        // The driver doesn't say which minor is ours (not bound to nvidia, or no procfs
        // entry): take every /dev/nvidia<N>. One NVIDIA GPU per machine is the common case;
        // with two, this over-reports, which refuses a start rather than hanging an unbind.
        for name in dir_names(&host.dev) {
            if numbered(&name, "nvidia") {
                out.push(host.dev.join(name));
            }
        }
    } else {
        out.extend(minors.iter().map(|m| host.dev.join(format!("nvidia{m}"))));
    }
    for n in ["nvidiactl", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools"] {
        out.push(host.dev.join(n));
    }
    let caps = host.dev.join("nvidia-caps");
    for name in dir_names(&caps) {
        out.push(caps.join(name));
    }
}

fn function_nodes(host: &Host, function: &Function, out: &mut Vec<PathBuf>) {
    let dir = host.pci_devices().join(function.address.to_string());
    for name in dir_names(&dir.join("drm")) {
        if numbered(&name, "card") || numbered(&name, "renderD") {
            out.push(host.dev.join("dri").join(name));
        }
    }
    // The framebuffer device of the function (`graphics/fbN`): DRM's fbdev emulation
    // (nvidia-drm with fbdev=1, amdgpu, i915, bochs) registers it with the PCI device as
    // parent. Its holders are counted like a DRM node's (see the module doc for fbcon).
    for name in dir_names(&dir.join("graphics")) {
        if numbered(&name, "fb") {
            out.push(host.dev.join(name));
        }
    }
    let sound = dir.join("sound");
    for card in dir_names(&sound) {
        if !numbered(&card, "card") {
            continue;
        }
        for name in dir_names(&sound.join(&card)) {
            if ["controlC", "pcmC", "hwC", "midiC"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                out.push(host.dev.join("snd").join(name));
            }
        }
    }
    for adapter in dir_names(&dir) {
        if !numbered(&adapter, "i2c-") {
            continue;
        }
        for name in dir_names(&dir.join(&adapter).join("i2c-dev")) {
            if numbered(&name, "i2c-") {
                out.push(host.dev.join(name));
            }
        }
    }
}

/// The GPU's device nodes under `host.dev`: `/dev/nvidia*` for an NVIDIA GPU, its DRM card
/// and render nodes, its framebuffer devices (`/dev/fbN`), the audio function's `/dev/snd/*`, and the i2c buses of every
/// function. Only nodes that exist, sorted, without duplicates. Nothing is opened.
pub fn gpu_nodes(host: &Host, gpu: &Gpu) -> Vec<GpuNode> {
    let mut paths = Vec::new();
    if is_nvidia(gpu) {
        nvidia_nodes(host, gpu, &mut paths);
    }
    for f in &gpu.functions {
        function_nodes(host, f, &mut paths);
    }
    paths.retain(|p| fs::symlink_metadata(p).is_ok());
    paths.sort();
    paths.dedup();
    paths.into_iter().map(|path| GpuNode { path }).collect()
}

// ---------------------------------------------------------------------------------------
// Parsers (pure, tested with fixtures under tests/fixtures/).

/// The systemd unit from the text of `/proc/<pid>/cgroup`: the last path component that
/// ends in `.service` or `.scope`. The unified hierarchy (`0::`) wins; on a v1 machine the
/// `name=systemd` line is used. None for the root cgroup and for paths without a unit.
pub fn parse_cgroup_unit(cgroup: &str) -> Option<String> {
    // (hierarchy id, controllers, path); controllers never contain ':'.
    fn fields(line: &str) -> Option<(&str, &str, &str)> {
        let mut parts = line.splitn(3, ':');
        Some((parts.next()?, parts.next()?, parts.next()?))
    }
    let lines: Vec<_> = cgroup.lines().filter_map(fields).collect();
    let (_, _, path) = lines
        .iter()
        .find(|&&(id, controllers, _)| id == "0" && controllers.is_empty())
        .or_else(|| {
            lines
                .iter()
                .find(|&&(_, controllers, _)| controllers == "name=systemd")
        })
        .or_else(|| lines.first())?;
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

/// The real uid (first field of `Uid:`) from the text of `/proc/<pid>/status`.
pub fn parse_status_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `/proc/<pid>/cmdline`: NUL-separated arguments (a trailing NUL ends the last one).
pub fn parse_cmdline(cmdline: &[u8]) -> Vec<String> {
    let body = cmdline.strip_suffix(b"\0").unwrap_or(cmdline);
    if body.is_empty() {
        return Vec::new();
    }
    body.split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// One line of `/proc/iomem`: `start-end : name`, nesting shown by indentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IomemRegion {
    pub start: u64,
    pub end: u64,
    pub name: String,
    /// Indentation level (two spaces per level).
    pub depth: usize,
}

/// Every region of `/proc/iomem`. Lines that don't parse are skipped.
pub fn parse_iomem(iomem: &str) -> Vec<IomemRegion> {
    iomem
        .lines()
        .filter_map(|line| {
            let trimmed = line.trim_start();
            let depth = (line.len() - trimmed.len()) / 2;
            let (range, name) = trimmed.split_once(" : ")?;
            let (start, end) = range.split_once('-')?;
            Some(IomemRegion {
                start: u64::from_str_radix(start.trim(), 16).ok()?,
                end: u64::from_str_radix(end.trim(), 16).ok()?,
                name: name.trim().to_owned(),
                depth,
            })
        })
        .collect()
}

/// True when iomem was read without the privilege to see addresses (every range 0-0).
pub fn iomem_is_redacted(regions: &[IomemRegion]) -> bool {
    !regions.is_empty() && regions.iter().all(|r| r.start == 0 && r.end == 0)
}

/// Whether an iomem region name is a boot/firmware framebuffer driver's.
pub fn is_boot_framebuffer(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "efifb",
        "simplefb",
        "simpledrm",
        "simple-framebuffer",
        "vesafb",
        "bootfb",
    ]
    .iter()
    .any(|k| n.contains(k))
}

/// The memory BARs of a function from its sysfs `resource` file (`start end flags` in hex,
/// one line per resource, all zero when unused).
pub fn parse_resource(resource: &str) -> Vec<(u64, u64)> {
    resource
        .lines()
        .filter_map(|l| {
            let mut it = l
                .split_whitespace()
                .map(|f| u64::from_str_radix(f.trim_start_matches("0x").trim_start_matches("0X"), 16));
            let start = it.next()?.ok()?;
            let end = it.next()?.ok()?;
            (end > start).then_some((start, end))
        })
        .collect()
}

/// Boot framebuffers in `iomem` that overlap one of `bars` (per function).
pub fn boot_framebuffers(
    regions: &[IomemRegion],
    bars: &[(PciAddress, Vec<(u64, u64)>)],
) -> Vec<Framebuffer> {
    let mut out = Vec::new();
    for r in regions.iter().filter(|r| is_boot_framebuffer(&r.name)) {
        for (function, ranges) in bars {
            if ranges.iter().any(|&(s, e)| r.start <= e && s <= r.end) {
                out.push(Framebuffer {
                    name: r.name.clone(),
                    function: *function,
                    start: r.start,
                    end: r.end,
                });
                break;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Raw directory access: the walk over /proc is the hot path (one entry per process, one
// per fd), so it uses openat/getdents64/readlinkat relative to open directories instead of
// building and resolving a full path per fd.

struct Dir(OwnedFd);

impl Dir {
    fn open(path: &Path) -> io::Result<Dir> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        Self::open_at(libc::AT_FDCWD, &c)
    }

    fn open_at(dirfd: libc::c_int, name: &CStr) -> io::Result<Dir> {
        // SAFETY: `name` is NUL-terminated; the returned fd is owned by the OwnedFd below.
        let fd = unsafe {
            libc::openat(
                dirfd,
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(Dir(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn sub(&self, name: &CStr) -> io::Result<Dir> {
        Self::open_at(self.0.as_raw_fd(), name)
    }

    /// Call `f` with each entry name (without "." and ".."), read with getdents64 into
    /// `buf`. With `eof_on_short`, a call that left room for a longer entry than this
    /// directory can have (procfs fd names are numbers) is taken as the end, saving the
    /// call that would return 0: the kernel fills the buffer until an entry doesn't fit.
    fn for_each(&self, buf: &mut [u8], eof_on_short: bool, mut f: impl FnMut(&CStr)) -> io::Result<()> {
        loop {
            // SAFETY: `buf` is valid for `buf.len()` bytes; the kernel writes at most that.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Ok(());
            }
            let mut off = 0usize;
            let n = n as usize;
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            while off + 19 < n {
                let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
                if reclen == 0 || off + reclen > n {
                    break;
                }
                let name = &buf[off + 19..off + reclen];
                if let Ok(name) = CStr::from_bytes_until_nul(name) {
                    let b = name.to_bytes();
                    if b != b"." && b != b".." {
                        f(name);
                    }
                }
                off += reclen;
            }
            if eof_on_short && buf.len() - n >= 512 {
                return Ok(());
            }
        }
    }

    /// The link target of `name` in this directory, into `buf`; the filled part.
    fn readlink<'b>(&self, name: &CStr, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        // SAFETY: `name` is NUL-terminated and `buf` is valid for `buf.len()` bytes.
        let n = unsafe {
            libc::readlinkat(
                self.0.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(&buf[..n as usize])
    }

    /// `(st_dev, st_ino)` of what `name` points to (stat follows /proc's fd links to the
    /// open file without opening anything).
    fn stat_id(&self, name: &CStr) -> io::Result<(u64, u64)> {
        // SAFETY: an all-zero `stat` is a valid value for fstatat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `name` is NUL-terminated; `st` is a valid out-pointer.
        let rc = unsafe { libc::fstatat(self.0.as_raw_fd(), name.as_ptr(), &mut st, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((st.st_dev, st.st_ino))
    }

    /// Read a small file `name` in this directory into `out` (replacing its contents).
    fn read_file(&self, name: &CStr, out: &mut Vec<u8>) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated; the fd is owned by the File below.
        let fd = unsafe {
            libc::openat(
                self.0.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        out.clear();
        out.reserve(4096);
        loop {
            let spare = out.capacity() - out.len();
            // SAFETY: the spare capacity is valid for `spare` bytes; `n` of them are set.
            let n = unsafe { libc::read(file.as_raw_fd(), out.as_mut_ptr().add(out.len()).cast(), spare) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Ok(());
            }
            // SAFETY: the kernel initialised `n` more bytes.
            unsafe { out.set_len(out.len() + n as usize) };
            if (n as usize) < spare {
                // procfs text files (seq_file, cmdline) hand over everything that fits in
                // one read; a short read is the end, no second call needed.
                return Ok(());
            }
            out.reserve(4096);
        }
    }
}

fn vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

fn denied(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
}

// ---------------------------------------------------------------------------------------
// The scan.

/// What the walk matches fds against.
struct Targets {
    /// Canonical node paths (what the kernel shows as a link target), by node index.
    paths: Vec<Vec<u8>>,
    /// File names of the nodes: a link target with one of these names but another path is
    /// worth a `stat` to compare inodes.
    names: Vec<Vec<u8>>,
    /// `(st_dev, st_ino)` of each node, by node index.
    ids: Vec<Option<(u64, u64)>>,
}

impl Targets {
    fn new(nodes: &[GpuNode]) -> Targets {
        let mut t = Targets {
            paths: Vec::new(),
            names: Vec::new(),
            ids: Vec::new(),
        };
        for n in nodes {
            let canonical = fs::canonicalize(&n.path).unwrap_or_else(|_| n.path.clone());
            let id = fs::metadata(&canonical).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            });
            let name = canonical
                .file_name()
                .map(|s| s.as_bytes().to_vec())
                .unwrap_or_default();
            t.paths.push(canonical.into_os_string().into_vec());
            t.names.push(name);
            t.ids.push(id);
        }
        t
    }

    /// The node index an fd refers to. `stat` is the fd's identity, asked only when needed.
    fn lookup(&self, target: &[u8], stat: impl FnOnce() -> Option<(u64, u64)>) -> Option<usize> {
        // A node removed and made again (udev) shows as "<path> (deleted)"; the old inode
        // is still the device, so it counts as the path.
        let target = target.strip_suffix(b" (deleted)").unwrap_or(target);
        if let Some(i) = self.paths.iter().position(|p| p == target) {
            return Some(i);
        }
        if target.first() != Some(&b'/') {
            return None; // socket:[…], pipe:[…], anon_inode:…
        }
        let name = target.rsplit(|&b| b == b'/').next().unwrap_or(target);
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        let id = stat()?;
        self.ids.iter().position(|i| *i == Some(id))
    }
}

/// A raw view of one process, before its details are read.
struct Found {
    pid: u32,
    nodes: Vec<usize>,
    /// Its fds could not be read, but its comm says nvidia-persistenced.
    persistenced_without_fds: bool,
}

/// Every process holding one of `nodes`, plus the holders without an fd
/// (nvidia-persistenced, boot framebuffers on the GPU's BARs). Reads `host.procfs` and
/// the GPU's sysfs `resource` files; never opens a node.
pub fn scan(host: &Host, gpu: &Gpu, nodes: &[GpuNode]) -> Scan {
    scan_with_threads(host, gpu, nodes, None, None).0
}

/// [`scan`] and [`vfio_users`] in one walk over `/proc`: what `blockers` and `status`
/// ask together. Each walk costs ~15 µs of kernel time per process, so a second walk just
/// for the VFIO group node would double their time when the GPU is on vfio-pci; the result
/// is the same as calling the two.
pub fn scan_with_vfio(host: &Host, gpu: &Gpu, nodes: &[GpuNode]) -> (Scan, Vec<Holder>) {
    scan_with_threads(host, gpu, nodes, vfio_node(host, gpu), None)
}

/// How many processes that could not be inspected a scan names.
const UNINSPECTED_EXAMPLES: usize = 3;

/// Below this many processes the walk stays on the calling thread: starting a thread
/// costs more than it saves on a few hundred processes (~20 µs each to walk).
const PARALLEL_MIN_PROCESSES: usize = 256;
/// The walk is syscall-bound (procfs work in the kernel, ~15 µs per process and ~30 µs per
/// holder's details), so it scales with cores. Four at most: a scan from the hook, while
/// libvirt starts a VM, then takes four cores for a few milliseconds, not the machine.
const MAX_THREADS: usize = 4;

/// [`scan`], and with `vfio` (the GPU's VFIO group node) also its users, as
/// [`vfio_users`] finds them, in the same walk. `threads` forces the number of walker
/// threads (`Some`), for tests; `None` picks one thread for small process lists and up to
/// [`MAX_THREADS`] for large ones.
fn scan_with_threads(
    host: &Host,
    gpu: &Gpu,
    nodes: &[GpuNode],
    vfio: Option<GpuNode>,
    threads: Option<usize>,
) -> (Scan, Vec<Holder>) {
    let mut result = Scan::default();
    if nodes.is_empty() && gpu.owner == Owner::Host {
        // A GPU on a host driver has nodes (a DRM card, /dev/nvidia*, its audio's ALSA
        // nodes): finding none means `[host] dev` is not where they are, and a scan of
        // nothing would find nothing.
        result.notes.push(format!(
            "no device nodes of GPU {} were found under {}: holders of its nodes were not checked; \
             check [host] dev in the config (normally /dev)",
            gpu.address,
            host.dev.display()
        ));
    }
    // The VFIO group node, when asked for, is one more target after the GPU's nodes: an fd
    // on it makes a VFIO user, not a holder.
    let all: Vec<GpuNode> = nodes.iter().cloned().chain(vfio).collect();
    let targets = Targets::new(&all);
    let nvidia = is_nvidia(gpu);
    let cannot_list = |e: io::Error| {
        format!(
            "cannot list processes in {}: {e}; holders were not checked",
            host.procfs.display()
        )
    };
    let proc_dir = match Dir::open(&host.procfs) {
        Ok(d) => d,
        Err(e) => {
            result.notes.push(cannot_list(e));
            check_framebuffers(host, gpu, &mut result);
            return (result, Vec::new());
        }
    };
    let pids = match list_pids(&proc_dir) {
        Ok(pids) => pids,
        Err(e) => {
            result.notes.push(cannot_list(e));
            Vec::new()
        }
    };
    let threads = threads.unwrap_or_else(|| {
        if pids.len() > PARALLEL_MIN_PROCESSES {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
        } else {
            1
        }
    });
    let walker = Walker {
        proc_dir: &proc_dir,
        targets: &targets,
        nodes: &all,
        gpu_nodes: nodes.len(),
        nvidia,
        pids: &pids,
        next: AtomicUsize::new(0),
        accept: &host.uninspectable_ok,
    };
    let parts: Vec<Part> = if threads <= 1 {
        vec![walker.run()]
    } else {
        std::thread::scope(|s| {
            let others: Vec<_> = (1..threads).map(|_| s.spawn(|| walker.run())).collect();
            step_aside(&host.procfs, threads);
            let mine = walker.run();
            std::iter::once(mine)
                .chain(
                    others
                        .into_iter()
                        .map(|t| t.join().expect("holder scan thread panicked")),
                )
                .collect()
        })
    };
    let mut uninspected = Vec::new();
    let mut vfio_users = Vec::new();
    for part in parts {
        uninspected.extend(part.uninspected);
        result.holders.extend(part.holders);
        vfio_users.extend(part.vfio_users);
    }
    result.uninspected = uninspected.len();
    uninspected.sort_unstable();
    result.uninspected_examples = uninspected
        .iter()
        .take(UNINSPECTED_EXAMPLES)
        .map(|&pid| Uninspected {
            pid,
            command: fs::read_to_string(host.procfs.join(pid.to_string()).join("comm"))
                .ok()
                .map(|c| c.trim_end_matches('\n').to_owned()),
        })
        .collect();
    // User names are looked up here, once per uid, rather than in the walkers: NSS may
    // read /etc/passwd or ask a daemon, and the usual scan has one or two uids.
    let mut users = HashMap::new();
    for h in result.holders.iter_mut().chain(&mut vfio_users) {
        h.user = users.entry(h.uid).or_insert_with(|| user_name(h.uid)).clone();
    }
    result.holders.sort_by_key(|h| h.pid);
    vfio_users.sort_by_key(|h| h.pid);
    check_framebuffers(host, gpu, &mut result);
    (result, vfio_users)
}

/// Moves the calling thread to another CPU it may run on, then lets it run anywhere again,
/// when a CPU is idle (`threads`: the walkers, this one included).
/// Linux starts a new thread on the CPU of the thread that made it, where it waits for
/// that thread's time slice to end, while another CPU idles until the load balancer
/// notices (measured on the 2-vCPU dev VM: 1.4–4 ms, so a second walker took 48 of 1000
/// processes and two threads were no faster than one). Moving ourselves away instead is
/// immediate, and the walker left behind runs at once. Only onto an idle CPU: on a busy
/// machine the move gives up our running place for a queue behind another task's slice
/// (measured: 21 → 28 ms with both CPUs busy). Idle means the kernel's count of runnable
/// tasks (`<procfs>/loadavg`, 4th field, ours included) is below the CPUs we may use.
/// Nothing is pinned afterwards. Best effort: a failure changes only the time.
fn step_aside(procfs: &Path, threads: usize) {
    use nix::sched::{CpuSet, sched_getaffinity, sched_getcpu, sched_setaffinity};
    use nix::unistd::Pid;
    let me = Pid::from_raw(0);
    let (Ok(all), Ok(here)) = (sched_getaffinity(me), sched_getcpu()) else {
        return;
    };
    let cpus = (0..CpuSet::count())
        .filter(|&c| all.is_set(c).unwrap_or(false))
        .count();
    let runnable = fs::read_to_string(procfs.join("loadavg")).ok().and_then(|l| {
        let field = l.split_whitespace().nth(3)?;
        field.split_once('/')?.0.parse::<usize>().ok()
    });
    // Our walkers are among the runnable ones: as many or fewer than the CPUs and one of
    // them is idle (this CPU has two of ours).
    if cpus < 2 || threads < 2 || runnable.is_none_or(|r| r > cpus) {
        return;
    }
    let mut elsewhere = all;
    if elsewhere.unset(here).is_err() {
        return;
    }
    if sched_setaffinity(me, &elsewhere).is_ok() {
        let _ = sched_setaffinity(me, &all);
    }
}

/// What one walker found in the pids it took.
#[derive(Default)]
struct Part {
    /// Described, with `user` still empty.
    holders: Vec<Holder>,
    /// Processes holding the VFIO group node, described the same way.
    vfio_users: Vec<Holder>,
    /// The pids whose fds could not be read.
    uninspected: Vec<u32>,
}

/// The shared state of a walk: the pid list and the index of the next batch to take.
struct Walker<'a> {
    proc_dir: &'a Dir,
    targets: &'a Targets,
    /// The targets' nodes: the GPU's, then the VFIO group node when one was asked for.
    nodes: &'a [GpuNode],
    /// How many of `nodes` are the GPU's.
    gpu_nodes: usize,
    nvidia: bool,
    pids: &'a [u32],
    next: AtomicUsize,
    /// `[host] uninspectable_ok`.
    accept: &'a [String],
}

impl Walker<'_> {
    /// Whether `pid`, whose fds could not be read, is one the config says to pass over
    /// (`[host] uninspectable_ok`, by comm).
    fn accepted(&self, pid: u32, bufs: &mut Buffers) -> bool {
        if self.accept.is_empty() {
            return false;
        }
        bufs.read(self.proc_dir, pid, "comm").is_some_and(|c| {
            let c = c.strip_suffix(b"\n").unwrap_or(c);
            self.accept.iter().any(|a| a.as_bytes() == c)
        })
    }

    /// Pids per batch taken from the shared list. Batches, not a fixed half each: on a
    /// busy machine one thread may sit descheduled while the other finishes the list. Small
    /// (8 pids, ~0.1 ms of work), because the join waits for the batch a descheduled thread
    /// holds; the shared counter costs one atomic add per batch.
    const BATCH: usize = 8;

    /// Take batches until the list is done; walk each process's fds and describe those
    /// found holding something (details read here too: for many holders they cost more
    /// than the walk).
    fn run(&self) -> Part {
        let mut part = Part::default();
        let mut bufs = Buffers::new();
        loop {
            let start = self.next.fetch_add(Self::BATCH, Ordering::Relaxed);
            let Some(batch) = self.pids.get(start..self.pids.len().min(start + Self::BATCH)) else {
                return part;
            };
            for &pid in batch {
                let found = match process_fds(self.proc_dir, pid, self.targets, &mut bufs) {
                    Fds::Read(nodes) if nodes.is_empty() => continue,
                    Fds::Read(nodes) => Found {
                        pid,
                        nodes,
                        persistenced_without_fds: false,
                    },
                    Fds::Gone => continue,
                    Fds::Denied => {
                        part.uninspected.push(pid);
                        // As root, nvidia-persistenced's fds are readable and it shows up
                        // by the nodes it holds (persistence mode keeps /dev/nvidia* open).
                        // Without root they are not: then its name is all there is to go
                        // on. Checking only here keeps a comm read off every process's path.
                        if !(self.nvidia && is_persistenced(self.proc_dir, pid, &mut bufs)) {
                            if self.accepted(pid, &mut bufs) {
                                part.uninspected.pop();
                            }
                            continue;
                        }
                        Found {
                            pid,
                            nodes: Vec::new(),
                            persistenced_without_fds: true,
                        }
                    }
                };
                // The VFIO group node (last, when asked for) makes a VFIO user; the GPU's
                // nodes a holder. One process can be both: its details are read once.
                let vfio = found.nodes.iter().any(|&i| i >= self.gpu_nodes);
                let holds = found.persistenced_without_fds || found.nodes.iter().any(|&i| i < self.gpu_nodes);
                let Some(mut h) = describe(self.proc_dir, &found, self.nodes, self.nvidia, &mut bufs) else {
                    continue;
                };
                if vfio {
                    let mut user = h.clone();
                    user.paths
                        .retain(|p| self.nodes[self.gpu_nodes..].iter().any(|n| &n.path == p));
                    if holds {
                        h.paths.retain(|p| !user.paths.contains(p));
                    }
                    part.vfio_users.push(user);
                }
                if holds {
                    part.holders.push(h);
                }
            }
        }
    }
}

/// Scratch space a walker reuses for every process, so the hot path doesn't allocate.
struct Buffers {
    /// getdents64 output.
    dents: Vec<u8>,
    /// A readlink target.
    link: Vec<u8>,
    /// The fd names of the current process, each NUL-terminated, one after the other (no
    /// allocation per fd).
    fd_names: Vec<u8>,
    /// `<pid>/<file>` as a C string.
    path: Vec<u8>,
    /// A procfs file's contents.
    file: Vec<u8>,
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            dents: vec![0u8; 32 * 1024],
            link: vec![0u8; libc::PATH_MAX as usize],
            fd_names: Vec::new(),
            path: Vec::with_capacity(32),
            file: Vec::with_capacity(4096),
        }
    }

    /// `<pid>/<name>` under `proc_dir`, read into `self.file`; None when it can't be read.
    fn read(&mut self, proc_dir: &Dir, pid: u32, name: &str) -> Option<&[u8]> {
        proc_dir
            .read_file(pid_path(&mut self.path, pid, name), &mut self.file)
            .ok()?;
        Some(&self.file)
    }
}

/// `<pid>/<name>` as a C string, built in `buf`.
fn pid_path<'b>(buf: &'b mut Vec<u8>, pid: u32, name: &str) -> &'b CStr {
    use std::io::Write;
    buf.clear();
    write!(buf, "{pid}/{name}\0").expect("writing to a Vec");
    CStr::from_bytes_with_nul(buf).expect("digits and a file name: no NUL inside")
}

/// The pids under `proc_dir`, in the order the kernel lists them (ascending).
fn list_pids(proc_dir: &Dir) -> io::Result<Vec<u32>> {
    let mut dents = vec![0u8; 32 * 1024];
    let mut pids = Vec::with_capacity(1024);
    proc_dir.for_each(&mut dents, false, |name| {
        let b = name.to_bytes();
        if !b.is_empty() && b.iter().all(u8::is_ascii_digit) {
            if let Some(pid) = std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()) {
                pids.push(pid);
            }
        }
    })?;
    Ok(pids)
}

/// What one process's fds say.
enum Fds {
    /// Read; the indexes of the nodes it holds (maybe none).
    Read(Vec<usize>),
    /// Not ours to read (EACCES/EPERM), or unreadable for another reason.
    Denied,
    /// Exited during the scan.
    Gone,
}

/// The per-process hot path: `openat("<pid>/fd")`, `getdents64`, and one `readlinkat` per
/// fd; a `stat` only for a link whose file name is a node's but whose path isn't.
fn process_fds(proc_dir: &Dir, pid: u32, targets: &Targets, bufs: &mut Buffers) -> Fds {
    let Buffers {
        dents,
        link,
        fd_names,
        path,
        ..
    } = bufs;
    let fd_dir = match proc_dir.sub(pid_path(path, pid, "fd")) {
        Ok(d) => d,
        Err(e) if vanished(&e) => return Fds::Gone,
        Err(e) => {
            tracing::debug!(pid, error = %e, "cannot open fd directory");
            return Fds::Denied;
        }
    };
    fd_names.clear();
    // procfs lists every fd in one getdents64 call unless the buffer fills up.
    match fd_dir.for_each(dents, true, |n| fd_names.extend_from_slice(n.to_bytes_with_nul())) {
        Ok(()) => {}
        Err(e) if vanished(&e) => return Fds::Gone,
        Err(e) => {
            tracing::debug!(pid, error = %e, "cannot list fds");
            return Fds::Denied;
        }
    }
    let mut nodes = Vec::new();
    let mut rest = &fd_names[..];
    while let Ok(name) = CStr::from_bytes_until_nul(rest) {
        rest = &rest[name.to_bytes_with_nul().len()..];
        let target = match fd_dir.readlink(name, link) {
            Ok(t) => t,
            // The listing is allowed but the links are not (ptrace access check fails,
            // e.g. for a process outside our user namespace): as good as unreadable.
            Err(e) if denied(&e) => return Fds::Denied,
            Err(_) => continue, // closed meanwhile
        };
        if let Some(i) = targets.lookup(target, || fd_dir.stat_id(name).ok()) {
            if !nodes.contains(&i) {
                nodes.push(i);
            }
        }
    }
    Fds::Read(nodes)
}

fn is_persistenced(proc_dir: &Dir, pid: u32, bufs: &mut Buffers) -> bool {
    bufs.read(proc_dir, pid, "comm")
        .is_some_and(|c| c.strip_suffix(b"\n").unwrap_or(c) == PERSISTENCED_COMM.as_bytes())
}

/// `Name:` from `/proc/<pid>/status`: the comm, with `\\` and `\n` escaped by the kernel.
pub fn parse_status_name(status: &str) -> Option<String> {
    let raw = status.lines().find_map(|l| l.strip_prefix("Name:"))?;
    let raw = raw.strip_prefix('\t').unwrap_or(raw);
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(o) => out.push(o),
                None => out.push('\\'),
            },
            (c, false) => out.push(c),
        }
    }
    Some(out)
}

/// `status` through its `Uid:` line (all of it if there is none). Name and uid are in the
/// first ten lines of a ~1.4 KB file, and checking the whole file as UTF-8 and splitting
/// it into lines twice was a third of the scan's user time at 1000 holders. `Name:` can't
/// hide a "\nUid:": the kernel escapes a newline in a name as `\n`.
fn status_head(status: &[u8]) -> &[u8] {
    let Some(uid) = status.windows(5).position(|w| w == b"\nUid:") else {
        return status;
    };
    match status[uid + 1..].iter().position(|&b| b == b'\n') {
        Some(end) => &status[..uid + 1 + end + 1],
        None => status,
    }
}

/// The details of a process found holding something, `user` left empty for the caller;
/// None when it exited meanwhile. Reads `status` once (name and real uid), `cmdline` and
/// `cgroup`.
fn describe(
    proc_dir: &Dir,
    found: &Found,
    nodes: &[GpuNode],
    nvidia: bool,
    bufs: &mut Buffers,
) -> Option<Holder> {
    let pid = found.pid;
    let status = String::from_utf8_lossy(status_head(bufs.read(proc_dir, pid, "status")?));
    let command = parse_status_name(&status)?;
    let uid = parse_status_uid(&status)?;
    let cmdline = bufs
        .read(proc_dir, pid, "cmdline")
        .map(parse_cmdline)
        .unwrap_or_default();
    let cgroup = bufs
        .read(proc_dir, pid, "cgroup")
        .map(|c| String::from_utf8_lossy(c).into_owned());
    let unit = cgroup.as_deref().and_then(parse_cgroup_unit);
    let container = cgroup.as_deref().and_then(crate::containers::parse_cgroup);
    let mut paths: Vec<PathBuf> = found.nodes.iter().map(|&i| nodes[i].path.clone()).collect();
    paths.sort();
    paths.dedup();
    let persistenced = found.persistenced_without_fds || (nvidia && command == PERSISTENCED_COMM);
    let vm = qemu_vm(&command, &cmdline);
    Some(Holder {
        vm,
        pid: found.pid,
        command,
        cmdline,
        uid,
        user: String::new(),
        unit,
        paths,
        reason: persistenced.then(|| PERSISTENCED_REASON.to_owned()),
        container,
    })
}

/// The VM a QEMU process runs: the guest name of its `-name` option, as libvirt writes it
/// (`-name guest=win11,debug-threads=on`) or as people do (`-name win11`); QEMU's option
/// syntax doubles a comma inside a value. None for a process that is not a QEMU (its
/// `comm` or program name starts with `qemu`) or has no name.
pub fn qemu_vm(command: &str, cmdline: &[String]) -> Option<String> {
    let program = cmdline
        .first()
        .map(|p| p.rsplit('/').next().unwrap_or(p))
        .unwrap_or_default();
    if !command.starts_with("qemu") && !program.starts_with("qemu") {
        return None;
    }
    let value = cmdline
        .windows(2)
        .find(|w| w[0] == "-name" || w[0] == "--name")
        .map(|w| w[1].as_str())?;
    // Split at single commas; ",," is a literal comma.
    let mut parts = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut()?.push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut()?.push(c);
        }
    }
    let name = parts
        .iter()
        .enumerate()
        .find_map(|(i, p)| match p.split_once('=') {
            Some(("guest", v)) => Some(v.to_owned()),
            // The first part without a key is the guest name (QEMU's implied key).
            None if i == 0 => Some(p.clone()),
            _ => None,
        })?;
    (!name.is_empty()).then_some(name)
}

/// The user name for `uid` (passwd, NSS), or the number when there is none.
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: all-zero is a valid `passwd` for getpwuid_r to fill.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid; `buf` outlives the use of `pwd`'s strings below.
        let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return uid.to_string();
        }
        // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) };
        return OsStr::from_bytes(name.to_bytes()).to_string_lossy().into_owned();
    }
}

fn check_framebuffers(host: &Host, gpu: &Gpu, result: &mut Scan) {
    let iomem_path = host.procfs.join("iomem");
    let iomem = match fs::read_to_string(&iomem_path) {
        Ok(s) => s,
        Err(e) => {
            result.notes.push(format!(
                "cannot read {}: {e}; {FRAMEBUFFERS_UNCHECKED}",
                iomem_path.display()
            ));
            return;
        }
    };
    let regions = parse_iomem(&iomem);
    if iomem_is_redacted(&regions) {
        result.notes.push(format!(
            "{} shows no addresses without root; {FRAMEBUFFERS_UNCHECKED}",
            iomem_path.display()
        ));
        return;
    }
    let bars: Vec<_> = gpu
        .functions
        .iter()
        .map(|f| {
            let resource = host.pci_devices().join(f.address.to_string()).join("resource");
            let bars = fs::read_to_string(resource)
                .map(|r| parse_resource(&r))
                .unwrap_or_default();
            (f.address, bars)
        })
        .collect();
    result.framebuffers = boot_framebuffers(&regions, &bars);
}

/// The command names of the processes under `procfs` whose fds this process cannot read
/// now, sorted, without duplicates: what `[host] uninspectable_ok` would have to list for
/// a scan here to be complete. For tests and the demo, which run wherever they are put
/// (in a container whose PID 1 even root cannot inspect).
pub fn uninspectable_now(procfs: &Path) -> Vec<String> {
    let Ok(proc_dir) = Dir::open(procfs) else {
        return Vec::new();
    };
    let targets = Targets::new(&[]);
    let mut bufs = Buffers::new();
    let mut names = Vec::new();
    for pid in list_pids(&proc_dir).unwrap_or_default() {
        if !matches!(process_fds(&proc_dir, pid, &targets, &mut bufs), Fds::Denied) {
            continue;
        }
        if let Some(c) = bufs.read(&proc_dir, pid, "comm") {
            names.push(String::from_utf8_lossy(c.strip_suffix(b"\n").unwrap_or(c)).into_owned());
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The GPU's VFIO group node `<dev>/vfio/<group>`, when it exists.
fn vfio_node(host: &Host, gpu: &Gpu) -> Option<GpuNode> {
    let node = host
        .dev
        .join("vfio")
        .join(gpu.iommu_group.as_ref()?.id.to_string());
    node.exists().then_some(GpuNode { path: node })
}

/// The processes (normally a VM's QEMU) holding the GPU's VFIO group node
/// `<dev>/vfio/<group>`: while there are any, the GPU must not be taken back.
pub fn vfio_users(host: &Host, gpu: &Gpu) -> Vec<Holder> {
    let Some(node) = vfio_node(host, gpu) else {
        return Vec::new();
    };
    scan(host, gpu, &[node])
        .holders
        .into_iter()
        .filter(|h| !h.paths.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_vm_reads_libvirts_and_plain_name_options() {
        let cmd = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let libvirt = cmd(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=win11,debug-threads=on",
            "-S",
        ]);
        assert_eq!(qemu_vm("qemu-system-x86", &libvirt).as_deref(), Some("win11"));
        let plain = cmd(&["qemu-system-x86_64", "-name", "my,,vm,process=q"]);
        assert_eq!(qemu_vm("qemu-system-x86", &plain).as_deref(), Some("my,vm"));
        assert_eq!(qemu_vm("sleep", &cmd(&["sleep", "-name", "x"])), None);
        assert_eq!(
            qemu_vm("qemu-system-x86", &cmd(&["qemu-system-x86_64", "-S"])),
            None
        );
    }

    #[test]
    fn numbered_names() {
        assert!(numbered("card1", "card"));
        assert!(!numbered("card1-HDMI-A-1", "card"));
        assert!(!numbered("card", "card"));
        assert!(numbered("i2c-12", "i2c-"));
    }

    /// A procfs of `n` processes: every third holds one of `nodes`, every seventh has fds
    /// that cannot be listed, the rest hold /dev/null.
    fn fake_procfs(root: &Path, n: u32, nodes: &[GpuNode]) -> PathBuf {
        let proc = root.join("proc");
        for pid in 100..100 + n {
            let dir = proc.join(pid.to_string());
            fs::create_dir_all(&dir).unwrap();
            if pid % 7 == 0 {
                fs::write(dir.join("fd"), "").unwrap(); // not a directory: unreadable
            } else {
                fs::create_dir(dir.join("fd")).unwrap();
                std::os::unix::fs::symlink("/dev/null", dir.join("fd/0")).unwrap();
                if pid % 3 == 0 {
                    let node = &nodes[pid as usize % nodes.len()].path;
                    std::os::unix::fs::symlink(node, dir.join("fd/3")).unwrap();
                }
            }
            fs::write(dir.join("status"), format!("Name:\tjob{pid}\nUid:\t0\t0\t0\t0\n")).unwrap();
            fs::write(dir.join("cmdline"), format!("job\0{pid}\0")).unwrap();
            fs::write(dir.join("cgroup"), format!("0::/system.slice/job{pid}.service\n")).unwrap();
        }
        proc
    }

    #[test]
    fn threads_split_the_walk_without_changing_the_result() {
        let tmp = tempfile::tempdir().unwrap();
        let nodes: Vec<GpuNode> = ["nvidia0", "nvidiactl"]
            .iter()
            .map(|n| {
                let path = tmp.path().join(n);
                fs::write(&path, "").unwrap();
                GpuNode {
                    path: fs::canonicalize(path).unwrap(),
                }
            })
            .collect();
        let host = Host {
            procfs: fake_procfs(tmp.path(), 600, &nodes),
            ..Host::system()
        };
        let gpu = Gpu {
            address: PciAddress::new(0, 1, 0, 0),
            name: None,
            owner: crate::gpu::Owner::Host,
            functions: Vec::new(),
            iommu_group: None,
        };
        let one = scan_with_threads(&host, &gpu, &nodes, None, Some(1)).0;
        let holding = (100..700u32).filter(|p| p % 3 == 0 && p % 7 != 0).count();
        assert_eq!(one.holders.len(), holding);
        assert_eq!(one.uninspected, (100..700u32).filter(|p| p % 7 == 0).count());
        let h = &one.holders[0];
        assert_eq!(
            (h.pid, h.command.as_str(), h.user.as_str()),
            (102, "job102", "root")
        );
        assert_eq!(h.unit.as_deref(), Some("job102.service"));
        assert_eq!(h.paths, vec![nodes[0].path.clone()]);
        for threads in [2, 3] {
            assert_eq!(
                scan_with_threads(&host, &gpu, &nodes, None, Some(threads)).0,
                one,
                "{threads} threads"
            );
        }
        assert_eq!(scan(&host, &gpu, &nodes), one);
    }

    #[test]
    fn one_walk_finds_the_holders_and_the_vfio_users_the_two_scans_find() {
        let tmp = tempfile::tempdir().unwrap();
        let node = |n: &str| {
            let path = tmp.path().join(n);
            fs::write(&path, "").unwrap();
            GpuNode {
                path: fs::canonicalize(path).unwrap(),
            }
        };
        let gpu_nodes = vec![node("nvidia0"), node("nvidiactl")];
        let vfio = node("13");
        // Every third process holds one of the three (the group node among them), every
        // fifth the group node as well: some hold both.
        let all = [gpu_nodes.clone(), vec![vfio.clone()]].concat();
        let procfs = fake_procfs(tmp.path(), 600, &all);
        for pid in (100..700u32).filter(|p| p % 5 == 0 && p % 7 != 0) {
            std::os::unix::fs::symlink(&vfio.path, procfs.join(format!("{pid}/fd/4"))).unwrap();
        }
        let host = Host {
            procfs,
            ..Host::system()
        };
        let gpu = Gpu {
            address: PciAddress::new(0, 1, 0, 0),
            name: None,
            owner: crate::gpu::Owner::Host,
            functions: Vec::new(),
            iommu_group: None,
        };
        let holders = scan(&host, &gpu, &gpu_nodes);
        let users: Vec<Holder> = scan(&host, &gpu, std::slice::from_ref(&vfio))
            .holders
            .into_iter()
            .filter(|h| !h.paths.is_empty())
            .collect();
        assert!(
            users
                .iter()
                .any(|u| holders.holders.iter().any(|h| h.pid == u.pid))
        );
        assert!(
            users
                .iter()
                .any(|u| holders.holders.iter().all(|h| h.pid != u.pid))
        );
        for threads in [1, 2] {
            let (scan, vfio_users) =
                scan_with_threads(&host, &gpu, &gpu_nodes, Some(vfio.clone()), Some(threads));
            assert_eq!(scan, holders, "{threads} threads");
            assert_eq!(vfio_users, users, "{threads} threads");
        }
    }

    #[test]
    fn status_head_keeps_name_and_uid() {
        let status = b"Name:\tpython3\nUmask:\t0022\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\n";
        let head = status_head(status);
        assert_eq!(
            head,
            b"Name:\tpython3\nUmask:\t0022\nUid:\t1000\t1000\t1000\t1000\n"
        );
        let head = std::str::from_utf8(head).unwrap();
        assert_eq!(parse_status_name(head).as_deref(), Some("python3"));
        assert_eq!(parse_status_uid(head), Some(1000));
        assert_eq!(status_head(b"Name:\tx\nUid:\t7"), b"Name:\tx\nUid:\t7");
        assert_eq!(status_head(b"Name:\tx\n"), b"Name:\tx\n");
    }

    #[test]
    fn lookup_stats_only_candidates() {
        let t = Targets {
            paths: vec![b"/dev/nvidia0".to_vec()],
            names: vec![b"nvidia0".to_vec()],
            ids: vec![Some((5, 42))],
        };
        let never = || -> Option<(u64, u64)> { panic!("stat asked for a non-candidate") };
        assert_eq!(t.lookup(b"/dev/nvidia0", never), Some(0));
        assert_eq!(t.lookup(b"/dev/nvidia0 (deleted)", never), Some(0));
        assert_eq!(t.lookup(b"/dev/null", never), None);
        assert_eq!(t.lookup(b"socket:[1234]", never), None);
        assert_eq!(t.lookup(b"/ns/dev/nvidia0", || Some((5, 42))), Some(0));
        assert_eq!(t.lookup(b"/ns/dev/nvidia0", || Some((5, 43))), None);
    }
}
