//! The menu as the panel gets it, rendered from snapshots in each state: which items
//! exist, what they say, which are enabled, and what a click sends to the main loop (and
//! whether it marks the tray busy). Snapshots come from values (`crate::model::tests`)
//! and, where that is cheap, from a real read (`crate::collect`): a simulated GPU
//! (`SimHost`), libvirt's test driver and real processes holding its device nodes.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use handoff::PciAddress;
use handoff::config::VmConfig;
use handoff::gpu::Owner;
use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff::status::{VmState, VmStatus};
use handoff::verdict::HookFiles;
use handoff_libvirt::libvirt::Prober;
use ksni::Tray;
use ksni::menu::MenuItem;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::HandoffTray;
use crate::Msg;
use crate::model::tests::{
    LIN, ME, SOMEONE_ELSE, WIN, addr, holder, in_windows, machine, on_host, vm, with_holders, with_hook,
    with_record,
};
use crate::model::{Action, ORPHAN_GRACE, OtherGpu, Snapshot, UnitScope};

const SEP: &str = "—";

fn tray(snap: Snapshot) -> (HandoffTray, UnboundedReceiver<Msg>) {
    let (tx, rx) = unbounded_channel();
    let t = HandoffTray {
        snap,
        action: None,
        last_event: None,
        tx,
        said_offline: Arc::new(AtomicBool::new(false)),
    };
    (t, rx)
}

/// One rendered entry: its parents' labels, its own (as shown: `__` is one `_`), whether
/// it can be clicked, and whether it opens a submenu.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    parents: Vec<String>,
    label: String,
    enabled: bool,
    submenu: bool,
}

fn shown(label: &str) -> String {
    label.replace("__", "_")
}

fn flatten(items: &[MenuItem<HandoffTray>], parents: &mut Vec<String>, out: &mut Vec<Entry>) {
    for item in items {
        match item {
            MenuItem::Standard(s) => out.push(Entry {
                parents: parents.clone(),
                label: shown(&s.label),
                enabled: s.enabled,
                submenu: false,
            }),
            MenuItem::SubMenu(s) => {
                out.push(Entry {
                    parents: parents.clone(),
                    label: shown(&s.label),
                    enabled: s.enabled,
                    submenu: true,
                });
                parents.push(shown(&s.label));
                flatten(&s.submenu, parents, out);
                parents.pop();
            }
            MenuItem::Separator => out.push(Entry {
                parents: parents.clone(),
                label: SEP.into(),
                enabled: false,
                submenu: false,
            }),
            other => panic!("the tray renders no {other:?}"),
        }
    }
}

fn entries(t: &HandoffTray) -> Vec<Entry> {
    let mut out = Vec::new();
    flatten(&t.menu(), &mut Vec::new(), &mut out);
    out
}

/// The top level's labels, in order (separators as `—`).
fn top(t: &HandoffTray) -> Vec<String> {
    entries(t)
        .into_iter()
        .filter(|e| e.parents.is_empty())
        .map(|e| e.label)
        .collect()
}

fn entry(t: &HandoffTray, label: &str) -> Entry {
    let all = entries(t);
    all.iter()
        .find(|e| e.label == label)
        .unwrap_or_else(|| panic!("no {label:?} in {all:#?}"))
        .clone()
}

fn has(t: &HandoffTray, prefix: &str) -> bool {
    entries(t).iter().any(|e| e.label.starts_with(prefix))
}

/// The entries under the submenu labelled `parent` (directly), as `(label, enabled)`.
fn under(t: &HandoffTray, parent: &str) -> Vec<(String, bool)> {
    entries(t)
        .into_iter()
        .filter(|e| e.parents.last().map(String::as_str) == Some(parent))
        .map(|e| (e.label, e.enabled))
        .collect()
}

fn find_standard<'a>(
    items: &'a [MenuItem<HandoffTray>],
    label: &str,
) -> Option<&'a ksni::menu::StandardItem<HandoffTray>> {
    items.iter().find_map(|i| match i {
        MenuItem::Standard(s) if shown(&s.label) == label => Some(s),
        MenuItem::SubMenu(s) => find_standard(&s.submenu, label),
        _ => None,
    })
}

/// Clicks the item labelled `label` the way ksni does on a panel's `Event(id, "clicked")`.
fn click(t: &mut HandoffTray, label: &str) {
    let menu = t.menu();
    let item =
        find_standard(&menu, label).unwrap_or_else(|| panic!("no item {label:?} in {:#?}", entries(t)));
    (item.activate)(t);
}

/// The one message a click sent.
fn sent(rx: &mut UnboundedReceiver<Msg>) -> Action {
    let a = match rx.try_recv() {
        Ok(Msg::Action(a)) => a,
        Ok(_) => panic!("a click sent something other than an action"),
        Err(e) => panic!("a click sent nothing: {e}"),
    };
    assert!(rx.try_recv().is_err(), "a click sent more than one message");
    a
}

// ---------------------------------------------------------------------------------------
// The items, per state

#[test]
fn on_linux_the_menu_offers_start_and_the_details_and_nothing_that_needs_a_vm() {
    let (t, _rx) = tray(on_host());
    assert_eq!(
        top(&t),
        [
            "GPU on Linux (nvidia)",
            SEP,
            "Start Windows",
            SEP,
            "Open Looking Glass",
            SEP,
            "Details…",
            "Quit"
        ]
    );
    let status = &entries(&t)[0];
    assert!(!status.enabled, "the status line is not a button");
    assert!(entry(&t, "Start Windows").enabled);
    assert!(
        !entry(&t, "Open Looking Glass").enabled,
        "no VM has the GPU: nothing to look at"
    );
    assert!(entry(&t, "Details…").enabled && entry(&t, "Quit").enabled);
    assert!(!has(&t, "Switch to") && !has(&t, "Return GPU") && !has(&t, "Using the GPU"));
}

#[test]
fn with_windows_running_stop_force_stop_behind_a_question_and_looking_glass() {
    let (mut t, mut rx) = tray(in_windows());
    assert_eq!(
        top(&t),
        [
            "GPU: Windows",
            SEP,
            "Stop Windows",
            "Force stop Windows…",
            SEP,
            "Open Looking Glass",
            SEP,
            "Details…",
            "Quit"
        ]
    );
    assert!(entry(&t, "Open Looking Glass").enabled);
    let force = entry(&t, "Force stop Windows…");
    assert!(force.submenu && force.enabled, "{force:?}");
    assert_eq!(
        under(&t, "Force stop Windows…"),
        [(
            "Really force Windows (win11) off? (unsaved work in it is lost)".to_owned(),
            true
        )],
        "the only way to force is the question's answer"
    );

    click(&mut t, "Stop Windows");
    assert_eq!(sent(&mut rx), Action::Stop { vm: WIN.into() });
    assert_eq!(t.action.as_deref(), Some("stopping win11…"));

    let (mut t, mut rx) = tray(in_windows());
    click(
        &mut t,
        "Really force Windows (win11) off? (unsaved work in it is lost)",
    );
    assert_eq!(sent(&mut rx), Action::ForceStop { vm: WIN.into() });
    assert_eq!(t.action.as_deref(), Some("forcing win11 off…"));
    assert_eq!(entries(&t)[0].label, "GPU: forcing win11 off…");
}

#[test]
fn two_vms_sharing_the_gpu_offer_switch_to_the_other_one() {
    let both = || {
        machine(
            Owner::Vfio,
            vec![vm(WIN, VmState::Running), vm(LIN, VmState::Shutoff)],
        )
    };
    let (mut t, mut rx) = tray(both());
    assert_eq!(
        top(&t)[2..6],
        ["Stop Windows", "Force stop Windows…", "Switch to Debian", SEP]
    );
    assert!(entry(&t, "Switch to Debian").enabled);
    assert!(!has(&t, "Start "), "starting the other VM means switching");
    click(&mut t, "Switch to Debian");
    assert_eq!(sent(&mut rx), Action::Switch { vm: LIN.into() });
    assert_eq!(t.action.as_deref(), Some("switching to debian…"));

    // Nothing running: each VM is started, nobody is switched to.
    let (t, _rx) = tray(machine(
        Owner::Host,
        vec![vm(WIN, VmState::Shutoff), vm(LIN, VmState::Shutoff)],
    ));
    assert_eq!(top(&t)[2..5], ["Start Windows", "Start Debian", SEP]);
    assert!(!has(&t, "Switch to"));
    // One VM only: there is no other to switch to.
    let (t, _rx) = tray(in_windows());
    assert!(!has(&t, "Switch to"));
}

/// Several GPUs (issue 15): "Switch to" only for a VM that takes a GPU a running VM has;
/// a VM on the other GPU is started beside it. Which GPUs each takes is its definition's
/// (the agent's `passthrough`); a VM whose definition was not read is switched to, as before.
#[test]
fn with_two_gpus_only_a_vm_sharing_a_gpu_with_a_running_one_is_switched_to() {
    let igpu: PciAddress = "0000:00:02.0".parse().unwrap();
    let with = |mut v: VmStatus, passed: Option<Vec<PciAddress>>| {
        v.passthrough = passed;
        v
    };
    let ai = VmStatus::new(&VmConfig::named("ai", "Linux AI"), VmState::Shutoff, None);
    let two_gpus = |debian_passes: Option<Vec<PciAddress>>| {
        let mut s = machine(
            Owner::Vfio,
            vec![
                with(
                    vm(WIN, VmState::Running),
                    Some(vec![addr(), addr().with_function(1)]),
                ),
                with(vm(LIN, VmState::Shutoff), debian_passes),
                // The RTX's audio function alone still takes the RTX.
                with(ai.clone(), Some(vec![addr().with_function(1)])),
            ],
        );
        let mut other = s.status.clone().unwrap();
        other.gpu.address = igpu;
        other.gpu.owner = Owner::Host;
        other.gpu.vm = None;
        s.others.push(OtherGpu {
            address: igpu,
            label: Some("UHD 630".into()),
            status: Ok(other),
            files: HookFiles::default(),
            orphan_seen_for: Some(std::time::Duration::ZERO),
        });
        s
    };
    let (mut t, mut rx) = tray(two_gpus(Some(vec![igpu])));
    assert_eq!(
        top(&t)[2..6],
        [
            "Stop Windows",
            "Force stop Windows…",
            "Start Debian",
            "Switch to Linux AI"
        ],
        "{:#?}",
        top(&t)
    );
    click(&mut t, "Start Debian");
    assert_eq!(sent(&mut rx), Action::Start { vm: LIN.into() });

    // Debian's definition passes nothing configured: it takes the primary, the RTX.
    let (t, _rx) = tray(two_gpus(Some(Vec::new())));
    assert!(has(&t, "Switch to Debian") && !has(&t, "Start Debian"));
    // Its definition could not be read: switched to, as with one GPU.
    let (t, _rx) = tray(two_gpus(None));
    assert!(has(&t, "Switch to Debian") && !has(&t, "Start Debian"));
}

#[test]
fn a_vm_libvirt_cannot_tell_about_is_neither_started_nor_switched_to() {
    for state in [VmState::Unknown, VmState::Undefined] {
        let (t, _rx) = tray(machine(Owner::Host, vec![vm(WIN, state)]));
        assert!(!entry(&t, "Start Windows").enabled, "{state:?}");
        let (t, _rx) = tray(machine(
            Owner::Vfio,
            vec![vm(WIN, VmState::Running), vm(LIN, state)],
        ));
        assert!(!entry(&t, "Switch to Debian").enabled, "{state:?}");
        assert!(entry(&t, "Stop Windows").enabled, "{state:?}");
    }
}

#[test]
fn a_paused_vm_is_stopped_not_started() {
    let (t, _rx) = tray(machine(Owner::Vfio, vec![vm(WIN, VmState::Paused)]));
    assert!(entry(&t, "Stop Windows").enabled);
    assert!(has(&t, "Force stop Windows…") && !has(&t, "Start Windows"));
}

#[test]
fn while_an_action_runs_only_details_and_quit_can_be_clicked() {
    let mut s = with_holders(
        machine(
            Owner::Vfio,
            vec![vm(WIN, VmState::Running), vm(LIN, VmState::Shutoff)],
        ),
        vec![holder(4242, ME, "python3")],
    );
    s.units.insert(4242, UnitScope::User);
    s.status.as_mut().unwrap().gpu.blockers[0].unit = Some("cuda.service".into());
    let s = with_record(s, "stuck", Some("0000:01:00.1 did not come back"));
    let (mut t, _rx) = tray(s);
    let idle = entries(&t);
    t.action = Some("stopping win11…".into());
    let busy = entries(&t);
    assert_eq!(busy[0].label, "GPU: stopping win11…");
    assert_eq!(
        idle.iter().map(|e| &e.label).skip(1).collect::<Vec<_>>(),
        busy.iter().map(|e| &e.label).skip(1).collect::<Vec<_>>(),
        "the same items, only disabled"
    );
    for e in &busy {
        let clickable = e.enabled && e.label != SEP;
        let expected = match e.label.as_str() {
            "Details…" | "Quit" => true,
            // Only containers: what they contain is disabled.
            "Using the GPU (1)" | "python3 (pid 4242, alice, cuda.service)" => true,
            _ => false,
        };
        assert_eq!(clickable, expected, "{e:?} while busy");
    }
    for l in [
        "Stop Windows",
        "Switch to Debian",
        "Open Looking Glass",
        "Return GPU to Linux",
        "Really force Windows (win11) off? (unsaved work in it is lost)",
        "Really terminate python3 (pid 4242)? (SIGTERM)",
        "Really stop cuda.service? (systemctl --user stop)",
    ] {
        assert!(idle.iter().any(|e| e.label == l && e.enabled), "{l:?} idle");
    }
}

// ---------------------------------------------------------------------------------------
// "Using the GPU"

#[test]
fn holders_get_terminate_when_mine_stop_unit_for_services_and_nothing_for_others() {
    let mut mine = holder(4242, ME, "python3");
    mine.command = "cuda_job".into();
    let others = holder(4343, SOMEONE_ELSE, "python3");
    let mut my_service = holder(4444, ME, "ollama");
    my_service.unit = Some("ollama.service".into());
    let mut system_service = holder(4545, SOMEONE_ELSE, "nvidia-persistenced");
    system_service.unit = Some("nvidia-persistenced.service".into());
    // A login session's scope: stopping it would end everything in it, so it is not offered.
    let mut in_a_scope = holder(4646, SOMEONE_ELSE, "Xorg");
    in_a_scope.unit = Some("session-2.scope".into());
    let mut s = with_holders(
        on_host(),
        vec![mine, others, my_service, system_service, in_a_scope],
    );
    s.units = HashMap::from([(4444, UnitScope::User), (4545, UnitScope::System)]);
    let (mut t, mut rx) = tray(s);

    let gpu = "Using the GPU (5)";
    assert!(entry(&t, gpu).submenu);
    assert_eq!(
        under(&t, gpu).into_iter().map(|(l, _)| l).collect::<Vec<_>>(),
        [
            "cuda_job (pid 4242, alice)",
            "python3 (pid 4343, bob)",
            "ollama (pid 4444, alice, ollama.service)",
            "nvidia-persistenced (pid 4545, bob, nvidia-persistenced.service)",
            "Xorg (pid 4646, bob, session-2.scope)",
        ]
    );
    assert_eq!(
        under(&t, "cuda_job (pid 4242, alice)"),
        [("Terminate…".to_owned(), true)]
    );
    assert_eq!(
        under(&t, "python3 (pid 4343, bob)"),
        [("not yours (bob): ask its owner or root".to_owned(), false)]
    );
    assert_eq!(
        under(&t, "ollama (pid 4444, alice, ollama.service)"),
        [
            ("Terminate…".to_owned(), true),
            ("Stop ollama.service…".to_owned(), true)
        ]
    );
    assert_eq!(
        under(&t, "Stop ollama.service…"),
        [(
            "Really stop ollama.service? (systemctl --user stop)".to_owned(),
            true
        )]
    );
    assert_eq!(
        under(
            &t,
            "nvidia-persistenced (pid 4545, bob, nvidia-persistenced.service)"
        ),
        [("Stop nvidia-persistenced.service…".to_owned(), true)],
        "a system service is stopped through systemctl (polkit asks), never killed"
    );
    assert_eq!(
        under(&t, "Stop nvidia-persistenced.service…"),
        [(
            "Really stop nvidia-persistenced.service? (systemctl stop, asks for a password)".to_owned(),
            true
        )]
    );
    assert_eq!(
        under(&t, "Xorg (pid 4646, bob, session-2.scope)"),
        [("not yours (bob): ask its owner or root".to_owned(), false)]
    );
    // Every "Terminate…" asks first, naming the process.
    let terminate: Vec<Entry> = entries(&t)
        .into_iter()
        .filter(|e| e.parents.last().map(String::as_str) == Some("Terminate…"))
        .collect();
    assert_eq!(
        terminate.iter().map(|e| e.label.as_str()).collect::<Vec<_>>(),
        [
            "Really terminate cuda_job (pid 4242)? (SIGTERM)",
            "Really terminate ollama (pid 4444)? (SIGTERM)"
        ]
    );

    click(&mut t, "Really terminate cuda_job (pid 4242)? (SIGTERM)");
    assert_eq!(
        sent(&mut rx),
        Action::Terminate {
            pid: 4242,
            command: "cuda_job".into()
        }
    );
    assert_eq!(t.action.as_deref(), Some("terminating cuda_job (pid 4242)…"));
    t.action = None;
    click(&mut t, "Really stop ollama.service? (systemctl --user stop)");
    assert_eq!(
        sent(&mut rx),
        Action::StopUnit {
            unit: "ollama.service".into(),
            pid: 4444
        }
    );
    t.action = None;
    click(
        &mut t,
        "Really stop nvidia-persistenced.service? (systemctl stop, asks for a password)",
    );
    assert_eq!(
        sent(&mut rx),
        Action::StopUnit {
            unit: "nvidia-persistenced.service".into(),
            pid: 4545
        }
    );
}

/// A holder in a Docker container (issue 16): its unit is the engine's scope, so the menu
/// offers the engine's own stop, by the container's name, and never `systemctl stop`.
#[test]
fn a_holder_in_a_container_is_stopped_as_the_container() {
    let id = "4f1c9a3be2d07c6e8b5a1f0d93c2e7b6a4d8f1e0c3b5a7d9e2f4a6c8b0d1e3f5";
    let mut h = holder(4747, SOMEONE_ELSE, "jellyfin");
    h.unit = Some(format!("docker-{id}.scope"));
    h.container = handoff::containers::parse_cgroup(&format!("0::/system.slice/docker-{id}.scope\n"));
    h.container.as_mut().expect("a container").name = Some("jellyfin".into());
    let mut s = with_holders(on_host(), vec![h]);
    // Even were its scope taken for a stoppable unit, the container decides.
    s.units.insert(4747, UnitScope::System);
    let (mut t, mut rx) = tray(s);
    let row = "jellyfin (pid 4747, bob, docker container jellyfin)";
    assert_eq!(under(&t, row), [("Stop container jellyfin…".to_owned(), true)]);
    click(
        &mut t,
        "Really stop the docker container jellyfin? (docker stop jellyfin)",
    );
    match sent(&mut rx) {
        Action::StopContainer { container } => {
            assert_eq!(container.stop_argv(), ["docker", "stop", "jellyfin"])
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.action.as_deref(), Some("stopping container jellyfin…"));
}

// ---------------------------------------------------------------------------------------
// "Return GPU to Linux"

#[test]
fn return_gpu_to_linux_is_offered_only_when_a_restore_is_required() {
    let (t, _rx) = tray(on_host());
    assert!(!has(&t, "Return GPU to Linux"));
    // Right after a VM stopped the GPU sits on vfio-pci for a moment: not yet.
    let just_stopped = machine(Owner::Vfio, vec![vm(WIN, VmState::Shutoff)]);
    let (t, _rx) = tray(just_stopped.clone());
    assert!(!has(&t, "Return GPU to Linux"));
    let mut stayed = just_stopped;
    stayed.orphan_seen_for = Some(ORPHAN_GRACE);
    let (t, _rx) = tray(stayed);
    assert!(entry(&t, "Return GPU to Linux").enabled);

    let (t, _rx) = tray(with_hook(on_host(), "restore-required"));
    assert!(entry(&t, "Return GPU to Linux").enabled);
    // While the hook is moving the GPU nothing needs returning.
    let (t, _rx) = tray(with_hook(on_host(), "binding"));
    assert!(!has(&t, "Return GPU to Linux"));

    let (mut t, mut rx) = tray(with_record(
        on_host(),
        "stuck",
        Some("0000:01:00.1 did not come back to snd_hda_intel"),
    ));
    assert_eq!(
        top(&t),
        [
            "GPU: restore required (0000:01:00.1 did not come back to snd_hda_intel)",
            SEP,
            "Start Windows",
            SEP,
            "Open Looking Glass",
            "Return GPU to Linux",
            SEP,
            "Details…",
            "Quit"
        ]
    );
    click(&mut t, "Return GPU to Linux");
    assert!(matches!(sent(&mut rx), Action::ReturnToLinux { .. }));
    assert_eq!(t.action.as_deref(), Some("returning the GPU to Linux…"));
}

// ---------------------------------------------------------------------------------------
// Clicks that change nothing on the machine

#[test]
fn left_click_opens_looking_glass_when_a_vm_has_the_gpu_and_the_details_otherwise() {
    let (mut t, mut rx) = tray(in_windows());
    t.activate(10, 10);
    assert_eq!(sent(&mut rx), Action::OpenLookingGlass);
    assert_eq!(t.action, None, "opening a window does not make the tray busy");

    for s in [
        on_host(),
        with_holders(on_host(), vec![holder(4242, ME, "python3")]),
        with_record(on_host(), "stuck", None),
    ] {
        let (mut t, mut rx) = tray(s);
        t.activate(10, 10);
        assert_eq!(sent(&mut rx), Action::OpenDetails);
        assert_eq!(t.action, None);
    }
}

#[test]
fn details_open_looking_glass_and_quit_send_what_they_say() {
    let (mut t, mut rx) = tray(in_windows());
    click(&mut t, "Open Looking Glass");
    assert_eq!(sent(&mut rx), Action::OpenLookingGlass);
    click(&mut t, "Details…");
    assert_eq!(sent(&mut rx), Action::OpenDetails);
    assert_eq!(t.action, None);
    click(&mut t, "Quit");
    assert!(matches!(rx.try_recv(), Ok(Msg::Quit)));
}

#[test]
fn underscores_in_names_are_shown_not_taken_for_mnemonics() {
    let mut s = machine(
        Owner::Host,
        vec![handoff::status::VmStatus::new(
            &handoff::config::VmConfig::named("win_11", "Win_11"),
            VmState::Shutoff,
            None,
        )],
    );
    s.status.as_mut().unwrap().gpu.blockers = vec![holder(4242, ME, "cuda_job")];
    let (t, _rx) = tray(s);
    let raw: Vec<String> = t
        .menu()
        .iter()
        .filter_map(|i| match i {
            MenuItem::Standard(s) => Some(s.label.clone()),
            _ => None,
        })
        .collect();
    assert!(raw.contains(&"Start Win__11".to_owned()), "{raw:?}");
    assert!(has(&t, "Start Win_11"));
    assert!(entry(&t, "cuda_job (pid 4242, alice)").submenu);
}

// ---------------------------------------------------------------------------------------
// From a real read: a simulated GPU, libvirt's test driver, real processes on its nodes

/// A child in its own process group, killed (group and all) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling the process group made for this child.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// `sleep 600` with `node` open on stdin (a CUDA job, as far as the scan can tell), as
/// `uid` when given (root only).
fn hold(node: &std::path::Path, uid: Option<u32>) -> Proc {
    let mut c = Command::new("sleep");
    c.arg("600")
        .stdin(fs::File::open(node).unwrap())
        .stdout(Stdio::null())
        .process_group(0);
    if let Some(uid) = uid {
        c.uid(uid).gid(uid);
    }
    Proc(c.spawn().unwrap())
}

/// A config for the simulated host with VMs `win11` (Windows) and `ai` (AI) in a libvirt
/// test-driver file, `win11` in `win_state` (libvirt's runstate number).
fn config(tmp: &std::path::Path, sim: &SimHost, win_runstate: u32) -> handoff::Config {
    let mut xml = String::from("<node>\n");
    for (name, runstate) in [("win11", win_runstate), ("ai", 5)] {
        xml += &format!(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
             <name>{name}</name><memory>32768</memory><vcpu>1</vcpu><os><type>hvm</type></os>\
             <test:runstate>{runstate}</test:runstate></domain>\n"
        );
    }
    xml += "</node>\n";
    let driver = tmp.join("libvirt-test.xml");
    fs::write(&driver, xml).unwrap();
    let uri = format!("test://{}", driver.display());
    let text = format!(
        "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n\
         [host]\nsysfs = \"{}\"\ndev = \"{}\"\nrun = \"{}\"\n\n\
         [[vm]]\nname = \"win11\"\nlabel = \"Windows\"\nuri = \"{uri}\"\n\n\
         [[vm]]\nname = \"ai\"\nlabel = \"AI\"\nuri = \"{uri}\"\n",
        sim.sysfs().display(),
        sim.dev().display(),
        sim.run().display(),
    );
    handoff::Config::parse(&text, std::path::Path::new("test.toml")).unwrap()
}

#[test]
fn a_real_read_with_my_process_and_someone_elses_on_the_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(&tmp.path().join("root"), &SimSpec::workstation()).unwrap();
    let cfg = config(tmp.path(), &sim, 5);
    // SAFETY: getuid cannot fail.
    let root = unsafe { libc::getuid() } == 0;
    let mine = hold(&sim.dev().join("nvidia0"), None);
    let theirs = root.then(|| hold(&sim.dev().join("nvidiactl"), Some(65534)));
    if !root {
        eprintln!("not root: someone else's process is left out (it needs setuid)");
    }

    let mut p = Prober::new();
    let snap = crate::collect(&cfg, &mut || cfg.vms.iter().map(|v| p.probe(v)).collect());
    let (mut t, mut rx) = tray(snap);
    assert_eq!(entries(&t)[0].label, "GPU on Linux (nvidia)");
    assert!(entry(&t, "Start Windows").enabled && entry(&t, "Start AI").enabled);
    assert!(!has(&t, "Switch to") && !has(&t, "Return GPU"));
    let n = if root { 2 } else { 1 };
    let gpu = format!("Using the GPU ({n})");
    let rows: Vec<String> = under(&t, &gpu).into_iter().map(|(l, _)| l).collect();
    let my_row = rows
        .iter()
        .find(|r| r.starts_with(&format!("sleep (pid {}, ", mine.0.id())))
        .unwrap_or_else(|| panic!("{rows:#?}"))
        .clone();
    assert_eq!(under(&t, &my_row), [("Terminate…".to_owned(), true)]);
    if let Some(theirs) = &theirs {
        let their_row = format!("sleep (pid {}, nobody)", theirs.0.id());
        assert!(rows.contains(&their_row), "{rows:#?}");
        assert_eq!(
            under(&t, &their_row),
            [("not yours (nobody): ask its owner or root".to_owned(), false)]
        );
    }
    click(
        &mut t,
        &format!("Really terminate sleep (pid {})? (SIGTERM)", mine.0.id()),
    );
    assert_eq!(
        sent(&mut rx),
        Action::Terminate {
            pid: mine.0.id(),
            command: "sleep".into()
        }
    );
}

#[test]
fn a_real_read_with_one_of_two_vms_running_on_the_gpu_offers_switching() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(&tmp.path().join("root"), &SimSpec::workstation()).unwrap();
    for n in 0..4 {
        sim.set_driver(RTX_3090_TI.with_function(n), Some("vfio-pci"))
            .unwrap();
    }
    let cfg = config(tmp.path(), &sim, 1);
    let mut p = Prober::new();
    let snap = crate::collect(&cfg, &mut || cfg.vms.iter().map(|v| p.probe(v)).collect());
    let (mut t, mut rx) = tray(snap);
    assert_eq!(
        top(&t),
        [
            "RTX 3090 Ti: Windows",
            SEP,
            "Stop Windows",
            "Force stop Windows…",
            "Switch to AI",
            SEP,
            "Open Looking Glass",
            SEP,
            "Details…",
            "Quit"
        ]
    );
    assert!(entry(&t, "Switch to AI").enabled && entry(&t, "Open Looking Glass").enabled);
    t.activate(0, 0);
    assert_eq!(sent(&mut rx), Action::OpenLookingGlass);
}

// ---------------------------------------------------------------------------------------
// Every surface, one verdict (issue 12): the machine put in each state, read by the real
// `handoff status --json` and `handoff-block` binaries and by the tray's own read path.

/// The workspace's binaries next to this test's (`target/debug`), built first: this crate's
/// test run builds neither.
fn workspace_bins() -> std::path::PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let st = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "handoff",
            "--bin",
            "handoff",
            "-p",
            "handoff-block",
            "--bin",
            "handoff-block",
            // `handoff status` asks libvirt through it.
            "-p",
            "handoff-libvirt",
            "--bin",
            "handoff-vm",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("cargo build");
    assert!(
        st.success(),
        "building handoff, handoff-block and handoff-vm failed"
    );
    dir
}

/// What each scene must show: (state word in `status --json`, tray icon, the block's text,
/// the block's waybar class). The block links no libvirt: "libvirt unreachable" it cannot
/// know, and it says what sysfs and the hook's files say instead.
fn scene_wants(name: &str) -> (&'static str, &'static str, &'static str, &'static str) {
    match name {
        "idle" => ("idle", "handoff-host", "GPU: Linux", "linux"),
        // As a normal user sees it: idle, but not called free anywhere (issue 17).
        "idle, unseen" => ("idle", "handoff-offline", "GPU: Linux · ? unseen", "unseen"),
        "busy" => ("busy", "handoff-busy", "GPU: Linux · 1 busy", "busy"),
        "in a VM" => ("in_vm", "handoff-vm", "GPU: Windows", "vm"),
        "switching" => ("switching", "handoff-switching", "GPU: switching…", "switching"),
        "left on vfio-pci" | "stuck record" => {
            ("restore_required", "handoff-restore", "GPU: restore!", "restore")
        }
        "split binding" => ("restore_required", "handoff-restore", "GPU: split!", "restore"),
        "absent" => ("absent", "handoff-offline", "GPU: none", "absent"),
        "libvirt unreachable" => ("libvirt_unreachable", "handoff-offline", "GPU: Linux", "linux"),
        other => unreachable!("{other}"),
    }
}

#[test]
fn every_surface_says_the_same_in_every_state() {
    let bins = workspace_bins();
    for name in handoff::scenes::ALL {
        let tmp = tempfile::tempdir().unwrap();
        let scene = handoff::scenes::Scene::put(tmp.path(), name).unwrap();
        let config = scene.config.clone();
        // A scene about a normal user's view is looked at as that user, by every surface.
        let user = scene.as_user;
        let run = |bin: &str, args: &[&str]| {
            let mut cmd = match user {
                Some(uid) => handoff_test_support::unprivileged::command(uid, &bins.join(bin)),
                None => Command::new(bins.join(bin)),
            };
            let out = cmd
                .args(args)
                .env("HANDOFF_CONFIG", &config)
                .env("HOME", tmp.path())
                .output()
                .unwrap();
            if out.stdout.is_empty() {
                eprintln!("{name}: {bin} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            String::from_utf8(out.stdout).unwrap()
        };
        let (state, icon, text, class) = scene_wants(name);

        // handoff status --json.
        let status: serde_json::Value = serde_json::from_str(&run("handoff", &["status", "--json"]))
            .unwrap_or_else(|e| panic!("{}: status --json: {e}", name));
        let v = &status["verdict"];
        assert_eq!(v["state"], state, "{}: status: {v:#}", name);
        let unseen = class == "unseen";
        assert_eq!(v["unseen"] == true, unseen, "{}: status: {v:#}", name);
        // Its text leads with the verdict whenever a person must act or wait, or when it
        // could not look everywhere.
        let text_out = run("handoff", &["status"]);
        if unseen {
            assert!(text_out.contains("sudo handoff blockers"), "{name}: {text_out}");
            assert!(!text_out.contains("nothing uses it"), "{name}: {text_out}");
        }
        if unseen || ["restore_required", "switching", "libvirt_unreachable"].contains(&state) {
            assert!(
                text_out.starts_with(v["headline"].as_str().unwrap()),
                "{}: {text_out}",
                name
            );
        }

        // The tray: its own read, then the grace a watching tray gives an orphaned GPU.
        let cfg = handoff::config::Config::load_from(Some(config.clone()), None)
            .unwrap()
            .0;
        // libvirt asked as the test's user (its test driver is in-process), the machine
        // read as the scene's.
        let vms: Vec<_> = {
            let mut p = Prober::new();
            cfg.vms.iter().map(|v| p.probe(v)).collect()
        };
        let read = || {
            let collect = || crate::collect(&cfg, &mut || vms.clone());
            match user {
                Some(uid) => handoff_test_support::unprivileged::on_thread_as(uid, collect),
                None => collect(),
            }
        };
        let t0 = std::time::Instant::now();
        let mut watch = crate::model::OrphanWatch::default();
        let mut snap = read();
        watch.observe(&mut snap, t0);
        let mut snap2 = read();
        watch.observe(&mut snap2, t0 + ORPHAN_GRACE);
        let (t, _rx) = tray(snap2);
        assert_eq!(t.icon().name(), icon, "{}: tray", name);
        let tv = t.snap.verdict(None);
        assert_eq!(tv.state.word(), state, "{}: tray verdict", name);
        assert_eq!(tv.unseen, unseen, "{}: tray verdict", name);
        if unseen {
            let tip = t.snap.tooltip_lines(None).join("\n");
            assert!(
                tip.contains("sudo handoff blockers"),
                "{name}: tray tooltip: {tip}"
            );
            assert!(
                !tip.contains("No process uses") && !tip.contains("nothing uses it"),
                "{name}: {tip}"
            );
            assert!(
                t.snap.title(None).ends_with("? unseen"),
                "{name}: {}",
                t.snap.title(None)
            );
        }
        assert_eq!(
            tv.headline,
            v["headline"].as_str().unwrap(),
            "{}: tray and status headlines",
            name
        );

        // The bar, in i3blocks' and waybar's output.
        let lines = run("handoff-block", &[]);
        assert_eq!(lines.lines().next(), Some(text), "{}: i3blocks: {lines}", name);
        let waybar: serde_json::Value =
            serde_json::from_str(&run("handoff-block", &["--format", "waybar"])).unwrap();
        assert_eq!(waybar["text"], text, "{}: waybar", name);
        assert_eq!(waybar["class"], class, "{}: waybar", name);
    }
}
