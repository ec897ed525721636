//! The tray's actions that `tray_desktop.rs` does not click, each on a real desktop
//! (xfce4-panel's systray and dunst under Xvfb, a private session bus) with a real i3
//! managing the same display, driven over D-Bus the way the panel drives it:
//!
//! - a left click (`Activate`) and "Details…" open the real `handoff-details` window;
//! - "Terminate" in "Using the GPU" ends the test's own process holding a GPU node after
//!   its question, and offers nothing for another user's; "Stop <unit>" stops a real
//!   systemd user unit holding a node (a real `systemd --user`, see
//!   `handoff_test_support::systemd_user`);
//! - with the real system libvirtd, the real hook and a simulated RTX 3090 Ti (FUSE):
//!   "Open Looking Glass" and a left click put the client (a stand-in: `xterm -class
//!   looking-glass-client`) on its i3 workspace; "Switch to <VM>" hands the GPU from one
//!   VM to the other; "Force stop…" does nothing until its question is answered;
//! - a return of the GPU that fails in the (simulated) kernel leaves "Return GPU to Linux",
//!   which runs the real `pkexec handoff rebind --force` against the real polkitd on a
//!   system bus of the test's own (`handoff_test_support::system_bus`): first without polkitd
//!   (the notification says what failed and what to type instead), then with it.
//!
//! What it changes outside its temp dirs, for the length of a test only: with libvirt,
//! `/etc/libvirt/hooks` and `/etc/handoff` (moved aside and put back, as `tray_desktop.rs`);
//! the test's own cgroup for the systemd user manager (removed again). Every process is
//! killed by process group, also when the test fails.
//!
//! `HANDOFF_SCREENSHOTS=DIR` keeps screenshots of the desktop at the interesting moments.
//! Run as root with `/dev/fuse`: `cargo test -p handoff-tray --test tray_actions`.

use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff::simulated_tree::{RTX_3090_TI, SimHost};
use handoff_kernelsim::send_command;
use handoff_test_support::config::workstation_with_test_vm;
use handoff_test_support::desktop::Desktop;
use handoff_test_support::libvirt::TestDomain;
use handoff_test_support::stage::{SYSTEM_CONFIG, Stage};
use handoff_test_support::system_bus::SystemBus;
use handoff_test_support::systemd_user::UserManager;
use handoff_test_support::tools::{have, required};
use handoff_test_support::tray::{Item, Session, built, find_item, wait_view};
use handoff_test_support::wait::wait_for;
use zbus::blocking::Connection;

const TRAY: &str = env!("CARGO_BIN_EXE_handoff-tray");
const LG_CLASS: &str = "looking-glass-client";
const LG_WORKSPACE: &str = "lg 10";
const DETAILS_CLASS: &str = "handoff-details";
const DETAILS_TITLE: &str = "handoff — RTX 3090 Ti";

/// The config's `[looking_glass]`: the stand-in client on workspace "lg 10".
fn looking_glass() -> String {
    format!(
        "[looking_glass]\ncommand = \"xterm\"\nargs = [\"-class\", \"{LG_CLASS}\", \"-e\", \"sleep\", \"600\"]\n\
         workspace = \"{LG_WORKSPACE}\"\nwindow_class = \"{LG_CLASS}\"\n\n"
    )
}

/// Screenshot of the whole desktop into `$HANDOFF_SCREENSHOTS/tray-<name>.png`, if set.
fn shot(session: &Session, name: &str) {
    if let Some(dir) = std::env::var_os("HANDOFF_SCREENSHOTS") {
        std::thread::sleep(Duration::from_millis(400));
        session.screenshot(&Path::new(&dir).join(format!("tray-{name}.png")), None);
    }
}

/// i3 on the session's display, the tray told where it is (`I3SOCK`), and the item.
fn with_i3(session: &mut Session) -> Option<Desktop> {
    for tool in ["xterm", "xwininfo"] {
        if !have(tool) {
            required(&format!("{tool} is not installed (scripts/deps.sh installs it)"));
            return None;
        }
    }
    let i3 = Desktop::i3_on(&session.display)?;
    session.i3sock = Some(i3.socket.clone());
    Some(i3)
}

fn start_tray(session: &mut Session, c: &mut Command) -> u32 {
    c.arg("-v");
    let child = session.spawn(c, "tray");
    let pid = child.id();
    session.others.push(child);
    pid
}

/// The windows of `class` i3 manages.
fn windows_of(i3: &Desktop, class: &str) -> Vec<handoff::i3::Window> {
    i3.windows().into_iter().filter(|w| w.is(class)).collect()
}

fn wait_window(i3: &Desktop, class: &str, what: &str, ok: impl Fn(&[handoff::i3::Window]) -> bool) {
    wait_for(Duration::from_secs(30), what, || ok(&windows_of(i3, class)));
}

/// Whether the X server has a viewable top-level window named `name` (xwininfo).
fn viewable(display: &str, name: &str) -> bool {
    let tree = Command::new("xwininfo")
        .args(["-root", "-tree", "-display", display])
        .output()
        .unwrap();
    String::from_utf8_lossy(&tree.stdout)
        .lines()
        .filter(|l| l.contains(&format!("\"{name}\"")))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .any(|id| {
            let info = Command::new("xwininfo")
                .args(["-id", &id, "-display", display])
                .output()
                .unwrap();
            String::from_utf8_lossy(&info.stdout).contains("Map State: IsViewable")
        })
}

/// The views the details windows started by the tray rendered (one JSON line each on the
/// tray's stdout, with `HANDOFF_DETAILS_DUMP=1`).
fn details_views(session: &Session) -> Vec<serde_json::Value> {
    fs::read_to_string(session.dir.path().join("tray.out"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A process of the test holding `node` open on stdin (a CUDA job, as far as anyone can
/// tell), optionally as another user; its process group is killed on drop.
struct Holder(Child);

impl Holder {
    fn of(node: &Path, uid: Option<u32>) -> Holder {
        let mut c = Command::new("sleep");
        c.arg("600")
            .stdin(Stdio::from(fs::File::open(node).unwrap()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let Some(uid) = uid {
            c.uid(uid).gid(uid);
        }
        Holder(c.spawn().unwrap())
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // SAFETY: the process group made for this child.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------
// No libvirt daemon: a simulated GPU on plain files and libvirt's test driver

/// A desktop with i3, a simulated workstation (the GPU on nvidia) and a config with one
/// shut-off VM in a libvirt test-driver file. Drops i3 (and the windows it manages) first.
struct Desk {
    i3: Desktop,
    session: Session,
    sim: SimHost,
    config: PathBuf,
}

impl Desk {
    fn set_up() -> Option<Desk> {
        let mut session = Session::start(800, 600)?;
        let i3 = with_i3(&mut session)?;
        let dir = session.dir.path().to_owned();
        let (sim, config) = workstation_with_test_vm(&dir, &looking_glass());
        // The tray starts the window from beside itself.
        built(TRAY, "handoff-details", "handoff-details");
        Some(Desk {
            i3,
            session,
            sim,
            config,
        })
    }

    fn start_tray(&mut self) -> (Connection, Item) {
        self.start_tray_seeing("host icon", |v| v.icon_name == "handoff-host")
    }

    fn start_tray_seeing(
        &mut self,
        what: &str,
        first: impl FnMut(&handoff_test_support::tray::ItemView) -> bool,
    ) -> (Connection, Item) {
        let mut c = Command::new(TRAY);
        // The details window inherits the tray's environment and stdout: it prints each
        // view it renders there (a GTK window's text is not readable otherwise).
        c.env("HANDOFF_CONFIG", &self.config)
            .env("HANDOFF_DETAILS_DUMP", "1");
        start_tray(&mut self.session, &mut c);
        let conn = self.session.conn();
        let item = find_item(&self.session, &conn);
        wait_view(&conn, &item, what, first);
        (conn, item)
    }
}

#[test]
fn a_left_click_and_details_open_the_details_window_once() {
    let Some(mut d) = Desk::set_up() else { return };
    let (conn, item) = d.start_tray();
    assert!(windows_of(&d.i3, DETAILS_CLASS).is_empty());

    // No VM has the GPU: the left click's obvious thing is the details window.
    let t = Instant::now();
    item.activate(&conn);
    wait_window(
        &d.i3,
        DETAILS_CLASS,
        "the details window after a left click",
        |w| w.len() == 1 && w[0].title == DETAILS_TITLE,
    );
    eprintln!("  left click → details window: {:?}", t.elapsed());
    assert!(viewable(&d.session.display, DETAILS_TITLE));
    wait_for(Duration::from_secs(30), "the window's view", || {
        details_views(&d.session)
            .iter()
            .any(|v| v["headline"] == "GPU is on Linux (nvidia)" && v["vms"][0]["state"] == "shut off")
    });
    let first = windows_of(&d.i3, DETAILS_CLASS).remove(0);
    assert!(first.focused, "{first:?}");
    shot(&d.session, "details-from-left-click");

    // Closed (i3 asks it politely, as a click on its close button would)…
    d.i3.i3()
        .command(&format!("[con_id={}] kill", first.con_id))
        .unwrap();
    wait_window(&d.i3, DETAILS_CLASS, "the details window to close", |w| {
        w.is_empty()
    });
    // …and opened again from the menu.
    let t = Instant::now();
    item.click(&conn, "Details…");
    wait_window(&d.i3, DETAILS_CLASS, "the details window from the menu", |w| {
        w.len() == 1 && w[0].title == DETAILS_TITLE
    });
    eprintln!("  Details… → details window: {:?}", t.elapsed());
    let second = windows_of(&d.i3, DETAILS_CLASS).remove(0);
    assert_ne!(second.con_id, first.con_id, "a new window");

    // While it is open, "Details…" asks for that window instead of opening a second one:
    // the second handoff-details hands over to the first (a single-instance application),
    // which asks to be shown; i3 marks its workspace urgent (the person is elsewhere).
    d.i3.i3().command("workspace 2").unwrap();
    let urgent = |name: &str| {
        d.i3.i3()
            .workspaces()
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == name && w["urgent"] == true)
    };
    assert!(!urgent("1"));
    item.click(&conn, "Details…");
    wait_for(
        Duration::from_secs(30),
        "the open details window to ask for attention",
        || urgent("1"),
    );
    let w = windows_of(&d.i3, DETAILS_CLASS);
    assert_eq!(w.len(), 1, "one window: {w:?}");
    assert_eq!(w[0].con_id, second.con_id);
    let (notes, raw) = d.session.notifications();
    assert!(notes.is_empty(), "opening a window is not announced:\n{raw}");
}

#[test]
fn terminate_and_stop_unit_end_what_holds_the_gpu_after_asking() {
    let Some(mut d) = Desk::set_up() else { return };
    let dev = d.sim.dev();
    // SAFETY: getuid cannot fail.
    assert!(
        unsafe { libc::getuid() } == 0,
        "run as root: the test starts a process as another user and a systemd manager"
    );
    // Three processes on the GPU's nodes before the tray starts (it reads the machine when
    // it starts and after each change; a process opening a node is no event, and the tray
    // does not poll): mine, somebody else's (nobody's), and my CUDA service, a unit of a
    // real systemd user manager.
    let mut mine = Holder::of(&dev.join("nvidia0"), None);
    let mut theirs = Holder::of(&dev.join("nvidiactl"), Some(65534));
    let runtime = d.session.dir.path().join("runtime");
    // The systemd part makes a cgroup of its own, a write under /sys/fs/cgroup: opt-in
    // (HANDOFF_TEST_CGROUP=1), since tests do not write to the real /sys by default.
    let systemd = UserManager::start_if_allowed(d.session.dir.path(), &runtime);
    let unit = format!("handoff-test-cuda-{}.service", std::process::id());
    let service = systemd.as_ref().map(|systemd| {
        let out = systemd.run(
            &unit,
            &[&format!(
                "StandardInput=file:{}",
                dev.join("nvidia-uvm").display()
            )],
            &["/usr/bin/sleep", "600"],
        );
        assert!(out.status.success(), "systemd-run: {out:?}");
        let service = systemd.main_pid(&unit).expect("the unit's main pid");
        let cgroup = fs::read_to_string(format!("/proc/{service}/cgroup")).unwrap();
        assert!(
            cgroup.contains(&format!("/user@0.service/app.slice/{unit}")),
            "{cgroup}"
        );
        wait_for(
            Duration::from_secs(10),
            "the unit's process to open the node",
            || fs::read_link(format!("/proc/{service}/fd/0")).is_ok_and(|p| p == dev.join("nvidia-uvm")),
        );
        service
    });
    let n = if service.is_some() { 3 } else { 2 };

    let (conn, item) = d.start_tray_seeing("busy icon with all the processes", |v| {
        v.icon_name == "handoff-busy" && v.tooltip_text.contains(&format!("{n} processes use the GPU"))
    });
    let menu = item.menu(&conn);
    let gpu = format!("Using the GPU ({n})");
    let gpu = gpu.as_str();
    let my_row = format!("sleep (pid {}, root)", mine.pid());
    let their_row = format!("sleep (pid {}, nobody)", theirs.pid());
    let unit_row = service.map(|service| format!("sleep (pid {service}, root, {unit})"));
    let rows: Vec<&str> = menu
        .iter()
        .filter(|e| e.parents == [gpu])
        .map(|e| e.label.as_str())
        .collect();
    for r in [Some(&my_row), Some(&their_row), unit_row.as_ref()]
        .into_iter()
        .flatten()
    {
        assert!(rows.contains(&r.as_str()), "no {r:?} in {rows:#?}");
    }
    let offered = |row: &str| -> Vec<(String, bool)> {
        item.menu(&conn)
            .into_iter()
            .filter(|e| e.parents.last().map(String::as_str) == Some(row))
            .map(|e| (e.label, e.enabled))
            .collect()
    };
    assert_eq!(offered(&my_row), [("Terminate…".to_owned(), true)]);
    assert_eq!(
        offered(&their_row),
        [("not yours (nobody): ask its owner or root".to_owned(), false)]
    );
    let stop = format!("Stop {unit}…");
    if let Some(unit_row) = &unit_row {
        assert_eq!(
            offered(unit_row),
            [("Terminate…".to_owned(), true), (stop.clone(), true)]
        );
    }
    let terminate = format!("Really terminate sleep (pid {})? (SIGTERM)", mine.pid());
    let really = menu.iter().find(|e| e.label == terminate).unwrap();
    assert_eq!(
        really.parents,
        [gpu, my_row.as_str(), "Terminate…"],
        "asked first, under the process it ends"
    );
    let stop_question = format!("Really stop {unit}? (systemctl --user stop)");
    if let Some(unit_row) = &unit_row {
        let really = menu.iter().find(|e| e.label == stop_question).unwrap();
        assert_eq!(really.parents, [gpu, unit_row.as_str(), stop.as_str()]);
    }
    shot(&d.session, "holders");

    // "Terminate…" itself only holds the question: clicking it ends nothing.
    item.click(&conn, "Terminate…");
    assert!(
        !item.view(&conn).title.starts_with("GPU: "),
        "the tray did not act"
    );
    assert!(matches!(mine.0.try_wait(), Ok(None)), "ended without the answer");

    let t = Instant::now();
    item.click(&conn, &terminate);
    wait_for(Duration::from_secs(10), "my holder to end", || {
        matches!(mine.0.try_wait(), Ok(Some(_)))
    });
    let st = mine.0.try_wait().unwrap().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGTERM), "ended by SIGTERM: {st:?}");
    let left = |k: usize| match k {
        1 => "1 process uses the GPU".to_owned(),
        k => format!("{k} processes use the GPU"),
    };
    wait_view(&conn, &item, "one process fewer", |v| {
        v.tooltip_text.contains(&left(n - 1)) && !v.title.starts_with("GPU: ")
    });
    eprintln!("  Terminate → holder gone, item updated: {:?}", t.elapsed());
    assert!(
        matches!(theirs.0.try_wait(), Ok(None)),
        "somebody else's process was not touched"
    );
    assert!(!item.menu(&conn).iter().any(|e| e.label == my_row));

    if let (Some(systemd), Some(service)) = (&systemd, service) {
        let t = Instant::now();
        item.click(&conn, &stop_question);
        wait_view(&conn, &item, "one process left", |v| {
            v.tooltip_text.contains("1 process uses the GPU") && !v.title.starts_with("GPU: ")
        });
        eprintln!("  Stop unit → unit stopped, item updated: {:?}", t.elapsed());
        assert_ne!(systemd.active_state(&unit), "active");
        assert!(
            fs::read_to_string(format!("/proc/{service}/stat")).map_or(true, |s| s.contains(") Z")),
            "the unit's process has ended"
        );
    } else {
        eprintln!(
            "  Stop unit: not run (set HANDOFF_TEST_CGROUP=1 to run it; it makes a cgroup under /sys/fs/cgroup)"
        );
    }
    let (notes, raw) = d.session.notifications();
    assert!(notes.is_empty(), "nothing failed, nothing to say:\n{raw}");
    assert!(matches!(theirs.0.try_wait(), Ok(None)));
    let menu = item.menu(&conn);
    let rows: Vec<&str> = menu
        .iter()
        .filter(|e| e.parents == ["Using the GPU (1)"])
        .map(|e| e.label.as_str())
        .collect();
    assert_eq!(rows, [their_row.as_str()]);
}

// ---------------------------------------------------------------------------------------
// The real system libvirtd, the real hook, a simulated RTX 3090 Ti behind FUSE

/// Drops in declaration order: i3 and its windows, the session (tray, its bus, panel,
/// dunst, X), the domains (their destroy runs the hook's release, which needs the mount),
/// the mount, /etc/handoff, the hooks, the lock.
struct Scene {
    i3: Desktop,
    session: Session,
    win: TestDomain,
    ai: TestDomain,
    stage: Stage,
}

impl Scene {
    fn set_up() -> Option<Scene> {
        let mut session = Session::start(800, 600)?;
        let i3 = with_i3(&mut session)?;
        let stage = Stage::set_up()?;
        let win = TestDomain::define();
        let ai = TestDomain::define();
        // A long graceful timeout: the guests have no OS to honour the power button, so
        // the test plays the guest's power-off itself while the tray waits (see switch).
        let text = format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\nwatchdog_s = 2\n\n{}{}\
             [[vm]]\nname = \"{}\"\nlabel = \"Windows\"\nshutdown_timeout_s = 60\n\n\
             [[vm]]\nname = \"{}\"\nlabel = \"AI\"\nshutdown_timeout_s = 60\n",
            stage.host_section(),
            looking_glass(),
            win.name(),
            ai.name()
        );
        stage.install(&text, &built(TRAY, "handoff", "handoff"));
        Some(Scene {
            i3,
            session,
            win,
            ai,
            stage,
        })
    }

    fn item(&self) -> (Connection, Item) {
        let conn = self.session.conn();
        let item = find_item(&self.session, &conn);
        wait_view(&conn, &item, "host icon", |v| v.icon_name == "handoff-host");
        (conn, item)
    }

    /// Starts the Windows VM from the menu and waits for the tray to show it.
    fn start_windows(&self, conn: &Connection, item: &Item) {
        item.click(conn, "Start Windows");
        let title = "RTX 3090 Ti: Windows";
        wait_view(conn, item, "Windows with the GPU", |v| {
            v.icon_name == "handoff-vm" && v.title == title
        });
        assert_eq!(self.win.state(), "running");
        assert!(self.stage.on_vfio(), "{:?}", self.stage.drivers());
    }
}

#[test]
fn looking_glass_switch_and_force_stop_from_the_menu() {
    let Some(mut s) = Scene::set_up() else { return };
    let mut c = Command::new(TRAY);
    c.env("HANDOFF_CONFIG", SYSTEM_CONFIG);
    start_tray(&mut s.session, &mut c);
    let (conn, item) = s.item();
    assert!(!item.menu(&conn).iter().any(|e| e.label.starts_with("Switch to")));
    let lg = item
        .menu(&conn)
        .into_iter()
        .find(|e| e.label == "Open Looking Glass")
        .unwrap();
    assert!(!lg.enabled, "no VM, nothing to look at");

    s.start_windows(&conn, &item);

    // "Open Looking Glass": the client on its workspace, focused.
    assert!(windows_of(&s.i3, LG_CLASS).is_empty());
    let t = Instant::now();
    item.click(&conn, "Open Looking Glass");
    wait_window(&s.i3, LG_CLASS, "the client on its workspace", |w| {
        w.len() == 1 && w[0].workspace.as_deref() == Some(LG_WORKSPACE) && w[0].focused
    });
    eprintln!(
        "  Open Looking Glass → client on {LG_WORKSPACE}: {:?}",
        t.elapsed()
    );
    assert_eq!(s.i3.focused_workspace().as_deref(), Some(LG_WORKSPACE));
    let client = windows_of(&s.i3, LG_CLASS).remove(0);
    shot(&s.session, "looking-glass");

    // Back on workspace 1, a left click on the icon brings the same client back.
    s.i3.i3().command("workspace 1").unwrap();
    assert_eq!(s.i3.focused_workspace().as_deref(), Some("1"));
    item.activate(&conn);
    wait_for(
        Duration::from_secs(30),
        "the left click to focus the client",
        || s.i3.focused_workspace().as_deref() == Some(LG_WORKSPACE),
    );
    let w = windows_of(&s.i3, LG_CLASS);
    assert_eq!(w.len(), 1, "focused, not started again: {w:?}");
    assert_eq!(w[0].con_id, client.con_id);
    let (notes, _) = s.session.notifications();
    assert!(
        !notes.iter().any(|n| n.summary.contains("Looking Glass")),
        "{notes:#?}"
    );

    // "Switch to AI": Windows is asked to shut down; the tiny guest has no OS to hear the
    // power button, so the test powers it off (virsh destroy) while the tray waits.
    let menu = item.menu(&conn);
    assert!(
        menu.iter().any(|e| e.label == "Switch to AI" && e.enabled),
        "{menu:#?}"
    );
    assert!(!menu.iter().any(|e| e.label == "Start AI"));
    let t = Instant::now();
    item.click(&conn, "Switch to AI");
    wait_view(&conn, &item, "switching", |v| {
        v.title == format!("GPU: switching to {}…", s.ai.name())
    });
    shot(&s.session, "switching");
    let asked = format!(
        "Asking Windows ({}) to shut down (ACPI power button)",
        s.win.name()
    );
    wait_for(Duration::from_secs(10), "the graceful shutdown request", || {
        s.session.log("tray").contains(&asked)
    });
    assert_eq!(s.win.state(), "running");
    assert!(s.stage.on_vfio(), "the GPU stays with Windows until it is off");
    s.win.destroy().unwrap();
    let title = "RTX 3090 Ti: AI";
    wait_view(&conn, &item, "AI with the GPU", |v| {
        v.icon_name == "handoff-vm" && v.title == title
    });
    eprintln!("  Switch to AI → AI has the GPU: {:?}", t.elapsed());
    assert_eq!(s.ai.state(), "running");
    assert_eq!(s.win.state(), "shut off");
    assert!(s.stage.on_vfio(), "{:?}", s.stage.drivers());
    let record = handoff::bind::record::RestoreRecord::load(&s.stage.host, RTX_3090_TI)
        .unwrap()
        .expect("the hook's record");
    assert_eq!(record.vm.as_deref(), Some(s.ai.name()));
    let menu = item.menu(&conn);
    assert!(menu.iter().any(|e| e.label == "Switch to Windows"), "{menu:#?}");

    // "Force stop AI…" is a question; the answer forces.
    item.click(&conn, "Force stop AI…");
    let v = item.view(&conn);
    assert_eq!(v.title, title, "nothing happens before the answer");
    assert_eq!(s.ai.state(), "running");
    let question = format!(
        "Really force AI ({}) off? (unsaved work in it is lost)",
        s.ai.name()
    );
    let t = Instant::now();
    item.click(&conn, &question);
    wait_view(&conn, &item, "host icon after force stop", |v| {
        v.icon_name == "handoff-host" && !v.title.starts_with("GPU: ")
    });
    eprintln!("  Force stop → host icon: {:?}", t.elapsed());
    assert_eq!(s.ai.state(), "shut off");
    assert!(s.stage.on_host(), "{:?}", s.stage.drivers());

    let (notes, raw) = s.session.notifications();
    let summaries: Vec<&str> = notes.iter().map(|n| n.summary.as_str()).collect();
    assert!(summaries.contains(&"AI is running"), "{raw}");
    assert!(
        !summaries
            .iter()
            .any(|s| s.contains("did not") || s.contains("failed")),
        "{summaries:#?}"
    );
}

#[test]
fn return_gpu_to_linux_runs_pkexec_handoff_rebind_after_a_failed_return() {
    let Some(mut s) = Scene::set_up() else { return };
    let Some(bus) = SystemBus::prepare(s.session.dir.path()) else {
        return;
    };
    // The tray in a mount namespace whose /run/dbus is the test's system bus.
    let mut c = bus.command(Path::new(TRAY));
    c.env("HANDOFF_CONFIG", SYSTEM_CONFIG);
    let tray_pid = start_tray(&mut s.session, &mut c);
    let (conn, item) = s.item();
    s.start_windows(&conn, &item);

    // The audio function will not come back: the kernel refuses to probe it.
    let audio = RTX_3090_TI.with_function(1);
    send_command(
        s.stage.mount.path(),
        &format!("fail drivers_probe ENODEV {audio} always\n"),
    )
    .unwrap();
    item.click(
        &conn,
        &format!(
            "Really force Windows ({}) off? (unsaved work in it is lost)",
            s.win.name()
        ),
    );
    let v = wait_view(&conn, &item, "restore icon", |v| {
        v.icon_name == "handoff-restore" && !v.title.starts_with("GPU: forcing")
    });
    assert!(v.title.starts_with("GPU: restore required ("), "{v:#?}");
    assert!(v.title.contains(&audio.to_string()), "{v:#?}");
    assert_eq!(s.win.state(), "shut off");
    assert!(!s.stage.on_host(), "{:?}", s.stage.drivers());
    let menu = item.menu(&conn);
    assert!(
        menu.iter().any(|e| e.label == "Return GPU to Linux" && e.enabled),
        "{menu:#?}"
    );
    shot(&s.session, "restore-required");

    // No polkit daemon on the system bus: pkexec cannot ask anyone, and the tray says what
    // failed and what to type instead.
    let before = s.session.notifications().0.len();
    item.click(&conn, "Return GPU to Linux");
    wait_for(Duration::from_secs(30), "pkexec's failure", || {
        s.session.notifications().0[before..]
            .iter()
            .any(|n| n.summary == "The GPU was not returned to Linux")
    });
    let (notes, _) = s.session.notifications();
    let n = notes
        .iter()
        .rev()
        .find(|n| n.summary == "The GPU was not returned to Linux")
        .unwrap();
    let handoff = built(TRAY, "handoff", "handoff");
    // What to type first (a long reason must not push it out of the box), then pkexec's
    // own reason.
    assert!(
        n.body.starts_with(&format!(
            "From a terminal: sudo handoff rebind --force\npkexec {} rebind --force --gpu {RTX_3090_TI}: ",
            handoff.display()
        )),
        "{n:#?}"
    );
    assert!(n.body.contains("PolicyKit1"), "pkexec's own reason: {n:#?}");
    let v = wait_view(&conn, &item, "the restore icon again", |v| {
        !v.title.starts_with("GPU: returning")
    });
    assert_eq!(v.icon_name, "handoff-restore");
    shot(&s.session, "rebind-failed");

    // The kernel lets the audio function probe again, polkitd runs: pkexec runs the real
    // `handoff rebind --force` as root, which brings every function home.
    send_command(s.stage.mount.path(), "clear\n").unwrap();
    let polkitd = bus.start_polkitd(tray_pid);
    s.session.others.push(polkitd);
    let t = Instant::now();
    item.click(&conn, "Return GPU to Linux");
    wait_view(&conn, &item, "host icon after Return GPU to Linux", |v| {
        v.icon_name == "handoff-host" && !v.title.starts_with("GPU: ")
    });
    eprintln!("  Return GPU to Linux (pkexec) → host icon: {:?}", t.elapsed());
    assert!(s.stage.on_host(), "{:?}", s.stage.drivers());
    assert!(
        handoff::bind::record::RestoreRecord::load(&s.stage.host, RTX_3090_TI)
            .unwrap()
            .is_none(),
        "the record is gone once the GPU is home"
    );
    let menu = item.menu(&conn);
    assert!(!menu.iter().any(|e| e.label == "Return GPU to Linux"));
    wait_for(Duration::from_secs(10), "the GPU's return announced", || {
        s.session
            .notifications()
            .0
            .last()
            .is_some_and(|n| n.summary == "GPU back on Linux")
    });
    shot(&s.session, "returned");
}
