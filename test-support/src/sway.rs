//! A real sway on the headless wlroots backend, for waybar and for Looking Glass placed
//! through sway's IPC (DESIGN.md, "Testing against real things").
//!
//! sway refuses to run as root, so it runs as `nobody` (uid 65534) through `setpriv`, with a
//! runtime dir of its own, `<dir>/run/user/65534` (mode 0700, owned by that uid), and
//! `WLR_BACKENDS=headless` with one output, software rendering (`WLR_RENDERER=pixman`) and
//! no input devices. Everything it starts (`exec` in its config) runs as that user too and
//! carries a [`Stragglers`] mark (sway double-forks it out of its process group); sway and
//! all of it are killed on drop. `grim` takes screenshots as the same user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::process::{Group, Stragglers};
use crate::tools::{have_all, is_root, required};
use crate::wait::wait_until;

/// The user sway and its clients run as.
pub const UID: u32 = 65534;

/// A running headless sway.
pub struct Sway {
    /// Its runtime dir (`XDG_RUNTIME_DIR` of its clients).
    pub runtime: PathBuf,
    /// Its IPC socket (`SWAYSOCK`).
    pub socket: PathBuf,
    /// Its Wayland display name (`WAYLAND_DISPLAY`).
    pub display: String,
    dir: PathBuf,
    _group: Group,
    /// What sway started: it double-forks its `exec`s out of its process group.
    _started: Stragglers,
}

/// `setpriv` to [`UID`] with no supplementary groups: the prefix of every command run as
/// sway's user.
pub fn as_user() -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={UID}"),
        &format!("--regid={UID}"),
        "--clear-groups",
        "--",
    ]);
    c
}

/// Makes `path` and every directory above it up to `/` readable (and searchable) by
/// sway's user: tempfile's dirs are 0700.
pub fn open_up(path: &Path) {
    let mut p = Some(path);
    while let Some(d) = p {
        if d == Path::new("/") {
            break;
        }
        let _ = Command::new("chmod").arg("a+rX").arg(d).status();
        p = d.parent();
    }
}

impl Sway {
    /// Starts sway with `config` (its text; `exec` lines start the clients) in `dir`,
    /// with an output of `width`x`height`. None when a tool is missing outside CI.
    pub fn start(
        dir: &Path,
        config: &str,
        width: u32,
        height: u32,
        extra_env: &[(&str, &str)],
    ) -> Option<Sway> {
        if !is_root() {
            required("sway runs as another user through setpriv, which needs root");
            return None;
        }
        if !have_all(&["sway", "swaymsg", "setpriv", "grim"]) {
            return None;
        }
        open_up(dir);
        // Laid out like /run/user/<uid>, so a test can find sway's socket the way
        // `handoff lg` does from SSH (runtime root `dir/run/user`).
        let runtime = dir.join("run/user").join(UID.to_string());
        std::fs::create_dir_all(&runtime).unwrap();
        let chown = Command::new("chown")
            .arg(format!("{UID}:{UID}"))
            .arg(&runtime)
            .status()
            .unwrap();
        assert!(chown.success());
        Command::new("chmod").arg("0700").arg(&runtime).status().unwrap();
        let conf = dir.join("sway.conf");
        std::fs::write(
            &conf,
            format!("output HEADLESS-1 resolution {width}x{height} position 0,0\n{config}"),
        )
        .unwrap();
        Command::new("chmod").arg("a+r").arg(&conf).status().unwrap();
        let log = dir.join("sway.log");
        let mut cmd = as_user();
        cmd.arg("sway")
            .arg("-c")
            .arg(&conf)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("WLR_BACKENDS", "headless")
            .env("WLR_HEADLESS_OUTPUTS", "1")
            .env("WLR_LIBINPUT_NO_DEVICES", "1")
            .env("WLR_RENDERER", "pixman")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let started = Stragglers(format!("sway-{}-{}", std::process::id(), runtime.display()));
        cmd.env(Stragglers::VAR, &started.0);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let group = Group::spawn(&mut cmd);
        let mut socket = None;
        let up = wait_until(Duration::from_secs(15), || {
            socket = std::fs::read_dir(&runtime).ok().and_then(|d| {
                d.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("sway-ipc."))
                })
            });
            socket.is_some() && runtime.join("wayland-1").exists()
        });
        assert!(
            up,
            "sway did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Some(Sway {
            runtime,
            socket: socket.unwrap(),
            display: "wayland-1".into(),
            dir: dir.to_owned(),
            _group: group,
            _started: started,
        })
    }

    /// `swaymsg` with `args` on this sway.
    pub fn msg(&self, args: &[&str]) -> Output {
        Command::new("swaymsg")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// The environment a client of this sway needs.
    pub fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        vec![
            ("XDG_RUNTIME_DIR", self.runtime.clone().into()),
            ("WAYLAND_DISPLAY", self.display.clone().into()),
            ("SWAYSOCK", self.socket.clone().into()),
        ]
    }

    /// A screenshot of the whole output into `png` (grim runs as sway's user, so it writes
    /// into the test dir and the result is copied).
    pub fn screenshot(&self, png: &Path) {
        let tmp = self.dir.join("grim.png");
        let _ = std::fs::remove_file(&tmp);
        let out = as_user().arg("grim").arg(&tmp).envs(self.env()).output().unwrap();
        assert!(
            out.status.success(),
            "grim: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::copy(&tmp, png).unwrap();
    }

    /// The mark (`HANDOFF_TEST_MARK`) that everything this sway started carries.
    pub fn mark(&self) -> &Stragglers {
        &self._started
    }

    /// sway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sway.log")).unwrap_or_default()
    }

    /// A pointer for this sway, so that clients can be clicked ([`Pointer::click`]).
    ///
    /// A headless sway has no input device, so its seat has no pointer capability and no
    /// client binds a `wl_pointer`: sway's `seat - cursor` commands then succeed and reach
    /// nobody. wayvnc (a VNC server for wlroots compositors, packaged in Debian 12, unlike
    /// `wlrctl`) creates a virtual pointer through the `wlr-virtual-pointer` protocol when
    /// it starts; with that device in the seat, `seat - cursor set/press/release` click
    /// for real. wayvnc listens on a Unix socket in the test dir (no TCP port) and runs as
    /// sway's user; it is killed when the [`Pointer`] drops. None when wayvnc is missing
    /// outside CI.
    pub fn pointer(&self) -> Option<Pointer<'_>> {
        if !have_all(&["wayvnc"]) {
            return None;
        }
        let conf = self.dir.join("wayvnc.conf");
        std::fs::write(&conf, "").unwrap();
        Command::new("chmod").arg("a+r").arg(&conf).status().unwrap();
        let log = self.dir.join("wayvnc.log");
        let group = Group::spawn(
            as_user()
                .arg("wayvnc")
                .arg("-C")
                .arg(&conf)
                .arg("-u")
                .arg(self.runtime.join("wayvnc.sock"))
                .envs(self.env())
                .env("HOME", &self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        let has_pointer = || {
            let out = self.msg(&["-t", "get_seats"]);
            let seats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            seats.as_array().into_iter().flatten().any(|s| {
                s["devices"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|d| d["type"] == "pointer")
            })
        };
        assert!(
            wait_until(Duration::from_secs(10), has_pointer),
            "wayvnc gave sway no pointer:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Some(Pointer {
            sway: self,
            _wayvnc: group,
        })
    }
}

/// A pointer in a headless sway's seat (see [`Sway::pointer`]).
pub struct Pointer<'a> {
    sway: &'a Sway,
    _wayvnc: Group,
}

impl Pointer<'_> {
    /// Moves the pointer to `x`,`y` (layout pixels) and clicks `button` (1 left, 2 middle,
    /// 3 right) there, as a person's mouse would.
    pub fn click(&self, x: u32, y: u32, button: u8) {
        let button = format!("button{button}");
        let pos = [x.to_string(), y.to_string()];
        for args in [
            vec!["seat", "-", "cursor", "set", &pos[0], &pos[1]],
            vec!["seat", "-", "cursor", "press", &button],
            vec!["seat", "-", "cursor", "release", &button],
        ] {
            let out = self.sway.msg(&args);
            assert!(
                out.status.success(),
                "swaymsg {args:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            // The client sees enter, press and release as separate events, as from a mouse.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
