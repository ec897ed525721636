//! The tray with several GPUs (issue 15) on the real desktop (xfce4-panel's tray as the
//! StatusNotifierWatcher and host, dunst, a private session bus, Xvfb), over the two-GPU
//! scene of the simulated machine: the iGPU (`UHD 630`) in the running macOS VM of
//! libvirt's test driver, the RTX (primary) on Linux, held by a process.
//!
//! The menu is read as the panel reads it (com.canonical.dbusmenu `GetLayout`): a section
//! per GPU, headed by that GPU's verdict, with its holders and its own "Return GPU to
//! Linux". The icon's colour is the primary GPU's until the other GPU needs a restore:
//! then it is red, whatever the primary says, and dunst is told once.
//!
//! Nothing outside temp dirs is touched (the scene's tree is plain files; libvirt's test
//! driver is in-process in the tray's agent). Run with
//! `cargo test -p handoff-tray --test tray_gpus`.

use std::time::Duration;

use handoff::simulated_tree::IGPU;
use handoff::verdict::HookFiles;
use handoff_test_support::process::holder;
use handoff_test_support::tray::{MenuEntry, Session, wait_view};
use handoff_test_support::wait::wait_for;

const TRAY: &str = env!("CARGO_BIN_EXE_handoff-tray");

/// The top level of the menu, as labels.
fn top(menu: &[MenuEntry]) -> Vec<String> {
    menu.iter()
        .filter(|e| e.parents.is_empty())
        .map(|e| e.label.clone())
        .collect()
}

/// The top-level labels of the section headed by the entry starting with `head`, up to the
/// separator that ends it (a separator is an entry with no label).
fn section(menu: &[String], head: &str) -> Vec<String> {
    let start = menu
        .iter()
        .position(|l| l.starts_with(head))
        .unwrap_or_else(|| panic!("no section {head:?} in {menu:#?}"));
    menu[start..]
        .iter()
        .take_while(|l| !l.is_empty())
        .cloned()
        .collect()
}

#[test]
fn two_gpus_get_a_section_each_and_a_restore_on_the_other_one_turns_the_icon_red() {
    let Some(mut session) = Session::start(640, 300) else {
        return;
    };
    // The agent (`handoff __agent`, and the `handoff-vm` it runs) beside the tray.
    handoff_test_support::tray::built(TRAY, "handoff", "handoff");
    let tmp = tempfile::tempdir().unwrap();
    let scene = handoff::scenes::Scene::put(tmp.path(), "macOS has the iGPU").unwrap();
    let host = scene.sim.host();
    // A CUDA job on the RTX, the primary GPU: its section lists it, and the icon is busy.
    let job = holder(&scene.sim.dev().join("nvidia0"));

    let (conn, item) = session.start_tray(TRAY, &scene.config);
    let v = wait_view(&conn, &item, "busy icon, both GPUs in the tooltip", |v| {
        v.icon_name == "handoff-busy"
            && v.tooltip_text.contains("RTX (0000:01:00.0), primary: ")
            && v.tooltip_text.contains("UHD 630 (0000:00:02.0): macOS")
    });
    eprintln!("tooltip: {}\n{}", v.tooltip_title, v.tooltip_text);

    let menu = top(&item.menu(&conn));
    eprintln!("menu: {menu:#?}");
    let rtx = section(&menu, "RTX (0000:01:00.0): ");
    let igpu = section(&menu, "UHD 630 (0000:00:02.0): ");
    assert_eq!(
        rtx[0], "RTX (0000:01:00.0): GPU is on Linux (nvidia)",
        "{menu:#?}"
    );
    assert_eq!(rtx[1..], ["Using the GPU (1)".to_owned()], "{menu:#?}");
    assert_eq!(igpu, ["UHD 630 (0000:00:02.0): macOS"], "{menu:#?}");
    let under: Vec<MenuEntry> = item
        .menu(&conn)
        .into_iter()
        .filter(|e| {
            e.parents.first().map(String::as_str) == Some("Using the GPU (1)") && e.parents.len() == 1
        })
        .collect();
    assert!(
        under.len() == 1 && under[0].label.starts_with(&format!("sleep (pid {}, ", job.pid())),
        "{under:#?}"
    );
    assert!(!menu.iter().any(|l| l == "Return GPU to Linux"), "{menu:#?}");

    // The iGPU's handoff gets stuck (its restore record says so, as the hook leaves it):
    // heard through the run dir; the icon turns red although the primary is only busy.
    let before = session.notifications().0.len();
    HookFiles::default()
        .with_record(
            IGPU,
            "stuck",
            Some("test"),
            Some("unbinding 0000:00:02.0 from vfio-pci hung"),
        )
        .save_gpu(&host, false)
        .unwrap();
    // The properties are read one by one: wait for the icon and the tooltip together.
    wait_view(&conn, &item, "restore icon for the other GPU", |v| {
        v.icon_name == "handoff-restore"
            && v.status == "NeedsAttention"
            && v.tooltip_text
                .contains("UHD 630 (0000:00:02.0): Restore required")
    });
    let menu = top(&item.menu(&conn));
    eprintln!("menu: {menu:#?}");
    let igpu = section(&menu, "UHD 630 (0000:00:02.0): ");
    assert!(
        igpu[0].starts_with("UHD 630 (0000:00:02.0): Restore required"),
        "{menu:#?}"
    );
    assert_eq!(igpu[1..], ["Return GPU to Linux".to_owned()], "{menu:#?}");
    let rtx = section(&menu, "RTX (0000:01:00.0): ");
    assert!(!rtx.contains(&"Return GPU to Linux".to_owned()), "{menu:#?}");
    let return_entry = item
        .menu(&conn)
        .into_iter()
        .find(|e| e.label == "Return GPU to Linux")
        .unwrap();
    assert!(return_entry.enabled);

    wait_for(Duration::from_secs(10), "the restore notification", || {
        session.notifications().0[before..]
            .iter()
            .any(|n| n.summary == "GPU handoff failed: restore required")
    });
    let (notes, raw) = session.notifications();
    let n = notes[before..]
        .iter()
        .find(|n| n.summary == "GPU handoff failed: restore required")
        .unwrap();
    assert!(n.body.contains("UHD 630 (0000:00:02.0)"), "{raw}");
    drop(job);
}

/// With macOS running on the iGPU, the menu offers to start Windows (it takes the RTX,
/// which is free) rather than to switch to it, and to switch to the other macOS VM (it
/// wants the iGPU macOS has). The agent read each VM's definition (`describe`) to know;
/// the VMs are on a libvirt test-driver machine of their own
/// (`handoff_test_support::libvirt::TWO_GPU_NODE`), so nothing here reaches a libvirtd.
#[test]
fn switch_is_offered_only_for_a_vm_that_wants_the_gpu_a_running_vm_has() {
    let Some(mut session) = Session::start(640, 300) else {
        return;
    };
    handoff_test_support::tray::built(TRAY, "handoff", "handoff");
    let tmp = tempfile::tempdir().unwrap();
    let scene = handoff_test_support::libvirt::two_gpu_scene(tmp.path());

    let (conn, item) = session.start_tray(TRAY, &scene.config);
    wait_view(&conn, &item, "the three VMs in the tooltip", |v| {
        v.tooltip_text.contains("macOS (test): running")
            && v.tooltip_text.contains("Windows (win11): shut off")
            && v.tooltip_text.contains("macOS 14 (hackintosh): shut off")
    });
    let entries = item.menu(&conn);
    let menu = top(&entries);
    eprintln!("menu: {menu:#?}");
    for want in ["Stop macOS", "Start Windows", "Switch to macOS 14"] {
        let e = entries
            .iter()
            .find(|e| e.parents.is_empty() && e.label == want)
            .unwrap_or_else(|| panic!("no {want:?} in {menu:#?}"));
        assert!(e.enabled, "{want:?} is disabled: {menu:#?}");
    }
    assert!(
        !menu
            .iter()
            .any(|l| l == "Switch to Windows" || l == "Start macOS 14"),
        "{menu:#?}"
    );
}
