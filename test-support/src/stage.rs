//! The stage of the end-to-end tests against the real system libvirtd: its lock, the real
//! hook installed from this build's `handoff`, `/etc/handoff/config.toml`, and a simulated
//! RTX 3090 Ti mounted with FUSE. What it changes on the machine is put back on drop:
//! `/etc/libvirt/hooks` and `/etc/handoff` are moved aside and restored (libvirtd re-reads
//! its hooks), the mount is unmounted, the temp dir removed, the lock released.
//!
//! A test's own struct keeps its domains (and anything else that runs the hook) in fields
//! declared *before* its `Stage`: fields drop in declaration order, and a domain's destroy
//! runs the hook's release, which needs the mount and the config still there.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use handoff::Host;
use handoff::simulated_tree::{RTX_3090_TI, SimSpec};
use handoff_kernelsim::Kernel;
use handoff_kernelsim::fuse::SimMount;

use crate::backup::DirBackup;
use crate::config::host_section;
use crate::libvirt::{LibvirtdLock, require_libvirtd};

/// The system config's directory, moved aside for the stage's lifetime.
pub const ETC_HANDOFF: &str = "/etc/handoff";
/// The system config the real hook reads.
pub const SYSTEM_CONFIG: &str = "/etc/handoff/config.toml";

/// Field order is drop order: the mount before /etc/handoff, the hooks, then the lock.
pub struct Stage {
    /// The FUSE mount of the simulated RTX 3090 Ti's sysfs.
    pub mount: SimMount,
    /// The simulated machine's roots (through the mount).
    pub host: Host,
    _tmp: tempfile::TempDir,
    _etc_handoff: DirBackup,
    _hooks: DirBackup,
    _libvirtd: LibvirtdLock,
}

fn reload_libvirtd() {
    handoff::hook_install::reload_libvirt(Path::new("/proc"));
    std::thread::sleep(Duration::from_millis(500));
}

impl Stage {
    /// Takes the libvirtd lock first (the backups of /etc are taken under it). None when
    /// FUSE or libvirtd is missing outside CI (under `CI=true` that fails the test).
    pub fn set_up() -> Option<Stage> {
        Stage::set_up_after(|| ())
    }

    /// [`Stage::set_up`], calling `found` once the libvirtd lock is held and before
    /// anything is moved aside: what `found` reads of `/etc` is the machine as the previous
    /// holder of the lock left it (a test that checks it is put back as found).
    pub fn set_up_after(found: impl FnOnce()) -> Option<Stage> {
        if !Path::new("/dev/fuse").exists() {
            crate::tools::required("/dev/fuse is missing: the simulated sysfs needs FUSE");
            return None;
        }
        let libvirtd = require_libvirtd()?;
        found();
        let hooks = DirBackup::take(handoff::hook_install::DEFAULT_HOOKS_DIR).then(reload_libvirtd);
        let etc_handoff = DirBackup::take(ETC_HANDOFF);
        let tmp = tempfile::tempdir().unwrap();
        let kernel = Kernel::build(&tmp.path().join("machine"), SimSpec::workstation()).unwrap();
        let mountpoint = tmp.path().join("sys");
        fs::create_dir(&mountpoint).unwrap();
        let mount = SimMount::mount(kernel, &mountpoint).unwrap();
        let host = mount.host();
        Some(Stage {
            mount,
            host,
            _tmp: tmp,
            _etc_handoff: etc_handoff,
            _hooks: hooks,
            _libvirtd: libvirtd,
        })
    }

    /// The stage's temp dir (the simulated machine is under it): for the test's own files,
    /// removed with the stage.
    pub fn dir(&self) -> &Path {
        self._tmp.path()
    }

    /// The `[host]` section that points handoff at the simulated machine.
    pub fn host_section(&self) -> String {
        host_section(&self.host)
    }

    /// Writes the system config as root leaves it (0755 dir, 0644 file: the hook reads
    /// only a root-owned config), then installs the hook with `handoff` and gives
    /// libvirtd a moment to re-read its hooks.
    ///
    /// Returns what `handoff install-hooks` printed on stdout (also echoed to stderr).
    pub fn install(&self, config: &str, handoff: &Path) -> String {
        fs::create_dir(ETC_HANDOFF).unwrap();
        fs::set_permissions(ETC_HANDOFF, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(SYSTEM_CONFIG, config).unwrap();
        fs::set_permissions(SYSTEM_CONFIG, fs::Permissions::from_mode(0o644)).unwrap();
        let out = Command::new(handoff)
            .arg("install-hooks")
            .env_remove("HANDOFF_CONFIG")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "handoff install-hooks: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "install-hooks: {out:?}");
        std::thread::sleep(Duration::from_millis(500));
        said
    }

    /// Puts everything back as [`Stage`]'s drop does (the mount, `/etc/handoff`, the hooks
    /// and libvirtd's re-read of them) but keeps the libvirtd lock, so the caller can check
    /// the machine is as found before another test process may touch it.
    pub fn into_lock(self) -> LibvirtdLock {
        let Stage {
            mount,
            host,
            _tmp,
            _etc_handoff,
            _hooks,
            _libvirtd,
        } = self;
        drop((mount, host, _tmp, _etc_handoff, _hooks));
        _libvirtd
    }

    /// Each function's driver, in function order.
    pub fn drivers(&self) -> Vec<Option<String>> {
        handoff::gpu::read_gpu(&self.host, RTX_3090_TI)
            .unwrap()
            .functions
            .into_iter()
            .map(|f| f.driver)
            .collect()
    }

    /// Every function on its host driver, as the simulated workstation boots.
    pub fn on_host(&self) -> bool {
        self.drivers() == ["nvidia", "snd_hda_intel", "xhci_hcd", "nvidia-gpu"].map(|d| Some(d.to_owned()))
    }

    /// Every function on vfio-pci, as after a VM took the GPU.
    pub fn on_vfio(&self) -> bool {
        self.drivers().iter().all(|d| d.as_deref() == Some("vfio-pci"))
    }
}
