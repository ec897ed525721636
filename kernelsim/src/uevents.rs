//! The simulated kernel announces its driver-core changes the way the kernel does: a
//! `bind`/`unbind`/`add`/`remove` uevent on netlink group 1 (see [`handoff::live::uevent`]),
//! so a [`handoff::live::Watcher`] sees a simulated handoff like a real one.
//!
//! Kept apart from the write rules on purpose: [`Kernel::write`] takes a snapshot before
//! a write takes effect and calls [`Kernel::announce_uevents`] after it; nothing else
//! here touches the rules. Best effort: sending needs root (`CAP_NET_ADMIN`), and without
//! it the simulation simply runs silent. The uevents carry the simulated devpath and go to
//! every listener in the network namespace, so a watcher for a real GPU at the same
//! address would re-read its status once per simulated change; nothing more.
//!
//! Not announced (yet): a hung write's effect when it is released later.

use std::collections::BTreeMap;
use std::path::Path;

use super::Kernel;
use handoff::live::DriverAction;
use handoff::live::uevent::{Uevent, send_uevent};
use handoff::pci::PciAddress;

/// Per function in the spec: present, and its driver.
pub(super) type Snapshot = BTreeMap<PciAddress, (bool, Option<String>)>;

impl Kernel {
    pub(super) fn uevent_snapshot(&self) -> Snapshot {
        self.spec
            .functions
            .iter()
            .map(|f| (f.address, (self.is_present(f.address), self.driver(f.address))))
            .collect()
    }

    /// Sends the uevents the kernel would have sent between `before` and now.
    pub(super) fn announce_uevents(&self, before: &Snapshot) {
        for (a, after) in self.uevent_snapshot() {
            let Some(was) = before.get(&a) else { continue };
            if *was == after {
                continue;
            }
            let mut events = Vec::new();
            match (was, &after) {
                ((true, _), (false, _)) => {
                    if was.1.is_some() {
                        events.push((DriverAction::Unbind, None));
                    }
                    events.push((DriverAction::Remove, None));
                }
                ((false, _), (true, drv)) => {
                    events.push((DriverAction::Add, None));
                    if drv.is_some() {
                        events.push((DriverAction::Bind, drv.clone()));
                    }
                }
                ((true, old), (true, new)) => {
                    if old.is_some() {
                        events.push((DriverAction::Unbind, None));
                    }
                    if new.is_some() {
                        events.push((DriverAction::Bind, new.clone()));
                    }
                }
                ((false, _), (false, _)) => {}
            }
            // The devpath of a removed function is gone from the tree; its last component
            // is all a watcher needs.
            let devpath = self.devpath(a);
            for (action, driver) in events {
                let ev = Uevent::pci(action, &devpath, a, driver.as_deref());
                if let Err(e) = send_uevent(&ev.to_bytes()) {
                    tracing::debug!("simulated kernel: no uevent for {a} {}: {e}", action.as_str());
                }
            }
        }
    }

    fn devpath(&self, a: PciAddress) -> String {
        let rel = self.physical(&Path::new("bus/pci/devices").join(a.to_string()));
        if rel.starts_with("devices") {
            format!("/{}", rel.display())
        } else {
            format!("/devices/{a}")
        }
    }
}
