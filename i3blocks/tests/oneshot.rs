//! The one-shot i3blocks output against a simulated GPU and a real holder process.

use std::path::Path;
use std::process::{Command, Stdio};

use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};

fn config(dir: &Path, sim: &SimHost) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "[gpu]\naddress = \"0000:01:00.0\"\n\n[[vm]]\nname = \"win11\"\nlabel = \"Windows\"\n\n\
         [host]\nsysfs = {:?}\ndev = {:?}\nrun = {:?}\n{}",
        sim.sysfs(),
        sim.dev(),
        sim.run(),
        handoff_test_support::block::uninspectable_ok_line()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn block(cfg: &Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_handoff-block"))
        .env("HANDOFF_CONFIG", cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn shows_linux_then_busy_then_the_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
    let cfg = config(tmp.path(), &sim);
    assert_eq!(block(&cfg), ["GPU: Linux", "L", "#00CC00"]);

    let node = std::fs::File::open(sim.dev().join("nvidia0")).unwrap();
    let holder = Child(
        Command::new("sleep")
            .arg("600")
            .stdin(Stdio::from(node))
            .spawn()
            .unwrap(),
    );
    // The child holds the node once it exists; spawn() returns after exec.
    assert_eq!(block(&cfg), ["GPU: Linux · 1 busy", "L·1", "#FFAA00"]);
    drop(holder);
    assert_eq!(block(&cfg)[0], "GPU: Linux");

    for f in 0..4 {
        sim.set_driver(RTX_3090_TI.with_function(f), Some("vfio-pci"))
            .unwrap();
    }
    let mut state = handoff::state::HookState::new(RTX_3090_TI);
    state.phase = handoff::state::HookPhase::Vfio;
    state.vm = Some("win11".into());
    state.save(&sim.host()).unwrap();
    assert_eq!(block(&cfg), ["GPU: Windows", "W", "#00AAFF"]);

    sim.set_driver(RTX_3090_TI, Some("nvidia")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_handoff-block"))
        .env("HANDOFF_CONFIG", &cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(33), "split is urgent");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("GPU: split!"));
}

#[test]
fn says_none_without_a_gpu_and_explains_a_broken_config() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.toml");
    std::fs::write(&cfg, format!("[host]\nsysfs = {:?}\n", tmp.path())).unwrap();
    assert_eq!(block(&cfg)[0], "GPU: none");

    std::fs::write(&cfg, "[gpu]\naddres = \"0000:01:00.0\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_handoff-block"))
        .env("HANDOFF_CONFIG", &cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(33));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("GPU: config error"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.toml:2:1") && err.contains("addres"), "{err}");
}

/// `--watch` hears a holder exit: nothing else moves when a CUDA job ends (no uevent, no
/// hook), so without the pidfd watch "1 busy" would stay until the next GPU change.
#[test]
fn watch_drops_busy_when_the_holder_exits() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;

    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
    let cfg = config(tmp.path(), &sim);
    let node = std::fs::File::open(sim.dev().join("nvidia0")).unwrap();
    let mut holder = Child(
        Command::new("sleep")
            .arg("600")
            .stdin(Stdio::from(node))
            .spawn()
            .unwrap(),
    );
    let mut watch = Child(
        Command::new(env!("CARGO_BIN_EXE_handoff-block"))
            .arg("--watch")
            .env("HANDOFF_CONFIG", &cfg)
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let out = watch.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let wait = std::time::Duration::from_secs(10);
    let first = rx.recv_timeout(wait).expect("a first line");
    assert_eq!(first, "GPU: Linux · 1 busy");

    // End the holder the way a finished job ends; reap it, as its parent would.
    holder.0.kill().unwrap();
    holder.0.wait().unwrap();
    let next = rx.recv_timeout(wait).expect("a line after the holder exited");
    assert_eq!(next, "GPU: Linux");
}
