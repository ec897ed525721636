//! Each `--format` against what its bar parses, in every state the simulated machine can
//! be put in; and what the built binary links.

mod support;

use std::process::Command;

use handoff::bind::record::{Phase, RestoreRecord};
use handoff::sim::{RTX_3090_TI, SimHost, SimSpec};
use handoff::state::{HookPhase, HookState};
use serde_json::Value;
use support::{BLOCK, holder, write_config};

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
    check(&cfg, "GPU: switching…", "GPU…", "#FFDD00", "Warning", "switching");

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
    check(&cfg, "GPU: switching…", "GPU…", "#FFDD00", "Warning", "switching");

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
