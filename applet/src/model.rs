//! What the tray shows, computed from what was read: pure functions over a [`Snapshot`]
//! (no D-Bus, no libvirt, no files). The GPU's state is the library's verdict
//! (`handoff::verdict`); this renders it as an icon and a tooltip and decides which
//! notifications a change deserves, tested without a desktop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use handoff::PciAddress;
use handoff::escape::plain;
use handoff::gpu::Owner;
use handoff::holders::Holder;
use handoff::status::{Status, VmStatus};
use handoff::verdict::{self, Facts, GpuFacts, HookFiles, State, Verdict, Vms};

use crate::icons::Icon;

pub use handoff::action::{Action, UnitScope};

/// Everything one read of the machine found (see `crate::collect`). The primary GPU's
/// reading is the snapshot's own fields (the tray about "the GPU", as with one GPU); each
/// other configured GPU (issue 15) is one of [`Snapshot::others`].
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The primary GPU's address (the config's, also when sysfs could not be read).
    pub address: PciAddress,
    /// Its `[[gpu]] label`, when the config gives one.
    pub label: Option<String>,
    /// The status, or why it could not be read (sysfs unreadable).
    pub status: Result<Status, String>,
    /// The hook's files (state and restore record), through the library.
    pub files: HookFiles,
    /// This process's uid: holders with it may be terminated from the menu.
    pub uid: u32,
    /// For holders in a `.service` unit: which manager runs it. Scopes (login sessions,
    /// terminal tabs) are not offered: stopping one ends everything in it.
    pub units: HashMap<u32, UnitScope>,
    /// How long the tray has seen the GPU orphaned (set by [`OrphanWatch`]); a fresh
    /// reading starts at zero, within the grace: the tray watches, so a GPU that sits on
    /// vfio-pci for the moment between a VM's stop and the hook's `release` must not alarm.
    pub orphan_seen_for: Option<Duration>,
    /// The other configured GPUs, in config order; empty with one GPU.
    pub others: Vec<OtherGpu>,
}

/// One non-primary GPU as read with the snapshot: its own status (the VMs asked once, for
/// all), hook files and orphan time.
#[derive(Debug, Clone)]
pub struct OtherGpu {
    pub address: PciAddress,
    pub label: Option<String>,
    pub status: Result<Status, String>,
    pub files: HookFiles,
    pub orphan_seen_for: Option<Duration>,
}

/// One GPU's section in the tooltip and the menu: who it is and its verdict.
#[derive(Debug, Clone)]
pub struct Section<'a> {
    pub address: PciAddress,
    /// "UHD 630 (0000:00:02.0)": the label, else the name from pci.ids, with the address.
    pub name: String,
    pub primary: bool,
    pub verdict: Verdict,
    pub holders: &'a [Holder],
}

fn gpu_name(address: PciAddress, label: Option<&str>, status: &Result<Status, String>) -> String {
    let name = label
        .map(str::to_owned)
        .or_else(|| status.as_ref().ok().and_then(|s| s.gpu.name.clone()));
    match name {
        Some(n) => format!("{} ({address})", plain(&n)),
        None => address.to_string(),
    }
}

/// What the verdict decides from, for one GPU's reading (the primary's or another's);
/// `doing` is what the tray itself is doing.
fn facts<'a>(
    status: &'a Result<Status, String>,
    files: &'a HookFiles,
    doing: Option<&'a str>,
    orphan_seen_for: Option<Duration>,
) -> Facts<'a> {
    Facts {
        gpu: status
            .as_ref()
            .map(|s| GpuFacts::from(&s.gpu))
            .map_err(String::as_str),
        files,
        vms: Vms::Known(status.as_ref().map(|s| s.vms.as_slice()).unwrap_or(&[])),
        doing,
        orphan_seen_for,
    }
}

impl OtherGpu {
    fn facts(&self) -> Facts<'_> {
        facts(&self.status, &self.files, None, self.orphan_seen_for)
    }

    pub fn verdict(&self) -> Verdict {
        verdict::decide(&self.facts())
    }

    pub fn holders(&self) -> &[Holder] {
        self.status
            .as_ref()
            .map(|s| s.gpu.blockers.as_slice())
            .unwrap_or(&[])
    }
}

impl Snapshot {
    /// Every configured GPU, the primary first, each with its verdict; `action` is what the
    /// tray itself is doing (it shows on the primary GPU, which the tray's title is about).
    pub fn sections(&self, action: Option<&str>) -> Vec<Section<'_>> {
        let mut out = vec![Section {
            address: self.address,
            name: gpu_name(self.address, self.label.as_deref(), &self.status),
            primary: true,
            verdict: self.verdict(action),
            holders: self.holders(),
        }];
        out.extend(self.others.iter().map(|o| Section {
            address: o.address,
            name: gpu_name(o.address, o.label.as_deref(), &o.status),
            primary: false,
            verdict: o.verdict(),
            holders: o.holders(),
        }));
        out
    }

    /// Every GPU's holders, the primary's first.
    pub fn every_holder(&self) -> impl Iterator<Item = &Holder> {
        self.holders()
            .iter()
            .chain(self.others.iter().flat_map(|o| o.holders()))
    }

    /// Another GPU needs `handoff rebind --force` (its verdict says restore required).
    pub fn other_needs_restore(&self) -> bool {
        self.others
            .iter()
            .any(|o| o.verdict().state == State::RestoreRequired)
    }

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

    /// The running configured VM that holds the GPU (the status model's `gpu.vm`).
    pub fn vm_with_gpu(&self) -> Option<&VmStatus> {
        let s = self.status.as_ref().ok()?;
        let name = s.gpu.vm.as_ref()?;
        s.vms.iter().find(|v| &v.name == name)
    }

    pub fn active_vms(&self) -> impl Iterator<Item = &VmStatus> {
        self.vms().iter().filter(|v| v.state.is_active())
    }

    /// The configured GPUs' addresses, the primary first.
    fn gpu_addresses(&self) -> Vec<PciAddress> {
        std::iter::once(self.address)
            .chain(self.others.iter().map(|o| o.address))
            .collect()
    }

    /// Starting `vm` means switching: another VM runs on a GPU it takes (the library's
    /// rule, `handoff::gpus::start_switches`, which the details window uses too).
    pub fn takes_over(&self, vm: &VmStatus) -> bool {
        handoff::gpus::start_switches(&self.gpu_addresses(), self.vms(), vm)
    }

    fn facts<'a>(&'a self, action: Option<&'a str>) -> Facts<'a> {
        facts(&self.status, &self.files, action, self.orphan_seen_for)
    }

    /// The library's verdict on this reading; `action` is what the tray itself is doing.
    pub fn verdict(&self, action: Option<&str>) -> Verdict {
        verdict::decide(&self.facts(action))
    }

    /// libvirt could not be asked about any VM (daemon down, no permission): why.
    pub fn libvirt_unreachable(&self) -> Option<String> {
        verdict::libvirt_unreachable(self.vms())
    }

    /// Why a handoff needs `handoff rebind --force`, when the verdict says so.
    pub fn restore_required(&self) -> Option<String> {
        let v = self.verdict(None);
        (v.state == State::RestoreRequired).then(|| v.reason.unwrap_or_default())
    }

    /// The GPU is orphaned (off the host, or its record left, with no VM and no handoff
    /// under way), whatever the grace: why.
    pub fn orphaned(&self) -> Option<String> {
        let f = self.facts(None);
        if !verdict::is_orphaned(&f) {
            return None;
        }
        verdict::decide(&Facts {
            orphan_seen_for: None,
            ..f
        })
        .reason
    }

    /// The icon for this snapshot; `action` is what the tray itself is doing, if anything.
    /// With several GPUs the primary decides the colour, except that any GPU that needs
    /// a restore shows: that is the one state a person must act on wherever it is.
    pub fn icon(&self, action: Option<&str>) -> Icon {
        if self.other_needs_restore() {
            return Icon::Restore;
        }
        Icon::of_verdict(&self.verdict(action))
    }

    /// The tooltip's title (and the menu's first line): the tray's words for the verdict.
    /// What the tray itself is doing comes first, whatever the state.
    pub fn title(&self, action: Option<&str>) -> String {
        let v = self.verdict(action);
        if let Some(d) = &v.doing {
            return format!("GPU: {d}");
        }
        let why = v.reason.clone().unwrap_or_default();
        match v.state {
            State::Unreadable => format!("GPU unreadable: {why}"),
            State::RestoreRequired => format!("GPU: restore required ({why})"),
            State::Absent => "GPU not found".into(),
            // Rule 10a: not everything could be checked, so not "free".
            State::Idle if v.unseen => {
                format!("GPU on Linux ({}) · ? unseen", v.driver.as_deref().unwrap_or("?"))
            }
            State::Idle | State::Busy => format!("GPU on Linux ({})", v.driver.as_deref().unwrap_or("?")),
            // The verdict's words: "RTX 5070 Ti: Windows 11 (VM 140)", "RTX 3090 Ti: Windows".
            State::InVm => v.headline.clone(),
            State::Switching | State::LibvirtUnreachable => v.line(),
        }
    }

    /// Tooltip body lines: owner, each VM's state, how many processes use the GPU, the
    /// last event.
    pub fn tooltip_lines(&self, last_event: Option<&str>) -> Vec<String> {
        let mut lines = Vec::new();
        match &self.status {
            // The GPU is in a Proxmox VE node (the verdict found it there): "No GPU at …"
            // would contradict the title, which says where it is.
            Ok(s) if s.gpu.owner == Owner::Absent && self.verdict(None).state != State::Absent => {}
            Ok(s) => lines.push(s.headline()),
            Err(e) => lines.push(e.clone()),
        }
        for v in self.vms() {
            // "Windows (win11): running", "Linux AI (VM 141): shut off".
            lines.push(format!("{}: {}", plain(&v.shown()), v.words()));
        }
        if let Some(why) = self.libvirt_unreachable() {
            lines.push(format!("libvirt unreachable: {}", first_line(&why)));
        }
        let n = self.holders().len();
        let v = self.verdict(None);
        lines.push(match n {
            // Not "no process": the scan could not look everywhere. What was not checked
            // and how to see everything, as the verdict says it.
            0 if v.unseen => format!(
                "No process seen using the GPU, but {}",
                v.next.trim_end_matches('.')
            ),
            0 => "No process uses the GPU".into(),
            1 => "1 process uses the GPU".into(),
            n => format!("{n} processes use the GPU"),
        });
        // Several GPUs: each by name with its verdict (the lines above are the primary's).
        if !self.others.is_empty() {
            for sec in self.sections(None) {
                lines.push(format!(
                    "{}{}: {}",
                    sec.name,
                    if sec.primary { ", primary" } else { "" },
                    sec.verdict.line_under_gpu()
                ));
            }
        }
        if let Some(r) = self.files.last_refusal() {
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

#[cfg(test)]
pub use handoff::verdict::ORPHAN_GRACE;

/// The library's [`verdict::OrphanWatch`] over snapshots: sets each fresh snapshot's
/// `orphan_seen_for`, so the verdict tells a VM that just stopped from a stuck handoff.
/// Each other GPU has its own watch, by address.
#[derive(Debug, Default)]
pub struct OrphanWatch(verdict::OrphanWatch, HashMap<PciAddress, verdict::OrphanWatch>);

impl OrphanWatch {
    /// Looks at a fresh snapshot read at `now`. Returns how long to wait before reading
    /// again, on the first sighting only (one one-shot timer, while a GPU is in this
    /// transient state; never while idle).
    pub fn observe(&mut self, snap: &mut Snapshot, now: Instant) -> Option<Duration> {
        let orphaned = verdict::is_orphaned(&snap.facts(None));
        let (seen, mut reread) = self.0.observe(orphaned, now);
        snap.orphan_seen_for = Some(seen.unwrap_or_default());
        for o in &mut snap.others {
            o.orphan_seen_for = Some(Duration::ZERO);
            let orphaned = verdict::is_orphaned(&o.facts());
            let (seen, again) = self.1.entry(o.address).or_default().observe(orphaned, now);
            o.orphan_seen_for = Some(seen.unwrap_or_default());
            reread = reread.or(again);
        }
        reread
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
        if new.verdict(None).state == State::Switching {
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
    pub actions: Vec<(Action, String)>,
    pub critical: bool,
}

/// The key a notification's button sends back to the tray for `a` (its actions are the
/// one vocabulary's: "Terminate and start", "Details").
pub fn note_key(a: &Action) -> &'static str {
    match a {
        Action::TerminateAndStart { .. } => "terminate-and-start",
        Action::OpenDetails => "details",
        // Not offered on a notification today; a distinct key each, should one be.
        Action::Start { .. } => "start",
        Action::Stop { .. } => "stop",
        Action::ForceStop { .. } => "force-stop",
        Action::Switch { .. } => "switch",
        Action::ForceSwitch { .. } => "force-switch",
        Action::OpenLookingGlass => "open-looking-glass",
        Action::Terminate { .. } => "terminate",
        Action::StopUnit { .. } => "stop-unit",
        Action::StopContainer { .. } => "stop-container",
        Action::ReturnToLinux { .. } => "return-to-linux",
        Action::Refresh => "refresh",
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
            Action::TerminateAndStart {
                vm: vm.to_owned(),
                pids: holders.iter().map(|h| h.pid).collect(),
            },
            "Terminate and start".to_owned(),
        ));
    }
    actions.push((Action::OpenDetails, "Details".to_owned()));
    Note {
        summary: format!("{vm_label} did not start: the GPU is busy"),
        body,
        actions,
        critical: true,
    }
}

/// The notification for a start the hook refused that this tray did not ask for
/// (virt-manager, `virsh start`, SSH): the same as for its own, naming the holders root
/// saw, with the same buttons ("Terminate and start" only for a configured VM whose
/// holders are all the user's own).
pub fn logged_refusal_note(cfg: &handoff::Config, r: &handoff::refusals::Logged, uid: u32) -> Note {
    let vm = cfg.vms.iter().find(|v| v.name == r.vm);
    // A PVE VM by its label and VMID, as the hookscript names it ("Linux AI (VM 141)").
    let label = match vm {
        Some(v) => match v.vmid {
            Some(id) => format!("{} (VM {id})", v.label()),
            None => v.label().to_owned(),
        },
        None => r.vm.clone(),
    };
    let mut note = refusal_note(&label, &r.vm, &r.holders, uid, &r.message);
    if vm.is_none() {
        note.actions
            .retain(|(a, _)| !matches!(a, Action::TerminateAndStart { .. }));
    }
    // Another running VM has the GPU (the PVE hookscript's refusal, which names it and
    // `handoff switch`): the button does that switch.
    if let Some(v) = vm
        && r.holders.is_empty()
        && r.message.contains("which is running")
    {
        note.actions.insert(
            0,
            (
                Action::Switch { vm: v.name.clone() },
                format!("Switch to {}", v.label()),
            ),
        );
    }
    note
}

/// "Busy when you're about to need it" (`[tray] busy_alert`): the notification for
/// processes that started using a GPU between `old` and `new` while `vm` (a label) is
/// about to start — `why` says how the tray knows ("is being started from the tray", "did
/// not start 20 s ago"). None when nothing new uses a GPU.
pub fn busy_alert_note(old: &Snapshot, new: &Snapshot, vm: &str, why: &str) -> Option<Note> {
    let before: Vec<u32> = old.every_holder().map(|h| h.pid).collect();
    let mut fresh: Vec<&Holder> = new.every_holder().filter(|h| !before.contains(&h.pid)).collect();
    fresh.dedup_by_key(|h| h.pid);
    if fresh.is_empty() {
        return None;
    }
    let mut names: Vec<String> = fresh.iter().map(|h| plain(&h.command)).collect();
    names.dedup();
    let mut body = format!("{vm} {why}, and the GPU is now in use:\n");
    for h in &fresh {
        body.push_str(&h.summary());
        body.push('\n');
    }
    body.push_str("The start is refused while anything uses the GPU: end it first.");
    Some(Note {
        summary: format!("GPU is now busy: {}", names.join(", ")),
        body,
        actions: vec![(Action::OpenDetails, "Details".into())],
        critical: false,
    })
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
            actions: vec![(Action::OpenDetails, "Details".into())],
            critical: true,
        });
    }
    if new.other_needs_restore() && !old.other_needs_restore() {
        let which: Vec<String> = new
            .sections(None)
            .into_iter()
            .filter(|s| !s.primary && s.verdict.state == State::RestoreRequired)
            .map(|s| format!("{}: {}", s.name, s.verdict.reason.unwrap_or_default()))
            .collect();
        return Some(Note {
            summary: "GPU handoff failed: restore required".into(),
            body: format!(
                "{}.\nUse \"Return GPU to Linux\" under that GPU in the tray menu (or run `sudo handoff rebind --force --gpu ADDRESS`).",
                which.join("\n")
            ),
            actions: vec![(Action::OpenDetails, "Details".into())],
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
