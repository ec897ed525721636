//! The block on a desktop whose GPU is in a Proxmox VE node (the seed's homelab: VM 140
//! "Windows 11" and VM 141 "Linux AI" share the node's RTX 5070 Ti), against fakepve
//! (PyPI) on loopback: what the one-shot block shows (in a VM, free on the node, the node
//! unreachable), and `--watch` seeing a VM start within `poll_interval_s` and at once after
//! a click of its own. The block reaches PVE through `handoff-pve` beside it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use handoff::hypervisor::{Hypervisor, Start, TaskState};
use handoff_test_support::bins;
use handoff_test_support::fakepve::{self, FakePve};
use handoff_test_support::process::Group;
use serde_json::{Value, json};

const BLOCK: &str = env!("CARGO_BIN_EXE_handoff-block");
const TOKEN: &str = "handoff@pve!desk";
const SECRET: &str = "7d2c1b0a-9e8f-4d6c-8b5a-4f3e2d1c0b9a";

/// `handoff-pve` built beside the block (a test run of this package builds no other
/// package's binaries).
fn pve_server() {
    let dir = Path::new(BLOCK).parent().unwrap();
    bins::sibling(dir, "handoff-pve", "handoff-proxmox", &["src", "proxmox/src"]);
}

fn homelab(win11: &str, linux_ai: &str) -> Option<FakePve> {
    let vm = |id: u32, name: &str, status: &str| json!({"vmid": id, "name": name, "status": status, "config": {"hostpci0": "0000:01:00,pcie=1"}});
    FakePve::start(&json!({
        "tokens": {TOKEN: SECRET},
        "guests": [vm(140, "win11", win11), vm(141, "linux-ai", linux_ai)],
    }))
}

/// A desktop's config: no such GPU in its (empty) sysfs, both VMs on the node.
fn desktop(dir: &Path, url: &str, fingerprint: &str, extra: &str) -> PathBuf {
    handoff_test_support::fakepve::desktop_config(
        dir,
        (url, fingerprint),
        (TOKEN, SECRET),
        extra,
        "[[vm]]\nvmid = 140\nlabel = \"Windows 11\"\n\n[[vm]]\nvmid = 141\nname = \"linux-ai\"\nlabel = \"Linux AI\"\n",
    )
}

/// The one-shot block in waybar's format: its JSON.
fn oneshot(config: &Path) -> Value {
    pve_server();
    let out = Command::new(BLOCK)
        .args(["--format", "waybar", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn a_desktop_without_the_gpu_shows_the_vm_that_has_it_on_the_node() {
    let Some(pve) = homelab("running", "stopped") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let v = oneshot(&desktop(tmp.path(), &pve.url, &pve.fingerprint, ""));
    assert_eq!(v["text"], "GPU: Windows 11 (VM 140)", "{v}");
    assert_eq!(v["class"], "vm", "{v}");
    // The verdict's words, as `handoff status` says them there (issue 14's headline).
    assert!(
        v["tooltip"]
            .as_str()
            .unwrap()
            .contains("\nRTX 5070 Ti: Windows 11 (VM 140)\n"),
        "{v}"
    );
}

#[test]
fn a_desktop_shows_the_gpu_free_on_the_node_when_no_vm_runs() {
    let Some(pve) = homelab("stopped", "stopped") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let v = oneshot(&desktop(tmp.path(), &pve.url, &pve.fingerprint, ""));
    assert_eq!(v["text"], "GPU: free on PVE", "{v}");
    assert!(
        v["tooltip"]
            .as_str()
            .unwrap()
            .contains("\nRTX 5070 Ti: free on the Proxmox VE node\n"),
        "{v}"
    );
}

#[test]
fn a_node_that_does_not_answer_is_pve_unreachable_with_the_reason() {
    if !fakepve::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let url = fakepve::unreachable_url();
    let pin = "AB:".repeat(31) + "AB";
    let v = oneshot(&desktop(tmp.path(), &url, &pin, ""));
    assert_eq!(v["text"], "GPU: PVE?", "{v}");
    assert_eq!(v["class"], "offline", "{v}");
    let tip = v["tooltip"].as_str().unwrap();
    assert!(tip.contains("Proxmox VE unreachable"), "{v}");
    assert!(tip.contains("cannot reach Proxmox VE at"), "{v}");
}

/// `handoff-block --watch --format waybar`, its lines on a channel.
fn watch(config: &Path) -> (Group, mpsc::Receiver<String>) {
    pve_server();
    let mut g = Group::spawn(
        Command::new(BLOCK)
            .args(["--watch", "--format", "waybar", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let out = g.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    (g, rx)
}

/// Waits for a line whose text is `want`; the lines seen on the way, for the failure.
fn wait_text(rx: &mpsc::Receiver<String>, want: &str, limit: Duration) -> Result<Duration, Vec<String>> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    while t0.elapsed() < limit {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            if v["text"] == want {
                return Ok(t0.elapsed());
            }
            seen.push(line);
        }
    }
    Err(seen)
}

/// Starts VM 141 through the API, as someone on the node would, and waits for its task.
fn start_141(config: &Path) {
    let cfg = handoff::Config::load_file(config).unwrap();
    let mut pve = handoff_proxmox::Proxmox::new(&cfg).unwrap();
    let vm = (&cfg.vms[1]).into();
    let Start::Begun(task) = pve.start(&vm).unwrap() else {
        panic!("fakepve refused the start")
    };
    let t0 = Instant::now();
    loop {
        match pve.poll(&task).unwrap() {
            TaskState::Done { .. } => return,
            TaskState::Pending { .. } if t0.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            other => panic!("the start of 141 did not finish: {other:?}"),
        }
    }
}

#[test]
fn the_streaming_block_sees_a_pve_vm_start_within_the_poll_interval() {
    let Some(pve) = homelab("stopped", "stopped") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = desktop(tmp.path(), &pve.url, &pve.fingerprint, "poll_interval_s = 1");
    let (_block, rx) = watch(&config);
    if let Err(seen) = wait_text(&rx, "GPU: free on PVE", Duration::from_secs(15)) {
        panic!("the block never showed the GPU free on the node: {seen:#?}");
    }
    start_141(&config);
    if let Err(seen) = wait_text(&rx, "GPU: Linux AI (VM 141)", Duration::from_secs(5)) {
        panic!("no \"GPU: Linux AI (VM 141)\" within 5 s of 141 starting (poll_interval_s = 1): {seen:#?}");
    }
}

#[test]
fn the_streaming_block_asks_the_node_at_once_after_a_click() {
    let Some(pve) = homelab("stopped", "stopped") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // An hour between polls: only the click can make the block ask within the test.
    let config = desktop(tmp.path(), &pve.url, &pve.fingerprint, "poll_interval_s = 3600");
    let (_block, rx) = watch(&config);
    if let Err(seen) = wait_text(&rx, "GPU: free on PVE", Duration::from_secs(15)) {
        panic!("the block never showed the GPU free on the node: {seen:#?}");
    }
    start_141(&config);
    assert!(
        wait_text(&rx, "GPU: Linux AI (VM 141)", Duration::from_secs(2)).is_err(),
        "the block asked the node without a click or its interval"
    );
    // A click on a one-shot block of the same bar (the middle button, with nothing
    // configured for it, acts on nothing but still refreshes the streaming blocks).
    let st = Command::new(BLOCK)
        .args(["--click", "middle", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    if let Err(seen) = wait_text(&rx, "GPU: Linux AI (VM 141)", Duration::from_secs(5)) {
        panic!("no \"GPU: Linux AI (VM 141)\" within 5 s of a click: {seen:#?}");
    }
}

#[test]
fn the_block_asks_pve_through_handoff_pve_and_links_no_tls_itself() {
    let contains = |p: &Path, what: &[u8]| std::fs::read(p).unwrap().windows(what.len()).any(|w| w == what);
    assert!(
        !contains(Path::new(BLOCK), b"rustls"),
        "handoff-block links rustls"
    );
    assert!(!contains(Path::new(BLOCK), b"ureq"), "handoff-block links ureq");
}
