//! `state.json` under `[host] run`: what the root hook last did, for unprivileged surfaces.
//!
//! The hook rewrites it (atomically, world-readable, no secrets) on every transition; the
//! tray and the block read it and watch it with inotify (ARCHITECTURE.md, "Live updates without polling").

use std::io;
use std::path::PathBuf;

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

/// Why `state.json` could not be read; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the hook's state file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the hook's state file {path} is damaged ({source}); the hook writes a new one on its next run")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
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
    /// Unix time the hook last returned the GPU to the host: units stopped before it
    /// are started again ([`crate::stopped`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returned: Option<u64>,
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
            returned: None,
        }
    }

    /// The current file, or None when the hook never ran (or the file is unreadable, or
    /// not a regular file of sane size — a FIFO there must not hang the hook: surfaces then
    /// fall back to sysfs alone, and the hook writes a fresh one by rename).
    pub fn load(host: &Host) -> Option<Self> {
        Self::read(host).ok().flatten()
    }

    /// [`HookState::load`] saying why: `Ok(None)` when there is no file, an error naming
    /// the file when it cannot be read or parsed.
    pub fn read(host: &Host) -> Result<Option<Self>, StateError> {
        let path = host.state_file();
        let bytes = match crate::bounded::read(&path, crate::bounded::Links::Refuse) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    pub fn save(&mut self, host: &Host) -> io::Result<()> {
        self.save_to(&host.state_file())
    }

    fn save_to(&mut self, path: &std::path::Path) -> io::Result<()> {
        self.updated = now();
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        write_atomic(path, &json, 0o644)
    }

    /// Where the state of `gpu` lives: the primary GPU's in `state.json` (the file every
    /// surface read before there were several GPUs), each other GPU's in
    /// `state-<BDF>.json`, so that two VMs on two GPUs never overwrite each other's.
    pub fn path_for(host: &Host, gpu: PciAddress, primary: bool) -> PathBuf {
        if primary {
            host.state_file()
        } else {
            host.run.join(format!("state-{gpu}.json"))
        }
    }

    /// The state of `gpu`: its own `state-<BDF>.json`, else `state.json` when that is about
    /// `gpu` (the primary GPU's, or one written before there were several).
    pub fn load_gpu(host: &Host, gpu: PciAddress) -> Option<Self> {
        let own = Self::path_for(host, gpu, false);
        match crate::bounded::read(&own, crate::bounded::Links::Refuse) {
            Ok(bytes) => serde_json::from_slice::<Self>(&bytes)
                .ok()
                .filter(|s| s.gpu == gpu),
            Err(_) => Self::load(host).filter(|s| s.gpu == gpu),
        }
    }

    /// Saves the state of its GPU where [`HookState::path_for`] says.
    pub fn save_gpu(&mut self, host: &Host, primary: bool) -> io::Result<()> {
        let path = Self::path_for(host, self.gpu, primary);
        self.save_to(&path)
    }

    /// After the GPU was returned by hand (`handoff rebind --force`): the file says it is
    /// home, so the surfaces that read it stop asking for a restore. The last refusal is
    /// kept (it is history); nothing is written when the hook never ran, or ran for
    /// another GPU, or already says so.
    pub fn returned_by_hand(host: &Host, gpu: PciAddress) -> io::Result<()> {
        let Some(mut state) = HookState::load_gpu(host, gpu) else {
            return Ok(());
        };
        if state.phase == HookPhase::Host && state.vm.is_none() && state.last_error.is_none() {
            return Ok(());
        }
        state.phase = HookPhase::Host;
        state.vm = None;
        state.last_error = None;
        state.returned = Some(now());
        // Back where it was read from.
        let own = Self::path_for(host, gpu, false);
        if own.exists() {
            state.save_to(&own)
        } else {
            state.save(host)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};

    #[test]
    fn a_return_by_hand_clears_restore_required_and_keeps_the_last_refusal() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
        let host = sim.host();
        // The hook never ran: nothing to say.
        HookState::returned_by_hand(&host, RTX_3090_TI).unwrap();
        assert!(HookState::load(&host).is_none());

        let mut s = HookState::new(RTX_3090_TI);
        s.phase = HookPhase::RestoreRequired;
        s.vm = Some("win11".into());
        s.last_error = Some("probing a driver for 0000:01:00.1 failed".into());
        s.last_refusal = Some(Refusal {
            vm: "win11".into(),
            at: 1,
            holders: Vec::new(),
            message: "busy".into(),
        });
        s.save(&host).unwrap();
        HookState::returned_by_hand(&host, RTX_3090_TI).unwrap();
        let after = HookState::load(&host).unwrap();
        assert_eq!(after.phase, HookPhase::Host);
        assert_eq!(after.vm, None);
        assert_eq!(after.last_error, None);
        assert_eq!(after.last_refusal, s.last_refusal);

        // Another GPU's file is left alone.
        let other = PciAddress::new(0, 2, 0, 0);
        s.save(&host).unwrap();
        HookState::returned_by_hand(&host, other).unwrap();
        assert_eq!(HookState::load(&host).unwrap().phase, HookPhase::RestoreRequired);
    }
}
