//! The libvirt hook, run in-process the way libvirtd runs `handoff hook`: arguments,
//! the domain XML on stdin, a system config owned by root, the simulated GPU behind the
//! kernel simulator's FUSE mount. What is asserted is what libvirt and the surfaces see:
//! the exit code, stderr (libvirt's error text), the `driver` links and `state.json`.
//!
//! Run with `cargo test --all-features --test hook` as root with `/dev/fuse`.
//! Under `CI=true` a missing `/dev/fuse` fails; elsewhere these tests skip, saying why.
#![cfg(feature = "kernel-sim")]

mod named_holder;
mod simgpu;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use handoff::bind::record::{Phase, RestoreRecord};
use handoff::kernelsim::{Errno, FaultRule, FileKind, Release};
use simgpu::{GPU, Sim, addr, hold, workstation};

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hook")
        .join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A workstation with a system config for the hook: root-owned, mode 0644, `[host]` on
/// the mount, one `[[vm]]` win11, a 1 s watchdog.
struct Machine {
    sim: Sim,
    config: PathBuf,
}

fn machine() -> Option<Machine> {
    let sim = workstation()?;
    let host = sim.host();
    let etc = sim.tmp.path().join("etc");
    fs::create_dir(&etc).unwrap();
    let config = etc.join("config.toml");
    let text = format!(
        "[gpu]\naddress = \"{GPU}\"\nhost_driver = \"nvidia\"\nwatchdog_s = 1\n\n\
         [[vm]]\nname = \"win11\"\nlabel = \"Windows\"\n\n\
         [host]\nsysfs = {:?}\nproc = \"/proc\"\ndev = {:?}\nrun = {:?}\n",
        host.sysfs.display().to_string(),
        host.dev.display().to_string(),
        host.run.display().to_string(),
    );
    fs::write(&config, text).unwrap();
    std::os::unix::fs::chown(&config, Some(0), Some(0)).unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    Some(Machine { sim, config })
}

/// What one hook run returned.
struct Run {
    code: i32,
    stderr: String,
}

impl Machine {
    /// `handoff hook <domain> <op> <sub> -` with `xml` on stdin.
    fn hook(&self, domain: &str, op: &str, sub: &str, xml: &str) -> Run {
        self.hook_bytes(domain, op, sub, xml.as_bytes())
    }

    /// [`Machine::hook`] with whatever bytes libvirt (or something else) writes to stdin.
    fn hook_bytes(&self, domain: &str, op: &str, sub: &str, xml: &[u8]) -> Run {
        let args: Vec<String> = [domain, op, sub, "-"].map(String::from).to_vec();
        let mut stdin = xml;
        let mut stderr = Vec::new();
        let code = handoff::hook::run(&args, &mut stdin, &self.config, &mut stderr);
        Run {
            code,
            stderr: String::from_utf8(stderr).unwrap(),
        }
    }

    fn state_path(&self) -> PathBuf {
        self.sim.host().state_file()
    }

    fn state(&self) -> serde_json::Value {
        let text = fs::read_to_string(self.state_path()).expect("the hook should have written state.json");
        serde_json::from_str(&text).unwrap()
    }

    fn record(&self) -> Option<RestoreRecord> {
        RestoreRecord::load(&self.sim.host(), addr(GPU)).unwrap()
    }

    /// Nothing happened: no write reached the kernel, the GPU is home, no record, no state.
    fn assert_nothing_written(&self, what: &str) {
        assert_eq!(self.sim.short_log(), vec![], "{what}: no sysfs writes");
        self.sim.assert_home();
        assert_eq!(self.record(), None, "{what}: no restore record");
        assert!(!self.state_path().exists(), "{what}: no state.json");
    }
}

#[test]
fn prepare_hands_the_gpu_to_the_vm_and_release_brings_it_home() {
    let Some(m) = machine() else { return };
    let xml = fixture("win11.xml");
    let r = m.hook("win11", "prepare", "begin", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    m.sim.assert_on_vfio();
    let st = m.state();
    assert_eq!(st["phase"], "vfio");
    assert_eq!(st["vm"], "win11");
    assert_eq!(st["gpu"], GPU);
    let mode = fs::metadata(m.state_path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "state.json is world-readable");
    assert_eq!(m.record().unwrap().phase, Phase::Bound);

    // libvirt's order on shutdown: stopped end, then release end.
    assert_eq!(m.hook("win11", "stopped", "end", &xml).code, 0);
    m.sim.assert_on_vfio();
    let r = m.hook("win11", "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    m.sim.assert_home();
    assert_eq!(m.record(), None);
    let st = m.state();
    assert_eq!(st["phase"], "host");
    assert_eq!(st["vm"], serde_json::Value::Null);
}

#[test]
fn prepare_is_refused_while_a_process_holds_the_gpu_and_release_changes_nothing() {
    let Some(m) = machine() else { return };
    let holder = hold(&m.sim.dev("nvidia0"));
    let xml = fixture("win11.xml");
    let r = m.hook("win11", "prepare", "begin", &xml);
    assert_eq!(r.code, 1);
    let line = format!("sleep (pid {}, user root", holder.pid());
    assert!(
        r.stderr.contains(&line),
        "stderr should name the holder:\n{}",
        r.stderr
    );
    assert!(r.stderr.contains("nvidia0"), "{}", r.stderr);
    assert_eq!(
        m.sim.short_log(),
        vec![],
        "a refused start writes nothing to sysfs"
    );
    m.sim.assert_home();
    assert_eq!(m.record(), None);

    let st = m.state();
    assert_eq!(st["phase"], "host");
    assert_eq!(st["vm"], serde_json::Value::Null);
    let refusal = &st["last_refusal"];
    assert_eq!(refusal["vm"], "win11");
    assert_eq!(refusal["holders"][0]["pid"], holder.pid());
    assert_eq!(refusal["holders"][0]["command"], "sleep");
    assert!(refusal["message"].as_str().unwrap().contains(&line), "{refusal}");
    let state_before = fs::read(m.state_path()).unwrap();

    // What libvirt does after a refused prepare.
    for (op, sub) in [("stopped", "end"), ("release", "end")] {
        let r = m.hook("win11", op, sub, &xml);
        assert_eq!(r.code, 0, "{op} {sub}: {}", r.stderr);
    }
    assert_eq!(m.sim.short_log(), vec![]);
    m.sim.assert_home();
    assert_eq!(
        fs::read(m.state_path()).unwrap(),
        state_before,
        "state.json unchanged"
    );
}

#[test]
fn prepare_is_refused_while_a_process_holds_the_audio_function() {
    let Some(m) = machine() else { return };
    let holder = hold(&m.sim.dev("snd/controlC1"));
    let r = m.hook("win11", "prepare", "begin", &fixture("win11.xml"));
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!("sleep (pid {}", holder.pid())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("controlC1"), "{}", r.stderr);
    assert_eq!(m.sim.short_log(), vec![]);
    m.sim.assert_home();
}

#[test]
fn a_domain_that_does_not_use_the_gpu_is_left_alone() {
    let Some(m) = machine() else { return };
    let xml = fixture("router.xml");
    for (op, sub) in [("prepare", "begin"), ("start", "begin"), ("release", "end")] {
        let r = m.hook("router", op, sub, &xml);
        assert_eq!(r.code, 0, "{op} {sub}: {}", r.stderr);
        assert_eq!(r.stderr, "", "{op} {sub}");
    }
    m.assert_nothing_written("an unrelated domain");
}

#[test]
fn other_operations_of_the_gpus_vm_exit_at_once() {
    let Some(m) = machine() else { return };
    let xml = fixture("win11.xml");
    for (op, sub) in [
        ("start", "begin"),
        ("started", "begin"),
        ("stopped", "end"),
        ("prepare", "end"),
        ("release", "begin"),
        ("reconnect", "begin"),
    ] {
        let r = m.hook("win11", op, sub, &xml);
        assert_eq!(r.code, 0, "{op} {sub}: {}", r.stderr);
    }
    m.assert_nothing_written("operations other than prepare begin and release end");
}

#[test]
fn a_config_not_owned_by_root_refuses_prepare_but_never_blocks_release() {
    let Some(m) = machine() else { return };
    std::os::unix::fs::chown(&m.config, Some(1000), None).unwrap();
    let xml = fixture("win11.xml");
    let r = m.hook("win11", "prepare", "begin", &xml);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("owned by uid 1000, not root"), "{}", r.stderr);
    assert!(r.stderr.contains(&m.config.display().to_string()), "{}", r.stderr);
    let r = m.hook("win11", "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    m.assert_nothing_written("an untrusted config");
}

#[test]
fn a_group_writable_config_refuses_prepare_but_never_blocks_release() {
    let Some(m) = machine() else { return };
    fs::set_permissions(&m.config, fs::Permissions::from_mode(0o664)).unwrap();
    let xml = fixture("win11.xml");
    let r = m.hook("win11", "prepare", "begin", &xml);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("mode 664 lets group or others write it"),
        "{}",
        r.stderr
    );
    assert_eq!(m.hook("win11", "release", "end", &xml).code, 0);
    m.assert_nothing_written("a group-writable config");
}

#[test]
fn a_domain_passing_the_gpu_through_without_a_vm_entry_is_guarded_with_a_warning() {
    let Some(m) = machine() else { return };
    let xml = fixture("linux-ai.xml");
    let r = m.hook("linux-ai", "prepare", "begin", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("warning: linux-ai passes 0000:01:00.0 through but is not a [[vm]]"),
        "{}",
        r.stderr
    );
    m.sim.assert_on_vfio();
    assert_eq!(m.state()["vm"], "linux-ai");
    let r = m.hook("linux-ai", "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    m.sim.assert_home();
    assert_eq!(m.state()["phase"], "host");

    // The same domain with a holder: refused like a configured one.
    let holder = hold(&m.sim.dev("nvidia0"));
    let r = m.hook("linux-ai", "prepare", "begin", &xml);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!("sleep (pid {}", holder.pid())),
        "{}",
        r.stderr
    );
}

#[test]
fn a_second_vm_is_refused_while_the_gpu_is_with_another_and_its_release_leaves_the_gpu_alone() {
    let Some(m) = machine() else { return };
    let win = fixture("win11.xml");
    let ai = fixture("linux-ai.xml");
    assert_eq!(m.hook("win11", "prepare", "begin", &win).code, 0);
    m.sim.clear_log();

    let r = m.hook("linux-ai", "prepare", "begin", &ai);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("is with win11"),
        "the refusal names the VM:\n{}",
        r.stderr
    );
    assert!(r.stderr.contains("stop that VM first"), "{}", r.stderr);
    // libvirt then calls release for the refused domain: win11 must keep its GPU.
    for (op, sub) in [("stopped", "end"), ("release", "end")] {
        let r = m.hook("linux-ai", op, sub, &ai);
        assert_eq!(r.code, 0, "{op} {sub}: {}", r.stderr);
    }
    assert_eq!(m.sim.short_log(), vec![], "win11's GPU was not touched");
    m.sim.assert_on_vfio();
    let rec = m.record().unwrap();
    assert_eq!((rec.phase, rec.vm.as_deref()), (Phase::Bound, Some("win11")));
    let st = m.state();
    assert_eq!(st["phase"], "vfio");
    assert_eq!(st["vm"], "win11");

    assert_eq!(m.hook("win11", "release", "end", &win).code, 0);
    m.sim.assert_home();
}

#[test]
fn a_hung_unbind_fails_the_start_in_time_and_release_brings_the_gpu_home_once_it_ends() {
    let Some(m) = machine() else { return };
    let xml = fixture("win11.xml");
    m.sim.mount.inject(
        FaultRule::hang(FileKind::Unbind)
            .device(addr(GPU))
            .driver("nvidia"),
    );
    let started = Instant::now();
    let r = m.hook("win11", "prepare", "begin", &xml);
    let took = started.elapsed();
    assert_eq!(r.code, 1);
    assert!(took < Duration::from_secs(5), "the hook was stuck for {took:?}");
    assert!(
        r.stderr.contains(
            "unbinding 0000:01:00.0 from nvidia did not return after 1 s: something still holds the GPU"
        ),
        "{}",
        r.stderr
    );
    let st = m.state();
    assert_eq!(st["phase"], "restore-required");
    assert!(
        st["last_error"].as_str().unwrap().contains("did not return"),
        "{st}"
    );

    // libvirt calls release right after the failed prepare, while the unbind is still
    // blocked: returning now would be undone when it lands, so nothing is touched.
    let before = m.sim.short_log();
    let r = m.hook("win11", "release", "end", &xml);
    assert_eq!(r.code, 0, "release is never blocked");
    assert!(r.stderr.contains("still blocked in the kernel"), "{}", r.stderr);
    assert!(r.stderr.contains("handoff rebind --force"), "{}", r.stderr);
    assert_eq!(m.sim.short_log(), before);
    assert_eq!(m.record().unwrap().phase, Phase::Stuck);
    assert_eq!(m.state()["phase"], "restore-required");

    // The holder lets go; the write ends; the next release (or rebind --force) brings
    // the GPU home.
    let writer = m.record().unwrap().hung_writer.unwrap() as u32;
    m.sim.mount.release(Release::Fail(Errno::EBUSY));
    assert_eq!(simgpu::wait_gone(&[writer], Duration::from_secs(3)), vec![]);
    let r = m.hook("win11", "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    m.sim.assert_home();
    assert_eq!(m.record(), None);
    assert_eq!(m.state()["phase"], "host");
}

/// Runs `f` on a thread and fails the test when it has not returned within `limit`: what
/// is checked is that the hook does not hang (a hung thread is left behind, blocked).
fn within<T: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not return within {limit:?}"))
}

#[test]
fn a_fifo_in_place_of_state_json_neither_hangs_the_hook_nor_stops_the_handoff() {
    let Some(m) = machine() else { return };
    let m = std::sync::Arc::new(m);
    let state = m.state_path();
    fs::create_dir_all(state.parent().unwrap()).unwrap();
    let c = std::ffi::CString::new(state.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path in the test's temp dir.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let xml = fixture("win11.xml");
    let r = {
        let m = m.clone();
        within(
            Duration::from_secs(10),
            "prepare with a FIFO state.json",
            move || m.hook("win11", "prepare", "begin", &xml),
        )
    };
    assert_eq!(r.code, 0, "{}", r.stderr);
    m.sim.assert_on_vfio();
    // The hook replaced it (by rename) with a real state file.
    assert!(fs::symlink_metadata(&state).unwrap().is_file());
    assert_eq!(m.state()["phase"], "vfio");
}

#[test]
fn a_restore_record_that_is_a_fifo_refuses_the_start_at_once_naming_it() {
    let Some(m) = machine() else { return };
    let m = std::sync::Arc::new(m);
    let record = RestoreRecord::path(&m.sim.host(), addr(GPU));
    fs::create_dir_all(record.parent().unwrap()).unwrap();
    let c = std::ffi::CString::new(record.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path in the test's temp dir.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let xml = fixture("win11.xml");
    let r = {
        let m = m.clone();
        within(
            Duration::from_secs(10),
            "prepare with a FIFO restore record",
            move || m.hook("win11", "prepare", "begin", &xml),
        )
    };
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("cannot read the restore record {}", record.display())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("a FIFO, not a regular file"), "{}", r.stderr);
    assert_eq!(m.sim.short_log(), vec![], "no sysfs writes");
    m.sim.assert_home();
}

#[test]
fn a_dangling_system_config_link_refuses_prepare_before_touching_sysfs() {
    let Some(m) = machine() else { return };
    fs::remove_file(&m.config).unwrap();
    let gone = m.sim.tmp.path().join("etc/moved-away.toml");
    std::os::unix::fs::symlink(&gone, &m.config).unwrap();
    // The library says so first: with it reading the link as "no config", the hook below
    // would act with the defaults, on the real /sys.
    assert!(
        handoff::config::Config::load_system(&m.config).is_err(),
        "a dangling link must not read as defaults"
    );
    let xml = fixture("win11.xml");
    let r = m.hook("win11", "prepare", "begin", &xml);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "{} is a symbolic link to {}",
            m.config.display(),
            gone.display()
        )),
        "{}",
        r.stderr
    );
    assert_eq!(m.hook("win11", "release", "end", &xml).code, 0);
    m.assert_nothing_written("a dangling config link");
}

#[test]
fn a_domain_xml_that_is_not_utf8_refuses_the_start_instead_of_skipping_the_guard() {
    let Some(m) = machine() else { return };
    // linux-ai is not a [[vm]]: only its XML says it takes the GPU.
    let xml = fixture("linux-ai.xml").replace("<name>linux-ai</name>", "<name>linux-ai\u{1}</name>");
    let mut bytes = xml.into_bytes();
    let at = bytes.iter().position(|&b| b == 1).unwrap();
    bytes[at] = 0xff;
    let r = m.hook_bytes("linux-ai", "prepare", "begin", &bytes);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "not starting linux-ai: the domain XML is not UTF-8 text (invalid byte at offset {at})"
        )),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("GPU 0000:01:00.0"), "{}", r.stderr);
    assert_eq!(m.hook_bytes("linux-ai", "release", "end", &bytes).code, 0);
    m.assert_nothing_written("a non-UTF-8 domain XML");
}

#[test]
fn a_hostdev_bus_out_of_range_is_refused_not_truncated_onto_the_gpu() {
    let Some(m) = machine() else { return };
    let xml = fixture("bus-out-of-range.xml");
    let r = m.hook("wide-bus", "prepare", "begin", &xml);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("source address bus='0x101' is not a PCI bus number (0 to 0xff"),
        "{}",
        r.stderr
    );
    m.assert_nothing_written("a hostdev address out of range");
}

#[test]
fn a_hostdev_inside_metadata_passes_nothing_through() {
    let Some(m) = machine() else { return };
    let xml = fixture("hostdev-in-metadata.xml");
    for (op, sub) in [("prepare", "begin"), ("release", "end")] {
        let r = m.hook("router", op, sub, &xml);
        assert_eq!(r.code, 0, "{op} {sub}: {}", r.stderr);
        assert_eq!(r.stderr, "", "{op} {sub}: no warning, nothing guarded");
    }
    m.assert_nothing_written("a domain whose <hostdev> is only in its metadata");
}

#[test]
fn a_hung_writer_pid_reused_by_another_process_does_not_block_the_return() {
    let Some(m) = machine() else { return };
    let xml = fixture("win11.xml");
    assert_eq!(m.hook("win11", "prepare", "begin", &xml).code, 0);
    // The record says a write hung in a writer that has since gone, and its pid now
    // belongs to an unrelated process: same pid, another start time.
    let other = std::process::Command::new("sleep").arg("600").spawn().unwrap();
    let other = simgpu::Holder(other);
    let pid = other.pid() as i32;
    let start = handoff::bind::record::process_start_time(pid).unwrap();
    let host = m.sim.host();
    let mut record = m.record().unwrap();
    record.phase = Phase::Stuck;
    record.problem = Some("unbinding 0000:01:00.0 from nvidia hung".into());
    record.hung_writer = Some(pid);
    record.hung_writer_start = Some(start + 1);
    record.save(&host).unwrap();

    let r = m.hook("win11", "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("still blocked"), "{}", r.stderr);
    m.sim.assert_home();
    assert_eq!(m.record(), None);

    // The writer itself (same pid, same start time) still blocks it, as before.
    assert_eq!(m.hook("win11", "prepare", "begin", &xml).code, 0);
    let mut record = m.record().unwrap();
    record.phase = Phase::Stuck;
    record.hung_writer = Some(pid);
    record.hung_writer_start = Some(start);
    record.save(&host).unwrap();
    let r = m.hook("win11", "release", "end", &xml);
    assert!(
        r.stderr
            .contains(&format!("writer process {pid} is still blocked")),
        "{}",
        r.stderr
    );
    m.sim.assert_on_vfio();
}

#[test]
fn a_holder_named_with_terminal_controls_and_markup_is_shown_escaped_in_the_refusal() {
    let Some(m) = machine() else { return };
    let holder = named_holder::hold_named(&m.sim.dev("nvidia0"), named_holder::EVIL, m.sim.tmp.path());
    let r = m.hook("win11", "prepare", "begin", &fixture("win11.xml"));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "{} (pid {}, user root",
            named_holder::EVIL_PLAIN,
            holder.pid()
        )),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains('\x1b') && !r.stderr.contains('\x07'),
        "no raw control reaches libvirt's error: {:?}",
        r.stderr
    );
    // One line per holder: the name's newline did not forge a line.
    assert!(!r.stderr.lines().any(|l| l.starts_with(" (pid")), "{}", r.stderr);
    assert_eq!(m.sim.short_log(), vec![], "no sysfs writes");
    m.sim.assert_home();
}
