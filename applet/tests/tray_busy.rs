//! "Busy when you're about to need it" (issue 16, `[tray] busy_alert`) on the real desktop
//! (xfce4-panel's tray, dunst, a private session bus, Xvfb), over the simulated RTX and a
//! VM of libvirt's test driver (asked through the tray's real agent):
//!
//! - a CUDA job opening the GPU while no VM is about to start is only the busy icon;
//! - once a start of the VM was refused (logged in `refusals.json` as the root hook logs
//!   it: the refusal's own notification), a job that opens the GPU within
//!   `busy_alert_window_s` is one more notification, "GPU is now busy: cuda-training",
//!   naming the VM and the job;
//! - with the switch off, the same sequence says nothing beyond the refusal;
//! - while the tray itself is starting the VM ("Terminate and start" from the refusal's
//!   notification, waiting for a holder that ignores SIGTERM), a job that opens the GPU is
//!   told as "Windows is being started from the tray".
//!
//! The refusal is written with the library's `RefusalLog::record`, what the hook runs,
//! rather than by a real `virsh start` (that needs the system libvirtd and its hook:
//! `tray_heard.rs` covers that path). Run with `cargo test -p handoff-tray --test tray_busy`.

use std::fs;
use std::process::Command;
use std::time::Duration;

use handoff::refusals::RefusalLog;
use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff_test_support::opener::Opener;
use handoff_test_support::tray::{Item, Session, wait_view};
use handoff_test_support::wait::wait_for;

const TRAY: &str = env!("CARGO_BIN_EXE_handoff-tray");

const BUSY: &str = "GPU is now busy: cuda-training";

/// The desktop, a simulated RTX and `win11` ("Windows", shut off) in a libvirt test-driver
/// file, and the tray with `[tray] busy_alert = alert`, showing the host icon.
struct Desk {
    session: Session,
    sim: SimHost,
    conn: zbus::blocking::Connection,
    item: Item,
    _tmp: tempfile::TempDir,
}

fn desk(alert: bool) -> Option<Desk> {
    let mut session = Session::start(640, 300)?;
    handoff_test_support::tray::built(TRAY, "handoff", "handoff");
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(&tmp.path().join("m"), &SimSpec::workstation()).unwrap();
    let driver = tmp.path().join("libvirt-test.xml");
    fs::write(
        &driver,
        "<node>\n<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
         <name>win11</name><memory>32768</memory><vcpu>1</vcpu><os><type>hvm</type></os>\
         <test:runstate>5</test:runstate></domain>\n</node>\n",
    )
    .unwrap();
    let config = tmp.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n\
             [tray]\nbusy_alert = {alert}\nbusy_alert_window_s = 60\n\n\
             [host]\nsysfs = {:?}\ndev = {:?}\nrun = {:?}\nuninspectable_ok = {:?}\n\n\
             [[vm]]\nname = \"win11\"\nlabel = \"Windows\"\nuri = \"test://{}\"\n",
            sim.sysfs(),
            sim.dev(),
            sim.run(),
            // What even root cannot inspect here (as the scenes do): otherwise the GPU is
            // never called free, and the icon never the host's.
            handoff::holders::uninspectable_now(std::path::Path::new("/proc")),
            driver.display(),
        ),
    )
    .unwrap();
    let (conn, item) = session.start_tray(TRAY, &config);
    wait_view(&conn, &item, "host icon", |v| {
        v.icon_name == "handoff-host" && v.tooltip_text.contains("Windows (win11): shut off")
    });
    Some(Desk {
        session,
        sim,
        conn,
        item,
        _tmp: tmp,
    })
}

/// Runs the sequence with `[tray] busy_alert = alert`; returns every notification's
/// summary after the refusal's, and the body of the busy one if any.
fn after_a_refusal(alert: bool) -> Option<(Vec<String>, Option<String>)> {
    // Bound in this order so that they drop in reverse: the session (and the tray) first.
    let Desk {
        _tmp,
        sim,
        item,
        conn,
        session,
    } = desk(alert)?;

    // Nothing about to start: a job opening the GPU is the busy icon, no notification.
    let before = session.notifications().0.len();
    let mut job = Opener::start(&sim.dev().join("nvidia0"), "cuda-training");
    job.open();
    wait_view(&conn, &item, "busy icon", |v| v.icon_name == "handoff-busy");
    job.close();
    wait_view(&conn, &item, "host icon again", |v| v.icon_name == "handoff-host");
    std::thread::sleep(Duration::from_millis(800));
    let (notes, raw) = session.notifications();
    assert!(
        !notes[before..].iter().any(|n| n.summary == BUSY),
        "told busy with nothing about to start:\n{raw}"
    );

    // The hook refuses a start of Windows (as it logs it, root's scan naming nobody: the
    // GPU was checked and something could not be).
    RefusalLog::record(
        &sim.host(),
        RTX_3090_TI,
        "win11",
        &[],
        "handoff: not starting win11: 1 process could not be inspected",
    )
    .unwrap();
    wait_for(Duration::from_secs(10), "the refusal's notification", || {
        session.notifications().0[before..]
            .iter()
            .any(|n| n.summary.starts_with("Windows did not start"))
    });
    let after_refusal = session.notifications().0.len();

    // Now a job opens the GPU: with the switch on, that is news.
    job.open();
    wait_view(&conn, &item, "busy icon", |v| v.icon_name == "handoff-busy");
    if alert {
        wait_for(Duration::from_secs(10), "the busy alert", || {
            session.notifications().0[after_refusal..]
                .iter()
                .any(|n| n.summary == BUSY)
        });
    }
    std::thread::sleep(Duration::from_millis(1500));
    let (notes, _) = session.notifications();
    let new = &notes[after_refusal..];
    let body = new.iter().find(|n| n.summary == BUSY).map(|n| n.body.clone());
    Some((new.iter().map(|n| n.summary.clone()).collect(), body))
}

#[test]
fn a_job_opening_the_gpu_right_after_a_refused_start_is_told() {
    let Some((summaries, body)) = after_a_refusal(true) else {
        return;
    };
    assert_eq!(summaries, [BUSY], "one notification, the busy alert");
    let body = body.unwrap();
    eprintln!("{BUSY} — {body}");
    assert!(body.starts_with("Windows did not start "), "{body}");
    assert!(
        body.contains(" s ago, and the GPU is now in use:\ncuda-training (pid "),
        "{body}"
    );
}

#[test]
fn without_the_switch_only_the_refusal_is_told() {
    let Some((summaries, _)) = after_a_refusal(false) else {
        return;
    };
    assert!(!summaries.iter().any(|s| s == BUSY), "{summaries:?}");
}

/// "About to start" because the tray is starting it: the refusal's "Terminate and start"
/// waits (5 s at most) for a holder that ignores SIGTERM, and meanwhile a job opens the GPU.
#[test]
fn a_job_opening_the_gpu_while_the_tray_is_starting_the_vm_is_told() {
    let Some(d) = desk(true) else { return };
    // Root's own process (the tray runs as root here), deaf to SIGTERM.
    let stubborn = handoff_test_support::process::Group::spawn(
        Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 600"])
            .stdin(fs::File::open(d.sim.dev().join("nvidia0")).unwrap()),
    );
    wait_view(&d.conn, &d.item, "busy icon", |v| v.icon_name == "handoff-busy");
    let before = d.session.notifications().0.len();
    let me = nix::unistd::getuid().as_raw();
    let holder = handoff::holders::Holder {
        pid: stubborn.pid() as u32,
        command: "sleep".into(),
        cmdline: vec!["sleep".into(), "600".into()],
        uid: me,
        user: "root".into(),
        unit: None,
        paths: vec![d.sim.dev().join("nvidia0")],
        reason: None,
        vm: None,
        container: None,
    };
    RefusalLog::record(
        &d.sim.host(),
        RTX_3090_TI,
        "win11",
        &[holder],
        "handoff: not starting win11: sleep uses the GPU",
    )
    .unwrap();
    wait_for(Duration::from_secs(10), "the refusal's notification", || {
        d.session.notifications().0[before..]
            .iter()
            .any(|n| n.summary.starts_with("Windows did not start"))
    });
    d.session.click_notification_action("Terminate and start");
    wait_view(&d.conn, &d.item, "the tray starting Windows", |v| {
        v.tooltip_title.contains("starting win11")
    });
    let during = d.session.notifications().0.len();
    let mut job = Opener::start(&d.sim.dev().join("nvidia0"), "cuda-training");
    job.open();
    wait_for(Duration::from_secs(4), "the busy alert", || {
        d.session.notifications().0[during..]
            .iter()
            .any(|n| n.summary == BUSY)
    });
    let (notes, raw) = d.session.notifications();
    let n = notes[during..].iter().find(|n| n.summary == BUSY).unwrap();
    eprintln!("{BUSY} — {}", n.body);
    assert!(
        n.body.starts_with(
            "Windows is being started from the tray, and the GPU is now in use:\ncuda-training (pid "
        ),
        "{raw}"
    );
    // The stubborn holder stays: the start gives up, saying so.
    wait_for(Duration::from_secs(10), "the start giving up", || {
        d.session.notifications().0[during..]
            .iter()
            .any(|n| n.summary == "Not starting win11")
    });
}
