//! What the menu, a left click and a notification's buttons do. Each [`Action`] runs on a
//! blocking thread (`spawn_blocking`), never in the D-Bus handler, and comes back as a
//! [`Note`] to show (or none: a VM that started is announced by the state change itself).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use handoff::Config;
use handoff::agent::{Agent, Failure, FailureKind, Request};
use handoff::config::VmConfig;

use handoff::action::Action as Vocabulary;
use handoff::action::{self, UnitScope};

use crate::model::{self, Note};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start(String),
    /// Graceful (ACPI), with the VM's `shutdown_timeout_s`.
    Stop(String),
    /// Destroy, after the menu's confirmation.
    ForceStop(String),
    /// Stop whichever VM holds the GPU gracefully, then start this one.
    Switch(String),
    Terminate {
        pid: u32,
        command: String,
    },
    StopUnit {
        unit: String,
        scope: UnitScope,
    },
    /// `pkexec handoff rebind --force`.
    Rebind,
    OpenLookingGlass,
    Details,
    /// From a refusal's notification: SIGTERM the user's own holders, then start.
    TerminateAndStart {
        vm: String,
        pids: Vec<u32>,
    },
}

impl Action {
    /// Actions that change the machine disable the menu while they run.
    pub fn marks_busy(&self) -> bool {
        !matches!(self, Action::OpenLookingGlass | Action::Details)
    }

    /// Whether this action asks libvirt to start a VM (so the hook may refuse it).
    pub fn starts_a_vm(&self) -> bool {
        matches!(
            self,
            Action::Start(_) | Action::Switch(_) | Action::TerminateAndStart { .. }
        )
    }

    /// "starting win11…", for the tooltip and the status line.
    pub fn doing(&self) -> String {
        match self {
            Action::Start(vm) => format!("starting {vm}…"),
            Action::Stop(vm) => format!("stopping {vm}…"),
            Action::ForceStop(vm) => format!("forcing {vm} off…"),
            Action::Switch(vm) => format!("switching to {vm}…"),
            Action::Terminate { pid, command } => format!("terminating {command} (pid {pid})…"),
            Action::StopUnit { unit, .. } => format!("stopping {unit}…"),
            Action::Rebind => "returning the GPU to Linux…".into(),
            Action::OpenLookingGlass => "opening Looking Glass…".into(),
            Action::Details => "opening the details window…".into(),
            Action::TerminateAndStart { vm, .. } => format!("ending the GPU's users, then starting {vm}…"),
        }
    }
}

/// Runs `a`; blocking. VM actions go to the libvirt agent. Returns the notification to
/// show, if any.
pub fn run(cfg: &Config, agent: &Agent, a: &Action) -> Option<Note> {
    match a {
        // The VM actions are the vocabulary's, run by the agent (Request::for_action).
        Action::Start(vm) => vm_action(cfg, agent, vm, Vocabulary::Start { vm: vm.clone() }),
        Action::Stop(vm) => vm_action(cfg, agent, vm, Vocabulary::Stop { vm: vm.clone() }),
        Action::ForceStop(vm) => vm_action(cfg, agent, vm, Vocabulary::ForceStop { vm: vm.clone() }),
        Action::Switch(vm) => vm_action(cfg, agent, vm, Vocabulary::Switch { vm: vm.clone() }),
        Action::Terminate { pid, command } => terminate(cfg, &[(*pid, command.as_str())])
            .err()
            .map(|e| Note::plain(format!("{command} (pid {pid}) is still running"), e.to_string())),
        Action::StopUnit { unit, scope } => handoff::stopped::stop_unit(cfg, unit, *scope)
            .err()
            .map(|e| Note::plain(format!("{unit} was not stopped"), e.to_string())),
        Action::Rebind => rebind(cfg),
        Action::OpenLookingGlass => open_lg(cfg),
        Action::Details => details(),
        Action::TerminateAndStart { vm, pids } => {
            let named: Vec<(u32, &str)> = pids.iter().map(|&p| (p, "process")).collect();
            match terminate(cfg, &named) {
                Ok(_) => vm_action(cfg, agent, vm, Vocabulary::Start { vm: vm.clone() }),
                Err(e) => Some(Note::plain(format!("Not starting {vm}"), e.to_string())),
            }
        }
    }
}

/// The configured VM called `name` (domain name or label), as `handoff start NAME` finds it.
fn vm_config<'a>(cfg: &'a Config, name: &str) -> Result<&'a VmConfig, Note> {
    cfg.vm(Some(name)).ok_or_else(|| {
        let known: Vec<&str> = cfg.vms.iter().map(|v| v.name.as_str()).collect();
        Note::plain(
            format!("No VM {name}"),
            format!("no VM {name:?} in the config; configured: {}", known.join(", ")),
        )
    })
}

/// A start, stop or switch through the agent, and the note its outcome deserves (none for
/// a plain success: the state change announces it).
fn vm_action(cfg: &Config, agent: &Agent, name: &str, action: Vocabulary) -> Option<Note> {
    let v = match vm_config(cfg, name) {
        Ok(v) => v,
        Err(n) => return Some(n),
    };
    let Some(request) = Request::for_action(&action) else {
        return Some(Note::plain(
            format!("{} was not asked", v.label()),
            format!("{action:?} is not the agent's"),
        ));
    };
    let stopping = matches!(request, Request::Stop { .. });
    match agent.act(request) {
        Ok(Ok(done)) if done.warnings.is_empty() => None,
        Ok(Ok(done)) => Some(Note::plain(
            format!("{} is running, but", done.label),
            done.warnings.join("\n"),
        )),
        Ok(Err(f)) if stopping => Some(stop_error(v, &f)),
        Ok(Err(f)) => Some(start_error(cfg, agent, v, &f)),
        Err(e) => Some(Note {
            summary: format!(
                "{} was not {}",
                v.label(),
                if stopping { "stopped" } else { "started" }
            ),
            body: e.to_string(),
            actions: vec![(model::NoteAction::Details, "Details".into())],
            critical: true,
        }),
    }
}

/// A refused start names who holds the GPU: our own scan (what the user may end), or the
/// hook's record of the refusal (what root saw).
fn start_error(cfg: &Config, agent: &Agent, v: &VmConfig, f: &Failure) -> Note {
    match f.kind {
        FailureKind::Refused => {
            let snap = crate::collect(cfg, &mut || agent.probe(cfg));
            let mut holders = snap.holders().to_vec();
            if holders.is_empty()
                && let Some(r) = snap.files.last_refusal()
                && r.vm == v.name
            {
                holders = r.holders.clone();
            }
            model::refusal_note(v.label(), &v.name, &holders, snap.uid, &f.cause)
        }
        _ => Note {
            summary: format!("{} did not start", v.label()),
            body: f.message.clone(),
            actions: vec![(model::NoteAction::Details, "Details".into())],
            critical: true,
        },
    }
}

fn stop_error(v: &VmConfig, f: &Failure) -> Note {
    match f.kind {
        FailureKind::StopTimeout => Note {
            summary: format!("{} is still running", v.label()),
            body: format!(
                "{}\nOr use \"Force stop {}…\" in the tray menu.",
                f.message,
                v.label()
            ),
            actions: Vec::new(),
            critical: false,
        },
        _ => Note {
            summary: format!("Stopping {} failed", v.label()),
            body: f.message.clone(),
            actions: vec![(model::NoteAction::Details, "Details".into())],
            critical: true,
        },
    }
}

/// SIGTERM the user's own `pids` and wait for them: the library's one implementation,
/// which touches none unless every one is this user's.
fn terminate(cfg: &Config, pids: &[(u32, &str)]) -> action::Outcome {
    action::terminate(&cfg.host, nix::unistd::getuid().as_raw(), pids)
}

fn rebind(cfg: &Config) -> Option<Note> {
    // What to type comes first: pkexec's stderr can be long enough (GLib warnings) to push
    // it out of a notification's box. Its last line says why; all of it is logged.
    let e = action::return_to_linux(cfg.gpu.address).err()?;
    tracing::warn!("{e}");
    let body = match e.command_said() {
        Some((shown, stderr)) => format!(
            "From a terminal: sudo handoff rebind --force\n{shown}: {}",
            stderr.lines().last().unwrap_or("no reason given")
        ),
        None => format!("{e}; from a terminal: sudo handoff rebind --force"),
    };
    Some(Note {
        summary: "The GPU was not returned to Linux".into(),
        body,
        actions: Vec::new(),
        critical: true,
    })
}

fn open_lg(cfg: &Config) -> Option<Note> {
    let session = handoff::i3::Session::from_env();
    match handoff::lg::open(cfg, &session, handoff::lg::WINDOW_WAIT) {
        Ok(out @ handoff::lg::LgOutcome::NoDesktop { .. }) => Some(Note::plain(
            "Looking Glass was not opened",
            out.describe(cfg, None),
        )),
        Ok(_) => None,
        Err(e) => Some(Note::plain("Looking Glass was not opened", e.to_string())),
    }
}

/// Starts `handoff-details` in its own process group; a thread reaps it when it closes.
pub fn details() -> Option<Note> {
    let bin = action::sibling("handoff-details");
    match Command::new(&bin).stdin(Stdio::null()).process_group(0).spawn() {
        Ok(mut child) => {
            let _ = std::thread::Builder::new()
                .name("handoff-details-wait".into())
                .stack_size(64 * 1024)
                .spawn(move || child.wait());
            None
        }
        Err(e) => Some(Note::plain(
            "The details window is not available",
            format!(
                "cannot run {}: {e}. Install handoff-details next to handoff-tray, or run `handoff status` in a terminal.",
                bin.display()
            ),
        )),
    }
}
