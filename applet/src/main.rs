//! `handoff-tray`: the StatusNotifierItem that shows who owns the GPU, starts and stops
//! the VMs, and says who blocks a handoff (issue 5).
//!
//! One tokio current-thread runtime. What happens where:
//! - the live stream ([`handoff::live::Watcher::with_sink`]: kernel uevents, the hook's
//!   run dir, libvirt lifecycle events) delivers into this loop's channel; nothing else
//!   wakes an idle tray (no timer);
//! - on a change the loop re-reads the machine ([`collect`]) on a blocking thread,
//!   coalescing changes that arrive meanwhile, then updates the item (`handle.update`),
//!   shows the notification the change deserves, and holds or drops the sleep inhibitor;
//! - menu clicks only send a [`handoff::action::Action`] here (ksni's realworld pattern); the
//!   action runs on a blocking thread with the menu disabled, and its outcome comes back
//!   as a message.
//!
//! Links neither libvirt nor GTK, so it stays small: VM states, starts and stops and
//! libvirt's events go through `handoff __agent` ([`handoff::agent`]), a child process;
//! "Details…" starts `handoff-details`, its own process.

mod actions;
mod icons;
mod model;
mod notify;
mod tray;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use handoff::Config;
use handoff::agent::Agent;
use handoff::live::{Change, Sources, Watcher};
use handoff::status::{VmState, VmStatus};
use handoff::verdict::HookFiles;
use ksni::TrayMethods;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::model::{Action, Note, OrphanWatch, Settled, Snapshot};
use crate::tray::HandoffTray;

/// Everything that reaches the main loop.
pub enum Msg {
    Change(Change),
    Collected(Box<Snapshot>),
    Action(Action),
    Done(Action, Option<Note>),
    /// A notification's button, by action key.
    NoteAction(String),
    Inhibitor(Option<handoff_inhibit::Inhibitor>),
    /// Read the machine again (after the orphan grace).
    Recheck,
    /// A notification of the tray's own, not tied to an action (units started again).
    Said(Note),
    Quit,
}

const USAGE: &str = "usage: handoff-tray [-v|-q]

The tray icon of handoff: who owns the GPU, start/stop the VMs, who blocks a handoff.
Reads the same config as `handoff` (HANDOFF_CONFIG, ~/.config/handoff/config.toml,
/etc/handoff/config.toml). Needs a StatusNotifierItem host in the panel (on i3: snixembed,
or use handoff-block in i3bar instead).";

fn main() -> ExitCode {
    let mut level = "warn";
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "-v" | "--verbose" => level = "info",
            "-vv" => level = "debug",
            "-q" | "--quiet" => level = "error",
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("handoff-tray {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("handoff-tray: unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HANDOFF_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(format!("handoff={level},handoff_tray={level}"))
            }),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: as the hook, stderr becomes
        // libvirt's error text, and in a log or a pipe they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (cfg, source) = match Config::load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("handoff-tray: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(4)
        .thread_keep_alive(std::time::Duration::from_millis(500))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("handoff-tray: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg, source, level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handoff-tray: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The one explanation printed when no tray host is there (ARCHITECTURE.md, i3/i3#2088).
pub fn no_watcher_text(reason: &ksni::OfflineReason) -> String {
    let why = match reason {
        ksni::OfflineReason::No => "the StatusNotifierWatcher went away".to_owned(),
        ksni::OfflineReason::Error(e) => format!("{e}"),
        _ => "no StatusNotifierWatcher answers".to_owned(),
    };
    format!(
        "handoff-tray: no tray icon can show yet: nothing on the session bus hosts \
         StatusNotifierItems (org.kde.StatusNotifierWatcher; {why}).\n  \
         On i3: i3bar only shows XEmbed icons, so run an SNI host such as `snixembed --fork` \
         (e.g. `exec --no-startup-id snixembed --fork` in the i3 config), or put handoff-block \
         in your bar instead.\n  handoff-tray keeps running and registers as soon as a host appears."
    )
}

/// Reads the machine once: status (sysfs, holders, VM states from the libvirt agent), the
/// hook's state and the restore record, and which holders run in a stoppable `.service`.
/// `probe` returns every configured VM's state, in config order. Blocking.
pub fn collect(cfg: &Config, probe: &mut dyn FnMut() -> Vec<VmStatus>) -> Snapshot {
    // The VM states are asked before and after sysfs is read, until both agree: libvirt
    // can take a while to answer while it starts a domain, and a sysfs read from before
    // the start paired with a state from after it would show a VM running on a GPU that
    // is still on the host.
    let mut tries = 0;
    let status = loop {
        tries += 1;
        let t = Instant::now();
        let before: Vec<_> = probe().into_iter().map(|v| v.state).collect();
        tracing::debug!("probe {tries} in {:?}", t.elapsed());
        // status::collect asks for each VM after it has read sysfs: one probe for all.
        let mut after: Option<Vec<VmStatus>> = None;
        let status = handoff::status::collect(cfg, &mut |vm| {
            let all = after.get_or_insert_with(&mut *probe);
            all.iter()
                .find(|s| s.name == vm.name && s.uri == vm.uri)
                .cloned()
                .unwrap_or_else(|| VmStatus::new(vm, VmState::Unknown, None))
        })
        .map_err(|e| e.to_string());
        tracing::debug!("status {tries} in {:?}", t.elapsed());
        let agree = match &status {
            Ok(s) => s.vms.iter().map(|v| v.state).eq(before.iter().copied()),
            Err(_) => true,
        };
        if agree || tries == 3 {
            break status;
        }
    };
    // The other configured GPUs (issue 15), with the VMs as asked for the primary one.
    let others: Vec<model::OtherGpu> = cfg
        .gpu
        .iter()
        .filter(|g| g.address != cfg.gpu.address)
        .map(|g| model::OtherGpu {
            address: g.address,
            label: g.label.clone(),
            status: handoff::status::collect_gpu(
                cfg,
                g,
                status.as_ref().map(|s| s.vms.clone()).unwrap_or_default(),
            )
            .map_err(|e| e.to_string()),
            files: HookFiles::load_for(cfg, g.address),
            orphan_seen_for: Some(std::time::Duration::ZERO),
        })
        .collect();
    let mut units = HashMap::new();
    let every = status
        .iter()
        .chain(others.iter().filter_map(|o| o.status.as_ref().ok()));
    for s in every {
        for h in &s.gpu.blockers {
            if h.unit.as_deref().is_some_and(|u| u.ends_with(".service"))
                && h.container.is_none()
                && let Some(scope) = handoff::action::unit_scope(&cfg.host, h.pid)
            {
                units.insert(h.pid, scope);
            }
        }
    }
    Snapshot {
        address: cfg.gpu.address,
        label: cfg.gpu.label.clone(),
        status,
        files: HookFiles::load_for(cfg, cfg.gpu.address),
        uid: nix::unistd::getuid().as_raw(),
        units,
        orphan_seen_for: Some(std::time::Duration::ZERO),
        others,
    }
}

struct Loop {
    cfg: Arc<Config>,
    tx: UnboundedSender<Msg>,
    agent: Arc<Agent>,
    collecting: bool,
    dirty: bool,
    snap: Snapshot,
    notifier: notify::Notifier,
    inhibitor: Option<handoff_inhibit::Inhibitor>,
    inhibit_asked: bool,
    /// What notifications compare against (see [`Settled`]).
    settled: Settled,
    orphan: OrphanWatch,
    /// Refused starts already told (`handoff::refusals`), one per configured GPU: each one
    /// logged by the hook is a notification once, whoever asked for the start.
    /// With VMs on Proxmox VE, also the refusals the agent read from PVE's task list, in the
    /// user's runtime dir (`refusals::user_host`): each file with its own `Unseen`.
    refusals: Vec<(handoff::host::Host, handoff::refusals::Unseen)>,
    /// Actions of this tray under way: a refusal of its own start is told by the action's
    /// own note, so the log is not read meanwhile and is skipped after a start.
    acting: usize,
    /// The VMs this tray is starting now (a start, switch or "Terminate and start" under
    /// way): "about to start" for `[tray] busy_alert`.
    starting: Vec<String>,
    /// The last refused start (the VM's name, when it was told): "about to start" for
    /// `[tray] busy_alert_window_s` after it.
    refused: Option<(String, Instant)>,
}

/// The libvirt agent for `cfg` (loaded from `source`): `handoff [--config FILE] __agent`,
/// the `handoff` beside this binary, else the one on PATH.
/// `level` is the tray's own log level: the agent logs what it does (a start's progress)
/// at the same one, to the same stderr.
pub fn agent_for(source: &handoff::config::Source, level: &str, sink: handoff::live::Sink) -> Agent {
    let mut args: Vec<std::ffi::OsString> = match level {
        "info" => vec!["-v".into()],
        "debug" => vec!["-vv".into()],
        "error" => vec!["-q".into()],
        _ => Vec::new(),
    };
    if let handoff::config::Source::File(path) = source {
        args.push("--config".into());
        args.push(path.into());
    }
    args.push("__agent".into());
    Agent::new(handoff::action::sibling("handoff"), args, sink)
}

async fn run(cfg: Config, source: handoff::config::Source, level: &str) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let (tx, mut rx) = unbounded_channel();
    let sink: handoff::live::Sink = {
        let tx = tx.clone();
        Arc::new(move |c| tx.send(Msg::Change(c)).is_ok())
    };
    // The kernel and the hook's files here; libvirt in the agent (no libvirt in this
    // process: benches/RESULTS-tray.md).
    // Before the watcher: refusals logged until now are history, later ones news.
    let mut hosts = vec![cfg.host.clone()];
    if handoff::refusals::pve_desktop(&cfg) {
        hosts.push(handoff::refusals::user_host(&cfg.host));
    }
    let refusals: Vec<_> = hosts
        .iter()
        .flat_map(|h| {
            cfg.gpu
                .iter()
                .map(|g| (h.clone(), handoff::refusals::Unseen::start(h, g.address)))
        })
        .collect();
    let watcher = Watcher::with_sink(&cfg, Sources::without_libvirt(), sink.clone())?;
    let agent = Arc::new(agent_for(&source, level, sink));
    if !cfg.vms.is_empty()
        && let Err(e) = agent.start()
    {
        tracing::warn!("{e}");
    }
    let snap = {
        let (cfg, agent) = (cfg.clone(), agent.clone());
        tokio::task::spawn_blocking(move || collect(&cfg, &mut || agent.probe(&cfg))).await?
    };
    let tray = HandoffTray {
        snap: snap.clone(),
        action: None,
        last_event: None,
        tx: tx.clone(),
        said_offline: Arc::new(AtomicBool::new(false)),
    };
    let handle = tray
        .assume_sni_available(true)
        .spawn()
        .await
        .map_err(|e| anyhow::anyhow!("cannot put the item on the session bus: {e}"))?;
    let mut l = Loop {
        cfg,
        tx: tx.clone(),
        agent,
        collecting: false,
        dirty: false,
        settled: Settled(snap.clone()),
        snap,
        notifier: notify::Notifier::new(tx.clone()),
        inhibitor: None,
        inhibit_asked: false,
        orphan: OrphanWatch::default(),
        refusals,
        acting: 0,
        starting: Vec::new(),
        refused: None,
    };
    l.check_orphan();
    l.inhibit();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => break },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        match msg {
            Msg::Quit => break,
            Msg::Change(c) => {
                tracing::info!("change: {c}");
                let event = format!("{} ({})", c, clock());
                handle
                    .update(|t: &mut HandoffTray| t.last_event = Some(event))
                    .await;
                l.refresh();
            }
            Msg::Collected(snap) => {
                l.collecting = false;
                let old = std::mem::replace(&mut l.snap, *snap);
                // A CUDA job that ends moves nothing else: hear it through its pidfd.
                let pids: Vec<u32> = l.snap.every_holder().map(|h| h.pid).collect();
                watcher.watch_holders(&pids);
                l.check_orphan();
                let s = l.snap.clone();
                handle.update(|t: &mut HandoffTray| t.snap = s).await;
                if let Some(n) = l.settled.next(&l.snap) {
                    l.notifier.show(n, l.icon()).await;
                }
                if let Some(n) = l.busy_alert(&old) {
                    l.notifier.show(n, l.icon()).await;
                }
                if l.acting == 0 {
                    let mut news: Vec<_> = l.refusals.iter_mut().flat_map(|(h, u)| u.take(h)).collect();
                    // A VM refused two GPUs at once is one refusal to tell.
                    news.sort_by_key(|r| r.at);
                    news.dedup_by(|a, b| a.vm == b.vm && a.at == b.at);
                    for r in news {
                        let n = model::logged_refusal_note(&l.cfg, &r, l.snap.uid);
                        l.refused = Some((r.vm.clone(), Instant::now()));
                        l.notifier.show(n, l.icon()).await;
                    }
                }
                l.inhibit();
                if l.dirty {
                    l.refresh();
                }
            }
            Msg::Action(a) => {
                if a.changes_machine() {
                    let doing = actions::doing(&a);
                    handle.update(|t: &mut HandoffTray| t.action = Some(doing)).await;
                }
                l.acting += 1;
                if let Some(vm) = vm_started_by(&a) {
                    l.starting.push(vm.to_owned());
                }
                let (cfg, agent) = (l.cfg.clone(), l.agent.clone());
                let tx = l.tx.clone();
                tokio::task::spawn_blocking(move || {
                    let note = actions::run(&cfg, &agent, &a);
                    let _ = tx.send(Msg::Done(a, note));
                });
            }
            Msg::Done(a, note) => {
                l.acting = l.acting.saturating_sub(1);
                if a.starts_a_vm() {
                    // Its refusal, if any, is in `note`, told with this tray's own scan.
                    for (h, u) in &mut l.refusals {
                        u.skip(h);
                    }
                }
                if let Some(vm) = vm_started_by(&a) {
                    if let Some(i) = l.starting.iter().position(|s| s == vm) {
                        l.starting.remove(i);
                    }
                    // A start that failed (critical: refused, or did not start) will be
                    // tried again.
                    if note.as_ref().is_some_and(|n| n.critical) {
                        l.refused = Some((vm.to_owned(), Instant::now()));
                    }
                }
                if a.changes_machine() {
                    handle.update(|t: &mut HandoffTray| t.action = None).await;
                }
                if let Some(n) = note {
                    l.notifier.show(n, l.icon()).await;
                }
                l.refresh();
            }
            Msg::NoteAction(key) => match l.notifier.action(&key) {
                Some(a) => {
                    let _ = l.tx.send(Msg::Action(a));
                }
                None => tracing::info!("notification action {key:?} is not current; ignored"),
            },
            Msg::Recheck => l.refresh(),
            Msg::Said(n) => l.notifier.show(n, l.icon()).await,
            Msg::Inhibitor(i) => {
                if l.snap.vm_with_gpu().is_some() {
                    l.inhibitor = i;
                }
            }
        }
    }
    handle.shutdown().await;
    Ok(())
}

/// The VM an action starts (a start, switch, or "Terminate and start").
fn vm_started_by(a: &Action) -> Option<&str> {
    match a {
        Action::TerminateAndStart { vm, .. } => Some(vm),
        _ if a.starts_a_vm() => a.vm(),
        _ => None,
    }
}

impl Loop {
    /// `[tray] busy_alert`: something started using a GPU since `old` while a VM that
    /// wants one is about to start (this tray is starting it, or its start was refused
    /// within `busy_alert_window_s`).
    fn busy_alert(&self, old: &Snapshot) -> Option<Note> {
        let t = &self.cfg.tray;
        if !t.busy_alert {
            return None;
        }
        let label = |name: &str| {
            self.cfg
                .vms
                .iter()
                .find(|v| v.name == name)
                .map_or(name.to_owned(), |v| v.label().to_owned())
        };
        let (vm, why) = if let Some(vm) = self.starting.first() {
            (label(vm), "is being started from the tray".to_owned())
        } else {
            let (vm, when) = self.refused.as_ref()?;
            let ago = when.elapsed();
            if ago > std::time::Duration::from_secs(t.busy_alert_window_s) {
                return None;
            }
            (label(vm), format!("did not start {} s ago", ago.as_secs()))
        };
        model::busy_alert_note(old, &self.snap, &vm, &why)
    }

    /// Confirms an orphaned GPU once it has stayed so for [`handoff::verdict::ORPHAN_GRACE`]; the
    /// first sighting schedules one more read after the grace.
    fn check_orphan(&mut self) {
        if let Some(wait) = self.orphan.observe(&mut self.snap, Instant::now()) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = tx.send(Msg::Recheck);
            });
        }
    }

    fn icon(&self) -> &'static str {
        self.snap.icon(None).name()
    }

    /// Re-read the machine on a blocking thread; a change that arrives meanwhile is read by
    /// one more pass after this one.
    fn refresh(&mut self) {
        if self.collecting {
            self.dirty = true;
            return;
        }
        self.collecting = true;
        self.dirty = false;
        let (cfg, agent, tx) = (self.cfg.clone(), self.agent.clone(), self.tx.clone());
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            // The agent connects anew after a lost connection, and is started again if
            // it exited.
            let snap = collect(&cfg, &mut || agent.probe(&cfg));
            tracing::debug!("collected in {:?}", t.elapsed());
            let _ = tx.send(Msg::Collected(Box::new(snap)));
            // Units stopped to free the GPU come back once the hook has returned it
            // (handoff::stopped; nothing to do, and no file read twice, most of the time).
            let back = handoff::stopped::start_again(&cfg, handoff::stopped::Who::Person);
            if !back.is_empty() {
                let _ = tx.send(Msg::Said(Note::plain("Services started again", back.join("\n"))));
            }
        });
    }

    /// Hold logind's sleep inhibitor while a configured VM has the GPU; drop it after.
    fn inhibit(&mut self) {
        match self.snap.vm_with_gpu() {
            Some(v) if !self.inhibit_asked => {
                self.inhibit_asked = true;
                let why = handoff_inhibit::reason_for(&v.label);
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || {
                    let i = handoff_inhibit::hold(&why)
                        .inspect_err(|e| {
                            tracing::warn!("sleep is not inhibited while the VM has the GPU: {e}")
                        })
                        .ok();
                    let _ = tx.send(Msg::Inhibitor(i));
                });
            }
            Some(_) => {}
            None => {
                self.inhibit_asked = false;
                self.inhibitor = None;
            }
        }
    }
}

/// Local wall-clock time as HH:MM:SS, for "Last event" (no timezone database: UTC offset
/// from libc).
fn clock() -> String {
    // SAFETY: time and localtime_r only write into the struct we pass.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};

    use super::*;
    use crate::icons::Icon;

    /// `target/debug/handoff`, the agent's binary (this test runs from `target/debug/deps`),
    /// built if a narrower build left it out.
    fn handoff_bin() -> std::path::PathBuf {
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("handoff");
        if !bin.exists() {
            let st = std::process::Command::new(env!("CARGO"))
                .args(["build", "-p", "handoff", "--bin", "handoff"])
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .status()
                .expect("cargo build --bin handoff");
            assert!(st.success(), "cargo build --bin handoff failed");
        }
        bin
    }

    /// The real read ([`collect`]: sysfs of a simulated GPU, the real `/proc`, the real
    /// libvirt client library in a real `handoff __agent`) with the only VM at a libvirt
    /// that is not there: the icon says libvirt is unreachable, the tooltip says why, and
    /// saying so is fast.
    #[test]
    fn a_vm_at_an_unreachable_libvirt_shows_the_offline_icon_and_why() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
        let socket = tmp.path().join("no-such-libvirt-sock");
        let text = format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n\
             [host]\nsysfs = \"{}\"\ndev = \"{}\"\nrun = \"{}\"\n\n\
             [[vm]]\nname = \"win11\"\nlabel = \"Windows\"\nuri = \"qemu+unix:///system?socket={}\"\n",
            sim.sysfs().display(),
            sim.dev().display(),
            sim.run().display(),
            socket.display()
        );
        let path = tmp.path().join("config.toml");
        std::fs::write(&path, &text).unwrap();
        let cfg = Config::load_file(&path).unwrap();
        let agent = Agent::new(
            handoff_bin(),
            vec!["--config".into(), path.into(), "__agent".into()],
            Arc::new(|_| true),
        );
        let t = Instant::now();
        let snap = collect(&cfg, &mut || agent.probe(&cfg));
        let took = t.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");

        assert_eq!(snap.vms()[0].state, handoff::status::VmState::Unknown);
        assert_eq!(snap.owner(), Some(handoff::gpu::Owner::Host));
        assert_eq!(snap.icon(None), Icon::Offline);
        assert_eq!(snap.icon(None).name(), "handoff-offline");
        let why = snap.libvirt_unreachable().expect("libvirt unreachable");
        assert!(why.contains("no-such-libvirt-sock"), "{why}");
        let lines = snap.tooltip_lines(None);
        assert!(
            lines.contains(&"Windows (win11): unknown".to_owned()),
            "{lines:#?}"
        );
        let line = lines
            .iter()
            .find(|l| l.starts_with("libvirt unreachable: "))
            .unwrap_or_else(|| panic!("{lines:#?}"));
        assert!(line.contains("no-such-libvirt-sock"), "{line}");
        assert!(
            line.contains("No such file or directory"),
            "the system's reason is passed on: {line}"
        );
        // Not a stuck handoff: the GPU is home, and no VM state is known to say otherwise.
        assert!(snap.restore_required().is_none() && snap.orphaned().is_none());
        // The title is the verdict's (issue 12: libvirt unreachable is one state for every
        // surface that asks libvirt); the tooltip's first line still says where sysfs has it.
        assert!(
            snap.title(None).starts_with("libvirt unreachable: "),
            "{}",
            snap.title(None)
        );
        assert!(lines[0].contains("is on Linux (nvidia)"), "{lines:#?}");
    }
}
