//! Holders inside a Docker or Podman container: which container, by the engine's name.
//!
//! A Jellyfin with NVENC or an ollama container holding the GPU shows in
//! `/proc/<pid>/cgroup` as the container's cgroup, and the unit found there
//! (`docker-<id>.scope`) is the engine's, not something to `systemctl stop`: stopping the
//! scope kills the processes behind the engine's back, and the engine may restart them. So
//! the container is recognised from the cgroup path, as each engine lays it out:
//!
//! | engine, cgroup driver | path (cgroup v2 `0::` line, or v1 `name=systemd`) |
//! |---|---|
//! | Docker, systemd (Debian's default) | `/system.slice/docker-<64 hex>.scope` |
//! | Docker, cgroupfs | `/docker/<64 hex>` |
//! | Podman as root | `/machine.slice/libpod-<64 hex>.scope` (and `…/container` under it) |
//! | Podman rootless | `/user.slice/user-<uid>.slice/user@<uid>.service/user.slice/libpod-<64 hex>.scope` |
//!
//! Podman's `libpod-conmon-<id>.scope` is its monitor process, not the container. The name
//! comes from the engine's CLI ([`name_all`]: `docker inspect` / `podman inspect`, with a
//! deadline); that is for the surfaces and the CLI, never for the root hook, whose refusal
//! names the container by its short id instead (an engine's CLI can hang, and libvirtd
//! waits for the hook).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A container engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    Docker,
    Podman,
}

impl Engine {
    /// Its CLI: `docker`, `podman`.
    pub fn cli(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }
}

/// The container a holder runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub engine: Engine,
    /// The full id (64 hex digits).
    pub id: String,
    /// Its name, from the engine's CLI when it answered ([`name_all`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Container {
    /// The name, or the short id (12 digits, as `docker ps` shows it) when the engine did
    /// not say.
    pub fn shown(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => self.id.chars().take(12).collect(),
        }
    }

    /// `docker stop NAME` / `podman stop NAME`, as argv.
    pub fn stop_argv(&self) -> Vec<String> {
        vec![self.engine.cli().to_owned(), "stop".to_owned(), self.shown()]
    }
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container of a process from the text of its `/proc/<pid>/cgroup`; None outside one.
pub fn parse_cgroup(cgroup: &str) -> Option<Container> {
    let paths = cgroup.lines().filter_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        ((id == "0" && controllers.is_empty()) || controllers == "name=systemd").then_some(path)
    });
    for path in paths {
        let parts: Vec<&str> = path.split('/').collect();
        for (i, c) in parts.iter().enumerate() {
            let found = if let Some(id) = c.strip_prefix("docker-").and_then(|r| r.strip_suffix(".scope")) {
                Some((Engine::Docker, id))
            } else if let Some(id) = c.strip_prefix("libpod-").and_then(|r| r.strip_suffix(".scope")) {
                Some((Engine::Podman, id))
            } else if *c == "docker" {
                parts.get(i + 1).map(|id| (Engine::Docker, *id))
            } else {
                None
            };
            if let Some((engine, id)) = found
                && is_id(id)
            {
                return Some(Container {
                    engine,
                    id: id.to_owned(),
                    name: None,
                });
            }
        }
    }
    None
}

/// How long one engine CLI call may take before it is given up (the name is then the
/// short id).
pub const CLI_DEADLINE: Duration = Duration::from_secs(3);

/// Fills in the names of `containers` from each engine's CLI (`<engine> inspect --format
/// {{.Name}} <id>…`, one call per engine), each call killed after [`CLI_DEADLINE`]. Not
/// for the root hook (module docs). An engine whose CLI is missing, refuses (no access to
/// its socket) or does not know the id leaves the names empty.
pub fn name_all<'a>(containers: impl IntoIterator<Item = &'a mut Container>) {
    let mut all: Vec<&mut Container> = containers.into_iter().filter(|c| c.name.is_none()).collect();
    for engine in [Engine::Docker, Engine::Podman] {
        let mut ids: Vec<String> = all
            .iter()
            .filter(|c| c.engine == engine)
            .map(|c| c.id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            continue;
        }
        let mut cmd = Command::new(engine.cli());
        cmd.args(["inspect", "--format", "{{.Id}} {{.Name}}"]).args(&ids);
        let Some(out) = run_with_deadline(cmd, CLI_DEADLINE) else {
            continue;
        };
        for (id, name) in parse_inspect(&out) {
            for c in all.iter_mut().filter(|c| c.engine == engine && c.id == id) {
                c.name = Some(name.clone());
            }
        }
    }
}

/// `<id> <name>` lines of `inspect --format '{{.Id}} {{.Name}}'`; Docker writes the name
/// with a leading `/`, Podman without.
pub fn parse_inspect(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let (id, name) = l.trim().split_once(' ')?;
            let name = name.trim().trim_start_matches('/');
            (is_id(id) && !name.is_empty()).then(|| (id.to_owned(), name.to_owned()))
        })
        .collect()
}

/// The stdout of `cmd` if it exits within `deadline`; killed otherwise.
fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Option<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let end = Instant::now() + deadline;
    loop {
        match child.try_wait() {
            // Not only on success: `inspect` of several ids prints those it knows and
            // fails for the rest.
            Ok(Some(_)) => return reader.join().ok(),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}
