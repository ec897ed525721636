//! inotify on `[host] run`: the hook's `state.json`, its restore records and its log of
//! refused starts (`refusals.json`, [`crate::refusals`]), and the holder publisher's
//! `holders.json` ([`crate::publish`]; reported as [`Change::Holders`]).
//!
//! The hook replaces `state.json` atomically (write a dot-file, rename over), so the
//! directory is watched, not the file: `IN_MOVED_TO` and `IN_CLOSE_WRITE` mean "new
//! content", `IN_DELETE`/`IN_MOVED_FROM` "gone". The same goes for `restore-*.json`
//! (written while a handoff is under way, kept when one must be restored).
//!
//! Root creates `/run/handoff` on the first hook run, after the tray may have started. So
//! while the directory is missing, its nearest existing ancestor is watched for
//! creations, and when the directory appears (or comes back after being removed) the
//! files already in it are reported.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, WatchDescriptor};

use super::{Change, Sink, Source, WatchError};
use crate::host::Host;
use crate::state::HookState;

const STATE_FILE: &str = "state.json";

const DIR_MASK: AddWatchFlags = AddWatchFlags::IN_MOVED_TO
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

const ANCESTOR_MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

/// What a file name in the run directory means, if anything.
fn change_for(run: &Path, name: &OsStr, present: bool) -> Option<Change> {
    let name = name.to_str()?;
    // `state-<BDF>.json`: the hook's state of a GPU other than the primary one.
    let other_gpu = name
        .strip_prefix("state-")
        .and_then(|n| n.strip_suffix(".json"))
        .and_then(|a| a.parse::<crate::pci::PciAddress>().ok());
    if name == STATE_FILE || other_gpu.is_some() {
        let host = Host {
            run: run.to_owned(),
            ..Host::default()
        };
        let state = if present {
            match other_gpu {
                Some(gpu) => HookState::load_gpu(&host, gpu),
                None => HookState::load(&host),
            }
            .map(Box::new)
        } else {
            None
        };
        return Some(Change::HookState { state });
    }
    if name == crate::refusals::FILE {
        // The hook appends each refused start; the newest is the news (a surface reads
        // all it has not told with `refusals::Unseen`).
        if !present {
            return None;
        }
        let host = Host {
            run: run.to_owned(),
            ..Host::default()
        };
        let last = crate::refusals::RefusalLog::read(&host).ok()??.refusals.pop()?;
        return Some(Change::Refused {
            vm: last.vm,
            seq: last.seq,
        });
    }
    if name == crate::publish::FILE {
        // The holder publisher saw the holders change: surfaces re-read their status,
        // which takes in what it publishes (`publish::complete`).
        if !present {
            return None;
        }
        let host = Host {
            run: run.to_owned(),
            ..Host::default()
        };
        let p = crate::publish::read_fresh(&host)?;
        let g = p.gpus.into_iter().next()?;
        return Some(Change::Holders {
            holders: g
                .holders
                .into_iter()
                .map(|h| super::HolderSeen {
                    pid: h.pid,
                    command: h.command,
                    user: h.user,
                })
                .collect(),
            uninspected: g.uninspected,
        });
    }
    if name.starts_with("restore-") && name.ends_with(".json") {
        return Some(Change::RestoreRecord {
            file: name.to_owned(),
            present,
        });
    }
    None
}

struct Inotify {
    fd: nix::sys::inotify::Inotify,
    run: PathBuf,
    wd: Option<WatchDescriptor>,
    /// True when `wd` watches the run directory itself, not an ancestor.
    on_run: bool,
}

impl Inotify {
    fn new(run: &Path) -> io::Result<Self> {
        Ok(Self {
            fd: nix::sys::inotify::Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?,
            run: run.to_owned(),
            wd: None,
            on_run: false,
        })
    }

    fn add_watch(&self, path: &Path, mask: AddWatchFlags) -> io::Result<WatchDescriptor> {
        Ok(self.fd.add_watch(path, mask)?)
    }

    /// Watches the run directory if it exists, else its nearest existing ancestor. Returns
    /// true when this call moved the watch onto the run directory.
    fn arm(&mut self) -> io::Result<bool> {
        loop {
            let (path, mask, on_run) = if self.run.is_dir() {
                (self.run.clone(), DIR_MASK, true)
            } else {
                let ancestor = self
                    .run
                    .ancestors()
                    .skip(1)
                    .find(|a| a.is_dir())
                    .unwrap_or(Path::new("/"))
                    .to_owned();
                (ancestor, ANCESTOR_MASK, false)
            };
            if on_run && self.on_run && self.wd.is_some() {
                return Ok(false);
            }
            let wd = match self.add_watch(&path, mask) {
                Ok(wd) => wd,
                // Removed between the check and the watch: look again.
                Err(e)
                    if e.raw_os_error() == Some(Errno::ENOENT as i32)
                        || e.raw_os_error() == Some(Errno::ENOTDIR as i32) =>
                {
                    continue;
                }
                Err(e) => {
                    return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
                }
            };
            if let Some(old) = self.wd.filter(|&old| old != wd) {
                // Failure is harmless: the old watch only sends events that are ignored.
                let _ = self.fd.rm_watch(old);
            }
            self.wd = Some(wd);
            let moved = on_run && !self.on_run;
            self.on_run = on_run;
            // The next component may have appeared before the watch was in place.
            if !on_run && self.run.is_dir() {
                continue;
            }
            return Ok(moved);
        }
    }

    /// The files already there, as if they had just been written.
    fn existing(&self) -> Vec<Change> {
        let Ok(entries) = std::fs::read_dir(&self.run) else {
            return Vec::new();
        };
        let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
        names.sort();
        names
            .iter()
            .filter_map(|n| change_for(&self.run, n, true))
            .collect()
    }
}

pub(super) fn spawn(run: &Path, sink: Sink, stop: Arc<OwnedFd>) -> Result<(), WatchError> {
    let err = |why| WatchError::RunDir {
        path: run.display().to_string(),
        why,
    };
    let mut ino = Inotify::new(run).map_err(err)?;
    ino.arm().map_err(err)?;
    thread::Builder::new()
        .name("handoff-inotify".into())
        .spawn(move || watch(ino, &sink, &stop))
        .map(drop)
        .map_err(WatchError::Thread)
}

fn watch(mut ino: Inotify, sink: &Sink, stop: &OwnedFd) {
    let path = ino.run.display().to_string();
    let source = || Source::RunDir { path: path.clone() };
    let lost = |why: String| {
        let _ = sink(Change::SourceLost {
            source: source(),
            why,
        });
    };
    // The hook's write_atomic renames its temporary file into place while it is still
    // open, so one save is both IN_MOVED_TO and IN_CLOSE_WRITE of `state.json`: report a
    // file only when what it says differs from what was last reported for it.
    let mut last: HashMap<String, Change> = HashMap::new();
    loop {
        match super::wait_readable(ino.fd.as_fd(), stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return lost(format!("poll: {e}")),
        }
        let events = match ino.fd.read_events() {
            Ok(events) => events,
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(e) => return lost(format!("read inotify: {}", io::Error::from(e))),
        };
        let mut changes = Vec::new();
        let mut rearm = false;
        for ev in events {
            let name = ev.name.as_deref().unwrap_or(OsStr::new(""));
            if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                rearm = true;
                changes.push(Change::SourceLost {
                    source: source(),
                    why: "inotify queue overflowed".into(),
                });
                changes.push(Change::SourceBack { source: source() });
                continue;
            }
            if Some(ev.wd) != ino.wd {
                continue; // a watch we already replaced
            }
            if ev.mask.intersects(
                AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED,
            ) {
                rearm = true;
                continue;
            }
            if !ino.on_run {
                // Something was created in an ancestor: maybe the next step to the run dir.
                rearm = true;
                continue;
            }
            let present = ev
                .mask
                .intersects(AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE);
            if let Some(c) = change_for(&ino.run, name, present) {
                changes.push(c);
            }
        }
        if rearm {
            let was_on_run = ino.on_run;
            if ino.wd.is_some() && !ino.run.is_dir() {
                // The run dir went away (or was never there): forget the stale watch.
                ino.on_run = false;
                if was_on_run {
                    changes.push(Change::HookState { state: None });
                }
            }
            match ino.arm() {
                Ok(true) => changes.extend(ino.existing()),
                Ok(false) => {}
                Err(e) => {
                    for c in changes {
                        sink(c);
                    }
                    return lost(format!("watch: {e}"));
                }
            }
        }
        for c in changes {
            if let Some(key) = file_key(&c) {
                if last.get(&key) == Some(&c) {
                    continue;
                }
                last.insert(key, c.clone());
            }
            if !sink(c) {
                return;
            }
        }
    }
}

/// The file a change is about, for deduplication.
fn file_key(c: &Change) -> Option<String> {
    match c {
        Change::HookState { .. } => Some(STATE_FILE.to_owned()),
        Change::RestoreRecord { file, .. } => Some(file.clone()),
        Change::Refused { .. } => Some(crate::refusals::FILE.to_owned()),
        _ => None,
    }
}
