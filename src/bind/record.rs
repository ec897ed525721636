//! The restore record: what each function was bound to before the VM took the GPU.
//!
//! Written (atomically: temp file + rename) under `[host] run` before the first change and
//! removed only when the GPU is verified home, so that after a crash, a hung unbind or a
//! reboot-less mess, `handoff rebind --force` knows where everything belongs, and every
//! surface can say "restore required".

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::gpu::Gpu;
use crate::host::Host;
use crate::pci::PciAddress;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFunction {
    pub address: PciAddress,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
}

/// Where a handoff got to. Anything but `Bound` found with no handoff running means the
/// GPU needs restoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Moving to vfio-pci.
    Binding,
    /// On vfio-pci, for a VM.
    Bound,
    /// Moving back to the host.
    Returning,
    /// A write hung or a step failed and could not be undone.
    Stuck,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRecord {
    pub version: u32,
    pub gpu: PciAddress,
    /// The VM the GPU was handed to, when known.
    pub vm: Option<String>,
    /// Unix time of the handoff.
    pub created: u64,
    pub phase: Phase,
    pub functions: Vec<RecordedFunction>,
    /// Why the record is `Stuck`, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The writer process whose write hung: until it is gone the kernel may still
    /// finish that write, so the GPU cannot be declared home.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hung_writer: Option<i32>,
    /// That writer's start time (`/proc/<pid>/stat` field 22, clock ticks since boot):
    /// once it is gone its pid may be reused, and only the pair names the writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hung_writer_start: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write the restore record {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read the restore record {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the restore record {path} is damaged ({source}); move it away and run `handoff rebind --force`")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "the restore record {path} is not to be trusted: {why}; nothing was changed. Move it away and run `handoff rebind --force`"
    )]
    Invalid { path: PathBuf, why: String },
}

impl RestoreRecord {
    pub fn new(gpu: &Gpu, vm: Option<&str>) -> Self {
        Self {
            version: 1,
            gpu: gpu.address,
            vm: vm.map(str::to_owned),
            created: now(),
            phase: Phase::Binding,
            functions: gpu
                .functions
                .iter()
                .map(|f| RecordedFunction {
                    address: f.address,
                    driver: f.driver.clone(),
                    driver_override: f.driver_override.clone(),
                })
                .collect(),
            problem: None,
            hung_writer: None,
            hung_writer_start: None,
        }
    }

    /// Notes the writer process whose write hung (or none) with its start time, so that a
    /// later process given the same pid is not taken for it.
    pub fn set_hung_writer(&mut self, writer: Option<(i32, Option<u64>)>) {
        self.hung_writer = writer.map(|(pid, _)| pid);
        self.hung_writer_start = writer.and_then(|(_, start)| start);
    }

    /// Whether the hung writer this record names is still in the kernel (see
    /// [`writer_alive`]); false when it names none.
    pub fn hung_writer_alive(&self) -> bool {
        self.hung_writer
            .is_some_and(|pid| writer_alive(pid, self.hung_writer_start))
    }

    pub fn function(&self, address: PciAddress) -> Option<&RecordedFunction> {
        self.functions.iter().find(|f| f.address == address)
    }

    pub fn path(host: &Host, gpu: PciAddress) -> PathBuf {
        host.run.join(format!("restore-{gpu}.json"))
    }

    pub fn load(host: &Host, gpu: PciAddress) -> Result<Option<Self>, RecordError> {
        let path = Self::path(host, gpu);
        // Bounded and non-blocking: a FIFO or a link to /dev/zero here must not hang or
        // bloat the hook; it is reported as unreadable, which refuses a handoff.
        match crate::bounded::read(&path, crate::bounded::Links::Refuse) {
            Ok(bytes) => {
                let record: Self = serde_json::from_slice(&bytes).map_err(|source| RecordError::Parse {
                    path: path.clone(),
                    source,
                })?;
                match record.untrusted(gpu) {
                    Some(why) => Err(RecordError::Invalid { path, why }),
                    None => Ok(Some(record)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RecordError::Read { path, source }),
        }
    }

    /// Why the record cannot be acted on, if it can't: its driver names become path
    /// components under `/sys/bus/pci/drivers` that root writes to (`../../..` would leave
    /// sysfs), and its GPU names the file it is saved to and removed from.
    fn untrusted(&self, gpu: PciAddress) -> Option<String> {
        if self.gpu != gpu {
            return Some(format!("it is about GPU {}, not {gpu}", self.gpu));
        }
        self.functions.iter().find_map(|f| {
            [("driver", &f.driver), ("driver_override", &f.driver_override)]
                .into_iter()
                .find_map(|(key, value)| {
                    let d = value.as_deref()?;
                    (!crate::config::is_driver_name(d)).then(|| {
                        format!(
                            "its {key} for {} is {d:?}, which is not a kernel driver name",
                            f.address
                        )
                    })
                })
        })
    }

    pub fn save(&self, host: &Host) -> Result<(), RecordError> {
        let path = Self::path(host, self.gpu);
        let json = serde_json::to_vec_pretty(self).expect("a record always serialises");
        write_atomic(&path, &json, 0o644).map_err(|source| RecordError::Write { path, source })
    }

    pub fn remove(host: &Host, gpu: PciAddress) -> Result<(), RecordError> {
        let path = Self::path(host, gpu);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RecordError::Write { path, source }),
        }
    }
}

/// Whether a hung writer is still in the kernel: its process exists, is not a zombie (a
/// zombie's write is over), and is the same process — it started at `start` (when the
/// record knows it; a record written before start times were kept has only the pid). It
/// is our child, or init's once the hook has exited. The writer is a real process, so
/// this reads the real `/proc`, whatever `[host] proc` says.
pub fn writer_alive(pid: i32, start: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((state, started)) = parse_stat(&stat) else {
        return false;
    };
    state != 'Z' && state != 'X' && start.is_none_or(|s| Some(s) == started)
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22), the
/// number that tells two processes with the same pid apart.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)?.1
}

/// The state letter (field 3) and the start time (field 22) of a `/proc/<pid>/stat` line.
/// The command (field 2) is in parentheses and may hold spaces and `)`: fields are counted
/// after its last `)`.
fn parse_stat(stat: &str) -> Option<(char, Option<u64>)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=21 lie between the state and the start time.
    let started = fields.nth(18).and_then(|f| f.parse().ok());
    Some((state, started))
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Write `bytes` to `path` so readers see the old or the new file, never half of one.
///
/// Root writes here (the hook, `rebind`): the temp file is created new (`O_EXCL`), never
/// through a symlink (`O_NOFOLLOW`), and its mode is set on the open file (`fchmod`), so a
/// link planted at a predictable temp name cannot redirect the write or the chmod to a
/// file of root's. A name already taken is skipped, not reused.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let pid = std::process::id();
    let mut taken = None;
    for attempt in 0..16u32 {
        let tmp = if attempt == 0 {
            dir.join(format!(".{name}.tmp.{pid}"))
        } else {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            dir.join(format!(".{name}.tmp.{pid}.{attempt}.{nanos:x}"))
        };
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                taken = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let written = (|| {
            f.write_all(bytes)?;
            // fchmod: the umask narrowed the mode, and state files must be world-readable.
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        return written;
    }
    Err(taken.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_field_22_even_when_the_command_has_spaces_and_parens() {
        let stat = "4242 (evil) S (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(stat), Some(('S', Some(987654))));
    }

    #[test]
    fn a_writer_is_alive_only_while_the_same_process_runs() {
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id() as i32;
        let start = process_start_time(pid).expect("our own child has a start time");
        assert!(writer_alive(pid, Some(start)));
        assert!(
            writer_alive(pid, None),
            "a record without a start time goes by the pid"
        );
        // The pid reused by another process: another start time.
        assert!(!writer_alive(pid, Some(start.wrapping_sub(1))));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!writer_alive(pid, Some(start)));
    }
}
