//! The `handoff` CLI with Proxmox VE VMs, against fakepve on loopback: `handoff status
//! --json` and `handoff switch` as a person runs them (the CLI reaches PVE through
//! `handoff-pve` over a pipe, so the CLI itself links no TLS).

use std::path::{Path, PathBuf};
use std::process::Command;

use handoff_test_support::bins;
use handoff_test_support::fakepve::{self, FakePve};
use serde_json::{Value, json};

const TOKEN: &str = "handoff@pve!desk";
const SECRET: &str = "0b7e9d0c-3f55-4a65-8d7e-1f1f2b3c4d5e";

fn handoff() -> PathBuf {
    let beside = Path::new(env!("CARGO_BIN_EXE_handoff-pve"))
        .parent()
        .unwrap()
        .to_owned();
    bins::sibling(&beside, "handoff", "handoff", &["src"])
}

fn setup() -> Option<(FakePve, PathBuf)> {
    setup_with(|_| {})
}

/// [`setup`] with the fakepve scenario changed first.
fn setup_with(changes: impl FnOnce(&mut Value)) -> Option<(FakePve, PathBuf)> {
    let vm = |id: u32, name: &str, status: &str| json!({"vmid": id, "name": name, "status": status, "config": {"hostpci0": "0000:01:00,pcie=1", "cores": 8, "memory": 16384}});
    // Windows has run for 2 h 3 min 4 s and its guest agent answers (fakepve's addresses).
    let mut win11 = vm(140, "win11", "running");
    win11["stats"] = json!({"uptime": 7384});
    // Looking Glass the way its docs set it up on PVE: raw QEMU args.
    win11["config"]["args"] = json!(
        "-device ivshmem-plain,memdev=ivshmem,bus=pcie.0 -object memory-backend-file,id=ivshmem,share=on,mem-path=/dev/shm/looking-glass,size=32M"
    );
    win11["agent"] = json!({});
    let mut scenario = json!({
        "tokens": {TOKEN: SECRET},
        "guests": [win11, vm(141, "linux-ai", "stopped")],
    });
    changes(&mut scenario);
    let pve = FakePve::start(&scenario)?;
    let dir = pve.dir().to_owned();
    let config = handoff_test_support::fakepve::desktop_config(
        &dir,
        (&pve.url, &pve.fingerprint),
        (TOKEN, SECRET),
        "",
        "[[vm]]\nvmid = 140\nlabel = \"Windows 11\"\nshutdown_timeout_s = 30\n\n\
         [[vm]]\nvmid = 141\nname = \"linux-ai\"\nlabel = \"Linux AI\"\n",
    );
    Some((pve, config))
}

/// `handoff __agent` (what the tray runs) on `config`, and its stdout's lines as they come.
fn agent(
    config: &Path,
) -> (
    handoff_test_support::process::Group,
    std::sync::mpsc::Receiver<String>,
) {
    let mut g = handoff_test_support::process::Group::spawn(
        Command::new(handoff())
            .arg("--config")
            .arg(config)
            .arg("__agent")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped()),
    );
    let rx = handoff_test_support::process::stdout_lines(&mut g.0, Some);
    (g, rx)
}

/// `config`'s `[proxmox]` polled every second, so that a test hears a change within one.
fn poll_every_second(config: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        text.replace("fingerprint =", "poll_interval_s = 1\nfingerprint ="),
    )
    .unwrap();
}

fn run(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(handoff())
        .args(args)
        .env("HANDOFF_CONFIG", config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn states(config: &Path) -> Vec<(String, String)> {
    let (code, out, err) = run(config, &["status", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| {
            (
                vm["name"].as_str().unwrap().to_owned(),
                vm["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn handoff_status_json_lists_the_pve_vms_with_their_states() {
    let Some((pve, config)) = setup() else { return };
    let (_, out, _) = run(&config, &["status", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vms"][0]["label"], "Windows 11", "{v}");
    assert_eq!(v["vms"][0]["uri"], pve.url.as_str(), "{v}");
    assert_eq!(
        states(&config),
        vec![
            ("140".into(), "running".into()),
            ("linux-ai".into(), "shutoff".into())
        ]
    );
    // The desktop has no such GPU; the node's VMs say where it is, in issue 14's words.
    assert_eq!(v["verdict"]["state"], "in_vm", "{v}");
    assert_eq!(v["verdict"]["vm_label"], "Windows 11", "{v}");
    assert_eq!(v["verdict"]["vmid"], 140, "{v}");
    assert_eq!(v["verdict"]["gpu_label"], "RTX 5070 Ti", "{v}");
    assert_eq!(
        v["verdict"]["headline"], "RTX 5070 Ti: Windows 11 (VM 140)",
        "{v}"
    );
    assert_eq!(v["vms"][1]["vmid"], 141, "{v}");
    // Which VMs could take it: the one that is off and whose hostpci0 names its slot.
    assert_eq!(v["gpu"]["candidates"], json!(["linux-ai"]), "{v}");
    assert_eq!(v["gpus"][0]["gpu"]["candidates"], json!(["linux-ai"]), "{v}");
    let (code, text, _) = run(&config, &["status"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("RTX 5070 Ti: Windows 11 (VM 140)\n"), "{text}");
    assert!(text.contains("\nCould take it: Linux AI (VM 141)\n"), "{text}");
}

#[test]
fn handoff_switch_141_and_back_to_140_from_the_command_line() {
    let Some((_pve, config)) = setup() else { return };
    let (code, out, err) = run(&config, &["switch", "141"]);
    assert_eq!(code, 0, "{out}{err}");
    let said = format!("{out}{err}");
    assert!(said.contains("Step 1/2: stop Windows 11 (140)"), "{said}");
    assert!(said.contains("Step 2/2: start Linux AI (linux-ai)"), "{said}");
    assert_eq!(
        states(&config),
        vec![
            ("140".into(), "shutoff".into()),
            ("linux-ai".into(), "running".into())
        ]
    );
    // Now 141 has it and 140 could take it back.
    let (_, text, _) = run(&config, &["status"]);
    assert!(text.starts_with("RTX 5070 Ti: Linux AI (VM 141)\n"), "{text}");
    assert!(text.contains("\nCould take it: Windows 11 (VM 140)\n"), "{text}");
    let (code, out, err) = run(&config, &["switch", "140"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        states(&config),
        vec![
            ("140".into(), "running".into()),
            ("linux-ai".into(), "shutoff".into())
        ]
    );
}

#[test]
fn vm_health_of_a_pve_vm_says_its_uptime_cpus_memory_and_the_guest_agents_address() {
    let Some((_pve, config)) = setup() else { return };
    let (code, out, err) = run(&config, &["vm-health", "140"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("  uptime    2 h 3 min\n"), "{out}");
    assert!(out.contains("  vCPUs     8\n"), "{out}");
    assert!(out.contains("  memory    64 MiB (max 16 GiB)\n"), "{out}");
    assert!(
        out.contains("  IP        192.0.2.10 (eth0, from the guest agent)\n"),
        "{out}"
    );
    // Looking Glass from the VM's args, and where it can run: its file is on the node.
    assert!(
        out.contains(
            "  Looking Glass  shared memory \"looking-glass\", ivshmem-plain, 32 MiB in the VM's args: \
             a file on the Proxmox VE node, so the client runs on the node, not on a desktop\n"
        ),
        "{out}"
    );
    assert!(!out.contains("not read"), "{out}");
    // Off: nothing to say about a guest that does not run, and no agent to ask.
    let (code, out, err) = run(&config, &["vm-health", "linux-ai"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("  uptime    not running\n"), "{out}");
    assert!(out.contains("  IP        unknown\n"), "{out}");
    assert!(
        out.contains("  Looking Glass  none: no ivshmem device in the VM's args."),
        "{out}"
    );
    assert!(!out.contains("not read"), "{out}");
}

#[test]
fn the_handoff_binary_which_is_also_the_root_hookscript_links_no_tls() {
    let contains = |p: &Path, what: &[u8]| std::fs::read(p).unwrap().windows(what.len()).any(|w| w == what);
    let pve_side = Path::new(env!("CARGO_BIN_EXE_handoff-pve"));
    assert!(
        contains(pve_side, b"rustls"),
        "the check can see rustls where it is linked"
    );
    assert!(!contains(&handoff(), b"rustls"), "handoff links rustls");
    assert!(!contains(&handoff(), b"ureq"), "handoff links ureq");
}

#[test]
fn the_trays_agent_sees_a_pve_vm_start_within_the_poll_interval() {
    let Some((_pve, config)) = setup() else { return };
    poll_every_second(&config);
    let (_agent, rx) = agent(&config);
    // Give the agent's first poll time to see 141 off, then start it behind its back.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let cfg = handoff::Config::load_file(&config).unwrap();
    let mut pve = handoff_proxmox::Proxmox::new(&cfg).unwrap();
    use handoff::hypervisor::Hypervisor;
    pve.start(&(&cfg.vms[1]).into()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
            if line.contains("\"change\"") && line.contains("linux-ai") && line.contains("started") {
                return;
            }
            seen.push(line);
        }
    }
    panic!("no change for linux-ai within 10 s; the agent said: {seen:#?}");
}

/// `handoff config check` and `doctor` read each PVE VM's config through the API (`handoff-vm`
/// runs `handoff-pve`) for the checks per kind of GPU, on a node with the simulated
/// workstation's iGPU and RTX: VM 130, macOS on the iGPU with neither PVE's legacy IGD mode
/// nor the OpRegion nor a GOP ROM under OVMF, is told what its config lacks; VM 131, macOS
/// (Apple's SMC in `args`) given the RTX, that macOS has no driver for it.
#[test]
fn config_check_and_doctor_say_what_a_pve_vm_on_the_igpu_lacks_and_that_macos_has_no_nvidia_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = handoff::simulated_tree::SimHost::build(
        &tmp.path().join("machine"),
        &handoff::simulated_tree::SimSpec::workstation(),
    )
    .unwrap();
    let guest = |id: u32, name: &str, config: Value| json!({"vmid": id, "name": name, "status": "stopped", "config": config});
    let Some(pve) = FakePve::start(&json!({
        "tokens": {TOKEN: SECRET},
        "guests": [
            guest(130, "macos", json!({"hostpci0": "0000:00:02.0", "bios": "ovmf", "ostype": "other",
                "args": "-device isa-applesmc,osk=OSK -smbios type=2", "vga": "none"})),
            guest(131, "hackintosh", json!({"hostpci0": "0000:01:00,pcie=1", "ostype": "other",
                "args": "-device isa-applesmc,osk=OSK"})),
            guest(140, "win11", json!({"hostpci0": "0000:00:02.0,legacy-igd=1,romfile=igd.rom", "bios": "ovmf",
                "hostpci1": "0000:01:00", "vga": "none", "machine": "pc-i440fx-8.1", "ostype": "win11"})),
        ],
    })) else {
        return;
    };
    let secret = handoff_test_support::fakepve::token_secret_file(tmp.path(), SECRET);
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[gpu]]\naddress = \"0000:00:02.0\"\nlabel = \"UHD 630\"\nhost_driver = \"i915\"\nallow_display = true\n\n\
             [[gpu]]\naddress = \"0000:01:00.0\"\nlabel = \"RTX\"\nhost_driver = \"vfio-pci\"\nprimary = true\n\n\
             [proxmox]\nurl = \"{}\"\ntoken = \"{TOKEN}\"\ntoken_secret_file = \"{}\"\nfingerprint = \"{}\"\n\n\
             [[vm]]\nvmid = 130\nname = \"macos\"\nlabel = \"macOS\"\n\n\
             [[vm]]\nvmid = 131\nname = \"hackintosh\"\n\n\
             [[vm]]\nvmid = 140\nname = \"win11\"\nlabel = \"Windows 11\"\n\n\
             [host]\nsysfs = \"{}\"\ndev = \"{}\"\nrun = \"{}\"\n",
            pve.url,
            secret.display(),
            pve.fingerprint,
            sim.sysfs().display(),
            sim.dev().display(),
            sim.run().display()
        ),
    )
    .unwrap();
    let (code, out, err) = run(&config, &["config", "check"]);
    assert_eq!(code, 0, "notes, not a failure: {out}{err}");
    let igpu = "[warn] VM macOS takes the Intel iGPU 0000:00:02.0, but its IGD OpRegion is not turned on: \
                neither legacy-igd=1 on hostpci0 (PVE's legacy IGD mode) nor `-set device.hostpci0.x-igd-opregion=on` in args";
    let macos = "[warn] hackintosh is a macOS VM and GPU 0000:01:00.0";
    for says in [igpu, "hostpci0 has no romfile=: a UEFI guest (bios: ovmf)", macos] {
        assert!(out.contains(says), "no {says:?} in:\n{out}{err}");
    }
    assert!(!out.contains("VM Windows 11"), "win11 has what it needs:\n{out}");
    assert!(
        !out.contains("VM macOS is a macOS VM"),
        "the iGPU has a macOS driver:\n{out}"
    );

    let (_, out, err) = run(
        &config,
        &[
            "doctor",
            "--hooks-dir",
            tmp.path().join("hooks").to_str().unwrap(),
        ],
    );
    for says in [
        "VM macOS takes the Intel iGPU 0000:00:02.0, but its IGD OpRegion is not turned on",
        "hackintosh is a macOS VM and GPU 0000:01:00.0",
    ] {
        assert!(out.contains(says), "doctor: no {says:?} in:\n{out}{err}");
    }
}

/// On the node itself, the card isolated on vfio-pci from boot (the seed's set-up) and the
/// simulated GPU behind FUSE: `handoff status` asks the API which VM runs and says "free on
/// vfio-pci" between VMs, not "restore required", and the VM's name once one runs (issue
/// 14).
#[test]
fn on_the_node_status_says_free_on_vfio_pci_between_vms_and_names_the_vm_that_has_it() {
    use handoff_test_support::fuse_gpu;
    let _serial = fuse_gpu::serial();
    let Some(sim) = fuse_gpu::workstation() else {
        return;
    };
    let host = sim.host();
    let gpu = fuse_gpu::addr(fuse_gpu::GPU);
    // As at boot with `vfio-pci.ids=…`: on vfio-pci, no restore record.
    handoff::bind::hand_to_vfio(&host, gpu, None, std::time::Duration::from_secs(2), &mut |_| {})
        .expect("binding the simulated card to vfio-pci");
    handoff::bind::record::RestoreRecord::remove(&host, gpu).unwrap();
    sim.assert_on_vfio();

    let vm = |id: u32, name: &str| json!({"vmid": id, "name": name, "status": "stopped", "config": {"hostpci0": "0000:01:00,pcie=1"}});
    let Some(pve) = FakePve::start(&json!({
        "tokens": {TOKEN: SECRET},
        "guests": [vm(140, "win11"), vm(141, "linux-ai")],
    })) else {
        return;
    };
    let secret = handoff_test_support::fakepve::token_secret_file(pve.dir(), SECRET);
    let config = pve.dir().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[gpu]\naddress = \"{gpu}\"\nhost_driver = \"vfio-pci\"\nlabel = \"RTX 5070 Ti\"\n\n\
             [proxmox]\nurl = \"{}\"\ntoken = \"{TOKEN}\"\ntoken_secret_file = \"{}\"\nfingerprint = \"{}\"\n\n\
             [[vm]]\nvmid = 140\nlabel = \"Windows 11\"\n\n\
             [[vm]]\nvmid = 141\nname = \"linux-ai\"\nlabel = \"Linux AI\"\n\n{}",
            pve.url,
            secret.display(),
            pve.fingerprint,
            handoff_test_support::config::host_section(&host)
        ),
    )
    .unwrap();

    let (code, text, err) = run(&config, &["status"]);
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.starts_with("RTX 5070 Ti: free on vfio-pci\n"), "{text}");
    assert!(
        text.contains("\nCould take it: Windows 11 (VM 140), Linux AI (VM 141)\n"),
        "{text}"
    );
    let (_, out, _) = run(&config, &["status", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"]["state"], "idle", "{v}");
    assert_eq!(v["gpu"]["candidates"], json!(["140", "linux-ai"]), "{v}");

    let (code, out, err) = run(&config, &["start", "linux-ai"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, text, err) = run(&config, &["status"]);
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.starts_with("RTX 5070 Ti: Linux AI (VM 141)\n"), "{text}");
    assert!(text.contains("\nCould take it: Windows 11 (VM 140)\n"), "{text}");
    let (_, out, _) = run(&config, &["status", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&v["verdict"]["state"], &v["verdict"]["vm"], &v["verdict"]["vmid"]),
        (&json!("in_vm"), &json!("linux-ai"), &json!(141)),
        "{v}"
    );
}

/// The hookscript's refusal of 141 while 140 runs, as the node prints it.
const REFUSED_141: &str = "handoff: not starting Linux AI (VM 141): GPU 0000:01:00.0 is passed through to Windows 11 (VM 140), which is running. `handoff switch 141` shuts it down gracefully and then starts Linux AI (VM 141)";

/// Issue 16 on a desktop whose VMs run on PVE: a start the hookscript refused, asked by
/// someone else (here a script with the same token; PVE's web UI needs `Sys.Audit`, see
/// docs/proxmox.md), is found by the tray's agent at its poll, logged once (by UPID) in the
/// user's refusals file in the hook's format, and told as a `refused` change; a refusal from
/// before the agent started is history, and a restarted agent tells nothing again.
#[test]
fn the_trays_agent_hears_a_start_the_hookscript_refused_once_and_never_an_old_one() {
    use std::time::{Duration, Instant};

    use handoff::hypervisor::{Hypervisor, TaskState};
    let Some((_pve, config)) = setup_with(|s| {
        s["guests"][1]["start_error"] = json!(fakepve::hookscript_refusal(141, &[REFUSED_141]));
    }) else {
        return;
    };
    poll_every_second(&config);
    let cfg = handoff::Config::load_file(&config).unwrap();
    let refused_start = || {
        let mut pve = handoff_proxmox::Proxmox::new(&cfg).unwrap();
        let vm = (&cfg.vms[1]).into();
        let handoff::hypervisor::Start::Begun(task) = pve.start(&vm).unwrap() else {
            panic!("fakepve refused at once")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match pve.poll(&task).unwrap() {
                TaskState::Refused(r) => return (task.upid.unwrap(), r.message),
                TaskState::Pending { .. } if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                other => panic!("expected the hookscript's refusal, got {other:?}"),
            }
        }
    };
    let (old_upid, _) = refused_start();
    let refusals = |rx: &std::sync::mpsc::Receiver<String>, wait: Duration| {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100))
                && line.contains("\"refused\"")
            {
                got.push(line);
            }
        }
        got
    };
    let log = || handoff::refusals::RefusalLog::read(&handoff::refusals::user_host(&cfg.host)).unwrap();

    let (g, rx) = agent(&config);
    // Two polls: the refusal from before the agent is history.
    assert_eq!(refusals(&rx, Duration::from_millis(2500)), Vec::<String>::new());
    assert!(log().is_none(), "an old refusal was logged: {:?}", log());

    let (upid, message) = refused_start();
    assert_ne!(upid, old_upid);
    let got = refusals(&rx, Duration::from_secs(4));
    assert_eq!(got.len(), 1, "one refused change for one refused task: {got:#?}");
    assert!(got[0].contains("linux-ai"), "{got:?}");
    let l = log().expect("the refusal is logged in the user's runtime dir");
    assert_eq!(l.refusals.len(), 1, "{l:?}");
    let r = &l.refusals[0];
    assert_eq!(r.vm, "linux-ai");
    assert_eq!(r.upid.as_deref(), Some(upid.as_str()));
    assert_eq!(r.gpu.to_string(), "0000:01:00.0");
    assert_eq!(r.message, REFUSED_141.strip_prefix("handoff: ").unwrap());
    assert_eq!(r.message, message, "the same words as the start's own refusal");
    drop(g);

    // A restarted agent tells nothing again.
    let (_g, rx) = agent(&config);
    assert_eq!(refusals(&rx, Duration::from_millis(2500)), Vec::<String>::new());
    assert_eq!(log().unwrap().refusals.len(), 1);
}

/// Issue 14: a `[[vm]]` whose VMID the token cannot see (no `VM.Audit` on it, or no such
/// VM: PVE answers both the same) is never "not defined in libvirt".
#[test]
fn a_pve_vm_the_token_cannot_see_is_said_so_not_undefined_in_libvirt() {
    let Some((_pve, config)) = setup() else { return };
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[host]", "[[vm]]\nvmid = 150\nlabel = \"Old Windows\"\n\n[host]"),
    )
    .unwrap();
    let (code, text, err) = run(&config, &["status"]);
    assert_eq!(code, 0, "{text}{err}");
    assert!(!text.contains("libvirt"), "{text}");
    assert!(
        text.contains("not visible to the API token (no VM.Audit on it, or no such VMID)"),
        "{text}"
    );
    assert!(text.contains("VM.Audit on /vms/150"), "{text}");
}
