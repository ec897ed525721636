//! The end of a process that holds the GPU, from pidfds.
//!
//! No uevent, hook or libvirt event says "the CUDA job finished": a holder that exits
//! changes what the surfaces show ("2 processes use the GPU", "Linux · 1 busy") without
//! anything else moving. So the surfaces hand the pids of their last scan to
//! [`super::Watcher::watch_holders`], and one thread polls a pidfd per pid (readable once
//! the process has exited) next to the stop pipe and a wake pipe for a new set: no timer.
//!
//! Not covered: a holder that closes the GPU's nodes and keeps running. That needs a look
//! at its fds, i.e. polling, which the surfaces do not do while idle.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread;

use super::{Change, Sink};

/// The set of pids to watch, shared with the thread, and the pipe that wakes it.
pub(super) struct PidWatch {
    /// The set, and a number bumped by each [`PidWatch::set`].
    wanted: Arc<Mutex<(u64, Vec<u32>)>>,
    wake: OwnedFd,
}

impl PidWatch {
    pub(super) fn spawn(sink: Sink, stop: Arc<OwnedFd>) -> io::Result<PidWatch> {
        let (wake_rx, wake) = super::pipe()?;
        set_nonblocking(&wake_rx)?;
        let wanted = Arc::new(Mutex::new((0, Vec::new())));
        let shared = wanted.clone();
        thread::Builder::new()
            .name("handoff-holders".into())
            .stack_size(64 * 1024)
            .spawn(move || run(&shared, &wake_rx, &stop, &sink))?;
        Ok(PidWatch { wanted, wake })
    }

    /// Watch exactly `pids` from now on. Each call is news even with the same set: a pid
    /// of it that exited since it was last reported is reported again, since the caller
    /// still counts it.
    pub(super) fn set(&self, pids: &[u32]) {
        let mut w = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        w.0 += 1;
        w.1 = pids.to_vec();
        drop(w);
        // A full pipe already holds a wake-up, so EAGAIN loses nothing.
        let _ = nix::unistd::write(&self.wake, &[1u8]);
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// libc, not nix: nix 0.31 has no pidfd_open.
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn run(wanted: &Mutex<(u64, Vec<u32>)>, wake: &OwnedFd, stop: &OwnedFd, sink: &Sink) {
    let mut open: HashMap<u32, OwnedFd> = HashMap::new();
    // Exits reported for the current set; a new set starts afresh.
    let mut generation = 0;
    let mut reported: Vec<u32> = Vec::new();
    let mut reconcile = true;
    loop {
        if reconcile {
            reconcile = false;
            let (g, pids) = wanted.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if g != generation {
                generation = g;
                reported.clear();
            }
            open.retain(|pid, _| pids.contains(pid));
            for pid in pids {
                if open.contains_key(&pid) || reported.contains(&pid) {
                    continue;
                }
                match pidfd_open(pid) {
                    Ok(fd) => {
                        open.insert(pid, fd);
                    }
                    // Gone between the scan and now: that is the news.
                    Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ESRCH as i32) => {
                        reported.push(pid);
                        if !sink(Change::HolderExited { pid }) {
                            return;
                        }
                    }
                    Err(e) => tracing::debug!("cannot watch pid {pid} for its exit: {e}"),
                }
            }
        }
        let order: Vec<u32> = open.keys().copied().collect();
        let ready = {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            let mut fds = vec![
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            ];
            fds.extend(
                order
                    .iter()
                    .map(|pid| PollFd::new(open[pid].as_fd(), PollFlags::POLLIN)),
            );
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(
                        "no more news of the GPU's holders exiting: poll: {}",
                        io::Error::from(e)
                    );
                    return;
                }
                Ok(_) => {}
            }
            // Unknown revents bits are still news: None counts as ready.
            fds.iter().map(|f| f.any().unwrap_or(true)).collect::<Vec<bool>>()
        };
        if ready[0] {
            return;
        }
        if ready[1] {
            let mut buf = [0u8; 64];
            // The pipe is non-blocking: read until it is empty.
            while nix::unistd::read(wake, &mut buf).is_ok_and(|n| n > 0) {}
            reconcile = true;
        }
        for (i, pid) in order.iter().enumerate() {
            if ready[i + 2] {
                open.remove(pid);
                reported.push(*pid);
                if !sink(Change::HolderExited { pid: *pid }) {
                    return;
                }
            }
        }
    }
}
