//! Services come back (issue 16), end to end: a user unit of a real `systemd --user` holds
//! the GPU; `handoff start --stop-holders --yes` stops it and starts the VM through the
//! real system libvirtd and the real hook (simulated RTX 3090 Ti behind FUSE); `handoff
//! stop --force` returns the GPU and the unit runs again.
//!
//! Opt-in twice, as the other systemd tests: the libvirtd scene (root, `/dev/fuse`, the
//! libvirtd lock; `/etc/handoff` and the hooks restored on drop) and the user manager's
//! cgroup under `/sys/fs/cgroup` (`HANDOFF_TEST_CGROUP=1`, test-support's systemd_user).

use std::process::{Command, Output};
use std::time::Duration;

use handoff::simulated_tree::RTX_3090_TI;
use handoff_test_support::libvirt::TestDomain;
use handoff_test_support::stage::{SYSTEM_CONFIG, Stage};
use handoff_test_support::systemd_user::UserManager;
use handoff_test_support::wait::wait_for;

const BIN: &str = env!("CARGO_BIN_EXE_handoff");
const UNIT: &str = "handoff-test-gpu-job.service";

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_unit_stopped_for_the_vm_runs_again_after_the_return() {
    let Some(stage) = Stage::set_up() else { return };
    let runtime = stage.dir().join("runtime");
    let Some(systemd) = UserManager::start_if_allowed(stage.dir(), &runtime) else {
        return;
    };
    let win = TestDomain::define();
    stage.install(
        &format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\nwatchdog_s = 2\n\n\
             {}[[vm]]\nname = \"{}\"\nlabel = \"Windows\"\nshutdown_timeout_s = 2\n",
            stage.host_section(),
            win.name()
        ),
        std::path::Path::new(BIN),
    );
    let node = stage.host.dev.join("nvidia0");
    systemd.install_unit(
        UNIT,
        &format!(
            "[Service]\nExecStart=/usr/bin/sleep 600\nStandardInput=file:{}\n",
            node.display()
        ),
    );
    let out = systemd.systemctl(&["start", UNIT]);
    assert!(out.status.success(), "{out:?}");
    let holds = || {
        systemd
            .main_pid(UNIT)
            .is_some_and(|p| std::fs::read_link(format!("/proc/{p}/fd/0")).is_ok_and(|l| l == node))
    };
    wait_for(Duration::from_secs(10), "the unit to hold the node", holds);

    let handoff = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args).env("HANDOFF_CONFIG", SYSTEM_CONFIG);
        systemd.env(&mut c);
        c.output().unwrap()
    };
    let o = handoff(&["start", "--stop-holders", "--yes", win.name()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains(&format!("systemctl --user stop {UNIT}")), "{t}");
    assert_eq!(systemd.active_state(UNIT), "inactive", "{t}");
    assert_eq!(win.state(), "running");

    let o = handoff(&["stop", "--force", win.name()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains(&format!("{UNIT} started again")), "{t}");
    assert_eq!(systemd.active_state(UNIT), "active", "{t}");
    wait_for(Duration::from_secs(10), "the unit to hold the node again", holds);
    assert!(stage.on_host());
}
