//! `handoff demo` with a display, as the README's first command runs it on a desktop: the
//! demo's own simulated host (FUSE sysfs, libvirt's `test://` driver, a real
//! `cuda-training` process holding the GPU), the real `handoff-tray` in xfce4-panel's
//! systray on Xvfb, dunst for its notifications, and `handoff-block --watch`, whose lines
//! the demo prints in its terminal (here: its stdout, a file).
//!
//! A newcomer's clicks, over D-Bus the way the panel and dunst make them: Start Windows
//! (refused, the notification names cuda-training), "Terminate and start" in that
//! notification (cuda-training ends, the GPU goes to vfio-pci), Stop Windows (the GPU comes
//! home); then Ctrl-C (SIGINT), after which no process of the demo, no mount and no
//! directory may be left.
//!
//! The demo uses libvirt's test driver, not the system libvirtd: no libvirtd lock here.
//! Needs root and /dev/fuse (the demo mounts its sysfs). Screenshots go to
//! docs/screenshots/demo-*.png.
//!
//! Run with `cargo test -p handoff-tray --test demo_desktop`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use handoff::config::Config;
use handoff_test_support::bins::sibling;
use handoff_test_support::tools::required;
use handoff_test_support::tray::{Item, ItemView, Session, screenshots_dir, split_item};
use handoff_test_support::wait::wait_for;
use zbus::blocking::Connection;

const TRAY: &str = env!("CARGO_BIN_EXE_handoff-tray");
/// The machine is shared with other builds; these bound waits, they do not time anything.
const LONG: Duration = Duration::from_secs(30);

/// What the demo printed so far.
fn out(s: &Session) -> String {
    fs::read_to_string(s.dir.path().join("demo.out")).unwrap_or_default()
}

/// The number after `prefix` in `text`.
fn number_after(text: &str, prefix: &str) -> u32 {
    let i = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in\n{text}"))
        + prefix.len();
    let digits: String = text[i..].chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in\n{text}"))
}

/// The block's lines the demo printed (`  bar: …`), in order.
fn bar_lines(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.strip_prefix("  bar: ")).collect()
}

/// `/proc/<pid>/stat` fields after the command: state and process group. None: gone.
fn stat(pid: u32) -> Option<(char, u32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(") ")?;
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let pgrp = f.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// Live processes that belong to the demo: in the process group of its children, or
/// started with its config in their environment (whatever a child started, even in a
/// group of its own, inherits that).
fn leftovers(group: u32, config: &Path) -> Vec<String> {
    let needle = format!("HANDOFF_CONFIG={}", config.display());
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Some((state, pgrp)) = stat(pid) else {
                return false;
            };
            if state == 'Z' || state == 'X' {
                return false;
            }
            pgrp == group
                || fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == needle.as_bytes()))
        })
        .map(|pid| {
            let cmd = fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            format!("{pid} {}", cmd.replace('\0', " "))
        })
        .collect()
}

fn find_item(s: &Session, conn: &Connection) -> Item {
    let mut entry = None;
    wait_for(
        LONG,
        "the demo's tray to register with the panel's watcher",
        || {
            entry = s.registered(conn).into_iter().next();
            entry.is_some()
        },
    );
    let (dest, path) = split_item(&entry.unwrap());
    Item { dest, path }
}

fn wait_view(conn: &Connection, item: &Item, what: &str, f: impl Fn(&ItemView) -> bool) -> ItemView {
    let mut last = None;
    wait_for(LONG, what, || {
        let v = item.view(conn);
        let ok = f(&v);
        last = Some(v);
        ok
    });
    let v = last.unwrap();
    eprintln!(
        "  {what}: {} — {}",
        v.icon_name,
        v.tooltip_text.replace('\n', " / ")
    );
    v
}

/// The drivers of the demo GPU's functions, read from the demo's sysfs.
fn drivers(cfg: &Config) -> Vec<String> {
    handoff::gpu::read_gpu(&cfg.host, cfg.gpu.address)
        .unwrap()
        .functions
        .into_iter()
        .map(|f| f.driver.unwrap_or_default())
        .collect()
}

fn shot(s: &Session, name: &str) {
    // Let the panel and dunst draw what they were just told.
    std::thread::sleep(Duration::from_millis(400));
    s.screenshot(
        &screenshots_dir(s.dir.path()).join(format!("demo-{name}.png")),
        None,
    );
}

#[test]
fn demo_with_a_display_refuses_hands_over_brings_home_and_leaves_nothing_behind() {
    if !Path::new("/dev/fuse").exists() {
        required("/dev/fuse is missing: the demo's simulated sysfs needs FUSE");
        return;
    }
    let bin_dir = Path::new(TRAY).parent().unwrap();
    let handoff = sibling(bin_dir, "handoff", "handoff", &["src"]);
    sibling(
        bin_dir,
        "handoff-block",
        "handoff-block",
        &["src", "i3blocks/src"],
    );
    let Some(mut s) = Session::start(640, 300) else {
        return;
    };

    // `handoff demo` in the session, as from a terminal on that desktop.
    let mut c = Command::new(&handoff);
    c.arg("demo").env_remove("HANDOFF_CONFIG");
    let demo = s.spawn(&mut c, "demo");
    let demo_pid = demo.id();
    s.others.push(demo);
    wait_for(LONG, "the demo to start the tray and the block", || {
        out(&s).contains("bar: GPU:")
    });
    let text = out(&s);
    eprintln!("{text}");
    let dir = PathBuf::from(
        text.lines().next().unwrap()["handoff demo: a simulated workstation, in ".len()..]
            .split(' ')
            .next()
            .unwrap(),
    );
    assert!(dir.starts_with(std::env::temp_dir()), "{}", dir.display());
    let config = dir.join("config.toml");
    let cfg = Config::load_file(&config).unwrap();
    let holder = number_after(&text, "cuda-training (pid ");
    let tray = number_after(&text, "The tray (handoff-tray, pid ");
    let block = number_after(&text, "The bar block (handoff-block --watch, pid ");
    assert!(
        text.contains("simulated  the kernel's sysfs"),
        "it says what is simulated:\n{text}"
    );
    assert!(text.contains("simulated  libvirt"), "{text}");
    assert!(text.contains("Ctrl-C ends the demo"), "{text}");
    // Its children share one process group, the first child's (the holder's), so
    // whatever they start goes with them.
    let group = holder;
    for pid in [holder, tray, block] {
        assert_eq!(stat(pid).map(|(_, g)| g), Some(group), "pid {pid}");
    }
    assert_eq!(bar_lines(&text), ["GPU: Linux · 1 busy"], "{text}");

    // The panel shows the demo's tray: the GPU on Linux, busy.
    let conn = s.conn();
    let item = find_item(&s, &conn);
    assert!(
        item.dest.contains(&format!("-{tray}-")),
        "the registered item {} is the demo's tray (pid {tray})",
        item.dest
    );
    let v = wait_view(&conn, &item, "the busy icon", |v| v.icon_name == "handoff-busy");
    assert_eq!(v.title, "GPU on Linux (nvidia)");
    assert!(v.tooltip_text.contains("Windows (win11): shut off"), "{v:#?}");
    assert!(v.tooltip_text.contains("1 process uses the GPU"), "{v:#?}");

    // 1. Start Windows: refused, one notification naming cuda-training.
    let before = s.notifications().0.len();
    item.click(&conn, "Start Windows");
    wait_for(LONG, "the refusal's notification", || {
        s.notifications().0.len() > before
    });
    let (notes, raw) = s.notifications();
    let n = &notes[before];
    assert_eq!(n.summary, "Windows did not start: the GPU is busy", "{raw}");
    assert!(
        n.body.contains(&format!("cuda-training (pid {holder}, user ")),
        "the refusal names the demo's GPU user: {n:#?}"
    );
    assert!(n.actions.iter().any(|a| a == "Terminate and start"), "{n:#?}");
    assert!(alive(holder), "nothing was killed by the refusal");
    assert_eq!(
        drivers(&cfg),
        ["nvidia", "snd_hda_intel", "xhci_hcd", "nvidia-gpu"]
    );
    shot(&s, "refused");

    // 2. "Terminate and start", in dunst: cuda-training ends, the GPU goes to the VM.
    s.click_notification_action("Terminate and start");
    wait_for(LONG, "cuda-training to end", || !alive(holder));
    let v = wait_view(&conn, &item, "the VM icon", |v| {
        v.icon_name == "handoff-vm" && v.tooltip_text.contains("Windows (win11): running")
    });
    assert_eq!(v.title, "RTX 3090 Ti: Windows");
    assert!(v.tooltip_text.contains("No process uses the GPU"), "{v:#?}");
    assert!(
        drivers(&cfg).iter().all(|d| d == "vfio-pci"),
        "{:?}",
        drivers(&cfg)
    );
    wait_for(LONG, "the block's line for Windows", || {
        bar_lines(&out(&s)).last() == Some(&"GPU: Windows")
    });
    wait_for(LONG, "the started notification", || {
        s.notifications()
            .0
            .last()
            .is_some_and(|n| n.summary == "Windows is running")
    });
    let text = out(&s);
    assert!(
        text.contains(&format!(
            "cuda-training (pid {holder}) ended (signal: 15 (SIGTERM))"
        )),
        "the terminal says the GPU user ended:\n{text}"
    );
    shot(&s, "vm");

    // 3. Stop Windows: the GPU comes home.
    item.click(&conn, "Stop Windows");
    let v = wait_view(&conn, &item, "the host icon", |v| {
        v.icon_name == "handoff-host" && v.tooltip_text.contains("Windows (win11): shut off")
    });
    assert_eq!(v.title, "GPU on Linux (nvidia)");
    wait_for(LONG, "the block's line for Linux", || {
        bar_lines(&out(&s)).last() == Some(&"GPU: Linux")
    });
    assert_eq!(
        drivers(&cfg),
        ["nvidia", "snd_hda_intel", "xhci_hcd", "nvidia-gpu"]
    );
    let text = out(&s);
    let lines = bar_lines(&text);
    eprintln!("the block printed: {lines:?}");
    // Every change the block saw, in order; "switching…" may be missed when a handoff is
    // over before the block reads, never a state the GPU was not in. Between the
    // terminated holder and the start, "GPU: Linux" (nothing uses it) shows when the block
    // hears the holder exit before the hook begins.
    let mut want = ["GPU: Linux · 1 busy", "GPU: Windows", "GPU: Linux"]
        .into_iter()
        .peekable();
    for l in &lines {
        if want.peek() == Some(l) {
            want.next();
        } else if want.peek() == Some(&"GPU: Windows") && *l == "GPU: Linux" {
            // the holder ended; the start has not begun yet
        } else {
            assert_eq!(*l, "GPU: switching…", "an unexpected block line in {lines:?}");
        }
    }
    assert_eq!(want.next(), None, "the block's lines {lines:?}");

    // Ctrl-C: the demo ends everything it started and removes its files.
    // SAFETY: signalling the demo we started.
    unsafe { libc::kill(demo_pid as i32, libc::SIGINT) };
    let demo = s.others.last_mut().unwrap();
    let mut status = None;
    wait_for(LONG, "the demo to exit after SIGINT", || {
        status = demo.try_wait().unwrap();
        status.is_some()
    });
    let text = out(&s);
    assert_eq!(status.unwrap().code(), Some(130), "{text}\n{}", s.log("demo"));
    assert!(text.contains("signal 2: stopping"), "{text}");
    for pid in [holder, tray, block] {
        assert!(!alive(pid), "pid {pid} still runs");
    }
    let left = leftovers(group, &config);
    assert!(left.is_empty(), "processes of the demo left behind: {left:#?}");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*dir.to_string_lossy()),
        "a mount under {} left behind:\n{mounts}",
        dir.display()
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    let log = s.log("demo");
    assert!(
        !log.contains("still mounted") && !log.contains("did not end"),
        "{log}"
    );
}
