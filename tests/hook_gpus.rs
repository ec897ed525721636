//! The libvirt hook with several GPUs (issue 15), run in-process the way libvirtd runs
//! `handoff hook`, against the simulated workstation behind the kernel simulator's FUSE
//! mount: its RTX 3090 Ti (four functions, nvidia) and its Intel iGPU (00:02.0, i915, the
//! boot VGA device). Which GPU a VM takes comes from the `<hostdev>`s of the XML on stdin.
//! What is asserted is what libvirt and the surfaces see: exit codes, stderr, the
//! `driver` links, the restore records and each GPU's state file.
//!
//! Run with `cargo test --all-features --test hook_gpus` as root with `/dev/fuse`.
//! Under `CI=true` a missing `/dev/fuse` fails; elsewhere these tests skip, saying why.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use handoff::bind::record::RestoreRecord;
use handoff_kernelsim::{Errno, FaultRule, FileKind};
use handoff_test_support::fuse_gpu::{self, GPU, Sim, addr};
use handoff_test_support::hook_run::{self, Run, finish};
use handoff_test_support::named_holder;

const IGPU: &str = "0000:00:02.0";

/// A `<domain>` passing these PCI functions through, with a libosinfo id when given.
fn domain(name: &str, functions: &[&str], os: Option<&str>) -> String {
    let mut xml = format!("<domain type='kvm'>\n  <name>{name}</name>\n");
    if let Some(id) = os {
        xml += &format!(
            "  <metadata>\n    <libosinfo:libosinfo xmlns:libosinfo=\"http://libosinfo.org/xmlns/libvirt/domain/1.0\">\n      \
             <libosinfo:os id=\"{id}\"/>\n    </libosinfo:libosinfo>\n  </metadata>\n"
        );
    }
    xml += "  <devices>\n";
    for f in functions {
        let a = addr(f);
        xml += &format!(
            "    <hostdev mode='subsystem' type='pci' managed='no'><source>\
             <address domain='0x{:04x}' bus='0x{:02x}' slot='0x{:02x}' function='0x{:x}'/></source></hostdev>\n",
            a.domain, a.bus, a.device, a.function
        );
    }
    xml + "  </devices>\n</domain>\n"
}

/// The RTX's graphics and audio functions, as the Windows VM passes them.
const RTX: [&str; 2] = [GPU, fuse_gpu::AUDIO];

struct Machine {
    sim: Sim,
    config: PathBuf,
}

/// The workstation with both GPUs configured: the iGPU (`igpu_extra` added to its entry)
/// and the RTX, primary. VMs: macos, win11, linux-ai, both.
fn machine(igpu_extra: &str) -> Option<Machine> {
    let sim = fuse_gpu::workstation()?;
    let etc = sim.tmp.path().join("etc");
    fs::create_dir(&etc).unwrap();
    let host = sim.host();
    let config = etc.join("config.toml");
    let text = format!(
        "[[gpu]]\naddress = \"{IGPU}\"\nlabel = \"iGPU\"\nhost_driver = \"i915\"\nwatchdog_s = 1\n{igpu_extra}\n\n\
         [[gpu]]\naddress = \"{GPU}\"\nlabel = \"RTX\"\nhost_driver = \"nvidia\"\nwatchdog_s = 1\nprimary = true\n\n\
         [[vm]]\nname = \"macos\"\n\n[[vm]]\nname = \"win11\"\n\n[[vm]]\nname = \"linux-ai\"\n\n[[vm]]\nname = \"both\"\n\n\
         [host]\nsysfs = {:?}\nproc = \"/proc\"\ndev = {:?}\nrun = {:?}\nuninspectable_ok = {:?}\n",
        host.sysfs.display().to_string(),
        host.dev.display().to_string(),
        host.run.display().to_string(),
        host.uninspectable_ok,
    );
    fs::write(&config, text).unwrap();
    std::os::unix::fs::chown(&config, Some(0), Some(0)).unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    Some(Machine { sim, config })
}

impl Machine {
    fn hook(&self, domain: &str, op: &str, xml: &str) -> Run {
        let sub = if op == "prepare" { "begin" } else { "end" };
        hook_run::in_process(&self.config, domain, op, sub, xml.as_bytes())
    }

    fn record(&self, gpu: &str) -> Option<RestoreRecord> {
        RestoreRecord::load(&self.sim.host(), addr(gpu)).unwrap()
    }

    /// The state file of the RTX (primary: `state.json`) or of the iGPU
    /// (`state-0000:00:02.0.json`).
    fn state(&self, gpu: &str) -> serde_json::Value {
        let host = self.sim.host();
        let path = handoff::state::HookState::path_for(&host, addr(gpu), gpu == GPU);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap()
    }

    fn igpu_driver(&self) -> Option<String> {
        self.sim.driver(IGPU)
    }
}

#[test]
fn two_vms_on_two_gpus_at_once_both_bound_and_both_returned() {
    let Some(m) = machine("allow_display = true") else {
        return;
    };
    let mac = domain("macos", &[IGPU], None);
    let win = domain("win11", &RTX, None);

    let r = m.hook("macos", "prepare", &mac);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    assert_eq!(m.igpu_driver().as_deref(), Some("vfio-pci"));
    m.sim.assert_home();

    let r = m.hook("win11", "prepare", &win);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    m.sim.assert_on_vfio();
    assert_eq!(
        m.igpu_driver().as_deref(),
        Some("vfio-pci"),
        "the iGPU stays with macOS"
    );
    assert_eq!(m.record(IGPU).unwrap().vm.as_deref(), Some("macos"));
    assert_eq!(m.record(GPU).unwrap().vm.as_deref(), Some("win11"));
    assert_eq!(
        (m.state(IGPU)["vm"].clone(), m.state(IGPU)["phase"].clone()),
        ("macos".into(), "vfio".into())
    );
    assert_eq!(
        (m.state(GPU)["vm"].clone(), m.state(GPU)["phase"].clone()),
        ("win11".into(), "vfio".into())
    );

    // Each release returns its own GPU only.
    let r = m.hook("macos", "release", &mac);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    assert_eq!(m.igpu_driver().as_deref(), Some("i915"));
    m.sim.assert_on_vfio();
    let r = m.hook("win11", "release", &win);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    m.sim.assert_home();
    assert_eq!(m.igpu_driver().as_deref(), Some("i915"));
    assert_eq!((m.record(IGPU), m.record(GPU)), (None, None));
    assert_eq!(m.state(IGPU)["phase"], "host");
    assert_eq!(m.state(GPU)["phase"], "host");
}

#[test]
fn a_third_vm_wanting_a_taken_gpu_is_refused_naming_the_vm_that_has_it() {
    let Some(m) = machine("allow_display = true") else {
        return;
    };
    let win = domain("win11", &RTX, None);
    assert_eq!(
        m.hook("macos", "prepare", &domain("macos", &[IGPU], None)).code,
        0
    );
    assert_eq!(m.hook("win11", "prepare", &win).code, 0);
    m.sim.clear_log();

    let ai = domain("linux-ai", &RTX, None);
    let r = m.hook("linux-ai", "prepare", &ai);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("not handing GPU 0000:01:00.0 to linux-ai: it is with win11; stop that VM first"),
        "{}",
        r.stderr
    );
    assert_eq!(
        m.sim.short_log(),
        vec![],
        "a refused start writes nothing to sysfs"
    );
    // libvirt's release after the refused start leaves win11's GPU alone.
    let r = m.hook("linux-ai", "release", &ai);
    assert_eq!(r.code, 0);
    m.sim.assert_on_vfio();
    assert_eq!(m.record(GPU).unwrap().vm.as_deref(), Some("win11"));

    // A VM wanting both GPUs is refused on the one taken, before touching the free one.
    assert_eq!(
        m.hook("macos", "release", &domain("macos", &[IGPU], None)).code,
        0
    );
    m.sim.clear_log();
    let r = m.hook("both", "prepare", &domain("both", &[IGPU, GPU], None));
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("it is with win11"), "{}", r.stderr);
    assert_eq!(m.sim.short_log(), vec![]);
    assert_eq!(m.igpu_driver().as_deref(), Some("i915"));
}

#[test]
fn a_vm_with_two_gpus_whose_second_bind_fails_leaves_both_on_their_host_drivers() {
    let Some(m) = machine("allow_display = true") else {
        return;
    };
    // The iGPU (00:02.0) is bound first; the RTX's audio function then fails to probe.
    m.sim
        .mount
        .inject(FaultRule::fail(FileKind::DriversProbe, Errno::EINVAL).device(addr(fuse_gpu::AUDIO)));
    let both = domain("both", &[IGPU, GPU, fuse_gpu::AUDIO], None);
    let r = m.hook("both", "prepare", &both);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("GPU 0000:00:02.0 was returned to the host: both gets all of its GPUs or none"),
        "{}",
        r.stderr
    );
    assert_eq!(m.igpu_driver().as_deref(), Some("i915"));
    m.sim.assert_home();
    assert_eq!((m.record(IGPU), m.record(GPU)), (None, None));
    assert_eq!(m.state(IGPU)["phase"], "host");
    assert_eq!(m.state(IGPU)["vm"], serde_json::Value::Null);
    assert_eq!(m.state(GPU)["phase"], "host");
    // What libvirt runs after a failed prepare changes nothing.
    assert_eq!(m.hook("both", "release", &both).code, 0);
    m.sim.assert_home();
    assert_eq!(m.igpu_driver().as_deref(), Some("i915"));
}

#[test]
fn the_display_gpu_is_refused_with_the_reason_unless_the_config_allows_it() {
    let Some(m) = machine("") else { return };
    let mac = domain("macos", &[IGPU], None);
    let r = m.hook("macos", "prepare", &mac);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(
            "not handing GPU 0000:00:02.0 to macos: this GPU drives the desktop of this host \
             (the firmware booted on it (boot_vga = 1): it shows the host's console)"
        ),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("set allow_display = true in its [[gpu]]"),
        "{}",
        r.stderr
    );
    assert_eq!(m.sim.short_log(), vec![], "nothing written");
    assert_eq!(m.igpu_driver().as_deref(), Some("i915"));
    let refusal = &m.state(IGPU)["last_refusal"];
    assert_eq!(refusal["vm"], "macos");
    assert!(
        refusal["message"]
            .as_str()
            .unwrap()
            .contains("drives the desktop"),
        "{refusal}"
    );

    // The explicit override hands it.
    let m = machine("allow_display = true").unwrap();
    let r = m.hook("macos", "prepare", &mac);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    assert_eq!(m.igpu_driver().as_deref(), Some("vfio-pci"));
    assert_eq!(m.hook("macos", "release", &mac).code, 0);
    assert_eq!(m.igpu_driver().as_deref(), Some("i915"));
}

#[test]
fn a_display_server_holding_a_card_is_named_as_the_desktop_in_the_refusal() {
    let Some(m) = machine("") else { return };
    // The RTX is not the boot VGA device, but an X server runs on it.
    let xorg = named_holder::hold_named(&m.sim.dev("dri/card1"), b"Xorg", m.sim.tmp.path());
    let r = m.hook("win11", "prepare", &domain("win11", &RTX, None));
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!(
            "not handing GPU 0000:01:00.0 to win11: this GPU drives the desktop of this host (Xorg (pid {}) holds",
            xorg.pid()
        )),
        "{}",
        r.stderr
    );
    // The holder list follows, as for any holder.
    assert!(
        r.stderr.contains(&format!("Xorg (pid {}", xorg.pid())),
        "{}",
        r.stderr
    );
    m.sim.assert_home();
}

#[test]
fn a_macos_vm_given_an_nvidia_card_newer_than_kepler_is_warned_about() {
    let Some(m) = machine("allow_display = true") else {
        return;
    };
    let xml = domain("macos", &RTX, Some("http://apple.com/macos/14"));
    let r = m.hook("macos", "prepare", &xml);
    assert_eq!(r.code, 0, "a warning, not a refusal: {}", r.stderr);
    assert!(
        r.stderr.contains(
            "handoff: warning: macos is a macOS VM and GPU 0000:01:00.0 (NVIDIA GeForce RTX 3090 Ti) is an NVIDIA card \
             newer than Kepler: macOS has no driver for it"
        ),
        "{}",
        r.stderr
    );
    m.sim.assert_on_vfio();
    let r = m.hook("macos", "release", &xml);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "said once, at the start");
    // The iGPU draws no such warning.
    let r = m.hook(
        "macos",
        "prepare",
        &domain("macos", &[IGPU], Some("http://apple.com/macos/14")),
    );
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    assert_eq!(
        m.hook("macos", "release", &domain("macos", &[IGPU], None)).code,
        0
    );
}

#[test]
fn a_card_that_stays_on_vfio_pci_goes_to_one_vm_at_a_time_and_is_never_rebound() {
    // The homelab: the RTX 5070 Ti is isolated on vfio-pci from boot (host_driver
    // "vfio-pci"); VMs 140 (Windows) and 141 (Linux AI) take turns.
    let Some(sim) = fuse_gpu::mount(handoff::simulated_tree::SimSpec::homelab()) else {
        return;
    };
    let etc = sim.tmp.path().join("etc");
    fs::create_dir(&etc).unwrap();
    let host = sim.host();
    let config = etc.join("config.toml");
    fs::write(
        &config,
        format!(
            "[[gpu]]\naddress = \"{GPU}\"\nhost_driver = \"vfio-pci\"\nwatchdog_s = 1\n\n\
             [[vm]]\nname = \"140\"\n\n[[vm]]\nname = \"141\"\n\n\
             [host]\nsysfs = {:?}\nproc = \"/proc\"\ndev = {:?}\nrun = {:?}\nuninspectable_ok = {:?}\n",
            host.sysfs.display().to_string(),
            host.dev.display().to_string(),
            host.run.display().to_string(),
            host.uninspectable_ok,
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(&config, Some(0), Some(0)).unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    let m = Machine { sim, config };
    let on_vfio = |m: &Machine| {
        for f in RTX {
            assert_eq!(m.sim.driver(f).as_deref(), Some("vfio-pci"), "{f}");
        }
    };
    let win = domain("140", &RTX, None);
    let ai = domain("141", &RTX, None);

    let r = m.hook("140", "prepare", &win);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    on_vfio(&m);
    assert_eq!(m.record(GPU).unwrap().vm.as_deref(), Some("140"));
    let unbinds: Vec<(String, String)> = m
        .sim
        .short_log()
        .into_iter()
        .filter(|(file, _)| file.ends_with("unbind"))
        .collect();
    assert_eq!(unbinds, vec![], "a card on vfio-pci is not unbound to be handed");

    let r = m.hook("141", "prepare", &ai);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("it is with 140"), "{}", r.stderr);

    let r = m.hook("140", "release", &win);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    on_vfio(&m);
    assert_eq!(m.record(GPU), None, "released: free for the next VM");
    let r = m.hook("141", "prepare", &ai);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    assert_eq!(m.record(GPU).unwrap().vm.as_deref(), Some("141"));
    assert_eq!(m.hook("141", "release", &ai).code, 0);
    on_vfio(&m);
}

/// The hook as libvirtd runs it, started (not waited for).
fn spawn_hook(config: &std::path::Path, domain: &str, op: &str, xml: &str) -> std::process::Child {
    let sub = if op == "prepare" { "begin" } else { "end" };
    hook_run::spawn(env!("CARGO_BIN_EXE_handoff"), config, domain, op, sub, xml)
}

#[test]
fn two_vms_wanting_both_gpus_at_once_one_gets_both_and_neither_waits_on_the_other() {
    let Some(m) = machine("allow_display = true") else {
        return;
    };
    // Each lists the GPUs in another order: locking in the XML's order could deadlock.
    let xml = |vm: &str| match vm {
        "both" => domain(vm, &[IGPU, GPU, fuse_gpu::AUDIO], None),
        _ => domain(vm, &[GPU, fuse_gpu::AUDIO, IGPU], None),
    };
    for round in 0..3 {
        let started = std::time::Instant::now();
        let a = spawn_hook(&m.config, "both", "prepare", &xml("both"));
        let b = spawn_hook(&m.config, "linux-ai", "prepare", &xml("linux-ai"));
        let (a, b) = (finish(a), finish(b));
        // Locks are taken in address order: no start waits out the lock's bound (14 s with
        // a 1 s watchdog) for the other.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "round {round}: {:?}",
            started.elapsed()
        );
        let (winner, loser, lost) = match (a.code, b.code) {
            (0, 1) => ("both", "linux-ai", &b),
            (1, 0) => ("linux-ai", "both", &a),
            _ => panic!(
                "round {round}: exactly one start must succeed:\nboth {}: {}\nlinux-ai {}: {}",
                a.code, a.stderr, b.code, b.stderr
            ),
        };
        assert!(
            lost.stderr.contains(&format!("to {loser}: it is with {winner}")),
            "round {round}: {}",
            lost.stderr
        );
        m.sim.assert_on_vfio();
        assert_eq!(m.igpu_driver().as_deref(), Some("vfio-pci"));
        assert_eq!(m.record(IGPU).unwrap().vm.as_deref(), Some(winner));
        assert_eq!(m.record(GPU).unwrap().vm.as_deref(), Some(winner));

        // The loser's release leaves both with the winner; the winner's brings both home.
        assert_eq!(
            finish(spawn_hook(&m.config, loser, "release", &xml(loser))).code,
            0
        );
        m.sim.assert_on_vfio();
        let r = finish(spawn_hook(&m.config, winner, "release", &xml(winner)));
        assert_eq!(r.code, 0, "{}", r.stderr);
        m.sim.assert_home();
        assert_eq!(m.igpu_driver().as_deref(), Some("i915"));
        assert_eq!((m.record(IGPU), m.record(GPU)), (None, None));
    }
}
