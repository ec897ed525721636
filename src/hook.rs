//! `handoff hook <domain> <operation> <sub-op> <extra>`: what libvirtd runs, as root, for
//! every QEMU domain event, with the domain XML on stdin.
//!
//! Only two events matter: `prepare begin` (refuse or bind) and `release end` (return the
//! GPU). Everything else, and every domain that does not use the GPU, exits 0 at once.
//! The hook never calls libvirt (deadlock, per libvirt's docs), reads only the system
//! config, and never passes config values through a shell. Its stderr is what libvirt
//! shows in a refused `virsh start`: the refusal is written for people.
//!
//! Both events run under the GPU's lock ([`crate::bind::lock`]): libvirtd does not
//! serialise two domains' starts, so a second `prepare` waits for the first and then finds
//! the GPU with that VM (refused, naming it). A `release` for a domain the restore record
//! does not name changes nothing and says so. `prepare` also refuses when the holder scan
//! could not look everywhere ([`crate::holders::Verdict::Unchecked`]), naming what.
//!
//! A domain uses the GPU when a `[[vm]]` entry names it or its XML has a `<hostdev>` with
//! the GPU's address: either is enough (the union is the safe choice: a hostdev that
//! libvirt would detach itself still needs the holder check), and a disagreement is
//! warned about on stderr (libvirtd logs it).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::bind::record::{Phase, RestoreRecord};
use crate::bind::{self, BindError, GpuLock};
use crate::config::Config;
use crate::pci::PciAddress;
use crate::state::{HookPhase, HookState, Refusal};

/// The PCI addresses of `<hostdev type='pci'>` sources in a domain XML.
pub fn hostdev_addresses(xml: &str) -> Vec<PciAddress> {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return Vec::new();
    };
    let hex = |n: roxmltree::Node, a: &str| {
        n.attribute(a)
            .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0)
    };
    doc.descendants()
        .filter(|n| n.has_tag_name("hostdev") && n.attribute("type") == Some("pci"))
        .filter_map(|h| h.children().find(|c| c.has_tag_name("source")))
        .filter_map(|s| s.children().find(|c| c.has_tag_name("address")))
        .map(|a| {
            PciAddress::new(
                hex(a, "domain") as u16,
                hex(a, "bus") as u8,
                hex(a, "slot") as u8,
                hex(a, "function") as u8,
            )
        })
        .collect()
}

/// Whether `domain` uses the GPU, with a warning when config and XML disagree.
pub fn uses_gpu(cfg: &Config, domain: &str, xml: &str) -> (bool, Option<String>) {
    let configured = cfg.vms.iter().any(|v| v.name == domain);
    let in_xml = hostdev_addresses(xml)
        .iter()
        .any(|a| a.same_slot(&cfg.gpu.address));
    let warning = match (configured, in_xml) {
        (true, false) if !xml.trim().is_empty() => Some(format!(
            "handoff: warning: {domain} is a [[vm]] in the config but its XML passes no function of {} through; \
             the GPU is prepared anyway (add it as a <hostdev> for the VM to see it)",
            cfg.gpu.address
        )),
        (false, true) => Some(format!(
            "handoff: warning: {domain} passes {} through but is not a [[vm]] in /etc/handoff/config.toml; \
             handoff guards it anyway (add it to the config so the tray and block know it)",
            cfg.gpu.address
        )),
        _ => None,
    };
    (configured || in_xml, warning)
}

/// Run the hook. Returns the exit code; everything for people goes to `err`.
pub fn run(args: &[String], stdin: &mut dyn std::io::Read, system_config: &Path, err: &mut dyn Write) -> i32 {
    let [domain, op, sub, ..] = args else {
        let _ = writeln!(
            err,
            "handoff hook: expected <domain> <operation> <sub-operation> <extra> from libvirtd"
        );
        return 0;
    };
    let (op, sub) = (op.as_str(), sub.as_str());
    if !matches!((op, sub), ("prepare", "begin") | ("release", "end")) {
        return 0;
    }
    let mut xml = String::new();
    let _ = stdin.read_to_string(&mut xml);
    let cfg = match Config::load_system(system_config) {
        Ok((cfg, _)) => cfg,
        Err(e) => {
            let _ = writeln!(err, "handoff: {e}");
            // Refuse a start we cannot check; never block a release.
            return if op == "prepare" { 1 } else { 0 };
        }
    };
    run_event(&cfg, domain, op, sub, &xml, err)
}

/// The hook's work for one event with the config already read: `prepare begin` refuses
/// (exit 1, the refusal on `err`) or binds; `release end` returns the GPU; anything else
/// is 0. [`run`] calls it for libvirtd; `handoff demo`'s VMs (libvirt's test driver runs
/// no hooks) call it in-process from [`crate::vm`].
pub fn run_event(cfg: &Config, domain: &str, op: &str, sub: &str, xml: &str, err: &mut dyn Write) -> i32 {
    if !matches!((op, sub), ("prepare", "begin") | ("release", "end")) {
        return 0;
    }
    let domain = &domain.to_owned();
    let (uses, warning) = uses_gpu(cfg, domain, xml);
    if !uses {
        return 0;
    }
    if let Some(w) = warning {
        let _ = writeln!(err, "{w}");
    }
    let host = &cfg.host;
    let address = cfg.gpu.address;
    let timeout = Duration::from_secs(cfg.gpu.watchdog_s);
    let mut quiet = |_: &bind::plan::Step| {};
    // One handoff of this GPU at a time, held from reading the record to writing the state
    // file: another domain's prepare (libvirtd does not serialise two starts), a release,
    // `handoff bind` or `rebind` waits here and then sees what this one did.
    let lock = match GpuLock::acquire(host, address, bind::lock::wait_for(timeout)) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(err, "handoff: {e}");
            if op != "prepare" {
                let _ = writeln!(
                    err,
                    "handoff: GPU {address} was not returned for {domain}; once the other handoff is over, \
                     `handoff rebind --force` returns it"
                );
            }
            // Refuse a start we cannot make safely; never block a release.
            return if op == "prepare" { 1 } else { 0 };
        }
    };
    // Read under the lock: what the handoff before this one left.
    let mut state = HookState::load(host)
        .filter(|s| s.gpu == address)
        .unwrap_or_else(|| HookState::new(address));
    let code = if op == "prepare" {
        // A record of another VM, bound or still being bound: that VM has the GPU. The
        // state file keeps saying so (it is that VM's), only the refusal is added.
        let busy = match RestoreRecord::load(host, address) {
            Ok(r) => bind::check_not_with_another(r.as_ref(), Some(domain)),
            // A damaged record: the engine refuses it below, saying what to do.
            Err(_) => Ok(()),
        };
        if let Err(e) = busy {
            let msg = e.to_string();
            let _ = writeln!(err, "{msg}");
            state.last_error = Some(msg);
            let _ = state.save(host);
            return 1;
        }
        state.phase = HookPhase::Binding;
        state.vm = Some(domain.clone());
        let _ = state.save(host);
        match bind::hand_to_vfio_locked(&lock, host, Some(domain), timeout, &mut quiet) {
            Ok(_) => {
                state.phase = HookPhase::Vfio;
                state.last_error = None;
                0
            }
            Err(e) => {
                let _ = writeln!(err, "{e}");
                state.vm = None;
                state.phase = phase_after_error(host, address);
                match &e {
                    BindError::Refused { holders, .. } => {
                        state.last_refusal = Some(Refusal {
                            vm: domain.clone(),
                            at: state.updated,
                            holders: holders.clone(),
                            message: e.to_string(),
                        });
                    }
                    // Refused too, with nobody to blame: the message says what could
                    // not be checked.
                    BindError::Unchecked { .. } => {
                        state.last_refusal = Some(Refusal {
                            vm: domain.clone(),
                            at: state.updated,
                            holders: Vec::new(),
                            message: e.to_string(),
                        });
                    }
                    _ => state.last_error = Some(e.to_string()),
                }
                1
            }
        }
    } else {
        // release: return the GPU only when we took it for this domain (a refused or
        // failed start also ends in release, with nothing of ours to undo — and when the
        // refusal was "the GPU is with another VM", that VM must keep it).
        match RestoreRecord::load(host, address) {
            Ok(None) => return 0,
            Ok(Some(r)) if r.vm.as_deref().is_some_and(|v| v != domain) => {
                let _ = writeln!(
                    err,
                    "handoff: not returning GPU {address} for {domain}: the restore record says it is with {}; nothing was changed",
                    r.vm.as_deref().unwrap_or_default()
                );
                return 0;
            }
            _ => {}
        }
        state.phase = HookPhase::Returning;
        let _ = state.save(host);
        match bind::return_to_host_locked(&lock, host, &cfg.gpu.host_driver, timeout, &mut quiet) {
            Ok(_) => {
                state.phase = HookPhase::Host;
                state.vm = None;
                state.last_error = None;
            }
            Err(e) => {
                let _ = writeln!(err, "{e}");
                state.phase = phase_after_error(host, address);
                state.last_error = Some(e.to_string());
            }
        }
        0
    };
    if let Err(e) = state.save(host) {
        let _ = writeln!(err, "handoff: cannot write {}: {e}", host.state_file().display());
    }
    code
}

fn phase_after_error(host: &crate::host::Host, address: PciAddress) -> HookPhase {
    match RestoreRecord::load(host, address) {
        Ok(Some(r)) if r.phase == Phase::Stuck => HookPhase::RestoreRequired,
        Ok(Some(_)) | Err(_) => HookPhase::RestoreRequired,
        Ok(None) => HookPhase::Host,
    }
}
