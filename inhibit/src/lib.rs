//! A systemd-logind sleep inhibitor, held while a VM owns the GPU: the
//! `handoff-inhibit` crate, apart from the core so that nothing light links D-Bus for it.
//!
//! Suspending the host under a VM with a passed-through GPU hangs or loses the GPU, so
//! the tray and the Looking Glass autostart service call [`hold`] when a VM takes the GPU
//! and drop the [`Inhibitor`] when it gives it back. logind's `Inhibit` returns a file
//! descriptor; the lock lasts exactly as long as that fd is open, so dropping the value
//! (or the process dying) releases it, and nothing can leak a lock past the process.
//!
//! Talks to `org.freedesktop.login1` on the system bus with zbus 5 (blocking API): the
//! same zbus major ksni 0.3 and notify-rust 4.18 use, so the tray links one copy.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use zbus::blocking::Connection;

pub const LOGIND: &str = "org.freedesktop.login1";
const PATH: &str = "/org/freedesktop/login1";
const MANAGER: &str = "org.freedesktop.login1.Manager";

#[derive(Debug, thiserror::Error)]
pub enum InhibitError {
    #[error("no system D-Bus to ask logind: {0}")]
    NoBus(String),
    #[error("systemd-logind is not running (no {LOGIND} on the system bus)")]
    NoLogind,
    #[error("logind refused the sleep inhibitor: {0}")]
    Refused(String),
}

/// A held sleep inhibitor; released when dropped.
#[derive(Debug)]
pub struct Inhibitor {
    fd: OwnedFd,
    pub why: String,
}

impl AsFd for Inhibitor {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The reason shown by `systemd-inhibit --list` for a VM.
pub fn reason_for(vm_label: &str) -> String {
    format!("{vm_label} owns the GPU; suspending would hang or lose it")
}

/// Blocks sleep on the system bus's logind, for `why`.
pub fn hold(why: &str) -> Result<Inhibitor, InhibitError> {
    let conn = Connection::system().map_err(|e| InhibitError::NoBus(e.to_string()))?;
    hold_on(&conn, why)
}

/// [`hold`] on a given bus connection (tests use a private bus).
pub fn hold_on(conn: &Connection, why: &str) -> Result<Inhibitor, InhibitError> {
    let reply = conn
        .call_method(
            Some(LOGIND),
            PATH,
            Some(MANAGER),
            "Inhibit",
            &("sleep", "handoff", why, "block"),
        )
        .map_err(|e| match &e {
            zbus::Error::MethodError(name, _, _)
                if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown"
                    || name.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
            {
                InhibitError::NoLogind
            }
            _ => InhibitError::Refused(e.to_string()),
        })?;
    let fd: zbus::zvariant::OwnedFd = reply
        .body()
        .deserialize()
        .map_err(|e| InhibitError::Refused(format!("logind's reply carries no fd: {e}")))?;
    Ok(Inhibitor {
        fd: fd.into(),
        why: why.to_owned(),
    })
}

/// Is logind there to take an inhibitor? Ok(()) or the reason it is not.
pub fn logind_present() -> Result<(), InhibitError> {
    let conn = Connection::system().map_err(|e| InhibitError::NoBus(e.to_string()))?;
    logind_present_on(&conn)
}

pub fn logind_present_on(conn: &Connection) -> Result<(), InhibitError> {
    let reply = conn
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "NameHasOwner",
            &(LOGIND,),
        )
        .map_err(|e| InhibitError::NoBus(e.to_string()))?;
    let has: bool = reply
        .body()
        .deserialize()
        .map_err(|e| InhibitError::NoBus(e.to_string()))?;
    // logind is bus-activatable on systemd hosts even when not yet running.
    if has || activatable_on(conn) {
        Ok(())
    } else {
        Err(InhibitError::NoLogind)
    }
}

fn activatable_on(conn: &Connection) -> bool {
    conn.call_method(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        Some("org.freedesktop.DBus"),
        "ListActivatableNames",
        &(),
    )
    .ok()
    .and_then(|r| r.body().deserialize::<Vec<String>>().ok())
    .is_some_and(|names| names.iter().any(|n| n == LOGIND))
}

/// The `doctor` check: can sleep be inhibited while a VM owns the GPU?
pub fn doctor_check() -> handoff::doctor::Check {
    use handoff::doctor::{Check, Level};
    match logind_present() {
        Ok(()) => Check {
            id: "logind",
            level: Level::Ok,
            summary: "logind is present: sleep can be inhibited while a VM owns the GPU".into(),
            fix: None,
        },
        Err(e) => Check {
            id: "logind",
            level: Level::Warn,
            summary: format!("Sleep cannot be inhibited while a VM owns the GPU: {e}"),
            fix: Some(
                "run handoff on a host with systemd-logind, or make sure nothing suspends it while a VM runs"
                    .into(),
            ),
        },
    }
}
