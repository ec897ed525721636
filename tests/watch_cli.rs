//! `handoff watch` hears a process open and close the GPU's nodes (issue 16): a line
//! "busy — <comm> (pid N)" after the open, "free" after the last close, with nothing else
//! moving. The nodes are `mknod`ed in a simulated tree; the job is a real process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff_test_support::opener::Opener;
use handoff_test_support::process::Group;

const BIN: &str = env!("CARGO_BIN_EXE_handoff");

#[test]
fn watch_prints_busy_on_an_open_and_free_on_the_last_close() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(&tmp.path().join("root"), &SimSpec::workstation()).unwrap();
    let config = tmp.path().join("config.toml");
    // No VM: `watch` listens to the kernel, the run dir and the nodes only. The processes
    // root cannot inspect here (PID 1 of a container) are passed over, so "free" is free.
    std::fs::write(
        &config,
        format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n\
             [host]\nsysfs = \"{}\"\nproc = \"/proc\"\ndev = \"{}\"\nrun = \"{}\"\nuninspectable_ok = {:?}\n",
            sim.sysfs().display(),
            sim.dev().display(),
            sim.run().display(),
            handoff::holders::uninspectable_now(Path::new("/proc"))
        ),
    )
    .unwrap();
    let mut watch = Group::spawn(
        Command::new(BIN)
            .arg("watch")
            .env("HANDOFF_CONFIG", &config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let (tx, rx) = mpsc::channel();
    let out = watch.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // `watch` prints nothing at start: give it a moment to be listening.
    std::thread::sleep(Duration::from_millis(500));
    let next_holders = || loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a line from handoff watch within 10 s");
        if line.starts_with("busy") || line.starts_with("free") {
            return line;
        }
    };

    let mut job = Opener::start(&sim.dev().join("nvidia0"), "cuda-training");
    let t = Instant::now();
    job.open();
    let line = next_holders();
    eprintln!("open → line: {:?}", t.elapsed());
    assert_eq!(line, format!("busy — cuda-training (pid {})", job.pid()));
    let t = Instant::now();
    job.close();
    let line = next_holders();
    eprintln!("close → line: {:?}", t.elapsed());
    assert_eq!(line, "free");
}
