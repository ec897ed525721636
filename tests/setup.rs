//! `handoff setup` on simulated machines built like the seeds', with the real components:
//! the workstation (an iGPU driving the display, an RTX 3090 Ti at 0000:01:00.0, a `win11`
//! domain in the real system libvirtd passing it through) and the homelab (an RTX 5070 Ti
//! on vfio-pci with VMs 140 and 141, the iGPU with VM 130, on fakepve and a PVE node's
//! files). Each writes its system config to a temp path (`--system-config`, as the hook's
//! tests do), the libvirt hook to a temp hooks dir, and the session pieces under a temp
//! HOME. What a person sees: the file, `config check` and `doctor` on it, a second run that
//! changes nothing, a hand edit that survives, a shared IOMMU group that stops it.

use handoff_test_support::bins::Run;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use handoff::simulated_tree::{SimFunction, SimHost, SimSpec};
use handoff_test_support::fakepve::FakePve;
use handoff_test_support::libvirt::{TestDomain, require_libvirtd};
use handoff_test_support::{bins, tools};
use serde_json::json;

fn handoff() -> &'static str {
    bins::cli(env!("CARGO_BIN_EXE_handoff"))
}

/// A simulated machine in a temp dir: its roots, a temp HOME, where setup writes.
struct Machine {
    tmp: tempfile::TempDir,
    sim: SimHost,
}

impl Machine {
    fn new(spec: &SimSpec) -> Machine {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(&tmp.path().join("machine"), spec).unwrap();
        fs::create_dir_all(tmp.path().join("home")).unwrap();
        Machine { tmp, sim }
    }

    fn config(&self) -> PathBuf {
        self.tmp.path().join("etc/handoff/config.toml")
    }

    fn hooks(&self) -> PathBuf {
        self.tmp.path().join("libvirt-hooks")
    }

    fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }

    /// `handoff ARGS` as a person on this machine (its HOME), no config in the environment.
    fn run(&self, args: &[&str]) -> Run {
        let home = self.home();
        let out: Output = Command::new(handoff())
            .args(args)
            .env_remove("HANDOFF_CONFIG")
            .env_remove("SUDO_USER")
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .output()
            .unwrap();
        Run::from_output(out, None)
    }

    /// `handoff setup` pointed at this machine (`extra` first: --yes, --dry-run, …).
    fn setup(&self, extra: &[&str]) -> Run {
        let host = self.sim.host();
        let mut args: Vec<String> = ["setup"].iter().chain(extra).map(|s| s.to_string()).collect();
        for (flag, p) in [
            ("--system-config", self.config()),
            ("--hooks-dir", self.hooks()),
            ("--sysfs", host.sysfs),
            ("--dev", host.dev),
            ("--run", host.run),
        ] {
            args.push(flag.into());
            args.push(p.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&args)
    }

    /// `handoff ARGS` with the config setup wrote.
    fn with_config(&self, args: &[&str]) -> Run {
        let home = self.home();
        let out = Command::new(handoff())
            .args(args)
            .env("HANDOFF_CONFIG", self.config())
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .output()
            .unwrap();
        Run::from_output(out, None)
    }

    fn written(&self) -> String {
        fs::read_to_string(self.config()).unwrap()
    }
}

/// `<hostdev>` elements for every function of the slot `bus`:00 (`n` functions).
fn hostdevs(bus: u8, n: u8) -> String {
    (0..n)
        .map(|f| {
            format!(
                "<hostdev mode='subsystem' type='pci' managed='no'><source>\
                 <address domain='0x0000' bus='0x{bus:02x}' slot='0x00' function='0x{f}'/></source></hostdev>"
            )
        })
        .collect()
}

fn root() -> bool {
    // setup writes the root-owned system config; the tests run as root (CI) or skip.
    tools::is_root() || tools::required("handoff setup writes the root-owned system config: run as root")
}

#[test]
fn the_workstation_gets_a_config_doctor_passes_and_a_rerun_changes_nothing() {
    if !root() {
        return;
    }
    let Some(_lock) = require_libvirtd() else { return };
    let m = Machine::new(&SimSpec::workstation());
    let _win11 = TestDomain::define_named("win11", &hostdevs(1, 4));

    // --dry-run writes nothing, and shows the file and the steps.
    let dry = m.setup(&["--dry-run"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(!m.config().exists(), "--dry-run wrote {}", m.config().display());
    assert!(!m.hooks().exists(), "--dry-run installed the hook");
    for says in [
        "IOMMU group 13: 0000:00:01.0 (bridge, pcieport)",
        "drives this host's display: the firmware booted on it",
        "libvirt domain win11",
        "[[gpu]]",
        "address = \"0000:01:00.0\"",
        "install the libvirt hook",
        "(dry run: nothing was written)",
    ] {
        assert!(dry.stdout.contains(says), "should say {says:?}: {dry:?}");
    }

    let first = m.setup(&["--yes"]);
    assert_eq!(first.code, 0, "{first:?}");
    let text = m.written();
    let cfg = handoff::Config::load_system(&m.config())
        .expect("root-owned, readable by the hook")
        .0;
    assert_eq!(
        cfg.gpu.len(),
        1,
        "only the RTX: the iGPU drives the display\n{text}"
    );
    assert_eq!(cfg.gpu.address.to_string(), "0000:01:00.0");
    assert_eq!(cfg.gpu.host_driver, "nvidia");
    assert_eq!(cfg.vms.len(), 1, "{text}");
    assert_eq!(
        (cfg.vms[0].name.as_str(), cfg.vms[0].label()),
        ("win11", "Windows")
    );
    assert!(
        text.contains("# Not handed: "),
        "a comment says why the iGPU is not handed:\n{text}"
    );
    assert!(text.contains("0000:00:02.0"), "{text}");
    assert!(
        text.contains("# libvirt domain win11 passes through 0000:01:00.0"),
        "{text}"
    );
    let mode = fs::metadata(m.config()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    assert!(m.hooks().join("qemu.d/handoff").exists(), "{first:?}");
    assert!(
        m.home()
            .join(".config/systemd/user/handoff-tray.service")
            .exists(),
        "install-services ran for the user: {first:?}"
    );

    let check = m.run(&["config", "check", m.config().to_str().unwrap()]);
    assert_eq!(check.code, 0, "{check:?}");
    assert!(
        check.stdout.contains("ok (1 VM(s), GPU 0000:01:00.0)"),
        "{check:?}"
    );
    let doctor = m.with_config(&["doctor", "--hooks-dir", m.hooks().to_str().unwrap()]);
    assert_eq!(doctor.code, 0, "{doctor:?}");
    assert!(
        doctor.stdout.contains("This host looks ready for passthrough."),
        "{doctor:?}"
    );

    // Again on the unchanged machine: nothing changes, byte for byte.
    let again = m.setup(&["--yes"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("nothing to change"), "{again:?}");
    assert_eq!(m.written(), text);

    // A hand edit (a label, a key's value, a comment) survives a run with --yes.
    let edited = text.replace("label = \"Windows\"", "label = \"Gaming\"").replace(
        "shutdown_timeout_s = 120",
        "shutdown_timeout_s = 300  # my games take long",
    ) + "# my own note\n";
    fs::write(m.config(), &edited).unwrap();
    let kept = m.setup(&["--yes"]);
    assert_eq!(kept.code, 0, "{kept:?}");
    assert_eq!(m.written(), edited, "{kept:?}");
    assert!(
        kept.stdout.contains("kept your label \"Gaming\" for VM win11"),
        "{kept:?}"
    );
    assert!(kept.stdout.contains("nothing to change"), "{kept:?}");

    // Not on a terminal and no --yes: nothing is written, and it says how.
    fs::remove_file(m.config()).unwrap();
    let asked = m.setup(&[]);
    assert_eq!(asked.code, 2, "{asked:?}");
    assert!(asked.stderr.contains("--yes"), "{asked:?}");
    assert!(!m.config().exists());
}

/// The workstation with a SATA controller in the RTX's IOMMU group (a board without ACS).
fn shared_group() -> SimSpec {
    let mut spec = SimSpec::workstation();
    spec.functions.push(SimFunction {
        address: "0000:02:00.0".parse().unwrap(),
        vendor: 0x1022,
        device: 0x43eb,
        class: 0x010601,
        driver: Some("ahci".into()),
        iommu_group: 13,
        parent: None,
        drm: None,
        sound_card: None,
        i2c: Vec::new(),
    });
    spec.drivers.push("ahci".into());
    spec
}

#[test]
fn a_shared_iommu_group_stops_it_before_anything_is_written() {
    if !root() {
        return;
    }
    let m = Machine::new(&shared_group());
    // libvirt's test driver: a win11 passing the RTX through (no daemon needed).
    let node = m.tmp.path().join("node.xml");
    fs::write(
        &node,
        format!(
            "<node><domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
             <name>win11</name><memory>32768</memory><vcpu>1</vcpu><os><type>hvm</type></os>\
             <devices>{}</devices><test:runstate>5</test:runstate></domain></node>",
            hostdevs(1, 4)
        ),
    )
    .unwrap();
    let uri = format!("test://{}", node.display());
    let r = m.setup(&["--yes", "--uri", &uri]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(
            "[FAIL] IOMMU group 13 of GPU 0000:01:00.0 also holds 0000:02:00.0 (ahci): they would have to go to the VM too"
        ),
        "{r:?}"
    );
    assert!(r.stdout.contains("→ move the GPU to another slot"), "{r:?}");
    assert!(r.stdout.contains("Nothing was written"), "{r:?}");
    assert!(!m.config().exists());
    assert!(!m.hooks().exists());
    assert!(!m.home().join(".config/systemd").exists());
}

/// A libvirt test-driver machine in `m`'s dir with `domains` (name, `<devices>` XML); its URI.
fn test_node(m: &Machine, domains: &[(&str, String)]) -> String {
    let node = m.tmp.path().join("node.xml");
    let xml: String = domains
        .iter()
        .map(|(name, devices)| {
            format!(
                "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
                 <name>{name}</name><memory>32768</memory><vcpu>1</vcpu><os><type>hvm</type></os>\
                 <devices>{devices}</devices><test:runstate>5</test:runstate></domain>"
            )
        })
        .collect();
    fs::write(&node, format!("<node>{xml}</node>")).unwrap();
    format!("test://{}", node.display())
}

#[test]
fn a_new_vm_is_shown_and_asked_for_and_hand_edits_stay() {
    if !root() {
        return;
    }
    let m = Machine::new(&SimSpec::workstation());
    let uri = test_node(&m, &[("win11", hostdevs(1, 4))]);
    let quiet = ["--no-hooks", "--no-services", "--uri", &uri];
    let first = m.setup(&[&["--yes"][..], &quiet].concat());
    assert_eq!(first.code, 0, "{first:?}");
    let edited = m.written().replace("label = \"Windows\"", "label = \"Gaming\"") + "# mine\n";
    fs::write(m.config(), &edited).unwrap();

    // The machine changed: a second domain passes the RTX through.
    test_node(&m, &[("win11", hostdevs(1, 4)), ("linux-ai", hostdevs(1, 2))]);

    // On a terminal (script(1) gives it one), it shows the lines it would add and asks; "n"
    // leaves the file as it was.
    let (code, said) = setup_on_terminal(&m, &quiet, "n\n");
    assert_eq!(code, Some(1), "{said}");
    for says in [
        "new: VM linux-ai (added as a [[vm]])",
        "kept your label \"Gaming\" for VM win11",
        "nothing there is changed or removed",
        "+ name = \"linux-ai\"",
        "Go ahead? [y/N]",
        "Nothing was written.",
    ] {
        assert!(said.contains(says), "should say {says:?}:\n{said}");
    }
    assert_eq!(m.written(), edited, "declined, yet the file changed");

    // --yes adds the new VM below the edited file, which stays as it is.
    let yes = m.setup(&[&["--yes"][..], &quiet].concat());
    assert_eq!(yes.code, 0, "{yes:?}");
    let after = m.written();
    assert!(after.starts_with(&edited), "{after}");
    let cfg = handoff::Config::load_system(&m.config()).unwrap().0;
    let vms: Vec<(&str, &str)> = cfg.vms.iter().map(|v| (v.name.as_str(), v.label())).collect();
    assert_eq!(vms, [("win11", "Gaming"), ("linux-ai", "linux-ai")], "{after}");

    // --json --dry-run: the plan, for scripts.
    let json = m.setup(&[&["--dry-run", "--json"][..], &quiet].concat());
    assert_eq!(json.code, 0, "{json:?}");
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("one JSON object");
    assert_eq!(v["unchanged"], true, "{v}");
    assert_eq!(v["plan"]["gpus"][1]["gpu"]["address"], "0000:01:00.0", "{v}");
    assert_eq!(v["plan"]["gpus"][1]["hand"], true, "{v}");
    assert_eq!(
        v["plan"]["gpus"][0]["hand"], false,
        "the iGPU drives the display: {v}"
    );
}

/// `handoff setup ARGS` on a terminal (script(1) gives it one, as a person at a shell
/// would have), with `answers` typed in; its exit code and everything it printed.
fn setup_on_terminal(m: &Machine, args: &[&str], answers: &str) -> (Option<i32>, String) {
    let host = m.sim.host();
    let cmd = format!(
        "{} setup {} --system-config {} --sysfs {} --dev {} --run {}",
        handoff(),
        args.join(" "),
        m.config().display(),
        host.sysfs.display(),
        host.dev.display(),
        host.run.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("SUDO_USER")
        .env_remove("HANDOFF_CONFIG")
        .env("HOME", m.home())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), answers.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The workstation where a `macos` domain passes the iGPU through, the GPU that drives
/// the display: on a terminal setup asks before handing it. "y" writes its `[[gpu]]` with
/// `allow_display = true`; "n" leaves it out, saying why, and hands only the RTX.
#[test]
fn the_display_gpu_is_handed_only_when_the_person_says_yes_on_the_terminal() {
    if !root() || !tools::have_all(&["script"]) {
        return;
    }
    const QUESTION: [&str; 2] = [
        "0000:00:02.0 drives this host's display (the firmware booted on it (boot_vga = 1)",
        "and libvirt domain macos want(s) it. Hand it to VMs anyway (the host loses its console \
         and local desktop while one runs)? [y/N]",
    ];
    for (answer, handed) in [("y", true), ("n", false)] {
        let m = Machine::new(&SimSpec::workstation());
        let igpu = "<hostdev mode='subsystem' type='pci' managed='no'><source>\
                    <address domain='0x0000' bus='0x00' slot='0x02' function='0x0'/></source></hostdev>";
        let uri = test_node(&m, &[("win11", hostdevs(1, 4)), ("macos", igpu.to_owned())]);
        // The display question, then "Go ahead?": yes to that either way.
        let (code, said) = setup_on_terminal(
            &m,
            &["--no-hooks", "--no-services", "--uri", &uri],
            &format!("{answer}\ny\n"),
        );
        assert_eq!(code, Some(0), "answer {answer}:\n{said}");
        for part in QUESTION {
            assert!(
                said.contains(part),
                "answer {answer}: no question {part:?}:\n{said}"
            );
        }
        // Asked first: the plan shown before "Go ahead?" is the one the answer made.
        let go = said.find("Go ahead? [y/N]").unwrap_or_else(|| panic!("{said}"));
        assert!(said.find(QUESTION[1]).unwrap() < go, "{said}");
        let text = m.written();
        let cfg = handoff::Config::load_system(&m.config()).unwrap().0;
        let igpu_gpu = cfg.gpu.iter().find(|g| g.address.to_string() == "0000:00:02.0");
        assert!(
            cfg.gpu.iter().any(|g| g.address.to_string() == "0000:01:00.0"),
            "the RTX is handed whatever the answer:\n{text}"
        );
        if handed {
            let g = igpu_gpu.unwrap_or_else(|| panic!("answered y, yet no iGPU [[gpu]]:\n{text}"));
            assert!(g.allow_display, "{text}");
            assert!(text.contains("you chose to hand it anyway"), "{text}");
            assert!(cfg.vms.iter().any(|v| v.name == "macos"), "{text}");
        } else {
            assert!(igpu_gpu.is_none(), "answered n, yet the iGPU is handed:\n{text}");
            assert!(text.contains("# Not handed: "), "{text}");
        }
        let check = m.run(&["config", "check", m.config().to_str().unwrap()]);
        assert_eq!(check.code, 0, "{check:?}");
    }
}

/// `sudo handoff setup` installs the session pieces for the person who ran sudo
/// (`SUDO_USER`), as that person (`runuser`), in their home, for the config setup wrote.
/// The person is `nobody`, whose home is pointed at a temp dir for this run only: setup
/// runs in a mount namespace of its own where `/etc/passwd` is a copy saying so (nothing
/// outside the temp dir changes, and no real user's files are touched).
#[test]
fn under_sudo_the_session_pieces_land_in_the_invokers_home_owned_by_them() {
    use std::os::unix::fs::MetadataExt;
    if !root() || !tools::have_all(&["unshare", "runuser", "mount"]) {
        return;
    }
    let m = Machine::new(&SimSpec::workstation());
    let uri = test_node(&m, &[("win11", hostdevs(1, 4))]);
    // nobody must reach its home, the config setup writes and the test-driver file.
    fs::set_permissions(m.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let theirs = m.tmp.path().join("nobody-home");
    fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let passwd: String = fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&"nobody") && f.len() == 7 {
                format!(
                    "{}:{}:{}:{}:{}:{}:{}\n",
                    f[0],
                    f[1],
                    f[2],
                    f[3],
                    f[4],
                    theirs.display(),
                    f[6]
                )
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(
        passwd.contains(&format!(":{}:", theirs.display())),
        "no nobody in /etc/passwd"
    );
    let passwd_copy = m.tmp.path().join("passwd");
    fs::write(&passwd_copy, passwd).unwrap();
    fs::set_permissions(&passwd_copy, fs::Permissions::from_mode(0o644)).unwrap();

    let host = m.sim.host();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/passwd && exec \"$@\"")
        .arg(&passwd_copy)
        .arg(handoff())
        .args(["setup", "--yes", "--no-hooks", "--uri", &uri, "--system-config"])
        .arg(m.config())
        .arg("--sysfs")
        .arg(&host.sysfs)
        .arg("--dev")
        .arg(&host.dev)
        .arg("--run")
        .arg(&host.run)
        .env_remove("HANDOFF_CONFIG")
        .env("SUDO_USER", "nobody")
        // root's own HOME: nothing may land here.
        .env("HOME", m.home())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .output()
        .unwrap();
    let r = Run::from_output(out, None);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("`handoff install-services` for nobody"),
        "{r:?}"
    );
    assert!(!r.stderr.contains("install-services for nobody failed"), "{r:?}");
    let unit = theirs.join(".config/systemd/user/handoff-tray.service");
    let meta = fs::metadata(&unit).unwrap_or_else(|e| panic!("{}: {e}\n{r:?}", unit.display()));
    assert_eq!(
        (meta.uid(), meta.gid()),
        (65534, 65534),
        "the unit is nobody's own"
    );
    assert!(
        fs::read_to_string(&unit).unwrap().contains("handoff-tray"),
        "{}",
        unit.display()
    );
    let desktop = theirs.join(".local/share/applications");
    assert!(desktop.is_dir(), "no .desktop files in nobody's home: {r:?}");
    assert_eq!(fs::metadata(&desktop).unwrap().uid(), 65534);
    assert!(
        !m.home().join(".config").exists() && !m.home().join(".local").exists(),
        "root's HOME got session pieces: {r:?}"
    );
    // The real /etc/passwd was never changed: the copy was only mounted in setup's namespace.
    assert!(
        !fs::read_to_string("/etc/passwd")
            .unwrap()
            .contains(&theirs.display().to_string())
    );
}

#[test]
fn a_gpu_no_vm_passes_through_stops_it_with_the_lines_to_add() {
    if !root() {
        return;
    }
    let m = Machine::new(&SimSpec::workstation());
    let node = m.tmp.path().join("node.xml");
    fs::write(
        &node,
        "<node><domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
         <name>win11</name><memory>32768</memory><vcpu>1</vcpu><os><type>hvm</type></os>\
         <test:runstate>5</test:runstate></domain></node>",
    )
    .unwrap();
    let r = m.setup(&["--yes", "--uri", &format!("test://{}", node.display())]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .contains("[FAIL] No VM passes a GPU this host can hand through yet"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains("<address domain='0x0000' bus='0x01' slot='0x00' function='0x3'/>"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("qm set VMID -hostpci0 0000:01:00,pcie=1"),
        "{r:?}"
    );
    assert!(!m.config().exists());
}

const TOKEN: &str = "handoff@pve!desk";
const SECRET: &str = "0b7e9d0c-3f55-4a65-8d7e-1f1f2b3c4d5e";
const STORAGE: &str = "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup,snippets\n";

#[test]
fn the_homelab_on_proxmox_ve_gets_both_gpus_its_three_vms_and_the_hookscript() {
    if !root() {
        return;
    }
    // handoff-pve serves PVE's API to the CLI, beside it.
    let dir = Path::new(env!("CARGO_BIN_EXE_handoff")).parent().unwrap();
    bins::sibling(dir, "handoff-pve", "handoff-proxmox", &["src", "proxmox/src"]);
    let vm = |id: u32, name: &str, ostype: &str, hostpci: &str| {
        json!({"vmid": id, "name": name, "status": "stopped",
               "config": {"hostpci0": hostpci, "ostype": ostype, "cores": 8, "memory": 16384}})
    };
    let guests = [
        (130, "macos", "other", "0000:00:02.0"),
        (140, "win11", "win11", "0000:01:00,pcie=1"),
        (141, "linux-ai", "l26", "0000:01:00,pcie=1"),
    ];
    let Some(pve) = FakePve::start(&json!({
        "tokens": {TOKEN: SECRET},
        "guests": guests.iter().map(|(id, n, os, h)| vm(*id, n, os, h)).collect::<Vec<_>>(),
    })) else {
        return;
    };
    let m = Machine::new(&SimSpec::homelab());
    let secret = handoff_test_support::fakepve::token_secret_file(m.tmp.path(), SECRET);
    // The node's own files: where the hookscript goes (the VMs' configs as PVE keeps them).
    let pve_root = m.tmp.path().join("node");
    let qs = pve_root.join("etc/pve/qemu-server");
    fs::create_dir_all(&qs).unwrap();
    fs::create_dir_all(pve_root.join("var/lib/vz/snippets")).unwrap();
    fs::write(pve_root.join("etc/pve/storage.cfg"), STORAGE).unwrap();
    for (id, name, os, h) in guests {
        fs::write(
            qs.join(format!("{id}.conf")),
            format!("hostpci0: {h}\nname: {name}\nostype: {os}\n"),
        )
        .unwrap();
    }
    let args = [
        "--yes",
        "--allow-display",
        "--pve-url",
        &pve.url,
        "--pve-token",
        TOKEN,
        "--pve-token-secret-file",
        secret.to_str().unwrap(),
        "--pve-fingerprint",
        &pve.fingerprint,
        "--pve-root",
        pve_root.to_str().unwrap(),
        "--no-services",
    ];
    let first = m.setup(&args);
    assert_eq!(first.code, 0, "{first:?}");
    let text = m.written();
    let cfg = handoff::Config::load_system(&m.config()).unwrap().0;
    let gpus: Vec<(String, &str, bool)> = cfg
        .gpu
        .iter()
        .map(|g| (g.address.to_string(), g.host_driver.as_str(), g.allow_display))
        .collect();
    assert_eq!(
        gpus,
        [
            ("0000:01:00.0".to_owned(), "vfio-pci", false),
            ("0000:00:02.0".to_owned(), "i915", true)
        ],
        "{text}"
    );
    let vms: Vec<(Option<u32>, &str, &str)> = cfg
        .vms
        .iter()
        .map(|v| (v.vmid, v.name.as_str(), v.label()))
        .collect();
    assert_eq!(
        vms,
        [
            (Some(130), "macos", "macOS"),
            (Some(140), "win11", "Windows"),
            (Some(141), "linux-ai", "linux-ai")
        ],
        "{text}"
    );
    assert_eq!(
        cfg.proxmox.as_ref().map(|p| p.url.as_str()),
        Some(pve.url.as_str())
    );
    assert!(
        text.contains("# host_driver \"vfio-pci\": it is on vfio-pci now"),
        "{text}"
    );
    for id in [130, 140, 141] {
        let conf = fs::read_to_string(qs.join(format!("{id}.conf"))).unwrap();
        assert!(
            conf.contains("hookscript: local:snippets/handoff"),
            "{id}: {conf}\n{first:?}"
        );
    }

    let check = m.run(&["config", "check", m.config().to_str().unwrap()]);
    assert_eq!(check.code, 0, "{check:?}");
    assert!(
        check
            .stdout
            .contains("ok (3 VM(s), GPUs 0000:01:00.0, 0000:00:02.0)"),
        "{check:?}"
    );
    let doctor = m.with_config(&["doctor"]);
    assert_eq!(doctor.code, 0, "{doctor:?}");
    assert!(
        doctor.stdout.contains("VM 140 (Windows)") || doctor.stdout.contains("VM win11 (Windows)"),
        "{doctor:?}"
    );

    let again = m.setup(&args);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("nothing to change"), "{again:?}");
    assert_eq!(m.written(), text);
}

#[test]
fn on_a_proxmox_ve_node_without_the_api_it_reads_the_vms_files_and_sets_the_hookscript() {
    if !root() {
        return;
    }
    let m = Machine::new(&SimSpec::homelab());
    let pve_root = m.tmp.path().join("node");
    let qs = pve_root.join("etc/pve/qemu-server");
    fs::create_dir_all(&qs).unwrap();
    fs::create_dir_all(pve_root.join("var/lib/vz/snippets")).unwrap();
    fs::write(pve_root.join("etc/pve/storage.cfg"), STORAGE).unwrap();
    // 140 names the card through a PVE 8 resource mapping for this node; 141 directly; 150
    // passes nothing through and is left alone.
    fs::create_dir_all(pve_root.join("etc/pve/mapping")).unwrap();
    fs::write(
        qs.join("140.conf"),
        "hostpci0: mapping=rtx5070ti,pcie=1\nname: win11\nostype: win11\n",
    )
    .unwrap();
    fs::write(
        qs.join("141.conf"),
        "hostpci0: 0000:01:00,pcie=1\nname: linux-ai\nostype: l26\n",
    )
    .unwrap();
    fs::write(qs.join("150.conf"), "name: router\nostype: l26\n").unwrap();
    let mut args = vec!["--yes", "--no-services", "--pve-root", pve_root.to_str().unwrap()];
    // This node's name, for the mapping: setup reads it from the host name.
    let node = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let node = node.trim().split('.').next().unwrap().to_owned();
    let mapping = pve_root.join("etc/pve/mapping/pci.cfg");
    fs::write(
        &mapping,
        format!("rtx5070ti\n\tmap node={node},path=0000:01:00,id=10de:2c05\n"),
    )
    .unwrap();
    args.push("--dry-run");
    let dry = m.setup(&args);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(dry.stdout.contains("VM 140 (win11) at "), "{dry:?}");
    assert!(
        dry.stdout.contains("install the Proxmox VE hookscript"),
        "{dry:?}"
    );
    args.pop();
    let r = m.setup(&args);
    assert_eq!(r.code, 0, "{r:?}");
    let cfg = handoff::Config::load_system(&m.config()).unwrap().0;
    assert_eq!(cfg.gpu.len(), 1, "the iGPU drives the display: {}", m.written());
    assert_eq!(cfg.gpu.host_driver, "vfio-pci");
    assert!(
        cfg.vms.is_empty(),
        "a [[vm]] with a vmid needs [proxmox]: {}",
        m.written()
    );
    assert!(
        m.written()
            .contains("# VM 140 (win11) on this Proxmox VE node is guarded by the hookscript"),
        "{}",
        m.written()
    );
    for (id, guarded) in [(140, true), (141, true), (150, false)] {
        let conf = fs::read_to_string(qs.join(format!("{id}.conf"))).unwrap();
        assert_eq!(
            conf.contains("hookscript: local:snippets/handoff"),
            guarded,
            "{id}: {conf}\n{r:?}"
        );
    }
    let check = m.run(&["config", "check", m.config().to_str().unwrap()]);
    assert_eq!(check.code, 0, "{check:?}");
}
