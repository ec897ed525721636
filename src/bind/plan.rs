//! A handoff as a value: the list of sysfs writes that moves the GPU's functions from
//! where they are to where they should be. Computing it reads nothing, so its order is
//! tested without hardware and `--dry-run` prints exactly what would be done.
//!
//! Host → vfio: vfio-pci is loaded if needed, the restore record is saved before the
//! first change, then per function, the graphics function first (the unbind most likely to
//! hang goes first, so the least has to be undone): `driver_override` = vfio-pci, unbind
//! from the current driver, `drivers_probe`, verify.
//!
//! Vfio → host, in reverse function order: clear `driver_override`, unbind from vfio-pci,
//! `drivers_probe`, verify the function is back on the driver the record says it had; the
//! record is removed only once every function is verified home.

use std::fmt;

use serde::Serialize;

use super::record::RestoreRecord;
use crate::gpu::Gpu;
use crate::host::Host;
use crate::pci::PciAddress;

pub const VFIO: &str = "vfio-pci";

/// Which driver a function must end up on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "driver")]
pub enum Expect {
    Driver(String),
    /// It had no driver before the VM; it should have none after.
    Unbound,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "step")]
pub enum Step {
    /// `modprobe vfio-pci`.
    LoadVfio,
    /// Write the restore record under `[host] run`.
    SaveRecord,
    /// Write `driver` (or clear it) to `<device>/driver_override`.
    SetOverride {
        function: PciAddress,
        driver: Option<String>,
    },
    /// Write the address to `drivers/<driver>/unbind`. Can hang while something holds the device.
    Unbind { function: PciAddress, driver: String },
    /// Write the address to `bus/pci/drivers_probe`.
    Probe { function: PciAddress },
    /// Read the `driver` link back and compare.
    Verify { function: PciAddress, expect: Expect },
    /// Remove the restore record: the GPU is verified home.
    RemoveRecord,
}

impl Step {
    /// The function this step touches, if any.
    pub fn function(&self) -> Option<PciAddress> {
        match self {
            Step::SetOverride { function, .. }
            | Step::Unbind { function, .. }
            | Step::Probe { function }
            | Step::Verify { function, .. } => Some(*function),
            _ => None,
        }
    }

    /// One line for `--dry-run` and progress, naming the file written under `host`.
    pub fn describe(&self, host: &Host) -> String {
        let dev = |f: &PciAddress| host.pci_devices().join(f.to_string());
        match self {
            Step::LoadVfio => "load the vfio-pci module (modprobe vfio-pci)".into(),
            Step::SaveRecord => format!("save the restore record under {}", host.run.display()),
            Step::SetOverride {
                function,
                driver: Some(d),
            } => {
                format!("write {d} to {}", dev(function).join("driver_override").display())
            }
            Step::SetOverride {
                function,
                driver: None,
            } => {
                format!("clear {}", dev(function).join("driver_override").display())
            }
            Step::Unbind { function, driver } => format!(
                "write {function} to {} (unbind from {driver})",
                host.pci_drivers().join(driver).join("unbind").display()
            ),
            Step::Probe { function } => {
                format!(
                    "write {function} to {}",
                    host.sysfs.join("bus/pci/drivers_probe").display()
                )
            }
            Step::Verify {
                function,
                expect: Expect::Driver(d),
            } => format!("check {function} is on {d}"),
            Step::Verify {
                function,
                expect: Expect::Unbound,
            } => format!("check {function} has no driver"),
            Step::RemoveRecord => "remove the restore record".into(),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(&Host::system()))
    }
}

/// Host → vfio for every function of `gpu`. Functions already on vfio-pci with the
/// override set are left alone, so a second run plans only checks.
pub fn to_vfio(gpu: &Gpu, vfio_loaded: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    if !vfio_loaded {
        steps.push(Step::LoadVfio);
    }
    steps.push(Step::SaveRecord);
    for f in &gpu.functions {
        let function = f.address;
        if f.driver_override.as_deref() != Some(VFIO) {
            steps.push(Step::SetOverride {
                function,
                driver: Some(VFIO.into()),
            });
        }
        if f.driver.as_deref() != Some(VFIO) {
            if let Some(d) = &f.driver {
                steps.push(Step::Unbind {
                    function,
                    driver: d.clone(),
                });
            }
            steps.push(Step::Probe { function });
        }
        steps.push(Step::Verify {
            function,
            expect: Expect::Driver(VFIO.into()),
        });
    }
    steps
}

/// Vfio → host. With a record each function returns to the driver it had; without one
/// (the GPU was put on vfio-pci by something else), the graphics function returns to
/// `host_driver` and the others to whatever the kernel probes for them.
pub fn to_host(gpu: &Gpu, record: Option<&RestoreRecord>, host_driver: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    for (i, f) in gpu.functions.iter().enumerate().rev() {
        let function = f.address;
        let expect = match record.and_then(|r| r.function(function)) {
            Some(rf) => rf.driver.clone().map(Expect::Driver).unwrap_or(Expect::Unbound),
            None if i == 0 => Expect::Driver(host_driver.to_owned()),
            // Not in the record and not the graphics function: return it to whatever the
            // kernel picks, verified as "not vfio-pci" by the executor.
            None => Expect::Driver(String::new()),
        };
        // A locked function's override is unknown: clear it to be sure.
        if f.driver_override.is_some() || f.locked {
            steps.push(Step::SetOverride {
                function,
                driver: None,
            });
        }
        let on_target = match &expect {
            Expect::Driver(d) if d.is_empty() => f.driver.as_deref().is_some_and(|d| d != VFIO),
            Expect::Driver(d) => f.driver.as_deref() == Some(d),
            Expect::Unbound => f.driver.is_none(),
        };
        if !on_target {
            if let Some(d) = &f.driver {
                steps.push(Step::Unbind {
                    function,
                    driver: d.clone(),
                });
            }
            if expect != Expect::Unbound {
                steps.push(Step::Probe { function });
            }
        }
        steps.push(Step::Verify { function, expect });
    }
    steps.push(Step::RemoveRecord);
    steps
}
