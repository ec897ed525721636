//! The GTK layer: renders a [`View`] into the window, asks before confirmed actions, runs
//! actions and status reads on worker threads (`gio::spawn_blocking`) and refreshes on
//! every change the library's live watcher reports. No timers: an idle window sleeps.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use gtk4 as gtk;
use gtk4::glib;
use gtk4::prelude::*;
use gtk4::{gio, pango};

use handoff::config::Config;
use handoff::live::{Change, Sources, Watcher};
use handoff::status::VmState;
use handoff::verdict::{HookFiles, State};
use handoff_libvirt::agent::Definitions;
use handoff_libvirt::libvirt::Prober;

use crate::actions::{self, Outcome};
use crate::view::{Action, Button, Facts, FunctionRow, HolderRow, OtherGpu, View};

const CSS: &str = "
.headline { font-size: 24pt; font-weight: bold; }
.owner-host { color: #26a269; }
.owner-unseen { color: #888888; }
.owner-vm { color: #1c71d8; }
.owner-warn { color: #c64600; }
.owner-restore { color: #c01c28; }
.section { font-weight: bold; font-size: 12pt; margin-top: 10px; }
.gpu-title { font-weight: bold; font-size: 16pt; margin-top: 18px; }
.gpu-headline { font-size: 14pt; font-weight: bold; }
.foreign { color: #c01c28; font-weight: bold; }
.message { padding: 8px; border-radius: 6px; }
.message.ok { background-color: alpha(#26a269, 0.15); }
.message.failed { background-color: alpha(#c01c28, 0.15); }
";

/// Reads everything the window shows. Runs on a worker thread.
fn read_facts(cfg: &Config, prober: &Mutex<Prober>, defs: &Mutex<Definitions>) -> Result<Facts, String> {
    let mut prober = prober.lock().unwrap_or_else(|p| p.into_inner());
    // Every GPU, the VMs probed once; the primary one on top, the others in file order.
    let each = handoff::status::collect_each(cfg, None, &mut |vm| {
        let mut s = prober.probe(vm);
        // With several GPUs, which GPUs each VM takes decides "Switch to" against "Start"
        // (`handoff::gpus::start_switches`): its definition, read once per definition
        // change (the watcher's changes make `defs` forget), not on every refresh.
        if cfg.gpu.len() > 1 && !matches!(s.state, VmState::Unknown | VmState::Undefined) {
            let mut defs = defs.lock().unwrap_or_else(|p| p.into_inner());
            s.passthrough = defs.passthrough(vm, || {
                prober
                    .passthrough(vm)
                    .map_err(|e| tracing::info!("cannot read the definition of {}: {e}", vm.name))
                    .ok()
            });
        }
        s
    })
    .map_err(|e| e.to_string())?;
    let (primary, others): (Vec<_>, Vec<_>) =
        each.into_iter().partition(|s| s.gpu.address == cfg.gpu.address);
    let status = primary
        .into_iter()
        .next()
        .ok_or_else(|| "the primary GPU was not read".to_owned())?;
    let others = others
        .into_iter()
        .map(|s| OtherGpu {
            files: HookFiles::load_for(cfg, s.gpu.address),
            label: cfg.gpu.at(s.gpu.address).and_then(|g| g.label.clone()),
            status: s,
        })
        .collect();
    Ok(Facts {
        status,
        others,
        files: HookFiles::load_for(cfg, cfg.gpu.address),
        uid: nix::unistd::getuid().as_raw(),
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

pub struct Details {
    cfg: Arc<Config>,
    prober: Arc<Mutex<Prober>>,
    /// Each VM's passed-through devices, kept until a change says its definition changed.
    definitions: Arc<Mutex<Definitions>>,
    window: gtk::ApplicationWindow,
    content: gtk::Box,
    facts: RefCell<Result<Option<Facts>, String>>,
    busy: RefCell<Option<String>>,
    outcome: RefCell<Option<Outcome>>,
    /// A live source that is down (libvirtd restarted), or the watcher could not start.
    live_note: RefCell<Option<String>>,
    refreshing: Cell<bool>,
    /// A change arrived during a refresh: read again when it ends.
    dirty: Cell<bool>,
    /// What the widgets show now (the view, the outcome and the live note, in words): a
    /// refresh that reads the same is not drawn again, so the button under the pointer, the
    /// keyboard focus and a screen reader's place are not replaced for nothing.
    shown: RefCell<Option<String>>,
    dump: bool,
    _watcher: RefCell<Option<Watcher>>,
}

impl Details {
    pub fn new(app: &gtk::Application, cfg: Config, dump: bool) -> Rc<Details> {
        let provider = gtk::CssProvider::new();
        provider.load_from_data(CSS);
        if let Some(display) = gtk::gdk::Display::default() {
            gtk::style_context_add_provider_for_display(
                &display,
                &provider,
                gtk::STYLE_PROVIDER_PRIORITY_APPLICATION,
            );
        }
        let window = gtk::ApplicationWindow::builder()
            .application(app)
            .title("handoff — GPU")
            .default_width(760)
            .default_height(840)
            .build();
        let content = gtk::Box::new(gtk::Orientation::Vertical, 6);
        content.set_margin_top(18);
        content.set_margin_bottom(18);
        content.set_margin_start(18);
        content.set_margin_end(18);
        let scrolled = gtk::ScrolledWindow::builder()
            .hscrollbar_policy(gtk::PolicyType::Never)
            .child(&content)
            .build();
        window.set_child(Some(&scrolled));

        let d = Rc::new(Details {
            cfg: Arc::new(cfg),
            prober: Arc::new(Mutex::new(Prober::new())),
            definitions: Arc::default(),
            window,
            content,
            facts: RefCell::new(Ok(None)),
            busy: RefCell::new(None),
            outcome: RefCell::new(None),
            live_note: RefCell::new(None),
            refreshing: Cell::new(false),
            dirty: Cell::new(false),
            shown: RefCell::new(None),
            dump,
            _watcher: RefCell::new(None),
        });
        d.watch();
        d.render();
        d.window.present();
        d.refresh();
        d
    }

    pub fn present(&self) {
        self.window.present();
    }

    /// Starts the live watcher; each change (a burst counts once) triggers a refresh.
    fn watch(self: &Rc<Self>) {
        let (tx, rx) = async_channel::unbounded::<Change>();
        let defs = self.definitions.clone();
        let sink: handoff::live::Sink = Arc::new(move |c| {
            // Forgotten here, before the refresh this change causes reads them again.
            defs.lock().unwrap_or_else(|p| p.into_inner()).heard(&c);
            tx.try_send(c).is_ok()
        });
        match Watcher::with_sink(&self.cfg, handoff_libvirt::events::sources(Sources::all()), sink) {
            Ok(w) => *self._watcher.borrow_mut() = Some(w),
            Err(e) => {
                *self.live_note.borrow_mut() = Some(format!(
                    "Live updates are off ({e}); use Refresh to read the state again."
                ));
                return;
            }
        }
        let weak = Rc::downgrade(self);
        glib::spawn_future_local(async move {
            while let Ok(first) = rx.recv().await {
                let Some(d) = weak.upgrade() else { break };
                let mut changes = vec![first];
                while let Ok(c) = rx.try_recv() {
                    changes.push(c);
                }
                for c in &changes {
                    tracing::debug!("live: {c}");
                    match c {
                        Change::SourceLost { source, why } => {
                            *d.live_note.borrow_mut() = Some(format!(
                                "Not receiving {source} changes ({why}); what it covers may be stale."
                            ))
                        }
                        Change::SourceBack { .. } => *d.live_note.borrow_mut() = None,
                        _ => {}
                    }
                }
                d.refresh();
            }
        });
    }

    /// Reads the state on a worker thread, then renders. Coalesces: at most one read runs.
    fn refresh(self: &Rc<Self>) {
        if self.refreshing.replace(true) {
            self.dirty.set(true);
            return;
        }
        let (cfg, prober, defs) = (self.cfg.clone(), self.prober.clone(), self.definitions.clone());
        let d = self.clone();
        glib::spawn_future_local(async move {
            let read = gio::spawn_blocking(move || read_facts(&cfg, &prober, &defs)).await;
            *d.facts.borrow_mut() = match read {
                Ok(r) => r.map(Some),
                Err(_) => Err("reading the state panicked; see the log".to_owned()),
            };
            d.refreshing.set(false);
            d.render();
            if d.dirty.replace(false) {
                d.refresh();
            }
        });
    }

    fn clicked(self: &Rc<Self>, b: &Button) {
        if b.action == Action::Refresh {
            self.outcome.borrow_mut().take();
            // Asked to read everything again: the definitions too (a PVE VM's `hostpciN`
            // has no change events).
            *self.definitions.lock().unwrap_or_else(|p| p.into_inner()) = Definitions::default();
            self.refresh();
            return;
        }
        match &b.confirm {
            None => self.run(b.action.clone()),
            Some(c) => {
                #[allow(deprecated)] // GtkAlertDialog needs GTK 4.10; Debian 12 has 4.8.
                let dialog = gtk::MessageDialog::builder()
                    .transient_for(&self.window)
                    .modal(true)
                    .message_type(gtk::MessageType::Question)
                    .text(&c.question)
                    .secondary_text(&c.detail)
                    .build();
                #[allow(deprecated)]
                {
                    dialog.add_button("Cancel", gtk::ResponseType::Cancel);
                    let accept = dialog.add_button(&c.accept, gtk::ResponseType::Accept);
                    accept.add_css_class("destructive-action");
                    dialog.set_default_response(gtk::ResponseType::Cancel);
                }
                let d = self.clone();
                let action = b.action.clone();
                #[allow(deprecated)]
                dialog.connect_response(move |dialog, response| {
                    dialog.close();
                    if response == gtk::ResponseType::Accept {
                        d.run(action.clone());
                    }
                });
                dialog.present();
            }
        }
    }

    /// Runs `action` on a worker thread; buttons stay disabled until it ends.
    fn run(self: &Rc<Self>, action: Action) {
        if self.busy.borrow().is_some() {
            return;
        }
        *self.busy.borrow_mut() = Some(actions::doing(&self.cfg, &action));
        self.outcome.borrow_mut().take();
        self.render();
        let cfg = self.cfg.clone();
        let d = self.clone();
        glib::spawn_future_local(async move {
            let out = gio::spawn_blocking(move || actions::run(&cfg, &action))
                .await
                .unwrap_or_else(|_| Outcome {
                    ok: false,
                    message: "the action panicked; see the log".to_owned(),
                });
            d.busy.borrow_mut().take();
            *d.outcome.borrow_mut() = Some(out);
            d.render();
            d.refresh();
        });
    }

    fn render(self: &Rc<Self>) {
        let facts = self.facts.borrow();
        let view = match &*facts {
            Ok(Some(f)) => Some(View::build(f, self.busy.borrow().as_deref())),
            _ => None,
        };
        if let Some(v) = &view {
            // The dump says every read, drawn or not (the tests wait on reads).
            if self.dump
                && let Ok(line) = serde_json::to_string(v)
            {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            let shown = format!(
                "{v:?}\n{:?}\n{:?}",
                self.outcome.borrow(),
                self.live_note.borrow()
            );
            if self.shown.borrow().as_ref() == Some(&shown) {
                return;
            }
            *self.shown.borrow_mut() = Some(shown);
        } else {
            *self.shown.borrow_mut() = None;
        }
        while let Some(child) = self.content.first_child() {
            self.content.remove(&child);
        }
        let Some(view) = view else {
            match &*facts {
                Err(e) => {
                    let l = label(&format!("Cannot read the GPU's state: {e}"));
                    l.add_css_class("owner-restore");
                    self.content.append(&l);
                    let retry = gtk::Button::with_label("Refresh");
                    retry.set_halign(gtk::Align::Start);
                    let d = Rc::downgrade(self);
                    retry.connect_clicked(move |_| {
                        if let Some(d) = d.upgrade() {
                            d.refresh();
                        }
                    });
                    self.content.append(&retry);
                }
                Ok(_) => self.content.append(&label("Reading the GPU's state…")),
            }
            return;
        };
        drop(facts);
        self.window.set_title(Some(&view.title));
        self.render_view(&view);
    }

    fn button(self: &Rc<Self>, b: &Button) -> gtk::Button {
        let w = gtk::Button::with_label(&b.label);
        w.set_sensitive(b.enabled);
        w.set_tooltip_text(b.tooltip.as_deref());
        if b.suggested {
            w.add_css_class("suggested-action");
        }
        let d = Rc::downgrade(self);
        let b = b.clone();
        w.connect_clicked(move |_| {
            if let Some(d) = d.upgrade() {
                d.clicked(&b);
            }
        });
        w
    }

    fn render_view(self: &Rc<Self>, v: &View) {
        let c = &self.content;
        let headline = label(&v.headline);
        headline.add_css_class("headline");
        // The window's colour per verdict state.
        headline.add_css_class(state_class(&v.verdict));
        c.append(&headline);
        c.append(&label(&v.subline));
        // The other GPUs in a line each, so that they are seen without scrolling to their
        // sections.
        for g in &v.other_gpus {
            let l = label(&format!("Also {}: {}", g.title, g.verdict.line_under_gpu()));
            l.add_css_class(state_class(&g.verdict));
            c.append(&l);
        }

        if let Some(busy) = &v.busy {
            let row = gtk::Box::new(gtk::Orientation::Horizontal, 8);
            let spinner = gtk::Spinner::new();
            spinner.start();
            row.append(&spinner);
            row.append(&label(busy));
            row.add_css_class("message");
            c.append(&row);
        } else if let Some(out) = &*self.outcome.borrow()
            && !out.message.is_empty()
        {
            let l = label(&out.message);
            l.add_css_class("message");
            l.add_css_class(if out.ok { "ok" } else { "failed" });
            c.append(&l);
        }
        if let Some(note) = &*self.live_note.borrow() {
            let l = label(note);
            l.add_css_class("dim-label");
            c.append(&l);
        }

        let actions = gtk::Box::new(gtk::Orientation::Horizontal, 8);
        actions.set_margin_top(6);
        for b in &v.actions {
            actions.append(&self.button(b));
        }
        c.append(&actions);

        c.append(&section("Using the GPU"));
        c.append(&self.holders_grid(&v.holders));
        if let Some(u) = &v.uninspected {
            c.append(&label(u));
        }
        for n in &v.notes {
            c.append(&label(&format!("Note: {n}")));
        }

        c.append(&section("Virtual machines"));
        if v.vms.is_empty() {
            c.append(&label("No VM is configured ([[vm]] in config.toml)."));
        }
        let grid = new_grid();
        for (row, vm) in v.vms.iter().enumerate() {
            let row = row as i32 * 2;
            let name = label(&format!("{} ({})", vm.label, vm.name));
            name.add_css_class("heading");
            grid.attach(&name, 0, row, 1, 1);
            let mut state = if vm.holds_gpu {
                format!("{} · has the GPU", vm.state)
            } else {
                vm.state.clone()
            };
            for other in &vm.holds_other {
                state += &format!(" · has {other}");
            }
            grid.attach(&label(&state), 1, row, 1, 1);
            let buttons = gtk::Box::new(gtk::Orientation::Horizontal, 6);
            for b in &vm.buttons {
                buttons.append(&self.button(b));
            }
            grid.attach(&buttons, 2, row, 1, 1);
            let detail = match &vm.error {
                Some(e) => format!("{} — {e}", vm.uri),
                None => vm.uri.clone(),
            };
            let detail = label(&detail);
            detail.add_css_class("dim-label");
            grid.attach(&detail, 0, row + 1, 3, 1);
        }
        c.append(&grid);

        c.append(&section("Last refused start"));
        c.append(&label(
            v.last_refusal.as_deref().unwrap_or("None recorded by the hook."),
        ));
        if let Some(e) = &v.last_error {
            c.append(&section("Last hook error"));
            c.append(&label(e));
        }

        c.append(&section("GPU"));
        c.append(&label(&format!("{}  ·  {}", v.gpu_name, v.address)));

        c.append(&section("Functions"));
        c.append(&functions_grid(&v.functions));

        if let Some(g) = &v.iommu {
            c.append(&section(&format!("IOMMU group {}", g.id)));
            let grid = new_grid();
            for (row, m) in g.members.iter().enumerate() {
                let role = label(&m.role);
                if m.foreign {
                    role.set_text(&format!("⚠ {}", m.role));
                    role.add_css_class("foreign");
                }
                grid.attach(&label(&m.address), 0, row as i32, 1, 1);
                grid.attach(&role, 1, row as i32, 1, 1);
                grid.attach(&label(&m.driver), 2, row as i32, 1, 1);
            }
            c.append(&grid);
            c.append(&label(&g.verdict));
        }

        // Every other GPU: which it is, its verdict, what holds it, its functions.
        for g in &v.other_gpus {
            let title = label(&format!("GPU {}", g.title));
            title.add_css_class("gpu-title");
            c.append(&title);
            let headline = label(&g.headline);
            headline.add_css_class("gpu-headline");
            headline.add_css_class(state_class(&g.verdict));
            c.append(&headline);
            c.append(&label(&g.subline));
            c.append(&label(&g.gpu_name));
            c.append(&section("Using it"));
            c.append(&self.holders_grid(&g.holders));
            if let Some(u) = &g.uninspected {
                c.append(&label(u));
            }
            for n in &g.notes {
                c.append(&label(&format!("Note: {n}")));
            }
            c.append(&section("Functions"));
            c.append(&functions_grid(&g.functions));
        }
    }

    /// What holds a GPU: a row per process with its buttons, or that nothing visible does.
    fn holders_grid(self: &Rc<Self>, holders: &[HolderRow]) -> gtk::Widget {
        if holders.is_empty() {
            return label("Nothing that this window can see.").upcast();
        }
        let grid = new_grid();
        for (col, h) in ["PID", "Command", "User", "Unit", ""].iter().enumerate() {
            grid.attach(&header(h), col as i32, 0, 1, 1);
        }
        for (i, h) in holders.iter().enumerate() {
            let row = i as i32 * 2 + 1;
            grid.attach(&label(&h.pid.to_string()), 0, row, 1, 1);
            grid.attach(&label(&h.command), 1, row, 1, 1);
            grid.attach(&label(&h.user), 2, row, 1, 1);
            grid.attach(&label(h.unit.as_deref().unwrap_or("—")), 3, row, 1, 1);
            let buttons = gtk::Box::new(gtk::Orientation::Horizontal, 6);
            for b in &h.buttons {
                buttons.append(&self.button(b));
            }
            grid.attach(&buttons, 4, row, 1, 1);
            let what = label(&h.what);
            what.add_css_class("dim-label");
            grid.attach(&what, 1, row + 1, 4, 1);
        }
        grid.upcast()
    }
}

/// A GPU's functions: address, kind, driver, `driver_override`, power.
fn functions_grid(functions: &[FunctionRow]) -> gtk::Grid {
    let grid = new_grid();
    for (col, h) in ["Address", "Kind", "Driver", "driver_override", "Power"]
        .iter()
        .enumerate()
    {
        grid.attach(&header(h), col as i32, 0, 1, 1);
    }
    for (row, f) in functions.iter().enumerate() {
        for (col, text) in [&f.address, &f.kind, &f.driver, &f.driver_override, &f.power]
            .into_iter()
            .enumerate()
        {
            grid.attach(&label(text), col as i32, row as i32 + 1, 1, 1);
        }
    }
    grid
}

/// The headline's colour class per verdict state (the rules are the library's).
fn state_class(v: &handoff::verdict::Verdict) -> &'static str {
    match v.state {
        // Not the green of "free" when the holder scan could not look everywhere.
        State::Idle if v.unseen => "owner-unseen",
        State::Idle => "owner-host",
        State::Busy | State::Switching | State::LibvirtUnreachable => "owner-warn",
        State::InVm => "owner-vm",
        State::RestoreRequired | State::Absent | State::Unreadable => "owner-restore",
    }
}

/// A left-aligned, wrapping text label.
fn label(text: &str) -> gtk::Label {
    let l = gtk::Label::new(Some(text));
    l.set_xalign(0.0);
    l.set_wrap(true);
    l.set_wrap_mode(pango::WrapMode::WordChar);
    l
}

fn header(text: &str) -> gtk::Label {
    let l = label(text);
    l.add_css_class("dim-label");
    l
}

fn section(text: &str) -> gtk::Label {
    let l = label(text);
    l.add_css_class("section");
    l
}

fn new_grid() -> gtk::Grid {
    gtk::Grid::builder().column_spacing(18).row_spacing(4).build()
}
