//! `handoff lg` against a real i3 4.22 on Xvfb, with a stand-in client: xterm given the
//! Looking Glass client's window class (`xterm -class looking-glass-client`).
//!
//! The CLI runs with no DISPLAY, as over SSH, and finds i3 through `I3SOCK` or the
//! runtime directory. Set `HANDOFF_SCREENSHOTS=DIR` to keep the screenshot of the desktop
//! with the window on its workspace (docs/screenshots/ holds the committed one).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use handoff::i3::Session;
use handoff_test_support::desktop::Desktop;

const CLASS: &str = "looking-glass-client";
const TRICKY_TITLE: &str = "a; b 'c' \"d\" $HOME \\e";

fn config_text(title: &str) -> String {
    let args = ["-class", CLASS, "-title", title, "-e", "sleep", "600"];
    let args: Vec<String> = args.iter().map(|a| toml_string(a)).collect();
    format!(
        "[looking_glass]\ncommand = \"xterm\"\nargs = [{}]\nworkspace = \"lg 10\"\nwindow_class = \"{CLASS}\"\n",
        args.join(", ")
    )
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn handoff_lg(config: &Path, i3sock: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handoff"));
    cmd.args(["lg", "--json", "--wait", "30", "--config"])
        .arg(config)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("I3SOCK")
        .env_remove("SWAYSOCK");
    if let Some(s) = i3sock {
        cmd.env("I3SOCK", s);
    }
    cmd.output().unwrap()
}

fn outcome(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "handoff lg failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn lg_from_ssh_opens_client_on_its_workspace_then_focuses_it_instead_of_a_second() {
    let Some(desk) = Desktop::start(None) else { return };
    let config = desk.dir.path().join("config.toml");
    std::fs::write(&config, config_text(TRICKY_TITLE)).unwrap();

    let t = std::time::Instant::now();
    let first = outcome(&handoff_lg(&config, Some(&desk.socket)));
    eprintln!("first handoff lg: {:?}", t.elapsed());
    assert_eq!(first["outcome"], "started", "{first}");

    let lg: Vec<_> = desk.windows().into_iter().filter(|w| w.is(CLASS)).collect();
    assert_eq!(lg.len(), 1, "{lg:?}");
    assert_eq!(lg[0].workspace.as_deref(), Some("lg 10"));
    assert_eq!(lg[0].title, TRICKY_TITLE, "the argument reached xterm intact");
    assert!(lg[0].focused);
    assert_eq!(desk.focused_workspace().as_deref(), Some("lg 10"));

    if let Some(dir) = std::env::var_os("HANDOFF_SCREENSHOTS") {
        let to = Path::new(&dir).join("lg-workspace.png");
        assert!(desk.screenshot(&to), "import -window root failed");
    }

    // Somebody goes back to workspace 1; the second call focuses the running client.
    desk.i3().command("workspace 1").unwrap();
    assert_eq!(desk.focused_workspace().as_deref(), Some("1"));
    let t = std::time::Instant::now();
    let second = outcome(&handoff_lg(&config, Some(&desk.socket)));
    eprintln!("second handoff lg: {:?}", t.elapsed());
    assert_eq!(second["outcome"], "focused", "{second}");
    assert_eq!(second["con_id"], first["con_id"]);
    let lg: Vec<_> = desk.windows().into_iter().filter(|w| w.is(CLASS)).collect();
    assert_eq!(lg.len(), 1, "exactly one client: {lg:?}");
    assert_eq!(desk.focused_workspace().as_deref(), Some("lg 10"));
}

#[test]
fn finds_i3_in_the_runtime_dir_without_i3sock_or_display() {
    let runtime = tempfile::tempdir().unwrap();
    let uid = 4242;
    let dir = runtime.path().join(uid.to_string()).join("i3");
    std::fs::create_dir_all(&dir).unwrap();
    // A stale socket of a crashed i3 beside the live one: the live one must win.
    let _stale = std::os::unix::net::UnixListener::bind(dir.join("ipc-socket.1")).unwrap();
    drop(_stale);
    let Some(desk) = Desktop::start(Some(dir.join("ipc-socket.99"))) else {
        return;
    };
    let mut cfg = handoff::Config::default();
    cfg.looking_glass.command = "xterm".into();
    cfg.looking_glass.args = ["-class", CLASS, "-e", "sleep", "600"].map(String::from).to_vec();
    let session = Session {
        i3sock: None,
        swaysock: None,
        runtime_root: runtime.path().to_owned(),
        uid,
        display: None,
        wayland_display: None,
    };
    let out = handoff::lg::open(&cfg, &session, Duration::from_secs(30)).unwrap();
    assert!(
        matches!(out, handoff::lg::LgOutcome::Started { ref workspace, .. } if workspace == "10"),
        "{out:?}"
    );
    assert_eq!(desk.focused_workspace().as_deref(), Some("10"));
}

#[test]
fn no_desktop_reachable_says_so_and_starts_nothing() {
    let runtime = tempfile::tempdir().unwrap();
    let session = Session {
        i3sock: None,
        swaysock: None,
        runtime_root: runtime.path().to_owned(),
        uid: 4242,
        display: None,
        wayland_display: None,
    };
    let cfg = handoff::Config::default();
    let out = handoff::lg::open(&cfg, &session, Duration::from_secs(1)).unwrap();
    let handoff::lg::LgOutcome::NoDesktop { .. } = &out else {
        panic!("{out:?}")
    };
    let text = out.describe(&cfg, Some("Windows"));
    assert!(
        text.starts_with("Windows is running. No desktop session is reachable"),
        "{text}"
    );
}

#[test]
fn a_client_that_exits_before_its_window_is_reported_at_once_with_its_status() {
    let Some(desk) = Desktop::start(None) else { return };
    let session = Session {
        i3sock: Some(desk.socket.clone().into()),
        swaysock: None,
        runtime_root: desk.dir.path().to_owned(),
        uid: 4242,
        display: None,
        wayland_display: None,
    };
    let mut cfg = handoff::Config::default();
    for (command, args, status, hint) in [
        (
            "looking-glass-client-not-installed",
            vec![],
            127,
            "not found on the desktop session's PATH",
        ),
        (
            "sh",
            vec!["-c", "echo no shm >&2; exit 3"],
            3,
            "run it by hand on the desktop",
        ),
    ] {
        cfg.looking_glass.command = command.into();
        cfg.looking_glass.args = args.into_iter().map(String::from).collect();
        let t = std::time::Instant::now();
        let err = handoff::lg::open(&cfg, &session, Duration::from_secs(30)).unwrap_err();
        eprintln!("{command}: {:?}: {err}", t.elapsed());
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "it waited for a window: {err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "but it exited with status {status} before its window appeared"
            )),
            "{text}"
        );
        assert!(text.contains(hint), "{text}");
    }
    assert!(desk.windows().iter().all(|w| !w.is(CLASS)));
}
