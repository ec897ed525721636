//! A real systemd user manager (`systemd --user`) for tests on machines whose PID 1 is not
//! systemd (containers): the holders that "Stop `<unit>`" stops must run in real units.
//!
//! What it does, and what it touches:
//! - Creates one cgroup, `handoff-test-<pid>-<n>/user@0.service`, at the root of the
//!   machine's cgroup2 hierarchy (found in `/proc/self/mountinfo`; `/sys/fs/cgroup/unified`
//!   on a hybrid host). The manager and its units live below it, and their cgroup paths
//!   contain `/user@`, as under a real login. On drop every process in it is killed
//!   (`cgroup.kill`) and the directories are removed again. This is the only write outside
//!   the test's temp dir, and it is to the cgroup filesystem, not to any device.
//! - Runs the manager in a private mount namespace (`unshare --mount`) where cgroup2 is
//!   mounted at `/sys/fs/cgroup` and a tmpfs with an empty `system/` is mounted over
//!   `/run/systemd`: systemd refuses to start a user manager unless the machine "was
//!   booted with systemd" (`/run/systemd/system` exists). Neither mount is seen outside.
//! - Its runtime dir (`$XDG_RUNTIME_DIR`, where `systemctl --user` finds it) and its
//!   config and home are the test's; it starts a one-line target of the test's, so none of
//!   the distribution's default user units (sockets, agents) run.
//!
//! Because of that cgroup (a write under `/sys/fs/cgroup`, and tests write nothing to the
//! real `/sys` by default) it runs only with `HANDOFF_TEST_CGROUP=1`
//! ([`UserManager::start_if_allowed`]). Then, under `CI=true`, a missing systemd, unshare
//! or cgroup2 fails the test; elsewhere [`UserManager::start`] returns None and the test
//! skips that part, saying why.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

const SYSTEMD: &str = "/lib/systemd/systemd";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A running `systemd --user` in a cgroup and mount namespace of its own; killed and
/// removed on drop.
pub struct UserManager {
    /// The runtime dir the manager serves (`$XDG_RUNTIME_DIR/systemd/private`).
    pub runtime: PathBuf,
    config: PathBuf,
    home: PathBuf,
    /// The test's cgroup (the parent of `user@0.service`), absolute.
    cgroup: PathBuf,
    child: Child,
}

fn skip(why: &str) -> Option<UserManager> {
    crate::tools::required(why);
    None
}

/// The mount point of the cgroup2 hierarchy, from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(point))
    })
}

impl UserManager {
    /// [`UserManager::start`] when `HANDOFF_TEST_CGROUP=1` allows the cgroup it makes (a
    /// write under `/sys/fs/cgroup`, which tests do not do unasked); else says so, `None`.
    pub fn start_if_allowed(dir: &Path, runtime: &Path) -> Option<UserManager> {
        if std::env::var("HANDOFF_TEST_CGROUP").as_deref() != Ok("1") {
            eprintln!(
                "NOT RUN: the systemd user manager part (it creates a cgroup under /sys/fs/cgroup; \
                 HANDOFF_TEST_CGROUP=1 runs it)"
            );
            return None;
        }
        Self::start(dir, runtime)
    }

    /// A manager serving `runtime` (created 0700 if missing), with its config and home
    /// under `dir`.
    pub fn start(dir: &Path, runtime: &Path) -> Option<UserManager> {
        for tool in [
            SYSTEMD,
            "/usr/bin/systemctl",
            "/usr/bin/systemd-run",
            "/usr/bin/unshare",
        ] {
            if !Path::new(tool).exists() {
                return skip(&format!("{tool} is missing (scripts/deps.sh installs systemd)"));
            }
        }
        // SAFETY: getuid cannot fail.
        if unsafe { libc::getuid() } != 0 {
            return skip("a systemd user manager in its own cgroup needs root here");
        }
        let Some(root) = cgroup2_root() else {
            return skip("no cgroup2 hierarchy is mounted");
        };
        let cgroup = root.join(format!(
            "handoff-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let slot = cgroup.join("user@0.service");
        if let Err(e) = fs::create_dir_all(&slot) {
            return skip(&format!("cannot create the cgroup {}: {e}", slot.display()));
        }
        let config = dir.join("systemd-user-config");
        let home = dir.join("systemd-user-home");
        let units = config.join("systemd/user");
        fs::create_dir_all(&units).unwrap();
        fs::create_dir_all(&home).unwrap();
        fs::create_dir_all(runtime).unwrap();
        fs::set_permissions(runtime, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        fs::write(
            units.join("handoff-test.target"),
            "[Unit]\nDescription=handoff's test session\nAllowIsolate=yes\n",
        )
        .unwrap();
        // Inside, cgroup2 is at /sys/fs/cgroup. `exec` keeps one process: the child is the
        // manager itself.
        let inside = Path::new("/sys/fs/cgroup").join(slot.strip_prefix(&root).unwrap());
        let script = format!(
            "set -e; mount -t cgroup2 none /sys/fs/cgroup; \
             mount -t tmpfs handoff-test /run/systemd; mkdir /run/systemd/system; \
             echo $$ > '{}/cgroup.procs'; exec {SYSTEMD} --user --unit=handoff-test.target",
            inside.display()
        );
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", runtime)
            .env("XDG_CONFIG_HOME", &config)
            .env("SYSTEMD_LOG_TARGET", "console")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("systemd-user.log")).unwrap())
            .process_group(0)
            .spawn()
            .expect("start systemd --user");
        let mut m = UserManager {
            runtime: runtime.to_owned(),
            config,
            home,
            cgroup,
            child,
        };
        let t = Instant::now();
        loop {
            // Not `is-system-running`: outside the manager's namespace systemctl sees no
            // /run/systemd/system and answers "offline" without asking.
            let out = m.systemctl(&["show", "--property=SystemState", "--value"]);
            let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if said == "running" || said == "degraded" {
                break;
            }
            if let Ok(Some(st)) = m.child.try_wait() {
                let log = fs::read_to_string(dir.join("systemd-user.log")).unwrap_or_default();
                panic!("systemd --user exited ({st}) before it was running:\n{log}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "systemd --user is not running after 30 s: {said:?}"
            );
            sleep(Duration::from_millis(50));
        }
        Some(m)
    }

    /// Points `c` at this manager, as `systemctl --user` run by its user would be (its
    /// runtime dir, config and home; no session bus).
    pub fn env(&self, c: &mut Command) {
        c.env("XDG_RUNTIME_DIR", &self.runtime)
            .env("XDG_CONFIG_HOME", &self.config)
            .env("HOME", &self.home)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stdin(Stdio::null());
    }

    /// `systemctl --user <args>` against this manager.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut c = Command::new("systemctl");
        c.arg("--user").args(args);
        self.env(&mut c);
        c.output().expect("run systemctl --user")
    }

    /// `systemd-run --user --unit=<unit> <properties> <command>`: a transient service.
    pub fn run(&self, unit: &str, properties: &[&str], command: &[&str]) -> Output {
        let mut c = Command::new("systemd-run");
        c.args(["--user", "--collect", "--quiet"])
            .arg(format!("--unit={unit}"));
        for p in properties {
            c.arg(format!("--property={p}"));
        }
        c.arg("--").args(command);
        self.env(&mut c);
        c.output().expect("run systemd-run --user")
    }

    /// Installs the unit file `name` with `text` in the manager's config and reloads it: a
    /// unit that can be stopped and started again (a transient one is gone once stopped).
    pub fn install_unit(&self, name: &str, text: &str) {
        fs::write(self.config.join("systemd/user").join(name), text).unwrap();
        let out = self.systemctl(&["daemon-reload"]);
        assert!(out.status.success(), "systemctl --user daemon-reload: {out:?}");
    }

    /// `ActiveState` of `unit`: `active`, `inactive`, `failed`, ….
    pub fn active_state(&self, unit: &str) -> String {
        let out = self.systemctl(&["show", "--property=ActiveState", "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The main pid of `unit` (None when it has none).
    pub fn main_pid(&self, unit: &str) -> Option<u32> {
        let out = self.systemctl(&["show", "--property=MainPID", "--value", unit]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .ok()
            .filter(|&p| p != 0)
    }
}

/// Every cgroup under `dir` (itself included), deepest first.
fn cgroups_below(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroups_below(&e.path(), out);
            }
        }
    }
    out.push(dir.to_owned());
}

impl Drop for UserManager {
    fn drop(&mut self) {
        // Nothing here may panic: drop can run while a failed test is already unwinding.
        // SAFETY: signalling the manager we started (its own process group).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(self.child.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        // Whatever is left in the test's cgroup (the manager, units it did not stop).
        let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        let _ = self.child.wait();
        let mut dirs = Vec::new();
        cgroups_below(&self.cgroup, &mut dirs);
        for d in dirs {
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Err(e) = fs::remove_dir(&d) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!("cannot remove the test's cgroup {}: {e}", d.display());
                    break;
                }
                sleep(Duration::from_millis(20));
            }
        }
    }
}
