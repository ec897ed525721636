//! `handoff demo`: the scripted walkthrough runs to the end and shows the handoff; a
//! signal in the middle of the waiting demo leaves nothing behind. Needs root and
//! /dev/fuse (the simulated sysfs is a FUSE mount).
#![cfg(all(feature = "kernel-sim", feature = "libvirt"))]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn demo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_handoff"));
    c.arg("demo")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("HANDOFF_CONFIG")
        .stdin(Stdio::null());
    c
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z') && !r.starts_with('X'))
    })
}

/// The pids after "(pid " in the output: the demo's children.
fn pids(out: &str) -> Vec<u32> {
    out.match_indices("(pid ")
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
    for pid in ps {
        assert!(!alive(pid), "pid {pid} still runs\n{out}");
    }
}

#[test]
fn script_shows_refusal_vfio_and_return_and_cleans_up() {
    let started = Instant::now();
    let out = demo().arg("--script").output().expect("handoff demo --script");
    assert!(started.elapsed() < Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    let refused = text.find("refused:").expect("a refusal");
    assert!(text[refused..].contains("cuda-training (pid "), "{text}");
    let vfio = text
        .find("Windows is running; GPU 0000:01:00.0 on vfio-pci")
        .expect("on vfio");
    assert!(vfio > refused);
    let home = text
        .find("Windows stopped; GPU 0000:01:00.0 on Linux (nvidia)")
        .expect("back on nvidia");
    assert!(home > vfio);
    assert_gone(&text, &demo_dir(&text));
}

#[test]
fn sigterm_while_waiting_leaves_nothing_behind() {
    let mut child = demo().stdout(Stdio::piped()).spawn().expect("handoff demo");
    let mut stdout = child.stdout.take().unwrap();
    // Read until the demo says it waits.
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut all = Vec::new();
        let _ = stdout.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    });
    let until = Instant::now() + Duration::from_secs(30);
    let dir = loop {
        let dirs: Vec<PathBuf> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| *n == *format!("handoff-demo-{}", child.id()))
            })
            .collect();
        if let Some(d) = dirs.first()
            && d.join("config.toml").exists()
        {
            break d.clone();
        }
        assert!(Instant::now() < until, "the demo did not set up");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Wait for the status line (the holder is up by then).
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert!(text.contains("signal 15"), "{status:?}\n{text}");
    assert!(text.contains("cuda-training (pid "), "{text}");
    assert_gone(&text, &dir);
}
