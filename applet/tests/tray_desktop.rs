//! `handoff-tray` on a real desktop: xfce4-panel's systray as the StatusNotifierWatcher
//! and host under Xvfb, dunst as the notification server, a private session bus; the real
//! system libvirtd with a tiny TCG domain, the real hook installed over a simulated RTX
//! 3090 Ti (FUSE sysfs). The item is read and driven over D-Bus the way the panel does it.
//!
//! What it changes on the machine, for the length of the test only (as `vm_libvirtd.rs`):
//! `/etc/libvirt/hooks` and `/etc/handoff` are moved aside and put back on drop, the
//! test's domain is destroyed and undefined, the mount is unmounted, and every process
//! started here is killed by process group — also when the test fails.
//!
//! Run with `cargo test -p handoff-tray --test tray_desktop` as root with `/dev/fuse`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff::simulated_tree::RTX_3090_TI;
use handoff_test_support::libvirt::TestDomain;
use handoff_test_support::stage::{SYSTEM_CONFIG, Stage};
use handoff_test_support::tray::{Item, Session, find_item, screenshots_dir, wait_view};
use handoff_test_support::wait::wait_for;
use zbus::blocking::Connection;

const TRAY: &str = env!("CARGO_BIN_EXE_handoff-tray");
const LABEL: &str = "Windows";

/// The `handoff` binary the hook shim runs: built by the workspace next to ours.
fn handoff_bin() -> PathBuf {
    handoff_test_support::tray::built(TRAY, "handoff", "handoff")
}

/// Drops in declaration order: the session (tray, panel, dunst), the domain (its destroy
/// runs the hook's release, which needs the mount), the mount, /etc/handoff, the hooks,
/// the lock.
struct Scene {
    session: Session,
    win: TestDomain,
    stage: Stage,
}

impl Scene {
    fn set_up() -> Option<Scene> {
        let session = Session::start(640, 300)?;
        let stage = Stage::set_up()?;
        let win = TestDomain::define();
        let text = format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\nwatchdog_s = 2\n\n\
             {}[[vm]]\nname = \"{}\"\nlabel = \"{LABEL}\"\nshutdown_timeout_s = 2\n",
            stage.host_section(),
            win.name()
        );
        stage.install(&text, &handoff_bin());
        Some(Scene { session, win, stage })
    }

    fn start_tray(&mut self) {
        self.session.spawn_tray(TRAY, Path::new(SYSTEM_CONFIG));
    }

    fn shot(&self, name: &str) {
        // The panel is the bottom 30 px; the notification sits at the top right.
        let dir = screenshots_dir(self.session.dir.path());
        self.session
            .screenshot(&dir.join(format!("tray-{name}.png")), None);
        // The icon itself, 4× (the panel is the bottom 30 px of the 640×300 screen).
        let st = Command::new("import")
            .args(["-window", "root", "-crop", "96x30+0+270", "-resize", "400%"])
            .arg(dir.join(format!("tray-{name}-icon.png")))
            .env("DISPLAY", &self.session.display)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// A stand-in CUDA job holding a node; killed and reaped on drop.
struct Holder(Child);

impl Holder {
    fn of(node: &Path) -> Holder {
        Holder(
            Command::new("sleep")
                .arg("600")
                .stdin(Stdio::from(fs::File::open(node).unwrap()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tray_follows_the_gpu_and_drives_the_vm_on_a_real_panel() {
    let Some(mut s) = Scene::set_up() else { return };
    let t0 = Instant::now();
    s.start_tray();
    let conn = s.session.conn();
    let t = Instant::now();
    let item = find_item(&s.session, &conn);
    eprintln!("registered as {}{} after {:?}", item.dest, item.path, t.elapsed());

    // Host: the GPU on nvidia, nothing uses it.
    let v = wait_view(&conn, &item, "host icon", |v| v.icon_name == "handoff-host");
    assert_eq!(v.title, "GPU on Linux (nvidia)");
    assert_eq!(v.status, "Active");
    assert_eq!(v.pixmap_sizes, [22, 32, 48]);
    assert!(v.tooltip_text.contains("No process uses the GPU"), "{v:#?}");
    assert!(
        v.tooltip_text
            .contains(&format!("{LABEL} ({}): shut off", s.win.name())),
        "{v:#?}"
    );
    let menu = item.menu(&conn);
    assert!(
        menu[0].label.starts_with("GPU on Linux") && !menu[0].enabled,
        "{menu:#?}"
    );
    for l in ["Start Windows", "Open Looking Glass", "Details…", "Quit"] {
        assert!(menu.iter().any(|e| e.label == l), "no {l:?} in {menu:#?}");
    }
    assert!(!menu.iter().any(|e| e.label == "Return GPU to Linux"));
    std::thread::sleep(Duration::from_millis(300));
    s.shot("host");

    refused_start_names_the_holder_and_terminate_and_start_works(&s, &conn, &item);
    graceful_stop_that_times_out_says_how_to_force(&s, &conn, &item);
    force_stop_asks_first_then_brings_the_gpu_home(&s, &conn, &item);
    start_from_the_menu_and_back(&s, &conn, &item);
    restore_required_offers_return_gpu_to_linux(&s, &conn, &item);
    the_item_reregisters_when_the_watcher_comes_back(&mut s, &conn);

    let (notes, _) = s.session.notifications();
    for n in &notes {
        eprintln!(
            "notification (replaces {}): {} — {}",
            n.replaces_id,
            n.summary,
            n.body.replace('\n', " / ")
        );
    }
    assert!(
        !notes
            .iter()
            .any(|n| n.summary.contains("restore required") && n.body.contains("no VM is running")),
        "a VM that stopped normally must not look like a failed handoff: {notes:#?}"
    );
    let ids: Vec<u32> = notes.iter().skip(1).map(|n| n.replaces_id).collect();
    assert!(
        ids.iter().all(|&i| i == ids[0] && i != 0),
        "every notification after the first replaces it: {notes:#?}"
    );
    let log = s.session.log("tray");
    assert_eq!(log.matches("no tray icon can show").count(), 1, "{log}");
    eprintln!("whole scenario: {:?}", t0.elapsed());
}

fn refused_start_names_the_holder_and_terminate_and_start_works(s: &Scene, conn: &Connection, item: &Item) {
    let mut job = Holder::of(&s.stage.host.dev.join("nvidia0"));
    let pid = job.0.id();
    // Opening a node is no event: the tray sees the new holder when its menu opens.
    item.about_to_show(conn);
    let row = format!("sleep (pid {pid}, root)");
    wait_for(
        Duration::from_secs(10),
        "the new holder in the opened menu",
        || {
            item.menu(conn)
                .iter()
                .any(|e| e.label == row && e.parents == ["Using the GPU (1)"])
        },
    );
    let before = s.session.notifications().0.len();
    item.click(conn, "Start Windows");
    let v = wait_view(conn, item, "busy icon after the refused start", |v| {
        v.icon_name == "handoff-busy" && v.tooltip_text.contains("1 process uses the GPU")
    });
    assert_eq!(v.status, "NeedsAttention");
    assert!(v.tooltip_text.contains("1 process uses the GPU"), "{v:#?}");
    wait_for(Duration::from_secs(10), "the refusal's notification", || {
        s.session.notifications().0.len() > before
    });
    std::thread::sleep(Duration::from_millis(500));
    let (notes, raw) = s.session.notifications();
    let new = &notes[before..];
    assert_eq!(new.len(), 1, "exactly one notification for one refusal:\n{raw}");
    let n = &new[0];
    assert_eq!(n.summary, "Windows did not start: the GPU is busy");
    assert!(n.body.contains(&format!("sleep (pid {pid}, user root")), "{n:#?}");
    assert_eq!(
        n.actions,
        ["terminate-and-start", "Terminate and start", "details", "Details"],
        "{n:#?}"
    );
    assert!(s.stage.on_host());
    // The holder is in the menu, with Terminate behind a confirmation.
    let menu = item.menu(conn);
    let really = menu
        .iter()
        .find(|e| e.label.starts_with("Really terminate sleep"))
        .unwrap_or_else(|| panic!("{menu:#?}"));
    assert_eq!(really.parents[0], "Using the GPU (1)", "{really:#?}");
    assert_eq!(really.parents[2], "Terminate…", "{really:#?}");
    s.shot("refused");

    // "Terminate and start", through dunst's own action path.
    let t = Instant::now();
    s.session.click_notification_action("Terminate and start");
    wait_for(Duration::from_secs(10), "the holder to be terminated", || {
        matches!(job.0.try_wait(), Ok(Some(_)))
    });
    let st = job.0.try_wait().unwrap().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGTERM),
        "ended by SIGTERM"
    );
    let running = format!("Windows ({}): running", s.win.name());
    let v = wait_view(conn, item, "VM icon after Terminate and start", |v| {
        v.icon_name == "handoff-vm"
            && v.tooltip_text.contains(&running)
            && !v.tooltip_title.starts_with("GPU: ")
    });
    eprintln!("  terminate and start → VM icon: {:?}", t.elapsed());
    assert_eq!(v.title, "RTX 3090 Ti: Windows");
    assert_eq!(s.win.state(), "running");
    assert!(s.stage.drivers().iter().all(|d| d.as_deref() == Some("vfio-pci")));
    wait_for(Duration::from_secs(5), "the started notification", || {
        s.session
            .notifications()
            .0
            .last()
            .is_some_and(|n| n.summary == "Windows is running")
    });
    std::thread::sleep(Duration::from_millis(300));
    s.shot("vm");
}

fn graceful_stop_that_times_out_says_how_to_force(s: &Scene, conn: &Connection, item: &Item) {
    item.click(conn, "Stop Windows");
    let v = wait_view(conn, item, "switching icon while stopping", |v| {
        v.icon_name == "handoff-switching"
    });
    assert_eq!(v.title, format!("GPU: stopping {}…", s.win.name()));
    // Menu items are disabled while an action runs.
    let menu = item.menu(conn);
    let force = menu.iter().find(|e| e.label == "Force stop Windows…").unwrap();
    assert!(!force.enabled, "{menu:#?}");
    s.shot("switching");
    wait_for(Duration::from_secs(15), "the timeout's notification", || {
        s.session
            .notifications()
            .0
            .last()
            .is_some_and(|n| n.summary == "Windows is still running")
    });
    let n = s.session.notifications().0.pop().unwrap();
    assert!(n.body.contains("did not stop within 2 s"), "{n:#?}");
    assert!(n.body.contains("Force stop Windows…"), "{n:#?}");
    wait_view(conn, item, "VM icon again", |v| {
        v.icon_name == "handoff-vm" && !v.tooltip_title.starts_with("GPU: ")
    });
    assert_eq!(s.win.state(), "running");
}

fn force_stop_asks_first_then_brings_the_gpu_home(s: &Scene, conn: &Connection, item: &Item) {
    let menu = item.menu(conn);
    let really = menu
        .iter()
        .find(|e| e.label.starts_with("Really force Windows"))
        .unwrap_or_else(|| panic!("{menu:#?}"));
    assert_eq!(really.parents, ["Force stop Windows…"]);
    assert!(really.label.contains("unsaved work in it is lost"));
    let t = Instant::now();
    item.click(conn, "Really force Windows");
    let v = wait_view(conn, item, "host icon after force stop", |v| {
        v.icon_name == "handoff-host" && !v.tooltip_title.starts_with("GPU: ")
    });
    eprintln!("  force stop → host icon: {:?}", t.elapsed());
    assert_eq!(v.title, "GPU on Linux (nvidia)");
    assert_eq!(s.win.state(), "shut off");
    assert!(s.stage.on_host(), "{:?}", s.stage.drivers());
}

fn start_from_the_menu_and_back(s: &Scene, conn: &Connection, item: &Item) {
    let t = Instant::now();
    item.click(conn, "Start Windows");
    wait_view(conn, item, "VM icon after Start", |v| {
        v.icon_name == "handoff-vm" && !v.tooltip_title.starts_with("GPU: ")
    });
    eprintln!("  start → VM icon: {:?}", t.elapsed());
    assert_eq!(s.win.state(), "running");
    // The same VM stopped from outside (virsh): the live stream brings the icon home.
    let t = Instant::now();
    s.win.destroy().unwrap();
    wait_view(conn, item, "host icon after virsh destroy", |v| {
        v.icon_name == "handoff-host"
    });
    eprintln!("  virsh destroy → host icon: {:?}", t.elapsed());
    assert!(s.stage.on_host());
}

fn restore_required_offers_return_gpu_to_linux(s: &Scene, conn: &Connection, item: &Item) {
    // A stuck record, as the hook leaves it when the GPU did not come back.
    let g = handoff::gpu::read_gpu(&s.stage.host, RTX_3090_TI).unwrap();
    let mut r = handoff::bind::record::RestoreRecord::new(&g, Some(s.win.name()));
    r.phase = handoff::bind::record::Phase::Stuck;
    r.problem = Some("0000:01:00.1 did not come back to snd_hda_intel".into());
    r.save(&s.stage.host).unwrap();
    let v = wait_view(conn, item, "restore icon", |v| {
        v.icon_name == "handoff-restore" && v.title.contains("restore required")
    });
    assert!(v.title.contains("restore required"), "{v:#?}");
    assert_eq!(v.status, "NeedsAttention");
    let menu = item.menu(conn);
    assert!(
        menu.iter().any(|e| e.label == "Return GPU to Linux" && e.enabled),
        "{menu:#?}"
    );
    wait_for(Duration::from_secs(5), "the restore notification", || {
        s.session
            .notifications()
            .0
            .last()
            .is_some_and(|n| n.summary == "GPU handoff failed: restore required")
    });
    std::thread::sleep(Duration::from_millis(300));
    s.shot("restore");
    handoff::bind::record::RestoreRecord::remove(&s.stage.host, RTX_3090_TI).unwrap();
    wait_view(conn, item, "host icon after the record went", |v| {
        v.icon_name == "handoff-host"
    });
}

fn the_item_reregisters_when_the_watcher_comes_back(s: &mut Scene, conn: &Connection) {
    s.session.kill_panel();
    std::thread::sleep(Duration::from_millis(300));
    let log = s.session.log("tray");
    assert!(log.contains("no tray icon can show yet"), "{log}");
    assert!(log.contains("snixembed"), "{log}");
    let t = Instant::now();
    s.session.start_panel();
    let item = find_item(&s.session, conn);
    eprintln!("  re-registered after the panel came back: {:?}", t.elapsed());
    let v = item.view(conn);
    assert_eq!(v.icon_name, "handoff-host");
    std::thread::sleep(Duration::from_millis(500));
    s.shot("panel");
}
