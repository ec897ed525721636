//! Where the kernel's files are.
//!
//! Every function that reads `/sys`, `/proc` or `/dev`, or writes under `/run`, takes a
//! [`Host`] instead of a hard-coded path, the way procfs' `*_with_root` twins do. Tests
//! and the demo point it at a simulated tree; production uses [`Host::system`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Host {
    /// The sysfs mount, normally `/sys`.
    pub sysfs: PathBuf,
    /// The procfs mount, normally `/proc`.
    #[serde(rename = "proc")]
    pub procfs: PathBuf,
    /// The device directory, normally `/dev`.
    pub dev: PathBuf,
    /// Where the hook keeps its state and restore records, normally `/run/handoff`.
    pub run: PathBuf,
    /// Command names (`/proc/<pid>/comm`) of processes whose fds even root cannot read and
    /// that you know do not use the GPU: PID 1 of the container handoff runs in, say. The
    /// holder scan fails closed on every other process it cannot inspect (a handoff is
    /// refused); these it passes over. Empty by default: list one only after `sudo handoff
    /// blockers` named it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub uninspectable_ok: Vec<String>,
}

impl Default for Host {
    fn default() -> Self {
        Self::system()
    }
}

impl Host {
    pub fn system() -> Self {
        Self {
            sysfs: "/sys".into(),
            procfs: "/proc".into(),
            dev: "/dev".into(),
            run: "/run/handoff".into(),
            uninspectable_ok: Vec::new(),
        }
    }

    /// `<sysfs>/bus/pci/devices`.
    pub fn pci_devices(&self) -> PathBuf {
        self.sysfs.join("bus/pci/devices")
    }

    /// `<sysfs>/bus/pci/drivers`.
    pub fn pci_drivers(&self) -> PathBuf {
        self.sysfs.join("bus/pci/drivers")
    }

    /// The state file the hook writes and every surface reads.
    pub fn state_file(&self) -> PathBuf {
        self.run.join("state.json")
    }

    /// True when every root is the real one: only then may anything be written as root.
    pub fn is_system(&self) -> bool {
        self.sysfs == Path::new("/sys") && self.procfs == Path::new("/proc") && self.dev == Path::new("/dev")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    /// `demo` was a `[host]` key until the demo chose its simulated hypervisor itself
    /// (`handoff_libvirt::simulated`); a config that still sets it names the key.
    #[test]
    fn the_retired_demo_key_is_an_unknown_key_with_its_line() {
        let text = "[host]\nsysfs = \"/tmp/sys\"\ndemo = true\n";
        let e = Config::parse(text, Path::new("/tmp/old.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/tmp/old.toml") && e.contains("demo") && e.contains('3'),
            "{e}"
        );
    }
}
