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
        }
    }

    pub fn function(&self, address: PciAddress) -> Option<&RecordedFunction> {
        self.functions.iter().find(|f| f.address == address)
    }

    pub fn path(host: &Host, gpu: PciAddress) -> PathBuf {
        host.run.join(format!("restore-{gpu}.json"))
    }

    pub fn load(host: &Host, gpu: PciAddress) -> Result<Option<Self>, RecordError> {
        let path = Self::path(host, gpu);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| RecordError::Parse { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RecordError::Read { path, source }),
        }
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

/// Whether a hung writer is still in the kernel: its process exists and is not a zombie
/// (a zombie's write is over). It is our child, or init's once the hook has exited.
pub fn writer_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].trim_start().chars().next())?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Write `bytes` to `path` so readers see the old or the new file, never half of one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    // The umask may have narrowed the mode; state files must be world-readable.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}
