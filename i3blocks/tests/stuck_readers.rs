//! While nvidia's unbind of the GPU is stuck in the kernel, reading its `driver_override`
//! blocks (the simulated kernel's FUSE mount blocks that read like a real kernel before
//! 7.1). The block is a new process every i3blocks refresh; each one used to leave its own
//! reader stuck on that file. Now the first stuck reader is noted under the user's runtime
//! directory and the runs after it don't start another.
//!
//! Needs root and `/dev/fuse`. Under `CI=true` a missing `/dev/fuse` fails; elsewhere the
//! test skips, saying why.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff_kernelsim::fuse::SimMount;
use handoff_kernelsim::{Errno, FaultRule, FileKind, Release};
use handoff_test_support::fuse_gpu;

const GPU: &str = "0000:01:00.0";
const BLOCK: &str = env!("CARGO_BIN_EXE_handoff-block");

/// Releases the hung unbind and reaps the unbinding shell, even when an assertion fails;
/// the mount (and then its directory) drops after. Releasing the hang lets every stuck
/// reader's read return, so they exit.
struct Guard<'a> {
    mount: &'a SimMount,
    children: Vec<Child>,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.mount.release(Release::Fail(Errno::EIO));
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Live processes running this build's `handoff-block`: the stuck readers a one-shot run
/// left behind (forks of it, reparented once it exited). Zombies don't count: their read
/// is over.
fn block_processes() -> Vec<u32> {
    let me = PathBuf::from(BLOCK).canonicalize().unwrap();
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if fs::read_link(e.path().join("exe")).ok().as_deref() != Some(me.as_path()) {
            continue;
        }
        let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_owned));
        if state.is_some_and(|s| s != "Z" && s != "X") {
            out.push(pid);
        }
    }
    out
}

#[test]
fn one_shot_runs_during_a_hung_unbind_leave_one_stuck_reader_not_one_each() {
    assert_eq!(
        block_processes(),
        Vec::<u32>::new(),
        "no handoff-block left from before"
    );
    let Some(sim) = fuse_gpu::workstation() else {
        return;
    };
    let (mount, tmp, sys) = (&sim.mount, &sim.tmp, sim.sys().to_owned());
    let mut guard = Guard {
        mount,
        children: Vec::new(),
    };
    let host = mount.host();
    let cfg = tmp.path().join("config.toml");
    fs::write(
        &cfg,
        format!(
            "[gpu]\naddress = \"{GPU}\"\n\n[host]\nsysfs = {:?}\ndev = {:?}\nrun = {:?}\n",
            host.sysfs, host.dev, host.run
        ),
    )
    .unwrap();
    // The user's runtime directory, where the runs note a stuck reader for each other.
    let runtime = tmp.path().join("xdg-runtime");
    fs::create_dir(&runtime).unwrap();

    mount.inject(
        FaultRule::hang(FileKind::Unbind)
            .device(GPU.parse().unwrap())
            .driver("nvidia"),
    );
    guard.children.push(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo {GPU} > {}/bus/pci/drivers/nvidia/unbind",
                sys.display()
            ))
            .spawn()
            .unwrap(),
    );
    assert!(
        mount.wait_for_hung(1, Duration::from_secs(5)),
        "the unbind never arrived"
    );

    const RUNS: usize = 5;
    for run in 0..RUNS {
        let started = Instant::now();
        let out = Command::new(BLOCK)
            .env("HANDOFF_CONFIG", &cfg)
            .env("XDG_RUNTIME_DIR", &runtime)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.lines().next(),
            Some("GPU: stuck!"),
            "run {run} still says what is going on: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "run {run} took {:?}",
            started.elapsed()
        );
    }
    let stuck = block_processes();
    assert_eq!(
        stuck.len(),
        1,
        "{RUNS} refreshes during the hang left these readers stuck: {stuck:?}"
    );
    drop(guard);
    // Once the unbind has failed, the stuck reader's read returns and it exits.
    let until = Instant::now() + Duration::from_secs(5);
    while !block_processes().is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        block_processes(),
        Vec::<u32>::new(),
        "the stuck reader ended with the hang"
    );
}
