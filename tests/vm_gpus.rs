//! `handoff start`, `stop` and `switch` (the library's `vm::Ctl`) with several GPUs: which
//! GPU a VM takes is read from its definition, so the macOS VM on the iGPU and Windows on
//! the RTX run at once, and only a VM wanting the RTX waits for Windows. libvirt's test
//! driver runs the domains of `tests/fixtures/libvirt/three-vms-two-gpus-node.xml`, with
//! the hook's logic run in-process where libvirtd would run it (`hypervisor::simulated`,
//! the demo's), against the simulated workstation behind the kernel simulator's FUSE
//! mount.
//!
//! Run as root with `/dev/fuse`; under `CI=true` a missing `/dev/fuse` fails.

use std::fs;
use std::time::Duration;

use handoff::config::{Config, VmConfig};
use handoff_libvirt::simulated::Simulated;
use handoff_libvirt::vm::{Ctl, VmError};
use handoff_test_support::fuse_gpu::{self, GPU};

const IGPU: &str = "0000:00:02.0";
const NODE_XML: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/libvirt/three-vms-two-gpus-node.xml"
);

/// The simulated workstation's iGPU and RTX (the primary), and these domains at `uri`.
fn two_gpus(host: &handoff::host::Host, uri: &str, vms: &[&str]) -> Config {
    let mut text = format!(
        "[[gpu]]\naddress = \"{IGPU}\"\nhost_driver = \"i915\"\nwatchdog_s = 1\nallow_display = true\n\n\
         [[gpu]]\naddress = \"{GPU}\"\nhost_driver = \"nvidia\"\nwatchdog_s = 1\nprimary = true\n\n"
    );
    for vm in vms {
        text += &format!("[[vm]]\nname = \"{vm}\"\nuri = \"{uri}\"\nshutdown_timeout_s = 5\n\n");
    }
    text += &format!(
        "[host]\nsysfs = {:?}\nproc = \"/proc\"\ndev = {:?}\nrun = {:?}\nuninspectable_ok = {:?}\n",
        host.sysfs.display().to_string(),
        host.dev.display().to_string(),
        host.run.display().to_string(),
        host.uninspectable_ok,
    );
    let cfg = Config::parse(&text, std::path::Path::new("test.toml")).unwrap();
    fs::create_dir_all(&host.run).unwrap();
    cfg
}

#[test]
fn the_macos_vm_on_the_igpu_and_windows_on_the_rtx_run_at_once_and_only_the_rtx_is_switched() {
    let Some(sim) = fuse_gpu::workstation() else {
        return;
    };
    let host = sim.host();
    let uri = format!("test://{NODE_XML}");
    let cfg = two_gpus(&host, &uri, &["macos", "win11", "ai"]);
    let vm = |name: &str| -> VmConfig { cfg.vm(Some(name)).unwrap().clone() };
    let mut said = Vec::new();
    let mut say = |l: &str| said.push(l.to_owned());
    let mut ctl = Ctl::with_hypervisor(&cfg, &mut say, Box::new(Simulated::new(&cfg).unwrap()));
    ctl.gpu_wait = Duration::from_secs(5);

    let mac = ctl.start(&vm("macos")).unwrap();
    assert_eq!(
        mac.gpu.address.to_string(),
        IGPU,
        "the outcome names the VM's own GPU"
    );
    assert_eq!(mac.gpu_on_vfio, Some(true));
    let win = ctl
        .start(&vm("win11"))
        .expect("the RTX is free while macOS has the iGPU");
    assert_eq!(win.gpu.address.to_string(), GPU);
    assert_eq!(sim.driver(IGPU).as_deref(), Some("vfio-pci"));
    sim.assert_on_vfio();

    // ai wants the RTX: refused, naming Windows; macOS is not in its way.
    match ctl.start(&vm("ai")) {
        Err(VmError::OtherVmHolds { other, gpu, .. }) => {
            assert_eq!((other.as_str(), gpu.to_string().as_str()), ("win11", GPU));
        }
        other => panic!("not refused naming win11: {:?}", other.map(|o| o.vm)),
    }

    // A switch to ai stops Windows only.
    let switched = ctl.switch(&vm("ai"), true, None).unwrap();
    let stopped: Vec<&str> = switched.stopped.iter().map(|s| s.vm.as_str()).collect();
    assert_eq!(stopped, ["win11"]);
    assert_eq!(switched.started.vm, "ai");
    sim.assert_on_vfio();
    assert_eq!(
        sim.driver(IGPU).as_deref(),
        Some("vfio-pci"),
        "macOS keeps the iGPU"
    );

    let out = ctl.stop(&vm("macos"), true, Duration::from_secs(5)).unwrap();
    assert_eq!(out.gpu_returned, Some(true), "{said:?}");
    assert_eq!(sim.driver(IGPU).as_deref(), Some("i915"));
    let out = ctl.stop(&vm("ai"), true, Duration::from_secs(5)).unwrap();
    assert_eq!(out.gpu_returned, Some(true));
    drop(ctl);
    sim.assert_home();
}

/// A VM that passes both GPUs through: `start`, `stop` and `switch` check and say each of
/// them, in their progress lines, their outcome and its JSON, not only the first. And a
/// macOS VM given the RTX is told, by `start` itself, that macOS has no driver for it.
#[test]
fn a_vm_with_both_gpus_is_told_about_each_by_start_stop_and_switch() {
    let Some(sim) = fuse_gpu::workstation() else {
        return;
    };
    let host = sim.host();
    // A copy of its own: libvirt's test driver shares one node per file within a process,
    // and the other test here runs the same domains at the same time.
    let node = sim.tmp.path().join("node.xml");
    fs::copy(NODE_XML, &node).unwrap();
    let uri = format!("test://{}", node.display());
    let cfg = two_gpus(&host, &uri, &["both", "macos", "hackintosh"]);
    let vm = |name: &str| -> VmConfig { cfg.vm(Some(name)).unwrap().clone() };
    let said = std::cell::RefCell::new(Vec::<String>::new());
    let mut say = |l: &str| said.borrow_mut().push(l.to_owned());
    let mut ctl = Ctl::with_hypervisor(&cfg, &mut say, Box::new(Simulated::new(&cfg).unwrap()));
    ctl.gpu_wait = Duration::from_secs(5);

    // A process holds the RTX, the second of its GPUs in address order: refused up front,
    // naming it, before anything starts.
    let holder = fuse_gpu::hold(&sim.dev("nvidia0"));
    match ctl.start(&vm("both")) {
        Err(VmError::Busy { text, .. }) => {
            assert!(text.contains(GPU), "{text}");
            assert!(text.contains(&holder.pid().to_string()), "{text}");
        }
        other => panic!("not refused for the RTX's holder: {:?}", other.map(|o| o.vm)),
    }
    drop(holder);
    sim.assert_home();
    assert_eq!(sim.driver(IGPU).as_deref(), Some("i915"));

    let out = ctl.start(&vm("both")).unwrap();
    let addresses: Vec<String> = out.gpus.iter().map(|g| g.address.to_string()).collect();
    assert_eq!(addresses, [IGPU, GPU], "both, in address order");
    assert_eq!(out.gpu_on_vfio, Some(true));
    assert_eq!(
        out.gpus_words(),
        format!("GPU {IGPU} is on vfio-pci and GPU {GPU} is on vfio-pci")
    );
    let json = serde_json::to_value(&out).unwrap();
    assert_eq!(json["gpus"].as_array().unwrap().len(), 2, "{json:#}");
    assert_eq!(json["gpus"][1]["owner"], "vfio", "{json:#}");
    sim.assert_on_vfio();
    assert_eq!(sim.driver(IGPU).as_deref(), Some("vfio-pci"));

    // macOS wants the iGPU, which `both` has: refused naming the iGPU, not the first GPU
    // `both` takes by chance.
    match ctl.start(&vm("macos")) {
        Err(VmError::OtherVmHolds { other, gpu, .. }) => {
            assert_eq!((other.as_str(), gpu.to_string().as_str()), ("both", IGPU));
        }
        other => panic!("not refused naming both: {:?}", other.map(|o| o.vm)),
    }

    said.borrow_mut().clear();
    let out = ctl.stop(&vm("both"), true, Duration::from_secs(5)).unwrap();
    assert_eq!(out.gpu_returned, Some(true));
    let back: Vec<(String, Option<bool>)> = out
        .gpus
        .iter()
        .map(|g| (g.address.to_string(), g.returned))
        .collect();
    assert_eq!(
        back,
        [(IGPU.to_owned(), Some(true)), (GPU.to_owned(), Some(true))]
    );
    let words = out.gpus_words();
    assert!(
        words.starts_with(&format!(
            "GPU {IGPU} is back on Linux (i915) and GPU {GPU} is back on Linux (nvidia)"
        )),
        "{words}"
    );
    let waits: Vec<String> = said
        .borrow()
        .iter()
        .filter(|l| l.starts_with("Waiting for GPU"))
        .cloned()
        .collect();
    assert_eq!(
        waits,
        [
            format!("Waiting for GPU {IGPU} to return to i915…"),
            format!("Waiting for GPU {GPU} to return to nvidia…"),
        ]
    );
    sim.assert_home();
    assert_eq!(sim.driver(IGPU).as_deref(), Some("i915"));

    // A switch from macOS (on the iGPU) to `both` stops macOS and starts `both` with each.
    ctl.start(&vm("macos")).unwrap();
    said.borrow_mut().clear();
    let switched = ctl.switch(&vm("both"), true, None).unwrap();
    let stopped: Vec<&str> = switched.stopped.iter().map(|s| s.vm.as_str()).collect();
    assert_eq!(stopped, ["macos"]);
    assert_eq!(switched.started.gpus.len(), 2);
    let json = serde_json::to_value(&switched).unwrap();
    assert_eq!(json["started"]["gpus"].as_array().unwrap().len(), 2, "{json:#}");
    sim.assert_on_vfio();
    assert_eq!(sim.driver(IGPU).as_deref(), Some("vfio-pci"));
    ctl.stop(&vm("both"), true, Duration::from_secs(5)).unwrap();
    sim.assert_home();

    // A macOS VM (its libosinfo id) given the RTX starts, and `start` says that macOS has
    // no driver for it, once (the demo's in-process hook says it too).
    said.borrow_mut().clear();
    let out = ctl.start(&vm("hackintosh")).unwrap();
    assert!(
        out.warnings.iter().any(
            |w| w.starts_with(&format!("hackintosh is a macOS VM and GPU {GPU} ("))
                && w.contains("macOS has no driver for it")
        ),
        "{:?}",
        out.warnings
    );
    let told: Vec<String> = said
        .borrow()
        .iter()
        .filter(|l| l.contains("is a macOS VM"))
        .cloned()
        .collect();
    assert_eq!(told.len(), 1, "said once: {told:#?}");
    ctl.stop(&vm("hackintosh"), true, Duration::from_secs(5)).unwrap();
    drop(ctl);
    sim.assert_home();
}
