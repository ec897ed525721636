//! Holders in Docker and Podman containers are named by their container, and the advice
//! is the engine's `stop`, not `systemctl stop` of its scope (issue 16).
//!
//! No container can run on the machines these tests run on (no Docker daemon, no registry
//! to pull an image from), so the cgroup paths are real-shaped fixtures
//! (tests/fixtures/containers/, one per engine and cgroup driver, as each engine writes
//! them) and the scan reads them from a procfs laid out like the kernel's. The engine's
//! CLI is the real `docker` where installed, whose daemon is not running: the name is then
//! the short id, within the deadline.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use handoff::containers::{self, Container, Engine};
use handoff::gpu;
use handoff::holders;
use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};

const DOCKER_ID: &str = "4f1c9a3be2d07c6e8b5a1f0d93c2e7b6a4d8f1e0c3b5a7d9e2f4a6c8b0d1e3f5";
const PODMAN_ID: &str = "9e2f4a6c8b0d1e3f54f1c9a3be2d07c6e8b5a1f0d93c2e7b6a4d8f1e0c3b5a7d";

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/containers")
        .join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn found(engine: Engine, id: &str) -> Option<Container> {
    Some(Container {
        engine,
        id: id.into(),
        name: None,
    })
}

#[test]
fn each_engine_and_cgroup_driver_is_recognised() {
    let c = |f| containers::parse_cgroup(&fixture(f));
    assert_eq!(c("docker-systemd"), found(Engine::Docker, DOCKER_ID));
    assert_eq!(c("docker-cgroupfs-v1"), found(Engine::Docker, DOCKER_ID));
    assert_eq!(c("podman-root"), found(Engine::Podman, PODMAN_ID));
    assert_eq!(c("podman-rootless"), found(Engine::Podman, PODMAN_ID));
    // Podman's monitor is not the container; ordinary units are not containers.
    assert_eq!(c("podman-conmon"), None);
    assert_eq!(
        containers::parse_cgroup("0::/system.slice/ollama.service\n"),
        None
    );
    assert_eq!(
        containers::parse_cgroup("0::/system.slice/docker.service\n"),
        None
    );
    assert_eq!(containers::parse_cgroup("0::/\n"), None);
}

#[test]
fn names_come_from_inspect_and_the_short_id_stands_in() {
    let d = containers::parse_inspect(&fixture("docker-inspect.out"));
    assert_eq!(d, vec![(DOCKER_ID.to_owned(), "jellyfin".to_owned())]);
    let p = containers::parse_inspect(&fixture("podman-inspect.out"));
    assert_eq!(p, vec![(PODMAN_ID.to_owned(), "ollama".to_owned())]);
    let mut c = found(Engine::Docker, DOCKER_ID).unwrap();
    assert_eq!(c.shown(), "4f1c9a3be2d0");
    c.name = Some("jellyfin".into());
    assert_eq!(c.stop_argv(), ["docker", "stop", "jellyfin"]);
    let p = Container {
        name: Some("ollama".into()),
        ..found(Engine::Podman, PODMAN_ID).unwrap()
    };
    assert_eq!(p.stop_argv(), ["podman", "stop", "ollama"]);
}

/// The real `docker` CLI with no daemon to ask (or no CLI at all): no name, no hang.
#[test]
fn an_engine_that_does_not_answer_leaves_the_short_id() {
    let mut c = found(Engine::Docker, DOCKER_ID).unwrap();
    let t = Instant::now();
    containers::name_all([&mut c]);
    assert!(t.elapsed() < containers::CLI_DEADLINE + Duration::from_secs(2));
    assert_eq!(c.name, None);
    assert_eq!(c.shown(), "4f1c9a3be2d0");
}

/// A process of a Docker container holding `nvidia0`, in a procfs laid out like the
/// kernel's: the scan names the container, the summary and the refusal say `docker stop`.
#[test]
fn a_holder_in_a_container_is_named_by_it_and_the_advice_is_docker_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(&tmp.path().join("m"), &SimSpec::workstation()).unwrap();
    let proc = tmp.path().join("proc");
    let pid = proc.join("4242");
    fs::create_dir_all(pid.join("fd")).unwrap();
    let node = fs::canonicalize(sim.dev().join("nvidia0")).unwrap();
    std::os::unix::fs::symlink(&node, pid.join("fd/3")).unwrap();
    fs::write(pid.join("status"), "Name:\tjellyfin\nUid:\t0\t0\t0\t0\n").unwrap();
    fs::write(pid.join("cmdline"), "/jellyfin/jellyfin\0").unwrap();
    fs::write(pid.join("cgroup"), fixture("docker-systemd")).unwrap();
    fs::write(proc.join("iomem"), "").unwrap();
    let host = handoff::Host {
        procfs: proc,
        ..sim.host()
    };
    let g = gpu::read_gpu(&host, RTX_3090_TI).unwrap();
    let scan = holders::scan(&host, &g, &holders::gpu_nodes(&host, &g));
    let h = &scan.holders[0];
    assert_eq!(h.container, found(Engine::Docker, DOCKER_ID));
    assert_eq!(h.unit.as_deref(), Some(&*format!("docker-{DOCKER_ID}.scope")));
    assert!(
        h.summary()
            .starts_with("jellyfin (pid 4242, user root, docker container 4f1c9a3be2d0)"),
        "{}",
        h.summary()
    );
    let refusal = handoff::bind::refusal_text(RTX_3090_TI, Some("win11"), &scan.holders, &[]);
    assert!(
        refusal.contains("stop its container: docker stop 4f1c9a3be2d0"),
        "{refusal}"
    );
}
