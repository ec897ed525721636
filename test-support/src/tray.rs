//! A real desktop for the tray's tests: Xvfb, a private session bus, dunst as the
//! notification server, xfce4-panel's systray as the StatusNotifierWatcher and host, and
//! `dbus-monitor` recording every notification sent. Each runs in its own process group
//! and is killed (group and all) on drop; everything lives in one temp dir.
//!
//! Traps (ARCHITECTURE.md): xfce4-panel needs a seeded panel config (xfconf, here an XML file
//! under `XDG_CONFIG_HOME`), `--disable-wm-check` without a window manager and
//! `NO_AT_BRIDGE=1`; dunst needs a display; `dunstctl` talks over the bus in
//! `DBUS_SESSION_BUS_ADDRESS`. A bus with the standard service dirs auto-starts dunst
//! and xfconfd, so dunst is started here, with its config, before anything notifies.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zbus::blocking::Connection;
use zbus::zvariant::{OwnedValue, Structure, Value};

use crate::process::kill_group;
use crate::tools::have_all;
use crate::wait::wait_for;

/// The StatusNotifierWatcher's bus name and interface.
pub const WATCHER: &str = "org.kde.StatusNotifierWatcher";
/// The StatusNotifierItem interface.
pub const ITEM: &str = "org.kde.StatusNotifierItem";
/// The dbusmenu interface an item's menu is read through.
pub const MENU: &str = "com.canonical.dbusmenu";

/// The tray's desktop session (see the module header); everything in it is killed on drop.
pub struct Session {
    /// The session's temp dir: home, XDG dirs, logs (`<name>.log`, `<name>.out`).
    pub dir: tempfile::TempDir,
    /// The Xvfb display (`:N`).
    pub display: String,
    /// The session bus's address.
    pub bus: String,
    xvfb: Child,
    bus_pid: i32,
    dunst: Option<Child>,
    panel: Option<Child>,
    monitor: Option<Child>,
    /// Processes started by the test under this session (the tray), killed on drop.
    pub others: Vec<Child>,
    /// The session's i3 (`I3SOCK`, as i3 sets it for what it starts), when it has one.
    pub i3sock: Option<PathBuf>,
}

const PANEL_XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<channel name="xfce4-panel" version="1.0">
  <property name="configver" type="int" value="2"/>
  <property name="panels" type="array">
    <value type="int" value="1"/>
    <property name="panel-1" type="empty">
      <property name="position" type="string" value="p=8;x=0;y=0"/>
      <property name="length" type="uint" value="100"/>
      <property name="position-locked" type="bool" value="true"/>
      <property name="size" type="uint" value="30"/>
      <property name="plugin-ids" type="array">
        <value type="int" value="1"/>
      </property>
    </property>
  </property>
  <property name="plugins" type="empty">
    <property name="plugin-1" type="string" value="systray">
      <property name="icon-size" type="int" value="22"/>
      <property name="square-icons" type="bool" value="false"/>
    </property>
  </property>
</channel>
"#;

const DUNSTRC: &str = r##"[global]
    font = DejaVu Sans 9
    width = 380
    height = 200
    origin = top-right
    offset = 8x8
    frame_width = 2
    frame_color = "#8a8a8a"
    word_wrap = yes
    format = "<b>%s</b>\n%b"
    dmenu = @DMENU@
    show_indicators = yes
[urgency_low]
    background = "#222222"
    foreground = "#ffffff"
[urgency_normal]
    background = "#222222"
    foreground = "#ffffff"
    timeout = 0
[urgency_critical]
    background = "#5a1010"
    foreground = "#ffffff"
    frame_color = "#e65100"
    timeout = 0
"##;

impl Session {
    /// Starts Xvfb (`width`×`height`), the session bus, dbus-monitor, dunst and
    /// xfce4-panel. None when a tool is missing outside CI (under `CI=true` that fails).
    pub fn start(width: u32, height: u32) -> Option<Session> {
        if !have_all(&[
            "Xvfb",
            "dbus-daemon",
            "dbus-monitor",
            "dunst",
            "dunstctl",
            "xfce4-panel",
            "import",
        ]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (xvfb, display) = crate::xvfb::start(dir.path(), &format!("{width}x{height}x24"));
        for d in ["config", "cache", "data", "runtime", "home"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let xml = dir.path().join("config/xfce4/xfconf/xfce-perchannel-xml");
        fs::create_dir_all(&xml).unwrap();
        fs::write(xml.join("xfce4-panel.xml"), PANEL_XML).unwrap();
        // Services the bus activates (xfconfd) inherit its environment: give it the
        // session's, so xfconfd reads the seeded panel config and not root's.
        let d = dir.path();
        let out = Command::new("dbus-daemon")
            .env("HOME", d.join("home"))
            .env("XDG_CONFIG_HOME", d.join("config"))
            .env("XDG_CACHE_HOME", d.join("cache"))
            .env("XDG_DATA_HOME", d.join("data"))
            .env("XDG_RUNTIME_DIR", d.join("runtime"))
            .env("DISPLAY", &display)
            .args(["--session", "--fork", "--print-address=1", "--print-pid=1"])
            .arg(format!(
                "--address=unix:path={}",
                dir.path().join("bus").display()
            ))
            .stderr(Stdio::inherit())
            .output()
            .expect("run dbus-daemon");
        assert!(out.status.success(), "dbus-daemon: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let bus = lines.next().unwrap().to_owned();
        let bus_pid: i32 = lines.next().unwrap().trim().parse().unwrap();
        let mut s = Session {
            dir,
            display,
            bus,
            xvfb,
            bus_pid,
            dunst: None,
            panel: None,
            monitor: None,
            others: Vec::new(),
            i3sock: None,
        };
        s.start_monitor();
        s.start_dunst();
        s.start_panel();
        Some(s)
    }

    /// The environment every process of this session gets.
    pub fn env(&self, c: &mut Command) {
        let d = self.dir.path();
        c.env("DISPLAY", &self.display)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus)
            .env("HOME", d.join("home"))
            .env("XDG_CONFIG_HOME", d.join("config"))
            .env("XDG_CACHE_HOME", d.join("cache"))
            .env("XDG_DATA_HOME", d.join("data"))
            .env("XDG_RUNTIME_DIR", d.join("runtime"))
            .env("NO_AT_BRIDGE", "1")
            .env_remove("WAYLAND_DISPLAY");
        match &self.i3sock {
            Some(s) => c.env("I3SOCK", s),
            None => c.env_remove("I3SOCK"),
        };
    }

    /// Starts `c` in the session, in a process group of its own, its stdout in
    /// `<log>.out` and its stderr in `<log>.log`. The caller ends it (or puts it in
    /// [`Session::others`]).
    pub fn spawn(&self, c: &mut Command, log: &str) -> Child {
        self.env(c);
        c.stdin(Stdio::null())
            .stdout(fs::File::create(self.dir.path().join(format!("{log}.out"))).unwrap())
            .stderr(fs::File::create(self.dir.path().join(format!("{log}.log"))).unwrap())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {log}: {e}"))
    }

    /// Starts the tray binary `tray` (`-v`, its log `tray.log`) on `config`, ended with the
    /// session; the caller waits for it with [`find_item`] or its own way.
    pub fn spawn_tray(&mut self, tray: &str, config: &Path) {
        let mut c = Command::new(tray);
        c.arg("-v").env("HANDOFF_CONFIG", config);
        let child = self.spawn(&mut c, "tray");
        self.others.push(child);
    }

    /// [`Session::spawn_tray`], then the bus connection and the item once the panel has it.
    pub fn start_tray(&mut self, tray: &str, config: &Path) -> (Connection, Item) {
        self.spawn_tray(tray, config);
        let conn = self.conn();
        let item = find_item(self, &conn);
        (conn, item)
    }

    /// What the process started as `name` wrote to stderr so far.
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn start_monitor(&mut self) {
        let mut c = Command::new("dbus-monitor");
        c.arg("--address")
            .arg(&self.bus)
            .arg("interface='org.freedesktop.Notifications'");
        let child = self.spawn(&mut c, "notifications");
        self.monitor = Some(child);
        // dbus-monitor prints its own NameAcquired first; wait for it so nothing is missed.
        wait_for(Duration::from_secs(10), "dbus-monitor to attach", || {
            fs::read_to_string(self.dir.path().join("notifications.out")).is_ok_and(|t| !t.is_empty())
        });
    }

    fn start_dunst(&mut self) {
        // dunst's context menu ("dunstctl context") runs this instead of dmenu: it picks the
        // action the test asks for through the file `dmenu-pick`.
        let pick = self.dir.path().join("dmenu-pick");
        let script = self.dir.path().join("dmenu.sh");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\ntee -a {}/dmenu-offered | grep -m1 -F \"$(cat {})\"\n",
                self.dir.path().display(),
                pick.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let rc = self.dir.path().join("dunstrc");
        fs::write(&rc, DUNSTRC.replace("@DMENU@", &script.display().to_string())).unwrap();
        let mut c = Command::new("dunst");
        c.arg("-config").arg(&rc);
        self.dunst = Some(self.spawn(&mut c, "dunst"));
        let conn = self.conn();
        wait_for(
            Duration::from_secs(10),
            "dunst to own org.freedesktop.Notifications",
            || has_owner(&conn, "org.freedesktop.Notifications"),
        );
    }

    /// Starts xfce4-panel and waits for its StatusNotifierWatcher on the bus.
    pub fn start_panel(&mut self) {
        let mut c = Command::new("xfce4-panel");
        c.arg("--disable-wm-check");
        self.panel = Some(self.spawn(&mut c, "panel"));
        let conn = self.conn();
        wait_for(
            Duration::from_secs(30),
            "xfce4-panel's StatusNotifierWatcher",
            || has_owner(&conn, WATCHER),
        );
    }

    /// Kills xfce4-panel (its process group) and waits until the watcher's name is gone.
    pub fn kill_panel(&mut self) {
        if let Some(mut p) = self.panel.take() {
            kill_group(&mut p);
        }
        let conn = self.conn();
        wait_for(Duration::from_secs(10), "the watcher to leave the bus", || {
            !has_owner(&conn, WATCHER)
        });
    }

    /// A new connection to the session bus.
    pub fn conn(&self) -> Connection {
        zbus::blocking::connection::Builder::address(self.bus.as_str())
            .unwrap()
            .build()
            .expect("connect to the test's session bus")
    }

    /// The watcher's `RegisteredStatusNotifierItems`.
    pub fn registered(&self, conn: &Connection) -> Vec<String> {
        get_prop(
            conn,
            WATCHER,
            "/StatusNotifierWatcher",
            WATCHER,
            "RegisteredStatusNotifierItems",
        )
        .ok()
        .and_then(|v| Vec::<String>::try_from(v).ok())
        .unwrap_or_default()
    }

    /// `(Notify calls so far, the monitor's whole text)`.
    pub fn notifications(&self) -> (Vec<Notify>, String) {
        let text = fs::read_to_string(self.dir.path().join("notifications.out")).unwrap_or_default();
        (parse_notify(&text), text)
    }

    /// The screen, cropped to `geometry` (`WxH+X+Y`), into `to`.
    pub fn screenshot(&self, to: &Path, geometry: Option<&str>) {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        let mut c = Command::new("import");
        c.args(["-window", "root"]);
        if let Some(g) = geometry {
            c.args(["-crop", g]);
        }
        c.arg(to).env("DISPLAY", &self.display);
        let st = c.status().expect("run import");
        assert!(st.success(), "import -window root {}", to.display());
    }

    /// `dunstctl <args>` on this session's bus.
    pub fn dunstctl(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new("dunstctl");
        c.args(args);
        self.env(&mut c);
        c.output().expect("run dunstctl")
    }

    /// Invokes the action labelled `label` of the newest notification through dunst's own
    /// context menu (the path a person's click takes), so dunst emits `ActionInvoked`.
    pub fn click_notification_action(&self, label: &str) {
        fs::write(self.dir.path().join("dmenu-pick"), label).unwrap();
        let out = self.dunstctl(&["context"]);
        assert!(out.status.success(), "dunstctl context: {out:?}");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for c in &mut self.others {
            kill_group(c);
        }
        for c in [&mut self.panel, &mut self.dunst, &mut self.monitor]
            .into_iter()
            .flatten()
        {
            kill_group(c);
        }
        // The bus, and what it activated (xfconfd; the accessibility bus of a GTK window):
        // `--fork` makes the daemon a process group leader, and activated services stay in
        // its group.
        // SAFETY: signalling the daemon we forked, and its group only when it leads one.
        unsafe {
            if libc::getpgid(self.bus_pid) == self.bus_pid {
                libc::kill(-self.bus_pid, libc::SIGTERM);
            } else {
                libc::kill(self.bus_pid, libc::SIGTERM);
            }
        }
        kill_group(&mut self.xvfb);
    }
}

/// Whether some connection owns `name` on the bus.
pub fn has_owner(conn: &Connection, name: &str) -> bool {
    conn.call_method(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        Some("org.freedesktop.DBus"),
        "NameHasOwner",
        &(name,),
    )
    .ok()
    .and_then(|r| r.body().deserialize::<bool>().ok())
    .unwrap_or(false)
}

/// One D-Bus property (`org.freedesktop.DBus.Properties.Get`).
pub fn get_prop(
    conn: &Connection,
    dest: &str,
    path: &str,
    iface: &str,
    name: &str,
) -> zbus::Result<OwnedValue> {
    let reply = conn.call_method(
        Some(dest),
        path,
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &(iface, name),
    )?;
    let v: OwnedValue = reply.body().deserialize()?;
    Ok(v)
}

/// Waits until the item's view satisfies `f`; returns it and how long it took.
pub fn wait_view(
    conn: &Connection,
    item: &Item,
    what: &str,
    mut f: impl FnMut(&ItemView) -> bool,
) -> ItemView {
    let t = Instant::now();
    loop {
        let v = item.view(conn);
        if f(&v) {
            eprintln!("  {what}: after {:?}", t.elapsed());
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}; the item shows {v:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first item registered with the watcher, waiting up to 20 s for it.
pub fn find_item(s: &Session, conn: &Connection) -> Item {
    let mut entry = None;
    wait_for(
        Duration::from_secs(20),
        "the tray to register with the watcher",
        || {
            entry = s.registered(conn).into_iter().next();
            entry.is_some()
        },
    );
    let (dest, path) = split_item(&entry.unwrap());
    Item { dest, path }
}

/// Our item as the watcher lists it: `(bus name, object path)`.
pub fn split_item(entry: &str) -> (String, String) {
    match entry.find('/') {
        Some(i) => (entry[..i].to_owned(), entry[i..].to_owned()),
        None => (entry.to_owned(), "/StatusNotifierItem".to_owned()),
    }
}

/// What the item shows, read over D-Bus.
#[derive(Debug, Clone)]
pub struct ItemView {
    /// The `IconName` property.
    pub icon_name: String,
    /// The `Title` property.
    pub title: String,
    /// The `Status` property (`Active`, `NeedsAttention`, …).
    pub status: String,
    /// The tooltip's title.
    pub tooltip_title: String,
    /// The tooltip's text.
    pub tooltip_text: String,
    /// The widths of the `IconPixmap` images.
    pub pixmap_sizes: Vec<i32>,
}

/// A StatusNotifierItem on the bus.
pub struct Item {
    /// Its bus name.
    pub dest: String,
    /// Its object path.
    pub path: String,
}

impl Item {
    fn prop(&self, conn: &Connection, name: &str) -> OwnedValue {
        get_prop(conn, &self.dest, &self.path, ITEM, name).unwrap_or_else(|e| panic!("Get {name}: {e}"))
    }

    /// What the item shows now.
    pub fn view(&self, conn: &Connection) -> ItemView {
        let s = |v: OwnedValue| String::try_from(v).unwrap();
        let tt = self.prop(conn, "ToolTip");
        let tt: Structure = tt.try_into().unwrap();
        let f = tt.fields();
        let text = |v: &Value| match v {
            Value::Str(s) => s.to_string(),
            other => panic!("not a string: {other:?}"),
        };
        let pix = self.prop(conn, "IconPixmap");
        let pix: Vec<(i32, i32, Vec<u8>)> = pix.try_into().unwrap();
        ItemView {
            icon_name: s(self.prop(conn, "IconName")),
            title: s(self.prop(conn, "Title")),
            status: s(self.prop(conn, "Status")),
            tooltip_title: text(&f[2]),
            tooltip_text: text(&f[3]),
            pixmap_sizes: pix.iter().map(|p| p.0).collect(),
        }
    }

    /// A left click on the icon, as the panel sends it: `Activate(x, y)`.
    pub fn activate(&self, conn: &Connection) {
        conn.call_method(
            Some(self.dest.as_str()),
            self.path.as_str(),
            Some(ITEM),
            "Activate",
            &(0i32, 0i32),
        )
        .expect("Activate");
    }

    /// The object path of the item's dbusmenu (its `Menu` property).
    pub fn menu_path(&self, conn: &Connection) -> String {
        let v = self.prop(conn, "Menu");
        zbus::zvariant::OwnedObjectPath::try_from(v).unwrap().to_string()
    }

    /// `AboutToShow(0)`: what a host calls as it opens the root menu.
    pub fn about_to_show(&self, conn: &Connection) {
        let path = self.menu_path(conn);
        conn.call_method(
            Some(self.dest.as_str()),
            path.as_str(),
            Some(MENU),
            "AboutToShow",
            &(0i32),
        )
        .expect("AboutToShow");
    }

    /// `GetLayout(0, -1, [])`, flattened: `(id, label, enabled, path of parent labels)`.
    pub fn menu(&self, conn: &Connection) -> Vec<MenuEntry> {
        let path = self.menu_path(conn);
        let reply = conn
            .call_method(
                Some(self.dest.as_str()),
                path.as_str(),
                Some(MENU),
                "GetLayout",
                &(0i32, -1i32, Vec::<String>::new()),
            )
            .expect("GetLayout");
        type Node = (i32, HashMap<String, OwnedValue>, Vec<OwnedValue>);
        let (_rev, (_id, _props, children)): (u32, Node) = reply.body().deserialize().unwrap();
        let mut out = Vec::new();
        for c in &children {
            walk(c, &mut Vec::new(), &mut out);
        }
        out
    }

    /// Clicks the entry whose label (mnemonic `__` undone) starts with `label`.
    pub fn click(&self, conn: &Connection, label: &str) -> MenuEntry {
        let menu = self.menu(conn);
        let e = menu
            .iter()
            .find(|e| e.label.starts_with(label))
            .unwrap_or_else(|| panic!("no menu entry {label:?} in {menu:#?}"))
            .clone();
        assert!(e.enabled, "menu entry {label:?} is disabled: {menu:#?}");
        let path = self.menu_path(conn);
        conn.call_method(
            Some(self.dest.as_str()),
            path.as_str(),
            Some(MENU),
            "Event",
            &(e.id, "clicked", Value::I32(0), 0u32),
        )
        .expect("dbusmenu Event");
        e
    }
}

/// One entry of the item's menu.
#[derive(Debug, Clone)]
pub struct MenuEntry {
    /// Its dbusmenu id (what a click sends).
    pub id: i32,
    /// Its label, with dbusmenu's `__` read back as `_`.
    pub label: String,
    /// Whether it can be clicked.
    pub enabled: bool,
    /// The labels of the submenus it is in, outermost first.
    pub parents: Vec<String>,
}

fn walk(v: &Value, parents: &mut Vec<String>, out: &mut Vec<MenuEntry>) {
    let v = match v {
        Value::Value(inner) => inner.as_ref(),
        v => v,
    };
    let Value::Structure(s) = v else { return };
    let f = s.fields();
    let id = match &f[0] {
        Value::I32(i) => *i,
        _ => return,
    };
    let props: HashMap<String, OwnedValue> = match f[1].try_clone() {
        Ok(p) => p.try_into().unwrap_or_default(),
        Err(_) => HashMap::new(),
    };
    let label = props
        .get("label")
        .and_then(|l| String::try_from(l.try_clone().ok()?).ok())
        .unwrap_or_default()
        .replace("__", "_");
    let enabled = props
        .get("enabled")
        .and_then(|b| bool::try_from(b.try_clone().ok()?).ok())
        .unwrap_or(true);
    if id != 0 {
        out.push(MenuEntry {
            id,
            label: label.clone(),
            enabled,
            parents: parents.clone(),
        });
    }
    if let Value::Array(children) = &f[2] {
        if id != 0 {
            parents.push(label);
        }
        for c in children.iter() {
            walk(c, parents, out);
        }
        if id != 0 {
            parents.pop();
        }
    }
}

/// One `Notify` call seen by dbus-monitor.
#[derive(Debug, Clone)]
pub struct Notify {
    /// The id of the notification it replaces (0: a new one).
    pub replaces_id: u32,
    /// The summary (title).
    pub summary: String,
    /// The body text.
    pub body: String,
    /// The actions, as `[key, label, key, label, …]`.
    pub actions: Vec<String>,
}

/// Parses dbus-monitor's text: a `method call … member=Notify` line, then its arguments
/// (app, replaces_id, icon, summary, body, actions, hints, timeout).
pub fn parse_notify(text: &str) -> Vec<Notify> {
    let mut out = Vec::new();
    let blocks = text.split("\nmethod call ").skip(1);
    for b in blocks {
        let head = b.lines().next().unwrap_or("");
        if !head.contains("member=Notify") {
            continue;
        }
        let strings: Vec<String> = string_args(b);
        let replaces_id = b
            .lines()
            .find_map(|l| l.trim().strip_prefix("uint32 "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        // strings: app, icon, summary, body, then the actions' keys and labels, then hints.
        let actions_part = b.split("array [").nth(1).unwrap_or("");
        let actions_part = actions_part.split(']').next().unwrap_or("");
        out.push(Notify {
            replaces_id,
            summary: strings.get(2).cloned().unwrap_or_default(),
            body: strings.get(3).cloned().unwrap_or_default(),
            actions: string_args(actions_part),
        });
    }
    out
}

/// The `string "…"` arguments of a dbus-monitor block, multi-line strings included.
fn string_args(b: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = b;
    while let Some(i) = rest.find("string \"") {
        rest = &rest[i + 8..];
        // dbus-monitor does not escape quotes; a string ends at `"` before a newline.
        let end = rest.find("\"\n").unwrap_or(rest.len());
        out.push(rest[..end].to_owned());
        rest = &rest[end..];
    }
    out
}

/// A workspace binary next to `beside` (the tray under test), built when missing or older
/// than its sources, as in a `cargo test -p handoff-tray` that did not build the other
/// packages ([`crate::bins::sibling`]).
pub fn built(beside: &str, package: &str, bin: &str) -> PathBuf {
    let sources: &[&str] = match package {
        "handoff" => &["src"],
        "handoff-block" => &["src", "i3blocks/src"],
        "handoff-details" => &["src", "details/src"],
        _ => &["src", "applet/src"],
    };
    crate::bins::sibling(Path::new(beside).parent().unwrap(), bin, package, sources)
}

/// Where screenshots go: `HANDOFF_SCREENSHOTS` (relative to the workspace root), else
/// `fallback`, a temp dir of the test. A test run never rewrites the pictures under
/// `docs/`; `scripts/refresh-screenshots.sh` does that, on purpose.
pub fn screenshots_dir(fallback: &Path) -> PathBuf {
    let dir = match std::env::var_os("HANDOFF_SCREENSHOTS") {
        Some(d) if Path::new(&d).is_relative() => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(d),
        Some(d) => PathBuf::from(d),
        None => fallback.to_owned(),
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
