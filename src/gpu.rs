//! The GPU as sysfs shows it, read-only: every function of the configured slot, their
//! drivers, IDs, `driver_override`, runtime power state and IOMMU group, and from that who
//! owns the GPU. Nothing here opens a device node or wakes the GPU: sysfs attribute reads
//! of `power/runtime_status` and the config-space-free ID files do not resume a
//! suspended device.

use serde::Serialize;

use crate::host::Host;
use crate::pci::PciAddress;

/// Who owns the GPU, as DESIGN.md names it.
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Function {
    pub address: PciAddress,
    pub kind: FunctionKind,
    /// Bound driver, from the `driver` link; None when unbound.
    pub driver: Option<String>,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    /// `driver_override`, None when the kernel shows "(null)".
    pub driver_override: Option<String>,
    /// `power/runtime_status` (active, suspended, …), None when the file is missing.
    pub runtime_status: Option<String>,
    pub iommu_group: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IommuGroup {
    pub id: u32,
    /// Every device in the group, the GPU's own functions included.
    pub members: Vec<IommuMember>,
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

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Read the GPU at `address` and every function of its slot.
pub fn read_gpu(_host: &Host, _address: PciAddress) -> Result<Gpu, SysfsError> {
    todo!("gpu helper")
}
