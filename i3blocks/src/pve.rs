//! The VMs of a Proxmox VE node, for a desktop that shows the node's GPU (docs/proxmox.md,
//! "Remote surfaces").
//!
//! The GPU is not in this machine, so sysfs and the hook's files say nothing about it;
//! only the node's API does. The block links no TLS (ARCHITECTURE.md, "Binaries stay
//! light"): it runs `handoff-pve` beside it as a child speaking
//! `handoff::hypervisor::piped`, as the CLI does, and passes the VMs' states to the
//! verdict (rule 3b), which decides what the bar shows. Only when every `[[vm]]` has a
//! `vmid` and the GPU is absent here: a machine with the GPU, or with libvirt VMs, never
//! starts it. PVE has no event stream, so `--watch` asks every
//! `[proxmox] poll_interval_s` ([`interval`]) and at once after a click.

use std::time::Duration;

use handoff::config::Config;
use handoff::hypervisor::{self, piped::Piped};
use handoff::status::{VmState, VmStatus};

/// Whether the block asks PVE about this config's VMs: a `[proxmox]` section and every
/// `[[vm]]` on it (with libvirt VMs too, the GPU is not only on the node).
pub fn asks(cfg: &Config) -> bool {
    cfg.proxmox.is_some() && !cfg.vms.is_empty() && cfg.vms.iter().all(|v| v.vmid.is_some())
}

/// How often `--watch` asks, when it asks at all.
pub fn interval(cfg: &Config) -> Option<Duration> {
    let p = cfg.proxmox.as_ref().filter(|_| asks(cfg))?;
    Some(Duration::from_secs(p.poll_interval_s))
}

/// `handoff-pve`, started on first use and kept by a `--watch` block between polls.
#[derive(Default)]
pub struct Pve {
    server: Option<Piped>,
}

impl Pve {
    /// Each configured VM's state; one the API did not answer about is `unknown` with why
    /// (all unknown: the verdict's "Proxmox VE unreachable").
    pub fn vms(&mut self, cfg: &Config) -> Vec<VmStatus> {
        let url = cfg.proxmox.as_ref().map(|p| p.url.as_str()).unwrap_or_default();
        if self.server.is_none() {
            match Piped::spawn(&Piped::pve_server(), cfg, url) {
                Ok(p) => self.server = Some(p),
                Err(e) => {
                    let why = e.to_string();
                    return cfg
                        .vms
                        .iter()
                        .map(|v| VmStatus::new(v, VmState::Unknown, Some(why.clone())))
                        .collect();
                }
            }
        }
        let server = self.server.as_mut().expect("just started");
        let vms: Vec<VmStatus> = cfg.vms.iter().map(|v| hypervisor::vm_status(server, v)).collect();
        if vms.iter().any(|v| v.state == VmState::Unknown) {
            // The node or `handoff-pve` went away: a fresh one next time (a new TLS
            // session), not a server that may have ended.
            self.server = None;
        }
        vms
    }
}
