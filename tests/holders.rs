//! Holders: real processes holding real device nodes of a simulated GPU (nodes are char
//! devices 1:3, the numbers of /dev/null), scanned through the real /proc. Parsers are
//! checked against fixture text under tests/fixtures/holders/.
//!
//! Every child is killed by pid when its guard drops, assertion failure or not. Each test
//! builds its own tree in its own temp dir, so tests run in parallel without seeing each
//! other's holders.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use handoff::Host;
use handoff::gpu::{Function, FunctionKind, Gpu, Owner};
use handoff::holders::{self, GpuNode, Holder, Scan, Verdict};
use handoff::pci::PciAddress;
use handoff::simulated_tree::{IGPU, RTX_3090_TI, SimHost, SimSpec};

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/holders")
        .join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn function(address: PciAddress, vendor: u16, kind: FunctionKind, driver: &str) -> Function {
    Function {
        address,
        kind,
        driver: Some(driver.into()),
        vendor,
        device: 0,
        class: 0,
        driver_override: None,
        locked: false,
        runtime_status: Some("active".into()),
        iommu_group: None,
    }
}

/// The workstation's RTX 3090 Ti as read_gpu would describe it.
fn rtx() -> Gpu {
    let f = |n, kind, driver| function(RTX_3090_TI.with_function(n), 0x10de, kind, driver);
    Gpu {
        address: RTX_3090_TI,
        name: Some("NVIDIA GeForce RTX 3090 Ti".into()),
        owner: Owner::Host,
        functions: vec![
            f(0, FunctionKind::Vga, "nvidia"),
            f(1, FunctionKind::Audio, "snd_hda_intel"),
            f(2, FunctionKind::Usb, "xhci_hcd"),
            f(3, FunctionKind::Serial, "nvidia-gpu"),
        ],
        iommu_group: None,
    }
}

fn igpu() -> Gpu {
    Gpu {
        address: IGPU,
        name: None,
        owner: Owner::Host,
        functions: vec![function(IGPU, 0x8086, FunctionKind::Vga, "i915")],
        iommu_group: None,
    }
}

struct Sim {
    _tmp: tempfile::TempDir,
    sim: SimHost,
}

impl Sim {
    fn new() -> Sim {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
        Sim { _tmp: tmp, sim }
    }
    fn host(&self) -> Host {
        self.sim.host()
    }
    fn dev(&self, node: &str) -> PathBuf {
        self.sim.dev().join(node)
    }
    fn scan(&self, gpu: &Gpu) -> Scan {
        let host = self.host();
        let nodes = holders::gpu_nodes(&host, gpu);
        holders::scan(&host, gpu, &nodes)
    }
}

/// A child process, killed and reaped by pid when dropped.
struct Guard(Child);

impl Guard {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sleep 600` with stdin read from `node` and stdout/stderr written to `more`. The fds
/// exist by the time spawn returns (it waits for exec).
fn hold(node: &Path, more: &[&Path]) -> Guard {
    let mut cmd = Command::new("sleep");
    cmd.arg("600").stdin(Stdio::from(File::open(node).unwrap()));
    let w = |p: &Path| Stdio::from(OpenOptions::new().write(true).open(p).unwrap());
    match more {
        [] => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
        [a] => cmd.stdout(w(a)).stderr(Stdio::null()),
        [a, b, ..] => cmd.stdout(w(a)).stderr(w(b)),
    };
    Guard(cmd.spawn().unwrap())
}

fn holder(scan: &Scan, pid: u32) -> Option<&Holder> {
    scan.holders.iter().find(|h| h.pid == pid)
}

#[test]
fn finds_the_workstation_gpus_nodes_and_not_the_igpus() {
    let s = Sim::new();
    let nodes: Vec<PathBuf> = holders::gpu_nodes(&s.host(), &rtx())
        .into_iter()
        .map(|n| n.path)
        .collect();
    let want: Vec<PathBuf> = [
        "dri/card1",
        "dri/renderD129",
        "i2c-3",
        "i2c-4",
        "i2c-5",
        "nvidia-modeset",
        "nvidia-uvm",
        "nvidia-uvm-tools",
        "nvidia0",
        "nvidiactl",
        "snd/controlC1",
        "snd/hwC1D0",
        "snd/pcmC1D3p",
        "snd/pcmC1D7p",
    ]
    .iter()
    .map(|n| s.dev(n))
    .collect::<std::collections::BTreeSet<_>>()
    .into_iter()
    .collect();
    assert_eq!(nodes, want);

    let igpu_nodes: Vec<PathBuf> = holders::gpu_nodes(&s.host(), &igpu())
        .into_iter()
        .map(|n| n.path)
        .collect();
    assert_eq!(
        igpu_nodes,
        vec![s.dev("dri/card0"), s.dev("dri/renderD128"), s.dev("i2c-0")]
    );
}

#[test]
fn the_nvidia_minor_comes_from_the_drivers_procfs_entry() {
    let s = Sim::new();
    let proc = s.sim.root.join("proc");
    let info = proc.join("driver/nvidia/gpus/0000:01:00.0");
    fs::create_dir_all(&info).unwrap();
    fs::write(info.join("information"), fixture("nvidia-information")).unwrap();
    fs::write(s.dev("nvidia1"), "").unwrap();
    let host = Host {
        procfs: proc,
        ..s.host()
    };
    let nodes: Vec<PathBuf> = holders::gpu_nodes(&host, &rtx())
        .into_iter()
        .map(|n| n.path)
        .collect();
    assert!(nodes.contains(&s.dev("nvidia1")), "{nodes:?}");
    assert!(!nodes.contains(&s.dev("nvidia0")), "{nodes:?}");
    assert!(nodes.contains(&s.dev("nvidiactl")));
}

#[test]
fn nvidia_caps_are_the_gpus_nodes_too() {
    let s = Sim::new();
    fs::create_dir_all(s.dev("nvidia-caps")).unwrap();
    fs::write(s.dev("nvidia-caps/nvidia-cap1"), "").unwrap();
    let nodes = holders::gpu_nodes(&s.host(), &rtx());
    assert!(nodes.contains(&GpuNode {
        path: s.dev("nvidia-caps/nvidia-cap1")
    }));
}

#[test]
fn reports_a_cuda_job_holding_nvidia_nodes_with_pid_command_user() {
    let s = Sim::new();
    let job = hold(&s.dev("nvidia0"), &[&s.dev("nvidiactl"), &s.dev("nvidia-uvm")]);
    let scan = s.scan(&rtx());
    let h = holder(&scan, job.pid()).unwrap_or_else(|| panic!("not found: {scan:#?}"));
    assert_eq!(h.command, "sleep");
    assert_eq!(h.cmdline, ["sleep", "600"]);
    assert_eq!(h.uid, 0);
    assert_eq!(h.user, "root");
    assert_eq!(
        h.paths,
        [s.dev("nvidia-uvm"), s.dev("nvidia0"), s.dev("nvidiactl")]
    );
    assert_eq!(h.reason, None);
    assert!(
        h.summary()
            .starts_with(&format!("sleep (pid {}, user root", job.pid())),
        "{}",
        h.summary()
    );
    assert!(
        h.summary()
            .contains(&format!("holds {}", s.dev("nvidia-uvm").display()))
    );
    // Holders come sorted by pid.
    assert!(scan.holders.windows(2).all(|w| w[0].pid < w[1].pid));
}

#[test]
fn reports_the_user_a_holder_runs_as() {
    use std::os::unix::process::CommandExt;
    let s = Sim::new();
    let node = s.dev("dri/renderD129");
    let child = Guard(
        Command::new("sleep")
            .arg("600")
            .stdin(Stdio::from(File::open(&node).unwrap()))
            .uid(65534)
            .gid(65534)
            .spawn()
            .unwrap(),
    );
    let scan = s.scan(&rtx());
    let h = holder(&scan, child.pid()).expect("holder running as another user");
    assert_eq!(h.uid, 65534);
    assert_eq!(h.user, holders::user_name(65534));
    assert_ne!(h.user, "65534", "nobody is in /etc/passwd");
    assert_eq!(h.paths, [node]);
}

#[test]
fn a_holder_of_the_igpu_render_node_is_not_the_dgpus() {
    let s = Sim::new();
    let desktop = hold(&s.dev("dri/renderD128"), &[&s.dev("dri/card0"), &s.dev("i2c-0")]);
    let scan = s.scan(&rtx());
    assert!(holder(&scan, desktop.pid()).is_none(), "{scan:#?}");
    let scan = s.scan(&igpu());
    assert_eq!(
        holder(&scan, desktop.pid()).unwrap().paths,
        [s.dev("dri/card0"), s.dev("dri/renderD128"), s.dev("i2c-0")]
    );
}

#[test]
fn a_holder_that_exits_is_gone_from_the_next_scan() {
    let s = Sim::new();
    let mut job = hold(&s.dev("nvidia0"), &[]);
    let pid = job.pid();
    assert!(holder(&s.scan(&rtx()), pid).is_some());
    job.0.kill().unwrap();
    job.0.wait().unwrap();
    assert!(holder(&s.scan(&rtx()), pid).is_none());
}

#[test]
fn a_process_holding_dev_null_is_not_a_holder_though_the_numbers_match() {
    let s = Sim::new();
    let quiet = hold(Path::new("/dev/null"), &[Path::new("/dev/null")]);
    let scan = s.scan(&rtx());
    assert!(holder(&scan, quiet.pid()).is_none(), "{scan:#?}");
}

#[test]
fn finds_a_holder_of_the_audio_function() {
    let s = Sim::new();
    let pulse = hold(&s.dev("snd/pcmC1D3p"), &[&s.dev("snd/controlC1")]);
    let scan = s.scan(&rtx());
    assert_eq!(
        holder(&scan, pulse.pid()).unwrap().paths,
        [s.dev("snd/controlC1"), s.dev("snd/pcmC1D3p")]
    );
}

#[test]
fn a_holder_of_the_gpus_framebuffer_device_is_a_holder() {
    let s = Sim::new();
    // DRM's fbdev emulation registers fb0 under the VGA function (graphics/fb0).
    let fb = s.sim.add_framebuffer(RTX_3090_TI, 0).unwrap();
    let nodes: Vec<PathBuf> = holders::gpu_nodes(&s.host(), &rtx())
        .into_iter()
        .map(|n| n.path)
        .collect();
    assert!(nodes.contains(&fb), "{nodes:?}");
    assert!(
        !holders::gpu_nodes(&s.host(), &igpu())
            .iter()
            .any(|n| n.path == fb),
        "not the iGPU's"
    );
    let console_user = hold(&fb, &[]);
    let scan = s.scan(&rtx());
    assert_eq!(holder(&scan, console_user.pid()).unwrap().paths, [fb]);
    assert!(
        matches!(scan.verdict(), Verdict::Held { .. }),
        "a framebuffer holder refuses"
    );
}

#[test]
fn finds_a_holder_of_the_gpus_i2c_bus() {
    let s = Sim::new();
    let powerdevil = hold(&s.dev("i2c-5"), &[]);
    let scan = s.scan(&rtx());
    assert_eq!(holder(&scan, powerdevil.pid()).unwrap().paths, [s.dev("i2c-5")]);
}

#[test]
fn finds_a_holder_through_another_path_to_the_same_inode() {
    // What a container sees: the same node under another path. A hard link stands in for
    // the other mount namespace; only the inode says it is ours.
    let s = Sim::new();
    let elsewhere = s.sim.root.join("container/dev");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::hard_link(s.dev("nvidia0"), elsewhere.join("nvidia0")).unwrap();
    let job = hold(&elsewhere.join("nvidia0"), &[]);
    let scan = s.scan(&rtx());
    assert_eq!(holder(&scan, job.pid()).unwrap().paths, [s.dev("nvidia0")]);
}

#[test]
fn a_same_named_node_of_another_tree_is_not_ours() {
    let s = Sim::new();
    let other = Sim::new();
    let job = hold(&other.dev("nvidia0"), &[]);
    assert!(holder(&s.scan(&rtx()), job.pid()).is_none());
}

#[test]
fn reports_the_systemd_unit_of_a_holder() {
    let s = Sim::new();
    let job = hold(&s.dev("nvidia0"), &[]);
    let scan = s.scan(&rtx());
    let h = holder(&scan, job.pid()).unwrap();
    let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", job.pid())).unwrap();
    assert_eq!(h.unit, holders::parse_cgroup_unit(&cgroup));
}

// --- A fake procfs: nvidia-persistenced and boot framebuffers. ----------------------------

/// How the fake process's fds look.
enum FakeFds<'a> {
    /// `fd` can't be read (here: it is not a directory), as another user's are.
    Unreadable,
    /// `fd/3` links to this node.
    Holding(&'a Path),
    /// An empty fd directory.
    None,
}

/// A procfs with one process (pid 812) that has the given comm, and the given iomem.
fn fake_proc(root: &Path, comm: &str, fds: FakeFds, iomem: &str) -> PathBuf {
    let proc = root.join("fakeproc");
    let pid = proc.join("812");
    fs::create_dir_all(&pid).unwrap();
    match fds {
        FakeFds::Unreadable => fs::write(pid.join("fd"), "").unwrap(),
        FakeFds::Holding(node) => {
            fs::create_dir_all(pid.join("fd")).unwrap();
            std::os::unix::fs::symlink(fs::canonicalize(node).unwrap(), pid.join("fd/3")).unwrap();
        }
        FakeFds::None => fs::create_dir_all(pid.join("fd")).unwrap(),
    }
    fs::write(pid.join("comm"), format!("{comm}\n")).unwrap();
    fs::write(
        pid.join("cmdline"),
        "/usr/bin/nvidia-persistenced\0--user\0nvidia-persistenced\0",
    )
    .unwrap();
    fs::write(pid.join("status"), format!("Name:\t{comm}\nUid:\t0\t0\t0\t0\n")).unwrap();
    fs::write(pid.join("cgroup"), fixture("cgroup-hybrid")).unwrap();
    fs::write(proc.join("iomem"), iomem).unwrap();
    proc
}

fn persistenced_scan(s: &Sim, fds: FakeFds) -> Scan {
    let host = Host {
        procfs: fake_proc(
            &s.sim.root,
            "nvidia-persiste",
            fds,
            &fixture("iomem-simpledrm-igpu"),
        ),
        ..s.host()
    };
    holders::scan(&host, &rtx(), &holders::gpu_nodes(&host, &rtx()))
}

#[test]
fn nvidia_persistenced_is_a_holder_even_when_its_fds_cannot_be_read() {
    let s = Sim::new();
    let scan = persistenced_scan(&s, FakeFds::Unreadable);
    assert_eq!(scan.uninspected, 1);
    assert_eq!(scan.holders.len(), 1, "{scan:#?}");
    let h = &scan.holders[0];
    assert_eq!((h.pid, h.command.as_str()), (812, "nvidia-persiste"));
    assert_eq!(h.unit.as_deref(), Some("nvidia-persistenced.service"));
    assert!(h.paths.is_empty());
    assert!(
        h.reason
            .as_deref()
            .unwrap()
            .contains("systemctl stop nvidia-persistenced")
    );
    assert!(h.summary().contains("persistence mode"), "{}", h.summary());
    // The iGPU's simpledrm is not on the 3090 Ti.
    assert!(scan.framebuffers.is_empty());
    assert!(scan.notes.is_empty(), "{:?}", scan.notes);
}

#[test]
fn nvidia_persistenced_holding_nodes_says_why() {
    let s = Sim::new();
    let scan = persistenced_scan(&s, FakeFds::Holding(&s.dev("nvidia0")));
    assert_eq!(scan.uninspected, 0);
    let h = &scan.holders[0];
    assert_eq!(h.paths, [s.dev("nvidia0")]);
    assert!(h.reason.is_some());
}

#[test]
fn persistenced_is_none_of_an_igpus_business() {
    let s = Sim::new();
    let host = Host {
        procfs: fake_proc(&s.sim.root, "nvidia-persiste", FakeFds::Unreadable, ""),
        ..s.host()
    };
    let scan = holders::scan(&host, &igpu(), &holders::gpu_nodes(&host, &igpu()));
    assert!(scan.holders.is_empty());
    assert_eq!(scan.uninspected, 1);
}

#[test]
fn efifb_on_the_gpus_bar_is_a_holder_without_a_process() {
    let s = Sim::new();
    let host = Host {
        procfs: fake_proc(&s.sim.root, "bash", FakeFds::None, &fixture("iomem-efifb")),
        ..s.host()
    };
    let scan = holders::scan(&host, &rtx(), &holders::gpu_nodes(&host, &rtx()));
    assert!(scan.holders.is_empty());
    assert_eq!(scan.framebuffers.len(), 1, "{scan:#?}");
    let fb = &scan.framebuffers[0];
    assert_eq!((fb.name.as_str(), fb.function), ("efifb", RTX_3090_TI));
    assert_eq!((fb.start, fb.end), (0xfb000000, 0xfb2fffff));
    assert_eq!(
        scan.verdict(),
        Verdict::Held {
            unchecked: Vec::new()
        }
    );
    assert!(scan.summary_lines()[0].starts_with("efifb (boot framebuffer) holds 0000:01:00.0"));
}

#[test]
fn iomem_without_addresses_is_a_note_not_a_clean_bill() {
    let s = Sim::new();
    let host = Host {
        procfs: fake_proc(&s.sim.root, "bash", FakeFds::None, &fixture("iomem-redacted")),
        ..s.host()
    };
    let scan = holders::scan(&host, &rtx(), &holders::gpu_nodes(&host, &rtx()));
    assert!(scan.framebuffers.is_empty());
    assert_eq!(scan.notes.len(), 1);
    assert!(scan.notes[0].contains("not checked"), "{}", scan.notes[0]);
    assert_eq!(
        scan.verdict(),
        Verdict::Unchecked {
            what: scan.notes.clone()
        }
    );
}

// --- The gate fails closed. ----------------------------------------------------------------

#[test]
fn a_process_whose_fds_even_root_cannot_read_makes_the_scan_unchecked_naming_it() {
    // A container's PID 1 seen from a confined hook: its fd directory gives an error even
    // to root (here: `fd` is a file, which fails for root too).
    let s = Sim::new();
    let host = Host {
        procfs: fake_proc(&s.sim.root, "containerd-shim", FakeFds::Unreadable, ""),
        ..s.host()
    };
    let scan = holders::scan(&host, &rtx(), &holders::gpu_nodes(&host, &rtx()));
    assert!(
        scan.holders.is_empty() && scan.framebuffers.is_empty(),
        "{scan:#?}"
    );
    assert_eq!(scan.uninspected, 1);
    let Verdict::Unchecked { what } = scan.verdict() else {
        panic!("a process nobody looked at must not make the GPU free: {scan:#?}")
    };
    assert_eq!(what.len(), 1, "{what:?}");
    // The tests run as root, like the hook.
    assert!(
        what[0].starts_with("1 process could not be inspected even as root: pid 812 (containerd-shim)"),
        "{what:?}"
    );
    assert!(
        what[0].contains("CAP_SYS_PTRACE"),
        "says how to let it look: {what:?}"
    );
}

#[test]
fn a_kernel_thread_with_no_fds_is_inspected_and_holds_nothing() {
    // As root a kernel thread's fd directory lists empty: looked at, nothing held.
    let s = Sim::new();
    let host = Host {
        procfs: fake_proc(&s.sim.root, "kworker/0:1", FakeFds::None, ""),
        ..s.host()
    };
    let scan = holders::scan(&host, &rtx(), &holders::gpu_nodes(&host, &rtx()));
    assert_eq!(scan.uninspected, 0);
    assert_eq!(scan.verdict(), Verdict::Clear, "{scan:#?}");
}

#[test]
fn a_proc_that_cannot_be_listed_is_unchecked() {
    let s = Sim::new();
    let host = Host {
        procfs: s.sim.root.join("no-such-proc"),
        ..s.host()
    };
    let scan = holders::scan(&host, &rtx(), &holders::gpu_nodes(&host, &rtx()));
    let Verdict::Unchecked { what } = scan.verdict() else {
        panic!("an unreadable /proc must not make the GPU free: {scan:#?}")
    };
    assert!(
        what.iter()
            .any(|w| w.contains("cannot list processes in") && w.contains("holders were not checked")),
        "{what:?}"
    );
}

#[test]
fn no_device_nodes_for_a_gpu_on_its_driver_is_unchecked_naming_host_dev() {
    // `[host] dev` pointing where the nodes are not: a scan of no nodes finds no holder.
    let s = Sim::new();
    let empty = s.sim.root.join("empty-dev");
    fs::create_dir_all(&empty).unwrap();
    let host = Host {
        dev: empty.clone(),
        ..s.host()
    };
    let job = hold(&s.dev("nvidia0"), &[]);
    let nodes = holders::gpu_nodes(&host, &rtx());
    assert_eq!(nodes, []);
    let scan = holders::scan(&host, &rtx(), &nodes);
    assert!(holder(&scan, job.pid()).is_none());
    let Verdict::Unchecked { what } = scan.verdict() else {
        panic!("no nodes found must not make the GPU free: {scan:#?}")
    };
    let want = format!(
        "no device nodes of GPU 0000:01:00.0 were found under {}",
        empty.display()
    );
    assert!(
        what.iter()
            .any(|w| w.starts_with(&want) && w.contains("[host] dev")),
        "{what:?}"
    );

    // A GPU with no driver has no nodes: nothing to check there, nothing missing.
    let unbound = Gpu {
        owner: Owner::Unbound,
        functions: rtx()
            .functions
            .into_iter()
            .map(|f| Function { driver: None, ..f })
            .collect(),
        ..rtx()
    };
    let scan = holders::scan(&host, &unbound, &[]);
    assert!(scan.notes.is_empty(), "{:?}", scan.notes);
}

#[test]
fn unprivileged_the_verdict_says_how_many_and_to_run_as_root() {
    let text = holders::uninspected_text(3, &[], false);
    assert_eq!(
        text,
        "3 processes could not be inspected: run as root to see them"
    );
}

// --- Parsers against fixture text. ---------------------------------------------------------

#[test]
fn cgroup_unit_is_the_last_service_or_scope() {
    let unit = |f| holders::parse_cgroup_unit(&fixture(f));
    assert_eq!(unit("cgroup-service").as_deref(), Some("ollama.service"));
    assert_eq!(
        unit("cgroup-user-scope").as_deref(),
        Some("app-firefox-123.scope")
    );
    assert_eq!(unit("cgroup-root"), None);
    assert_eq!(unit("cgroup-init").as_deref(), Some("init.scope"));
    assert_eq!(
        unit("cgroup-hybrid").as_deref(),
        Some("nvidia-persistenced.service")
    );
    assert_eq!(unit("cgroup-v1").as_deref(), Some("session-2.scope"));
    assert_eq!(unit("cgroup-container").as_deref(), Some("docker-4f1c.scope"));
    assert_eq!(holders::parse_cgroup_unit(""), None);
}

#[test]
fn status_cmdline_and_nvidia_information_parse() {
    assert_eq!(holders::parse_status_uid(&fixture("status")), Some(1000));
    assert_eq!(
        holders::parse_status_name(&fixture("status")).as_deref(),
        Some("python3")
    );
    assert_eq!(
        holders::parse_status_name("Name:\ta\\\\b\\nc\n").as_deref(),
        Some("a\\b\nc")
    );
    assert_eq!(
        holders::parse_cmdline(fixture("cmdline").as_bytes()),
        ["python3", "-m", "ollama", "serve"]
    );
    assert!(holders::parse_cmdline(b"").is_empty());
    assert_eq!(
        holders::parse_nvidia_minor(&fixture("nvidia-information")),
        Some(1)
    );
    assert_eq!(holders::parse_nvidia_minor("Model: x\n"), None);
}

#[test]
fn iomem_and_resource_parse() {
    let regions = holders::parse_iomem(&fixture("iomem-efifb"));
    let efifb = regions.iter().find(|r| r.name == "efifb").unwrap();
    assert_eq!((efifb.start, efifb.end, efifb.depth), (0xfb000000, 0xfb2fffff, 3));
    assert!(!holders::iomem_is_redacted(&regions));
    assert!(holders::iomem_is_redacted(&holders::parse_iomem(&fixture(
        "iomem-redacted"
    ))));
    assert_eq!(
        holders::parse_resource(&fixture("resource-3090ti")),
        [
            (0xfb000000, 0xfbffffff),
            (0x6000000000, 0x67ffffffff),
            (0xf000, 0xf07f),
            (0xfc000000, 0xfc07ffff)
        ]
    );
    for name in ["efifb", "simpledrm", "BOOTFB", "vesafb", "simple-framebuffer.0"] {
        assert!(holders::is_boot_framebuffer(name), "{name}");
    }
    assert!(!holders::is_boot_framebuffer("nvidia"));
}

#[test]
fn summary_is_one_short_line() {
    let h = Holder {
        pid: 4242,
        command: "python3".into(),
        cmdline: vec!["python3".into()],
        uid: 1000,
        user: "alice".into(),
        unit: Some("ollama.service".into()),
        paths: vec!["/dev/nvidia0".into(), "/dev/nvidiactl".into()],
        reason: None,
        vm: None,
        container: None,
    };
    assert_eq!(
        h.summary(),
        "python3 (pid 4242, user alice, ollama.service) holds /dev/nvidia0, /dev/nvidiactl"
    );
    let many = Holder {
        unit: None,
        paths: (0..6).map(|i| PathBuf::from(format!("/dev/i2c-{i}"))).collect(),
        ..h
    };
    assert_eq!(
        many.summary(),
        "python3 (pid 4242, user alice) holds /dev/i2c-0, /dev/i2c-1, /dev/i2c-2 and 3 more"
    );
    assert!(!many.summary().contains('\n'));
}
