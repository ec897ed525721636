//! Which removed device nodes some process still has open, learnt from inotify.
//!
//! The kernel frees a DRM minor, and lets a sound card's unbind finish, only when the last
//! process that has the device open closes it. The simulated `/dev` is ordinary files, so
//! the simulator learns the same thing from the file system: just before it removes a
//! node it puts an inotify watch on the node's inode; the kernel reports `IN_DELETE_SELF`
//! (then `IN_IGNORED`) once the inode has no name left and its last open file is closed —
//! at once when nothing had it open. Until then the node is "still open".
//!
//! Why not read `/proc/<pid>/fd`: that is what an earlier version did, from inside the FUSE
//! handler, and it deadlocked. `readlink` of another process's fd takes locks that a
//! thread of that process stuck in a FUSE write to this same mount holds, so the handler
//! waited for a writer that waited for the handler. An inotify read on a non-blocking fd
//! never waits for anything: the events are queued by `unlink` and `close` themselves.
//!
//! What this cannot see: a node opened through another name for the same inode (a hard
//! link) keeps the inode, and so the "open", as long as that name exists, opened or not.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno as NixErrno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// Removed nodes whose inode some process still has open.
pub(super) struct RemovedNodes {
    inotify: Option<Inotify>,
    alive: HashMap<WatchDescriptor, PathBuf>,
}

impl std::fmt::Debug for RemovedNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemovedNodes")
            .field("alive", &self.alive.values().collect::<Vec<_>>())
            .finish()
    }
}

impl RemovedNodes {
    /// Without inotify (out of instances) nothing counts as held: minors are reused at
    /// once and sound unbinds never wait. Said once, in the log.
    pub(super) fn new() -> RemovedNodes {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .inspect_err(|e| {
                tracing::warn!(
                    "simulated kernel: no inotify ({e}): removed device nodes count as closed at once"
                )
            })
            .ok();
        RemovedNodes {
            inotify,
            alive: HashMap::new(),
        }
    }

    /// Watch `node`, which is about to be removed, until its inode is gone.
    pub(super) fn watch(&mut self, node: &Path) {
        let Some(inotify) = &self.inotify else { return };
        match inotify.add_watch(node, AddWatchFlags::IN_DELETE_SELF) {
            Ok(wd) => {
                self.alive.insert(wd, node.to_owned());
            }
            Err(e) => tracing::warn!("simulated kernel: watching {}: {e}", node.display()),
        }
    }

    /// Take the queued events: an inode that is gone is no longer held. Never blocks.
    fn drain(&mut self) {
        let Some(inotify) = &self.inotify else { return };
        loop {
            match inotify.read_events() {
                Ok(events) => {
                    for e in events {
                        if e.mask
                            .intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_IGNORED)
                        {
                            self.alive.remove(&e.wd);
                        }
                        if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            tracing::warn!("simulated kernel: inotify queue overflowed");
                        }
                    }
                }
                Err(NixErrno::EAGAIN) => return,
                Err(NixErrno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("simulated kernel: reading inotify: {e}");
                    return;
                }
            }
        }
    }

    /// The removed nodes (their paths as they were) that a process still has open.
    pub(super) fn held(&mut self) -> Vec<PathBuf> {
        self.drain();
        let mut v: Vec<PathBuf> = self.alive.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }

    /// Those of `nodes` still held.
    pub(super) fn held_of(&mut self, nodes: &[PathBuf]) -> Vec<PathBuf> {
        self.held().into_iter().filter(|n| nodes.contains(n)).collect()
    }

    /// A second descriptor of the inotify queue, readable when a removed node's last
    /// holder closes: something to `poll` on to settle waiting unbinds (see
    /// [`super::Kernel::nodes_changed`]).
    pub(super) fn fd(&self) -> Option<OwnedFd> {
        self.inotify
            .as_ref()
            .and_then(|i| i.as_fd().try_clone_to_owned().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_removed_node_is_held_until_its_last_opener_closes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("card0"), tmp.path().join("card1"));
        fs::write(&a, "").unwrap();
        fs::write(&b, "").unwrap();
        let mut nodes = RemovedNodes::new();
        let open = fs::File::open(&a).unwrap();
        // A forked copy of the descriptor is the same open file: one close of each.
        let dup = open.try_clone().unwrap();
        for n in [&a, &b] {
            nodes.watch(n);
            fs::remove_file(n).unwrap();
        }
        assert_eq!(nodes.held(), vec![a.clone()], "card1 had no opener");
        drop(open);
        assert_eq!(nodes.held(), vec![a.clone()], "a duplicate is still open");
        drop(dup);
        assert_eq!(nodes.held(), Vec::<PathBuf>::new());
    }
}
