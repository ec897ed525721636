//! The details window's buttons, pressed for real: the window runs on Xvfb under a real i3
//! with a private session bus, and the test reads it and presses its buttons through the
//! accessibility bus, as a screen reader would (`a11y/mod.rs`), confirmation dialogs
//! included. What each button does is checked on the real thing:
//!
//! - "Terminate" (after its question; "Cancel" first) ends the test's own process holding a
//!   GPU node; "Stop <unit>" stops a unit of a real systemd user manager;
//! - with the real system libvirtd, the real hook and a simulated RTX 3090 Ti behind FUSE:
//!   "Start", "Open Looking Glass" (a stand-in client on its i3 workspace), "Switch to AI"
//!   (the guest's power-off played by `virsh destroy`: the tiny guests have no OS to hear
//!   the power button), "Stop" (that times out: no OS) and "Force stop…";
//! - after a return that fails in the simulated kernel, "Return GPU to Linux" runs the real
//!   pkexec: without polkitd it says so, with the real polkitd on a system bus of the test's
//!   own it brings the GPU home.
//!
//! What it changes outside its temp dirs, for the length of a test only: with libvirt,
//! `/etc/libvirt/hooks` and `/etc/handoff` (moved aside and put back), the test's own
//! cgroup for the systemd user manager (removed again). Every process is killed by
//! process group, also when the test fails. `HANDOFF_SCREENSHOTS=DIR` keeps screenshots.
//!
//! Run as root with `/dev/fuse`: `cargo test -p handoff-details --test buttons`.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use handoff::simulated_tree::RTX_3090_TI;
use handoff_kernelsim::send_command;
use handoff_test_support::a11y::{A11y, dialog, main_window};
use handoff_test_support::config::workstation_with_test_vm;
use handoff_test_support::desktop::Desktop;
use handoff_test_support::libvirt::TestDomain;
use handoff_test_support::process::{Group, holder, stdout_lines};
use handoff_test_support::stage::{SYSTEM_CONFIG, Stage};
use handoff_test_support::system_bus::SystemBus;
use handoff_test_support::systemd_user::UserManager;
use handoff_test_support::tools::{have_all, required};

const BIN: &str = env!("CARGO_BIN_EXE_handoff-details");
const WAIT: Duration = Duration::from_secs(60);
const LG_CLASS: &str = "looking-glass-client";
const LG_WORKSPACE: &str = "lg 10";

/// A desktop: Xvfb and i3 (`handoff_test_support::desktop`) and a session bus of the test's
/// own, started with the test's HOME and runtime dir (the accessibility bus it starts on
/// demand puts its socket there). Drops the window first, then the bus (and what it
/// started), then i3 and X.
struct Session {
    window: Option<Group>,
    _bus_daemon: Group,
    desk: Desktop,
    dir: tempfile::TempDir,
    bus: String,
}

impl Session {
    fn start() -> Option<Session> {
        if !have_all(&["dbus-daemon", "xterm", "import"]) {
            return None;
        }
        if !Path::new("/usr/libexec/at-spi-bus-launcher").exists() {
            required(
                "at-spi2-core is not installed: the tests read the window through its accessibility bus",
            );
            return None;
        }
        let desk = Desktop::start(None)?;
        let dir = tempfile::tempdir().unwrap();
        for d in ["home", "runtime", "cache", "config", "data"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        fs::set_permissions(dir.path().join("runtime"), fs::Permissions::from_mode(0o700)).unwrap();
        let mut c = Command::new("dbus-daemon");
        c.args(["--session", "--nofork", "--print-address=1"])
            .arg(format!(
                "--address=unix:path={}",
                dir.path().join("bus").display()
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
        env(&mut c, dir.path(), &desk.display);
        let mut daemon = Group(c.spawn().expect("start dbus-daemon"));
        let mut address = String::new();
        BufReader::new(daemon.0.stdout.take().unwrap())
            .read_line(&mut address)
            .unwrap();
        assert!(address.starts_with("unix:"), "dbus-daemon said {address:?}");
        Some(Session {
            window: None,
            _bus_daemon: daemon,
            desk,
            dir,
            bus: address.trim().to_owned(),
        })
    }

    fn runtime(&self) -> PathBuf {
        self.dir.path().join("runtime")
    }

    /// `cmd` (handoff-details, maybe behind a wrapper) as the desktop starts it, with
    /// `config`; its dumped views arrive on the returned channel, its log goes to
    /// `details.log`.
    fn open_window(&mut self, mut cmd: Command, config: &Path) -> Views {
        cmd.arg("-v")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NO_AT_BRIDGE", "1")
            .env("GDK_BACKEND", "x11")
            .env("GSETTINGS_BACKEND", "memory")
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus)
            .env("I3SOCK", &self.desk.socket)
            .env("HANDOFF_CONFIG", config)
            .env("HANDOFF_DETAILS_DUMP", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(self.dir.path().join("details.log")).unwrap())
            .process_group(0);
        env(&mut cmd, self.dir.path(), &self.desk.display);
        let mut child = cmd.spawn().expect("start handoff-details");
        let rx = stdout_lines(&mut child, |l| serde_json::from_str::<Value>(&l).ok());
        self.window = Some(Group(child));
        Views { rx, seen: Vec::new() }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("details.log")).unwrap_or_default()
    }

    fn shot(&self, name: &str) {
        if let Some(dir) = std::env::var_os("HANDOFF_SCREENSHOTS") {
            std::thread::sleep(Duration::from_millis(500));
            assert!(
                self.desk
                    .screenshot(&Path::new(&dir).join(format!("details-{name}.png")))
            );
        }
    }
}

/// The environment of everything in the session.
fn env(c: &mut Command, dir: &Path, display: &str) {
    c.env("DISPLAY", display)
        .env("HOME", dir.join("home"))
        .env("XDG_RUNTIME_DIR", dir.join("runtime"))
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_DATA_HOME", dir.join("data"));
}

/// The views the window dumped (`HANDOFF_DETAILS_DUMP=1`), in order.
struct Views {
    rx: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Views {
    /// The first view from now on for which `ok` holds.
    fn wait_for(&mut self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if ok(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no view with {what} within {WAIT:?}; the last was {:#?}",
                    self.seen.last()
                ),
            }
        }
    }

    /// Every view received so far (without waiting).
    fn drain(&mut self) -> &[Value] {
        while let Ok(v) = self.rx.try_recv() {
            self.seen.push(v);
        }
        &self.seen
    }
}

fn labels(buttons: &Value) -> Vec<&str> {
    buttons
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap())
        .collect()
}

/// The shared wait with this file's patience.
fn wait_for(what: &str, ok: impl FnMut() -> bool) {
    handoff_test_support::wait::wait_for(WAIT, what, ok);
}

/// The accessible object path of the main window's "Refresh" button.
fn refresh_button(a: &A11y) -> String {
    let nodes = a.nodes();
    let main = nodes
        .iter()
        .position(|n| n.depth == 1 && main_window(n))
        .expect("the main window");
    nodes[main + 1..]
        .iter()
        .take_while(|n| n.depth > 1)
        .find(|n| n.role == "button" && n.name == "Refresh")
        .map(|n| n.path.to_string())
        .expect("a Refresh button")
}

/// The texts of the open dialog (None when there is none).
fn dialog_texts(a: &A11y) -> Option<Vec<String>> {
    let nodes = a.nodes();
    let start = nodes.iter().position(|n| n.depth == 1 && dialog(n))?;
    Some(
        nodes[start + 1..]
            .iter()
            .take_while(|n| n.depth > 1)
            .filter(|n| n.role == "label")
            .map(|n| n.name.clone())
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// The holders' buttons: no libvirt daemon needed

#[test]
fn terminate_asks_first_then_ends_my_process() {
    let Some(mut s) = Session::start() else { return };
    let (sim, config) = workstation_with_test_vm(s.dir.path(), "");
    let mut holder = holder(&sim.dev().join("nvidia0"));
    let pid = holder.0.id();
    let mut views = s.open_window(Command::new(BIN), &config);
    let v = views.wait_for("the holder", |v| {
        v["holders"]
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["pid"] == pid))
    });
    assert_eq!(labels(&v["holders"][0]["buttons"]), ["Terminate"]);
    let a = A11y::connect(&s.bus, "handoff-details");
    // What a screen reader reads in the holder's row.
    let texts = a.wait_text("the holder's pid", |t| t == pid.to_string());
    assert_eq!(texts, pid.to_string());

    // The question, then "Cancel": nothing happens.
    a.press(main_window, Some(&pid.to_string()), "Terminate");
    wait_for("the question", || dialog_texts(&a).is_some());
    let q = dialog_texts(&a).unwrap();
    assert!(q.contains(&format!("Terminate sleep (pid {pid})?")), "{q:#?}");
    assert!(
        q.contains(&"It is sent SIGTERM and may lose unsaved work.".to_owned()),
        "{q:#?}"
    );
    s.shot("terminate-question");
    a.press(dialog, None, "Cancel");
    wait_for("the question to go", || dialog_texts(&a).is_none());
    let before = views.drain().len();
    let refresh = refresh_button(&a);
    a.press(main_window, None, "Refresh");
    let v = views.wait_for("a fresh read", |v| v["busy"].is_null());
    // A read that shows nothing new is not drawn again: the button just pressed (where the
    // keyboard focus and a screen reader are) is the same object, not a new one.
    assert_eq!(refresh_button(&a), refresh, "the window was rebuilt for nothing");
    assert!(
        views.seen[before..].iter().all(|v| v["busy"].is_null()),
        "Cancel ran the action: {:#?}",
        &views.seen[before..]
    );
    assert!(matches!(holder.0.try_wait(), Ok(None)), "Cancel ended it");
    assert!(
        v["holders"].as_array().unwrap().iter().any(|h| h["pid"] == pid),
        "{v:#}"
    );

    // The question, then "Terminate": SIGTERM, and the window says it has ended — while
    // the test (its parent) has not collected it yet.
    let t = Instant::now();
    a.press(main_window, Some(&pid.to_string()), "Terminate");
    wait_for("the question", || dialog_texts(&a).is_some());
    a.press(dialog, None, "Terminate");
    let said = a.wait_text("the outcome", |t| t.starts_with(&format!("sleep (pid {pid})")));
    eprintln!("  Terminate → {said:?}: {:?}", t.elapsed());
    assert_eq!(said, format!("sleep (pid {pid}) has ended."));
    let st = holder.0.try_wait().unwrap().expect("it has ended");
    assert_eq!(st.signal(), Some(libc::SIGTERM), "{st:?}");
    let v = views.wait_for("no holder", |v| {
        v["busy"].is_null() && v["holders"].as_array().is_some_and(|h| h.is_empty())
    });
    assert_eq!(v["headline"], "GPU is on Linux (nvidia)");
    s.shot("terminated");
}

/// Two GPUs: the window shows each, the primary one (the RTX) on top and the iGPU in a
/// section of its own with its verdict headline, functions and holders, as a screen reader
/// reads it; the iGPU's holder's "Terminate" works from that section.
#[test]
fn with_two_gpus_each_has_its_section_and_the_second_ones_holder_can_be_terminated() {
    let Some(mut s) = Session::start() else { return };
    let igpu = handoff::simulated_tree::IGPU;
    let (sim, config) = workstation_with_test_vm(
        s.dir.path(),
        &format!("[[gpu]]\naddress = \"{igpu}\"\nlabel = \"UHD 630\"\nhost_driver = \"i915\"\n\n"),
    );
    let text = fs::read_to_string(&config)
        .unwrap()
        .replacen("[gpu]\n", "[[gpu]]\n", 1);
    fs::write(&config, text).unwrap();
    let mut holder = holder(&sim.dev().join("dri/card0"));
    let pid = holder.0.id();
    let mut views = s.open_window(Command::new(BIN), &config);
    let v = views.wait_for("the iGPU's holder", |v| {
        v["other_gpus"][0]["holders"]
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["pid"] == pid))
    });
    assert_eq!(
        v["address"],
        RTX_3090_TI.to_string(),
        "the primary GPU on top: {v:#}"
    );
    assert_eq!(v["holders"], serde_json::json!([]), "{v:#}");
    let igpu_view = &v["other_gpus"][0];
    assert_eq!(igpu_view["title"], format!("UHD 630 · {igpu}"));
    assert_eq!(igpu_view["verdict"]["state"], "busy", "{igpu_view:#}");
    let headline = igpu_view["headline"].as_str().unwrap().to_owned();
    assert_eq!(igpu_view["functions"][0]["driver"], "i915");

    // What a screen reader reads: the primary GPU's sections, then the iGPU's title, its
    // headline, its holder and its function.
    let a = A11y::connect(&s.bus, "handoff-details");
    let title = format!("GPU UHD 630 · {igpu}");
    a.wait_text("the iGPU's section", |t| t == title);
    let texts = a.texts();
    let at = |what: &str, from: usize| {
        texts[from..]
            .iter()
            .position(|t| t == what)
            .map(|i| i + from)
            .unwrap_or_else(|| panic!("no {what:?} after #{from} in {texts:#?}"))
    };
    let primary = at(v["headline"].as_str().unwrap(), 0);
    let nothing = at("Nothing that this window can see.", primary);
    let section = at(&title, nothing);
    let igpu_headline = at(&headline, section);
    let held = at(&pid.to_string(), igpu_headline);
    at(&igpu.to_string(), held);
    s.shot("two-gpus");

    // Its holder's "Terminate", from the iGPU's section.
    a.press(main_window, Some(&pid.to_string()), "Terminate");
    wait_for("the question", || dialog_texts(&a).is_some());
    let q = dialog_texts(&a).unwrap();
    assert!(q.contains(&format!("Terminate sleep (pid {pid})?")), "{q:#?}");
    a.press(dialog, None, "Terminate");
    a.wait_text("the outcome", |t| t == format!("sleep (pid {pid}) has ended."));
    let st = holder.0.try_wait().unwrap().expect("it has ended");
    assert_eq!(st.signal(), Some(libc::SIGTERM), "{st:?}");
    let v = views.wait_for("the iGPU free of it", |v| {
        v["busy"].is_null()
            && v["other_gpus"][0]["holders"]
                .as_array()
                .is_some_and(|h| h.is_empty())
    });
    assert_ne!(v["other_gpus"][0]["verdict"]["state"], "busy", "{v:#}");
}

#[test]
fn stop_unit_asks_first_then_stops_my_service() {
    let Some(mut s) = Session::start() else { return };
    // SAFETY: getuid cannot fail.
    assert!(
        unsafe { libc::getuid() } == 0,
        "run as root: the test starts a systemd manager"
    );
    let (sim, config) = workstation_with_test_vm(s.dir.path(), "");
    let runtime = s.runtime();
    // Opt-in: the manager's cgroup is a write under /sys/fs/cgroup (HANDOFF_TEST_CGROUP=1).
    let Some(systemd) = UserManager::start_if_allowed(s.dir.path(), &runtime) else {
        return;
    };
    let unit = format!("handoff-test-cuda-{}.service", std::process::id());
    let node = sim.dev().join("nvidia0");
    let out = systemd.run(
        &unit,
        &[&format!("StandardInput=file:{}", node.display())],
        &["/usr/bin/sleep", "600"],
    );
    assert!(out.status.success(), "systemd-run: {out:?}");
    let pid = systemd.main_pid(&unit).expect("the unit's main pid");
    wait_for("the unit's process to open the node", || {
        fs::read_link(format!("/proc/{pid}/fd/0")).is_ok_and(|p| p == node)
    });

    let mut views = s.open_window(Command::new(BIN), &config);
    let v = views.wait_for("the unit's process", |v| {
        v["holders"]
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["pid"] == pid))
    });
    let row = &v["holders"][0];
    assert_eq!(row["unit"], unit.as_str());
    let stop = format!("Stop {unit}");
    assert_eq!(labels(&row["buttons"]), ["Terminate", stop.as_str()]);
    let a = A11y::connect(&s.bus, "handoff-details");
    a.press(main_window, Some(&pid.to_string()), &stop);
    wait_for("the question", || dialog_texts(&a).is_some());
    let q = dialog_texts(&a).unwrap();
    assert!(q.contains(&format!("Stop {unit}?")), "{q:#?}");
    assert!(
        q.contains(&format!(
            "`systemctl stop {unit}` ends every process of the unit, not only sleep."
        )),
        "{q:#?}"
    );
    s.shot("stop-unit-question");
    let t = Instant::now();
    a.press(dialog, None, "Stop");
    let said = a.wait_text("the outcome", |t| {
        t.starts_with("Stopped ") || t.contains("` failed (") || t.starts_with("Could not run")
    });
    eprintln!("  Stop unit → {said:?}: {:?}", t.elapsed());
    assert_eq!(said, format!("Stopped {unit}."));
    assert_ne!(systemd.active_state(&unit), "active");
    views.wait_for("no holder", |v| {
        v["busy"].is_null() && v["holders"].as_array().is_some_and(|h| h.is_empty())
    });
}

// ---------------------------------------------------------------------------------------
// The VM buttons: the real system libvirtd, the real hook, a simulated RTX 3090 Ti (FUSE)

/// Drops in declaration order: the session (window, bus, i3 and its clients, X), the
/// domains (their destroy runs the hook's release, which needs the mount), the mount,
/// /etc/handoff, the hooks, the lock.
struct Scene {
    s: Session,
    win: TestDomain,
    ai: TestDomain,
    stage: Stage,
}

/// The `handoff` CLI beside the window (the hook shim and pkexec run it): built when
/// missing or stale, as in a `cargo test -p handoff-details` that did not build the CLI.
fn handoff_bin() -> PathBuf {
    handoff_test_support::bins::sibling(Path::new(BIN).parent().unwrap(), "handoff", "handoff", &["src"])
}

impl Scene {
    fn set_up() -> Option<Scene> {
        let s = Session::start()?;
        let stage = Stage::set_up()?;
        let win = TestDomain::define();
        let ai = TestDomain::define();
        // Windows waits long for its guest to power off (the test plays that part when it
        // switches); AI gives up after 2 s (its graceful stop is shown timing out).
        let text = format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\nwatchdog_s = 2\n\n{}\
             [looking_glass]\ncommand = \"xterm\"\nargs = [\"-class\", \"{LG_CLASS}\", \"-e\", \"sleep\", \"600\"]\n\
             workspace = \"{LG_WORKSPACE}\"\nwindow_class = \"{LG_CLASS}\"\n\n\
             [[vm]]\nname = \"{}\"\nlabel = \"Windows\"\nshutdown_timeout_s = 60\n\n\
             [[vm]]\nname = \"{}\"\nlabel = \"AI\"\nshutdown_timeout_s = 2\n",
            stage.host_section(),
            win.name(),
            ai.name()
        );
        stage.install(&text, &handoff_bin());
        Some(Scene { s, win, ai, stage })
    }

    /// The row anchor of a VM: its name label, "Windows (handoff-test-…)".
    fn row(label: &str, dom: &TestDomain) -> String {
        format!("{label} ({})", dom.name())
    }

    /// Presses "Start" in the Windows row; returns what the window then says.
    fn start_windows(&self, a: &A11y, views: &mut Views) -> String {
        a.press(main_window, Some(&Scene::row("Windows", &self.win)), "Start");
        let said = a.wait_text("Windows running", |t| t.starts_with("Windows is running"));
        views.wait_for("Windows with the GPU", |v| {
            v["busy"].is_null() && v["owner"] == "vm" && v["headline"] == "RTX 3090 Ti: Windows"
        });
        assert_eq!(self.win.state(), "running");
        assert!(self.stage.on_vfio(), "{:?}", self.stage.drivers());
        said
    }
}

#[test]
fn start_looking_glass_switch_stop_and_force_stop_against_the_real_libvirtd() {
    let Some(mut sc) = Scene::set_up() else { return };
    let mut views = sc.s.open_window(Command::new(BIN), Path::new(SYSTEM_CONFIG));
    let v = views.wait_for("both VMs shut off", |v| {
        v["vms"]
            .as_array()
            .is_some_and(|vms| vms.len() == 2 && vms.iter().all(|m| m["state"] == "shut off"))
    });
    assert_eq!(labels(&v["vms"][0]["buttons"]), ["Start"]);
    assert_eq!(labels(&v["vms"][1]["buttons"]), ["Start"]);
    let a = A11y::connect(&sc.s.bus, "handoff-details");

    let t = Instant::now();
    let said = sc.start_windows(&a, &mut views);
    eprintln!("  Start → {said:?}: {:?}", t.elapsed());
    assert_eq!(
        said,
        format!("Windows is running; GPU {RTX_3090_TI} is on vfio-pci.")
    );
    let v = views.wait_for("AI offered a switch", |v| v["busy"].is_null());
    assert_eq!(labels(&v["vms"][0]["buttons"]), ["Stop", "Force stop…"]);
    assert_eq!(labels(&v["vms"][1]["buttons"]), ["Switch to AI"]);
    assert_eq!(labels(&v["actions"]), ["Open Looking Glass", "Refresh"]);
    sc.s.shot("vm-started");

    // Open Looking Glass: the client on its workspace.
    let t = Instant::now();
    a.press(main_window, None, "Open Looking Glass");
    wait_for("the client on its workspace", || {
        let w: Vec<_> =
            sc.s.desk
                .windows()
                .into_iter()
                .filter(|w| w.is(LG_CLASS))
                .collect();
        w.len() == 1 && w[0].workspace.as_deref() == Some(LG_WORKSPACE)
    });
    // Not the busy line ("Opening Looking Glass…") nor the button's own label: what came
    // of it.
    let said = a.wait_text("Looking Glass's outcome", |t| {
        t.contains("Looking Glass") && !t.starts_with("Opening") && t != "Open Looking Glass"
    });
    eprintln!("  Open Looking Glass → {said:?}: {:?}", t.elapsed());
    assert_eq!(
        said,
        format!("Started Looking Glass (xterm) on workspace {LG_WORKSPACE}.")
    );
    sc.s.shot("looking-glass");
    sc.s.desk.i3().command("workspace 1").unwrap();

    // Switch to AI: Windows is asked to shut down; its guest has no OS to hear the power
    // button, so the test powers it off while the window waits.
    let t = Instant::now();
    a.press(main_window, Some(&Scene::row("AI", &sc.ai)), "Switch to AI");
    views.wait_for("switching", |v| v["busy"] == "Switching to AI…");
    let asked = format!(
        "Asking Windows ({}) to shut down (ACPI power button)",
        sc.win.name()
    );
    wait_for("the graceful shutdown request", || sc.s.log().contains(&asked));
    assert_eq!(sc.win.state(), "running");
    assert!(sc.stage.on_vfio());
    sc.win.destroy().unwrap();
    let said = a.wait_text("the switch's outcome", |t| t.contains("AI is running"));
    eprintln!("  Switch to AI → {said:?}: {:?}", t.elapsed());
    assert!(said.starts_with("Windows shut down after "), "{said}");
    assert!(
        said.ends_with(&format!("\nAI is running; GPU {RTX_3090_TI} is on vfio-pci.")),
        "{said}"
    );
    assert_eq!(sc.ai.state(), "running");
    assert!(sc.stage.on_vfio(), "{:?}", sc.stage.drivers());
    let v = views.wait_for("AI with the GPU", |v| {
        v["busy"].is_null() && v["headline"] == "RTX 3090 Ti: AI"
    });
    assert_eq!(labels(&v["vms"][0]["buttons"]), ["Switch to Windows"]);

    // Stop: graceful, and the guest never powers off: the window says so after 2 s.
    a.press(main_window, Some(&Scene::row("AI", &sc.ai)), "Stop");
    let said = a.wait_text("the graceful stop's outcome", |t| {
        t.starts_with("Could not stop AI")
    });
    assert!(said.contains("did not stop within 2 s"), "{said}");
    assert_eq!(sc.ai.state(), "running");

    // Force stop…: a question first; "Cancel" changes nothing, "Force stop" forces.
    a.press(main_window, Some(&Scene::row("AI", &sc.ai)), "Force stop…");
    wait_for("the question", || dialog_texts(&a).is_some());
    let q = dialog_texts(&a).unwrap();
    assert!(q.contains(&"Force AI off?".to_owned()), "{q:#?}");
    sc.s.shot("force-stop-question");
    a.press(dialog, None, "Cancel");
    wait_for("the question to go", || dialog_texts(&a).is_none());
    assert_eq!(sc.ai.state(), "running");
    a.press(main_window, Some(&Scene::row("AI", &sc.ai)), "Force stop…");
    wait_for("the question", || dialog_texts(&a).is_some());
    let t = Instant::now();
    a.press(dialog, None, "Force stop");
    let said = a.wait_text("the force stop's outcome", |t| t.starts_with("AI was forced off"));
    eprintln!("  Force stop → {said:?}: {:?}", t.elapsed());
    assert_eq!(
        said,
        format!("AI was forced off; GPU {RTX_3090_TI} is back on Linux (nvidia).")
    );
    assert_eq!(sc.ai.state(), "shut off");
    assert!(sc.stage.on_host(), "{:?}", sc.stage.drivers());
    views.wait_for("the GPU home", |v| {
        v["busy"].is_null() && v["headline"] == "GPU is on Linux (nvidia)"
    });
}

#[test]
fn return_gpu_to_linux_runs_pkexec_after_a_failed_return() {
    let Some(mut sc) = Scene::set_up() else { return };
    let Some(bus) = SystemBus::prepare(sc.s.dir.path()) else {
        return;
    };
    // The window in a mount namespace whose /run/dbus is the test's system bus.
    let mut views =
        sc.s.open_window(bus.command(Path::new(BIN)), Path::new(SYSTEM_CONFIG));
    let window_pid = sc.s.window.as_ref().unwrap().0.id();
    views.wait_for("the first view", |v| v["busy"].is_null() && v["owner"] == "host");
    let a = A11y::connect(&sc.s.bus, "handoff-details");
    sc.start_windows(&a, &mut views);

    // The audio function will not come back: the kernel refuses to probe it.
    let audio = RTX_3090_TI.with_function(1);
    send_command(
        sc.stage.mount.path(),
        &format!("fail drivers_probe ENODEV {audio} always\n"),
    )
    .unwrap();
    a.press(main_window, Some(&Scene::row("Windows", &sc.win)), "Force stop…");
    wait_for("the question", || dialog_texts(&a).is_some());
    a.press(dialog, None, "Force stop");
    let said = a.wait_text("the failed return", |t| t.starts_with("Could not stop Windows"));
    assert!(said.contains("did not come back to nvidia"), "{said}");
    let v = views.wait_for("restore required", |v| {
        v["busy"].is_null() && v["owner"] == "restore-required"
    });
    assert_eq!(v["headline"], "Restore required");
    assert_eq!(labels(&v["actions"]), ["Return GPU to Linux", "Refresh"]);
    assert!(!sc.stage.on_host());
    sc.s.shot("restore-required");

    // No polkit daemon: pkexec cannot authorise, and the window says what to do instead.
    a.press(main_window, None, "Return GPU to Linux");
    let said = a.wait_text("pkexec's failure", |t| t.starts_with("Not authorised"));
    assert_eq!(
        said,
        format!(
            "Not authorised to run `pkexec {} rebind --force --gpu {RTX_3090_TI}`; run `sudo handoff rebind --force` in a terminal",
            handoff_bin().display()
        )
    );
    assert!(!sc.stage.on_host());

    // The kernel lets the function probe again, polkitd runs: pkexec runs the real
    // `handoff rebind --force` as root.
    send_command(sc.stage.mount.path(), "clear\n").unwrap();
    let _polkitd = Group(bus.start_polkitd(window_pid));
    let t = Instant::now();
    a.press(main_window, None, "Return GPU to Linux");
    let said = a.wait_text("the GPU home", |t| {
        t.starts_with(&format!("GPU {RTX_3090_TI} is back"))
    });
    eprintln!("  Return GPU to Linux → {said:?}: {:?}", t.elapsed());
    assert_eq!(said, format!("GPU {RTX_3090_TI} is back on Linux (nvidia)."));
    assert!(sc.stage.on_host(), "{:?}", sc.stage.drivers());
    let v = views.wait_for("the GPU on Linux", |v| {
        v["busy"].is_null() && v["owner"] == "host"
    });
    assert_eq!(v["headline"], "GPU is on Linux (nvidia)");
    assert_eq!(labels(&v["actions"]), ["Refresh"]);
    sc.s.shot("returned");
}
