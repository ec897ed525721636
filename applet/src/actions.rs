//! Dispatch: what the menu, a left click and a notification's buttons ask for is a
//! [`handoff::action::Action`] (the one vocabulary; the tray keeps none of its own). Each
//! runs on a blocking thread (`spawn_blocking`), never in the D-Bus handler: the VM actions
//! through the libvirt agent ([`Request::for_action`]), Looking Glass through
//! [`handoff::lg::open`], the rest through [`action::run`]; the outcome comes back as a
//! [`Note`] to show (or none: a VM that started is announced by the state change itself).

use handoff::Config;
use handoff::action::{self, Action};
use handoff::agent::{Agent, Failure, FailureKind, Request};
use handoff::config::VmConfig;

use crate::model::{self, Note};

/// "starting win11…", for the tooltip and the status line while `a` runs.
pub fn doing(a: &Action) -> String {
    match a {
        Action::Start { vm } => format!("starting {vm}…"),
        Action::Stop { vm } => format!("stopping {vm}…"),
        Action::ForceStop { vm } => format!("forcing {vm} off…"),
        Action::Switch { vm } | Action::ForceSwitch { vm } => format!("switching to {vm}…"),
        Action::Terminate { pid, command } => format!("terminating {command} (pid {pid})…"),
        Action::StopUnit { unit, .. } => format!("stopping {unit}…"),
        Action::StopContainer { container } => format!("stopping container {}…", container.shown()),
        Action::ReturnToLinux { .. } => "returning the GPU to Linux…".into(),
        Action::OpenLookingGlass => "opening Looking Glass…".into(),
        Action::OpenDetails => "opening the details window…".into(),
        Action::TerminateAndStart { vm, .. } => format!("ending the GPU's users, then starting {vm}…"),
        Action::Refresh => "reading the GPU again…".into(),
    }
}

/// Runs `a`; blocking. Returns the notification to show, if any.
pub fn run(cfg: &Config, agent: &Agent, a: &Action) -> Option<Note> {
    match a {
        Action::Start { vm }
        | Action::Stop { vm }
        | Action::ForceStop { vm }
        | Action::Switch { vm }
        | Action::ForceSwitch { vm } => vm_action(cfg, agent, vm, a),
        Action::TerminateAndStart { vm, pids } => {
            let named: Vec<(u32, &str)> = pids.iter().map(|&p| (p, "process")).collect();
            match action::terminate(&cfg.host, nix::unistd::getuid().as_raw(), &named) {
                Ok(_) => vm_action(cfg, agent, vm, &Action::Start { vm: vm.clone() }),
                Err(e) => Some(Note::plain(format!("Not starting {vm}"), e.to_string())),
            }
        }
        Action::OpenLookingGlass => open_lg(cfg),
        Action::ReturnToLinux { .. } => rebind(action::run(cfg, a)?.err()?),
        _ => {
            let e = action::run(cfg, a)?.err()?;
            Some(match a {
                Action::Terminate { pid, command } => {
                    Note::plain(format!("{command} (pid {pid}) is still running"), e.to_string())
                }
                Action::StopUnit { unit, .. } => {
                    Note::plain(format!("{unit} was not stopped"), e.to_string())
                }
                Action::StopContainer { container } => Note::plain(
                    format!("The container {} was not stopped", container.shown()),
                    e.to_string(),
                ),
                Action::OpenDetails => Note::plain(
                    "The details window is not available",
                    format!(
                        "{e}. Install handoff-details next to handoff-tray, or run `handoff status` in a terminal."
                    ),
                ),
                _ => Note::plain(doing(a), e.to_string()),
            })
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
fn vm_action(cfg: &Config, agent: &Agent, name: &str, action: &Action) -> Option<Note> {
    let v = match vm_config(cfg, name) {
        Ok(v) => v,
        Err(n) => return Some(n),
    };
    let Some(request) = Request::for_action(action) else {
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
            actions: vec![(Action::OpenDetails, "Details".into())],
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
            actions: vec![(Action::OpenDetails, "Details".into())],
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
            actions: vec![(Action::OpenDetails, "Details".into())],
            critical: true,
        },
    }
}

/// pkexec said no, or failed: what to type comes first, since pkexec's stderr can be long
/// enough (GLib warnings) to push it out of a notification's box. Its last line says why;
/// all of it is logged.
fn rebind(e: action::ActionError) -> Option<Note> {
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
