//! `handoff demo`: the product on a machine without a passthrough GPU (features
//! `kernel-sim` and `libvirt`).
//!
//! What is simulated, all inside this process and a temporary directory:
//! - the kernel: [`handoff_kernelsim`]'s sysfs (an RTX 3090 Ti at 0000:01:00.0 on `nvidia`,
//!   `vfio-pci` loaded) mounted with FUSE, and its `/dev`;
//! - libvirt: the built-in test driver (`test:///<dir>/demo-node.xml`) with a shut-off
//!   "Windows" domain `win11`. That driver runs no hooks and each process has its own copy,
//!   so VMs are started and stopped through the simulated hypervisor
//!   ([`crate::simulated`]), which runs the hook's logic in the process that
//!   starts or stops the VM, refusing or binding exactly as libvirtd's hook would, and
//!   writing the hook's state file the bar reads. The walkthrough builds one itself; the
//!   tray (and its agent) gets [`handoff::hypervisor::SIMULATED_ENV`] from the demo;
//! - a GPU user: `cuda-training`, a real child process holding `<dev>/nvidia0` open.
//!
//! With a display, `handoff-tray` (beside this binary) is started on the demo config and
//! owns "the VM"; `handoff-block --watch` (beside it too) runs as a bar would run it, and
//! its lines, one per change, are printed in the terminal as they come. `--script` (and the
//! walkthrough a headless machine wants) does the clicks itself: start (refused, naming
//! cuda-training), terminate cuda-training, start (GPU to vfio-pci), stop (GPU home on
//! nvidia).
//!
//! The main thread sleeps in `sigwaitinfo` (no timer): SIGINT, SIGTERM and SIGHUP end the
//! demo, SIGCHLD says which child ended, SIGUSR1 is the walkthrough finishing. At the end
//! every process of the demo's process group (its children and anything they started) is
//! killed, the mount is unmounted and the directory removed.

use std::io::{self, BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal, kill, killpg};
use nix::unistd::Pid;

use crate::simulated::Simulated;
use crate::vm::Ctl;
use handoff::config::Config;
use handoff::hypervisor::SIMULATED_ENV;
use handoff::simulated_tree::SimSpec;
use handoff_kernelsim::Kernel;
use handoff_kernelsim::fuse::SimMount;

/// The demo GPU user's command name, as `ps` and the refusal show it.
pub const HOLDER_NAME: &str = "cuda-training";

/// How `handoff demo` runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Do the walkthrough itself and exit, instead of waiting for clicks and signals.
    pub script: bool,
    /// Start `handoff-tray` (when found beside the running binary).
    pub tray: bool,
}

/// Whether a graphical session is reachable (where a tray could show).
pub fn have_display() -> bool {
    ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Body of the hidden `handoff demo-holder NODE`: name this process `cuda-training`, hold
/// `node` open and sleep until killed.
pub fn hold(node: &Path) -> io::Result<()> {
    let name = std::ffi::CString::new(HOLDER_NAME).expect("no NUL");
    // What ps and the holder scan show; a name the kernel would cut (16 bytes) still works.
    let _ = nix::sys::prctl::set_name(&name);
    let _f = std::fs::File::open(node)?;
    loop {
        nix::unistd::pause();
    }
}

/// The signals the demo's main thread waits for: the three that end it, `SIGCHLD` (a child
/// ended: say so, reap it) and `SIGUSR1` (the scripted walkthrough finished).
fn wait_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGCHLD,
        Signal::SIGUSR1,
    ] {
        set.add(s);
    }
    set
}

/// One process the demo started.
struct Started {
    /// How the terminal names it: "cuda-training", "handoff-tray", "handoff-block".
    name: &'static str,
    child: Child,
    /// Said (or not worth saying) that it ended.
    ended: bool,
}

/// Everything the demo made, undone on drop: its processes (one process group, the first
/// child's, so whatever they start in turn goes with them), the FUSE mount, the directory.
struct Stage {
    root: PathBuf,
    config: PathBuf,
    mount: Option<SimMount>,
    children: Vec<Started>,
    pgid: Option<i32>,
}

impl Stage {
    /// Reaps the children that ended; returns what to say about each (nothing for those
    /// already said, or when `quiet`).
    fn reap(&mut self, quiet: bool) -> Vec<String> {
        let mut said = Vec::new();
        for s in &mut self.children {
            if s.ended {
                continue;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                s.ended = true;
                if !quiet {
                    said.push(format!("{} (pid {}) ended ({status})", s.name, s.child.id()));
                }
            }
        }
        said
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) -> io::Result<&mut Child> {
        // The demo's context for what it starts: its config, and its simulated hypervisor
        // for any VM action (the tray's agent inherits both).
        cmd.process_group(self.pgid.unwrap_or(0))
            .env("HANDOFF_CONFIG", &self.config)
            .env(SIMULATED_ENV, "1");
        // std's spawn keeps the parent's signal mask, where the demo's signals are blocked.
        // A demo killed outright (SIGKILL) cannot clean up: its children then end with it.
        // SAFETY: the closure runs between fork and exec, so it may only make
        // async-signal-safe calls: nix's SigSet::empty, thread_set_mask and set_pdeathsig are
        // sigemptyset on the stack, pthread_sigmask and prctl, with no allocation or lock.
        unsafe {
            cmd.pre_exec(|| {
                let _ = SigSet::empty().thread_set_mask();
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name}: {e}")))?;
        self.pgid.get_or_insert(child.id() as i32);
        self.children.push(Started {
            name,
            child,
            ended: false,
        });
        Ok(&mut self.children.last_mut().expect("just pushed").child)
    }

    /// Ends the process group: SIGTERM, up to 3 s, then SIGKILL; waits until no process
    /// of the group is left (the children's own children included) or gives up after 2 s
    /// more, saying so.
    fn end_processes(&mut self) {
        let Some(pgid) = self.pgid else { return };
        // The group is the demo's own.
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
        let gone = |stage: &mut Stage, limit: Duration| {
            let until = Instant::now() + limit;
            loop {
                stage.reap(true);
                if group_members(pgid).is_empty() {
                    return true;
                }
                if Instant::now() >= until {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        if gone(self, Duration::from_secs(3)) {
            return;
        }
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        if !gone(self, Duration::from_secs(2)) {
            eprintln!(
                "handoff demo: processes {:?} of process group {pgid} did not end on SIGKILL",
                group_members(pgid)
            );
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.end_processes();
        let mountpoint = self.mount.as_ref().map(|m| m.path().to_owned());
        if let Some(m) = self.mount.take() {
            m.unmount();
        }
        if let Some(mp) = mountpoint
            && is_mounted(&mp)
        {
            eprintln!(
                "handoff demo: {} is still mounted; leaving {} (umount -l it, then remove it)",
                mp.display(),
                self.root.display()
            );
            return;
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The live (not zombie) processes of process group `pgid`, from `/proc/<pid>/stat`.
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // After the command's closing parenthesis: state, ppid, pgrp, …
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                return false;
            };
            let mut f = rest.split(' ');
            let state = f.next().unwrap_or("");
            let pgrp = f.nth(1).and_then(|g| g.parse::<i32>().ok());
            pgrp == Some(pgid) && state != "Z" && state != "X"
        })
        .collect()
}

/// Whether `path` is a mount point, from `/proc/self/mountinfo`.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m.replace("\\040", " ") == want)
}

fn node_xml() -> String {
    "<!-- handoff demo: libvirt's test driver. `win11` (the RTX) and `macos` (the iGPU) are
     shut off (test:runstate 5). -->
<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>win11</name>
    <memory unit='GiB'>16</memory>
    <vcpu>8</vcpu>
    <os><type>hvm</type></os>
    <devices>
      <hostdev mode='subsystem' type='pci' managed='no'>
        <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
      </hostdev>
      <shmem name='looking-glass'>
        <model type='ivshmem-plain'/>
        <size unit='M'>64</size>
      </shmem>
    </devices>
    <test:runstate>5</test:runstate>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>macos</name>
    <metadata>
      <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>
        <libosinfo:os id='http://apple.com/macos/14'/>
      </libosinfo:libosinfo>
    </metadata>
    <memory unit='GiB'>8</memory>
    <vcpu>4</vcpu>
    <os><type>hvm</type></os>
    <devices>
      <hostdev mode='subsystem' type='pci' managed='no'>
        <source><address domain='0x0000' bus='0x00' slot='0x02' function='0x0'/></source>
      </hostdev>
    </devices>
    <test:runstate>5</test:runstate>
  </domain>
</node>
"
    .to_owned()
}

/// The demo's config. `uninspectable` goes to `[host] uninspectable_ok`: the processes this
/// machine's root cannot inspect (PID 1 of a container the demo runs in), which the holder
/// check would otherwise refuse every start on. The demo is about its own simulated GPU and
/// the holder it starts; a real hook names those processes and refuses.
fn config_toml(root: &Path, sysfs: &Path, uninspectable: &[String]) -> String {
    let q = |p: &Path| toml::Value::String(p.to_string_lossy().into_owned()).to_string();
    let list = toml::Value::Array(uninspectable.iter().cloned().map(toml::Value::String).collect());
    format!(
        "# handoff demo: a simulated host (see `handoff demo --help`). Removed when the demo ends.
[[gpu]]
address = \"0000:01:00.0\"
host_driver = \"nvidia\"
watchdog_s = 5

# The iGPU, for the macOS VM. It shows this simulated host's console (boot_vga), so it is
# handed only because the config says so.
[[gpu]]
address = \"0000:00:02.0\"
label = \"UHD 770\"
host_driver = \"i915\"
watchdog_s = 5
allow_display = true

[[vm]]
name = \"win11\"
label = \"Windows\"
uri = {uri}
shutdown_timeout_s = 10

[[vm]]
name = \"macos\"
label = \"macOS\"
uri = {uri}
shutdown_timeout_s = 10

[host]
sysfs = {sysfs}
dev = {dev}
run = {run}
uninspectable_ok = {list}
",
        uri = toml::Value::String(format!("test://{}", root.join("demo-node.xml").display())),
        sysfs = q(sysfs),
        dev = q(&root.join("dev")),
        run = q(&root.join("run")),
    )
}

fn holds(pid: u32, node: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == node))
}

fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// One line: where the GPU is, who holds it, what the hook last did.
fn status_line(cfg: &Config) -> String {
    let host = &cfg.host;
    let g = match handoff::gpu::read_gpu(host, cfg.gpu.address) {
        Ok(g) => g,
        Err(e) => return format!("GPU: {e}"),
    };
    let mut line = format!("GPU {} {}", g.address, g.owner_phrase());
    let nodes = handoff::holders::gpu_nodes(host, &g);
    let scan = handoff::holders::scan(host, &g, &nodes);
    if !scan.holders.is_empty() {
        let who: Vec<String> = scan
            .holders
            .iter()
            .map(|h| format!("{} (pid {})", h.command, h.pid))
            .collect();
        line += &format!(" · used by {}", who.join(", "));
    }
    if let Some(s) = handoff::state::HookState::load(host) {
        if let Some(vm) = &s.vm {
            line += &format!(" · hook: {} for {vm}", format!("{:?}", s.phase).to_lowercase());
        } else {
            line += &format!(" · hook: {}", format!("{:?}", s.phase).to_lowercase());
        }
    }
    line
}

/// Run the demo; returns the process exit code. `exe` is the `handoff-vm` binary (for the
/// demo GPU user), `bin_dir` where `handoff-tray` and `handoff-block` are looked for.
pub fn run(opts: &Options, exe: &Path, bin_dir: &Path) -> io::Result<u8> {
    // Block the signals the main thread waits for before any thread exists (the FUSE
    // server, libvirt's, the walkthrough), so every thread inherits the mask and
    // `sigwaitinfo` below is where they arrive. Children get an empty mask (Stage::spawn).
    // SIGCHLD must not be ignored (an inherited SIG_IGN would reap children unseen).
    let signals = wait_signals();
    // SAFETY: SIG_DFL installs no handler of ours, so nothing of this process runs in a
    // signal context; called before this function starts threads.
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGCHLD, nix::sys::signal::SigHandler::SigDfl) };
    let _ = signals.thread_block();

    let root = std::env::temp_dir().join(format!("handoff-demo-{}", std::process::id()));
    std::fs::create_dir(&root)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", root.display())))?;
    let config_path = root.join("config.toml");
    let mut stage = Stage {
        root: root.clone(),
        config: config_path.clone(),
        mount: None,
        children: Vec::new(),
        pgid: None,
    };
    let kernel = Kernel::build(&root, SimSpec::workstation())?;
    let sysfs = root.join("sysfs");
    std::fs::create_dir(&sysfs)?;
    stage.mount = Some(SimMount::mount(kernel, &sysfs)?);
    std::fs::create_dir_all(root.join("run"))?;
    std::fs::write(root.join("demo-node.xml"), node_xml())?;
    let uninspectable = handoff::holders::uninspectable_now(Path::new("/proc"));
    if !uninspectable.is_empty() {
        eprintln!(
            "handoff demo: even root cannot inspect {} here; the demo passes over them, a real hook would refuse",
            uninspectable.join(", ")
        );
    }
    std::fs::write(&config_path, config_toml(&root, &sysfs, &uninspectable))?;
    let cfg = Config::load_file(&config_path).map_err(|e| io::Error::other(e.to_string()))?;

    let node = root.join("dev/nvidia0");
    let holder = stage
        .spawn(
            HOLDER_NAME,
            Command::new(exe)
                .arg0(HOLDER_NAME)
                .arg("demo-holder")
                .arg(&node)
                .stdin(Stdio::null()),
        )?
        .id();
    let until = Instant::now() + Duration::from_secs(5);
    while !holds(holder, &node) {
        if Instant::now() > until || ended(holder) {
            return Err(io::Error::other(format!(
                "the demo GPU user (pid {holder}) did not open {}",
                node.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    println!(
        "handoff demo: a simulated workstation, in {dir} (removed at the end)

  simulated  the kernel's sysfs with an RTX 3090 Ti at 0000:01:00.0 on nvidia, mounted at
             {sysfs} (FUSE; writes act like the kernel's)
  simulated  libvirt: its built-in test driver with a shut-off VM \"Windows\" (win11); the
             libvirt hook's logic runs in the process that starts the VM
  real       {HOLDER_NAME} (pid {holder}), a process holding {node} open, like a CUDA job
  real       handoff itself: the same checks, refusal, bind and return as on real hardware

  config     HANDOFF_CONFIG={config}",
        dir = root.display(),
        sysfs = sysfs.display(),
        node = node.display(),
        config = config_path.display(),
    );

    setup_dry_run(exe, &root, &cfg);

    let worker = if opts.script {
        let cfg = cfg.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Declared first, dropped last: after the result is sent, or after `tx` is
            // dropped by a panic, so the main thread finds one or the other.
            let _wake = WakeMain;
            let tx = tx;
            let _ = tx.send(walkthrough(&cfg, holder));
        });
        Some(rx)
    } else {
        start_tray_and_block(opts, &mut stage, bin_dir, &config_path)?;
        None
    };
    io::stdout().flush()?;

    let code = loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => {
                for line in stage.reap(worker.is_some()) {
                    println!("  {line}");
                }
            }
            Ok(Signal::SIGUSR1) => match worker.as_ref().map(std::sync::mpsc::Receiver::try_recv) {
                Some(Ok(Ok(()))) => break 0,
                Some(Ok(Err(e))) => {
                    eprintln!("handoff demo: {e}");
                    break 1;
                }
                Some(Err(std::sync::mpsc::TryRecvError::Disconnected)) => {
                    eprintln!("handoff demo: the walkthrough ended without a result");
                    break 1;
                }
                // Not the walkthrough's signal.
                Some(Err(std::sync::mpsc::TryRecvError::Empty)) | None => {}
            },
            Ok(s) => {
                println!(
                    "\nhandoff demo: signal {}: stopping, removing {}",
                    s as i32,
                    root.display()
                );
                break 130;
            }
            Err(errno) => {
                let e = io::Error::from(errno);
                if e.kind() != io::ErrorKind::Interrupted {
                    drop(stage);
                    return Err(io::Error::new(e.kind(), format!("waiting for signals: {e}")));
                }
            }
        }
    };
    drop(stage);
    Ok(code)
}

/// What `handoff setup --dry-run` finds on the demo's machine and the config it would
/// write, printed for a newcomer (issue 20): the same command a real first run is, pointed
/// at the simulated roots and the demo's libvirt node, writing nothing. The child inherits
/// the demo's blocked signals; it reads and prints only, and is waited for here.
fn setup_dry_run(exe: &Path, root: &Path, cfg: &Config) {
    println!("\n== What `handoff setup --dry-run` finds on this machine, and the config it would write");
    let out = Command::new(exe)
        .arg("setup")
        .arg("--dry-run")
        .arg("--uri")
        .arg(format!("test://{}", root.join("demo-node.xml").display()))
        .arg("--system-config")
        .arg(root.join("etc/handoff/config.toml"))
        .args(["--sysfs", &cfg.host.sysfs.to_string_lossy()])
        .args(["--dev", &cfg.host.dev.to_string_lossy()])
        .args(["--run", &cfg.host.run.to_string_lossy()])
        .env_remove("HANDOFF_CONFIG")
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                println!("  {line}");
            }
            if !o.status.success() {
                println!(
                    "  (setup --dry-run: {}; {})",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
        Err(e) => println!("  (cannot run {} setup --dry-run: {e})", exe.display()),
    }
}

/// Wakes the main thread's `sigwaitinfo` (every thread blocks SIGUSR1) when dropped.
struct WakeMain;

impl Drop for WakeMain {
    fn drop(&mut self) {
        let _ = kill(nix::unistd::getpid(), Signal::SIGUSR1);
    }
}

/// The display path (and the waiting one without a display): `handoff-tray` when there is
/// a display, and `handoff-block --watch`, whose lines, one per change of what a bar would
/// show, go to this terminal as they come. Each one missing is said once; the rest runs.
fn start_tray_and_block(opts: &Options, stage: &mut Stage, bin_dir: &Path, config: &Path) -> io::Result<()> {
    let tray = bin_dir.join("handoff-tray");
    if opts.tray && tray.exists() {
        let pid = stage
            .spawn("handoff-tray", Command::new(&tray).stdin(Stdio::null()))?
            .id();
        println!(
            "
The tray (handoff-tray, pid {pid}) shows the simulated GPU in your panel. Try:
  1. Start Windows from the tray's menu: it is refused, and a notification names
     {HOLDER_NAME}, which holds the GPU.
  2. Click \"Terminate and start\" in it: {HOLDER_NAME} ends and the GPU goes to vfio-pci
     for Windows.
  3. Stop Windows from the tray: the GPU comes back to nvidia.
The VM lives inside the tray (libvirt's test driver keeps one copy per process), so start
and stop it from the tray. From another terminal, this shows the GPU:
  HANDOFF_CONFIG={} handoff status",
            config.display()
        );
    } else {
        println!(
            "
No tray here ({}). `handoff demo --script` walks through it in this terminal; meanwhile,
from another terminal, this shows the simulated GPU (or `blockers`, who uses it):
  HANDOFF_CONFIG={} handoff status",
            if !opts.tray {
                "no display".to_owned()
            } else {
                format!("{} not found", tray.display())
            },
            config.display()
        );
    }
    println!("Ctrl-C ends the demo and removes all of it.\n");

    let block = bin_dir.join("handoff-block");
    if !block.exists() {
        println!(
            "No bar block here ({} not found; `cargo build -p handoff-block` builds it).",
            block.display()
        );
        return Ok(());
    }
    let child = stage.spawn(
        "handoff-block",
        Command::new(&block)
            .arg("--watch")
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    )?;
    let pid = child.id();
    let out = child.stdout.take().expect("piped");
    println!("The bar block (handoff-block --watch, pid {pid}) prints what a bar shows, a line per change:");
    io::stdout().flush()?;
    std::thread::spawn(move || {
        for line in io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            println!("  bar: {line}");
        }
    });
    Ok(())
}

/// What a person would click, done here, each step said.
fn walkthrough(cfg: &Config, holder: u32) -> io::Result<()> {
    let vm = cfg.vms.first().ok_or_else(|| io::Error::other("no [[vm]]"))?;
    let mut say = |l: &str| println!("    {l}");
    let hv = Simulated::new(cfg).map_err(|e| io::Error::other(e.to_string()))?;
    let mut ctl = Ctl::with_hypervisor(cfg, &mut say, Box::new(hv));
    ctl.start_wait = Duration::from_secs(10);
    ctl.gpu_wait = Duration::from_secs(10);
    let gpu_line = |cfg: &Config| {
        println!("  {}", status_line(cfg));
        if let Ok(g) = handoff::gpu::read_gpu(&cfg.host, cfg.gpu.address) {
            for f in &g.functions {
                println!(
                    "    {} {:?}: {}",
                    f.address,
                    f.kind,
                    f.driver.as_deref().unwrap_or("(no driver)")
                );
            }
        }
    };

    println!("\n== 0. Where the GPU is now");
    gpu_line(cfg);

    println!("\n== 1. Start Windows (the tray's \"Start Windows\", or `handoff start`)");
    match ctl.start(vm) {
        Err(e) => println!("  refused: {}", e.to_string().replace('\n', "\n  ")),
        Ok(_) => {
            return Err(io::Error::other(
                "Windows started although cuda-training holds the GPU",
            ));
        }
    }

    println!("\n== 2. Terminate {HOLDER_NAME} (pid {holder}), as the tray's \"Terminate\" does (SIGTERM)");
    // The pid is our child.
    let _ = kill(Pid::from_raw(holder as i32), Signal::SIGTERM);
    let until = Instant::now() + Duration::from_secs(5);
    while !ended(holder) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !ended(holder) {
        return Err(io::Error::other(format!(
            "{HOLDER_NAME} (pid {holder}) did not end on SIGTERM"
        )));
    }
    println!("  {HOLDER_NAME} ended");
    gpu_line(cfg);

    println!("\n== 3. Start Windows again");
    start_and_say(&mut ctl, vm)?;
    gpu_line(cfg);

    // Several GPUs: the macOS VM's definition passes the iGPU through, so it takes that one
    // while Windows keeps the RTX.
    if let Some(mac) = cfg.vm(Some("macos")) {
        println!("\n== 3b. Start macOS too: its definition passes the iGPU through, Windows keeps the RTX");
        start_and_say(&mut ctl, mac)?;
        gpu_line(cfg);
        println!("\n== 3c. Stop macOS: the iGPU goes back to i915");
        stop_and_say(&mut ctl, mac)?;
    }

    println!("\n== 4. Stop Windows (the tray's \"Stop Windows\", or `handoff stop`)");
    stop_and_say(&mut ctl, vm)?;
    gpu_line(cfg);
    println!("\nThat is the handoff. On a real workstation: README, \"Installing on a real workstation\".");
    Ok(())
}

/// One scripted start, said as `handoff start` says it.
fn start_and_say(ctl: &mut Ctl, vm: &handoff::config::VmConfig) -> io::Result<()> {
    let started = ctl.start(vm).map_err(|e| io::Error::other(e.to_string()))?;
    println!(
        "  {} is {}; GPU {} {}",
        started.label,
        started.state.words(),
        started.gpu.address,
        started.gpu.phrase
    );
    Ok(())
}

/// One scripted graceful stop, within the VM's shutdown timeout.
fn stop_and_say(ctl: &mut Ctl, vm: &handoff::config::VmConfig) -> io::Result<()> {
    let stopped = ctl
        .stop(vm, false, Duration::from_secs(vm.shutdown_timeout_s))
        .map_err(|e| io::Error::other(e.to_string()))?;
    println!(
        "  {} stopped; GPU {} {}",
        stopped.label, stopped.gpu.address, stopped.gpu.phrase
    );
    Ok(())
}
