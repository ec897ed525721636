//! What `handoff rebind` checks before it rewrites the GPU's bindings as root: that the GPU
//! the caller named (the tray passes `--gpu` so that pkexec's prompt names it) is the one
//! the config hands, and that no VM still uses the GPU unless the caller said to take it
//! anyway. Reads nothing itself: the caller passes what it found, so every rule is tested
//! here without a host.

use crate::config::{Config, GpuConfig, Source};
use crate::holders::Holder;
use crate::pci::PciAddress;

/// Why `handoff rebind` refuses before touching anything.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// `--gpu` names another GPU than the config's: the prompt the person accepted was
    /// about a different device.
    #[error("--gpu {asked} is not the GPU in {config} ([gpu] address = {configured}); nothing was changed")]
    OtherGpu {
        asked: PciAddress,
        configured: PciAddress,
        /// Where the config came from (a file, or the defaults).
        config: String,
    },
    /// A process (normally the VM's QEMU) holds the GPU's VFIO group: taking the GPU back
    /// would crash the VM.
    #[error(
        "a VM still uses GPU {gpu}:\n{}\nStop the VM first (handoff stop), or add --even-if-vm-runs: the VM loses its GPU and will likely crash",
        indented(users)
    )]
    VmRuns { gpu: PciAddress, users: Vec<String> },
}

/// The request `handoff rebind --force` was given.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebindGuard {
    /// `--gpu`: refuse unless the config's GPU is this one.
    pub gpu: Option<PciAddress>,
    /// `--even-if-vm-runs`: take the GPU from a running VM.
    pub even_if_vm_runs: bool,
}

impl RebindGuard {
    /// Refuses when `--gpu` names no GPU of `cfg`'s, loaded from `source`.
    pub fn check_gpu(&self, cfg: &Config, source: &Source) -> Result<(), GuardError> {
        self.pick_gpu(cfg, source).map(|_| ())
    }

    /// The GPU to return: the one `--gpu` names (a `[[gpu]]` address, exactly: it is what
    /// pkexec's prompt showed), else the primary one.
    pub fn pick_gpu<'a>(&self, cfg: &'a Config, source: &Source) -> Result<&'a GpuConfig, GuardError> {
        match self.gpu {
            None => Ok(cfg.gpu.primary()),
            Some(asked) => cfg
                .gpu
                .iter()
                .find(|g| g.address == asked)
                .ok_or_else(|| GuardError::OtherGpu {
                    asked,
                    configured: cfg.gpu.address,
                    config: source.to_string(),
                }),
        }
    }

    /// Refuses while `users` (from [`crate::holders::vfio_users`]) hold GPU `gpu`, unless
    /// `--even-if-vm-runs` was given; then returns them, one line each, for the caller to
    /// warn about. Empty when no VM uses the GPU.
    pub fn check_vm_users(&self, gpu: PciAddress, users: &[Holder]) -> Result<Vec<String>, GuardError> {
        let users: Vec<String> = users.iter().map(Holder::summary).collect();
        if users.is_empty() || self.even_if_vm_runs {
            Ok(users)
        } else {
            Err(GuardError::VmRuns { gpu, users })
        }
    }
}

/// `lines`, each on its own line, indented by two spaces as the CLI lists holders.
pub fn indented(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn gpu(a: &str) -> PciAddress {
        a.parse().unwrap()
    }

    fn qemu() -> Holder {
        Holder {
            pid: 4242,
            command: "qemu-system-x86".into(),
            cmdline: vec![],
            uid: 64055,
            user: "libvirt-qemu".into(),
            unit: Some("machine-qemu\\x2d1\\x2dwin11.scope".into()),
            paths: vec![PathBuf::from("/dev/vfio/13")],
            reason: None,
            vm: Some("win11".into()),
            container: None,
        }
    }

    #[test]
    fn refuses_another_gpu_than_the_configs_naming_both() {
        let cfg = Config::default();
        let source = Source::File(PathBuf::from("/etc/handoff/config.toml"));
        let other = gpu("0000:02:00.0");
        let guard = RebindGuard {
            gpu: Some(other),
            ..RebindGuard::default()
        };
        let e = guard.check_gpu(&cfg, &source).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "--gpu 0000:02:00.0 is not the GPU in /etc/handoff/config.toml ([gpu] address = {}); nothing was changed",
                cfg.gpu.address
            )
        );
        let same = RebindGuard {
            gpu: Some(cfg.gpu.address),
            ..RebindGuard::default()
        };
        assert!(same.check_gpu(&cfg, &source).is_ok());
        assert!(RebindGuard::default().check_gpu(&cfg, &source).is_ok());
    }

    #[test]
    fn refuses_while_a_vm_uses_the_gpu_naming_its_process() {
        let e = RebindGuard::default()
            .check_vm_users(gpu("0000:01:00.0"), &[qemu()])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "a VM still uses GPU 0000:01:00.0:\n  qemu-system-x86 (pid 4242, user libvirt-qemu"
            ),
            "{e}"
        );
        assert!(e.ends_with("\nStop the VM first (handoff stop), or add --even-if-vm-runs: the VM loses its GPU and will likely crash"), "{e}");
    }

    #[test]
    fn even_if_vm_runs_lets_it_through_with_the_users_to_warn_about() {
        let guard = RebindGuard {
            even_if_vm_runs: true,
            ..RebindGuard::default()
        };
        let warn = guard.check_vm_users(gpu("0000:01:00.0"), &[qemu()]).unwrap();
        assert_eq!(warn, vec![qemu().summary()]);
        assert!(
            RebindGuard::default()
                .check_vm_users(gpu("0000:01:00.0"), &[])
                .unwrap()
                .is_empty()
        );
    }
}
