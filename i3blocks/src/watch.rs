//! The two long-running modes, both driven by [`handoff::live::Watcher`] without libvirt
//! (kernel uevents for the GPU's functions, inotify on `[host] run` and on the GPU's
//! nodes): no timer, no polling — except for a GPU in a Proxmox VE node (below).
//!
//! Proxmox VE has no event stream: a desktop whose GPU is in a PVE node (every `[[vm]]`
//! has a `vmid`, no GPU here) asks the node's API through `handoff-pve`
//! ([`crate::pve`]) every `[proxmox] poll_interval_s`, and at once after a click of its
//! own (the click's [`REFRESH`], and again when the click's job has finished). That is
//! the only timer; a config without PVE VMs has none.
//!
//! - `--watch`: prints the block's line now and again after every change (a burst of
//!   changes, e.g. the four functions of a card binding one after another, is read as
//!   one: what is already queued is drained before re-reading). A line equal to the last
//!   one is not printed again. For i3blocks `interval=persist`, i3status-rust
//!   `persistent = true`, waybar without `interval`, polybar `tail = true`. It lives as
//!   long as its bar: it never exits on a config error (a bar shows a dead block as
//!   "child process exited unexpectedly", hiding the reason) but shows the error and the
//!   file, watches the file with inotify and goes on when it is fixed; it exits when the
//!   bar closes its end of stdout ([`end_with_the_bar`]). A click (`--click` from the
//!   same user) sends it [`REFRESH`], so the busy count is fresh after one.
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

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use handoff::config::{Config, ConfigError};
use handoff::live::{Sink, Sources, Watcher};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;

use crate::format::{self, Format};
use crate::view;

/// What a click sends the streaming blocks of its user so that they read the machine
/// again (the click may have changed it, and nothing announces a process opening the
/// GPU). SIGWINCH because its default action is to ignore it: a block that has not yet
/// blocked it (one starting at that moment, a one-shot block) is not killed.
pub const REFRESH: Signal = Signal::SIGWINCH;

/// What wakes the streaming block.
enum Wake {
    /// The GPU, the hook's files or a holder changed.
    Change,
    /// The config file was written, replaced or removed.
    Config,
    /// A click ([`REFRESH`]).
    Click,
}

/// Which config the block reads, and which file to watch for edits: the one given, the
/// one in use, or (with none) where the user's would be.
pub fn load(explicit: Option<&Path>) -> (Result<Config, ConfigError>, Option<PathBuf>) {
    if let Some(path) = explicit {
        return (Config::load_file(path), Some(path.to_owned()));
    }
    match Config::load() {
        Ok((cfg, handoff::config::Source::File(p))) => (Ok(cfg), Some(p)),
        Ok((cfg, handoff::config::Source::Defaults)) => (Ok(cfg), handoff::config::user_config_path()),
        Err(e) => {
            let path = error_path(&e).map(Path::to_owned);
            (Err(e), path)
        }
    }
}

/// The file a config error is about.
pub fn error_path(e: &ConfigError) -> Option<&Path> {
    match e {
        ConfigError::Read { path, .. }
        | ConfigError::Parse { path, .. }
        | ConfigError::Invalid { path, .. }
        | ConfigError::Insecure { path, .. }
        | ConfigError::NotForRoot { path, .. }
        | ConfigError::BrokenLink { path, .. }
        | ConfigError::EnvMissing { path } => Some(path),
    }
}

/// `--watch`. Stays up whatever happens to the config: an error is shown (with its file)
/// until the file is fixed, and an edit is read at once. Ends when the bar goes.
pub fn watch(
    explicit: Option<&Path>,
    focus: &dyn Fn(Config) -> Result<Config, String>,
    fmt: Format,
    short: bool,
) -> Result<(), String> {
    // Before any thread exists, so that every thread inherits the mask and the signal
    // reaches only the signalfd.
    let mut mask = SigSet::empty();
    mask.add(REFRESH);
    mask.thread_block()
        .map_err(|e| format!("cannot block {REFRESH}: {e}"))?;
    end_with_the_bar().map_err(|e| format!("cannot watch stdout: {e}"))?;
    let (tx, rx) = mpsc::channel();
    listen_for_clicks(mask, tx.clone()).map_err(|e| format!("cannot listen for clicks: {e}"))?;
    let mut out = Out {
        out: io::stdout().lock(),
        last: String::new(),
    };
    let mut watched = HashSet::new();
    loop {
        let (loaded, path) = load(explicit);
        if let Some(p) = path {
            if watched.insert(p.clone()) {
                if let Err(e) = watch_config_file(&p, tx.clone()) {
                    eprintln!("handoff-block: edits of {} will not be noticed: {e}", p.display());
                }
            }
        }
        // The GPU this block shows (`--gpu`, the instance) is chosen in the config as read.
        let shown = match loaded {
            Err(e) => {
                eprintln!("handoff-block: {e}");
                Err(config_error_view(&e))
            }
            Ok(cfg) => focus(cfg).map_err(|why| {
                eprintln!("handoff-block: {why}");
                no_such_gpu_view(&why)
            }),
        };
        match shown {
            Err(v) => {
                if !out.print(&format::render(&v, fmt, short, true)) {
                    return Ok(());
                }
                // Until the file changes: nothing else can make it right.
                loop {
                    match rx.recv() {
                        Ok(Wake::Config) => break,
                        Ok(_) => {}
                        Err(_) => return Err("the change stream ended".into()),
                    }
                }
            }
            Ok(cfg) => {
                if !stream(&cfg, fmt, short, &tx, &rx, &mut out)? {
                    return Ok(());
                }
            }
        }
    }
}

/// The block's lines for one config, until it changes (`Ok(true)`) or the bar has gone
/// (`Ok(false)`).
fn stream(
    cfg: &Config,
    fmt: Format,
    short: bool,
    tx: &Sender<Wake>,
    rx: &Receiver<Wake>,
    out: &mut Out,
) -> Result<bool, String> {
    let sink_tx = tx.clone();
    let sink: Sink = Arc::new(move |_| sink_tx.send(Wake::Change).is_ok());
    let w = Watcher::with_sink(cfg, Sources::without_libvirt(), sink).map_err(|e| e.to_string())?;
    let mut pve = crate::pve::Pve::default();
    let every = crate::pve::interval(cfg);
    loop {
        let v = view::read(cfg, &mut pve);
        w.watch_holders(&v.holder_pids);
        if !out.print(&format::render(&v, fmt, short, true)) {
            return Ok(false);
        }
        let first = match every {
            // The VMs of a PVE node: ask again when the interval is over.
            Some(d) => match rx.recv_timeout(d) {
                Ok(w) => w,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err("the change stream ended".into()),
            },
            None => rx.recv().map_err(|_| "the change stream ended".to_owned())?,
        };
        // A burst (four functions binding one after another) is read as one.
        let mut reload = matches!(first, Wake::Config);
        while let Ok(next) = rx.recv_timeout(Duration::ZERO) {
            reload |= matches!(next, Wake::Config);
        }
        if reload {
            return Ok(true);
        }
    }
}

/// What the bar shows when the GPU it was asked for (`--gpu`, the i3blocks instance) is not
/// in the config: `why` names the GPUs that are.
pub fn no_such_gpu_view(why: &str) -> view::View {
    view::View {
        text: "GPU: no such GPU".into(),
        short: "GPU: ?".into(),
        ..view::View::error(why)
    }
}

/// What the bar shows while the config cannot be read: the error, naming the file (and
/// line), in the bar's urgent colour, with the whole message in the tooltip.
pub fn config_error_view(e: &ConfigError) -> view::View {
    let v = view::View::error(&e.to_string());
    let at = match e {
        ConfigError::Parse { path, line, .. } => format!("{}:{line}", path.display()),
        other => error_path(other)
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    };
    view::View {
        text: handoff::escape::plain(&format!("GPU: config error · {at}")),
        short: "GPU: cfg!".into(),
        detail: format!(
            "{}\nFix the file: the block reads it again when it is saved.",
            handoff::escape::plain(&e.to_string())
        ),
        ..v
    }
}

/// stdout and the last line written to it.
struct Out {
    out: io::StdoutLock<'static>,
    last: String,
}

impl Out {
    /// Writes `line` unless it is the one already shown; false when the bar has gone
    /// (EPIPE).
    fn print(&mut self, line: &str) -> bool {
        if line == self.last {
            return true;
        }
        if writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .is_err()
        {
            return false;
        }
        self.last = line.to_owned();
        true
    }
}

/// Exits this process when the bar that reads its stdout goes away, even while nothing
/// changes and so nothing is written (a write would fail with EPIPE, but the next one may
/// be days away). A pipe whose reader has closed polls as POLLERR (POLLHUP for a
/// socket), so one thread sleeps in `poll` on stdout with no events asked for.
///
/// Not PR_SET_PDEATHSIG: it fires when the *thread* that forked us ends, and bars spawn
/// from worker threads that may end while the bar lives on (and with `sh -c` between,
/// the parent is the shell, not the bar). The pipe is what ties us to the bar.
fn end_with_the_bar() -> io::Result<()> {
    std::thread::Builder::new()
        .name("bar-gone".into())
        .spawn(|| {
            let stdout = io::stdout();
            let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::empty())];
            loop {
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {
                        let got = fds[0].revents().unwrap_or(PollFlags::empty());
                        if got.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
                            std::process::exit(0);
                        }
                        // Anything else cannot mean the bar went; stop watching.
                        return;
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                }
            }
        })
        .map(drop)
}

/// A thread that turns [`REFRESH`] (blocked in every thread) into [`Wake::Click`].
fn listen_for_clicks(mask: SigSet, tx: Sender<Wake>) -> io::Result<()> {
    let sfd = SignalFd::new(&mask)?;
    std::thread::Builder::new()
        .name("clicks".into())
        .spawn(move || {
            while let Ok(Some(_)) = sfd.read_signal() {
                if tx.send(Wake::Click).is_err() {
                    return;
                }
            }
        })
        .map(drop)
}

/// A thread that sends [`Wake::Config`] when `file` is written, replaced (editors save by
/// renaming over it), created or removed. The directory is watched, since a replaced file
/// is a new inode; a directory that does not exist is not waited for.
fn watch_config_file(file: &Path, tx: Sender<Wake>) -> io::Result<()> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name: OsString = file.file_name().map(OsString::from).unwrap_or_default();
    let fd = Inotify::init(InitFlags::IN_CLOEXEC)?;
    fd.add_watch(
        dir,
        AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_ONLYDIR,
    )?;
    std::thread::Builder::new()
        .name("config".into())
        .spawn(move || {
            while let Ok(events) = fd.read_events() {
                if events.iter().any(|e| e.name.as_deref() == Some(name.as_os_str()))
                    && tx.send(Wake::Config).is_err()
                {
                    return;
                }
            }
        })
        .map(drop)
}

pub fn signal_i3blocks(cfg: &Config, n: i32) -> Result<(), String> {
    let sig = rt_signal(n)?;
    let w = Watcher::new(cfg, Sources::without_libvirt()).map_err(|e| e.to_string())?;
    let uid = nix::unistd::getuid().as_raw();
    let mut pve = crate::pve::Pve::default();
    let every = crate::pve::interval(cfg);
    // Once at start: whatever changed while nothing watched. The scan here is only for
    // the holders' pids, so that one exiting re-runs the blocks too (and, for a PVE
    // node's GPU, for what the blocks would show: they re-run when it changes).
    signal_all(&cfg.host.procfs, uid, sig);
    let mut last = view::read(cfg, &mut pve);
    w.watch_holders(&last.holder_pids);
    loop {
        let changed = match every {
            Some(d) => match w.recv_timeout(d) {
                Ok(_) => true,
                Err(mpsc::RecvTimeoutError::Timeout) => false,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
            None => match w.recv() {
                Ok(_) => true,
                Err(_) => break,
            },
        };
        drain(&w);
        let v = view::read(cfg, &mut pve);
        if changed || v.text != last.text {
            signal_all(&cfg.host.procfs, uid, sig);
        }
        w.watch_holders(&v.holder_pids);
        last = v;
    }
    Err("the change stream ended".into())
}

/// Drops changes already queued; never waits.
fn drain(w: &Watcher) {
    while w.recv_timeout(Duration::ZERO).is_ok() {}
}

/// After a click: every other `handoff-block` of this user reads the machine again
/// (streaming blocks listen for [`REFRESH`]; the others ignore it).
pub fn refresh_streaming_blocks(procfs: &Path) {
    let uid = nix::unistd::getuid().as_raw();
    let me = std::process::id() as i32;
    for pid in pids_named(procfs, uid, "handoff-block") {
        if pid != me {
            // A pid that has gone is ESRCH; nothing to do about it.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), REFRESH);
        }
    }
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
    for pid in pids_named(procfs, uid, "i3blocks") {
        // libc, not nix: nix's `Signal` has no real-time signals (SIGRTMIN+n).
        // SAFETY: kill(2) touches no memory of ours; a pid that has gone is ESRCH.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Processes called `name` whose real uid is `uid`, from `/proc/<pid>/status` (what
/// `pkill -u $USER <name>` would match, without pkill). Only `status`: reading a
/// process's `cmdline` takes its memory lock, which a process stuck in a page fault holds.
pub fn pids_named(procfs: &Path, uid: u32, name: &str) -> Vec<i32> {
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
            field("Name:") == Some(name)
                && field("Uid:")
                    .and_then(|u| u.split_whitespace().next())
                    .and_then(|u| u.parse::<u32>().ok())
                    == Some(uid)
        })
        .collect()
}
