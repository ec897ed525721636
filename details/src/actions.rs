//! What the window's buttons do. Each [`run`] blocks (a graceful VM stop may take two
//! minutes), so the UI calls it on a worker thread and shows the returned [`Outcome`].
//!
//! VM actions go through the library's [`handoff::vm::Ctl`], exactly as `handoff start` /
//! `stop` / `switch` do; nothing here decides policy.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use handoff::config::{Config, VmConfig};
use handoff::i3::Session;
use handoff::vm::{Ctl, StartOutcome, StopOutcome};

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
        Action::OpenLookingGlass => "Opening Looking Glass…".to_owned(),
        Action::Terminate { pid, command } => format!("Terminating {command} (pid {pid})…"),
        Action::StopUnit { unit, .. } => format!("Stopping {unit}…"),
        Action::ReturnToLinux => "Returning the GPU to Linux (pkexec handoff rebind --force)…".to_owned(),
        Action::Refresh => "Refreshing…".to_owned(),
    }
}

fn find_vm<'a>(cfg: &'a Config, name: &str) -> Result<&'a VmConfig, Outcome> {
    cfg.vms
        .iter()
        .find(|v| v.name == name)
        .ok_or_else(|| Outcome::failed(format!("{name} is not a configured VM any more")))
}

fn started(out: &StartOutcome) -> String {
    let gpu = match out.gpu_on_vfio {
        Some(true) => format!("GPU {} is on vfio-pci", out.gpu.address),
        _ => format!("GPU {} is {}", out.gpu.address, out.gpu.phrase),
    };
    let was = if out.already_running { "was already" } else { "is" };
    let mut s = format!("{} {was} {}; {gpu}.", out.label, out.state.words());
    for w in &out.warnings {
        s.push('\n');
        s += w;
    }
    s
}

fn stopped(out: &StopOutcome) -> String {
    let gpu = match out.gpu_returned {
        Some(true) => format!("GPU {} is back {}", out.gpu.address, out.gpu.phrase),
        _ => format!("GPU {} is {}", out.gpu.address, out.gpu.phrase),
    };
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
        Action::Start { vm } => {
            let vm = find_vm(cfg, vm)?;
            match Ctl::new(cfg, &mut progress).start(vm) {
                Ok(out) => Outcome::ok(started(&out)),
                Err(e) => Outcome::failed(format!("Could not start {}: {e}", vm.label())),
            }
        }
        Action::Stop { vm } | Action::ForceStop { vm } => {
            let force = matches!(action, Action::ForceStop { .. });
            let vm = find_vm(cfg, vm)?;
            let timeout = Duration::from_secs(vm.shutdown_timeout_s);
            match Ctl::new(cfg, &mut progress).stop(vm, force, timeout) {
                Ok(out) => Outcome::ok(stopped(&out)),
                Err(e) => Outcome::failed(format!("Could not stop {}: {e}", vm.label())),
            }
        }
        Action::Switch { vm } => {
            let vm = find_vm(cfg, vm)?;
            match Ctl::new(cfg, &mut progress).switch(vm, false, None) {
                Ok(out) => {
                    let mut lines: Vec<String> = out.stopped.iter().map(stopped).collect();
                    lines.push(started(&out.started));
                    Outcome::ok(lines.join("\n"))
                }
                Err(e) => Outcome::failed(format!("Could not switch to {}: {e}", vm.label())),
            }
        }
        Action::OpenLookingGlass => {
            match handoff::lg::open(cfg, &Session::from_env(), handoff::lg::WINDOW_WAIT) {
                Ok(out) => Outcome::ok(out.describe(cfg, None)),
                Err(e) => Outcome::failed(format!("Could not open Looking Glass: {e}")),
            }
        }
        Action::Terminate { pid, command } => terminate(cfg, *pid, command),
        Action::StopUnit { unit, pid } => stop_unit(cfg, unit, *pid),
        Action::ReturnToLinux => return_to_linux(cfg),
        Action::Refresh => Outcome::ok(""),
    })
}

/// Still running: in `/proc` and not a zombie. A process that ended stays in `/proc` as a
/// zombie until its parent collects it; its files are closed then, so it holds nothing.
fn alive(cfg: &Config, pid: u32) -> bool {
    match std::fs::read_to_string(cfg.host.procfs.join(pid.to_string()).join("stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
    }
}

/// SIGTERM, then wait a little for the process to go, so the refresh that follows no
/// longer lists it.
fn terminate(cfg: &Config, pid: u32, command: &str) -> Outcome {
    // SAFETY: kill has no memory effects; a stale pid fails with ESRCH.
    let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Outcome::failed(format!("Could not terminate {command} (pid {pid}): {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !alive(cfg, pid) {
            return Outcome::ok(format!("{command} (pid {pid}) has ended."));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Outcome::failed(format!(
        "{command} (pid {pid}) got SIGTERM but is still running after 5 s; it may be saving, or ignore it (kill -KILL {pid} ends it for sure)"
    ))
}

/// A unit under `user@<uid>.service` is the user's own (`systemctl --user`); any other is
/// the system's (polkit may ask for a password).
fn is_user_unit(cfg: &Config, pid: u32) -> bool {
    std::fs::read_to_string(cfg.host.procfs.join(pid.to_string()).join("cgroup"))
        .is_ok_and(|c| c.contains("/user@"))
}

fn stop_unit(cfg: &Config, unit: &str, pid: u32) -> Outcome {
    let mut cmd = Command::new("systemctl");
    if is_user_unit(cfg, pid) {
        cmd.arg("--user");
    }
    cmd.args(["stop", "--", unit]);
    let shown = format!("systemctl {}", shell_words(&cmd));
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => Outcome::ok(format!("Stopped {unit}.")),
        Ok(out) => Outcome::failed(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Outcome::failed(format!("Could not run `{shown}`: {e}")),
    }
}

fn shell_words(cmd: &Command) -> String {
    cmd.get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `handoff` CLI: beside this binary when installed together (or in a cargo target
/// dir), else from PATH. pkexec matches the policy's `exec.path` (/usr/bin/handoff).
fn handoff_cli() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|me| Some(me.parent()?.join("handoff")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("handoff"))
}

fn return_to_linux(cfg: &Config) -> Outcome {
    let cli = handoff_cli();
    let args = handoff::bind::pkexec_rebind_args(cfg.gpu.address);
    let shown = format!("pkexec {} {}", cli.display(), args.join(" "));
    match Command::new("pkexec")
        .arg(&cli)
        .args(&args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            Outcome::ok(if said.is_empty() {
                "The GPU is back on Linux.".to_owned()
            } else {
                said
            })
        }
        // pkexec: 126 the password dialog was dismissed, 127 not authorised.
        Ok(out) if matches!(out.status.code(), Some(126 | 127)) => Outcome::failed(format!(
            "Not authorised to run `{shown}`; run `sudo handoff rebind --force` in a terminal"
        )),
        Ok(out) => Outcome::failed(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Outcome::failed(format!(
            "Could not run `{shown}`: {e}; run `sudo handoff rebind --force` in a terminal"
        )),
    }
}
