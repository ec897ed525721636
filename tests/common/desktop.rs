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

pub struct Desktop {
    pub dir: tempfile::TempDir,
    pub display: String,
    pub socket: PathBuf,
    /// None when i3 runs on a display someone else started ([`Desktop::i3_on`]).
    xvfb: Option<Child>,
    i3: Child,
    /// Process groups of clients to kill on drop (found before X goes away).
    extra_groups: Vec<i32>,
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
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
        for tool in ["Xvfb", "i3", "xprop"] {
            if !have(tool) {
                let why = format!("{tool} is not installed (scripts/deps.sh installs it)");
                assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
                eprintln!("skipping: {why}");
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let socket = socket.unwrap_or_else(|| dir.path().join("i3-ipc.sock"));
        let (xvfb, display) = match display {
            Some(d) => (None, d.to_owned()),
            None => {
                let (x, d) = start_xvfb(dir.path());
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

    pub fn i3(&self) -> handoff::i3::I3 {
        handoff::i3::I3::connect(&self.socket).unwrap()
    }

    pub fn windows(&self) -> Vec<handoff::i3::Window> {
        handoff::i3::windows(&self.i3().tree().unwrap())
    }

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

/// Starts Xvfb on a display it picks itself (`-displayfd`: it writes the number to a pipe
/// once it listens), so parallel tests never race for a display number.
fn start_xvfb(dir: &Path) -> (Child, String) {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (r, w) = (fds[0], fds[1]);
    let mut read_end = unsafe { std::fs::File::from_raw_fd(r) };
    let mut cmd = Command::new("Xvfb");
    cmd.args([
        "-displayfd",
        &w.to_string(),
        "-noreset",
        "-nolisten",
        "tcp",
        "-screen",
        "0",
        "1024x640x24",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(dir.join("xvfb.log")).unwrap())
    .process_group(0);
    // SAFETY: only fcntl between fork and exec: let Xvfb inherit the write end.
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(w, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start Xvfb");
    // SAFETY: our copy of the write end; closing it lets read see EOF if Xvfb dies.
    unsafe { libc::close(w) };
    let mut number = String::new();
    read_end.read_to_string(&mut number).unwrap();
    let n = number.trim();
    assert!(
        !n.is_empty(),
        "Xvfb did not start: {}",
        std::fs::read_to_string(dir.join("xvfb.log")).unwrap_or_default()
    );
    (child, format!(":{n}"))
}

fn kill_group(child: &mut Child) {
    // SAFETY: signalling the process group we created for this child.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !matches!(child.try_wait(), Ok(Some(_))) {
        if Instant::now() > deadline {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return;
        }
        sleep(Duration::from_millis(20));
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
