//! The holder publisher: an optional root service that tells unprivileged surfaces who
//! holds the GPU, including the processes they may not inspect themselves.
//!
//! A bar or a tray run by a user cannot read other users' `/proc/<pid>/fd`, so on its own
//! it counts them as uninspected and never says "free" ([`crate::holders`]). With the
//! publisher installed (`sudo handoff install-publisher`: a systemd system unit running
//! `handoff publish-holders` as root), root watches every configured GPU's nodes exactly as
//! the live stream does ([`crate::live::Watcher::nodes_of_every_gpu`]: inotify `IN_OPEN` /
//! `IN_CLOSE_*`, the node directories for nodes that come and go; no timer), rescans on a
//! burst and, when what it sees changed, replaces [`FILE`] under `[host] run`:
//!
//! ```json
//! {"schema":1,"publisher":{"pid":812,"start_time":4711},
//!  "gpus":[{"address":"0000:01:00.0","uninspected":0,
//!           "holders":[{"pid":4242,"command":"python3","user":"alice",
//!                       "unit":"ollama.service","nodes":["/dev/nvidia0"]}],
//!           "boot_framebuffers":[]}]}
//! ```
//!
//! Nothing more than that leaves root: no command line, no environment, no cgroup path, no
//! uid (the user name is what `ls -l /proc/<pid>` shows anyone anyway), and `uninspected`
//! is the number of processes even root could not read (a count, no pids). Besides holders,
//! `boot_framebuffers` says which boot framebuffers (efifb, simpledrm) sit on the GPU, by
//! driver name and function only: `/proc/iomem` shows users no addresses, so without it a
//! user's scan could never call the GPU free.
//!
//! **Freshness without a heartbeat.** The publisher never wakes up to say it is alive;
//! instead the file names it (`pid` and the kernel's `start_time` of that pid, field 22 of
//! `/proc/<pid>/stat`), and a reader trusts the file only while that exact process runs as
//! root ([`read_fresh`]). A publisher that was stopped, crashed or replaced leaves a file no
//! reader believes; a reused pid has another start time.
//!
//! **Writing.** Root writes the file the way it writes every run-dir file: a new temp file
//! (`O_EXCL|O_NOFOLLOW`, mode set on the open file to 0644), then `rename` over the old one.
//! Readers use [`crate::bounded`] (`O_NOFOLLOW`, regular file, size cap) and believe only
//! a file owned by root.
//!
//! **Reading** ([`complete`]): a surface that could not inspect some processes takes the
//! publisher's holders of the same GPU that it did not see itself, and its count of
//! processes even root could not read replaces its own; a holder it saw itself keeps the
//! richer details it read. Without a fresh file the scan stays as it was, plus a note that
//! names the publisher.
//!
//! Not covered: what the publisher's inotify cannot hear (an open through another inode of
//! the device, a container's own `/dev`) until its next scan, and the debounce (the file
//! lags an open by the burst window, [`crate::live::nodes`]).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::gpu::{self, Owner};
use crate::holders::{self, Holder, Scan};
use crate::host::Host;
use crate::pci::PciAddress;

/// The file under `[host] run`.
pub const FILE: &str = "holders.json";

/// Bumped when a field changes meaning; a reader ignores a file of another schema.
pub const SCHEMA: u32 = 1;

/// What a surface adds when there is no fresh file and it could not inspect everything.
pub const NO_PUBLISHER_NOTE: &str = "no holder publisher is running, so other users' processes \
     were not seen; `sudo handoff install-publisher` lets every surface see them";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read this process's own start time from {path}: {source}")]
    Me { path: PathBuf, source: io::Error },
    #[error("cannot watch the GPU's nodes: {0}")]
    Watch(#[from] crate::live::WatchError),
    #[error("cannot write {path}: {source}; check that [host] run is a directory root can write")]
    Write { path: PathBuf, source: io::Error },
    #[error("the node watch ended; the publisher stops so that systemd restarts it")]
    Ended,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub schema: u32,
    pub publisher: Publisher,
    pub gpus: Vec<PublishedGpu>,
}

/// Who wrote the file: a reader believes it while this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publisher {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks after boot): with the pid, names one
    /// process for the life of the machine.
    pub start_time: u64,
}

/// One configured GPU as root sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedGpu {
    pub address: PciAddress,
    pub holders: Vec<PublishedHolder>,
    /// Processes even root could not inspect (a count only).
    pub uninspected: usize,
    /// Boot framebuffers (efifb, simpledrm…) on the GPU's memory, by driver name and
    /// function, without their addresses (which `/proc/iomem` hides from users); `None`
    /// when root could not check either.
    #[serde(default)]
    pub boot_framebuffers: Option<Vec<PublishedFramebuffer>>,
}

/// A boot framebuffer, without its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedFramebuffer {
    pub name: String,
    pub function: PciAddress,
}

/// A holder, reduced to what the file may say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedHolder {
    pub pid: u32,
    /// Its `comm`.
    pub command: String,
    pub user: String,
    pub unit: Option<String>,
    /// The GPU's nodes it holds (empty for nvidia-persistenced seen without its fds).
    pub nodes: Vec<PathBuf>,
}

impl From<&Holder> for PublishedHolder {
    fn from(h: &Holder) -> Self {
        Self {
            pid: h.pid,
            command: h.command.clone(),
            user: h.user.clone(),
            unit: h.unit.clone(),
            nodes: h.paths.clone(),
        }
    }
}

impl PublishedHolder {
    /// As a [`Holder`] for a surface: the uid from the user name (the number when the name
    /// is one; `u32::MAX`, nobody's, when it is unknown here, so that no action takes it
    /// for the caller's own process).
    pub fn to_holder(&self) -> Holder {
        let uid = self.user.parse().ok().unwrap_or_else(|| {
            nix::unistd::User::from_name(&self.user)
                .ok()
                .flatten()
                .map_or(u32::MAX, |u| u.uid.as_raw())
        });
        Holder {
            pid: self.pid,
            command: self.command.clone(),
            cmdline: Vec::new(),
            uid,
            user: self.user.clone(),
            unit: self.unit.clone(),
            paths: self.nodes.clone(),
            reason: holders::persistenced_reason(&self.command),
            vm: None,
            container: None,
        }
    }
}

/// `[host] run`/[`FILE`].
pub fn path(host: &Host) -> PathBuf {
    host.run.join(FILE)
}

/// Field 22 of `/proc/<pid>/stat`, after the `(comm)` that may hold spaces and parens.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(") ")?;
    // `rest` starts at field 3 (state).
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

fn start_time(procfs: &Path, pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(procfs.join(pid.to_string()).join("stat"))?;
    parse_start_time(&stat).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no start time"))
}

impl Publisher {
    /// This process.
    pub fn me(host: &Host) -> Result<Self, PublishError> {
        let pid = std::process::id();
        let start_time = start_time(&host.procfs, pid).map_err(|source| PublishError::Me {
            path: host.procfs.join(pid.to_string()).join("stat"),
            source,
        })?;
        Ok(Self { pid, start_time })
    }

    /// Whether this process still runs, as root: the same pid with the same start time,
    /// `/proc/<pid>` owned by root.
    pub fn alive(&self, procfs: &Path) -> bool {
        let dir = procfs.join(self.pid.to_string());
        std::fs::metadata(&dir).is_ok_and(|m| m.uid() == 0)
            && start_time(procfs, self.pid).is_ok_and(|t| t == self.start_time)
    }
}

/// What root sees of every configured GPU now. An absent GPU has no holders.
pub fn snapshot(cfg: &Config, me: Publisher) -> Published {
    let host = &cfg.host;
    let gpus = cfg
        .gpu
        .iter()
        .map(|gc| {
            let (holders, uninspected, boot_framebuffers) = match gpu::read_gpu(host, gc.address) {
                Ok(g) if g.owner != Owner::Absent => {
                    let nodes = holders::gpu_nodes(host, &g);
                    let scan = holders::scan(host, &g, &nodes);
                    let checked = !scan
                        .notes
                        .iter()
                        .any(|n| n.ends_with(holders::FRAMEBUFFERS_UNCHECKED));
                    let framebuffers = checked.then(|| {
                        scan.framebuffers
                            .iter()
                            .map(|f| PublishedFramebuffer {
                                name: f.name.clone(),
                                function: f.function,
                            })
                            .collect()
                    });
                    (
                        scan.holders.iter().map(PublishedHolder::from).collect(),
                        scan.uninspected,
                        framebuffers,
                    )
                }
                _ => (Vec::new(), 0, Some(Vec::new())),
            };
            PublishedGpu {
                address: gc.address,
                holders,
                uninspected,
                boot_framebuffers,
            }
        })
        .collect();
    Published {
        schema: SCHEMA,
        publisher: me,
        gpus,
    }
}

/// Replace the file atomically (world-readable).
pub fn write(host: &Host, p: &Published) -> Result<(), PublishError> {
    let path = path(host);
    let mut bytes = serde_json::to_vec(p).expect("the published holders serialise");
    bytes.push(b'\n');
    crate::bind::record::write_atomic(&path, &bytes, 0o644)
        .map_err(|source| PublishError::Write { path, source })
}

/// The file, when it is there, root's, of this schema, and its publisher still runs.
/// Anything else (absent, stale, unreadable, not root's) is `None`: the reader then knows
/// only what it saw itself.
pub fn read_fresh(host: &Host) -> Option<Published> {
    let path = path(host);
    let bytes = crate::bounded::read(&path, crate::bounded::Links::Refuse).ok()?;
    // bounded::read refused a link and anything but a regular file; the owner is checked
    // after, on the name (a swap in between needs write access to the root-owned run dir).
    if std::fs::symlink_metadata(&path).ok()?.uid() != 0 {
        tracing::debug!("{} is not root's: ignored", path.display());
        return None;
    }
    let p: Published = serde_json::from_slice(&bytes).ok()?;
    (p.schema == SCHEMA && p.publisher.alive(&host.procfs)).then_some(p)
}

/// Completes an unprivileged scan of the GPU at `address` with the publisher's (see the
/// module docs). Does nothing to a scan that saw everything, or as root.
pub fn complete(host: &Host, address: PciAddress, scan: &mut Scan) {
    let framebuffers_unchecked = scan
        .notes
        .iter()
        .any(|n| n.ends_with(holders::FRAMEBUFFERS_UNCHECKED));
    if (scan.uninspected == 0 && !framebuffers_unchecked) || nix::unistd::geteuid().is_root() {
        return;
    }
    let Some(p) = read_fresh(host) else {
        if scan.uninspected > 0 {
            scan.notes.push(NO_PUBLISHER_NOTE.to_owned());
        }
        return;
    };
    let Some(g) = p.gpus.into_iter().find(|g| g.address == address) else {
        scan.notes.push(format!(
            "the holder publisher does not watch GPU {address}: restart it after changing the \
             config (sudo systemctl restart {UNIT_NAME})"
        ));
        return;
    };
    apply(scan, &g);
}

/// The merge itself (pure): the publisher's holders this scan did not see are added; its
/// count of processes root could not read replaces this scan's; when root checked the boot
/// framebuffers, its finding replaces this scan's note that it could not.
pub fn apply(scan: &mut Scan, g: &PublishedGpu) {
    if let Some(fbs) = &g.boot_framebuffers
        && scan
            .notes
            .iter()
            .any(|n| n.ends_with(holders::FRAMEBUFFERS_UNCHECKED))
    {
        scan.notes
            .retain(|n| !n.ends_with(holders::FRAMEBUFFERS_UNCHECKED));
        for f in fbs {
            if !scan
                .framebuffers
                .iter()
                .any(|s| s.name == f.name && s.function == f.function)
            {
                // The addresses stay root's: 0-0 here.
                scan.framebuffers.push(holders::Framebuffer {
                    name: f.name.clone(),
                    function: f.function,
                    start: 0,
                    end: 0,
                });
            }
        }
    }
    if scan.uninspected == 0 {
        return;
    }
    for h in &g.holders {
        if !scan.holders.iter().any(|s| s.pid == h.pid) {
            scan.holders.push(h.to_holder());
        }
    }
    scan.holders.sort_by_key(|h| h.pid);
    scan.uninspected = 0;
    scan.uninspected_examples.clear();
    if g.uninspected > 0 {
        scan.notes.push(format!(
            "{} could not be inspected even by the holder publisher (root); what they hold is \
             unknown: `sudo handoff blockers` names them",
            if g.uninspected == 1 {
                "1 process".to_owned()
            } else {
                format!("{} processes", g.uninspected)
            }
        ));
    }
}

/// The systemd unit that runs the publisher ([`crate::publisher_install`]).
pub const UNIT_NAME: &str = "handoff-publisher.service";

/// `handoff publish-holders`: watch, and publish on every change, until the watch ends.
/// One scan at start (the file may be missing or another publisher's); afterwards only
/// after an open or close of a node, or a node appearing or going: idle, it sleeps.
pub fn run(cfg: &Config) -> Result<(), PublishError> {
    let me = Publisher::me(&cfg.host)?;
    // Watch before the first scan, so that an open between the two is not lost.
    let watcher = crate::live::Watcher::nodes_of_every_gpu(cfg)?;
    let mut last: Option<Published> = None;
    loop {
        let now = snapshot(cfg, me);
        if last.as_ref() != Some(&now) {
            write(&cfg.host, &now)?;
            tracing::debug!("published {}", path(&cfg.host).display());
            last = Some(now);
        }
        if watcher.recv().is_err() {
            return Err(PublishError::Ended);
        }
        // Changes that came meanwhile are covered by the scan about to run.
        while watcher.recv_timeout(std::time::Duration::ZERO).is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_a_comm_with_parens_and_spaces() {
        let stat = "812 (a) b (c) S 1 812 812 0 -1 4194560 99 0 0 0 1 2 0 0 20 0 1 0 4711 1000 10";
        assert_eq!(parse_start_time(stat), Some(4711));
        assert_eq!(parse_start_time("812 (x"), None);
    }

    #[test]
    fn roots_framebuffer_check_replaces_the_users_note_and_none_keeps_it() {
        let note = format!(
            "/proc/iomem shows no addresses without root; {}",
            holders::FRAMEBUFFERS_UNCHECKED
        );
        let user = Scan {
            uninspected: 2,
            notes: vec![note.clone()],
            ..Scan::default()
        };
        let gpu = PciAddress::new(0, 1, 0, 0);
        let published = |fbs: Option<Vec<PublishedFramebuffer>>| PublishedGpu {
            address: gpu,
            holders: Vec::new(),
            uninspected: 0,
            boot_framebuffers: fbs,
        };
        let mut clear = user.clone();
        apply(&mut clear, &published(Some(Vec::new())));
        assert_eq!(clear.verdict(), holders::Verdict::Clear);
        let mut efifb = user.clone();
        apply(
            &mut efifb,
            &published(Some(vec![PublishedFramebuffer {
                name: "efifb".into(),
                function: gpu,
            }])),
        );
        assert!(matches!(efifb.verdict(), holders::Verdict::Held { .. }));
        assert_eq!(
            efifb.summary_lines(),
            ["efifb (boot framebuffer) holds 0000:01:00.0 memory; boot with \
              initcall_blacklist=sysfb_init or video=efifb:off"]
        );
        let mut unknown = user;
        apply(&mut unknown, &published(None));
        assert_eq!(unknown.notes, [note]);
        assert!(matches!(unknown.verdict(), holders::Verdict::Unchecked { .. }));
    }

    #[test]
    fn apply_adds_unseen_holders_and_takes_roots_count() {
        let mut scan = Scan {
            uninspected: 40,
            ..Scan::default()
        };
        let g = PublishedGpu {
            address: PciAddress::new(0, 1, 0, 0),
            holders: vec![PublishedHolder {
                pid: 7,
                command: "cuda-training".into(),
                user: "root".into(),
                unit: Some("train.service".into()),
                nodes: vec!["/dev/nvidia0".into()],
            }],
            uninspected: 0,
            boot_framebuffers: None,
        };
        apply(&mut scan, &g);
        assert_eq!(scan.uninspected, 0);
        assert_eq!(scan.holders.len(), 1);
        assert_eq!(scan.holders[0].uid, 0);
        assert!(matches!(scan.verdict(), holders::Verdict::Held { ref unchecked } if unchecked.is_empty()));
        let mut clear = Scan {
            uninspected: 3,
            ..Scan::default()
        };
        apply(
            &mut clear,
            &PublishedGpu {
                holders: Vec::new(),
                ..g.clone()
            },
        );
        assert_eq!(clear.verdict(), holders::Verdict::Clear);
        let mut partial = Scan {
            uninspected: 3,
            ..Scan::default()
        };
        apply(
            &mut partial,
            &PublishedGpu {
                holders: Vec::new(),
                uninspected: 1,
                ..g
            },
        );
        assert!(matches!(partial.verdict(), holders::Verdict::Unchecked { .. }));
    }
}
