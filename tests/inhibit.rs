//! The sleep inhibitor's D-Bus call, against a private `dbus-daemon` with a test-side
//! `org.freedesktop.login1` that implements only `Manager.Inhibit` and hands back the
//! write end of a pipe. This checks the protocol (arguments, fd passing, the lock lasting
//! as long as the fd is open), not logind itself: no real logind runs on the test
//! machines. The "logind absent" path is checked for real where there is no system bus.

#![cfg(feature = "inhibit")]

use std::io::Read;
use std::os::fd::OwnedFd;
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
        let daemon = match Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", "--address", &address])
            .stdout(Stdio::null())
            .spawn()
        {
            Ok(d) => d,
            Err(e) => {
                assert!(std::env::var("CI").as_deref() != Ok("true"), "dbus-daemon: {e}");
                eprintln!("skipping: no dbus-daemon ({e})");
                return None;
            }
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dir.path().join("bus").exists() {
            assert!(std::time::Instant::now() < deadline, "dbus-daemon did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
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
    handoff::inhibit::logind_present_on(&conn).unwrap();
    let why = handoff::inhibit::reason_for("Windows");
    let held = handoff::inhibit::hold_on(&conn, &why).unwrap();
    let mut read_end = {
        let mut s = seen.lock().unwrap();
        assert_eq!(
            s.calls,
            [("sleep".into(), "handoff".into(), why.clone(), "block".into())]
        );
        s.read_ends.pop().unwrap()
    };
    // The service dropped its copy of the write end; ours keeps the pipe open. Make the
    // read end non-blocking to see that without hanging.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = read_end.as_raw_fd();
        libc::fcntl(
            fd,
            libc::F_SETFL,
            libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
        );
    }
    let mut buf = [0u8; 1];
    let e = read_end.read(&mut buf).unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::WouldBlock,
        "held: the pipe is still open"
    );
    drop(held);
    assert_eq!(
        read_end.read(&mut buf).unwrap(),
        0,
        "released: EOF once the inhibitor is dropped"
    );
}

#[test]
fn without_logind_on_the_bus_says_logind_is_not_running() {
    let Some(bus) = Bus::start() else { return };
    let conn = bus.connect();
    let e = handoff::inhibit::logind_present_on(&conn).unwrap_err();
    assert!(e.to_string().contains("systemd-logind is not running"), "{e}");
    let e = handoff::inhibit::hold_on(&conn, "x").unwrap_err();
    assert!(matches!(e, handoff::inhibit::InhibitError::NoLogind), "{e:?}");
}

#[test]
fn without_a_system_bus_says_so() {
    // Real: on these test machines nothing listens at the system bus address.
    if std::path::Path::new("/run/dbus/system_bus_socket").exists() {
        eprintln!("skipping: this machine has a system bus");
        return;
    }
    let e = handoff::inhibit::hold("test").unwrap_err();
    assert!(e.to_string().contains("no system D-Bus"), "{e}");
}
