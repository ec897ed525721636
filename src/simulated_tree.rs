//! A simulated kernel: sysfs and `/dev` trees laid out exactly like the kernel's, for the
//! tests and the demo (no test machine has a GPU to rebind).
//!
//! The layout follows a real Ubuntu machine with an RTX 3090 Ti behind root port
//! 00:01.0 and an Intel iGPU at 00:02.0:
//!
//! ```text
//! sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/{vendor,device,class,driver_override,…}
//! sys/devices/…/0000:01:00.0/driver       -> ../../../../bus/pci/drivers/nvidia
//! sys/devices/…/0000:01:00.0/iommu_group  -> ../../../../kernel/iommu_groups/13
//! sys/bus/pci/devices/0000:01:00.0        -> ../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0
//! sys/bus/pci/drivers/nvidia/0000:01:00.0 -> ../../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0
//! sys/kernel/iommu_groups/13/devices/0000:01:00.0 -> ../../../../devices/…/0000:01:00.0
//! dev/nvidia0 dev/nvidiactl dev/dri/card1 dev/dri/by-path/pci-0000:01:00.0-card -> ../card1 …
//! ```
//!
//! Device nodes are made with `mknod` as character devices 1:3 (the numbers of
//! `/dev/null`, so that opening them works; ARCHITECTURE.md's trap about ENXIO) when we may, and
//! as plain files otherwise. Holders are identified by path and inode, so either works.
//!
//! This module only builds and rearranges the tree; giving writes to `bind`, `unbind`, …
//! the kernel's effects is the job of the `handoff-kernelsim` crate, built on top of it.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::host::Host;
use crate::pci::PciAddress;

/// One PCI function to simulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimFunction {
    pub address: PciAddress,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub driver: Option<String>,
    pub iommu_group: u32,
    /// The parent bridge; None for a device directly on the root bus.
    pub parent: Option<PciAddress>,
    /// DRM minors (card, render) when the function is a display device with a DRM driver.
    pub drm: Option<(u32, u32)>,
    /// ALSA card number when the function is an HDA controller.
    pub sound_card: Option<u32>,
    /// i2c adapters that hang off this function.
    pub i2c: Vec<u32>,
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimSpec {
    pub functions: Vec<SimFunction>,
    /// Kernel drivers registered on the PCI bus (directories under `bus/pci/drivers`).
    pub drivers: Vec<String>,
    /// Make the NVIDIA device nodes (`nvidia0`, `nvidiactl`, `nvidia-modeset`, `nvidia-uvm*`).
    pub nvidia_nodes: bool,
    /// The VGA device the firmware booted on: its `boot_vga` reads 1, every other VGA
    /// device's 0 (the kernel has the file on VGA-class devices only).
    pub boot_vga: Option<PciAddress>,
}

pub const RTX_3090_TI: PciAddress = PciAddress::new(0, 1, 0, 0);
pub const ROOT_PORT: PciAddress = PciAddress::new(0, 0, 1, 0);
pub const IGPU: PciAddress = PciAddress::new(0, 0, 2, 0);
/// The homelab's card sits where the workstation's does.
pub const RTX_5070_TI: PciAddress = RTX_3090_TI;

impl SimSpec {
    /// The workstation seed: an RTX 3090 Ti (VGA, HDA audio, USB, UCSI) on nvidia behind a
    /// root port that shares its IOMMU group, and an Intel iGPU running the desktop.
    pub fn workstation() -> Self {
        let f = |function: u8, device: u16, class: u32, driver: &str| SimFunction {
            address: RTX_3090_TI.with_function(function),
            vendor: 0x10de,
            device,
            class,
            driver: Some(driver.to_owned()),
            iommu_group: 13,
            parent: Some(ROOT_PORT),
            drm: None,
            sound_card: None,
            i2c: Vec::new(),
        };
        let mut vga = f(0, 0x2203, 0x030000, "nvidia");
        vga.drm = Some((1, 129));
        vga.i2c = vec![3, 4];
        let mut audio = f(1, 0x1aef, 0x040300, "snd_hda_intel");
        audio.sound_card = Some(1);
        let usb = f(2, 0x1ad8, 0x0c0330, "xhci_hcd");
        let mut ucsi = f(3, 0x1ad9, 0x0c8000, "nvidia-gpu");
        ucsi.i2c = vec![5];
        let root_port = SimFunction {
            address: ROOT_PORT,
            vendor: 0x8086,
            device: 0xa70d,
            class: 0x060400,
            driver: Some("pcieport".into()),
            iommu_group: 13,
            parent: None,
            drm: None,
            sound_card: None,
            i2c: Vec::new(),
        };
        let igpu = SimFunction {
            address: IGPU,
            vendor: 0x8086,
            device: 0xa780,
            class: 0x030000,
            driver: Some("i915".into()),
            iommu_group: 0,
            parent: None,
            drm: Some((0, 128)),
            sound_card: None,
            i2c: vec![0],
        };
        SimSpec {
            functions: vec![root_port, vga, audio, usb, ucsi, igpu],
            drivers: [
                "pcieport",
                "nvidia",
                "snd_hda_intel",
                "xhci_hcd",
                "nvidia-gpu",
                "i915",
                "vfio-pci",
            ]
            .map(String::from)
            .to_vec(),
            nvidia_nodes: true,
            // Both seeds' firmware shows its console on the iGPU.
            boot_vga: Some(IGPU),
        }
    }

    /// The homelab seed: an RTX 5070 Ti with only VGA and HDA audio, isolated on vfio-pci
    /// behind its root port, and an Intel UHD 630 (kept on i915 here; it goes to the macOS
    /// VM). The audio ID is the GB203 HDA controller's as far as we know; nothing reads it.
    pub fn homelab() -> Self {
        let mut spec = Self::workstation();
        spec.functions.retain(|f| {
            f.address != RTX_3090_TI.with_function(2) && f.address != RTX_3090_TI.with_function(3)
        });
        if let Some(igpu) = spec.function_mut(IGPU) {
            igpu.device = 0x3e92;
        }
        if let Some(vga) = spec.function_mut(RTX_5070_TI) {
            vga.device = 0x2c05;
            vga.driver = Some("vfio-pci".into());
            vga.drm = None;
            vga.i2c.clear();
        }
        if let Some(audio) = spec.function_mut(RTX_5070_TI.with_function(1)) {
            audio.device = 0x22e9;
            audio.driver = Some("vfio-pci".into());
            audio.sound_card = None;
        }
        spec.nvidia_nodes = false;
        spec
    }

    pub fn function_mut(&mut self, address: PciAddress) -> Option<&mut SimFunction> {
        self.functions.iter_mut().find(|f| f.address == address)
    }
}

/// A built tree. Dropping it leaves the files; the caller owns the directory.
#[derive(Debug, Clone)]
pub struct SimHost {
    pub root: PathBuf,
}

impl SimHost {
    /// Build `spec` under `root` (which should be empty): `root/sys`, `root/dev`, `root/run`.
    pub fn build(root: &Path, spec: &SimSpec) -> io::Result<SimHost> {
        let sim = SimHost {
            root: root.to_owned(),
        };
        let sys = sim.sysfs();
        for d in [
            "bus/pci/devices",
            "bus/pci/drivers",
            "kernel/iommu_groups",
            "module",
            "devices/pci0000:00",
        ] {
            fs::create_dir_all(sys.join(d))?;
        }
        // Bus-level control files; the write layer gives them effects.
        for f in ["drivers_probe", "rescan", "resource_alignment"] {
            fs::write(sys.join("bus/pci").join(f), "")?;
        }
        fs::write(sys.join("bus/pci/drivers_autoprobe"), "1\n")?;
        for driver in &spec.drivers {
            sim.add_driver(driver)?;
        }
        for func in &spec.functions {
            sim.add_function(spec, func)?;
        }
        let dev = sim.dev();
        fs::create_dir_all(dev.join("dri/by-path"))?;
        fs::create_dir_all(dev.join("snd"))?;
        fs::create_dir_all(dev.join("vfio"))?;
        // vfio.ko's container node exists once the module is loaded (modprobe vfio-pci
        // loads it); the group nodes while a device of the group is on vfio-pci.
        if spec.drivers.iter().any(|d| d == "vfio-pci") {
            mknod(&dev.join("vfio/vfio"))?;
        }
        for func in &spec.functions {
            sim.sync_vfio_node(func.address)?;
        }
        if spec.nvidia_nodes {
            for n in [
                "nvidia0",
                "nvidiactl",
                "nvidia-modeset",
                "nvidia-uvm",
                "nvidia-uvm-tools",
            ] {
                mknod(&dev.join(n))?;
            }
        }
        fs::create_dir_all(sim.run())?;
        Ok(sim)
    }

    pub fn sysfs(&self) -> PathBuf {
        self.root.join("sys")
    }

    pub fn dev(&self) -> PathBuf {
        self.root.join("dev")
    }

    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Roots for the library: simulated sysfs, `/dev` and `/run`, the real `/proc`
    /// (holders are real processes).
    pub fn host(&self) -> Host {
        Host {
            sysfs: self.sysfs(),
            procfs: "/proc".into(),
            dev: self.dev(),
            run: self.run(),
            uninspectable_ok: Vec::new(),
        }
    }

    /// The device's real directory under `sys/devices`, relative to `sys/`.
    fn device_rel(spec: &SimSpec, func: &SimFunction) -> PathBuf {
        let mut chain = vec![func.address];
        let mut parent = func.parent;
        while let Some(p) = parent {
            chain.push(p);
            parent = spec
                .functions
                .iter()
                .find(|f| f.address == p)
                .and_then(|f| f.parent);
        }
        let mut rel = PathBuf::from(format!("devices/pci{:04x}:{:02x}", func.address.domain, 0));
        for a in chain.iter().rev() {
            rel.push(a.to_string());
        }
        rel
    }

    /// `../` enough times to climb from `rel` (a path under `sys/`) back to `sys/`.
    fn up_from(rel: &Path) -> PathBuf {
        rel.components().map(|_| "..").collect()
    }

    /// The canonical device directory (following `bus/pci/devices/<addr>`).
    pub fn device_dir(&self, address: PciAddress) -> PathBuf {
        let link = self.sysfs().join("bus/pci/devices").join(address.to_string());
        fs::canonicalize(&link).unwrap_or(link)
    }

    pub fn add_driver(&self, name: &str) -> io::Result<()> {
        let sys = self.sysfs();
        let d = sys.join("bus/pci/drivers").join(name);
        fs::create_dir_all(&d)?;
        for f in ["bind", "unbind", "new_id", "remove_id", "uevent"] {
            fs::write(d.join(f), "")?;
        }
        let module = name.replace('-', "_");
        fs::create_dir_all(sys.join("module").join(&module).join("drivers"))?;
        let _ = symlink(Path::new("../../../../module").join(&module), d.join("module"));
        Ok(())
    }

    /// Add one function (and link it to `func.driver`). Also how a rescan brings a removed
    /// function back.
    pub fn add_function(&self, spec: &SimSpec, func: &SimFunction) -> io::Result<()> {
        let sys = self.sysfs();
        let rel = Self::device_rel(spec, func);
        let dir = sys.join(&rel);
        fs::create_dir_all(dir.join("power"))?;
        let up = Self::up_from(&rel);
        let a = func.address.to_string();
        let w = |name: &str, value: String| fs::write(dir.join(name), value);
        w("vendor", format!("0x{:04x}\n", func.vendor))?;
        w("device", format!("0x{:04x}\n", func.device))?;
        w("class", format!("0x{:06x}\n", func.class))?;
        w("subsystem_vendor", format!("0x{:04x}\n", func.vendor))?;
        w("subsystem_device", "0x0000\n".into())?;
        w("revision", "0xa1\n".into())?;
        w("driver_override", "(null)\n".into())?;
        w("enable", "1\n".into())?;
        w("numa_node", "-1\n".into())?;
        w(
            "modalias",
            format!(
                "pci:v{:08X}d{:08X}sv*sd*bc{:02X}sc{:02X}i{:02X}\n",
                func.vendor,
                func.device,
                func.class >> 16,
                (func.class >> 8) & 0xff,
                func.class & 0xff
            ),
        )?;
        for f in ["remove", "reset", "rescan"] {
            w(f, String::new())?;
        }
        if func.class >> 8 == 0x0300 {
            w(
                "boot_vga",
                format!("{}\n", u8::from(spec.boot_vga == Some(func.address))),
            )?;
        }
        // BAR0 and BAR1 like a 3090 Ti's; other functions get a small BAR0.
        let resource = if func.class >> 8 == 0x0300 && func.vendor == 0x10de {
            "0x00000000fb000000 0x00000000fbffffff 0x0000000000040200\n\
             0x0000006000000000 0x00000067ffffffff 0x000000000014220c\n"
        } else {
            "0x00000000fc080000 0x00000000fc083fff 0x0000000000040200\n"
        };
        w("resource", resource.into())?;
        fs::write(dir.join("power/runtime_status"), "active\n")?;
        fs::write(dir.join("power/control"), "auto\n")?;
        symlink(up.join("bus/pci"), dir.join("subsystem"))?;
        let group = sys
            .join("kernel/iommu_groups")
            .join(func.iommu_group.to_string())
            .join("devices");
        fs::create_dir_all(&group)?;
        symlink(
            up.join("kernel/iommu_groups").join(func.iommu_group.to_string()),
            dir.join("iommu_group"),
        )?;
        symlink(Path::new("../../../..").join(&rel), group.join(&a))?;
        symlink(
            Path::new("../../..").join(&rel),
            sys.join("bus/pci/devices").join(&a),
        )?;
        // Class devices exist while the function is on the driver that registers them
        // (not vfio-pci, not unbound); [`crate::kernelsim`] keeps them so afterwards.
        if func.driver.as_deref().is_some_and(registers_class_devices) {
            if let Some((card, render)) = func.drm {
                self.drm_register(func.address, card, render)?;
            }
            if let Some(card) = func.sound_card {
                self.sound_register(func.address, card)?;
            }
        }
        for bus in &func.i2c {
            let d = dir.join(format!("i2c-{bus}/i2c-dev/i2c-{bus}"));
            fs::create_dir_all(&d)?;
            fs::write(d.join("dev"), format!("89:{bus}\n"))?;
            fs::write(d.join("uevent"), format!("DEVNAME=i2c-{bus}\n"))?;
            fs::write(
                dir.join(format!("i2c-{bus}/name")),
                format!("NVIDIA i2c adapter {bus}\n"),
            )?;
            mknod(&self.dev().join(format!("i2c-{bus}")))?;
        }
        self.write_uevent(func.address, &dir, func, func.driver.as_deref())?;
        if let Some(driver) = &func.driver {
            self.link_driver(func.address, driver)?;
        }
        Ok(())
    }

    fn write_uevent(
        &self,
        address: PciAddress,
        dir: &Path,
        func: &SimFunction,
        driver: Option<&str>,
    ) -> io::Result<()> {
        let mut s = String::new();
        if let Some(d) = driver {
            s += &format!("DRIVER={d}\n");
        }
        s += &format!(
            "PCI_CLASS={:X}\nPCI_ID={:04X}:{:04X}\nPCI_SLOT_NAME={address}\n",
            func.class, func.vendor, func.device
        );
        fs::write(dir.join("uevent"), s)
    }

    /// The driver `address` is bound to, read from its `driver` link.
    pub fn driver(&self, address: PciAddress) -> Option<String> {
        let link = fs::read_link(self.device_dir(address).join("driver")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    fn link_driver(&self, address: PciAddress, driver: &str) -> io::Result<()> {
        let dir = self.device_dir(address);
        let rel = dir
            .strip_prefix(fs::canonicalize(self.sysfs())?)
            .map_err(io::Error::other)?
            .to_owned();
        let drv = self.sysfs().join("bus/pci/drivers").join(driver);
        if !drv.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no driver {driver} registered"),
            ));
        }
        symlink(
            Self::up_from(&rel).join("bus/pci/drivers").join(driver),
            dir.join("driver"),
        )?;
        symlink(Path::new("../../../..").join(&rel), drv.join(address.to_string()))?;
        Ok(())
    }

    /// Bind `address` to `driver`, or unbind it with None, the way the kernel's driver
    /// core leaves sysfs afterwards: the device's `driver` link, the driver's link back to
    /// the device, and `DRIVER=` in `uevent`.
    pub fn set_driver(&self, address: PciAddress, driver: Option<&str>) -> io::Result<()> {
        let dir = self.device_dir(address);
        if let Some(old) = self.driver(address) {
            fs::remove_file(dir.join("driver"))?;
            let _ = fs::remove_file(
                self.sysfs()
                    .join("bus/pci/drivers")
                    .join(old)
                    .join(address.to_string()),
            );
        }
        if let Some(d) = driver {
            self.link_driver(address, d)?;
        }
        let uevent = fs::read_to_string(dir.join("uevent"))?;
        let mut s: String = driver.map(|d| format!("DRIVER={d}\n")).unwrap_or_default();
        for line in uevent.lines().filter(|l| !l.starts_with("DRIVER=")) {
            s += line;
            s.push('\n');
        }
        fs::write(dir.join("uevent"), s)?;
        self.sync_vfio_node(address)
    }

    /// `/dev/vfio/<group>` for `address`'s IOMMU group, as vfio keeps it: present while
    /// any device of the group is bound to vfio-pci, gone when the last one leaves
    /// (drivers/vfio/group.c: `vfio_create_group` adds the cdev when the group's first
    /// device registers, `vfio_device_remove_group` deletes it when its last one
    /// unregisters). A process that still has the node open keeps its fd, whose link then
    /// reads `… (deleted)`, as on the kernel.
    pub fn sync_vfio_node(&self, address: PciAddress) -> io::Result<()> {
        let Ok(group) = fs::read_link(self.device_dir(address).join("iommu_group")) else {
            return Ok(());
        };
        let Some(id) = group.file_name() else {
            return Ok(());
        };
        let members = self.sysfs().join("kernel/iommu_groups").join(id).join("devices");
        let on_vfio = fs::read_dir(&members).into_iter().flatten().flatten().any(|m| {
            fs::read_link(m.path().join("driver"))
                .is_ok_and(|l| l.file_name() == Some(std::ffi::OsStr::new("vfio-pci")))
        });
        let node = self.dev().join("vfio").join(id);
        if on_vfio {
            mknod(&node)
        } else {
            match fs::remove_file(&node) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }

    /// The DRM minors `(card, render)` of `address`'s registered class devices
    /// (`<device>/drm/card<n>`, `renderD<n>`), None when its DRM driver has none.
    pub fn drm_minors(&self, address: PciAddress) -> Option<(u32, u32)> {
        let names = dir_entries(&self.device_dir(address).join("drm"));
        let minor = |prefix: &str| {
            names
                .iter()
                .find_map(|n| n.strip_prefix(prefix).and_then(|m| m.parse().ok()))
        };
        Some((minor("card")?, minor("renderD")?))
    }

    /// The DRM driver of `address` bound: its class devices `<device>/drm/card<card>` and
    /// `renderD<render>`, their nodes under `/dev/dri` and udev's `by-path` links.
    /// Returns the nodes.
    pub fn drm_register(&self, address: PciAddress, card: u32, render: u32) -> io::Result<Vec<PathBuf>> {
        let dir = self.device_dir(address);
        let dri = self.dev().join("dri");
        let mut nodes = Vec::new();
        for (name, minor) in [
            (format!("card{card}"), card),
            (format!("renderD{render}"), render),
        ] {
            let d = dir.join("drm").join(&name);
            fs::create_dir_all(&d)?;
            fs::write(d.join("dev"), format!("226:{minor}\n"))?;
            fs::write(
                d.join("uevent"),
                format!("MAJOR=226\nMINOR={minor}\nDEVNAME=dri/{name}\n"),
            )?;
            mknod(&dri.join(&name))?;
            nodes.push(dri.join(&name));
        }
        let by_path = dri.join("by-path");
        fs::create_dir_all(&by_path)?;
        for (kind, target) in [
            ("card", format!("../card{card}")),
            ("render", format!("../renderD{render}")),
        ] {
            let link = by_path.join(format!("pci-{address}-{kind}"));
            let _ = fs::remove_file(&link);
            symlink(target, link)?;
        }
        Ok(nodes)
    }

    /// The DRM driver of `address` unbound: its class devices, their `/dev/dri` nodes and
    /// udev's `by-path` links go (`drm_dev_unregister`; devtmpfs removes a node even while
    /// a process has it open — that process keeps its fd, whose link reads `… (deleted)`).
    /// Returns the nodes removed.
    pub fn drm_unregister(&self, address: PciAddress) -> io::Result<Vec<PathBuf>> {
        let drm = self.device_dir(address).join("drm");
        let mut nodes = Vec::new();
        for name in dir_entries(&drm) {
            let node = self.dev().join("dri").join(&name);
            if fs::remove_file(&node).is_ok() {
                nodes.push(node);
            }
            fs::remove_dir_all(drm.join(&name))?;
        }
        let _ = fs::remove_dir(&drm);
        let by_path = self.dev().join("dri/by-path");
        for kind in ["card", "render"] {
            let _ = fs::remove_file(by_path.join(format!("pci-{address}-{kind}")));
        }
        Ok(nodes)
    }

    /// The `/dev` nodes of `address`'s registered class devices: `(DRM, sound)`.
    pub fn class_nodes(&self, address: PciAddress) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let dir = self.device_dir(address);
        let drm = dir_entries(&dir.join("drm"))
            .into_iter()
            .map(|n| self.dev().join("dri").join(n))
            .collect();
        let mut sound = Vec::new();
        for card in dir_entries(&dir.join("sound")) {
            for name in dir_entries(&dir.join("sound").join(card)) {
                sound.push(self.dev().join("snd").join(name));
            }
        }
        (drm, sound)
    }

    /// The ALSA card number of `address`'s registered sound card (`<device>/sound/card<n>`).
    pub fn sound_card(&self, address: PciAddress) -> Option<u32> {
        dir_entries(&self.device_dir(address).join("sound"))
            .iter()
            .find_map(|n| n.strip_prefix("card").and_then(|c| c.parse().ok()))
    }

    /// The sound driver of `address` registered ALSA card `card`: `<device>/sound/card<n>`
    /// with its control, hwdep and PCM devices, and their nodes under `/dev/snd`. Returns
    /// the nodes.
    pub fn sound_register(&self, address: PciAddress, card: u32) -> io::Result<Vec<PathBuf>> {
        let snd = self.dev().join("snd");
        fs::create_dir_all(&snd)?;
        let dir = self.device_dir(address).join("sound").join(format!("card{card}"));
        let mut nodes = Vec::new();
        for name in [
            format!("controlC{card}"),
            format!("hwC{card}D0"),
            format!("pcmC{card}D3p"),
            format!("pcmC{card}D7p"),
        ] {
            let d = dir.join(&name);
            fs::create_dir_all(&d)?;
            fs::write(d.join("dev"), "116:1\n")?;
            fs::write(d.join("uevent"), format!("DEVNAME=snd/{name}\n"))?;
            mknod(&snd.join(&name))?;
            nodes.push(snd.join(&name));
        }
        Ok(nodes)
    }

    /// The sound card of `address` disconnected (`snd_card_disconnect`): its class devices
    /// and `/dev/snd` nodes go. Returns the nodes removed.
    pub fn sound_unregister(&self, address: PciAddress) -> io::Result<Vec<PathBuf>> {
        let sound = self.device_dir(address).join("sound");
        let mut nodes = Vec::new();
        for card in dir_entries(&sound) {
            for name in dir_entries(&sound.join(&card)) {
                let node = self.dev().join("snd").join(&name);
                if fs::remove_file(&node).is_ok() {
                    nodes.push(node);
                }
            }
            fs::remove_dir_all(sound.join(&card))?;
        }
        let _ = fs::remove_dir(&sound);
        Ok(nodes)
    }

    /// A framebuffer device of `address`, as DRM's fbdev emulation registers it
    /// (`<device>/graphics/fb<n>` with its `dev`, and the node `/dev/fb<n>`). Returns the
    /// node's path.
    pub fn add_framebuffer(&self, address: PciAddress, n: u32) -> io::Result<PathBuf> {
        let d = self.device_dir(address).join(format!("graphics/fb{n}"));
        fs::create_dir_all(&d)?;
        fs::write(d.join("dev"), format!("29:{n}\n"))?;
        let node = self.dev().join(format!("fb{n}"));
        mknod(&node)?;
        Ok(node)
    }

    /// vfio.ko's container node `/dev/vfio/vfio`: loading vfio-pci loads vfio, which
    /// registers it; it stays when vfio-pci is unloaded (vfio itself stays loaded).
    pub fn add_vfio_container_node(&self) -> io::Result<()> {
        mknod(&self.dev().join("vfio/vfio"))
    }

    /// Remove a function from the tree as if it fell off the bus.
    pub fn remove_function(&self, address: PciAddress) -> io::Result<()> {
        let _ = self.set_driver(address, None);
        let dir = self.device_dir(address);
        if let Ok(group) = fs::read_link(dir.join("iommu_group")) {
            let group_dir = dir.join(group);
            let _ = fs::remove_file(group_dir.join("devices").join(address.to_string()));
        }
        fs::remove_file(self.sysfs().join("bus/pci/devices").join(address.to_string()))?;
        fs::remove_dir_all(dir)
    }

    /// Set a function's `power/runtime_status`.
    pub fn set_runtime_status(&self, address: PciAddress, status: &str) -> io::Result<()> {
        fs::write(
            self.device_dir(address).join("power/runtime_status"),
            format!("{status}\n"),
        )
    }
}

/// Whether a function bound to `driver` has the class devices (DRM, sound) its spec gives
/// it: every driver but vfio-pci, which registers none.
pub fn registers_class_devices(driver: &str) -> bool {
    driver != "vfio-pci"
}

/// The names in a directory, sorted (none when it cannot be read).
fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A character device 1:3 when we may make one, else a plain file.
fn mknod(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path; mknod has no other memory effects.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::AlreadyExists {
        return Ok(());
    }
    fs::write(path, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_kernel() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
        let sys = sim.sysfs();
        assert_eq!(
            fs::read_link(sys.join("bus/pci/devices/0000:01:00.0")).unwrap(),
            Path::new("../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0")
        );
        let dev = sys.join("devices/pci0000:00/0000:00:01.0/0000:01:00.0");
        assert_eq!(
            fs::read_link(dev.join("driver")).unwrap(),
            Path::new("../../../../bus/pci/drivers/nvidia")
        );
        assert_eq!(
            fs::read_link(dev.join("iommu_group")).unwrap(),
            Path::new("../../../../kernel/iommu_groups/13")
        );
        assert!(sys.join("bus/pci/drivers/nvidia/0000:01:00.0/vendor").exists());
        assert!(
            sys.join("kernel/iommu_groups/13/devices/0000:01:00.1/class")
                .exists()
        );
        assert_eq!(
            fs::read_link(sys.join("devices/pci0000:00/0000:00:02.0/driver")).unwrap(),
            Path::new("../../../bus/pci/drivers/i915")
        );
        assert!(
            fs::canonicalize(sim.dev().join("dri/by-path/pci-0000:01:00.0-render"))
                .unwrap()
                .ends_with("renderD129")
        );
        assert_eq!(
            fs::read_to_string(dev.join("driver_override")).unwrap(),
            "(null)\n"
        );
    }

    #[test]
    fn set_driver_moves_both_links() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
        let a = RTX_3090_TI.with_function(1);
        sim.set_driver(a, Some("vfio-pci")).unwrap();
        assert_eq!(sim.driver(a).as_deref(), Some("vfio-pci"));
        assert!(
            !sim.sysfs()
                .join("bus/pci/drivers/snd_hda_intel/0000:01:00.1")
                .exists()
        );
        assert!(
            sim.sysfs()
                .join("bus/pci/drivers/vfio-pci/0000:01:00.1/class")
                .exists()
        );
        assert!(
            fs::read_to_string(sim.device_dir(a).join("uevent"))
                .unwrap()
                .starts_with("DRIVER=vfio-pci\n")
        );
        sim.set_driver(a, None).unwrap();
        assert_eq!(sim.driver(a), None);
    }
}
