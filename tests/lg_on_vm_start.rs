//! `handoff lg --on-vm-start` (what handoff-lg-autostart.service runs) subscribes to its
//! VM's lifecycle through the hypervisor interface. Against libvirt's in-process test
//! driver (`tests/fixtures/libvirt/two-vms-node.xml`: `win11` shut off): with the VM off it
//! says it waits and keeps waiting, opening nothing; a VM libvirt does not define ends it
//! at once (exit 2), naming the domain and the URI. No desktop is involved: nothing is opened.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// `handoff`, with `handoff-vm` (which runs its libvirt commands) built beside it.
fn bin() -> &'static str {
    handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff"))
}
const NODE_XML: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/libvirt/two-vms-node.xml"
);

fn lg_on_vm_start(dir: &std::path::Path, vm: &str) -> Command {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("[[vm]]\nname = \"{vm}\"\nlabel = \"Windows\"\nuri = \"test://{NODE_XML}\"\n"),
    )
    .unwrap();
    let mut c = Command::new(bin());
    c.args(["lg", "--on-vm-start"])
        .env("HANDOFF_CONFIG", &config)
        .env_remove(handoff::hypervisor::SIMULATED_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

#[test]
fn with_the_vm_off_it_waits_for_the_start_and_opens_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = lg_on_vm_start(tmp.path(), "win11").spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20));
    // Still waiting a moment later, having said nothing else (no Looking Glass, no error).
    let more = rx.recv_timeout(Duration::from_millis(1500));
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        first.as_deref(),
        Ok("Waiting for VM win11 to start (Looking Glass opens then).")
    );
    assert!(more.is_err(), "said more while the VM is off: {more:?}");
    assert!(still_running, "it must keep waiting for the VM's events");
}

#[test]
fn a_vm_libvirt_does_not_define_ends_it_naming_domain_and_uri() {
    let tmp = tempfile::tempdir().unwrap();
    let out = lg_on_vm_start(tmp.path(), "nope").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("no domain \"nope\" at test://{NODE_XML}")),
        "{stderr}"
    );
}
