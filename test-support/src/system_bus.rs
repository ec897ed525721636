//! A system bus of the test's own, and polkitd on it, for what runs `pkexec` ("Return GPU
//! to Linux"). pkexec and polkit's client library only look for the system bus at its
//! standard path, `/run/dbus/system_bus_socket`, and pkexec clears its environment, so
//! the bus must be at that path: it is, in a private mount namespace (`unshare --mount`)
//! with a tmpfs over `/run/dbus`. Nothing outside the namespace sees it.
//!
//! [`SystemBus::command`] runs a program in such a namespace, after starting the bus
//! daemon there (in the program's process group, so killing the group ends both);
//! [`SystemBus::start_polkitd`] starts the real polkitd on that bus (`nsenter`), in a
//! process group of its own. As root, polkit authorizes everything without asking: pkexec
//! then runs its program, and no authentication dialog is involved.
//!
//! Under `CI=true` a missing part fails the test; elsewhere [`SystemBus::prepare`]
//! returns None and the test skips, saying why.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Where Debian installs polkitd.
pub const POLKITD: &str = "/usr/lib/polkit-1/polkitd";
const CONFIG: &str = include_str!("../../tests/fixtures/dbus/system-bus.conf");

/// A private system bus, prepared in a dir of the test's (see the module header).
pub struct SystemBus {
    dir: PathBuf,
    config: PathBuf,
}

impl SystemBus {
    /// Checks the tools and writes the bus's config into `dir`.
    pub fn prepare(dir: &Path) -> Option<SystemBus> {
        let mut missing = None;
        for tool in [
            "unshare",
            "nsenter",
            "dbus-daemon",
            "dbus-send",
            "pkexec",
            POLKITD,
        ] {
            if !crate::tools::have(tool) {
                missing = Some(tool);
            }
        }
        // SAFETY: getuid cannot fail.
        let why = match missing {
            Some(tool) => Some(format!(
                "{tool} is not installed (scripts/deps.sh installs dbus, pkexec and polkitd)"
            )),
            None if unsafe { libc::getuid() } != 0 => {
                Some("a private system bus at /run/dbus needs root (a mount namespace)".to_owned())
            }
            None => None,
        };
        if let Some(why) = why {
            crate::tools::required(&why);
            return None;
        }
        let config = dir.join("system-bus.conf");
        fs::write(&config, CONFIG).unwrap();
        Some(SystemBus {
            dir: dir.to_owned(),
            config,
        })
    }

    /// `program` (arguments to be added by the caller) in a private mount namespace whose
    /// `/run/dbus` holds this bus. The returned process becomes `program` (exec), so its
    /// pid is the program's.
    pub fn command(&self, program: &Path) -> Command {
        let script = format!(
            "set -e; mount -t tmpfs handoff-test /run/dbus; \
             dbus-daemon --config-file='{}' --nofork --nopidfile & \
             i=0; while [ ! -S /run/dbus/system_bus_socket ]; do \
               i=$((i+1)); [ $i -lt 1000 ] || {{ echo 'the test system bus did not start' >&2; exit 1; }}; \
               sleep 0.01; done; \
             exec \"$@\"",
            self.config.display()
        );
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c", &script, "sh"])
            .arg(program);
        c
    }

    /// `dbus-send --system` in the mount namespace of `pid`: whether polkitd's name has
    /// an owner on the bus there.
    fn polkit_on_bus(pid: u32) -> bool {
        Command::new("nsenter")
            .args(["--target", &pid.to_string(), "--mount", "--"])
            .args([
                "dbus-send",
                "--system",
                "--print-reply",
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                "string:org.freedesktop.PolicyKit1",
            ])
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("boolean true"))
    }

    /// The real polkitd on the bus in the mount namespace of `pid` (a process started
    /// with [`SystemBus::command`]); returns once it owns `org.freedesktop.PolicyKit1`.
    /// The caller kills its process group.
    pub fn start_polkitd(&self, pid: u32) -> Child {
        let mut child = Command::new("nsenter")
            .args([
                "--target",
                &pid.to_string(),
                "--mount",
                "--",
                POLKITD,
                "--no-debug",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.join("polkitd.log")).unwrap())
            .process_group(0)
            .spawn()
            .expect("start polkitd");
        let t = Instant::now();
        while !Self::polkit_on_bus(pid) {
            if let Ok(Some(st)) = child.try_wait() {
                let log = fs::read_to_string(self.dir.join("polkitd.log")).unwrap_or_default();
                panic!("polkitd exited ({st}):\n{log}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "polkitd did not own org.freedesktop.PolicyKit1 within 30 s"
            );
            sleep(Duration::from_millis(50));
        }
        child
    }
}
