//! The libvirt side of a surface, in a process of its own: `handoff __agent`.
//!
//! Why a process: libvirt's client library and the ~56 shared libraries it pulls in are
//! ~17 MB resident in any process that links them (benches/RESULTS-tray.md measures it),
//! and a libvirt call can block for as long as its daemon or an SSH transport takes. The
//! tray should stay small and keep answering D-Bus whatever libvirt does, so it links no
//! libvirt: it runs this agent as a child and asks it over a pipe ([`Agent`]). The agent
//! owns the connections — and, for `handoff demo`'s `test://` driver, the simulated VMs
//! themselves, which exist only in the process that opened them, so every start, stop and
//! probe of one surface goes through its one agent.
//!
//! The wire: one JSON object per line.
//! - surface → agent (stdin): `{"id":1,"request":{"op":"probe"}}`, and `start`/`stop`/
//!   `switch` with `"vm"` (and `"force"` for stop), see [`Request`];
//! - agent → surface (stdout): `{"change":{…}}` for every libvirt change of the configured
//!   VMs (a [`Change`] of [`crate::live`], connection lost/back included), and
//!   `{"reply":{"id":1,"reply":{…}}}` once per request, in any order: probes are answered
//!   while a start is still running.
//!
//! The agent ends when its stdin closes (the surface quit or died), after the actions
//! under way have finished: a start that already bound the GPU completes rather than
//! leaving a handoff half done. It never outlives that wait on its own.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::live::{Change, Sink, Source};
use crate::status::{VmState, VmStatus};

/// How long a probe may take before the surface shows the VMs as unknown. Generous: the
/// first probe of a `qemu+ssh://` URI includes the SSH handshake.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// An agent that exited is started again on the next request, but not sooner than this
/// after its last start: one that dies at once (a broken install) must not be restarted
/// in a loop.
pub const RESPAWN_AFTER: Duration = Duration::from_secs(1);

/// What a surface asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The state of every configured VM, in config order.
    Probe,
    Start {
        vm: String,
    },
    /// Graceful (with the VM's `shutdown_timeout_s`), or destroy with `force`.
    Stop {
        vm: String,
        force: bool,
    },
    /// Stop whichever VM holds the GPU gracefully, then start `vm`.
    Switch {
        vm: String,
    },
}

impl Request {
    /// The request for a VM action of the vocabulary; None for the others (they need no
    /// libvirt, so no agent). A forced switch is not asked of the agent: none for it.
    pub fn for_action(action: &crate::action::Action) -> Option<Request> {
        use crate::action::Action;
        Some(match action {
            Action::Start { vm } => Request::Start { vm: vm.clone() },
            Action::Stop { vm } => Request::Stop {
                vm: vm.clone(),
                force: false,
            },
            Action::ForceStop { vm } => Request::Stop {
                vm: vm.clone(),
                force: true,
            },
            Action::Switch { vm } => Request::Switch { vm: vm.clone() },
            _ => return None,
        })
    }

    /// The action a request asks for; None for a probe.
    pub fn action(&self) -> Option<crate::action::Action> {
        use crate::action::Action;
        Some(match self {
            Request::Probe => return None,
            Request::Start { vm } => Action::Start { vm: vm.clone() },
            Request::Stop { vm, force: false } => Action::Stop { vm: vm.clone() },
            Request::Stop { vm, force: true } => Action::ForceStop { vm: vm.clone() },
            Request::Switch { vm } => Action::Switch { vm: vm.clone() },
        })
    }
}

/// The agent's answer to one [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Probes(Vec<VmStatus>),
    Done(Done),
    Failed(Failure),
}

/// An action that did what was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub vm: String,
    pub label: String,
    /// What the person should still hear: why the GPU did not move, the hook's warnings.
    pub warnings: Vec<String>,
}

/// An action that did not, with what kind of "no" it was: surfaces offer different next
/// steps for each (a refusal names who holds the GPU; a stop that timed out offers force).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    /// The whole message, as `handoff start`/`stop`/`switch` print it.
    pub message: String,
    /// For a switch, the message of the step that failed; else the same as `message`.
    pub cause: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Something holds the GPU: our own scan, or the hook, said no.
    Refused,
    /// The guest ignored a graceful shutdown for its whole timeout; it still runs.
    StopTimeout,
    /// No such VM in the config.
    NotConfigured,
    Other,
}

/// One request line, surface → agent.
#[derive(Debug, Serialize, Deserialize)]
pub struct In {
    pub id: u64,
    pub request: Request,
}

/// One line, agent → surface.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Out {
    Change(Change),
    Reply { id: u64, reply: Reply },
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot start handoff's libvirt agent ({program} __agent): {source}")]
    Spawn { program: String, source: io::Error },
    #[error("handoff's libvirt agent ({program}) {exit}; it is started again on the next request")]
    Exited { program: String, exit: String },
    #[error(
        "handoff's libvirt agent ({program}) {exit} right after it started; \
         run `{program} -v __agent` in a terminal to see why"
    )]
    Failing { program: String, exit: String },
    #[error("handoff's libvirt agent ({program}) did not answer within {waited_s} s (is libvirt stuck?)")]
    Timeout { program: String, waited_s: u64 },
    #[error("cannot talk to handoff's libvirt agent ({program}): {source}")]
    Pipe { program: String, source: io::Error },
    #[error("the agent answered a {asked} request with something else")]
    Protocol { asked: &'static str },
}

/// The surface's side: runs `program args…` (normally `handoff [--config FILE] __agent`),
/// forwards its changes to a [`Sink`], and sends it requests. Dropping it closes the
/// agent's stdin, which ends the agent once its actions are done.
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    program: PathBuf,
    args: Vec<OsString>,
    sink: Sink,
    next_id: AtomicU64,
    state: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    /// The running agent's stdin; `None` while none runs.
    stdin: Option<ChildStdin>,
    /// Bumped per start, so a reader of an older agent cannot clear a newer one's state.
    generation: u64,
    pending: HashMap<u64, mpsc::Sender<Reply>>,
    started: Option<Instant>,
    pid: Option<u32>,
    /// How the last agent ended ("exited with status 1"), and whether it was quick.
    last_exit: Option<(String, bool)>,
    closing: bool,
}

impl Agent {
    /// An agent that runs `program args…` once asked to ([`Agent::start`] or the first
    /// request). `sink` receives its changes, and a [`Change::SourceLost`] naming
    /// [`Source::Agent`] when it exits unasked.
    pub fn new(program: impl Into<PathBuf>, args: Vec<OsString>, sink: Sink) -> Agent {
        Agent {
            inner: Arc::new(Inner {
                program: program.into(),
                args,
                sink,
                next_id: AtomicU64::new(1),
                state: Mutex::new(Running::default()),
            }),
        }
    }

    /// Starts the agent now (so its libvirt events flow before anything is asked).
    pub fn start(&self) -> Result<(), AgentError> {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.ensure_running(&mut st)
    }

    pub fn program(&self) -> &std::path::Path {
        &self.inner.program
    }

    /// The process id of the running agent, if one runs.
    pub fn pid(&self) -> Option<u32> {
        let st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.stdin.as_ref().and(st.pid)
    }

    /// Sends `request` and waits for its reply (`timeout`: at most that long).
    pub fn call(&self, request: Request, timeout: Option<Duration>) -> Result<Reply, AgentError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.ensure_running(&mut st)?;
            st.pending.insert(id, tx);
            let mut line = serde_json::to_string(&In { id, request }).expect("requests serialise");
            line.push('\n');
            let stdin = st.stdin.as_mut().expect("ensure_running left an agent running");
            if let Err(source) = stdin.write_all(line.as_bytes()).and_then(|()| stdin.flush()) {
                st.pending.remove(&id);
                return Err(AgentError::Pipe {
                    program: self.inner.program_name(),
                    source,
                });
            }
        }
        let got = match timeout {
            Some(t) => rx.recv_timeout(t).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => AgentError::Timeout {
                    program: self.inner.program_name(),
                    waited_s: t.as_secs().max(1),
                },
                mpsc::RecvTimeoutError::Disconnected => self.inner.exited(),
            }),
            None => rx.recv().map_err(|_| self.inner.exited()),
        };
        if got.is_err() {
            let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
            st.pending.remove(&id);
        }
        got
    }

    /// The state of every VM in `cfg`, in its order; VMs the agent could not report are
    /// `unknown`, with the reason as their error. No agent is needed without VMs.
    pub fn probe(&self, cfg: &Config) -> Vec<VmStatus> {
        if cfg.vms.is_empty() {
            return Vec::new();
        }
        let unknown = |why: &str| {
            cfg.vms
                .iter()
                .map(|vm| VmStatus::new(vm, VmState::Unknown, Some(why.to_owned())))
                .collect()
        };
        match self.call(Request::Probe, Some(PROBE_TIMEOUT)) {
            Ok(Reply::Probes(got)) => cfg
                .vms
                .iter()
                .map(|vm| {
                    got.iter()
                        .find(|s| s.name == vm.name && s.uri == vm.uri)
                        .cloned()
                        .unwrap_or_else(|| {
                            VmStatus::new(
                                vm,
                                VmState::Unknown,
                                Some("the libvirt agent did not report it (a different config?)".into()),
                            )
                        })
                })
                .collect(),
            Ok(_) => unknown(&AgentError::Protocol { asked: "probe" }.to_string()),
            Err(e) => unknown(&e.to_string()),
        }
    }

    /// Runs a start, stop or switch and waits for it, however long it takes (a graceful
    /// stop waits for the guest); the agent's exit ends the wait with an error.
    pub fn act(&self, request: Request) -> Result<Result<Done, Failure>, AgentError> {
        let asked = match &request {
            Request::Probe => "probe",
            Request::Start { .. } => "start",
            Request::Stop { .. } => "stop",
            Request::Switch { .. } => "switch",
        };
        match self.call(request, None)? {
            Reply::Done(d) => Ok(Ok(d)),
            Reply::Failed(f) => Ok(Err(f)),
            Reply::Probes(_) => Err(AgentError::Protocol { asked }),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.closing = true;
        // EOF on its stdin: the agent finishes what runs and exits.
        st.stdin = None;
    }
}

impl Inner {
    fn program_name(&self) -> String {
        self.program.display().to_string()
    }

    fn exited(&self) -> AgentError {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (exit, quick) = st
            .last_exit
            .clone()
            .unwrap_or_else(|| ("exited".to_owned(), false));
        if quick {
            AgentError::Failing {
                program: self.program_name(),
                exit,
            }
        } else {
            AgentError::Exited {
                program: self.program_name(),
                exit,
            }
        }
    }

    fn ensure_running(self: &Arc<Self>, st: &mut Running) -> Result<(), AgentError> {
        if st.stdin.is_some() {
            return Ok(());
        }
        if let (Some(started), Some((exit, _))) = (st.started, &st.last_exit)
            && started.elapsed() < RESPAWN_AFTER
        {
            return Err(AgentError::Failing {
                program: self.program_name(),
                exit: exit.clone(),
            });
        }
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| AgentError::Spawn {
                program: self.program_name(),
                source,
            })?;
        let stdout = child.stdout.take().expect("piped");
        st.stdin = child.stdin.take();
        st.generation += 1;
        st.started = Some(Instant::now());
        st.pid = Some(child.id());
        let generation = st.generation;
        let me = self.clone();
        let reader = thread::Builder::new()
            .name("handoff-agent-reader".into())
            .stack_size(256 * 1024)
            .spawn(move || me.read(BufReader::new(stdout), child, generation));
        if let Err(source) = reader {
            // Without a reader nobody would hear it: close its stdin so it ends.
            st.stdin = None;
            return Err(AgentError::Spawn {
                program: self.program_name(),
                source,
            });
        }
        tracing::info!(
            "started the libvirt agent: {} (generation {generation})",
            self.program_name()
        );
        Ok(())
    }

    /// The reader thread of one agent: changes to the sink, replies to their callers; at
    /// EOF, reaps the agent and says it is gone.
    fn read(
        self: Arc<Self>,
        mut stdout: BufReader<std::process::ChildStdout>,
        mut child: std::process::Child,
        generation: u64,
    ) {
        let mut line = String::new();
        loop {
            line.clear();
            match stdout.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            match serde_json::from_str::<Out>(&line) {
                Ok(Out::Change(c)) => {
                    let _ = (self.sink)(c);
                }
                Ok(Out::Reply { id, reply }) => {
                    let tx = self
                        .state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .pending
                        .remove(&id);
                    // None: its caller timed out and stopped waiting.
                    if let Some(tx) = tx {
                        let _ = tx.send(reply);
                    }
                }
                Err(e) => tracing::warn!(
                    "the libvirt agent said something unreadable ({e}): {}",
                    line.trim_end()
                ),
            }
        }
        // Reap it before anyone hears it is gone, so their error can say how it ended.
        // (Its stdout closes when it exits; an agent that closed stdout and lived on would
        // hold this thread here, and its callers until their timeout.)
        let exit = match child.wait() {
            Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => format!("was killed by signal {sig}"),
                _ => "exited".to_owned(),
            },
            Err(e) => format!("could not be waited for ({e})"),
        };
        let closing = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.generation == generation {
                let quick = st.started.is_some_and(|t| t.elapsed() < RESPAWN_AFTER);
                st.last_exit = Some((exit.clone(), quick));
                st.stdin = None;
                st.pid = None;
                // Callers waiting on this agent get their error now.
                st.pending.clear();
            }
            st.closing
        };
        if !closing {
            tracing::warn!("the libvirt agent {exit}");
            let _ = (self.sink)(Change::SourceLost {
                source: Source::Agent {
                    program: self.program_name(),
                },
                why: exit,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire is what the module docs say it is: other surfaces (and people debugging
    /// with `handoff __agent` in a terminal) rely on it.
    #[test]
    fn requests_and_replies_have_the_documented_shape() {
        let line = serde_json::to_string(&In {
            id: 2,
            request: Request::Stop {
                vm: "win11".into(),
                force: false,
            },
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"id":2,"request":{"op":"stop","vm":"win11","force":false}}"#
        );
        let probe: In = serde_json::from_str(r#"{"id":1,"request":{"op":"probe"}}"#).unwrap();
        assert_eq!(probe.request, Request::Probe);
        let out = serde_json::to_string(&Out::Reply {
            id: 7,
            reply: Reply::Failed(Failure {
                kind: FailureKind::StopTimeout,
                message: "m".into(),
                cause: "c".into(),
            }),
        })
        .unwrap();
        assert_eq!(
            out,
            r#"{"reply":{"id":7,"reply":{"failed":{"kind":"stop-timeout","message":"m","cause":"c"}}}}"#
        );
        let change: Out = serde_json::from_str(
            &serde_json::to_string(&Out::Change(Change::SourceBack {
                source: Source::Libvirt {
                    uri: "qemu:///system".into(),
                },
            }))
            .unwrap(),
        )
        .unwrap();
        assert!(
            matches!(change, Out::Change(Change::SourceBack { .. })),
            "{change:?}"
        );
    }
}
