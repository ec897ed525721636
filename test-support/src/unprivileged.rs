//! Looking at the machine as a normal user from a test that runs as root: what a bar or a
//! tray run by a person sees (other users' `/proc/<pid>/fd` unreadable), so that a surface
//! is tested against the real "could not look everywhere" (issue 17) rather than a count
//! written into a struct.
//!
//! Binaries run under `setpriv` ([`command`]). Code of the test's own process runs on a
//! thread of its own with that thread's credentials changed ([`on_thread_as`]): Linux
//! keeps credentials per thread, and the raw `setresuid` system call changes only the
//! calling thread's, so the other tests of the same binary keep running as root. (libc's
//! and nix's `setresuid` change every thread of the process on purpose, POSIX's rule, so
//! they cannot be used here.)

use std::path::Path;
use std::process::Command;

/// The uid and gid of `nobody` (the "idle, unseen" scene's user).
pub const NOBODY: u32 = handoff::scenes::NOBODY;

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// `cmd` with its arguments, run as `uid` (gid the same, no supplementary groups).
pub fn command(uid: u32, program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "--"])
        .arg(program);
    c
}

/// Runs `f` on a new thread whose effective (and filesystem) uid is `uid`, and returns what
/// it returned. The thread's effective capabilities go with the uid change (the kernel's
/// rule for a uid leaving 0), so `/proc` answers it as it would that user. The thread ends
/// with `f`, and its credentials with it.
pub fn on_thread_as<T: Send>(uid: u32, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setresuid takes three integers and reads no memory; `-1` (as
            // uid_t) leaves the real and saved uids as they are. The raw call changes this
            // thread's credentials only (see the module header), which is the point.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_setresuid,
                    libc::uid_t::MAX,
                    uid as libc::uid_t,
                    libc::uid_t::MAX,
                )
            };
            assert_eq!(r, 0, "setresuid: {}", std::io::Error::last_os_error());
            assert_eq!(euid(), uid, "the thread's euid did not change");
            f()
        })
        .join()
        .expect("the thread looking as another user panicked")
    })
}

/// Makes `dir` and everything under it readable (and its directories searchable) by every
/// user, as a simulated machine must be for a surface run as another user.
pub fn open_to_all(dir: &Path) {
    let st = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir)
        .status()
        .expect("chmod");
    assert!(st.success(), "chmod -R a+rX {}", dir.display());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::is_root;

    /// The thread sees as nobody and the rest of the process stays root: without both, the
    /// cross-surface tests would look as nobody at nothing, or leave other tests unprivileged.
    #[test]
    fn only_the_thread_looks_as_nobody() {
        if !is_root() {
            return;
        }
        // A process of root's (not this one: a process may always look at itself): root
        // may read its fds, nobody may not.
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let fds = format!("/proc/{}/fd", child.id());
        let seen = on_thread_as(NOBODY, || (euid(), std::fs::read_dir(&fds).is_ok()));
        let root_reads = std::fs::read_dir(&fds).is_ok();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen.0, NOBODY);
        assert!(!seen.1, "nobody read root's fds");
        assert_eq!(euid(), 0, "the test process stayed root");
        assert!(root_reads, "root reads them");
    }
}
