//! The actions a person takes on the GPU, in one vocabulary for every surface (issue 12
//! item 3), and the one implementation of each that does not go through libvirt:
//! terminating one's own process (with the ownership check), stopping a systemd unit or a
//! Docker/Podman container,
//! returning the GPU to Linux with `pkexec handoff rebind --force`, and finding the
//! `handoff` CLI beside the running binary.
//!
//! The VM actions (start, stop, force stop, switch) have one implementation too,
//! `handoff_libvirt::vm::Ctl::act` (it needs libvirt, so it lives in that crate): the CLI's
//! commands, the tray's agent ([`crate::agent::Request`] maps onto [`Action`]) and the
//! details window's buttons all run it. Opening Looking Glass is [`crate::lg::open`].
//! [`run`] runs every other action; a surface renders actions and dispatches them, and
//! keeps no vocabulary of its own (the tray's menu and notification buttons are these).

use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::host::Host;

/// Everything a surface can ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    Start {
        vm: String,
    },
    /// Graceful shutdown, waiting up to the VM's `shutdown_timeout_s`.
    Stop {
        vm: String,
    },
    /// Power off at once (confirmed first).
    ForceStop {
        vm: String,
    },
    /// Stop whichever configured VM holds the GPU, then start `vm`.
    Switch {
        vm: String,
    },
    /// Switch, turning the VM that has the GPU off at once (`handoff switch --force`).
    ForceSwitch {
        vm: String,
    },
    OpenLookingGlass,
    /// SIGTERM to one of the user's own processes (confirmed first).
    Terminate {
        pid: u32,
        command: String,
    },
    /// `systemctl [--user] stop <unit>`; `pid` tells a user unit from a system one.
    StopUnit {
        unit: String,
        pid: u32,
    },
    /// `docker stop NAME` / `podman stop NAME`: a holder in a container (its unit is the
    /// engine's scope, not one to `systemctl stop`).
    StopContainer {
        container: crate::containers::Container,
    },
    /// `pkexec handoff rebind --force --gpu <gpu>`.
    ReturnToLinux {
        gpu: crate::PciAddress,
    },
    /// SIGTERM the user's own `pids` (all or none), wait for them, then start `vm` (a
    /// refusal's "Terminate and start").
    TerminateAndStart {
        vm: String,
        pids: Vec<u32>,
    },
    /// Open the details window (`handoff-details`, its own process).
    OpenDetails,
    /// Read the state again now (the details window's button).
    Refresh,
}

impl Action {
    /// The VM this action starts, stops or switches to, for a VM action (not
    /// `TerminateAndStart`, which is a terminate and then a `Start`).
    pub fn vm(&self) -> Option<&str> {
        match self {
            Action::Start { vm }
            | Action::Stop { vm }
            | Action::ForceStop { vm }
            | Action::Switch { vm }
            | Action::ForceSwitch { vm } => Some(vm),
            _ => None,
        }
    }

    /// Whether it changes the machine (a surface disables its other actions meanwhile);
    /// opening a window or reading again does not.
    pub fn changes_machine(&self) -> bool {
        !matches!(
            self,
            Action::OpenLookingGlass | Action::OpenDetails | Action::Refresh
        )
    }

    /// Whether it asks the hypervisor to start a VM (so the hook may refuse it).
    pub fn starts_a_vm(&self) -> bool {
        matches!(
            self,
            Action::Start { .. }
                | Action::Switch { .. }
                | Action::ForceSwitch { .. }
                | Action::TerminateAndStart { .. }
        )
    }
}

/// Runs an action that needs no hypervisor and opens no window of the session's: terminate,
/// stop a unit (recorded, so it is started again when the GPU is back: [`crate::stopped`])
/// or a container, return the GPU, open the details window, refresh. None for the VM
/// actions (`handoff_libvirt::vm::Ctl::act`, or the tray's agent), `TerminateAndStart`
/// (its [`terminate`], then the start) and Looking Glass ([`crate::lg::open`]). Blocking.
pub fn run(cfg: &crate::Config, action: &Action) -> Option<Outcome> {
    Some(match action {
        Action::Terminate { pid, command } => terminate(
            &cfg.host,
            nix::unistd::getuid().as_raw(),
            &[(*pid, command.as_str())],
        ),
        Action::StopUnit { unit, pid } => {
            let scope = unit_scope(&cfg.host, *pid).unwrap_or(UnitScope::System);
            crate::stopped::stop_unit(cfg, unit, scope)
        }
        Action::StopContainer { container } => stop_container(container),
        Action::ReturnToLinux { gpu } => return_to_linux(*gpu),
        Action::OpenDetails => open_details(),
        Action::Refresh => Ok(String::new()),
        Action::Start { .. }
        | Action::Stop { .. }
        | Action::ForceStop { .. }
        | Action::Switch { .. }
        | Action::ForceSwitch { .. }
        | Action::TerminateAndStart { .. }
        | Action::OpenLookingGlass => return None,
    })
}

/// Starts `handoff-details` (beside the running binary, else on PATH) in its own process
/// group; a thread reaps it when it closes.
pub fn open_details() -> Outcome {
    use std::os::unix::process::CommandExt;
    let bin = sibling("handoff-details");
    match Command::new(&bin).stdin(Stdio::null()).process_group(0).spawn() {
        Ok(mut child) => {
            let _ = std::thread::Builder::new()
                .name("handoff-details-wait".into())
                .stack_size(64 * 1024)
                .spawn(move || child.wait());
            Ok(String::new())
        }
        Err(source) => Err(ActionError::Spawn {
            shown: bin.display().to_string(),
            source,
        }),
    }
}

/// What an action did, in words a person reads.
pub type Outcome = Result<String, ActionError>;

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{command} (pid {pid}) is not your process; it was not touched")]
    NotYours { pid: u32, command: String },
    #[error("Could not terminate {command} (pid {pid}): {source}")]
    Signal {
        pid: u32,
        command: String,
        source: io::Error,
    },
    #[error(
        "{command} (pid {pid}) got SIGTERM but is still running after 5 s; it may be saving, or ignore it (kill -KILL {pid} ends it for sure)"
    )]
    StillRunning { pid: u32, command: String },
    #[error("Not authorised to run `{shown}`; run `sudo handoff rebind --force` in a terminal")]
    NotAuthorised { shown: String, stderr: String },
    #[error("`{shown}` failed ({status}): {stderr}")]
    Failed {
        shown: String,
        status: String,
        stderr: String,
    },
    #[error("Could not run `{shown}`: {source}")]
    Spawn { shown: String, source: io::Error },
}

impl ActionError {
    /// The command line that ran and what it said on stderr, when a command ran and failed.
    pub fn command_said(&self) -> Option<(&str, &str)> {
        match self {
            ActionError::NotAuthorised { shown, stderr } | ActionError::Failed { shown, stderr, .. } => {
                Some((shown, stderr))
            }
            _ => None,
        }
    }
}

/// Which systemd manager runs a unit, and so how to stop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitScope {
    /// `systemctl --user stop`.
    User,
    /// `systemctl stop` (polkit asks for a password).
    System,
}

/// A unit under `user@<uid>.service` is the user's own; any other is the system's. None
/// when the process is gone.
pub fn unit_scope(host: &Host, pid: u32) -> Option<UnitScope> {
    let cg = std::fs::read_to_string(host.procfs.join(pid.to_string()).join("cgroup")).ok()?;
    Some(if cg.contains("/user@") {
        UnitScope::User
    } else {
        UnitScope::System
    })
}

/// Gone, or a zombie (its fds are closed; only its parent's wait is missing).
fn ended(host: &Host, pid: u32) -> bool {
    match std::fs::read_to_string(host.procfs.join(pid.to_string()).join("stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

fn owned_by(host: &Host, pid: u32, uid: u32) -> bool {
    std::fs::read_to_string(host.procfs.join(pid.to_string()).join("status"))
        .is_ok_and(|s| crate::holders::parse_status_uid(&s) == Some(uid))
}

/// SIGTERM each of `pids` (name, pid), all of which must belong to `uid`, and wait (5 s
/// at most) until they have ended. None is signalled unless every one is `uid`'s: a pid
/// reused by someone else's process is never touched.
pub fn terminate(host: &Host, uid: u32, pids: &[(u32, &str)]) -> Outcome {
    let live: Vec<(u32, &str)> = pids.iter().copied().filter(|&(p, _)| !ended(host, p)).collect();
    if let Some(&(pid, command)) = live.iter().find(|&&(p, _)| !owned_by(host, p, uid)) {
        return Err(ActionError::NotYours {
            pid,
            command: command.to_owned(),
        });
    }
    for &(pid, command) in &live {
        // The pid was checked to be `uid`'s just above.
        let pid_t = nix::unistd::Pid::from_raw(pid as i32);
        if let Err(errno) = nix::sys::signal::kill(pid_t, nix::sys::signal::Signal::SIGTERM) {
            return Err(ActionError::Signal {
                pid,
                command: command.to_owned(),
                source: errno.into(),
            });
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<&(u32, &str)> = live.iter().filter(|(p, _)| !ended(host, *p)).collect();
        let Some(&&(pid, command)) = left.first() else {
            let names: Vec<String> = live.iter().map(|(p, c)| format!("{c} (pid {p})")).collect();
            return Ok(match names.len() {
                0 => "Nothing to end: it had ended already.".to_owned(),
                1 => format!("{} has ended.", names[0]),
                _ => format!("{} have ended.", names.join(", ")),
            });
        };
        if Instant::now() > deadline {
            return Err(ActionError::StillRunning {
                pid,
                command: command.to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `systemctl [--user] stop -- <unit>`.
pub fn stop_unit(unit: &str, scope: UnitScope) -> Outcome {
    let mut cmd = Command::new("systemctl");
    if scope == UnitScope::User {
        cmd.arg("--user");
    }
    cmd.args(["stop", "--", unit]);
    let shown = format!(
        "systemctl {}",
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => Ok(format!("Stopped {unit}.")),
        Ok(out) => Err(ActionError::Failed {
            shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
        Err(source) => Err(ActionError::Spawn { shown, source }),
    }
}

/// `docker stop NAME` / `podman stop NAME` (the engine's own stop: its grace period, then
/// SIGKILL; a restart policy is the engine's business), as [`crate::containers`] names it.
pub fn stop_container(c: &crate::containers::Container) -> Outcome {
    let argv = c.stop_argv();
    let shown = argv.join(" ");
    match Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Ok(format!("Stopped the {} container {}.", argv[0], argv[2])),
        Ok(out) => Err(ActionError::Failed {
            shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
        Err(source) => Err(ActionError::Spawn { shown, source }),
    }
}

/// A binary beside the running one (installed together, or a cargo target dir), else its
/// name, found on PATH. pkexec matches the policy's `exec.path` (/usr/bin/handoff).
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|me| Some(me.parent()?.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `pkexec handoff rebind --force --gpu <address>`: polkit asks for an administrator's
/// password, and its prompt names the GPU (the policy shows the command line); `--gpu`
/// makes the root side refuse unless its own system config names that GPU.
pub fn return_to_linux(gpu: crate::PciAddress) -> Outcome {
    let cli = sibling("handoff");
    let args = crate::bind::pkexec_rebind_args(gpu);
    let shown = format!("pkexec {} {}", cli.display(), args.join(" "));
    match Command::new("pkexec")
        .arg(&cli)
        .args(&args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            Ok(if said.is_empty() {
                "The GPU is back on Linux.".to_owned()
            } else {
                said
            })
        }
        // pkexec: 126 the password dialog was dismissed, 127 not authorised.
        Ok(out) if matches!(out.status.code(), Some(126 | 127)) => Err(ActionError::NotAuthorised {
            shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
        Ok(out) => Err(ActionError::Failed {
            shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
        Err(source) => Err(ActionError::Spawn { shown, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host::default()
    }

    #[test]
    fn terminate_refuses_a_process_that_is_not_yours_and_touches_nothing() {
        let me = nix::unistd::getuid().as_raw();
        let someone_else = if me == 0 { 65534 } else { me + 1 };
        let mut c = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = c.id();
        let r = terminate(&host(), someone_else, &[(pid, "sleep")]);
        assert!(matches!(r, Err(ActionError::NotYours { .. })), "{r:?}");
        assert!(c.try_wait().unwrap().is_none(), "it was not signalled");
        let r = terminate(&host(), me, &[(pid, "sleep")]);
        assert_eq!(r.unwrap(), format!("sleep (pid {pid}) has ended."));
        let _ = c.wait();
    }
}
