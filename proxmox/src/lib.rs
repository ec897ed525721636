//! handoff's Proxmox VE backend: [`Proxmox`] implements [`handoff::hypervisor::Hypervisor`]
//! over the PVE REST API (the mapping is in the header of `src/hypervisor/mod.rs`), and
//! [`open`] picks it for the `[[vm]]` entries that have a `vmid`.
//!
//! It is its own crate so that only what starts and stops PVE VMs links HTTP and TLS
//! (ureq over rustls with `ring`); the core library, the bar block and the hookscript
//! (`handoff pve-hook`, which reads PVE's files on the host: `handoff::pve`) do not.
//!
//! PVE runs every action as a background task with a UPID: start, shutdown and stop return
//! one, and [`Hypervisor::poll`] follows it (`/tasks/{upid}/status`, and its log for the
//! last lines of a failure). A start that handoff's hookscript refused is a failed task whose
//! log carries the hookscript's words: it comes back as [`TaskState::Refused`].

pub mod client;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use handoff::config::{Config, ProxmoxConfig};
use handoff::hypervisor::{
    Action, Description, EventSink, Guest, Hypervisor, HypervisorError, Probe, Refusal, RefusedStart, Start,
    Subscription, Task, TaskState, VmEvent, VmRef,
};
use handoff::live::DomainEvent;
use handoff::status::VmState;
use serde_json::Value;

pub use client::{ApiError, Client};

/// The Proxmox VE API of one `[proxmox]` section.
pub struct Proxmox {
    cfg: ProxmoxConfig,
    /// Graceful shutdown timeouts by VMID (the `[[vm]]`'s `shutdown_timeout_s`): PVE's
    /// shutdown task gets the same, so that it has ended when handoff gives up and a
    /// forced stop is not kept waiting for its lock.
    shutdown_s: HashMap<u32, u64>,
    client: Option<Client>,
    nodes: HashMap<u32, String>,
}

impl Proxmox {
    pub fn new(cfg: &Config) -> Option<Self> {
        let p = cfg.proxmox.clone()?;
        Some(Self {
            shutdown_s: cfg
                .vms
                .iter()
                .filter_map(|v| Some((v.vmid?, v.shutdown_timeout_s)))
                .collect(),
            cfg: p,
            client: None,
            nodes: HashMap::new(),
        })
    }

    fn err(&self, e: ApiError) -> HypervisorError {
        match e {
            ApiError::NoVm { .. } => HypervisorError::NoVm {
                at: self.cfg.url.clone(),
                message: e.to_string(),
            },
            e => HypervisorError::Api {
                at: self.cfg.url.clone(),
                message: e.to_string(),
            },
        }
    }

    fn client(&mut self) -> Result<&Client, HypervisorError> {
        if self.client.is_none() {
            let c = Client::new(&self.cfg).map_err(|e| self.err(e))?;
            self.client = Some(c);
        }
        Ok(self.client.as_ref().expect("just set"))
    }

    fn get(&mut self, path: &str) -> Result<Value, HypervisorError> {
        let r = self.client()?.get(path);
        r.map_err(|e| self.err(e))
    }

    fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Result<Value, HypervisorError> {
        let r = self.client()?.post(path, form);
        r.map_err(|e| self.err(e))
    }

    fn vmid(&self, vm: &VmRef) -> Result<u32, HypervisorError> {
        vm.id
            .or_else(|| vm.name.parse().ok())
            .ok_or_else(|| HypervisorError::NoVm {
                at: self.cfg.url.clone(),
                message: format!(
                    "{} is not a Proxmox VE VM: its [[vm]] entry needs a vmid",
                    vm.name
                ),
            })
    }

    /// The node `vmid` is on: `[proxmox] node`, else the cluster's answer (kept).
    fn node(&mut self, vmid: u32) -> Result<String, HypervisorError> {
        if let Some(n) = &self.cfg.node {
            return Ok(n.clone());
        }
        if let Some(n) = self.nodes.get(&vmid) {
            return Ok(n.clone());
        }
        let list = self.get("/cluster/resources?type=vm")?;
        for item in list.as_array().into_iter().flatten() {
            if let (Some(id), Some(node)) = (item["vmid"].as_u64(), item["node"].as_str()) {
                self.nodes.insert(id as u32, node.to_owned());
            }
        }
        self.nodes.get(&vmid).cloned().ok_or_else(|| {
            self.err(ApiError::NoVm {
                url: self.cfg.url.clone(),
                vmid,
                token: self.cfg.token.clone(),
            })
        })
    }

    fn vm_path(&mut self, vm: &VmRef) -> Result<(u32, String), HypervisorError> {
        let vmid = self.vmid(vm)?;
        let node = self.node(vmid)?;
        Ok((vmid, format!("/nodes/{}/qemu/{vmid}", client::segment(&node))))
    }

    fn status(&mut self, vm: &VmRef) -> Result<Value, HypervisorError> {
        let (_, path) = self.vm_path(vm)?;
        self.get(&format!("{path}/status/current"))
    }

    fn task(
        &mut self,
        vm: &VmRef,
        action: Action,
        what: &str,
        form: &[(&str, &str)],
    ) -> Result<Task, HypervisorError> {
        let (_, path) = self.vm_path(vm)?;
        let upid = self.post(&format!("{path}/status/{what}"), form)?;
        let mut task = Task::new(vm, action);
        task.upid = upid.as_str().map(str::to_owned);
        Ok(task)
    }

    /// The last lines of a task's log.
    fn task_log(&mut self, node: &str, upid: &str) -> Vec<String> {
        let path = format!(
            "/nodes/{}/tasks/{}/log?start=0&limit=500",
            client::segment(node),
            client::segment(upid)
        );
        let lines: Vec<String> = self
            .get(&path)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|l| l["t"].as_str())
            // PVE writes one entry per line; an entry with line breaks (fakepve's failure
            // on demand, which is one message) is read as the lines it holds.
            .flat_map(|t| t.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        lines
    }
}

/// A VM's state from `status/current` (or a listing): `status` and `qmpstatus`.
fn state_of(v: &Value) -> VmState {
    match (v["status"].as_str(), v["qmpstatus"].as_str()) {
        (Some("running"), Some("paused" | "suspended" | "prelaunch")) => VmState::Paused,
        (Some("running"), _) => VmState::Running,
        (Some("stopped"), _) => VmState::Shutoff,
        (Some("paused"), _) => VmState::Paused,
        _ => VmState::Unknown,
    }
}

/// The node a UPID names (`UPID:node:…`).
fn upid_node(upid: &str) -> Option<&str> {
    upid.strip_prefix("UPID:")?.split(':').next()
}

/// The hookscript's own words in a failed start's log: `handoff: …` lines, warnings apart.
fn refusal_in(log: &[String], exit: &str) -> Option<Refusal> {
    if !exit.contains("hookscript error") && !log.iter().any(|l| l.contains("hookscript error")) {
        return None;
    }
    let mut r = Refusal::default();
    for line in log {
        let Some(rest) = line.trim().strip_prefix("handoff: ") else {
            continue;
        };
        match rest.strip_prefix("warning: ") {
            Some(w) => r.warnings.push(w.to_owned()),
            None if r.message.is_empty() => r.message = rest.to_owned(),
            None => r.message = format!("{}\n{rest}", r.message),
        }
    }
    if r.message.is_empty() {
        r.message = exit.to_owned();
    }
    Some(r)
}

impl Hypervisor for Proxmox {
    fn kind(&self) -> &'static str {
        "proxmox"
    }

    fn list(&mut self, at: &str) -> Result<Vec<(VmRef, VmState)>, HypervisorError> {
        let list = self.get("/cluster/resources?type=vm")?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["type"].as_str() == Some("qemu"))
            .filter_map(|i| {
                let id = i["vmid"].as_u64()? as u32;
                let name = i["name"].as_str().unwrap_or_default().to_owned();
                Some((
                    VmRef {
                        at: at.to_owned(),
                        name,
                        id: Some(id),
                    },
                    state_of(i),
                ))
            })
            .collect())
    }

    fn probe(&mut self, vm: &VmRef) -> Result<Probe, HypervisorError> {
        let s = self.status(vm)?;
        let lock = s["lock"].as_str().filter(|l| !l.is_empty());
        Ok(Probe {
            state: state_of(&s),
            reason: lock.map(|l| format!("locked ({l}): {} holds it", ApiError::lock_words(l))),
        })
    }

    fn start(&mut self, vm: &VmRef) -> Result<Start, HypervisorError> {
        match self.task(vm, Action::Start, "start", &[]) {
            Ok(t) => Ok(Start::Begun(t)),
            Err(HypervisorError::Api { at, message }) => Err(HypervisorError::Start {
                uri: at,
                name: vm.to_string(),
                message,
            }),
            Err(e) => Err(e),
        }
    }

    fn shutdown(&mut self, vm: &VmRef) -> Result<Task, HypervisorError> {
        let vmid = self.vmid(vm)?;
        let timeout = self.shutdown_s.get(&vmid).copied().unwrap_or(120).to_string();
        // No forceStop: forcing is the person's decision (`handoff stop --force`).
        self.task(vm, Action::Shutdown, "shutdown", &[("timeout", &timeout)])
            .map_err(|e| stop_error(vm, e))
    }

    fn destroy(&mut self, vm: &VmRef) -> Result<Task, HypervisorError> {
        self.task(vm, Action::Destroy, "stop", &[])
            .map_err(|e| stop_error(vm, e))
    }

    fn poll(&mut self, task: &Task) -> Result<TaskState, HypervisorError> {
        let state = self.probe(&task.vm).map(|p| p.state)?;
        let Some(upid) = task.upid.clone() else {
            return Ok(TaskState::Done {
                state,
                notes: Vec::new(),
            });
        };
        let node = upid_node(&upid).unwrap_or_default().to_owned();
        let s = self.get(&format!(
            "/nodes/{}/tasks/{}/status",
            client::segment(&node),
            client::segment(&upid)
        ))?;
        if s["status"].as_str() == Some("running") {
            let shown = if task.action == Action::Shutdown && state == VmState::Running {
                VmState::Shutdown
            } else {
                state
            };
            return Ok(TaskState::Pending { state: shown });
        }
        let exit = s["exitstatus"].as_str().unwrap_or("unknown").to_owned();
        if exit == "OK" {
            return Ok(TaskState::Done {
                state,
                notes: Vec::new(),
            });
        }
        // PVE's shutdown task gives up at its timeout ("VM quit/powerdown failed - got
        // timeout") and leaves the VM running: the guest ignored the request. That is
        // still "pending" to the caller, whose own timeout then offers forcing it off,
        // as with libvirt.
        if task.action == Action::Shutdown && state.is_active() && exit.contains("got timeout") {
            return Ok(TaskState::Pending {
                state: VmState::Running,
            });
        }
        let log = self.task_log(&node, &upid);
        if task.action == Action::Start
            && let Some(r) = refusal_in(&log, &exit)
        {
            return Ok(TaskState::Refused(r));
        }
        let vmid = self.vmid(&task.vm).unwrap_or_default();
        let hint = match exit
            .strip_prefix("VM is locked (")
            .and_then(|m| m.split(')').next())
        {
            Some(lock) => ApiError::Locked {
                vmid,
                lock: lock.to_owned(),
                what: ApiError::lock_words(lock),
                node: node.clone(),
            }
            .to_string(),
            None => format!("`pvenode task log {upid}` on {node} has the whole log"),
        };
        let last: Vec<&str> = log.iter().rev().take(5).rev().map(String::as_str).collect();
        Ok(TaskState::Failed {
            message: format!(
                "PVE task {upid} failed with exit status {exit:?}; the last lines of its log:\n    {}\n  {hint}",
                last.join("\n    ")
            ),
        })
    }

    fn describe(&mut self, vm: &VmRef) -> Result<Description, HypervisorError> {
        let (_, path) = self.vm_path(vm)?;
        let cfg = self.get(&format!("{path}/config"))?;
        let mut conf = std::collections::BTreeMap::new();
        let mut definition = String::new();
        for (k, v) in cfg.as_object().into_iter().flatten() {
            let v = v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
            definition += &format!("{k}: {v}\n");
            conf.insert(k.clone(), v);
        }
        // Mappings are cluster-wide: ask for the ones this VM names (needs Mapping.Audit;
        // without it the mapped devices are left out).
        let mut mappings = std::collections::BTreeMap::new();
        let node = self.node(self.vmid(vm)?)?;
        for v in conf.values() {
            let Some(m) = handoff::pve::parse_hostpci(v).and_then(|h| h.mapping) else {
                continue;
            };
            if let Ok(entry) = self.get(&format!("/cluster/mapping/pci/{}", client::segment(&m))) {
                let text = entry["map"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|l| format!("\tmap {l}\n"))
                    .collect::<String>();
                mappings.extend(handoff::pve::parse_pci_mapping(&format!("{m}\n{text}"), &node));
            }
        }
        let passthrough = handoff::pve::passthrough(&conf, &mappings)
            .into_iter()
            .map(|d| d.address())
            .collect();
        Ok(Description {
            passthrough,
            looking_glass: handoff::pve::looking_glass(&conf),
            definition,
        })
    }

    /// `status/current`, and the guest agent's addresses when it answers (PVE 9 wants
    /// `VM.GuestAgent.Audit` for that, PVE 8 `VM.Monitor`; without it, no IP).
    fn guest(&mut self, vm: &VmRef) -> Guest {
        let Ok(s) = self.status(vm) else {
            return Guest::default();
        };
        let running = s["status"].as_str() == Some("running");
        let ip = if running {
            self.vm_path(vm)
                .and_then(|(_, path)| self.get(&format!("{path}/agent/network-get-interfaces")))
                .ok()
                .and_then(|v| agent_ip(&v))
        } else {
            None
        };
        Guest {
            pid: s["pid"].as_u64().map(|p| p as u32),
            vcpus: s["cpus"].as_u64().map(|c| c as u32),
            memory_kib: s["mem"].as_u64().filter(|_| running).map(|m| m / 1024),
            max_memory_kib: s["maxmem"].as_u64().map(|m| m / 1024),
            uptime_s: s["uptime"].as_u64().filter(|_| running),
            ip,
        }
    }

    /// `GET /nodes/{node}/tasks` (`typefilter=qmstart`, `errors=1`; filtered here too) on
    /// each node of `vms`: their failed start tasks, and for the new ones (`read_logs`) the
    /// hookscript's words from the task's log (`refusal_in`) and the VM's devices. PVE
    /// lists a token's own tasks, and everyone's with `Sys.Audit` on `/nodes/{node}`: a
    /// start from the web UI or `qm start` is seen only with that (docs/proxmox.md).
    fn refused_starts(
        &mut self,
        vms: &[VmRef],
        known: &[String],
        read_logs: bool,
    ) -> Result<Vec<RefusedStart>, HypervisorError> {
        let mut by_node: std::collections::BTreeMap<String, Vec<(u32, &VmRef)>> = Default::default();
        for vm in vms {
            let Ok(id) = self.vmid(vm) else { continue };
            // A VM the token cannot see has no node: its probe says so.
            let Ok(node) = self.node(id) else { continue };
            by_node.entry(node).or_default().push((id, vm));
        }
        let mut out = Vec::new();
        for (node, ids) in by_node {
            let list = self.get(&format!(
                "/nodes/{}/tasks?typefilter=qmstart&errors=1&limit=50",
                client::segment(&node)
            ))?;
            for t in list.as_array().into_iter().flatten() {
                // A running task has no `status` in the listing; an ended one its exit status.
                let (Some("qmstart"), Some(status), Some(upid)) =
                    (t["type"].as_str(), t["status"].as_str(), t["upid"].as_str())
                else {
                    continue;
                };
                if status == "OK" || known.iter().any(|k| k == upid) {
                    continue;
                }
                let Some(&(vmid, vm)) = ids
                    .iter()
                    .find(|(id, _)| t["id"].as_str() == Some(id.to_string().as_str()))
                else {
                    continue;
                };
                let mut r = RefusedStart {
                    vm: vm.name.clone(),
                    vmid,
                    upid: upid.to_owned(),
                    user: t["user"].as_str().unwrap_or_default().to_owned(),
                    at: t["starttime"].as_u64().unwrap_or_default(),
                    message: None,
                    passthrough: Vec::new(),
                };
                if read_logs && let Some(refusal) = refusal_in(&self.task_log(&node, upid), status) {
                    r.message = Some(refusal.message);
                    r.passthrough = self.describe(vm).map(|d| d.passthrough).unwrap_or_default();
                }
                out.push(r);
            }
        }
        Ok(out)
    }

    /// PVE has no event stream: a thread asks for the VMs' states every
    /// `[proxmox] poll_interval_s` and sends what changed.
    fn subscribe(&mut self, vms: &[VmRef], sink: EventSink) -> Result<Subscription, HypervisorError> {
        let mut me = Proxmox {
            cfg: self.cfg.clone(),
            shutdown_s: self.shutdown_s.clone(),
            client: None,
            nodes: HashMap::new(),
        };
        me.client()?;
        let vms = vms.to_vec();
        let every = Duration::from_secs(self.cfg.poll_interval_s);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut last: HashMap<VmRef, VmState> = HashMap::new();
            let mut lost = false;
            while !stopped.load(Ordering::Relaxed) {
                for vm in &vms {
                    match me.probe(vm) {
                        Ok(p) => {
                            if lost {
                                lost = false;
                                if !sink(VmEvent::Back { at: vm.at.clone() }) {
                                    return;
                                }
                            }
                            let before = last.insert(vm.clone(), p.state);
                            if before.is_some_and(|b| b != p.state) {
                                let event = if p.state.is_active() {
                                    DomainEvent::Started
                                } else {
                                    DomainEvent::Stopped
                                };
                                if !sink(VmEvent::Lifecycle {
                                    vm: vm.clone(),
                                    event,
                                }) {
                                    return;
                                }
                            }
                        }
                        Err(e) if !lost => {
                            lost = true;
                            if !sink(VmEvent::Lost {
                                at: vm.at.clone(),
                                why: e.to_string(),
                            }) {
                                return;
                            }
                        }
                        Err(_) => {}
                    }
                }
                let mut slept = Duration::ZERO;
                while slept < every && !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    slept += Duration::from_millis(100);
                }
            }
        });
        Ok(Subscription::new(move || stop.store(true, Ordering::Relaxed)))
    }
}

fn stop_error(vm: &VmRef, e: HypervisorError) -> HypervisorError {
    match e {
        HypervisorError::Api { at, message } => HypervisorError::Stop {
            uri: at,
            name: vm.to_string(),
            message,
        },
        e => e,
    }
}

/// The hypervisor for `cfg`'s VMs with PVE in this process: [`Proxmox`] for `[[vm]]`
/// entries with a `vmid`, `fallback` for the rest. (The `handoff` CLI reaches PVE through
/// `handoff-pve` over a pipe instead, so that the CLI, which is also the root hooks, links
/// no TLS: `handoff::hypervisor::piped`.)
pub fn open(cfg: &Config, fallback: Box<dyn Hypervisor>) -> Box<dyn Hypervisor> {
    let Some(p) = &cfg.proxmox else { return fallback };
    let cfg2 = cfg.clone();
    Box::new(handoff::hypervisor::piped::Router::new(
        &p.url,
        Box::new(move || Ok(Box::new(Proxmox::new(&cfg2).expect("[proxmox] is set")) as Box<dyn Hypervisor>)),
        fallback,
    ))
}

/// The address to show from the guest agent's `network-get-interfaces` (`{"result": [{"name",
/// "ip-addresses": [{"ip-address", "ip-address-type"}]}]}`): not loopback or link-local,
/// IPv4 first (what people type into ssh and Moonlight), as for libvirt's agent.
fn agent_ip(answer: &Value) -> Option<handoff::hypervisor::GuestIp> {
    let mut candidates: Vec<handoff::hypervisor::GuestIp> = answer["result"]
        .as_array()?
        .iter()
        .filter_map(|i| Some((i["name"].as_str()?, i["ip-addresses"].as_array()?)))
        .filter(|(name, _)| *name != "lo" && !name.starts_with("Loopback"))
        .flat_map(|(name, addrs)| {
            addrs.iter().filter_map(move |a| {
                Some(handoff::hypervisor::GuestIp {
                    address: a["ip-address"].as_str()?.to_owned(),
                    interface: name.to_owned(),
                    source: "agent",
                })
            })
        })
        .filter(|g| !g.address.starts_with("127.") && g.address != "::1" && !g.address.starts_with("fe80:"))
        .collect();
    candidates.sort_by_key(|g| g.address.contains(':'));
    candidates.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A start task's log when the hookscript refused, as PVE writes it: the script's
    /// output line by line, then `exec_hookscript`'s die message as the task error.
    #[test]
    fn a_hookscript_refusal_in_the_task_log_is_the_guards_own_words() {
        let exit = "hookscript error for 141 on pre-start: command '/var/lib/vz/snippets/handoff 141 pre-start' failed: exit code 1";
        let log: Vec<String> = [
            "handoff: warning: Linux AI (VM 141) is a [[vm]] in the config but passes no function of 0000:01:00.0 through",
            "handoff: not starting Linux AI (VM 141): GPU 0000:01:00.0 is passed through to Windows 11 (VM 140), which is running.",
            &format!("TASK ERROR: {exit}"),
        ]
        .map(String::from)
        .to_vec();
        let r = refusal_in(&log, exit).unwrap();
        assert!(r.message.starts_with("not starting Linux AI (VM 141)"), "{r:?}");
        assert_eq!(r.warnings.len(), 1);
        let other = ["TASK ERROR: storage 'x' is not online".to_owned()];
        assert!(refusal_in(&other, "storage 'x' is not online").is_none());
    }

    #[test]
    fn states_from_pve_status_and_qmpstatus() {
        let v = |s: &str, q: &str| serde_json::json!({"status": s, "qmpstatus": q});
        assert_eq!(state_of(&v("running", "running")), VmState::Running);
        assert_eq!(state_of(&v("running", "paused")), VmState::Paused);
        assert_eq!(state_of(&v("stopped", "stopped")), VmState::Shutoff);
        assert_eq!(
            upid_node("UPID:pve1:000003E8:00001B58:6B1503A7:qmshutdown:140:handoff@pve!desk:"),
            Some("pve1")
        );
    }
}
