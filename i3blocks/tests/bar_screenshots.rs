//! The block on a real bar: i3 + i3bar under Xvfb, i3blocks 1.4 as i3bar's
//! `status_command` running `handoff-block` against a simulated GPU. For each state the
//! test waits for i3blocks to print the line, lets i3bar draw it, screenshots the bar
//! (`import -window root`, cropped to the status area) and checks the block's colour is in
//! the picture.
//!
//! The pictures in `docs/screenshots/bar-*.png` come from this test:
//!
//! ```sh
//! HANDOFF_SCREENSHOTS=docs/screenshots cargo test -p handoff-block --test bar_screenshots
//! ```
//!
//! (a relative path is taken from the workspace root). Without `HANDOFF_SCREENSHOTS` they
//! go to a temp dir and are thrown away. Under `CI=true` a missing tool fails the test.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff::state::{HookPhase, HookState};
use handoff_test_support::block::write_config;
use handoff_test_support::process::{Group, Stragglers, holder};
use handoff_test_support::screenshot::{colours, i3bar_size as bar_size, out_dir, pixels_of};
use handoff_test_support::tools::have_all;
use handoff_test_support::wait::wait_until;
use handoff_test_support::xvfb;

/// The block under test.
const BLOCK: &str = env!("CARGO_BIN_EXE_handoff-block");

const T: Duration = Duration::from_secs(10);
/// The block's `signal=`: the test sends SIGRTMIN+SIGNAL to its own i3blocks only.
const SIGNAL: i32 = 10;
/// Width of the picture: the right end of the bar, where i3bar puts the status line.
const CROP_W: u32 = 300;

fn to_vfio(sim: &SimHost) {
    for f in 0..4 {
        sim.set_driver(RTX_3090_TI.with_function(f), Some("vfio-pci"))
            .unwrap();
    }
    hook_state(sim, HookPhase::Vfio);
}

fn hook_state(sim: &SimHost, phase: HookPhase) {
    let mut s = HookState::new(RTX_3090_TI);
    s.phase = phase;
    s.vm = Some("win11".into());
    s.save(&sim.host()).unwrap();
}

/// `import` of the right end of the bar into `png`, metadata stripped so the file only
/// changes when the picture does.
fn screenshot(display: &str, bar: (u32, u32), png: &Path) {
    let w = CROP_W.min(bar.0);
    let ok = Command::new("import")
        .args(["-window", "root", "-crop"])
        .arg(format!("{w}x{}+{}+0", bar.1, bar.0 - w))
        .args(["+repage", "-strip", "-define", "png:exclude-chunks=date,time"])
        .arg(png)
        .env("DISPLAY", display)
        .stderr(Stdio::inherit())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "import failed for {}", png.display());
}

#[test]
fn i3bar_shows_each_state_and_the_screenshots_have_its_colours() {
    if !have_all(&["i3", "i3bar", "i3blocks", "Xvfb", "import", "convert", "xwininfo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sim = SimHost::build(&dir.join("machine"), &SimSpec::workstation()).unwrap();
    let cfg = write_config(dir, &sim, "");
    let out = out_dir(dir);

    // A clock-like static block on the left gives the picture the bar's usual context.
    let blocks = dir.join("blocks.conf");
    fs::write(
        &blocks,
        format!(
            "[clock]\nfull_text=Sat 22:30\n\n\
             [handoff]\ninstance=gpu\ncommand={BLOCK}\ninterval=once\nsignal={SIGNAL}\n"
        ),
    )
    .unwrap();
    let status_log = dir.join("status.log");
    let i3conf = dir.join("i3.conf");
    fs::write(
        &i3conf,
        format!(
            "# i3 config file (v4)\nfont pango:DejaVu Sans Mono 12\nipc-socket {}\n\
             bar {{\n  position top\n  tray_output none\n  workspace_buttons no\n  \
             status_command i3blocks -c {} | tee -a {}\n}}\n",
            dir.join("i3.sock").display(),
            blocks.display(),
            status_log.display()
        ),
    )
    .unwrap();

    let (x, display) = xvfb::start(dir, "800x120x24");
    let _x = Group(x);
    let mark = Stragglers(dir.display().to_string());
    // i3 double-forks i3bar into a session of its own: the mark finds it, its shell,
    // i3blocks and the blocks.
    let _i3 = Group::spawn(
        Command::new("i3")
            .arg("-c")
            .arg(&i3conf)
            .env("DISPLAY", &display)
            .env("HANDOFF_CONFIG", &cfg)
            .env(Stragglers::VAR, &mark.0)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("i3.log")).unwrap()),
    );
    let i3blocks_pid = || {
        mark.pids()
            .into_iter()
            .find(|p| fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "i3blocks"))
    };
    assert!(
        wait_until(T, || i3blocks_pid().is_some()),
        "i3bar did not start i3blocks; i3 log:\n{}",
        fs::read_to_string(dir.join("i3.log")).unwrap_or_default()
    );
    let mut bar = None;
    assert!(
        wait_until(T, || {
            bar = bar_size(&display);
            bar.is_some()
        }),
        "no i3bar window"
    );
    let bar = bar.unwrap();

    let mut job = None;
    let states: [(&str, &str, &str, &dyn Fn()); 5] = [
        ("linux", "GPU: Linux", "#00CC00", &|| {}),
        ("busy", "GPU: Linux · 1 busy", "#FFAA00", &|| {}),
        ("windows", "GPU: Windows", "#00AAFF", &|| to_vfio(&sim)),
        ("switching", "GPU: switching…", "#FFDD00", &|| {
            hook_state(&sim, HookPhase::Binding)
        }),
        // Urgent: i3bar draws it white on its urgent red.
        ("restore", "GPU: restore!", "#900000", &|| {
            hook_state(&sim, HookPhase::RestoreRequired)
        }),
    ];
    let mut sizes = Vec::new();
    for (name, text, colour, set) in states {
        match name {
            "busy" => job = Some(holder(&sim.dev().join("nvidia0"))),
            "windows" => drop(job.take()),
            _ => {}
        }
        set();
        let seen_before = fs::read_to_string(&status_log).unwrap_or_default().len();
        if name != "linux" {
            let pid = i3blocks_pid().expect("i3blocks went away");
            // SAFETY: this test's own i3blocks (found by its mark).
            unsafe { libc::kill(pid, libc::SIGRTMIN() + SIGNAL) };
        }
        let want = format!("\"full_text\":\"{text}\"");
        assert!(
            wait_until(T, || fs::read_to_string(&status_log).is_ok_and(|s| s
                .get(seen_before..)
                .is_some_and(|new| new.contains(&want))
                || (name == "linux" && s.contains(&want)))),
            "i3blocks never printed {want}; its output:\n{}",
            fs::read_to_string(&status_log).unwrap_or_default()
        );
        // i3bar reads the line and redraws: give it a moment.
        std::thread::sleep(Duration::from_millis(400));
        let png = out.join(format!("bar-{name}.png"));
        screenshot(&display, bar, &png);
        let h = colours(&png);
        let n = pixels_of(&h, colour);
        eprintln!(
            "{}: {text:?}, {n} px of {colour}, {} bytes",
            png.display(),
            fs::metadata(&png).unwrap().len()
        );
        assert!(n >= 20, "{name}: {colour} is not in the picture:\n{h}");
        sizes.push(fs::metadata(&png).unwrap().len());
    }
    assert!(
        sizes.iter().all(|&s| s < 20_000),
        "screenshots should be small: {sizes:?}"
    );
}
