//! The test harness for the system libvirtd works: the daemon answers, and a tiny TCG
//! domain starts and is gone again after its guard is dropped.

use handoff_test_support::libvirt::{TestDomain, require_libvirtd, virsh};

#[test]
fn tiny_domain_runs_and_is_destroyed_and_undefined_on_drop() {
    let Some(_libvirtd) = require_libvirtd() else {
        return;
    };
    assert!(virsh(&["version"]).success, "libvirtd stopped answering");

    let name;
    {
        let domain = TestDomain::define();
        name = domain.name().to_owned();
        assert!(name.starts_with(&format!("handoff-test-{}-", std::process::id())));
        assert_eq!(domain.state(), "shut off");

        let took = domain.start().expect("the tiny TCG domain starts");
        eprintln!("start took {took:?}");
        assert_eq!(domain.state(), "running");
        let listed = virsh(&["list", "--name"]);
        assert!(
            listed.stdout.lines().any(|l| l == name),
            "{name} not in `virsh list`: {}",
            listed.stdout
        );
    }

    let all = virsh(&["list", "--all", "--name"]);
    assert!(all.success, "{}", all.stderr);
    assert!(
        !all.stdout.lines().any(|l| l == name),
        "{name} still defined after drop: {}",
        all.stdout
    );
}

#[test]
fn destroy_stops_a_running_domain() {
    let Some(_libvirtd) = require_libvirtd() else {
        return;
    };
    let domain = TestDomain::define();
    domain.start().expect("start");
    let took = domain.destroy().expect("destroy");
    eprintln!("destroy took {took:?}");
    assert_eq!(domain.state(), "shut off");
}
