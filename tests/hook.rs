//! The libvirt hook, run in-process the way libvirtd runs `handoff hook`: arguments,
//! the domain XML on stdin, a system config owned by root, the simulated GPU behind the
//! kernel simulator's FUSE mount. What is asserted is what libvirt and the surfaces see:
//! the exit code, stderr (libvirt's error text), the `driver` links and `state.json`.
//!
//! Run with `cargo test --all-features --test hook` as root with `/dev/fuse`.
//! Under `CI=true` a missing `/dev/fuse` fails; elsewhere these tests skip, saying why.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fuse_gpu::{AUDIO, GPU, Sim, addr, hold, workstation};
use handoff::bind::record::{Phase, RestoreRecord};
use handoff_kernelsim::{Errno, FaultRule, FileKind, Release};
use handoff_test_support::fuse_gpu;
use handoff_test_support::hook_run::{self, Run, finish};
use handoff_test_support::named_holder;

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
    let etc = sim.tmp.path().join("etc");
    fs::create_dir(&etc).unwrap();
    let m = Machine {
        config: etc.join("config.toml"),
        sim,
    };
    m.configure("watchdog_s = 1", None, None);
    Some(m)
}

impl Machine {
    /// (Re)write the system config: `gpu_extra` in `[gpu]`, `[host]` on the mount with
    /// `proc` and `dev` replaced when given.
    fn configure(&self, gpu_extra: &str, proc: Option<&Path>, dev: Option<&Path>) {
        let host = self.sim.host();
        let text = format!(
            "[gpu]\naddress = \"{GPU}\"\nhost_driver = \"nvidia\"\n{gpu_extra}\n\n\
             [[vm]]\nname = \"win11\"\nlabel = \"Windows\"\n\n\
             [host]\nsysfs = {:?}\nproc = {:?}\ndev = {:?}\nrun = {:?}\nuninspectable_ok = {:?}\n",
            host.sysfs.display().to_string(),
            proc.unwrap_or(Path::new("/proc")).display().to_string(),
            dev.unwrap_or(&host.dev).display().to_string(),
            host.run.display().to_string(),
            host.uninspectable_ok,
        );
        fs::write(&self.config, text).unwrap();
        std::os::unix::fs::chown(&self.config, Some(0), Some(0)).unwrap();
        fs::set_permissions(&self.config, fs::Permissions::from_mode(0o644)).unwrap();
    }
}

impl Machine {
    /// `handoff hook <domain> <op> <sub> -` with `xml` on stdin.
    fn hook(&self, domain: &str, op: &str, sub: &str, xml: &str) -> Run {
        self.hook_bytes(domain, op, sub, xml.as_bytes())
    }

    /// [`Machine::hook`] with whatever bytes libvirt (or something else) writes to stdin.
    fn hook_bytes(&self, domain: &str, op: &str, sub: &str, xml: &[u8]) -> Run {
        hook_run::in_process(&self.config, domain, op, sub, xml)
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
    assert_eq!(fuse_gpu::wait_gone(&[writer], Duration::from_secs(3)), vec![]);
    let r = m.hook("win11", "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    m.sim.assert_home();
    assert_eq!(m.record(), None);
    assert_eq!(m.state()["phase"], "host");
}

#[test]
fn a_vm_named_like_an_option_is_still_guarded_through_the_shims_arguments() {
    // What the qemu.d shim runs: `handoff hook -- <domain> prepare begin -`. A [[vm]]
    // called `--help` (or `-q`, `--config=x`) is a domain name there, so the holder check
    // runs and the start is refused.
    let Some(m) = machine() else { return };
    let text = fs::read_to_string(&m.config).unwrap();
    for name in ["--help", "-q", "--config=/tmp/x.toml"] {
        fs::write(
            &m.config,
            text.replace("name = \"win11\"", &format!("name = {name:?}")),
        )
        .unwrap();
        let holder = hold(&m.sim.dev("nvidia0"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_handoff"))
            .arg("hook")
            .arg("--system-config")
            .arg(&m.config)
            .args(["--", name, "prepare", "begin", "-"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("not handing GPU {GPU} to {name}")),
            "{name}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("sleep (pid {}", holder.pid())),
            "{name}: {stderr}"
        );
        assert_eq!(m.sim.short_log(), vec![], "{name}: a refusal writes nothing");
        m.sim.assert_home();
        drop(holder);
    }
}
// --- The gate fails closed. ----------------------------------------------------------------

/// A procfs with one process, pid 4242 (`containerd-shim`), whose `fd` gives an error even
/// to root (it is a file: what a container's PID 1 looks like to a confined hook).
fn unreadable_proc(root: &Path) -> PathBuf {
    let proc = root.join("fakeproc");
    let pid = proc.join("4242");
    fs::create_dir_all(&pid).unwrap();
    fs::write(pid.join("fd"), "").unwrap();
    fs::write(pid.join("comm"), "containerd-shim\n").unwrap();
    fs::write(pid.join("status"), "Name:\tcontainerd-shim\nUid:\t0\t0\t0\t0\n").unwrap();
    fs::write(proc.join("iomem"), "").unwrap();
    proc
}

#[test]
fn prepare_is_refused_naming_a_process_it_could_not_inspect() {
    let Some(m) = machine() else { return };
    let proc = unreadable_proc(m.sim.tmp.path());
    m.configure("watchdog_s = 1", Some(&proc), None);
    let r = m.hook("win11", "prepare", "begin", &fixture("win11.xml"));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("not handing GPU 0000:01:00.0 to win11: it could not be checked for holders"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("1 process could not be inspected even as root: pid 4242 (containerd-shim)"),
        "names what it could not check:\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("CAP_SYS_PTRACE"),
        "and the way out:\n{}",
        r.stderr
    );
    assert_eq!(
        m.sim.short_log(),
        vec![],
        "a refused start writes nothing to sysfs"
    );
    m.sim.assert_home();
    assert_eq!(m.record(), None);
    let st = m.state();
    assert_eq!(st["phase"], "host");
    assert!(
        st["last_refusal"]["message"]
            .as_str()
            .unwrap()
            .contains("pid 4242"),
        "{st}"
    );

    // Named in [host] uninspectable_ok, it no longer stops the start.
    let text = fs::read_to_string(&m.config).unwrap().replace(
        "uninspectable_ok = [",
        "uninspectable_ok = [\"containerd-shim\", ",
    );
    fs::write(&m.config, text).unwrap();
    let r = m.hook("win11", "prepare", "begin", &fixture("win11.xml"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    m.sim.assert_on_vfio();
    assert_eq!(m.hook("win11", "release", "end", &fixture("win11.xml")).code, 0);
    m.sim.assert_home();
}

#[test]
fn prepare_is_refused_when_no_device_node_of_the_gpu_is_found() {
    let Some(m) = machine() else { return };
    // `[host] dev` where the nodes are not, while a process holds the real nvidia0.
    let empty = m.sim.tmp.path().join("empty-dev");
    fs::create_dir(&empty).unwrap();
    m.configure("watchdog_s = 1", None, Some(&empty));
    let _holder = hold(&m.sim.dev("nvidia0"));
    let r = m.hook("win11", "prepare", "begin", &fixture("win11.xml"));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "no device nodes of GPU 0000:01:00.0 were found under {}",
            empty.display()
        )),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("[host] dev"), "{}", r.stderr);
    assert_eq!(m.sim.short_log(), vec![]);
    m.sim.assert_home();
    assert_eq!(m.record(), None);
}

// --- Durations that cannot be counted to. --------------------------------------------------

#[test]
fn a_watchdog_of_u64_max_is_a_config_error_and_nothing_is_written() {
    let Some(m) = machine() else { return };
    m.configure("watchdog_s = 18446744073709551615", None, None);
    let xml = fixture("win11.xml");
    let r = m.hook("win11", "prepare", "begin", &xml);
    assert_eq!(
        r.code, 1,
        "a start that cannot be made safely is refused: {}",
        r.stderr
    );
    let at = format!(
        "{}:4:14: [gpu] watchdog_s = 18446744073709551615 is too long",
        m.config.display()
    );
    assert!(
        r.stderr.contains(&at),
        "names the file, line, column and key:\n{}",
        r.stderr
    );
    m.assert_nothing_written("prepare with a broken watchdog");
    let r = m.hook("win11", "release", "end", &xml);
    assert_eq!(r.code, 0, "a release is never blocked: {}", r.stderr);
    assert!(r.stderr.contains(&at), "{}", r.stderr);
    m.assert_nothing_written("release with a broken watchdog");
}

// --- One handoff at a time. ----------------------------------------------------------------

/// `handoff hook --system-config CONFIG <domain> <op> <sub> -` as libvirtd runs it, with
/// `xml` on stdin, started (not waited for).
fn spawn_hook(config: &Path, domain: &str, op: &str, sub: &str, xml: &str) -> std::process::Child {
    hook_run::spawn(env!("CARGO_BIN_EXE_handoff"), config, domain, op, sub, xml)
}

#[test]
fn two_vms_started_at_once_get_the_gpu_one_at_most_and_the_other_is_told_which() {
    let Some(m) = machine() else { return };
    let win = fixture("win11.xml");
    let ai = fixture("linux-ai.xml");
    // Both at once, several times over: without a lock both used to succeed.
    for round in 0..4 {
        let a = spawn_hook(&m.config, "win11", "prepare", "begin", &win);
        let b = spawn_hook(&m.config, "linux-ai", "prepare", "begin", &ai);
        let (a, b) = (finish(a), finish(b));
        let (winner, loser, lost) = match (a.code, b.code) {
            (0, 1) => ("win11", "linux-ai", &b),
            (1, 0) => ("linux-ai", "win11", &a),
            _ => panic!(
                "round {round}: exactly one start must succeed:\nwin11 {}: {}\nlinux-ai {}: {}",
                a.code, a.stderr, b.code, b.stderr
            ),
        };
        assert!(
            lost.stderr.contains(&format!(
                "not handing GPU 0000:01:00.0 to {loser}: it is with {winner}"
            )),
            "round {round}: the refusal names the VM that has the GPU:\n{}",
            lost.stderr
        );
        m.sim.assert_on_vfio();
        let rec = m.record().unwrap();
        assert_eq!(
            (rec.phase, rec.vm.as_deref()),
            (Phase::Bound, Some(winner)),
            "round {round}"
        );
        assert_eq!(m.state()["vm"], winner, "round {round}");

        // libvirt releases the refused domain: the GPU stays with the winner.
        let xml_of = |vm: &str| if vm == "win11" { &win } else { &ai };
        let r = finish(spawn_hook(&m.config, loser, "release", "end", xml_of(loser)));
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(
            r.stderr.contains(&format!(
                "not returning GPU 0000:01:00.0 for {loser}: the restore record says it is with {winner}; nothing was changed"
            )),
            "{}",
            r.stderr
        );
        m.sim.assert_on_vfio();
        assert_eq!(m.record().unwrap().vm.as_deref(), Some(winner));

        let r = finish(spawn_hook(&m.config, winner, "release", "end", xml_of(winner)));
        assert_eq!(r.code, 0, "{}", r.stderr);
        m.sim.assert_home();
        assert_eq!(m.record(), None);
    }
}

#[test]
fn a_start_of_another_vm_is_refused_while_the_gpu_is_still_being_handed_to_the_first() {
    let Some(m) = machine() else { return };
    // What a prepare that died half-way (or one still running) leaves: a `binding` record.
    let host = m.sim.host();
    let g = handoff::gpu::read_gpu(&host, addr(GPU)).unwrap();
    RestoreRecord::new(&g, Some("win11")).save(&host).unwrap();
    let r = m.hook("linux-ai", "prepare", "begin", &fixture("linux-ai.xml"));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("not handing GPU 0000:01:00.0 to linux-ai: it is with win11"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("handoff rebind --force"),
        "the way out of a stale one: {}",
        r.stderr
    );
    assert_eq!(m.sim.short_log(), vec![]);
    m.sim.assert_home();
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
    let other = fuse_gpu::Holder(other);
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

/// The VFIO group node of the workstation's GPU (IOMMU group 13) under the mount's `/dev`.
fn vfio_group(m: &Machine) -> PathBuf {
    m.sim.dev("vfio/13")
}

#[test]
fn the_vfio_group_node_is_there_while_the_gpu_is_on_vfio_and_gone_once_it_is_home() {
    let Some(m) = machine() else { return };
    let xml = fixture("win11.xml");
    assert!(
        !vfio_group(&m).exists(),
        "no group node while the GPU is on its host drivers"
    );
    assert_eq!(m.hook("win11", "prepare", "begin", &xml).code, 0);
    assert!(vfio_group(&m).exists(), "vfio-pci bound: /dev/vfio/13 appears");
    assert!(
        m.sim.dev("vfio/vfio").exists(),
        "vfio is loaded: the container node"
    );
    let r = m.hook("win11", "release", "end", &xml);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    m.sim.assert_home();
    assert!(
        !vfio_group(&m).exists(),
        "gone with the last function leaving vfio-pci"
    );
}

#[test]
fn release_leaves_the_gpu_on_vfio_while_a_qemu_still_holds_its_group_and_names_it() {
    let Some(m) = machine() else { return };
    let xml = fixture("win11.xml");
    assert_eq!(m.hook("win11", "prepare", "begin", &xml).code, 0);
    let qemu = named_holder::hold_as_qemu(&vfio_group(&m), "win11", m.sim.tmp.path());
    m.sim.clear_log();
    let t0 = Instant::now();
    let r = m.hook("win11", "release", "end", &xml);
    let waited = t0.elapsed();
    // A release never blocks libvirt with an exit code; the words are for its log.
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        waited >= Duration::from_secs(1),
        "waited the 1 s watchdog for QEMU to exit: {waited:?}"
    );
    assert!(
        r.stderr.contains(
            "not returning GPU 0000:01:00.0 to the host: the QEMU of VM win11 still holds its VFIO group"
        ),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!("qemu-system-x86 (pid {}, user root", qemu.pid())),
        "names the process:\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("every function stays on vfio-pci"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("handoff rebind --force"),
        "says what to do:\n{}",
        r.stderr
    );
    assert_eq!(m.sim.short_log(), vec![], "nothing was written to sysfs");
    m.sim.assert_on_vfio();
    let record = m.record().unwrap();
    assert_eq!(record.phase, Phase::Stuck, "restore required");
    let problem = record.problem.unwrap();
    assert!(
        problem.contains(&format!("pid {}", qemu.pid())) && problem.contains("VFIO group"),
        "the record names the holder: {problem}"
    );
    let st = m.state();
    assert_eq!(st["phase"], "restore-required");
    assert!(
        st["last_error"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {}", qemu.pid())),
        "{st}"
    );
    // Once QEMU is gone, the restore brings the GPU home.
    drop(qemu);
    let host = m.sim.host();
    handoff::bind::return_to_host(&host, addr(GPU), "nvidia", Duration::from_secs(1), &mut |_| {}).unwrap();
    m.sim.assert_home();
    assert_eq!(m.record(), None);
}

#[test]
fn release_waits_for_a_qemu_that_exits_meanwhile_and_brings_the_gpu_home() {
    let Some(m) = machine() else { return };
    m.configure("watchdog_s = 5", None, None);
    let xml = fixture("win11.xml");
    assert_eq!(m.hook("win11", "prepare", "begin", &xml).code, 0);
    let qemu = named_holder::hold_as_qemu(&vfio_group(&m), "win11", m.sim.tmp.path());
    // QEMU's exit races libvirt's release: it goes 300 ms into the hook's wait.
    let exiting = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(qemu);
    });
    let t0 = Instant::now();
    let r = m.hook("win11", "release", "end", &xml);
    exiting.join().unwrap();
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "did not wait the whole watchdog"
    );
    m.sim.assert_home();
    assert_eq!(m.record(), None);
    assert_eq!(m.state()["phase"], "host");
}

#[test]
fn a_function_the_host_driver_refuses_goes_back_to_vfio_instead_of_staying_driverless() {
    let Some(m) = machine() else { return };
    let xml = fixture("win11.xml");
    assert_eq!(m.hook("win11", "prepare", "begin", &xml).code, 0);
    // The kernel refuses the audio function's host driver, as the real one did with only
    // the group and .0's device fd held: "probing a driver for 0000:01:00.1 failed".
    m.sim
        .mount
        .inject(FaultRule::fail(FileKind::DriversProbe, Errno::EINVAL).device(addr(AUDIO)));
    let r = m.hook("win11", "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("probing a driver for 0000:01:00.1 failed"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("0000:01:00.1 was put back on vfio-pci rather than left with no driver"),
        "{}",
        r.stderr
    );
    assert_eq!(
        m.sim.driver(AUDIO).as_deref(),
        Some("vfio-pci"),
        "never driverless"
    );
    assert_eq!(
        m.sim.driver(GPU).as_deref(),
        Some("vfio-pci"),
        ".0 not touched after .1 failed"
    );
    assert!(
        m.sim.drivers().iter().all(|(_, d)| d.is_some()),
        "{:?}",
        m.sim.drivers()
    );
    let record = m.record().unwrap();
    assert_eq!(record.phase, Phase::Stuck);
    assert!(
        record
            .problem
            .as_deref()
            .unwrap()
            .contains("put back on vfio-pci"),
        "{:?}",
        record.problem
    );
    assert_eq!(m.state()["phase"], "restore-required");
    // The fault was once: a restore now brings everything home.
    let host = m.sim.host();
    handoff::bind::return_to_host(&host, addr(GPU), "nvidia", Duration::from_secs(1), &mut |_| {}).unwrap();
    m.sim.assert_home();
}

/// The real kernel's DRM hot-unplug (docs/real-kernel.md, "a new card index"): a card held
/// through a handoff by a process the scan cannot see comes back under the next index, and
/// the surfaces follow `<dev>/drm/cardN` to find a holder of the new node.
#[test]
fn a_card_held_through_a_handoff_comes_back_as_card2_and_status_and_blockers_find_its_holder() {
    let Some(m) = machine() else { return };
    let xml = fixture("win11.xml");
    // card1 opened through another name of the same node (like the guest's own mknod of
    // 226:0): the scan matches nodes by path and inode name, so it does not see it.
    let hidden = m.sim.tmp.path().join("hidden-card");
    fs::hard_link(m.sim.dev("dri/card1"), &hidden).unwrap();
    let unseen = hold(&hidden);
    let r = m.hook("win11", "prepare", "begin", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    m.sim.assert_on_vfio();
    assert!(
        !m.sim.dev("dri/card1").exists(),
        "the card's node went with nvidia"
    );
    let r = m.hook("win11", "release", "end", &xml);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    m.sim.assert_home();
    let drm: Vec<String> = {
        let mut v: Vec<String> = fs::read_dir(m.sim.device(GPU).join("drm"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(drm, ["card2", "renderD129"], "card1's minor is still taken");

    let holder = hold(&m.sim.dev("dri/card2"));
    let cfg = handoff::config::Config::load_file(&m.config).unwrap();
    let status = handoff::status::collect(&cfg, &mut |vm| {
        handoff::status::VmStatus::new(vm, handoff::status::VmState::Shutoff, None)
    })
    .unwrap();
    let json = serde_json::to_value(&status).unwrap();
    let blockers = json["gpu"]["blockers"].as_array().unwrap();
    let b = blockers
        .iter()
        .find(|b| b["pid"] == holder.pid())
        .unwrap_or_else(|| panic!("status lists the holder of card2: {json}"));
    assert_eq!(b["paths"][0], m.sim.dev("dri/card2").display().to_string(), "{b}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_handoff"))
        .arg("blockers")
        .env("HANDOFF_CONFIG", &m.config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "blockers exits 1 while card2 is held:\n{text}"
    );
    assert!(
        text.contains(&format!("(pid {}", holder.pid())) && text.contains("dri/card2"),
        "{text}"
    );
    assert!(!text.contains(&format!("(pid {}", unseen.pid())), "{text}");
}
