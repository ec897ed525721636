//! An X server for tests: Xvfb on a display it picks itself (`-displayfd`: it writes the
//! number to a pipe once it listens), so parallel tests never race for a display number.
//! `-noreset` keeps it up when its last client leaves (DESIGN.md, "Testing against real
//! things").

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts Xvfb with one screen of `size` (`WxHxD`, e.g. `1024x640x24`) in a process group
/// of its own, its log in `dir/xvfb.log`; returns it and its display (`:N`). End it with
/// [`crate::process::kill_group`] (or wrap it in a [`crate::process::Group`]). Panics,
/// with the log, when it does not start.
pub fn start(dir: &Path, size: &str) -> (Child, String) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (r, w) = (fds[0], fds[1]);
    // SAFETY: `r` is a fresh fd from pipe2 that nothing else owns.
    let mut read_end = unsafe { File::from_raw_fd(r) };
    let mut cmd = Command::new("Xvfb");
    cmd.args([
        "-displayfd",
        &w.to_string(),
        "-noreset",
        "-nolisten",
        "tcp",
        "-screen",
        "0",
        size,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(File::create(dir.join("xvfb.log")).unwrap())
    .process_group(0);
    // SAFETY: only fcntl (async-signal-safe) between fork and exec: Xvfb inherits the
    // write end.
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(w, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start Xvfb");
    // SAFETY: our copy of the write end; closing it lets read see EOF if Xvfb dies.
    unsafe { libc::close(w) };
    let mut number = String::new();
    read_end.read_to_string(&mut number).unwrap();
    let n = number.trim();
    assert!(
        !n.is_empty(),
        "Xvfb did not start: {}",
        std::fs::read_to_string(dir.join("xvfb.log")).unwrap_or_default()
    );
    (child, format!(":{n}"))
}
