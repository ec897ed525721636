//! What the tray shows, computed from what was read: pure functions over a [`Snapshot`]
//! (no D-Bus, no libvirt, no files), so the state → icon mapping, the tooltip and the
//! notifications a change deserves are tested without a desktop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use handoff::bind::record::{Phase, RestoreRecord};
use handoff::escape::plain;
use handoff::gpu::Owner;
use handoff::holders::Holder;
use handoff::state::{HookPhase, HookState};
use handoff::status::{Status, VmState, VmStatus};

use crate::icons::IconState;

/// Which systemd manager runs a holder's unit, and so how to stop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitScope {
    /// `systemctl --user stop`.
    User,
    /// `systemctl stop` (polkit asks for a password).
    System,
}

/// Everything one read of the machine found (see `crate::collect`).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The status, or why it could not be read (sysfs unreadable).
    pub status: Result<Status, String>,
    pub hook: Option<HookState>,
    pub restore: Option<RestoreRecord>,
    /// This process's uid: holders with it may be terminated from the menu.
    pub uid: u32,
    /// For holders in a `.service` unit: which manager runs it. Scopes (login sessions,
    /// terminal tabs) are not offered: stopping one ends everything in it.
    pub units: HashMap<u32, UnitScope>,
    /// [`Snapshot::orphaned`] has held for a while (set by the main loop): only then is it
    /// "restore required". Right after a VM stops, the GPU sits on vfio-pci with its record
    /// until libvirt runs the hook's `release`; that moment must not alarm anyone.
    pub orphan_confirmed: bool,
}

impl Snapshot {
    pub fn vms(&self) -> &[VmStatus] {
        self.status.as_ref().map(|s| s.vms.as_slice()).unwrap_or(&[])
    }

    pub fn holders(&self) -> &[Holder] {
        self.status
            .as_ref()
            .map(|s| s.gpu.blockers.as_slice())
            .unwrap_or(&[])
    }

    pub fn owner(&self) -> Option<Owner> {
        self.status.as_ref().ok().map(|s| s.gpu.owner)
    }

    /// The running configured VM that holds the GPU.
    pub fn vm_with_gpu(&self) -> Option<&VmStatus> {
        let s = self.status.as_ref().ok()?;
        let name = s.gpu.vm.as_ref()?;
        s.vms.iter().find(|v| &v.name == name)
    }

    pub fn active_vms(&self) -> impl Iterator<Item = &VmStatus> {
        self.vms().iter().filter(|v| v.state.is_active())
    }

    /// libvirt could not be asked about any VM (daemon down, no permission).
    pub fn libvirt_unreachable(&self) -> Option<String> {
        let vms = self.vms();
        if vms.is_empty() || !vms.iter().all(|v| v.state == VmState::Unknown) {
            return None;
        }
        Some(
            vms[0]
                .error
                .clone()
                .unwrap_or_else(|| "libvirt did not answer".into()),
        )
    }

    /// A handoff that did not finish: the hook says so, the record is stuck, or (once
    /// confirmed, see [`Snapshot::orphan_confirmed`]) the GPU is off the host with no VM.
    pub fn restore_required(&self) -> Option<String> {
        if let Some(h) = &self.hook
            && h.phase == HookPhase::RestoreRequired
        {
            return Some(
                h.last_error
                    .clone()
                    .unwrap_or_else(|| "the last handoff did not finish".into()),
            );
        }
        if let Some(r) = &self.restore
            && r.phase == Phase::Stuck
        {
            return Some(
                r.problem
                    .clone()
                    .unwrap_or_else(|| "the handoff got stuck".into()),
            );
        }
        if self.orphan_confirmed {
            return self.orphaned();
        }
        None
    }

    /// The GPU is off the host (or its restore record is left) while no VM runs and no
    /// handoff is under way. Transient right after a VM stops; see `orphan_confirmed`.
    pub fn orphaned(&self) -> Option<String> {
        if self.active_vms().next().is_some() || self.libvirt_unreachable().is_some() || self.hook_moving() {
            return None;
        }
        if let Some(r) = &self.restore {
            return Some(format!(
                "a restore record is left from {} but no VM is running",
                r.vm.as_deref().unwrap_or("a VM")
            ));
        }
        match self.owner() {
            Some(Owner::Vfio) => Some("the GPU is on vfio-pci and no VM is running".into()),
            Some(Owner::Unbound) => Some("the GPU has no driver and no VM is running".into()),
            Some(Owner::Mixed) => Some("the GPU is split between drivers and no VM is running".into()),
            _ => None,
        }
    }

    fn hook_moving(&self) -> bool {
        self.hook
            .as_ref()
            .is_some_and(|h| matches!(h.phase, HookPhase::Binding | HookPhase::Returning))
            || self
                .restore
                .as_ref()
                .is_some_and(|r| matches!(r.phase, Phase::Binding | Phase::Returning))
    }

    /// The icon for this snapshot; `action` is what the tray itself is doing, if anything.
    pub fn icon_state(&self, action: Option<&str>) -> IconState {
        if self.status.is_err() || self.restore_required().is_some() {
            return IconState::Restore;
        }
        if self.owner() == Some(Owner::Absent) {
            return IconState::Offline;
        }
        // Functions on different drivers (or none) while a VM runs: the hook is mid-way.
        let split = matches!(self.owner(), Some(Owner::Mixed | Owner::Unbound));
        if action.is_some() || self.hook_moving() || self.orphaned().is_some() || split {
            return IconState::Switching;
        }
        if self.libvirt_unreachable().is_some() {
            return IconState::Offline;
        }
        if self.vm_with_gpu().is_some() || self.owner() == Some(Owner::Vfio) {
            return IconState::Vm;
        }
        if !self.holders().is_empty() {
            return IconState::Busy;
        }
        IconState::Host
    }

    /// The tooltip's title: who owns the GPU, in a few words.
    pub fn title(&self, action: Option<&str>) -> String {
        if let Some(a) = action {
            return format!("GPU: {a}");
        }
        if let Err(e) = &self.status {
            return format!("GPU unreadable: {e}");
        }
        if let Some(why) = self.restore_required() {
            return format!("GPU: restore required ({why})");
        }
        match self.owner() {
            Some(Owner::Absent) => "GPU not found".into(),
            Some(Owner::Host) => {
                let driver = self
                    .status
                    .as_ref()
                    .ok()
                    .and_then(|s| s.gpu.driver.clone())
                    .unwrap_or_else(|| "?".into());
                format!("GPU on Linux ({driver})")
            }
            _ => match self.vm_with_gpu() {
                Some(v) => format!("GPU in {} ({})", v.label, v.name),
                None if self.libvirt_unreachable().is_some() => "GPU on vfio-pci; libvirt unreachable".into(),
                None => "GPU on vfio-pci".into(),
            },
        }
    }

    /// Tooltip body lines: owner, each VM's state, how many processes use the GPU, the
    /// last event.
    pub fn tooltip_lines(&self, last_event: Option<&str>) -> Vec<String> {
        let mut lines = Vec::new();
        match &self.status {
            Ok(s) => lines.push(s.headline()),
            Err(e) => lines.push(e.clone()),
        }
        for v in self.vms() {
            lines.push(format!(
                "{} ({}): {}",
                plain(&v.label),
                plain(&v.name),
                v.state.words()
            ));
        }
        if let Some(why) = self.libvirt_unreachable() {
            lines.push(format!("libvirt unreachable: {}", first_line(&why)));
        }
        let n = self.holders().len();
        lines.push(match n {
            0 => "No process uses the GPU".into(),
            1 => "1 process uses the GPU".into(),
            n => format!("{n} processes use the GPU"),
        });
        if let Some(r) = self.hook.as_ref().and_then(|h| h.last_refusal.as_ref()) {
            lines.push(format!("Last refused start: {}", plain(&r.vm)));
        }
        if let Some(e) = last_event {
            lines.push(format!("Last event: {e}"));
        }
        lines
    }
}

pub fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// How long the GPU may sit off the host with no VM before that is "restore required":
/// the hook's `release` runs right after a VM stops and takes well under a second.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3);

/// Tells a VM that just stopped (the GPU sits on vfio-pci until the hook's `release`
/// runs) from a handoff that got stuck: an orphaned GPU ([`Snapshot::orphaned`]) is
/// confirmed only once it has stayed so for [`ORPHAN_GRACE`]. The clock is passed in.
#[derive(Debug, Default)]
pub struct OrphanWatch {
    /// Since when the GPU has been seen orphaned.
    since: Option<Instant>,
}

impl OrphanWatch {
    /// Looks at a fresh snapshot read at `now`: sets its `orphan_confirmed` once the grace
    /// is over. Returns how long to wait before reading again, on the first sighting only
    /// (one one-shot timer, while the GPU is in this transient state; never while idle).
    pub fn observe(&mut self, snap: &mut Snapshot, now: Instant) -> Option<Duration> {
        if snap.orphaned().is_none() {
            self.since = None;
            return None;
        }
        match self.since {
            Some(t) => {
                if now.saturating_duration_since(t) >= ORPHAN_GRACE {
                    snap.orphan_confirmed = true;
                }
                None
            }
            None => {
                self.since = Some(now);
                Some(ORPHAN_GRACE)
            }
        }
    }
}

/// The last settled snapshot (no handoff under way): notifications compare against it, so
/// "Windows stopped" waits for the GPU to be home and says so in one notification.
#[derive(Debug, Clone)]
pub struct Settled(pub Snapshot);

impl Settled {
    /// The notification `new` deserves, if it is settled (not switching); it becomes the
    /// new reference then. While switching, nothing is said and the reference stays.
    pub fn next(&mut self, new: &Snapshot) -> Option<Note> {
        if new.icon_state(None) == IconState::Switching {
            return None;
        }
        let note = transition_note(&self.0, new);
        self.0 = new.clone();
        note
    }
}

/// A notification the tray shows; at most one is visible (each replaces the last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub summary: String,
    pub body: String,
    pub actions: Vec<(NoteAction, String)>,
    pub critical: bool,
}

/// What a notification's button does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoteAction {
    /// SIGTERM these pids (the user's own holders), wait for them to exit, start the VM.
    TerminateAndStart {
        vm: String,
        pids: Vec<u32>,
    },
    Details,
}

impl NoteAction {
    /// The action key sent to the notification server.
    pub fn key(&self) -> &'static str {
        match self {
            NoteAction::TerminateAndStart { .. } => "terminate-and-start",
            NoteAction::Details => "details",
        }
    }
}

impl Note {
    pub fn plain(summary: impl Into<String>, body: impl Into<String>) -> Note {
        Note {
            summary: summary.into(),
            body: body.into(),
            actions: Vec::new(),
            critical: false,
        }
    }
}

/// The notification a refused start deserves: who holds the GPU, and the buttons that
/// help. "Terminate and start" only when every holder is the user's own process.
pub fn refusal_note(vm_label: &str, vm: &str, holders: &[Holder], uid: u32, message: &str) -> Note {
    let mut body = String::new();
    if holders.is_empty() {
        body.push_str(message);
    } else {
        body.push_str(if holders.len() == 1 {
            "This process uses the GPU:\n"
        } else {
            "These processes use the GPU:\n"
        });
        for h in holders {
            body.push_str(&h.summary());
            body.push('\n');
        }
        body.push_str("Close it, or end it from the tray's \"Using the GPU\" menu, and start again.");
    }
    let mut actions = Vec::new();
    if !holders.is_empty() && holders.iter().all(|h| h.uid == uid) {
        actions.push((
            NoteAction::TerminateAndStart {
                vm: vm.to_owned(),
                pids: holders.iter().map(|h| h.pid).collect(),
            },
            "Terminate and start".to_owned(),
        ));
    }
    actions.push((NoteAction::Details, "Details".to_owned()));
    Note {
        summary: format!("{vm_label} did not start: the GPU is busy"),
        body,
        actions,
        critical: true,
    }
}

/// The notification a change from `old` to `new` deserves, if any: a VM started or
/// stopped, the GPU came back to Linux, a handoff got stuck. Changes the tray caused
/// itself are reported the same way, so there is one path for both.
pub fn transition_note(old: &Snapshot, new: &Snapshot) -> Option<Note> {
    if new.restore_required().is_some() && old.restore_required().is_none() {
        return Some(Note {
            summary: "GPU handoff failed: restore required".into(),
            body: format!(
                "{}.\nUse \"Return GPU to Linux\" in the tray menu (or run `sudo handoff rebind --force`).",
                new.restore_required().unwrap_or_default()
            ),
            actions: vec![(NoteAction::Details, "Details".into())],
            critical: true,
        });
    }
    let was: Vec<&VmStatus> = old.active_vms().collect();
    let now: Vec<&VmStatus> = new.active_vms().collect();
    let started: Vec<&&VmStatus> = now
        .iter()
        .filter(|v| !was.iter().any(|w| w.name == v.name))
        .collect();
    let stopped: Vec<&&VmStatus> = was
        .iter()
        .filter(|v| !now.iter().any(|w| w.name == v.name))
        .collect();
    let home = new.owner() == Some(Owner::Host) && old.owner().is_some_and(|o| o != Owner::Host);
    let driver = new
        .status
        .as_ref()
        .ok()
        .and_then(|s| s.gpu.driver.clone())
        .unwrap_or_else(|| "?".into());
    if let Some(v) = started.first() {
        let gpu = if new.owner() == Some(Owner::Vfio) {
            "The GPU is on vfio-pci, in the VM."
        } else {
            "The GPU stayed where it was."
        };
        return Some(Note::plain(format!("{} is running", v.label), gpu));
    }
    if let Some(v) = stopped.first() {
        let body = if home {
            format!("The GPU is back on Linux ({driver}).")
        } else {
            "Waiting for the GPU to come back to Linux…".to_owned()
        };
        return Some(Note::plain(format!("{} stopped", v.label), body));
    }
    if home {
        return Some(Note::plain(
            "GPU back on Linux",
            format!("The GPU is on {driver} again; CUDA can use it."),
        ));
    }
    None
}

/// The tests' snapshot builders are shared with the menu's tests (`crate::tray`).
#[cfg(test)]
pub(crate) mod tests;
