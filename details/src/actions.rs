//! What the window's buttons do. Each [`run`] blocks (a graceful VM stop may take two
//! minutes), so the UI calls it on a worker thread and shows the returned [`Outcome`].
//!
//! VM actions go through [`handoff_libvirt::vm::Ctl::act`], the one implementation
//! `handoff start` / `stop` / `switch` and the tray's agent run too; nothing here decides
//! policy.

use handoff::action::{self, UnitScope};
use handoff::config::{Config, VmConfig};
use handoff::i3::Session;
use handoff_libvirt::vm::{Ctl, Done, StartOutcome, StopOutcome};

use crate::view::Action;

/// What an action did, in words for the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub ok: bool,
    pub message: String,
}

impl Outcome {
    fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: message.into(),
        }
    }

    fn failed(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
        }
    }
}

/// "Stopping Windows…": what the window says while `action` runs.
pub fn doing(cfg: &Config, action: &Action) -> String {
    let label = |vm: &str| {
        cfg.vms
            .iter()
            .find(|v| v.name == vm)
            .map(|v| v.label().to_owned())
            .unwrap_or_else(|| vm.to_owned())
    };
    match action {
        Action::Start { vm } => format!("Starting {}…", label(vm)),
        Action::Stop { vm } => format!("Shutting {} down (gracefully)…", label(vm)),
        Action::ForceStop { vm } => format!("Forcing {} off…", label(vm)),
        Action::Switch { vm } => format!("Switching to {}…", label(vm)),
        Action::ForceSwitch { vm } => format!("Switching to {} (forcing the other VM off)…", label(vm)),
        Action::OpenLookingGlass => "Opening Looking Glass…".to_owned(),
        Action::Terminate { pid, command } => format!("Terminating {command} (pid {pid})…"),
        Action::StopUnit { unit, .. } => format!("Stopping {unit}…"),
        Action::ReturnToLinux { .. } => {
            "Returning the GPU to Linux (pkexec handoff rebind --force)…".to_owned()
        }
        Action::Refresh => "Refreshing…".to_owned(),
        Action::StopContainer { container } => format!("Stopping the container {}…", container.shown()),
        Action::TerminateAndStart { vm, .. } => {
            format!("Ending the GPU's users, then starting {}…", label(vm))
        }
        Action::OpenDetails => "Opening the details window…".to_owned(),
    }
}

fn find_vm<'a>(cfg: &'a Config, name: &str) -> Result<&'a VmConfig, Outcome> {
    cfg.vms
        .iter()
        .find(|v| v.name == name)
        .ok_or_else(|| Outcome::failed(format!("{name} is not a configured VM any more")))
}

fn started(out: &StartOutcome) -> String {
    let gpu = out.gpus_words();
    let was = if out.already_running { "was already" } else { "is" };
    let mut s = format!("{} {was} {}; {gpu}.", out.label, out.state.words());
    for w in &out.warnings {
        s.push('\n');
        s += w;
    }
    s
}

fn stopped(out: &StopOutcome) -> String {
    let gpu = out.gpus_words();
    let what = match (out.was_running, out.forced) {
        (false, _) => "was not running".to_owned(),
        (true, true) => "was forced off".to_owned(),
        (true, false) => format!("shut down after {:.0} s", out.waited_s),
    };
    format!("{} {what}; {gpu}.", out.label)
}

/// Runs `action` to the end. Never panics on a failure: the failure is the outcome.
pub fn run(cfg: &Config, action: &Action) -> Outcome {
    match run_inner(cfg, action) {
        Ok(o) | Err(o) => o,
    }
}

fn run_inner(cfg: &Config, action: &Action) -> Result<Outcome, Outcome> {
    let mut progress = |line: &str| tracing::info!("{line}");
    Ok(match action {
        Action::Start { vm }
        | Action::Stop { vm }
        | Action::ForceStop { vm }
        | Action::Switch { vm }
        | Action::ForceSwitch { vm } => {
            let label = find_vm(cfg, vm)?.label();
            match Ctl::new(cfg, &mut progress).act(action, None) {
                Some(Ok(Done::Started(out))) => Outcome::ok(started(&out)),
                Some(Ok(Done::Stopped(out))) => Outcome::ok(stopped(&out)),
                Some(Ok(Done::Switched(out))) => {
                    let mut lines: Vec<String> = out.stopped.iter().map(stopped).collect();
                    lines.push(started(&out.started));
                    Outcome::ok(lines.join("\n"))
                }
                Some(Err(e)) => Outcome::failed(match action {
                    Action::Start { .. } => format!("Could not start {label}: {e}"),
                    Action::Stop { .. } | Action::ForceStop { .. } => format!("Could not stop {label}: {e}"),
                    _ => format!("Could not switch to {label}: {e}"),
                }),
                None => unreachable!("{action:?} is a VM action"),
            }
        }
        Action::OpenLookingGlass => {
            match handoff::lg::open(cfg, &Session::from_env(), handoff::lg::WINDOW_WAIT) {
                Ok(out) => Outcome::ok(out.describe(cfg, None)),
                Err(e) => Outcome::failed(format!("Could not open Looking Glass: {e}")),
            }
        }
        // One implementation each, the library's (issue 12 item 3): the ownership check
        // before a SIGTERM, the unit's manager from its cgroup, pkexec's exit codes.
        Action::Terminate { pid, command } => {
            let uid = nix::unistd::getuid().as_raw();
            outcome(action::terminate(&cfg.host, uid, &[(*pid, command.as_str())]))
        }
        Action::StopUnit { unit, pid } => {
            let scope = action::unit_scope(&cfg.host, *pid).unwrap_or(UnitScope::System);
            // Recorded: started again when the GPU is back (handoff::stopped).
            outcome(handoff::stopped::stop_unit(cfg, unit, scope))
        }
        // The rest, the library's one implementation (the window does not offer
        // TerminateAndStart or OpenDetails: it is the details window).
        Action::ReturnToLinux { .. }
        | Action::StopContainer { .. }
        | Action::Refresh
        | Action::TerminateAndStart { .. }
        | Action::OpenDetails => match action::run(cfg, action) {
            Some(o) => outcome(o),
            None => Outcome::failed(format!("{action:?} is not the details window's")),
        },
    })
}

fn outcome(o: action::Outcome) -> Outcome {
    match o {
        Ok(said) => Outcome::ok(said),
        Err(e) => Outcome::failed(e.to_string()),
    }
}
