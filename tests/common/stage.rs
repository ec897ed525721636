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
use handoff::kernelsim::Kernel;
use handoff::kernelsim::fuse::SimMount;
use handoff::sim::{RTX_3090_TI, SimSpec};

use super::backup::DirBackup;
use super::libvirt::{LibvirtdLock, require_libvirtd};

pub const ETC_HANDOFF: &str = "/etc/handoff";
pub const SYSTEM_CONFIG: &str = "/etc/handoff/config.toml";

/// Field order is drop order: the mount before /etc/handoff, the hooks, then the lock.
pub struct Stage {
    pub mount: SimMount,
    pub host: Host,
    _tmp: tempfile::TempDir,
    _etc_handoff: DirBackup,
    _hooks: DirBackup,
    _libvirtd: LibvirtdLock,
}

/// A config's `[host]` section for `host` (a simulated machine's roots).
///
/// `uninspectable_ok` lists the processes this machine's root cannot inspect (PID 1 of the
/// container the tests run in): the holder scan fails closed on them, and these tests are
/// about the GPU's own holders, which are real child processes root does see.
pub fn host_section(host: &Host) -> String {
    format!(
        "[host]\nsysfs = \"{}\"\nproc = \"/proc\"\ndev = \"{}\"\nrun = \"{}\"\nuninspectable_ok = {:?}\n\n",
        host.sysfs.display(),
        host.dev.display(),
        host.run.display(),
        handoff::holders::uninspectable_now(Path::new("/proc"))
    )
}

fn reload_libvirtd() {
    handoff::hooks::reload_libvirt(Path::new("/proc"));
    std::thread::sleep(Duration::from_millis(500));
}

impl Stage {
    /// Takes the libvirtd lock first (the backups of /etc are taken under it). None when
    /// FUSE or libvirtd is missing outside CI (under `CI=true` that fails the test).
    pub fn set_up() -> Option<Stage> {
        if !Path::new("/dev/fuse").exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "/dev/fuse is missing: the simulated sysfs needs FUSE"
            );
            eprintln!("SKIPPED: /dev/fuse is missing: the simulated sysfs needs FUSE");
            return None;
        }
        let libvirtd = require_libvirtd()?;
        let hooks = DirBackup::take(handoff::hooks::DEFAULT_HOOKS_DIR).then(reload_libvirtd);
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

    /// The `[host]` section that points handoff at the simulated machine.
    pub fn host_section(&self) -> String {
        host_section(&self.host)
    }

    /// Writes the system config as root leaves it (0755 dir, 0644 file: the hook reads
    /// only a root-owned config), then installs the hook with `handoff` and gives
    /// libvirtd a moment to re-read its hooks.
    pub fn install(&self, config: &str, handoff: &Path) {
        fs::create_dir(ETC_HANDOFF).unwrap();
        fs::set_permissions(ETC_HANDOFF, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(SYSTEM_CONFIG, config).unwrap();
        fs::set_permissions(SYSTEM_CONFIG, fs::Permissions::from_mode(0o644)).unwrap();
        let out = Command::new(handoff)
            .arg("install-hooks")
            .env_remove("HANDOFF_CONFIG")
            .output()
            .unwrap();
        assert!(out.status.success(), "install-hooks: {out:?}");
        std::thread::sleep(Duration::from_millis(500));
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

    pub fn on_vfio(&self) -> bool {
        self.drivers().iter().all(|d| d.as_deref() == Some("vfio-pci"))
    }
}
