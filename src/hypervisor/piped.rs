//! A hypervisor in another process, over JSON lines on a pipe: how the `handoff` binary
//! reaches Proxmox VE without linking HTTP or TLS (that binary is also the root hooks,
//! `handoff hook` and `handoff pve-hook`). [`Piped`] is the client; [`serve`] runs any
//! [`Hypervisor`] on the other end (`handoff-pve`, from the `handoff-proxmox` crate).
//!
//! The first line the client writes is the config (JSON); then one request per line,
//! one answer per line, in order. Subscriptions do not cross the pipe.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde::{Deserialize, Serialize};

use super::{
    Action, Description, EventSink, Guest, GuestIp, Hypervisor, HypervisorError, Probe, Refusal, Start,
    Subscription, Task, TaskState, VmRef,
};
use crate::config::Config;
use crate::pci::PciAddress;
use crate::status::VmState;

/// The program that serves PVE's API over the pipe.
pub const PVE_SERVER: &str = "handoff-pve";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WVm {
    at: String,
    name: String,
    id: Option<u32>,
}

impl From<&VmRef> for WVm {
    fn from(v: &VmRef) -> Self {
        Self {
            at: v.at.clone(),
            name: v.name.clone(),
            id: v.id,
        }
    }
}

impl From<WVm> for VmRef {
    fn from(v: WVm) -> Self {
        Self {
            at: v.at,
            name: v.name,
            id: v.id,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WTask {
    vm: WVm,
    action: String,
    upid: Option<String>,
    notes: Vec<String>,
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Start => "start",
        Action::Shutdown => "shutdown",
        Action::Destroy => "destroy",
    }
}

impl From<&Task> for WTask {
    fn from(t: &Task) -> Self {
        Self {
            vm: (&t.vm).into(),
            action: action_name(t.action).into(),
            upid: t.upid.clone(),
            notes: t.notes.clone(),
        }
    }
}

impl From<WTask> for Task {
    fn from(t: WTask) -> Self {
        let action = match t.action.as_str() {
            "start" => Action::Start,
            "shutdown" => Action::Shutdown,
            _ => Action::Destroy,
        };
        Task {
            vm: t.vm.into(),
            action,
            upid: t.upid,
            notes: t.notes,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Request {
    List {
        at: String,
    },
    Probe {
        vm: WVm,
    },
    Start {
        vm: WVm,
    },
    Shutdown {
        vm: WVm,
    },
    Destroy {
        vm: WVm,
    },
    Poll {
        task: WTask,
    },
    Describe {
        vm: WVm,
    },
    Guest {
        vm: WVm,
    },
    RefusedStarts {
        vms: Vec<WVm>,
        known: Vec<String>,
        read_logs: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct WError {
    kind: String,
    at: String,
    name: String,
    message: String,
}

impl From<&HypervisorError> for WError {
    fn from(e: &HypervisorError) -> Self {
        let (kind, at, name) = match e {
            HypervisorError::NoVm { at, .. } => ("no-vm", at.clone(), String::new()),
            HypervisorError::Start { uri, name, .. } => ("start", uri.clone(), name.clone()),
            HypervisorError::Stop { uri, name, .. } => ("stop", uri.clone(), name.clone()),
            _ => ("api", String::new(), String::new()),
        };
        let message = match e {
            HypervisorError::Start { message, .. } | HypervisorError::Stop { message, .. } => message.clone(),
            e => e.to_string(),
        };
        Self {
            kind: kind.into(),
            at,
            name,
            message,
        }
    }
}

impl From<WError> for HypervisorError {
    fn from(e: WError) -> Self {
        match e.kind.as_str() {
            "no-vm" => HypervisorError::NoVm {
                at: e.at,
                message: e.message,
            },
            "start" => HypervisorError::Start {
                uri: e.at,
                name: e.name,
                message: e.message,
            },
            "stop" => HypervisorError::Stop {
                uri: e.at,
                name: e.name,
                message: e.message,
            },
            _ => HypervisorError::Api {
                at: e.at,
                message: e.message,
            },
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ok: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    err: Option<WError>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WProbe {
    state: VmState,
    reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum WTaskState {
    Pending { state: VmState },
    Done { state: VmState, notes: Vec<String> },
    Failed { message: String },
    Refused { message: String, warnings: Vec<String> },
}

#[derive(Debug, Serialize, Deserialize)]
struct WDescription {
    passthrough: Vec<PciAddress>,
    definition: String,
    /// Added after the first version: an older `handoff-pve` sends none.
    #[serde(default)]
    looking_glass: Option<super::Shmem>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WGuest {
    pid: Option<u32>,
    vcpus: Option<u32>,
    memory_kib: Option<u64>,
    max_memory_kib: Option<u64>,
    #[serde(default)]
    uptime_s: Option<u64>,
    #[serde(default)]
    ip: Option<WIp>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WIp {
    address: String,
    interface: String,
    source: String,
}

impl From<GuestIp> for WIp {
    fn from(ip: GuestIp) -> Self {
        Self {
            address: ip.address,
            interface: ip.interface,
            source: ip.source.to_owned(),
        }
    }
}

impl From<WIp> for GuestIp {
    fn from(ip: WIp) -> Self {
        Self {
            address: ip.address,
            interface: ip.interface,
            // `source` is one of two words; anything else is the other.
            source: if ip.source == "agent" { "agent" } else { "lease" },
        }
    }
}

fn answer(hv: &mut dyn Hypervisor, req: Request) -> Result<serde_json::Value, HypervisorError> {
    let json = |v: serde_json::Value| Ok(v);
    match req {
        Request::List { at } => {
            let l: Vec<(WVm, VmState)> = hv.list(&at)?.iter().map(|(v, s)| (v.into(), *s)).collect();
            json(serde_json::to_value(l).expect("serializable"))
        }
        Request::Probe { vm } => {
            let p = hv.probe(&vm.into())?;
            json(
                serde_json::to_value(WProbe {
                    state: p.state,
                    reason: p.reason,
                })
                .expect("serializable"),
            )
        }
        Request::Start { vm } => match hv.start(&vm.into())? {
            Start::Begun(t) => json(serde_json::json!({ "begun": WTask::from(&t) })),
            Start::Refused(r) => {
                json(serde_json::json!({ "refused": { "message": r.message, "warnings": r.warnings } }))
            }
        },
        Request::Shutdown { vm } => {
            json(serde_json::to_value(WTask::from(&hv.shutdown(&vm.into())?)).expect("serializable"))
        }
        Request::Destroy { vm } => {
            json(serde_json::to_value(WTask::from(&hv.destroy(&vm.into())?)).expect("serializable"))
        }
        Request::Poll { task } => {
            let s = match hv.poll(&task.into())? {
                TaskState::Pending { state } => WTaskState::Pending { state },
                TaskState::Done { state, notes } => WTaskState::Done { state, notes },
                TaskState::Failed { message } => WTaskState::Failed { message },
                TaskState::Refused(r) => WTaskState::Refused {
                    message: r.message,
                    warnings: r.warnings,
                },
            };
            json(serde_json::to_value(s).expect("serializable"))
        }
        Request::Describe { vm } => {
            let d = hv.describe(&vm.into())?;
            json(
                serde_json::to_value(WDescription {
                    passthrough: d.passthrough,
                    definition: d.definition,
                    looking_glass: d.looking_glass,
                })
                .expect("serializable"),
            )
        }
        Request::RefusedStarts {
            vms,
            known,
            read_logs,
        } => {
            let vms: Vec<VmRef> = vms.into_iter().map(Into::into).collect();
            json(serde_json::to_value(hv.refused_starts(&vms, &known, read_logs)?).expect("serializable"))
        }
        Request::Guest { vm } => {
            let g = hv.guest(&vm.into());
            json(
                serde_json::to_value(WGuest {
                    pid: g.pid,
                    vcpus: g.vcpus,
                    memory_kib: g.memory_kib,
                    max_memory_kib: g.max_memory_kib,
                    uptime_s: g.uptime_s,
                    ip: g.ip.map(Into::into),
                })
                .expect("serializable"),
            )
        }
    }
}

/// Builds the served hypervisor from the config the client sent.
pub type MakeHypervisor<'a> = &'a dyn Fn(&Config) -> Result<Box<dyn Hypervisor>, String>;

/// Starts the PVE side on first use.
pub type MakePve = Box<dyn FnMut() -> Result<Box<dyn Hypervisor>, HypervisorError> + Send>;

/// Reads the config line, builds the hypervisor with `make`, then answers requests until
/// the input ends.
pub fn serve(input: &mut dyn BufRead, output: &mut dyn Write, make: MakeHypervisor) -> Result<(), String> {
    let mut line = String::new();
    input.read_line(&mut line).map_err(|e| e.to_string())?;
    let cfg: Config = serde_json::from_str(&line).map_err(|e| format!("the config line: {e}"))?;
    let mut hv = make(&cfg)?;
    loop {
        line.clear();
        if input.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Ok(());
        }
        let a = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match answer(&mut *hv, req) {
                Ok(v) => Answer {
                    ok: Some(v),
                    err: None,
                },
                Err(e) => Answer {
                    ok: None,
                    err: Some((&e).into()),
                },
            },
            Err(e) => Answer {
                ok: None,
                err: Some(WError {
                    kind: "api".into(),
                    at: String::new(),
                    name: String::new(),
                    message: format!("{PVE_SERVER}: a request it does not understand: {e}"),
                }),
            },
        };
        writeln!(output, "{}", serde_json::to_string(&a).expect("serializable"))
            .map_err(|e| e.to_string())?;
        output.flush().map_err(|e| e.to_string())?;
    }
}

/// The client: a child process serving a hypervisor.
pub struct Piped {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    at: String,
    exe: PathBuf,
    cfg: Config,
}

impl Piped {
    /// Starts `exe` and sends it `cfg`.
    pub fn spawn(exe: &Path, cfg: &Config, at: &str) -> Result<Self, HypervisorError> {
        let mut child = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| HypervisorError::Api {
                at: at.to_owned(),
                message: format!(
                    "cannot run {} ({e}); it is the part of handoff that talks to Proxmox VE's API and is \
                     installed next to handoff (`make install` puts both in place)",
                    exe.display()
                ),
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let line = serde_json::to_string(cfg).expect("a config serializes");
        writeln!(stdin, "{line}").map_err(|e| HypervisorError::Api {
            at: at.to_owned(),
            message: format!("{} stopped at once: {e}", exe.display()),
        })?;
        Ok(Self {
            child,
            stdin,
            stdout,
            at: at.to_owned(),
            exe: exe.to_owned(),
            cfg: cfg.clone(),
        })
    }

    /// [`PVE_SERVER`] next to this program (or on `PATH`).
    pub fn pve_server() -> PathBuf {
        crate::action::sibling(PVE_SERVER)
    }

    fn call<T: serde::de::DeserializeOwned>(&mut self, req: &Request) -> Result<T, HypervisorError> {
        let lost = |why: String| HypervisorError::Api {
            at: self.at.clone(),
            message: format!("{PVE_SERVER} went away: {why}"),
        };
        let line = serde_json::to_string(req).expect("serializable");
        writeln!(self.stdin, "{line}").map_err(|e| lost(e.to_string()))?;
        self.stdin.flush().map_err(|e| lost(e.to_string()))?;
        let mut back = String::new();
        let n = self
            .stdout
            .read_line(&mut back)
            .map_err(|e| lost(e.to_string()))?;
        if n == 0 {
            return Err(lost("it closed its output".into()));
        }
        let a: Answer =
            serde_json::from_str(&back).map_err(|e| lost(format!("an answer that is not JSON: {e}")))?;
        match (a.ok, a.err) {
            (_, Some(e)) => Err(e.into()),
            (Some(v), None) => {
                serde_json::from_value(v).map_err(|e| lost(format!("an answer of the wrong shape: {e}")))
            }
            (None, None) => Err(lost("an empty answer".into())),
        }
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        // Closing its input ends it; reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Hypervisor for Piped {
    fn kind(&self) -> &'static str {
        "piped"
    }
    fn list(&mut self, at: &str) -> Result<Vec<(VmRef, VmState)>, HypervisorError> {
        let l: Vec<(WVm, VmState)> = self.call(&Request::List { at: at.to_owned() })?;
        Ok(l.into_iter().map(|(v, s)| (v.into(), s)).collect())
    }
    fn probe(&mut self, vm: &VmRef) -> Result<Probe, HypervisorError> {
        let p: WProbe = self.call(&Request::Probe { vm: vm.into() })?;
        Ok(Probe {
            state: p.state,
            reason: p.reason,
        })
    }
    fn start(&mut self, vm: &VmRef) -> Result<Start, HypervisorError> {
        #[derive(Deserialize)]
        struct S {
            begun: Option<WTask>,
            refused: Option<Refused>,
        }
        #[derive(Deserialize)]
        struct Refused {
            message: String,
            warnings: Vec<String>,
        }
        let s: S = self.call(&Request::Start { vm: vm.into() })?;
        match (s.begun, s.refused) {
            (Some(t), _) => Ok(Start::Begun(t.into())),
            (None, Some(r)) => Ok(Start::Refused(Refusal {
                message: r.message,
                warnings: r.warnings,
            })),
            (None, None) => Err(HypervisorError::Api {
                at: self.at.clone(),
                message: format!("{PVE_SERVER} answered a start with nothing"),
            }),
        }
    }
    fn shutdown(&mut self, vm: &VmRef) -> Result<Task, HypervisorError> {
        self.call::<WTask>(&Request::Shutdown { vm: vm.into() })
            .map(Into::into)
    }
    fn destroy(&mut self, vm: &VmRef) -> Result<Task, HypervisorError> {
        self.call::<WTask>(&Request::Destroy { vm: vm.into() })
            .map(Into::into)
    }
    fn poll(&mut self, task: &Task) -> Result<TaskState, HypervisorError> {
        Ok(
            match self.call::<WTaskState>(&Request::Poll { task: task.into() })? {
                WTaskState::Pending { state } => TaskState::Pending { state },
                WTaskState::Done { state, notes } => TaskState::Done { state, notes },
                WTaskState::Failed { message } => TaskState::Failed { message },
                WTaskState::Refused { message, warnings } => {
                    TaskState::Refused(Refusal { message, warnings })
                }
            },
        )
    }
    fn describe(&mut self, vm: &VmRef) -> Result<Description, HypervisorError> {
        let d: WDescription = self.call(&Request::Describe { vm: vm.into() })?;
        Ok(Description {
            passthrough: d.passthrough,
            looking_glass: d.looking_glass,
            definition: d.definition,
        })
    }
    fn guest(&mut self, vm: &VmRef) -> Guest {
        match self.call::<WGuest>(&Request::Guest { vm: vm.into() }) {
            Ok(g) => Guest {
                pid: g.pid,
                vcpus: g.vcpus,
                memory_kib: g.memory_kib,
                max_memory_kib: g.max_memory_kib,
                uptime_s: g.uptime_s,
                ip: g.ip.map(Into::into),
            },
            Err(_) => Guest::default(),
        }
    }
    fn refused_starts(
        &mut self,
        vms: &[VmRef],
        known: &[String],
        read_logs: bool,
    ) -> Result<Vec<super::RefusedStart>, HypervisorError> {
        self.call(&Request::RefusedStarts {
            vms: vms.iter().map(Into::into).collect(),
            known: known.to_vec(),
            read_logs,
        })
    }
    /// Proxmox VE has no event stream: a thread with a server of its own asks for the VMs'
    /// states every `[proxmox] poll_interval_s` and sends what changed (and a lost or
    /// regained API once), and the start tasks the hookscript refused since the first
    /// round ([`VmEvent::Refused`](crate::hypervisor::VmEvent::Refused), one per task).
    fn subscribe(&mut self, vms: &[VmRef], sink: EventSink) -> Result<Subscription, HypervisorError> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;

        use crate::hypervisor::VmEvent;
        use crate::live::DomainEvent;
        let mut poller = Piped::spawn(&self.exe, &self.cfg, &self.at)?;
        let every = Duration::from_secs(self.cfg.proxmox.as_ref().map_or(5, |p| p.poll_interval_s));
        let vms = vms.to_vec();
        let at = self.at.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("handoff-pve-poll".into())
            .spawn(move || {
                let mut last: std::collections::HashMap<VmRef, VmState> = Default::default();
                let mut lost = false;
                let mut refusals = super::RefusalWatch::default();
                while !stopped.load(Ordering::Relaxed) {
                    for vm in &vms {
                        let ev = match poller.probe(vm) {
                            Ok(p) => {
                                let back =
                                    std::mem::take(&mut lost).then(|| VmEvent::Back { at: at.clone() });
                                if let Some(b) = back
                                    && !sink(b)
                                {
                                    return;
                                }
                                match last.insert(vm.clone(), p.state) {
                                    Some(before) if before != p.state => Some(VmEvent::Lifecycle {
                                        vm: vm.clone(),
                                        event: if p.state.is_active() {
                                            DomainEvent::Started
                                        } else {
                                            DomainEvent::Stopped
                                        },
                                    }),
                                    _ => None,
                                }
                            }
                            // The API answered that it knows no such VM (or hides it from
                            // the token): not a lost connection; the probes say so.
                            Err(HypervisorError::NoVm { .. }) => None,
                            Err(e) if !lost => {
                                lost = true;
                                Some(VmEvent::Lost {
                                    at: at.clone(),
                                    why: e.to_string(),
                                })
                            }
                            Err(_) => None,
                        };
                        if let Some(ev) = ev
                            && !sink(ev)
                        {
                            return;
                        }
                    }
                    // One listing of the node's tasks per round; a failure to list is
                    // told by the probes above, not twice.
                    if !lost
                        && let Ok(found) = poller.refused_starts(&vms, &refusals.known(), !refusals.first())
                    {
                        for r in refusals.take(found) {
                            if !sink(VmEvent::Refused(r)) {
                                return;
                            }
                        }
                    }
                    // Sleep in short steps so that dropping the subscription ends it soon.
                    let mut slept = Duration::ZERO;
                    while slept < every && !stopped.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                        slept += Duration::from_millis(100);
                    }
                }
            })
            .map_err(|e| HypervisorError::Events {
                uri: self.at.clone(),
                message: e.to_string(),
            })?;
        Ok(Subscription::new(move || stop.store(true, Ordering::Relaxed)))
    }
}

/// Sends each VM to the hypervisor that runs it: `pve` for `[[vm]]` entries with a VMID,
/// `fallback` (libvirt, or the demo's) for the rest. `pve` starts on first use.
pub struct Router {
    pve: Option<Box<dyn Hypervisor>>,
    make_pve: MakePve,
    pve_url: String,
    fallback: Box<dyn Hypervisor>,
}

impl Router {
    pub fn new(pve_url: &str, make_pve: MakePve, fallback: Box<dyn Hypervisor>) -> Self {
        Self {
            pve: None,
            make_pve,
            pve_url: pve_url.to_owned(),
            fallback,
        }
    }

    fn pve(&mut self) -> Result<&mut dyn Hypervisor, HypervisorError> {
        if self.pve.is_none() {
            self.pve = Some((self.make_pve)()?);
        }
        Ok(&mut **self.pve.as_mut().expect("just set"))
    }

    fn pick(&mut self, vm: &VmRef) -> Result<&mut dyn Hypervisor, HypervisorError> {
        if vm.id.is_some() {
            self.pve()
        } else {
            Ok(&mut *self.fallback)
        }
    }
}

impl Hypervisor for Router {
    fn kind(&self) -> &'static str {
        "proxmox+libvirt"
    }
    fn list(&mut self, at: &str) -> Result<Vec<(VmRef, VmState)>, HypervisorError> {
        if at == self.pve_url {
            self.pve()?.list(at)
        } else {
            self.fallback.list(at)
        }
    }
    fn probe(&mut self, vm: &VmRef) -> Result<Probe, HypervisorError> {
        self.pick(vm)?.probe(vm)
    }
    fn start(&mut self, vm: &VmRef) -> Result<Start, HypervisorError> {
        self.pick(vm)?.start(vm)
    }
    fn shutdown(&mut self, vm: &VmRef) -> Result<Task, HypervisorError> {
        self.pick(vm)?.shutdown(vm)
    }
    fn destroy(&mut self, vm: &VmRef) -> Result<Task, HypervisorError> {
        self.pick(vm)?.destroy(vm)
    }
    fn poll(&mut self, task: &Task) -> Result<TaskState, HypervisorError> {
        self.pick(&task.vm)?.poll(task)
    }
    fn describe(&mut self, vm: &VmRef) -> Result<Description, HypervisorError> {
        self.pick(vm)?.describe(vm)
    }
    fn guest(&mut self, vm: &VmRef) -> Guest {
        match self.pick(vm) {
            Ok(h) => h.guest(vm),
            Err(_) => Guest::default(),
        }
    }
    fn refused_starts(
        &mut self,
        vms: &[VmRef],
        known: &[String],
        read_logs: bool,
    ) -> Result<Vec<super::RefusedStart>, HypervisorError> {
        let pve: Vec<VmRef> = vms.iter().filter(|v| v.id.is_some()).cloned().collect();
        if pve.is_empty() {
            return Ok(Vec::new());
        }
        self.pve()?.refused_starts(&pve, known, read_logs)
    }
    fn subscribe(&mut self, vms: &[VmRef], sink: EventSink) -> Result<Subscription, HypervisorError> {
        let (pve, other): (Vec<VmRef>, Vec<VmRef>) = vms.iter().cloned().partition(|v| v.id.is_some());
        let a = if pve.is_empty() {
            None
        } else {
            Some(self.pve()?.subscribe(&pve, sink.clone())?)
        };
        let b = if other.is_empty() {
            None
        } else {
            Some(self.fallback.subscribe(&other, sink)?)
        };
        Ok(Subscription::new(move || drop((a, b))))
    }
}

/// `fallback` for `cfg`'s libvirt VMs, and [`PVE_SERVER`] over a pipe for its PVE VMs.
pub fn with_pve(cfg: &Config, fallback: Box<dyn Hypervisor>) -> Box<dyn Hypervisor> {
    let Some(p) = &cfg.proxmox else { return fallback };
    if !cfg.vms.iter().any(|v| v.vmid.is_some()) {
        return fallback;
    }
    let cfg2 = cfg.clone();
    let url = p.url.clone();
    let at = url.clone();
    Box::new(Router::new(
        &url,
        Box::new(
            move || Ok(Box::new(Piped::spawn(&Piped::pve_server(), &cfg2, &at)?) as Box<dyn Hypervisor>),
        ),
        fallback,
    ))
}
