//! The seed's command names (`windows-start`, `vfio-status`, …) as `make install` and the
//! `.deb` put them on PATH: symlinks to `handoff`, which behaves as the subcommand the name
//! stands for. Each test makes its links in its own temp dir and points the binary at a
//! simulated host (the workstation's RTX 3090 Ti, libvirt's `test:///default`).

use handoff_test_support::bins::Run;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_handoff");

/// The names and the subcommand each stands for (the seed's table; README, "What it does today").
const SEED_NAMES: &[(&str, &str)] = &[
    ("windows-start", "start"),
    ("windows-stop", "stop"),
    ("vfio-status", "status"),
    ("gpu-rebind-nvidia", "rebind"),
    ("install-hooks", "install-hooks"),
    ("install-services", "install-services"),
    ("lg-test", "lg-test"),
    ("vm-health", "vm-health"),
];

struct Links {
    tmp: tempfile::TempDir,
    _sim: SimHost,
}

impl Links {
    /// A bin dir holding `handoff` (a link to the built binary) and the seed's names made
    /// by `handoff __generate links`, as installed; a simulated workstation and its config.
    fn new() -> Links {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        std::os::unix::fs::symlink(BIN, tmp.path().join("handoff-real")).unwrap();
        let made = Command::new(BIN)
            .args(["__generate", "links"])
            .arg(&bin)
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        std::os::unix::fs::symlink(BIN, bin.join("handoff")).unwrap();
        let sim = SimHost::build(&tmp.path().join("root"), &SimSpec::workstation()).unwrap();
        let config = format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n\
             [[vm]]\nname = \"test\"\nlabel = \"Windows\"\nuri = \"test:///default\"\n\n\
             [host]\nsysfs = \"{}\"\nproc = \"/proc\"\ndev = \"{}\"\nrun = \"{}\"\n",
            sim.sysfs().display(),
            sim.dev().display(),
            sim.run().display()
        );
        fs::write(tmp.path().join("config.toml"), config).unwrap();
        fs::create_dir_all(tmp.path().join("home")).unwrap();
        Links { tmp, _sim: sim }
    }

    fn bin(&self) -> PathBuf {
        self.tmp.path().join("bin")
    }

    /// Runs `name` from the bin dir, as a shell finds it on PATH.
    fn run(&self, name: &str, args: &[&str]) -> Run {
        run(&self.bin().join(name), self.tmp.path(), args)
    }
}

fn run(program: &Path, tmp: &Path, args: &[&str]) -> Run {
    let home = tmp.join("home");
    let out = Command::new(program)
        .args(args)
        .env("HANDOFF_CONFIG", tmp.join("config.toml"))
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("COLUMNS", "200")
        .env_remove("HANDOFF_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::from_output(out, None)
}

#[test]
fn generate_links_makes_exactly_the_seed_names_as_relative_links_to_handoff() {
    let l = Links::new();
    let mut names: Vec<String> = fs::read_dir(l.bin())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "handoff")
        .collect();
    names.sort();
    let mut want: Vec<&str> = SEED_NAMES.iter().map(|(n, _)| *n).collect();
    want.sort();
    assert_eq!(names, want);
    for (name, _) in SEED_NAMES {
        let target = fs::read_link(l.bin().join(name)).unwrap();
        assert_eq!(target, Path::new("handoff"), "{name}");
    }
}

#[test]
fn each_seed_name_shows_its_subcommands_help_under_its_own_name() {
    let l = Links::new();
    for (name, sub) in SEED_NAMES {
        let r = l.run(name, &["--help"]);
        assert_eq!(r.code, 0, "{name} --help: {r:?}");
        assert!(
            r.stdout.contains(&format!("Usage: {name}")),
            "{name} --help should show usage under its own name: {r:?}"
        );
        assert!(
            r.stdout.contains(&format!("`handoff {sub}")),
            "{name} --help should say which subcommand it is: {r:?}"
        );
        // The same text `handoff <sub> --help` shows, but for the usage line and the note.
        let direct = run(&l.bin().join("handoff"), l.tmp.path(), &[sub, "--help"]);
        let about = |s: &str| s.split("\nUsage:").next().unwrap().to_owned();
        assert_eq!(about(&r.stdout), about(&direct.stdout), "{name}");
    }
}

#[test]
fn vfio_status_json_is_handoff_status_json_on_the_simulated_workstation() {
    let l = Links::new();
    let linked = l.run("vfio-status", &["--json"]);
    assert_eq!(linked.code, 0, "{linked:?}");
    let v: Value = serde_json::from_str(&linked.stdout).unwrap();
    assert_eq!(v["gpu"]["address"], "0000:01:00.0", "{linked:?}");
    assert_eq!(v["gpu"]["owner"], "host", "{linked:?}");
    assert_eq!(v["gpu"]["driver"], "nvidia", "{linked:?}");
    let direct = l.run("handoff", &["status", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&direct.stdout).unwrap()["gpu"],
        v["gpu"]
    );
}

#[test]
fn global_flags_pass_through_after_the_seed_name() {
    let l = Links::new();
    let config = l.tmp.path().join("config.toml");
    let r = l.run(
        "vfio-status",
        &["-q", "--config", config.to_str().unwrap(), "--json"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("\"owner\": \"host\""), "{r:?}");
}

#[test]
fn gpu_rebind_nvidia_forces_where_plain_rebind_only_shows_the_plan() {
    let l = Links::new();
    // On vfio-pci, so that there is something to return (a GPU at home with no restore
    // record has no plan at all).
    for n in 0..4 {
        l._sim
            .set_driver(RTX_3090_TI.with_function(n), Some("vfio-pci"))
            .unwrap();
    }
    let plain = l.run("handoff", &["rebind"]);
    assert_eq!(plain.code, 2, "{plain:?}");
    assert!(plain.stdout.contains("add --force"), "{plain:?}");

    // --dry-run shows the plan in both cases; the link adds --force, and a --force given
    // again is not an error.
    for args in [&["--dry-run"][..], &["--dry-run", "--force"]] {
        let r = l.run("gpu-rebind-nvidia", args);
        assert_eq!(r.code, 0, "gpu-rebind-nvidia {args:?}: {r:?}");
        assert!(r.stdout.contains("To return it to the host"), "{r:?}");
    }

    let help = l.run("gpu-rebind-nvidia", &["--help"]);
    assert!(
        help.stdout
            .contains("gpu-rebind-nvidia is `handoff rebind --force`"),
        "{help:?}"
    );
}

#[test]
fn version_works_under_every_seed_name() {
    let l = Links::new();
    for (name, _) in SEED_NAMES {
        let r = l.run(name, &["--version"]);
        assert_eq!(r.code, 0, "{name}: {r:?}");
        assert_eq!(r.stdout.trim(), format!("handoff {}", env!("CARGO_PKG_VERSION")));
    }
}

#[test]
fn a_usage_error_names_the_seed_command() {
    let l = Links::new();
    let r = l.run("vm-health", &["--no-such-flag"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("Usage: vm-health"), "{r:?}");
}

#[test]
fn other_names_are_plain_handoff() {
    let l = Links::new();
    let r = run(&l.tmp.path().join("handoff-real"), l.tmp.path(), &["--help"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("Commands:\n  status"), "{r:?}");
    assert!(!r.stdout.contains("__generate"), "{r:?}");
}
