//! `handoff-kernelsim`: build the simulated workstation under a directory and serve its
//! sysfs with the kernel's write semantics until SIGINT/SIGTERM, for demos and for tests
//! that run in other processes.
//!
//! ```text
//! handoff-kernelsim --root /tmp/ws            # prints /tmp/ws/sysfs, the simulated /sys
//! echo 'hang unbind 0000:01:00.0' > /tmp/ws/sysfs/.simctl
//! echo 0000:01:00.0 > /tmp/ws/sysfs/bus/pci/drivers/nvidia/unbind   # blocks
//! echo release > /tmp/ws/sysfs/.simctl
//! cat /tmp/ws/sysfs/.simlog
//! ```
//!
//! `DIR/dev` and `DIR/run` are the simulated `/dev` and `/run`; `DIR/sys` is the backing
//! tree (writes there have no effect: write through the mount).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use handoff::simulated_tree::SimSpec;
use handoff_kernelsim::Kernel;
use handoff_kernelsim::fuse::SimMount;

#[derive(Parser)]
#[command(
    version,
    about = "Serve a simulated PCI sysfs whose control files act like the kernel's"
)]
struct Args {
    /// Directory to build the simulated machine in (created; must not hold one already).
    #[arg(long)]
    root: PathBuf,
    /// Where to mount the simulated /sys [default: ROOT/sysfs].
    #[arg(long)]
    mount: Option<PathBuf>,
    /// Start with vfio-pci not loaded (`echo 'modprobe vfio-pci' > MOUNT/.simctl` loads it).
    #[arg(long)]
    no_vfio: bool,
    /// More logging (-v: every write, -vv: FUSE requests).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let level = match args.verbose {
        0 => "warn",
        1 => "warn,handoff=debug",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: as the hook, stderr becomes
        // libvirt's error text, and in a log or a pipe they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // Block the stop signals before any thread exists, so every thread inherits the mask
    // and sigwait below is the one place they arrive.
    let signals = stop_signals();
    // SAFETY: `signals` is an initialised sigset_t; no other thread exists yet.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };

    if args.root.join("sys").exists() {
        bail!(
            "{} already holds a simulated machine; pick an empty directory",
            args.root.display()
        );
    }
    std::fs::create_dir_all(&args.root).with_context(|| format!("creating {}", args.root.display()))?;
    let mut spec = SimSpec::workstation();
    if args.no_vfio {
        spec.drivers.retain(|d| d != "vfio-pci");
    }
    let kernel = Kernel::build(&args.root, spec)
        .with_context(|| format!("building the simulated machine under {}", args.root.display()))?;
    let mountpoint = args.mount.unwrap_or_else(|| args.root.join("sysfs"));
    std::fs::create_dir_all(&mountpoint).with_context(|| format!("creating {}", mountpoint.display()))?;
    let mount = SimMount::mount(kernel, &mountpoint)?;

    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", mountpoint.display())?;
    out.flush()?;
    drop(out);

    let mut sig: libc::c_int = 0;
    // SAFETY: both pointers are valid for the call.
    unsafe { libc::sigwait(&signals, &mut sig) };
    tracing::info!("signal {sig}: unmounting {}", mountpoint.display());
    mount.unmount();
    Ok(())
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
