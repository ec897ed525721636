//! One handoff at a time per GPU: an exclusive `flock` on `<run>/lock/<BDF>`.
//!
//! libvirtd runs a hook per domain event and does not serialise two domains' starts, and a
//! person may run `handoff rebind --force` or `handoff bind` meanwhile. Without a lock two
//! `prepare`s both found the GPU free and both bound it, and the restore record named only
//! the last. Whoever changes the GPU's bindings (prepare, release, `bind`, `rebind`) holds
//! this lock from reading the restore record until the record says what it did, so the
//! next one reads the outcome, not a half-done handoff.
//!
//! The lock file lives in the run directory that the engine already owns (root's, under
//! `[host] run`). It is opened with `O_NOFOLLOW` and created mode 0600, so a symlink planted
//! there is not followed. `flock` is released by the kernel when the holder exits, however
//! it exits: a killed hook never leaves the GPU locked. A lock that is not free is waited
//! for, within a bound ([`wait_for`]); the holder never blocks on the kernel (its writes
//! have a watchdog), so the wait ends unless something is badly wrong, and then the error
//! says which process holds it.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::host::Host;
use crate::pci::PciAddress;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "cannot lock GPU {gpu} for a handoff: {path}: {source}; check that {dir} is a directory root owns"
    , dir = path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    Open {
        gpu: PciAddress,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "another handoff of GPU {gpu} is still running{holder} after {} s of waiting (lock {path}); \
         nothing was changed: wait for it to finish, then try again",
        waited.as_secs(),
        holder = holder.map(|p| format!(" (process {p})")).unwrap_or_default()
    )]
    Busy {
        gpu: PciAddress,
        path: PathBuf,
        waited: Duration,
        /// The pid the holder wrote into the file, when it did.
        holder: Option<u32>,
    },
}

/// How long to wait for another handoff of the same GPU, given the watchdog: a handoff
/// makes a few writes, each bounded by the watchdog, and one hang ends it (its rollback
/// can meet the watchdog again), so four watchdogs and some slack cover a slow one.
pub fn wait_for(watchdog: Duration) -> Duration {
    watchdog.saturating_mul(4).saturating_add(Duration::from_secs(10))
}

/// The exclusive right to change one GPU's bindings, held until dropped.
#[derive(Debug)]
pub struct GpuLock {
    gpu: PciAddress,
    // Closing the file releases the flock.
    _file: File,
}

impl GpuLock {
    /// `<run>/lock/<BDF>`.
    pub fn path(host: &Host, gpu: PciAddress) -> PathBuf {
        host.run.join("lock").join(gpu.to_string())
    }

    /// Take the lock of `gpu`, waiting up to `wait` for another holder to finish.
    pub fn acquire(host: &Host, gpu: PciAddress, wait: Duration) -> Result<GpuLock, LockError> {
        let path = Self::path(host, gpu);
        let open_err = |source| LockError::Open {
            gpu,
            path: path.clone(),
            source,
        };
        let dir = path.parent().expect("the lock path has a directory");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(open_err)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(open_err(io::Error::other("not a regular file")));
        }
        let started = Instant::now();
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(open_err(e));
            }
            if started.elapsed() >= wait {
                return Err(LockError::Busy {
                    gpu,
                    path,
                    waited: started.elapsed(),
                    holder: holder_pid(&mut file),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Who holds it, for the message of whoever waits next. Best effort: the lock is
        // what matters, not this text.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(GpuLock { gpu, _file: file })
    }

    pub fn gpu(&self) -> PciAddress {
        self.gpu
    }
}

fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(run: &std::path::Path) -> Host {
        Host {
            run: run.to_owned(),
            ..Host::system()
        }
    }

    #[test]
    fn a_second_holder_waits_and_then_is_told_who_holds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let host = host(tmp.path());
        let gpu = PciAddress::new(0, 1, 0, 0);
        let first = GpuLock::acquire(&host, gpu, Duration::ZERO).unwrap();
        let e = GpuLock::acquire(&host, gpu, Duration::from_millis(60)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("another handoff of GPU 0000:01:00.0 is still running"),
            "{text}"
        );
        assert!(
            text.contains(&format!("(process {})", std::process::id())),
            "{text}"
        );
        // Another GPU has its own lock.
        GpuLock::acquire(&host, PciAddress::new(0, 2, 0, 0), Duration::ZERO).unwrap();
        drop(first);
        GpuLock::acquire(&host, gpu, Duration::ZERO).unwrap();
    }

    #[test]
    fn a_symlink_in_place_of_the_lock_file_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let host = host(&tmp.path().join("run"));
        let gpu = PciAddress::new(0, 1, 0, 0);
        let target = tmp.path().join("victim");
        std::fs::write(&target, "keep").unwrap();
        let path = GpuLock::path(&host, gpu);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let e = GpuLock::acquire(&host, gpu, Duration::ZERO).unwrap_err();
        assert!(matches!(e, LockError::Open { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn the_wait_is_bounded_for_any_watchdog() {
        assert_eq!(wait_for(Duration::from_secs(10)), Duration::from_secs(50));
        assert_eq!(wait_for(Duration::MAX), Duration::MAX);
    }
}
