//! A real i3 4.22 desktop on Xvfb, for tests.
//!
//! Starts `Xvfb :<n> -noreset` and `i3 -c <config>` each in its own process group, with
//! the i3 config, its IPC socket and everything else in a temp dir. Dropping the
//! [`Desktop`] kills both process groups and every X client still connected (found
//! through `_NET_WM_PID` of the windows in i3's tree, and killed by process group: i3
//! starts clients in a session of their own), then waits for them.
//!
//! Under `CI=true` a missing `Xvfb` or `i3` fails the test; elsewhere [`Desktop::start`]
//! returns None and the test skips, saying why.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::process::kill_group;
use crate::tools::have_all;

/// Xvfb (unless the caller brought a display) and i3 on it, with its IPC socket; see the
/// module header for what its drop ends.
pub struct Desktop {
    /// The temp dir with the i3 config and the logs (`i3.log`, `xvfb.log`).
    pub dir: tempfile::TempDir,
    /// The X display (`:N`).
    pub display: String,
    /// i3's IPC socket.
    pub socket: PathBuf,
    /// None when i3 runs on a display someone else started ([`Desktop::i3_on`]).
    xvfb: Option<Child>,
    i3: Child,
    /// Process groups of clients to kill on drop (found before X goes away).
    extra_groups: Vec<i32>,
}

/// The i3 config the tests use: a bar (so a screenshot shows the workspace), no
/// autostarts, the socket where the test says.
pub fn i3_config(socket: &Path) -> String {
    format!(
        "# i3 config file (v4)\n\
         ipc-socket {}\n\
         font pango:DejaVu Sans Mono 10\n\
         default_border normal 2\n\
         bar {{\n  position top\n}}\n",
        socket.display()
    )
}

impl Desktop {
    /// A desktop whose i3 socket is at `socket` (None: in the temp dir).
    pub fn start(socket: Option<PathBuf>) -> Option<Desktop> {
        Desktop::start_inner(socket, None)
    }

    /// i3 on `display`, an X server the caller started and stops (after dropping this):
    /// e.g. the tray tests' Xvfb with xfce4-panel on it, which i3 then manages as a dock.
    pub fn i3_on(display: &str) -> Option<Desktop> {
        Desktop::start_inner(None, Some(display))
    }

    fn start_inner(socket: Option<PathBuf>, display: Option<&str>) -> Option<Desktop> {
        if !have_all(&["Xvfb", "i3", "xprop"]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let socket = socket.unwrap_or_else(|| dir.path().join("i3-ipc.sock"));
        let (xvfb, display) = match display {
            Some(d) => (None, d.to_owned()),
            None => {
                let (x, d) = crate::xvfb::start(dir.path(), "1024x640x24");
                (Some(x), d)
            }
        };
        let conf = dir.path().join("i3.conf");
        let mut text = i3_config(&socket);
        if xvfb.is_none() {
            // The display has a tray of its own (xfce4-panel's): i3bar must not take the
            // system tray selection from it.
            text = text.replace("bar {\n", "bar {\n  tray_output none\n");
        }
        std::fs::write(&conf, text).unwrap();
        let i3 = Command::new("i3")
            .arg("-c")
            .arg(&conf)
            .env("DISPLAY", &display)
            .env_remove("I3SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("i3.log")).unwrap())
            .process_group(0)
            .spawn()
            .expect("start i3");
        let mut d = Desktop {
            dir,
            display,
            socket,
            xvfb,
            i3,
            extra_groups: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while handoff::i3::I3::connect(&d.socket)
            .and_then(|mut c| c.version())
            .is_err()
        {
            if let Ok(Some(st)) = d.i3.try_wait() {
                let log = std::fs::read_to_string(d.dir.path().join("i3.log")).unwrap_or_default();
                panic!("i3 exited ({st}) before answering:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "i3 did not answer on {} within 20 s",
                d.socket.display()
            );
            sleep(Duration::from_millis(50));
        }
        Some(d)
    }

    /// A new IPC connection to this desktop's i3.
    pub fn i3(&self) -> handoff::i3::I3 {
        handoff::i3::I3::connect(&self.socket).unwrap()
    }

    /// Every window in i3's tree now.
    pub fn windows(&self) -> Vec<handoff::i3::Window> {
        handoff::i3::windows(&self.i3().tree().unwrap())
    }

    /// The name of the focused workspace.
    pub fn focused_workspace(&self) -> Option<String> {
        handoff::i3::focused_workspace(&self.i3().workspaces().unwrap())
    }

    /// A screenshot of the whole screen (imagemagick's `import`).
    pub fn screenshot(&self, to: &Path) -> bool {
        Command::new("import")
            .args(["-window", "root", "-depth", "8"])
            .arg(to)
            .env("DISPLAY", &self.display)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Process groups of every window's client, from `_NET_WM_PID`.
    fn client_groups(&self) -> Vec<i32> {
        let Ok(mut c) = handoff::i3::I3::connect(&self.socket) else {
            return Vec::new();
        };
        let Ok(tree) = c.tree() else { return Vec::new() };
        let mut ids = Vec::new();
        collect_x_ids(&tree, &mut ids);
        ids.into_iter()
            .filter_map(|id| {
                let out = Command::new("xprop")
                    .args(["-id", &id.to_string(), "_NET_WM_PID"])
                    .env("DISPLAY", &self.display)
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout);
                let pid: i32 = text.rsplit(' ').next()?.trim().parse().ok()?;
                // SAFETY: getpgid on any pid is harmless.
                let pgid = unsafe { libc::getpgid(pid) };
                (pgid > 1).then_some(pgid)
            })
            .collect()
    }
}

fn collect_x_ids(node: &serde_json::Value, out: &mut Vec<u64>) {
    if let Some(w) = node["window"].as_u64() {
        out.push(w);
    }
    for key in ["nodes", "floating_nodes"] {
        for c in node[key].as_array().into_iter().flatten() {
            collect_x_ids(c, out);
        }
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        let mut groups = self.client_groups();
        groups.append(&mut self.extra_groups);
        // SAFETY: getpgrp cannot fail.
        let own = unsafe { libc::getpgrp() };
        for g in groups.into_iter().filter(|&g| g != own) {
            // SAFETY: the process group of a client this desktop's i3 started.
            unsafe { libc::kill(-g, libc::SIGTERM) };
        }
        kill_group(&mut self.i3);
        if let Some(x) = &mut self.xvfb {
            kill_group(x);
        }
    }
}
