//! The real system libvirtd (`qemu:///system`) and tiny real QEMU domains, for tests.
//!
//! What it touches, and why:
//! - Starts `virtlogd -d` and `libvirtd -d` (pinned to CPU 0 with `taskset -c 0`) when no
//!   daemon answers. The daemon is a machine singleton: once started it stays running after
//!   the test ends, because other test binaries (and other tests in this one) use it.
//!   Nothing here ever stops it.
//! - Makes `/dev/kvm` `root:kvm 0660` when it is root-only; otherwise every libvirt call
//!   re-probes QEMU's capabilities (~4 s each, ARCHITECTURE.md "Testing against real things").
//! - Takes an `flock` on [`LOCK_PATH`] for the whole test, so tests in different test
//!   binaries (which cargo runs in parallel) don't trip over each other's daemon state
//!   (hooks, SIGHUP). Threads of one binary are serialised by it too.
//! - Defines domains named `handoff-test-<pid>-<n>` and, on drop, destroys and undefines
//!   exactly those; it never touches a domain it did not create.
//!
//! Talks to libvirt through the `virsh` CLI with `LC_ALL=C`: no linking, and the error
//! text a test asserts on is exactly what a person running `virsh` sees.
//!
//! Measured on the 2-core Debian 12 test machine (libvirt 9.0, QEMU 7.2, TCG):
//! first `libvirtd -d` until `virsh version` answers ~8.5 s (capability probe, cached in
//! `/var/cache/libvirt/qemu` afterwards); define ~20 ms; start ~0.4 s; destroy ~1.8 s;
//! undefine ~20 ms.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The system libvirtd every test here talks to.
pub const URI: &str = "qemu:///system";

/// Every test that uses the system libvirtd holds an exclusive `flock` on this file.
pub const LOCK_PATH: &str = "/tmp/handoff-test-libvirtd.lock";

/// How long a freshly started libvirtd may take to answer. The first start on a machine
/// probes QEMU (~8.5 s on 2 busy cores); later starts answer in well under a second.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One virsh call never takes longer than this in a healthy setup (destroy is ~1.8 s).
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(30);

const DOMAIN_XML: &str = include_str!("../../tests/fixtures/libvirt/tiny-domain.xml");

/// What one `virsh` call did.
#[derive(Debug)]
pub struct Virsh {
    /// Whether virsh exited 0 (false also when it was killed at the timeout).
    pub success: bool,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr (libvirt's error, a hook's refusal).
    pub stderr: String,
    /// How long it took.
    pub elapsed: Duration,
}

/// Runs `virsh -c qemu:///system <args>` with `LC_ALL=C`, killing it after
/// [`VIRSH_TIMEOUT`] (reported as a failure with a stderr that says so).
pub fn virsh(args: &[&str]) -> Virsh {
    virsh_with_timeout(args, VIRSH_TIMEOUT)
}

/// [`virsh`] with a timeout of the caller's.
pub fn virsh_with_timeout(args: &[&str], timeout: Duration) -> Virsh {
    let started = Instant::now();
    let out_dir = tempfile::tempdir().expect("temp dir for virsh output");
    let out_path = out_dir.path().join("stdout");
    let err_path = out_dir.path().join("stderr");
    let mut child = match Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("virsh stdout file"))
        .stderr(File::create(&err_path).expect("virsh stderr file"))
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            return Virsh {
                success: false,
                stdout: String::new(),
                stderr: format!("cannot run virsh: {e} (install libvirt-clients)"),
                elapsed: started.elapsed(),
            };
        }
    };
    let status = loop {
        match child.try_wait().expect("wait for virsh") {
            Some(status) => break Some(status),
            None if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let mut stderr = fs::read_to_string(&err_path).unwrap_or_default();
    if status.is_none() {
        stderr.push_str(&format!(
            "virsh {} did not finish within {timeout:?}; killed it",
            args.join(" ")
        ));
    }
    Virsh {
        success: status.is_some_and(|s| s.success()),
        stdout,
        stderr,
        elapsed: started.elapsed(),
    }
}

/// True when the system libvirtd answers a `virsh version` within `timeout`.
pub fn libvirtd_answers(timeout: Duration) -> bool {
    virsh_with_timeout(&["version"], timeout).success
}

/// Pids of live processes whose `/proc/<pid>/comm` is `name`. Zombies don't count: on
/// these machines PID 1 may be slow to reap, and a dead daemon's zombie must not stop
/// the harness from starting a new one.
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim_end() == name)
                && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| !rest.starts_with('Z'))
                })
        })
        .collect()
}

/// Makes sure the system libvirtd answers on `qemu:///system`, starting `virtlogd` and
/// `libvirtd` if needed. Leaves them running (a machine singleton; see the module docs).
/// Call it while holding [`LibvirtdLock`] so two test binaries don't start two daemons;
/// [`require_libvirtd`] does both.
pub fn ensure_libvirtd() -> Result<(), String> {
    if libvirtd_answers(Duration::from_secs(20)) {
        return Ok(());
    }
    fix_dev_kvm()?;
    if pids_named("virtlogd").is_empty() {
        spawn_daemon("virtlogd")?;
    }
    if pids_named("libvirtd").is_empty() {
        spawn_daemon("libvirtd")?;
    }
    let started = Instant::now();
    while started.elapsed() < START_TIMEOUT {
        if libvirtd_answers(Duration::from_secs(20)) {
            eprintln!("libvirt harness: libvirtd answered after {:?}", started.elapsed());
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "libvirtd (pids {:?}) did not answer `virsh -c {URI} version` within {START_TIMEOUT:?}; \
         look at /var/log/libvirt/ and try `libvirtd -v` by hand",
        pids_named("libvirtd")
    ))
}

/// `/dev/kvm` readable only by root makes libvirt re-probe QEMU on every call (~4 s).
fn fix_dev_kvm() -> Result<(), String> {
    let kvm = Path::new("/dev/kvm");
    let Ok(meta) = fs::metadata(kvm) else {
        return Ok(()); // No KVM at all: TCG domains still work, probing is cached.
    };
    let kvm_gid = fs::read_to_string("/etc/group").ok().and_then(|groups| {
        groups.lines().find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some("kvm")).then(|| fields.nth(1)?.parse::<u32>().ok())?
        })
    });
    if let Some(gid) = kvm_gid
        && meta.gid() != gid
    {
        std::os::unix::fs::chown(kvm, None, Some(gid)).map_err(|e| format!("chgrp kvm /dev/kvm: {e}"))?;
    }
    if meta.mode() & 0o777 != 0o660 {
        fs::set_permissions(kvm, fs::Permissions::from_mode(0o660))
            .map_err(|e| format!("chmod 0660 /dev/kvm: {e}"))?;
    }
    Ok(())
}

/// `taskset -c 0 <daemon> -d`, with a clean environment so the daemon (and the hooks it
/// runs, which inherit its environment) doesn't carry this test's variables.
fn spawn_daemon(daemon: &str) -> Result<(), String> {
    let err_file = tempfile::NamedTempFile::new().map_err(|e| format!("temp file: {e}"))?;
    let status = Command::new("taskset")
        .args(["-c", "0", daemon, "-d"])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file.reopen().map_err(|e| format!("temp file: {e}"))?)
        .status()
        .map_err(|e| format!("cannot run `taskset -c 0 {daemon} -d`: {e} (install libvirt-daemon-system)"))?;
    if !status.success() {
        let stderr = fs::read_to_string(err_file.path()).unwrap_or_default();
        return Err(format!(
            "`taskset -c 0 {daemon} -d` failed ({status}): {}",
            stderr.trim()
        ));
    }
    Ok(())
}

/// Exclusive hold on the system libvirtd for one test; released on drop.
pub struct LibvirtdLock {
    _file: File,
}

impl LibvirtdLock {
    /// Blocks until no other test (in any process) holds the lock.
    pub fn acquire() -> LibvirtdLock {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .unwrap_or_else(|e| panic!("cannot open the test lock {LOCK_PATH}: {e}"));
        // SAFETY: flock on an fd we own; it stays open as long as the guard lives.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {LOCK_PATH}: {}", std::io::Error::last_os_error());
        LibvirtdLock { _file: file }
    }
}

/// The lock plus a libvirtd that answers, or — outside CI — `None` after printing why the
/// test is skipped. Under `CI=true` a missing daemon fails the test.
///
/// ```ignore
/// let Some(_libvirtd) = handoff_test_support::libvirt::require_libvirtd() else { return };
/// ```
pub fn require_libvirtd() -> Option<LibvirtdLock> {
    let lock = LibvirtdLock::acquire();
    match ensure_libvirtd() {
        Ok(()) => Some(lock),
        Err(why) if crate::tools::ci() => {
            panic!("the system libvirtd is needed and could not be started: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: the system libvirtd is not available: {why}");
            None
        }
    }
}

static NEXT_DOMAIN: AtomicUsize = AtomicUsize::new(0);

/// A tiny TCG domain defined for one test, destroyed and undefined on drop.
pub struct TestDomain {
    name: String,
}

impl TestDomain {
    /// Defines `handoff-test-<pid>-<n>` from `tests/fixtures/libvirt/tiny-domain.xml`.
    pub fn define() -> TestDomain {
        TestDomain::define_with_devices("")
    }

    /// As [`TestDomain::define`], with `devices` (XML) added to the tiny domain's
    /// `<devices>`, e.g. a Looking Glass `<shmem>`.
    pub fn define_with_devices(devices: &str) -> TestDomain {
        let name = format!(
            "handoff-test-{}-{}",
            std::process::id(),
            NEXT_DOMAIN.fetch_add(1, Ordering::Relaxed)
        );
        TestDomain::define_named(&name, devices)
    }

    /// As [`TestDomain::define_with_devices`], named `name` (a seed's domain, such as
    /// `win11`, for a test that reads names as a person would). Hold [`LibvirtdLock`]: the
    /// name is not unique to the test process.
    pub fn define_named(name: &str, devices: &str) -> TestDomain {
        let name = name.to_owned();
        let xml = DOMAIN_XML
            .replace("@NAME@", &name)
            .replace("</devices>", &format!("{devices}</devices>"));
        let mut file = tempfile::NamedTempFile::new().expect("temp file for domain XML");
        std::io::Write::write_all(&mut file, xml.as_bytes()).expect("write domain XML");
        let out = virsh(&["define", file.path().to_str().expect("temp path is UTF-8")]);
        assert!(out.success, "virsh define {name} failed: {}", out.stderr.trim());
        TestDomain { name }
    }

    /// The domain's name (`handoff-test-<pid>-<n>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `virsh start`; `Err` carries virsh's stderr (e.g. a hook's refusal).
    pub fn start(&self) -> Result<Duration, String> {
        let out = virsh(&["start", &self.name]);
        if out.success {
            Ok(out.elapsed)
        } else {
            Err(out.stderr)
        }
    }

    /// `virsh destroy` (hard stop; a guest without an OS never honours `shutdown`).
    pub fn destroy(&self) -> Result<Duration, String> {
        let out = virsh(&["destroy", &self.name]);
        if out.success {
            Ok(out.elapsed)
        } else {
            Err(out.stderr)
        }
    }

    /// `virsh domstate`: `running`, `shut off`, ….
    pub fn state(&self) -> String {
        let out = virsh(&["domstate", &self.name]);
        assert!(
            out.success,
            "virsh domstate {} failed: {}",
            self.name,
            out.stderr.trim()
        );
        out.stdout.trim().to_owned()
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        // Errors are ignored (a domain that isn't running can't be destroyed), and nothing
        // here may panic: drop can run while a failed test is already unwinding.
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

/// A libvirt test-driver machine (`test://<path>`) written to `path`, defining `domains`:
/// each a name, whether it runs, and the PCI functions its definition passes through
/// (`<hostdev>`). Each process that opens it gets its own copy, so a test's starts and stops
/// stay its own. Returns its URI.
pub fn test_driver_node(path: &Path, domains: &[(&str, bool, &[handoff::PciAddress])]) -> String {
    let mut xml = String::from("<node>\n");
    for (name, running, hostdevs) in domains {
        let devices: String = hostdevs
            .iter()
            .map(|a| {
                format!(
                    "<hostdev mode='subsystem' type='pci' managed='no'><source><address \
                     domain='0x{:04x}' bus='0x{:02x}' slot='0x{:02x}' function='0x{}'/></source></hostdev>",
                    a.domain, a.bus, a.device, a.function
                )
            })
            .collect();
        // The test driver's runstates: 1 running, 5 shut off.
        let state = if *running { 1 } else { 5 };
        xml += &format!(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
             <name>{name}</name><memory>32768</memory><vcpu>1</vcpu><os><type>hvm</type></os>\
             <devices>{devices}</devices><test:runstate>{state}</test:runstate></domain>\n"
        );
    }
    xml += "</node>\n";
    fs::write(path, xml).unwrap();
    format!("test://{}", path.display())
}

/// The "macOS has the iGPU" scene under `dir` with its VMs on a [`test_driver_node`] machine
/// of their own (`dir/libvirt-test.xml`) and a third VM, `hackintosh` ("macOS 14"), that
/// wants the iGPU too.
pub fn two_gpu_scene(dir: &Path) -> handoff::scenes::Scene {
    let scene = handoff::scenes::Scene::put(dir, "macOS has the iGPU").unwrap();
    // `test` (macOS) runs passing the iGPU through, `win11` passes the RTX's two functions,
    // `hackintosh` the iGPU too.
    let (igpu, rtx) = (
        handoff::simulated_tree::IGPU,
        handoff::simulated_tree::RTX_3090_TI,
    );
    let uri = test_driver_node(
        &dir.join("libvirt-test.xml"),
        &[
            ("test", true, &[igpu]),
            ("win11", false, &[rtx, rtx.with_function(1)]),
            ("hackintosh", false, &[igpu]),
        ],
    );
    let text = fs::read_to_string(&scene.config).unwrap();
    assert!(text.contains("\"test:///default\""), "{text}");
    let uri = format!("{uri:?}");
    let text = text.replace("\"test:///default\"", &uri)
        + &format!("\n[[vm]]\nname = \"hackintosh\"\nlabel = \"macOS 14\"\nuri = {uri}\n");
    fs::write(&scene.config, text).unwrap();
    scene
}
