//! The StatusNotifierItem (ksni), in the shape of ksni's `examples/realworld.rs`: this
//! struct is view state only, `menu()` renders it, and every callback just sends an
//! [`Action`] to the main loop and marks the tray busy. Nothing slow ever runs here: these
//! methods run inside the D-Bus handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use handoff::escape::{markup, plain};
use handoff::holders::Holder;
use handoff::status::VmState;
use ksni::menu::{MenuItem, StandardItem, SubMenu};
use tokio::sync::mpsc::UnboundedSender;

use crate::Msg;
use crate::icons::Icon;
use crate::model::{Action, Snapshot, UnitScope};

pub struct HandoffTray {
    pub snap: Snapshot,
    /// What the tray is doing right now ("starting Windows…"); menu actions are disabled
    /// meanwhile.
    pub action: Option<String>,
    pub last_event: Option<String>,
    pub tx: UnboundedSender<Msg>,
    /// Whether the "no tray host" explanation was printed (said once per process).
    pub said_offline: Arc<AtomicBool>,
}

/// dbusmenu reads `_` as a mnemonic marker; a literal one is written twice.
fn label(s: &str) -> String {
    s.replace('_', "__")
}

impl HandoffTray {
    fn send(&mut self, a: Action) {
        if a.changes_machine() {
            self.action = Some(crate::actions::doing(&a));
        }
        let _ = self.tx.send(Msg::Action(a));
    }

    pub fn icon(&self) -> Icon {
        self.snap.icon(self.action.as_deref())
    }

    fn item(&self, text: String, enabled: bool, a: Action) -> MenuItem<Self> {
        StandardItem {
            label: label(&text),
            enabled: enabled && self.action.is_none(),
            activate: Box::new(move |t: &mut Self| t.send(a.clone())),
            ..Default::default()
        }
        .into()
    }

    /// A submenu whose only item does `a`: the second click is the confirmation.
    fn confirm(&self, text: String, question: String, a: Action) -> MenuItem<Self> {
        SubMenu {
            label: label(&text),
            enabled: self.action.is_none(),
            submenu: vec![self.item(question, true, a)],
            ..Default::default()
        }
        .into()
    }

    /// "Using the GPU (n)": each holder and what may end it (terminate one's own process,
    /// stop its service, stop its container), each asked first. None when nothing holds it.
    fn holders_menu(&self, holders: &[Holder]) -> Option<MenuItem<Self>> {
        if holders.is_empty() {
            return None;
        }
        let snap = &self.snap;
        let mut sub = Vec::new();
        for h in holders {
            let mut items = Vec::new();
            if h.uid == snap.uid {
                items.push(self.confirm(
                    "Terminate…".into(),
                    format!(
                        "Really terminate {} (pid {})? (SIGTERM)",
                        plain(&h.command),
                        h.pid
                    ),
                    Action::Terminate {
                        pid: h.pid,
                        command: h.command.clone(),
                    },
                ));
            }
            if let Some(c) = &h.container {
                // Its unit is the engine's scope: `systemctl stop` would kill it behind
                // the engine's back (handoff::containers).
                let name = plain(&c.shown());
                items.push(self.confirm(
                    format!("Stop container {name}…"),
                    format!(
                        "Really stop the {} container {name}? ({} stop {name})",
                        c.engine.cli(),
                        c.engine.cli()
                    ),
                    Action::StopContainer { container: c.clone() },
                ));
            } else if let (Some(unit), Some(scope)) = (&h.unit, snap.units.get(&h.pid)) {
                let how = match scope {
                    UnitScope::User => "systemctl --user stop",
                    UnitScope::System => "systemctl stop, asks for a password",
                };
                items.push(self.confirm(
                    format!("Stop {}…", plain(unit)),
                    format!("Really stop {}? ({how})", plain(unit)),
                    Action::StopUnit {
                        unit: unit.clone(),
                        pid: h.pid,
                    },
                ));
            }
            if items.is_empty() {
                items.push(Self::disabled(format!(
                    "not yours ({}): ask its owner or root",
                    plain(&h.user)
                )));
            }
            // Menu labels are plain text; the names are the processes' own choice.
            let mut what = format!("{} (pid {}, {}", plain(&h.command), h.pid, plain(&h.user));
            if let Some(c) = &h.container {
                what += &format!(", {} container {}", c.engine.cli(), plain(&c.shown()));
            } else if let Some(u) = &h.unit {
                what += ", ";
                what += &plain(u);
            }
            what += ")";
            sub.push(
                SubMenu {
                    label: label(&what),
                    submenu: items,
                    ..Default::default()
                }
                .into(),
            );
        }
        Some(
            SubMenu {
                label: format!("Using the GPU ({})", holders.len()),
                submenu: sub,
                ..Default::default()
            }
            .into(),
        )
    }

    fn disabled(text: String) -> MenuItem<Self> {
        StandardItem {
            label: label(&text),
            enabled: false,
            ..Default::default()
        }
        .into()
    }
}

impl ksni::Tray for HandoffTray {
    fn id(&self) -> String {
        "handoff".into()
    }

    fn category(&self) -> ksni::Category {
        ksni::Category::Hardware
    }

    fn title(&self) -> String {
        self.snap.title(self.action.as_deref())
    }

    fn status(&self) -> ksni::Status {
        match self.icon() {
            Icon::Restore | Icon::Busy => ksni::Status::NeedsAttention,
            _ => ksni::Status::Active,
        }
    }

    fn icon_name(&self) -> String {
        self.icon().name().into()
    }

    fn icon_pixmap(&self) -> Vec<ksni::Icon> {
        self.icon().pixmaps()
    }

    // The attention icon is the same picture: the state already says it.
    fn attention_icon_name(&self) -> String {
        self.icon_name()
    }

    fn attention_icon_pixmap(&self) -> Vec<ksni::Icon> {
        self.icon_pixmap()
    }

    fn tool_tip(&self) -> ksni::ToolTip {
        ksni::ToolTip {
            icon_name: self.icon_name(),
            icon_pixmap: Vec::new(),
            title: self.title(),
            // The SNI tooltip's description is markup (a subset of HTML) to the hosts.
            description: markup(&self.snap.tooltip_lines(self.last_event.as_deref()).join("\n")),
        }
    }

    /// Left click: the obvious thing. A VM has the GPU → its Looking Glass window;
    /// otherwise the details window.
    fn activate(&mut self, _x: i32, _y: i32) {
        if self.snap.vm_with_gpu().is_some() {
            self.send(Action::OpenLookingGlass);
        } else {
            self.send(Action::OpenDetails);
        }
    }

    /// The menu is opening: read the machine again, so "Using the GPU" lists a process
    /// that opened the GPU unheard (another user's, or through another inode of the node;
    /// opens are heard through inotify otherwise, and the tray does not poll). The open
    /// menu is updated when the read is in (LayoutUpdated).
    fn menu_about_to_show(&mut self) {
        let _ = self.tx.send(crate::Msg::Recheck);
    }

    fn menu(&self) -> Vec<MenuItem<Self>> {
        let snap = &self.snap;
        let mut m = vec![Self::disabled(self.title()), MenuItem::Separator];

        let holder = snap.vm_with_gpu().map(|v| v.name.clone());
        // A VM libvirt could not be asked about, or does not know, can be neither started
        // nor switched to: the click could only fail.
        let startable = |s: VmState| !matches!(s, VmState::Unknown | VmState::Undefined);
        for v in snap.vms() {
            let who = format!("{} ({})", v.label, v.name);
            if v.state.is_active() {
                m.push(self.item(
                    format!("Stop {}", v.label),
                    true,
                    Action::Stop { vm: v.name.clone() },
                ));
                m.push(self.confirm(
                    format!("Force stop {}…", v.label),
                    format!("Really force {who} off? (unsaved work in it is lost)"),
                    Action::ForceStop { vm: v.name.clone() },
                ));
            } else if snap.takes_over(v) {
                // Another VM runs on a GPU this one takes: starting means switching. A
                // VM on another GPU does not stand in its way (issue 15).
                m.push(self.item(
                    format!("Switch to {}", v.label),
                    startable(v.state),
                    Action::Switch { vm: v.name.clone() },
                ));
            } else {
                m.push(self.item(
                    format!("Start {}", v.label),
                    startable(v.state),
                    Action::Start { vm: v.name.clone() },
                ));
            }
        }
        if snap.vms().is_empty() {
            // No built-in VM any more (issue 17): say so, and how to add one.
            m.push(Self::disabled(
                "No VM configured: add a [[vm]] to config.toml".into(),
            ));
        }
        m.push(MenuItem::Separator);
        m.push(self.item(
            "Open Looking Glass".into(),
            holder.is_some(),
            Action::OpenLookingGlass,
        ));

        if snap.others.is_empty() {
            m.extend(self.holders_menu(snap.holders()));
            if snap.restore_required().is_some() {
                m.push(self.item(
                    "Return GPU to Linux".into(),
                    true,
                    Action::ReturnToLinux { gpu: snap.address },
                ));
            }
        } else {
            // Several GPUs (issue 15): a section each, headed by its verdict, with its
            // holders and its own return.
            for sec in snap.sections(self.action.as_deref()) {
                m.push(MenuItem::Separator);
                m.push(Self::disabled(format!(
                    "{}: {}",
                    sec.name,
                    sec.verdict.line_under_gpu()
                )));
                m.extend(self.holders_menu(sec.holders));
                if sec.verdict.state == handoff::verdict::State::RestoreRequired {
                    m.push(self.item(
                        "Return GPU to Linux".into(),
                        true,
                        Action::ReturnToLinux { gpu: sec.address },
                    ));
                }
            }
        }
        m.push(MenuItem::Separator);
        m.push(
            StandardItem {
                label: "Details…".into(),
                activate: Box::new(|t: &mut Self| t.send(Action::OpenDetails)),
                ..Default::default()
            }
            .into(),
        );
        m.push(
            StandardItem {
                label: "Quit".into(),
                icon_name: "application-exit".into(),
                activate: Box::new(|t: &mut Self| {
                    let _ = t.tx.send(Msg::Quit);
                }),
                ..Default::default()
            }
            .into(),
        );
        m
    }

    fn watcher_online(&self) {
        if self.said_offline.load(Ordering::Relaxed) {
            eprintln!("handoff-tray: a StatusNotifierWatcher appeared; the icon is registered.");
        }
    }

    fn watcher_offline(&self, reason: ksni::OfflineReason) -> bool {
        if !self.said_offline.swap(true, Ordering::Relaxed) {
            eprintln!("{}", crate::no_watcher_text(&reason));
        }
        // Keep running: the watcher may come (back) later, and ksni re-registers then.
        true
    }
}

#[cfg(test)]
mod tests;
