//! handoff's libvirt side: everything that links libvirt, apart from the core crate
//! (`handoff`) so that no build can make a light binary link it (ARCHITECTURE.md,
//! "Binaries stay light").
//!
//! [`libvirt`] implements [`handoff::hypervisor::Hypervisor`] for any libvirt URI;
//! [`simulated`] is `handoff demo`'s hypervisor (libvirt's test driver plus the hook run
//! in-process); [`events`] is the libvirt source of [`handoff::live`]'s stream; [`vm`]
//! starts, stops and switches the configured VMs through a hypervisor; [`agent`] is
//! `handoff __agent`, the tray's libvirt side; [`demo`] is `handoff demo`. The binary
//! `handoff-vm` runs the `handoff` commands that need them.

pub mod agent;
pub mod demo;
pub mod events;
pub mod libvirt;
pub mod simulated;
pub mod vm;

use handoff::hypervisor::{Hypervisor, SIMULATED_ENV};

/// The hypervisor for `cfg`'s VMs in this process: libvirt (with Proxmox VE's `[[vm]]`
/// entries sent to `handoff-pve` through [`handoff::hypervisor::piped`], so that nothing
/// here links TLS), or the demo's simulated one when `handoff demo` started this process
/// (see [`handoff::hypervisor`]).
pub fn open(cfg: &handoff::config::Config) -> Box<dyn Hypervisor> {
    if std::env::var_os(SIMULATED_ENV).is_some_and(|v| v == "1") {
        match simulated::Simulated::new(cfg) {
            Ok(s) => return Box::new(s),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    handoff::hypervisor::piped::with_pve(cfg, Box::new(libvirt::Libvirt::new()))
}

/// A libvirt test-driver machine in a file, for the implementations' tests: `lab` passes
/// the GPU's two functions through and has Looking Glass's shared memory; `other` passes
/// nothing. Both shut off. Each file is its own machine, so tests do not meet.
#[cfg(test)]
pub(crate) fn test_node(dir: &std::path::Path) -> String {
    let domain = |name: &str, devices: &str| {
        format!(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
             <name>{name}</name><memory unit='MiB'>64</memory><vcpu>2</vcpu><os><type>hvm</type></os>\
             <devices>{devices}</devices><test:runstate>5</test:runstate></domain>"
        )
    };
    let hostdev = |f: u8| {
        format!(
            "<hostdev mode='subsystem' type='pci' managed='no'><source>\
             <address domain='0x0000' bus='0x01' slot='0x00' function='0x{f}'/></source></hostdev>"
        )
    };
    let lab = domain(
        "lab",
        &format!(
            "{}{}<shmem name='looking-glass'><model type='ivshmem-plain'/><size unit='M'>32</size></shmem>",
            hostdev(0),
            hostdev(1)
        ),
    );
    let path = dir.join("node.xml");
    std::fs::write(&path, format!("<node>{lab}{}</node>", domain("other", ""))).unwrap();
    format!("test://{}", path.display())
}
