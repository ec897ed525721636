//! Each `--format` against what its bar parses, in every state the simulated machine can
//! be put in; and what the built binary links.

use std::process::Command;

use handoff::bind::record::{Phase, RestoreRecord};
use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff::state::{HookPhase, HookState};
use handoff_test_support::block::write_config;
use handoff_test_support::named_holder;
use handoff_test_support::process::holder;
use serde_json::Value;

/// The block under test.
const BLOCK: &str = env!("CARGO_BIN_EXE_handoff-block");

fn run(cfg: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(BLOCK)
        .env("HANDOFF_CONFIG", cfg)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(33),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every format for the current state: (i3blocks lines, i3blocks-json, i3status-rust, waybar, polybar).
fn all(cfg: &std::path::Path) -> (Vec<String>, Value, Value, Value, String) {
    let lines = run(cfg, &[]).lines().map(str::to_owned).collect();
    let j = |f: &str| -> Value {
        let out = run(cfg, &["--format", f]);
        assert_eq!(out.lines().count(), 1, "{f}: one JSON line: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{f}: {e}: {out}"))
    };
    let polybar = run(cfg, &["--format", "polybar"]);
    (
        lines,
        j("i3blocks-json"),
        j("i3status-rust"),
        j("waybar"),
        polybar.trim_end().to_owned(),
    )
}

/// `%{F#rrggbb}text%{F-}`, as polybar's tag parser reads it: (colour, text).
fn polybar_tags(s: &str) -> (String, String) {
    let rest = s
        .strip_prefix("%{F#")
        .unwrap_or_else(|| panic!("no colour tag: {s}"));
    let (colour, rest) = rest.split_once('}').unwrap();
    assert!(
        colour.len() == 6 && colour.chars().all(|c| c.is_ascii_hexdigit()),
        "{colour}"
    );
    let text = rest
        .strip_suffix("%{F-}")
        .unwrap_or_else(|| panic!("no closing tag: {s}"));
    assert!(!text.contains("%{"), "stray tag in {text}");
    (format!("#{colour}"), text.to_owned())
}

fn check(cfg: &std::path::Path, text: &str, short: &str, colour: &str, state: &str, class: &str) {
    let (lines, ib, i3rs, waybar, polybar) = all(cfg);
    assert_eq!(lines, [text, short, colour]);
    assert_eq!(ib["full_text"], text);
    assert_eq!(ib["short_text"], short);
    assert_eq!(ib["color"], colour);
    assert!(ib["urgent"].is_boolean());
    // i3status-rust's custom block: these four keys, state one of its five words.
    assert_eq!(i3rs["text"], text);
    assert_eq!(i3rs["short_text"], short);
    assert_eq!(i3rs["state"], state);
    assert!(["Idle", "Info", "Good", "Warning", "Critical"].contains(&i3rs["state"].as_str().unwrap()));
    assert!(i3rs["icon"].is_string());
    // waybar's return-type json: text, alt, tooltip, class.
    assert_eq!(waybar["text"], text);
    assert_eq!(waybar["class"], class);
    assert_eq!(waybar["alt"], class);
    assert!(waybar["tooltip"].as_str().unwrap().starts_with(text));
    assert_eq!(polybar_tags(&polybar), (colour.to_owned(), text.to_owned()));
}

#[test]
fn every_format_in_every_state_parses_as_its_bar_expects() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
    let cfg = write_config(tmp.path(), &sim, "");

    check(&cfg, "GPU: Linux", "L", "#00CC00", "Good", "linux");

    let a = holder(&sim.dev().join("nvidia0"));
    let b = holder(&sim.dev().join("nvidiactl"));
    check(&cfg, "GPU: Linux · 2 busy", "L·2", "#FFAA00", "Warning", "busy");
    let (_, _, _, waybar, _) = all(&cfg);
    assert!(
        waybar["tooltip"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {}", a.pid())),
        "{waybar}"
    );
    drop((a, b));

    let mut state = HookState::new(RTX_3090_TI);
    state.phase = HookPhase::Binding;
    state.vm = Some("win11".into());
    state.save(&sim.host()).unwrap();
    check(&cfg, "GPU: switching…", "GPU…", "#FFDD00", "Info", "switching");

    for f in 0..4 {
        sim.set_driver(RTX_3090_TI.with_function(f), Some("vfio-pci"))
            .unwrap();
    }
    state.phase = HookPhase::Vfio;
    state.save(&sim.host()).unwrap();
    check(&cfg, "GPU: Windows", "W", "#00AAFF", "Info", "vm");
    assert_eq!(
        run(&cfg, &["--short", "--format", "polybar"]).trim(),
        "%{F#00AAFF}W%{F-}"
    );

    state.phase = HookPhase::Returning;
    state.save(&sim.host()).unwrap();
    check(&cfg, "GPU: switching…", "GPU…", "#FFDD00", "Info", "switching");

    // A stuck record wins over everything: a person must act.
    let gpu = handoff::gpu::read_gpu(&sim.host(), RTX_3090_TI).unwrap();
    let mut record = RestoreRecord::new(&gpu, Some("win11"));
    record.phase = Phase::Stuck;
    record.save(&sim.host()).unwrap();
    check(&cfg, "GPU: restore!", "GPU!", "#FF0000", "Critical", "restore");
    let out = Command::new(BLOCK).env("HANDOFF_CONFIG", &cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(33), "i3blocks marks exit 33 urgent");
    let (_, ib, ..) = all(&cfg);
    assert_eq!(ib["urgent"], true);
}

#[test]
fn the_built_block_links_neither_libvirt_nor_gtk_nor_dbus() {
    let out = Command::new("ldd").arg(BLOCK).output().expect("ldd");
    let libs = String::from_utf8_lossy(&out.stdout);
    for bad in ["libvirt", "libgtk", "libglib", "libdbus", "libnotify"] {
        assert!(
            !libs.contains(bad),
            "handoff-block links {bad}:\n{libs}\n(built in a workspace-wide cargo run? cargo unifies \
             the library's features across the packages it builds together, turning libvirt on; \
             build and test the block on its own: cargo test -p handoff-block)"
        );
    }
}

#[test]
fn a_bad_flag_says_what_is_expected() {
    let out = Command::new(BLOCK)
        .args(["--format", "lemonbar"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("i3status-rust"));
}

#[test]
fn a_holder_name_and_a_vm_label_cannot_break_a_bar_line_or_open_markup() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
    // A label with a newline, markup and a polybar tag, as TOML allows.
    let cfg = write_config(tmp.path(), &sim, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("label = \"Windows\"", r#"label = "<i>Win</i>\n%{F#f00}&""#);
    std::fs::write(&cfg, text).unwrap();

    let h = named_holder::hold_named(&sim.dev().join("nvidia0"), named_holder::EVIL, tmp.path());
    let (lines, ib, i3rs, waybar, polybar) = all(&cfg);
    assert_eq!(lines, ["GPU: Linux · 1 busy", "L·1", "#FFAA00"]);
    let tooltip = waybar["tooltip"].as_str().unwrap();
    let shown = format!(r"evil\x1b[31m&lt;b&gt;\x07\x0a (pid {}, user ", h.pid());
    assert!(
        tooltip.contains(&shown),
        "waybar's tooltip is Pango markup: {tooltip}"
    );
    assert!(!tooltip.contains('\x1b') && !tooltip.contains("<b>"), "{tooltip}");
    for v in [&ib, &i3rs, &waybar] {
        assert!(!v.to_string().contains("\\u001b"), "{v}");
    }
    assert!(
        !polybar.contains('\n') && !polybar.contains('\x1b'),
        "{polybar:?}"
    );
    drop(h);

    // The VM has the GPU: its label is the text.
    for f in 0..4 {
        sim.set_driver(RTX_3090_TI.with_function(f), Some("vfio-pci"))
            .unwrap();
    }
    let mut state = HookState::new(RTX_3090_TI);
    state.phase = HookPhase::Vfio;
    state.vm = Some("win11".into());
    state.save(&sim.host()).unwrap();
    let (lines, ib, i3rs, waybar, polybar) = all(&cfg);
    assert_eq!(lines.len(), 3, "i3blocks reads three lines: {lines:?}");
    assert_eq!(lines[0], r"GPU: <i>Win</i>\x0a%{F#f00}&");
    assert_eq!(i3rs["text"], lines[0]);
    // i3blocks-json says it is Pango markup, and is escaped for it.
    assert_eq!(ib["markup"], "pango");
    assert_eq!(ib["full_text"], r"GPU: &lt;i&gt;Win&lt;/i&gt;\x0a%{F#f00}&amp;");
    assert_eq!(waybar["text"], ib["full_text"]);
    assert_eq!(
        polybar_tags(&polybar),
        ("#00AAFF".to_owned(), r"GPU: <i>Win</i>\x0a% {F#f00}&".to_owned())
    );
}

#[test]
fn a_signal_number_beyond_the_realtime_range_is_refused_without_overflow() {
    for n in ["2147483647", "-2147483648", "0", "99999999999"] {
        let out = Command::new(BLOCK)
            .args(["--signal-i3blocks", n])
            .env("HANDOFF_CONFIG", "/nonexistent/handoff.toml")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{n}: {stderr}");
        assert!(
            stderr.contains(&format!("--signal-i3blocks {n}: i3blocks signals run from 1 to ")),
            "{n}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{n}: {stderr}");
    }
}

#[test]
fn a_missing_config_flag_is_blamed_by_its_own_name() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.toml");
    let out = Command::new(BLOCK)
        .args(["--config", missing.to_str().unwrap()])
        .env_remove("HANDOFF_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(33), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read config {}", missing.display())),
        "{stderr}"
    );
    assert!(
        !stderr.contains("HANDOFF_CONFIG"),
        "the flag was given, not the variable: {stderr}"
    );
}
