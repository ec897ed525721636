//! The two long-running modes, both driven by [`handoff::live::Watcher`] without libvirt
//! (kernel uevents for the GPU's functions, inotify on `[host] run` and on the GPU's
//! nodes): no timer, no polling.
//!
//! - `--watch`: prints the block's line now and again after every change (a burst of
//!   changes, e.g. the four functions of a card binding one after another, is read as
//!   one: what is already queued is drained before re-reading). A line equal to the last
//!   one is not printed again. For i3blocks `interval=persist`, i3status-rust
//!   `persistent = true`, waybar without `interval`, polybar `tail = true`.
//! - `--signal-i3blocks N`: prints nothing; on every change sends `SIGRTMIN+N` to each
//!   i3blocks process of this user, so one-shot blocks with `signal=N` re-run. That is the
//!   setup that keeps clicks working in i3blocks 1.4, which does not forward clicks to
//!   persist blocks.
//!
//! A process opening or closing one of the GPU's nodes is heard through inotify on the
//! nodes (`handoff::live::nodes`), so "1 busy" comes when a CUDA job starts and goes when
//! it closes the GPU; a holder that exits is heard through a pidfd per holder of the last
//! scan too ([`Watcher::watch_holders`]). What no event announces: an open by a process
//! this user cannot inspect (another user's), and an open through another inode of the
//! same device (a container's own `/dev`).

use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use handoff::config::Config;
use handoff::live::{Sources, Watcher};

use crate::format::{self, Format};
use crate::view;

pub fn watch(cfg: &Config, fmt: Format, short: bool) -> Result<(), String> {
    let w = Watcher::new(cfg, Sources::without_libvirt()).map_err(|e| e.to_string())?;
    let mut out = io::stdout().lock();
    let mut last = String::new();
    loop {
        let v = view::read(cfg);
        w.watch_holders(&v.holder_pids);
        let line = format::render(&v, fmt, short, true);
        if line != last {
            // The bar went away (EPIPE): nothing left to do.
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                return Ok(());
            }
            last = line;
        }
        if w.recv().is_err() {
            return Err("the change stream ended".into());
        }
        drain(&w);
    }
}

/// Drops changes already queued; never waits.
fn drain(w: &Watcher) {
    while w.recv_timeout(Duration::ZERO).is_ok() {}
}

pub fn signal_i3blocks(cfg: &Config, n: i32) -> Result<(), String> {
    let sig = rt_signal(n)?;
    let w = Watcher::new(cfg, Sources::without_libvirt()).map_err(|e| e.to_string())?;
    let uid = nix::unistd::getuid().as_raw();
    // Once at start: whatever changed while nothing watched. The scan here is only for
    // the holders' pids, so that one exiting re-runs the blocks too.
    signal_all(&cfg.host.procfs, uid, sig);
    w.watch_holders(&view::read(cfg).holder_pids);
    while w.recv().is_ok() {
        drain(&w);
        signal_all(&cfg.host.procfs, uid, sig);
        w.watch_holders(&view::read(cfg).holder_pids);
    }
    Err("the change stream ended".into())
}

/// `SIGRTMIN+n`, as i3blocks' `signal=n` means it. Compared as `n` against the room
/// left above SIGRTMIN, so no `n` can overflow.
pub fn rt_signal(n: i32) -> Result<i32, String> {
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    if n < 1 || n > max - min {
        return Err(signal_range_error(&n.to_string()));
    }
    Ok(min + n)
}

/// `--signal-i3blocks` given something that is not one of the real-time signals.
pub fn signal_range_error(given: &str) -> String {
    format!(
        "--signal-i3blocks {given}: i3blocks signals run from 1 to {} (signal=N in the i3blocks config)",
        libc::SIGRTMAX() - libc::SIGRTMIN()
    )
}

fn signal_all(procfs: &Path, uid: u32, sig: i32) {
    for pid in i3blocks_pids(procfs, uid) {
        // libc, not nix: nix's `Signal` has no real-time signals (SIGRTMIN+n).
        // SAFETY: kill(2) touches no memory of ours; a pid that has gone is ESRCH.
        unsafe { libc::kill(pid, sig) };
    }
}

/// i3blocks processes whose real uid is `uid`, from `/proc/<pid>/status` (what
/// `pkill -u $USER i3blocks` would match, without pkill).
pub fn i3blocks_pids(procfs: &Path, uid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(procfs) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(status) = std::fs::read_to_string(procfs.join(pid.to_string()).join("status")) else {
                return false;
            };
            let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
            field("Name:") == Some("i3blocks")
                && field("Uid:")
                    .and_then(|u| u.split_whitespace().next())
                    .and_then(|u| u.parse::<u32>().ok())
                    == Some(uid)
        })
        .collect()
}
