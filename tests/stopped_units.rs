//! Units stopped to free the GPU are started again only once the GPU has been away and
//! the hook returned it (issue 16, "services come back"), by whom, and not when turned off.
//!
//! No systemd manager here (the end-to-end run with a real `systemd --user` and the real
//! hook is `services_back.rs`, opt-in): `systemctl start` is the real one and fails for
//! want of a manager, which still shows the unit was due and tried, and forgotten.

use handoff::Config;
use handoff::action::UnitScope;
use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff::state::{HookPhase, HookState};
use handoff::stopped::{self, Who};

const UNIT: &str = "handoff-test-gpu-job.service";

fn config(sim: &SimHost) -> Config {
    let mut c = Config::default();
    c.gpu.address = RTX_3090_TI;
    c.host = sim.host();
    c
}

fn returned_at(cfg: &Config, at: u64) {
    let mut s = HookState::new(RTX_3090_TI);
    s.phase = HookPhase::Host;
    s.returned = Some(at);
    s.save(&cfg.host).unwrap();
}

#[test]
fn a_stopped_unit_comes_back_only_after_the_gpu_was_returned() {
    if !handoff_test_support::tools::is_root() {
        // As a user the record is in $XDG_RUNTIME_DIR, which this test does not set up.
        eprintln!("SKIPPED: needs root (the record is then in [host] run)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
    let cfg = config(&sim);
    stopped::record(&cfg, UNIT, UnitScope::User).unwrap();
    let at = stopped::recorded(&cfg.host)[0].at;

    // The hook never returned the GPU: not due.
    assert!(stopped::start_again(&cfg, Who::Person).is_empty());
    // Returned before the unit was stopped (a refused start since): not due either.
    returned_at(&cfg, at - 10);
    assert!(stopped::start_again(&cfg, Who::Person).is_empty());
    assert_eq!(stopped::recorded(&cfg.host).len(), 1);

    // Returned after: the hook leaves user units to the person's side.
    returned_at(&cfg, at + 1);
    assert!(stopped::start_again(&cfg, Who::Hook).is_empty());
    assert_eq!(stopped::recorded(&cfg.host).len(), 1);

    // ... and while the GPU is away again, nothing is due.
    sim.set_driver(RTX_3090_TI, Some("vfio-pci")).unwrap();
    assert!(stopped::start_again(&cfg, Who::Person).is_empty());
    sim.set_driver(RTX_3090_TI, Some("nvidia")).unwrap();

    // Switched off: nothing.
    let mut off = cfg.clone();
    off.gpu.restart_stopped_units = false;
    assert!(stopped::start_again(&off, Who::Person).is_empty());

    // The person's side starts it (here systemctl has no manager to ask) and forgets it.
    let lines = stopped::start_again(&cfg, Who::Person);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0] == format!("{UNIT} started again")
            || lines[0].starts_with(&format!(
                "{UNIT} was not started again: systemctl --user start failed"
            )),
        "{lines:?}"
    );
    assert!(stopped::recorded(&cfg.host).is_empty());
    assert!(stopped::start_again(&cfg, Who::Person).is_empty());
}
