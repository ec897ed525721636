//! `handoff lg` under sway 1.7 (headless, as another user: sway refuses root), with foot
//! standing in for the Looking Glass client: a real Wayland client, matched by its
//! `app_id`, not an X class. From SSH: no `SWAYSOCK`, `WAYLAND_DISPLAY` or `DISPLAY`; the
//! socket is found in the user's runtime dir, as `/run/user/<uid>/sway-ipc.<uid>.<pid>.sock`.

use std::time::Duration;

use handoff::i3::{self, I3, Session};
use handoff::lg::LgOutcome;
use handoff_test_support::sway::{self, Sway};
use handoff_test_support::tools::have_all;

#[test]
fn lg_from_ssh_places_a_wayland_client_on_its_sway_workspace_then_focuses_it() {
    if !have_all(&["sway", "foot"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(sway) = Sway::start(dir, "", 800, 600, &[]) else {
        return;
    };
    let mut cfg = handoff::Config::default();
    // foot's app_id, given explicitly: the window must be matched by app_id, and a shell
    // that sleeps keeps it open.
    cfg.looking_glass.command = "foot".into();
    cfg.looking_glass.args = ["--app-id", "looking-glass-client", "sleep", "600"]
        .map(String::from)
        .to_vec();
    cfg.looking_glass.workspace = "lg 10".into();
    let session = Session {
        i3sock: None,
        swaysock: None,
        runtime_root: dir.join("run/user"),
        uid: sway::UID,
        display: None,
        wayland_display: None,
    };
    let first = handoff::lg::open(&cfg, &session, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\nsway's log:\n{}", sway.log()));
    let LgOutcome::Started { con_id, workspace } = &first else {
        panic!("{first:?}")
    };
    assert_eq!(workspace, "lg 10");

    let mut ipc = I3::connect(&sway.socket).unwrap();
    assert!(ipc.is_sway().unwrap());
    let lg: Vec<_> = i3::windows(&ipc.tree().unwrap())
        .into_iter()
        .filter(|w| w.is("looking-glass-client"))
        .collect();
    assert_eq!(lg.len(), 1, "{lg:?}");
    assert_eq!(lg[0].con_id, *con_id);
    assert_eq!(
        lg[0].app_id, "looking-glass-client",
        "a Wayland window, not an X one: {lg:?}"
    );
    assert_eq!(lg[0].workspace.as_deref(), Some("lg 10"));
    assert_eq!(
        i3::focused_workspace(&ipc.workspaces().unwrap()).as_deref(),
        Some("lg 10")
    );

    // Back on workspace 1, `handoff lg` focuses the running client instead of a second.
    ipc.command("workspace 1").unwrap();
    let second = handoff::lg::open(&cfg, &session, Duration::from_secs(30)).unwrap();
    assert!(
        matches!(second, LgOutcome::Focused { con_id: c, .. } if c == *con_id),
        "{second:?}"
    );
    let lg = i3::windows(&ipc.tree().unwrap())
        .into_iter()
        .filter(|w| w.is("looking-glass-client"))
        .count();
    assert_eq!(lg, 1, "exactly one client");
    assert_eq!(
        i3::focused_workspace(&ipc.workspaces().unwrap()).as_deref(),
        Some("lg 10")
    );
}

#[test]
fn a_client_that_exits_under_sway_is_reported_with_its_status() {
    if !have_all(&["sway"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(sway) = Sway::start(tmp.path(), "", 800, 600, &[]) else {
        return;
    };
    let mut cfg = handoff::Config::default();
    cfg.looking_glass.command = "sh".into();
    cfg.looking_glass.args = ["-c", "exit 3"].map(String::from).to_vec();
    let session = Session {
        i3sock: None,
        swaysock: Some(sway.socket.clone().into()),
        runtime_root: tmp.path().join("none"),
        uid: sway::UID,
        display: None,
        wayland_display: None,
    };
    let t = std::time::Instant::now();
    let err = handoff::lg::open(&cfg, &session, Duration::from_secs(30)).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "it waited for a window: {err}"
    );
    assert!(err.to_string().contains("exited with status 3"), "{err}");
}
