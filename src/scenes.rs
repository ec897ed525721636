//! A simulated machine put in each state every surface tells apart (idle, busy, in a VM,
//! switching, left on vfio-pci, stuck record, split binding, absent, libvirt unreachable,
//! and idle as a normal user sees it, who cannot look at every process):
//! a [`SimHost`] tree, the hook's files, a config beside them, and, for "busy", a process
//! holding the GPU. The cross-surface tests (the tray's, the details window's) put the
//! machine in each of these and check that every surface says the same.
//!
//! VMs use libvirt's in-process `test:///default` driver, whose one domain `test` runs;
//! `win11` is defined nowhere there, so it does not run.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::simulated_tree::{IGPU, RTX_3090_TI, SimHost, SimSpec};
use crate::verdict::HookFiles;

/// Every scene, by name.
pub const ALL: [&str; 10] = [
    "idle",
    "idle, unseen",
    "busy",
    "in a VM",
    "switching",
    "left on vfio-pci",
    "stuck record",
    "split binding",
    "absent",
    "libvirt unreachable",
];

/// Scenes of a machine with several GPUs (issue 15), not (yet) in [`ALL`]: the surfaces
/// that iterate [`ALL`] show one GPU.
pub const SEVERAL: [&str; 1] = ["macOS has the iGPU"];

/// One machine in one state; the holder process (if any) is killed on drop.
pub struct Scene {
    pub name: &'static str,
    pub sim: SimHost,
    /// The config to point every binary at (`HANDOFF_CONFIG`).
    pub config: PathBuf,
    /// The user every surface must look as (`nobody`'s uid), when the scene is about what a
    /// normal user sees: the tree is readable by all then. None: as whoever runs the test.
    pub as_user: Option<u32>,
    holder: Option<Child>,
}

/// `nobody`: the user of the "idle, unseen" scene.
pub const NOBODY: u32 = 65534;

impl Scene {
    /// Builds scene `name` under `dir` (a fresh temp dir).
    pub fn put(dir: &Path, name: &'static str) -> std::io::Result<Scene> {
        if SEVERAL.contains(&name) {
            return Self::put_several(dir, name);
        }
        let sim = SimHost::build(&dir.join("root"), &SimSpec::workstation())?;
        let host = sim.host();
        let vfio = |functions: u8| -> std::io::Result<()> {
            for f in 0..functions {
                sim.set_driver(RTX_3090_TI.with_function(f), Some("vfio-pci"))?;
            }
            Ok(())
        };
        let (mut vm, mut uri, mut gpu) = ("win11", "test:///default".to_owned(), RTX_3090_TI.to_string());
        let mut files = HookFiles::default();
        let mut holder = None;
        let mut as_user = None;
        match name {
            "idle" => {}
            // Idle, as a bar or a tray run by a person sees it: other users' processes
            // cannot be inspected, so nobody may call the GPU free (issue 17).
            "idle, unseen" => as_user = Some(NOBODY),
            "busy" => {
                holder = Some(
                    Command::new("sleep")
                        .arg("600")
                        .stdin(std::fs::File::open(sim.dev().join("nvidia0"))?)
                        .stdout(Stdio::null())
                        .process_group(0)
                        .spawn()?,
                );
            }
            "in a VM" => {
                vm = "test";
                vfio(4)?;
                files = files.with_hook(RTX_3090_TI, "vfio", Some("test")).with_record(
                    RTX_3090_TI,
                    "bound",
                    Some("test"),
                    None,
                );
            }
            "switching" => files = files.with_hook(RTX_3090_TI, "binding", Some("win11")),
            "left on vfio-pci" => {
                vfio(4)?;
                files = files.with_record(RTX_3090_TI, "bound", Some("win11"), None);
            }
            "stuck record" => {
                files = files.with_record(
                    RTX_3090_TI,
                    "stuck",
                    Some("win11"),
                    Some("a write to unbind hung"),
                )
            }
            "split binding" => {
                vfio(1)?;
                files = files.with_hook(RTX_3090_TI, "host", None);
            }
            "absent" => gpu = "0000:02:00.0".to_owned(),
            "libvirt unreachable" => {
                uri = format!(
                    "qemu+unix:///system?socket={}/no-such-libvirt-sock",
                    dir.display()
                )
            }
            other => return Err(std::io::Error::other(format!("no scene {other:?}"))),
        }
        files.save(&host)?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[gpu]\naddress = \"{gpu}\"\n\n[[vm]]\nname = \"{vm}\"\nlabel = \"Windows\"\nuri = \"{uri}\"\n\n\
                 [host]\nsysfs = {:?}\ndev = {:?}\nrun = {:?}\nuninspectable_ok = {:?}\n",
                sim.sysfs(),
                sim.dev(),
                sim.run(),
                // What this machine's root cannot inspect now (a container's PID 1): the
                // scenes are about the GPU's own holders, and a surface must not call a GPU
                // free while such a process exists ("? unseen").
                crate::holders::uninspectable_now(std::path::Path::new("/proc")),
            ),
        )?;
        if as_user.is_some() {
            let st = Command::new("chmod").args(["-R", "a+rX"]).arg(dir).status()?;
            if !st.success() {
                return Err(std::io::Error::other(format!(
                    "chmod -R a+rX {}: {st}",
                    dir.display()
                )));
            }
        }
        Ok(Scene {
            name,
            sim,
            config,
            as_user,
            holder,
        })
    }
}

impl Scene {
    /// The homelab's two GPUs, both configured: the iGPU (00:02.0, i915 at rest, the boot
    /// VGA device, `allow_display = true`) on vfio-pci for the running domain `test`
    /// (labelled macOS), the RTX (primary) on nvidia, its VM `win11` (Windows) not running.
    fn put_several(dir: &Path, name: &'static str) -> std::io::Result<Scene> {
        let sim = SimHost::build(&dir.join("root"), &SimSpec::workstation())?;
        let host = sim.host();
        sim.set_driver(IGPU, Some("vfio-pci"))?;
        HookFiles::default()
            .with_hook(IGPU, "vfio", Some("test"))
            .with_record(IGPU, "bound", Some("test"), None)
            .save_gpu(&host, false)?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[[gpu]]\naddress = \"{IGPU}\"\nlabel = \"UHD 630\"\nhost_driver = \"i915\"\nallow_display = true\n\n\
                 [[gpu]]\naddress = \"{RTX_3090_TI}\"\nlabel = \"RTX\"\nhost_driver = \"nvidia\"\nprimary = true\n\n\
                 [[vm]]\nname = \"test\"\nlabel = \"macOS\"\nuri = \"test:///default\"\n\n\
                 [[vm]]\nname = \"win11\"\nlabel = \"Windows\"\nuri = \"test:///default\"\n\n\
                 [host]\nsysfs = {:?}\ndev = {:?}\nrun = {:?}\nuninspectable_ok = {:?}\n",
                sim.sysfs(),
                sim.dev(),
                sim.run(),
                // As in `put`: what this machine's root cannot inspect now.
                crate::holders::uninspectable_now(std::path::Path::new("/proc")),
            ),
        )?;
        Ok(Scene {
            name,
            sim,
            config,
            as_user: None,
            holder: None,
        })
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        if let Some(c) = &mut self.holder {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
