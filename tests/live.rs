//! The live change stream without libvirt: uevent parsing from fixtures, synthetic uevents
//! through the real netlink socket (root may broadcast on the kernel's group), and inotify
//! on a temporary run directory with the hook's own `HookState::save`.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use handoff::Config;
use handoff::live::uevent::{SlotFilter, Uevent, parse_uevent, send_uevent};
use handoff::live::{Change, DriverAction, Sources, Watcher};
use handoff::pci::PciAddress;
use handoff::state::{HookPhase, HookState};
use handoff_test_support::tools::is_root;

/// Watchers in this binary share the uevent group and the thread names the shutdown test
/// counts, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/uevent")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn gpu() -> PciAddress {
    "0000:01:00.0".parse().unwrap()
}

fn change_for(name: &str) -> Option<Change> {
    let ev = parse_uevent(&fixture(name)).unwrap_or_else(|| panic!("{name} does not parse"));
    SlotFilter::new(gpu()).change(&ev)
}

#[test]
fn parses_the_kernels_real_framing() {
    let ev = parse_uevent(&fixture("real-change-virtio-pci.bin")).expect("parses");
    assert_eq!(ev.action, "change");
    assert_eq!(ev.devpath, "/devices/pci0000:00/0000:00:01.0");
    assert_eq!(ev.subsystem(), Some("pci"));
    assert_eq!(ev.get("DRIVER"), Some("virtio-pci"));
    assert_eq!(ev.get("SEQNUM"), Some("1820"));
    assert_eq!(ev.pci_address(), Some("0000:00:01.0".parse().unwrap()));
    // Round trip: what the simulator and the tests send is what the kernel sends.
    assert_eq!(ev.to_bytes(), fixture("real-change-virtio-pci.bin"));
}

#[test]
fn gpu_bind_to_vfio_is_a_driver_change_naming_the_new_driver() {
    assert_eq!(
        change_for("gpu-bind-vfio-pci.bin"),
        Some(Change::Driver {
            function: gpu(),
            action: DriverAction::Bind,
            driver: Some("vfio-pci".into()),
        })
    );
}

#[test]
fn unbind_and_remove_have_no_driver() {
    assert_eq!(
        change_for("gpu-unbind.bin"),
        Some(Change::Driver {
            function: gpu(),
            action: DriverAction::Unbind,
            driver: None,
        })
    );
    assert_eq!(
        change_for("gpu-remove.bin"),
        Some(Change::Driver {
            function: gpu(),
            action: DriverAction::Remove,
            driver: None,
        })
    );
}

#[test]
fn the_audio_function_follows_the_gpu_slot() {
    assert_eq!(
        change_for("audio-bind-snd-hda-intel.bin"),
        Some(Change::Driver {
            function: gpu().with_function(1),
            action: DriverAction::Bind,
            driver: Some("snd_hda_intel".into()),
        })
    );
}

#[test]
fn other_devices_driver_objects_and_change_events_are_ignored() {
    assert_eq!(change_for("other-device-bind.bin"), None);
    assert_eq!(change_for("driver-add-vfio-pci.bin"), None);
    assert_eq!(
        SlotFilter::new("0000:00:01.0".parse().unwrap())
            .change(&parse_uevent(&fixture("real-change-virtio-pci.bin")).unwrap()),
        None,
        "`change` is not a driver-core action"
    );
}

#[test]
fn udevs_group_2_messages_and_garbage_do_not_parse() {
    assert_eq!(parse_uevent(&fixture("udev-monitor-header.bin")), None);
    assert_eq!(parse_uevent(b""), None);
    assert_eq!(parse_uevent(b"no header here\0ACTION=bind\0"), None);
    assert_eq!(parse_uevent(b"bind@relative/path\0"), None);
}

/// A config whose GPU sits in a slot no real machine has, unique per test, so synthetic
/// uevents never look like another test's (or a real device's).
fn config_with_gpu(bus: u8, run: &Path) -> Config {
    let mut c = Config::default();
    c.gpu.address = PciAddress::new(0x0ab0, bus, 0, 0);
    c.host.run = run.to_owned();
    c.vms.clear();
    c
}

fn only(uevents: bool, run_dir: bool) -> Sources {
    Sources {
        uevents,
        run_dir,
        nodes: false,
        libvirt: false,
        vm_events: None,
    }
}

fn next(w: &Watcher, within: Duration) -> (Change, Duration) {
    let t = Instant::now();
    let c = w
        .recv_timeout(within)
        .unwrap_or_else(|e| panic!("no change within {within:?}: {e}"));
    (c, t.elapsed())
}

fn devpath(f: PciAddress) -> String {
    format!("/devices/pci{:04x}:00/{:04x}:00:01.0/{f}", f.domain, f.domain)
}

#[test]
fn a_bind_uevent_for_the_gpu_arrives_within_100ms_and_other_devices_are_ignored() {
    if !is_root() {
        eprintln!("SKIPPED: sending to the kernel's uevent group needs root (CAP_NET_ADMIN)");
        return;
    }
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let config = config_with_gpu(0x11, &tmp.path().join("run"));
    let gpu = config.gpu.address;
    let watcher = Watcher::new(&config, only(true, false)).expect("watcher");

    // Another device first: if it were not ignored, it would be the first change seen.
    let other = PciAddress::new(0x0ab0, 0x12, 0, 0);
    let started = Instant::now();
    send_uevent(&Uevent::pci(DriverAction::Bind, &devpath(other), other, Some("vfio-pci")).to_bytes())
        .expect("send a synthetic uevent");
    send_uevent(&Uevent::pci(DriverAction::Bind, &devpath(gpu), gpu, Some("vfio-pci")).to_bytes())
        .expect("send a synthetic uevent");
    let (change, _) = next(&watcher, Duration::from_millis(100));
    eprintln!("uevent → change: {:?}", started.elapsed());
    assert_eq!(
        change,
        Change::Driver {
            function: gpu,
            action: DriverAction::Bind,
            driver: Some("vfio-pci".into()),
        }
    );

    let audio = gpu.with_function(1);
    send_uevent(&Uevent::pci(DriverAction::Unbind, &devpath(audio), audio, None).to_bytes()).unwrap();
    let (change, took) = next(&watcher, Duration::from_millis(100));
    eprintln!("uevent → change: {took:?}");
    assert_eq!(
        change,
        Change::Driver {
            function: audio,
            action: DriverAction::Unbind,
            driver: None,
        }
    );
}

#[test]
fn the_hooks_state_file_is_seen_within_100ms_with_its_content() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let config = config_with_gpu(0x21, &run);
    let watcher = Watcher::new(&config, only(false, true)).expect("watcher");

    let mut state = HookState::new(config.gpu.address);
    state.phase = HookPhase::Vfio;
    state.vm = Some("win11".into());
    let started = Instant::now();
    state.save(&config.host).expect("save state.json");
    let (change, _) = next(&watcher, Duration::from_millis(100));
    eprintln!("state.json saved → change: {:?}", started.elapsed());
    let Change::HookState { state: Some(seen) } = change else {
        panic!("expected the new hook state, got {change:?}");
    };
    assert_eq!(*seen, state);

    std::fs::remove_file(config.host.state_file()).unwrap();
    let (change, _) = next(&watcher, Duration::from_millis(100));
    assert_eq!(change, Change::HookState { state: None });
}

#[test]
fn restore_records_appearing_and_going_are_reported() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let config = config_with_gpu(0x22, &run);
    let watcher = Watcher::new(&config, only(false, true)).expect("watcher");

    let record = run.join(format!("restore-{}.json", config.gpu.address));
    std::fs::write(&record, "{}").unwrap();
    let file = format!("restore-{}.json", config.gpu.address);
    assert_eq!(
        next(&watcher, Duration::from_millis(100)).0,
        Change::RestoreRecord {
            file: file.clone(),
            present: true
        }
    );
    // Unrelated files (the hook's temporary dot-files among them) are not changes.
    std::fs::write(run.join(".state.json.tmp.1"), "x").unwrap();
    std::fs::remove_file(&record).unwrap();
    assert_eq!(
        next(&watcher, Duration::from_millis(100)).0,
        Change::RestoreRecord { file, present: false }
    );
}

#[test]
fn a_run_dir_created_after_the_watcher_started_is_still_seen() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    // Two missing levels, like /run/handoff before the first hook run on a fresh /run.
    let run = tmp.path().join("run").join("handoff");
    let config = config_with_gpu(0x23, &run);
    let watcher = Watcher::new(&config, only(false, true)).expect("watcher");

    let mut state = HookState::new(config.gpu.address);
    state.phase = HookPhase::Binding;
    state.save(&config.host).expect("save creates the directories");
    let (change, took) = next(&watcher, Duration::from_millis(100));
    eprintln!("state.json in a new run dir → change: {took:?}");
    let Change::HookState { state: Some(seen) } = change else {
        panic!("expected the new hook state, got {change:?}");
    };
    assert_eq!(seen.phase, HookPhase::Binding);

    // Later writes arrive through the watch on the directory itself.
    state.phase = HookPhase::Vfio;
    state.save(&config.host).unwrap();
    let Change::HookState { state: Some(seen) } = next(&watcher, Duration::from_millis(100)).0 else {
        panic!("expected a hook state");
    };
    assert_eq!(seen.phase, HookPhase::Vfio);

    // Removed and made again (a reboot's fresh /run): still watched.
    std::fs::remove_dir_all(tmp.path().join("run")).unwrap();
    assert_eq!(
        next(&watcher, Duration::from_millis(100)).0,
        Change::HookState { state: None }
    );
    state.phase = HookPhase::Host;
    state.save(&config.host).unwrap();
    let deadline = Instant::now() + Duration::from_millis(200);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next(&watcher, left).0 {
            Change::HookState { state: Some(s) } if s.phase == HookPhase::Host => break,
            Change::HookState { state: None } => continue, // the removal, reported once per watch
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn watcher_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| {
                matches!(
                    c.trim(),
                    "handoff-uevents" | "handoff-inotify" | "handoff-holders" | "handoff-nodes"
                )
            })
        })
        .count()
}

#[test]
fn dropping_the_watcher_ends_its_threads() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let config = config_with_gpu(0x31, tmp.path());
    // Earlier tests' watchers are dropped, but their threads may still be on their way out.
    wait_for_no_watcher_threads("before the test");
    let watcher = Watcher::new(&config, only(true, true)).expect("watcher");
    // A new thread names itself once it runs, so its name shows up a moment later.
    wait_for_watcher_threads(2, "after start");
    drop(watcher);
    wait_for_watcher_threads(0, "after drop");
}

fn wait_for_no_watcher_threads(when: &str) {
    wait_for_watcher_threads(0, when)
}

fn wait_for_watcher_threads(n: usize, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while watcher_threads() != n {
        assert!(
            Instant::now() < deadline,
            "{} watcher threads, not {n}, 2 s {when}",
            watcher_threads()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_simulated_handoff_looks_like_a_real_one_to_the_watcher() {
    use handoff::simulated_tree::SimSpec;
    use handoff_kernelsim::Kernel;
    if !is_root() {
        eprintln!("SKIPPED: the simulated kernel's uevents need root (CAP_NET_ADMIN)");
        return;
    }
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    // The workstation, moved to a PCI domain no real machine (or other test) uses.
    let mut spec = SimSpec::workstation();
    let moved = |a: PciAddress| PciAddress { domain: 0x0ab0, ..a };
    for f in &mut spec.functions {
        f.address = moved(f.address);
        f.parent = f.parent.map(moved);
    }
    let gpu = moved(handoff::simulated_tree::RTX_3090_TI);
    let mut kernel = Kernel::build(tmp.path(), spec).expect("simulated kernel");
    let mut config = Config::default();
    config.gpu.address = gpu;
    config.vms.clear();
    let watcher = Watcher::new(&config, only(true, false)).expect("watcher");

    let write = |k: &mut Kernel, file: &str, value: &str| {
        let outcome = k.write(Path::new(file), value.as_bytes());
        assert!(
            matches!(outcome, handoff_kernelsim::Outcome::Done(Ok(()))),
            "{file} ← {value}: {outcome:?}"
        );
    };
    let device = format!("bus/pci/devices/{gpu}");
    write(&mut kernel, &format!("{device}/driver_override"), "vfio-pci");
    write(&mut kernel, &format!("{device}/driver/unbind"), &gpu.to_string());
    write(&mut kernel, "bus/pci/drivers_probe", &gpu.to_string());
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(next(&watcher, Duration::from_millis(100)).0);
    }
    assert_eq!(
        seen,
        [
            Change::Driver {
                function: gpu,
                action: DriverAction::Unbind,
                driver: None,
            },
            Change::Driver {
                function: gpu,
                action: DriverAction::Bind,
                driver: Some("vfio-pci".into()),
            },
        ]
    );
}

/// A holder of the last scan that exits is a change of its own (nothing else moves when a
/// CUDA job ends); one already gone when handed over is reported at once; a pid dropped
/// from the set is no longer watched; and the watch's thread ends with the watcher.
#[test]
fn holders_that_exit_are_reported_and_the_set_can_change() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let config = config_with_gpu(0x32, tmp.path());
    wait_for_no_watcher_threads("before the test");
    // Only the run dir, idle: every change below comes from the holder watch.
    let w = Watcher::new(&config, only(false, true)).expect("watcher");
    let spawn = || std::process::Command::new("sleep").arg("600").spawn().unwrap();
    let (mut a, mut b) = (spawn(), spawn());
    let (pa, pb) = (a.id(), b.id());

    w.watch_holders(&[pa, pb]);
    a.kill().unwrap();
    // Not reaped yet: a zombie has exited all the same.
    let (c, _) = next(&w, Duration::from_secs(5));
    assert_eq!(c, Change::HolderExited { pid: pa });
    assert_eq!(c.to_string(), format!("pid {pa}, which used the GPU, exited"));
    a.wait().unwrap();

    // Handing over a pid that is already gone reports it at once.
    w.watch_holders(&[pa, pb]);
    let (c, _) = next(&w, Duration::from_secs(5));
    assert_eq!(c, Change::HolderExited { pid: pa });

    // A new set replaces the old one (its exit reported proves the thread took it)...
    let mut c3 = spawn();
    w.watch_holders(&[c3.id()]);
    c3.kill().unwrap();
    let (c, _) = next(&w, Duration::from_secs(5));
    assert_eq!(c, Change::HolderExited { pid: c3.id() });
    c3.wait().unwrap();
    // ...so the exit of one dropped from it is not news.
    b.kill().unwrap();
    b.wait().unwrap();
    let late = w.recv_timeout(Duration::from_millis(300));
    assert!(late.is_err(), "pid {pb} was no longer watched, yet: {late:?}");

    wait_for_watcher_threads(2, "with the holder watch");
    drop(w);
    wait_for_watcher_threads(0, "after drop");
}

#[test]
fn the_state_file_of_a_second_gpu_is_seen_with_its_content() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let config = config_with_gpu(0x22, &run);
    let watcher = Watcher::new(&config, only(false, true)).expect("watcher");

    // The hook keeps a GPU other than the primary one in state-<BDF>.json.
    let igpu = handoff::pci::PciAddress::new(0, 0, 2, 0);
    let mut state = HookState::new(igpu);
    state.phase = HookPhase::Vfio;
    state.vm = Some("macos".into());
    state
        .save_gpu(&config.host, false)
        .expect("save the iGPU's state");
    let (change, _) = next(&watcher, Duration::from_millis(100));
    let Change::HookState { state: Some(seen) } = change else {
        panic!("expected the iGPU's hook state, got {change:?}");
    };
    assert_eq!(*seen, state);
    assert!(run.join("state-0000:00:02.0.json").is_file());
}

#[test]
fn a_bind_of_any_configured_gpu_is_a_change_and_of_another_device_is_not() {
    let igpu: PciAddress = "0000:00:02.0".parse().unwrap();
    let ev = parse_uevent(
        b"bind@/devices/pci0000:00/0000:00:02.0\0ACTION=bind\0DEVPATH=/devices/pci0000:00/0000:00:02.0\0\
          SUBSYSTEM=pci\0DRIVER=vfio-pci\0PCI_SLOT_NAME=0000:00:02.0\0SEQNUM=7\0",
    )
    .expect("parses");
    assert_eq!(SlotFilter::new(gpu()).change(&ev), None, "not the RTX's slot");
    assert_eq!(
        SlotFilter::for_gpus([igpu, gpu()]).change(&ev),
        Some(Change::Driver {
            function: igpu,
            action: DriverAction::Bind,
            driver: Some("vfio-pci".into()),
        })
    );
    assert_eq!(
        SlotFilter::for_gpus([igpu, gpu()]).change(&parse_uevent(&fixture("other-device-bind.bin")).unwrap()),
        None
    );
}

/// The workstation's simulated tree (mknod'ed nodes) with the real `/proc`, watched for
/// opens and closes of the GPU's nodes only.
fn node_watch(tmp: &Path) -> (handoff::simulated_tree::SimHost, Config, Watcher) {
    use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
    let sim = SimHost::build(&tmp.join("machine"), &SimSpec::workstation()).unwrap();
    let mut config = Config::default();
    config.gpu.address = RTX_3090_TI;
    config.host = sim.host();
    config.vms.clear();
    let nodes_only = Sources {
        uevents: false,
        run_dir: false,
        nodes: true,
        libvirt: false,
        vm_events: None,
    };
    let w = Watcher::new(&config, nodes_only).expect("watcher");
    (sim, config, w)
}

/// The next [`Change::Holders`], skipping nothing else: this watcher has no other source.
fn next_holders(w: &Watcher) -> (Vec<u32>, String, Duration) {
    let (c, took) = next(w, Duration::from_secs(10));
    let Change::Holders { holders, .. } = &c else {
        panic!("expected a holder change, got {c:?}");
    };
    (holders.iter().map(|h| h.pid).collect(), c.to_string(), took)
}

/// A process opening one of the GPU's nodes is a change naming it, without anything else
/// moving (no bind, no hook); holding it twice is no news; its last close is "free".
#[test]
fn opening_and_closing_a_gpu_node_is_heard_and_only_set_changes_are_reported() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (sim, _config, w) = node_watch(tmp.path());
    let mut job = handoff_test_support::opener::Opener::start(&sim.dev().join("nvidia0"), "cuda-training");

    let t = Instant::now();
    job.open();
    let (pids, text, _) = next_holders(&w);
    eprintln!("open → change: {:?}", t.elapsed());
    assert_eq!(pids, vec![job.pid()]);
    assert!(
        text.starts_with(&format!("busy — cuda-training (pid {})", job.pid())),
        "{text}"
    );

    // The same process opening the node again leaves the set as it was: nothing is sent.
    job.open_again();
    let late = w.recv_timeout(Duration::from_millis(300));
    assert!(
        late.is_err(),
        "a second open by the same holder was reported: {late:?}"
    );

    let t = Instant::now();
    job.close();
    let (pids, text, _) = next_holders(&w);
    eprintln!("close → change: {:?}", t.elapsed());
    assert!(pids.is_empty(), "{text}");
    assert!(text.starts_with("free"), "{text}");
}

/// A node that appears after the watch started (here a framebuffer device registered by
/// the driver, `/dev/fb0`) is watched from then on.
#[test]
fn a_node_that_appears_later_is_watched_too() {
    use handoff::simulated_tree::RTX_3090_TI;
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (sim, _config, w) = node_watch(tmp.path());
    let node = sim.add_framebuffer(RTX_3090_TI, 0).unwrap();
    // The creation itself may be reported (a scan follows every new node); what counts
    // is that an open of the new node is heard.
    let mut job = handoff_test_support::opener::Opener::start(&node, "fb-reader");
    job.open();
    let pids = loop {
        let (pids, _, _) = next_holders(&w);
        if !pids.is_empty() {
            break pids;
        }
    };
    assert_eq!(pids, vec![job.pid()]);
    job.close();
    assert!(next_holders(&w).0.is_empty());
}
