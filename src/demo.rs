//! `handoff demo`: the product on a machine without a passthrough GPU (features
//! `kernel-sim` and `libvirt`).
//!
//! What is simulated, all inside this process and a temporary directory:
//! - the kernel: [`crate::kernelsim`]'s sysfs (an RTX 3090 Ti at 0000:01:00.0 on `nvidia`,
//!   `vfio-pci` loaded) mounted with FUSE, and its `/dev`;
//! - libvirt: the built-in test driver (`test:///<dir>/demo-node.xml`) with a shut-off
//!   "Windows" domain `win11`. That driver runs no hooks and each process has its own copy,
//!   so the demo config sets `[host] demo = true`: then the process that starts or stops the
//!   VM runs the hook's logic itself ([`crate::vm`]), refusing or binding exactly as
//!   libvirtd's hook would, and writing the hook's state file the bar reads;
//! - a GPU user: `cuda-training`, a real child process holding `<dev>/nvidia0` open.
//!
//! With a display, `handoff-tray` (beside this binary) is started on the demo config and
//! owns "the VM"; the terminal prints a line per change. `--script` (and the walkthrough a
//! headless machine wants) does the clicks itself: start (refused, naming cuda-training),
//! terminate cuda-training, start (GPU to vfio-pci), stop (GPU home on nvidia).
//!
//! SIGINT, SIGTERM and SIGHUP end it: children are killed by process group, the mount is
//! unmounted and the directory removed.

use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::kernelsim::Kernel;
use crate::kernelsim::fuse::SimMount;
use crate::sim::SimSpec;
use crate::vm::Ctl;

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
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    let _f = std::fs::File::open(node)?;
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Everything the demo made, undone on drop.
struct Stage {
    root: PathBuf,
    mount: Option<SimMount>,
    children: Vec<Child>,
    pgid: Option<i32>,
}

impl Stage {
    fn reap(&mut self) {
        for c in &mut self.children {
            let _ = c.try_wait();
        }
    }

    fn spawn(&mut self, cmd: &mut Command) -> io::Result<u32> {
        cmd.process_group(self.pgid.unwrap_or(0));
        // std's spawn keeps the parent's signal mask, where the stop signals are blocked.
        // SAFETY: the closure only calls sigemptyset/pthread_sigmask, async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        self.pgid.get_or_insert(pid as i32);
        self.children.push(child);
        Ok(pid)
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill has no memory preconditions; the group is ours.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(3);
            for c in &mut self.children {
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            for c in &mut self.children {
                let _ = c.wait();
            }
        }
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
    "<!-- handoff demo: libvirt's test driver. `win11` is shut off (test:runstate 5). -->
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
</node>
"
    .to_owned()
}

fn config_toml(root: &Path, sysfs: &Path) -> String {
    let q = |p: &Path| toml::Value::String(p.to_string_lossy().into_owned()).to_string();
    format!(
        "# handoff demo: a simulated host (see `handoff demo --help`). Removed when the demo ends.
[gpu]
address = \"0000:01:00.0\"
host_driver = \"nvidia\"
watchdog_s = 5

[[vm]]
name = \"win11\"
label = \"Windows\"
uri = {uri}
shutdown_timeout_s = 10

[host]
sysfs = {sysfs}
dev = {dev}
run = {run}
demo = true
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
    let g = match crate::gpu::read_gpu(host, cfg.gpu.address) {
        Ok(g) => g,
        Err(e) => return format!("GPU: {e}"),
    };
    let mut line = format!("GPU {} {}", g.address, g.owner_phrase());
    let nodes = crate::holders::gpu_nodes(host, &g);
    let scan = crate::holders::scan(host, &g, &nodes);
    if !scan.holders.is_empty() {
        let who: Vec<String> = scan
            .holders
            .iter()
            .map(|h| format!("{} (pid {})", h.command, h.pid))
            .collect();
        line += &format!(" · used by {}", who.join(", "));
    }
    if let Some(s) = crate::state::HookState::load(host) {
        if let Some(vm) = &s.vm {
            line += &format!(" · hook: {} for {vm}", format!("{:?}", s.phase).to_lowercase());
        } else {
            line += &format!(" · hook: {}", format!("{:?}", s.phase).to_lowercase());
        }
    }
    line
}

/// Run the demo; returns the process exit code. `exe` is the `handoff` binary (for the
/// demo GPU user), `bin_dir` where `handoff-tray` is looked for.
pub fn run(opts: &Options, exe: &Path, bin_dir: &Path) -> io::Result<u8> {
    // Block the stop signals before any thread exists (the FUSE server, libvirt's), so
    // every thread inherits the mask and the waits below are where they arrive. Children
    // get an empty mask from std's spawn.
    let signals = stop_signals();
    // SAFETY: `signals` is initialised; called before this function starts threads.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };

    let root = std::env::temp_dir().join(format!("handoff-demo-{}", std::process::id()));
    std::fs::create_dir(&root)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", root.display())))?;
    let mut stage = Stage {
        root: root.clone(),
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
    let config_path = root.join("config.toml");
    std::fs::write(&config_path, config_toml(&root, &sysfs))?;
    let cfg = Config::load_file(&config_path).map_err(|e| io::Error::other(e.to_string()))?;

    let node = root.join("dev/nvidia0");
    let holder = stage.spawn(
        Command::new(exe)
            .arg0(HOLDER_NAME)
            .arg("demo-holder")
            .arg(&node)
            .stdin(Stdio::null()),
    )?;
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

    let mut out = io::stdout().lock();
    writeln!(
        out,
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
    )?;
    out.flush()?;
    drop(out);

    let worker = if opts.script {
        let cfg = cfg.clone();
        Some(std::thread::spawn(move || walkthrough(&cfg, holder)))
    } else {
        let tray = bin_dir.join("handoff-tray");
        if opts.tray && tray.exists() {
            let pid = stage.spawn(
                Command::new(&tray)
                    .env("HANDOFF_CONFIG", &config_path)
                    .stdin(Stdio::null()),
            )?;
            println!(
                "
The tray (handoff-tray, pid {pid}) shows the simulated GPU. Try:
  1. Start Windows from the tray: it is refused, because {HOLDER_NAME} holds the GPU.
  2. Terminate {HOLDER_NAME} from the notification or the \"Using the GPU\" menu.
  3. Start Windows again: the GPU goes to vfio-pci, and Windows \"runs\".
  4. Stop Windows: the GPU comes back to nvidia.
The VM lives in the tray's process (the test driver is per process), so start and stop it
from the tray; `HANDOFF_CONFIG={} handoff status` shows the GPU from another terminal.",
                config_path.display()
            );
        } else {
            println!(
                "
No tray here ({}). `handoff demo --script` walks through it in this terminal; meanwhile
`HANDOFF_CONFIG={} handoff status` (or `blockers`) shows the simulated GPU from another terminal.",
                if !opts.tray {
                    "no display".to_owned()
                } else {
                    format!("{} not found", tray.display())
                },
                config_path.display()
            );
        }
        println!("Ctrl-C ends the demo and removes all of it.\n");
        None
    };

    let mut last = String::new();
    let code = loop {
        stage.reap();
        if let Some(w) = &worker {
            if w.is_finished() {
                break match worker.map(|w| w.join()) {
                    Some(Ok(Ok(()))) => 0,
                    Some(Ok(Err(e))) => {
                        eprintln!("handoff demo: {e}");
                        1
                    }
                    _ => 1,
                };
            }
        } else {
            let line = status_line(&cfg);
            if line != last {
                println!("  now: {line}");
                last = line;
            }
        }
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 250_000_000,
        };
        // SAFETY: valid set and timeout; a null info pointer is allowed.
        let sig = unsafe { libc::sigtimedwait(&signals, std::ptr::null_mut(), &timeout) };
        if sig > 0 {
            println!(
                "\nhandoff demo: signal {sig}: stopping, removing {}",
                root.display()
            );
            break 130;
        }
    };
    drop(stage);
    Ok(code)
}

/// What a person would click, done here, each step said.
fn walkthrough(cfg: &Config, holder: u32) -> io::Result<()> {
    let vm = cfg.vms.first().ok_or_else(|| io::Error::other("no [[vm]]"))?;
    let mut say = |l: &str| println!("    {l}");
    let mut ctl = Ctl::new(cfg, &mut say);
    ctl.start_wait = Duration::from_secs(10);
    ctl.gpu_wait = Duration::from_secs(10);
    let gpu_line = |cfg: &Config| {
        println!("  {}", status_line(cfg));
        if let Ok(g) = crate::gpu::read_gpu(&cfg.host, cfg.gpu.address) {
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
    // SAFETY: kill has no memory preconditions; the pid is our child.
    unsafe { libc::kill(holder as i32, libc::SIGTERM) };
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
    let started = ctl.start(vm).map_err(|e| io::Error::other(e.to_string()))?;
    println!(
        "  {} is {}; GPU {} {}",
        started.label,
        started.state.words(),
        started.gpu.address,
        started.gpu.phrase
    );
    gpu_line(cfg);

    println!("\n== 4. Stop Windows (the tray's \"Stop Windows\", or `handoff stop`)");
    let stopped = ctl
        .stop(vm, false, Duration::from_secs(vm.shutdown_timeout_s))
        .map_err(|e| io::Error::other(e.to_string()))?;
    println!(
        "  {} stopped; GPU {} {}",
        stopped.label, stopped.gpu.address, stopped.gpu.phrase
    );
    gpu_line(cfg);
    println!("\nThat is the handoff. On a real workstation: README, \"Installing on a real workstation\".");
    Ok(())
}
