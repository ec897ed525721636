//! Live state: one stream of changes for the tray and the bar block, merged from five
//! sources, with no polling (ARCHITECTURE.md, "Live updates without polling").
//!
//! | source | what it reads | thread | where |
//! |---|---|---|---|
//! | [`Source::Uevents`] | kernel uevents (netlink `NETLINK_KOBJECT_UEVENT`, group 1, no udevd needed): `bind`/`unbind`/`add`/`remove` of the functions in the slot of `[gpu] address`, `SUBSYSTEM=pci` only | `handoff-uevents`, blocked in `poll(2)` | here |
//! | [`Source::RunDir`] | inotify on `[host] run`: `state.json` (the hook replaces it by rename), the restore records `restore-*.json` and the log of refused starts `refusals.json`; while the directory does not exist yet, its nearest existing ancestor, until it appears | `handoff-inotify`, blocked in `poll(2)` | here |
//! | [`Source::Nodes`] | inotify on the GPU's device nodes (`IN_OPEN`, `IN_CLOSE_*`) and the directories they appear in; a burst of opens and closes is followed by one holder scan, reported as [`Change::Holders`] when the set it sees changed (see [`nodes`]) | `handoff-nodes`, blocked in `poll(2)` | here |
//! | [`Source::Libvirt`] | domain lifecycle events of the configured VMs, one connection per URI (raw `virConnectDomainEventRegisterAny`), and the connection's close callback | `handoff-libvirt-<uri>` supervises the connection; libvirt's default event loop runs on `handoff-libvirt-events` (one per process) | `handoff-libvirt` (`events`), plugged in through [`Sources::vm_events`] |
//!
//! The stream says *that* and *what* changed; consumers re-read the full status
//! ([`crate::status`]) on a change. It never sends the current state at start: read it
//! once after [`Watcher::new`] returns (events from then on are not lost).
//!
//! ```no_run
//! use handoff::live::{Sources, Watcher};
//! let config = handoff::Config::load().unwrap().0;
//! let watcher = Watcher::new(&config, Sources::all()).unwrap();
//! // … read the full status once here …
//! while let Ok(change) = watcher.recv() {
//!     println!("{change}"); // … and again here
//! }
//! ```
//!
//! **Idle wake-ups.** While every source is connected and nothing happens, no thread of
//! this module wakes up: no timers, no timeouts. The one exception is a lost libvirt
//! connection: while libvirtd is unreachable the supervisor retries every
//! [`LIBVIRT_RETRY`] (500 ms), so the stream reconnects within that (plus the time to
//! connect) of libvirtd answering again. Loss and return are both in the stream
//! ([`Change::SourceLost`], [`Change::SourceBack`]); after `SourceBack` events lost in
//! between are not replayed, so re-read the full status.
//!
//! What still wakes the process, measured with `strace -f` on `handoff watch`: real
//! events only — every kernel uevent (the filter to the GPU's slot runs in userspace, so
//! e.g. a FUSE mount's `bdi` uevent wakes the uevent thread once), libvirt events of
//! *other* domains on the same URI (libvirt delivers all and this filters by name), and
//! libvirtd's keepalive: the daemon pings each client every `keepalive_interval`
//! (libvirtd.conf, default 5 s) and libvirt's client library answers on the event loop
//! thread. That ping is the daemon's, not a timer here; `keepalive_interval = -1` turns
//! it off.
//!
//! **Threads and shutdown.** Dropping the [`Watcher`] stops its threads at once: the
//! uevent and inotify threads wake up on a pipe the watcher closes, the libvirt supervisor
//! on a message, and each libvirt connection is closed. A [`Watcher::with_sink`] sink
//! that returns `false` stops a source at its next change instead. libvirt's event loop
//! thread is per process and stays (libvirt has no way to unregister its event loop); it
//! never keeps the process alive, since Rust exits when `main` returns.
//!
//! **Async consumers** (the tray, on tokio): either run `recv()` in
//! `tokio::task::spawn_blocking` and forward, or, without a bridging thread, use
//! [`Watcher::with_sink`] with a closure that calls a tokio `UnboundedSender::send` and
//! returns whether it succeeded. A sink runs on the sources' threads (libvirt's event
//! loop among them), so it must not block.

pub mod nodes;
mod pids;
pub mod run_dir;
pub mod uevent;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvError, RecvTimeoutError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::pci::PciAddress;
use crate::state::HookState;

/// How often a lost libvirt connection is retried: the only wake-up while anything is
/// disconnected, and the bound on how late the stream notices libvirtd is back.
pub const LIBVIRT_RETRY: Duration = Duration::from_millis(500);

/// Which sources a [`Watcher`] listens to.
#[derive(Debug, Clone, Copy)]
pub struct Sources {
    pub uevents: bool,
    pub run_dir: bool,
    /// Opens and closes of the GPU's device nodes ([`nodes`]).
    pub nodes: bool,
    /// VM lifecycle events. This crate links no libvirt, so they need `vm_events`, which
    /// the `handoff-libvirt` crate supplies (`handoff_libvirt::events::sources`);
    /// [`Watcher::new`] refuses `libvirt` without it.
    pub libvirt: bool,
    /// Starts the VM event source with the watcher's sink; the returned value stops it
    /// when dropped (with the watcher).
    pub vm_events: Option<VmEventSource>,
}

/// Where VM lifecycle events come from, for a [`Watcher`]: provided by the crate that
/// links the hypervisor's client library, so that this one never does.
pub type VmEventSource = fn(&Config, &Sink) -> Result<Box<dyn Send>, WatchError>;

impl Sources {
    /// Everything: what the tray and `handoff watch` use.
    pub fn all() -> Self {
        Self {
            uevents: true,
            run_dir: true,
            nodes: true,
            libvirt: true,
            vm_events: None,
        }
    }

    /// The kernel (uevents, the GPU's nodes) and the hook's files only: what `handoff-block --watch` uses, since the
    /// block does not link libvirt.
    pub fn without_libvirt() -> Self {
        Self {
            libvirt: false,
            ..Self::all()
        }
    }

    /// What `handoff watch` listens to for `cfg`: the kernel and the hook's files, and
    /// libvirt when a VM is configured (then `handoff watch` runs in `handoff-vm`, which
    /// sets [`Sources::vm_events`]).
    pub fn for_watch(cfg: &Config) -> Self {
        Self {
            libvirt: !cfg.vms.is_empty(),
            ..Self::without_libvirt()
        }
    }
}

/// `handoff watch`'s output: each change as one line (its text, or one JSON object with
/// `json`), flushed at once so that a reader sees it as it happens. Ends when `changes` ends
/// or `out` fails (stdout closed: nobody is reading).
pub fn write_changes(
    changes: impl IntoIterator<Item = Change>,
    json: bool,
    out: &mut dyn io::Write,
) -> Result<(), serde_json::Error> {
    for change in changes {
        let line = if json {
            serde_json::to_string(&change)?
        } else {
            change.to_string()
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(())
}

/// A source of changes, as named in [`Change::SourceLost`] and [`Change::SourceBack`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Source {
    Uevents,
    /// The GPU's device nodes, watched for opens and closes.
    Nodes,
    RunDir {
        path: String,
    },
    Libvirt {
        uri: String,
    },
    /// The process that talks to libvirt for a surface ([`crate::agent`]).
    Agent {
        program: String,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Uevents => f.write_str("kernel uevents"),
            Source::Nodes => f.write_str("opens of the GPU's device nodes"),
            Source::RunDir { path } => write!(f, "{path}"),
            Source::Libvirt { uri } => write!(f, "libvirt at {uri}"),
            Source::Agent { program } => write!(f, "the libvirt agent ({program} __agent)"),
        }
    }
}

/// What a kernel uevent did to a function of the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverAction {
    Bind,
    Unbind,
    /// The function appeared on the bus (rescan, hotplug).
    Add,
    /// The function left the bus (`remove`, hot-unplug).
    Remove,
}

impl DriverAction {
    pub fn parse(action: &str) -> Option<Self> {
        Some(match action {
            "bind" => Self::Bind,
            "unbind" => Self::Unbind,
            "add" => Self::Add,
            "remove" => Self::Remove,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bind => "bind",
            Self::Unbind => "unbind",
            Self::Add => "add",
            Self::Remove => "remove",
        }
    }
}

/// A libvirt domain lifecycle event (`virDomainEventType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainEvent {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    Stopped,
    /// The guest began or finished shutting down (the detail says which; both mean
    /// "look again").
    Shutdown,
    PmSuspended,
    Crashed,
    /// An event type newer than this code.
    Other(i32),
}

impl DomainEvent {
    pub fn from_raw(event: i32) -> Self {
        match event {
            0 => Self::Defined,
            1 => Self::Undefined,
            2 => Self::Started,
            3 => Self::Suspended,
            4 => Self::Resumed,
            5 => Self::Stopped,
            6 => Self::Shutdown,
            7 => Self::PmSuspended,
            8 => Self::Crashed,
            n => Self::Other(n),
        }
    }
}

/// One change. Consumers re-read the full status; this says what moved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum Change {
    /// A function of the GPU's slot was bound, unbound, added or removed. `driver` is the
    /// driver after the event (the kernel sends `DRIVER=` with `bind` only).
    Driver {
        function: PciAddress,
        action: DriverAction,
        driver: Option<String>,
    },
    /// A configured VM changed state.
    Domain {
        uri: String,
        name: String,
        event: DomainEvent,
    },
    /// `state.json` was replaced or removed; `state` is its new content (`None`: gone or
    /// unreadable, so surfaces fall back to sysfs).
    HookState { state: Option<Box<HookState>> },
    /// A restore record appeared (`present`: a handoff is under way or must be restored)
    /// or went away.
    RestoreRecord { file: String, present: bool },
    /// A source stopped delivering; until [`Change::SourceBack`], its part of the status
    /// may be stale.
    SourceLost { source: Source, why: String },
    /// A lost source delivers again; re-read everything it covers.
    SourceBack { source: Source },
    /// A process the last scan found holding the GPU has exited (see
    /// [`Watcher::watch_holders`]).
    HolderExited { pid: u32 },
    /// The hook refused a start of `vm` (whoever asked) and logged it as number `seq`
    /// ([`crate::refusals`]).
    Refused { vm: String, seq: u64 },
    /// A process opened or closed one of the GPU's nodes and the set of holders this
    /// process can see is now `holders` (empty: none). `uninspected`: processes whose fds
    /// could not be read (another user's, when not root), so "none" is as far as this user
    /// can see.
    Holders {
        holders: Vec<HolderSeen>,
        uninspected: usize,
    },
}

/// A holder of the GPU's nodes as [`Change::Holders`] names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderSeen {
    pub pid: u32,
    /// Its `comm`.
    pub command: String,
    pub user: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Driver {
                function,
                action,
                driver,
            } => match driver {
                Some(d) => write!(f, "{function}: {} ({d})", action.as_str()),
                None => write!(f, "{function}: {}", action.as_str()),
            },
            Change::Domain { uri, name, event } => write!(f, "{name} ({uri}): {event:?}"),
            Change::HookState { state: Some(s) } => {
                write!(f, "hook state: {:?}", s.phase)?;
                if let Some(vm) = &s.vm {
                    write!(f, " for {vm}")?;
                }
                Ok(())
            }
            Change::HookState { state: None } => f.write_str("hook state: none"),
            Change::RestoreRecord { file, present } => {
                write!(f, "{file}: {}", if *present { "written" } else { "removed" })
            }
            Change::SourceLost { source, why } => write!(f, "lost {source}: {why}"),
            Change::SourceBack { source } => write!(f, "{source}: back"),
            Change::HolderExited { pid } => write!(f, "pid {pid}, which used the GPU, exited"),
            Change::Refused { vm, .. } => {
                write!(f, "start of {} refused", crate::escape::plain(vm))
            }
            Change::Holders { holders, uninspected } => {
                if holders.is_empty() {
                    f.write_str("free")?;
                } else {
                    let named: Vec<String> = holders
                        .iter()
                        .map(|h| format!("{} (pid {})", crate::escape::plain(&h.command), h.pid))
                        .collect();
                    write!(f, "busy — {}", named.join(", "))?;
                }
                if *uninspected > 0 {
                    write!(
                        f,
                        " (as far as this user can see: {uninspected} processes not inspected)"
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// Where sources deliver changes. Returns `false` once nobody listens; the source then
/// stops. Runs on the sources' threads: it must not block.
pub type Sink = Arc<dyn Fn(Change) -> bool + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot listen to kernel uevents (netlink NETLINK_KOBJECT_UEVENT): {0}")]
    Uevents(#[source] io::Error),
    #[error("cannot watch {path} with inotify: {why}")]
    RunDir { path: String, why: io::Error },
    #[error("cannot watch the GPU's device nodes with inotify: {why}")]
    Nodes { why: io::Error },
    #[error("cannot start a watcher thread: {0}")]
    Thread(#[source] io::Error),
    #[error("cannot start libvirt's event loop: {0}")]
    EventLoop(String),
    #[error(
        "this program links no libvirt, so it cannot watch VMs (handoff-libvirt's events::sources adds them)"
    )]
    NoLibvirt,
}

/// A running watch. Dropping it stops the sources (see the module docs).
pub struct Watcher {
    rx: Option<Receiver<Change>>,
    /// Closing this wakes the uevent, inotify and holder threads (POLLHUP on the read end).
    _stop: OwnedFd,
    stop_rx: Arc<OwnedFd>,
    /// Weak: the channel of [`Watcher::new`] must end when every source has ended.
    sink: std::sync::Weak<dyn Fn(Change) -> bool + Send + Sync>,
    /// Started by the first [`Watcher::watch_holders`].
    holders: std::sync::OnceLock<Option<pids::PidWatch>>,
    /// The VM event source ([`Sources::vm_events`]); dropping it stops it.
    _vm_events: Option<Box<dyn Send>>,
}

impl Watcher {
    /// Starts the sources and returns a watcher whose [`Watcher::recv`] yields changes.
    /// Errors when a source cannot start at all (no netlink, no inotify); a libvirt daemon
    /// that is down is not an error but a [`Change::SourceLost`] in the stream.
    pub fn new(config: &Config, sources: Sources) -> Result<Watcher, WatchError> {
        let (tx, rx) = mpsc::channel();
        let sink: Sink = Arc::new(move |c| tx.send(c).is_ok());
        let mut w = Self::with_sink(config, sources, sink)?;
        w.rx = Some(rx);
        Ok(w)
    }

    /// Like [`Watcher::new`], delivering into `sink` instead of a channel; `recv` then
    /// returns an error at once.
    pub fn with_sink(config: &Config, sources: Sources, sink: Sink) -> Result<Watcher, WatchError> {
        let (stop_rx, stop_tx) = pipe().map_err(WatchError::Thread)?;
        let stop_rx = Arc::new(stop_rx);
        if sources.uevents {
            let socket = uevent::UeventSocket::open().map_err(WatchError::Uevents)?;
            let filter = uevent::SlotFilter::for_gpus(config.gpu.iter().map(|g| g.address));
            uevent::spawn(socket, filter, sink.clone(), stop_rx.clone()).map_err(WatchError::Thread)?;
        }
        if sources.nodes {
            // Every configured GPU's: the tray shows each (issue 15), and a job opening
            // the other GPU is as much news as one opening the primary.
            for g in config.gpu.iter() {
                nodes::spawn(&config.host, g.address, sink.clone(), stop_rx.clone())?;
            }
        }
        if sources.run_dir {
            run_dir::spawn(&config.host.run, sink.clone(), stop_rx.clone())?;
        }
        let vm_events = match (sources.libvirt, sources.vm_events) {
            (false, _) => None,
            (true, Some(start)) => Some(start(config, &sink)?),
            (true, None) => return Err(WatchError::NoLibvirt),
        };
        Ok(Watcher {
            rx: None,
            _stop: stop_tx,
            stop_rx,
            sink: Arc::downgrade(&sink),
            holders: std::sync::OnceLock::new(),
            _vm_events: vm_events,
        })
    }

    /// Opens and closes of the nodes of every configured GPU, not only the primary one's,
    /// and nothing else: what the holder publisher ([`crate::publish`]) waits on.
    pub fn nodes_of_every_gpu(config: &Config) -> Result<Watcher, WatchError> {
        let (tx, rx) = mpsc::channel();
        let sink: Sink = Arc::new(move |c| tx.send(c).is_ok());
        let (stop_rx, stop_tx) = pipe().map_err(WatchError::Thread)?;
        let stop_rx = Arc::new(stop_rx);
        for g in config.gpu.iter() {
            nodes::spawn(&config.host, g.address, sink.clone(), stop_rx.clone())?;
        }
        Ok(Watcher {
            rx: Some(rx),
            _stop: stop_tx,
            stop_rx,
            sink: Arc::downgrade(&sink),
            holders: std::sync::OnceLock::new(),
            _vm_events: None,
        })
    }

    /// The next change; blocks. Errors only when there is no channel ([`Watcher::with_sink`]).
    pub fn recv(&self) -> Result<Change, RecvError> {
        self.rx.as_ref().ok_or(RecvError)?.recv()
    }

    /// From now on, report [`Change::HolderExited`] when one of `pids` exits: the
    /// surfaces pass the holders of their last scan (an empty slice stops watching).
    /// Nothing else announces a CUDA job that ends. One thread, started on the first call,
    /// sleeps in `poll` on a pidfd per pid; a process that closes the GPU but keeps
    /// running is not seen.
    pub fn watch_holders(&self, pids: &[u32]) {
        // No thread until there is something to watch.
        if pids.is_empty() && self.holders.get().is_none() {
            return;
        }
        let w = self.holders.get_or_init(|| {
            let sink = self.sink.upgrade()?;
            pids::PidWatch::spawn(sink, self.stop_rx.clone())
                .inspect_err(|e| tracing::warn!("holders that exit will not be noticed: {e}"))
                .ok()
        });
        if let Some(w) = w {
            w.set(pids);
        }
    }

    pub fn recv_timeout(&self, timeout: Duration) -> Result<Change, RecvTimeoutError> {
        self.rx
            .as_ref()
            .ok_or(RecvTimeoutError::Disconnected)?
            .recv_timeout(timeout)
    }
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// Blocks until `fd` is readable (true) or `stop` hung up (false). No timeout: this is
/// the only place the uevent and inotify threads sleep.
fn wait_readable(fd: BorrowedFd<'_>, stop: &OwnedFd) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [
        PollFd::new(fd, PollFlags::POLLIN),
        PollFd::new(stop.as_fd(), PollFlags::POLLIN),
    ];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        if fds[1].any().unwrap_or(true) {
            return Ok(false);
        }
        if fds[0].any().unwrap_or(true) {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod write_changes_tests {
    use super::*;

    fn changes() -> Vec<Change> {
        vec![
            Change::SourceBack {
                source: Source::Libvirt {
                    uri: "qemu:///system".into(),
                },
            },
            Change::RestoreRecord {
                file: "/run/handoff/restore-0000:01:00.0.json".into(),
                present: true,
            },
        ]
    }

    #[test]
    fn one_line_per_change_as_text_or_json() {
        let mut text = Vec::new();
        write_changes(changes(), false, &mut text).unwrap();
        let want: String = changes().iter().map(|c| format!("{c}\n")).collect();
        assert_eq!(String::from_utf8(text).unwrap(), want);

        let mut json = Vec::new();
        write_changes(changes(), true, &mut json).unwrap();
        let lines: Vec<Change> = String::from_utf8(json)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, changes());
    }

    /// A writer whose reader went away after `left` lines.
    struct Closing {
        left: usize,
        written: usize,
    }

    impl io::Write for Closing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.left -= 1;
            self.written += 1;
            Ok(())
        }
    }

    #[test]
    fn stops_when_nobody_reads() {
        let mut out = Closing { left: 1, written: 0 };
        // An endless stream: only the closed output can end it.
        let endless = std::iter::repeat_with(|| changes().remove(0));
        write_changes(endless, false, &mut out).unwrap();
        assert_eq!(out.written, 1);
    }
}
