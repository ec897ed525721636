//! The GPU model read from a simulated sysfs tree, as the status surfaces will show it.

use std::fs;
use std::path::{Path, PathBuf};

use handoff::gpu::{FunctionKind, Gpu, Owner, SysfsError, device_name, read_gpu_with_ids};
use handoff::simulated_tree::{IGPU, ROOT_PORT, RTX_3090_TI, RTX_5070_TI, SimFunction, SimHost, SimSpec};
use handoff::{Host, PciAddress};

fn fixture_ids() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pci.ids")
}

/// Read with the fixture pci.ids only, so results do not depend on the machine's.
fn read(host: &Host, address: PciAddress) -> Gpu {
    let ids = fixture_ids();
    read_gpu_with_ids(host, address, &[ids.as_path()]).unwrap()
}

fn build(spec: &SimSpec) -> (tempfile::TempDir, SimHost) {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(tmp.path(), spec).unwrap();
    (tmp, sim)
}

fn workstation() -> (tempfile::TempDir, SimHost) {
    build(&SimSpec::workstation())
}

fn f(n: u8) -> PciAddress {
    RTX_3090_TI.with_function(n)
}

#[test]
fn workstation_gpu_is_linux_s_with_all_four_functions() {
    let (_tmp, sim) = workstation();
    let gpu = read(&sim.host(), RTX_3090_TI);

    assert_eq!(gpu.owner, Owner::Host);
    assert_eq!(gpu.owner.to_string(), "Linux");
    assert_eq!(gpu.owner_phrase(), "on Linux (nvidia)");
    assert_eq!(gpu.name.as_deref(), Some("NVIDIA GeForce RTX 3090 Ti"));
    assert_eq!(gpu.short_name(), "RTX 3090 Ti");
    let seen: Vec<(String, FunctionKind, Option<&str>)> = gpu
        .functions
        .iter()
        .map(|f| (f.address.to_string(), f.kind, f.driver.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            ("0000:01:00.0".into(), FunctionKind::Vga, Some("nvidia")),
            ("0000:01:00.1".into(), FunctionKind::Audio, Some("snd_hda_intel")),
            ("0000:01:00.2".into(), FunctionKind::Usb, Some("xhci_hcd")),
            ("0000:01:00.3".into(), FunctionKind::Serial, Some("nvidia-gpu")),
        ]
    );
    let vga = gpu.graphics().unwrap();
    assert_eq!((vga.vendor, vga.device, vga.class), (0x10de, 0x2203, 0x030000));
    assert_eq!(vga.driver_override, None);
    assert_eq!(vga.runtime_status.as_deref(), Some("active"));
    assert_eq!(vga.iommu_group, Some(13));
    assert_eq!(gpu.split_description(), None);

    let json = serde_json::to_value(&gpu).unwrap();
    assert_eq!(json["owner"], "host");
    assert_eq!(json["address"], "0000:01:00.0");
}

#[test]
fn iommu_group_with_the_root_port_is_viable() {
    let (_tmp, sim) = workstation();
    let group = read(&sim.host(), RTX_3090_TI).iommu_group.unwrap();

    assert_eq!(group.id, 13);
    let members: Vec<(String, bool, bool)> = group
        .members
        .iter()
        .map(|m| (m.address.to_string(), m.gpu_function, m.bridge))
        .collect();
    assert_eq!(
        members,
        [
            ("0000:00:01.0".into(), false, true),
            ("0000:01:00.0".into(), true, false),
            ("0000:01:00.1".into(), true, false),
            ("0000:01:00.2".into(), true, false),
            ("0000:01:00.3".into(), true, false),
        ]
    );
    assert_eq!(group.members[0].driver.as_deref(), Some("pcieport"));
    assert!(group.viable());
    assert!(group.foreign_members().is_empty());
}

#[test]
fn group_with_a_foreign_device_is_not_viable() {
    // Bifurcated x8/x8: a second root port 00:01.1 shares group 13 and an NVMe drive sits
    // behind it.
    let mut spec = SimSpec::workstation();
    let second_port = PciAddress::new(0, 0, 1, 1);
    let root_port = spec.function_mut(ROOT_PORT).unwrap().clone();
    spec.functions.push(SimFunction {
        address: second_port,
        ..root_port
    });
    spec.functions.push(SimFunction {
        address: PciAddress::new(0, 2, 0, 0),
        vendor: 0x144d,
        device: 0xa80a,
        class: 0x010802,
        driver: Some("nvme".into()),
        iommu_group: 13,
        parent: Some(second_port),
        drm: None,
        sound_card: None,
        i2c: Vec::new(),
    });
    spec.drivers.push("nvme".into());
    let (_tmp, sim) = build(&spec);

    let gpu = read(&sim.host(), RTX_3090_TI);
    let group = gpu.iommu_group.as_ref().unwrap();

    assert!(!group.viable());
    let foreign: Vec<String> = group
        .foreign_members()
        .iter()
        .map(|m| {
            format!(
                "{} {:06x} {}",
                m.address,
                m.class,
                m.driver.as_deref().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(foreign, ["0000:02:00.0 010802 nvme"]);
    // The NVMe drive is in the group, not in the slot.
    assert_eq!(gpu.functions.len(), 4);
}

#[test]
fn owner_is_mixed_when_audio_stays_on_the_host() {
    let (_tmp, sim) = workstation();
    for n in [0, 2, 3] {
        sim.set_driver(f(n), Some("vfio-pci")).unwrap();
    }
    let gpu = read(&sim.host(), RTX_3090_TI);

    assert_eq!(gpu.owner, Owner::Mixed);
    assert_eq!(
        gpu.owner_phrase(),
        "split: 0000:01:00.0 on vfio-pci, 0000:01:00.1 on snd_hda_intel, \
         0000:01:00.2 on vfio-pci, 0000:01:00.3 on vfio-pci"
    );
}

#[test]
fn split_description_leaves_unbound_functions_out() {
    let (_tmp, sim) = workstation();
    sim.set_driver(f(0), Some("vfio-pci")).unwrap();
    sim.set_driver(f(2), None).unwrap();
    sim.set_driver(f(3), None).unwrap();
    let gpu = read(&sim.host(), RTX_3090_TI);

    assert_eq!(
        gpu.split_description().as_deref(),
        Some("0000:01:00.0 on vfio-pci, 0000:01:00.1 on snd_hda_intel")
    );
}

#[test]
fn owner_is_vfio_when_every_function_is_on_vfio_pci() {
    let (_tmp, sim) = workstation();
    for n in 0..4 {
        sim.set_driver(f(n), Some("vfio-pci")).unwrap();
    }
    let gpu = read(&sim.host(), RTX_3090_TI);

    assert_eq!(gpu.owner, Owner::Vfio);
    assert_eq!(gpu.owner.to_string(), "VFIO");
    assert_eq!(gpu.owner_phrase(), "on vfio-pci");
}

#[test]
fn unbound_ucsi_beside_host_functions_is_not_mixed() {
    let (_tmp, sim) = workstation();
    sim.set_driver(f(3), None).unwrap();
    let gpu = read(&sim.host(), RTX_3090_TI);

    assert_eq!(gpu.owner, Owner::Host);
    assert_eq!(gpu.functions[3].driver, None);
}

#[test]
fn unbound_ucsi_beside_vfio_functions_is_vfio() {
    let (_tmp, sim) = workstation();
    for n in 0..3 {
        sim.set_driver(f(n), Some("vfio-pci")).unwrap();
    }
    sim.set_driver(f(3), None).unwrap();

    assert_eq!(read(&sim.host(), RTX_3090_TI).owner, Owner::Vfio);
}

#[test]
fn owner_is_unbound_when_the_graphics_function_has_no_driver() {
    let (_tmp, sim) = workstation();
    sim.set_driver(f(0), None).unwrap();
    let gpu = read(&sim.host(), RTX_3090_TI);

    assert_eq!(gpu.owner, Owner::Unbound);
    assert_eq!(gpu.owner_phrase(), "unbound (no driver)");
    // Still listed, still named: the card is there, just without a driver.
    assert_eq!(gpu.functions.len(), 4);
    assert_eq!(gpu.short_name(), "RTX 3090 Ti");
}

#[test]
fn absent_when_nothing_at_the_address() {
    let (_tmp, sim) = workstation();
    let elsewhere = PciAddress::new(0, 0x0a, 0, 0);
    let gpu = read(&sim.host(), elsewhere);

    assert_eq!(gpu.owner, Owner::Absent);
    assert!(gpu.functions.is_empty());
    assert_eq!(gpu.name, None);
    assert_eq!(gpu.iommu_group, None);
    assert_eq!(gpu.owner_phrase(), "not present at 0000:0a:00.0");
    assert_eq!(gpu.short_name(), "GPU");
}

#[test]
fn absent_when_the_graphics_function_fell_off_the_bus() {
    let (_tmp, sim) = workstation();
    sim.remove_function(f(0)).unwrap();
    let gpu = read(&sim.host(), RTX_3090_TI);

    assert_eq!(gpu.owner, Owner::Absent);
    assert!(gpu.functions.is_empty());
}

#[test]
fn igpu_is_not_a_function_of_the_dgpu() {
    let (_tmp, sim) = workstation();
    let dgpu = read(&sim.host(), RTX_3090_TI);
    assert!(dgpu.functions.iter().all(|f| f.address.same_slot(&RTX_3090_TI)));
    assert!(
        dgpu.iommu_group
            .unwrap()
            .members
            .iter()
            .all(|m| m.address != IGPU)
    );

    let igpu = read(&sim.host(), IGPU);
    assert_eq!(igpu.owner, Owner::Host);
    assert_eq!(igpu.owner_phrase(), "on Linux (i915)");
    assert_eq!(igpu.functions.len(), 1);
    let group = igpu.iommu_group.unwrap();
    assert_eq!(group.id, 0);
    assert_eq!(group.members.len(), 1);
    assert!(group.viable());
}

#[test]
fn graphics_function_comes_first_even_when_configured_off_zero() {
    let (_tmp, sim) = workstation();
    let gpu = read(&sim.host(), f(1));

    let order: Vec<u8> = gpu.functions.iter().map(|f| f.address.function).collect();
    assert_eq!(order, [1, 0, 2, 3]);
    assert_eq!(gpu.graphics().unwrap().kind, FunctionKind::Audio);
}

#[test]
fn homelab_5070_ti_on_vfio_is_named_although_pci_ids_is_too_old() {
    let (_tmp, sim) = build(&SimSpec::homelab());
    let gpu = read(&sim.host(), RTX_5070_TI);

    assert_eq!(gpu.owner, Owner::Vfio);
    assert_eq!(gpu.name.as_deref(), Some("NVIDIA GeForce RTX 5070 Ti"));
    assert_eq!(gpu.short_name(), "RTX 5070 Ti");
    let kinds: Vec<FunctionKind> = gpu.functions.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, [FunctionKind::Vga, FunctionKind::Audio]);
    let igpu = read(&sim.host(), IGPU);
    assert_eq!(igpu.name.as_deref(), Some("Intel UHD Graphics 630"));
}

#[test]
fn name_comes_from_pci_ids_file() {
    let mut spec = SimSpec::workstation();
    spec.function_mut(RTX_3090_TI).unwrap().device = 0x2782;
    let (_tmp, sim) = build(&spec);
    let gpu = read(&sim.host(), RTX_3090_TI);

    assert_eq!(gpu.name.as_deref(), Some("NVIDIA GeForce RTX 4070 Ti"));
    assert_eq!(gpu.short_name(), "RTX 4070 Ti");
}

#[test]
fn names_fall_back_to_ids_when_nothing_knows_the_device() {
    let ids = fixture_ids();
    let ids = [ids.as_path()];
    // In pci.ids without a marketing name.
    assert_eq!(device_name(0x10de, 0x2785, &ids), "NVIDIA AD104");
    // Not in pci.ids: NVIDIA's block ends before Emulex's 2c05 could be mistaken for it.
    assert_eq!(device_name(0x10de, 0x2c06, &ids), "NVIDIA device 2c06");
    assert_eq!(
        device_name(0x10df, 0x2c05, &ids),
        "Emulex Corporation Made-up Emulex device"
    );
    // No pci.ids at all.
    let none = [Path::new("/nonexistent/pci.ids")];
    assert_eq!(device_name(0x8086, 0x3e92, &none), "Intel device 3e92");
    assert_eq!(device_name(0x10de, 0x2203, &none), "NVIDIA GeForce RTX 3090 Ti");
    assert_eq!(device_name(0xabcd, 0x0001, &none), "vendor abcd device 0001");
}

#[test]
fn runtime_status_is_read() {
    let (_tmp, sim) = workstation();
    sim.set_runtime_status(RTX_3090_TI, "suspended").unwrap();
    fs::remove_file(sim.device_dir(f(2)).join("power/runtime_status")).unwrap();
    let gpu = read(&sim.host(), RTX_3090_TI);

    assert_eq!(gpu.functions[0].runtime_status.as_deref(), Some("suspended"));
    assert_eq!(gpu.functions[1].runtime_status.as_deref(), Some("active"));
    assert_eq!(gpu.functions[2].runtime_status, None);
}

#[test]
fn driver_override_is_read() {
    let (_tmp, sim) = workstation();
    fs::write(sim.device_dir(f(1)).join("driver_override"), "vfio-pci\n").unwrap();
    let gpu = read(&sim.host(), RTX_3090_TI);

    assert_eq!(gpu.functions[0].driver_override, None);
    assert_eq!(gpu.functions[1].driver_override.as_deref(), Some("vfio-pci"));
}

#[test]
fn garbled_class_is_an_error_naming_the_file() {
    let (_tmp, sim) = workstation();
    fs::write(sim.device_dir(f(1)).join("class"), "banana\n").unwrap();
    let class = sim.host().pci_devices().join("0000:01:00.1/class");
    let err = read_gpu_with_ids(&sim.host(), RTX_3090_TI, &[]).unwrap_err();

    assert!(
        matches!(&err, SysfsError::Parse { path, .. } if *path == class),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("0000:01:00.1/class") && msg.contains("banana"),
        "{msg}"
    );
}

#[test]
fn unreadable_vendor_is_an_error_naming_the_file() {
    let (_tmp, sim) = workstation();
    // A directory in place of the file fails with EISDIR even for root.
    fs::remove_file(sim.device_dir(f(0)).join("vendor")).unwrap();
    fs::create_dir(sim.device_dir(f(0)).join("vendor")).unwrap();
    let vendor = sim.host().pci_devices().join("0000:01:00.0/vendor");
    let err = read_gpu_with_ids(&sim.host(), RTX_3090_TI, &[]).unwrap_err();

    assert!(
        matches!(&err, SysfsError::Read { path, .. } if *path == vendor),
        "{err:?}"
    );
    assert!(err.to_string().contains("0000:01:00.0/vendor"), "{err}");
}

#[test]
fn the_scans_read_of_the_gpu_is_the_full_read_without_name_and_overrides() {
    let (_tmp, sim) = workstation();
    let host = sim.host();
    fs::write(
        host.pci_devices().join("0000:01:00.0/driver_override"),
        "vfio-pci\n",
    )
    .unwrap();
    let check = |state: &str| {
        let mut full = read(&host, RTX_3090_TI);
        let bindings = handoff::gpu::read_gpu_bindings(&host, RTX_3090_TI).unwrap();
        assert_eq!(bindings.name, None, "{state}");
        assert!(
            bindings
                .functions
                .iter()
                .all(|f| f.driver_override.is_none() && !f.locked),
            "{state}"
        );
        assert_eq!(
            full.functions[0].driver_override.as_deref(),
            Some("vfio-pci"),
            "{state}"
        );
        full.name = None;
        for f in &mut full.functions {
            f.driver_override = None;
        }
        assert_eq!(bindings, full, "{state}");
    };
    check("on the host");
    sim.set_driver(f(0), Some("vfio-pci")).unwrap();
    check("split");
    for n in [1, 2, 3] {
        sim.set_driver(f(n), Some("vfio-pci")).unwrap();
    }
    check("on vfio-pci");
    sim.set_driver(f(0), None).unwrap();
    check("graphics unbound");
}
