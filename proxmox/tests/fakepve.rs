//! The Proxmox VE backend against fakepve (PyPI), started on loopback per test: the seed's
//! homelab, VM 140 "Windows 11" and VM 141 "Linux AI" sharing one RTX 5070 Ti. Each test
//! reads what a person would: the progress lines, the states, the error's words.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use handoff::config::Config;
use handoff::hypervisor::{self, Hypervisor};
use handoff::status::VmState;
use handoff_libvirt::vm::{self, Ctl};
use handoff_proxmox::Proxmox;
use handoff_test_support::fakepve::{self, FakePve};
use serde_json::{Value, json};

const TOKEN: &str = "handoff@pve!desk";
const SECRET: &str = "5f1c0f9e-0a52-4d53-9b8e-3c0f1d2e4a61";

fn guest(vmid: u32, name: &str, status: &str) -> Value {
    json!({"vmid": vmid, "name": name, "status": status,
           "config": {"hostpci0": "0000:01:00,pcie=1,x-vga=1", "machine": "q35", "memory": 16384}})
}

/// The homelab: 140 runs, 141 is off, the token may audit and power VMs.
fn homelab(changes: impl FnOnce(&mut Value)) -> Value {
    let mut s = json!({
        "tokens": {TOKEN: SECRET},
        "grants": [[TOKEN, "/vms", ["VM.Audit", "VM.PowerMgmt"]]],
        "guests": [guest(140, "win11", "running"), guest(141, "linux-ai", "stopped")],
    });
    changes(&mut s);
    s
}

/// The config a desktop would have, pinned to the fake's certificate.
fn config(dir: &Path, url: &str, pin: &str, secret: &str, shutdown_s: u64) -> Config {
    let secret_file = dir.join("pve-token");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "[gpu]\naddress = \"0000:01:00.0\"\nhost_driver = \"vfio-pci\"\n\n\
         [proxmox]\nurl = \"{url}\"\ntoken = \"{TOKEN}\"\ntoken_secret_file = \"{}\"\n{pin}\n\n\
         [[vm]]\nvmid = 140\nlabel = \"Windows 11\"\nshutdown_timeout_s = {shutdown_s}\n\n\
         [[vm]]\nvmid = 141\nname = \"linux-ai\"\nlabel = \"Linux AI\"\nshutdown_timeout_s = {shutdown_s}\n",
        secret_file.display()
    );
    Config::parse(&text, &dir.join("config.toml")).unwrap()
}

struct Lab {
    pve: FakePve,
    cfg: Config,
}

fn lab(scenario: Value, shutdown_s: u64) -> Option<Lab> {
    let pve = FakePve::start(&scenario)?;
    let pin = format!("fingerprint = \"{}\"", pve.fingerprint);
    let cfg = config(pve.dir(), &pve.url, &pin, SECRET, shutdown_s);
    Some(Lab { pve, cfg })
}

fn hv(cfg: &Config) -> Box<dyn Hypervisor> {
    Box::new(Proxmox::new(cfg).expect("[proxmox] is set"))
}

fn states(cfg: &Config) -> Vec<(String, VmState, Option<String>)> {
    let mut h = hv(cfg);
    cfg.vms
        .iter()
        .map(|v| {
            let s = hypervisor::vm_status(&mut *h, v);
            (v.name.clone(), s.state, s.error)
        })
        .collect()
}

/// `handoff switch <to>` as the CLI runs it: the progress lines and the outcome or error text.
fn switch(cfg: &Config, to: &str, force: bool) -> (Vec<String>, Result<(), String>) {
    let mut lines = Vec::new();
    let target = vm::resolve(cfg, Some(to)).unwrap().clone();
    let r = {
        let mut say = |l: &str| lines.push(l.to_owned());
        let mut ctl = Ctl::with_hypervisor(cfg, &mut say, hv(cfg));
        ctl.switch(&target, force, None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    (lines, r)
}

#[test]
fn status_shows_windows_running_and_linux_ai_off_in_the_same_shape_as_libvirt() {
    let Some(lab) = lab(homelab(|_| {}), 30) else {
        return;
    };
    let mut h = hv(&lab.cfg);
    let vms: Vec<_> = lab
        .cfg
        .vms
        .iter()
        .map(|v| hypervisor::vm_status(&mut *h, v))
        .collect();
    let json = serde_json::to_value(&vms).unwrap();
    assert_eq!(json[0]["name"], "140", "{json}");
    assert_eq!(json[0]["label"], "Windows 11", "{json}");
    assert_eq!(json[0]["state"], "running", "{json}");
    assert_eq!(json[1]["name"], "linux-ai", "{json}");
    assert_eq!(json[1]["state"], "shutoff", "{json}");
    assert_eq!(json[0]["uri"], lab.pve.url.as_str(), "{json}");
    // Which GPU each takes comes from its hostpci0, never configured twice.
    let d = h.describe(&(&lab.cfg.vms[0]).into()).unwrap();
    assert_eq!(d.passthrough, vec!["0000:01:00.0".parse().unwrap()]);
}

#[test]
fn switch_from_windows_to_linux_ai_and_back_says_each_step() {
    let Some(lab) = lab(homelab(|_| {}), 30) else {
        return;
    };
    let (lines, r) = switch(&lab.cfg, "141", false);
    r.unwrap_or_else(|e| panic!("switch to 141: {e}\n{lines:#?}"));
    let text = lines.join("\n");
    assert!(text.contains("Step 1/2: stop Windows 11 (140)"), "{text}");
    assert!(text.contains("Asking Windows 11 (140) to shut down"), "{text}");
    assert!(text.contains("Step 2/2: start Linux AI (linux-ai)"), "{text}");
    let s = states(&lab.cfg);
    assert_eq!((s[0].1, s[1].1), (VmState::Shutoff, VmState::Running), "{s:?}");

    // And back, by name.
    let (lines, r) = switch(&lab.cfg, "140", false);
    r.unwrap_or_else(|e| panic!("switch back to 140: {e}\n{lines:#?}"));
    let text = lines.join("\n");
    assert!(text.contains("Step 1/2: stop Linux AI (linux-ai)"), "{text}");
    assert!(text.contains("Step 2/2: start Windows 11 (140)"), "{text}");
    let s = states(&lab.cfg);
    assert_eq!((s[0].1, s[1].1), (VmState::Running, VmState::Shutoff), "{s:?}");
}

#[test]
fn a_shutdown_that_outlasts_its_timeout_leaves_windows_running_and_offers_force() {
    // The guest takes 10 PVE minutes to power off; handoff waits 2 s.
    let scenario = homelab(|s| s["guests"][0]["shutdown_secs"] = json!(600));
    let Some(lab) = lab(scenario, 2) else { return };
    let (lines, r) = switch(&lab.cfg, "linux-ai", false);
    let e = r.expect_err("the switch must stop at the shutdown");
    assert!(e.contains("did not stop within 2 s"), "{e}");
    assert!(e.contains("handoff switch --force linux-ai"), "{e}");
    let s = states(&lab.cfg);
    assert_eq!(
        (s[0].1, s[1].1),
        (VmState::Running, VmState::Shutoff),
        "{s:?}\n{lines:#?}"
    );

    // Forcing is the person's explicit choice.
    let (lines, r) = switch(&lab.cfg, "linux-ai", true);
    r.unwrap_or_else(|e| panic!("forced switch: {e}\n{lines:#?}"));
    assert!(
        lines.iter().any(|l| l.contains("Forcing Windows 11 (140) off")),
        "{lines:#?}"
    );
    let s = states(&lab.cfg);
    assert_eq!((s[0].1, s[1].1), (VmState::Shutoff, VmState::Running), "{s:?}");
}

#[test]
fn a_vm_locked_by_a_backup_is_named_with_its_lock_and_nothing_is_stopped() {
    let scenario = homelab(|s| s["guests"][0]["lock"] = json!("backup"));
    let Some(lab) = lab(scenario, 30) else { return };
    let s = states(&lab.cfg);
    assert_eq!(s[0].1, VmState::Running);
    let (_, r) = switch(&lab.cfg, "141", false);
    let e = r.expect_err("a locked VM cannot be shut down");
    assert!(e.contains("VM 140 is locked (backup)"), "{e}");
    assert!(e.contains("a backup (vzdump) holds it"), "{e}");
    let s = states(&lab.cfg);
    assert_eq!((s[0].1, s[1].1), (VmState::Running, VmState::Shutoff), "{s:?}");
}

#[test]
fn a_failed_start_task_shows_its_exit_status_and_last_log_lines() {
    let scenario = homelab(|s| {
        s["guests"][0]["status"] = json!("stopped");
        s["guests"][1]["start_error"] = json!("storage 'service-pool' is not online");
    });
    let Some(lab) = lab(scenario, 30) else { return };
    let (_, r) = switch(&lab.cfg, "141", false);
    let e = r.expect_err("the start task fails");
    assert!(e.contains("Proxmox VE at"), "{e}");
    assert!(
        e.contains("failed with exit status \"storage 'service-pool' is not online\""),
        "{e}"
    );
    assert!(
        e.contains("TASK ERROR: storage 'service-pool' is not online"),
        "{e}"
    );
    assert!(!e.contains("libvirt"), "{e}");
}

#[test]
fn a_bad_token_secret_says_which_token_was_refused_and_what_to_check() {
    let Some(pve) = FakePve::start(&homelab(|_| {})) else {
        return;
    };
    let pin = format!("fingerprint = \"{}\"", pve.fingerprint);
    let cfg = config(pve.dir(), &pve.url, &pin, "not-the-secret", 30);
    let s = states(&cfg);
    assert_eq!(s[0].1, VmState::Unknown);
    let e = s[0].2.clone().unwrap();
    assert!(e.contains(&format!("refused the API token {TOKEN}")), "{e}");
    assert!(e.contains("token_secret_file"), "{e}");
}

#[test]
fn a_token_that_may_only_audit_names_the_missing_vm_powermgmt_privilege() {
    let scenario = homelab(|s| s["grants"] = json!([[TOKEN, "/vms", ["VM.Audit"]]]));
    let Some(lab) = lab(scenario, 30) else { return };
    let (_, r) = switch(&lab.cfg, "141", false);
    let e = r.expect_err("no VM.PowerMgmt");
    assert!(e.contains("lacks the privilege VM.PowerMgmt on /vms/140"), "{e}");
    assert!(e.contains("pveum acl modify /vms/140"), "{e}");
}

#[test]
fn a_token_that_may_only_power_vms_names_the_missing_vm_audit_privilege() {
    // PVE (and fakepve) hide the VMs a token may not audit: it looks like no such VM.
    let scenario = homelab(|s| s["grants"] = json!([[TOKEN, "/vms", ["VM.PowerMgmt"]]]));
    let Some(lab) = lab(scenario, 30) else { return };
    let s = states(&lab.cfg);
    assert_eq!(s[0].1, VmState::Undefined, "{s:?}");
    let e = s[0].2.clone().unwrap();
    assert!(e.contains("without VM.Audit on /vms/140"), "{e}");
    assert!(
        e.contains(&format!("pveum acl modify /vms/140 --tokens '{TOKEN}'")),
        "{e}"
    );
}

#[test]
fn a_wrong_fingerprint_is_refused_naming_the_certificate_seen() {
    let Some(pve) = FakePve::start(&homelab(|_| {})) else {
        return;
    };
    let wrong = pve.fingerprint.replace(|c: char| c.is_ascii_hexdigit(), "0");
    let cfg = config(
        pve.dir(),
        &pve.url,
        &format!("fingerprint = \"{wrong}\""),
        SECRET,
        30,
    );
    let e = states(&cfg)[0].2.clone().unwrap();
    assert!(e.contains("is not the one pinned"), "{e}");
    assert!(e.contains(&pve.fingerprint), "{e}");
    assert!(e.contains("pvenode cert info"), "{e}");
}

#[test]
fn a_ca_file_that_signed_the_certificate_is_accepted_and_another_is_not() {
    let Some(pve) = FakePve::start(&homelab(|_| {})) else {
        return;
    };
    let ca = format!("ca_file = \"{}\"", pve.ca_file.display());
    let cfg = config(pve.dir(), &pve.url, &ca, SECRET, 30);
    assert_eq!(states(&cfg)[0].1, VmState::Running, "{:?}", states(&cfg));

    let Some(other) = FakePve::start(&homelab(|_| {})) else {
        return;
    };
    let ca = format!("ca_file = \"{}\"", other.ca_file.display());
    let cfg = config(pve.dir(), &pve.url, &ca, SECRET, 30);
    let e = states(&cfg)[0].2.clone().unwrap();
    assert!(e.contains("does not verify against [proxmox] ca_file"), "{e}");
}

#[test]
fn an_unreachable_host_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let pin = format!("fingerprint = \"{}\"", ["AB"; 32].join(":"));
    let cfg = config(dir.path(), &fakepve::unreachable_url(), &pin, SECRET, 30);
    let e = states(&cfg)[0].2.clone().unwrap();
    assert!(e.contains("cannot reach Proxmox VE at https://127.0.0.1:"), "{e}");
    assert!(e.contains("pveproxy"), "{e}");
}

#[test]
fn a_token_secret_others_can_read_is_refused_with_the_chmod_that_fixes_it() {
    let Some(lab) = lab(homelab(|_| {}), 30) else {
        return;
    };
    let file = lab.cfg.proxmox.as_ref().unwrap().token_secret_file.clone();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = states(&lab.cfg)[0].2.clone().unwrap();
    assert!(e.contains("readable by everyone"), "{e}");
    assert!(e.contains(&format!("chmod 600 {}", file.display())), "{e}");
}

#[test]
fn a_start_the_hookscript_refused_comes_back_as_the_guards_refusal_not_a_failure() {
    // fakepve runs no hookscripts; it fails the start task with the error PVE's
    // exec_hookscript dies with, which is what handoff reads.
    let exit = "hookscript error for 141 on pre-start: command '/var/lib/vz/snippets/handoff 141 pre-start' failed: exit code 1";
    let scenario = homelab(|s| {
        s["guests"][0]["status"] = json!("stopped");
        s["guests"][1]["start_error"] = json!(exit);
    });
    let Some(lab) = lab(scenario, 30) else { return };
    let target = vm::resolve(&lab.cfg, Some("141")).unwrap().clone();
    let mut lines = Vec::new();
    let mut say = |l: &str| lines.push(l.to_owned());
    let mut ctl = Ctl::with_hypervisor(&lab.cfg, &mut say, hv(&lab.cfg));
    match ctl.start(&target) {
        Err(vm::VmError::HookRefused { message, .. }) => {
            assert!(message.contains("hookscript error for 141"), "{message}")
        }
        other => panic!("expected the hookscript's refusal, got {other:?}"),
    }
}
