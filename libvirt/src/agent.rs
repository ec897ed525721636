//! `handoff __agent`, the agent's side of [`handoff::agent`] (the wire, and the surface's
//! side, live there, in the core): answers a surface's requests with libvirt, in a process
//! of its own so that the surface links no libvirt.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use handoff::agent::{Done, Failure, FailureKind, In, Out, Reply, Request};
use handoff::config::Config;
use handoff::live::{Change, DomainEvent, Sink};
use handoff::pci::PciAddress;
use handoff::status::{VmState, VmStatus};

/// What each VM's definition passes through, as the hypervisor's `describe` said it: asked
/// once per definition, not on every probe (a surface probes on every change it hears),
/// and forgotten when libvirt says the domain was defined again or undefined, or the
/// connection to it was lost or came back. A PVE VM has no definition events: its
/// `hostpciN` is read again when its connection drops or the surface restarts. The
/// details window keeps one too, fed by its own live watcher.
#[derive(Debug, Default)]
pub struct Definitions(HashMap<(String, String), Vec<PciAddress>>);

impl Definitions {
    /// Forgets what `change` may have made stale.
    pub fn heard(&mut self, change: &Change) {
        match change {
            Change::Domain {
                uri,
                name,
                event: DomainEvent::Defined | DomainEvent::Undefined,
            } => {
                self.0.remove(&(uri.clone(), name.clone()));
            }
            Change::SourceLost { .. } | Change::SourceBack { .. } => self.0.clear(),
            _ => {}
        }
    }

    /// `vm`'s passed-through devices: remembered, else `describe`d (None when its
    /// definition cannot be read now; asked again next time).
    pub fn passthrough(
        &mut self,
        vm: &handoff::config::VmConfig,
        describe: impl FnOnce() -> Option<Vec<PciAddress>>,
    ) -> Option<Vec<PciAddress>> {
        let key = (vm.uri.clone(), vm.name.clone());
        if let Some(p) = self.0.get(&key) {
            return Some(p.clone());
        }
        let p = describe()?;
        self.0.insert(key, p.clone());
        Some(p)
    }
}

/// The starts this agent is making or made (the `[[vm]]`'s name, and when it ended; None
/// while under way): a refusal of one of them is told by the action's own reply, so the
/// same refusal found in PVE's task list a poll later is not told again.
static OWN_STARTS: Mutex<Vec<(String, Option<std::time::Instant>)>> = Mutex::new(Vec::new());

/// Whether a refused start of `vm` found now is one of this agent's own: under way, or
/// ended less than two polls (and a margin for the task list) ago.
fn own_start(vm: &str, poll: std::time::Duration) -> bool {
    let window = poll * 2 + std::time::Duration::from_secs(10);
    let mut own = OWN_STARTS.lock().unwrap_or_else(|e| e.into_inner());
    own.retain(|(_, ended)| ended.is_none_or(|t| t.elapsed() < window));
    own.iter().any(|(v, _)| v == vm)
}

/// The PVE VMs' states, polled, as the libvirt source's changes; and the start tasks the
/// hookscript refused, whoever started them, logged in the user's runtime dir
/// ([`handoff::refusals::user_host`]) and told as [`Change::Refused`].
fn pve_poll(cfg: &Config, sink: Sink) -> Option<handoff::hypervisor::Subscription> {
    use handoff::hypervisor::{VmEvent, VmRef};
    use handoff::live::Source;
    let vms: Vec<VmRef> = cfg
        .vms
        .iter()
        .filter(|v| v.vmid.is_some())
        .map(VmRef::from)
        .collect();
    if vms.is_empty() || cfg.proxmox.is_none() {
        return None;
    }
    let poll = std::time::Duration::from_secs(cfg.proxmox.as_ref().map_or(5, |p| p.poll_interval_s));
    let (user, gpus) = (handoff::refusals::user_host(&cfg.host), cfg.clone());
    let forward = Arc::new(move |ev: VmEvent| match ev {
        VmEvent::Refused(r) => {
            // Logged in the user's runtime dir in the hook's own format, once per task
            // (the UPID), and told as the hook's refusals are: the surface reads the log.
            let Some(message) = r.message else { return true };
            if own_start(&r.vm, poll) {
                return true;
            }
            // On the node itself the hookscript ran here and logged the refusal in
            // `[host] run` already, which the tray reads: once is enough.
            if handoff::pve::PveHost::system().conf_path(r.vmid).exists() {
                return true;
            }
            let gpu = handoff::gpus::taken_by(&gpus, &r.passthrough)
                .first()
                .map_or(gpus.gpu.address, |g| g.address);
            match handoff::refusals::RefusalLog::record_task(&user, gpu, &r.vm, &[], &message, Some(&r.upid))
            {
                Ok(Some(seq)) => sink(Change::Refused { vm: r.vm, seq }),
                Ok(None) => true,
                Err(e) => {
                    tracing::warn!(
                        "cannot log the refused start of {} in {}: {e}",
                        r.vm,
                        handoff::refusals::path(&user).display()
                    );
                    true
                }
            }
        }
        VmEvent::Lifecycle { vm, event } => sink(Change::Domain {
            uri: vm.at,
            name: vm.name,
            event,
        }),
        VmEvent::Lost { at, why } => sink(Change::SourceLost {
            source: Source::Libvirt { uri: at },
            why,
        }),
        VmEvent::Back { at } => sink(Change::SourceBack {
            source: Source::Libvirt { uri: at },
        }),
    });
    match crate::open(cfg).subscribe(&vms, forward) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("not watching the Proxmox VE VMs: {e}");
            None
        }
    }
}

/// The agent's side: answers requests read from `input` and writes changes and replies to
/// `output` until `input` ends, then waits for the actions under way. Blocking.
pub fn serve(
    cfg: &Config,
    input: impl BufRead,
    output: Box<dyn Write + Send>,
) -> Result<(), handoff::live::WatchError> {
    use std::sync::atomic::AtomicBool;

    use handoff::hypervisor::vm_status;
    use handoff::live::{Sources, Watcher};

    let out = Arc::new(Mutex::new(output));
    // A lost or regained libvirt connection makes the next probe connect anew.
    let reconnect = Arc::new(AtomicBool::new(false));
    let definitions = Arc::new(Mutex::new(Definitions::default()));
    let sink: Sink = {
        let (out, reconnect, definitions) = (out.clone(), reconnect.clone(), definitions.clone());
        Arc::new(move |c: Change| {
            if matches!(c, Change::SourceLost { .. } | Change::SourceBack { .. }) {
                reconnect.store(true, Ordering::Relaxed);
            }
            definitions.lock().unwrap_or_else(|e| e.into_inner()).heard(&c);
            send(&out, &Out::Change(c))
        })
    };
    let _watcher = if cfg.vms.is_empty() {
        None
    } else {
        let only_libvirt = crate::events::sources(Sources {
            uevents: false,
            run_dir: false,
            nodes: false,
            libvirt: true,
            vm_events: None,
        });
        Some(Watcher::with_sink(cfg, only_libvirt, sink.clone())?)
    };
    // Proxmox VE has no event stream: its VMs are polled (`[proxmox] poll_interval_s`)
    // through the hypervisor, and only when a `[[vm]]` has a vmid.
    let _pve_poll = pve_poll(cfg, sink.clone());
    let cfg = Arc::new(cfg.clone());

    // One prober thread; probes that queue while one runs are answered together by the
    // next, so a slow libvirt never piles up threads.
    let (probe_tx, probe_rx) = mpsc::channel::<u64>();
    let prober = {
        let (cfg, out) = (cfg.clone(), out.clone());
        let definitions = definitions.clone();
        thread::Builder::new()
            .name("handoff-agent-probe".into())
            .spawn(move || {
                let mut hv = crate::open(&cfg);
                let mut unknown_seen = false;
                while let Ok(first) = probe_rx.recv() {
                    let mut ids = vec![first];
                    ids.extend(probe_rx.try_iter());
                    if reconnect.swap(false, Ordering::Relaxed) || unknown_seen {
                        hv = crate::open(&cfg);
                    }
                    let mut probes: Vec<VmStatus> = Vec::with_capacity(cfg.vms.len());
                    for vm in &cfg.vms {
                        let mut s = vm_status(&mut *hv, vm);
                        // With several GPUs the surface needs which GPUs each VM takes (the
                        // tray's "Switch to" only for a VM sharing a GPU with a running one).
                        if cfg.gpu.len() > 1 && !matches!(s.state, VmState::Unknown | VmState::Undefined) {
                            let mut defs = definitions.lock().unwrap_or_else(|e| e.into_inner());
                            s.passthrough = defs.passthrough(vm, || {
                                hv.describe(&handoff::hypervisor::VmRef::from(vm))
                                    .map_err(|e| {
                                        tracing::info!("cannot read the definition of {}: {e}", vm.name)
                                    })
                                    .ok()
                                    .map(|d| d.passthrough)
                            });
                        }
                        probes.push(s);
                    }
                    unknown_seen = probes.iter().any(|p| p.state == VmState::Unknown);
                    for id in ids {
                        send(
                            &out,
                            &Out::Reply {
                                id,
                                reply: Reply::Probes(probes.clone()),
                            },
                        );
                    }
                }
            })
            .map_err(handoff::live::WatchError::Thread)?
    };

    let mut actions: Vec<thread::JoinHandle<()>> = Vec::new();
    let mut input = input;
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        // Bytes, not `lines()`: one line that is not UTF-8 must not end the loop (that
        // would leave the surface without answers until it restarts the agent).
        match input.read_until(b'\n', &mut bytes) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        let req = match parse_request(&bytes) {
            Ok(None) => continue,
            Ok(Some(r)) => r,
            Err((id, why)) => {
                tracing::warn!("{why}");
                // Answered when the line says which request it was; the surface waits on it.
                if let Some(id) = id {
                    let reply = Reply::Failed(Failure {
                        kind: FailureKind::Other,
                        message: why.clone(),
                        cause: why,
                    });
                    send(&out, &Out::Reply { id, reply });
                }
                continue;
            }
        };
        if req.request == Request::Probe {
            let _ = probe_tx.send(req.id);
            continue;
        }
        let id = req.id;
        let (cfg, to_surface) = (cfg.clone(), out.clone());
        let spawned = thread::Builder::new()
            .name("handoff-agent-action".into())
            .spawn(move || {
                let reply = act(&cfg, &req.request);
                send(&to_surface, &Out::Reply { id: req.id, reply });
            });
        match spawned {
            Ok(h) => actions.push(h),
            Err(e) => {
                let reply = Reply::Failed(Failure {
                    kind: FailureKind::Other,
                    message: format!("the libvirt agent cannot start a thread: {e}"),
                    cause: e.to_string(),
                });
                send(&out, &Out::Reply { id, reply });
            }
        }
        actions.retain(|h| !h.is_finished());
    }
    // Stdin closed: nobody will ask again. Let what runs finish (a half-done start would
    // leave the GPU mid-handoff), then go.
    for h in actions {
        let _ = h.join();
    }
    drop(probe_tx);
    let _ = prober.join();
    Ok(())
}

/// One line from the surface as a request: `Ok(None)` for a blank line; an error with
/// the request's id when the line names one (so it can be answered) and what was wrong.
/// A line that is not UTF-8 is refused whole: a VM name decoded lossily would name
/// another VM.
fn parse_request(line: &[u8]) -> Result<Option<In>, (Option<u64>, String)> {
    let id_of = |text: &str| {
        serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("id")?.as_u64())
    };
    let text = match std::str::from_utf8(line) {
        Ok(t) => t,
        Err(e) => {
            let lossy = String::from_utf8_lossy(line);
            return Err((
                id_of(&lossy),
                format!(
                    "the agent's request line is not UTF-8 text (invalid byte at offset {}); nothing was done",
                    e.valid_up_to()
                ),
            ));
        }
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(text).map(Some).map_err(|e| {
        (
            id_of(text),
            format!(
                "the agent's request line is not a request ({e}): {}",
                handoff::escape::plain(text.trim_end())
            ),
        )
    })
}

/// Writes one line; false once the surface stopped reading.
fn send(out: &Mutex<Box<dyn Write + Send>>, what: &Out) -> bool {
    let mut line = match serde_json::to_string(what) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot serialise a message for the surface: {e}");
            return true;
        }
    };
    line.push('\n');
    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
    out.write_all(line.as_bytes()).and_then(|()| out.flush()).is_ok()
}

/// Runs one start, stop or switch with [`crate::vm::Ctl`], as `handoff start` would.
fn act(cfg: &Config, request: &Request) -> Reply {
    use crate::vm::{Ctl, VmError};

    let fail = |e: &VmError| {
        let cause = match e {
            VmError::Switch { source, .. } => source.as_ref(),
            e => e,
        };
        let kind = match cause {
            VmError::Busy { .. } | VmError::HookRefused { .. } => FailureKind::Refused,
            VmError::StopTimeout { .. } => FailureKind::StopTimeout,
            VmError::NotConfigured { .. } | VmError::NoVms => FailureKind::NotConfigured,
            _ => FailureKind::Other,
        };
        Reply::Failed(Failure {
            kind,
            message: e.to_string(),
            cause: cause.to_string(),
        })
    };
    let Some(action) = request.action() else {
        unreachable!("probes are answered by the prober thread")
    };
    let mut say = |line: &str| tracing::info!("{line}");
    let starting = match &action {
        handoff::action::Action::TerminateAndStart { vm, .. } => Some(vm.as_str()),
        a if a.starts_a_vm() => a.vm(),
        _ => None,
    }
    .and_then(|v| crate::vm::resolve(cfg, Some(v)).ok())
    .map(|v| v.name.clone());
    if let Some(vm) = &starting {
        OWN_STARTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((vm.clone(), None));
    }
    let mut ctl = Ctl::new(cfg, &mut say);
    let result = ctl.act(&action, None);
    if let Some(vm) = &starting
        && let Some(entry) = OWN_STARTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
            .find(|(v, ended)| v == vm && ended.is_none())
    {
        entry.1 = Some(std::time::Instant::now());
    }
    match result {
        Some(Ok(done)) => {
            let vm = crate::vm::resolve(cfg, action.vm()).ok();
            Reply::Done(Done {
                vm: vm.map(|v| v.name.clone()).unwrap_or_default(),
                label: vm.map(|v| v.label().to_owned()).unwrap_or_default(),
                warnings: done.warnings().to_vec(),
            })
        }
        Some(Err(e)) => fail(&e),
        None => unreachable!("a request's action is a VM's"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition is described once, then remembered across probes until libvirt says
    /// it was defined again (or undefined, or the connection dropped).
    #[test]
    fn a_definition_is_described_once_per_change() {
        let cfg = Config::parse(
            "[gpu]\naddress = \"0000:01:00.0\"\n\n[[vm]]\nname = \"win11\"\nuri = \"test:///default\"\n\n\
             [[vm]]\nname = \"macos\"\nuri = \"test:///default\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let (win, mac) = (&cfg.vms[0], &cfg.vms[1]);
        let rtx: PciAddress = "0000:01:00.0".parse().unwrap();
        let igpu: PciAddress = "0000:00:02.0".parse().unwrap();
        let mut defs = Definitions::default();
        let mut asked = 0;
        let mut ask = |d: &mut Definitions, vm, got: PciAddress| {
            d.passthrough(vm, || {
                asked += 1;
                Some(vec![got])
            })
        };
        assert_eq!(ask(&mut defs, win, rtx), Some(vec![rtx]));
        assert_eq!(ask(&mut defs, win, igpu), Some(vec![rtx]), "remembered");
        assert_eq!(ask(&mut defs, mac, igpu), Some(vec![igpu]));
        let domain = |name: &str, event| Change::Domain {
            uri: "test:///default".into(),
            name: name.into(),
            event,
        };
        // A start or stop changes no definition.
        defs.heard(&domain("win11", DomainEvent::Started));
        defs.heard(&domain("win11", DomainEvent::Stopped));
        assert_eq!(ask(&mut defs, win, igpu), Some(vec![rtx]));
        // `virsh define` again: read anew, the other VM's kept.
        defs.heard(&domain("win11", DomainEvent::Defined));
        assert_eq!(ask(&mut defs, win, igpu), Some(vec![igpu]));
        assert_eq!(ask(&mut defs, mac, rtx), Some(vec![igpu]));
        defs.heard(&Change::SourceLost {
            source: handoff::live::Source::Libvirt {
                uri: "test:///default".into(),
            },
            why: "gone".into(),
        });
        assert_eq!(ask(&mut defs, mac, rtx), Some(vec![rtx]));
        assert_eq!(asked, 4);
        // A definition that cannot be read is not remembered as "nothing": asked again.
        assert_eq!(defs.passthrough(win, || None), None);
        assert_eq!(defs.passthrough(win, || Some(vec![rtx])), Some(vec![rtx]));
        assert_eq!(defs.passthrough(win, || None), Some(vec![rtx]));
        // Undefined: forgotten.
        defs.heard(&domain("win11", DomainEvent::Undefined));
        assert_eq!(defs.passthrough(win, || None), None);
    }
}
