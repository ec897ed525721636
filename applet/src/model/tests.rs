//! The tray's pure logic, by scenario: which icon a machine state shows (in priority
//! order: restore > offline/absent > switching > libvirt unreachable > VM > busy > host),
//! the grace after a VM stops, the tooltip, and which notification each change deserves.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use handoff::PciAddress;
use handoff::config::VmConfig;
use handoff::gpu::Owner;
use handoff::holders::Holder;
use handoff::status::{GpuStatus, Status, VmState, VmStatus};

use super::*;
use crate::icons::Icon;

pub(crate) const ME: u32 = 1000;
pub(crate) const SOMEONE_ELSE: u32 = 1001;
pub(crate) const WIN: &str = "win11";
pub(crate) const LIN: &str = "debian";

pub(crate) fn addr() -> PciAddress {
    "0000:01:00.0".parse().unwrap()
}

pub(crate) fn vm(name: &str, state: VmState) -> VmStatus {
    let label = if name == WIN { "Windows" } else { "Debian" };
    VmStatus::new(&VmConfig::named(name, label), state, None)
}

/// What `handoff::status::collect` would have read: the GPU with `owner`, these VMs, no
/// holders; the holding VM worked out the way the library does it.
pub(crate) fn machine(owner: Owner, vms: Vec<VmStatus>) -> Snapshot {
    let active: Vec<&VmStatus> = vms.iter().filter(|v| v.state.is_active()).collect();
    let holding = match (owner, active.as_slice()) {
        (Owner::Vfio | Owner::Mixed, [one]) => Some(one.name.clone()),
        _ => None,
    };
    let driver = match owner {
        Owner::Host => Some("nvidia".to_owned()),
        Owner::Vfio | Owner::Mixed => Some("vfio-pci".to_owned()),
        Owner::Unbound | Owner::Absent => None,
    };
    Snapshot {
        address: addr(),
        label: None,
        status: Ok(Status {
            gpu: GpuStatus {
                address: addr(),
                name: None,
                owner,
                driver,
                functions: Vec::new(),
                vm: holding,
                blockers: Vec::new(),
                vfio_users: Vec::new(),
                uninspected: 0,
                iommu_group: None,
                notes: Vec::new(),
                split: (owner == Owner::Mixed).then(|| "01:00.0 vfio-pci, 01:00.1 snd_hda_intel".into()),
                locked: Vec::new(),
                rests_on_vfio: false,
                label: None,
                candidates: Vec::new(),
            },
            vms,
        }),
        files: HookFiles::default(),
        uid: ME,
        units: HashMap::new(),
        // Read by the tray, which watches: a fresh sighting, within the grace.
        orphan_seen_for: Some(Duration::ZERO),
        others: Vec::new(),
    }
}

pub(crate) fn on_host() -> Snapshot {
    machine(Owner::Host, vec![vm(WIN, VmState::Shutoff)])
}

pub(crate) fn in_windows() -> Snapshot {
    machine(Owner::Vfio, vec![vm(WIN, VmState::Running)])
}

pub(crate) fn holder(pid: u32, uid: u32, command: &str) -> Holder {
    Holder {
        pid,
        command: command.into(),
        cmdline: vec![command.into()],
        uid,
        user: if uid == ME { "alice".into() } else { "bob".into() },
        unit: None,
        paths: vec![PathBuf::from("/dev/nvidia0")],
        reason: None,
        vm: None,
        container: None,
    }
}

pub(crate) fn with_holders(mut s: Snapshot, holders: Vec<Holder>) -> Snapshot {
    s.status.as_mut().unwrap().gpu.blockers = holders;
    s
}

/// The hook's state file says `phase` (its file's word: `binding`, `vfio`, `returning`,
/// `restore-required`, `host`) for win11.
pub(crate) fn with_hook(mut s: Snapshot, phase: &str) -> Snapshot {
    s.files = s.files.with_hook(addr(), phase, Some(WIN));
    s
}

/// A restore record in `phase` (`binding`, `bound`, `returning`, `stuck`) for win11.
pub(crate) fn with_record(mut s: Snapshot, phase: &str, problem: Option<&str>) -> Snapshot {
    s.files = s.files.with_record(addr(), phase, Some(WIN), problem);
    s
}

/// Every configured VM unknown: libvirt refused the connection.
pub(crate) fn libvirt_down(owner: Owner) -> Snapshot {
    let mut v = vm(WIN, VmState::Unknown);
    v.error = Some(
        "cannot connect to libvirt at qemu:///system: Failed to connect socket to \
         '/var/run/libvirt/virtqemud-sock': No such file or directory\n\
         is libvirtd running? (systemctl status libvirtd)"
            .into(),
    );
    machine(owner, vec![v])
}

// ---------------------------------------------------------------------------------------
// Icon states, in priority order

#[test]
fn gpu_on_linux_with_nothing_using_it_shows_the_host_icon() {
    let s = on_host();
    assert_eq!(s.icon(None), Icon::Host);
    assert_eq!(s.title(None), "GPU on Linux (nvidia)");
    assert!(s.restore_required().is_none() && s.orphaned().is_none());
}

#[test]
fn a_process_on_the_gpu_shows_the_busy_icon() {
    let s = with_holders(on_host(), vec![holder(4242, ME, "python3")]);
    assert_eq!(s.icon(None), Icon::Busy);
    assert_eq!(s.title(None), "GPU on Linux (nvidia)");
}

#[test]
fn a_vm_holding_the_gpu_beats_busy() {
    // Holders of a GPU in a VM (a stale fd on the vfio group): the VM is what matters.
    let s = with_holders(in_windows(), vec![holder(4242, ME, "python3")]);
    assert_eq!(s.icon(None), Icon::Vm);
    assert_eq!(s.title(None), "GPU: Windows");
}

#[test]
fn gpu_on_vfio_with_an_unknown_vm_still_shows_the_vm_icon_when_libvirt_answers() {
    // Two VMs active (sharing one GPU): which holds it cannot be told, but it is in a VM.
    let s = machine(
        Owner::Vfio,
        vec![vm(WIN, VmState::Running), vm(LIN, VmState::Paused)],
    );
    assert!(s.vm_with_gpu().is_none());
    assert_eq!(s.icon(None), Icon::Vm);
    assert_eq!(s.title(None), "GPU is in a VM");
}

#[test]
fn libvirt_unreachable_beats_vm_and_busy_and_says_why() {
    for owner in [Owner::Host, Owner::Vfio] {
        let s = with_holders(libvirt_down(owner), vec![holder(4242, ME, "python3")]);
        assert_eq!(s.icon(None), Icon::Offline, "{owner:?}");
        let why = s.libvirt_unreachable().expect("unreachable");
        assert!(why.contains("virtqemud-sock"), "{why}");
        // Not mistaken for a GPU left behind by a VM: no VM state is known.
        assert!(s.orphaned().is_none(), "{owner:?}");
    }
    // The verdict's line: who holds the GPU cannot be told, and why (issue 12: one set of
    // words; the tooltip's first line still says where sysfs has it).
    let why = "libvirt unreachable: cannot connect to libvirt at qemu:///system: Failed to connect \
               socket to '/var/run/libvirt/virtqemud-sock': No such file or directory";
    assert_eq!(libvirt_down(Owner::Vfio).title(None), why);
    assert_eq!(libvirt_down(Owner::Host).title(None), why);
    assert_eq!(
        libvirt_down(Owner::Host).tooltip_lines(None)[0],
        "GPU 0000:01:00.0 is on Linux (nvidia); nothing uses it"
    );
}

#[test]
fn libvirt_unreachable_without_an_error_text_still_says_something() {
    let s = machine(Owner::Host, vec![vm(WIN, VmState::Unknown)]);
    assert_eq!(s.libvirt_unreachable().as_deref(), Some("libvirt did not answer"));
    assert_eq!(s.icon(None), Icon::Offline);
}

#[test]
fn one_vm_answering_means_libvirt_is_reachable() {
    let mut lost = vm(LIN, VmState::Unknown);
    lost.uri = "qemu+ssh://elsewhere/system".into();
    let s = machine(Owner::Host, vec![vm(WIN, VmState::Shutoff), lost]);
    assert!(s.libvirt_unreachable().is_none());
    assert_eq!(s.icon(None), Icon::Host);
    // No VMs configured at all is not "unreachable" either.
    assert!(machine(Owner::Host, vec![]).libvirt_unreachable().is_none());
}

#[test]
fn switching_beats_libvirt_unreachable() {
    let s = with_hook(libvirt_down(Owner::Host), "binding");
    assert_eq!(s.icon(None), Icon::Switching);
    let s = libvirt_down(Owner::Host);
    assert_eq!(s.icon(Some("starting win11…")), Icon::Switching);
}

#[test]
fn the_trays_own_action_shows_switching_and_names_it() {
    let s = in_windows();
    assert_eq!(s.icon(Some("stopping win11…")), Icon::Switching);
    assert_eq!(s.title(Some("stopping win11…")), "GPU: stopping win11…");
    // Even over busy.
    let s = with_holders(on_host(), vec![holder(4242, ME, "python3")]);
    assert_eq!(s.icon(Some("starting win11…")), Icon::Switching);
}

#[test]
fn the_hook_binding_or_returning_shows_switching() {
    for phase in ["binding", "returning"] {
        let s = with_hook(on_host(), phase);
        assert_eq!(s.icon(None), Icon::Switching, "{phase:?}");
    }
    for phase in ["binding", "returning"] {
        let s = with_record(machine(Owner::Vfio, vec![vm(WIN, VmState::Shutoff)]), phase, None);
        assert_eq!(s.icon(None), Icon::Switching, "{phase:?}");
        // Under way, so not orphaned even once confirmed.
        assert!(s.orphaned().is_none(), "{phase:?}");
    }
}

#[test]
fn functions_split_between_drivers_while_a_vm_runs_is_switching() {
    for owner in [Owner::Mixed, Owner::Unbound] {
        let s = machine(owner, vec![vm(WIN, VmState::Running)]);
        assert_eq!(s.icon(None), Icon::Switching, "{owner:?}");
    }
}

#[test]
fn no_gpu_at_the_address_is_offline_even_while_switching() {
    let s = with_hook(machine(Owner::Absent, vec![vm(WIN, VmState::Running)]), "binding");
    assert_eq!(s.icon(Some("starting win11…")), Icon::Offline);
    assert_eq!(s.title(None), "GPU not found");
    let s = machine(Owner::Absent, vec![vm(WIN, VmState::Unknown)]);
    assert_eq!(s.icon(None), Icon::Offline);
}

#[test]
fn restore_required_by_the_hook_beats_everything() {
    let mut s = with_hook(
        with_holders(in_windows(), vec![holder(4242, ME, "python3")]),
        "restore-required",
    );
    s.files = s.files.with_hook_error(addr(), "0000:01:00.1 did not come back");
    assert_eq!(s.icon(Some("stopping win11…")), Icon::Restore);
    assert_eq!(
        s.title(None),
        "GPU: restore required (0000:01:00.1 did not come back)"
    );
    // Beats an absent GPU and libvirt being down too.
    let s = with_hook(libvirt_down(Owner::Absent), "restore-required");
    assert_eq!(s.icon(None), Icon::Restore);
    assert_eq!(
        s.restore_required().as_deref(),
        Some("the last handoff did not finish")
    );
}

#[test]
fn a_stuck_restore_record_is_restore_required_with_its_problem() {
    let s = with_record(on_host(), "stuck", Some("a write to unbind hung"));
    assert_eq!(s.icon(None), Icon::Restore);
    assert_eq!(s.restore_required().as_deref(), Some("a write to unbind hung"));
    let s = with_record(on_host(), "stuck", None);
    assert_eq!(s.restore_required().as_deref(), Some("the handoff got stuck"));
}

#[test]
fn an_unreadable_sysfs_shows_the_restore_icon_and_the_error() {
    let mut s = on_host();
    s.status = Err("cannot read /sys/bus/pci/devices/0000:01:00.0: Permission denied".into());
    assert_eq!(s.icon(None), Icon::Restore);
    assert_eq!(
        s.title(None),
        "GPU unreadable: cannot read /sys/bus/pci/devices/0000:01:00.0: Permission denied"
    );
    assert_eq!(
        s.tooltip_lines(None)[0],
        "cannot read /sys/bus/pci/devices/0000:01:00.0: Permission denied"
    );
}

// ---------------------------------------------------------------------------------------
// The grace after a VM stops

fn just_stopped() -> Snapshot {
    machine(Owner::Vfio, vec![vm(WIN, VmState::Shutoff)])
}

#[test]
fn a_vm_that_just_stopped_shows_switching_not_restore() {
    let s = just_stopped();
    assert_eq!(
        s.orphaned().as_deref(),
        Some("the GPU is on vfio-pci and no VM is running")
    );
    assert!(s.restore_required().is_none());
    assert_eq!(s.icon(None), Icon::Switching);
}

#[test]
fn the_gpu_left_on_vfio_for_3_s_is_restore_required() {
    let t0 = Instant::now();
    let mut w = OrphanWatch::default();
    let mut s = just_stopped();
    // First sighting: one re-read is scheduled, after the grace.
    assert_eq!(w.observe(&mut s, t0), Some(Duration::from_secs(3)));
    assert_eq!(s.icon(None), Icon::Switching);
    // Re-reads within the grace (other changes) confirm nothing and schedule nothing more.
    let mut s = just_stopped();
    assert_eq!(w.observe(&mut s, t0 + Duration::from_millis(2999)), None);
    assert_eq!(s.icon(None), Icon::Switching);
    assert_eq!(s.icon(None), Icon::Switching);
    // The scheduled re-read: still there, so it is stuck.
    let mut s = just_stopped();
    assert_eq!(w.observe(&mut s, t0 + ORPHAN_GRACE), None);
    assert_eq!(s.orphan_seen_for, Some(ORPHAN_GRACE));
    assert_eq!(s.icon(None), Icon::Restore);
    assert_eq!(
        s.title(None),
        "GPU: restore required (the GPU is on vfio-pci and no VM is running)"
    );
}

#[test]
fn the_gpu_coming_home_within_the_grace_resets_it() {
    let t0 = Instant::now();
    let mut w = OrphanWatch::default();
    assert!(w.observe(&mut just_stopped(), t0).is_some());
    let mut home = on_host();
    assert_eq!(w.observe(&mut home, t0 + Duration::from_millis(400)), None);
    assert_eq!(home.orphan_seen_for, Some(Duration::ZERO));
    assert_eq!(home.icon(None), Icon::Host);
    // A later stop starts a fresh grace: not confirmed by the old first sighting.
    let mut s = just_stopped();
    let later = t0 + Duration::from_secs(60);
    assert_eq!(w.observe(&mut s, later), Some(ORPHAN_GRACE));
    assert_eq!(s.icon(None), Icon::Switching);
}

#[test]
fn leftovers_of_a_handoff_each_say_what_is_wrong() {
    let cases = [
        (
            with_record(on_host(), "bound", None),
            "a restore record is left from win11 but no VM is running",
        ),
        (
            machine(Owner::Unbound, vec![vm(WIN, VmState::Shutoff)]),
            "the GPU has no driver and no VM is running",
        ),
        (
            machine(Owner::Mixed, vec![vm(WIN, VmState::Shutoff)]),
            "the GPU is split between drivers (01:00.0 vfio-pci, 01:00.1 snd_hda_intel) and no VM is running",
        ),
    ];
    for (mut s, why) in cases {
        assert_eq!(s.orphaned().as_deref(), Some(why));
        assert_eq!(s.icon(None), Icon::Switching, "{why}");
        s.orphan_seen_for = Some(ORPHAN_GRACE);
        assert_eq!(s.restore_required().as_deref(), Some(why));
        assert_eq!(s.icon(None), Icon::Restore, "{why}");
    }
}

#[test]
fn a_running_vm_is_never_an_orphan() {
    let mut s = in_windows();
    s.orphan_seen_for = Some(ORPHAN_GRACE);
    assert!(s.orphaned().is_none() && s.restore_required().is_none());
    assert_eq!(s.icon(None), Icon::Vm);
}

// ---------------------------------------------------------------------------------------
// Tooltip

#[test]
fn tooltip_on_the_host_has_the_owner_each_vm_and_no_holders() {
    let s = machine(
        Owner::Host,
        vec![vm(WIN, VmState::Shutoff), vm(LIN, VmState::Undefined)],
    );
    assert_eq!(
        s.tooltip_lines(None),
        [
            "GPU 0000:01:00.0 is on Linux (nvidia); nothing uses it",
            "Windows (win11): shut off",
            "Debian (debian): not defined in libvirt",
            "No process uses the GPU",
        ]
    );
}

#[test]
fn tooltip_counts_the_processes_using_the_gpu() {
    let one = with_holders(on_host(), vec![holder(1, ME, "python3")]);
    assert!(
        one.tooltip_lines(None)
            .contains(&"1 process uses the GPU".to_owned())
    );
    let two = with_holders(
        on_host(),
        vec![holder(1, ME, "python3"), holder(2, SOMEONE_ELSE, "ollama")],
    );
    let lines = two.tooltip_lines(None);
    assert_eq!(
        lines[0],
        "GPU 0000:01:00.0 is on Linux (nvidia); 2 processes use it"
    );
    assert!(lines.contains(&"2 processes use the GPU".to_owned()), "{lines:?}");
}

#[test]
fn tooltip_in_the_vm_names_it() {
    let lines = in_windows().tooltip_lines(None);
    assert_eq!(lines[0], "GPU 0000:01:00.0 is in the VM Windows (vfio-pci)");
    assert_eq!(lines[1], "Windows (win11): running");
}

#[test]
fn tooltip_ends_with_the_last_refusal_and_the_last_event() {
    let mut s = with_hook(on_host(), "host");
    s.files = s.files.with_refusal(
        addr(),
        WIN,
        0,
        vec![holder(4242, ME, "python3")],
        "the GPU is busy",
    );
    let lines = s.tooltip_lines(Some("win11 (qemu:///system): Stopped (12:00:01)"));
    let n = lines.len();
    assert_eq!(lines[n - 2], "Last refused start: win11");
    assert_eq!(
        lines[n - 1],
        "Last event: win11 (qemu:///system): Stopped (12:00:01)"
    );
    // Neither line without its fact.
    let lines = on_host().tooltip_lines(None);
    assert!(!lines.iter().any(|l| l.starts_with("Last ")), "{lines:?}");
}

/// On a desktop whose VMs are on Proxmox VE, a refusal the agent logged from PVE's task
/// list (the user's refusals.json) is the last refused start when it is the later one.
#[test]
fn tooltip_names_the_later_of_the_hooks_and_the_pve_refusal() {
    let mut s = with_hook(on_host(), "host");
    s.files = s
        .files
        .with_refusal(addr(), WIN, 100, Vec::new(), "the GPU is busy")
        .with_pve_refusal("linux-ai", 200, "not starting Linux AI (VM 141): the GPU is busy");
    let last = |s: &Snapshot| {
        s.tooltip_lines(None)
            .into_iter()
            .find(|l| l.starts_with("Last refused start"))
    };
    assert_eq!(last(&s).as_deref(), Some("Last refused start: linux-ai"));
    s.files = s
        .files
        .with_refusal(addr(), WIN, 300, Vec::new(), "the GPU is busy");
    assert_eq!(last(&s).as_deref(), Some("Last refused start: win11"));
    // Only PVE's: said too.
    let mut s = on_host();
    s.files = s.files.with_pve_refusal("linux-ai", 5, "refused");
    assert_eq!(last(&s).as_deref(), Some("Last refused start: linux-ai"));
}

#[test]
fn tooltip_says_libvirt_is_unreachable_with_the_first_line_of_why() {
    let lines = libvirt_down(Owner::Host).tooltip_lines(None);
    assert_eq!(lines[1], "Windows (win11): unknown");
    assert_eq!(
        lines[2],
        "libvirt unreachable: cannot connect to libvirt at qemu:///system: Failed to connect \
         socket to '/var/run/libvirt/virtqemud-sock': No such file or directory"
    );
}

// ---------------------------------------------------------------------------------------
// Notifications

#[test]
fn a_refused_start_names_every_holder_and_offers_terminate_when_all_are_mine() {
    let holders = [holder(4242, ME, "python3"), holder(4243, ME, "blender")];
    let n = refusal_note("Windows", WIN, &holders, ME, "the GPU is busy");
    assert_eq!(n.summary, "Windows did not start: the GPU is busy");
    assert!(n.critical);
    assert!(n.body.starts_with("These processes use the GPU:\n"), "{}", n.body);
    for h in &holders {
        assert!(n.body.contains(&h.summary()), "{}", n.body);
    }
    assert!(
        n.body
            .contains("python3 (pid 4242, user alice) holds /dev/nvidia0"),
        "{}",
        n.body
    );
    assert_eq!(
        n.actions,
        [
            (
                Action::TerminateAndStart {
                    vm: WIN.into(),
                    pids: vec![4242, 4243]
                },
                "Terminate and start".to_owned()
            ),
            (Action::OpenDetails, "Details".to_owned()),
        ]
    );
}

#[test]
fn a_refused_start_with_one_holder_says_it_in_the_singular() {
    let n = refusal_note("Windows", WIN, &[holder(4242, ME, "python3")], ME, "busy");
    assert!(n.body.starts_with("This process uses the GPU:\n"), "{}", n.body);
    assert!(n.body.ends_with("and start again."), "{}", n.body);
}

#[test]
fn a_refused_start_with_anyone_elses_holder_offers_only_details() {
    let holders = [holder(4242, ME, "python3"), holder(77, SOMEONE_ELSE, "ollama")];
    let n = refusal_note("Windows", WIN, &holders, ME, "busy");
    assert!(n.body.contains("ollama (pid 77, user bob)"), "{}", n.body);
    assert_eq!(n.actions, [(Action::OpenDetails, "Details".to_owned())]);
    let n = refusal_note("Windows", WIN, &[holder(77, SOMEONE_ELSE, "ollama")], ME, "busy");
    assert_eq!(n.actions, [(Action::OpenDetails, "Details".to_owned())]);
}

#[test]
fn a_refused_start_without_known_holders_passes_the_message_on() {
    let n = refusal_note("Windows", WIN, &[], ME, "vfio-pci did not take 0000:01:00.1");
    assert_eq!(n.body, "vfio-pci did not take 0000:01:00.1");
    assert_eq!(n.actions, [(Action::OpenDetails, "Details".to_owned())]);
}

#[test]
fn action_keys_are_what_the_notification_server_sends_back() {
    let t = Action::TerminateAndStart {
        vm: WIN.into(),
        pids: vec![1],
    };
    assert_eq!(note_key(&t), "terminate-and-start");
    assert_eq!(note_key(&Action::OpenDetails), "details");
}

#[test]
fn a_vm_starting_is_one_notification() {
    let n = transition_note(&on_host(), &in_windows()).unwrap();
    assert_eq!(
        n,
        Note::plain("Windows is running", "The GPU is on vfio-pci, in the VM.")
    );
}

#[test]
fn a_vm_started_without_the_gpu_says_so() {
    let running_on_host = machine(Owner::Host, vec![vm(WIN, VmState::Running)]);
    let n = transition_note(&on_host(), &running_on_host).unwrap();
    assert_eq!(n.body, "The GPU stayed where it was.");
}

#[test]
fn a_vm_stopping_with_the_gpu_home_is_one_notification_not_two() {
    let n = transition_note(&in_windows(), &on_host()).unwrap();
    assert_eq!(
        n,
        Note::plain("Windows stopped", "The GPU is back on Linux (nvidia).")
    );
}

#[test]
fn a_vm_stopping_with_the_gpu_still_away_says_it_is_waiting() {
    let n = transition_note(&in_windows(), &just_stopped()).unwrap();
    assert_eq!(n.summary, "Windows stopped");
    assert_eq!(n.body, "Waiting for the GPU to come back to Linux…");
}

#[test]
fn the_gpu_coming_home_on_its_own_is_announced() {
    let mut away = just_stopped();
    away.orphan_seen_for = Some(ORPHAN_GRACE);
    let away = with_record(away, "bound", None);
    // From restore required back home (after "Return GPU to Linux").
    let n = transition_note(&away, &on_host()).unwrap();
    assert_eq!(
        n,
        Note::plain(
            "GPU back on Linux",
            "The GPU is on nvidia again; CUDA can use it."
        )
    );
}

#[test]
fn a_handoff_that_fails_is_one_critical_notification_with_what_to_do() {
    let stuck = with_record(on_host(), "stuck", Some("0000:01:00.1 did not come back"));
    let n = transition_note(&in_windows(), &stuck).unwrap();
    assert_eq!(n.summary, "GPU handoff failed: restore required");
    assert!(n.critical);
    assert!(
        n.body.starts_with("0000:01:00.1 did not come back.\n"),
        "{}",
        n.body
    );
    assert!(n.body.contains("Return GPU to Linux"), "{}", n.body);
    assert!(n.body.contains("handoff rebind --force"), "{}", n.body);
    assert_eq!(n.actions, [(Action::OpenDetails, "Details".to_owned())]);
    // Said once: staying stuck is not news.
    assert_eq!(transition_note(&stuck, &stuck.clone()), None);
}

#[test]
fn changes_that_are_not_events_are_not_notified() {
    // Nothing changed.
    assert_eq!(transition_note(&on_host(), &on_host()), None);
    assert_eq!(transition_note(&in_windows(), &in_windows()), None);
    // A process started using the GPU: the icon says so, no notification.
    let busy = with_holders(on_host(), vec![holder(1, ME, "python3")]);
    assert_eq!(transition_note(&on_host(), &busy), None);
    // libvirt went away: the icon and tooltip say so.
    assert_eq!(transition_note(&on_host(), &libvirt_down(Owner::Host)), None);
}

#[test]
fn host_to_vm_and_back_through_switching_gives_one_notification_each_way() {
    let mut settled = Settled(on_host());
    let mut notes = Vec::new();
    // Start: the hook binds (switching), the VM runs with the GPU.
    let binding = with_hook(machine(Owner::Mixed, vec![vm(WIN, VmState::Running)]), "binding");
    let sequence = [binding, in_windows()];
    for s in &sequence {
        notes.extend(settled.next(s));
    }
    assert_eq!(notes.len(), 1, "{notes:#?}");
    assert_eq!(notes[0].summary, "Windows is running");
    // Stop: the GPU sits on vfio-pci until the release (within the grace), then comes home.
    let mut notes = Vec::new();
    let returning = with_hook(just_stopped(), "returning");
    for s in [just_stopped(), returning, on_host()] {
        notes.extend(settled.next(&s));
    }
    assert_eq!(
        notes,
        [Note::plain(
            "Windows stopped",
            "The GPU is back on Linux (nvidia)."
        )]
    );
}

#[test]
fn a_stop_whose_gpu_never_comes_back_ends_in_one_restore_notification() {
    let t0 = Instant::now();
    let mut settled = Settled(in_windows());
    let mut w = OrphanWatch::default();
    let mut notes = Vec::new();
    for (at, mut s) in [
        (0, just_stopped()),
        (1000, just_stopped()),
        (3000, just_stopped()),
        (5000, just_stopped()),
    ] {
        w.observe(&mut s, t0 + Duration::from_millis(at));
        notes.extend(settled.next(&s));
    }
    assert_eq!(notes.len(), 1, "{notes:#?}");
    assert_eq!(notes[0].summary, "GPU handoff failed: restore required");
    assert!(notes[0].body.contains("no VM is running"), "{}", notes[0].body);
}

/// A desktop whose GPU is in a Proxmox VE node (issue 14): the title is the verdict's
/// headline, the GPU by its label and the VM with its VMID, and the tooltip does not say
/// "No GPU" about a card that is in the node.
#[test]
fn a_pve_nodes_gpu_is_named_with_the_vm_and_its_vmid() {
    let pve = |vmid: u32, label: &str, state: VmState| {
        let mut c = VmConfig::named(&vmid.to_string(), label);
        c.vmid = Some(vmid);
        c.uri = "https://pve.lan:8006".into();
        VmStatus::new(&c, state, None)
    };
    let mut s = machine(
        Owner::Absent,
        vec![
            pve(140, "Windows 11", VmState::Running),
            pve(141, "Linux AI", VmState::Shutoff),
        ],
    );
    s.status.as_mut().unwrap().gpu.label = Some("RTX 5070 Ti".into());
    assert_eq!(s.title(None), "RTX 5070 Ti: Windows 11 (VM 140)");
    let lines = s.tooltip_lines(None);
    assert!(!lines.iter().any(|l| l.starts_with("No GPU")), "{lines:?}");
    assert_eq!(lines[0], "Windows 11 (VM 140): running", "{lines:?}");
}

#[test]
fn the_busy_alert_names_only_what_started_using_the_gpu() {
    let old = with_holders(on_host(), vec![holder(4141, ME, "firefox")]);
    let new = with_holders(
        on_host(),
        vec![holder(4141, ME, "firefox"), holder(4242, ME, "cuda-training")],
    );
    let n = busy_alert_note(&old, &new, "Windows", "is being started from the tray").unwrap();
    assert_eq!(n.summary, "GPU is now busy: cuda-training");
    assert!(
        n.body.starts_with(
            "Windows is being started from the tray, and the GPU is now in use:\ncuda-training (pid 4242"
        ),
        "{}",
        n.body
    );
    assert!(!n.body.contains("firefox"), "{}", n.body);
    assert_eq!(n.actions, [(Action::OpenDetails, "Details".to_owned())]);
    // Nothing new (or only an exit): nothing to say.
    assert_eq!(busy_alert_note(&new, &new, "Windows", "x"), None);
    assert_eq!(busy_alert_note(&new, &old, "Windows", "x"), None);
}

/// A start the PVE hookscript refused (read from the node's task list by the agent): named
/// by label and VMID as the hookscript names it, its words in the body, and — another VM
/// having the card — the switch it suggests, then Details; a libvirt VM's refusal unchanged.
#[test]
fn a_pve_refusal_is_named_with_its_vmid_and_offers_the_switch() {
    let cfg = handoff::Config::parse(
        "[gpu]\naddress = \"0000:01:00.0\"\n\n[proxmox]\nurl = \"https://pve:8006\"\ntoken = \"a@pve!b\"\n\
         token_secret_file = \"/nonexistent\"\nca_file = \"/nonexistent.pem\"\n\n\
         [[vm]]\nvmid = 141\nname = \"linux-ai\"\nlabel = \"Linux AI\"\n",
        std::path::Path::new("/test/config.toml"),
    )
    .unwrap();
    let r = handoff::refusals::Logged {
        seq: 1,
        gpu: addr(),
        vm: "linux-ai".into(),
        at: 0,
        holders: Vec::new(),
        message: "not starting Linux AI (VM 141): GPU 0000:01:00.0 is passed through to Windows 11 (VM 140), which is running.".into(),
        upid: Some("UPID:pve1:0:0:0:qmstart:141:root@pam:".into()),
    };
    let n = logged_refusal_note(&cfg, &r, ME);
    assert_eq!(n.summary, "Linux AI (VM 141) did not start: the GPU is busy");
    assert!(
        n.body.contains("passed through to Windows 11 (VM 140)"),
        "{}",
        n.body
    );
    let labels: Vec<&str> = n.actions.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(labels, ["Switch to Linux AI", "Details"]);
    assert_eq!(
        n.actions[0].0,
        Action::Switch {
            vm: "linux-ai".into()
        }
    );
    assert!(n.critical);
}
