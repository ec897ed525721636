//! `handoff __agent` driven through [`handoff::agent::Agent`], the way the tray drives it:
//! a real `handoff` process with libvirt's built-in test driver (`test:///default`, whose
//! domain `test` exists only inside the agent's process), its lifecycle events, its death
//! and restart, and its end when the surface lets go.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use handoff::Config;
use handoff::agent::{Agent, FailureKind, Request};
use handoff::live::{Change, DomainEvent, Sink, Source};
use handoff::status::VmState;

/// `handoff`, with `handoff-vm` (which runs its libvirt commands) built beside it.
fn handoff() -> &'static str {
    handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff"))
}

fn config(dir: &Path, vms: &str) -> (Config, std::path::PathBuf) {
    let path = dir.join("config.toml");
    // The GPU's sysfs is an empty directory: the agent never needs it for probes, and a
    // stop reads it only to report where the GPU is.
    std::fs::create_dir_all(dir.join("sys")).unwrap();
    let text = format!(
        "[gpu]\naddress = \"0000:01:00.0\"\n\n[host]\nsysfs = \"{}\"\nrun = \"{}\"\n\n{vms}",
        dir.join("sys").display(),
        dir.join("run").display()
    );
    std::fs::write(&path, text).unwrap();
    (Config::load_file(&path).unwrap(), path)
}

const TEST_VM: &str = "[[vm]]\nname = \"test\"\nlabel = \"Test VM\"\nuri = \"test:///default\"\n";

fn agent(path: &Path) -> (Agent, mpsc::Receiver<Change>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let sink: Sink = Arc::new(move |c| tx.lock().unwrap().send(c).is_ok());
    let a = Agent::new(
        handoff(),
        vec!["--config".into(), path.into(), "__agent".into()],
        sink,
    );
    (a, rx)
}

fn alive(pid: u32) -> bool {
    // Gone, or a zombie nobody reaped yet, both count as ended.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// The shared wait, 10 s at most.
fn wait_for(what: &str, f: impl FnMut() -> bool) {
    handoff_test_support::wait::wait_for(Duration::from_secs(10), what, f);
}

#[test]
fn probes_stops_and_starts_a_vm_and_passes_on_its_events() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, path) = config(tmp.path(), TEST_VM);
    let (a, changes) = agent(&path);
    a.start().unwrap();

    let vms = a.probe(&cfg);
    assert_eq!(vms.len(), 1);
    assert_eq!(
        (vms[0].name.as_str(), vms[0].state),
        ("test", VmState::Running),
        "{vms:?}"
    );
    assert_eq!(vms[0].label, "Test VM");

    let done = a
        .act(Request::Stop {
            vm: "test".into(),
            force: true,
        })
        .unwrap()
        .unwrap();
    assert_eq!(done.label, "Test VM");
    // libvirt's own lifecycle event, passed through the pipe to the surface's sink.
    let ev = changes.recv_timeout(Duration::from_secs(10)).expect("a change");
    assert!(
        matches!(&ev, Change::Domain { name, event: DomainEvent::Stopped, .. } if name == "test"),
        "{ev:?}"
    );
    // The state lives in the agent's process: the same agent sees it stopped.
    assert_eq!(a.probe(&cfg)[0].state, VmState::Shutoff);

    a.act(Request::Start { vm: "test".into() }).unwrap().unwrap();
    assert_eq!(a.probe(&cfg)[0].state, VmState::Running);

    // A VM that is not configured is a "not configured" failure, said the CLI's way.
    let f = a.act(Request::Start { vm: "nope".into() }).unwrap().unwrap_err();
    assert_eq!(f.kind, FailureKind::NotConfigured);
    assert!(
        f.message.contains("no VM \"nope\" in the config"),
        "{}",
        f.message
    );

    // Letting go closes its stdin: the agent exits on its own.
    let pid = a.pid().expect("running");
    drop(a);
    wait_for("the agent to exit after its surface let go", || !alive(pid));
}

#[test]
fn a_killed_agent_is_reported_and_started_again_on_the_next_request() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, path) = config(tmp.path(), TEST_VM);
    let (a, changes) = agent(&path);
    a.act(Request::Stop {
        vm: "test".into(),
        force: true,
    })
    .unwrap()
    .unwrap();
    assert_eq!(a.probe(&cfg)[0].state, VmState::Shutoff);
    while changes.try_recv().is_ok() {}

    let pid = a.pid().expect("running");
    // SAFETY: kill with the pid of the agent this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    // The stop's own lifecycle event may still be on its way: it is not what this waits for.
    let lost = loop {
        let c = changes.recv_timeout(Duration::from_secs(10)).expect("a change");
        if !matches!(c, Change::Domain { .. }) {
            break c;
        }
    };
    match &lost {
        Change::SourceLost {
            source: Source::Agent { program },
            why,
        } => {
            assert_eq!(program, handoff());
            assert!(why.contains("signal 9"), "{why}");
        }
        other => panic!("expected the agent to be reported lost, got {other:?}"),
    }
    assert!(!alive(pid));

    // The next probe starts a new agent: a new process, hence a new test driver whose
    // domain runs again (the stopped state died with the old one).
    std::thread::sleep(handoff::agent::RESPAWN_AFTER);
    let vms = a.probe(&cfg);
    assert_eq!(vms[0].state, VmState::Running, "{vms:?}");
    assert_ne!(a.pid(), Some(pid));
}

#[test]
fn an_agent_that_cannot_run_says_why_as_the_vms_state() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, _) = config(tmp.path(), TEST_VM);

    // No such program.
    let a = Agent::new(
        tmp.path().join("no-such-handoff"),
        vec!["__agent".into()],
        Arc::new(|_| true),
    );
    let vms = a.probe(&cfg);
    assert_eq!(vms[0].state, VmState::Unknown);
    let why = vms[0].error.as_deref().unwrap();
    assert!(
        why.contains("cannot start handoff's libvirt agent") && why.contains("No such file"),
        "{why}"
    );

    // A program that runs but exits at once (here: a config file that is not there).
    let (broken, _changes) = agent(&tmp.path().join("missing.toml"));
    let first = broken.probe(&cfg);
    let why = first[0].error.clone().unwrap();
    assert!(why.contains("exited with status 2"), "{why}");
    // Asked again at once, it is not restarted in a loop, and says where to look.
    let again = broken.probe(&cfg);
    let why = again[0].error.clone().unwrap();
    assert!(
        why.contains("right after it started") && why.contains("__agent"),
        "{why}"
    );

    // No VMs: nothing to ask, no agent started.
    let mut empty = cfg.clone();
    empty.vms.clear();
    assert!(a.probe(&empty).is_empty());
    assert_eq!(a.pid(), None);
}

#[test]
fn a_request_line_that_is_not_utf8_is_answered_with_an_error_and_the_agent_goes_on() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    let tmp = tempfile::tempdir().unwrap();
    let (_, path) = config(tmp.path(), TEST_VM);
    let mut child = Command::new(handoff())
        .args(["--config".as_ref(), path.as_os_str(), "__agent".as_ref()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, replies) = mpsc::channel::<serde_json::Value>();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("reply").is_some() && tx.send(v).is_err() {
                break;
            }
        }
    });
    // A start of a VM whose name is not UTF-8 (decoded lossily it would be another name),
    // then garbage without an id, then a probe.
    stdin
        .write_all(b"{\"id\":7,\"request\":{\"op\":\"start\",\"vm\":\"t\xffst\"}}\n\xfe\xfe\n")
        .unwrap();
    stdin
        .write_all(b"{\"id\":8,\"request\":{\"op\":\"probe\"}}\n")
        .unwrap();
    stdin.flush().unwrap();

    let mut got = std::collections::HashMap::new();
    while got.len() < 2 {
        let r = replies
            .recv_timeout(Duration::from_secs(20))
            .expect("the agent answered both requests");
        got.insert(r["reply"]["id"].as_u64().unwrap(), r["reply"]["reply"].clone());
    }
    let failed = &got[&7]["failed"];
    assert!(
        failed["message"].as_str().unwrap().contains("not UTF-8"),
        "{failed}"
    );
    let probes = got[&8]["probes"].as_array().expect("the probe was answered");
    assert_eq!(probes[0]["name"], "test");

    drop(stdin);
    let pid = child.id();
    wait_for("the agent to exit after its stdin closed", || !alive(pid));
    let _ = child.wait();
}
