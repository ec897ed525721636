//! `handoff-tray` on a desktop whose GPU is in a Proxmox VE node (the seed's homelab: VM 140
//! "Windows 11" runs with the RTX 5070 Ti, VM 141 "Linux AI" is off), on the real desktop of
//! `tray_desktop.rs` (xfce4-panel's tray, dunst, a private session bus, Xvfb) against fakepve
//! (PyPI) on loopback (issue 16, "a notification for every refused start, whoever asked"):
//!
//! - a start of 141 that the node's hookscript refused, asked from elsewhere (here a script
//!   with the same token), is one notification naming what the hookscript named, with
//!   "Switch to Linux AI" and "Details", at the tray's PVE poll;
//! - a refusal from before the tray started is never told, nor one already told after the
//!   tray restarts;
//! - the tray's own switch that the hookscript refuses is told once, not again at the poll;
//! - a `[[vm]]` the token cannot see is "not visible to the API token", never "not defined
//!   in libvirt" (issue 14).
//!
//! fakepve runs no hookscripts: its failure on demand (`start_error`) ends the start task
//! with the hookscript's lines and PVE's `hookscript error …` die message
//! ([`fakepve::hookscript_refusal`]). Run with `cargo test -p handoff-tray --test tray_pve`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use handoff::hypervisor::piped::Piped;
use handoff::hypervisor::{Hypervisor, Start, TaskState};
use handoff_test_support::fakepve::{self, FakePve};
use handoff_test_support::process::kill_group;
use handoff_test_support::tray::{Session, find_item, wait_view};
use handoff_test_support::wait::wait_for;
use serde_json::json;

const TRAY: &str = env!("CARGO_BIN_EXE_handoff-tray");
const TOKEN: &str = "handoff@pve!desk";
const SECRET: &str = "3c9d1e2f-4a5b-4c6d-8e7f-0a1b2c3d4e5f";
const REFUSED_141: &str = "handoff: not starting Linux AI (VM 141): GPU 0000:01:00.0 is passed through to Windows 11 (VM 140), which is running. `handoff switch 141` shuts it down gracefully and then starts Linux AI (VM 141)";

/// `handoff` (with `handoff-vm`, the agent's side) and `handoff-pve` beside the tray.
fn bins() -> PathBuf {
    handoff_test_support::bins::sibling(
        Path::new(TRAY).parent().unwrap(),
        "handoff-pve",
        "handoff-proxmox",
        &["src", "proxmox/src"],
    );
    handoff_test_support::tray::built(TRAY, "handoff", "handoff")
}

/// A desktop's config: no such GPU here (an empty sysfs), the VMs on the node, polled
/// every second; VM 150 is one the token cannot see.
fn desktop(dir: &Path, pve: &FakePve) -> PathBuf {
    handoff_test_support::fakepve::desktop_config(
        dir,
        (&pve.url, &pve.fingerprint),
        (TOKEN, SECRET),
        "poll_interval_s = 1",
        "[[vm]]\nvmid = 140\nlabel = \"Windows 11\"\n\n\
         [[vm]]\nvmid = 141\nname = \"linux-ai\"\nlabel = \"Linux AI\"\n\n\
         [[vm]]\nvmid = 150\nlabel = \"Old Windows\"\n",
    )
}

/// Starts 141 through the API as any other client would, and waits for the hookscript's
/// refusal to end the task.
fn refused_start(cfg: &handoff::Config) {
    let url = &cfg.proxmox.as_ref().unwrap().url;
    let exe = Path::new(TRAY).parent().unwrap().join("handoff-pve");
    let mut pve = Piped::spawn(&exe, cfg, url).unwrap();
    let Start::Begun(task) = pve.start(&(&cfg.vms[1]).into()).unwrap() else {
        panic!("the start was refused before a task began")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pve.poll(&task).unwrap() {
            TaskState::Refused(_) => return,
            TaskState::Pending { .. } if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            other => panic!("expected the hookscript's refusal, got {other:?}"),
        }
    }
}

fn refusal_notes(s: &Session, from: usize) -> Vec<handoff_test_support::tray::Notify> {
    s.notifications().0[from..]
        .iter()
        .filter(|n| n.summary.contains("did not start"))
        .cloned()
        .collect()
}

#[test]
fn a_start_the_pve_hookscript_refused_elsewhere_is_one_notification_and_never_told_again() {
    let Some(pve) = FakePve::start(&json!({
        "tokens": {TOKEN: SECRET},
        "grants": [[TOKEN, "/vms/140", ["VM.Audit", "VM.PowerMgmt"]], [TOKEN, "/vms/141", ["VM.Audit", "VM.PowerMgmt"]]],
        "guests": [
            {"vmid": 140, "name": "win11", "status": "running", "config": {"hostpci0": "0000:01:00,pcie=1"}},
            {"vmid": 141, "name": "linux-ai", "status": "stopped", "config": {"hostpci0": "0000:01:00,pcie=1"},
             "start_error": fakepve::hookscript_refusal(141, &[REFUSED_141])},
            // On the node, but the token may not audit it.
            {"vmid": 150, "name": "old-win", "status": "stopped", "config": {}},
        ],
    })) else {
        return;
    };
    let Some(mut session) = Session::start(640, 300) else {
        return;
    };
    let handoff = bins();
    let dir = tempfile::tempdir().unwrap();
    let config = desktop(dir.path(), &pve);
    let cfg = handoff::Config::load_file(&config).unwrap();

    // Refused before the tray runs: history.
    refused_start(&cfg);

    let tray = |session: &mut Session| {
        let mut c = Command::new(TRAY);
        c.arg("-v").env("HANDOFF_CONFIG", &config);
        let child = session.spawn(&mut c, "tray");
        session.others.push(child);
    };
    assert!(handoff.exists(), "{}", handoff.display());
    tray(&mut session);
    let conn = session.conn();
    let item = find_item(&session, &conn);
    let v = wait_view(&conn, &item, "the VMs in the tooltip", |v| {
        v.tooltip_text.contains("Linux AI (VM 141): shut off")
            && v.tooltip_text.contains("Old Windows (VM 150)")
    });
    assert!(
        v.tooltip_text
            .contains("Old Windows (VM 150): not visible to the API token"),
        "{}",
        v.tooltip_text
    );
    assert!(!v.tooltip_text.contains("libvirt"), "{}", v.tooltip_text);
    std::thread::sleep(Duration::from_millis(2500));
    let (_, raw) = session.notifications();
    assert!(
        refusal_notes(&session, 0).is_empty(),
        "an old refusal was told:\n{raw}"
    );

    // Refused elsewhere while the tray runs: one notification at its poll.
    let before = session.notifications().0.len();
    refused_start(&cfg);
    wait_for(Duration::from_secs(10), "the refusal's notification", || {
        !refusal_notes(&session, before).is_empty()
    });
    std::thread::sleep(Duration::from_millis(2500));
    let (_, raw) = session.notifications();
    let notes = refusal_notes(&session, before);
    assert_eq!(notes.len(), 1, "exactly one notification for one refusal:\n{raw}");
    let n = &notes[0];
    assert_eq!(n.summary, "Linux AI (VM 141) did not start: the GPU is busy");
    assert!(
        n.body.contains(
            "not starting Linux AI (VM 141): GPU 0000:01:00.0 is passed through to Windows 11 (VM 140), which is running"
        ),
        "{n:#?}"
    );
    let labels: Vec<&str> = n.actions.iter().skip(1).step_by(2).map(String::as_str).collect();
    assert_eq!(labels, ["Switch to Linux AI", "Details"], "{n:#?}");

    // A tray started again tells neither refusal.
    let mut old = session.others.pop().unwrap();
    kill_group(&mut old);
    let before = session.notifications().0.len();
    tray(&mut session);
    let item = find_item(&session, &conn);
    wait_view(&conn, &item, "the new tray's tooltip", |v| {
        v.tooltip_text.contains("Linux AI (VM 141)")
    });
    std::thread::sleep(Duration::from_millis(3000));
    let (_, raw) = session.notifications();
    assert!(
        refusal_notes(&session, before).is_empty(),
        "a restarted tray repeated an old refusal:\n{raw}"
    );

    // The tray's own switch to 141, refused by the hookscript: told once, by the action's
    // own notification, not again when the poll finds the same task.
    let before = session.notifications().0.len();
    item.click(&conn, "Switch to Linux AI");
    wait_for(Duration::from_secs(20), "the switch's refusal", || {
        !refusal_notes(&session, before).is_empty()
    });
    std::thread::sleep(Duration::from_millis(4000));
    let (_, raw) = session.notifications();
    let notes = refusal_notes(&session, before);
    assert_eq!(notes.len(), 1, "the tray's own refused start told twice:\n{raw}");
    assert!(
        notes[0].body.contains("not starting Linux AI (VM 141)"),
        "{:#?}",
        notes[0]
    );
}
