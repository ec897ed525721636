//! `handoff demo` without a display: the scripted walkthrough runs to the end and shows
//! the handoff; the waiting demo prints the bar block's line, and a signal then leaves
//! nothing behind. Needs root and /dev/fuse (the simulated sysfs is a FUSE mount). The
//! demo with a display is tested in applet/tests/demo_desktop.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn demo() -> Command {
    let mut c = Command::new(handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff")));
    c.arg("demo")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("HANDOFF_CONFIG")
        .stdin(Stdio::null());
    c
}

/// `/proc/<pid>/stat` fields after the command: state and process group. None: gone.
fn stat(pid: u32) -> Option<(char, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(") ")?;
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let pgrp = f.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// The pids the demo printed ("cuda-training (pid N)", "handoff-block --watch, pid N"): its
/// children.
fn pids(out: &str) -> Vec<u32> {
    out.match_indices("pid ")
        .filter_map(|(i, m)| {
            let rest = &out[i + m.len()..];
            rest[..rest.find(|c: char| !c.is_ascii_digit())?].parse().ok()
        })
        .collect()
}

fn demo_dir(out: &str) -> PathBuf {
    let line = out.lines().next().expect("a first line");
    let start = line.find("/").expect("a path");
    let end = line[start..].find(' ').map_or(line.len(), |e| start + e);
    PathBuf::from(&line[start..end])
}

fn assert_gone(out: &str, dir: &Path) {
    assert!(dir.starts_with(std::env::temp_dir()), "{}", dir.display());
    assert!(!dir.exists(), "{} left behind\n{out}", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*dir.to_string_lossy()),
        "a mount under {} left behind:\n{mounts}",
        dir.display()
    );
    let ps = pids(out);
    assert!(!ps.is_empty(), "no pids in\n{out}");
    for pid in &ps {
        assert!(!alive(*pid), "pid {pid} still runs\n{out}");
    }
    // The children's process group (the first child's: the GPU user's) is empty, so
    // nothing they started is left either.
    let group = ps[0];
    let left: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&pid| stat(pid).is_some_and(|(st, g)| g == group && st != 'Z' && st != 'X'))
        .collect();
    assert!(
        left.is_empty(),
        "processes of group {group} left: {left:?}\n{out}"
    );
}

/// Runs `cmd` to the end, its output captured; a demo that has not ended after `limit`
/// is hung: it gets SIGTERM (it cleans up on it) and the test fails with what it printed.
fn bounded(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("handoff demo");
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for handoff demo"),
        Err(_) => {
            // SAFETY: kill on our child's pid, which has not been reaped (no output yet).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let out = rx.recv().unwrap().unwrap();
            panic!(
                "handoff demo did not end within {limit:?}:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn script_shows_refusal_vfio_and_return_and_cleans_up() {
    let out = bounded(demo().arg("--script"), Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    // First, what `handoff setup --dry-run` finds on the simulated machine and would write:
    // the RTX with win11, and not the iGPU, which shows the console.
    let setup = text
        .find("== What `handoff setup --dry-run` finds on this machine")
        .expect("setup's dry run");
    for says in [
        "  [[gpu]]\n  address = \"0000:01:00.0\"",
        "  name = \"win11\"\n  label = \"Windows\"",
        "# Not handed: ",
        "(dry run: nothing was written)",
    ] {
        assert!(
            text[setup..].contains(says),
            "setup --dry-run should show {says:?}:\n{text}\n{err}"
        );
    }
    let refused = text.find("refused:").expect("a refusal");
    assert!(refused > setup);
    assert!(text[refused..].contains("cuda-training (pid "), "{text}");
    let vfio = text
        .find("Windows is running; GPU 0000:01:00.0 on vfio-pci")
        .expect("on vfio");
    assert!(vfio > refused);
    // Several GPUs: macOS takes the iGPU while Windows keeps the RTX, and gives it back.
    let mac = text
        .find("macOS is running; GPU 0000:00:02.0 on vfio-pci")
        .expect("macOS on the iGPU");
    assert!(mac > vfio);
    let mac_home = text
        .find("macOS stopped; GPU 0000:00:02.0 on Linux (i915)")
        .expect("the iGPU back on i915");
    assert!(mac_home > mac);
    let home = text
        .find("Windows stopped; GPU 0000:01:00.0 on Linux (nvidia)")
        .expect("back on nvidia");
    assert!(home > vfio);
    assert_gone(&text, &demo_dir(&text));
}

#[test]
fn waiting_demo_prints_the_block_and_sigterm_leaves_nothing_behind() {
    let dir = Path::new(handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff")))
        .parent()
        .unwrap();
    handoff_test_support::bins::sibling(dir, "handoff-block", "handoff-block", &["src", "i3blocks/src"]);
    let mut child = demo().stdout(Stdio::piped()).spawn().expect("handoff demo");
    let rx = handoff_test_support::process::stdout_lines(&mut child, Some);
    // Wait for the block's first line: by then the GPU user holds the GPU and the block
    // has read it.
    let mut text = String::new();
    let until = Instant::now() + Duration::from_secs(30);
    while !text.contains("  bar: ") {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                text.push_str(&line);
                text.push('\n');
            }
            Err(e) => panic!("no line from the block ({e}):\n{text}"),
        }
    }
    assert!(text.contains("No tray here (no display)"), "{text}");
    assert!(
        text.contains("The bar block (handoff-block --watch, pid "),
        "{text}"
    );
    assert!(text.contains("\n  bar: GPU: Linux · 1 busy\n"), "{text}");
    let dir = demo_dir(&text);
    // SAFETY: kill on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    // Until its stdout closes: what the demo printed as it ended.
    text.extend(rx.iter().map(|l| l + "\n"));
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(text.contains("signal 15"), "{status:?}\n{text}");
    assert!(text.contains("cuda-training (pid "), "{text}");
    assert_gone(&text, &dir);
}
