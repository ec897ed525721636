//! Opens and closes of the GPU's device nodes, from inotify on the nodes themselves.
//!
//! A CUDA job starting, `nvidia-smi`, a browser on the render node: none of them binds a
//! driver or writes a file the hook owns, so before this nothing told a surface that the
//! GPU had become busy. The kernel reports every open and close of an inode to inotify
//! watchers (`fsnotify_open` / `__fput`), device nodes included, and adding the watch needs
//! only read permission on the node. So this source watches each node the holder scan
//! checks ([`holders::gpu_nodes`]) for `IN_OPEN`, `IN_CLOSE_WRITE` and `IN_CLOSE_NOWRITE`,
//! and on a burst of them rescans ([`holders::scan`]) and reports [`Change::Holders`] only
//! when the set of holders it can see changed: a process that opens a node it already holds
//! is no news, and neither is an open by a process this user cannot inspect.
//!
//! Nodes that appear later (the driver loaded after a return, a render node created on
//! bind) are watched when they appear: the directories the nodes live in (`dev`,
//! `dev/dri`, `dev/snd`, `dev/nvidia-caps`) are watched for creations and removals, and
//! the node set is recomputed on each.
//!
//! **Debounce.** A CUDA context opens `nvidiactl`, `nvidia0`, `nvidia-uvm` and more in a
//! few milliseconds. After the first event the thread waits [`QUIET`] for the burst to end
//! (at most [`BURST_MAX`]), then scans once. That wait runs only after an event: while
//! nothing opens or closes a node this thread sleeps in `poll(2)` with no timeout.
//!
//! **The first report.** There is no baseline scan at start (that would cost a `/proc` walk
//! in [`super::Watcher::new`]); the first burst of events is always reported, even when it
//! leaves the set as the surface last read it.
//!
//! Not seen: an open of the same device through another inode (a container's own `/dev`
//! with its own `mknod`, a copy of the node elsewhere): inotify watches inodes, not devices.
//! Such a holder is still found by the next full scan (a click, a menu, a one-shot block).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::{Change, HolderSeen, Sink, Source, WatchError};
use crate::gpu;
use crate::holders;
use crate::host::Host;
use crate::pci::PciAddress;

/// How long a burst of opens and closes must be quiet before the scan.
pub const QUIET: Duration = Duration::from_millis(10);
/// The longest a burst delays the scan: a process that opens and closes in a loop still
/// gets reported.
pub const BURST_MAX: Duration = Duration::from_millis(40);

const NODE_MASK: AddWatchFlags = AddWatchFlags::IN_OPEN
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_CLOSE_NOWRITE);

const DIR_MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_ONLYDIR);

/// Directories under `dev` where the GPU's nodes live, besides `dev` itself.
const NODE_DIRS: [&str; 3] = ["dri", "snd", "nvidia-caps"];

struct NodeWatch {
    fd: Inotify,
    host: Host,
    address: PciAddress,
    nodes: HashMap<WatchDescriptor, PathBuf>,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Nodes that could not be watched, and why, as last reported.
    unwatched: Vec<String>,
    /// What was last reported (None: nothing yet).
    last: Option<(Vec<HolderSeen>, usize)>,
}

impl NodeWatch {
    fn new(host: &Host, address: PciAddress) -> io::Result<Self> {
        Ok(Self {
            fd: Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?,
            host: host.clone(),
            address,
            nodes: HashMap::new(),
            dirs: HashMap::new(),
            unwatched: Vec::new(),
            last: None,
        })
    }

    /// Watches every node of the GPU and every directory they may appear in; drops the
    /// watches of nodes that are no longer the GPU's. Returns the nodes it could not watch,
    /// one line each.
    fn arm(&mut self) -> Vec<String> {
        let mut dirs = vec![self.host.dev.clone()];
        dirs.extend(NODE_DIRS.iter().map(|d| self.host.dev.join(d)));
        let nodes: Vec<PathBuf> = match gpu::read_gpu(&self.host, self.address) {
            Ok(g) => holders::gpu_nodes(&self.host, &g)
                .into_iter()
                .map(|n| n.path)
                .collect(),
            Err(_) => Vec::new(), // absent: nothing to watch until it comes back
        };
        for n in &nodes {
            if let Some(parent) = n.parent()
                && !dirs.iter().any(|d| d == parent)
            {
                dirs.push(parent.to_owned());
            }
        }
        for d in dirs {
            if d.is_dir() && !self.dirs.values().any(|w| *w == d) {
                match self.fd.add_watch(&d, DIR_MASK) {
                    Ok(wd) => {
                        self.dirs.insert(wd, d);
                    }
                    Err(e) => tracing::debug!("cannot watch {} for new nodes: {e}", d.display()),
                }
            }
        }
        // Node watches whose node is gone from the set.
        let stale: Vec<WatchDescriptor> = self
            .nodes
            .iter()
            .filter(|(_, p)| !nodes.contains(p))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in stale {
            self.nodes.remove(&wd);
            // A dir and a node never share an inode, so this watch is the node's alone.
            let _ = self.fd.rm_watch(wd);
        }
        let mut failed = Vec::new();
        for n in nodes {
            if self.nodes.values().any(|p| *p == n) {
                continue;
            }
            match self.fd.add_watch(&n, NODE_MASK) {
                Ok(wd) => {
                    self.nodes.insert(wd, n);
                }
                Err(e) => failed.push(format!(
                    "cannot watch {} for opens ({}): who opens it is seen only on the next full scan",
                    n.display(),
                    io::Error::from(e)
                )),
            }
        }
        failed
    }

    /// The holders this process can see now, and how many processes it could not inspect.
    fn scan(&self) -> (Vec<HolderSeen>, usize) {
        let Ok(g) = gpu::read_gpu(&self.host, self.address) else {
            return (Vec::new(), 0);
        };
        let nodes = holders::gpu_nodes(&self.host, &g);
        let scan = holders::scan(&self.host, &g, &nodes);
        let seen = scan
            .holders
            .iter()
            .filter(|h| !h.paths.is_empty())
            .map(|h| HolderSeen {
                pid: h.pid,
                command: h.command.clone(),
                user: h.user.clone(),
            })
            .collect();
        (seen, scan.uninspected)
    }
}

pub(super) fn spawn(
    host: &Host,
    address: PciAddress,
    sink: Sink,
    stop: Arc<OwnedFd>,
) -> Result<(), WatchError> {
    let mut w = NodeWatch::new(host, address).map_err(|why| WatchError::Nodes { why })?;
    w.unwatched = w.arm();
    let unwatched = w.unwatched.clone();
    thread::Builder::new()
        .name("handoff-nodes".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            if !unwatched.is_empty() && !sink(lost(unwatched.join("; "))) {
                return;
            }
            run(w, &sink, &stop)
        })
        .map(drop)
        .map_err(WatchError::Thread)
}

fn lost(why: String) -> Change {
    Change::SourceLost {
        source: Source::Nodes,
        why,
    }
}

/// What a batch of events asks for.
#[derive(Default)]
struct Todo {
    scan: bool,
    rearm: bool,
}

fn read_events(w: &mut NodeWatch, todo: &mut Todo) -> Result<(), Errno> {
    loop {
        let events = match w.fd.read_events() {
            Ok(e) => e,
            Err(Errno::EAGAIN) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        for ev in events {
            if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                todo.scan = true;
                todo.rearm = true;
            } else if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                // The node (or directory) is gone: forget it, look again.
                w.nodes.remove(&ev.wd);
                w.dirs.remove(&ev.wd);
                todo.rearm = true;
                todo.scan = true;
            } else if w.dirs.contains_key(&ev.wd) {
                todo.rearm = true;
                todo.scan = true;
            } else if w.nodes.contains_key(&ev.wd) {
                todo.scan = true;
            }
        }
    }
}

fn run(mut w: NodeWatch, sink: &Sink, stop: &OwnedFd) {
    loop {
        match super::wait_readable(w.fd.as_fd(), stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = sink(lost(format!("poll: {e}")));
                return;
            }
        }
        let mut todo = Todo::default();
        // The burst: keep reading while events come closer than QUIET, for BURST_MAX.
        let start = Instant::now();
        loop {
            if let Err(e) = read_events(&mut w, &mut todo) {
                let _ = sink(lost(format!("read inotify: {}", io::Error::from(e))));
                return;
            }
            let left = BURST_MAX.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            match readable_within(w.fd.as_fd(), stop, QUIET.min(left)) {
                Ok(Some(true)) => continue,
                Ok(Some(false)) => return,
                Ok(None) => break,
                Err(e) => {
                    let _ = sink(lost(format!("poll: {e}")));
                    return;
                }
            }
        }
        if todo.rearm {
            let failed = w.arm();
            if failed != w.unwatched {
                let change = if failed.is_empty() {
                    Change::SourceBack {
                        source: Source::Nodes,
                    }
                } else {
                    lost(failed.join("; "))
                };
                w.unwatched = failed;
                if !sink(change) {
                    return;
                }
            }
        }
        if todo.scan {
            let now = w.scan();
            if w.last.as_ref() == Some(&now) {
                continue;
            }
            let (holders, uninspected) = now.clone();
            w.last = Some(now);
            if !sink(Change::Holders { holders, uninspected }) {
                return;
            }
        }
    }
}

/// Like [`super::wait_readable`] with a deadline: `Some(true)` readable, `Some(false)`
/// stop hung up, `None` nothing within `timeout`. Used only inside a burst.
fn readable_within(
    fd: std::os::fd::BorrowedFd<'_>,
    stop: &OwnedFd,
    timeout: Duration,
) -> io::Result<Option<bool>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [
        PollFd::new(fd, PollFlags::POLLIN),
        PollFd::new(stop.as_fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Err(Errno::EINTR) => return Ok(Some(true)),
        Err(e) => return Err(e.into()),
        Ok(0) => return Ok(None),
        Ok(_) => {}
    }
    if fds[1].any().unwrap_or(true) {
        return Ok(Some(false));
    }
    Ok(Some(fds[0].any().unwrap_or(true)))
}
