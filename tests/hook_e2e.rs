//! End to end with the real system libvirtd: `handoff install-hooks` installs the real
//! hook, libvirtd runs it for a tiny TCG domain mapped (through `[[vm]]`) to a simulated
//! RTX 3090 Ti on a FUSE sysfs, and `virsh` shows what a person would see.
//!
//! What it changes on the machine, for the length of the test only: `/etc/libvirt/hooks`
//! and `/etc/handoff` are moved aside and put back exactly as found on drop (also when the
//! test fails), and libvirtd is SIGHUPed afterwards so it forgets the test's hook. The
//! shim the test installs runs the `handoff` binary cargo built under `target/`.
//!
//! Run with `cargo test --test hook_e2e` as root with `/dev/fuse`.
//! Under `CI=true` a missing part fails the test; elsewhere it skips, saying why.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use handoff::bind::record::{Phase, RestoreRecord};
use handoff::pci::PciAddress;
use handoff::simulated_tree::RTX_3090_TI;
use handoff::state::{HookPhase, HookState};
use handoff_kernelsim::send_command;
use handoff_test_support::fuse_gpu::hold;
use handoff_test_support::libvirt::{LibvirtdLock, TestDomain, virsh};
use handoff_test_support::stage::{ETC_HANDOFF, SYSTEM_CONFIG, Stage};
use handoff_test_support::wait::wait_until;

/// `handoff`, with `handoff-vm` (which runs its libvirt commands) built beside it.
fn handoff() -> &'static str {
    handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff"))
}
const HOOKS_DIR: &str = "/etc/libvirt/hooks";
/// Short, so the hang case takes seconds; the hook reads it from the system config.
const WATCHDOG_S: u64 = 2;

/// Everything one run sets up. Fields drop in declaration order: the domains first (their
/// destroy runs the hook's `release`, which still needs the mount), then the stage (the
/// mount, the temp tree, `/etc/handoff`, `/etc/libvirt/hooks` + SIGHUP, the libvirtd lock).
struct Scene {
    domain: TestDomain,
    /// A second `[[vm]]` wanting the same GPU (the homelab's two VMs).
    other: TestDomain,
    /// `/etc/libvirt/hooks` and `/etc/handoff` as found once the libvirtd lock was ours:
    /// another test process may have its own hook in place until then.
    before: (Snapshot, Snapshot),
    stage: Stage,
}

impl Scene {
    fn set_up() -> Option<Scene> {
        let mut before = None;
        let stage = Stage::set_up_after(|| {
            before = Some((snapshot(Path::new(HOOKS_DIR)), snapshot(Path::new(ETC_HANDOFF))));
        })?;
        let domain = TestDomain::define();
        let other = TestDomain::define();
        let said = stage.install(
            &system_config(&stage, &[domain.name(), other.name()]),
            Path::new(handoff()),
        );
        let meta = fs::metadata(SYSTEM_CONFIG).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "the test must run as root");
        assert!(said.contains("reloaded its hooks"), "{said}");
        Some(Scene {
            domain,
            other,
            before: before.expect("set_up_after ran `found`"),
            stage,
        })
    }

    /// Undo everything (in the order fields drop) but keep the libvirtd lock, so the caller
    /// can check the machine is as found before another test process may touch it.
    fn tear_down(self) -> ((Snapshot, Snapshot), LibvirtdLock) {
        let Scene {
            domain,
            other,
            before,
            stage,
        } = self;
        drop((domain, other));
        (before, stage.into_lock())
    }

    /// Every function of the GPU's slot with its driver and override, from the mount.
    fn functions(&self) -> Vec<FunctionState> {
        let g = handoff::gpu::read_gpu(&self.stage.host, RTX_3090_TI).unwrap();
        g.functions
            .iter()
            .map(|f| (f.address, f.driver.clone(), f.driver_override.clone()))
            .collect()
    }

    fn drivers(&self) -> Vec<Option<String>> {
        self.functions().into_iter().map(|(_, d, _)| d).collect()
    }

    fn state(&self) -> HookState {
        HookState::load(&self.stage.host).expect("the hook wrote no state.json")
    }

    fn record(&self) -> Option<RestoreRecord> {
        RestoreRecord::load(&self.stage.host, RTX_3090_TI).unwrap()
    }

    fn write_log(&self) -> Vec<(String, String)> {
        self.stage.mount.log().iter().map(|r| r.short()).collect()
    }

    fn node(&self, name: &str) -> PathBuf {
        self.stage.host.dev.join(name)
    }
}

/// A function of the GPU's slot: address, driver, driver_override.
type FunctionState = (PciAddress, Option<String>, Option<String>);

/// The config the hook reads: the simulated roots, a short watchdog, the test domains.
/// The system config: the simulated GPU (a short watchdog) and one `[[vm]]` per domain.
fn system_config(stage: &Stage, domains: &[&str]) -> String {
    let mut text = format!(
        "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\nwatchdog_s = {WATCHDOG_S}\n\n{}",
        stage.host_section()
    );
    for d in domains {
        text += &format!("\n[[vm]]\nname = \"{d}\"\n");
    }
    text
}

/// Pids of processes with a file open under `dir` (the hook's writer child, stuck in a
/// write to the mount).
fn processes_with_files_under(dir: &Path) -> Vec<u32> {
    processes_with_files_matching(dir, |_| true)
}

/// Processes with a file open under `dir` whose path passes `wanted`.
fn processes_with_files_matching(dir: &Path, wanted: impl Fn(&Path) -> bool) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(dir) && wanted(&t)))
        {
            pids.push(pid);
        }
    }
    pids
}

/// `State:` and `PPid:` from `/proc/<pid>/status`, None once the pid is gone.
fn state_and_parent(pid: u32) -> Option<(String, u32)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    Some((field("State:")?, field("PPid:")?.parse().ok()?))
}

/// A directory tree as (relative path, inode, mode, uid, gid, contents), to compare
/// before and after.
type Entry = (PathBuf, u64, u32, u32, u32, Vec<u8>);
type Snapshot = Option<Vec<Entry>>;

fn snapshot(dir: &Path) -> Snapshot {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<Entry>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let m = fs::symlink_metadata(&p).unwrap();
            let contents = if m.is_file() {
                fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            out.push((
                p.strip_prefix(root).unwrap().to_owned(),
                m.ino(),
                m.mode(),
                m.uid(),
                m.gid(),
                contents,
            ));
            if m.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let m = fs::symlink_metadata(dir).ok()?;
    let mut out = vec![(PathBuf::new(), m.ino(), m.mode(), m.uid(), m.gid(), Vec::new())];
    walk(dir, dir, &mut out);
    Some(out)
}

fn is_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

#[test]
fn the_real_libvirtd_runs_the_hook_refuses_binds_returns_and_survives_a_hang() {
    let Some(s) = Scene::set_up() else { return };
    let domain_name = s.domain.name().to_owned();
    let mountpoint = s.stage.mount.path().to_owned();
    let home = s.functions();
    assert_eq!(
        s.drivers(),
        ["nvidia", "snd_hda_intel", "xhci_hcd", "nvidia-gpu"].map(|d| Some(d.to_owned()))
    );

    refuses_start_while_a_cuda_job_holds_the_gpu(&s, &home);
    starts_with_the_gpu_on_vfio_pci_when_nothing_holds_it(&s);
    a_second_vm_is_refused_and_its_release_leaves_the_first_vms_gpu_alone(&s);
    destroy_brings_every_function_home(&s, &home);
    a_hung_unbind_fails_the_start_cleanly_and_libvirtd_keeps_answering(&s, &home);

    // Everything as found: the hook directory, /etc/handoff, no domain, no mount.
    let ((hooks_before, etc_before), _libvirtd) = s.tear_down();
    assert_eq!(
        snapshot(Path::new(HOOKS_DIR)),
        hooks_before,
        "{HOOKS_DIR} changed"
    );
    assert_eq!(
        snapshot(Path::new(ETC_HANDOFF)),
        etc_before,
        "{ETC_HANDOFF} changed"
    );
    let all = virsh(&["list", "--all", "--name"]);
    assert!(all.success, "{all:?}");
    assert!(!all.stdout.lines().any(|l| l == domain_name), "{}", all.stdout);
    assert!(
        !is_mounted(&mountpoint),
        "{} is still mounted",
        mountpoint.display()
    );
    assert!(processes_with_files_under(&mountpoint).is_empty());
}

fn refuses_start_while_a_cuda_job_holds_the_gpu(s: &Scene, home: &[FunctionState]) {
    let job = hold(&s.node("nvidia0"));
    let t = Instant::now();
    let err = s
        .domain
        .start()
        .expect_err("the hook must refuse while a process holds /dev/nvidia0");
    eprintln!("(a) virsh start refused in {:?}:\n{err}", t.elapsed());
    let holder_line = format!("sleep (pid {}, user root", job.pid());
    assert!(err.contains(&holder_line), "the holder is not named: {err}");
    assert!(err.contains(&s.node("nvidia0").display().to_string()), "{err}");
    assert!(err.contains("Nothing was changed"), "{err}");

    assert_eq!(s.functions(), home, "the GPU was touched");
    assert_eq!(
        s.write_log(),
        [] as [(String, String); 0],
        "something was written to sysfs"
    );
    assert_eq!(s.domain.state(), "shut off");
    assert_eq!(s.record(), None);
    let state = s.state();
    assert_eq!(state.phase, HookPhase::Host);
    let refusal = state.last_refusal.expect("state.json has no refusal");
    assert_eq!(refusal.vm, s.domain.name());
    assert!(refusal.holders.iter().any(|h| h.pid == job.pid()), "{refusal:?}");
    assert!(refusal.message.contains(&holder_line), "{}", refusal.message);
}

fn starts_with_the_gpu_on_vfio_pci_when_nothing_holds_it(s: &Scene) {
    let took = s.domain.start().expect("start with nothing holding the GPU");
    eprintln!("(b) virsh start succeeded in {took:?}");
    assert_eq!(s.domain.state(), "running");
    for (a, d, o) in s.functions() {
        assert_eq!(d.as_deref(), Some("vfio-pci"), "{a}");
        assert_eq!(o.as_deref(), Some("vfio-pci"), "{a}");
    }
    let state = s.state();
    assert_eq!(state.phase, HookPhase::Vfio);
    assert_eq!(state.vm.as_deref(), Some(s.domain.name()));
    let record = s.record().expect("a restore record while the VM holds the GPU");
    assert_eq!(record.phase, Phase::Bound);
}

fn a_second_vm_is_refused_and_its_release_leaves_the_first_vms_gpu_alone(s: &Scene) {
    let err = s
        .other
        .start()
        .expect_err("the GPU is with the first VM: the second must be refused");
    eprintln!("(b2) the second VM's start was refused:\n{err}");
    assert!(
        err.contains(&format!(
            "not handing GPU {RTX_3090_TI} to {}: it is with {}",
            s.other.name(),
            s.domain.name()
        )),
        "{err}"
    );
    // libvirt sent the refused domain's `release end` too: the GPU stays with the first.
    assert_eq!(s.other.state(), "shut off");
    assert_eq!(s.domain.state(), "running");
    for (a, d, _) in s.functions() {
        assert_eq!(
            d.as_deref(),
            Some("vfio-pci"),
            "{a} was taken from the running VM"
        );
    }
    assert_eq!(s.record().map(|r| r.phase), Some(Phase::Bound));
    let state = s.state();
    assert_eq!(state.phase, HookPhase::Vfio);
    assert_eq!(state.vm.as_deref(), Some(s.domain.name()));
}

fn destroy_brings_every_function_home(s: &Scene, home: &[FunctionState]) {
    let took = s.domain.destroy().expect("destroy");
    eprintln!("(c) virsh destroy took {took:?}");
    assert_eq!(s.functions(), home, "not every function came home");
    assert_eq!(s.record(), None, "the restore record outlived a good return");
    let state = s.state();
    assert_eq!(state.phase, HookPhase::Host);
    assert_eq!(state.vm, None);
}

fn a_hung_unbind_fails_the_start_cleanly_and_libvirtd_keeps_answering(s: &Scene, home: &[FunctionState]) {
    let sys = s.stage.mount.path();
    send_command(sys, &format!("hang unbind {RTX_3090_TI} nvidia once\n")).unwrap();

    let t = Instant::now();
    let err = s.domain.start().expect_err("a hung unbind must fail the start");
    let took = t.elapsed();
    eprintln!("(d) virsh start failed in {took:?}:\n{err}");
    assert!(
        took < Duration::from_secs(WATCHDOG_S + 4),
        "virsh start waited {took:?}: something kept libvirtd waiting past the watchdog"
    );
    assert!(
        err.contains(&format!(
            "unbinding {RTX_3090_TI} from nvidia did not return after {WATCHDOG_S} s"
        )),
        "{err}"
    );
    assert!(err.contains("Restore required"), "{err}");
    assert_eq!(s.stage.mount.hung().len(), 1, "the unbind should still be hung");

    let t = Instant::now();
    let list = virsh(&["list"]);
    let list_took = t.elapsed();
    eprintln!("(d) virsh list answered in {list_took:?} while the unbind is hung");
    assert!(list.success, "{list:?}");
    assert!(
        list_took < Duration::from_secs(1),
        "virsh list took {list_took:?}"
    );
    assert_eq!(s.domain.state(), "shut off");

    // The hook's writer child outlives the hook, stuck in its write. (So may the hooks'
    // bounded readers of the locked device's driver_override, one per hook run that read
    // the GPU after the hang: they block like on a real kernel, and end with the unbind.)
    let writers = processes_with_files_matching(sys, |p| p.ends_with("unbind"));
    assert_eq!(writers.len(), 1, "expected one hung writer, found {writers:?}");
    let readers = processes_with_files_matching(sys, |p| p.ends_with("driver_override"));
    eprintln!("(d) readers stuck behind the device lock: {readers:?}");
    let writer = writers[0];
    let (st, parent) = state_and_parent(writer).unwrap();
    eprintln!("(d) the hung writer (pid {writer}) is in state {st}, parent pid {parent}");

    // libvirt ran `release end` after the failed start; the GPU must still read as needing
    // a restore: the unbind is in flight and will land when the kernel lets it go.
    let state = s.state();
    assert_eq!(state.phase, HookPhase::RestoreRequired, "{state:?}");
    assert!(
        state
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("hung") && e.contains("handoff rebind --force")),
        "{state:?}"
    );
    let record = s.record().expect("the restore record must stay after a hang");
    assert_eq!(record.phase, Phase::Stuck);

    // The kernel lets go: the unbind completes, the writer exits.
    send_command(sys, "release\n").unwrap();
    let gone = wait_until(Duration::from_secs(5), || {
        state_and_parent(writer).is_none_or(|(st, _)| st.starts_with('Z'))
    });
    eprintln!(
        "(d) after release the writer is {}",
        match state_and_parent(writer) {
            None => "gone (reaped)".to_owned(),
            Some((st, p)) => format!("{st}, parent {p}"),
        }
    );
    assert!(gone, "the writer did not finish after the release");
    let readers_gone = wait_until(Duration::from_secs(5), || {
        readers
            .iter()
            .all(|r| state_and_parent(*r).is_none_or(|(st, _)| st.starts_with('Z')))
    });
    assert!(
        readers_gone,
        "stuck readers did not finish after the release: {readers:?}"
    );
    assert_eq!(
        s.drivers()[0],
        None,
        "the released unbind left 01:00.0 without a driver"
    );

    // doctor sees the installed hook and the pending restore.
    let out = Command::new(handoff())
        .args(["doctor", "--json"])
        .env("HANDOFF_CONFIG", SYSTEM_CONFIG)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let check = |id: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no {id} check in {report}"))
            .clone()
    };
    eprintln!("(d) doctor: {}\n    {}", check("hook"), check("restore"));
    assert_eq!(check("hook")["level"], "ok");
    assert_eq!(check("restore")["level"], "fail");
    assert!(
        check("restore")["fix"]
            .as_str()
            .unwrap()
            .contains("handoff rebind --force")
    );

    let out = Command::new(handoff())
        .args(["rebind", "--force"])
        .env("HANDOFF_CONFIG", SYSTEM_CONFIG)
        .output()
        .unwrap();
    eprintln!(
        "(d) handoff rebind --force:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    assert_eq!(s.functions(), home, "rebind --force did not bring the GPU home");
    assert_eq!(s.record(), None);
    // What the surfaces read: no more "restore required".
    let state = s.state();
    assert_eq!(state.phase, HookPhase::Host, "{state:?}");
    assert_eq!(state.last_error, None, "{state:?}");
}
