//! The real window: `handoff-details` on Xvfb with a private session bus, against a
//! simulated GPU (a `SimHost` tree) and libvirt's built-in test driver. The window's text
//! is read from `HANDOFF_DETAILS_DUMP=1` (one JSON view per render); that the window is
//! mapped is asked of the X server (`xwininfo`); screenshots go to `docs/screenshots/`.
//!
//! Every process (Xvfb, dbus-daemon, the window, the holder) runs in its own process
//! group and is killed by group when the test ends, passing or not. Under `CI=true` a
//! missing Xvfb, dbus-daemon, xwininfo or import fails the test; elsewhere it skips.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use handoff::bind::record::{Phase, RestoreRecord};
use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff::state::{HookState, Refusal};
use handoff_test_support::process::{Group, holder};
use handoff_test_support::tools::have_all;
use handoff_test_support::xvfb;

const BIN: &str = env!("CARGO_BIN_EXE_handoff-details");
const WAIT: Duration = Duration::from_secs(30);

/// Xvfb and a session bus: what a desktop gives the window.
struct Desktop {
    dir: tempfile::TempDir,
    display: String,
    bus: String,
    // Dropped in declaration order: the bus, then the X server.
    _bus: Group,
    _xvfb: Group,
}

impl Desktop {
    fn start() -> Option<Desktop> {
        if !have_all(&["Xvfb", "dbus-daemon", "xwininfo", "import"]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (xvfb, display) = xvfb::start(dir.path(), "800x860x24");
        let xvfb = Group(xvfb);

        let socket = dir.path().join("bus");
        let mut bus = Group::spawn(
            Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--print-address=1"])
                .arg(format!("--address=unix:path={}", socket.display()))
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let mut address = String::new();
        BufReader::new(bus.0.stdout.take().unwrap())
            .read_line(&mut address)
            .unwrap();
        assert!(address.starts_with("unix:"), "dbus-daemon said {address:?}");
        Some(Desktop {
            dir,
            display,
            bus: address.trim().to_owned(),
            _bus: bus,
            _xvfb: xvfb,
        })
    }

    /// Top-level windows whose name starts with `prefix` and that are viewable.
    fn viewable_windows(&self, prefix: &str) -> Vec<String> {
        let tree = Command::new("xwininfo")
            .args(["-root", "-tree", "-display", &self.display])
            .output()
            .unwrap();
        let tree = String::from_utf8_lossy(&tree.stdout).into_owned();
        tree.lines()
            .filter(|l| l.contains(&format!("\"{prefix}")))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .filter(|id| {
                let info = Command::new("xwininfo")
                    .args(["-id", id, "-display", &self.display])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&info.stdout).contains("Map State: IsViewable")
            })
            .collect()
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        // HANDOFF_SCREENSHOTS (relative to the workspace root) to refresh docs/screenshots
        // (scripts/refresh-screenshots.sh); else the test's temp dir: a test run never
        // rewrites the repository's pictures.
        let dir = match std::env::var_os("HANDOFF_SCREENSHOTS") {
            Some(d) if Path::new(&d).is_relative() => {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(d)
            }
            Some(d) => PathBuf::from(d),
            None => self.dir.path().join("screenshots"),
        };
        fs::create_dir_all(&dir).unwrap();
        let to = dir.join(name);
        let out = Command::new("import")
            .args(["-display", &self.display, "-window", "root"])
            .arg(&to)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            fs::metadata(&to).unwrap().len() > 1000,
            "{} is empty",
            to.display()
        );
        to
    }
}

/// A simulated workstation (RTX 3090 Ti on nvidia) and a config for it.
struct Machine {
    tmp: tempfile::TempDir,
    sim: SimHost,
}

impl Machine {
    /// `vms` are (name, label, uri).
    fn new(vms: &[(&str, &str, &str)]) -> Machine {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(&tmp.path().join("root"), &SimSpec::workstation()).unwrap();
        let m = Machine { tmp, sim };
        m.configure(vms);
        m
    }

    fn configure(&self, vms: &[(&str, &str, &str)]) {
        let mut text = format!("[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n");
        for (name, label, uri) in vms {
            text += &format!("[[vm]]\nname = \"{name}\"\nlabel = \"{label}\"\nuri = \"{uri}\"\n\n");
        }
        text += &format!(
            "[host]\nsysfs = \"{}\"\nproc = \"/proc\"\ndev = \"{}\"\nrun = \"{}\"\n",
            self.sim.sysfs().display(),
            self.sim.dev().display(),
            self.sim.run().display()
        );
        fs::write(self.tmp.path().join("config.toml"), text).unwrap();
    }

    fn move_all(&self, driver: &str) {
        for n in 0..4 {
            self.sim
                .set_driver(RTX_3090_TI.with_function(n), Some(driver))
                .unwrap();
        }
    }

    /// A libvirt test-driver file defining shut-off domains `names`; its URI.
    fn test_driver(&self, names: &[&str]) -> String {
        let domains: Vec<(&str, bool, &[handoff::PciAddress])> =
            names.iter().map(|n| (*n, false, &[][..])).collect();
        handoff_test_support::libvirt::test_driver_node(&self.tmp.path().join("libvirt-test.xml"), &domains)
    }
}

/// `handoff-details` on `desktop`, its dumped views arriving on a channel.
struct Window {
    views: mpsc::Receiver<Value>,
    last: Option<Value>,
    _group: Group,
}

impl Window {
    fn open(desktop: &Desktop, machine: &Machine) -> Window {
        Window::open_config(desktop, &machine.tmp.path().join("config.toml"))
    }

    fn open_config(desktop: &Desktop, config: &Path) -> Window {
        let home = desktop.dir.path().join("home");
        let runtime = desktop.dir.path().join("runtime");
        fs::create_dir_all(&home).unwrap();
        fs::create_dir_all(&runtime).unwrap();
        fs::set_permissions(&runtime, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let mut group = Group::spawn(
            Command::new(BIN)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("DISPLAY", &desktop.display)
                .env("DBUS_SESSION_BUS_ADDRESS", &desktop.bus)
                .env("NO_AT_BRIDGE", "1")
                .env("GDK_BACKEND", "x11")
                .env("GSETTINGS_BACKEND", "memory")
                .env("HOME", &home)
                .env("XDG_RUNTIME_DIR", &runtime)
                .env("HANDOFF_CONFIG", config)
                .env("HANDOFF_DETAILS_DUMP", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped()),
        );
        // Every line is a view: one that is not is a broken dump, and no view comes after it.
        let views = handoff_test_support::process::stdout_lines(&mut group.0, |line| {
            Some(serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
        });
        Window {
            views,
            last: None,
            _group: group,
        }
    }

    /// The first rendered view for which `ok` holds.
    fn wait_for(&mut self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.views.recv_timeout(left) {
                Ok(v) if ok(&v) => return v,
                Ok(v) => self.last = Some(v),
                Err(_) => panic!(
                    "no view with {what} within {WAIT:?}; the last was {:#?}",
                    self.last
                ),
            }
        }
    }
}

fn wait_viewable(desktop: &Desktop, prefix: &str) {
    let deadline = Instant::now() + WAIT;
    while desktop.viewable_windows(prefix).is_empty() {
        assert!(Instant::now() < deadline, "no viewable window named {prefix}…");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The view is dumped when its widgets are built; give GTK a few frames to draw them.
    std::thread::sleep(Duration::from_millis(700));
}

fn labels(buttons: &Value) -> Vec<&str> {
    buttons
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap())
        .collect()
}

#[test]
fn shows_the_gpu_on_linux_with_a_holder_then_a_refused_start_as_it_happens() {
    let Some(desktop) = Desktop::start() else { return };
    let m = Machine::new(&[]);
    let uri = m.test_driver(&["win11", "ai"]);
    m.configure(&[("win11", "Windows", &uri), ("ai", "AI", &uri)]);
    let holder = holder(&m.sim.dev().join("nvidia0"));
    let pid = holder.0.id() as u64;

    let mut w = Window::open(&desktop, &m);
    let v = w.wait_for("the holder", |v| {
        v["holders"]
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["pid"] == pid))
    });
    assert_eq!(v["owner"], "host");
    assert_eq!(v["headline"], "GPU is on Linux (nvidia)");
    assert_eq!(
        v["subline"],
        "1 process uses it: a VM start would be refused until they let go."
    );
    assert_eq!(v["title"], "handoff — RTX 3090 Ti");
    let h = &v["holders"][0];
    assert_eq!(h["command"], "sleep");
    assert_eq!(
        h["what"],
        format!("holds {}", m.sim.dev().join("nvidia0").display())
    );
    assert_eq!(labels(&h["buttons"])[0], "Terminate", "the test's own process");
    assert_eq!(v["vms"][0]["state"], "shut off");
    assert_eq!(labels(&v["vms"][0]["buttons"]), ["Start"]);
    assert_eq!(labels(&v["vms"][1]["buttons"]), ["Start"]);
    assert_eq!(v["functions"].as_array().unwrap().len(), 4);
    let members = v["iommu"]["members"].as_array().unwrap();
    let gpu = members
        .iter()
        .find(|m| m["address"] == RTX_3090_TI.to_string())
        .unwrap();
    assert_eq!(gpu["role"], "GPU function");
    assert!(members.iter().all(|m| m["foreign"] == false), "{members:#?}");
    wait_viewable(&desktop, "handoff — ");
    desktop.screenshot("details-host-holder.png");

    // The hook refuses a start: the window learns it from state.json (inotify), no timer.
    let mut state = HookState::new(RTX_3090_TI);
    state.last_refusal = Some(Refusal {
        vm: "win11".into(),
        at: state.updated,
        holders: Vec::new(),
        message: format!("GPU {RTX_3090_TI} is busy: sleep (pid {pid}, user root) holds /dev/nvidia0"),
    });
    state.save(&m.sim.host()).unwrap();
    let v = w.wait_for("the refusal", |v| v["last_refusal"].is_string());
    assert!(
        v["last_refusal"].as_str().unwrap().starts_with(&format!(
            "Windows, just now: GPU {RTX_3090_TI} is busy: sleep (pid {pid}"
        )),
        "{v:#}"
    );
    std::thread::sleep(Duration::from_millis(500));
    desktop.screenshot("details-host-refused.png");
    drop(holder);
}

/// A process opening the GPU's node while the window is open: the window hears the open
/// itself (inotify on the nodes, issue 16) and shows the holder, then none after its close.
#[test]
fn a_process_opening_and_closing_the_gpu_shows_up_and_goes_as_it_happens() {
    let Some(desktop) = Desktop::start() else { return };
    let m = Machine::new(&[]);
    let uri = m.test_driver(&["win11"]);
    m.configure(&[("win11", "Windows", &uri)]);
    let mut w = Window::open(&desktop, &m);
    w.wait_for("no holder", |v| {
        v["owner"] == "host" && v["holders"].as_array().is_some_and(|h| h.is_empty())
    });
    let mut job = handoff_test_support::opener::Opener::start(&m.sim.dev().join("nvidia0"), "cuda-training");
    job.open();
    let pid = job.pid() as u64;
    let v = w.wait_for("the job after its open", |v| {
        v["holders"]
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["pid"] == pid))
    });
    assert_eq!(v["holders"][0]["command"], "cuda-training");
    job.close();
    w.wait_for("no holder after the close", |v| {
        v["holders"].as_array().is_some_and(|h| h.is_empty())
    });
}

#[test]
fn shows_the_gpu_in_the_running_test_vm() {
    let Some(desktop) = Desktop::start() else { return };
    let m = Machine::new(&[("test", "Windows", "test:///default")]);
    m.move_all("vfio-pci");
    let mut w = Window::open(&desktop, &m);
    let v = w.wait_for("the VM", |v| v["owner"] == "vm");
    assert_eq!(v["headline"], "RTX 3090 Ti: Windows");
    assert_eq!(v["vms"][0]["state"], "running");
    assert_eq!(v["vms"][0]["holds_gpu"], true);
    assert_eq!(labels(&v["vms"][0]["buttons"]), ["Stop", "Force stop…"]);
    assert_eq!(labels(&v["actions"]), ["Open Looking Glass", "Refresh"]);
    assert!(v["holders"].as_array().unwrap().is_empty());
    assert_eq!(v["functions"][0]["driver"], "vfio-pci");
    wait_viewable(&desktop, "handoff — ");
    desktop.screenshot("details-vm.png");
}

/// Two GPUs (issue 15): macOS runs on the iGPU. Windows takes the RTX, which is free, so
/// its row offers "Start", not "Switch to"; a second macOS VM wants the iGPU macOS has, so
/// its row offers "Switch to macOS 14". The window read each VM's definition from libvirt
/// (a test-driver machine of its own, `TWO_GPU_NODE`) to know, as the tray does.
#[test]
fn with_two_gpus_only_a_vm_wanting_the_running_vms_gpu_offers_switch_to() {
    let Some(desktop) = Desktop::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let scene = handoff_test_support::libvirt::two_gpu_scene(tmp.path());
    let mut w = Window::open_config(&desktop, &scene.config);
    let row = |v: &Value, name: &str| {
        v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {name}: {v:#}"))
    };
    let v = w.wait_for("the three VMs, macOS running", |v| {
        v["vms"].as_array().is_some_and(|r| r.len() == 3) && row(v, "test")["state"] == "running"
    });
    assert_eq!(
        labels(&row(&v, "test")["buttons"]),
        ["Stop", "Force stop…"],
        "{v:#}"
    );
    assert_eq!(labels(&row(&v, "win11")["buttons"]), ["Start"], "{v:#}");
    assert_eq!(
        labels(&row(&v, "hackintosh")["buttons"]),
        ["Switch to macOS 14"],
        "{v:#}"
    );
}

#[test]
fn a_stuck_handoff_shows_restore_required_and_return_gpu_to_linux() {
    let Some(desktop) = Desktop::start() else { return };
    let m = Machine::new(&[("test", "Windows", "test:///default")]);
    m.sim.set_driver(RTX_3090_TI, Some("vfio-pci")).unwrap();
    let host = m.sim.host();
    let gpu = handoff::gpu::read_gpu(&host, RTX_3090_TI).unwrap();
    let mut record = RestoreRecord::new(&gpu, Some("test"));
    record.phase = Phase::Stuck;
    record.problem = Some(format!(
        "returning {RTX_3090_TI} to nvidia failed: the driver did not bind"
    ));
    record.save(&host).unwrap();
    let mut w = Window::open(&desktop, &m);
    let v = w.wait_for("restore required", |v| v["owner"] == "restore-required");
    assert_eq!(v["headline"], "Restore required");
    assert_eq!(
        labels(&v["actions"]),
        ["Open Looking Glass", "Return GPU to Linux", "Refresh"]
    );
    wait_viewable(&desktop, "handoff — ");
    desktop.screenshot("details-restore.png");
}

#[test]
fn without_a_display_it_says_where_to_look_instead() {
    let out = Command::new(BIN)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env("HANDOFF_CONFIG", "/nonexistent/handoff.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "handoff-details: no display: run it on the desktop, or use `handoff status`"
    );
}

#[test]
fn help_says_what_the_window_shows() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("who owns the GPU"), "{text}");
    assert!(text.contains("HANDOFF_DETAILS_DUMP"), "{text}");
}

#[test]
fn a_broken_config_is_named_and_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.toml");
    fs::write(&config, "[gpu]\naddress = \"nonsense\"\n").unwrap();
    let out = Command::new(BIN)
        .env("DISPLAY", ":99")
        .env("HANDOFF_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&config.display().to_string()), "{err}");
}
