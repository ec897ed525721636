//! A small, synchronous i3 IPC client, and how to find the desktop session's i3 (or sway)
//! socket. sway speaks the same protocol, so everything here works with both.
//!
//! Why hand-written rather than `tokio-i3ipc` or `swayipc`: the protocol is a 14-byte
//! header (`"i3-ipc"`, u32 length, u32 type, native endian) and a JSON body, and handoff
//! needs four requests (RUN_COMMAND, GET_TREE, GET_WORKSPACES, SUBSCRIBE) plus reading
//! window events. A blocking client over a `UnixStream` does that in a page, keeps tokio
//! out of the CLI, and reads the tree as plain JSON, so the fields i3 4.22 sends
//! (`window_properties`) and the ones only sway sends (`app_id` of a Wayland window) are
//! never lost to a typed model written for the other one (the `i3ipc` crate loses
//! `window_properties` on i3 4.22).
//!
//! Finding the socket ([`find`]) reads, in order: `I3SOCK`; `SWAYSOCK`; the sockets i3 and
//! sway put in the caller's runtime directory (`/run/user/<uid>/i3/ipc-socket.<pid>`,
//! `/run/user/<uid>/sway-ipc.<uid>.<pid>.sock`, the root injectable); and, when `DISPLAY`
//! is set, the X root window's `I3_SOCKET_PATH` property, read by spawning `xprop -root`
//! (x11-utils) rather than linking an X library. The first socket that answers wins. That
//! is what lets `ssh host handoff lg` reach the desktop, under i3 or sway.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

const MAGIC: &[u8; 6] = b"i3-ipc";
pub const RUN_COMMAND: u32 = 0;
pub const GET_WORKSPACES: u32 = 1;
pub const SUBSCRIBE: u32 = 2;
pub const GET_TREE: u32 = 4;
pub const GET_VERSION: u32 = 7;
/// Event replies have the high bit set; the window event is number 3, the tick event 7.
pub const EVENT_WINDOW: u32 = 0x8000_0003;
pub const EVENT_TICK: u32 = 0x8000_0007;

/// How long one request may take before i3 counts as not answering.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum I3Error {
    #[error("cannot connect to i3 at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to i3 at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("i3 at {path} sent something that is not its IPC protocol: {why}")]
    Protocol { path: PathBuf, why: String },
    #[error("i3 at {path} refused the command {command:?}: {why}")]
    Command {
        path: PathBuf,
        command: String,
        why: String,
    },
}

/// One connection to i3.
pub struct I3 {
    stream: UnixStream,
    path: PathBuf,
}

impl I3 {
    pub fn connect(path: &Path) -> Result<I3, I3Error> {
        let stream = UnixStream::connect(path).map_err(|source| I3Error::Connect {
            path: path.to_owned(),
            source,
        })?;
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
        Ok(I3 {
            stream,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: io::Error) -> I3Error {
        I3Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn send(&mut self, kind: u32, payload: &[u8]) -> Result<(), I3Error> {
        let mut msg = Vec::with_capacity(14 + payload.len());
        msg.extend_from_slice(MAGIC);
        msg.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg).map_err(|e| self.io(e))
    }

    /// Reads one message: (type, JSON body).
    fn recv(&mut self) -> Result<(u32, Value), I3Error> {
        let mut header = [0u8; 14];
        self.stream.read_exact(&mut header).map_err(|e| self.io(e))?;
        if &header[..6] != MAGIC {
            return Err(I3Error::Protocol {
                path: self.path.clone(),
                why: "no \"i3-ipc\" magic".into(),
            });
        }
        let len = u32::from_ne_bytes(header[6..10].try_into().unwrap()) as usize;
        let kind = u32::from_ne_bytes(header[10..14].try_into().unwrap());
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).map_err(|e| self.io(e))?;
        let value = serde_json::from_slice(&body).map_err(|e| I3Error::Protocol {
            path: self.path.clone(),
            why: format!("reply is not JSON: {e}"),
        })?;
        Ok((kind, value))
    }

    /// A request and its reply; events arriving in between (after SUBSCRIBE) are skipped.
    pub fn request(&mut self, kind: u32, payload: &str) -> Result<Value, I3Error> {
        self.send(kind, payload.as_bytes())?;
        loop {
            let (k, v) = self.recv()?;
            if k == kind {
                return Ok(v);
            }
        }
    }

    pub fn version(&mut self) -> Result<String, I3Error> {
        let v = self.request(GET_VERSION, "")?;
        Ok(v["human_readable"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Whether this is sway rather than i3 (its GET_VERSION has `"variant": "sway"`).
    pub fn is_sway(&mut self) -> Result<bool, I3Error> {
        Ok(self.request(GET_VERSION, "")?["variant"] == "sway")
    }

    /// Runs an i3 command (which may be several, separated by `;`); an error names the
    /// first part i3 refused.
    pub fn command(&mut self, command: &str) -> Result<(), I3Error> {
        let v = self.request(RUN_COMMAND, command)?;
        let refused = v.as_array().into_iter().flatten().find(|r| r["success"] != true);
        if let Some(r) = refused {
            return Err(I3Error::Command {
                path: self.path.clone(),
                command: command.to_owned(),
                why: r["error"].as_str().unwrap_or("no reason given").to_owned(),
            });
        }
        Ok(())
    }

    pub fn tree(&mut self) -> Result<Value, I3Error> {
        self.request(GET_TREE, "")
    }

    pub fn workspaces(&mut self) -> Result<Value, I3Error> {
        self.request(GET_WORKSPACES, "")
    }

    /// Subscribes this connection to `events` (e.g. `["window"]`).
    pub fn subscribe(&mut self, events: &[&str]) -> Result<(), I3Error> {
        let v = self.request(SUBSCRIBE, &serde_json::to_string(events).unwrap())?;
        if v["success"] != true {
            return Err(I3Error::Protocol {
                path: self.path.clone(),
                why: format!("subscribing to {events:?} failed: {v}"),
            });
        }
        Ok(())
    }

    /// The next event before `deadline`, or None when the time is up.
    pub fn next_event(&mut self, deadline: Instant) -> Result<Option<(u32, Value)>, I3Error> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let _ = self.stream.set_read_timeout(Some(left));
        let got = self.recv();
        let _ = self.stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        match got {
            Ok(ev) => Ok(Some(ev)),
            Err(I3Error::Io { source, .. })
                if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Quotes `s` as one string argument for i3's command parser: inside double quotes i3
/// unescapes only `\"` and `\\`, and a quoted `;` or `,` does not end the command.
pub fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// A window found in i3's or sway's tree: a container holding an X window (X11 class and
/// instance) or, under sway, a Wayland window (its `app_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub con_id: u64,
    pub class: String,
    pub instance: String,
    /// A Wayland window's `app_id` (sway); empty for an X window.
    pub app_id: String,
    pub title: String,
    /// The workspace the window is on; None for the scratchpad or a bare output.
    pub workspace: Option<String>,
    pub focused: bool,
}

/// Every window in a GET_TREE reply, with the workspace each is on.
pub fn windows(tree: &Value) -> Vec<Window> {
    fn walk(node: &Value, ws: Option<&str>, out: &mut Vec<Window>) {
        let ws = if node["type"] == "workspace" {
            node["name"].as_str().filter(|n| !n.starts_with("__"))
        } else {
            ws
        };
        // An X window has a `window` id; a Wayland one (sway) has an `app_id` instead.
        let wayland = node["app_id"].is_string() && !node["window"].is_u64();
        if node["window"].is_u64() || wayland {
            let props = &node["window_properties"];
            let s = |k: &str| props[k].as_str().unwrap_or("").to_owned();
            out.push(Window {
                con_id: node["id"].as_u64().unwrap_or(0),
                class: s("class"),
                instance: s("instance"),
                app_id: node["app_id"].as_str().unwrap_or("").to_owned(),
                title: if wayland {
                    node["name"].as_str().unwrap_or("").to_owned()
                } else {
                    s("title")
                },
                workspace: ws.map(str::to_owned),
                focused: node["focused"] == true,
            });
        }
        for key in ["nodes", "floating_nodes"] {
            for child in node[key].as_array().into_iter().flatten() {
                walk(child, ws, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(tree, None, &mut out);
    out
}

impl Window {
    /// Whether the window's X class or instance, or its Wayland `app_id`, is `name`
    /// (ASCII case ignored, as clients differ in how they capitalise it).
    pub fn is(&self, name: &str) -> bool {
        [&self.class, &self.instance, &self.app_id]
            .iter()
            .any(|n| !n.is_empty() && n.eq_ignore_ascii_case(name))
    }

    /// The window in a window event's `container`.
    pub fn from_container(con: &Value) -> Option<Window> {
        windows(con).into_iter().next()
    }
}

/// The name of the focused workspace in a GET_WORKSPACES reply.
pub fn focused_workspace(workspaces: &Value) -> Option<String> {
    workspaces
        .as_array()?
        .iter()
        .find(|w| w["focused"] == true)
        .and_then(|w| w["name"].as_str())
        .map(str::to_owned)
}

/// Where to look for the desktop's i3; [`Session::from_env`] for the real one.
#[derive(Debug, Clone)]
pub struct Session {
    /// `I3SOCK`.
    pub i3sock: Option<OsString>,
    /// `SWAYSOCK`.
    pub swaysock: Option<OsString>,
    /// The parent of per-user runtime directories, `/run/user`.
    pub runtime_root: PathBuf,
    pub uid: u32,
    /// `DISPLAY` and `WAYLAND_DISPLAY`: a desktop reachable without i3.
    pub display: Option<OsString>,
    pub wayland_display: Option<OsString>,
}

impl Session {
    pub fn from_env() -> Session {
        let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        Session {
            i3sock: nonempty("I3SOCK"),
            swaysock: nonempty("SWAYSOCK"),
            runtime_root: PathBuf::from("/run/user"),
            uid: nix::unistd::getuid().as_raw(),
            display: nonempty("DISPLAY"),
            wayland_display: nonempty("WAYLAND_DISPLAY"),
        }
    }

    /// Whether a program started from here would show on some desktop.
    pub fn has_display(&self) -> bool {
        self.display.is_some() || self.wayland_display.is_some()
    }
}

/// The first i3 that answers, and every place looked at (for the message when none
/// does).
pub fn find(session: &Session) -> Result<I3, Vec<String>> {
    let mut tried = Vec::new();
    let mut candidates: Vec<(PathBuf, &'static str)> = Vec::new();
    if let Some(s) = &session.i3sock {
        candidates.push((PathBuf::from(s), "I3SOCK"));
    }
    if let Some(s) = &session.swaysock {
        candidates.push((PathBuf::from(s), "SWAYSOCK"));
    }
    let runtime = session.runtime_root.join(session.uid.to_string());
    let dir = runtime.join("i3");
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            let mut socks: Vec<(std::time::SystemTime, PathBuf)> = entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ipc-socket."))
                .map(|e| {
                    let t = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    (t, e.path())
                })
                .collect();
            // The newest first: an older socket is usually left over from a crashed i3.
            socks.sort_by_key(|s| std::cmp::Reverse(s.0));
            candidates.extend(socks.into_iter().map(|(_, p)| (p, "runtime dir")));
            if candidates.is_empty() {
                tried.push(format!("{}: no ipc-socket.* there", dir.display()));
            }
        }
        Err(e) => tried.push(format!("{}: {e}", dir.display())),
    }
    // sway's sockets sit in the runtime dir itself: sway-ipc.<uid>.<pid>.sock.
    let sway_prefix = format!("sway-ipc.{}.", session.uid);
    let mut sway: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&runtime)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with(&sway_prefix) && n.ends_with(".sock")
        })
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    sway.sort_by_key(|s| std::cmp::Reverse(s.0));
    if sway.is_empty() {
        tried.push(format!("{}: no {sway_prefix}*.sock there", runtime.display()));
    }
    candidates.extend(sway.into_iter().map(|(_, p)| (p, "runtime dir")));
    for (path, from) in candidates {
        match I3::connect(&path).and_then(|mut c| c.version().map(|_| c)) {
            Ok(c) => return Ok(c),
            Err(e) => tried.push(format!("{from} {e}")),
        }
    }
    if let Some(display) = &session.display {
        match x_root_socket(display) {
            Ok(path) => match I3::connect(&path).and_then(|mut c| c.version().map(|_| c)) {
                Ok(c) => return Ok(c),
                Err(e) => tried.push(format!(
                    "I3_SOCKET_PATH on DISPLAY {}: {e}",
                    display.to_string_lossy()
                )),
            },
            Err(why) => tried.push(format!("DISPLAY {}: {why}", display.to_string_lossy())),
        }
    } else {
        tried.push("DISPLAY is not set, so no X root window to ask".into());
    }
    Err(tried)
}

/// The `I3_SOCKET_PATH` property of the X root window, via `xprop -root` (x11-utils).
fn x_root_socket(display: &std::ffi::OsStr) -> Result<PathBuf, String> {
    let out = std::process::Command::new("xprop")
        .args(["-root", "I3_SOCKET_PATH"])
        .env("DISPLAY", display)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run xprop (x11-utils) to read I3_SOCKET_PATH: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // I3_SOCKET_PATH(UTF8_STRING) = "/run/user/1000/i3/ipc-socket.1234"
    parse_xprop_string(&text).map(PathBuf::from).ok_or_else(|| {
        let err = String::from_utf8_lossy(&out.stderr);
        format!(
            "no I3_SOCKET_PATH on the root window ({})",
            err.trim().if_empty(text.trim())
        )
    })
}

trait IfEmpty {
    fn if_empty<'a>(&'a self, other: &'a str) -> &'a str;
}

impl IfEmpty for str {
    fn if_empty<'a>(&'a self, other: &'a str) -> &'a str {
        if self.is_empty() { other } else { self }
    }
}

/// The string value of one `xprop` property line.
pub fn parse_xprop_string(line: &str) -> Option<String> {
    let (_, value) = line.split_once(" = ")?;
    let value = value.trim();
    let inner = value.strip_prefix('"')?.strip_suffix('"')?;
    Some(inner.replace("\\\"", "\"").replace("\\\\", "\\"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_i3_parser() {
        assert_eq!(quote(r#"a "b" \c; d"#), r#""a \"b\" \\c; d""#);
    }

    #[test]
    fn reads_xprop_line() {
        assert_eq!(
            parse_xprop_string("I3_SOCKET_PATH(UTF8_STRING) = \"/run/user/1000/i3/ipc-socket.77\"\n")
                .as_deref(),
            Some("/run/user/1000/i3/ipc-socket.77")
        );
        assert_eq!(parse_xprop_string("I3_SOCKET_PATH:  not found.\n"), None);
    }

    #[test]
    fn finds_windows_and_their_workspace() {
        let tree = serde_json::json!({"type": "root", "nodes": [{"type": "output", "nodes": [
            {"type": "workspace", "name": "10", "nodes": [], "floating_nodes": [
                {"type": "floating_con", "nodes": [{"id": 7, "window": 4194305, "focused": true,
                 "window_properties": {"class": "looking-glass-client", "instance": "xterm", "title": "t"}}]}
            ]}
        ]}]});
        let w = windows(&tree);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].workspace.as_deref(), Some("10"));
        assert!(w[0].is("Looking-Glass-Client"));
        assert!(w[0].focused);
    }

    #[test]
    fn finds_a_wayland_window_of_sway_by_its_app_id() {
        let tree = serde_json::json!({"type": "root", "nodes": [{"type": "output", "nodes": [
            {"type": "workspace", "name": "10", "nodes": [
                {"type": "con", "id": 9, "app_id": "looking-glass-client", "window": null,
                 "name": "Looking Glass (client)", "focused": false, "nodes": []}
            ], "floating_nodes": []}
        ]}]});
        let w = windows(&tree);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!((w[0].con_id, w[0].workspace.as_deref()), (9, Some("10")));
        assert!(w[0].is("looking-glass-client"));
        assert!(!w[0].is(""), "an empty class matches nothing");
        assert_eq!(w[0].title, "Looking Glass (client)");
    }
}
