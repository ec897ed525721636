//! What `handoff-tray` hears without anyone touching it (issue 16), on the real desktop of
//! `tray_desktop.rs` (xfce4-panel's tray, dunst, a private session bus, Xvfb) over the real
//! system libvirtd, its real hook and the simulated RTX 3090 Ti:
//!
//! - a process opening one of the GPU's nodes turns the icon busy, and its last close turns
//!   it back, with no menu opened and nothing else moving (inotify on the nodes);
//! - a start refused outside the tray (`virsh start`) is one notification naming the holder,
//!   with the tray's own buttons, and "Terminate and start" works from it;
//! - a tray started after that refusal does not tell it again.
//!
//! Changes to the machine and clean-up as `tray_desktop.rs` (the stage restores `/etc` and
//! the hooks, under the libvirtd lock). Run with
//! `cargo test -p handoff-tray --test tray_heard` as root with `/dev/fuse`.

use std::path::Path;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use handoff::simulated_tree::RTX_3090_TI;
use handoff_test_support::libvirt::TestDomain;
use handoff_test_support::opener::Opener;
use handoff_test_support::process::kill_group;
use handoff_test_support::stage::{SYSTEM_CONFIG, Stage};
use handoff_test_support::tray::{Session, find_item, wait_view};
use handoff_test_support::wait::wait_for;

const TRAY: &str = env!("CARGO_BIN_EXE_handoff-tray");
const LABEL: &str = "Windows";

fn handoff_bin() -> PathBuf {
    handoff_test_support::tray::built(TRAY, "handoff", "handoff")
}

/// Drops in declaration order, as in `tray_desktop.rs`.
struct Scene {
    session: Session,
    win: TestDomain,
    stage: Stage,
}

#[test]
fn opens_closes_and_refusals_from_elsewhere_reach_the_tray() {
    let Some(session) = Session::start(640, 300) else {
        return;
    };
    let Some(stage) = Stage::set_up() else { return };
    let win = TestDomain::define();
    let text = format!(
        "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\nwatchdog_s = 2\n\n\
         {}[[vm]]\nname = \"{}\"\nlabel = \"{LABEL}\"\nshutdown_timeout_s = 2\n",
        stage.host_section(),
        win.name()
    );
    stage.install(&text, &handoff_bin());
    let mut s = Scene { session, win, stage };
    let tray = |s: &mut Scene| {
        s.session.spawn_tray(TRAY, Path::new(SYSTEM_CONFIG));
    };
    tray(&mut s);
    let conn = s.session.conn();
    let item = find_item(&s.session, &conn);
    wait_view(&conn, &item, "host icon", |v| {
        v.icon_name == "handoff-host" && v.tooltip_text.contains("No process uses the GPU")
    });

    // A job opens the GPU: nothing but the open itself tells the tray.
    let mut job = Opener::start(&s.stage.host.dev.join("nvidia0"), "cuda-training");
    let t = Instant::now();
    job.open();
    wait_view(&conn, &item, "busy icon after the open", |v| {
        v.icon_name == "handoff-busy" && v.tooltip_text.contains("1 process uses the GPU")
    });
    eprintln!("open → busy icon: {:?}", t.elapsed());
    let t = Instant::now();
    job.close();
    wait_view(&conn, &item, "host icon after the last close", |v| {
        v.icon_name == "handoff-host" && v.tooltip_text.contains("No process uses the GPU")
    });
    eprintln!("close → host icon: {:?}", t.elapsed());

    // Refused outside the tray: `virsh start`, the real hook.
    job.open();
    wait_view(&conn, &item, "busy icon", |v| v.icon_name == "handoff-busy");
    let before = s.session.notifications().0.len();
    let why = s.win.start().expect_err("the hook let the start through");
    assert!(why.contains("cuda-training"), "{why}");
    wait_for(Duration::from_secs(10), "the refusal's notification", || {
        s.session.notifications().0.len() > before
    });
    std::thread::sleep(Duration::from_millis(800));
    let (notes, raw) = s.session.notifications();
    let new = &notes[before..];
    assert_eq!(new.len(), 1, "exactly one notification for one refusal:\n{raw}");
    let n = &new[0];
    assert_eq!(n.summary, "Windows did not start: the GPU is busy");
    assert!(
        n.body
            .contains(&format!("cuda-training (pid {}, user root", job.pid())),
        "{n:#?}"
    );
    assert_eq!(
        n.actions,
        ["terminate-and-start", "Terminate and start", "details", "Details"],
        "{n:#?}"
    );

    // A tray started now does not tell that refusal again.
    let mut old = s.session.others.pop().unwrap();
    kill_group(&mut old);
    let before = s.session.notifications().0.len();
    tray(&mut s);
    let item = find_item(&s.session, &conn);
    wait_view(&conn, &item, "busy icon in the new tray", |v| {
        v.icon_name == "handoff-busy"
    });
    std::thread::sleep(Duration::from_millis(1500));
    let (notes, raw) = s.session.notifications();
    assert!(
        !notes[before..]
            .iter()
            .any(|n| n.summary.contains("did not start")),
        "a restarted tray repeated an old refusal:\n{raw}"
    );

    // Refused again, then "Terminate and start" from that notification starts the VM.
    let before = s.session.notifications().0.len();
    assert!(s.win.start().is_err(), "the second start went through");
    wait_for(
        Duration::from_secs(10),
        "the second refusal's notification",
        || {
            s.session.notifications().0[before..]
                .iter()
                .any(|n| n.summary.contains("did not start"))
        },
    );
    s.session.click_notification_action("Terminate and start");
    let running = format!("{LABEL} ({}): running", s.win.name());
    wait_view(&conn, &item, "VM icon after Terminate and start", |v| {
        v.icon_name == "handoff-vm" && v.tooltip_text.contains(&running)
    });
    assert_eq!(s.win.state(), "running");
    drop(job);
    s.win.destroy().unwrap();
    wait_for(Duration::from_secs(20), "the GPU back on the host", || {
        s.stage.on_host()
    });
}
