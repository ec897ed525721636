//! A holder in a Docker container (issue 16) on the real desktop (xfce4-panel's tray,
//! dunst, a private session bus, Xvfb): the tray's menu, read as the panel reads it
//! (com.canonical.dbusmenu), offers "Stop container NAME…", not `systemctl stop` of the
//! engine's `docker-<id>.scope`, and its confirmation runs the engine's own
//! `docker stop NAME` (the library's one implementation, `handoff::action`).
//!
//! No container can run here (no Docker daemon, no registry to pull an image from), so the
//! holder is a real process whose procfs entry is laid out like the kernel's with a
//! real-shaped cgroup path (tests/fixtures/containers/docker-systemd, Docker's systemd
//! cgroup driver). The engine's CLI is the real `docker` where installed: with no daemon,
//! the name is the short id, and `docker stop` fails saying so, which the tray shows.
//! Run with `cargo test -p handoff-tray --test tray_containers`.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff_test_support::process::Group;
use handoff_test_support::tray::{Session, wait_view};
use handoff_test_support::wait::wait_for;

const TRAY: &str = env!("CARGO_BIN_EXE_handoff-tray");
const SHORT_ID: &str = "4f1c9a3be2d0";

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/containers")
        .join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_holder_in_a_docker_container_is_stopped_with_docker_stop() {
    let Some(mut session) = Session::start(640, 300) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(&tmp.path().join("m"), &SimSpec::workstation()).unwrap();
    // A real process (so the tray's pidfd on it hears nothing until the test ends), seen
    // through a procfs where it runs in a Docker container and holds nvidia0.
    let jellyfin = Group::spawn(Command::new("sleep").arg("600"));
    let proc = tmp.path().join("proc");
    let pid = proc.join(jellyfin.pid().to_string());
    fs::create_dir_all(pid.join("fd")).unwrap();
    let node = fs::canonicalize(sim.dev().join("nvidia0")).unwrap();
    std::os::unix::fs::symlink(&node, pid.join("fd/3")).unwrap();
    fs::write(pid.join("status"), "Name:\tjellyfin\nUid:\t0\t0\t0\t0\n").unwrap();
    fs::write(pid.join("stat"), format!("{} (jellyfin) S 1", jellyfin.pid())).unwrap();
    fs::write(pid.join("cmdline"), "/jellyfin/jellyfin\0").unwrap();
    fs::write(pid.join("cgroup"), fixture("docker-systemd")).unwrap();
    fs::write(proc.join("iomem"), "").unwrap();
    let config = tmp.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n\
             [host]\nsysfs = {:?}\ndev = {:?}\nrun = {:?}\nproc = {:?}\n",
            sim.sysfs(),
            sim.dev(),
            sim.run(),
            proc,
        ),
    )
    .unwrap();

    let (conn, item) = session.start_tray(TRAY, &config);
    wait_view(&conn, &item, "busy icon", |v| v.icon_name == "handoff-busy");

    let menu = item.menu(&conn);
    let row = format!(
        "jellyfin (pid {}, root, docker container {SHORT_ID})",
        jellyfin.pid()
    );
    let under: Vec<(String, bool)> = menu
        .iter()
        .filter(|e| e.parents.last() == Some(&row))
        .map(|e| (e.label.clone(), e.enabled))
        .collect();
    assert!(
        under.contains(&(format!("Stop container {SHORT_ID}…"), true)),
        "{menu:#?}"
    );
    assert!(
        !menu
            .iter()
            .any(|e| e.label.contains("systemctl") || e.label.contains(".scope…")),
        "no systemctl stop of the engine's scope: {menu:#?}"
    );

    let before = session.notifications().0.len();
    item.click(
        &conn,
        &format!("Really stop the docker container {SHORT_ID}? (docker stop {SHORT_ID})"),
    );
    wait_for(Duration::from_secs(20), "the outcome of docker stop", || {
        session.notifications().0[before..]
            .iter()
            .any(|n| n.summary.contains("was not stopped"))
    });
    let (notes, raw) = session.notifications();
    let n = notes[before..]
        .iter()
        .find(|n| n.summary.contains("was not stopped"))
        .unwrap();
    eprintln!("notification: {} — {}", n.summary, n.body);
    assert_eq!(
        n.summary,
        format!("The container {SHORT_ID} was not stopped"),
        "{raw}"
    );
    // The engine's own stop ran (and said why it could not: no daemon here, or no CLI).
    assert!(n.body.contains(&format!("docker stop {SHORT_ID}")), "{raw}");
    // With a CLI, its own reason: no daemon here, or (where one runs) no such container.
    if handoff_test_support::tools::have("docker") {
        assert!(
            n.body.contains("Docker daemon") || n.body.contains("No such container"),
            "{raw}"
        );
    }
    // The menu is usable again once the action is over.
    wait_view(&conn, &item, "busy icon, not acting", |v| {
        v.icon_name == "handoff-busy" && !v.tooltip_title.contains("stopping")
    });
}
