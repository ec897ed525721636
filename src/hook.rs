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

/// The most domain XML the hook reads from libvirt: a real one is a few KiB.
pub const MAX_XML: u64 = 16 << 20;

/// Why the domain XML libvirt passed could not be read. Each message starts with what was
/// read ("the domain XML"), so that it makes sense on its own in libvirt's error.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    #[error("the domain XML on stdin could not be read: {0}")]
    Read(std::io::Error),
    #[error("the domain XML is not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("the domain XML is not well-formed ({0})")]
    Malformed(String),
    #[error(
        "the domain XML has a <hostdev> whose source address {attr}='{value}' is not a PCI {attr} \
         number (0 to {max:#x}, written like libvirt's 0x{max:02x})"
    )]
    BadAddress {
        attr: &'static str,
        value: String,
        max: u32,
    },
}

/// Reads the domain XML from the hook's stdin: at most [`MAX_XML`] bytes, UTF-8.
pub fn read_domain_xml(stdin: &mut dyn std::io::Read) -> Result<String, DomainXmlError> {
    let bytes = crate::bounded::read_stream(stdin, MAX_XML).map_err(DomainXmlError::Read)?;
    String::from_utf8(bytes).map_err(|e| DomainXmlError::NotUtf8 {
        offset: e.utf8_error().valid_up_to(),
    })
}

/// The PCI addresses of the `<hostdev type='pci'>` devices of a domain XML: only
/// `/domain/devices/hostdev/source/address`, as libvirt reads them (a `<hostdev>` elsewhere,
/// say inside `<metadata>`, passes nothing through). An address attribute is read the way
/// libvirt reads it (C `strtoul` base 0: `0x` hex, leading `0` octal, else decimal; absent
/// means 0), and one out of range for its field is an error, never truncated to fit.
pub fn domain_hostdevs(xml: &str) -> Result<Vec<PciAddress>, DomainXmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| DomainXmlError::Malformed(e.to_string()))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Ok(Vec::new());
    }
    let field = |a: roxmltree::Node, attr: &'static str, max: u32| -> Result<u32, DomainXmlError> {
        let Some(value) = a.attribute(attr) else {
            return Ok(0);
        };
        parse_c_uint(value)
            .filter(|n| *n <= max)
            .ok_or_else(|| DomainXmlError::BadAddress {
                attr,
                value: crate::escape::plain(value),
                max,
            })
    };
    let mut found = Vec::new();
    let hostdevs = root
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("hostdev") && n.attribute("type") == Some("pci"));
    for h in hostdevs {
        let Some(a) = h
            .children()
            .find(|c| c.has_tag_name("source"))
            .and_then(|s| s.children().find(|c| c.has_tag_name("address")))
        else {
            continue;
        };
        found.push(PciAddress::new(
            field(a, "domain", 0xffff)? as u16,
            field(a, "bus", 0xff)? as u8,
            field(a, "slot", 0x1f)? as u8,
            field(a, "function", 0x7)? as u8,
        ));
    }
    Ok(found)
}

/// An unsigned number as C's `strtoul(s, NULL, 0)` reads a whole string: `0x`/`0X` hex,
/// a leading `0` octal, else decimal; nothing else may follow.
fn parse_c_uint(s: &str) -> Option<u32> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

/// [`domain_hostdevs`] for showing (`vm-health`): an XML it cannot read lists nothing.
pub fn hostdev_addresses(xml: &str) -> Vec<PciAddress> {
    domain_hostdevs(xml).unwrap_or_default()
}

/// Whether `domain` uses the GPU, with a warning when config and XML disagree. An XML that
/// cannot be read is an error: whether it passes the GPU through is then unknown.
pub fn uses_gpu(cfg: &Config, domain: &str, xml: &str) -> Result<(bool, Option<String>), DomainXmlError> {
    let configured = cfg.vms.iter().any(|v| v.name == domain);
    let in_xml = if xml.trim().is_empty() {
        false
    } else {
        domain_hostdevs(xml)?
            .iter()
            .any(|a| a.same_slot(&cfg.gpu.address))
    };
    let domain = crate::escape::plain(domain);
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
    Ok((configured || in_xml, warning))
}

/// The refusal of a start whose domain XML could not be read.
fn unreadable_xml(cfg: &Config, domain: &str, e: &str) -> String {
    format!(
        "handoff: not starting {}: {e}, so handoff cannot tell whether it passes GPU {} through. \
         Nothing was changed; check the domain with `virsh dumpxml {0}`.",
        crate::escape::plain(domain),
        cfg.gpu.address
    )
}

/// Whether the hook does anything for this event: `prepare begin` and `release end` only.
pub fn acts_on(op: &str, sub: &str) -> bool {
    matches!((op, sub), ("prepare", "begin") | ("release", "end"))
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
    let xml = read_domain_xml(stdin);
    let cfg = match Config::load_system(system_config) {
        Ok((cfg, _)) => cfg,
        Err(e) => {
            let _ = writeln!(err, "handoff: {e}");
            // Refuse a start we cannot check; never block a release.
            return if op == "prepare" { 1 } else { 0 };
        }
    };
    event(&cfg, domain, op, sub, xml.as_deref(), err)
}

/// The hook's work for one event with the config already read: `prepare begin` refuses
/// (exit 1, the refusal on `err`) or binds; `release end` returns the GPU; anything else
/// is 0. [`run`] calls it for libvirtd; `handoff demo`'s VMs (libvirt's test driver runs
/// no hooks) call it in-process from `handoff_libvirt::vm`.
pub fn run_event(cfg: &Config, domain: &str, op: &str, sub: &str, xml: &str, err: &mut dyn Write) -> i32 {
    event(cfg, domain, op, sub, Ok(xml), err)
}

/// [`run_event`] with the XML as read: one that could not be read refuses a start (it may
/// pass the GPU through: fail closed) and counts as using the GPU for a release (which
/// acts only on a restore record naming this domain, so that is safe).
fn event(
    cfg: &Config,
    domain: &str,
    op: &str,
    sub: &str,
    xml: Result<&str, &DomainXmlError>,
    err: &mut dyn Write,
) -> i32 {
    if !matches!((op, sub), ("prepare", "begin") | ("release", "end")) {
        return 0;
    }
    let uses = match xml {
        Ok(x) => uses_gpu(cfg, domain, x).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (uses, warning) = match uses {
        Ok(u) => u,
        Err(why) if op == "prepare" => {
            let _ = writeln!(err, "{}", unreadable_xml(cfg, domain, &why));
            return 1;
        }
        Err(_) => (true, None),
    };
    if !uses {
        return 0;
    }
    if let Some(w) = warning {
        let _ = writeln!(err, "{w}");
    }
    // Domain names are libvirt's, but may hold anything but '/': shown escaped.
    let shown = crate::escape::plain(domain);
    let domain = &domain.to_owned();
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
                    "handoff: GPU {address} was not returned for {shown}; once the other handoff is over, \
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
                    "handoff: not returning GPU {address} for {shown}: the restore record says it is with {}; nothing was changed",
                    crate::escape::plain(r.vm.as_deref().unwrap_or_default())
                );
                return 0;
            }
            _ => {}
        }
        state.phase = HookPhase::Returning;
        let _ = state.save(host);
        // QEMU may still be exiting when libvirt runs this: wait for it up to the watchdog.
        let vfio = bind::VfioUsers::Wait(timeout);
        match bind::return_to_host_locked(&lock, host, &cfg.gpu.host_driver, timeout, vfio, &mut quiet) {
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
