//! Freeing the GPU before a start: what `handoff start --stop-holders` (and
//! `windows-start --stop-holders`, also over SSH) ends, so that a remote start does what
//! the tray's "Terminate and start" does instead of only being refused.
//!
//! A plan first ([`plan`]: a value, no I/O but reading the holders' cgroups), shown to the
//! person and confirmed, then carried out with [`crate::action`]'s one implementation of
//! each action ([`execute`]):
//!
//! | holder | step |
//! |---|---|
//! | in a Docker/Podman container ([`crate::containers`]) | `docker stop NAME` / `podman stop NAME` |
//! | in a systemd service (`*.service`) | `systemctl stop UNIT`, or `systemctl --user stop UNIT` for a unit of the caller's user manager |
//! | any other process (a session scope, a terminal) | SIGTERM, then wait (5 s) until it has ended |
//!
//! Never another user's process without root: a holder whose uid is not the caller's is
//! [`Plan::refused`] unless the caller is root, and so is a VM's QEMU (stop the VM) and
//! the caller itself. A plan with anything refused is not carried out at all: ending half
//! of the holders frees nothing.

use std::fmt;

use serde::Serialize;

use crate::action::{self, UnitScope};
use crate::containers::Container;
use crate::holders::Holder;

/// One thing to end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// SIGTERM, then wait.
    Terminate {
        pid: u32,
        command: String,
        uid: u32,
    },
    StopUnit {
        unit: String,
        #[serde(serialize_with = "scope_word")]
        scope: UnitScope,
        /// The holders it ends.
        pids: Vec<u32>,
    },
    StopContainer {
        container: Container,
        pids: Vec<u32>,
    },
}

fn scope_word<S: serde::Serializer>(s: &UnitScope, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(match s {
        UnitScope::User => "user",
        UnitScope::System => "system",
    })
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::escape::plain;
        match self {
            Step::Terminate { pid, command, .. } => {
                write!(f, "terminate {} (pid {pid}): SIGTERM, then wait", plain(command))
            }
            Step::StopUnit { unit, scope, pids } => write!(
                f,
                "stop {}: systemctl{} stop {} (pid {})",
                plain(unit),
                if *scope == UnitScope::User { " --user" } else { "" },
                plain(unit),
                join(pids)
            ),
            Step::StopContainer { container, pids } => write!(
                f,
                "stop the {} container {}: {} (pid {})",
                container.engine.cli(),
                plain(&container.shown()),
                plain(&container.stop_argv().join(" ")),
                join(pids)
            ),
        }
    }
}

fn join(pids: &[u32]) -> String {
    pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// What [`plan`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Holders this caller may not end, one line each saying why and what to do.
    pub refused: Vec<String>,
}

/// The steps that end `holders` for a caller with `uid` (0: root). `scope_of` says which
/// systemd manager runs a holder's unit ([`action::unit_scope`] reads its cgroup).
pub fn plan(holders: &[Holder], uid: u32, scope_of: &dyn Fn(&Holder) -> Option<UnitScope>) -> Plan {
    let me = std::process::id();
    let mut p = Plan::default();
    for h in holders {
        let who = h.summary();
        if h.pid == me {
            p.refused.push(format!(
                "{who}: that is this command itself; close the GPU here first"
            ));
            continue;
        }
        if let Some(vm) = &h.vm {
            p.refused.push(format!(
                "{who}: the QEMU of VM {}; stop that VM (handoff stop {0})",
                crate::escape::plain(vm)
            ));
            continue;
        }
        if uid != 0 && h.uid != uid {
            p.refused.push(format!(
                "{who}: not your process; ask {} or run this with sudo",
                crate::escape::plain(&h.user)
            ));
            continue;
        }
        if let Some(c) = &h.container {
            match p.steps.iter_mut().find_map(|s| match s {
                Step::StopContainer { container, pids } if container.id == c.id => Some(pids),
                _ => None,
            }) {
                Some(pids) => pids.push(h.pid),
                None => p.steps.push(Step::StopContainer {
                    container: c.clone(),
                    pids: vec![h.pid],
                }),
            }
            continue;
        }
        let service = h.unit.as_deref().filter(|u| u.ends_with(".service"));
        if let (Some(unit), Some(scope)) = (service, service.and_then(|_| scope_of(h))) {
            match p.steps.iter_mut().find_map(|s| match s {
                Step::StopUnit { unit: u, pids, .. } if u == unit => Some(pids),
                _ => None,
            }) {
                Some(pids) => pids.push(h.pid),
                None => p.steps.push(Step::StopUnit {
                    unit: unit.to_owned(),
                    scope,
                    pids: vec![h.pid],
                }),
            }
            continue;
        }
        p.steps.push(Step::Terminate {
            pid: h.pid,
            command: h.command.clone(),
            uid: h.uid,
        });
    }
    p
}

/// Carries out every step, in order, through [`crate::action`] (a unit through
/// [`crate::stopped::stop_unit`], which records it); stops at the first that fails. Says
/// what each did, in words.
pub fn execute(
    cfg: &crate::Config,
    plan: &Plan,
    say: &mut dyn FnMut(&str),
) -> Result<(), action::ActionError> {
    for step in &plan.steps {
        let done = match step {
            Step::Terminate { pid, command, uid } => {
                action::terminate(&cfg.host, *uid, &[(*pid, command.as_str())])
            }
            // Recorded, to be started again when the GPU returns (crate::stopped).
            Step::StopUnit { unit, scope, .. } => crate::stopped::stop_unit(cfg, unit, *scope),
            Step::StopContainer { container, .. } => action::stop_container(container),
        }?;
        say(&done);
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum FreeError {
    #[error(transparent)]
    Sysfs(#[from] crate::gpu::SysfsError),
    #[error("not ending anything, so the start would be refused:\n  {}", .0.join("\n  "))]
    Refused(Vec<String>),
    #[error(
        "not ending them without asking, and there is no terminal to ask on: pass --yes to end them (nothing was started)"
    )]
    NoTerminal,
    #[error("nothing was ended and nothing started")]
    Declined,
    #[error("{0}; the VM was not started")]
    Action(#[from] action::ActionError),
}

/// Before a start: finds what holds the GPU of `cfg`, says what will end it, asks (`ask`:
/// None when there is no terminal; `yes` skips the question), then ends it. Nothing held:
/// nothing said, Ok. Every line for people goes to `say`.
pub fn before_start(
    cfg: &crate::Config,
    yes: bool,
    ask: Option<&mut dyn FnMut(&str) -> bool>,
    say: &mut dyn FnMut(&str),
) -> Result<(), FreeError> {
    let host = &cfg.host;
    let g = crate::gpu::read_gpu(host, cfg.gpu.address)?;
    if g.owner != crate::gpu::Owner::Host {
        return Ok(()); // nothing of the host's holds a GPU it does not have
    }
    let mut scan = crate::holders::scan(host, &g, &crate::holders::gpu_nodes(host, &g));
    crate::containers::name_all(scan.holders.iter_mut().filter_map(|h| h.container.as_mut()));
    if scan.holders.is_empty() {
        return Ok(());
    }
    let uid = nix::unistd::geteuid().as_raw();
    let p = plan(&scan.holders, uid, &|h| action::unit_scope(host, h.pid));
    if !p.refused.is_empty() {
        return Err(FreeError::Refused(p.refused));
    }
    say(&format!("To free GPU {}, this ends:", cfg.gpu.address));
    for s in &p.steps {
        say(&format!("  {s}"));
    }
    if !yes {
        let Some(ask) = ask else {
            return Err(FreeError::NoTerminal);
        };
        if !ask("End them and start? [y/N] ") {
            return Err(FreeError::Declined);
        }
    }
    execute(cfg, &p, say)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::Engine;

    fn holder(pid: u32, uid: u32, unit: Option<&str>) -> Holder {
        Holder {
            pid,
            command: format!("job{pid}"),
            cmdline: Vec::new(),
            uid,
            user: format!("u{uid}"),
            unit: unit.map(str::to_owned),
            paths: vec!["/dev/nvidia0".into()],
            reason: None,
            vm: None,
            container: None,
        }
    }

    #[test]
    fn each_kind_of_holder_gets_its_step_and_others_processes_are_refused() {
        let user_scope = |h: &Holder| match h.unit.as_deref() {
            Some("ollama.service") => Some(UnitScope::User),
            Some(_) => Some(UnitScope::System),
            None => None,
        };
        let mut in_docker = holder(30, 1000, Some("docker-abc.scope"));
        in_docker.container = Some(Container {
            engine: Engine::Docker,
            id: "a".repeat(64),
            name: Some("jellyfin".into()),
        });
        let mut in_docker_too = in_docker.clone();
        in_docker_too.pid = 31;
        let mut qemu = holder(40, 1000, None);
        qemu.vm = Some("win11".into());
        let holders = vec![
            holder(10, 1000, Some("session-2.scope")),
            holder(20, 1000, Some("ollama.service")),
            holder(21, 1000, Some("ollama.service")),
            in_docker,
            in_docker_too,
            qemu,
            holder(50, 1001, None),
        ];
        let p = plan(&holders, 1000, &user_scope);
        let lines: Vec<String> = p.steps.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            lines,
            [
                "terminate job10 (pid 10): SIGTERM, then wait",
                "stop ollama.service: systemctl --user stop ollama.service (pid 20, 21)",
                "stop the docker container jellyfin: docker stop jellyfin (pid 30, 31)",
            ]
        );
        assert_eq!(p.refused.len(), 2, "{:#?}", p.refused);
        assert!(p.refused[0].contains("stop that VM"), "{}", p.refused[0]);
        assert!(
            p.refused[1].contains("not your process; ask u1001"),
            "{}",
            p.refused[1]
        );

        // Root may end everyone's (but still not a VM's QEMU).
        let p = plan(&holders, 0, &user_scope);
        assert_eq!(p.steps.len(), 4);
        assert_eq!(p.refused.len(), 1);
    }
}
