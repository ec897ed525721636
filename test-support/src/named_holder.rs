//! A process that names itself, for tests of what handoff shows of a holder's name.
//!
//! A process picks its own name: here bash writes its `/proc/self/comm` (what `Name:` in
//! `/proc/<pid>/status` shows, at most 15 bytes) and then runs only builtins, so the name
//! stays. It holds a node as its stdin and waits on a FIFO of its own until killed (by
//! pid, on drop). Shared by the hook, CLI and bar block tests.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A name with terminal controls (ESC colour, BEL), markup and a newline: 14 bytes. The
/// newline comes last because bash's printf writes a line at a time and each write to
/// `comm` replaces the name.
pub const EVIL: &[u8] = b"evil\x1b[31m<b>\x07\n";

/// [`EVIL`] as handoff shows it in plain text.
pub const EVIL_PLAIN: &str = r"evil\x1b[31m<b>\x07\x0a";

/// The holder; killed and reaped when dropped.
pub struct Named(pub Child);

impl Named {
    /// The holder's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a process named `name` holding `node`; its FIFO goes in `dir`.
pub fn hold_named(node: &Path, name: &[u8], dir: &Path) -> Named {
    assert!(name.len() <= 15, "the kernel keeps 15 bytes of a name");
    let fifo = dir.join(format!("named-holder-{}-{}.fifo", std::process::id(), name.len()));
    make_fifo(&fifo);
    let child = Command::new("bash")
        .arg("-c")
        .arg(r#"printf '%s' "$NAME" > /proc/self/comm && exec 4<>"$FIFO" && echo ready && read -r -u 4"#)
        .env("NAME", OsStr::from_bytes(name))
        .env("FIFO", &fifo)
        .stdin(Stdio::from(File::open(node).unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ready(child, "the named holder")
}

/// Starts a process that looks like libvirt's QEMU for `vm` to the holder scan: named
/// `qemu-system-x86` (what `comm` keeps of `qemu-system-x86_64`), with
/// `-name guest=<vm>,debug-threads=on` in its command line, holding `node` (say the VFIO
/// group `/dev/vfio/<group>`). Its FIFO goes in `dir`.
pub fn hold_as_qemu(node: &Path, vm: &str, dir: &Path) -> Named {
    let fifo = dir.join(format!("qemu-holder-{}-{vm}.fifo", std::process::id()));
    make_fifo(&fifo);
    // bash -c SCRIPT NAME ARGS…: the arguments after the script stay in its cmdline.
    let child = Command::new("bash")
        .arg("-c")
        .arg(r#"printf '%s' qemu-system-x86 > /proc/self/comm && exec 4<>"$FIFO" && echo ready && read -r -u 4"#)
        .arg("qemu-system-x86_64")
        .arg("-name")
        .arg(format!("guest={vm},debug-threads=on"))
        .env("FIFO", &fifo)
        .stdin(Stdio::from(File::open(node).unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ready(child, "the QEMU-like holder")
}

/// A FIFO at `path` (whatever was there removed): the holder blocks reading it until killed.
fn make_fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo on a path in the test's temp dir; `c` outlives the call.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {}",
        path.display()
    );
}

/// Waits for a holder's script to say it holds its node and blocks on its FIFO.
fn ready(child: std::process::Child, what: &str) -> Named {
    let mut holder = Named(child);
    let mut line = String::new();
    BufReader::new(holder.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n", "{what} did not start");
    holder
}
