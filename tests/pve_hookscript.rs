//! The Proxmox VE hookscript, run exactly as PVE runs it (`PVE::GuestHelpers::exec_hookscript`:
//! `<script> <vmid> <phase>`, as root, its output in the task log, a non-zero exit in
//! `pre-start` aborting the start) against the simulated GPU behind FUSE, with a PVE host's
//! files (`/etc/pve/qemu-server/<vmid>.conf`, `/var/run/qemu-server/<vmid>.pid`) in a temp
//! tree. The seed's homelab: VM 140 "Windows 11" and VM 141 "Linux AI" both pass the
//! GPU's slot through.
//!
//! Run as root with `/dev/fuse`; under `CI=true` a missing `/dev/fuse` fails.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use handoff_test_support::bins;
use handoff_test_support::fuse_gpu::{self, GPU, Sim, hold};

struct PveHost {
    sim: Sim,
    root: PathBuf,
    snippet: PathBuf,
    config: PathBuf,
}

/// The homelab on the simulated workstation: `host_driver` is where the GPU lives between
/// VMs (`nvidia`: CUDA on the host; `vfio-pci`: the seed's isolated card).
fn homelab(host_driver: &str) -> Option<PveHost> {
    homelab_with(
        &format!("[gpu]\naddress = \"{GPU}\"\nhost_driver = \"{host_driver}\"\nwatchdog_s = 2\n"),
        "",
    )
}

/// The homelab with `gpus` (the `[gpu]` or `[[gpu]]` sections) and `vms` (more `[[vm]]`s).
fn homelab_with(gpus: &str, vms: &str) -> Option<PveHost> {
    let sim = fuse_gpu::workstation()?;
    let root = sim.tmp.path().join("pve-root");
    let qs = root.join("etc/pve/qemu-server");
    fs::create_dir_all(&qs).unwrap();
    fs::create_dir_all(root.join("var/run/qemu-server")).unwrap();
    // 141 reaches the GPU through a PVE 8 resource mapping; 140 names the slot.
    fs::write(
        qs.join("140.conf"),
        "boot: order=scsi0\nhostpci0: 0000:01:00,pcie=1,x-vga=1\nmachine: q35\nname: win11\n\n[before-update]\nhostpci0: 0000:02:00\n",
    )
    .unwrap();
    fs::write(
        qs.join("141.conf"),
        "hostpci0: mapping=rtx5070ti,pcie=1\nmachine: q35\nname: linux-ai\n",
    )
    .unwrap();
    fs::write(qs.join("130.conf"), "hostpci0: 0000:00:02.0\nname: macos\n").unwrap();
    fs::create_dir_all(root.join("etc/pve/mapping")).unwrap();
    fs::write(
        root.join("etc/pve/mapping/pci.cfg"),
        "rtx5070ti\n\tmap id=10de:2c05,iommugroup=12,node=pve1,path=0000:01:00\n\tmap id=10de:2c05,node=pve2,path=0000:41:00\n",
    )
    .unwrap();
    let etc = sim.tmp.path().join("etc-handoff");
    fs::create_dir(&etc).unwrap();
    let config = etc.join("config.toml");
    let host = sim.host();
    let text = format!(
        "{gpus}\n\
         [proxmox]\nurl = \"https://pve1:8006\"\ntoken = \"handoff@pve!desk\"\ntoken_secret_file = \"/etc/handoff/pve-token\"\n\
         fingerprint = \"{}\"\n\n\
         [[vm]]\nvmid = 140\nlabel = \"Windows 11\"\n\n[[vm]]\nvmid = 141\nname = \"linux-ai\"\nlabel = \"Linux AI\"\n\n{vms}{}",
        ["AB"; 32].join(":"),
        handoff_test_support::config::host_section(&host)
    );
    fs::write(&config, text).unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    // What install-hooks puts in the snippets storage, pointed at this test's roots.
    let snippet = sim.tmp.path().join("handoff-hookscript");
    fs::write(
        &snippet,
        format!(
            "#!/bin/sh\nexec {} pve-hook --system-config {} --pve-root {} --node pve1 \"$@\"\n",
            env!("CARGO_BIN_EXE_handoff"),
            config.display(),
            root.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&snippet, fs::Permissions::from_mode(0o755)).unwrap();
    Some(PveHost {
        sim,
        root,
        snippet,
        config,
    })
}

struct Run {
    code: i32,
    output: String,
}

impl PveHost {
    /// `run_command([$hookscript, $vmid, $phase])`, as PVE does.
    fn hook(&self, vmid: u32, phase: &str) -> Run {
        let out = Command::new(&self.snippet)
            .arg(vmid.to_string())
            .arg(phase)
            .output()
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            output: String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        }
    }

    /// VM `vmid`'s QEMU runs: its pid file names a live process (this test's).
    fn running(&self, vmid: u32) {
        fs::write(self.pid_file(vmid), format!("{}\n", std::process::id())).unwrap();
    }

    fn stopped(&self, vmid: u32) {
        let _ = fs::remove_file(self.pid_file(vmid));
    }

    fn pid_file(&self, vmid: u32) -> PathBuf {
        self.root.join(format!("var/run/qemu-server/{vmid}.pid"))
    }
}

#[test]
fn pre_start_hands_a_host_driver_gpu_to_the_vm_and_post_stop_brings_it_home() {
    let _serial = fuse_gpu::serial();
    let Some(pve) = homelab("nvidia") else { return };
    let r = pve.hook(141, "pre-start");
    assert_eq!(r.code, 0, "{}", r.output);
    pve.sim.assert_on_vfio();
    pve.running(141);
    assert_eq!(pve.hook(141, "post-start").code, 0);
    assert_eq!(pve.hook(141, "pre-stop").code, 0);
    pve.sim.assert_on_vfio();
    pve.stopped(141);
    let r = pve.hook(141, "post-stop");
    assert_eq!(r.code, 0, "{}", r.output);
    pve.sim.assert_home();
}

#[test]
fn pre_start_refuses_while_a_process_holds_the_host_driver_gpu_and_names_it() {
    let _serial = fuse_gpu::serial();
    let Some(pve) = homelab("nvidia") else { return };
    let holder = hold(&pve.sim.dev("nvidia0"));
    let r = pve.hook(140, "pre-start");
    assert_eq!(r.code, 1, "{}", r.output);
    assert!(r.output.contains("nvidia0"), "{}", r.output);
    assert!(r.output.contains(&format!("{}", holder.pid())), "{}", r.output);
    assert_eq!(pve.sim.short_log(), vec![], "nothing was unbound under a holder");
    pve.sim.assert_home();
}

#[test]
fn with_the_card_kept_on_vfio_pci_the_second_vm_is_refused_while_the_first_runs() {
    let _serial = fuse_gpu::serial();
    let Some(pve) = homelab("vfio-pci") else { return };
    // The first start takes the card off the host driver once.
    let r = pve.hook(140, "pre-start");
    assert_eq!(r.code, 0, "{}", r.output);
    pve.sim.assert_on_vfio();
    pve.running(140);
    pve.sim.clear_log();

    let r = pve.hook(141, "pre-start");
    assert_eq!(r.code, 1, "{}", r.output);
    assert!(
        r.output
            .contains("GPU 0000:01:00.0 is passed through to Windows 11 (VM 140), which is running"),
        "{}",
        r.output
    );
    assert!(r.output.contains("`handoff switch 141`"), "{}", r.output);
    assert_eq!(pve.sim.short_log(), vec![], "a refusal changes nothing");

    // 140 shuts down: the card stays on vfio-pci, which is normal, and 141 may start.
    pve.stopped(140);
    let r = pve.hook(140, "post-stop");
    assert_eq!((r.code, r.output.as_str()), (0, ""));
    pve.sim.assert_on_vfio();
    let r = pve.hook(141, "pre-start");
    assert_eq!((r.code, r.output.as_str()), (0, ""));
    assert_eq!(pve.sim.short_log(), vec![], "nothing is rebound between VMs");
}

/// The bar block on the node, one-shot, in waybar's JSON: it asks no API, so what it says
/// comes from sysfs and the hookscript's state file.
fn block(pve: &PveHost) -> serde_json::Value {
    let dir = Path::new(env!("CARGO_BIN_EXE_handoff")).parent().unwrap();
    let exe = bins::sibling(dir, "handoff-block", "handoff-block", &["src", "i3blocks/src"]);
    let out = Command::new(exe)
        .args(["--format", "waybar", "--config"])
        .arg(&pve.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Issue 14 on the node with the seed's set-up (`host_driver = "vfio-pci"`): between VMs the
/// card is free on vfio-pci, with a VM it is that VM's, and the block (which asks nothing)
/// says so because the hookscript rewrites the GPU's state file at pre-start and post-stop,
/// as the libvirt hook does.
#[test]
fn on_the_node_the_block_follows_the_hookscript_between_vms_on_vfio_pci() {
    let _serial = fuse_gpu::serial();
    let Some(pve) = homelab_with(
        &format!(
            "[gpu]\naddress = \"{GPU}\"\nhost_driver = \"vfio-pci\"\nlabel = \"RTX 5070 Ti\"\nwatchdog_s = 2\n"
        ),
        "",
    ) else {
        return;
    };
    let tip = |v: &serde_json::Value| v["tooltip"].as_str().unwrap_or_default().to_owned();
    // The first start takes the card off the host driver once (the seed's node boots it
    // on vfio-pci already).
    let r = pve.hook(140, "pre-start");
    assert_eq!(r.code, 0, "{}", r.output);
    pve.running(140);
    pve.sim.clear_log();
    let v = block(&pve);
    assert_eq!(v["text"], "GPU: Windows 11 (VM 140)", "{v}");
    assert_eq!(v["class"], "vm", "{v}");
    assert!(tip(&v).contains("RTX 5070 Ti: Windows 11 (VM 140)"), "{v}");

    // 140 stopped, 141 not started yet: the card rests on vfio-pci, free.
    pve.stopped(140);
    let r = pve.hook(140, "post-stop");
    assert_eq!((r.code, r.output.as_str()), (0, ""));
    pve.sim.assert_on_vfio();
    let v = block(&pve);
    assert_eq!(v["text"], "GPU: free on vfio-pci", "{v}");
    assert_eq!(v["class"], "linux", "{v}");
    assert!(tip(&v).contains("RTX 5070 Ti: free on vfio-pci"), "{v}");

    let r = pve.hook(141, "pre-start");
    assert_eq!((r.code, r.output.as_str()), (0, ""));
    pve.running(141);
    let v = block(&pve);
    assert_eq!(v["text"], "GPU: Linux AI (VM 141)", "{v}");
    assert!(tip(&v).contains("RTX 5070 Ti: Linux AI (VM 141)"), "{v}");

    // A refused start of 140 and PVE's post-stop after it leave 141's state alone.
    assert_eq!(pve.hook(140, "pre-start").code, 1);
    assert_eq!(pve.hook(140, "post-stop").code, 0);
    assert_eq!(block(&pve)["text"], "GPU: Linux AI (VM 141)");

    pve.stopped(141);
    assert_eq!(pve.hook(141, "post-stop").code, 0);
    assert_eq!(block(&pve)["text"], "GPU: free on vfio-pci");
    assert_eq!(pve.sim.short_log(), vec![], "nothing is rebound between VMs");
}

#[test]
fn a_vm_without_the_gpu_is_left_alone() {
    let _serial = fuse_gpu::serial();
    let Some(pve) = homelab("nvidia") else { return };
    pve.running(140);
    let r = pve.hook(130, "pre-start");
    assert_eq!((r.code, r.output.as_str()), (0, ""));
    assert_eq!(pve.sim.short_log(), vec![]);
}

#[test]
fn a_backup_of_the_stopped_vm_while_the_other_has_the_gpu_is_refused_saying_why() {
    let _serial = fuse_gpu::serial();
    let Some(pve) = homelab("vfio-pci") else { return };
    assert_eq!(pve.hook(140, "pre-start").code, 0);
    pve.running(140);
    pve.sim.clear_log();
    // vzdump sets the backup lock, then starts 141 paused to read its disks.
    let conf = pve.root.join("etc/pve/qemu-server/141.conf");
    let text = fs::read_to_string(&conf).unwrap();
    fs::write(
        &conf,
        text.replace("machine: q35\n", "lock: backup\nmachine: q35\n"),
    )
    .unwrap();
    let r = pve.hook(141, "pre-start");
    assert_eq!(r.code, 1, "{}", r.output);
    assert!(
        r.output.contains("not starting Linux AI (VM 141) for its backup"),
        "{}",
        r.output
    );
    assert!(
        r.output.contains("Windows 11 (VM 140), which is running"),
        "{}",
        r.output
    );
    assert_eq!(pve.sim.short_log(), vec![], "the running VM keeps its GPU");
}

#[test]
fn a_start_before_the_previous_vms_late_post_stop_takes_the_gpu_over_cleanly() {
    let _serial = fuse_gpu::serial();
    let Some(pve) = homelab("nvidia") else { return };
    assert_eq!(pve.hook(140, "pre-start").code, 0);
    pve.sim.assert_on_vfio();
    // 140 shut down from inside Windows: QEMU is gone, its post-stop not run yet.
    pve.stopped(140);
    let r = pve.hook(141, "pre-start");
    assert_eq!(r.code, 0, "{}", r.output);
    pve.sim.assert_on_vfio();
    pve.running(141);
    // The late post-stop of 140 leaves 141's GPU alone.
    let r = pve.hook(140, "post-stop");
    assert_eq!(r.code, 0, "{}", r.output);
    pve.sim.assert_on_vfio();
    pve.stopped(141);
    let r = pve.hook(141, "post-stop");
    assert_eq!(r.code, 0, "{}", r.output);
    pve.sim.assert_home();
}

/// Seed 002 with both GPUs configured: the RTX (on `nvidia` here, so that a handoff is
/// seen) for 140 and 141, the iGPU (`i915`, the node is headless) for the macOS VM 130.
fn two_gpus() -> Option<PveHost> {
    let pve = homelab_with(
        &format!(
            "[[gpu]]\naddress = \"{GPU}\"\nlabel = \"RTX 5070 Ti\"\nhost_driver = \"nvidia\"\nwatchdog_s = 2\n\n\
             [[gpu]]\naddress = \"{IGPU}\"\nlabel = \"UHD 630\"\nhost_driver = \"i915\"\nallow_display = true\nwatchdog_s = 2\n"
        ),
        "[[vm]]\nvmid = 130\nname = \"macos\"\nlabel = \"macOS\"\n\n",
    )?;
    let qs = pve.root.join("etc/pve/qemu-server");
    // 130 also passes a NIC through that no [[gpu]] names; 142 takes both GPUs.
    fs::write(
        qs.join("130.conf"),
        "hostpci0: 0000:00:02.0\nhostpci1: 0000:03:00.0\nname: macos\n",
    )
    .unwrap();
    fs::write(
        qs.join("142.conf"),
        "hostpci0: 0000:01:00,pcie=1\nhostpci1: 0000:00:02.0\nname: both\n",
    )
    .unwrap();
    Some(pve)
}

const IGPU: &str = "0000:00:02.0";

#[test]
fn with_several_gpus_each_vm_takes_the_configured_gpus_its_hostpci_names() {
    let _serial = fuse_gpu::serial();
    let Some(pve) = two_gpus() else { return };
    // macOS takes the iGPU only; the RTX stays on the host, the NIC is PVE's business.
    let r = pve.hook(130, "pre-start");
    assert_eq!(r.code, 0, "{}", r.output);
    assert_eq!(pve.sim.driver(IGPU).as_deref(), Some("vfio-pci"));
    pve.sim.assert_home();
    assert!(
        !pve.sim.short_log().iter().any(|(f, _)| f.contains("0000:03:00")),
        "the device no [[gpu]] names was touched: {:?}",
        pve.sim.short_log()
    );
    pve.running(130);
    // Windows takes the RTX while macOS keeps the iGPU: two GPUs, two VMs.
    let r = pve.hook(140, "pre-start");
    assert_eq!(r.code, 0, "{}", r.output);
    pve.sim.assert_on_vfio();
    assert_eq!(pve.sim.driver(IGPU).as_deref(), Some("vfio-pci"));
    pve.running(140);
    // macOS stops: its iGPU comes home, Windows keeps the RTX.
    pve.stopped(130);
    let r = pve.hook(130, "post-stop");
    assert_eq!(r.code, 0, "{}", r.output);
    assert_eq!(pve.sim.driver(IGPU).as_deref(), Some("i915"));
    pve.sim.assert_on_vfio();
    pve.stopped(140);
    let r = pve.hook(140, "post-stop");
    assert_eq!(r.code, 0, "{}", r.output);
    pve.sim.assert_home();
}

#[test]
fn with_several_gpus_a_vm_gets_all_of_its_gpus_or_none() {
    let _serial = fuse_gpu::serial();
    let Some(pve) = two_gpus() else { return };
    // Something holds the RTX: 142 (RTX and iGPU) is refused, and the iGPU, bound first
    // (address order), goes back.
    let holder = hold(&pve.sim.dev("nvidia0"));
    let r = pve.hook(142, "pre-start");
    assert_eq!(r.code, 1, "{}", r.output);
    assert!(r.output.contains(&holder.pid().to_string()), "{}", r.output);
    assert!(
        r.output
            .contains("GPU 0000:00:02.0 was returned to the host: 142 gets all of its GPUs or none"),
        "{}",
        r.output
    );
    assert_eq!(pve.sim.driver(IGPU).as_deref(), Some("i915"), "{}", r.output);
    pve.sim.assert_home();
    drop(holder);
    // While macOS runs with the iGPU, 142 is refused naming the GPU they share.
    assert_eq!(pve.hook(130, "pre-start").code, 0);
    pve.running(130);
    let r = pve.hook(142, "pre-start");
    assert_eq!(r.code, 1, "{}", r.output);
    assert!(
        r.output
            .contains("GPU 0000:00:02.0 is passed through to macOS (VM 130), which is running"),
        "{}",
        r.output
    );
    pve.sim.assert_home();
}

/// The checks per kind of GPU, in `pre-start`'s output (PVE's task log) as warnings that do
/// not stop the start: the macOS VM 130 (Apple's SMC in `args`) on the iGPU without
/// PVE's legacy IGD mode, OpRegion or GOP ROM is told what its config lacks; a macOS VM given
/// the RTX (newer than Kepler) that macOS has no driver for it. Windows (142, both GPUs, the
/// iGPU set up as PVE wants it) hears neither.
#[test]
fn pre_start_warns_what_an_igpu_vm_lacks_and_that_macos_has_no_nvidia_driver() {
    let _serial = fuse_gpu::serial();
    let Some(pve) = two_gpus() else { return };
    let qs = pve.root.join("etc/pve/qemu-server");
    fs::write(
        qs.join("130.conf"),
        "args: -device isa-applesmc,osk=OSK -smbios type=2\nbios: ovmf\nhostpci0: 0000:00:02.0\nname: macos\nostype: other\nvga: none\n",
    )
    .unwrap();
    let r = pve.hook(130, "pre-start");
    assert_eq!(r.code, 0, "a warning, not a refusal: {}", r.output);
    assert!(
        r.output.contains(
            "handoff: warning: macOS (VM 130) takes the Intel iGPU 0000:00:02.0, but its IGD OpRegion is not turned on: \
             neither legacy-igd=1 on hostpci0 (PVE's legacy IGD mode) nor `-set device.hostpci0.x-igd-opregion=on` in args"
        ),
        "{}",
        r.output
    );
    assert!(
        r.output
            .contains("hostpci0 has no romfile=: a UEFI guest (bios: ovmf) needs the iGPU's GOP ROM"),
        "{}",
        r.output
    );
    assert!(!r.output.contains("macOS has no driver"), "{}", r.output);
    assert_eq!(pve.sim.driver(IGPU).as_deref(), Some("vfio-pci"));
    assert_eq!(pve.hook(130, "post-stop").code, 0);
    assert_eq!(pve.sim.driver(IGPU).as_deref(), Some("i915"));

    // A macOS VM given the RTX.
    fs::write(
        qs.join("131.conf"),
        "args: -device isa-applesmc,osk=OSK\nhostpci0: 0000:01:00,pcie=1\nname: hackintosh\nostype: other\n",
    )
    .unwrap();
    let r = pve.hook(131, "pre-start");
    assert_eq!(r.code, 0, "a warning, not a refusal: {}", r.output);
    assert!(
        r.output
            .contains("handoff: warning: hackintosh (VM 131) is a macOS VM and GPU 0000:01:00.0 (")
            && r.output
                .contains("is an NVIDIA card newer than Kepler: macOS has no driver for it"),
        "{}",
        r.output
    );
    pve.sim.assert_on_vfio();
    assert_eq!(pve.hook(131, "post-stop").code, 0);
    pve.sim.assert_home();

    // Windows with both, its iGPU in legacy IGD mode with a ROM: nothing to say.
    fs::write(
        qs.join("142.conf"),
        "bios: ovmf\nhostpci0: 0000:01:00\nhostpci1: 0000:00:02.0,legacy-igd=1,romfile=igd.rom\nmachine: pc-i440fx-8.1\nname: both\nostype: win11\nvga: none\n",
    )
    .unwrap();
    let r = pve.hook(142, "pre-start");
    assert_eq!(r.code, 0, "{}", r.output);
    assert!(!r.output.contains("warning"), "{}", r.output);
    assert_eq!(pve.hook(142, "post-stop").code, 0);
    pve.sim.assert_home();
}

/// Issue 16 on the node: each start the hookscript refused is logged in `refusals.json`
/// under `[host] run` as the libvirt hook logs its own — the VM, the holders or the VM that
/// has the GPU, the time — so a tray or block on the node tells it once ([`Unseen`]).
#[test]
fn each_refused_pre_start_is_logged_for_the_surfaces_once_naming_the_holders_or_the_other_vm() {
    use handoff::refusals::{RefusalLog, Unseen};
    let _serial = fuse_gpu::serial();
    let Some(pve) = homelab("nvidia") else { return };
    let host = pve.sim.host();
    let gpu: handoff::pci::PciAddress = GPU.parse().unwrap();
    let mut told = Unseen::start(&host, gpu);

    // A CUDA job on the host driver: 141 is refused, naming it.
    let holder = hold(&pve.sim.dev("nvidia0"));
    let r = pve.hook(141, "pre-start");
    assert_eq!(r.code, 1, "{}", r.output);
    drop(holder);
    let news = told.take(&host);
    assert_eq!(news.len(), 1, "{news:?}");
    assert_eq!(news[0].vm, "linux-ai");
    assert!(
        news[0]
            .holders
            .iter()
            .any(|h| h.paths.iter().any(|p| p.ends_with("nvidia0"))),
        "{news:?}"
    );
    assert!(told.take(&host).is_empty(), "told once");

    // 140 takes the card; 141's start is refused because 140 runs: the other VM is named.
    assert_eq!(pve.hook(140, "pre-start").code, 0);
    pve.running(140);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let r = pve.hook(141, "pre-start");
    assert_eq!(r.code, 1, "{}", r.output);
    let news = told.take(&host);
    assert_eq!(news.len(), 1, "{news:?}");
    assert_eq!(news[0].vm, "linux-ai");
    assert!(news[0].holders.is_empty());
    assert!(
        news[0]
            .message
            .starts_with("not starting Linux AI (VM 141): GPU 0000:01:00.0 is passed through to Windows 11 (VM 140), which is running"),
        "{}",
        news[0].message
    );
    assert!(news[0].at >= before, "{news:?}");
    // The state file's last refusal (the details window's "Last refused start") says it too,
    // and 140 still has the card.
    let state = handoff::state::HookState::load_gpu(&host, gpu).unwrap();
    assert!(
        state.vm.is_some() && state.vm.as_deref() != Some("linux-ai"),
        "{state:?}"
    );
    assert_eq!(
        state.last_refusal.as_ref().map(|r| r.vm.as_str()),
        Some("linux-ai")
    );
    // A restarted surface does not tell it again.
    assert!(Unseen::start(&host, gpu).take(&host).is_empty());
    assert_eq!(RefusalLog::read(&host).unwrap().unwrap().refusals.len(), 2);
}
