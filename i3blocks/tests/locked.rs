//! The block answers in time while nvidia's unbind of the GPU is stuck in the kernel,
//! holding the device lock that reading `driver_override` needs (the simulated kernel's
//! FUSE mount blocks that read like a real kernel before 7.1).
//!
//! Needs root and `/dev/fuse`. Under `CI=true` a missing `/dev/fuse` fails; elsewhere the
//! test skips, saying why.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff_kernelsim::fuse::SimMount;
use handoff_kernelsim::{Errno, FaultRule, FileKind, Release};
use handoff_test_support::fuse_gpu;

const GPU: &str = "0000:01:00.0";

/// Releases the hung unbind and reaps every child, even when an assertion fails; the
/// mount (and then its directory) drops after.
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

#[test]
fn the_block_answers_in_time_and_says_stuck_while_an_unbind_hangs() {
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

    let started = Instant::now();
    let block = Command::new(env!("CARGO_BIN_EXE_handoff-block"))
        .env("HANDOFF_CONFIG", &cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    guard.children.push(block);
    let exited = loop {
        if guard.children[1].try_wait().unwrap().is_some() {
            break true;
        }
        if started.elapsed() > Duration::from_secs(10) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    assert!(exited, "handoff-block hung behind the stuck unbind");
    let out = guard.children.remove(1).wait_with_output().unwrap();
    assert!(took < Duration::from_secs(3), "handoff-block took {took:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["GPU: stuck!", "GPU!", "#FF0000"], "{stderr}");
    assert!(stderr.contains("the device is locked"), "{stderr}");
}
