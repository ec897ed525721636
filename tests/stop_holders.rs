//! `handoff start --stop-holders` (and `windows-start --stop-holders`) from an environment
//! without a display or a session bus, as over SSH: it lists what it will end, refuses to
//! end anything without a terminal to ask on unless given `--yes`, and with `--yes` ends
//! the job (SIGTERM) and starts the VM. libvirt's test driver (no hook) and a simulated
//! GPU with `mknod`ed nodes; the job is a real process that opened the node itself.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff_test_support::opener::Opener;
use handoff_test_support::wait::wait_for;

const BIN: &str = env!("CARGO_BIN_EXE_handoff");
const NODE_XML: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/libvirt/two-vms-node.xml"
);

/// The binary as `program` (a path: `BIN`, or a `windows-start` link to it), with only
/// PATH, HOME and the config in its environment, stdin not a terminal.
fn run(program: &Path, tmp: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", tmp.join("home"))
        .env("HANDOFF_CONFIG", tmp.join("config.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| !r.starts_with('Z')))
}

#[test]
fn start_stop_holders_asks_for_yes_without_a_terminal_then_ends_the_job_and_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(&tmp.path().join("root"), &SimSpec::workstation()).unwrap();
    std::fs::create_dir_all(tmp.path().join("home")).unwrap();
    std::fs::write(
        tmp.path().join("config.toml"),
        format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n\
             [[vm]]\nname = \"win11\"\nlabel = \"Windows\"\nuri = \"test://{NODE_XML}\"\n\n\
             [host]\nsysfs = \"{}\"\nproc = \"/proc\"\ndev = \"{}\"\nrun = \"{}\"\n",
            sim.sysfs().display(),
            sim.dev().display(),
            sim.run().display()
        ),
    )
    .unwrap();
    let mut job = Opener::start(&sim.dev().join("nvidia0"), "cuda-training");
    job.open();
    let pid = job.pid();

    // No terminal, no --yes: the list, then a refusal; nothing ended, nothing started.
    let o = run(Path::new(BIN), tmp.path(), &["start", "--stop-holders"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("To free GPU 0000:01:00.0, this ends:"), "{t}");
    assert!(
        t.contains(&format!(
            "terminate cuda-training (pid {pid}): SIGTERM, then wait"
        )),
        "{t}"
    );
    assert!(t.contains("pass --yes"), "{t}");
    assert!(!t.contains("Starting"), "{t}");
    assert!(alive(pid), "the job was ended without a yes");

    // The seed's name, with --yes: the job ends by SIGTERM and the VM starts.
    let link = tmp.path().join("windows-start");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let o = run(&link, tmp.path(), &["--stop-holders", "--yes"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!("cuda-training (pid {pid}) has ended.")),
        "{t}"
    );
    assert!(t.contains("Windows (win11) is running"), "{t}");
    wait_for(Duration::from_secs(5), "the job to be gone", || !alive(pid));
}
