//! Reads of sysfs attributes that can block in the kernel, bounded in time.
//!
//! Some attributes take the device's lock (`device_lock`) to print themselves; PCI's
//! `driver_override` does on every kernel up to 7.0 (drivers/pci/pci-sysfs.c,
//! `driver_override_show`; 7.1 moved it to the driver core's generic attribute, which takes
//! only a spinlock). An unbind stuck in a driver's `remove` (NVIDIA's waits for whoever
//! holds the GPU) holds that lock for as long as it is stuck, so a plain read of the file
//! blocks, uninterruptibly, for just as long. Nothing that shows status may hang then: it is
//! exactly when the user needs it.
//!
//! Such a read happens in a forked child that does nothing but `open`+`read`+`write` to a
//! pipe and `_exit`; the caller waits for it with a deadline, in the same way
//! [`crate::bind::write`] does its writes. Not a thread: a thread stuck in an
//! uninterruptible read keeps its whole process from exiting (the parent's `wait` and the
//! EOF on its stdout wait for the last thread), so `handoff status` would print and then
//! never return. A stuck child is left behind; it closed every inherited descriptor, so it
//! keeps no pipe of the caller's (i3blocks reads the block's stdout to EOF) open.
//!
//! At most one child per file is in flight: while one is still stuck, later reads of that
//! file answer [`Bounded::Locked`] at once instead of forking another, so a long-lived
//! process (the tray, refreshing every few seconds) doesn't pile up a stuck child per
//! refresh. A stuck child gets one thread that waits for it (`waitpid`, which doesn't
//! keep the process from exiting), reaps it when the kernel lets it go, and forgets it, so
//! the next read tries again. Only that thread reaps it: reaping it elsewhere would let its
//! pid be reused by a new child, which the thread would then reap by mistake.
//!
//! That guard alone is per process, and the bar block is a new process every refresh (720
//! an hour at i3blocks' `interval=5`), each of which would leave its own stuck reader. So
//! a stuck reader is also written down for other processes of the same user: a marker
//! file per sysfs path under `$XDG_RUNTIME_DIR/handoff/stuck-reads/` (else
//! `/run/user/<uid>/…`; without either, only the in-process guard applies), naming the
//! reader's pid and its start time from `/proc/<pid>/stat`. A read first looks for a marker
//! of its path: while the reader it names is alive (same pid, same start time, not a
//! zombie) the answer is [`Bounded::Locked`] at once and nothing is forked; a marker whose
//! reader is gone is removed and the read goes ahead.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a status read waits for a file that may be behind a device lock. Unlocked,
/// such a read takes well under a millisecond (plus ~1 ms for the fork).
pub const LOCKED_READ_TIMEOUT: Duration = Duration::from_millis(200);

/// The biggest attribute this reads: sysfs prints at most a page.
const MAX_LEN: usize = 8192;

/// What a bounded read found.
#[derive(Debug)]
pub enum Bounded {
    /// The file's whole content.
    Value(String),
    /// No such file.
    Missing,
    /// The read failed.
    Failed(io::Error),
    /// The read did not return in time (or an earlier read of this file still hasn't): the
    /// kernel holds a lock the file's show needs.
    Locked,
}

/// Children still stuck reading a file, by path: (path, pid).
static PENDING: Mutex<Vec<(PathBuf, i32)>> = Mutex::new(Vec::new());

/// Read each of `paths` in its own child process, all at once, waiting at most `timeout`
/// in all. The answers are in the order of `paths`.
pub fn read_all(paths: &[PathBuf], timeout: Duration) -> Vec<Bounded> {
    // Held throughout, so two threads never fork two readers of one file.
    let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    let markers = marker_dir();
    let started: Vec<Result<Reader, Bounded>> = paths
        .iter()
        .map(|p| {
            if pending.iter().any(|(q, _)| q == p) {
                Err(Bounded::Locked)
            } else if markers.as_deref().is_some_and(|d| stuck_elsewhere(d, p)) {
                tracing::debug!(path = %p.display(), "another process's read of this file is still stuck");
                Err(Bounded::Locked)
            } else {
                spawn_reader(p).map_err(Bounded::Failed)
            }
        })
        .collect();
    let deadline = deadline_after(timeout);
    started
        .into_iter()
        .zip(paths)
        .map(|(reader, path)| match reader {
            Err(answer) => answer,
            Ok(reader) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match reader.finish(left) {
                    Finished::Answer(a) => a,
                    Finished::Stuck(pid) => {
                        tracing::debug!(path = %path.display(), pid, "sysfs read did not return in time");
                        pending.push((path.clone(), pid));
                        if let Some(dir) = &markers {
                            mark_stuck(dir, path, pid);
                        }
                        reap_later(pid);
                        Bounded::Locked
                    }
                }
            }
        })
        .collect()
}

/// Where this user's processes note their stuck readers: `$XDG_RUNTIME_DIR` (a
/// per-user directory only they can write), else `/run/user/<uid>`, when it is an
/// absolute directory owned by us; None otherwise.
fn marker_dir() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid().as_raw();
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from(format!("/run/user/{uid}")));
    let meta = std::fs::symlink_metadata(&base).ok()?;
    (meta.is_dir() && meta.uid() == uid).then(|| base.join("handoff/stuck-reads"))
}

/// The marker file of `path`: a stable hash of it (FNV-1a), so every binary of any build
/// finds the same name.
fn marker_of(dir: &Path, path: &Path) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    dir.join(format!("{h:016x}"))
}

/// A process's start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot) and
/// whether it is still running (not a zombie): what tells a pid from its reuse.
fn start_time(pid: i32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    // After the state come ppid … starttime: starttime is the 19th field after it.
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, state != "Z" && state != "X"))
}

/// Whether a marker says a reader of `path` is still stuck (in another process, or one
/// of ours that has exited). A stale marker is removed.
fn stuck_elsewhere(dir: &Path, path: &Path) -> bool {
    let marker = marker_of(dir, path);
    let Ok(text) = std::fs::read_to_string(&marker) else {
        return false;
    };
    let mut lines = text.lines();
    let ids = lines.next().and_then(|l| {
        let (pid, start) = l.split_once(' ')?;
        Some((pid.parse::<i32>().ok()?, start.parse::<u64>().ok()?))
    });
    let same_path = lines.next() == Some(&*path.to_string_lossy());
    if let (Some((pid, start)), true) = (ids, same_path)
        && start_time(pid) == Some((start, true))
    {
        return true;
    }
    let _ = std::fs::remove_file(&marker);
    false
}

/// Note that our reader `pid` of `path` is stuck, for the processes that come after us.
fn mark_stuck(dir: &Path, path: &Path, pid: i32) {
    let Some((start, true)) = start_time(pid) else {
        return; // it finished meanwhile
    };
    let marker = marker_of(dir, path);
    let text = format!("{pid} {start}\n{}\n", path.to_string_lossy());
    let written = std::fs::DirBuilder::new()
        .recursive(true)
        .create(dir)
        .and_then(|()| crate::bind::record::write_atomic(&marker, text.as_bytes(), 0o600));
    if let Err(e) = written {
        tracing::debug!(marker = %marker.display(), error = %e, "cannot note the stuck reader");
    }
}

/// [`read_all`] for one file.
pub fn read(path: &Path, timeout: Duration) -> Bounded {
    read_all(&[path.to_owned()], timeout)
        .pop()
        .unwrap_or(Bounded::Locked)
}

/// Reap the stuck reader `pid` whenever the kernel lets it go, then forget it.
fn reap_later(pid: i32) {
    let spawned = std::thread::Builder::new()
        .name(format!("reap-read-{pid}"))
        .spawn(move || {
            // Its exit status does not matter: it was given up on.
            while nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::EINTR)
            {}
            forget(pid);
        });
    if let Err(e) = spawned {
        // The entry stays: this file answers Locked from now on rather than fork again.
        tracing::warn!("cannot start a thread to reap the stuck sysfs reader {pid}: {e}");
    }
}

fn forget(pid: i32) {
    PENDING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(_, p)| *p != pid);
}

/// A child reading one file into a pipe.
struct Reader {
    pid: i32,
    /// The pipe's read end (non-blocking).
    pipe: OwnedFd,
}

enum Finished {
    Answer(Bounded),
    Stuck(i32),
}

fn spawn_reader(path: &Path) -> io::Result<Reader> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    use nix::fcntl::OFlag;
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    let mut buf = vec![0u8; MAX_LEN];
    // libc, not nix, from here to _exit: the child may only make async-signal-safe calls
    // on memory prepared before the fork, and the raw calls make that plain to see.
    // SAFETY: between fork and _exit the child calls only async-signal-safe functions
    // (open, dup2, close_range, read, write, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        // Both ends close as they drop.
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let write_end = write_end.as_raw_fd();
        // SAFETY: in the forked child: only async-signal-safe calls (above), on `cpath` and
        // `buf`, allocated before the fork; it never returns (every path ends in _exit).
        unsafe {
            isolate_child_fds(write_end);
            let fd = libc::open(cpath.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                libc::_exit(errno_code());
            }
            let mut len = 0usize;
            while len < buf.len() {
                let n = libc::read(fd, buf.as_mut_ptr().add(len).cast(), buf.len() - len);
                if n < 0 {
                    libc::_exit(errno_code());
                }
                if n == 0 {
                    break;
                }
                len += n as usize;
            }
            // An empty pipe holds 64 KiB: this write doesn't block.
            if libc::write(1, buf.as_ptr().cast(), len) < 0 {
                libc::_exit(errno_code());
            }
            libc::_exit(0);
        }
    }
    // Our copy of the write end closes here; the child has its own.
    drop(write_end);
    Ok(Reader { pid, pipe: read_end })
}

impl Reader {
    fn finish(self, timeout: Duration) -> Finished {
        let answer = match wait_with_deadline(self.pid, timeout) {
            // Our read end closes as `self` drops; the stuck child writes to its own copy.
            Ok(None) => return Finished::Stuck(self.pid),
            Ok(Some(0)) => match self.drain() {
                Ok(bytes) => Bounded::Value(String::from_utf8_lossy(&bytes).into_owned()),
                Err(e) => Bounded::Failed(e),
            },
            Ok(Some(libc::ENOENT)) => Bounded::Missing,
            Ok(Some(code)) => Bounded::Failed(io::Error::from_raw_os_error(code)),
            Err(e) => Bounded::Failed(e),
        };
        Finished::Answer(answer)
    }

    /// What the exited child wrote (all in the pipe already).
    fn drain(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let e = match nix::unistd::read(&self.pipe, &mut chunk) {
                Ok(0) => return Ok(out),
                Ok(n) => {
                    out.extend_from_slice(&chunk[..n]);
                    continue;
                }
                Err(errno) => io::Error::from(errno),
            };
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                // Only while another process briefly shares the write end (a sibling
                // forked before it closed its inherited descriptors): the child is done.
                io::ErrorKind::WouldBlock => return Ok(out),
                _ => return Err(e),
            }
        }
    }
}

/// The child's errno as its exit code (errnos fit in 1..=133).
/// In a forked child, before it touches sysfs: stdin and stderr on /dev/null, stdout on
/// `stdout` (or /dev/null when negative), every other descriptor closed. A child stuck in the
/// kernel must keep no pipe of its parent's open: a hook's stderr held open keeps libvirtd
/// waiting for EOF (virt-manager#299), a reader's stray pipe end would hide its EOF.
///
/// # Safety
/// Call only between `fork` and `_exit`: it makes only async-signal-safe calls (open, dup2,
/// close_range).
pub(crate) unsafe fn isolate_child_fds(stdout: libc::c_int) {
    // SAFETY: per the function's contract; the path is a static C string.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 2);
        }
        libc::dup2(if stdout >= 0 { stdout } else { null }, 1);
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    }
}

/// `now + timeout`, or a century from now when that would overflow `Instant` (a timeout
/// taken from the command line can be anything): waiting "forever" must not panic.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

pub(crate) fn errno_code() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
        .clamp(1, 255)
}

/// Wait for our child `pid` up to `timeout` without a polling loop: poll(2) on a pidfd.
/// Ok(Some(exit code)), Ok(None) on timeout (the child is left unreaped).
pub(crate) fn wait_with_deadline(pid: i32, timeout: Duration) -> io::Result<Option<i32>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    // libc, not nix: nix 0.31 has no pidfd_open.
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns; it closes when this returns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let deadline = deadline_after(timeout);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match poll(&mut [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)], ms) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(0) => return Ok(None),
            Ok(_) => {}
        }
        // libc, not nix: nix's waitpid fails on a child killed by a signal it has no name
        // for (SIGRTMIN+n), and that child is reaped all the same.
        let mut status = 0;
        // SAFETY: waits on our own child, writing only into `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(Some(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            libc::EINTR
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_past_the_end_of_time_does_not_panic() {
        let far = deadline_after(Duration::MAX);
        assert!(far > Instant::now() + Duration::from_secs(86_400));
        // Reaped by wait_with_deadline's waitpid, not by Child.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("true").spawn().unwrap();
        let answer = wait_with_deadline(child.id() as i32, Duration::MAX).unwrap();
        assert_eq!(answer, Some(0));
    }

    #[test]
    fn reads_a_file_and_says_missing_for_none() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("driver_override");
        std::fs::write(&f, "vfio-pci\n").unwrap();
        let answers = read_all(&[f, dir.path().join("nope")], LOCKED_READ_TIMEOUT);
        assert!(
            matches!(&answers[0], Bounded::Value(v) if v == "vfio-pci\n"),
            "{answers:?}"
        );
        assert!(matches!(answers[1], Bounded::Missing), "{answers:?}");
    }

    /// A FIFO with no writer blocks its reader's open the way a locked attribute blocks
    /// its read: the read gives up in time, and a second read doesn't fork another child.
    #[test]
    fn a_blocked_read_is_locked_in_time_and_not_repeated_while_stuck() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stuck");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        nix::unistd::mkfifo(c.as_c_str(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let t = Instant::now();
        assert!(matches!(read(&fifo, Duration::from_millis(100)), Bounded::Locked));
        assert!(t.elapsed() < Duration::from_secs(1));
        let pid = PENDING
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| *p == fifo)
            .map(|(_, pid)| *pid)
            .expect("the stuck child is remembered");
        let t = Instant::now();
        assert!(matches!(read(&fifo, Duration::from_secs(5)), Bounded::Locked));
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "answered without waiting again"
        );
        // Let the child go (a writer opens the FIFO and closes it: EOF): it is reaped (no
        // zombie left) and forgotten, so the next read tries again.
        drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
        let end = Instant::now() + Duration::from_secs(5);
        while PENDING.lock().unwrap().iter().any(|(_, p)| *p == pid) {
            assert!(Instant::now() < end, "the stuck reader was never reaped");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "reaped, not a zombie"
        );
        std::fs::remove_file(&fifo).unwrap();
        std::fs::write(&fifo, "again\n").unwrap();
        assert!(matches!(read(&fifo, LOCKED_READ_TIMEOUT), Bounded::Value(v) if v == "again\n"));
    }
}
