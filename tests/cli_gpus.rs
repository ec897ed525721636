//! `handoff status`, `blockers`, `config check` and `doctor`'s VM checks with several GPUs
//! (issue 15), against the simulated workstation (its RTX 3090 Ti and its Intel iGPU, the
//! boot VGA device), the real `/proc` (holders are real child processes) and libvirt's
//! in-process `test:///default` driver. Each test has its own temp dir and config
//! (`HANDOFF_CONFIG`); `HOME` points into it.

use handoff_test_support::bins::Run;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use handoff::config::{Config, VmConfig};
use handoff::doctor::{self, Level};
use handoff::hypervisor::Description;
use handoff::simulated_tree::{SimHost, SimSpec};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_handoff");
const IGPU: &str = "0000:00:02.0";
const RTX: &str = "0000:01:00.0";

struct Machine {
    tmp: tempfile::TempDir,
    sim: SimHost,
}

/// The workstation with `[[gpu]]` iGPU (labelled "iGPU") and RTX (labelled "RTX",
/// primary), one VM `test` at libvirt's test driver.
fn machine() -> Machine {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimHost::build(&tmp.path().join("root"), &SimSpec::workstation()).unwrap();
    fs::create_dir_all(tmp.path().join("home")).unwrap();
    let text = format!(
        "[[gpu]]\naddress = \"{IGPU}\"\nlabel = \"iGPU\"\nhost_driver = \"i915\"\n\n\
         [[gpu]]\naddress = \"{RTX}\"\nlabel = \"RTX\"\nhost_driver = \"nvidia\"\nprimary = true\n\n\
         [[vm]]\nname = \"test\"\nuri = \"test:///default\"\n\n\
         [host]\nsysfs = \"{}\"\nproc = \"/proc\"\ndev = \"{}\"\nrun = \"{}\"\nuninspectable_ok = {:?}\n",
        sim.sysfs().display(),
        sim.dev().display(),
        sim.run().display(),
        handoff::holders::uninspectable_now(Path::new("/proc"))
    );
    let m = Machine { tmp, sim };
    fs::write(m.config(), text).unwrap();
    m
}

impl Machine {
    fn config(&self) -> PathBuf {
        self.tmp.path().join("config.toml")
    }

    fn run(&self, args: &[&str]) -> Run {
        let home = self.tmp.path().join("home");
        let out = Command::new(BIN)
            .args(args)
            .env("HANDOFF_CONFIG", self.config())
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_RUNTIME_DIR", &home)
            .output()
            .unwrap();
        Run::from_output(out, None)
    }

    /// `sleep` holding the RTX's `nvidia0`, killed on drop.
    fn hold_rtx(&self) -> Held {
        Held(
            Command::new("sleep")
                .arg("600")
                .stdin(File::open(self.sim.dev().join("nvidia0")).unwrap())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn status_json_lists_every_gpu_with_its_own_verdict_and_narrows_to_one() {
    let m = machine();
    let holder = m.hold_rtx();
    let r = m.run(&["status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["schema"], 2);
    let gpus = v["gpus"].as_array().unwrap();
    let listed: Vec<(&str, &str, bool)> = gpus
        .iter()
        .map(|g| {
            (
                g["gpu"]["address"].as_str().unwrap(),
                g["label"].as_str().unwrap(),
                g["primary"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed, [(IGPU, "iGPU", false), (RTX, "RTX", true)]);
    // The verdict is per GPU: the held RTX is busy, the iGPU idle.
    assert_eq!(gpus[0]["verdict"]["state"], "idle", "{}", gpus[0]["verdict"]);
    assert_eq!(gpus[0]["gpu"]["driver"], "i915");
    assert_eq!(gpus[1]["verdict"]["state"], "busy", "{}", gpus[1]["verdict"]);
    assert_eq!(gpus[1]["gpu"]["blockers"][0]["pid"], holder.0.id());
    // The fields of schema 1 stay: the primary GPU.
    assert_eq!(v["gpu"]["address"], RTX);
    assert_eq!(v["verdict"]["state"], "busy");
    assert_eq!(v["vms"][0]["name"], "test");

    for name in ["iGPU", "00:02.0", IGPU] {
        let v = m.run(&["status", name, "--json"]).json();
        assert_eq!(v["gpu"]["address"], IGPU, "status {name}");
        assert_eq!(v["gpus"].as_array().unwrap().len(), 1, "status {name}");
        assert_eq!(v["verdict"]["state"], "idle", "status {name}");
    }

    let text = m.run(&["status"]);
    assert_eq!(text.code, 0);
    assert!(
        text.stdout.starts_with("== GPU 0000:00:02.0 iGPU ==\n"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("\n== GPU 0000:01:00.0 RTX ==\n"),
        "{}",
        text.stdout
    );
    assert_eq!(
        text.stdout.matches("\nVMs:\n").count(),
        1,
        "VMs said once: {}",
        text.stdout
    );

    let wrong = m.run(&["status", "RTX 9999"]);
    assert_eq!(wrong.code, 2);
    assert!(
        wrong
            .stderr
            .contains("no [[gpu]] is \"RTX 9999\": name one by its address or label (0000:00:02.0 or \"iGPU\", 0000:01:00.0 or \"RTX\")"),
        "{}",
        wrong.stderr
    );
}

#[test]
fn blockers_json_lists_both_gpus_and_the_exit_status_is_the_worst() {
    let m = machine();
    let holder = m.hold_rtx();
    let r = m.run(&["blockers", "--json"]);
    assert_eq!(r.code, 1, "something holds the RTX: {}", r.stderr);
    let v = r.json();
    assert_eq!(v["schema"], 2);
    let gpus = v["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(
        (gpus[0]["address"].as_str(), gpus[0]["verdict"].as_str()),
        (Some(IGPU), Some("clear"))
    );
    assert_eq!(
        (gpus[1]["address"].as_str(), gpus[1]["verdict"].as_str()),
        (Some(RTX), Some("held"))
    );
    assert_eq!(gpus[1]["holders"][0]["pid"], holder.0.id());
    // Schema 1's fields: the primary GPU's scan.
    assert_eq!(v["verdict"], "held");

    let igpu = m.run(&["blockers", "iGPU", "--json"]);
    assert_eq!(igpu.code, 0, "the iGPU alone is clear: {}", igpu.stdout);
    assert_eq!(igpu.json()["gpus"].as_array().unwrap().len(), 1);
    let text = m.run(&["blockers", "iGPU"]);
    assert_eq!(
        text.stdout,
        "Nothing holds GPU 0000:00:02.0 (3 device nodes checked).\n"
    );
    drop(holder);
    assert_eq!(m.run(&["blockers"]).code, 0);
}

/// The homelab's macOS VM as libvirt would give it: the iGPU, no ROM, no OpRegion; and
/// a macOS VM given the RTX, with a NIC no `[[gpu]]` names.
fn definitions(vm: &VmConfig) -> Result<Description, String> {
    xml_definitions(vm).map(|definition| Description {
        passthrough: Vec::new(),
        looking_glass: None,
        definition,
    })
}

fn xml_definitions(vm: &VmConfig) -> Result<String, String> {
    let hostdev = |bus: u8, slot: u8, function: u8| {
        format!(
            "<hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x{bus:02x}' \
             slot='0x{slot:02x}' function='0x{function:x}'/></source></hostdev>"
        )
    };
    let macos = "<metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>\
                 <libosinfo:os id='http://apple.com/macos/14'/></libosinfo:libosinfo></metadata>";
    match vm.name.as_str() {
        "macos" => Ok(format!(
            "<domain><name>macos</name>{macos}<devices>{}</devices></domain>",
            hostdev(0, 2, 0)
        )),
        "hackintosh" => Ok(format!(
            "<domain><name>hackintosh</name>{macos}<devices>{}{}{}</devices></domain>",
            hostdev(1, 0, 0),
            hostdev(1, 0, 1),
            hostdev(5, 0, 0)
        )),
        _ => Err("no such domain".into()),
    }
}

#[test]
fn doctor_reads_the_vms_definitions_for_unnamed_devices_macos_and_the_igpu() {
    let m = machine();
    let mut cfg = Config::load_file(&m.config()).unwrap();
    cfg.vms = vec![
        VmConfig::named("macos", "macOS"),
        VmConfig::named("hackintosh", "Hack"),
    ];
    let checks = doctor::vm_definition_checks(&cfg, &mut definitions);
    let said: Vec<(&str, Level, &str)> = checks
        .iter()
        .map(|c| (c.id, c.level, c.summary.as_str()))
        .collect();
    assert_eq!(said.len(), 3, "{said:#?}");
    assert_eq!(said[0].0, "igpu-vm");
    assert!(
        said[0].2.contains(
            "VM macos takes the Intel iGPU 0000:00:02.0, but its <hostdev> for 0000:00:02.0 has no <rom file="
        ),
        "{said:#?}"
    );
    assert!(said[0].2.contains("x-igd-opregion=on"), "{said:#?}");
    assert_eq!((said[1].0, said[1].1), ("vm-unnamed-device", Level::Info));
    assert!(
        said[1]
            .2
            .contains("VM hackintosh passes through 0000:05:00.0, which no [[gpu]] names"),
        "{said:#?}"
    );
    assert_eq!((said[2].0, said[2].1), ("macos-nvidia", Level::Warn));
    assert!(
        said[2]
            .2
            .contains("hackintosh is a macOS VM and GPU 0000:01:00.0"),
        "{said:#?}"
    );
    assert!(said[2].2.contains("macOS has no driver for it"), "{said:#?}");

    // The host side: the iGPU drives this host's desktop (boot VGA).
    let gpus = doctor::several_gpus_checks(&cfg);
    let display: Vec<&doctor::Check> = gpus.iter().filter(|c| c.id == "display-gpu").collect();
    assert_eq!(display.len(), 1, "{gpus:#?}");
    assert_eq!(display[0].level, Level::Warn);
    assert!(
        display[0]
            .summary
            .contains("GPU 0000:00:02.0 drives the desktop of this host")
            && display[0].summary.contains("the hook refuses to hand it"),
        "{:?}",
        display[0]
    );
    assert!(
        display[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("no console on a screen and no local desktop")
    );
}

/// Proxmox VE VMs as `handoff-pve` describes them (the config's `key: value` lines, the
/// `hostpciN` devices resolved): the homelab's macOS VM 130 on the iGPU without legacy-igd,
/// OpRegion or GOP ROM; 131, a macOS VM (Apple's SMC in `args`) given the RTX; 140, Windows
/// with the RTX and an iGPU set up as PVE wants it.
fn pve_definitions(vm: &VmConfig) -> Result<Description, String> {
    let rtx = handoff::simulated_tree::RTX_3090_TI;
    let igpu = handoff::simulated_tree::IGPU;
    let (definition, passthrough) = match vm.vmid {
        Some(130) => (
            "name: macos\nbios: ovmf\nostype: other\nargs: -device isa-applesmc,osk=OSK -smbios type=2\n\
             vga: none\nhostpci0: 0000:00:02.0\n",
            vec![igpu],
        ),
        Some(131) => (
            "name: hackintosh\nostype: other\nargs: -device isa-applesmc,osk=OSK\nhostpci0: 0000:01:00,pcie=1\n",
            vec![rtx, rtx.with_function(1)],
        ),
        Some(140) => (
            "name: win11\nbios: ovmf\nostype: win11\nvga: none\nmachine: pc-i440fx-8.1\n\
             hostpci0: 0000:00:02.0,legacy-igd=1,romfile=igd.rom\nhostpci1: 0000:01:00\n",
            vec![igpu, rtx, rtx.with_function(1)],
        ),
        _ => return Err("no such VM".into()),
    };
    Ok(Description {
        passthrough,
        looking_glass: None,
        definition: definition.to_owned(),
    })
}

#[test]
fn doctor_reads_pve_vm_configs_for_what_the_igpu_needs_and_macos_on_nvidia() {
    let m = machine();
    let mut cfg = Config::load_file(&m.config()).unwrap();
    let pve = |name: &str, vmid: u32| {
        let mut v = VmConfig::named(name, name);
        v.vmid = Some(vmid);
        v
    };
    cfg.vms = vec![pve("macos", 130), pve("hackintosh", 131), pve("win11", 140)];
    let checks = doctor::vm_definition_checks(&cfg, &mut pve_definitions);
    let said: Vec<(&str, Level, &str)> = checks
        .iter()
        .map(|c| (c.id, c.level, c.summary.as_str()))
        .collect();
    assert_eq!(said.len(), 2, "win11 has everything; {said:#?}");
    assert_eq!((said[0].0, said[0].1), ("igpu-vm", Level::Warn));
    assert!(
        said[0].2.starts_with(
            "VM macos takes the Intel iGPU 0000:00:02.0, but its IGD OpRegion is not turned on: \
             neither legacy-igd=1 on hostpci0"
        ),
        "{said:#?}"
    );
    assert!(
        said[0]
            .2
            .contains("hostpci0 has no romfile=: a UEFI guest (bios: ovmf)"),
        "{said:#?}"
    );
    assert!(
        checks[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("/etc/pve/qemu-server/130.conf"),
        "{:?}",
        checks[0]
    );
    assert_eq!((said[1].0, said[1].1), ("macos-nvidia", Level::Warn));
    assert!(
        said[1]
            .2
            .starts_with("hackintosh is a macOS VM and GPU 0000:01:00.0"),
        "{said:#?}"
    );
    assert!(said[1].2.contains("macOS has no driver for it"), "{said:#?}");
}

#[test]
fn the_two_gpu_scene_shows_the_igpu_in_the_macos_vm_and_the_rtx_on_linux() {
    let tmp = tempfile::tempdir().unwrap();
    let scene = handoff::scenes::Scene::put(tmp.path(), "macOS has the iGPU").unwrap();
    let home = tmp.path().join("home");
    let out = Command::new(BIN)
        .args(["status", "--json"])
        .env("HANDOFF_CONFIG", &scene.config)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gpus = v["gpus"].as_array().unwrap();
    assert_eq!(gpus[0]["gpu"]["address"], IGPU);
    assert_eq!(gpus[0]["gpu"]["vm"], "test", "{}", gpus[0]);
    assert_eq!(gpus[0]["verdict"]["state"], "in_vm", "{}", gpus[0]["verdict"]);
    assert_eq!(gpus[1]["gpu"]["address"], RTX);
    assert_eq!(gpus[1]["gpu"]["owner"], "host");
    assert_eq!(
        gpus[1]["gpu"]["vm"],
        Value::Null,
        "the RTX is not with the macOS VM"
    );
}

#[test]
fn config_check_and_doctor_read_the_vms_definitions_from_libvirt() {
    let m = machine();
    let node = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/libvirt/three-vms-two-gpus-node.xml"
    );
    let text = fs::read_to_string(m.config()).unwrap().replace(
        "[[vm]]\nname = \"test\"\nuri = \"test:///default\"\n",
        &format!("[[vm]]\nname = \"macos\"\nuri = \"test://{node}\"\n\n[[vm]]\nname = \"hackintosh\"\nuri = \"test://{node}\"\n"),
    );
    fs::write(m.config(), text).unwrap();
    let r = m.run(&["config", "check"]);
    assert_eq!(r.code, 0, "notes, not a failure: {}{}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines[0].ends_with(": ok (2 VM(s), GPUs 0000:00:02.0, 0000:01:00.0)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("[warn] VM macos takes the Intel iGPU 0000:00:02.0, but"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("[info] VM hackintosh passes through 0000:05:00.0, which no [[gpu]] names"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("[warn] hackintosh is a macOS VM and GPU 0000:01:00.0"),
        "{}",
        r.stdout
    );

    let hooks = m.tmp.path().join("hooks");
    let d = m.run(&["doctor", "--hooks-dir", hooks.to_str().unwrap()]);
    for says in [
        "VM hackintosh passes through 0000:05:00.0",
        "hackintosh is a macOS VM",
        "GPU 0000:00:02.0 drives the desktop of this host",
    ] {
        assert!(
            d.stdout.contains(says),
            "doctor should say {says:?}:\n{}",
            d.stdout
        );
    }
}

#[test]
fn doctor_says_to_restore_a_stuck_second_gpu_with_its_address() {
    let m = machine();
    let cfg = Config::load_file(&m.config()).unwrap();
    let igpu: handoff::pci::PciAddress = IGPU.parse().unwrap();
    handoff::verdict::HookFiles::default()
        .with_record(igpu, "stuck", Some("macos"), Some("a write to unbind hung"))
        .save_gpu(&cfg.host, false)
        .unwrap();
    let checks = doctor::several_gpus_checks(&cfg);
    let restore = checks
        .iter()
        .find(|c| c.id == "restore")
        .unwrap_or_else(|| panic!("{checks:#?}"));
    assert_eq!(restore.level, Level::Fail);
    assert!(
        restore.summary.contains("Restore required for GPU 0000:00:02.0"),
        "{restore:?}"
    );
    assert!(
        restore
            .fix
            .as_deref()
            .unwrap()
            .contains("`handoff rebind --force --gpu 0000:00:02.0`"),
        "{restore:?}"
    );
}

/// `handoff start --gpu GPU` (what the bar block's right click runs) starts the first
/// `[[vm]]` whose definition passes that GPU through, read from libvirt (the test driver's
/// `three-vms-two-gpus-node.xml`: `win11` and `ai` the RTX, `macos` the iGPU, all off),
/// and says so when no VM takes it or no GPU is called that.
#[test]
fn start_by_gpu_starts_the_first_vm_whose_definition_passes_it_through() {
    let m = machine();
    let node = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/libvirt/three-vms-two-gpus-node.xml"
    );
    let vms = |names: &[&str]| -> String {
        names
            .iter()
            .map(|n| format!("[[vm]]\nname = \"{n}\"\nuri = \"test://{node}\"\n\n"))
            .collect()
    };
    let base = fs::read_to_string(m.config())
        .unwrap()
        .replace("label = \"iGPU\"\n", "label = \"iGPU\"\nallow_display = true\n");
    let with = |names: &[&str]| {
        fs::write(
            m.config(),
            base.replace(
                "[[vm]]\nname = \"test\"\nuri = \"test:///default\"\n\n",
                &vms(names),
            ),
        )
        .unwrap()
    };
    with(&["win11", "ai", "macos"]);
    for (gpu, vm) in [("iGPU", "macos"), (IGPU, "macos"), ("RTX", "win11")] {
        let r = m.run(&["start", "--gpu", gpu, "--json", "-q"]);
        assert_eq!(r.code, 0, "{gpu}: {}{}", r.stdout, r.stderr);
        let j: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(j["vm"], vm, "{gpu}: {j}");
    }
    let r = m.run(&["start", "--gpu", "Radeon"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("no [[gpu]] is \"Radeon\""), "{}", r.stderr);
    let r = m.run(&["start", "win11", "--gpu", "RTX"]);
    assert_eq!(r.code, 2, "a VM or a GPU, not both: {}", r.stderr);

    // Only VMs on the RTX: nothing takes the iGPU, and it says how to fix that.
    with(&["win11", "ai"]);
    let r = m.run(&["start", "--gpu", "iGPU"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("no [[vm]] takes GPU iGPU (0000:00:02.0): none of their definitions passes it through"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("Starting"), "{}", r.stderr);
}
