//! Services come back: units stopped to free the GPU are started again when it returns.
//!
//! The seed says GPU workloads on Linux are interrupted while Windows has the GPU. When a
//! handoff stops a unit for that (the tray's or the details window's "Stop `<unit>`",
//! `handoff start --stop-holders`), [`stop_unit`] records it in `stopped-units.json`; when
//! the GPU is back on the host, [`start_again`] starts each recorded unit of that GPU
//! again and forgets it. `[gpu] restart_stopped_units = false` turns both off.
//!
//! Where the record lives ([`dir`]): root's (the hook, `sudo handoff …`) in `[host] run`;
//! a user's in `$XDG_RUNTIME_DIR/handoff` (`/run/user/<uid>/handoff`), since a user cannot
//! write `/run/handoff` — and the user's own surfaces, which start the units again, run as
//! that user. Who starts them again:
//! - the hook's `release` (root), for root's system units, with `systemctl start
//!   --no-block` (libvirtd waits for the hook: a unit that takes long to start must not
//!   hold it); it never starts user units, whose manager is not root's;
//! - `handoff stop` once the GPU is home, and the tray when it sees the GPU home (whichever
//!   comes first; starting a unit that is already running again is harmless).
//!
//! So the units come back whether the VM was stopped from the tray, the CLI, SSH or a guest
//! shutdown, as long as the hook runs (system units) or the user's tray or CLI does (user
//! units).

use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::action::{self, UnitScope};
use crate::bind::record::{now, write_atomic};
use crate::config::Config;
use crate::host::Host;
use crate::pci::PciAddress;

/// The record's file name.
pub const FILE: &str = "stopped-units.json";

/// One unit stopped for a handoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedUnit {
    pub unit: String,
    /// `user` (`systemctl --user`) or `system`.
    pub user: bool,
    pub gpu: PciAddress,
    /// Unix time it was stopped.
    pub at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    units: Vec<StoppedUnit>,
}

/// Where this process keeps its record: `[host] run` as root, else the user's runtime dir.
pub fn dir(host: &Host) -> PathBuf {
    let uid = nix::unistd::geteuid().as_raw();
    if uid == 0 {
        return host.run.clone();
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/run/user/{uid}")))
        .join("handoff")
}

fn load(host: &Host) -> Record {
    crate::bounded::read(&dir(host).join(FILE), crate::bounded::Links::Refuse)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save(host: &Host, r: &Record) -> io::Result<()> {
    let path = dir(host).join(FILE);
    if r.units.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let json = serde_json::to_vec_pretty(r).map_err(io::Error::other)?;
    write_atomic(&path, &json, 0o644)
}

/// The units recorded now (for the details window and tests).
pub fn recorded(host: &Host) -> Vec<StoppedUnit> {
    load(host).units
}

/// `systemctl [--user] stop <unit>` to free the GPU of `cfg`, recorded (unless
/// `restart_stopped_units` is off) so that the unit is started again when the GPU returns.
/// A record that cannot be written is said in the outcome: the unit stays stopped then.
pub fn stop_unit(cfg: &Config, unit: &str, scope: UnitScope) -> action::Outcome {
    let done = action::stop_unit(unit, scope)?;
    if !cfg.gpu.restart_stopped_units {
        return Ok(done);
    }
    Ok(match record(cfg, unit, scope) {
        Ok(()) => format!("{done} It is started again when the GPU is back on Linux."),
        Err(e) => format!(
            "{done} It will not be started again by itself ({} could not be written: {e}).",
            dir(&cfg.host).join(FILE).display()
        ),
    })
}

/// Records `unit` as stopped now for the GPU of `cfg` ([`stop_unit`] does, after stopping it).
pub fn record(cfg: &Config, unit: &str, scope: UnitScope) -> io::Result<()> {
    let mut r = load(&cfg.host);
    let user = scope == UnitScope::User;
    r.units
        .retain(|u| !(u.unit == unit && u.user == user && u.gpu == cfg.gpu.address));
    r.units.push(StoppedUnit {
        unit: unit.to_owned(),
        user,
        gpu: cfg.gpu.address,
        at: now(),
    });
    save(&cfg.host, &r)
}

/// When the GPU of `cfg` came home last, if it is home now: on a host driver, no handoff
/// under way or stuck, and the hook's state says when it returned it. A unit stopped
/// after that is not due: the GPU has not been away since (a start refused, or not yet
/// made), and starting the unit now would undo what the person asked for.
fn returned(cfg: &Config) -> Option<u64> {
    let g = crate::gpu::read_gpu(&cfg.host, cfg.gpu.address).ok()?;
    if g.owner != crate::gpu::Owner::Host
        || !crate::bind::record::RestoreRecord::load(&cfg.host, cfg.gpu.address).is_ok_and(|r| r.is_none())
    {
        return None;
    }
    crate::state::HookState::load(&cfg.host)
        .filter(|s| s.gpu == cfg.gpu.address && s.phase == crate::state::HookPhase::Host)?
        .returned
}

/// How [`start_again`] runs `systemctl start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The hook: system units only, `--no-block`.
    Hook,
    /// A person's command or surface: every recorded unit, waiting for each.
    Person,
}

/// When the GPU of `cfg` is home again (returned by the hook after the unit was stopped),
/// starts every unit recorded for it (see the module docs for who starts which) and
/// forgets those it started. One line per unit, for people:
/// "ollama.service started again" or why not. Nothing when nothing is recorded, the GPU
/// is not home, or `restart_stopped_units` is off.
pub fn start_again(cfg: &Config, who: Who) -> Vec<String> {
    if !cfg.gpu.restart_stopped_units {
        return Vec::new();
    }
    let mut r = load(&cfg.host);
    if r.units.is_empty() {
        return Vec::new();
    }
    let Some(back) = returned(cfg) else {
        return Vec::new();
    };
    let due: Vec<StoppedUnit> = r
        .units
        .iter()
        .filter(|u| u.gpu == cfg.gpu.address && u.at <= back && (who == Who::Person || !u.user))
        .cloned()
        .collect();
    if due.is_empty() {
        return Vec::new();
    }
    // Forget them first: a tray and `handoff stop` seeing the GPU home at once should not
    // both start them (though a second start would be harmless).
    r.units.retain(|u| !due.contains(u));
    if let Err(e) = save(&cfg.host, &r) {
        return vec![format!(
            "stopped units were not started again: {} could not be written: {e}",
            dir(&cfg.host).join(FILE).display()
        )];
    }
    due.iter()
        .map(|u| {
            let mut c = Command::new("systemctl");
            if u.user {
                c.arg("--user");
            }
            c.arg("start");
            if who == Who::Hook {
                c.arg("--no-block");
            }
            c.args(["--", &u.unit]);
            let shown = crate::escape::plain(&u.unit);
            match c.stdin(Stdio::null()).output() {
                Ok(o) if o.status.success() => format!("{shown} started again"),
                Ok(o) => format!(
                    "{shown} was not started again: systemctl{} start failed: {}",
                    if u.user { " --user" } else { "" },
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => format!("{shown} was not started again: cannot run systemctl: {e}"),
            }
        })
        .collect()
}
