//! Every case the tray, the bar and the details window told apart before they shared this
//! module, as one table: machine → state, headline, reason. The scenario names are the
//! surfaces' old test names where one existed.

use std::time::Duration;

use super::*;
use crate::config::VmConfig;

const GPU: PciAddress = PciAddress::new(0, 1, 0, 0);
const WIN: &str = "win11";

fn vm(name: &str, state: VmState) -> VmStatus {
    VmStatus::new(
        &VmConfig::named(name, if name == WIN { "Windows" } else { "Debian" }),
        state,
        None,
    )
}

fn unreachable_vm() -> VmStatus {
    let mut v = vm(WIN, VmState::Unknown);
    v.error = Some(
        "cannot connect to libvirt at qemu:///system: Failed to connect socket\nis libvirtd running?".into(),
    );
    v
}

/// One machine: the GPU's owner, its users, the hook's files, the VMs.
struct M {
    owner: Owner,
    users: usize,
    locked: Vec<PciAddress>,
    files: HookFiles,
    vms: Option<Vec<VmStatus>>,
    doing: Option<&'static str>,
    seen: Option<Duration>,
    unreadable: bool,
    rests_on_vfio: bool,
    uninspected: usize,
    not_checked: Vec<String>,
    label: Option<&'static str>,
}

fn m(owner: Owner, vms: Vec<VmStatus>) -> M {
    M {
        owner,
        users: 0,
        locked: Vec::new(),
        files: HookFiles::default(),
        vms: Some(vms),
        doing: None,
        seen: None,
        unreadable: false,
        rests_on_vfio: false,
        uninspected: 0,
        not_checked: Vec::new(),
        label: None,
    }
}

impl M {
    fn users(mut self, n: usize) -> M {
        self.users = n;
        self
    }
    fn hook(mut self, phase: &str, vm: Option<&str>) -> M {
        self.files = self.files.with_hook(GPU, phase, vm);
        self
    }
    fn record(mut self, phase: &str, problem: Option<&str>) -> M {
        self.files = self.files.with_record(GPU, phase, Some(WIN), problem);
        self
    }
    /// The bar: VMs not asked.
    fn not_asked(mut self) -> M {
        self.vms = None;
        self
    }
    fn doing(mut self, d: &'static str) -> M {
        self.doing = Some(d);
        self
    }
    /// The GPU's label (`[[gpu]] label`, else pci.ids' name).
    fn label(mut self, l: &'static str) -> M {
        self.label = Some(l);
        self
    }
    fn rests_on_vfio(mut self) -> M {
        self.rests_on_vfio = true;
        self
    }
    /// The holder scan could not read `n` processes' fds (another user's, as a user).
    fn uninspected(mut self, n: usize) -> M {
        self.uninspected = n;
        self
    }
    /// The holder scan says something else was not checked.
    fn not_checked(mut self, note: &str) -> M {
        self.not_checked.push(note.to_owned());
        self
    }
    fn seen(mut self, d: Duration) -> M {
        self.seen = Some(d);
        self
    }

    fn decide(&self) -> Verdict {
        let vms = self.vms.clone().unwrap_or_default();
        // The holding VM as `status::collect` works it out.
        let active: Vec<&VmStatus> = vms.iter().filter(|v| v.state.is_active()).collect();
        let holding = match (self.owner, active.as_slice()) {
            (Owner::Vfio | Owner::Mixed, [one]) if self.vms.is_some() => Some(one.name.clone()),
            _ => None,
        };
        let driver = match self.owner {
            Owner::Host => Some("nvidia"),
            Owner::Vfio | Owner::Mixed => Some("vfio-pci"),
            _ => None,
        };
        let configured = [VmConfig::named(WIN, "Windows")];
        let facts = Facts {
            gpu: if self.unreadable {
                Err("cannot read /sys/bus/pci/devices/0000:01:00.0: Permission denied")
            } else {
                Ok(GpuFacts {
                    address: GPU,
                    owner: self.owner,
                    driver,
                    split: (self.owner == Owner::Mixed).then_some("01:00.0 vfio-pci, 01:00.1 snd_hda_intel"),
                    locked: &self.locked,
                    users: self.users,
                    vm: holding.as_deref(),
                    rests_on_vfio: self.rests_on_vfio,
                    uninspected: self.uninspected,
                    not_checked: &self.not_checked,
                    label: self.label,
                })
            },
            files: &self.files,
            vms: match &self.vms {
                Some(_) => Vms::Known(&vms),
                None => Vms::NotAsked(&configured),
            },
            doing: self.doing,
            orphan_seen_for: self.seen,
        };
        decide(&facts)
    }
}

use State::*;

#[test]
fn every_machine_the_surfaces_tell_apart_has_one_verdict() {
    let on_host = || m(Owner::Host, vec![vm(WIN, VmState::Shutoff)]);
    let in_windows = || m(Owner::Vfio, vec![vm(WIN, VmState::Running)]);
    let just_stopped = || m(Owner::Vfio, vec![vm(WIN, VmState::Shutoff)]);
    let mut locked = on_host();
    locked.locked = vec![GPU];
    let mut unreadable = on_host();
    unreadable.unreadable = true;
    let cases: Vec<(&str, M, State, &str, Option<&str>)> = vec![
        // Settled.
        (
            "gpu_on_linux_with_nothing_using_it_shows_the_host_icon",
            on_host(),
            Idle,
            "GPU is on Linux (nvidia)",
            None,
        ),
        (
            "a_process_on_the_gpu_shows_the_busy_icon",
            on_host().users(1),
            Busy,
            "GPU is on Linux (nvidia)",
            None,
        ),
        (
            "a_vm_holding_the_gpu_beats_busy",
            in_windows().users(1),
            InVm,
            "GPU: Windows",
            None,
        ),
        (
            "gpu_on_vfio_with_an_unknown_vm_still_shows_the_vm_icon_when_libvirt_answers",
            m(
                Owner::Vfio,
                vec![vm(WIN, VmState::Running), vm("debian", VmState::Paused)],
            ),
            InVm,
            "GPU is in a VM",
            None,
        ),
        (
            "a_vm_running_without_the_gpu_leaves_it_on_linux",
            m(Owner::Host, vec![vm(WIN, VmState::Running)]),
            Idle,
            "GPU is on Linux (nvidia)",
            None,
        ),
        (
            "no_vms_configured_is_not_unreachable",
            m(Owner::Host, vec![]),
            Idle,
            "GPU is on Linux (nvidia)",
            None,
        ),
        // libvirt.
        (
            "libvirt_unreachable_beats_vm_and_busy_and_says_why",
            m(Owner::Vfio, vec![unreachable_vm()]).users(1),
            LibvirtUnreachable,
            "libvirt unreachable",
            Some("Failed to connect socket"),
        ),
        (
            "libvirt_unreachable_on_the_host_says_so_too",
            m(Owner::Host, vec![unreachable_vm()]),
            LibvirtUnreachable,
            "libvirt unreachable",
            Some("cannot connect"),
        ),
        (
            "libvirt_unreachable_without_an_error_text_still_says_something",
            m(Owner::Host, vec![vm(WIN, VmState::Unknown)]),
            LibvirtUnreachable,
            "libvirt unreachable",
            Some("libvirt did not answer"),
        ),
        (
            "one_vm_answering_means_libvirt_is_reachable",
            m(
                Owner::Host,
                vec![vm(WIN, VmState::Shutoff), vm("debian", VmState::Unknown)],
            ),
            Idle,
            "GPU is on Linux (nvidia)",
            None,
        ),
        (
            "a_bound_record_with_libvirt_unreachable_does_not_guess",
            m(Owner::Vfio, vec![unreachable_vm()]).record("bound", None),
            LibvirtUnreachable,
            "libvirt unreachable",
            None,
        ),
        // Switching.
        (
            "switching_beats_libvirt_unreachable",
            m(Owner::Host, vec![unreachable_vm()]).hook("binding", Some(WIN)),
            Switching,
            "GPU is moving to Windows",
            None,
        ),
        (
            "the_trays_own_action_shows_switching_and_names_it",
            in_windows().doing("stopping win11…"),
            Switching,
            "GPU: stopping win11…",
            None,
        ),
        (
            "the_trays_own_action_beats_busy",
            on_host().users(1).doing("starting win11…"),
            Switching,
            "GPU: starting win11…",
            None,
        ),
        (
            "the_hook_binding_shows_switching",
            on_host().hook("binding", Some(WIN)),
            Switching,
            "GPU is moving to Windows",
            None,
        ),
        (
            "the_hook_returning_shows_switching",
            on_host().hook("returning", Some(WIN)),
            Switching,
            "GPU is moving back to Linux",
            None,
        ),
        (
            "a_binding_record_shows_switching",
            just_stopped().record("binding", None),
            Switching,
            "GPU is moving to Windows",
            None,
        ),
        (
            "a_returning_record_shows_switching",
            just_stopped().record("returning", None),
            Switching,
            "GPU is moving back to Linux",
            None,
        ),
        (
            "functions_split_between_drivers_while_a_vm_runs_is_switching",
            m(Owner::Mixed, vec![vm(WIN, VmState::Running)]),
            Switching,
            "GPU is split between drivers",
            Some("snd_hda_intel"),
        ),
        (
            "no_driver_while_a_vm_runs_is_switching",
            m(Owner::Unbound, vec![vm(WIN, VmState::Running)]),
            Switching,
            "GPU has no driver",
            None,
        ),
        // Absent.
        (
            "no_gpu_at_the_address_is_offline_even_while_switching",
            m(Owner::Absent, vec![vm(WIN, VmState::Running)])
                .hook("binding", Some(WIN))
                .doing("starting win11…"),
            Absent,
            "No GPU at 0000:01:00.0",
            None,
        ),
        (
            "no_gpu_with_libvirt_down_is_absent",
            m(Owner::Absent, vec![vm(WIN, VmState::Unknown)]),
            Absent,
            "No GPU at 0000:01:00.0",
            None,
        ),
        // Restore required: the hook, the record, the kernel.
        (
            "restore_required_by_the_hook_beats_everything",
            in_windows()
                .users(1)
                .hook("restore-required", Some(WIN))
                .doing("stopping win11…"),
            RestoreRequired,
            "Restore required",
            Some("the last handoff did not finish"),
        ),
        (
            "restore_required_by_the_hook_beats_an_absent_gpu",
            m(Owner::Absent, vec![unreachable_vm()]).hook("restore-required", None),
            RestoreRequired,
            "Restore required",
            None,
        ),
        (
            "a_stuck_restore_record_is_restore_required_with_its_problem",
            on_host().record("stuck", Some("a write to unbind hung")),
            RestoreRequired,
            "Restore required",
            Some("a write to unbind hung"),
        ),
        (
            "a_stuck_record_without_a_problem_still_says_something",
            on_host().record("stuck", None),
            RestoreRequired,
            "Restore required",
            Some("the handoff got stuck"),
        ),
        (
            "a_locked_function_is_restore_required",
            locked,
            RestoreRequired,
            "Restore required",
            Some("0000:01:00.0 is locked in the kernel"),
        ),
        (
            "an_unreadable_sysfs_shows_the_restore_icon_and_the_error",
            unreadable,
            Unreadable,
            "GPU unreadable",
            Some("Permission denied"),
        ),
        // Orphaned: past the grace (or a one-shot reader), and within it.
        (
            "the_gpu_left_on_vfio_is_restore_required",
            just_stopped(),
            RestoreRequired,
            "Restore required",
            Some("the GPU is on vfio-pci and no VM is running"),
        ),
        (
            "the_gpu_left_on_vfio_for_3_s_is_restore_required",
            just_stopped().seen(ORPHAN_GRACE),
            RestoreRequired,
            "Restore required",
            Some("on vfio-pci"),
        ),
        (
            "a_vm_that_just_stopped_shows_switching_not_restore",
            just_stopped().seen(Duration::from_millis(2999)),
            Switching,
            "GPU is moving back to Linux",
            None,
        ),
        (
            "a_bound_record_is_a_restore_only_when_no_vm_runs_and_every_vm_answered",
            just_stopped().record("bound", None),
            RestoreRequired,
            "Restore required",
            Some("on vfio-pci"),
        ),
        (
            "a_bound_record_with_the_vm_running_is_the_vm",
            in_windows().record("bound", None),
            InVm,
            "GPU: Windows",
            None,
        ),
        (
            "leftover_record_on_the_host",
            on_host().record("bound", None),
            RestoreRequired,
            "Restore required",
            Some("a restore record is left from win11 but no VM is running"),
        ),
        (
            "leftover_no_driver",
            m(Owner::Unbound, vec![vm(WIN, VmState::Shutoff)]),
            RestoreRequired,
            "Restore required",
            Some("the GPU has no driver and no VM is running"),
        ),
        (
            "leftover_split",
            m(Owner::Mixed, vec![vm(WIN, VmState::Shutoff)]),
            RestoreRequired,
            "Restore required",
            Some(
                "the GPU is split between drivers (01:00.0 vfio-pci, 01:00.1 snd_hda_intel) and no VM is running",
            ),
        ),
        (
            "a_running_vm_is_never_an_orphan",
            in_windows().seen(ORPHAN_GRACE * 10),
            InVm,
            "GPU: Windows",
            None,
        ),
        // The bar: VMs not asked, the hook's file stands in for them.
        (
            "bar_linux",
            on_host().not_asked(),
            Idle,
            "GPU is on Linux (nvidia)",
            None,
        ),
        (
            "bar_busy",
            on_host().users(2).not_asked(),
            Busy,
            "GPU is on Linux (nvidia)",
            None,
        ),
        (
            "bar_in_the_vm_the_hook_names",
            in_windows().not_asked().hook("vfio", Some(WIN)),
            InVm,
            "GPU: Windows",
            None,
        ),
        (
            "bar_on_vfio_with_no_vm_of_the_hooks",
            in_windows().not_asked(),
            RestoreRequired,
            "Restore required",
            Some("on vfio-pci"),
        ),
        (
            "bar_switching",
            on_host().not_asked().hook("binding", None),
            Switching,
            "GPU is moving to vfio-pci",
            None,
        ),
        (
            "bar_split",
            m(Owner::Mixed, vec![]).not_asked().hook("host", None),
            RestoreRequired,
            "Restore required",
            Some("split between drivers"),
        ),
        (
            "bar_split_while_the_hook_says_vfio",
            m(Owner::Mixed, vec![]).not_asked().hook("vfio", Some(WIN)),
            RestoreRequired,
            "Restore required",
            Some("split between drivers (01:00.0"),
        ),
        (
            "a_split_while_a_vm_runs_and_the_hook_settled_is_restore_required",
            m(Owner::Mixed, vec![vm(WIN, VmState::Running)]).hook("vfio", Some(WIN)),
            RestoreRequired,
            "Restore required",
            Some("split between drivers"),
        ),
        (
            "bar_unbound",
            m(Owner::Unbound, vec![]).not_asked(),
            RestoreRequired,
            "Restore required",
            Some("no driver"),
        ),
        // Idle, but the holder scan could not look everywhere (issue 17): never "free".
        (
            "a_scan_that_could_not_inspect_every_process_is_idle_but_unseen",
            on_host().uninspected(93),
            Idle,
            "GPU is on Linux (nvidia) · ? unseen",
            Some("93 processes could not be inspected"),
        ),
        (
            "bar_unseen",
            on_host().uninspected(1).not_asked(),
            Idle,
            "GPU is on Linux (nvidia) · ? unseen",
            Some("1 process could not be inspected"),
        ),
        (
            "a_note_of_the_scan_is_unseen_too",
            on_host().not_checked("no device nodes of GPU 0000:01:00.0 were found under /dev"),
            Idle,
            "GPU is on Linux (nvidia) · ? unseen",
            Some("no device nodes"),
        ),
        (
            "a_card_resting_on_vfio_unseen_is_not_called_free",
            m(Owner::Vfio, vec![vm(WIN, VmState::Shutoff)])
                .rests_on_vfio()
                .uninspected(2),
            Idle,
            "GPU is on vfio-pci · ? unseen",
            Some("2 processes"),
        ),
        (
            "what_is_seen_using_it_beats_unseen",
            on_host().users(1).uninspected(93),
            Busy,
            "GPU is on Linux (nvidia)",
            None,
        ),
        (
            "unseen_processes_do_not_matter_while_a_vm_has_it",
            in_windows().uninspected(93),
            InVm,
            "GPU: Windows",
            None,
        ),
        (
            "bar_never_says_libvirt_unreachable",
            m(Owner::Host, vec![]).not_asked(),
            Idle,
            "GPU is on Linux (nvidia)",
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (name, machine, state, headline, reason) in cases {
        let v = machine.decide();
        let reason_ok = reason.is_none_or(|r| v.reason.as_deref().is_some_and(|got| got.contains(r)));
        // `unseen` goes with an unseen headline and nothing else.
        let unseen_ok = v.unseen == headline.ends_with("? unseen");
        if v.state != state || v.headline != headline || !reason_ok || !unseen_ok {
            failures.push(format!(
                "{name}: want {state:?} {headline:?} ({reason:?}), got {:?} {:?} ({:?}) unseen {}",
                v.state, v.headline, v.reason, v.unseen
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn restore_required_offers_only_the_return_and_says_how() {
    let v = m(Owner::Vfio, vec![vm(WIN, VmState::Shutoff)]).decide();
    assert_eq!(v.offers, [Offer::ReturnToLinux]);
    assert!(v.next.contains("pkexec handoff rebind --force"), "{}", v.next);
    assert_eq!(v.cause, Some(Cause::LeftOnVfio));
    assert_eq!(
        v.line(),
        "Restore required: the GPU is on vfio-pci and no VM is running"
    );
}

/// `status --json` keeps `state: "idle"` for scripts and adds `unseen`; the next step
/// says how to see everything, and nothing claims the GPU is free.
#[test]
fn an_unseen_idle_gpu_says_how_to_see_everything_and_serialises_as_idle_plus_unseen() {
    let v = m(Owner::Host, vec![vm(WIN, VmState::Shutoff)])
        .uninspected(93)
        .decide();
    assert_eq!(
        v.next,
        "93 processes could not be checked: `sudo handoff blockers` sees all."
    );
    assert_eq!(v.offers, [Offer::Start, Offer::Switch]);
    assert!(
        !v.line().contains("free") && !v.next.contains("can take it"),
        "{v:?}"
    );
    let j = serde_json::to_value(&v).unwrap();
    assert_eq!(j["state"], "idle");
    assert_eq!(j["unseen"], true);
    let seen = serde_json::to_value(m(Owner::Host, vec![]).decide()).unwrap();
    assert!(seen.get("unseen").is_none(), "{seen}");
    let notes = m(Owner::Host, vec![]).not_checked("x").decide();
    assert!(notes.next.contains("sudo handoff blockers"), "{}", notes.next);
}

#[test]
fn the_verdict_serialises_with_its_state_word() {
    let v = m(Owner::Vfio, vec![vm(WIN, VmState::Running)]).decide();
    let j = serde_json::to_value(&v).unwrap();
    assert_eq!(j["state"], "in_vm");
    assert_eq!(j["vm"], "win11");
    assert_eq!(j["vm_label"], "Windows");
    for s in State::ALL {
        assert_eq!(serde_json::to_value(s).unwrap(), s.word());
    }
}

#[test]
fn the_orphan_watch_times_the_grace_and_resets_when_the_gpu_comes_home() {
    let t0 = Instant::now();
    let mut w = OrphanWatch::default();
    // First sighting: one re-read scheduled, after the grace.
    assert_eq!(w.observe(true, t0), (Some(Duration::ZERO), Some(ORPHAN_GRACE)));
    assert_eq!(
        w.observe(true, t0 + Duration::from_millis(2999)),
        (Some(Duration::from_millis(2999)), None)
    );
    assert_eq!(w.observe(true, t0 + ORPHAN_GRACE), (Some(ORPHAN_GRACE), None));
    // Home: reset; a later stop starts a fresh grace.
    assert_eq!(w.observe(false, t0 + ORPHAN_GRACE), (None, None));
    let later = t0 + Duration::from_secs(60);
    assert_eq!(w.observe(true, later), (Some(Duration::ZERO), Some(ORPHAN_GRACE)));
}

#[test]
fn is_orphaned_is_only_rule_5() {
    let cases = [
        (m(Owner::Vfio, vec![vm(WIN, VmState::Shutoff)]), true),
        (m(Owner::Vfio, vec![vm(WIN, VmState::Running)]), false),
        (
            m(Owner::Host, vec![vm(WIN, VmState::Shutoff)]).record("stuck", None),
            false,
        ),
        (
            m(Owner::Vfio, vec![vm(WIN, VmState::Shutoff)]).record("returning", None),
            false,
        ),
        (
            m(Owner::Host, vec![vm(WIN, VmState::Shutoff)]).record("bound", None),
            true,
        ),
    ];
    for (i, (machine, want)) in cases.into_iter().enumerate() {
        let vms = machine.vms.clone().unwrap();
        let facts = Facts {
            gpu: Ok(GpuFacts {
                address: GPU,
                owner: machine.owner,
                driver: None,
                split: None,
                locked: &[],
                users: 0,
                vm: None,
                rests_on_vfio: false,
                uninspected: 0,
                not_checked: &[],
                label: None,
            }),
            files: &machine.files,
            vms: Vms::Known(&vms),
            doing: None,
            orphan_seen_for: Some(Duration::ZERO),
        };
        // A VM running while the GPU is on vfio-pci holds it.
        assert_eq!(is_orphaned(&facts), want, "case {i}");
    }
}

/// A Proxmox VE VM as a desktop sees it: at the node's API.
fn pve_vm(vmid: u32, label: &str, state: VmState) -> VmStatus {
    let mut c = VmConfig::named(&vmid.to_string(), label);
    c.vmid = Some(vmid);
    c.uri = "https://pve.lan:8006".into();
    VmStatus::new(&c, state, None)
}

#[test]
fn a_card_that_rests_on_vfio_pci_is_free_there_not_orphaned_and_in_a_vm_while_one_runs() {
    let free = m(Owner::Vfio, vec![vm(WIN, VmState::Shutoff)])
        .rests_on_vfio()
        .decide();
    assert_eq!(free.state, State::Idle, "{free:?}");
    assert_eq!(free.headline, "GPU: free on vfio-pci");
    let busy = m(Owner::Vfio, vec![vm(WIN, VmState::Running)])
        .rests_on_vfio()
        .decide();
    assert_eq!(busy.state, State::InVm, "{busy:?}");
    assert_eq!(busy.headline, "GPU: Windows");
    // Without the setting, the same card is left behind.
    let left = m(Owner::Vfio, vec![vm(WIN, VmState::Shutoff)]).decide();
    assert_eq!(left.state, State::RestoreRequired, "{left:?}");
}

#[test]
fn from_a_desktop_the_gpu_of_a_proxmox_node_is_with_the_running_vm() {
    let with = m(
        Owner::Absent,
        vec![
            pve_vm(140, "Windows 11", VmState::Running),
            pve_vm(141, "Linux AI", VmState::Shutoff),
        ],
    )
    .decide();
    assert_eq!(with.state, State::InVm, "{with:?}");
    assert_eq!(with.headline, "GPU: Windows 11 (VM 140)");
    assert_eq!(with.vmid, Some(140));
    assert_eq!(with.vm.as_deref(), Some("140"));
    assert!(!with.offers.contains(&Offer::OpenLookingGlass), "{with:?}");

    let free = m(
        Owner::Absent,
        vec![
            pve_vm(140, "Windows 11", VmState::Shutoff),
            pve_vm(141, "Linux AI", VmState::Shutoff),
        ],
    )
    .decide();
    assert_eq!(free.state, State::Idle, "{free:?}");
    assert_eq!(free.headline, "GPU 0000:01:00.0: free on the Proxmox VE node");

    let mut gone = pve_vm(140, "Windows 11", VmState::Unknown);
    gone.error = Some("cannot reach Proxmox VE at https://pve.lan:8006".into());
    let v = m(Owner::Absent, vec![gone]).decide();
    assert_eq!(
        (v.state, v.headline.as_str()),
        (State::LibvirtUnreachable, "Proxmox VE unreachable")
    );

    // A libvirt VM on this machine keeps the plain "No GPU" answer.
    assert_eq!(
        m(Owner::Absent, vec![vm(WIN, VmState::Running)]).decide().state,
        State::Absent
    );
}

/// Issue 14's headline: the GPU by its label, the VM by its label and VMID, whether the
/// VMs were asked (the desktop's view of the node) or not (the bar on the node, from the
/// hookscript's state file).
#[test]
fn a_pve_vm_with_the_gpu_is_named_with_the_gpus_label_and_its_vmid() {
    let asked = m(
        Owner::Absent,
        vec![
            pve_vm(140, "Windows 11", VmState::Running),
            pve_vm(141, "Linux AI", VmState::Shutoff),
        ],
    )
    .label("RTX 5070 Ti")
    .decide();
    assert_eq!(asked.headline, "RTX 5070 Ti: Windows 11 (VM 140)");
    assert_eq!(asked.gpu_label, "RTX 5070 Ti");

    let mut ai = VmConfig::named("linux-ai", "Linux AI");
    ai.vmid = Some(141);
    let configured = [ai];
    let files = HookFiles::default().with_hook(GPU, "vfio", Some("linux-ai"));
    let facts = |files| Facts {
        gpu: Ok(GpuFacts {
            address: GPU,
            owner: Owner::Vfio,
            driver: Some("vfio-pci"),
            split: None,
            locked: &[],
            users: 0,
            vm: None,
            rests_on_vfio: true,
            uninspected: 0,
            not_checked: &[],
            label: Some("RTX 5070 Ti"),
        }),
        files,
        vms: Vms::NotAsked(&configured),
        doing: None,
        orphan_seen_for: None,
    };
    let on_node = decide(&facts(&files));
    assert_eq!(
        (on_node.state, on_node.headline.as_str(), on_node.vmid),
        (State::InVm, "RTX 5070 Ti: Linux AI (VM 141)", Some(141))
    );
    let home = HookFiles::default().with_hook(GPU, "host", None);
    let free = decide(&facts(&home));
    assert_eq!(
        (free.state, free.headline.as_str()),
        (State::Idle, "RTX 5070 Ti: free on vfio-pci")
    );
}

/// On the node itself (the card is here) with the API not answering: PVE's words, not
/// libvirt's.
#[test]
fn on_the_node_an_api_that_does_not_answer_is_proxmox_ve_unreachable() {
    let mut gone = pve_vm(140, "Windows 11", VmState::Unknown);
    gone.error = Some("cannot reach Proxmox VE at https://pve.lan:8006".into());
    let v = m(Owner::Vfio, vec![gone]).rests_on_vfio().decide();
    assert_eq!(
        (v.state, v.headline.as_str()),
        (State::LibvirtUnreachable, "Proxmox VE unreachable")
    );
    assert!(v.next.contains("[proxmox]"), "{v:?}");
    assert_eq!(
        m(Owner::Host, vec![unreachable_vm()]).decide().headline,
        "libvirt unreachable"
    );
}
