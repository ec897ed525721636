//! A simulated workstation GPU behind the kernel simulator's FUSE mount, for the binding
//! engine and hook tests: the mount, its `Host`, the `driver` links as a user reads them,
//! holder processes on its nodes, and our own leftover child processes.
//!
//! Everything here cleans up on drop, assertion failure or not: holders are killed by pid,
//! hung writes are released and the mount goes away before its temp dir.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff::Host;
use handoff::pci::PciAddress;
use handoff::simulated_tree::SimSpec;
use handoff_kernelsim::fuse::SimMount;
use handoff_kernelsim::{Errno, Kernel, Release};

/// The simulated GPU's graphics function.
pub const GPU: &str = "0000:01:00.0";
/// Its HDMI audio function.
pub const AUDIO: &str = "0000:01:00.1";
/// Its USB controller.
pub const USB: &str = "0000:01:00.2";
/// Its USB-C (UCSI) controller.
pub const UCSI: &str = "0000:01:00.3";
/// The workstation's functions and the drivers they start on.
pub const HOME: [(&str, &str); 4] = [
    (GPU, "nvidia"),
    (AUDIO, "snd_hda_intel"),
    (USB, "xhci_hcd"),
    (UCSI, "nvidia-gpu"),
];

/// A PCI address from its text; panics on a malformed one (a test's own constant).
pub fn addr(bdf: &str) -> PciAddress {
    bdf.parse().unwrap()
}

/// A mounted simulation. Fields drop in order: the mount (releasing hung writes) before
/// its directory.
pub struct Sim {
    /// The FUSE mount of the simulated sysfs.
    pub mount: SimMount,
    /// The temp dir holding the machine and the mount point.
    pub tmp: tempfile::TempDir,
}

/// Mount `spec`, or None (skip, saying why) when FUSE isn't there outside CI. Under
/// `CI=true` a missing `/dev/fuse` fails the test.
pub fn mount(spec: SimSpec) -> Option<Sim> {
    if !Path::new("/dev/fuse").exists() {
        if crate::tools::ci() {
            panic!("/dev/fuse is missing: the kernel simulator needs FUSE (root, /dev/fuse, Debian fuse3)");
        }
        eprintln!("skipping: /dev/fuse is missing, so the simulated sysfs can't be mounted");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let kernel = Kernel::build(&tmp.path().join("machine"), spec).unwrap();
    let mountpoint = tmp.path().join("sys");
    fs::create_dir(&mountpoint).unwrap();
    let mount = SimMount::mount(kernel, &mountpoint).unwrap();
    Some(Sim { mount, tmp })
}

/// [`mount`] of the workstation (an RTX 3090 Ti with four functions).
pub fn workstation() -> Option<Sim> {
    mount(SimSpec::workstation())
}

impl Sim {
    /// The mount's roots, passing over the processes this machine's root cannot inspect
    /// (PID 1 of the container the tests run in): the holder scan fails closed on those,
    /// and these tests are about the GPU's own holders, real children root does see.
    pub fn host(&self) -> Host {
        Host {
            uninspectable_ok: handoff::holders::uninspectable_now(Path::new("/proc")),
            ..self.mount.host()
        }
    }

    /// The mounted sysfs root.
    pub fn sys(&self) -> &Path {
        self.mount.path()
    }

    /// The driver `bdf` is bound to, read from its `driver` link through the mount.
    pub fn driver(&self, bdf: &str) -> Option<String> {
        let link = fs::read_link(self.sys().join("bus/pci/devices").join(bdf).join("driver")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    /// `(function, driver)` for the four functions of the GPU.
    pub fn drivers(&self) -> Vec<(String, Option<String>)> {
        HOME.iter()
            .map(|(f, _)| (f.to_string(), self.driver(f)))
            .collect()
    }

    /// The directory of PCI function `bdf` (`bus/pci/devices/<bdf>` under the mount).
    pub fn device(&self, bdf: &str) -> PathBuf {
        self.sys().join("bus/pci/devices").join(bdf)
    }

    /// The function's `driver_override` as a reader sees it, without the trailing newline.
    pub fn override_of(&self, bdf: &str) -> String {
        fs::read_to_string(
            self.sys()
                .join("bus/pci/devices")
                .join(bdf)
                .join("driver_override"),
        )
        .unwrap()
        .trim_end()
        .to_owned()
    }

    /// The write log as `(file, value)` pairs.
    pub fn short_log(&self) -> Vec<(String, String)> {
        self.mount.log().iter().map(|r| r.short()).collect()
    }

    /// Forgets the writes logged so far.
    pub fn clear_log(&self) {
        self.mount.kernel(|k| k.clear_log());
    }

    /// The machine's `[host] run` dir (state file, restore records).
    pub fn run_dir(&self) -> PathBuf {
        self.host().run
    }

    /// The path of the device node `node` under the machine's `/dev`.
    pub fn dev(&self, node: &str) -> PathBuf {
        self.host().dev.join(node)
    }

    /// Assert every function is on the driver it started on, with no override.
    pub fn assert_home(&self) {
        let want: Vec<(String, Option<String>)> = HOME
            .iter()
            .map(|(f, d)| (f.to_string(), Some(d.to_string())))
            .collect();
        assert_eq!(self.drivers(), want, "the GPU should be home");
        for (f, _) in HOME {
            assert_eq!(self.override_of(f), "(null)", "{f}'s driver_override");
        }
    }

    /// Asserts every function is bound to vfio-pci.
    pub fn assert_on_vfio(&self) {
        let want: Vec<(String, Option<String>)> = HOME
            .iter()
            .map(|(f, _)| (f.to_string(), Some("vfio-pci".to_owned())))
            .collect();
        assert_eq!(self.drivers(), want, "the GPU should be on vfio-pci");
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.mount.release(Release::Fail(Errno::EIO));
    }
}

/// A process holding a node, killed and reaped by pid when dropped.
pub struct Holder(pub Child);

impl Holder {
    /// The holder's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sleep 600` with `node` open as its stdin; the fd exists once spawn returns.
pub fn hold(node: &Path) -> Holder {
    let child = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::from(File::open(node).unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Holder(child)
}

/// Our child processes that are forks of this test binary (the engine's writer
/// processes), with their state letter from `/proc/<pid>/stat`.
pub fn forked_children() -> Vec<(u32, char)> {
    let me = std::process::id();
    let my_exe = fs::read_link("/proc/self/exe").ok();
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may contain spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = rest.split(' ');
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid != me {
            continue;
        }
        // Live forks only: the writer is caught while it hangs, then must vanish (not
        // linger as a zombie) once released. fuser's fusermount3 children exec, so their
        // exe differs.
        let exe = fs::read_link(e.path().join("exe")).ok();
        if state != 'Z' && exe.is_some() && exe == my_exe {
            out.push((pid, state));
        }
    }
    out
}

/// Wait until none of `pids` exists any more (reaped); the ones left on timeout.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<(u32, String)> {
    let end = Instant::now() + timeout;
    loop {
        let left: Vec<(u32, String)> = pids
            .iter()
            .filter_map(|p| {
                let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                Some((*p, stat))
            })
            .collect();
        if left.is_empty() || Instant::now() >= end {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Serialises tests that count this process's children or rely on timing.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`SERIAL`] (also after a test that held it panicked).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
