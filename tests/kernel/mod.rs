//! The real-kernel harness: boots a stock Debian kernel in QEMU (TCG) with an emulated
//! Intel IOMMU and a GPU-shaped PCIe slot — VGA (bochs-drm) at 01:00.0 and an HDA
//! controller (snd_hda_intel) at 01:00.1, one IOMMU group — runs the project's own
//! `handoff` and `handoff-block` inside it, and returns what they did over the serial
//! console. Inside the guest, `/sys`, `/proc` and `/dev` are the guest kernel's: the
//! binaries run with their default roots and nothing of the host's is touched.
//!
//! The image (kernel + base initramfs of busybox-static and the module closure) is built by
//! `scripts/guest-image.sh` from this machine's apt sources and cached outside the repo;
//! each boot adds a small second cpio archive (the kernel unpacks concatenated archives)
//! with the binaries, the shared libraries `ldd` names for them, `/init`
//! (`tests/kernel/init.sh`), the scenario script and `/etc/handoff`.
//!
//! QEMU runs with a hard deadline and is killed by its pid on every path out (timeout,
//! panic, early exit): [`Qemu`]'s drop kills and reaps it, and a parent-death signal ends
//! it should the test process itself be killed.
//!
//! Guest output is a transcript (see `tests/kernel/scenarios.sh`): `OUT`/`CMD`/`FACT`
//! lines, parsed into a [`Transcript`] the tests assert on.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// QEMU's command line: the machine the scenarios were checked on. TCG: nested KVM
/// does not work on the test machines even where `/dev/kvm` exists.
const QEMU_ARGS: &[&str] = &[
    "-machine",
    "q35,kernel-irqchip=split",
    "-accel",
    "tcg",
    "-m",
    "384",
    "-smp",
    "1",
    "-nodefaults",
    "-display",
    "none",
    "-no-reboot",
    "-serial",
    "stdio",
    "-monitor",
    "none",
    "-device",
    "intel-iommu,intremap=on,caching-mode=on",
    "-device",
    "pcie-root-port,id=rp1,chassis=1,slot=1",
    "-device",
    "VGA,bus=rp1,addr=0.0,multifunction=on",
    "-device",
    "intel-hda,bus=rp1,addr=0.1",
    "-device",
    "hda-duplex,audiodev=none0",
    "-audiodev",
    "none,id=none0",
];

const KERNEL_CMDLINE: &str = "console=ttyS0 intel_iommu=on quiet loglevel=3 panic=-1";

/// What the test needs and why it could not run: under `CI=true` a failure, elsewhere a
/// skip that says what is missing.
pub fn missing(what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("real-kernel test: {what} (CI=true: a missing component fails the test)");
    }
    eprintln!("SKIP real-kernel test: {what}");
}

/// The workspace root (where `scripts/` is).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

/// The guest image directory from `scripts/guest-image.sh` (built or cached), or why not.
pub fn image() -> Result<PathBuf, String> {
    for tool in ["qemu-system-x86_64", "cpio", "strip", "ldd"] {
        if !on_path(tool) {
            return Err(format!("{tool} is not installed (scripts/deps.sh installs it)"));
        }
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/guest-image.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run scripts/guest-image.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/guest-image.sh could not build the guest image (exit {}; its message is above)",
            out.status
        ));
    }
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    let dir = PathBuf::from(dir);
    if !dir.join("ready").exists() {
        return Err(format!(
            "scripts/guest-image.sh printed {} but no image is there",
            dir.display()
        ));
    }
    Ok(dir)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// One file for the guest's second archive.
pub enum GuestFile<'a> {
    /// Contents, mode.
    Text(&'a str, u32),
    /// A binary from the host: stripped (the debug build's symbols and debug info would
    /// add ~200 MB for QEMU to unpack at every boot) and its shared libraries added.
    Binary(&'a Path),
}

/// Builds the per-boot archive under `dir`: `files` at their guest paths, the libraries
/// the binaries need at the paths `ldd` resolves them to, `/etc/passwd` (the scan names
/// users). Returns its path.
fn overlay(dir: &Path, files: &[(&str, GuestFile)]) -> Result<PathBuf, String> {
    let root = dir.join("overlay");
    let put = |guest: &str| {
        let p = root.join(guest.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    };
    let mut libs = Vec::new();
    for (guest, f) in files {
        let dest = put(guest);
        match f {
            GuestFile::Text(text, mode) => {
                fs::write(&dest, text).unwrap();
                fs::set_permissions(&dest, fs::Permissions::from_mode(*mode)).unwrap();
            }
            GuestFile::Binary(host) => {
                let st = Command::new("strip")
                    .args(["--strip-all", "-o"])
                    .arg(&dest)
                    .arg(host)
                    .status()
                    .map_err(|e| format!("strip {}: {e}", host.display()))?;
                if !st.success() {
                    return Err(format!("strip {} failed", host.display()));
                }
                libs.extend(ldd(host)?);
            }
        }
    }
    libs.sort();
    libs.dedup();
    for lib in libs {
        // Copied to the path the loader looks at (ldd's resolved name), the file behind it.
        let dest = put(&lib.to_string_lossy());
        fs::copy(&lib, &dest).map_err(|e| format!("copying {}: {e}", lib.display()))?;
    }
    fs::write(put("/etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::create_dir_all(root.join("root")).unwrap();
    let archive = dir.join("overlay.cpio");
    let out = fs::File::create(&archive).unwrap();
    let st = Command::new("sh")
        .args(["-c", "find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0"])
        .current_dir(&root)
        .stdout(out)
        .status()
        .map_err(|e| format!("cpio: {e}"))?;
    if !st.success() {
        return Err("cpio could not write the guest's overlay archive".into());
    }
    Ok(archive)
}

/// The shared libraries (and the loader) `ldd` names for `bin`.
fn ldd(bin: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| format!("ldd {}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if libs.is_empty() {
        return Err(format!("ldd found no libraries for {}: {text}", bin.display()));
    }
    Ok(libs)
}

/// A running QEMU; killed (by its pid) and reaped on drop, whatever happened.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a boot produced.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Every line of the serial console (without `\r`).
    pub serial: Vec<String>,
    pub facts: BTreeMap<String, String>,
    pub cmds: BTreeMap<String, Cmd>,
    /// From QEMU's start to `GUEST-READY` (drivers loaded, nodes present).
    pub boot: Duration,
    /// From QEMU's start to `GUEST-DONE`.
    pub total: Duration,
}

/// One command run in the guest: exit code, time, output (stdout and stderr together).
#[derive(Debug, Default, Clone)]
pub struct Cmd {
    pub rc: i32,
    pub ms: u64,
    pub out: Vec<String>,
}

impl Cmd {
    pub fn text(&self) -> String {
        self.out.join("\n")
    }
}

impl Transcript {
    pub fn fact(&self, key: &str) -> &str {
        self.facts
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("the guest reported no fact {key}\n{}", self.serial_tail()))
    }

    pub fn cmd(&self, label: &str) -> &Cmd {
        self.cmds
            .get(label)
            .unwrap_or_else(|| panic!("the guest ran no command {label}\n{}", self.serial_tail()))
    }

    /// The output lines of `label` that were not commands (`watch`, `block`).
    pub fn lines(&self, label: &str) -> Vec<&str> {
        self.cmds
            .get(label)
            .map(|c| c.out.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    pub fn serial_tail(&self) -> String {
        let n = self.serial.len().saturating_sub(80);
        format!(
            "--- serial console (last lines) ---\n{}",
            self.serial[n..].join("\n")
        )
    }

    fn parse(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("FACT ") {
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            self.facts.insert(k.to_owned(), v.trim_end().to_owned());
        } else if let Some(rest) = line.strip_prefix("OUT ") {
            let (label, text) = rest.split_once(' ').unwrap_or((rest, ""));
            self.cmds
                .entry(label.to_owned())
                .or_default()
                .out
                .push(text.to_owned());
        } else if let Some(rest) = line.strip_prefix("CMD ") {
            let mut it = rest.split_whitespace();
            let label = it.next().unwrap_or_default().to_owned();
            let cmd = self.cmds.entry(label).or_default();
            for kv in it {
                match kv.split_once('=') {
                    Some(("rc", v)) => cmd.rc = v.parse().unwrap_or(-1),
                    Some(("ms", v)) => cmd.ms = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
}

/// Boots the guest with `files` added (at least `/init` and what it runs) and collects the
/// serial console until `GUEST-DONE`, QEMU's exit or `deadline`.
pub fn boot(image: &Path, files: &[(&str, GuestFile)], deadline: Duration) -> Result<Transcript, String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let overlay = overlay(tmp.path(), files)?;
    let initrd = tmp.path().join("initrd.cpio");
    let mut joined = fs::read(image.join("base.cpio")).map_err(|e| e.to_string())?;
    joined.extend(fs::read(&overlay).map_err(|e| e.to_string())?);
    fs::write(&initrd, joined).map_err(|e| e.to_string())?;

    let start = Instant::now();
    let mut cmd = Command::new("qemu-system-x86_64");
    // Should this test process die without unwinding (SIGKILL, abort), QEMU goes with it.
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .args(QEMU_ARGS)
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", KERNEL_CMDLINE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let pid = child.id();
    let mut qemu = Qemu(child);
    let stdout = qemu.0.stdout.take().unwrap();
    let stderr = qemu.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            if tx.send(String::from_utf8_lossy(&line).replace('\r', "")).is_err() {
                break;
            }
        }
    });
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });

    let mut t = Transcript::default();
    let mut done = false;
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.starts_with("GUEST-READY") {
                    t.boot = start.elapsed();
                }
                if line.starts_with("GUEST-DONE") {
                    t.total = start.elapsed();
                    done = true;
                }
                t.parse(&line);
                t.serial.push(line);
                if done {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(qemu); // killed and reaped, whether or not it powered off by itself
    let qemu_err = errs.join().unwrap_or_default();
    if !done {
        return Err(format!(
            "the guest did not finish within {} s (QEMU, pid {pid}, killed){}\n{}",
            deadline.as_secs(),
            if qemu_err.is_empty() {
                String::new()
            } else {
                format!("; QEMU said: {}", qemu_err.trim())
            },
            t.serial_tail()
        ));
    }
    Ok(t)
}
