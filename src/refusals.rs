//! Every start the hook refused, kept a little while under `[host] run` so that each
//! surface can tell its user about each one, once, whoever asked for the start
//! (virt-manager, `virsh start`, `ssh host windows-start`, the tray itself).
//!
//! `state.json` holds only the *last* refusal, and two refusals between two reads of it
//! would show as one. So the hook (root, under the GPU's lock: one writer at a time) also
//! appends each refusal to `refusals.json`: the last [`KEEP`] of them, each with a sequence
//! number, and an `epoch` set when the file is first written (the run dir is a tmpfs: a
//! reboot or someone removing the file starts a new epoch, whose numbers start again).
//! World-readable, written by rename like the state file, read with
//! [`crate::bounded::read`] (no FIFO, no link, no giant file).
//!
//! A surface keeps an [`Unseen`]: at start it takes the newest entry as already told (a
//! restarted tray never repeats an old refusal), and [`Unseen::take`] returns the entries
//! that came after, oldest first.

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::bind::record::{now, write_atomic};
use crate::holders::Holder;
use crate::host::Host;
use crate::pci::PciAddress;

/// The file's name under `[host] run`.
pub const FILE: &str = "refusals.json";
/// How many refusals the file keeps: enough for every surface to read each one between
/// two refusals, small enough that the file stays a few KiB.
pub const KEEP: usize = 16;

/// One refused start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logged {
    /// Counts up from 1 within an epoch.
    pub seq: u64,
    pub gpu: PciAddress,
    /// The domain whose start was refused.
    pub vm: String,
    /// Unix time.
    pub at: u64,
    /// Who held the GPU, as root saw them (empty when nobody is to blame: something could
    /// not be checked, or another VM has the GPU; `message` says which).
    pub holders: Vec<Holder>,
    /// The refusal as `virsh start` showed it.
    pub message: String,
    /// The Proxmox VE start task that was refused (`UPID:node:…`), for a refusal a
    /// desktop read from PVE's task list ([`user_host`]); None for one its own hook logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upid: Option<String>,
}

/// The file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalLog {
    /// When the file was first written (Unix nanoseconds): a new epoch restarts `seq`.
    pub epoch: u128,
    /// Oldest first.
    pub refusals: Vec<Logged>,
}

#[derive(Debug, thiserror::Error)]
pub enum RefusalsError {
    #[error("cannot read the hook's refusals {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "the hook's refusals {path} are damaged ({source}); the hook writes a new file on its next refusal"
    )]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub fn path(host: &Host) -> PathBuf {
    host.run.join(FILE)
}

/// `host` with its run dir moved to the user's runtime dir (`$XDG_RUNTIME_DIR/handoff`,
/// [`crate::stopped::dir`]): where a desktop whose VMs run on Proxmox VE keeps the
/// refusals it read from PVE's task list (the hookscript's log is on the node), in the same
/// format, so that a surface reads both files the same way. It outlives a restart of the
/// tray (and not a logout: the runtime dir goes, and with it what was told).
pub fn user_host(host: &Host) -> Host {
    Host {
        run: crate::stopped::dir(&Host {
            // `dir` answers `[host] run` for root; a root-run tray keeps the node's file.
            run: host.run.join("pve"),
            ..host.clone()
        }),
        ..host.clone()
    }
}

/// Whether `cfg` is a desktop whose VMs are on Proxmox VE (a `[proxmox]` and a `[[vm]]`
/// with a vmid): its surfaces read the refusals logged under [`user_host`] too.
pub fn pve_desktop(cfg: &crate::Config) -> bool {
    cfg.proxmox.is_some() && cfg.vms.iter().any(|v| v.vmid.is_some())
}

/// The last refusal of `gpu` in `host`'s log, by time; None when there is none or the
/// file cannot be read (the surfaces then say what the state file says).
pub fn last(host: &Host, gpu: PciAddress) -> Option<Logged> {
    RefusalLog::read(host)
        .ok()
        .flatten()?
        .refusals
        .into_iter()
        .filter(|l| l.gpu == gpu)
        .max_by_key(|l| (l.at, l.seq))
}

impl RefusalLog {
    /// The file; `Ok(None)` when there is none.
    pub fn read(host: &Host) -> Result<Option<RefusalLog>, RefusalsError> {
        let path = path(host);
        let bytes = match crate::bounded::read(&path, crate::bounded::Links::Refuse) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RefusalsError::Read { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| RefusalsError::Parse { path, source })
    }

    /// Appends a refusal (the hook, as root, under the GPU's lock). A damaged or missing
    /// file starts a new epoch. Returns the new entry's number.
    pub fn record(
        host: &Host,
        gpu: PciAddress,
        vm: &str,
        holders: &[Holder],
        message: &str,
    ) -> io::Result<u64> {
        Self::record_task(host, gpu, vm, holders, message, None).map(|s| s.unwrap_or(0))
    }

    /// [`RefusalLog::record`] of a refusal read from a PVE task (`upid`): `Ok(None)` when
    /// that task is logged already (a restarted poller, a second surface reading the same
    /// task list), so each task is one refusal.
    pub fn record_task(
        host: &Host,
        gpu: PciAddress,
        vm: &str,
        holders: &[Holder],
        message: &str,
        upid: Option<&str>,
    ) -> io::Result<Option<u64>> {
        let mut log = RefusalLog::read(host)
            .ok()
            .flatten()
            .unwrap_or_else(|| RefusalLog {
                epoch: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(1),
                refusals: Vec::new(),
            });
        if upid.is_some() && log.refusals.iter().any(|l| l.upid.as_deref() == upid) {
            return Ok(None);
        }
        let seq = log.refusals.last().map_or(1, |l| l.seq + 1);
        log.refusals.push(Logged {
            seq,
            gpu,
            vm: vm.to_owned(),
            at: now(),
            holders: holders.to_vec(),
            message: message.to_owned(),
            upid: upid.map(str::to_owned),
        });
        let drop = log.refusals.len().saturating_sub(KEEP);
        log.refusals.drain(..drop);
        let json = serde_json::to_vec_pretty(&log).map_err(io::Error::other)?;
        write_atomic(&path(host), &json, 0o644)?;
        Ok(Some(seq))
    }

    /// Where this file stands: its epoch and newest number.
    fn mark(&self) -> (u128, u64) {
        (self.epoch, self.refusals.last().map_or(0, |l| l.seq))
    }
}

/// What a surface has already told its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unseen {
    gpu: PciAddress,
    /// (epoch, newest number told).
    told: (u128, u64),
}

impl Unseen {
    /// Everything in the file now counts as told: refusals from before the surface started
    /// are history, not news.
    pub fn start(host: &Host, gpu: PciAddress) -> Unseen {
        let told = RefusalLog::read(host).ok().flatten().map_or((0, 0), |l| l.mark());
        Unseen { gpu, told }
    }

    /// The refusals of this GPU logged since the last call (or [`Unseen::start`]), oldest
    /// first; they count as told from now on. A file of a new epoch is news from its first
    /// entry. An unreadable file is no news (the state file still has the last refusal).
    pub fn take(&mut self, host: &Host) -> Vec<Logged> {
        let Ok(Some(log)) = RefusalLog::read(host) else {
            return Vec::new();
        };
        let (epoch, told) = self.told;
        let after = if log.epoch == epoch { told } else { 0 };
        let new: Vec<Logged> = log
            .refusals
            .iter()
            .filter(|l| l.seq > after && l.gpu == self.gpu)
            .cloned()
            .collect();
        self.told = log.mark();
        new
    }

    /// Counts everything in the file now as told, without returning it: for a surface that
    /// has just told of a refusal of its own start in its own way.
    pub fn skip(&mut self, host: &Host) {
        self.take(host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(dir: &std::path::Path) -> Host {
        Host {
            run: dir.to_owned(),
            ..Host::system()
        }
    }

    #[test]
    fn each_refusal_is_news_once_and_old_ones_never_after_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let h = host(tmp.path());
        let gpu = PciAddress::new(0, 1, 0, 0);
        let other = PciAddress::new(0, 2, 0, 0);
        RefusalLog::record(&h, gpu, "old", &[], "refused before the tray started").unwrap();
        let mut u = Unseen::start(&h, gpu);
        assert!(
            u.take(&h).is_empty(),
            "a refusal from before the start is history"
        );

        RefusalLog::record(&h, gpu, "win11", &[], "one").unwrap();
        RefusalLog::record(&h, other, "other-gpu", &[], "not ours").unwrap();
        RefusalLog::record(&h, gpu, "win11", &[], "two").unwrap();
        let got: Vec<String> = u.take(&h).into_iter().map(|l| l.message).collect();
        assert_eq!(got, ["one", "two"]);
        assert!(u.take(&h).is_empty(), "told once");

        // A restarted surface starts from what is there.
        let mut again = Unseen::start(&h, gpu);
        assert!(again.take(&h).is_empty());

        // The file removed and written anew (a new epoch): its first entry is news, though
        // its number is lower than what was told.
        std::fs::remove_file(path(&h)).unwrap();
        RefusalLog::record(&h, gpu, "win11", &[], "after reboot").unwrap();
        let got: Vec<String> = u.take(&h).into_iter().map(|l| l.message).collect();
        assert_eq!(got, ["after reboot"]);
    }

    /// "Last refused start" on a desktop whose VMs are on PVE: the later of the state
    /// file's refusal and the last of this GPU's in the user's log, read from the file.
    #[test]
    fn the_last_refusal_is_the_later_of_the_state_files_and_the_logs() {
        use crate::verdict::HookFiles;
        let tmp = tempfile::tempdir().unwrap();
        let user = host(tmp.path());
        let gpu = PciAddress::new(0, 1, 0, 0);
        let other = PciAddress::new(0, 2, 0, 0);
        let vm = |f: &HookFiles| f.last_refusal().map(|r| r.vm.clone());
        let older = HookFiles::default().with_refusal(gpu, "win11", 1, Vec::new(), "busy");
        // No log: the state file's.
        assert_eq!(
            vm(&older.clone().with_pve_refusals_of(&user, gpu)).as_deref(),
            Some("win11")
        );
        RefusalLog::record_task(
            &user,
            gpu,
            "linux-ai",
            &[],
            "refused by the hookscript",
            Some("UPID:a"),
        )
        .unwrap();
        RefusalLog::record_task(&user, other, "mac", &[], "the iGPU's", Some("UPID:b")).unwrap();
        let f = older.with_pve_refusals_of(&user, gpu);
        assert_eq!(
            vm(&f).as_deref(),
            Some("linux-ai"),
            "the log's is later, and of this GPU"
        );
        assert_eq!(f.last_refusal().unwrap().message, "refused by the hookscript");
        let newer = HookFiles::default().with_refusal(gpu, "win11", now() + 60, Vec::new(), "busy");
        assert_eq!(
            vm(&newer.with_pve_refusals_of(&user, gpu)).as_deref(),
            Some("win11")
        );
        assert_eq!(last(&user, other).map(|l| l.vm).as_deref(), Some("mac"));
    }

    #[test]
    fn the_file_keeps_the_last_few_and_is_read_safely() {
        let tmp = tempfile::tempdir().unwrap();
        let h = host(tmp.path());
        let gpu = PciAddress::new(0, 1, 0, 0);
        for i in 0..KEEP + 5 {
            RefusalLog::record(&h, gpu, "w", &[], &i.to_string()).unwrap();
        }
        let log = RefusalLog::read(&h).unwrap().unwrap();
        assert_eq!(log.refusals.len(), KEEP);
        assert_eq!(log.refusals.last().unwrap().seq, (KEEP + 5) as u64);
        // A link in its place is refused, not followed.
        std::fs::remove_file(path(&h)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", path(&h)).unwrap();
        assert!(matches!(RefusalLog::read(&h), Err(RefusalsError::Read { .. })));
        let mut u = Unseen::start(&h, gpu);
        assert!(u.take(&h).is_empty());
    }
}
