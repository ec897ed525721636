//! Real peers for the block's tests: i3blocks 1.4 over pipes, a private session bus with
//! dunst on Xvfb as the notification daemon and `dbus-monitor` reading what was sent.
//!
//! Every process starts in a process group of its own and is killed by group on drop
//! (i3blocks does not exit on EOF, and its blocks are its children). Under `CI=true` a
//! missing tool fails the test; elsewhere [`crate::tools::have_all`] says why and the test
//! skips.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use handoff::simulated_tree::SimHost;

use crate::process::Group;
use crate::tools::have_all;
use crate::wait::wait_until;

/// The handoff config for a simulated machine, plus any extra TOML.
pub fn write_config(dir: &Path, sim: &SimHost, extra: &str) -> PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "[gpu]\naddress = \"0000:01:00.0\"\n\n[[vm]]\nname = \"win11\"\nlabel = \"Windows\"\n\n\
         [host]\nsysfs = {:?}\ndev = {:?}\nrun = {:?}\n{}{extra}",
        sim.sysfs(),
        sim.dev(),
        sim.run(),
        uninspectable_ok_line()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `uninspectable_ok = [...]` (for the `[host]` section) naming the processes root cannot
/// inspect on this machine now (PID 1 of the container the tests run in): a surface must
/// not call the GPU free while such a process exists ("? unseen"), and the tests of the
/// other states are about the GPU's own holders, which root does see.
pub fn uninspectable_ok_line() -> String {
    format!(
        "uninspectable_ok = {:?}\n",
        handoff::holders::uninspectable_now(Path::new("/proc"))
    )
}

/// A block as i3blocks printed it to i3bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    /// The block's `full_text`.
    pub full_text: String,
    /// Its `short_text`, when it set one.
    pub short_text: Option<String>,
    /// Its `color` (`#rrggbb`), when it set one.
    pub color: Option<String>,
    /// Whether it asked to be shown as urgent.
    pub urgent: bool,
}

/// i3blocks 1.4 running a generated config, its i3bar JSON read on a thread.
pub struct I3blocks {
    stdin: ChildStdin,
    /// Each status line with the time the reader thread got it.
    lines: Receiver<(SystemTime, serde_json::Value)>,
    /// The `handoff`/`gpu` block as last shown.
    pub last: Option<Shown>,
    /// Every block by name: as last shown, and when that text first appeared.
    blocks: HashMap<String, (Shown, SystemTime)>,
    clicks: usize,
    group: Group,
}

impl I3blocks {
    /// `blocks` is the config after the global part; `env` goes to i3blocks and so to
    /// every block it runs.
    pub fn start(dir: &Path, blocks: &str, env: &[(&str, &Path)]) -> I3blocks {
        let conf = dir.join("i3blocks.conf");
        std::fs::write(&conf, blocks).unwrap();
        let mut cmd = Command::new("i3blocks");
        cmd.arg("-c")
            .arg(&conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("i3blocks.log")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut group = Group::spawn(&mut cmd);
        let stdin = group.0.stdin.take().unwrap();
        let stdout = group.0.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                let t = line.trim().trim_start_matches(',');
                if t.starts_with("[{")
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(t)
                    && tx.send((SystemTime::now(), v)).is_err()
                {
                    return;
                }
                line.clear();
            }
        });
        let mut me = I3blocks {
            stdin,
            lines: rx,
            last: None,
            blocks: HashMap::new(),
            clicks: 0,
            group,
        };
        me.stdin.write_all(b"[\n").unwrap();
        me
    }

    /// The pid of i3blocks, which leads the process group of the blocks it runs.
    pub fn pid(&self) -> i32 {
        self.group.pid()
    }

    /// Waits for the handoff block to show `want` (full text); returns it with its colour.
    pub fn wait_for(&mut self, want: &str, timeout: Duration) -> Shown {
        self.wait_for_block("handoff", want, timeout).0
    }

    /// Waits for the block named `name` to show `want`; returns it and the time its
    /// status line with that text first came out of i3blocks.
    pub fn wait_for_block(&mut self, name: &str, want: &str, timeout: Duration) -> (Shown, SystemTime) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((s, at)) = self.blocks.get(name)
                && s.full_text == want
            {
                return (s.clone(), *at);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, v)) => {
                    for b in v.as_array().into_iter().flatten() {
                        let Some(n) = b["name"].as_str() else { continue };
                        let shown = Shown {
                            full_text: b["full_text"].as_str().unwrap_or_default().to_owned(),
                            short_text: b["short_text"].as_str().map(str::to_owned),
                            color: b["color"].as_str().map(str::to_owned),
                            urgent: b["urgent"].as_bool().unwrap_or(false),
                        };
                        if n == "handoff" && b["instance"] == "gpu" {
                            self.last = Some(shown.clone());
                        }
                        let changed = self
                            .blocks
                            .get(n)
                            .is_none_or(|(old, _)| old.full_text != shown.full_text);
                        if changed {
                            self.blocks.insert(n.to_owned(), (shown, at));
                        } else if let Some(e) = self.blocks.get_mut(n) {
                            e.0 = shown;
                        }
                    }
                }
                Err(_) => panic!(
                    "i3blocks did not show {want:?} in block {name} within {timeout:?}; last: {:?}",
                    self.blocks.get(name).map(|(s, _)| s)
                ),
            }
        }
    }

    /// A click as i3bar sends it: the whole line in one `write(2)`.
    ///
    /// i3blocks 1.4 reads stdin on SIGIO until `EAGAIN` and takes whatever it has read by
    /// then as a complete line. `writeln!` on the unbuffered `ChildStdin` issues one write
    /// per formatting piece (serde_json's `Display` writes every key, quote and colon
    /// apart), so i3blocks could parse `,{"button` and then `":3,"instance":…` as two
    /// clicks: the first matches no block, the second runs the block with an empty
    /// `BLOCK_BUTTON` — a refresh instead of the click. i3bar writes each event at once;
    /// a line this short (< `PIPE_BUF`) is then also atomic on the pipe.
    pub fn click(&mut self, button: u8) {
        self.click_block("handoff", "gpu", button);
    }

    /// [`I3blocks::click`] on the block named `name` with i3blocks' `instance`.
    pub fn click_block(&mut self, name: &str, instance: &str, button: u8) {
        let ev = serde_json::json!({"name": name, "instance": instance, "button": button, "x": 1, "y": 1});
        let sep = if self.clicks == 0 { "" } else { "," };
        self.clicks += 1;
        let line = format!("{sep}{ev}\n");
        assert!(
            line.len() < libc::PIPE_BUF,
            "a click line fits one atomic pipe write"
        );
        self.stdin.write_all(line.as_bytes()).unwrap();
    }
}

/// A private session bus, dunst on Xvfb owning `org.freedesktop.Notifications`, and
/// `dbus-monitor` recording every `Notify` call.
pub struct Notifications {
    /// The private session bus's address (`DBUS_SESSION_BUS_ADDRESS` for what notifies).
    pub address: String,
    seen: Arc<Mutex<String>>,
    _monitor: Group,
    _dunst: Group,
    _x: Group,
    bus_pid: i32,
}

impl Notifications {
    /// Starts the bus, Xvfb, dunst and the monitor, their files in `dir`. None when a tool is
    /// missing outside CI (under `CI=true` that fails the test).
    pub fn start(dir: &Path) -> Option<Notifications> {
        if !have_all(&[
            "dbus-daemon",
            "dbus-monitor",
            "dbus-send",
            "dunst",
            "dunstctl",
            "Xvfb",
            "notify-send",
        ]) {
            return None;
        }
        let socket = dir.join("bus");
        let address = format!("unix:path={}", socket.display());
        // A bus config without service directories, so nothing auto-starts on it.
        let conf = dir.join("bus.conf");
        std::fs::write(
            &conf,
            format!("<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig><type>session</type><listen>{address}</listen>\
             <policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/><allow eavesdrop=\"true\"/>\
             <allow own=\"*\"/><allow user=\"*\"/></policy></busconfig>\n"),
        )
        .unwrap();
        let out = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .arg("--fork")
            .arg("--print-pid")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dbus-daemon: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bus_pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let (x, display) = crate::xvfb::start(dir, "640x480x24");
        let x = Group(x);
        let dunst = Group::spawn(
            Command::new("dunst")
                .env("DBUS_SESSION_BUS_ADDRESS", &address)
                .env("DISPLAY", &display)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("dunst.log")).unwrap()),
        );
        let owned = wait_until(Duration::from_secs(10), || {
            Command::new("dbus-send")
                .env("DBUS_SESSION_BUS_ADDRESS", &address)
                .args([
                    "--session",
                    "--print-reply",
                    "--dest=org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus.NameHasOwner",
                    "string:org.freedesktop.Notifications",
                ])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("boolean true"))
        });
        assert!(owned, "dunst did not take org.freedesktop.Notifications");
        let mut monitor = Group::spawn(
            // dbus-monitor block-buffers a pipe: line-buffer it.
            Command::new("stdbuf")
                .args(["-oL", "dbus-monitor", "--address", &address])
                .arg("interface='org.freedesktop.Notifications',member='Notify'")
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let seen = Arc::new(Mutex::new(String::new()));
        let out = monitor.0.stdout.take().unwrap();
        let s = seen.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                s.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        // dbus-monitor prints NameAcquired after Hello and NameLost once BecomeMonitor
        // made it a monitor: only then does it see every Notify call.
        let listening = wait_until(Duration::from_secs(10), || {
            seen.lock().unwrap().contains("member=NameLost")
        });
        assert!(listening, "dbus-monitor did not become a monitor");
        Some(Notifications {
            address,
            seen,
            _monitor: monitor,
            _dunst: dunst,
            _x: x,
            bus_pid,
        })
    }

    /// Everything `dbus-monitor` saw so far.
    pub fn seen(&self) -> String {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until a complete `Notify` call contains every one of `words`; returns the
    /// monitor text.
    ///
    /// dbus-monitor prints a call over many lines and the reader thread appends them as
    /// they come, so a call counts only once its last argument (`int32` expire timeout)
    /// is in: otherwise a check of the hints (urgency) can read a call cut in half.
    pub fn wait_for(&self, words: &[&str], timeout: Duration) -> String {
        let ok = wait_until(timeout, || {
            let s = self.seen();
            s.split("member=Notify")
                .skip(1)
                .any(|call| call.contains("\n   int32 ") && words.iter().all(|w| call.contains(w)))
        });
        assert!(
            ok,
            "no notification with {words:?} within {timeout:?}; dbus-monitor saw:\n{}",
            self.seen()
        );
        self.seen()
    }

    /// `dunstctl` on this bus.
    pub fn dunstctl(&self, args: &[&str]) -> bool {
        Command::new("dunstctl")
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        // SAFETY: the bus daemon this value started (it forked away from our group).
        unsafe { libc::kill(self.bus_pid, libc::SIGTERM) };
    }
}
