//! The simulated kernel's driver core: what a write to a PCI sysfs control file does (the
//! `handoff-kernelsim` crate: it links FUSE, so it stays out of the core).
//!
//! [`handoff::simulated_tree`] builds a kernel-shaped tree on disk; this module gives writes to its
//! control files (`driver_override`, `bind`, `unbind`, `drivers_probe`, `new_id`,
//! `remove_id`, `remove`, `rescan`) the effects the kernel's driver core gives them, by
//! rearranging that tree. The rules are plain functions over the tree, testable without
//! FUSE; [`fuse`] mounts a view of the tree where a
//! plain `write(2)` reaches them synchronously, the way it reaches the kernel.
//!
//! It can also be told to misbehave, per control file and device: fail the next (or
//! every) write with an errno, or hang it until released, the way `unbind` hangs on a
//! GPU that something still holds. Every write is logged in order, so tests can check
//! the order a binding engine wrote things in.
//!
//! A hung write behaves like one stuck in the kernel (drivers/base/dd.c,
//! `device_release_driver_internal` → `__device_release_driver`):
//! - it holds its device's lock (`device_lock`): every later write that needs that lock
//!   blocks its writer too, until the hung write ends, and then they run in arrival order
//!   (see `Kernel::precheck` for which writes need it: `driver_override`, `bind`,
//!   `unbind` through the same driver, `remove`, a matching `new_id`; not `drivers_probe`,
//!   which sees `dev->driver` still set and returns at once having done nothing);
//! - a hung unbind has already run `driver_sysfs_remove`: the device's `driver` link, the
//!   driver's link back and `DRIVER=` in `uevent` are gone, the device reads as unbound;
//!   when released it stays unbound (no re-probe), even when released "with failure",
//!   because the kernel ignores what `remove` returns;
//! - a read of the locked device's `driver_override` blocks its reader too, until the lock
//!   is free (see [`Kernel::read_waits_for`]); every other read keeps working.
//!
//! Which reads take the device lock (checked in the kernel source): PCI's
//! `driver_override_show` (drivers/pci/pci-sysfs.c) does `device_lock(dev)` around the
//! print in every kernel up to 7.0; "PCI: use generic driver_override infrastructure"
//! (v7.1, backported to 7.0-stable) moved PCI to the driver core's generic attribute
//! (drivers/base/bus.c), whose show takes only the spinlock `dev->driver_override.lock`,
//! so there it doesn't block. The other attributes handoff reads take no device lock:
//! `vendor`, `device`, `class` (`pci_config_attr`: a plain sprintf of cached fields),
//! `resource` (`resource_show`: cached `pci_dev->resource[]`), `power/runtime_status`
//! (drivers/base/power/sysfs.c: reads `dev->power` fields unlocked), and the `driver` and
//! `iommu_group` links (kernfs symlinks: `readlink` never calls into the device). The
//! simulator models the older, blocking kernels, which are what Debian 12 (6.1) and most
//! installed systems run.
//!
//! Not modelled: a hung `remove` also holds the PCI rescan/remove lock (later `rescan` and
//! `remove` writes would wait), a waiting `new_id` has already added its id and probed
//! the devices before the locked one, and `modprobe` skips a locked device instead of
//! waiting for it.
//!
//! What it models of `/dev` (`Kernel::sync_class_devices`): a function's class
//! devices — DRM's `<dev>/drm/card<n>` and `renderD<n>` with `/dev/dri/…` and udev's
//! `by-path` links, ALSA's `<dev>/sound/card<n>` with `/dev/snd/controlC<n>`, `hwC<n>D0`,
//! `pcmC<n>D…` — exist while the driver the kernel has for it (`dev->driver`) is not
//! vfio-pci, and are removed when it unbinds; the rebound driver registers new ones with
//! the lowest free numbers. A removed node goes at once even when a process has it open
//! (devtmpfs; the holder keeps its fd, which reads `… (deleted)`), but its number stays
//! taken until the last holder closes it (`drm_minor_free` runs with the last reference),
//! so a card held through a handoff comes back under the next index. An unbind from the
//! driver of a function with a sound card disconnects the card at once and then waits,
//! holding the device lock like a hung write, until no process has one of its nodes open
//! (`snd_card_free` in snd_hda_intel's `remove`); it ends by itself when the last one
//! closes. A DRM driver's unbind does not wait (DRM hot-unplug). `/dev/vfio/<group>` exists
//! while any function of the group is on vfio-pci (vfio adds the group's cdev with its
//! first device, before the group is viable) and `/dev/vfio/vfio` once vfio-pci is
//! registered.
//!
//! Which removed nodes are still open the simulator learns from the file system, not from
//! `/proc`: it puts an inotify watch on a node just before removing it, and the node's
//! inode reports `IN_DELETE_SELF` once its last opener closes it (see `nodes.rs`). Reading
//! `/proc/<pid>/fd` inside the FUSE handler deadlocked against a write of the same process
//! stuck in this mount; a non-blocking inotify read cannot wait for anything. A mount polls
//! the queue on a thread of its own to end the sound unbinds (`tests/kernelsim.rs` has a
//! DRM round trip with the card open and a hung write in the same process).
//!
//! Checked against a real kernel (Debian's 6.1 in QEMU, `tests/real_kernel.rs`, scenarios
//! in `docs/real-kernel.md`), the simulator agrees on: a hung unbind's `driver` link is
//! already gone while its writer is in D state, and the function stays unbound once the
//! holder goes; a read of that device's `driver_override` blocks meanwhile; `drivers_probe`
//! for it returns success at once and binds nothing; a cleared or never-set
//! `driver_override` reads `(null)`; bind/unbind uevents carry `DRIVER=` on bind only; a
//! card held through a handoff comes back under the next index (card0 → card1 there, card1
//! → card2 on the simulated workstation, whose iGPU is card0) and its node is gone while
//! it is away; snd_hda_intel's unbind waits while its control node is open, with the card's
//! nodes already gone; the group's node appears with its first function on vfio-pci.
//! Where it still differs from that kernel (none of it changes what handoff decides, which
//! reads the `driver` link and the class directories as they are when it looks):
//! - a process holding a node through another name of the same file (a hard link, the
//!   simulator's stand-in for a second `mknod` of the same numbers) holds it for as long as
//!   that name exists, open or not; the kernel counts only opens;
//! - which drivers wait in their unbind is decided by class: any sound driver waits for its
//!   card's holders, no DRM driver does; nvidia.ko's own `remove` (with `/dev/nvidia*`
//!   open) hangs only where a test says so (`hang unbind <bdf> nvidia`), and a rule-hung
//!   unbind keeps its class devices until it is released;
//! - a sound function's `remove` (PCI remove) and `rmmod` of its driver do not wait for its
//!   holders; i2c adapters, framebuffers (`graphics/fb<n>`) and the NVIDIA nodes are laid
//!   out once and stay;
//! - vfio-pci's own unbind never waits for an open VFIO device fd (the kernel's does:
//!   `vfio_unregister_group_dev` waits for the device's users). A test process cannot open
//!   a VFIO device fd here (that takes the group's `VFIO_GROUP_GET_DEVICE_FD` ioctl on a
//!   real group), and the group node alone does not make the kernel wait (see
//!   `docs/real-kernel.md`), so a test that wants that hang says so with a hang rule;
//! - ALSA card numbers are taken from the spec's number up (the workstation's onboard
//!   audio, card0, is not simulated); DRM minors from 0 and 128.
//!
//! What the kernel does, and this copies (drivers/base/bus.c, drivers/pci/pci-driver.c):
//! - `driver_override`: the value up to the first newline; empty clears it (`(null)`).
//! - `drivers/<drv>/unbind` ← BDF: detach if bound to `<drv>`, else ENODEV.
//! - `drivers/<drv>/bind` ← BDF: ENODEV if no such device or `<drv>` doesn't match it,
//!   EBUSY if it matches but the device is bound already.
//! - `drivers_probe` ← BDF: ENODEV if no such device; an unbound device goes to the first
//!   registered driver that matches. With an override only that driver matches, so an
//!   override naming an unregistered driver leaves the device unbound (and the write
//!   succeeds).
//! - `new_id` ← "vendor device [subvendor subdevice [class class_mask]]": adds a dynamic id
//!   and probes unbound devices; `remove_id` the reverse (ENODEV if absent).
//! - `<dev>/remove` ← 1: the function and everything behind it leave the bus;
//!   `rescan` ← 1: they come back (without their override, like new devices) and probe.

pub mod fuse;
mod nodes;
mod uevents;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use handoff::pci::PciAddress;
use handoff::simulated_tree::{SimFunction, SimHost, SimSpec, registers_class_devices};

/// An error a control-file write returns, as the kernel would.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const ENODEV: Errno = Errno(libc::ENODEV);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);

    const NAMED: [(&'static str, Errno); 7] = [
        ("EBUSY", Errno::EBUSY),
        ("ENODEV", Errno::ENODEV),
        ("EINVAL", Errno::EINVAL),
        ("EIO", Errno::EIO),
        ("ENOENT", Errno::ENOENT),
        ("EEXIST", Errno::EEXIST),
        ("ENOMEM", Errno::ENOMEM),
    ];

    /// The `io::Error` a writer sees.
    pub fn to_io(self) -> io::Error {
        io::Error::from_raw_os_error(self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Errno::NAMED.iter().find(|(_, e)| e == self) {
            Some((name, _)) => f.write_str(name),
            None => write!(f, "errno {}", self.0),
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Errno {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Errno::NAMED
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(s))
            .map(|(_, e)| *e)
            .or_else(|| s.parse().ok().filter(|n| *n > 0).map(Errno))
            .ok_or_else(|| format!("{s:?} is not an errno (EBUSY, ENODEV, EINVAL, EIO, … or a number)"))
    }
}

/// Which kind of control file; what fault rules match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    DriverOverride,
    Bind,
    Unbind,
    NewId,
    RemoveId,
    DriversProbe,
    Remove,
    Rescan,
    /// Any other writable attribute: the value is stored, nothing else happens.
    Attribute,
}

impl FileKind {
    pub fn name(self) -> &'static str {
        match self {
            FileKind::DriverOverride => "driver_override",
            FileKind::Bind => "bind",
            FileKind::Unbind => "unbind",
            FileKind::NewId => "new_id",
            FileKind::RemoveId => "remove_id",
            FileKind::DriversProbe => "drivers_probe",
            FileKind::Remove => "remove",
            FileKind::Rescan => "rescan",
            FileKind::Attribute => "attribute",
        }
    }
}

impl FromStr for FileKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use FileKind::*;
        [
            DriverOverride,
            Bind,
            Unbind,
            NewId,
            RemoveId,
            DriversProbe,
            Remove,
            Rescan,
            Attribute,
        ]
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| {
            format!(
                "{s:?} is not a control file (driver_override, bind, unbind, new_id, remove_id, \
                     drivers_probe, remove, rescan)"
            )
        })
    }
}

/// A control file, identified from its path under `sys/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlFile {
    DriverOverride(PciAddress),
    Remove(PciAddress),
    /// `<dev>/rescan`: rescans the bus, like `bus/pci/rescan`.
    DeviceRescan(PciAddress),
    Bind(String),
    Unbind(String),
    NewId(String),
    RemoveId(String),
    DriversProbe,
    Rescan,
    Attribute(PathBuf),
}

impl ControlFile {
    /// What a physical path under `sys/` (no links in it) is.
    pub fn classify(rel: &Path) -> ControlFile {
        let parts: Vec<&str> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => s.to_str(),
                _ => None,
            })
            .collect();
        match parts.as_slice() {
            ["bus", "pci", "drivers_probe"] => return ControlFile::DriversProbe,
            ["bus", "pci", "rescan"] => return ControlFile::Rescan,
            ["bus", "pci", "drivers", drv, file] => {
                let drv = (*drv).to_owned();
                match *file {
                    "bind" => return ControlFile::Bind(drv),
                    "unbind" => return ControlFile::Unbind(drv),
                    "new_id" => return ControlFile::NewId(drv),
                    "remove_id" => return ControlFile::RemoveId(drv),
                    _ => {}
                }
            }
            [.., dev, file] if dev.parse::<PciAddress>().is_ok() => {
                let a: PciAddress = dev.parse().expect("checked above");
                match *file {
                    "driver_override" => return ControlFile::DriverOverride(a),
                    "remove" => return ControlFile::Remove(a),
                    "rescan" => return ControlFile::DeviceRescan(a),
                    _ => {}
                }
            }
            _ => {}
        }
        ControlFile::Attribute(rel.to_owned())
    }

    pub fn kind(&self) -> FileKind {
        match self {
            ControlFile::DriverOverride(_) => FileKind::DriverOverride,
            ControlFile::Remove(_) => FileKind::Remove,
            ControlFile::DeviceRescan(_) | ControlFile::Rescan => FileKind::Rescan,
            ControlFile::Bind(_) => FileKind::Bind,
            ControlFile::Unbind(_) => FileKind::Unbind,
            ControlFile::NewId(_) => FileKind::NewId,
            ControlFile::RemoveId(_) => FileKind::RemoveId,
            ControlFile::DriversProbe => FileKind::DriversProbe,
            ControlFile::Attribute(_) => FileKind::Attribute,
        }
    }

    /// The driver whose directory the file is in.
    pub fn driver(&self) -> Option<&str> {
        match self {
            ControlFile::Bind(d)
            | ControlFile::Unbind(d)
            | ControlFile::NewId(d)
            | ControlFile::RemoveId(d) => Some(d),
            _ => None,
        }
    }

    /// The device a write is about: the file's own device, or the BDF written.
    fn device(&self, value: &str) -> Option<PciAddress> {
        match self {
            ControlFile::DriverOverride(a) | ControlFile::Remove(a) | ControlFile::DeviceRescan(a) => {
                Some(*a)
            }
            ControlFile::Bind(_) | ControlFile::Unbind(_) | ControlFile::DriversProbe => exact_bdf(value),
            _ => None,
        }
    }
}

/// Short names the log uses: `0000:01:00.0/driver_override`, `nvidia/unbind`,
/// `drivers_probe`, `vfio-pci/new_id`, `rescan`, or the path of any other attribute.
impl fmt::Display for ControlFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlFile::DriverOverride(a) => write!(f, "{a}/driver_override"),
            ControlFile::Remove(a) => write!(f, "{a}/remove"),
            ControlFile::DeviceRescan(a) => write!(f, "{a}/rescan"),
            ControlFile::Bind(d) => write!(f, "{d}/bind"),
            ControlFile::Unbind(d) => write!(f, "{d}/unbind"),
            ControlFile::NewId(d) => write!(f, "{d}/new_id"),
            ControlFile::RemoveId(d) => write!(f, "{d}/remove_id"),
            ControlFile::DriversProbe => f.write_str("drivers_probe"),
            ControlFile::Rescan => f.write_str("rescan"),
            ControlFile::Attribute(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A BDF the way the kernel's `bus_find_device_by_name` takes it: the exact device name,
/// a trailing newline allowed. The short form `01:00.0` names no device.
fn exact_bdf(value: &str) -> Option<PciAddress> {
    let v = value.trim_end_matches('\n');
    v.parse::<PciAddress>().ok().filter(|a| a.to_string() == v)
}

/// What to do to a write a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Return this errno; nothing happens.
    Fail(Errno),
    /// Block the writer until [`Kernel::release`].
    Hang,
}

/// Misbehave on writes to one kind of control file, optionally only for one device
/// (the file's own, or the BDF written) and one driver's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    pub file: FileKind,
    pub device: Option<PciAddress>,
    pub driver: Option<String>,
    pub fault: Fault,
    /// True: every matching write; false: the next one only.
    pub always: bool,
}

impl FaultRule {
    /// Fail the next write to `file` with `errno`.
    pub fn fail(file: FileKind, errno: Errno) -> Self {
        FaultRule {
            file,
            device: None,
            driver: None,
            fault: Fault::Fail(errno),
            always: false,
        }
    }

    /// Hang the next write to `file` until released.
    pub fn hang(file: FileKind) -> Self {
        FaultRule {
            fault: Fault::Hang,
            ..FaultRule::fail(file, Errno::EIO)
        }
    }

    pub fn device(mut self, device: PciAddress) -> Self {
        self.device = Some(device);
        self
    }

    pub fn driver(mut self, driver: &str) -> Self {
        self.driver = Some(driver.to_owned());
        self
    }

    /// Every matching write, not just the next.
    pub fn always(mut self) -> Self {
        self.always = true;
        self
    }

    fn matches(&self, file: &ControlFile, value: &str) -> bool {
        self.file == file.kind()
            && self.device.is_none_or(|d| file.device(value) == Some(d))
            && self.driver.as_deref().is_none_or(|d| file.driver() == Some(d))
    }
}

impl fmt::Display for FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fault {
            Fault::Fail(e) => write!(f, "fail {} {e}", self.file.name())?,
            Fault::Hang => write!(f, "hang {}", self.file.name())?,
        }
        if let Some(d) = self.device {
            write!(f, " {d}")?;
        }
        if let Some(d) = &self.driver {
            write!(f, " {d}")?;
        }
        f.write_str(if self.always { " always" } else { " once" })
    }
}

/// How a write ended, as the log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    Ok,
    Err(Errno),
    /// Hung by a fault rule, holding its device's lock.
    Hung,
    /// Waiting for a device lock a hung write holds (the kernel's `device_lock`).
    Blocked,
}

impl fmt::Display for WriteResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteResult::Ok => f.write_str("ok"),
            WriteResult::Err(e) => write!(f, "{e}"),
            WriteResult::Hung => f.write_str("hung"),
            WriteResult::Blocked => f.write_str("blocked"),
        }
    }
}

/// One write to the simulated sysfs, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    pub seq: u64,
    pub file: ControlFile,
    /// The value as written (newline included).
    pub value: String,
    pub result: WriteResult,
}

impl WriteRecord {
    /// `("nvidia/unbind", "0000:01:00.0")`: the short file name and the value without its
    /// trailing newline, handy for comparing a sequence.
    pub fn short(&self) -> (String, String) {
        (
            self.file.to_string(),
            self.value.trim_end_matches('\n').to_owned(),
        )
    }
}

/// `<seq> <file> <value> <result>`, the value quoted.
impl fmt::Display for WriteRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {:?} {}", self.seq, self.file, self.value, self.result)
    }
}

/// Names a hung write.
pub type HangId = u64;

/// What a write did: finished (the writer gets this), or blocked — hung by a fault rule,
/// or waiting behind a hung write for a device lock — until [`Kernel::take_finished`]
/// reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done(Result<(), Errno>),
    Hung(HangId),
}

/// How to end a hung write.
///
/// An unbind that hung with the device bound to that driver is past the point of no
/// return: the kernel already removed the driver links and is in the driver's `remove`
/// callback, whose result it ignores (PCI's `remove` returns void). So either way it ends
/// with the device unbound and the writer told the write succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The write goes through, with its effect (the holder let go).
    Complete,
    /// The write fails with this errno, without effect (except an unbind in `remove`: see
    /// above).
    Fail(Errno),
}

#[derive(Debug)]
struct HungWrite {
    id: HangId,
    log_index: usize,
    file: ControlFile,
    data: Vec<u8>,
    /// The devices whose lock the write holds while it hangs.
    locks: Vec<PciAddress>,
    /// An unbind inside the driver's `remove`: the device and the driver it still has
    /// inside the kernel (`dev->driver`), though its links are gone.
    releasing: Option<(PciAddress, String)>,
    /// A sound card's unbind waiting for the processes that have its (already removed)
    /// nodes open: it ends by itself once none does (see [`Kernel::nodes_changed`]).
    until_closed: Vec<PathBuf>,
}

/// A write waiting for device locks, in arrival order.
#[derive(Debug)]
struct Waiting {
    id: HangId,
    log_index: usize,
    file: ControlFile,
    data: Vec<u8>,
    locks: Vec<PciAddress>,
    /// A hang rule matched it on arrival: once it has the locks, it hangs.
    hang: bool,
}

/// What a write does before it takes any device lock (the kernel's unlocked checks).
enum Pre {
    /// Finished without needing a lock.
    Done(Result<(), Errno>),
    /// Needs these devices' locks, then runs [`Kernel::apply_locked`].
    Lock(Vec<PciAddress>),
}

/// A dynamic id added through `new_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DynId {
    vendor: u32,
    device: u32,
    subvendor: u32,
    subdevice: u32,
    class: u32,
    class_mask: u32,
}

const PCI_ANY_ID: u32 = !0;

impl DynId {
    /// `vendor device [subvendor subdevice [class class_mask [driver_data]]]`, hex.
    fn parse(value: &str) -> Result<DynId, Errno> {
        let fields = value
            .split_whitespace()
            .map(|f| u32::from_str_radix(f.trim_start_matches("0x"), 16))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|_| Errno::EINVAL)?;
        if fields.len() < 2 || fields.len() > 7 {
            return Err(Errno::EINVAL);
        }
        let get = |i: usize, default: u32| fields.get(i).copied().unwrap_or(default);
        Ok(DynId {
            vendor: fields[0],
            device: fields[1],
            subvendor: get(2, PCI_ANY_ID),
            subdevice: get(3, PCI_ANY_ID),
            class: get(4, 0),
            class_mask: get(5, 0),
        })
    }

    fn matches(&self, f: &SimFunction) -> bool {
        let any = |want: u32, have: u32| want == PCI_ANY_ID || want == have;
        any(self.vendor, f.vendor.into())
            && any(self.device, f.device.into())
            && any(self.subvendor, f.vendor.into())
            && any(self.subdevice, 0)
            && (self.class ^ f.class) & self.class_mask == 0
    }
}

/// The static id table of the drivers the simulation knows (what `modinfo` would list),
/// reduced to vendor and class.
pub fn supports(driver: &str, f: &SimFunction) -> bool {
    let base_sub = f.class >> 8;
    match driver {
        "nvidia" => f.vendor == 0x10de && matches!(base_sub, 0x0300 | 0x0302),
        "snd_hda_intel" => base_sub == 0x0403,
        "xhci_hcd" => base_sub == 0x0c03,
        "nvidia-gpu" => f.vendor == 0x10de && base_sub == 0x0c80,
        "i915" => f.vendor == 0x8086 && base_sub == 0x0300,
        "pcieport" => base_sub == 0x0604,
        // vfio-pci has no ids of its own: it takes devices by override or `new_id`.
        _ => false,
    }
}

/// The simulated kernel: the tree, the spec it was built from (rescan brings removed
/// functions back from it), the registered drivers, fault rules and the write log.
#[derive(Debug)]
pub struct Kernel {
    sim: SimHost,
    spec: SimSpec,
    /// Registered drivers, in registration order (the order probing tries them).
    drivers: Vec<String>,
    dynids: BTreeMap<String, Vec<DynId>>,
    faults: Vec<FaultRule>,
    log: Vec<WriteRecord>,
    hung: Vec<HungWrite>,
    waiting: Vec<Waiting>,
    finished: Vec<(HangId, Result<(), Errno>)>,
    next_hang: HangId,
    /// Removed device nodes some process still has open.
    removed: nodes::RemovedNodes,
}

impl Kernel {
    /// Build `spec` under `root` (see [`SimHost::build`]) and run it.
    pub fn build(root: &Path, spec: SimSpec) -> io::Result<Kernel> {
        let sim = SimHost::build(root, &spec)?;
        Ok(Kernel::new(sim, spec))
    }

    /// Run the kernel over a tree already built from `spec`.
    pub fn new(sim: SimHost, spec: SimSpec) -> Kernel {
        Kernel {
            drivers: spec.drivers.clone(),
            sim,
            spec,
            dynids: BTreeMap::new(),
            faults: Vec::new(),
            log: Vec::new(),
            hung: Vec::new(),
            waiting: Vec::new(),
            finished: Vec::new(),
            next_hang: 1,
            removed: nodes::RemovedNodes::new(),
        }
    }

    pub fn sim(&self) -> &SimHost {
        &self.sim
    }

    /// The driver `address` is bound to.
    pub fn driver(&self, address: PciAddress) -> Option<String> {
        self.sim.driver(address)
    }

    pub fn is_registered(&self, driver: &str) -> bool {
        self.drivers.iter().any(|d| d == driver)
    }

    /// Every write so far, in arrival order.
    pub fn log(&self) -> &[WriteRecord] {
        &self.log
    }

    pub fn clear_log(&mut self) {
        self.log.clear();
    }

    pub fn inject(&mut self, rule: FaultRule) {
        self.faults.push(rule);
    }

    pub fn faults(&self) -> &[FaultRule] {
        &self.faults
    }

    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Writes hung by a fault rule right now, oldest first.
    pub fn hung(&self) -> Vec<HangId> {
        self.hung.iter().map(|h| h.id).collect()
    }

    /// Writes waiting for a device lock a hung write holds, in arrival order.
    pub fn blocked(&self) -> Vec<HangId> {
        self.waiting.iter().map(|w| w.id).collect()
    }

    /// End hung writes (`None`: all of them). Their writers, and those of the writes
    /// that were waiting for their device locks and could now run, get the result
    /// through [`Kernel::take_finished`]. A waiting write that a hang rule matched hangs
    /// in turn once it has its locks.
    pub fn release(&mut self, id: Option<HangId>, how: Release) {
        let before = self.uevent_snapshot();
        let (ending, keep): (Vec<HungWrite>, Vec<HungWrite>) = std::mem::take(&mut self.hung)
            .into_iter()
            .partition(|h| id.is_none_or(|i| i == h.id));
        self.hung = keep;
        for h in ending {
            let result = match (&h.releasing, how) {
                // `remove` returned: `dev->driver` is cleared, whatever it returned.
                (Some(_), _) => Ok(()),
                (None, Release::Complete) => self.apply(&h.file, &h.data),
                (None, Release::Fail(e)) => Err(e),
            };
            self.finish(h.id, h.log_index, result);
        }
        self.run_waiting();
        self.sync_class_devices();
        self.announce_uevents(&before);
    }

    fn finish(&mut self, id: HangId, log_index: usize, result: Result<(), Errno>) {
        self.log[log_index].result = match result {
            Ok(()) => WriteResult::Ok,
            Err(e) => WriteResult::Err(e),
        };
        self.finished.push((id, result));
    }

    /// Let waiting writes run, in arrival order, once no hung write holds a lock they
    /// need and no earlier waiting write needs it either.
    fn run_waiting(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            let w = &self.waiting[i];
            let busy = w.locks.iter().any(|a| {
                self.hung.iter().any(|h| h.locks.contains(a))
                    || self.waiting[..i].iter().any(|e| e.locks.contains(a))
            });
            if busy {
                i += 1;
                continue;
            }
            let w = self.waiting.remove(i);
            if w.hang {
                self.log[w.log_index].result = WriteResult::Hung;
                self.start_hang(w.id, w.log_index, w.file, w.data, w.locks, Vec::new());
            } else if let Some(held) = self.disconnect_sound(&w.file, &w.data) {
                self.log[w.log_index].result = WriteResult::Hung;
                self.start_hang(w.id, w.log_index, w.file, w.data, w.locks, held);
            } else {
                let result = self.apply_locked(&w.file, &w.data);
                self.finish(w.id, w.log_index, result);
            }
        }
    }

    /// Whether a hung or waiting write holds or waits for any of `locks`.
    fn contended(&self, locks: &[PciAddress]) -> bool {
        locks.iter().any(|a| {
            self.hung.iter().any(|h| h.locks.contains(a)) || self.waiting.iter().any(|w| w.locks.contains(a))
        })
    }

    /// Hang a write holding `locks`. An unbind of a device bound to that driver gets as
    /// far as `__device_release_driver` does before the driver's `remove` callback (where
    /// NVIDIA's blocks): `driver_sysfs_remove` has dropped both driver links, so the device
    /// reads as unbound while `dev->driver` is still set inside the kernel.
    fn start_hang(
        &mut self,
        id: HangId,
        log_index: usize,
        file: ControlFile,
        data: Vec<u8>,
        locks: Vec<PciAddress>,
        until_closed: Vec<PathBuf>,
    ) {
        let mut releasing = None;
        if let ControlFile::Unbind(drv) = &file
            && let Some(a) = exact_bdf(&String::from_utf8_lossy(&data)).filter(|a| self.is_present(*a))
            && self.sim.driver(a).as_deref() == Some(drv.as_str())
        {
            if let Err(e) = self.sim.set_driver(a, None) {
                tracing::warn!("simulated kernel: {e}");
            }
            releasing = Some((a, drv.clone()));
        }
        self.hung.push(HungWrite {
            id,
            log_index,
            file,
            data,
            locks,
            releasing,
            until_closed,
        });
    }

    /// The driver the kernel has for `a` (`dev->driver`): the one whose `remove` a hung
    /// unbind is in, though the links say unbound, else the linked one.
    fn kernel_driver(&self, a: PciAddress) -> Option<String> {
        self.hung
            .iter()
            .find_map(|h| {
                h.releasing
                    .as_ref()
                    .filter(|(d, _)| *d == a)
                    .map(|(_, drv)| drv.clone())
            })
            .or_else(|| self.sim.driver(a))
    }

    /// The device whose lock a read of `rel` (relative to `sys/`) has to wait for right
    /// now, else None. Only `driver_override` takes `device_lock` on read (see the module
    /// doc), and it waits while a hung write holds that lock or a write waits for it
    /// (a mutex's waiters go in turn; the reader gets it after them).
    pub fn read_waits_for(&self, rel: &Path) -> Option<PciAddress> {
        match ControlFile::classify(&self.physical(rel)) {
            ControlFile::DriverOverride(a) if self.contended(&[a]) => Some(a),
            _ => None,
        }
    }

    /// Hung writes that ended since the last call, with what their writers get.
    pub fn take_finished(&mut self) -> Vec<(HangId, Result<(), Errno>)> {
        std::mem::take(&mut self.finished)
    }

    /// Let sound unbinds that wait for the holders of their card's nodes finish once no
    /// process has any of them open (see `Kernel::disconnect_sound`). Called after every
    /// write; a mount also calls it when [`Kernel::node_events`] becomes readable.
    pub fn nodes_changed(&mut self) {
        // Always read the queue, so that a poller is not woken again for the same events.
        let held = self.removed.held();
        let done: Vec<HangId> = self
            .hung
            .iter()
            .filter(|h| !h.until_closed.is_empty() && !h.until_closed.iter().any(|n| held.contains(n)))
            .map(|h| h.id)
            .collect();
        for id in done {
            self.release(Some(id), Release::Complete);
        }
    }

    /// A descriptor that becomes readable when a removed device node's last holder closes
    /// it: when to call [`Kernel::nodes_changed`]. None without inotify.
    pub fn node_events(&self) -> Option<std::os::fd::OwnedFd> {
        self.removed.fd()
    }

    /// An unbind from the driver of a function with a registered sound card does what
    /// snd_hda_intel's `remove` does (sound/core/init.c, `snd_card_free`): disconnect the
    /// card at once — its class devices and `/dev/snd` nodes go, and new opens fail — then
    /// wait until every process that has one of its nodes open has closed it, in D state,
    /// holding the device lock. Returns the nodes still open when the unbind has to wait
    /// (the caller hangs it), None when it can go on.
    fn disconnect_sound(&mut self, file: &ControlFile, data: &[u8]) -> Option<Vec<PathBuf>> {
        let ControlFile::Unbind(drv) = file else {
            return None;
        };
        let a = exact_bdf(&String::from_utf8_lossy(data)).filter(|a| self.is_present(*a))?;
        if self.sim.driver(a).as_deref() != Some(drv.as_str()) || !registers_class_devices(drv) {
            return None;
        }
        self.function(a)?.sound_card?;
        self.sim.sound_card(a)?;
        let removed = self
            .unregister_class_devices(a, false, true)
            .inspect_err(|e| tracing::warn!("simulated kernel: sound card of {a}: {e}"))
            .ok()?;
        let held = self.removed.held_of(&removed);
        (!held.is_empty()).then_some(held)
    }

    /// Whether `a`'s sound card was disconnected by an unbind that still waits for its
    /// holders.
    fn disconnected(&self, a: PciAddress) -> bool {
        self.hung
            .iter()
            .any(|h| !h.until_closed.is_empty() && h.releasing.as_ref().is_some_and(|(d, _)| *d == a))
    }

    /// Make every function's class devices (DRM card and render node, sound card) match the
    /// driver the kernel has for it (`dev->driver`): registered on any driver but vfio-pci,
    /// gone otherwise. A rebound driver gets the lowest free numbers, where a number stays
    /// taken while a process still has its removed node open (`drm_minor_alloc` and
    /// `drm_minor_free` in drivers/gpu/drm/drm_drv.c; DRM hot-unplug lets the driver
    /// unbind with the node open): a card held through a handoff comes back as the next
    /// index, as bochs-drm's card0 came back as card1 on the real kernel.
    fn sync_class_devices(&mut self) {
        let functions: Vec<SimFunction> = self
            .spec
            .functions
            .iter()
            .filter(|f| f.drm.is_some() || f.sound_card.is_some())
            .cloned()
            .collect();
        for f in functions {
            if let Err(e) = self.sync_class_devices_of(&f) {
                tracing::warn!("simulated kernel: class devices of {}: {e}", f.address);
            }
        }
    }

    fn sync_class_devices_of(&mut self, f: &SimFunction) -> io::Result<()> {
        let a = f.address;
        if !self.is_present(a) {
            return Ok(());
        }
        let on = self.kernel_driver(a).is_some_and(|d| registers_class_devices(&d));
        if f.drm.is_some() {
            match (on, self.sim.drm_minors(a)) {
                (true, None) => {
                    let (card, render) = self.free_drm_minors();
                    self.sim.drm_register(a, card, render)?;
                }
                (false, Some(_)) => {
                    self.unregister_class_devices(a, true, false)?;
                }
                _ => {}
            }
        }
        if let Some(from) = f.sound_card {
            match (on && !self.disconnected(a), self.sim.sound_card(a)) {
                (true, None) => {
                    let card = self.free_sound_card(from);
                    self.sim.sound_register(a, card)?;
                }
                (false, Some(_)) => {
                    self.unregister_class_devices(a, false, true)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Remove `a`'s DRM and/or sound class devices and their nodes, watching each node
    /// first so that its holders keep it (and its number) taken. Returns the nodes removed.
    fn unregister_class_devices(
        &mut self,
        a: PciAddress,
        drm: bool,
        sound: bool,
    ) -> io::Result<Vec<PathBuf>> {
        let (drm_nodes, sound_nodes) = self.sim.class_nodes(a);
        let mut removed = Vec::new();
        if drm {
            drm_nodes.iter().for_each(|n| self.removed.watch(n));
            removed.extend(self.sim.drm_unregister(a)?);
        }
        if sound {
            sound_nodes.iter().for_each(|n| self.removed.watch(n));
            removed.extend(self.sim.sound_unregister(a)?);
        }
        Ok(removed)
    }

    /// The lowest free card and render minors: no node of that name, and no removed one
    /// that a process still has open.
    fn free_drm_minors(&mut self) -> (u32, u32) {
        let held = self.removed.held();
        let dri = self.sim.dev().join("dri");
        let free = |prefix: &str, from: u32| {
            (from..from + 64)
                .find(|n| {
                    let node = dri.join(format!("{prefix}{n}"));
                    node.symlink_metadata().is_err() && !held.contains(&node)
                })
                .unwrap_or(from)
        };
        (free("card", 0), free("renderD", 128))
    }

    /// The lowest free ALSA card number from `from` (the spec's: the workstation's onboard
    /// audio, which the simulation leaves out, is card0): no node of that card, and no
    /// removed one still open.
    fn free_sound_card(&mut self, from: u32) -> u32 {
        let held = self.removed.held();
        let snd = self.sim.dev().join("snd");
        let card_of = |p: &Path| -> Option<u32> {
            let name = p.file_name()?.to_str()?;
            let rest = ["controlC", "hwC", "pcmC", "midiC"]
                .iter()
                .find_map(|prefix| name.strip_prefix(prefix))?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        (from..from + 32)
            .find(|n| {
                snd.join(format!("controlC{n}")).symlink_metadata().is_err()
                    && !held
                        .iter()
                        .any(|p| p.parent() == Some(snd.as_path()) && card_of(p) == Some(*n))
            })
            .unwrap_or(from)
    }

    /// `modprobe`: register a driver, and let it take the unbound devices it matches.
    pub fn load_driver(&mut self, name: &str) -> io::Result<()> {
        if self.is_registered(name) {
            return Ok(());
        }
        self.sim.add_driver(name)?;
        self.drivers.push(name.to_owned());
        if name == "vfio-pci" {
            self.sim.add_vfio_container_node()?;
        }
        for a in self.present() {
            // A device a hung write holds is skipped; the kernel's `driver_attach` would
            // wait for its lock (the simulation can't block a control command).
            if self.driver(a).is_none() && self.matches(name, a) && !self.contended(&[a]) {
                self.sim.set_driver(a, Some(name))?;
            }
        }
        self.sync_class_devices();
        Ok(())
    }

    /// `rmmod`: unbind the driver's devices and unregister it.
    pub fn unload_driver(&mut self, name: &str) -> io::Result<()> {
        if !self.is_registered(name) {
            return Ok(());
        }
        for a in self.present() {
            if self.driver(a).as_deref() == Some(name) {
                self.sim.set_driver(a, None)?;
            }
        }
        self.sync_class_devices();
        self.drivers.retain(|d| d != name);
        self.dynids.remove(name);
        fs::remove_dir_all(self.sim.sysfs().join("bus/pci/drivers").join(name))
    }

    /// A write of `data` to the file at `rel` (relative to `sys/`; links are followed in
    /// the backing tree), as `write(2)` on sysfs would do it. A write that needs the lock
    /// of a device a hung write holds waits for it, as `device_lock` makes it wait.
    pub fn write(&mut self, rel: &Path, data: &[u8]) -> Outcome {
        let rel = self.physical(rel);
        let file = ControlFile::classify(&rel);
        let value = String::from_utf8_lossy(data).into_owned();
        let seq = self.log.len() as u64 + 1;
        let log_index = self.log.len();
        let rule = self.faults.iter().position(|r| r.matches(&file, &value));
        let fault = rule.map(|i| {
            let fault = self.faults[i].fault;
            if !self.faults[i].always {
                self.faults.remove(i);
            }
            fault
        });
        let (pre, hang) = match fault {
            Some(Fault::Fail(e)) => (Pre::Done(Err(e)), false),
            Some(Fault::Hang) => (Pre::Lock(self.device_locks(&file, &value)), true),
            None => (self.precheck(&file, &value), false),
        };
        let (outcome, result) = match pre {
            Pre::Done(r) => (
                Outcome::Done(r),
                r.err().map_or(WriteResult::Ok, WriteResult::Err),
            ),
            Pre::Lock(locks) if self.contended(&locks) || hang => {
                let id = self.next_hang;
                self.next_hang += 1;
                if self.contended(&locks) {
                    self.waiting.push(Waiting {
                        id,
                        log_index,
                        file: file.clone(),
                        data: data.to_vec(),
                        locks,
                        hang,
                    });
                    (Outcome::Hung(id), WriteResult::Blocked)
                } else {
                    self.start_hang(id, log_index, file.clone(), data.to_vec(), locks, Vec::new());
                    (Outcome::Hung(id), WriteResult::Hung)
                }
            }
            Pre::Lock(locks) => {
                if let Some(held) = self.disconnect_sound(&file, data) {
                    let id = self.next_hang;
                    self.next_hang += 1;
                    self.start_hang(id, log_index, file.clone(), data.to_vec(), locks, held);
                    (Outcome::Hung(id), WriteResult::Hung)
                } else {
                    let before = self.uevent_snapshot();
                    let r = self.apply_locked(&file, data);
                    self.sync_class_devices();
                    self.announce_uevents(&before);
                    (
                        Outcome::Done(r),
                        r.err().map_or(WriteResult::Ok, WriteResult::Err),
                    )
                }
            }
        };
        tracing::debug!(%file, ?value, %result, "sysfs write");
        self.log.push(WriteRecord {
            seq,
            file,
            value,
            result,
        });
        self.nodes_changed();
        outcome
    }

    /// The devices a write names (the file's own, or the BDF written; with `remove`,
    /// everything behind it): the locks a hung write holds.
    fn device_locks(&self, file: &ControlFile, value: &str) -> Vec<PciAddress> {
        match (file, file.device(value)) {
            (ControlFile::Remove(_), Some(a)) => self.subtree(a),
            (_, Some(a)) => vec![a],
            (_, None) => Vec::new(),
        }
        .into_iter()
        .filter(|a| self.is_present(*a))
        .collect()
    }

    /// The kernel's checks before `device_lock`, and which locks the rest needs
    /// (drivers/base/bus.c, drivers/base/driver.c, drivers/pci/pci-sysfs.c):
    /// - `unbind_store` compares `dev->driver` unlocked: an unbind through another
    ///   driver's directory fails (ENODEV) at once; through the driver whose `remove` is
    ///   hung it waits, then finds nothing left to do and succeeds.
    /// - `bind_store` checks the match unlocked, then `device_driver_attach` locks.
    /// - `drivers_probe_store` (`bus_rescan_devices_helper`) skips a device whose
    ///   `dev->driver` is set, unlocked: during a hung unbind it succeeds at once and does
    ///   nothing.
    /// - `driver_set_override` takes `device_lock` to store the override.
    /// - `remove` (`pci_stop_and_remove_bus_device_locked`) releases the driver of every
    ///   function behind it, each under its lock.
    /// - `new_id` attaches the driver to every device it now matches, each under its lock.
    fn precheck(&self, file: &ControlFile, value: &str) -> Pre {
        let lock = |a: PciAddress| Pre::Lock(vec![a]);
        match file {
            ControlFile::DriverOverride(a) => {
                if value.len() >= 4095 {
                    return Pre::Done(Err(Errno::EINVAL));
                }
                lock(*a)
            }
            ControlFile::Unbind(drv) => match self.device_named(value) {
                Err(e) => Pre::Done(Err(e)),
                Ok(a) if self.kernel_driver(a).as_deref() != Some(drv) => Pre::Done(Err(Errno::ENODEV)),
                Ok(a) => lock(a),
            },
            ControlFile::Bind(drv) => match self.device_named(value) {
                Err(e) => Pre::Done(Err(e)),
                Ok(a) if !self.matches(drv, a) => Pre::Done(Err(Errno::ENODEV)),
                Ok(a) => lock(a),
            },
            ControlFile::DriversProbe => match self.device_named(value) {
                Err(e) => Pre::Done(Err(e)),
                Ok(a) if self.kernel_driver(a).is_some() => Pre::Done(Ok(())),
                Ok(a) => lock(a),
            },
            ControlFile::NewId(drv) => match DynId::parse(value) {
                Err(e) => Pre::Done(Err(e)),
                Ok(id) => Pre::Lock(
                    self.present()
                        .into_iter()
                        .filter(|a| match self.driver_override(*a) {
                            Some(o) => o == *drv,
                            None => self.matches(drv, *a) || self.function(*a).is_some_and(|f| id.matches(f)),
                        })
                        .collect(),
                ),
            },
            ControlFile::Remove(_) => match parse_ulong(value) {
                Err(e) => Pre::Done(Err(e)),
                Ok(0) => Pre::Done(Ok(())),
                Ok(_) => Pre::Lock(self.device_locks(file, value)),
            },
            ControlFile::RemoveId(_)
            | ControlFile::Rescan
            | ControlFile::DeviceRescan(_)
            | ControlFile::Attribute(_) => Pre::Lock(Vec::new()),
        }
    }

    /// `rel` with the links in it resolved, relative to `sys/`.
    fn physical(&self, rel: &Path) -> PathBuf {
        let sys = self.sim.sysfs();
        match (fs::canonicalize(sys.join(rel)), fs::canonicalize(&sys)) {
            (Ok(full), Ok(sys)) => full
                .strip_prefix(&sys)
                .map(Path::to_owned)
                .unwrap_or(rel.to_owned()),
            _ => rel.to_owned(),
        }
    }

    /// The write's effect, with no fault rules in the way.
    fn apply(&mut self, file: &ControlFile, data: &[u8]) -> Result<(), Errno> {
        match self.precheck(file, &String::from_utf8_lossy(data)) {
            Pre::Done(r) => r,
            Pre::Lock(_) => self.apply_locked(file, data),
        }
    }

    /// What a write does once [`Kernel::precheck`] passed and it holds its locks.
    fn apply_locked(&mut self, file: &ControlFile, data: &[u8]) -> Result<(), Errno> {
        let value = String::from_utf8_lossy(data);
        let io = |e: io::Error| {
            tracing::warn!("simulated kernel: {e}");
            Errno::EIO
        };
        match file {
            ControlFile::DriverOverride(a) => {
                if data.len() >= 4095 {
                    return Err(Errno::EINVAL);
                }
                let v = value.split('\n').next().unwrap_or("");
                let v = if v.is_empty() { "(null)" } else { v };
                let path = self.sim.device_dir(*a).join("driver_override");
                fs::write(path, format!("{v}\n")).map_err(io)
            }
            ControlFile::Unbind(drv) => {
                // `device_release_driver_internal`: nothing to do if another unbind got
                // there first.
                let a = self.device_named(&value)?;
                if self.driver(a).as_deref() != Some(drv) {
                    return Ok(());
                }
                self.sim.set_driver(a, None).map_err(io)
            }
            ControlFile::Bind(drv) => {
                let a = self.device_named(&value)?;
                if !self.matches(drv, a) {
                    return Err(Errno::ENODEV);
                }
                if self.driver(a).is_some() {
                    return Err(Errno::EBUSY);
                }
                self.sim.set_driver(a, Some(drv)).map_err(io)
            }
            ControlFile::DriversProbe => {
                let a = self.device_named(&value)?;
                self.probe(a).map_err(io)
            }
            ControlFile::NewId(drv) => {
                let id = DynId::parse(&value)?;
                self.dynids.entry(drv.clone()).or_default().push(id);
                for a in self.present() {
                    if self.driver(a).is_none() && self.matches(drv, a) {
                        self.sim.set_driver(a, Some(drv)).map_err(io)?;
                    }
                }
                Ok(())
            }
            ControlFile::RemoveId(drv) => {
                let id = DynId::parse(&value)?;
                let ids = self.dynids.entry(drv.clone()).or_default();
                let i = ids.iter().position(|d| *d == id).ok_or(Errno::ENODEV)?;
                ids.remove(i);
                Ok(())
            }
            ControlFile::Remove(a) => {
                if parse_ulong(&value)? != 0 {
                    self.remove(*a).map_err(io)?;
                }
                Ok(())
            }
            ControlFile::Rescan | ControlFile::DeviceRescan(_) => {
                if parse_ulong(&value)? != 0 {
                    self.rescan().map_err(io)?;
                }
                Ok(())
            }
            ControlFile::Attribute(rel) => {
                let path = self.sim.sysfs().join(rel);
                if !path.is_file() {
                    return Err(Errno::ENOENT);
                }
                fs::write(path, data).map_err(io)
            }
        }
    }

    /// The present device a BDF written to a control file names.
    fn device_named(&self, value: &str) -> Result<PciAddress, Errno> {
        exact_bdf(value)
            .filter(|a| self.is_present(*a))
            .ok_or(Errno::ENODEV)
    }

    fn is_present(&self, a: PciAddress) -> bool {
        self.sim
            .sysfs()
            .join("bus/pci/devices")
            .join(a.to_string())
            .symlink_metadata()
            .is_ok()
    }

    /// Present functions, in spec (bus) order.
    fn present(&self) -> Vec<PciAddress> {
        self.spec
            .functions
            .iter()
            .map(|f| f.address)
            .filter(|a| self.is_present(*a))
            .collect()
    }

    fn function(&self, a: PciAddress) -> Option<&SimFunction> {
        self.spec.functions.iter().find(|f| f.address == a)
    }

    /// The device's `driver_override`, None when `(null)`.
    pub fn driver_override(&self, a: PciAddress) -> Option<String> {
        let s = fs::read_to_string(self.sim.device_dir(a).join("driver_override")).ok()?;
        let s = s.trim_end_matches('\n');
        (s != "(null)" && !s.is_empty()).then(|| s.to_owned())
    }

    /// `pci_bus_match`: an override names the only driver that matches; otherwise the
    /// driver's dynamic ids, then its static table.
    fn matches(&self, driver: &str, a: PciAddress) -> bool {
        let Some(f) = self.function(a) else {
            return false;
        };
        if let Some(o) = self.driver_override(a) {
            return o == driver;
        }
        self.dynids
            .get(driver)
            .is_some_and(|ids| ids.iter().any(|id| id.matches(f)))
            || supports(driver, f)
    }

    /// `device_attach`: an unbound device goes to the first registered driver that matches.
    fn probe(&self, a: PciAddress) -> io::Result<()> {
        if self.driver(a).is_some() {
            return Ok(());
        }
        match self.drivers.iter().find(|d| self.matches(d, a)) {
            Some(d) => self.sim.set_driver(a, Some(d)),
            None => Ok(()),
        }
    }

    /// The function and everything behind it (a bridge's subordinate functions).
    fn subtree(&self, a: PciAddress) -> Vec<PciAddress> {
        let behind = |f: &SimFunction| {
            let mut at = Some(f.address);
            while let Some(x) = at {
                if x == a {
                    return true;
                }
                at = self.function(x).and_then(|f| f.parent);
            }
            false
        };
        self.spec
            .functions
            .iter()
            .filter(|f| behind(f))
            .map(|f| f.address)
            .collect()
    }

    fn depth(&self, a: PciAddress) -> usize {
        let mut depth = 0;
        let mut parent = self.function(a).and_then(|f| f.parent);
        while let Some(p) = parent {
            depth += 1;
            parent = self.function(p).and_then(|f| f.parent);
        }
        depth
    }

    /// `pci_stop_and_remove_bus_device`: deepest first.
    fn remove(&mut self, a: PciAddress) -> io::Result<()> {
        let mut gone: Vec<PciAddress> = self
            .subtree(a)
            .into_iter()
            .filter(|f| self.is_present(*f))
            .collect();
        gone.sort_by_key(|f| std::cmp::Reverse(self.depth(*f)));
        for f in gone {
            self.unregister_class_devices(f, true, true)?;
            self.sim.remove_function(f)?;
        }
        Ok(())
    }

    /// `pci_rescan_bus`: removed functions come back as new devices (no override, no
    /// driver), parents first, then each is probed.
    fn rescan(&mut self) -> io::Result<()> {
        let mut back: Vec<SimFunction> = self
            .spec
            .functions
            .iter()
            .filter(|f| !self.is_present(f.address))
            .cloned()
            .collect();
        back.sort_by_key(|f| self.depth(f.address));
        for f in &back {
            let fresh = SimFunction {
                driver: None,
                ..f.clone()
            };
            self.sim.add_function(&self.spec, &fresh)?;
        }
        for f in &back {
            self.probe(f.address)?;
        }
        Ok(())
    }

    /// Run one line of the control language (what `.simctl` takes, one command a line):
    ///
    /// ```text
    /// fail FILE ERRNO [BDF] [DRIVER] [once|always]   e.g. fail unbind EBUSY 0000:01:00.0
    /// hang FILE [BDF] [DRIVER] [once|always]         e.g. hang unbind nvidia always
    /// release [ERRNO]      end every hung write: complete it, or fail it with ERRNO
    /// clear                forget every fault rule
    /// clear-log            forget the write log
    /// modprobe DRIVER      register a driver (e.g. vfio-pci); rmmod DRIVER the reverse
    /// ```
    ///
    /// Returns what to print, or why the line is wrong.
    pub fn command(&mut self, line: &str) -> Result<String, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => Ok(String::new()),
            ["fail", file, errno, rest @ ..] => {
                let rule = FaultRule::fail(file.parse()?, errno.parse()?);
                self.inject(with_modifiers(rule, rest)?);
                Ok(String::new())
            }
            ["hang", file, rest @ ..] => {
                let rule = FaultRule::hang(file.parse()?);
                self.inject(with_modifiers(rule, rest)?);
                Ok(String::new())
            }
            ["release"] => {
                self.release(None, Release::Complete);
                Ok(String::new())
            }
            ["release", errno] => {
                self.release(None, Release::Fail(errno.parse()?));
                Ok(String::new())
            }
            ["clear"] => {
                self.clear_faults();
                Ok(String::new())
            }
            ["clear-log"] => {
                self.clear_log();
                Ok(String::new())
            }
            ["modprobe", driver] => self
                .load_driver(driver)
                .map(|_| String::new())
                .map_err(|e| e.to_string()),
            ["rmmod", driver] => self
                .unload_driver(driver)
                .map(|_| String::new())
                .map_err(|e| e.to_string()),
            _ => Err(format!(
                "unknown command {line:?}; commands: fail FILE ERRNO [BDF] [DRIVER] [once|always], \
                 hang FILE [BDF] [DRIVER] [once|always], release [ERRNO], clear, clear-log, \
                 modprobe DRIVER, rmmod DRIVER"
            )),
        }
    }

    /// Fault rules and hung writes, one a line (what reading `.simctl` shows).
    pub fn status(&self) -> String {
        let mut s = String::new();
        for r in &self.faults {
            s += &format!("{r}\n");
        }
        for h in &self.hung {
            s += &format!("hung {} {}\n", h.id, self.log[h.log_index]);
        }
        for w in &self.waiting {
            let locks: Vec<String> = w.locks.iter().map(|a| a.to_string()).collect();
            s += &format!(
                "blocked {} {} (waits for {})\n",
                w.id,
                self.log[w.log_index],
                locks.join(" ")
            );
        }
        s
    }

    /// The write log, one record a line (what reading `.simlog` shows).
    pub fn log_text(&self) -> String {
        self.log.iter().map(|r| format!("{r}\n")).collect()
    }
}

/// Send control commands to a mounted simulation from any process: `sysfs` is the mount
/// point. An unknown command fails with EINVAL (the mount logs why).
pub fn send_command(sysfs: &Path, commands: &str) -> io::Result<()> {
    fs::write(sysfs.join(".simctl"), commands)
}

/// The write log of a mounted simulation, one `<seq> <file> "<value>" <result>` a line.
pub fn read_log(sysfs: &Path) -> io::Result<String> {
    fs::read_to_string(sysfs.join(".simlog"))
}

fn with_modifiers(mut rule: FaultRule, words: &[&str]) -> Result<FaultRule, String> {
    for w in words {
        match *w {
            "once" => rule.always = false,
            "always" => rule.always = true,
            w => match exact_bdf(w) {
                Some(a) => rule.device = Some(a),
                None => rule.driver = Some(w.to_owned()),
            },
        }
    }
    Ok(rule)
}

/// `kstrtoul` as sysfs uses it: a number, a trailing newline allowed.
fn parse_ulong(value: &str) -> Result<u64, Errno> {
    value.trim_end_matches('\n').parse().map_err(|_| Errno::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff::simulated_tree::{IGPU, ROOT_PORT, RTX_3090_TI};

    fn kernel(tmp: &Path) -> Kernel {
        Kernel::build(tmp, SimSpec::workstation()).unwrap()
    }

    fn write(k: &mut Kernel, rel: &str, value: &str) -> Result<(), Errno> {
        match k.write(Path::new(rel), value.as_bytes()) {
            Outcome::Done(r) => r,
            Outcome::Hung(id) => panic!("write to {rel} hung ({id})"),
        }
    }

    const GPU: &str = "bus/pci/devices/0000:01:00.0";

    /// The class devices of function `a`: `(sysfs names under drm/ and sound/card*/,
    /// /dev/dri names, /dev/snd names, by-path card target)`.
    fn class_of(k: &Kernel, a: PciAddress) -> (Vec<String>, Vec<String>, Vec<String>, Option<PathBuf>) {
        let names = |d: PathBuf| {
            let mut v: Vec<String> = fs::read_dir(d)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "by-path")
                .collect();
            v.sort();
            v
        };
        let dir = k.sim().device_dir(a);
        let mut sysfs = names(dir.join("drm"));
        for card in names(dir.join("sound")) {
            sysfs.push(card.clone());
            sysfs.extend(names(dir.join("sound").join(card)));
        }
        (
            sysfs,
            names(k.sim().dev().join("dri")),
            names(k.sim().dev().join("snd")),
            fs::read_link(k.sim().dev().join(format!("dri/by-path/pci-{a}-card"))).ok(),
        )
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A child process that has `node` open (as its stdin) until dropped.
    struct Opener(std::process::Child);

    impl Opener {
        fn new(node: &Path) -> Opener {
            Opener(
                std::process::Command::new("sleep")
                    .arg("600")
                    .stdin(fs::File::open(node).unwrap())
                    .spawn()
                    .unwrap(),
            )
        }
    }

    impl Drop for Opener {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// `GPU` to vfio-pci and back, each step through override, unbind and probe.
    fn round_trip(k: &mut Kernel, home: &str) {
        write(k, &format!("{GPU}/driver_override"), "vfio-pci").unwrap();
        write(k, &format!("bus/pci/drivers/{home}/unbind"), "0000:01:00.0").unwrap();
        write(k, "bus/pci/drivers_probe", "0000:01:00.0").unwrap();
        assert_eq!(k.driver(RTX_3090_TI).as_deref(), Some("vfio-pci"));
        write(k, &format!("{GPU}/driver_override"), "\n").unwrap();
        write(k, "bus/pci/drivers/vfio-pci/unbind", "0000:01:00.0").unwrap();
        write(k, "bus/pci/drivers_probe", "0000:01:00.0").unwrap();
        assert_eq!(k.driver(RTX_3090_TI).as_deref(), Some(home));
    }

    #[test]
    fn drm_nodes_go_with_the_driver_and_come_back_with_the_lowest_free_minor() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        let gpu = |k: &Kernel| {
            let (sysfs, dri, _, by_path) = class_of(k, RTX_3090_TI);
            (sysfs, dri, by_path)
        };
        let card = |n: u32| Some(PathBuf::from(format!("../card{n}")));
        assert_eq!(
            gpu(&k),
            (
                strings(&["card1", "renderD129"]),
                strings(&["card0", "card1", "renderD128", "renderD129"]),
                card(1)
            )
        );
        // On vfio-pci: the card, its render node and udev's links are gone (the iGPU's stay).
        write(&mut k, &format!("{GPU}/driver_override"), "vfio-pci").unwrap();
        write(&mut k, "bus/pci/drivers/nvidia/unbind", "0000:01:00.0").unwrap();
        assert_eq!(gpu(&k), (vec![], strings(&["card0", "renderD128"]), None));
        write(&mut k, "bus/pci/drivers_probe", "0000:01:00.0").unwrap();
        assert_eq!(gpu(&k), (vec![], strings(&["card0", "renderD128"]), None));
        write(&mut k, &format!("{GPU}/driver_override"), "\n").unwrap();
        write(&mut k, "bus/pci/drivers/vfio-pci/unbind", "0000:01:00.0").unwrap();
        write(&mut k, "bus/pci/drivers_probe", "0000:01:00.0").unwrap();
        // Nobody held the old card: the same minors.
        assert_eq!(gpu(&k).0, strings(&["card1", "renderD129"]));

        // A process keeps card1 open through the round trip: DRM hot-unplug lets nvidia
        // unbind, the node goes at once (its fd reads "(deleted)"), but the minor stays
        // taken, so the card comes back as card2 — the real kernel's card0 → card1.
        let holder = Opener::new(&k.sim().dev().join("dri/card1"));
        round_trip(&mut k, "nvidia");
        assert_eq!(
            gpu(&k),
            (
                strings(&["card2", "renderD129"]),
                strings(&["card0", "card2", "renderD128", "renderD129"]),
                card(2)
            )
        );
        // Its last holder gone, the minor is free again: the next return takes card1.
        drop(holder);
        round_trip(&mut k, "nvidia");
        assert_eq!(gpu(&k).0, strings(&["card1", "renderD129"]));
        assert_eq!(gpu(&k).2, card(1));
    }

    #[test]
    fn class_devices_follow_remove_rescan_and_rmmod() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        let audio = RTX_3090_TI.with_function(1);
        write(&mut k, "bus/pci/devices/0000:00:01.0/remove", "1").unwrap();
        assert_eq!(class_of(&k, RTX_3090_TI).1, strings(&["card0", "renderD128"]));
        assert_eq!(class_of(&k, audio).2, Vec::<String>::new());
        write(&mut k, "bus/pci/rescan", "1").unwrap();
        assert_eq!(class_of(&k, RTX_3090_TI).0, strings(&["card1", "renderD129"]));
        assert!(class_of(&k, audio).2.contains(&"controlC1".to_owned()));
        k.unload_driver("snd_hda_intel").unwrap();
        assert_eq!(
            class_of(&k, audio),
            (
                vec![],
                strings(&["card0", "card1", "renderD128", "renderD129"]),
                vec![],
                None
            )
        );
        k.load_driver("snd_hda_intel").unwrap();
        assert_eq!(class_of(&k, audio).0[0], "card1");
    }

    #[test]
    fn a_sound_unbind_disconnects_the_card_then_waits_for_its_holders() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        let audio = RTX_3090_TI.with_function(1);
        let nodes = strings(&["controlC1", "hwC1D0", "pcmC1D3p", "pcmC1D7p"]);
        assert_eq!(class_of(&k, audio).2, nodes);

        // Nothing holds it: the unbind returns, the card and its nodes are gone; back home
        // it is card1 again.
        write(&mut k, "bus/pci/drivers/snd_hda_intel/unbind", "0000:01:00.1").unwrap();
        assert_eq!(
            class_of(&k, audio),
            (
                vec![],
                strings(&["card0", "card1", "renderD128", "renderD129"]),
                vec![],
                None
            )
        );
        write(&mut k, "bus/pci/drivers_probe", "0000:01:00.1").unwrap();
        assert_eq!(class_of(&k, audio).2, nodes);

        // A process has controlC1 open: the card is disconnected at once (its nodes go),
        // and the unbind waits, holding the device lock, until the holder closes it.
        let holder = Opener::new(&k.sim().dev().join("snd/controlC1"));
        let Outcome::Hung(id) = k.write(Path::new("bus/pci/drivers/snd_hda_intel/unbind"), b"0000:01:00.1")
        else {
            panic!("the unbind should wait for the holder of controlC1");
        };
        assert_eq!(class_of(&k, audio).2, Vec::<String>::new(), "disconnected first");
        assert_eq!(k.driver(audio), None, "the driver link is already gone");
        assert_eq!(
            k.read_waits_for(Path::new("bus/pci/devices/0000:01:00.1/driver_override")),
            Some(audio)
        );
        // drivers_probe meanwhile: returns at once and binds nothing, as on the kernel.
        write(&mut k, "bus/pci/drivers_probe", "0000:01:00.1").unwrap();
        assert_eq!(k.driver(audio), None);
        k.nodes_changed();
        assert_eq!(k.hung(), vec![id], "still held");
        drop(holder);
        k.nodes_changed();
        assert_eq!(k.hung(), Vec::<HangId>::new());
        assert_eq!(k.take_finished(), vec![(id, Ok(()))]);
        assert_eq!(
            k.driver(audio),
            None,
            "stays unbound, as after the kernel's hung unbind"
        );
        write(&mut k, "bus/pci/drivers_probe", "0000:01:00.1").unwrap();
        assert_eq!(k.driver(audio).as_deref(), Some("snd_hda_intel"));
        assert_eq!(
            class_of(&k, audio).2,
            nodes,
            "its holder gone, card1 is free again"
        );
    }

    #[test]
    fn the_vfio_group_node_is_there_while_any_function_of_the_group_is_on_vfio_pci() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        let group = k.sim().dev().join("vfio/13");
        assert!(
            k.sim().dev().join("vfio/vfio").exists(),
            "vfio-pci registered: the container"
        );
        assert!(!group.exists());
        write(&mut k, &format!("{GPU}/driver_override"), "vfio-pci").unwrap();
        write(&mut k, "bus/pci/drivers/nvidia/unbind", "0000:01:00.0").unwrap();
        assert!(!group.exists(), "unbound is not on vfio-pci");
        write(&mut k, "bus/pci/drivers_probe", "0000:01:00.0").unwrap();
        assert!(
            group.exists(),
            "one function of group 13 on vfio-pci: the group's node"
        );
        write(&mut k, "bus/pci/drivers/vfio-pci/unbind", "0000:01:00.0").unwrap();
        assert!(!group.exists(), "the last one left");
    }

    #[test]
    fn override_unbind_probe_moves_gpu_to_vfio_and_back() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        write(&mut k, &format!("{GPU}/driver_override"), "vfio-pci\n").unwrap();
        assert_eq!(k.driver_override(RTX_3090_TI).as_deref(), Some("vfio-pci"));
        write(&mut k, &format!("{GPU}/driver/unbind"), "0000:01:00.0\n").unwrap();
        assert_eq!(k.driver(RTX_3090_TI), None);
        write(&mut k, "bus/pci/drivers_probe", "0000:01:00.0\n").unwrap();
        assert_eq!(k.driver(RTX_3090_TI).as_deref(), Some("vfio-pci"));

        write(&mut k, &format!("{GPU}/driver_override"), "\n").unwrap();
        assert_eq!(k.driver_override(RTX_3090_TI), None);
        write(&mut k, "bus/pci/drivers/vfio-pci/unbind", "0000:01:00.0").unwrap();
        write(&mut k, "bus/pci/drivers_probe", "0000:01:00.0").unwrap();
        assert_eq!(k.driver(RTX_3090_TI).as_deref(), Some("nvidia"));
        let log: Vec<_> = k.log().iter().map(WriteRecord::short).collect();
        assert_eq!(log[0], ("0000:01:00.0/driver_override".into(), "vfio-pci".into()));
        assert_eq!(log[1], ("nvidia/unbind".into(), "0000:01:00.0".into()));
        assert_eq!(log[4].0, "vfio-pci/unbind");
    }

    #[test]
    fn bind_and_unbind_errors_are_the_kernels() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        let d = "bus/pci/drivers";
        assert_eq!(
            write(&mut k, &format!("{d}/nvidia/bind"), "0000:01:00.0"),
            Err(Errno::EBUSY)
        );
        assert_eq!(
            write(&mut k, &format!("{d}/i915/unbind"), "0000:01:00.0"),
            Err(Errno::ENODEV)
        );
        assert_eq!(
            write(&mut k, &format!("{d}/nvidia/unbind"), "01:00.0"),
            Err(Errno::ENODEV)
        );
        assert_eq!(
            write(&mut k, &format!("{d}/nvidia/bind"), "0000:09:00.0"),
            Err(Errno::ENODEV)
        );
        write(&mut k, &format!("{d}/nvidia/unbind"), "0000:01:00.0").unwrap();
        // vfio-pci has no ids: no override, no new_id, no bind.
        assert_eq!(
            write(&mut k, &format!("{d}/vfio-pci/bind"), "0000:01:00.0"),
            Err(Errno::ENODEV)
        );
        assert_eq!(
            write(&mut k, &format!("{d}/i915/bind"), "0000:01:00.0"),
            Err(Errno::ENODEV)
        );
        write(&mut k, &format!("{d}/nvidia/bind"), "0000:01:00.0\n").unwrap();
        assert_eq!(k.driver(RTX_3090_TI).as_deref(), Some("nvidia"));
        assert_eq!(
            write(&mut k, "bus/pci/drivers_probe", "0000:09:00.0"),
            Err(Errno::ENODEV)
        );
    }

    #[test]
    fn override_to_an_unloaded_driver_leaves_the_device_unbound_until_modprobe() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = SimSpec::workstation();
        spec.drivers.retain(|d| d != "vfio-pci");
        let mut k = Kernel::build(tmp.path(), spec).unwrap();
        let audio = RTX_3090_TI.with_function(1);
        let dev = "bus/pci/devices/0000:01:00.1";
        write(&mut k, &format!("{dev}/driver_override"), "vfio-pci").unwrap();
        write(&mut k, &format!("{dev}/driver/unbind"), "0000:01:00.1").unwrap();
        write(&mut k, "bus/pci/drivers_probe", "0000:01:00.1").unwrap();
        assert_eq!(k.driver(audio), None);
        assert!(!k.sim().sysfs().join("bus/pci/drivers/vfio-pci").exists());
        k.command("modprobe vfio-pci").unwrap();
        assert_eq!(k.driver(audio).as_deref(), Some("vfio-pci"));
        // The GPU itself has no override: loading vfio-pci doesn't touch it.
        assert_eq!(k.driver(RTX_3090_TI).as_deref(), Some("nvidia"));
    }

    #[test]
    fn new_id_takes_unbound_matching_devices_and_remove_id_forgets() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        write(&mut k, "bus/pci/drivers/nvidia/unbind", "0000:01:00.0").unwrap();
        write(&mut k, "bus/pci/drivers/vfio-pci/new_id", "10de 2203\n").unwrap();
        assert_eq!(k.driver(RTX_3090_TI).as_deref(), Some("vfio-pci"));
        assert_eq!(
            write(&mut k, "bus/pci/drivers/vfio-pci/new_id", "10de"),
            Err(Errno::EINVAL)
        );
        write(&mut k, "bus/pci/drivers/vfio-pci/remove_id", "10de 2203").unwrap();
        assert_eq!(
            write(&mut k, "bus/pci/drivers/vfio-pci/remove_id", "10de 2203"),
            Err(Errno::ENODEV)
        );
    }

    #[test]
    fn remove_takes_the_subtree_and_rescan_brings_it_back_probed() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        write(&mut k, &format!("{GPU}/driver_override"), "vfio-pci").unwrap();
        write(&mut k, "bus/pci/devices/0000:00:01.0/remove", "1\n").unwrap();
        let devices = k.sim().sysfs().join("bus/pci/devices");
        assert!(!devices.join("0000:00:01.0").exists());
        assert!(!devices.join("0000:01:00.3").exists());
        assert!(devices.join("0000:00:02.0").exists());
        assert!(
            !k.sim()
                .sysfs()
                .join("bus/pci/drivers/nvidia/0000:01:00.0")
                .exists()
        );
        assert_eq!(write(&mut k, "bus/pci/rescan", "x"), Err(Errno::EINVAL));
        write(&mut k, "bus/pci/rescan", "1").unwrap();
        assert_eq!(k.driver(ROOT_PORT).as_deref(), Some("pcieport"));
        // A new device has no override: the GPU goes back to nvidia.
        assert_eq!(k.driver(RTX_3090_TI).as_deref(), Some("nvidia"));
        assert_eq!(
            k.driver(RTX_3090_TI.with_function(3)).as_deref(),
            Some("nvidia-gpu")
        );
        assert_eq!(k.driver(IGPU).as_deref(), Some("i915"));
    }

    #[test]
    fn faults_match_file_and_device_and_hangs_complete_on_release() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        k.command("fail unbind EBUSY 0000:01:00.1").unwrap();
        k.command("hang unbind nvidia").unwrap();
        assert_eq!(
            write(&mut k, "bus/pci/drivers/xhci_hcd/unbind", "0000:01:00.2"),
            Ok(())
        );
        assert_eq!(
            write(&mut k, "bus/pci/drivers/snd_hda_intel/unbind", "0000:01:00.1"),
            Err(Errno::EBUSY)
        );
        assert_eq!(
            k.driver(RTX_3090_TI.with_function(1)).as_deref(),
            Some("snd_hda_intel")
        );
        let Outcome::Hung(id) = k.write(Path::new("bus/pci/drivers/nvidia/unbind"), b"0000:01:00.0") else {
            panic!("should hang");
        };
        // Inside `remove`: the links are gone already.
        assert_eq!(k.driver(RTX_3090_TI), None);
        assert!(k.status().contains("hung 1 "), "{}", k.status());
        k.command("release").unwrap();
        assert_eq!(k.take_finished(), vec![(id, Ok(()))]);
        assert_eq!(k.driver(RTX_3090_TI), None);
        assert_eq!(k.log()[2].result, WriteResult::Ok);
        assert_eq!(k.log()[1].result, WriteResult::Err(Errno::EBUSY));
        assert!(k.command("hang frobnicate").is_err());
        assert!(k.command("fail unbind ENOTANERRNO").is_err());
    }

    fn uevent(k: &Kernel, a: PciAddress) -> String {
        fs::read_to_string(k.sim().device_dir(a).join("uevent")).unwrap()
    }

    #[test]
    fn a_hung_unbind_drops_the_links_and_holds_the_device_lock_like_the_kernel() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        let drivers = "bus/pci/drivers";
        let audio = RTX_3090_TI.with_function(1);
        k.command("hang unbind 0000:01:00.0 nvidia").unwrap();
        let Outcome::Hung(hung) = k.write(Path::new("bus/pci/drivers/nvidia/unbind"), b"0000:01:00.0\n")
        else {
            panic!("should hang");
        };
        // driver_sysfs_remove ran before the driver's remove callback.
        assert_eq!(k.driver(RTX_3090_TI), None);
        assert!(
            !k.sim()
                .sysfs()
                .join("bus/pci/drivers/nvidia/0000:01:00.0")
                .exists()
        );
        assert!(
            !uevent(&k, RTX_3090_TI).contains("DRIVER="),
            "{}",
            uevent(&k, RTX_3090_TI)
        );
        // No lock needed, or checked before it: answered at once.
        assert_eq!(write(&mut k, "bus/pci/drivers_probe", "0000:01:00.0"), Ok(()));
        assert_eq!(k.driver(RTX_3090_TI), None, "drivers_probe saw dev->driver set");
        assert_eq!(
            write(&mut k, &format!("{drivers}/vfio-pci/unbind"), "0000:01:00.0"),
            Err(Errno::ENODEV)
        );
        assert_eq!(
            write(&mut k, &format!("{drivers}/i915/bind"), "0000:01:00.0"),
            Err(Errno::ENODEV)
        );
        write(&mut k, &format!("{drivers}/snd_hda_intel/unbind"), "0000:01:00.1").unwrap();
        assert_eq!(k.driver(audio), None, "another device is not locked");
        // Writes that need the lock block, in order.
        let mut blocked = Vec::new();
        for (file, value) in [
            (format!("{GPU}/driver_override"), "vfio-pci\n"),
            (format!("{drivers}/nvidia/unbind"), "0000:01:00.0"),
            (format!("{drivers}/nvidia/bind"), "0000:01:00.0"),
        ] {
            match k.write(Path::new(&file), value.as_bytes()) {
                Outcome::Hung(id) => blocked.push(id),
                Outcome::Done(r) => panic!("{file} should block, got {r:?}"),
            }
        }
        assert_eq!(k.blocked(), blocked);
        assert_eq!(k.hung(), vec![hung]);
        assert!(
            k.status().contains("blocked 2 6 0000:01:00.0/driver_override"),
            "{}",
            k.status()
        );
        assert_eq!(k.log()[5].result, WriteResult::Blocked);
        assert_eq!(
            k.driver_override(RTX_3090_TI),
            None,
            "the override waits for the lock"
        );
        assert_eq!(k.take_finished(), vec![]);

        // The remove callback fails: the device is unbound all the same. Then the waiting
        // writes run in order: the override lands, the second unbind finds nothing left to
        // do, and nvidia's bind, which matched when it was written, now finds an override
        // naming vfio-pci and fails.
        k.release(None, Release::Fail(Errno::EBUSY));
        let finished = k.take_finished();
        assert_eq!(finished[0], (hung, Ok(())));
        assert_eq!(
            &finished[1..],
            &[
                (blocked[0], Ok(())),
                (blocked[1], Ok(())),
                (blocked[2], Err(Errno::ENODEV))
            ]
        );
        assert_eq!(k.driver_override(RTX_3090_TI).as_deref(), Some("vfio-pci"));
        assert_eq!(k.driver(RTX_3090_TI), None, "no re-probe after an unbind");
        assert!(k.blocked().is_empty() && k.hung().is_empty());
        write(&mut k, "bus/pci/drivers_probe", "0000:01:00.0").unwrap();
        assert_eq!(k.driver(RTX_3090_TI).as_deref(), Some("vfio-pci"));
    }

    #[test]
    fn a_write_waiting_for_a_hung_device_hangs_in_turn_when_a_rule_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let mut k = kernel(tmp.path());
        k.command("hang driver_override 0000:01:00.0 always").unwrap();
        let Outcome::Hung(first) = k.write(Path::new(&format!("{GPU}/driver_override")), b"vfio-pci") else {
            panic!("should hang");
        };
        let Outcome::Hung(second) = k.write(Path::new(&format!("{GPU}/driver_override")), b"\n") else {
            panic!("should block");
        };
        let Outcome::Hung(remove) = k.write(Path::new("bus/pci/devices/0000:00:01.0/remove"), b"1") else {
            panic!("remove of the parent should wait for the GPU's lock");
        };
        assert_eq!(k.blocked(), vec![second, remove]);
        k.release(Some(first), Release::Complete);
        assert_eq!(k.take_finished(), vec![(first, Ok(()))]);
        assert_eq!(k.hung(), vec![second]);
        assert_eq!(k.blocked(), vec![remove]);
        k.release(None, Release::Fail(Errno::EIO));
        assert_eq!(
            k.take_finished(),
            vec![(second, Err(Errno::EIO)), (remove, Ok(()))]
        );
        assert!(!k.sim().sysfs().join("bus/pci/devices/0000:01:00.0").exists());
    }
}
