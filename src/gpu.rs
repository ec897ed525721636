//! The GPU as sysfs shows it, read-only: every function of the configured slot, their
//! drivers, IDs, `driver_override`, runtime power state and IOMMU group, and from that who
//! owns the GPU. Nothing here opens a device node or wakes the GPU: sysfs attribute reads
//! of `power/runtime_status` and the config-space-free ID files do not resume a
//! suspended device.
//!
//! # What is read
//!
//! Under `<sysfs>/bus/pci/devices/<dddd:bb:dd.f>` for each function 0–7 of the slot:
//! `vendor`, `device`, `class` (mandatory), `driver_override`, `power/runtime_status`, and
//! the `driver` and `iommu_group` links (optional). Under
//! `<sysfs>/kernel/iommu_groups/<n>/devices/*`: each member's `class` and `driver` link.
//! Never `config` (reading config space resumes a runtime-suspended device), never `/dev`.
//!
//! # Never blocking
//!
//! Of these, only `driver_override` can block: its show takes the device's lock on kernels
//! before 7.1, and an unbind stuck in a driver's `remove` holds that lock for as long as it
//! is stuck (the other files and links take no device lock; see the `handoff-kernelsim` crate for
//! the kernel source). So `driver_override` is read through [`crate::sysfs_read`], in a
//! child process with a deadline ([`LOCKED_READ_TIMEOUT`]); a function whose override
//! doesn't come back in time is [`Function::locked`], and the GPU's state is uncertain
//! ([`Gpu::lock_note`]): during a stuck unbind the `driver` link is already gone though the
//! kernel is still inside the driver, so the function reads as unbound.
//!
//! # Who owns the GPU
//!
//! The configured address is the graphics function; the rule, in order:
//!
//! 1. Nothing at the configured address → [`Owner::Absent`].
//! 2. Every function that has a driver counts as *vfio* (`vfio-pci`) or *host* (any other
//!    driver). When both kinds occur → [`Owner::Mixed`]: the GPU is half handed over
//!    (e.g. VGA on vfio-pci, audio still on snd_hda_intel) and neither side can use it.
//!    A function with no driver is neutral: an unbound UCSI function beside host-bound
//!    ones does not make the GPU mixed.
//! 3. The graphics function has no driver → [`Owner::Unbound`].
//! 4. Otherwise the graphics function's side: [`Owner::Vfio`] or [`Owner::Host`].
//!
//! # Names
//!
//! [`device_name`] gives "NVIDIA GeForce RTX 3090 Ti" from a built-in table of the cards
//! this tool is used with, else from the first `pci.ids` found (the bracketed marketing
//! name of the device line), else "NVIDIA device 2203". The table comes first because the
//! bar block reads the GPU on every refresh and `pci.ids` is a 1.4 MB file.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::host::Host;
use crate::pci::PciAddress;
use crate::sysfs_read::{self, Bounded};

pub use crate::sysfs_read::LOCKED_READ_TIMEOUT;

/// The driver that makes a function the VM's.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// Where distributions put `pci.ids` (Debian's `pci.ids` package, Fedora's `hwdata`).
pub const PCI_IDS_PATHS: &[&str] = &["/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids"];

/// Who owns the GPU, as `handoff status --json` names it (ARCHITECTURE.md, "Status").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// Bound to a host driver (nvidia, nouveau, amdgpu, …).
    Host,
    /// Bound to vfio-pci, ready for or in use by a VM.
    Vfio,
    /// No driver at all.
    Unbound,
    /// Nothing at the configured address.
    Absent,
    /// The functions disagree (one on vfio-pci, another on a host driver).
    Mixed,
}

impl fmt::Display for Owner {
    /// One word for a status line: "Linux", "VFIO", "unbound", "absent", "split".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Owner::Host => "Linux",
            Owner::Vfio => "VFIO",
            Owner::Unbound => "unbound",
            Owner::Absent => "absent",
            Owner::Mixed => "split",
        })
    }
}

/// What a function of the slot is, from its PCI class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    Vga,
    Audio,
    Usb,
    Serial,
    Bridge,
    Other,
}

impl FunctionKind {
    /// From the 24-bit class code (`0x030000`): any display controller (VGA, 3D, …) is
    /// [`FunctionKind::Vga`]; 0x0403 HDA audio; 0x0c03 USB; 0x0c80 serial bus (the UCSI
    /// function of USB-C cards); 0x0604 PCI bridge.
    pub fn from_class(class: u32) -> Self {
        match class >> 8 {
            0x0300..=0x03ff => FunctionKind::Vga,
            0x0403 => FunctionKind::Audio,
            0x0c03 => FunctionKind::Usb,
            0x0c80 => FunctionKind::Serial,
            0x0604 => FunctionKind::Bridge,
            _ => FunctionKind::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Function {
    pub address: PciAddress,
    pub kind: FunctionKind,
    /// Bound driver, from the `driver` link; None when unbound.
    pub driver: Option<String>,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    /// `driver_override`, None when the kernel shows "(null)" — or when it could not be
    /// read ([`Function::locked`]).
    pub driver_override: Option<String>,
    /// `driver_override` did not answer within [`LOCKED_READ_TIMEOUT`]: the kernel holds
    /// the device's lock, most likely an unbind stuck in the driver's `remove`. Then
    /// `driver_override` is unknown, and `driver` may say unbound while the kernel is
    /// still inside the old driver.
    pub locked: bool,
    /// `power/runtime_status` (active, suspended, …), None when the file is missing.
    pub runtime_status: Option<String>,
    pub iommu_group: Option<u32>,
}

impl Function {
    /// Which side the function is on: None when unbound.
    fn side(&self) -> Option<Owner> {
        self.driver.as_deref().map(|d| {
            if d == VFIO_DRIVER {
                Owner::Vfio
            } else {
                Owner::Host
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IommuGroup {
    pub id: u32,
    /// Every device in the group, the GPU's own functions included.
    pub members: Vec<IommuMember>,
}

impl IommuGroup {
    /// Members that are neither the GPU's functions nor bridges: each one would have to
    /// go to the VM with the GPU (or be split off with ACS overrides).
    pub fn foreign_members(&self) -> Vec<&IommuMember> {
        self.members
            .iter()
            .filter(|m| !m.gpu_function && !m.bridge)
            .collect()
    }

    /// True when the group holds only the GPU's functions and bridges, so the GPU can be
    /// passed through on its own.
    pub fn viable(&self) -> bool {
        self.foreign_members().is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IommuMember {
    pub address: PciAddress,
    pub class: u32,
    pub driver: Option<String>,
    /// True for the configured slot's functions.
    pub gpu_function: bool,
    /// True for PCI bridges, which may share a group without spoiling passthrough.
    pub bridge: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    pub address: PciAddress,
    /// A human name, e.g. "NVIDIA GeForce RTX 3090 Ti", when known.
    pub name: Option<String>,
    pub owner: Owner,
    /// Every function of the slot, the graphics function first.
    pub functions: Vec<Function>,
    pub iommu_group: Option<IommuGroup>,
}

impl Gpu {
    /// The graphics function (the configured address), None when absent.
    pub fn graphics(&self) -> Option<&Function> {
        self.functions.iter().find(|f| f.address == self.address)
    }

    /// The name without vendor and product line, for a bar: "RTX 3090 Ti"; "GPU" when
    /// nothing is known.
    pub fn short_name(&self) -> String {
        match &self.name {
            Some(name) => short_name(name).to_owned(),
            None => "GPU".to_owned(),
        }
    }

    /// For [`Owner::Mixed`], which function is where, e.g. "0000:01:00.0 on vfio-pci,
    /// 0000:01:00.1 on snd_hda_intel"; None otherwise. Unbound functions are left out.
    pub fn split_description(&self) -> Option<String> {
        if self.owner != Owner::Mixed {
            return None;
        }
        let parts: Vec<String> = self
            .functions
            .iter()
            .filter_map(|f| Some(format!("{} on {}", f.address, f.driver.as_deref()?)))
            .collect();
        Some(parts.join(", "))
    }

    /// The functions whose `driver_override` could not be read: the kernel holds their lock.
    pub fn locked_functions(&self) -> Vec<PciAddress> {
        self.functions
            .iter()
            .filter(|f| f.locked)
            .map(|f| f.address)
            .collect()
    }

    /// Why the state shown is uncertain, when a function is locked; None otherwise.
    pub fn lock_note(&self) -> Option<String> {
        let locked = self.locked_functions();
        if locked.is_empty() {
            return None;
        }
        let list: Vec<String> = locked.iter().map(ToString::to_string).collect();
        Some(format!(
            "driver_override of {} unreadable: the device is locked — an unbind is probably stuck in \
             the kernel (the driver's remove waits for whatever still holds the GPU), so the \
             driver shown may not be the kernel's last word",
            list.join(", ")
        ))
    }

    /// Who owns the GPU, for a status line: "on Linux (nvidia)", "on vfio-pci", "unbound
    /// (no driver)", "not present at 0000:01:00.0", "split: 0000:01:00.0 on vfio-pci, …".
    pub fn owner_phrase(&self) -> String {
        match self.owner {
            Owner::Host => {
                let driver = self.graphics().and_then(|f| f.driver.as_deref()).unwrap_or("?");
                format!("on Linux ({driver})")
            }
            Owner::Vfio => format!("on {VFIO_DRIVER}"),
            Owner::Unbound => "unbound (no driver)".to_owned(),
            Owner::Absent => format!("not present at {}", self.address),
            Owner::Mixed => format!("split: {}", self.split_description().unwrap_or_default()),
        }
    }
}

/// Why the GPU could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list {path}: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error("cannot read the link {path}: {source}")]
    Link { path: PathBuf, source: io::Error },
    #[error("{path} holds {value:?}, expected {expected}")]
    Parse {
        path: PathBuf,
        value: String,
        expected: &'static str,
    },
}

/// Read the GPU at `address` and every function of its slot, naming it with the
/// system's `pci.ids` ([`PCI_IDS_PATHS`]).
pub fn read_gpu(host: &Host, address: PciAddress) -> Result<Gpu, SysfsError> {
    let paths: Vec<&Path> = PCI_IDS_PATHS.iter().map(Path::new).collect();
    read_gpu_with_ids(host, address, &paths)
}

/// [`read_gpu`] with the `pci.ids` files to try, in order (none: built-in names only).
pub fn read_gpu_with_ids(host: &Host, address: PciAddress, pci_ids: &[&Path]) -> Result<Gpu, SysfsError> {
    read_slot(host, address, Some(pci_ids))
}

/// The GPU as far as the holder scan needs it (`handoff blockers`): its functions, their
/// drivers, the owner and the IOMMU group, without a name and without `driver_override`
/// (every function's is None and `locked` false). Those two are for showing the GPU; the
/// overrides cost a forked reader per function ("Never blocking" above), and on a busy
/// machine each such child waits milliseconds for a CPU before the scan can start, while
/// nothing in the scan or its verdict reads them (`owner_of` goes by `driver` alone).
pub fn read_gpu_bindings(host: &Host, address: PciAddress) -> Result<Gpu, SysfsError> {
    read_slot(host, address, None)
}

/// [`read_gpu_with_ids`] (`pci_ids` Some) or [`read_gpu_bindings`] (None).
fn read_slot(host: &Host, address: PciAddress, pci_ids: Option<&[&Path]>) -> Result<Gpu, SysfsError> {
    let devices = host.pci_devices();
    let mut functions = Vec::new();
    // The graphics function first, then the rest of the slot by function number.
    let order = std::iter::once(address.function).chain((0..8).filter(|&f| f != address.function));
    for function in order {
        if let Some(f) = read_function(&devices.join(address.with_function(function).to_string()))? {
            functions.push(f);
        }
    }
    if pci_ids.is_some() {
        read_overrides(&devices, &mut functions);
    }
    let graphics = functions.first().filter(|f| f.address == address);
    let Some(graphics) = graphics else {
        return Ok(Gpu {
            address,
            name: None,
            owner: Owner::Absent,
            functions: Vec::new(),
            iommu_group: None,
        });
    };
    let name = pci_ids.map(|ids| device_name(graphics.vendor, graphics.device, ids));
    let iommu_group = match graphics.iommu_group {
        Some(id) => Some(read_iommu_group(host, id, address)?),
        None => None,
    };
    let owner = owner_of(&functions);
    Ok(Gpu {
        address,
        name,
        owner,
        functions,
        iommu_group,
    })
}

/// The rule in the module doc; `functions[0]` is the graphics function.
fn owner_of(functions: &[Function]) -> Owner {
    let Some(graphics) = functions.first() else {
        return Owner::Absent;
    };
    let sides: Vec<Owner> = functions.iter().filter_map(Function::side).collect();
    if sides.contains(&Owner::Vfio) && sides.contains(&Owner::Host) {
        return Owner::Mixed;
    }
    graphics.side().unwrap_or(Owner::Unbound)
}

/// One function from its directory; None when it is not there (or vanished while being
/// read: a device can fall off the bus at any time).
fn read_function(dir: &Path) -> Result<Option<Function>, SysfsError> {
    let Some(address) = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<PciAddress>().ok())
    else {
        return Ok(None);
    };
    let Some(vendor) = read_hex(&dir.join("vendor"), "a hex vendor ID like 0x10de")? else {
        return Ok(None);
    };
    let Some(device) = read_hex(&dir.join("device"), "a hex device ID like 0x2203")? else {
        return Ok(None);
    };
    let Some(class) = read_hex(&dir.join("class"), "a hex class code like 0x030000")? else {
        return Ok(None);
    };
    let id16 = |value: u32, file: &str| {
        u16::try_from(value).map_err(|_| SysfsError::Parse {
            path: dir.join(file),
            value: format!("0x{value:x}"),
            expected: "a 16-bit ID",
        })
    };
    let (vendor, device) = (id16(vendor, "vendor")?, id16(device, "device")?);
    let iommu_group = match link_name(&dir.join("iommu_group"))? {
        Some(name) => Some(name.parse::<u32>().map_err(|_| SysfsError::Parse {
            path: dir.join("iommu_group"),
            value: name,
            expected: "a link to an IOMMU group number",
        })?),
        None => None,
    };
    Ok(Some(Function {
        address,
        kind: FunctionKind::from_class(class),
        driver: link_name(&dir.join("driver"))?,
        vendor,
        device,
        class,
        // Filled in by `read_overrides`, all functions at once.
        driver_override: None,
        locked: false,
        runtime_status: read_optional(&dir.join("power/runtime_status")),
        iommu_group,
    }))
}

/// Every function's `driver_override`, each in its own child process, within one
/// [`LOCKED_READ_TIMEOUT`] in all (see "Never blocking" above).
fn read_overrides(devices: &Path, functions: &mut [Function]) {
    let paths: Vec<PathBuf> = functions
        .iter()
        .map(|f| devices.join(f.address.to_string()).join("driver_override"))
        .collect();
    let answers = sysfs_read::read_all(&paths, LOCKED_READ_TIMEOUT);
    for ((f, answer), path) in functions.iter_mut().zip(answers).zip(&paths) {
        match answer {
            Bounded::Value(v) => {
                let v = v.trim();
                f.driver_override = (!v.is_empty() && v != "(null)").then(|| v.to_owned());
            }
            Bounded::Missing => {}
            Bounded::Failed(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read sysfs attribute");
            }
            Bounded::Locked => {
                tracing::warn!(path = %path.display(), "driver_override unreadable: the device is locked");
                f.locked = true;
            }
        }
    }
}

fn read_iommu_group(host: &Host, id: u32, gpu: PciAddress) -> Result<IommuGroup, SysfsError> {
    let dir = host
        .sysfs
        .join("kernel/iommu_groups")
        .join(id.to_string())
        .join("devices");
    let entries = std::fs::read_dir(&dir).map_err(|source| SysfsError::List {
        path: dir.clone(),
        source,
    })?;
    let mut members = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| SysfsError::List {
            path: dir.clone(),
            source,
        })?;
        let name = entry.file_name();
        let Some(address) = name.to_str().and_then(|n| n.parse::<PciAddress>().ok()) else {
            tracing::debug!(group = id, member = ?name, "IOMMU group member is not a PCI function");
            continue;
        };
        let path = entry.path();
        let Some(class) = read_hex(&path.join("class"), "a hex class code like 0x030000")? else {
            continue;
        };
        members.push(IommuMember {
            address,
            class,
            driver: link_name(&path.join("driver"))?,
            gpu_function: address.same_slot(&gpu),
            bridge: class >> 8 == 0x0604,
        });
    }
    members.sort_by_key(|m| m.address);
    Ok(IommuGroup { id, members })
}

/// A sysfs hex attribute (`0x10de\n`); None when the file is not there.
fn read_hex(path: &Path, expected: &'static str) -> Result<Option<u32>, SysfsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SysfsError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let value = text.trim();
    value
        .strip_prefix("0x")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .map(Some)
        .ok_or_else(|| SysfsError::Parse {
            path: path.to_owned(),
            value: value.to_owned(),
            expected,
        })
}

/// An attribute that may be missing (older kernels, no runtime PM); a failure to read it
/// only loses that detail.
fn read_optional(path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Some(t.trim().to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read sysfs attribute");
            None
        }
    }
}

/// The file name a link points to (`driver` → "nvidia"); None when there is no link.
fn link_name(path: &Path) -> Result<Option<String>, SysfsError> {
    match std::fs::read_link(path) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SysfsError::Link {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Cards this tool is used with, named the way people know them; checked before
/// `pci.ids`, which may be too old to know a new card (Debian 12's lacks the RTX 50s).
const KNOWN_DEVICES: &[(u16, u16, &str)] = &[
    (0x10de, 0x2203, "GeForce RTX 3090 Ti"),
    (0x10de, 0x2204, "GeForce RTX 3090"),
    (0x10de, 0x2684, "GeForce RTX 4090"),
    (0x10de, 0x2c05, "GeForce RTX 5070 Ti"),
];

/// Short vendor names; `pci.ids` has "NVIDIA Corporation", "Advanced Micro Devices,
/// Inc. [AMD/ATI]".
const KNOWN_VENDORS: &[(u16, &str)] = &[(0x10de, "NVIDIA"), (0x1002, "AMD"), (0x8086, "Intel")];

/// A human name for a PCI device: "NVIDIA GeForce RTX 3090 Ti". Tries the built-in table,
/// then each `pci.ids` in `pci_ids` (the first that exists), then "NVIDIA device 2203".
pub fn device_name(vendor: u16, device: u16, pci_ids: &[&Path]) -> String {
    let short_vendor = KNOWN_VENDORS
        .iter()
        .find(|(v, _)| *v == vendor)
        .map(|(_, n)| (*n).to_owned());
    if let Some((_, _, name)) = KNOWN_DEVICES
        .iter()
        .find(|(v, d, _)| (*v, *d) == (vendor, device))
    {
        let v = short_vendor.as_deref().unwrap_or("");
        return format!("{v} {name}").trim_start().to_owned();
    }
    let mut ids_vendor = None;
    for path in pci_ids {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot read pci.ids");
                continue;
            }
        };
        let text =
            String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        let (v, d) = lookup_pci_ids(&text, vendor, device);
        if let Some(d) = d {
            let v = short_vendor
                .or(v)
                .unwrap_or_else(|| format!("vendor {vendor:04x}"));
            return format!("{v} {}", marketing_name(&d));
        }
        ids_vendor = v;
        break;
    }
    let v = short_vendor
        .or(ids_vendor)
        .unwrap_or_else(|| format!("vendor {vendor:04x}"));
    format!("{v} device {device:04x}")
}

/// Find `vendor` and `device` in the text of a `pci.ids`: (vendor name, device name) as
/// written there. The whole file is read at once because std's substring search finds
/// the vendor line far faster than a line-by-line walk; only the vendor's block is then
/// walked line by line.
pub fn lookup_pci_ids(text: &str, vendor: u16, device: u16) -> (Option<String>, Option<String>) {
    let vendor_key = format!("{vendor:04x}  ");
    let start = if text.starts_with(&vendor_key) {
        0
    } else {
        match text.find(&format!("\n{vendor_key}")) {
            Some(i) => i + 1,
            None => return (None, None),
        }
    };
    let mut lines = text[start..].lines();
    let vendor_name = lines.next().map(|l| l[vendor_key.len()..].trim().to_owned());
    let device_key = format!("\t{device:04x}  ");
    for line in lines {
        match line.as_bytes().first() {
            Some(b'\t') => {
                if let Some(name) = line.strip_prefix(&device_key) {
                    return (vendor_name, Some(name.trim().to_owned()));
                }
            }
            Some(b'#') | None => {}
            // The next vendor (or the class section): the device is not listed.
            Some(_) => break,
        }
    }
    (vendor_name, None)
}

/// "GA102 [GeForce RTX 3090 Ti]" → "GeForce RTX 3090 Ti": the bracket holds the name on
/// the box; the chip name before it means nothing to most people.
fn marketing_name(pci_ids_name: &str) -> &str {
    if let Some(inner) = pci_ids_name.strip_suffix(']')
        && let Some(open) = inner.rfind('[')
        && !inner[open + 1..].trim().is_empty()
    {
        return inner[open + 1..].trim();
    }
    pci_ids_name
}

/// "NVIDIA GeForce RTX 3090 Ti" → "RTX 3090 Ti".
pub fn short_name(name: &str) -> &str {
    let mut s = name;
    for (_, vendor) in KNOWN_VENDORS {
        if let Some(rest) = s.strip_prefix(vendor).and_then(|r| r.strip_prefix(' ')) {
            s = rest;
            break;
        }
    }
    s.strip_prefix("GeForce ").unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_codes_map_to_kinds() {
        assert_eq!(FunctionKind::from_class(0x030000), FunctionKind::Vga);
        assert_eq!(FunctionKind::from_class(0x030200), FunctionKind::Vga);
        assert_eq!(FunctionKind::from_class(0x040300), FunctionKind::Audio);
        assert_eq!(FunctionKind::from_class(0x0c0330), FunctionKind::Usb);
        assert_eq!(FunctionKind::from_class(0x0c8000), FunctionKind::Serial);
        assert_eq!(FunctionKind::from_class(0x060400), FunctionKind::Bridge);
        assert_eq!(FunctionKind::from_class(0x010802), FunctionKind::Other);
    }

    #[test]
    fn marketing_name_is_the_bracket() {
        assert_eq!(
            marketing_name("GA102 [GeForce RTX 3090 Ti]"),
            "GeForce RTX 3090 Ti"
        );
        assert_eq!(
            marketing_name("GA102 High Definition Audio Controller"),
            "GA102 High Definition Audio Controller"
        );
        assert_eq!(marketing_name("odd []"), "odd []");
    }

    #[test]
    fn short_name_drops_vendor_and_product_line() {
        assert_eq!(short_name("NVIDIA GeForce RTX 3090 Ti"), "RTX 3090 Ti");
        assert_eq!(short_name("Intel UHD Graphics 630"), "UHD Graphics 630");
        assert_eq!(short_name("AMD Radeon RX 6800"), "Radeon RX 6800");
    }

    #[test]
    fn lookup_stops_at_the_end_of_the_vendor_block() {
        let ids = "# c\n10de  NVIDIA Corporation\n\t2203  GA102 [GeForce RTX 3090 Ti]\n\t\t1043 87d5  x\n\
                   10df  Emulex\n\t2782  not this one\n";
        assert_eq!(
            lookup_pci_ids(ids, 0x10de, 0x2782),
            (Some("NVIDIA Corporation".into()), None)
        );
        assert_eq!(
            lookup_pci_ids(ids, 0x10de, 0x2203).1.as_deref(),
            Some("GA102 [GeForce RTX 3090 Ti]")
        );
        assert_eq!(
            lookup_pci_ids(ids, 0x10df, 0x2782).1.as_deref(),
            Some("not this one")
        );
        assert_eq!(lookup_pci_ids(ids, 0x1234, 0x2782), (None, None));
        assert_eq!(
            lookup_pci_ids("10de  NVIDIA\r\n\t2203  X\r\n", 0x10de, 0x2203),
            (Some("NVIDIA".into()), Some("X".into()))
        );
    }
}
