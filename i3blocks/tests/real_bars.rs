//! The block under the other bars people run, each the real program with the config
//! docs/bar.md gives for it, word for word (the snippets are read from the doc): waybar on
//! a headless sway, polybar on Xvfb, i3status-rust over its i3bar protocol and on i3bar.
//! Each test changes the simulated GPU, waits for the bar to show it, screenshots the bar
//! and checks the state's colour is in the picture; where the bar can be clicked here, a
//! click's effect is checked too.
//!
//! The pictures in `docs/screenshots/{waybar,polybar,i3status-rust}-*.png` come from these
//! tests (`scripts/refresh-screenshots.sh`); without `HANDOFF_SCREENSHOTS` they go to a
//! temp dir.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff::state::{HookPhase, HookState};
use handoff_test_support::block::{Notifications, write_config};
use handoff_test_support::process::{Group, Stragglers, alive, comm, descendants, holder, holder_unheard};
use handoff_test_support::screenshot::{self, colours, crop, out_dir, pixels_of};
use handoff_test_support::sway::{self, Sway};
use handoff_test_support::tools::{have_all, required};
use handoff_test_support::wait::wait_until;
use handoff_test_support::xvfb;

const BLOCK: &str = env!("CARGO_BIN_EXE_handoff-block");
const T: Duration = Duration::from_secs(15);

/// docs/bar.md, where the bars' configs are.
fn doc() -> String {
    fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/bar.md")).unwrap()
}

/// The fenced block of `lang` that follows the heading `## <heading>` and contains `has`.
fn snippet(heading: &str, lang: &str, has: &str) -> String {
    let doc = doc();
    let start = doc
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("docs/bar.md has no section {heading}"));
    let section = &doc[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    // Every other piece between fences is a code block; its first line is its language.
    section
        .split("```")
        .skip(1)
        .step_by(2)
        .filter_map(|block| {
            let (l, body) = block.split_once('\n')?;
            (l.trim() == lang && body.contains(has)).then(|| body.to_owned())
        })
        .next()
        .unwrap_or_else(|| panic!("docs/bar.md, {heading}: no ```{lang} block with {has:?}"))
}

/// The doc's snippet with the installed names swapped for this build's.
fn as_built(s: &str, cfg: &Path) -> String {
    s.replace("handoff-block ", &format!("{BLOCK} --config {} ", cfg.display()))
}

fn hook_state(sim: &SimHost, phase: HookPhase) {
    let mut s = HookState::new(RTX_3090_TI);
    s.phase = phase;
    s.vm = Some("win11".into());
    s.save(&sim.host()).unwrap();
}

fn to_vfio(sim: &SimHost) {
    for f in 0..4 {
        sim.set_driver(RTX_3090_TI.with_function(f), Some("vfio-pci"))
            .unwrap();
    }
    hook_state(sim, HookPhase::Vfio);
}

fn to_host(sim: &SimHost) {
    // The workstation's host drivers (handoff::simulated_tree::SimSpec::workstation).
    for (f, driver) in ["nvidia", "snd_hda_intel", "xhci_hcd", "nvidia-gpu"]
        .into_iter()
        .enumerate()
    {
        sim.set_driver(RTX_3090_TI.with_function(f as u8), Some(driver))
            .unwrap();
    }
    let _ = fs::remove_file(sim.run().join("state.json"));
}

/// Waits until a screenshot taken by `shoot` has at least `min` pixels of `colour`; returns
/// the histogram of the last one.
fn wait_for_colour(what: &str, png: &Path, colour: &str, min: u64, mut shoot: impl FnMut(&Path)) -> String {
    let deadline = Instant::now() + T;
    loop {
        shoot(png);
        let h = colours(png);
        let n = pixels_of(&h, colour);
        if n >= min {
            eprintln!("{}: {what}, {n} px of {colour}", png.display());
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {colour} is not in {} within {T:?}:\n{h}",
            png.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// waybar 0.9.17 on sway 1.7 (headless), started the way the doc says (`exec waybar` in the
/// sway config), its module and CSS from the doc. It runs as sway's user, not root, so
/// the block sees only that user's processes: the idle GPU is "? unseen", a holder of that
/// user's is "busy" once a left click on the block refreshes it (nothing announces a process
/// opening the GPU). The click is a real one: wayvnc gives the headless seat a virtual
/// pointer and sway's `seat - cursor` moves and presses it ([`Sway::pointer`]).
#[test]
fn waybar_on_sway_shows_each_state_in_its_class_colour_and_a_left_click_refreshes() {
    if !have_all(&["waybar", "sway", "grim", "convert", "wayvnc"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sim = SimHost::build(&dir.join("machine"), &SimSpec::workstation()).unwrap();
    let cfg = write_config(dir, &sim, "");
    let out = out_dir(dir);

    let module = snippet("waybar", "json", "\"custom/handoff\"");
    let css = snippet("waybar", "css", "#custom-handoff");
    let waybar_json = format!(
        "{{\n\"layer\": \"top\",\n\"position\": \"top\",\n\"height\": 26,\n\
         \"modules-left\": [\"clock\"],\n\"modules-right\": [\"custom/handoff\"],\n\
         \"clock\": {{\"format\": \"Sat 22:30\"}},\n{}\n}}\n",
        as_built(&module, &cfg)
    );
    fs::write(dir.join("waybar.json"), &waybar_json).unwrap();
    fs::write(
        dir.join("waybar.css"),
        format!("* {{ font-family: DejaVu Sans; font-size: 14px; }}\nwindow#waybar {{ background: #222222; color: #dddddd; }}\n{css}"),
    )
    .unwrap();
    // The GPU node, opened before the block starts: handed to a job later, it makes the GPU
    // busy with no open for the block to hear (inotify), so only a click shows it.
    let opened = fs::File::open(sim.dev().join("nvidia0")).unwrap();
    sway::open_up(dir);
    Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(dir)
        .status()
        .unwrap();
    let sway_exec = snippet("waybar", "", "exec waybar")
        .lines()
        .find(|l| l.starts_with("exec waybar"))
        .unwrap()
        .to_owned();
    let Some(sway) = Sway::start(
        dir,
        &format!(
            "{} -c {} -s {}\n",
            sway_exec,
            dir.join("waybar.json").display(),
            dir.join("waybar.css").display()
        ),
        640,
        120,
        &[],
    ) else {
        return;
    };
    let shoot = |png: &Path| {
        sway.screenshot(png);
        crop(png, "300x26+340+0");
    };
    let css_colour = |class: &str| -> String {
        let rule = css
            .lines()
            .find(|l| l.contains(&format!(".{class} ")) || l.contains(&format!(".{class},")))
            .unwrap_or_else(|| panic!("the doc's CSS has no rule for .{class}"));
        let at = rule.find("color: #").unwrap() + "color: ".len();
        rule[at..at + 7].to_ascii_uppercase()
    };

    // Idle, as a normal user sees it: not "free".
    wait_for_colour(
        "unseen",
        &out.join("waybar-unseen.png"),
        &css_colour("unseen"),
        20,
        shoot,
    );
    assert!(sway.log().contains("waybar") || !sway.log().is_empty());

    // A process of the same user holds the GPU: busy.
    // (A copy of the descriptor, not an open: the test keeps its own, so no close is heard
    // either.)
    let job = Group::spawn(
        sway::as_user()
            .args(["sleep", "600"])
            .stdin(opened.try_clone().unwrap())
            .stdout(Stdio::null()),
    );
    // Nothing announces a process that got the GPU without opening it: still unseen…
    std::thread::sleep(Duration::from_millis(300));
    let png = dir.join("still.png");
    shoot(&png);
    assert_eq!(
        pixels_of(&colours(&png), &css_colour("busy")),
        0,
        "busy before any click?"
    );
    // …until a left click on the block (the right end of the bar, where the module sits).
    let Some(pointer) = sway.pointer() else {
        return;
    };
    pointer.click(620, 13, 1);
    wait_for_colour(
        "busy after a click",
        &out.join("waybar-busy.png"),
        &css_colour("busy"),
        20,
        shoot,
    );
    drop(job);
    drop(opened);

    to_vfio(&sim);
    wait_for_colour(
        "vm",
        &out.join("waybar-windows.png"),
        &css_colour("vm"),
        20,
        shoot,
    );
    hook_state(&sim, HookPhase::Returning);
    wait_for_colour(
        "switching",
        &out.join("waybar-switching.png"),
        &css_colour("switching"),
        20,
        shoot,
    );

    // Killing waybar (not sway) ends its block: nothing is left waiting for a GPU change.
    // sway double-forks what it execs, so waybar is found by the test's mark.
    let marked = sway.mark().pids();
    let waybar = marked
        .iter()
        .copied()
        .find(|&p| comm(p) == "waybar")
        .expect("waybar runs under sway");
    let block = marked
        .iter()
        .copied()
        .find(|&p| comm(p) == "handoff-block" && descendants(waybar).contains(&p))
        .expect("waybar runs handoff-block");
    // SAFETY: the waybar this test's sway started.
    unsafe { libc::kill(waybar, libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(5), || !alive(block)),
        "handoff-block --watch outlived waybar"
    );
    to_host(&sim);
}

/// polybar 3.6.3 on Xvfb with the doc's `[bar/…]` and `[module/handoff]`; xdotool clicks
/// it. A left click while a job holds the GPU (which no event announces) refreshes the
/// streaming block to "1 busy" and sends the status as a notification.
#[test]
fn polybar_on_xvfb_shows_each_state_and_a_left_click_refreshes_and_notifies() {
    if !have_all(&["polybar", "Xvfb", "xdotool", "import", "convert"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(n) = Notifications::start(dir) else {
        return;
    };
    let sim = SimHost::build(&dir.join("machine"), &SimSpec::workstation()).unwrap();
    let cfg = write_config(dir, &sim, "");
    let out = out_dir(dir);
    let ini = snippet("polybar", "ini", "[module/handoff]");
    let ini = as_built(&ini, &cfg);
    let bar_name = ini
        .lines()
        .find_map(|l| l.strip_prefix("[bar/")?.strip_suffix(']'))
        .expect("the doc's polybar config names its [bar/…]")
        .to_owned();
    let conf = dir.join("polybar.ini");
    fs::write(&conf, &ini).unwrap();

    let (x, display) = xvfb::start(dir, "640x120x24");
    let _x = Group(x);
    let mark = Stragglers(format!("polybar-{}", std::process::id()));
    let _bar = Group::spawn(
        Command::new("polybar")
            .args(["-c"])
            .arg(&conf)
            .arg("-r")
            .arg(&bar_name)
            .env("DISPLAY", &display)
            .env("DBUS_SESSION_BUS_ADDRESS", &n.address)
            .env("XDG_RUNTIME_DIR", dir)
            .env(Stragglers::VAR, &mark.0)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("polybar.log")).unwrap()),
    );
    let shoot = |png: &Path| screenshot::x11(&display, png, "300x26+340+0");
    let log = || fs::read_to_string(dir.join("polybar.log")).unwrap_or_default();
    let h = wait_for_colour("linux", &out.join("polybar-linux.png"), "#00CC00", 20, shoot);
    assert!(pixels_of(&h, "#00CC00") > 0, "{}", log());

    // A job gets the GPU without an open the block hears (O_PATH): the bar still shows
    // Linux…
    let _job = holder_unheard(&sim.dev().join("nvidia0"));
    std::thread::sleep(Duration::from_millis(300));
    let png = dir.join("still.png");
    shoot(&png);
    assert_eq!(pixels_of(&colours(&png), "#FFAA00"), 0, "busy before any click?");
    // …until a left click on the block (right end of the bar, where the module sits).
    let click = Command::new("xdotool")
        .args(["mousemove", "600", "12", "click", "1"])
        .env("DISPLAY", &display)
        .status()
        .unwrap();
    assert!(click.success());
    wait_for_colour(
        "busy after a click",
        &out.join("polybar-busy.png"),
        "#FFAA00",
        20,
        shoot,
    );
    n.wait_for(&["GPU: Linux · 1 busy", "sleep"], T);

    drop(_job);
    to_vfio(&sim);
    wait_for_colour("vm", &out.join("polybar-windows.png"), "#00AAFF", 20, shoot);
}

/// i3status-rust, built as scripts/deps.sh builds it (not packaged in Debian 12).
fn i3status_rs() -> Option<(PathBuf, PathBuf)> {
    let root = Path::new("/var/cache/handoff-test/i3status-rs");
    let bin = root.join("bin/i3status-rs");
    let share = root.join("share");
    if bin.is_file() && share.join("i3status-rust/themes").is_dir() {
        return Some((bin, share));
    }
    required(
        "i3status-rust is not built: scripts/deps.sh builds it into /var/cache/handoff-test/i3status-rs",
    );
    None
}

/// i3status-rs speaking the i3bar protocol over pipes, as i3bar runs it: its status lines
/// read on a thread, click events written to its stdin.
struct I3statusRs {
    stdin: std::process::ChildStdin,
    lines: Receiver<serde_json::Value>,
    last: Option<serde_json::Value>,
    _group: Group,
}

impl I3statusRs {
    fn start(bin: &Path, share: &Path, config: &Path, env: &[(&str, &str)], log: &Path) -> I3statusRs {
        let mut cmd = Command::new(bin);
        cmd.arg(config)
            .env("XDG_DATA_HOME", share)
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut group = Group::spawn(&mut cmd);
        let mut stdin = group.0.stdin.take().unwrap();
        // `[{…},{…}],`: one status line per line, with a separating comma.
        let rx = handoff_test_support::process::stdout_lines(&mut group.0, |line| {
            serde_json::from_str::<serde_json::Value>(line.trim().trim_matches(','))
                .ok()
                .filter(|v| v.is_array())
        });
        stdin.write_all(b"[\n").unwrap();
        I3statusRs {
            stdin,
            lines: rx,
            last: None,
            _group: group,
        }
    }

    /// The handoff block (its part that draws the full text; i3status-rs sends the short
    /// text as another part of the same block) once its text contains `want`.
    fn wait_for(&mut self, want: &str) -> serde_json::Value {
        let deadline = Instant::now() + T;
        loop {
            if let Some(b) = self.last.as_ref().and_then(|l| {
                l.as_array()?.iter().find(|b| {
                    b["name"].is_string() && b["full_text"].as_str().is_some_and(|t| t.contains(want))
                })
            }) {
                return b.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => self.last = Some(v),
                Err(_) => panic!("i3status-rs never showed {want:?}; last: {:?}", self.last),
            }
        }
    }

    /// A click on `block` as i3bar sends it (its `name` and `instance` echoed back).
    fn click(&mut self, block: &serde_json::Value, button: u8) {
        let ev = serde_json::json!({
            "name": block["name"], "instance": block["instance"], "button": button,
            "x": 1, "y": 1, "relative_x": 1, "relative_y": 1, "width": 10, "height": 10, "modifiers": []
        });
        self.stdin.write_all(format!("{ev},\n").as_bytes()).unwrap();
    }
}

/// The theme's (foreground, background) for a block state (`idle`, `warning`…).
fn theme_look(share: &Path, theme: &str, state: &str) -> (String, String) {
    let text = fs::read_to_string(share.join(format!("i3status-rust/themes/{theme}.toml"))).unwrap();
    let key = |k: &str| {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{k} ")))
            .unwrap_or_else(|| panic!("theme {theme} has no {k}"));
        line.split('"').nth(1).unwrap()[..7].to_ascii_uppercase()
    };
    (key(&format!("{state}_fg")), key(&format!("{state}_bg")))
}

/// How i3bar draws a block: (foreground, background).
fn look(b: &serde_json::Value) -> (String, String) {
    let c = |k: &str| {
        b[k].as_str()
            .map(|c| c[..7].to_ascii_uppercase())
            .unwrap_or_default()
    };
    (c("color"), c("background"))
}

/// i3status-rust (0.35.0, as scripts/deps.sh builds it) with the doc's `[[block]]`: the
/// text is clean ("GPU: Linux", not "GPU GPU: Linux"), each state takes its theme colour and
/// busy differs from switching;
/// a right click while a job holds the GPU refuses the start, naming the job, and a left
/// click refreshes the streaming block.
#[test]
fn i3status_rust_shows_clean_text_in_distinct_colours_and_its_clicks_act() {
    let Some((bin, share)) = i3status_rs() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(n) = Notifications::start(dir) else {
        return;
    };
    let sim = SimHost::build(&dir.join("machine"), &SimSpec::workstation()).unwrap();
    let cfg = write_config(dir, &sim, "");
    let block = snippet("i3status-rust", "toml", "block = \"custom\"");
    let config = dir.join("i3status-rust.toml");
    fs::write(&config, as_built(&block, &cfg)).unwrap();
    let theme = block
        .lines()
        .find_map(|l| l.trim().strip_prefix("theme = \""))
        .map(|t| t.trim_end_matches('"').to_owned())
        .unwrap_or_else(|| "plain".into());
    let mark = Stragglers(format!("i3rs-{}", std::process::id()));
    let mut bar = I3statusRs::start(
        &bin,
        &share,
        &config,
        &[
            ("DBUS_SESSION_BUS_ADDRESS", &n.address),
            ("XDG_RUNTIME_DIR", dir.to_str().unwrap()),
            (Stragglers::VAR, &mark.0),
        ],
        &dir.join("i3status-rs.log"),
    );
    let b = bar.wait_for("GPU: Linux");
    let text = b["full_text"].as_str().unwrap();
    assert_eq!(text.trim(), "GPU: Linux", "no icon word before the text: {b}");
    let short: Vec<_> = bar
        .last
        .as_ref()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == b["name"])
        .filter_map(|p| p["short_text"].as_str())
        .filter(|t| *t != "<span/>")
        .map(str::trim)
        .collect();
    assert_eq!(short, ["L"], "the short text alone, no icon word: {:?}", bar.last);
    let linux = look(&b);

    // The block hears the job's open (inotify); the click's own effect is its notification
    // (the polybar test shows a click refreshing a job no event announced).
    let _job = holder(&sim.dev().join("nvidia0"));
    // A left click refreshes the block and notifies.
    bar.click(&b, 1);
    let busy = bar.wait_for("1 busy");
    n.wait_for(&["GPU: Linux · 1 busy"], T);
    // A right click refuses the start, naming the job.
    bar.click(&busy, 3);
    n.wait_for(&["Windows not started: the GPU is in use", "sleep"], T);
    drop(_job);

    hook_state(&sim, HookPhase::Binding);
    let switching = bar.wait_for("switching");
    to_vfio(&sim);
    let vm = bar.wait_for("GPU: Windows");
    assert_ne!(
        look(&busy),
        look(&switching),
        "busy and switching look the same: {busy} {switching}"
    );
    assert_ne!(look(&vm), linux, "the VM looks like Linux: {vm}");
    assert_ne!(
        look(&vm),
        theme_look(&share, &theme, "idle"),
        "the VM looks like the clock (idle): {vm}"
    );
    assert_eq!(look(&busy), theme_look(&share, &theme, "warning"), "{busy}");
    assert_eq!(look(&linux_again(&mut bar, &sim)), linux);
}

fn linux_again(bar: &mut I3statusRs, sim: &SimHost) -> serde_json::Value {
    to_host(sim);
    bar.wait_for("GPU: Linux")
}

/// The same config on a real i3bar (i3 4.22 on Xvfb, i3status-rs as its `status_command`):
/// the pictures for the doc, each checked for the state's theme colour.
#[test]
fn i3status_rust_on_i3bar_draws_each_state_in_its_theme_colour() {
    let Some((bin, share)) = i3status_rs() else { return };
    if !have_all(&["i3", "i3bar", "Xvfb", "import", "convert", "xwininfo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sim = SimHost::build(&dir.join("machine"), &SimSpec::workstation()).unwrap();
    let cfg = write_config(dir, &sim, "");
    let out = out_dir(dir);
    let block = snippet("i3status-rust", "toml", "block = \"custom\"");
    // A clock-like static block after it, for the bar's usual context.
    let config = dir.join("i3status-rust.toml");
    fs::write(
        &config,
        format!(
            "{}\n[[block]]\nblock = \"custom\"\ncommand = \"echo Sat 22:30\"\ninterval = \"once\"\n",
            as_built(&block, &cfg)
        ),
    )
    .unwrap();
    let theme = block
        .lines()
        .find_map(|l| l.trim().strip_prefix("theme = \""))
        .map(|t| t.trim_end_matches('"').to_owned())
        .unwrap();
    let i3conf = dir.join("i3.conf");
    fs::write(
        &i3conf,
        format!(
            "# i3 config file (v4)\nfont pango:DejaVu Sans Mono 12\nipc-socket {}\n\
             bar {{\n  position top\n  tray_output none\n  workspace_buttons no\n  \
             status_command env XDG_DATA_HOME={} {} {}\n}}\n",
            dir.join("i3.sock").display(),
            share.display(),
            bin.display(),
            config.display()
        ),
    )
    .unwrap();
    let (x, display) = xvfb::start(dir, "800x120x24");
    let _x = Group(x);
    let mark = Stragglers(format!("i3bar-i3rs-{}", std::process::id()));
    let _i3 = Group::spawn(
        Command::new("i3")
            .arg("-c")
            .arg(&i3conf)
            .env("DISPLAY", &display)
            .env(Stragglers::VAR, &mark.0)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("i3.log")).unwrap()),
    );
    let mut bar = None;
    assert!(
        wait_until(T, || {
            bar = screenshot::i3bar_size(&display);
            bar.is_some()
        }),
        "no i3bar window"
    );
    let (w, h) = bar.unwrap();
    let geometry = format!("420x{h}+{}+0", w - 420);
    let shoot = |png: &Path| screenshot::x11(&display, png, &geometry);
    // plain draws every state on black; the foreground tells them apart.
    let fg = |state: &str| theme_look(&share, &theme, state).0;
    wait_for_colour(
        "linux",
        &out.join("i3status-rust-linux.png"),
        &fg("good"),
        20,
        shoot,
    );
    let job = holder(&sim.dev().join("nvidia0"));
    hook_state(&sim, HookPhase::Host);
    wait_for_colour(
        "busy",
        &out.join("i3status-rust-busy.png"),
        &fg("warning"),
        20,
        shoot,
    );
    drop(job);
    to_vfio(&sim);
    let info = block
        .lines()
        .find_map(|l| l.trim().strip_prefix("info_fg = \""))
        .map(|c| c[..7].to_ascii_uppercase())
        .unwrap_or_else(|| fg("info"));
    wait_for_colour("vm", &out.join("i3status-rust-windows.png"), &info, 20, shoot);
}
