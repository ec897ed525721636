//! The libvirt implementation of [`Hypervisor`] (links libvirt, so only `handoff-vm` — the
//! CLI's VM commands and the tray's agent — and the details window use it). Any URI works:
//! `qemu:///system`, `qemu+ssh://host/system`, `test:///default`.
//!
//! Besides the lifecycle-event source [`crate::events`] (which [`Hypervisor::subscribe`]
//! uses here), this is the only code that calls libvirt. It is also the only
//! code that knows how libvirt reports a refusal of handoff's hook: inside the text of
//! `virDomainCreate`'s error ([`hook_message`]), turned here into [`Start::Refused`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::ErrorNumber;

use handoff::config::VmConfig;
use handoff::hypervisor::{
    Action, Description, EventSink, Guest, GuestIp, Hypervisor, HypervisorError, Probe, Refusal, Shmem,
    Start, Subscription, Task, TaskState, VmEvent, VmRef,
};
use handoff::live::Change;
use handoff::status::{VmState, VmStatus};

/// The old name of [`HypervisorError`], from when libvirt was the only hypervisor.
pub type VirtError = HypervisorError;

/// Stop libvirt from printing every error to stderr itself; we report them.
pub fn quiet() {
    virt::error::clear_error_callback();
}

pub fn connect(uri: &str) -> Result<Connect, VirtError> {
    quiet();
    // The test driver with a node file (`test:///path/node.xml`) builds a fresh machine
    // for every open; `test:///default` is shared by the process's connections. Share the
    // node-file ones too, so that in one process (the tray, `handoff demo`) a VM started
    // by one action is still running for the next, as with a real libvirtd.
    let shared = uri.starts_with("test:///") && uri != "test:///default";
    if shared && let Some(c) = test_conns().lock().unwrap_or_else(|e| e.into_inner()).get(uri) {
        return Ok(c.clone());
    }
    let c = Connect::open(Some(uri)).map_err(|e| VirtError::Connect {
        uri: uri.to_owned(),
        message: e.message().to_owned(),
    })?;
    if shared {
        test_conns()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(uri.to_owned())
            .or_insert_with(|| c.clone());
    }
    Ok(c)
}

fn test_conns() -> &'static std::sync::Mutex<HashMap<String, Connect>> {
    static CONNS: std::sync::OnceLock<std::sync::Mutex<HashMap<String, Connect>>> =
        std::sync::OnceLock::new();
    CONNS.get_or_init(Default::default)
}

fn map_state(s: DomainState) -> VmState {
    match s {
        DomainState::Running | DomainState::Blocked | DomainState::NoState => VmState::Running,
        DomainState::Paused => VmState::Paused,
        DomainState::Shutdown => VmState::Shutdown,
        DomainState::Shutoff => VmState::Shutoff,
        DomainState::Crashed => VmState::Crashed,
        DomainState::PMSuspended => VmState::Suspended,
    }
}

pub fn domain_state(conn: &Connect, uri: &str, name: &str) -> Result<VmState, VirtError> {
    let dom = conn.lookup_domain_by_name(name).map_err(|e| {
        if e.code().is_known_and(|c| c == ErrorNumber::NoDomain) {
            VirtError::NoDomain {
                uri: uri.to_owned(),
                name: name.to_owned(),
            }
        } else {
            VirtError::Domain {
                uri: uri.to_owned(),
                name: name.to_owned(),
                message: e.message().to_owned(),
            }
        }
    })?;
    let (state, _reason) = dom.state().map_err(|e| VirtError::Domain {
        uri: uri.to_owned(),
        name: name.to_owned(),
        message: e.message().to_owned(),
    })?;
    Ok(if state.is_known() {
        map_state(state.unwrap())
    } else {
        VmState::Unknown
    })
}

/// The domain's live XML (`virsh dumpxml`), e.g. for `handoff lg-test`.
pub fn domain_xml(vm: &VmConfig) -> Result<String, VirtError> {
    let conn = connect(&vm.uri)?;
    let err = |e: virt::error::Error| VirtError::Domain {
        uri: vm.uri.clone(),
        name: vm.name.clone(),
        message: e.message().to_owned(),
    };
    let dom = conn.lookup_domain_by_name(&vm.name).map_err(|e| {
        if e.code().is_known_and(|c| c == ErrorNumber::NoDomain) {
            VirtError::NoDomain {
                uri: vm.uri.clone(),
                name: vm.name.clone(),
            }
        } else {
            err(e)
        }
    })?;
    dom.xml_desc(0).map_err(err)
}

/// A status probe for [`handoff::status::collect`] that opens one connection per URI and
/// reuses it for every VM there.
pub struct Prober {
    libvirt: Libvirt,
}

impl Default for Prober {
    fn default() -> Self {
        Self::new()
    }
}

impl Prober {
    pub fn new() -> Self {
        Self {
            libvirt: Libvirt::new(),
        }
    }

    pub fn probe(&mut self, vm: &VmConfig) -> VmStatus {
        handoff::hypervisor::vm_status(&mut self.libvirt, vm)
    }

    /// The PCI devices `vm`'s definition passes through (`describe`), for which GPUs it
    /// takes; remember them ([`crate::agent::Definitions`]): a definition seldom changes.
    pub fn passthrough(&mut self, vm: &VmConfig) -> Result<Vec<handoff::PciAddress>, HypervisorError> {
        use handoff::hypervisor::Hypervisor;
        self.libvirt.describe(&VmRef::from(vm)).map(|d| d.passthrough)
    }
}

/// libvirt at any number of URIs, one connection per URI, opened on first use and kept
/// (a failed connect too: a dead remote host is asked once, not once per VM).
pub struct Libvirt {
    conns: HashMap<String, Result<Connect, String>>,
}

impl Default for Libvirt {
    fn default() -> Self {
        Self::new()
    }
}

impl Libvirt {
    pub fn new() -> Self {
        Self {
            conns: HashMap::new(),
        }
    }

    fn conn(&mut self, uri: &str) -> Result<Connect, HypervisorError> {
        let c = self.conns.entry(uri.to_owned()).or_insert_with(|| {
            connect(uri).map_err(|e| match e {
                HypervisorError::Connect { message, .. } => message,
                other => other.to_string(),
            })
        });
        c.clone().map_err(|message| HypervisorError::Connect {
            uri: uri.to_owned(),
            message,
        })
    }

    fn domain(&mut self, vm: &VmRef) -> Result<Domain, HypervisorError> {
        let conn = self.conn(&vm.at)?;
        conn.lookup_domain_by_name(&vm.name).map_err(|e| {
            if e.code().is_known_and(|c| c == ErrorNumber::NoDomain) {
                HypervisorError::NoDomain {
                    uri: vm.at.clone(),
                    name: vm.name.clone(),
                }
            } else {
                domain_error(vm, &e)
            }
        })
    }

    /// The live domain XML, e.g. for the simulated hook, which gets it as libvirtd's hook does.
    pub fn xml(&mut self, vm: &VmRef) -> Result<String, HypervisorError> {
        let dom = self.domain(vm)?;
        dom.xml_desc(0).map_err(|e| domain_error(vm, &e))
    }

    /// After a stop call failed: an error only when the domain still runs (it may have
    /// stopped on its own meanwhile).
    fn stop_failed(
        &mut self,
        vm: &VmRef,
        dom: &Domain,
        e: &virt::error::Error,
    ) -> Result<(), HypervisorError> {
        if state_of(vm, dom)?.state.is_active() {
            return Err(HypervisorError::Stop {
                uri: vm.at.clone(),
                name: vm.name.clone(),
                message: e.message().to_owned(),
            });
        }
        Ok(())
    }
}

impl Hypervisor for Libvirt {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    fn list(&mut self, at: &str) -> Result<Vec<(VmRef, VmState)>, HypervisorError> {
        let conn = self.conn(at)?;
        let doms = conn.list_all_domains(0).map_err(|e| HypervisorError::Domain {
            uri: at.to_owned(),
            name: "*".to_owned(),
            message: e.message().to_owned(),
        })?;
        let mut out = Vec::new();
        for d in doms {
            let Ok(name) = d.name() else { continue };
            let vm = VmRef::named(at, &name);
            let state = state_of(&vm, &d).map(|p| p.state).unwrap_or(VmState::Unknown);
            out.push((vm, state));
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    fn probe(&mut self, vm: &VmRef) -> Result<Probe, HypervisorError> {
        let dom = self.domain(vm)?;
        state_of(vm, &dom)
    }

    fn start(&mut self, vm: &VmRef) -> Result<Start, HypervisorError> {
        let dom = self.domain(vm)?;
        match dom.create() {
            Ok(_) => Ok(Start::Begun(Task::new(vm, Action::Start))),
            Err(e) => {
                let message = e.message().to_owned();
                match hook_message(&message) {
                    Some(refusal) => Ok(Start::Refused(refusal)),
                    None => Err(HypervisorError::Start {
                        uri: vm.at.clone(),
                        name: vm.name.clone(),
                        message,
                    }),
                }
            }
        }
    }

    fn shutdown(&mut self, vm: &VmRef) -> Result<Task, HypervisorError> {
        let dom = self.domain(vm)?;
        if let Err(e) = dom.shutdown() {
            self.stop_failed(vm, &dom, &e)?;
        }
        Ok(Task::new(vm, Action::Shutdown))
    }

    fn destroy(&mut self, vm: &VmRef) -> Result<Task, HypervisorError> {
        let dom = self.domain(vm)?;
        if let Err(e) = dom.destroy() {
            self.stop_failed(vm, &dom, &e)?;
        }
        Ok(Task::new(vm, Action::Destroy))
    }

    fn poll(&mut self, task: &Task) -> Result<TaskState, HypervisorError> {
        // libvirt's calls returned when done; what is left is the state settling.
        let state = self.probe(&task.vm)?.state;
        let done = match task.action {
            Action::Start => state == VmState::Running,
            Action::Shutdown | Action::Destroy => !state.is_active(),
        };
        Ok(if done {
            TaskState::Done {
                state,
                notes: Vec::new(),
            }
        } else {
            TaskState::Pending { state }
        })
    }

    fn describe(&mut self, vm: &VmRef) -> Result<Description, HypervisorError> {
        let xml = self.xml(vm)?;
        Ok(Description {
            passthrough: handoff::hook::hostdev_addresses(&xml),
            looking_glass: shmem(&xml),
            definition: xml,
        })
    }

    fn guest(&mut self, vm: &VmRef) -> Guest {
        let Ok(dom) = self.domain(vm) else {
            return Guest::default();
        };
        let state = state_of(vm, &dom).map_or(VmState::Unknown, |p| p.state);
        let (running, active) = (state == VmState::Running, state.is_active());
        let info = dom.info().ok();
        Guest {
            pid: if active && crate::vm::is_local(&vm.at) {
                qemu_pid(&vm.at, &vm.name)
            } else {
                None
            },
            vcpus: info.as_ref().map(|i| i.nr_virt_cpu),
            memory_kib: info.as_ref().map(|i| i.memory),
            max_memory_kib: info.as_ref().map(|i| i.max_mem),
            // From the local QEMU process's age (`vm::Ctl::health`).
            uptime_s: None,
            ip: if running { guest_ip(&dom) } else { None },
        }
    }

    fn subscribe(&mut self, vms: &[VmRef], sink: EventSink) -> Result<Subscription, HypervisorError> {
        // The live stream's libvirt source does the work (one connection per URI, the
        // close callback, reconnecting); this hands its changes on as VmEvents.
        let cfg = handoff::config::Config {
            vms: vms
                .iter()
                .map(|v| VmConfig {
                    name: v.name.clone(),
                    vmid: v.id,
                    label: None,
                    uri: v.at.clone(),
                    shutdown_timeout_s: 0,
                })
                .collect(),
            ..Default::default()
        };
        let inner: handoff::live::Sink = Arc::new(move |c: Change| match c {
            Change::Domain { uri, name, event } => sink(VmEvent::Lifecycle {
                vm: VmRef::named(&uri, &name),
                event,
            }),
            Change::SourceLost {
                source: handoff::live::Source::Libvirt { uri },
                why,
            } => sink(VmEvent::Lost { at: uri, why }),
            Change::SourceBack {
                source: handoff::live::Source::Libvirt { uri },
            } => sink(VmEvent::Back { at: uri }),
            _ => true,
        });
        let uri = vms.first().map(|v| v.at.clone()).unwrap_or_default();
        let supervisors = crate::events::start(&cfg, &inner).map_err(|e| HypervisorError::Events {
            uri,
            message: e.to_string(),
        })?;
        Ok(Subscription::new(move || {
            for s in &supervisors {
                s.stop();
            }
        }))
    }
}

fn domain_error(vm: &VmRef, e: &virt::error::Error) -> HypervisorError {
    HypervisorError::Domain {
        uri: vm.at.clone(),
        name: vm.name.clone(),
        message: format!(
            "{}{}",
            e.message(),
            crate::vm::access_hint("qemu:///system", e.message())
        ),
    }
}

/// The domain's state in `virsh domstate` words and libvirt's reason for it.
fn state_of(vm: &VmRef, dom: &Domain) -> Result<Probe, HypervisorError> {
    let (state, reason) = dom.state().map_err(|e| domain_error(vm, &e))?;
    let state = match state.known() {
        Some(s) => map_state(s),
        None => VmState::Unknown,
    };
    let reason = match reason {
        virt::enumutil::Enum::Known(r) => {
            Some(reason_words(&r.to_string())).filter(|r| r != "reason unknown")
        }
        virt::enumutil::Enum::Unknown(_) => None,
    };
    Ok(Probe { state, reason })
}

/// libvirt's reason names ("booted", "destroyed", "fromsnapshot") in plainer words.
pub fn reason_words(reason: &str) -> String {
    match reason {
        "booted" => "booted",
        "destroyed" => "forced off (destroyed)",
        "shutdown" => "shut down",
        "crashed" => "crashed",
        "migrated" => "migrated",
        "saved" => "saved",
        "failed" => "failed to start",
        "fromsnapshot" => "restored from a snapshot",
        "restored" => "restored from a saved state",
        "unpaused" => "resumed",
        "wakeup" => "woke up",
        "user" => "paused or shut down by a user",
        "daemon" => "stopped by libvirtd",
        "unknown" => "reason unknown",
        other => other,
    }
    .to_owned()
}

/// The hook's own message inside libvirt's error for a refused start, e.g. from
/// `Hook script execution failed: internal error: Child process (LC_ALL=C PATH=… /etc/libvirt/hooks/qemu.d/handoff win11 prepare begin -) unexpected exit status 1: handoff: not handing GPU …`.
/// handoff's `warning:` lines come apart, the rest as the hook said it, each `handoff: `
/// prefix removed. None when the error is not a hook's refusal.
pub fn hook_message(libvirt_error: &str) -> Option<Refusal> {
    if !libvirt_error.contains("Hook script execution failed") {
        return None;
    }
    let after = match libvirt_error.find("unexpected exit status") {
        Some(i) => {
            let rest = &libvirt_error[i..];
            rest.split_once(": ").map(|(_, m)| m).unwrap_or("")
        }
        None => libvirt_error
            .split_once("Hook script execution failed: ")
            .map(|(_, m)| m)
            .unwrap_or(libvirt_error),
    };
    let mut warnings = Vec::new();
    let mut lines = Vec::new();
    for line in after.trim().lines() {
        if let Some(w) = line.strip_prefix("handoff: warning: ") {
            warnings.push(w.trim_end().to_owned());
        } else {
            lines.push(line.strip_prefix("handoff: ").unwrap_or(line).trim_end());
        }
    }
    let mut message = lines.join("\n").trim().to_owned();
    if message.is_empty() {
        message = "the libvirt hook refused the start without saying why".to_owned();
    }
    Some(Refusal { message, warnings })
}

/// The `<shmem>` device Looking Glass uses (name `looking-glass`, or the only one there is
/// with "looking" in its name).
pub fn shmem(xml: &str) -> Option<Shmem> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let devices: Vec<_> = doc.descendants().filter(|n| n.has_tag_name("shmem")).collect();
    let dev = devices
        .iter()
        .find(|n| n.attribute("name") == Some("looking-glass"))
        .or_else(|| {
            devices
                .iter()
                .find(|n| n.attribute("name").is_some_and(|v| v.contains("looking")))
        })?;
    let model = dev
        .children()
        .find(|c| c.has_tag_name("model"))
        .and_then(|m| m.attribute("type"))
        .map(str::to_owned);
    let size_bytes = dev.children().find(|c| c.has_tag_name("size")).and_then(|s| {
        let n: u64 = s.text()?.trim().parse().ok()?;
        let unit = s.attribute("unit").unwrap_or("b");
        Some(n * unit_bytes(unit)?)
    });
    Some(Shmem {
        name: dev.attribute("name").unwrap_or_default().to_owned(),
        model,
        size_bytes,
    })
}

/// libvirt's size units (domain XML "memory allocation" units).
fn unit_bytes(unit: &str) -> Option<u64> {
    Some(match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1000u64.pow(4),
        "T" | "TiB" => 1 << 40,
        _ => return None,
    })
}

fn guest_ip(dom: &Domain) -> Option<GuestIp> {
    for (source, name) in [
        (virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, "agent"),
        (virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, "lease"),
    ] {
        let ifaces = match dom.interface_addresses(source, 0) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!("guest addresses from the {name}: {}", e.message());
                continue;
            }
        };
        let mut candidates: Vec<GuestIp> = ifaces
            .iter()
            .filter(|i| i.name != "lo" && !i.name.starts_with("Loopback"))
            .flat_map(|i| {
                i.addrs.iter().map(|a| GuestIp {
                    address: a.addr.clone(),
                    interface: i.name.clone(),
                    source: name,
                })
            })
            .filter(|g| {
                !g.address.starts_with("127.") && g.address != "::1" && !g.address.starts_with("fe80:")
            })
            .collect();
        // IPv4 first: it is what people type into ssh and Moonlight.
        candidates.sort_by_key(|g| g.address.contains(':'));
        if let Some(first) = candidates.into_iter().next() {
            return Some(first);
        }
    }
    None
}

/// The QEMU process of a running domain, from libvirt's pid file (readable by root, and
/// for `qemu:///session` by the user).
fn qemu_pid(uri: &str, name: &str) -> Option<u32> {
    let path = if uri.contains("/session") {
        handoff::config::user_config_path()?
            .parent()?
            .parent()?
            .join(format!("libvirt/qemu/run/{name}.pid"))
    } else {
        PathBuf::from(format!("/run/libvirt/qemu/{name}.pid"))
    };
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::test_node;
    use handoff::live::DomainEvent;
    use handoff::pci::PciAddress;

    fn done(hv: &mut Libvirt, task: &Task) -> VmState {
        match hv.poll(task).expect("poll") {
            TaskState::Done { state, .. } => state,
            other => panic!("{:?} not done: {other:?}", task.action),
        }
    }

    #[test]
    fn start_and_destroy_are_tasks_that_end_in_the_state_probe_reads() {
        let tmp = tempfile::tempdir().unwrap();
        let lab = VmRef::named(&test_node(tmp.path()), "lab");
        let mut hv = Libvirt::new();
        assert_eq!(hv.probe(&lab).unwrap().state, VmState::Shutoff);

        let Start::Begun(task) = hv.start(&lab).unwrap() else {
            panic!("the test driver runs no hook, so nothing refuses")
        };
        assert_eq!((task.action, task.upid.as_deref()), (Action::Start, None));
        assert_eq!(done(&mut hv, &task), VmState::Running);
        assert_eq!(
            hv.probe(&lab).unwrap(),
            Probe {
                state: VmState::Running,
                reason: Some("booted".into())
            }
        );

        let task = hv.destroy(&lab).unwrap();
        assert_eq!(done(&mut hv, &task), VmState::Shutoff);
        assert_eq!(
            hv.probe(&lab).unwrap().reason.as_deref(),
            Some("forced off (destroyed)")
        );

        // Starting what runs is libvirt's error, not a refusal of the guard.
        hv.start(&lab).unwrap();
        match hv.start(&lab) {
            Err(HypervisorError::Start { uri, name, message }) => {
                assert_eq!((uri.as_str(), name.as_str()), (lab.at.as_str(), "lab"));
                assert!(message.contains("already running"), "{message}");
            }
            other => panic!("a second start: {other:?}"),
        }
        let task = hv.shutdown(&lab).unwrap();
        assert_eq!(done(&mut hv, &task), VmState::Shutoff);
    }

    #[test]
    fn describe_names_every_passed_through_function_and_the_looking_glass_device() {
        let tmp = tempfile::tempdir().unwrap();
        let uri = test_node(tmp.path());
        let mut hv = Libvirt::new();
        let d = hv.describe(&VmRef::named(&uri, "lab")).unwrap();
        let gpu = PciAddress::new(0, 1, 0, 0);
        assert_eq!(d.passthrough, [gpu, gpu.with_function(1)]);
        assert_eq!(
            d.looking_glass,
            Some(Shmem {
                name: "looking-glass".into(),
                model: Some("ivshmem-plain".into()),
                size_bytes: Some(32 << 20),
            })
        );
        assert!(d.definition.contains("<name>lab</name>"), "{}", d.definition);
        let other = hv.describe(&VmRef::named(&uri, "other")).unwrap();
        assert_eq!((other.passthrough.len(), other.looking_glass), (0, None));
    }

    #[test]
    fn list_gives_every_domain_with_its_state() {
        let tmp = tempfile::tempdir().unwrap();
        let uri = test_node(tmp.path());
        let mut hv = Libvirt::new();
        hv.start(&VmRef::named(&uri, "other")).unwrap();
        let names: Vec<(String, VmState)> = hv
            .list(&uri)
            .unwrap()
            .into_iter()
            .map(|(vm, s)| (vm.name, s))
            .collect();
        assert_eq!(
            names,
            [
                ("lab".into(), VmState::Shutoff),
                ("other".into(), VmState::Running)
            ]
        );
    }

    #[test]
    fn an_unknown_domain_is_undefined_and_an_unreachable_uri_unknown_each_saying_why() {
        let tmp = tempfile::tempdir().unwrap();
        let uri = test_node(tmp.path());
        let mut hv = Libvirt::new();
        let missing = VmConfig {
            name: "nope".into(),
            vmid: None,
            label: None,
            uri: uri.clone(),
            shutdown_timeout_s: 1,
        };
        let st = handoff::hypervisor::vm_status(&mut hv, &missing);
        assert_eq!(st.state, VmState::Undefined);
        assert!(st.error.unwrap().contains("virsh -c"));

        let gone = format!("test://{}", tmp.path().join("no-such-node.xml").display());
        match hv.probe(&VmRef::named(&gone, "lab")) {
            Err(HypervisorError::Connect { uri, message }) => {
                assert_eq!(uri, gone);
                assert!(!message.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // Its guest facts are unknown, not an error.
        assert_eq!(hv.guest(&VmRef::named(&gone, "lab")), Guest::default());
    }

    #[test]
    fn subscribe_delivers_the_subscribed_vms_lifecycle_until_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let uri = test_node(tmp.path());
        let lab = VmRef::named(&uri, "lab");
        let mut hv = Libvirt::new();
        // Subscribe before anything opens the URI: libvirt's event loop must exist before
        // the connection it reports on.
        let (tx, rx) = mpsc::channel();
        let sub = hv
            .subscribe(
                std::slice::from_ref(&lab),
                Arc::new(move |ev| tx.send(ev).is_ok()),
            )
            .unwrap();
        let next = || {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("an event within 10 s")
        };

        // `other` is not subscribed: its start is not delivered, so lab's comes first.
        hv.start(&VmRef::named(&uri, "other")).unwrap();
        hv.start(&lab).unwrap();
        assert_eq!(
            next(),
            VmEvent::Lifecycle {
                vm: lab.clone(),
                event: DomainEvent::Started
            }
        );
        hv.destroy(&lab).unwrap();
        assert_eq!(
            next(),
            VmEvent::Lifecycle {
                vm: lab.clone(),
                event: DomainEvent::Stopped
            }
        );
        drop(sub);
    }

    #[test]
    fn a_refusal_inside_libvirts_error_is_a_refusal_with_the_hooks_own_words() {
        let err = "Hook script execution failed: internal error: Child process (LC_ALL=C \
            /etc/libvirt/hooks/qemu.d/handoff win11 prepare begin -) unexpected exit status 1: \
            handoff: warning: win11 passes 0000:01:00.0 through but is not a [[vm]]\n\
            handoff: not handing GPU 0000:01:00.0 to win11: 1 process uses it:\n  \
            sleep (pid 42, user root) holds /dev/nvidia0\n";
        assert_eq!(
            hook_message(err),
            Some(Refusal {
                message: "not handing GPU 0000:01:00.0 to win11: 1 process uses it:\n  \
                          sleep (pid 42, user root) holds /dev/nvidia0"
                    .into(),
                warnings: vec!["win11 passes 0000:01:00.0 through but is not a [[vm]]".into()],
            })
        );
        assert_eq!(
            hook_message("Requested operation is not valid: domain is already running"),
            None
        );
    }
}
