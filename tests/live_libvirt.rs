//! The live change stream's libvirt source: lifecycle events from `test:///default`
//! (in-process, fast) and from the real system libvirtd with a tiny TCG domain, and a
//! libvirtd restart in the middle of a watch.
//!
//! The restart test stops the system libvirtd by pid (SIGTERM) and starts it again with
//! the harness's `ensure_libvirtd`. That daemon is a test-harness singleton on these
//! machines (handoff_test_support::libvirt starts it; nothing else depends on it), and the test
//! holds the harness's cross-process lock throughout, so no other test sees it go.

use std::time::{Duration, Instant};

use handoff::Config;
use handoff::config::VmConfig;
use handoff::live::{Change, DomainEvent, Source, Sources, Watcher};
use handoff_test_support::libvirt::{TestDomain, URI, ensure_libvirtd, pids_named, require_libvirtd};

fn libvirt_only() -> Sources {
    handoff_libvirt::events::sources(Sources {
        uevents: false,
        run_dir: false,
        nodes: false,
        libvirt: true,
        vm_events: None,
    })
}

fn config_for(uri: &str, name: &str) -> Config {
    let mut c = Config::default();
    let mut vm = VmConfig::named(name, name);
    vm.uri = uri.to_owned();
    c.vms = vec![vm];
    c
}

/// Waits (bounded) for the first change `want` accepts, skipping others; returns it and
/// how long it took.
fn wait_for(w: &Watcher, within: Duration, what: &str, want: impl Fn(&Change) -> bool) -> (Change, Duration) {
    let started = Instant::now();
    let deadline = started + within;
    let mut skipped = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match w.recv_timeout(left) {
            Ok(c) if want(&c) => return (c, started.elapsed()),
            Ok(c) => skipped.push(c),
            Err(e) => panic!("no {what} within {within:?} ({e}); saw {skipped:?}"),
        }
    }
}

fn domain_event(name: &str, event: DomainEvent) -> impl Fn(&Change) -> bool + '_ {
    move |c| matches!(c, Change::Domain { name: n, event: e, .. } if n == name && *e == event)
}

#[test]
fn test_driver_lifecycle_events_reach_the_stream() {
    let config = config_for("test:///default", "test");
    let watcher = Watcher::new(&config, libvirt_only()).expect("watcher");
    // Another connection to the same in-process test driver drives the domain.
    let conn = handoff_libvirt::libvirt::connect("test:///default").expect("test driver");
    let dom = conn
        .lookup_domain_by_name("test")
        .expect("the test driver's `test` domain");

    let t = Instant::now();
    dom.destroy().expect("destroy");
    let (_, took) = wait_for(
        &watcher,
        Duration::from_millis(500),
        "stop",
        domain_event("test", DomainEvent::Stopped),
    );
    eprintln!(
        "test driver: destroy → Stopped in {:?} after the call returned",
        took
    );
    let t2 = Instant::now();
    dom.create().expect("start");
    let (change, _) = wait_for(
        &watcher,
        Duration::from_millis(500),
        "start",
        domain_event("test", DomainEvent::Started),
    );
    eprintln!(
        "test driver: start → Started {:?} after the call began (destroy round {:?})",
        t2.elapsed(),
        t.elapsed()
    );
    assert_eq!(
        change,
        Change::Domain {
            uri: "test:///default".into(),
            name: "test".into(),
            event: DomainEvent::Started,
        }
    );
}

#[test]
fn a_real_vm_start_and_stop_are_seen_within_500ms_each() {
    let Some(_libvirtd) = require_libvirtd() else {
        return;
    };
    let domain = TestDomain::define();
    let config = config_for(URI, domain.name());
    let watcher = Watcher::new(&config, libvirt_only()).expect("watcher");

    let took = domain.start().expect("start the tiny domain");
    let (_, after) = wait_for(
        &watcher,
        Duration::from_millis(500),
        "Started",
        domain_event(domain.name(), DomainEvent::Started),
    );
    eprintln!("virsh start took {took:?}; Started arrived {after:?} after it returned");

    let took = domain.destroy().expect("destroy");
    let (_, after) = wait_for(
        &watcher,
        Duration::from_millis(500),
        "Stopped",
        domain_event(domain.name(), DomainEvent::Stopped),
    );
    eprintln!("virsh destroy took {took:?}; Stopped arrived {after:?} after it returned");
}

#[test]
fn a_libvirtd_restart_is_reported_and_the_watch_recovers() {
    let Some(_libvirtd) = require_libvirtd() else {
        return;
    };
    let domain = TestDomain::define();
    let config = config_for(URI, domain.name());
    let watcher = Watcher::new(&config, libvirt_only()).expect("watcher");
    let source = Source::Libvirt { uri: URI.into() };

    // A start seen first proves the watch is connected before libvirtd goes.
    domain.start().expect("start the tiny domain");
    wait_for(
        &watcher,
        Duration::from_millis(500),
        "Started",
        domain_event(domain.name(), DomainEvent::Started),
    );

    let daemons = pids_named("libvirtd");
    assert_eq!(
        daemons.len(),
        1,
        "expected exactly one system libvirtd (the harness's), found {daemons:?}; not touching any"
    );
    let pid = daemons[0];
    // SAFETY: plain kill(2) of the one system libvirtd, which the test harness started.
    assert_eq!(
        unsafe { libc::kill(pid as i32, libc::SIGTERM) },
        0,
        "kill libvirtd {pid}"
    );

    let (lost, took) = wait_for(
        &watcher,
        Duration::from_secs(2),
        "SourceLost",
        |c| matches!(c, Change::SourceLost { source: s, .. } if *s == source),
    );
    let Change::SourceLost { why, .. } = &lost else {
        unreachable!()
    };
    assert!(
        why.contains("libvirtd closed the connection"),
        "the close callback says why: {why}"
    );
    eprintln!("libvirtd killed → {lost} in {took:?}");

    let deadline = Instant::now() + Duration::from_secs(30);
    while pids_named("libvirtd").contains(&pid) {
        assert!(
            Instant::now() < deadline,
            "libvirtd {pid} did not exit within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let restarted = Instant::now();
    ensure_libvirtd().expect("libvirtd starts again");
    eprintln!("libvirtd answered again after {:?}", restarted.elapsed());
    // Measured from the moment the harness saw it answer; the stream may be there first.
    let (_, took) = wait_for(
        &watcher,
        Duration::from_secs(2),
        "SourceBack",
        |c| matches!(c, Change::SourceBack { source: s } if *s == source),
    );
    eprintln!(
        "SourceBack {took:?} after libvirtd answered ({:?} after it was started)",
        restarted.elapsed()
    );

    // The domain kept running while libvirtd was away; events flow again.
    domain.destroy().expect("destroy after the restart");
    wait_for(
        &watcher,
        Duration::from_millis(500),
        "Stopped after the restart",
        domain_event(domain.name(), DomainEvent::Stopped),
    );
    domain.start().expect("start after the restart");
    wait_for(
        &watcher,
        Duration::from_millis(500),
        "Started after the restart",
        domain_event(domain.name(), DomainEvent::Started),
    );
}
