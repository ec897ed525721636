//! `handoff start`, `stop`, `switch` and `vm-health` through the binary, fast: libvirt's
//! in-process test driver, and a simulated host (`SimHost`: sysfs and `/dev` in a temp
//! dir, the real `/proc`, holders are real child processes).
//!
//! The test driver lives inside each `handoff` process, so every run starts from the same
//! state: `test:///default` (one running domain, `test`) or `test://<fixture>` from
//! `tests/fixtures/libvirt/two-vms-node.xml` (the homelab: `ai` running, `win11` shut off).
//! No hooks run under the test driver, so the GPU stays on nvidia here; the real hook is
//! in `tests/vm_libvirtd.rs`.

use handoff_test_support::bins::Run;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use serde_json::Value;

/// `handoff`, with `handoff-vm` (which runs its libvirt commands) built beside it.
fn bin() -> &'static str {
    handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff"))
}
const NODE_XML: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/libvirt/two-vms-node.xml"
);

struct Scene {
    tmp: tempfile::TempDir,
    sim: SimHost,
}

impl Scene {
    /// The simulated workstation with `vms` as (name, label, uri).
    fn new(vms: &[(&str, &str, &str)]) -> Scene {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(&tmp.path().join("root"), &SimSpec::workstation()).unwrap();
        fs::create_dir_all(tmp.path().join("home")).unwrap();
        let mut text = format!("[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n");
        for (name, label, uri) in vms {
            text += &format!(
                "[[vm]]\nname = \"{name}\"\nlabel = \"{label}\"\nuri = \"{uri}\"\nshutdown_timeout_s = 5\n\n"
            );
        }
        text += &format!(
            "[host]\nsysfs = \"{}\"\nproc = \"/proc\"\ndev = \"{}\"\nrun = \"{}\"\n",
            sim.sysfs().display(),
            sim.dev().display(),
            sim.run().display()
        );
        fs::write(tmp.path().join("config.toml"), text).unwrap();
        Scene { tmp, sim }
    }

    /// The homelab's two VMs on one GPU: `ai` (Linux AI) running, `win11` (Windows) off.
    fn homelab() -> Scene {
        let uri = format!("test://{NODE_XML}");
        Scene::new(&[("win11", "Windows", &uri), ("ai", "Linux AI", &uri)])
    }

    /// `test:///default`'s running domain `test` as "Windows".
    fn default_driver() -> Scene {
        Scene::new(&[("test", "Windows", "test:///default")])
    }

    fn command(&self, args: &[&str]) -> Command {
        let home = self.tmp.path().join("home");
        let mut c = Command::new(bin());
        c.args(args)
            .env("HANDOFF_CONFIG", self.tmp.path().join("config.toml"))
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env_remove("HANDOFF_LOG")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        run(self.command(args))
    }

    fn nvidia0(&self) -> PathBuf {
        self.sim.dev().join("nvidia0")
    }
}

fn run(mut c: Command) -> Run {
    let t = Instant::now();
    let out = c.output().unwrap();
    Run::from_output(out, Some(t.elapsed()))
}

/// A stand-in CUDA job: `sleep 600` holding a node; killed and reaped on drop.
struct Holder(Child);

impl Holder {
    fn of(node: &Path) -> Holder {
        Holder(
            Command::new("sleep")
                .arg("600")
                .stdin(Stdio::from(File::open(node).unwrap()))
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
fn starting_a_running_vm_says_so_and_succeeds() {
    let s = Scene::default_driver();
    let r = s.run(&["start"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout, "Windows (test) was already running; GPU 0000:01:00.0 is on Linux (nvidia).\n",
        "{r:?}"
    );
    assert!(!r.stderr.contains("Starting"), "{r:?}");
    let j = s.run(&["windows-start", "--json"]).json();
    assert_eq!(j["already_running"], true);
    assert_eq!(j["state"], "running");
    assert_eq!(j["gpu"]["owner"], "host");
}

#[test]
fn start_boots_a_shut_off_vm_and_reports_it_running() {
    // Only win11 is a [[vm]] of this GPU here, so the running `ai` does not stand in its way.
    let s2 = Scene::new(&[("win11", "Windows", &format!("test://{NODE_XML}"))]);
    let r = s2.run(&["start"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.starts_with("Starting Windows (win11)…\n"), "{r:?}");
    assert!(
        r.stdout
            .starts_with("Windows (win11) is running; GPU 0000:01:00.0 is still on Linux (nvidia)."),
        "{r:?}"
    );
    // Its XML has Looking Glass's shared memory: the hook point for opening it fires.
    let j = s2.run(&["start", "--json", "-q"]).json();
    assert_eq!(j["looking_glass"]["size_bytes"], 64 << 20, "{j}");
    assert_eq!(j["already_running"], false);
}

#[test]
fn start_refuses_up_front_while_my_cuda_job_holds_the_gpu() {
    let s = Scene::new(&[("win11", "Windows", &format!("test://{NODE_XML}"))]);
    let job = Holder::of(&s.nvidia0());
    let r = s.run(&["start"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.is_empty(), "{r:?}");
    assert!(!r.stderr.contains("Starting"), "something was started: {r:?}");
    assert!(
        r.stderr
            .starts_with("handoff: not handing GPU 0000:01:00.0 to win11: 1 process uses it:\n"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains(&format!("sleep (pid {}, user ", job.0.id())),
        "the holder is not named: {r:?}"
    );
    assert!(r.stderr.contains(&s.nvidia0().display().to_string()), "{r:?}");
    assert!(r.stderr.contains("Nothing was changed"), "{r:?}");
}

#[test]
fn start_refuses_while_another_vm_has_the_gpu_and_suggests_switch() {
    let s = Scene::homelab();
    let r = s.run(&["start", "Windows"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr,
        "handoff: not starting Windows (win11): GPU 0000:01:00.0 is with Linux AI (ai), which is running. \
         `handoff switch win11` stops Linux AI gracefully and then starts Windows\n",
        "{r:?}"
    );
}

#[test]
fn switch_stops_the_holder_then_starts_the_target_reporting_each_step() {
    let s = Scene::homelab();
    let r = s.run(&["switch", "win11"]);
    assert_eq!(r.code, 0, "{r:?}");
    let steps: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("Step ")).collect();
    assert_eq!(
        steps,
        ["Step 1/2: stop Linux AI (ai)", "Step 2/2: start Windows (win11)"],
        "{r:?}"
    );
    assert!(r.stderr.contains("Asking Linux AI (ai) to shut down"), "{r:?}");
    assert!(
        !r.stderr.contains("Forcing"),
        "switch forced without --force: {r:?}"
    );
    assert!(r.stdout.starts_with("Windows (win11) is running"), "{r:?}");
    let j = s.run(&["switch", "win11", "--json", "-q"]).json();
    assert_eq!(j["stopped"][0]["vm"], "ai");
    assert_eq!(j["stopped"][0]["forced"], false);
    assert_eq!(j["started"]["vm"], "win11");
    assert_eq!(j["started"]["state"], "running");
}

#[test]
fn switch_to_the_running_vm_changes_nothing() {
    let s = Scene::homelab();
    let r = s.run(&["switch", "ai"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("Step 1/1: start Linux AI (ai)"), "{r:?}");
    assert!(r.stdout.starts_with("Linux AI (ai) was already running"), "{r:?}");
}

#[test]
fn stop_shuts_down_gracefully_and_force_warns_about_unsaved_work() {
    let s = Scene::default_driver();
    let r = s.run(&["stop"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .starts_with("Asking Windows (test) to shut down (ACPI power button); waiting up to 5 s…"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .starts_with("Windows (test) shut down after 0 s; GPU 0000:01:00.0 is on Linux (nvidia)."),
        "{r:?}"
    );

    let r = s.run(&["windows-stop", "--force"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("unsaved work in the VM is lost"), "{r:?}");
    assert!(r.stdout.starts_with("Windows (test) was forced off"), "{r:?}");

    let j = s.run(&["stop", "--json", "--timeout", "7"]).json();
    assert_eq!(j["was_running"], true);
    assert_eq!(j["forced"], false);
}

#[test]
fn stopping_a_vm_that_is_off_says_so() {
    let s = Scene::homelab();
    let r = s.run(&["stop", "win11"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("Windows (win11) is not running (shut off)."),
        "{r:?}"
    );
    assert!(r.stdout.starts_with("Windows (win11) was not running"), "{r:?}");
}

#[test]
fn vm_health_reports_state_cpus_memory_devices_and_ip() {
    let s = Scene::homelab();
    let r = s.run(&["vm-health", "ai"]);
    assert_eq!(r.code, 0, "{r:?}");
    for want in [
        "Linux AI (ai) at test://",
        "  state     running",
        "  vCPUs     4",
        "  memory    32 GiB",
        "  GPU       the configured GPU 0000:01:00.0 is not passed through",
        "  Looking Glass  no shared memory device",
    ] {
        assert!(r.stdout.contains(want), "missing {want:?}: {r:?}");
    }
    // The test driver has no QEMU process: uptime is unknown, not an error.
    assert!(r.stdout.contains("  uptime    unknown"), "{r:?}");

    let j = s.run(&["vm-health", "Windows", "--json"]).json();
    assert_eq!(j["state"], "shutoff");
    assert_eq!(j["vcpus"], 8);
    assert_eq!(j["looking_glass"]["name"], "looking-glass");
    assert_eq!(j["looking_glass"]["model"], "ivshmem-plain");
    assert_eq!(j["looking_glass"]["size_bytes"], 64 << 20);
    assert_eq!(j["gpu"]["verdict"], "none");
    assert_eq!(j["ip"], Value::Null);
}

#[test]
fn an_unknown_vm_is_a_usage_error_that_lists_the_configured_ones() {
    let s = Scene::homelab();
    for cmd in ["start", "stop", "vm-health", "switch"] {
        let r = s.run(&[cmd, "macos"]);
        assert_eq!(r.code, 2, "{cmd}: {r:?}");
        assert_eq!(
            r.stderr, "handoff: no VM \"macos\" in the config; configured: win11 (Windows), ai (Linux AI)\n",
            "{cmd}: {r:?}"
        );
    }
}

#[test]
fn an_unreachable_libvirt_names_the_uri_and_what_to_check() {
    let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    let s = Scene::new(&[("win11", "Windows", uri)]);
    for cmd in ["start", "stop", "vm-health"] {
        let r = s.run(&[cmd]);
        assert_eq!(r.code, 1, "{cmd}: {r:?}");
        assert!(
            r.stderr
                .starts_with(&format!("handoff: cannot connect to libvirt at {uri}: ")),
            "{cmd}: {r:?}"
        );
        assert!(r.stderr.contains("is libvirtd running"), "{r:?}");
        assert!(r.stderr.contains("group libvirt"), "{r:?}");
        assert!(r.stderr.contains("polkit"), "{r:?}");
    }
}

#[test]
fn a_domain_missing_at_the_uri_is_named() {
    let s = Scene::new(&[("win11", "Windows", "test:///default")]);
    let r = s.run(&["start"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr,
        "handoff: no domain \"win11\" at test:///default; `virsh -c test:///default list --all` lists the defined ones\n"
    );
}

#[test]
fn over_ssh_without_display_or_session_bus_every_command_prints() {
    let s = Scene::homelab();
    for args in [
        &["start", "ai"][..],
        &["switch", "win11"],
        &["stop", "ai"],
        &["stop", "--force", "ai"],
        &["vm-health", "ai"],
    ] {
        let mut c = s.command(args);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", s.tmp.path().join("home"))
            .env("HANDOFF_CONFIG", s.tmp.path().join("config.toml"));
        let r = run(c);
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
        assert!(!r.stdout.is_empty(), "{args:?}: {r:?}");
        assert!(
            r.took.unwrap() < Duration::from_secs(10),
            "{args:?} waited: {r:?}"
        );
    }
}
