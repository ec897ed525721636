//! `state.json` under `[host] run`: what the root hook last did, for unprivileged surfaces.
//!
//! The hook rewrites it (atomically, world-readable, no secrets) on every transition; the
//! tray and the block read it and watch it with inotify (DESIGN.md, "Live updates").

use std::io;

use serde::{Deserialize, Serialize};

use crate::bind::record::{now, write_atomic};
use crate::holders::Holder;
use crate::host::Host;
use crate::pci::PciAddress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookPhase {
    /// On the host driver.
    Host,
    /// Moving to vfio-pci for a VM.
    Binding,
    /// On vfio-pci, held for a VM.
    Vfio,
    /// Moving back to the host.
    Returning,
    /// A handoff did not finish; `handoff rebind --force` is needed.
    RestoreRequired,
}

/// The last start the hook refused, and who was to blame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub vm: String,
    /// Unix time.
    pub at: u64,
    pub holders: Vec<Holder>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookState {
    pub version: u32,
    /// Unix time of the last change.
    pub updated: u64,
    pub gpu: PciAddress,
    pub phase: HookPhase,
    /// The VM holding (or about to hold) the GPU.
    pub vm: Option<String>,
    pub last_refusal: Option<Refusal>,
    /// The last failure, in words, with what to do.
    pub last_error: Option<String>,
}

impl HookState {
    pub fn new(gpu: PciAddress) -> Self {
        Self {
            version: 1,
            updated: now(),
            gpu,
            phase: HookPhase::Host,
            vm: None,
            last_refusal: None,
            last_error: None,
        }
    }

    /// The current file, or None when the hook never ran (or the file is unreadable:
    /// surfaces then fall back to sysfs alone).
    pub fn load(host: &Host) -> Option<Self> {
        let bytes = std::fs::read(host.state_file()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save(&mut self, host: &Host) -> io::Result<()> {
        self.updated = now();
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        write_atomic(&host.state_file(), &json, 0o644)
    }
}
