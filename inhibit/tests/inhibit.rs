//! The sleep inhibitor's D-Bus call, against a private `dbus-daemon` with a test-side
//! `org.freedesktop.login1` that implements only `Manager.Inhibit` and hands back the
//! write end of a pipe. This checks the protocol (arguments, fd passing, the lock lasting
//! as long as the fd is open), not logind itself: no real logind runs on the test
//! machines. The "logind absent" path is checked for real where there is no system bus.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

struct Bus {
    _dir: tempfile::TempDir,
    address: String,
    daemon: std::process::Child,
}

impl Bus {
    fn start() -> Option<Bus> {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix:path={}", dir.path().join("bus").display());
        // --print-address writes the address once the daemon listens: the readiness signal.
        let mut daemon = match Command::new("dbus-daemon")
            .args([
                "--session",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
                "--address",
                &address,
            ])
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(d) => d,
            Err(e) => {
                assert!(std::env::var("CI").as_deref() != Ok("true"), "dbus-daemon: {e}");
                eprintln!("skipping: no dbus-daemon ({e})");
                return None;
            }
        };
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(daemon.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("unix:"), "dbus-daemon did not start: {line:?}");
        Some(Bus {
            _dir: dir,
            address,
            daemon,
        })
    }

    fn connect(&self) -> zbus::blocking::Connection {
        zbus::blocking::connection::Builder::address(self.address.as_str())
            .unwrap()
            .build()
            .unwrap()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// What the fake logind was asked, and the read end of each pipe it handed out.
#[derive(Default)]
struct Seen {
    calls: Vec<(String, String, String, String)>,
    read_ends: Vec<std::fs::File>,
}

/// (read end, write end); libc because std::io::pipe is newer than the MSRV.
fn pipe() -> (OwnedFd, OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

struct FakeManager(Arc<Mutex<Seen>>);

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl FakeManager {
    fn inhibit(&self, what: String, who: String, why: String, mode: String) -> zbus::zvariant::OwnedFd {
        let (r, w) = pipe();
        let mut seen = self.0.lock().unwrap();
        seen.calls.push((what, who, why, mode));
        seen.read_ends.push(std::fs::File::from(r));
        w.into()
    }
}

#[test]
fn holds_a_block_sleep_inhibitor_until_dropped() {
    let Some(bus) = Bus::start() else { return };
    let seen = Arc::new(Mutex::new(Seen::default()));
    let _logind = zbus::blocking::connection::Builder::address(bus.address.as_str())
        .unwrap()
        .name("org.freedesktop.login1")
        .unwrap()
        .serve_at("/org/freedesktop/login1", FakeManager(seen.clone()))
        .unwrap()
        .build()
        .unwrap();

    let conn = bus.connect();
    handoff_inhibit::logind_present_on(&conn).unwrap();
    let why = handoff_inhibit::reason_for("Windows");
    let held = handoff_inhibit::hold_on(&conn, &why).unwrap();
    let mut read_end = {
        let mut s = seen.lock().unwrap();
        assert_eq!(
            s.calls,
            [("sleep".into(), "handoff".into(), why.clone(), "block".into())]
        );
        s.read_ends.pop().unwrap()
    };
    // Everything runs in this process, so the pipe's open ends can be counted in
    // /proc/self/fd. The fake service drops its copy of the write end after replying, a
    // moment later: wait for that, then only the read end and the inhibitor's remain.
    let ino = std::fs::metadata(format!("/proc/self/fd/{}", read_end.as_raw_fd()))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let open_ends = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == format!("pipe:[{ino}]"))
            })
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while open_ends() > 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the fake service kept its fd"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(open_ends(), 2, "held: the inhibitor keeps the write end open");
    drop(held);
    assert_eq!(open_ends(), 1, "released once the inhibitor is dropped");
    let mut buf = [0u8; 1];
    assert_eq!(read_end.read(&mut buf).unwrap(), 0, "logind would see EOF");
}

#[test]
fn without_logind_on_the_bus_says_logind_is_not_running() {
    let Some(bus) = Bus::start() else { return };
    let conn = bus.connect();
    let e = handoff_inhibit::logind_present_on(&conn).unwrap_err();
    assert!(e.to_string().contains("systemd-logind is not running"), "{e}");
    let e = handoff_inhibit::hold_on(&conn, "x").unwrap_err();
    assert!(matches!(e, handoff_inhibit::InhibitError::NoLogind), "{e:?}");
}

#[test]
fn without_a_system_bus_says_so() {
    // Real: on these test machines nothing listens at the system bus address.
    if std::path::Path::new("/run/dbus/system_bus_socket").exists() {
        eprintln!("skipping: this machine has a system bus");
        return;
    }
    let e = handoff_inhibit::hold("test").unwrap_err();
    assert!(e.to_string().contains("no system D-Bus"), "{e}");
}
