//! The details window as an assistive technology sees it: GTK 4 publishes every widget on
//! the accessibility bus (AT-SPI), where a screen reader reads the labels and presses the
//! buttons. The tests do the same: read what the window says and press its buttons
//! (`org.a11y.atspi.Action.DoAction`: the button's "clicked"), in confirmation dialogs too.
//!
//! The accessibility bus is started by the session bus on demand (`org.a11y.Bus`,
//! at-spi2-core's launcher, in the session bus's process group); the session bus must run
//! with the test's `HOME` and `XDG_RUNTIME_DIR`, where the launcher puts its socket.
//!
//! GTK 4.8 quirk: `GetChildren` can return fewer children than `ChildCount`; the tree is
//! walked with `GetChildAtIndex`, which returns them all.

use std::time::{Duration, Instant};

use zbus::blocking::Connection;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

const ACCESSIBLE: &str = "org.a11y.atspi.Accessible";
const ROOT: &str = "/org/a11y/atspi/accessible/root";

/// One accessible object: where it lives, what it is, what it says.
#[derive(Debug, Clone)]
pub struct Node {
    /// The bus name of the application that owns it.
    pub dest: String,
    /// Its object path on the accessibility bus.
    pub path: OwnedObjectPath,
    /// Its role name (`push button`, `label`, `dialog`, …).
    pub role: String,
    /// Its accessible name: a button's or label's text.
    pub name: String,
    /// 1 for a window of the application, 2 for its children, ….
    pub depth: usize,
}

/// A connection to the accessibility bus, reading one application's widgets.
pub struct A11y {
    conn: Connection,
    /// The application's name on the accessibility bus (its `Name` property).
    app: String,
}

impl A11y {
    /// Connects to the accessibility bus of the session bus at `session_bus` (starting it
    /// if needed), to read the application named `app` (GTK uses the program's name).
    pub fn connect(session_bus: &str, app: &str) -> A11y {
        let session = zbus::blocking::connection::Builder::address(session_bus)
            .unwrap()
            .build()
            .expect("connect to the session bus");
        let reply = session
            .call_method(
                Some("org.a11y.Bus"),
                "/org/a11y/bus",
                Some("org.a11y.Bus"),
                "GetAddress",
                &(),
            )
            .expect("org.a11y.Bus.GetAddress (at-spi2-core's bus launcher)");
        let address: String = reply.body().deserialize().unwrap();
        let conn = zbus::blocking::connection::Builder::address(address.as_str())
            .unwrap()
            .build()
            .unwrap_or_else(|e| panic!("connect to the accessibility bus at {address}: {e}"));
        A11y {
            conn,
            app: app.to_owned(),
        }
    }

    fn prop(&self, dest: &str, path: &str, name: &str) -> Option<OwnedValue> {
        let r = self
            .conn
            .call_method(
                Some(dest),
                path,
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &(ACCESSIBLE, name),
            )
            .ok()?;
        r.body().deserialize().ok()
    }

    fn role(&self, dest: &str, path: &str) -> Option<String> {
        let r = self
            .conn
            .call_method(Some(dest), path, Some(ACCESSIBLE), "GetRoleName", &())
            .ok()?;
        r.body().deserialize().ok()
    }

    fn children(&self, dest: &str, path: &str) -> Vec<(String, OwnedObjectPath)> {
        let count = self
            .prop(dest, path, "ChildCount")
            .and_then(|v| i32::try_from(v).ok())
            .unwrap_or(0);
        (0..count)
            .filter_map(|i| {
                let r = self
                    .conn
                    .call_method(Some(dest), path, Some(ACCESSIBLE), "GetChildAtIndex", &(i,))
                    .ok()?;
                r.body().deserialize::<(String, OwnedObjectPath)>().ok()
            })
            .collect()
    }

    fn node(&self, dest: &str, path: OwnedObjectPath, depth: usize) -> Option<Node> {
        let role = self.role(dest, path.as_str())?;
        let name = self
            .prop(dest, path.as_str(), "Name")
            .and_then(|v| String::try_from(v).ok())
            .unwrap_or_default();
        Some(Node {
            dest: dest.to_owned(),
            path,
            role,
            name,
            depth,
        })
    }

    /// Every object of the application's windows (dialogs included), in document order.
    /// Objects that go away while being read (the window re-renders) are left out.
    pub fn nodes(&self) -> Vec<Node> {
        let mut out = Vec::new();
        for (dest, path) in self.children("org.a11y.atspi.Registry", ROOT) {
            let is_app = self
                .prop(&dest, path.as_str(), "Name")
                .and_then(|v| String::try_from(v).ok())
                .is_some_and(|n| n == self.app);
            if !is_app {
                continue;
            }
            let mut stack: Vec<(String, OwnedObjectPath, usize)> = self
                .children(&dest, path.as_str())
                .into_iter()
                .rev()
                .map(|(d, p)| (d, p, 1))
                .collect();
            while let Some((d, p, depth)) = stack.pop() {
                let kids = self.children(&d, p.as_str());
                if let Some(n) = self.node(&d, p, depth) {
                    out.push(n);
                }
                for (cd, cp) in kids.into_iter().rev() {
                    stack.push((cd, cp, depth + 1));
                }
            }
        }
        out
    }

    /// The application's windows (depth 1): the main window and open dialogs.
    pub fn windows(&self) -> Vec<Node> {
        self.nodes().into_iter().filter(|n| n.depth == 1).collect()
    }

    /// The texts of every label, in document order.
    pub fn texts(&self) -> Vec<String> {
        self.nodes()
            .into_iter()
            .filter(|n| n.role == "label")
            .map(|n| n.name)
            .collect()
    }

    /// Waits until a label's text satisfies `ok`; returns it.
    pub fn wait_text(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let t = Instant::now();
        loop {
            let texts = self.texts();
            if let Some(s) = texts.iter().find(|s| ok(s)) {
                return s.clone();
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no text with {what} in the window after 60 s; it says {texts:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Presses the enabled button labelled `label` that follows the first label whose text
    /// starts with `after` (None: anywhere), inside the window for which `window` holds.
    /// Retries while the window re-renders; panics when none appears within 60 s.
    pub fn press(&self, window: impl Fn(&Node) -> bool, after: Option<&str>, label: &str) {
        let t = Instant::now();
        loop {
            let nodes = self.nodes();
            if let Some(b) = find_button(&nodes, &window, after, label)
                && self.sensitive(&b)
                && self.do_action(&b)
            {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no enabled button {label:?}{} within 60 s; the application shows {:#?}",
                after.map(|a| format!(" after {a:?}")).unwrap_or_default(),
                nodes
                    .iter()
                    .map(|n| format!("{}{} {:?}", "  ".repeat(n.depth), n.role, n.name))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the object can be used now: SENSITIVE (24) in its state set. (GTK 4.8 sets
    /// ENABLED on some buttons and not on others; SENSITIVE follows `set_sensitive`.)
    fn sensitive(&self, n: &Node) -> bool {
        let Ok(r) = self.conn.call_method(
            Some(n.dest.as_str()),
            n.path.as_str(),
            Some(ACCESSIBLE),
            "GetState",
            &(),
        ) else {
            return false;
        };
        r.body()
            .deserialize::<Vec<u32>>()
            .is_ok_and(|s| s.first().is_some_and(|w| w & (1 << 24) != 0))
    }

    fn do_action(&self, n: &Node) -> bool {
        self.conn
            .call_method(
                Some(n.dest.as_str()),
                n.path.as_str(),
                Some("org.a11y.atspi.Action"),
                "DoAction",
                &(0i32,),
            )
            .ok()
            .and_then(|r| r.body().deserialize::<bool>().ok())
            .unwrap_or(false)
    }
}

/// The window each node belongs to is the last depth-1 node before it.
fn find_button(
    nodes: &[Node],
    window: &impl Fn(&Node) -> bool,
    after: Option<&str>,
    label: &str,
) -> Option<Node> {
    let mut in_window = false;
    let mut seen_anchor = after.is_none();
    for (i, n) in nodes.iter().enumerate() {
        if n.depth == 1 {
            in_window = window(n);
            seen_anchor = after.is_none();
            continue;
        }
        if !in_window {
            continue;
        }
        if !seen_anchor {
            seen_anchor = n.role == "label" && after.is_some_and(|a| n.name.starts_with(a));
            continue;
        }
        // A button's name is its label's text; GTK 4.8 names a dialog's buttons twice
        // over ("Cancel Cancel"), so the label inside counts too.
        let inner = nodes
            .get(i + 1)
            .is_some_and(|c| c.depth == n.depth + 1 && c.role == "label" && c.name == label);
        if n.role == "button" && (n.name == label || inner) {
            return Some(n.clone());
        }
    }
    None
}

/// The main window (its title starts with "handoff — ").
pub fn main_window(n: &Node) -> bool {
    n.name.starts_with("handoff — ")
}

/// Any other window of the application: a confirmation dialog.
pub fn dialog(n: &Node) -> bool {
    !main_window(n)
}
