//! The block under the real i3blocks 1.4 hears a process open and close the GPU's nodes
//! (issue 16): nothing else moves (no bind, no hook, no click), yet `--watch` and
//! `--signal-i3blocks` show "1 busy" after the open and "GPU: Linux" after the last close.
//! The nodes are `mknod`ed in a simulated tree; the job is a real process opening them.

use std::process::Command;
use std::time::{Duration, Instant};

use handoff::simulated_tree::{SimHost, SimSpec};
use handoff_test_support::block::{I3blocks, write_config};
use handoff_test_support::opener::Opener;
use handoff_test_support::process::Group;
use handoff_test_support::tools::have_all;

const BLOCK: &str = env!("CARGO_BIN_EXE_handoff-block");
const T: Duration = Duration::from_secs(10);

/// One i3blocks at a time (`--signal-i3blocks` signals every i3blocks of the user).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens, then closes, `nvidia0` and waits for the bar to follow each; prints how long it took.
fn open_then_close(bar: &mut I3blocks, sim: &SimHost, mode: &str) {
    let mut job = Opener::start(&sim.dev().join("nvidia0"), "cuda-training");
    let t = Instant::now();
    job.open();
    bar.wait_for("GPU: Linux · 1 busy", T);
    eprintln!("{mode}: open → bar: {:?}", t.elapsed());
    let t = Instant::now();
    job.close();
    let s = bar.wait_for("GPU: Linux", T);
    eprintln!("{mode}: close → bar: {:?}", t.elapsed());
    assert_eq!(s.color.as_deref(), Some("#00CC00"));
}

#[test]
fn a_persist_block_follows_opens_and_closes() {
    let _one = serial();
    if !have_all(&["i3blocks"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(&tmp.path().join("machine"), &SimSpec::workstation()).unwrap();
    let cfg = write_config(tmp.path(), &sim, "");
    let block = format!(
        "[handoff]\ninstance=gpu\ncommand={BLOCK} --watch --format i3blocks-json\ninterval=persist\nformat=json\n"
    );
    let mut bar = I3blocks::start(tmp.path(), &block, &[("HANDOFF_CONFIG", cfg.as_path())]);
    bar.wait_for("GPU: Linux", T);
    std::thread::sleep(Duration::from_millis(300)); // the watcher listens once the first line is out
    open_then_close(&mut bar, &sim, "--watch");
}

#[test]
fn a_signalled_one_shot_block_follows_opens_and_closes() {
    let _one = serial();
    if !have_all(&["i3blocks"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(&tmp.path().join("machine"), &SimSpec::workstation()).unwrap();
    let cfg = write_config(tmp.path(), &sim, "");
    // A high signal number no other i3blocks here is likely to use (i3blocks_peer has 27).
    let n = 26;
    let block = format!("[handoff]\ninstance=gpu\ncommand={BLOCK}\ninterval=once\nsignal={n}\n");
    let mut bar = I3blocks::start(tmp.path(), &block, &[("HANDOFF_CONFIG", cfg.as_path())]);
    bar.wait_for("GPU: Linux", T);
    let _signaller = Group::spawn(
        Command::new(BLOCK)
            .args(["--signal-i3blocks", &n.to_string()])
            .env("HANDOFF_CONFIG", &cfg),
    );
    std::thread::sleep(Duration::from_millis(300));
    open_then_close(&mut bar, &sim, "--signal-i3blocks");
}
