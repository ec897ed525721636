//! Writes to sysfs control files that can hang, done in a throwaway child process.
//!
//! Writing a PCI address to a driver's `unbind` blocks in the kernel, uninterruptibly, for
//! as long as something holds the device ("NVRM: Attempting to remove device … non-zero
//! usage count"). Whoever does that write is stuck in D state: if it were the libvirt hook
//! itself, libvirtd would wait on it forever. So the write happens in a forked child that
//! does nothing but `open`+`write`+`_exit`, and the caller waits on a pidfd with a
//! deadline. On a hang the caller reports it and returns; the child stays behind until the
//! kernel lets it go.
//!
//! The child closes every inherited descriptor first: a child that kept the hook's stderr
//! pipe open would keep libvirtd waiting for EOF (virt-manager#299).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sysfs_read::{errno_code, wait_with_deadline};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing {value:?} to {path}: {source}")]
    Failed {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("writing {value:?} to {path} did not return after {} s", timeout.as_secs())]
    Hung {
        path: PathBuf,
        value: String,
        timeout: Duration,
        pid: i32,
        /// The writer's start time ([`super::record::process_start_time`]), read before
        /// anything could reap it: with the pid, it names this process and no later one.
        start: Option<u64>,
    },
    #[error("cannot start the writer process for {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
}

/// Write `value` to `path` in a child process; wait at most `timeout`.
pub fn write_with_watchdog(path: &Path, value: &str, timeout: Duration) -> Result<(), WriteError> {
    let spawn_err = |source| WriteError::Spawn {
        path: path.to_owned(),
        source,
    };
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|e| spawn_err(io::Error::other(e)))?;
    let bytes = value.as_bytes().to_vec();
    // SAFETY: between fork and _exit the child calls only async-signal-safe functions
    // (open, dup2, close_range, write, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(spawn_err(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: in the forked child: only async-signal-safe calls (above), on `cpath` and
        // `bytes`, allocated before the fork; it never returns (every path ends in _exit).
        unsafe {
            crate::sysfs_read::isolate_child_fds(-1);
            let fd = libc::open(cpath.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                libc::_exit(errno_code());
            }
            let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
            if n < 0 {
                libc::_exit(errno_code());
            }
            // close() reports errors of some sysfs stores too.
            if libc::close(fd) < 0 {
                libc::_exit(errno_code());
            }
            libc::_exit(0);
        }
    }
    match wait_with_deadline(pid, timeout) {
        Ok(Some(0)) => Ok(()),
        Ok(Some(code)) => Err(WriteError::Failed {
            path: path.to_owned(),
            value: value.to_owned(),
            source: io::Error::from_raw_os_error(code),
        }),
        Ok(None) => {
            // Unreaped until reap_later runs, so its /proc entry is still this process.
            let start = super::record::process_start_time(pid);
            reap_later(pid);
            Err(WriteError::Hung {
                path: path.to_owned(),
                value: value.to_owned(),
                timeout,
                pid,
                start,
            })
        }
        Err(source) => Err(WriteError::Failed {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        }),
    }
}

/// Reap a hung writer whenever the kernel lets it go, so a long-lived caller (the tray,
/// a test) is not left with a zombie per hang. The thread blocks only in waitpid on that
/// one pid; a short-lived caller (the hook) exits first and init inherits the child.
fn reap_later(pid: i32) {
    let spawned = std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let mut status = 0;
            // SAFETY: waits on our own child only.
            while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
                && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
            {}
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread to reap the hung writer {pid}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_write_lands() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("driver_override");
        std::fs::write(&f, "").unwrap();
        write_with_watchdog(&f, "vfio-pci", Duration::from_secs(5)).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "vfio-pci");
    }

    #[test]
    fn errors_come_back_with_the_path() {
        let e =
            write_with_watchdog(Path::new("/nonexistent/unbind"), "x", Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&e, WriteError::Failed { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{e}"
        );
        assert!(e.to_string().contains("/nonexistent/unbind"));
    }

    #[test]
    fn a_write_that_blocks_is_reported_as_hung_and_the_caller_goes_on() {
        // A FIFO with no reader blocks open(2) for writing, like a stuck unbind blocks write(2).
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("unbind");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = std::time::Instant::now();
        let e = write_with_watchdog(&fifo, "0000:01:00.0", Duration::from_millis(300)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3));
        let WriteError::Hung { pid, .. } = e else {
            panic!("expected a hang, got {e}")
        };
        // Release the writer; the watchdog's reaper collects it (no zombie left behind).
        let reader = std::fs::File::open(&fifo).unwrap();
        let stat = format!("/proc/{pid}/stat");
        let end = std::time::Instant::now() + Duration::from_secs(3);
        while std::path::Path::new(&stat).exists() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !std::path::Path::new(&stat).exists(),
            "the hung writer {pid} was not reaped"
        );
        drop(reader);
    }
}
