//! `--watch` as a bar runs it, against i3blocks 1.4 (a real bar reading a persist block):
//! it ends with its bar, stays up through a config error and recovers when the file is
//! fixed, refreshes on a click; and what a user who cannot see every process is shown.
//! The other bars (i3status-rust, waybar, polybar) are in `real_bars.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use handoff::simulated_tree::{SimHost, SimSpec};
use handoff_test_support::block::{I3blocks, Notifications, write_config};
use handoff_test_support::process::{Stragglers, alive, comm, descendants, holder};
use handoff_test_support::tools::{have_all, is_root, required};
use handoff_test_support::wait::wait_until;

const BLOCK: &str = env!("CARGO_BIN_EXE_handoff-block");

/// A persist block in the i3blocks-json format, the config given by `--config`.
fn persist_block(cfg: &Path) -> String {
    format!(
        "[handoff]\ninstance=gpu\ncommand={BLOCK} --watch --format i3blocks-json --config {}\nformat=json\ninterval=persist\n",
        cfg.display()
    )
}

/// The `handoff-block` i3blocks runs for the block.
fn block_pid(bar: i32) -> i32 {
    let mut found = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            found = descendants(bar).into_iter().find(|&p| comm(p) == "handoff-block");
            found.is_some()
        }),
        "i3blocks ({bar}) runs no handoff-block"
    );
    found.unwrap()
}

struct Scene {
    tmp: tempfile::TempDir,
    sim: SimHost,
    cfg: PathBuf,
}

fn scene() -> Option<Scene> {
    if !have_all(&["i3blocks"]) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
    let cfg = write_config(tmp.path(), &sim, "");
    Some(Scene { tmp, sim, cfg })
}

#[test]
fn a_streaming_block_ends_when_its_bar_is_killed() {
    let Some(s) = scene() else { return };
    let mut bar = I3blocks::start(s.tmp.path(), &persist_block(&s.cfg), &[]);
    bar.wait_for("GPU: Linux", Duration::from_secs(10));
    let block = block_pid(bar.pid());
    // Only the bar, as when it crashes or its session ends: not its process group.
    // SAFETY: the i3blocks this test started.
    unsafe { libc::kill(bar.pid(), libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(5), || !alive(block)),
        "handoff-block --watch ({block}) outlived its bar; it would wait for the next GPU change"
    );
}

#[test]
fn a_config_error_is_shown_with_its_file_until_the_file_is_fixed() {
    let Some(s) = scene() else { return };
    let good = std::fs::read_to_string(&s.cfg).unwrap();
    std::fs::write(&s.cfg, format!("{good}\n[gpu]\nwatchdog_s = 5\n")).unwrap();
    let mut bar = I3blocks::start(s.tmp.path(), &persist_block(&s.cfg), &[]);
    let lines = good.lines().count() + 2;
    let shown = bar.wait_for(
        &format!("GPU: config error · {}:{lines}", s.cfg.display()),
        Duration::from_secs(10),
    );
    assert_eq!(shown.color.as_deref(), Some("#FF0000"), "{shown:?}");
    let block = block_pid(bar.pid());

    // An editor's save: a new file renamed over the old one.
    let tmp = s.cfg.with_extension("toml.new");
    std::fs::write(&tmp, &good).unwrap();
    std::fs::rename(&tmp, &s.cfg).unwrap();
    let shown = bar.wait_for("GPU: Linux", Duration::from_secs(5));
    assert_eq!(shown.color.as_deref(), Some("#00CC00"));
    assert_eq!(
        block_pid(bar.pid()),
        block,
        "the same process recovered; i3blocks did not restart it"
    );

    // And a bad edit in place while it streams: shown, not an exit.
    std::fs::write(&s.cfg, good.replace("[gpu]", "[gpu\n")).unwrap();
    bar.wait_for(
        &format!("GPU: config error · {}:1", s.cfg.display()),
        Duration::from_secs(5),
    );
    assert!(alive(block));
    std::fs::write(&s.cfg, &good).unwrap();
    bar.wait_for("GPU: Linux", Duration::from_secs(5));
}

#[test]
fn a_click_refreshes_the_busy_count_of_a_streaming_block() {
    let Some(s) = scene() else { return };
    let mut bar = I3blocks::start(s.tmp.path(), &persist_block(&s.cfg), &[]);
    bar.wait_for("GPU: Linux", Duration::from_secs(10));
    // Nothing announces a process opening the GPU: the streaming block does not know.
    let _job = holder(&s.sim.dev().join("nvidia0"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(bar.last.as_ref().unwrap().full_text, "GPU: Linux");

    // A left click as i3status-rust, waybar and polybar run it: a second process.
    let mark = Stragglers(format!("click-{}", std::process::id()));
    let out = Command::new(BLOCK)
        .args(["--click", "left", "--format", "waybar", "--config"])
        .arg(&s.cfg)
        .env(Stragglers::VAR, &mark.0)
        .env("XDG_RUNTIME_DIR", s.tmp.path())
        .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = bar.wait_for("GPU: Linux · 1 busy", Duration::from_secs(5));
    assert_eq!(shown.color.as_deref(), Some("#FFAA00"));
}

#[test]
fn the_click_log_has_one_timed_line_per_entry() {
    let Some(s) = scene() else { return };
    let text = std::fs::read_to_string(&s.cfg).unwrap();
    std::fs::write(
        &s.cfg,
        format!("{text}\n[block]\nmiddle_click = [\"sh\", \"-c\", \"echo did-not-work >&2; exit 3\"]\n"),
    )
    .unwrap();
    let mark = Stragglers(format!("log-{}", std::process::id()));
    let log = s.tmp.path().join("handoff-block.log");
    for _ in 0..2 {
        let out = Command::new(BLOCK)
            .args(["--click", "middle", "--config"])
            .arg(&s.cfg)
            .env(Stragglers::VAR, &mark.0)
            .env("XDG_RUNTIME_DIR", s.tmp.path())
            // No notification daemon: notify-send's complaint is logged too.
            .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent")
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || {
            read().matches(": did-not-work\n").count() == 2 && read().matches("notify-send: ").count() >= 2
        }),
        "{}",
        read()
    );
    let all = read();
    assert!(all.ends_with('\n'), "{all:?}");
    for line in all.lines() {
        let (time, msg) = line.split_once(' ').unwrap();
        let digits: String = time.chars().filter(char::is_ascii_digit).collect();
        assert!(
            time.len() == 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T' && digits.len() == 14,
            "not an RFC 3339 UTC time: {line:?}"
        );
        assert!(!msg.is_empty(), "{line:?}");
    }
    assert!(
        all.lines()
            .any(|l| l.ends_with("sh -c echo did-not-work >&2; exit 3: did-not-work")),
        "{all}"
    );
}

/// `nobody` sees no other user's open files: as i3status-rust run by a normal user sees
/// the machine while a root process may hold the GPU.
#[test]
fn a_block_that_cannot_see_every_process_says_unseen_instead_of_free() {
    if !is_root() {
        required("running the block as another user needs root");
        return;
    }
    if !have_all(&["setpriv"]) {
        return;
    }
    let Some(s) = scene() else { return };
    // The simulated machine must be readable by nobody.
    for p in [s.tmp.path(), s.cfg.as_path()] {
        Command::new("chmod").arg("a+rX").arg(p).status().unwrap();
    }
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(s.tmp.path())
        .status()
        .unwrap();
    let run = |format: &str| -> String {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(BLOCK)
            .args(["--format", format, "--config"])
            .arg(&s.cfg)
            .env("HOME", "/nonexistent")
            .output()
            .unwrap();
        assert!(out.status.code().is_some_and(|c| c == 0 || c == 33), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let lines: Vec<String> = run("i3blocks").lines().map(str::to_owned).collect();
    assert_eq!(lines, ["GPU: Linux · ? unseen", "L·?", "#AAAAAA"]);
    let waybar: serde_json::Value = serde_json::from_str(&run("waybar")).unwrap();
    assert_eq!(waybar["class"], "unseen");
    let tooltip = waybar["tooltip"].as_str().unwrap();
    assert!(tooltip.contains("could not be inspected"), "{tooltip}");
    assert!(tooltip.contains("sudo handoff blockers"), "{tooltip}");
    assert!(!tooltip.contains("can take it"), "no claim it is free: {tooltip}");
    // As root the same machine is free, and says so.
    let out = Command::new(BLOCK).arg("--config").arg(&s.cfg).output().unwrap();
    let tip = Command::new(BLOCK)
        .args(["--format", "waybar", "--config"])
        .arg(&s.cfg)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().next(),
        Some("GPU: Linux"),
        "{}",
        String::from_utf8_lossy(&tip.stdout)
    );
}

#[test]
fn a_right_click_without_a_configured_vm_says_how_to_add_one() {
    let Some(s) = scene() else { return };
    let Some(n) = Notifications::start(s.tmp.path()) else {
        return;
    };
    let text = std::fs::read_to_string(&s.cfg)
        .unwrap()
        .replace("[[vm]]\nname = \"win11\"\nlabel = \"Windows\"\n", "");
    std::fs::write(&s.cfg, text).unwrap();
    let mark = Stragglers(format!("novm-{}", std::process::id()));
    let out = Command::new(BLOCK)
        .args(["--click", "right", "--config"])
        .arg(&s.cfg)
        .env(Stragglers::VAR, &mark.0)
        .env("XDG_RUNTIME_DIR", s.tmp.path())
        .env("DBUS_SESSION_BUS_ADDRESS", &n.address)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let seen = n.wait_for(&["No VM configured", "Add a [[vm]]"], Duration::from_secs(10));
    assert!(!seen.contains("win11"), "a VM nobody configured: {seen}");
}
