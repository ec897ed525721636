//! The binding engine against the simulated kernel: plans as values, then real handoffs
//! through the FUSE-mounted sysfs with every step failing and hanging in turn.
//!
//! What is asserted is what a user would see: the `driver` links, the restore record
//! under `[host] run`, the error text, and the writes the kernel received, in order.
//!
//! Run with `cargo test --all-features --test bind_engine` as root with `/dev/fuse`.
//! Under `CI=true` a missing `/dev/fuse` fails; elsewhere these tests skip, saying why.

use std::path::Path;
use std::time::{Duration, Instant};

use fuse_gpu::{
    AUDIO, GPU, HOME, Sim, UCSI, USB, addr, forked_children, hold, serial, wait_gone, workstation,
};
use handoff::bind::plan::{self, Expect, Step};
use handoff::bind::record::{Phase, RestoreRecord};
use handoff::bind::{self, BindError, Outcome};
use handoff::gpu::{Function, FunctionKind, Gpu, Owner};
use handoff::simulated_tree::{RTX_3090_TI, SimSpec};
use handoff_kernelsim::{Errno, FaultRule, FileKind, Release};
use handoff_test_support::fuse_gpu;

const PATIENT: Duration = Duration::from_secs(5);
const WATCHDOG: Duration = Duration::from_secs(1);
/// How long past the watchdog a hung handoff may take to report and roll back. What these
/// tests prove is that the caller comes back at all (a stuck write would keep it forever),
/// not how fast: the bound leaves room for a loaded 2-core CI machine (rollback forks a
/// few short-lived readers and writers; seen at up to 2.4 s past the watchdog under load
/// 10+), plus the bounded read of the hung function's `driver_override` when rolling back
/// (its lock is held by the hung write, so that read waits out `LOCKED_READ_TIMEOUT`).
const MARGIN: Duration = Duration::from_secs(4).saturating_add(handoff::gpu::LOCKED_READ_TIMEOUT);

fn to_vfio(sim: &Sim, timeout: Duration) -> Result<Outcome, BindError> {
    bind::hand_to_vfio(&sim.host(), addr(GPU), Some("win11"), timeout, &mut |_| {})
}

fn to_host(sim: &Sim, timeout: Duration) -> Result<Outcome, BindError> {
    bind::return_to_host(&sim.host(), addr(GPU), "nvidia", timeout, &mut |_| {})
}

fn record(sim: &Sim) -> Option<RestoreRecord> {
    RestoreRecord::load(&sim.host(), addr(GPU)).unwrap()
}

fn s(file: &str, value: &str) -> (String, String) {
    (file.to_owned(), value.to_owned())
}

/// The writes that move `bdf` from `from` to vfio-pci.
fn writes_to_vfio(bdf: &str, from: &str) -> Vec<(String, String)> {
    vec![
        s(&format!("{bdf}/driver_override"), "vfio-pci"),
        s(&format!("{from}/unbind"), bdf),
        s("drivers_probe", bdf),
    ]
}

/// The writes that move `bdf` from vfio-pci back to its driver.
fn writes_to_host(bdf: &str) -> Vec<(String, String)> {
    vec![
        s(&format!("{bdf}/driver_override"), ""),
        s("vfio-pci/unbind", bdf),
        s("drivers_probe", bdf),
    ]
}

// ---------------------------------------------------------------------------------------
// Plans, on `Gpu` values.

fn function(n: u8, kind: FunctionKind, driver: &str, driver_override: Option<&str>) -> Function {
    Function {
        address: RTX_3090_TI.with_function(n),
        kind,
        driver: Some(driver.into()),
        vendor: 0x10de,
        device: 0,
        class: 0,
        driver_override: driver_override.map(str::to_owned),
        locked: false,
        runtime_status: Some("active".into()),
        iommu_group: Some(13),
    }
}

fn rtx_on(drivers: [&str; 4], driver_override: Option<&str>, owner: Owner) -> Gpu {
    let kinds = [
        FunctionKind::Vga,
        FunctionKind::Audio,
        FunctionKind::Usb,
        FunctionKind::Serial,
    ];
    Gpu {
        address: RTX_3090_TI,
        name: Some("NVIDIA GeForce RTX 3090 Ti".into()),
        owner,
        functions: (0..4)
            .map(|i| function(i as u8, kinds[i], drivers[i], driver_override))
            .collect(),
        iommu_group: None,
    }
}

fn rtx_at_home() -> Gpu {
    rtx_on(HOME.map(|(_, d)| d), None, Owner::Host)
}

fn rtx_on_vfio() -> Gpu {
    rtx_on(["vfio-pci"; 4], Some("vfio-pci"), Owner::Vfio)
}

fn vfio() -> String {
    "vfio-pci".into()
}

#[test]
fn plan_to_vfio_saves_the_record_then_moves_each_function_graphics_first() {
    let gpu = rtx_at_home();
    let mut want = vec![Step::SaveRecord];
    for (bdf, driver) in HOME {
        let function = addr(bdf);
        want.extend([
            Step::SetOverride {
                function,
                driver: Some(vfio()),
            },
            Step::Unbind {
                function,
                driver: driver.into(),
            },
            Step::Probe { function },
            Step::Verify {
                function,
                expect: Expect::Driver(vfio()),
            },
        ]);
    }
    assert_eq!(plan::to_vfio(&gpu, true), want);

    let unloaded = plan::to_vfio(&gpu, false);
    assert_eq!(unloaded[0], Step::LoadVfio);
    assert_eq!(unloaded[1..], want[..]);
}

#[test]
fn plan_to_vfio_for_a_gpu_already_on_vfio_only_checks() {
    let steps = plan::to_vfio(&rtx_on_vfio(), true);
    let changes: Vec<&Step> = steps
        .iter()
        .filter(|s| !matches!(s, Step::Verify { .. } | Step::SaveRecord))
        .collect();
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(
        steps.iter().filter(|s| matches!(s, Step::Verify { .. })).count(),
        4
    );
}

#[test]
fn plan_to_host_returns_functions_in_reverse_to_their_recorded_drivers_then_drops_the_record() {
    let record = RestoreRecord::new(&rtx_at_home(), Some("win11"));
    let mut want = Vec::new();
    for (bdf, driver) in HOME.iter().rev() {
        let function = addr(bdf);
        want.extend([
            Step::SetOverride {
                function,
                driver: None,
            },
            Step::Unbind {
                function,
                driver: vfio(),
            },
            Step::Probe { function },
            Step::Verify {
                function,
                expect: Expect::Driver((*driver).into()),
            },
        ]);
    }
    want.push(Step::RemoveRecord);
    assert_eq!(plan::to_host(&rtx_on_vfio(), Some(&record), "nvidia"), want);
}

#[test]
fn plan_to_host_for_a_gpu_already_home_only_checks() {
    let record = RestoreRecord::new(&rtx_at_home(), None);
    let steps = plan::to_host(&rtx_at_home(), Some(&record), "nvidia");
    assert!(
        steps
            .iter()
            .all(|s| matches!(s, Step::Verify { .. } | Step::RemoveRecord)),
        "{steps:?}"
    );
    assert_eq!(steps.last(), Some(&Step::RemoveRecord));
}

#[test]
fn plan_to_host_without_a_record_sends_the_graphics_function_to_the_host_driver() {
    let steps = plan::to_host(&rtx_on_vfio(), None, "nvidia");
    assert!(steps.contains(&Step::Verify {
        function: addr(GPU),
        expect: Expect::Driver("nvidia".into())
    }));
    // Every function is taken off vfio-pci.
    for (bdf, _) in HOME {
        assert!(steps.contains(&Step::Unbind {
            function: addr(bdf),
            driver: vfio()
        }));
    }
}

// ---------------------------------------------------------------------------------------
// Handoffs through the simulated sysfs.

#[test]
fn hands_every_function_to_vfio_graphics_first_and_back_home_in_reverse() {
    let Some(sim) = workstation() else { return };
    let out = to_vfio(&sim, PATIENT).unwrap();
    sim.assert_on_vfio();
    assert_eq!(out.steps.first(), Some(&Step::SaveRecord));

    let r = record(&sim).expect("a restore record while the GPU is away");
    assert_eq!(r.phase, Phase::Bound);
    assert_eq!(r.vm.as_deref(), Some("win11"));
    let recorded: Vec<(String, Option<String>)> = r
        .functions
        .iter()
        .map(|f| (f.address.to_string(), f.driver.clone()))
        .collect();
    let home: Vec<(String, Option<String>)> = HOME
        .iter()
        .map(|(f, d)| (f.to_string(), Some(d.to_string())))
        .collect();
    assert_eq!(recorded, home);

    let want: Vec<_> = HOME.iter().flat_map(|(f, d)| writes_to_vfio(f, d)).collect();
    assert_eq!(sim.short_log(), want);

    sim.clear_log();
    to_host(&sim, PATIENT).unwrap();
    sim.assert_home();
    assert_eq!(record(&sim), None);
    assert!(!RestoreRecord::path(&sim.host(), addr(GPU)).exists());
    let want: Vec<_> = HOME.iter().rev().flat_map(|(f, _)| writes_to_host(f)).collect();
    assert_eq!(sim.short_log(), want);
}

#[test]
fn a_second_handoff_to_vfio_writes_nothing_and_keeps_the_original_drivers() {
    let Some(sim) = workstation() else { return };
    to_vfio(&sim, PATIENT).unwrap();
    sim.clear_log();
    let out = to_vfio(&sim, PATIENT).unwrap();
    assert_eq!(sim.short_log(), vec![], "already on vfio-pci: only checks");
    assert!(
        out.steps
            .iter()
            .all(|s| matches!(s, Step::Verify { .. } | Step::SaveRecord)),
        "{:?}",
        out.steps
    );
    let r = record(&sim).unwrap();
    assert_eq!(r.phase, Phase::Bound);
    assert_eq!(
        r.function(addr(GPU)).unwrap().driver.as_deref(),
        Some("nvidia"),
        "the record must still say where the GPU came from"
    );
    to_host(&sim, PATIENT).unwrap();
    sim.assert_home();
}

#[test]
fn returning_a_gpu_that_is_already_home_only_checks() {
    let Some(sim) = workstation() else { return };
    to_host(&sim, PATIENT).unwrap();
    assert_eq!(sim.short_log(), vec![]);
    sim.assert_home();
}

#[test]
fn loads_vfio_pci_when_it_is_missing_and_hands_over() {
    let mut spec = SimSpec::workstation();
    spec.drivers.retain(|d| d != "vfio-pci");
    let Some(sim) = fuse_gpu::mount(spec) else { return };
    assert!(!sim.sys().join("bus/pci/drivers/vfio-pci").exists());
    let out = to_vfio(&sim, PATIENT).unwrap();
    assert_eq!(out.steps.first(), Some(&Step::LoadVfio));
    sim.assert_on_vfio();
    to_host(&sim, PATIENT).unwrap();
    sim.assert_home();
}

fn assert_refused_untouched(sim: &Sim, holder: &fuse_gpu::Holder, node: &Path) {
    let e = to_vfio(sim, PATIENT).unwrap_err();
    let BindError::Refused { holders, .. } = &e else {
        panic!("expected a refusal, got: {e}")
    };
    let h = holders
        .iter()
        .find(|h| h.pid == holder.pid())
        .unwrap_or_else(|| panic!("the holder is not named: {holders:?}"));
    assert!(h.paths.iter().any(|p| p == node), "{h:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("sleep (pid {}", holder.pid())),
        "the refusal should name the command and pid: {msg}"
    );
    assert!(msg.contains("Nothing was changed"), "{msg}");
    assert_eq!(sim.short_log(), vec![], "a refusal writes nothing");
    sim.assert_home();
    assert_eq!(record(sim), None);
}

#[test]
fn refuses_while_a_process_holds_nvidia0_and_writes_nothing() {
    let Some(sim) = workstation() else { return };
    let node = sim.dev("nvidia0");
    let holder = hold(&node);
    assert_refused_untouched(&sim, &holder, &node);
}

#[test]
fn refuses_while_a_process_holds_the_audio_functions_node_and_writes_nothing() {
    let Some(sim) = workstation() else { return };
    let node = sim.dev("snd/controlC1");
    let holder = hold(&node);
    assert_refused_untouched(&sim, &holder, &node);
}

// ---------------------------------------------------------------------------------------
// Every step failing in turn.

/// After a failed handoff the GPU is either home with no record, or in "restore
/// required" (record phase stuck) with an error that says so; in the second case
/// `return_to_host` (`handoff rebind --force`) brings it home once the fault is gone.
fn assert_home_or_restore_required(sim: &Sim, e: &BindError, case: &str) {
    let msg = e.to_string();
    match record(sim) {
        None => {
            sim.assert_home();
            assert!(msg.contains("Rolled back"), "{case}: {msg}");
        }
        Some(r) => {
            assert_eq!(r.phase, Phase::Stuck, "{case}: {msg}");
            assert!(msg.contains("Restore required"), "{case}: {msg}");
            assert!(msg.contains("handoff rebind --force"), "{case}: {msg}");
            sim.mount.kernel(|k| k.clear_faults());
            to_host(sim, PATIENT).unwrap_or_else(|e| panic!("{case}: rebind --force: {e}"));
            sim.assert_home();
            assert_eq!(record(sim), None, "{case}");
        }
    }
}

const FAULTS: [(FileKind, Errno); 4] = [
    (FileKind::DriverOverride, Errno::EINVAL),
    (FileKind::Unbind, Errno::EBUSY),
    (FileKind::Unbind, Errno::ENODEV),
    (FileKind::DriversProbe, Errno::ENODEV),
];

#[test]
fn every_write_failing_once_on_the_way_to_vfio_rolls_the_gpu_back_home() {
    for (bdf, _) in HOME {
        for (file, errno) in FAULTS {
            let case = format!("{} {errno} on {bdf}", file.name());
            let Some(sim) = workstation() else { return };
            sim.mount.inject(FaultRule::fail(file, errno).device(addr(bdf)));
            let e = to_vfio(&sim, PATIENT).expect_err(&case);
            let msg = e.to_string();
            assert!(matches!(e, BindError::Failed { .. }), "{case}: {msg}");
            assert!(msg.contains(bdf), "{case}: the error names the function: {msg}");
            assert!(msg.contains("Rolled back"), "{case}: {msg}");
            sim.assert_home();
            assert_eq!(record(&sim), None, "{case}: no record once rolled back");
        }
    }
}

#[test]
fn every_write_failing_always_on_the_way_to_vfio_ends_home_or_restore_required() {
    for (bdf, _) in HOME {
        for (file, errno) in FAULTS {
            let case = format!("{} {errno} always on {bdf}", file.name());
            let Some(sim) = workstation() else { return };
            sim.mount
                .inject(FaultRule::fail(file, errno).device(addr(bdf)).always());
            let e = to_vfio(&sim, PATIENT).expect_err(&case);
            assert!(e.to_string().contains(bdf), "{case}: {e}");
            assert_home_or_restore_required(&sim, &e, &case);
        }
    }
}

#[test]
fn every_write_failing_on_the_way_home_leaves_restore_required_and_rebind_force_finishes() {
    for (bdf, _) in HOME {
        for (file, errno) in FAULTS {
            let case = format!("{} {errno} on {bdf} going home", file.name());
            let Some(sim) = workstation() else { return };
            to_vfio(&sim, PATIENT).unwrap();
            sim.mount.inject(FaultRule::fail(file, errno).device(addr(bdf)));
            let e = to_host(&sim, PATIENT).expect_err(&case);
            let msg = e.to_string();
            assert!(msg.contains(bdf), "{case}: {msg}");
            let r = record(&sim).expect("the record stays until the GPU is home");
            assert_eq!(r.phase, Phase::Stuck, "{case}");
            assert!(msg.contains("Restore required"), "{case}: {msg}");
            // A new VM can't take a GPU that needs restoring.
            let again = to_vfio(&sim, PATIENT).unwrap_err();
            assert!(
                matches!(again, BindError::RestoreRequired { .. }),
                "{case}: {again}"
            );
            assert!(again.to_string().contains("handoff rebind --force"), "{again}");
            to_host(&sim, PATIENT).unwrap_or_else(|e| panic!("{case}: rebind --force: {e}"));
            sim.assert_home();
            assert_eq!(record(&sim), None, "{case}");
        }
    }
}

/// Run `f` with a progress callback that does `meddle` to the kernel just before the
/// step `when` picks.
fn with_meddling(
    sim: &Sim,
    when: impl Fn(&Step) -> bool,
    meddle: impl Fn(&Sim),
    f: impl FnOnce(&mut dyn FnMut(&Step)) -> Result<Outcome, BindError>,
) -> Result<Outcome, BindError> {
    let mut progress = |step: &Step| {
        if when(step) {
            meddle(sim);
        }
    };
    f(&mut progress)
}

fn kernel_write(sim: &Sim, rel: &str, value: &str) {
    let _ = sim.mount.kernel(|k| k.write(Path::new(rel), value.as_bytes()));
}

#[test]
fn a_probe_that_binds_the_old_driver_again_fails_the_check_and_rolls_back() {
    for (bdf, driver) in HOME {
        let Some(sim) = workstation() else { return };
        let host = sim.host();
        // Something clears the override behind our back: the probe succeeds, but the
        // function goes back to its old driver.
        let e = with_meddling(
            &sim,
            |s| *s == Step::Probe { function: addr(bdf) },
            |sim| kernel_write(sim, &format!("bus/pci/devices/{bdf}/driver_override"), "\n"),
            |p| bind::hand_to_vfio(&host, addr(bdf).with_function(0), Some("win11"), PATIENT, p),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "checking {bdf} failed: it is on {driver} instead of vfio-pci"
            )),
            "{msg}"
        );
        assert!(msg.contains("Rolled back"), "{msg}");
        sim.assert_home();
        assert_eq!(record(&sim), None);
    }
}

#[test]
fn a_probe_that_binds_nothing_fails_the_check_and_rolls_back() {
    for (bdf, _) in HOME {
        let Some(sim) = workstation() else { return };
        let host = sim.host();
        // vfio-pci goes away before the probe: the probe "succeeds" and binds nothing.
        let e = with_meddling(
            &sim,
            |s| *s == Step::Probe { function: addr(bdf) },
            |sim| sim.mount.kernel(|k| k.unload_driver("vfio-pci").unwrap()),
            |p| bind::hand_to_vfio(&host, addr(GPU), Some("win11"), PATIENT, p),
        )
        .unwrap_err();
        assert!(e.to_string().contains(bdf), "{e}");
        assert_home_or_restore_required(&sim, &e, &format!("vfio-pci unloaded before probing {bdf}"));
    }
}

#[test]
fn a_host_driver_gone_on_the_way_home_leaves_restore_required_until_it_is_back() {
    for (bdf, driver) in HOME {
        let Some(sim) = workstation() else { return };
        let host = sim.host();
        to_vfio(&sim, PATIENT).unwrap();
        let e = with_meddling(
            &sim,
            |s| *s == Step::Probe { function: addr(bdf) },
            |sim| sim.mount.kernel(|k| k.unload_driver(driver).unwrap()),
            |p| bind::return_to_host(&host, addr(GPU), "nvidia", PATIENT, p),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(bdf), "{msg}");
        assert!(msg.contains("Restore required"), "{msg}");
        assert_eq!(record(&sim).unwrap().phase, Phase::Stuck);
        sim.mount.kernel(|k| k.load_driver(driver).unwrap());
        to_host(&sim, PATIENT).unwrap();
        sim.assert_home();
        assert_eq!(record(&sim), None);
    }
}

// ---------------------------------------------------------------------------------------
// Every hangable write hanging in turn.

/// A hang rule, the words the error must start with, and how the hung write ends.
struct Hang {
    rule: FaultRule,
    what: String,
    release: Release,
}

fn hang(file: FileKind, bdf: &str, driver: Option<&str>, what: &str, release: Release) -> Hang {
    let mut rule = FaultRule::hang(file).device(addr(bdf));
    if let Some(d) = driver {
        rule = rule.driver(d);
    }
    Hang {
        rule,
        what: what.to_owned(),
        release,
    }
}

/// The call returns within the watchdog and a margin, reports the hang in words, leaves
/// the record stuck; once the write is released, `return_to_host` brings everything home
/// and the writer process is gone.
fn check_hang(h: Hang, going_home: bool) {
    let _serial = serial();
    let Some(sim) = workstation() else { return };
    if going_home {
        to_vfio(&sim, PATIENT).unwrap();
    }
    sim.mount.inject(h.rule);
    let started = Instant::now();
    let r = if going_home {
        to_host(&sim, WATCHDOG)
    } else {
        to_vfio(&sim, WATCHDOG)
    };
    let took = started.elapsed();
    let e = r.expect_err(&h.what);
    assert!(
        took < WATCHDOG + MARGIN,
        "{}: the caller was stuck for {took:?}",
        h.what
    );
    assert!(
        took >= WATCHDOG,
        "{}: returned before the watchdog: {took:?}",
        h.what
    );
    let msg = e.to_string();
    assert!(matches!(e, BindError::Hung { .. }), "{msg}");
    let want = format!(
        "{} did not return after 1 s: something still holds the GPU — see `handoff blockers`",
        h.what
    );
    assert!(
        msg.starts_with(&want),
        "got:\n{msg}\nwant it to start with:\n{want}"
    );
    assert!(msg.contains("Restore required"), "{msg}");
    let r = record(&sim).expect("a hung handoff keeps its record");
    assert_eq!(r.phase, Phase::Stuck, "{msg}");
    assert!(sim.mount.hung().len() == 1, "the write should still be hung");

    let writers: Vec<u32> = forked_children().iter().map(|(pid, _)| *pid).collect();
    assert!(!writers.is_empty(), "the hung writer should be our child");

    assert!(
        r.hung_writer.is_some_and(|p| writers.contains(&(p as u32))),
        "{r:?}"
    );

    // rebind --force while the write is still in the kernel: it could land afterwards
    // and undo the restore, so nothing is touched.
    let before = sim.short_log();
    let e = to_host(&sim, PATIENT).unwrap_err();
    assert!(matches!(e, BindError::RestoreRequired { .. }), "{e}");
    assert!(e.to_string().contains("still blocked in the kernel"), "{e}");
    assert_eq!(
        sim.short_log(),
        before,
        "nothing written while the write is in flight"
    );

    sim.mount.release(h.release);
    let left = wait_gone(&writers, Duration::from_secs(3));
    assert!(
        left.is_empty(),
        "{}: writer processes left behind: {left:?}",
        h.what
    );
    to_host(&sim, PATIENT).unwrap_or_else(|e| panic!("{}: rebind --force: {e}", h.what));
    sim.assert_home();
    assert_eq!(record(&sim), None);
}

#[test]
fn a_hung_unbind_of_the_graphics_function_is_reported_and_restorable() {
    check_hang(
        hang(
            FileKind::Unbind,
            GPU,
            Some("nvidia"),
            "unbinding 0000:01:00.0 from nvidia",
            Release::Complete,
        ),
        false,
    );
}

#[test]
fn a_hung_unbind_that_finally_fails_is_reported_and_restorable() {
    check_hang(
        hang(
            FileKind::Unbind,
            GPU,
            Some("nvidia"),
            "unbinding 0000:01:00.0 from nvidia",
            Release::Fail(Errno::EBUSY),
        ),
        false,
    );
}

#[test]
fn a_hung_unbind_of_the_audio_function_is_reported_and_restorable() {
    check_hang(
        hang(
            FileKind::Unbind,
            AUDIO,
            Some("snd_hda_intel"),
            "unbinding 0000:01:00.1 from snd_hda_intel",
            Release::Complete,
        ),
        false,
    );
}

#[test]
fn a_hung_unbind_of_the_usb_function_is_reported_and_restorable() {
    check_hang(
        hang(
            FileKind::Unbind,
            USB,
            Some("xhci_hcd"),
            "unbinding 0000:01:00.2 from xhci_hcd",
            Release::Complete,
        ),
        false,
    );
}

#[test]
fn a_hung_drivers_probe_is_reported_and_restorable() {
    check_hang(
        hang(
            FileKind::DriversProbe,
            GPU,
            None,
            "probing a driver for 0000:01:00.0",
            Release::Complete,
        ),
        false,
    );
}

#[test]
fn a_hung_drivers_probe_of_the_last_function_is_reported_and_restorable() {
    check_hang(
        hang(
            FileKind::DriversProbe,
            UCSI,
            None,
            "probing a driver for 0000:01:00.3",
            Release::Fail(Errno::EIO),
        ),
        false,
    );
}

#[test]
fn a_hung_unbind_from_vfio_on_the_way_home_is_reported_and_restorable() {
    check_hang(
        hang(
            FileKind::Unbind,
            GPU,
            Some("vfio-pci"),
            "unbinding 0000:01:00.0 from vfio-pci",
            Release::Complete,
        ),
        true,
    );
}

#[test]
fn a_hung_drivers_probe_on_the_way_home_is_reported_and_restorable() {
    check_hang(
        hang(
            FileKind::DriversProbe,
            AUDIO,
            None,
            "probing a driver for 0000:01:00.1",
            Release::Complete,
        ),
        true,
    );
}

/// Someone else's unbind of the USB function hangs in nvidia-style `remove` (the device
/// reads unbound, its lock is held, its `driver_override` can't be read): our handoff sees
/// the lock within the bounded read and refuses at once, writing nothing — every write
/// would only block behind theirs. Once theirs returns, the handoff goes through.
#[test]
fn a_handoff_refuses_at_once_while_someone_elses_unbind_is_stuck_then_goes_through() {
    let _serial = serial();
    let Some(sim) = workstation() else { return };
    sim.mount.inject(
        FaultRule::hang(FileKind::Unbind)
            .device(addr(USB))
            .driver("xhci_hcd"),
    );
    let unbind = sim.sys().join("bus/pci/drivers/xhci_hcd/unbind");
    let theirs = std::thread::spawn(move || std::fs::write(unbind, USB));
    assert!(sim.mount.wait_for_hung(1, Duration::from_secs(5)));
    assert_eq!(sim.driver(USB), None, "the kernel dropped the links already");

    let before = sim.short_log();
    for go in [to_vfio as fn(&Sim, Duration) -> Result<_, BindError>, to_host] {
        let started = Instant::now();
        let e = go(&sim, WATCHDOG).unwrap_err();
        let took = started.elapsed();
        assert!(took < WATCHDOG, "the caller was stuck for {took:?}");
        let msg = e.to_string();
        assert!(matches!(e, BindError::Locked { .. }), "{msg}");
        assert!(
            msg.contains(&format!(
                "driver_override of {USB} unreadable: the device is locked"
            )),
            "{msg}"
        );
        assert!(msg.contains("Nothing was changed"), "{msg}");
    }
    assert_eq!(
        sim.short_log(),
        before,
        "nothing written while theirs is in flight"
    );
    assert_eq!(record(&sim), None, "nothing changed, nothing to restore");

    sim.mount.release(Release::Complete);
    theirs.join().unwrap().unwrap();
    to_vfio(&sim, PATIENT).unwrap();
    assert_eq!(sim.override_of(USB), "vfio-pci");
    // The record says USB had no driver when we started: it is left unbound, its
    // override cleared; everything else is home.
    to_host(&sim, PATIENT).unwrap();
    assert_eq!(sim.driver(USB), None);
    assert_eq!(sim.override_of(USB), "(null)");
    assert_eq!(sim.driver(GPU).as_deref(), Some("nvidia"));
    assert_eq!(sim.driver(UCSI).as_deref(), Some("nvidia-gpu"));
    assert_eq!(record(&sim), None);
}

/// A step fails, and the rollback's own write hangs: that writer is in flight too, so it is
/// recorded and nothing is declared home until it is out of the kernel.
#[test]
fn a_rollback_write_that_hangs_is_recorded_not_leaked() {
    let _serial = serial();
    let Some(sim) = workstation() else { return };
    sim.mount
        .inject(FaultRule::fail(FileKind::DriverOverride, Errno::EBUSY).device(addr(USB)));
    sim.mount.inject(
        FaultRule::hang(FileKind::Unbind)
            .device(addr(GPU))
            .driver("vfio-pci"),
    );
    let started = Instant::now();
    let e = to_vfio(&sim, WATCHDOG).unwrap_err();
    let took = started.elapsed();
    assert!(took < WATCHDOG + MARGIN, "the caller was stuck for {took:?}");
    let msg = e.to_string();
    assert!(matches!(e, BindError::Failed { .. }), "{msg}");
    assert!(msg.contains("Rolling back failed too"), "{msg}");
    assert!(msg.contains("writer process"), "{msg}");
    let r = record(&sim).expect("the record stays");
    assert_eq!(r.phase, Phase::Stuck);
    let ours: Vec<u32> = forked_children().iter().map(|(pid, _)| *pid).collect();
    assert!(
        r.hung_writer.is_some_and(|p| ours.contains(&(p as u32))),
        "{r:?} {ours:?}"
    );
    let e = to_host(&sim, PATIENT).unwrap_err();
    assert!(e.to_string().contains("still blocked in the kernel"), "{e}");

    sim.mount.release(Release::Complete);
    assert_eq!(wait_gone(&ours, Duration::from_secs(3)), vec![]);
    to_host(&sim, PATIENT).unwrap();
    sim.assert_home();
    assert_eq!(record(&sim), None);
}

// ---------------------------------------------------------------------------------------
// What root trusts: records, temp files, and a GPU that is not away.

#[test]
fn rebind_without_a_record_leaves_a_gpu_on_another_host_driver_alone() {
    // The iGPU case: [gpu] host_driver says one driver, the GPU is on another host driver,
    // no handoff of ours moved it, and something uses it. Nothing is ours to undo.
    let Some(sim) = workstation() else { return };
    let holder = hold(&sim.dev("nvidia0"));
    let out = bind::return_to_host(&sim.host(), addr(GPU), "nouveau", PATIENT, &mut |_| {}).unwrap();
    assert_eq!(out.steps, vec![], "nothing planned for a GPU that is not away");
    assert_eq!(sim.short_log(), vec![], "no write reached the kernel");
    sim.assert_home();
    assert_eq!(record(&sim), None);
    drop(holder);
}

#[test]
fn a_return_that_would_unbind_a_host_driver_refuses_while_a_process_holds_the_gpu() {
    let Some(sim) = workstation() else { return };
    let host = sim.host();
    // A record that sends the graphics function to another host driver than the one it is
    // on: going there means unbinding nvidia, from under whoever uses it.
    let g = handoff::gpu::read_gpu(&host, addr(GPU)).unwrap();
    let mut r = RestoreRecord::new(&g, None);
    r.functions[0].driver = Some("nouveau".into());
    r.phase = Phase::Stuck;
    r.save(&host).unwrap();
    let node = sim.dev("nvidia0");
    let holder = hold(&node);
    let e = to_host(&sim, PATIENT).unwrap_err();
    let BindError::HeldOnHost { holders, .. } = &e else {
        panic!("expected a refusal naming the holder, got: {e}")
    };
    assert!(holders.iter().any(|h| h.pid == holder.pid()), "{holders:?}");
    let msg = e.to_string();
    assert!(msg.contains(&format!("not unbinding {GPU} from nvidia")), "{msg}");
    assert!(msg.contains(&format!("sleep (pid {}", holder.pid())), "{msg}");
    assert!(msg.contains("Nothing was changed"), "{msg}");
    assert_eq!(sim.short_log(), vec![], "a refusal writes nothing");
    sim.assert_home();
    assert_eq!(
        record(&sim).map(|r| r.phase),
        Some(Phase::Stuck),
        "the record stays"
    );
}

#[test]
fn a_record_naming_a_driver_outside_sysfs_is_refused_and_nothing_is_written() {
    let Some(sim) = workstation() else { return };
    let host = sim.host();
    to_vfio(&sim, PATIENT).unwrap();
    sim.clear_log();
    let path = RestoreRecord::path(&host, addr(GPU));
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json["functions"][1]["driver"] = "../../../../../tmp/evil".into();
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();

    let e = to_host(&sim, PATIENT).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(AUDIO), "names the function: {msg}");
    assert!(msg.contains("not a kernel driver name"), "{msg}");
    assert!(msg.contains("nothing was changed"), "{msg}");
    assert_eq!(sim.short_log(), vec![], "no write reached the kernel");
    sim.assert_on_vfio();
}

#[test]
fn a_symlink_planted_at_the_records_temp_name_is_not_followed() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let secret = tmp.path().join("shadow");
    std::fs::write(&secret, "root only\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The name an earlier version wrote through: `.<file>.tmp.<pid>` of the writer.
    let planted = run.join(format!(".restore-{GPU}.json.tmp.{}", std::process::id()));
    std::os::unix::fs::symlink(&secret, &planted).unwrap();

    let host = handoff::Host {
        run: run.clone(),
        ..handoff::Host::system()
    };
    let r = RestoreRecord {
        version: 1,
        gpu: addr(GPU),
        vm: Some("win11".into()),
        created: 1,
        phase: Phase::Bound,
        functions: Vec::new(),
        problem: None,
        hung_writer: None,
        hung_writer_start: None,
    };
    r.save(&host).unwrap();

    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only\n");
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the link's target keeps its mode");
    assert_eq!(RestoreRecord::load(&host, addr(GPU)).unwrap(), Some(r));
    let mode = std::fs::metadata(RestoreRecord::path(&host, addr(GPU)))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644, "the record itself is world-readable");
    let mut names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            planted.file_name().unwrap().to_str().unwrap().to_owned(),
            format!("restore-{GPU}.json")
        ],
        "no temp file left behind"
    );
}
