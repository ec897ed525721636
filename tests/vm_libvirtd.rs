//! `handoff start`, `stop`, `switch` and `vm-health` against the real system libvirtd, with
//! the real hook installed over a simulated RTX 3090 Ti on a FUSE sysfs, and two tiny TCG
//! domains sharing it (the homelab's two VMs). A guest without an OS ignores ACPI, so the
//! graceful-stop timeout path is the real one.
//!
//! What it changes on the machine, for the length of the test only (as `hook_e2e.rs`):
//! `/etc/libvirt/hooks` and `/etc/handoff` are moved aside and put back on drop (libvirtd
//! is SIGHUPed afterwards), the test's domains are destroyed and undefined, the mount is
//! unmounted and every child process is killed — also when the test fails.
//!
//! Run with `cargo test --test vm_libvirtd` as root with `/dev/fuse`.

use handoff_test_support::bins::Run;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use handoff::bind::record::RestoreRecord;
use handoff::simulated_tree::RTX_3090_TI;
use handoff_test_support::fuse_gpu::hold;
use handoff_test_support::libvirt::TestDomain;
use handoff_test_support::stage::{SYSTEM_CONFIG, Stage};

/// `handoff`, with `handoff-vm` (which runs its libvirt commands) built beside it.
fn handoff() -> &'static str {
    handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff"))
}

/// Fields drop in declaration order: domains first (their destroy runs the hook's
/// `release`, which needs the mount), then the stage (mount, /etc/handoff, hooks, lock).
struct Scene {
    win: TestDomain,
    ai: TestDomain,
    stage: Stage,
}

impl Scene {
    fn set_up() -> Option<Scene> {
        let stage = Stage::set_up()?;
        let win = TestDomain::define();
        let ai = TestDomain::define();
        let mut text = format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\nwatchdog_s = 2\n\n{}",
            stage.host_section()
        );
        for (d, label) in [(&win, "Windows"), (&ai, "Linux AI")] {
            text += &format!(
                "\n[[vm]]\nname = \"{}\"\nlabel = \"{label}\"\nshutdown_timeout_s = 3\n",
                d.name()
            );
        }
        stage.install(&text, Path::new(handoff()));
        Some(Scene { win, ai, stage })
    }

    /// `handoff <args>` as over `ssh host handoff …`: the system config, no session.
    fn handoff(&self, args: &[&str]) -> Run {
        self.handoff_via(&[], args)
    }

    /// `<prefix…> handoff <args>` in an SSH-like environment: only PATH, HOME and the
    /// config; no DISPLAY, no DBUS_SESSION_BUS_ADDRESS, no XDG_RUNTIME_DIR.
    fn handoff_via(&self, prefix: &[&str], args: &[&str]) -> Run {
        let mut c = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(handoff());
                c
            }
            None => Command::new(handoff()),
        };
        c.args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/root")
            .env("HANDOFF_CONFIG", SYSTEM_CONFIG)
            .stdin(Stdio::null());
        let t = Instant::now();
        let out = c.output().unwrap();
        let r = Run::from_output(out, Some(t.elapsed()));
        eprintln!("$ handoff {}\n{r:?}", args.join(" "));
        r
    }

    fn drivers(&self) -> Vec<Option<String>> {
        self.stage.drivers()
    }

    fn all_on(&self, driver: &str) -> bool {
        self.drivers().iter().all(|d| d.as_deref() == Some(driver))
    }

    fn record_vm(&self) -> Option<String> {
        RestoreRecord::load(&self.stage.host, RTX_3090_TI)
            .unwrap()
            .and_then(|r| r.vm)
    }
}

#[test]
fn start_stop_switch_and_health_with_the_real_hook_and_libvirtd() {
    let Some(s) = Scene::set_up() else { return };
    let t = Instant::now();
    refuses_start_while_a_cuda_job_holds_the_gpu(&s);
    starts_over_ssh_with_the_gpu_on_vfio_pci(&s);
    health_of_the_running_tcg_domain(&s);
    the_other_vm_is_refused_up_front_with_a_pointer_to_switch(&s);
    a_graceful_stop_that_times_out_says_how_to_force(&s);
    switch_reports_the_timeout_and_does_not_force(&s);
    switch_with_force_hands_the_gpu_to_the_other_vm(&s);
    stop_force_over_ssh_brings_the_gpu_home(&s);
    eprintln!("whole scenario: {:?}", t.elapsed());
}

fn refuses_start_while_a_cuda_job_holds_the_gpu(s: &Scene) {
    let job = hold(&s.stage.host.dev.join("nvidia0"));
    let holder = format!("sleep (pid {}, user root", job.0.id());

    // Our own scan (as root it sees the job) refuses before libvirt is asked.
    let r = s.handoff(&["start", s.win.name()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.starts_with("handoff: not handing GPU 0000:01:00.0"),
        "{r:?}"
    );
    assert!(r.stderr.contains(&holder), "{r:?}");
    assert!(!r.stderr.contains("Starting"), "{r:?}");

    // In a PID namespace our scan cannot see the job (as an unprivileged user cannot see
    // root's): libvirt runs the hook, the hook refuses, and its words come out as ours.
    let r = s.handoff_via(
        &["unshare", "--pid", "--fork", "--mount-proc"],
        &["start", s.win.name()],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("Starting Windows ({})…", s.win.name())),
        "{r:?}"
    );
    assert!(
        r.stderr.contains(&format!(
            "handoff: not handing GPU 0000:01:00.0 to {}: 1 process uses it:\n",
            s.win.name()
        )),
        "{r:?}"
    );
    assert!(r.stderr.contains(&holder), "the holder is not named: {r:?}");
    for noise in [
        "Hook script execution failed",
        "LC_ALL=C",
        "internal error",
        "Child process",
    ] {
        assert!(
            !r.stderr.contains(noise),
            "libvirt's noise {noise:?} leaked: {r:?}"
        );
    }
    assert_eq!(s.win.state(), "shut off");
    assert!(s.all_on_host(), "{:?}", s.drivers());
}

impl Scene {
    fn all_on_host(&self) -> bool {
        self.drivers() == ["nvidia", "snd_hda_intel", "xhci_hcd", "nvidia-gpu"].map(|d| Some(d.to_owned()))
    }
}

fn starts_over_ssh_with_the_gpu_on_vfio_pci(s: &Scene) {
    let r = s.handoff(&["windows-start", s.win.name()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        format!(
            "Windows ({}) is running; GPU 0000:01:00.0 is on vfio-pci.\n",
            s.win.name()
        )
    );
    assert_eq!(s.win.state(), "running");
    assert!(s.all_on("vfio-pci"), "{:?}", s.drivers());
    assert_eq!(s.record_vm().as_deref(), Some(s.win.name()));

    let r = s.handoff(&["start", s.win.name()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("was already running; GPU 0000:01:00.0 is on vfio-pci"),
        "{r:?}"
    );
}

fn health_of_the_running_tcg_domain(s: &Scene) {
    std::thread::sleep(Duration::from_millis(1100));
    let r = s.handoff(&["vm-health", s.win.name(), "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["state"], "running");
    assert_eq!(j["reason"], "booted");
    assert_eq!(j["vcpus"], 1);
    assert_eq!(j["memory_kib"], 32 * 1024);
    assert!(j["pid"].as_u64().is_some(), "{j}");
    assert!(j["uptime_s"].as_u64().is_some_and(|u| u >= 1), "{j}");
    assert_eq!(j["gpu"]["verdict"], "none");
    assert_eq!(j["looking_glass"], serde_json::Value::Null);
    assert_eq!(j["ip"], serde_json::Value::Null);

    let r = s.handoff(&["vm-health", s.win.name()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("  state     running (booted)"), "{r:?}");
    assert!(r.stdout.contains("  vCPUs     1"), "{r:?}");
    assert!(r.stdout.contains("  memory    32 MiB"), "{r:?}");
    assert!(
        r.stdout
            .contains("the configured GPU 0000:01:00.0 is not passed through"),
        "{r:?}"
    );
    assert!(r.stdout.contains("  IP        unknown"), "{r:?}");
}

fn the_other_vm_is_refused_up_front_with_a_pointer_to_switch(s: &Scene) {
    let r = s.handoff(&["start", s.ai.name()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "is with Windows ({}), which is running. `handoff switch {}`",
            s.win.name(),
            s.ai.name()
        )),
        "{r:?}"
    );
    assert_eq!(s.ai.state(), "shut off");
}

fn a_graceful_stop_that_times_out_says_how_to_force(s: &Scene) {
    let r = s.handoff(&["stop", s.win.name(), "--timeout", "3"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("waiting up to 3 s…"), "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "Windows ({}) did not stop within 3 s: the guest ignored the shutdown request",
            s.win.name()
        )),
        "{r:?}"
    );
    assert!(
        r.stderr
            .contains(&format!("`handoff stop --force {}`", s.win.name())),
        "{r:?}"
    );
    assert!(r.took.unwrap() < Duration::from_secs(8), "{r:?}");
    assert_eq!(s.win.state(), "running");
    assert!(s.all_on("vfio-pci"));
}

fn switch_reports_the_timeout_and_does_not_force(s: &Scene) {
    let r = s.handoff(&["switch", s.ai.name(), "--timeout", "2"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("Step 1/2: stop Windows ({})", s.win.name())),
        "{r:?}"
    );
    assert!(
        r.stderr.contains(&format!(
            "handoff: switching to {} stopped at step 1/2 (stop Windows",
            s.ai.name()
        )),
        "{r:?}"
    );
    assert!(r.stderr.contains("did not stop within 2 s"), "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("`handoff switch --force {}`", s.ai.name())),
        "{r:?}"
    );
    assert!(!r.stderr.contains("Step 2/2"), "{r:?}");
    assert!(!r.stderr.contains("Forcing"), "{r:?}");
    assert_eq!(s.win.state(), "running");
    assert_eq!(s.ai.state(), "shut off");
}

fn switch_with_force_hands_the_gpu_to_the_other_vm(s: &Scene) {
    let r = s.handoff(&["switch", "Linux AI", "--force"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("Step 1/2: force off Windows ({})", s.win.name())),
        "{r:?}"
    );
    assert!(r.stderr.contains("unsaved work in the VM is lost"), "{r:?}");
    assert!(
        r.stderr
            .contains("Waiting for GPU 0000:01:00.0 to return to nvidia…"),
        "{r:?}"
    );
    assert!(
        r.stderr
            .contains(&format!("Step 2/2: start Linux AI ({})", s.ai.name())),
        "{r:?}"
    );
    assert_eq!(
        r.stdout,
        format!(
            "Linux AI ({}) is running; GPU 0000:01:00.0 is on vfio-pci.\n",
            s.ai.name()
        )
    );
    assert_eq!(s.win.state(), "shut off");
    assert_eq!(s.ai.state(), "running");
    assert!(s.all_on("vfio-pci"));
    assert_eq!(s.record_vm().as_deref(), Some(s.ai.name()));
}

fn stop_force_over_ssh_brings_the_gpu_home(s: &Scene) {
    let r = s.handoff(&["windows-stop", "--force", s.ai.name()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("unsaved work in the VM is lost"), "{r:?}");
    assert_eq!(
        r.stdout,
        format!(
            "Linux AI ({}) was forced off; GPU 0000:01:00.0 is back on Linux (nvidia).\n",
            s.ai.name()
        )
    );
    assert_eq!(s.ai.state(), "shut off");
    assert!(s.all_on_host(), "{:?}", s.drivers());
    assert_eq!(s.record_vm(), None);
}
