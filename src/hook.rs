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
//! A domain uses each configured GPU its XML has a `<hostdev>` of ([`gpus_used`]); a
//! `[[vm]]` entry whose XML passes none uses the primary GPU (the union is the safe choice:
//! a hostdev that libvirt would detach itself still needs the holder check), and a
//! disagreement is warned about on stderr (libvirtd logs it).
//!
//! With several GPUs (ARCHITECTURE.md, "Several GPUs"): a domain gets every GPU it uses or
//! none — locks in address order, every GPU checked before any is touched, the ones bound
//! returned when a later one fails; each GPU has its own lock, record and state file, so
//! two domains on two GPUs never wait for each other. A GPU that drives the host's display
//! is refused unless its `[[gpu]]` says `allow_display = true`.

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

/// Whether `domain` uses any configured GPU, with the warnings [`gpus_used`] gives. An XML
/// that cannot be read is an error: whether it passes a GPU through is then unknown.
pub fn uses_gpu(cfg: &Config, domain: &str, xml: &str) -> Result<(bool, Option<String>), DomainXmlError> {
    let (gpus, warnings) = gpus_used(cfg, domain, xml)?;
    Ok((
        !gpus.is_empty(),
        (!warnings.is_empty()).then(|| warnings.join("\n")),
    ))
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
    let used = match xml {
        Ok(x) => gpus_used(cfg, domain, x).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (gpus, warnings) = match used {
        Ok(u) => u,
        Err(why) if op == "prepare" => {
            let _ = writeln!(err, "{}", unreadable_xml(cfg, domain, &why));
            return 1;
        }
        // A release acts only on records naming this domain: safe with every GPU.
        Err(_) => (cfg.gpu.iter().map(|g| g.address).collect(), Vec::new()),
    };
    if op == "prepare" && gpus.is_empty() {
        return 0;
    }
    for w in warnings {
        let _ = writeln!(err, "{w}");
    }
    if op == "prepare"
        && let Ok(x) = xml
    {
        for w in macos_warnings(cfg, domain, x, &gpus) {
            let _ = writeln!(err, "{w}");
        }
    }
    if op == "prepare" {
        prepare(cfg, domain, &gpus, err)
    } else {
        // Every GPU whose record names this domain too: it is what the domain was given,
        // whatever its definition says now.
        let host = &cfg.host;
        let mut all = gpus;
        for g in cfg.gpu.iter() {
            let named = matches!(RestoreRecord::load(host, g.address), Ok(Some(r)) if r.vm.as_deref() == Some(domain));
            if named && !all.contains(&g.address) {
                all.push(g.address);
            }
        }
        for address in all {
            release_one(cfg, domain, address, err);
        }
        0
    }
}

/// The configured GPUs a domain takes, in lock order, with warnings for libvirtd's log: the
/// GPUs its XML passes through ([`crate::gpus::taken_by`]); a `[[vm]]` whose XML passes none
/// takes the primary GPU, as before there were several (the union is the safe choice: a
/// hostdev that libvirt would detach itself still needs the holder check). A disagreement
/// between config and XML is warned about.
pub fn gpus_used(
    cfg: &Config,
    domain: &str,
    xml: &str,
) -> Result<(Vec<PciAddress>, Vec<String>), DomainXmlError> {
    let configured = cfg.vms.iter().any(|v| v.name == domain);
    let hostdevs = if xml.trim().is_empty() {
        Vec::new()
    } else {
        domain_hostdevs(xml)?
    };
    let mut gpus: Vec<PciAddress> = crate::gpus::taken_by(cfg, &hostdevs)
        .iter()
        .map(|g| g.address)
        .collect();
    let shown = crate::escape::plain(domain);
    let mut warnings = Vec::new();
    match (configured, gpus.is_empty()) {
        (true, true) => {
            if !xml.trim().is_empty() {
                warnings.push(format!(
                    "handoff: warning: {shown} is a [[vm]] in the config but its XML passes no function of {} through; \
                     the GPU is prepared anyway (add it as a <hostdev> for the VM to see it)",
                    cfg.gpu.address
                ));
            }
            gpus.push(cfg.gpu.address);
        }
        (false, false) => {
            let list: Vec<String> = gpus.iter().map(ToString::to_string).collect();
            warnings.push(format!(
                "handoff: warning: {shown} passes {} through but is not a [[vm]] in /etc/handoff/config.toml; \
                 handoff guards it anyway (add it to the config so the tray and block know it)",
                list.join(" and ")
            ));
        }
        _ => {}
    }
    Ok((gpus, warnings))
}

/// The warnings of a start of a macOS VM (its libosinfo id) given an NVIDIA GPU newer than
/// Kepler: macOS has no driver for it, so the VM would start with a GPU it cannot use.
/// Said, not refused: the start itself is safe.
fn macos_warnings(cfg: &Config, domain: &str, xml: &str, gpus: &[PciAddress]) -> Vec<String> {
    if !crate::gpus::libosinfo_id(xml).is_some_and(|id| crate::gpus::is_macos_id(&id)) {
        return Vec::new();
    }
    let shown = crate::escape::plain(domain);
    gpus.iter()
        .filter_map(|a| macos_nvidia_warning(&cfg.host, &shown, *a))
        .map(|w| format!("handoff: warning: {w}"))
        .collect()
}

/// The warning for a macOS VM given an NVIDIA GPU newer than Kepler, or None.
pub fn macos_nvidia_warning(host: &crate::host::Host, vm: &str, address: PciAddress) -> Option<String> {
    let g = crate::gpu::read_gpu(host, address).ok()?;
    let f = g.graphics()?;
    crate::gpus::nvidia_newer_than_kepler(f.vendor, f.device).then(|| {
        format!(
            "{vm} is a macOS VM and GPU {address} ({}) is an NVIDIA card newer than Kepler: macOS has no driver for it, \
             so the VM will not use it (give macOS an Intel iGPU or a supported AMD card)",
            g.name.as_deref().unwrap_or("NVIDIA")
        )
    })
}

/// `prepare begin` for the GPUs a domain takes: all of them or none. Locks are taken in
/// address order and held until every state file is written; a GPU with another VM, or one
/// that drives the host's display without `allow_display`, refuses the start before any
/// change; a bind that fails after another GPU was bound returns that GPU to the host.
/// `gpus` in address order ([`crate::gpus::taken_by`]). Proxmox VE's hookscript
/// ([`crate::pve`]) calls it with the GPUs of a VM's `hostpciN`.
pub fn prepare(cfg: &Config, domain: &str, gpus: &[PciAddress], err: &mut dyn Write) -> i32 {
    let host = &cfg.host;
    let shown = crate::escape::plain(domain);
    let domain = &domain.to_owned();
    let mut quiet = |_: &bind::plan::Step| {};
    let mut locks = Vec::new();
    for address in gpus {
        let gc = cfg.gpu.at(*address).unwrap_or(&cfg.gpu);
        let timeout = Duration::from_secs(gc.watchdog_s);
        // One handoff of this GPU at a time, held from reading the record to writing the
        // state file: another domain's prepare (libvirtd does not serialise two starts), a
        // release, `handoff bind` or `rebind` waits here and then sees what this one did.
        match GpuLock::acquire(host, *address, bind::lock::wait_for(timeout)) {
            Ok(l) => locks.push(l),
            Err(e) => {
                let _ = writeln!(err, "handoff: {e}");
                // Refuse a start we cannot make safely.
                return 1;
            }
        }
    }
    let primary = |a: PciAddress| a == cfg.gpu.address;
    // Read under the lock: what the handoff before this one left.
    let mut states: Vec<HookState> = gpus
        .iter()
        .map(|a| HookState::load_gpu(host, *a).unwrap_or_else(|| HookState::new(*a)))
        .collect();
    // Before any change: every GPU is free for this domain and may be handed at all.
    for (i, address) in gpus.iter().enumerate() {
        // A record of another VM, bound or still being bound: that VM has the GPU. The
        // state file keeps saying so (it is that VM's), only the refusal is added.
        let busy = match RestoreRecord::load(host, *address) {
            Ok(r) => bind::check_not_with_another(r.as_ref(), Some(domain)),
            // A damaged record: the engine refuses it below, saying what to do.
            Err(_) => Ok(()),
        };
        if let Err(e) = busy {
            let msg = e.to_string();
            let _ = writeln!(err, "{msg}");
            log_refusal(host, *address, domain, &[], &msg, err);
            states[i].last_error = Some(msg);
            let _ = states[i].save_gpu(host, primary(*address));
            return 1;
        }
        let gc = cfg.gpu.at(*address).unwrap_or(&cfg.gpu);
        if !gc.allow_display && crate::gpus::boot_vga(host, *address) {
            let why = crate::gpus::display_use(host, *address, &[]).unwrap_or_default();
            let msg = crate::gpus::display_refusal(*address, domain, &why);
            let _ = writeln!(err, "{msg}");
            log_refusal(host, *address, domain, &[], &msg, err);
            let state = &mut states[i];
            state.last_refusal = Some(Refusal {
                vm: domain.clone(),
                at: crate::bind::record::now(),
                holders: Vec::new(),
                message: msg,
            });
            let _ = state.save_gpu(host, primary(*address));
            return 1;
        }
    }
    let mut bound: Vec<usize> = Vec::new();
    for (i, address) in gpus.iter().enumerate() {
        let gc = cfg.gpu.at(*address).unwrap_or(&cfg.gpu);
        let timeout = Duration::from_secs(gc.watchdog_s);
        let state = &mut states[i];
        state.phase = HookPhase::Binding;
        state.vm = Some(domain.clone());
        let _ = state.save_gpu(host, primary(*address));
        match bind::hand_to_vfio_locked(&locks[i], host, Some(domain), timeout, &mut quiet) {
            Ok(_) => {
                state.phase = HookPhase::Vfio;
                state.last_error = None;
                bound.push(i);
            }
            Err(e) => {
                let mut msg = e.to_string();
                // A display server among the holders: say first what the GPU is to this host.
                if let BindError::Refused { holders, .. } = &e
                    && !gc.allow_display
                    && let Some(why) = crate::gpus::display_use(host, *address, holders)
                {
                    msg = format!("{}\n{msg}", crate::gpus::display_refusal(*address, domain, &why));
                }
                let _ = writeln!(err, "{msg}");
                state.vm = None;
                state.phase = phase_after_error(host, *address);
                match &e {
                    BindError::Refused { holders, .. } => {
                        log_refusal(host, *address, domain, holders, &e.to_string(), err);
                        state.last_refusal = Some(Refusal {
                            vm: domain.clone(),
                            at: state.updated,
                            holders: holders.clone(),
                            message: msg,
                        });
                    }
                    // Refused too, with nobody to blame: the message says what could
                    // not be checked.
                    BindError::Unchecked { .. } => {
                        log_refusal(host, *address, domain, &[], &e.to_string(), err);
                        state.last_refusal = Some(Refusal {
                            vm: domain.clone(),
                            at: state.updated,
                            holders: Vec::new(),
                            message: msg,
                        });
                    }
                    _ => state.last_error = Some(msg),
                }
                let _ = state.save_gpu(host, primary(*address));
                // Both or neither: the GPUs already bound for this domain go home.
                for j in bound {
                    let a = gpus[j];
                    let gc = cfg.gpu.at(a).unwrap_or(&cfg.gpu);
                    let timeout = Duration::from_secs(gc.watchdog_s);
                    let back = bind::return_to_host_locked(
                        &locks[j],
                        host,
                        &gc.host_driver,
                        timeout,
                        bind::VfioUsers::Wait(Duration::ZERO),
                        &mut quiet,
                    );
                    let st = &mut states[j];
                    match back {
                        Ok(_) => {
                            let _ = writeln!(
                                err,
                                "handoff: GPU {a} was returned to the host: {shown} gets all of its GPUs or none"
                            );
                            st.phase = HookPhase::Host;
                            st.vm = None;
                        }
                        Err(e) => {
                            let _ = writeln!(err, "{e}");
                            st.phase = phase_after_error(host, a);
                            st.vm = None;
                            st.last_error = Some(e.to_string());
                        }
                    }
                    if let Err(e) = st.save_gpu(host, primary(a)) {
                        let _ = writeln!(err, "handoff: cannot write the state of GPU {a}: {e}");
                    }
                }
                return 1;
            }
        }
    }
    for (i, address) in gpus.iter().enumerate() {
        if let Err(e) = states[i].save_gpu(host, primary(*address)) {
            let _ = writeln!(
                err,
                "handoff: cannot write {}: {e}",
                HookState::path_for(host, *address, primary(*address)).display()
            );
        }
    }
    0
}

/// `release end` for the given GPUs only: Proxmox VE's hookscript ([`crate::pve`]) leaves
/// the ones that rest on vfio-pci there. Each is returned only when its restore record
/// names `domain`; never blocks.
pub fn release(cfg: &Config, domain: &str, gpus: &[PciAddress], err: &mut dyn Write) {
    for address in gpus {
        release_one(cfg, domain, *address, err);
    }
}

/// `release end` for one GPU: return it only when we took it for this domain (a refused or
/// failed start also ends in release, with nothing of ours to undo — and when the refusal
/// was "the GPU is with another VM", that VM must keep it).
fn release_one(cfg: &Config, domain: &str, address: PciAddress, err: &mut dyn Write) {
    let host = &cfg.host;
    let shown = crate::escape::plain(domain);
    let gc = cfg.gpu.at(address).unwrap_or(&cfg.gpu);
    let timeout = Duration::from_secs(gc.watchdog_s);
    let primary = address == cfg.gpu.address;
    let mut quiet = |_: &bind::plan::Step| {};
    let lock = match GpuLock::acquire(host, address, bind::lock::wait_for(timeout)) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(err, "handoff: {e}");
            let _ = writeln!(
                err,
                "handoff: GPU {address} was not returned for {shown}; once the other handoff is over, \
                 `handoff rebind --force` returns it"
            );
            // Never block a release.
            return;
        }
    };
    let mut state = HookState::load_gpu(host, address).unwrap_or_else(|| HookState::new(address));
    match RestoreRecord::load(host, address) {
        Ok(None) => return,
        Ok(Some(r)) if r.vm.as_deref().is_some_and(|v| v != domain) => {
            let _ = writeln!(
                err,
                "handoff: not returning GPU {address} for {shown}: the restore record says it is with {}; nothing was changed",
                crate::escape::plain(r.vm.as_deref().unwrap_or_default())
            );
            return;
        }
        _ => {}
    }
    state.phase = HookPhase::Returning;
    let _ = state.save_gpu(host, primary);
    // QEMU may still be exiting when libvirt runs this: wait for it up to the watchdog.
    let vfio = bind::VfioUsers::Wait(timeout);
    match bind::return_to_host_locked(&lock, host, &gc.host_driver, timeout, vfio, &mut quiet) {
        Ok(_) => {
            state.phase = HookPhase::Host;
            state.vm = None;
            state.last_error = None;
            state.returned = Some(crate::bind::record::now());
        }
        Err(e) => {
            let _ = writeln!(err, "{e}");
            state.phase = phase_after_error(host, address);
            state.last_error = Some(e.to_string());
        }
    }
    if let Err(e) = state.save_gpu(host, primary) {
        let _ = writeln!(
            err,
            "handoff: cannot write {}: {e}",
            HookState::path_for(host, address, primary).display()
        );
    }
    if primary && state.phase == HookPhase::Host {
        // Root's system units stopped for this handoff come back (--no-block: libvirtd
        // waits for the hook). After the save: `stopped` reads when the GPU returned. The
        // record of stopped units follows the primary GPU only.
        for line in crate::stopped::start_again(cfg, crate::stopped::Who::Hook) {
            let _ = writeln!(err, "handoff: {line}");
        }
    }
}

/// Appends a refusal to `refusals.json` ([`crate::refusals`]), so that every surface tells
/// its user, whoever asked for the start. Written before `state.json`, whose change the
/// surfaces hear. A failure only costs the notification: the refusal itself stands.
fn log_refusal(
    host: &crate::host::Host,
    gpu: PciAddress,
    domain: &str,
    holders: &[crate::holders::Holder],
    message: &str,
    err: &mut dyn Write,
) {
    if let Err(e) = crate::refusals::RefusalLog::record(host, gpu, domain, holders, message) {
        let _ = writeln!(
            err,
            "handoff: cannot write {}: {e}",
            crate::refusals::path(host).display()
        );
    }
}

fn phase_after_error(host: &crate::host::Host, address: PciAddress) -> HookPhase {
    match RestoreRecord::load(host, address) {
        Ok(Some(r)) if r.phase == Phase::Stuck => HookPhase::RestoreRequired,
        Ok(Some(_)) | Err(_) => HookPhase::RestoreRequired,
        Ok(None) => HookPhase::Host,
    }
}
