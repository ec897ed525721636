//! The `handoff` binary as a person uses it, against a simulated host: a `SimHost` tree for
//! sysfs and `/dev`, the real `/proc` (holders are real child processes), and libvirt's
//! in-process `test:///default` driver, which defines one running domain named `test`.
//!
//! Every test builds its own tree and config in its own temp dir and points the binary at
//! it with `HANDOFF_CONFIG`; `HOME` and the XDG directories point into the temp dir too, so
//! nothing outside it is read or written. Every child process is killed by its guard.

use handoff_test_support::bins::Run;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use handoff::pci::PciAddress;
use handoff::simulated_tree::{RTX_3090_TI, SimFunction, SimHost, SimSpec};
use handoff_test_support::fuse_gpu::hold;
use handoff_test_support::named_holder;
use serde_json::Value;

/// `handoff`, with `handoff-vm` (which runs its libvirt commands) built beside it.
fn bin() -> &'static str {
    handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff"))
}

/// The running domain libvirt's test driver defines.
const RUNNING_VM: &str = "test";

/// A simulated host, a config pointing at it, and a place for the binary's home.
struct Host {
    tmp: tempfile::TempDir,
    sim: SimHost,
}

impl Host {
    fn workstation() -> Host {
        Host::with_spec(&SimSpec::workstation())
    }

    fn with_spec(spec: &SimSpec) -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(&tmp.path().join("root"), spec).unwrap();
        fs::create_dir_all(tmp.path().join("home")).unwrap();
        let h = Host { tmp, sim };
        h.configure(RTX_3090_TI, &[RUNNING_VM]);
        h
    }

    fn config_path(&self) -> PathBuf {
        self.tmp.path().join("config.toml")
    }

    /// Write the config: the GPU at `gpu`, one `[[vm]]` per name at `test:///default`.
    fn configure(&self, gpu: PciAddress, vms: &[&str]) {
        let mut text = format!("[gpu]\naddress = \"{gpu}\"\nhost_driver = \"nvidia\"\n\n");
        for vm in vms {
            text += &format!(
                "[[vm]]\nname = \"{vm}\"\nlabel = \"{}\"\nuri = \"test:///default\"\n\n",
                label(vm)
            );
        }
        // The processes root cannot inspect here (PID 1 of the container the tests run in)
        // are passed over: these tests are about the GPU's own holders, real children.
        text += &format!(
            "[host]\nsysfs = \"{}\"\nproc = \"/proc\"\ndev = \"{}\"\nrun = \"{}\"\nuninspectable_ok = {:?}\n",
            self.sim.sysfs().display(),
            self.sim.dev().display(),
            self.sim.run().display(),
            handoff::holders::uninspectable_now(Path::new("/proc"))
        );
        fs::write(self.config_path(), text).unwrap();
    }

    fn run(&self, args: &[&str]) -> Run {
        run_with_config(&self.config_path(), self.tmp.path(), args)
    }

    /// `handoff doctor` with the libvirt hook installed into this host's own hooks
    /// directory (the real /etc/libvirt/hooks belongs to the machine, not the test).
    fn doctor(&self, args: &[&str]) -> Run {
        let hooks = self.tmp.path().join("libvirt-hooks");
        let hooks = hooks.to_str().unwrap();
        let installed = self.run(&["install-hooks", "--hooks-dir", hooks]);
        assert_eq!(installed.code, 0, "{installed:?}");
        let mut all = vec!["doctor", "--hooks-dir", hooks];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Move every function of the GPU's slot to `driver`.
    fn move_all(&self, driver: Option<&str>) {
        for n in 0..4 {
            self.sim.set_driver(RTX_3090_TI.with_function(n), driver).unwrap();
        }
    }
}

fn label(vm: &str) -> String {
    format!("{vm} label")
}

/// Run the binary with `HANDOFF_CONFIG=config`, home and XDG directories under `tmp`.
fn run_with_config(config: &Path, tmp: &Path, args: &[&str]) -> Run {
    let home = tmp.join("home");
    let out: Output = Command::new(bin())
        .args(args)
        .env("HANDOFF_CONFIG", config)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env_remove("HANDOFF_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::from_output(out, None)
}

fn nvidia0(h: &Host) -> PathBuf {
    h.sim.dev().join("nvidia0")
}

fn as_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------------------
// handoff status

#[test]
fn status_says_the_gpu_is_on_linux_and_nothing_uses_it() {
    let h = Host::workstation();
    let r = h.run(&["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.first_line(),
        "GPU 0000:01:00.0 (RTX 3090 Ti) is on Linux (nvidia); nothing uses it",
        "{r:?}"
    );
    assert!(r.stdout.contains("0000:01:00.1  audio  snd_hda_intel"), "{r:?}");
    assert!(r.stdout.contains("test label"), "{r:?}");
    assert!(!r.stdout.contains("Using the GPU"), "{r:?}");
    if as_root() {
        assert!(
            !r.stdout.contains("run as root"),
            "root is told to run as root: {r:?}"
        );
    }
}

#[test]
fn status_names_the_process_holding_nvidia0() {
    let h = Host::workstation();
    let holder = hold(&nvidia0(&h));
    let r = h.run(&["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.first_line(),
        "GPU 0000:01:00.0 (RTX 3090 Ti) is on Linux (nvidia); 1 process uses it",
        "{r:?}"
    );
    let line = format!("sleep (pid {}, user ", holder.pid());
    let holder_line = r
        .stdout
        .lines()
        .find(|l| l.contains(&line))
        .unwrap_or_else(|| panic!("no line for {line:?}: {r:?}"));
    assert!(
        holder_line.ends_with(&format!("holds {}", nvidia0(&h).display())),
        "{holder_line}"
    );
}

#[test]
fn status_json_has_the_designs_schema() {
    let h = Host::workstation();
    h.configure(RTX_3090_TI, &[RUNNING_VM, "win11"]);
    let holder = hold(&nvidia0(&h));
    let r = h.run(&["status", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    let g = &v["gpu"];
    assert_eq!(g["address"], "0000:01:00.0");
    assert_eq!(g["owner"], "host");
    assert_eq!(g["driver"], "nvidia");
    assert!(g["vm"].is_null(), "{g}");
    let functions = g["functions"].as_array().unwrap();
    let pairs: Vec<(&str, &str)> = functions
        .iter()
        .map(|f| (f["address"].as_str().unwrap(), f["driver"].as_str().unwrap()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("0000:01:00.0", "nvidia"),
            ("0000:01:00.1", "snd_hda_intel"),
            ("0000:01:00.2", "xhci_hcd"),
            ("0000:01:00.3", "nvidia-gpu"),
        ]
    );
    let blockers = g["blockers"].as_array().unwrap();
    assert_eq!(blockers.len(), 1, "{g}");
    let b = &blockers[0];
    assert_eq!(b["pid"], holder.pid());
    assert_eq!(b["command"], "sleep");
    assert!(b["user"].is_string(), "{b}");
    assert!(
        b.get("unit").is_some(),
        "unit is always there, null when none: {b}"
    );
    assert_eq!(b["paths"], serde_json::json!([nvidia0(&h)]));

    let vms = v["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0]["name"], "test");
    assert_eq!(vms[0]["label"], "test label");
    assert_eq!(vms[0]["state"], "running");
    assert_eq!(vms[1]["name"], "win11");
    assert_eq!(vms[1]["state"], "undefined");
}

#[test]
fn a_vm_libvirt_does_not_know_is_said_to_be_not_defined() {
    let h = Host::workstation();
    h.configure(RTX_3090_TI, &["win11"]);
    let r = h.run(&["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    let line = r.stdout.lines().find(|l| l.contains("win11")).unwrap();
    assert!(line.ends_with("not defined in libvirt"), "{r:?}");
    assert!(
        r.stdout.contains("virsh -c test:///default list --all"),
        "says how to see what is defined: {r:?}"
    );
}

#[test]
fn status_says_the_gpu_is_in_the_running_vm_when_every_function_is_on_vfio() {
    let h = Host::workstation();
    h.move_all(Some("vfio-pci"));
    let r = h.run(&["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    // The verdict's words first (issue 14: "<GPU>: <VM>"), then the facts.
    assert_eq!(r.first_line(), "RTX 3090 Ti: test label", "{r:?}");
    assert!(
        r.stdout
            .lines()
            .any(|l| l == "GPU 0000:01:00.0 (RTX 3090 Ti) is in the VM test label (vfio-pci)"),
        "{r:?}"
    );
    let v = h.run(&["status", "--json"]).json();
    assert_eq!(v["gpu"]["owner"], "vfio");
    assert_eq!(v["gpu"]["driver"], "vfio-pci");
    assert_eq!(v["gpu"]["vm"], "test");
    for f in v["gpu"]["functions"].as_array().unwrap() {
        assert_eq!(f["driver"], "vfio-pci", "{f}");
    }
}

#[test]
fn status_on_vfio_with_no_vm_running_says_so() {
    let h = Host::workstation();
    h.configure(RTX_3090_TI, &["win11"]);
    h.move_all(Some("vfio-pci"));
    let r = h.run(&["status"]);
    // Left on vfio-pci with no VM: the verdict leads and says what to do (issue 13), the
    // facts line follows.
    assert_eq!(
        r.first_line(),
        "Restore required: the GPU is on vfio-pci and no VM is running",
        "{r:?}"
    );
    assert!(r.stdout.contains("Next: Return it to Linux"), "{r:?}");
    assert!(
        r.stdout
            .lines()
            .any(|l| l == "GPU 0000:01:00.0 (RTX 3090 Ti) is on vfio-pci, no VM running"),
        "{r:?}"
    );
    let v = h.run(&["status", "--json"]).json();
    assert!(v["gpu"]["vm"].is_null());
    assert_eq!(v["verdict"]["state"], "restore_required", "{v:#}");
}

#[test]
fn blockers_and_status_name_the_qemu_holding_the_vfio_group_and_its_vm() {
    let h = Host::workstation();
    h.configure(RTX_3090_TI, &["win11"]);
    h.move_all(Some("vfio-pci"));
    let group = h.sim.dev().join("vfio/13");
    assert!(
        group.exists(),
        "the group node is there while the GPU is on vfio-pci"
    );
    // A QEMU of win11 that libvirt no longer reports (test:///default does not define it).
    let qemu = named_holder::hold_as_qemu(&group, "win11", h.tmp.path());
    let line = format!("(pid {}", qemu.pid());

    let r = h.run(&["blockers"]);
    assert_eq!(r.code, 1, "a VFIO user holds the GPU: {r:?}");
    assert!(
        r.stdout
            .contains("Holding its VFIO group (GPU 0000:01:00.0 cannot return to the host until they exit):"),
        "{r:?}"
    );
    let held = r
        .stdout
        .lines()
        .find(|l| l.contains(&line))
        .unwrap_or_else(|| panic!("names the QEMU: {r:?}"));
    assert!(held.starts_with("  qemu-system-x86 "), "{held}");
    assert!(held.contains("QEMU of VM win11"), "{held}");
    assert!(held.ends_with(&format!("holds {}", group.display())), "{held}");

    let v = h.run(&["blockers", "--json"]).json();
    assert_eq!(v["vfio_users"][0]["pid"], qemu.pid(), "{v:#}");
    assert_eq!(v["vfio_users"][0]["vm"], "win11", "{v:#}");

    let r = h.run(&["status"]);
    assert!(
        !r.stdout.contains("no VM running"),
        "the group's user is a VM's QEMU: {r:?}"
    );
    assert!(r.stdout.contains("Holding its VFIO group"), "{r:?}");
    assert!(r.stdout.contains(&line), "{r:?}");
    let v = h.run(&["status", "--json"]).json();
    assert_eq!(v["gpu"]["vfio_users"][0]["pid"], qemu.pid(), "{v:#}");
    assert_eq!(v["gpu"]["vm"], "win11", "{v:#}");

    // Gone with the QEMU: nothing holds the GPU any more.
    drop(qemu);
    let v = h.run(&["blockers", "--json"]).json();
    assert_eq!(v["vfio_users"], serde_json::json!([]), "{v:#}");
}

#[test]
fn status_names_which_function_is_where_when_only_vga_moved() {
    let h = Host::workstation();
    h.sim.set_driver(RTX_3090_TI, Some("vfio-pci")).unwrap();
    let r = h.run(&["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    let first = r.first_line();
    assert!(first.contains("is split between drivers"), "{r:?}");
    for part in [
        "0000:01:00.0 on vfio-pci",
        "0000:01:00.1 on snd_hda_intel",
        "0000:01:00.2 on xhci_hcd",
    ] {
        assert!(first.contains(part), "{part:?} missing: {r:?}");
    }
    let v = h.run(&["status", "--json"]).json();
    assert_eq!(v["gpu"]["owner"], "mixed");
    assert_eq!(v["gpu"]["functions"][0]["driver"], "vfio-pci");
    assert_eq!(v["gpu"]["functions"][1]["driver"], "snd_hda_intel");
}

#[test]
fn status_with_an_empty_slot_says_there_is_no_gpu() {
    let h = Host::workstation();
    let empty = PciAddress::new(0, 2, 0, 0);
    h.configure(empty, &[RUNNING_VM]);
    let r = h.run(&["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.first_line().starts_with("No GPU at 0000:02:00.0"), "{r:?}");
    assert!(r.first_line().contains("lspci -D"), "says how to find it: {r:?}");
    let v = h.run(&["status", "--json"]).json();
    assert_eq!(v["gpu"]["owner"], "absent");
    assert_eq!(v["gpu"]["address"], "0000:02:00.0");
    assert_eq!(v["gpu"]["functions"], serde_json::json!([]));

    let b = h.run(&["blockers"]);
    assert_eq!(b.code, 0, "{b:?}");
    assert!(b.stdout.contains("No GPU at 0000:02:00.0"), "{b:?}");
}

// ---------------------------------------------------------------------------------------
// handoff blockers

#[test]
fn blockers_and_status_show_a_holder_named_with_controls_and_markup_escaped() {
    let h = Host::workstation();
    let holder = named_holder::hold_named(&h.sim.dev().join("nvidia0"), named_holder::EVIL, h.tmp.path());
    for args in [&["blockers"][..], &["status"][..]] {
        let r = h.run(args);
        let line = format!("{} (pid {}, user ", named_holder::EVIL_PLAIN, holder.pid());
        assert!(r.stdout.contains(&line), "{args:?}: {r:?}");
        assert!(
            !r.stdout.contains('\x1b') && !r.stdout.contains('\x07'),
            "{args:?}: no raw control reaches the terminal: {:?}",
            r.stdout
        );
        assert!(
            !r.stdout.lines().any(|l| l.starts_with(" (pid")),
            "{args:?}: the name's newline forged no line: {r:?}"
        );
    }
    // JSON keeps the name as it is (JSON escapes it itself): scripts get the real name.
    let v = h.run(&["blockers", "--json"]).json();
    assert_eq!(v["holders"][0]["command"], "evil\x1b[31m<b>\x07\n");
}

#[test]
fn warnings_on_stderr_carry_no_colour_codes_when_it_is_not_a_terminal() {
    let h = Host::workstation();
    // An attribute that cannot be read (a directory where sysfs has a file) is warned
    // about through tracing; stderr here is a pipe, as the hook's is to libvirtd.
    let attr = h
        .sim
        .sysfs()
        .join("bus/pci/devices/0000:01:00.0/power/runtime_status");
    fs::remove_file(&attr).unwrap();
    fs::create_dir(&attr).unwrap();
    let r = h.run(&["status"]);
    assert!(r.stderr.contains("cannot read sysfs attribute"), "{r:?}");
    assert!(
        !r.stderr.contains('\x1b'),
        "no ANSI codes in a pipe: {:?}",
        r.stderr
    );
}

#[test]
fn blockers_exits_0_when_nothing_holds_and_1_with_a_holder() {
    let h = Host::workstation();
    let r = h.run(&["blockers"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.first_line().starts_with("Nothing holds GPU 0000:01:00.0"),
        "{r:?}"
    );
    let v = h.run(&["blockers", "--json"]).json();
    assert_eq!(v["holders"], serde_json::json!([]));

    let holder = hold(&h.sim.dev().join("dri/renderD129"));
    let r = h.run(&["blockers"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(&format!("sleep (pid {}", holder.pid())),
        "{r:?}"
    );
    let j = h.run(&["blockers", "--json"]);
    assert_eq!(j.code, 1, "{j:?}");
    let holders = j.json()["holders"].as_array().unwrap().clone();
    assert_eq!(holders.len(), 1, "{j:?}");
    assert_eq!(holders[0]["pid"], holder.pid());
    assert_eq!(
        holders[0]["paths"],
        serde_json::json!([h.sim.dev().join("dri/renderD129")])
    );

    drop(holder);
    assert_eq!(
        h.run(&["blockers"]).code,
        0,
        "clear again once the holder is gone"
    );
}

#[test]
fn blockers_exits_4_naming_what_it_could_not_check() {
    let h = Host::workstation();
    // A process whose fds even root cannot read (its `fd` is a file), in a procfs of its own.
    let proc = h.tmp.path().join("fakeproc");
    fs::create_dir_all(proc.join("4242")).unwrap();
    fs::write(proc.join("4242/fd"), "").unwrap();
    fs::write(proc.join("4242/comm"), "containerd-shim\n").unwrap();
    fs::write(proc.join("iomem"), "").unwrap();
    let text = fs::read_to_string(h.config_path()).unwrap();
    fs::write(
        h.config_path(),
        text.replace(
            "proc = \"/proc\"",
            &format!("proc = {:?}", proc.display().to_string()),
        ),
    )
    .unwrap();
    let r = h.run(&["blockers"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.first_line()
            .starts_with("Nothing seen holding GPU 0000:01:00.0")
            && r.first_line().contains("not everything could be checked"),
        "{r:?}"
    );
    if as_root() {
        assert!(
            r.stdout.contains(
                "Not checked: 1 process could not be inspected even as root: pid 4242 (containerd-shim)"
            ),
            "{r:?}"
        );
    }
    let j = h.run(&["blockers", "--json"]);
    assert_eq!(j.code, 4, "{j:?}");
    let v = j.json();
    assert_eq!(v["verdict"], "unchecked", "{v}");
    assert_eq!(v["uninspected"], 1, "{v}");
    assert!(
        v["unchecked"][0]
            .as_str()
            .unwrap()
            .contains("could not be inspected"),
        "{v}"
    );

    // `[host] dev` where the GPU's nodes are not.
    let empty = h.tmp.path().join("empty-dev");
    fs::create_dir(&empty).unwrap();
    h.configure(RTX_3090_TI, &[RUNNING_VM]);
    let text = fs::read_to_string(h.config_path()).unwrap();
    let dev = format!("dev = \"{}\"", h.sim.dev().display());
    fs::write(
        h.config_path(),
        text.replace(&dev, &format!("dev = \"{}\"", empty.display())),
    )
    .unwrap();
    let _holder = hold(&nvidia0(&h));
    let r = h.run(&["blockers"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stdout.contains(&format!(
            "Not checked: no device nodes of GPU 0000:01:00.0 were found under {}",
            empty.display()
        )),
        "{r:?}"
    );
}

#[test]
fn rebind_with_a_watchdog_of_u64_max_exits_2_naming_the_key_and_changes_nothing() {
    let h = Host::workstation();
    h.move_all(Some("vfio-pci"));
    let text = fs::read_to_string(h.config_path()).unwrap();
    fs::write(
        h.config_path(),
        text.replace(
            "host_driver = \"nvidia\"\n",
            "host_driver = \"nvidia\"\nwatchdog_s = 18446744073709551615\n",
        ),
    )
    .unwrap();
    // As root `rebind --force` reads only /etc/handoff/config.toml (tests/cli.rs's
    // as_root_… test); the plan reads the given file through the same validation.
    let args: &[&str] = if as_root() {
        &["rebind", "--force", "--dry-run"]
    } else {
        &["rebind", "--force"]
    };
    let r = h.run(args);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("[gpu] watchdog_s = 18446744073709551615 is too long"),
        "{r:?}"
    );
    assert!(!r.stderr.contains("panicked"), "{r:?}");
    for n in 0..4 {
        assert_eq!(
            h.sim.driver(RTX_3090_TI.with_function(n)).as_deref(),
            Some("vfio-pci"),
            "nothing was rebound: {r:?}"
        );
    }
    assert!(
        !h.sim.run().join("restore-0000:01:00.0.json").exists(),
        "no record written"
    );
}

#[test]
fn blockers_without_root_exits_4_and_says_to_run_as_root() {
    if !as_root() {
        eprintln!("skipping: needs root to run blockers as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let h = Host::workstation();
    for p in [h.tmp.path(), &h.config_path()] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin())
        .arg("blockers")
        .env("HANDOFF_CONFIG", h.config_path())
        .env("HOME", h.tmp.path().join("home"))
        .env_remove("HANDOFF_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stdout}{stderr}");
    // Root's processes (this test's own, at least) are not nobody's to read.
    assert!(
        stdout.lines().any(|l| l.starts_with("Not checked: ")
            && l.ends_with("could not be inspected: run as root to see them")),
        "{stdout}{stderr}"
    );
    assert!(!stdout.contains("Nothing holds"), "{stdout}");
}

// ---------------------------------------------------------------------------------------
// handoff doctor

fn check<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id}: {report}"))
}

fn failures(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["level"] == "fail")
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn doctor_finds_the_workstation_ready() {
    let h = Host::workstation();
    let r = h.doctor(&["--json"]);
    let v = r.json();
    for id in ["iommu", "gpu", "iommu-group", "vfio-pci", "holders", "libvirt"] {
        assert_eq!(check(&v, id)["level"], "ok", "{id}: {r:?}");
    }
    let fails = failures(&v);
    assert_eq!(r.code, i32::from(!fails.is_empty()), "{r:?}");
    if as_root() {
        assert!(fails.is_empty(), "{r:?}");
        let t = h.doctor(&[]);
        assert_eq!(t.code, 0, "{t:?}");
        assert!(
            t.stdout.contains("This host looks ready for passthrough."),
            "{t:?}"
        );
    }
}

#[test]
fn doctor_warns_about_a_holder_without_failing() {
    let h = Host::workstation();
    let holder = hold(&nvidia0(&h));
    let r = h.doctor(&[]);
    assert!(r.stdout.contains("[warn] 1 process uses the GPU"), "{r:?}");
    assert!(r.stdout.contains(&format!("pid {}", holder.pid())), "{r:?}");
    if as_root() {
        assert_eq!(r.code, 0, "a holder is a warning, not a failure: {r:?}");
    }
}

#[test]
fn doctor_fails_when_the_gpus_iommu_group_holds_a_foreign_device() {
    let mut spec = SimSpec::workstation();
    let nvme = PciAddress::new(0, 2, 0, 0);
    spec.functions.push(SimFunction {
        address: nvme,
        vendor: 0x144d,
        device: 0xa80a,
        class: 0x010802,
        driver: Some("nvme".into()),
        iommu_group: 13,
        parent: None,
        drm: None,
        sound_card: None,
        i2c: Vec::new(),
    });
    spec.drivers.push("nvme".into());
    let h = Host::with_spec(&spec);
    let r = h.doctor(&[]);
    assert_eq!(r.code, 1, "{r:?}");
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("[FAIL] IOMMU group 13"))
        .unwrap_or_else(|| panic!("{r:?}"));
    assert!(line.contains("0000:02:00.0 (nvme)"), "{line}");
    assert!(
        r.stdout.contains("1 problem to fix") || r.stdout.contains("problems to fix"),
        "{r:?}"
    );

    let j = h.doctor(&["--json"]);
    assert_eq!(j.code, 1, "{j:?}");
    let v = j.json();
    assert_eq!(check(&v, "iommu-group")["level"], "fail");
    assert!(check(&v, "iommu-group")["fix"].is_string());
}

#[test]
fn doctor_fails_for_a_vm_libvirt_does_not_define() {
    let h = Host::workstation();
    h.configure(RTX_3090_TI, &[RUNNING_VM, "win11"]);
    let r = h.doctor(&[]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .contains("[FAIL] VM win11 at test:///default: not defined in libvirt"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains("[ok  ] VM test (test label) at test:///default is defined, running"),
        "{r:?}"
    );
}

#[test]
fn doctor_status_and_blockers_exit_2_on_a_broken_config() {
    let h = Host::workstation();
    let text = fs::read_to_string(h.config_path()).unwrap();
    fs::write(
        h.config_path(),
        text.replace("[gpu]\n", "[gpu]\nwatchdog_s = \"ten\"\n"),
    )
    .unwrap();
    let at = format!("{}:2:14: [gpu] watchdog_s", h.config_path().display());
    for args in [
        &["doctor"][..],
        &["doctor", "--json"],
        &["status"],
        &["status", "--json"],
        &["blockers"],
    ] {
        let r = h.run(args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains(&at), "{args:?}: {r:?}");
        assert_eq!(r.stdout, "", "{args:?}: nothing half-printed on stdout");
    }
}

// ---------------------------------------------------------------------------------------
// --help

#[test]
fn help_succeeds_and_says_what_each_command_does() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir_all(tmp.path().join("home")).unwrap();
    let none = tmp.path().join("unused.toml");
    for (args, says) in [
        (&["--help"][..], "Hand one passthrough GPU"),
        (&["status", "--help"], "Who owns the GPU"),
        (&["blockers", "--help"], "would stop a handoff"),
        (&["doctor", "--help"], "ready for passthrough"),
        (&["config", "--help"], "configuration"),
        (&["config", "check", "--help"], "Check a config file"),
        (&["config", "show", "--help"], "effective configuration"),
        (&["rebind", "--help"], "Return the GPU to the host driver"),
        (&["bind", "--help"], "vfio-pci"),
        (&["install-hooks", "--help"], "libvirt hook"),
        (&["hook", "--help"], "libvirtd"),
        (&["vfio-status", "--help"], "Who owns the GPU"),
        (&["gpu-rebind-nvidia", "--help"], "Return the GPU"),
    ] {
        let r = run_with_config(&none, tmp.path(), args);
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
        assert!(r.stdout.contains(says), "{args:?} should say {says:?}: {r:?}");
    }
}

#[test]
fn an_unknown_subcommand_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let r = run_with_config(&tmp.path().join("unused.toml"), tmp.path(), &["frobnicate"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("frobnicate"), "{r:?}");
}

// ---------------------------------------------------------------------------------------
// What root reads: `rebind --force` and `bind` as root trust only the system config.

/// The run dir, driver links and overrides of the simulated GPU, to compare before/after.
fn untouched(h: &Host) -> Vec<String> {
    let mut seen = Vec::new();
    for n in 0..4 {
        let dev = h
            .sim
            .sysfs()
            .join(format!("bus/pci/devices/{}", RTX_3090_TI.with_function(n)));
        seen.push(format!("{:?}", fs::read_link(dev.join("driver")).ok()));
        seen.push(fs::read_to_string(dev.join("driver_override")).unwrap_or_default());
    }
    seen.push(format!("{:?}", fs::read_dir(h.sim.run()).map(|d| d.count()).ok()));
    seen
}

#[test]
fn as_root_rebind_and_bind_refuse_a_config_that_is_not_the_system_one() {
    if !as_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this test checks what root reads: run it as root"
        );
        eprintln!("SKIPPED: this test checks what root reads; not root");
        return;
    }
    let h = Host::workstation();
    h.move_all(Some("vfio-pci"));
    let before = untouched(&h);
    let config = h.config_path();
    let config = config.to_str().unwrap();
    for (args, given_by) in [
        (vec!["rebind", "--force"], "HANDOFF_CONFIG"),
        (vec!["rebind", "--force", "--config", config], "--config"),
        (vec!["bind"], "HANDOFF_CONFIG"),
        (vec!["bind", "--vm", RUNNING_VM, "--config", config], "--config"),
    ] {
        let r = h.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains(&format!(
                "{config} (from {given_by}) was not read: as root, handoff trusts only the root-owned system config /etc/handoff/config.toml"
            )),
            "{args:?}: {r:?}"
        );
        assert_eq!(untouched(&h), before, "{args:?} changed something");
    }
    // Only looking is still allowed with any config.
    let r = h.run(&["rebind", "--dry-run", "--force"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("To return it to the host"), "{r:?}");
    let r = h.run(&["bind", "--dry-run"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(untouched(&h), before);
}

#[test]
fn rebind_gpu_must_name_the_configs_gpu() {
    let h = Host::workstation();
    h.move_all(Some("vfio-pci"));
    let other = RTX_3090_TI
        .with_function(0)
        .to_string()
        .replace("0000:01", "0000:02");
    let r = h.run(&["rebind", "--dry-run", "--gpu", &other]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "--gpu {other} is not the GPU in {} ([gpu] address = {RTX_3090_TI}); nothing was changed",
            h.config_path().display()
        )),
        "{r:?}"
    );
    let r = h.run(&["rebind", "--dry-run", "--gpu", &RTX_3090_TI.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("To return it to the host"), "{r:?}");
}

#[test]
fn rebind_without_a_record_on_a_gpu_at_home_plans_nothing() {
    let h = Host::workstation();
    for args in [&["rebind", "--dry-run"][..], &["rebind"]] {
        let r = h.run(args);
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
        assert_eq!(
            r.stdout,
            format!(
                "GPU {RTX_3090_TI} is on Linux (nvidia) and there is no restore record: nothing to return.\n"
            ),
            "{args:?}"
        );
    }
}

#[test]
fn status_without_a_configured_vm_says_so_and_how_to_add_one() {
    // Issue 17: no built-in VM any more; the status says there is none.
    let h = Host::workstation();
    h.configure(RTX_3090_TI, &[]);
    let r = h.run(&["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("VMs: none configured (add a [[vm]] with the libvirt domain's name to the config)"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("win11"), "{}", r.stdout);
    let r = h.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["vms"], serde_json::json!([]), "{v}");
}

/// Which VMs could take the GPU, for libvirt as for Proxmox VE (issue 14): a configured
/// domain that is off and whose `<hostdev>` names the GPU's slot, read from the real
/// system libvirtd; a domain passing nothing through is not named.
#[test]
fn status_names_the_vm_that_could_take_the_gpu_from_its_hostdev() {
    use handoff_test_support::libvirt::{TestDomain, require_libvirtd};
    let Some(_libvirtd) = require_libvirtd() else {
        return;
    };
    let with = TestDomain::define_with_devices(
        "<hostdev mode='subsystem' type='pci' managed='no'><source>\
         <address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source></hostdev>",
    );
    let without = TestDomain::define();
    let h = Host::workstation();
    fs::write(
        h.config_path(),
        format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n\
             [[vm]]\nname = \"{}\"\nlabel = \"Windows\"\n\n\
             [[vm]]\nname = \"{}\"\nlabel = \"Debian\"\n\n\
             [host]\nsysfs = \"{}\"\nproc = \"/proc\"\ndev = \"{}\"\nrun = \"{}\"\nuninspectable_ok = {:?}\n",
            with.name(),
            without.name(),
            h.sim.sysfs().display(),
            h.sim.dev().display(),
            h.sim.run().display(),
            handoff::holders::uninspectable_now(Path::new("/proc"))
        ),
    )
    .unwrap();
    let r = h.run(&["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .lines()
            .any(|l| l == format!("Could take it: Windows ({})", with.name())),
        "{r:?}"
    );
    let v = h.run(&["status", "--json"]).json();
    assert_eq!(v["gpu"]["candidates"], serde_json::json!([with.name()]), "{v}");
}
