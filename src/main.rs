//! `handoff`: the command line. Thin: parse arguments, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use handoff::config::{Config, Source};
use handoff::{doctor, status};

// The seed's command names (argv[0] dispatch) and `handoff __generate` (man pages,
// completions, links): packaging, binary-side.
mod argv0;
mod generate;

#[derive(Parser)]
#[command(
    name = "handoff",
    version,
    about = "Hand one passthrough GPU between the Linux host and a VM, safely, and show who owns it",
    long_about = "Hand one passthrough GPU between the Linux host and a VM, safely, and show who owns it.\n\n\
        Reading the state is unprivileged (sysfs, /proc). Starting a VM goes through libvirt; binding the \
        GPU happens in the libvirt hook, as root.",
    after_help = "Config: $HANDOFF_CONFIG, else ~/.config/handoff/config.toml, else /etc/handoff/config.toml, \
        else built-in defaults. `handoff config check` validates it.\n\
        Exit codes: 0 success, 1 the answer is a problem (blockers: something holds the GPU; doctor: the host is not ready; a handoff failed), 2 usage or config error, 3 (lg) no desktop session reachable to open Looking Glass on, 4 (blockers) not everything could be checked for holders."
)]
struct Cli {
    /// Use this config file instead of the usual search (same as HANDOFF_CONFIG=FILE).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// More detail on stderr (-vv for debugging).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Who owns the GPU (each one, when there are several), which VM runs, and what uses it (also installed as `vfio-status`).
    ///
    /// With several [[gpu]] entries, every GPU is shown, each with its own verdict; GPU (an
    /// address or a [[gpu]] label) narrows it to one. --json is one object: `schema`, the
    /// primary (or named) GPU's `gpu` and `verdict`, `vms`, and `gpus`, a list of every GPU.
    #[command(visible_alias = "vfio-status")]
    Status(GpuArgs),
    /// The processes that would stop a handoff now: what holds the GPU's device nodes, and
    /// what holds its VFIO group /dev/vfio/<group> (a VM's QEMU, named with its VM), which
    /// keeps it from returning to the host.
    ///
    /// Exit status 0 when nothing holds the GPU and everything was checked, 1 when something
    /// holds it (a VFIO group user included), 4 when nothing was seen holding it but not everything could be checked
    /// (processes it could not inspect, an unreadable /proc or /proc/iomem, no device node of
    /// the GPU under [host] dev): a handoff would be refused then. Unprivileged, it sees your
    /// own processes only and so exits 4 unless one of them holds the GPU; as root it sees all.
    ///
    /// With several [[gpu]] entries, every GPU is scanned (exit 1 when any is held, else 4 when
    /// any was not wholly checked); GPU (an address or a [[gpu]] label) narrows it to one.
    Blockers(GpuArgs),
    /// Is this host ready for passthrough, and what to fix (exit 0 ready, 1 problems found).
    Doctor(DoctorArgs),
    /// Validate or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Return the GPU to the host driver from whatever state it is in (also installed as
    /// `gpu-rebind-nvidia`). Needs root: `sudo handoff rebind --force` or `pkexec handoff rebind --force`.
    ///
    /// Uses the restore record under [host] run when there is one (each function goes back to the
    /// driver it had), else returns the graphics function to [gpu] host_driver, but only when the GPU
    /// is away (on vfio-pci or no driver). Refuses while a VM still uses the GPU, and while a
    /// process holds a function it would unbind from a host driver. As root (--force) it reads
    /// only the root-owned /etc/handoff/config.toml.
    #[command(visible_alias = "gpu-rebind-nvidia")]
    Rebind(RebindArgs),
    /// Move the GPU to vfio-pci by hand, as the hook does before a VM starts (root).
    ///
    /// Refuses, changing nothing, while any process holds the GPU.
    Bind(BindArgs),
    /// Install (or with --uninstall remove) the libvirt hook that guards and binds the GPU
    /// (also installed as `install-hooks`). Idempotent; needs root.
    ///
    /// Puts a small shim at /etc/libvirt/hooks/qemu.d/handoff that runs `handoff hook`, never
    /// touching an existing /etc/libvirt/hooks/qemu, and makes libvirtd re-read its hooks (SIGHUP).
    InstallHooks(InstallHooksArgs),
    /// Start a VM (default: the first [[vm]]) with the GPU (also installed as `windows-start`).
    ///
    /// Checks first: nothing of yours holds the GPU, and no other configured VM has it.
    /// Then starts the domain, waits until it runs and says where the GPU went. When the
    /// libvirt hook refuses (something holds the GPU), prints its list. Exit 0 running
    /// (also when it already was), 1 refused or failed, nothing started.
    #[command(visible_alias = "windows-start")]
    Start(StartArgs),
    /// Shut a VM down gracefully (ACPI) and wait for the GPU to come back (also installed as
    /// `windows-stop`).
    ///
    /// Waits up to the VM's shutdown_timeout_s (or --timeout); exit 1 when the guest did
    /// not stop, saying how to force it. --force turns it off at once (unsaved work in
    /// the VM is lost).
    #[command(visible_alias = "windows-stop")]
    Stop(StopArgs),
    /// Give the GPU to another VM: stop the VM that has it (gracefully, unless --force),
    /// wait for the GPU, start VM. Exit 1 with the step that failed.
    Switch(SwitchArgs),
    /// A VM's state, uptime, vCPUs, memory, passed-through PCI devices, Looking Glass
    /// device and IP (also installed as `vm-health`).
    VmHealth(VmHealthArgs),
    /// Run by libvirtd as /etc/libvirt/hooks/qemu.d/handoff: <domain> <operation> <sub-op> <extra>,
    /// domain XML on stdin. Not for people; `handoff install-hooks` sets it up.
    Hook {
        /// What libvirtd passes.
        #[arg(num_args = 0.., allow_hyphen_values = true)]
        args: Vec<String>,
        /// Read this system config instead of /etc/handoff/config.toml (tests).
        #[arg(long, hide = true, value_name = "FILE")]
        system_config: Option<PathBuf>,
    },
    /// What Proxmox VE runs as the VMs' hookscript, as root: `<vmid> <phase>`.
    ///
    /// `install-hooks --pve` puts a snippet that calls this in a snippets storage and sets
    /// it as the configured VMs' hookscript. In `pre-start` it refuses (exit 1; PVE aborts
    /// the start and shows the reason in the task log) when another running VM passes the
    /// same GPU through, or when something holds a GPU that is on a host driver; otherwise it
    /// hands the GPU to vfio-pci. `post-stop` returns it. See docs/proxmox.md.
    #[command(hide = true)]
    PveHook {
        vmid: u32,
        phase: String,
        /// Read this system config instead of /etc/handoff/config.toml (tests).
        #[arg(long, hide = true, value_name = "FILE")]
        system_config: Option<PathBuf>,
        /// Read PVE's files (etc/pve, var/run/qemu-server) under this root instead of / (tests).
        #[arg(long, hide = true, value_name = "DIR")]
        pve_root: Option<PathBuf>,
        /// This node's name, for resource mappings (default: the host name).
        #[arg(long, hide = true)]
        node: Option<String>,
    },
    /// Open Looking Glass on its i3 workspace, or focus it when it is already open.
    ///
    /// Works from SSH: finds the desktop's i3 through I3SOCK, /run/user/<uid>/i3/ipc-socket.*,
    /// or the X root window (DISPLAY), and has i3 start the client in the desktop session.
    /// Exit 0 opened or focused, 1 failed, 3 no desktop session reachable from here.
    Lg(LgArgs),
    /// Can Looking Glass work: shared memory present, sized as the VM's device, readable and
    /// writable by you, kvmfr loaded when used, the client installed (also installed as `lg-test`).
    ///
    /// Exit 0 when all of that holds, 1 otherwise; each failure says how to fix it.
    LgTest(LgTestArgs),
    /// Install (or with --uninstall remove) your session's pieces (also installed as `install-services`):
    /// the tray's systemd user unit, an XDG autostart entry for it, a "Windows" launcher, and
    /// with --lg-autostart a unit that opens Looking Glass when the VM starts. Idempotent.
    InstallServices(InstallServicesArgs),
    /// Print one line per change as it happens: driver binds of the GPU's functions, VM
    /// lifecycle events, the hook's state file, libvirtd going away and coming back.
    ///
    /// What the tray and `handoff-block --watch` listen to; no polling. Runs until
    /// interrupted (or stdout closes).
    Watch(JsonFlag),
    /// Try handoff without a passthrough GPU: a simulated host (kernel sysfs with an RTX
    /// 3090 Ti, libvirt's test driver with a "Windows" VM, a process holding the GPU), the
    /// tray on it when there is a display, and the bar block's line per change here.
    ///
    /// Without a display, or with --script, it walks through the handoff itself: start
    /// (refused, naming the process), terminate the process, start (GPU to vfio-pci), a
    /// macOS VM taking the iGPU meanwhile and giving it back, stop (GPU back to nvidia).
    /// Needs root (a FUSE mount). Ctrl-C ends it and removes all of
    /// it: children, mount, temporary directory.
    #[cfg(all(feature = "kernel-sim", feature = "libvirt"))]
    Demo(DemoArgs),
    /// The demo's GPU user (`cuda-training`): holds NODE open until killed.
    #[cfg(all(feature = "kernel-sim", feature = "libvirt"))]
    #[command(hide = true)]
    DemoHolder { node: PathBuf },
    /// The libvirt side of `handoff-tray`: reads requests as JSON lines on stdin, writes
    /// VM changes and replies as JSON lines on stdout, ends when stdin closes. The tray
    /// runs it so that it links no libvirt itself (see the library's `agent` module).
    #[command(name = "__agent", hide = true)]
    Agent,
}

#[cfg(all(feature = "kernel-sim", feature = "libvirt"))]
#[derive(Args)]
struct DemoArgs {
    /// Do the clicks itself and exit (the default without a display is to wait for Ctrl-C).
    #[arg(long)]
    script: bool,
    /// Do not start handoff-tray even when there is a display.
    #[arg(long)]
    no_tray: bool,
}

#[derive(Args)]
struct LgTestArgs {
    /// The VM to check (default: the first [[vm]]).
    #[arg(long)]
    vm: Option<String>,
    /// Read the domain XML from this file instead of asking libvirt.
    #[arg(long, value_name = "FILE")]
    xml: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InstallServicesArgs {
    /// Remove exactly what install-services installed.
    #[arg(long)]
    uninstall: bool,
    /// Say what would change without changing anything.
    #[arg(long)]
    dry_run: bool,
    /// Also install handoff-lg-autostart.service (opens Looking Glass when the VM starts).
    #[arg(long)]
    lg_autostart: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// The directory holding handoff and handoff-tray (default: this binary's).
    #[arg(long, hide = true, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

#[derive(Args)]
struct LgArgs {
    /// Seconds to wait for a started client's window.
    #[arg(long, value_name = "SECS", default_value_t = handoff::lg::WINDOW_WAIT.as_secs())]
    wait: u64,
    /// Print what happened as JSON.
    #[arg(long)]
    json: bool,
    /// Keep running: open Looking Glass each time the VM starts (libvirt lifecycle events), and
    /// hold a logind sleep inhibitor while it runs. What handoff-lg-autostart.service runs.
    #[arg(long)]
    on_vm_start: bool,
}

#[derive(Args)]
struct StartArgs {
    /// The [[vm]] name or label (default: the first).
    vm: Option<String>,
    /// First end what holds the GPU: your processes (SIGTERM, then wait), their systemd
    /// units (systemctl [--user] stop), their containers (docker/podman stop). Lists
    /// them and asks on a terminal; never another user's process unless run as root.
    #[arg(long)]
    stop_holders: bool,
    /// With --stop-holders: do not ask (for scripts and SSH without a terminal).
    #[arg(long, short = 'y', requires = "stop_holders")]
    yes: bool,
    /// Print the outcome as one JSON object (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StopArgs {
    /// The [[vm]] name or label (default: the first).
    vm: Option<String>,
    /// Turn the VM off at once (libvirt destroy): unsaved work in the VM is lost.
    #[arg(long)]
    force: bool,
    /// Seconds to wait for the graceful shutdown (default: the VM's shutdown_timeout_s).
    #[arg(long, value_name = "S", conflicts_with = "force")]
    timeout: Option<u64>,
    /// Print the outcome as one JSON object (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SwitchArgs {
    /// The [[vm]] to give the GPU to (name or label).
    vm: String,
    /// Turn the VM that has the GPU off at once instead of shutting it down: its unsaved work is lost.
    #[arg(long)]
    force: bool,
    /// Seconds to wait for the graceful shutdown (default: that VM's shutdown_timeout_s).
    #[arg(long, value_name = "S", conflicts_with = "force")]
    timeout: Option<u64>,
    /// Print the outcome as one JSON object (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VmHealthArgs {
    /// The [[vm]] name or label (default: the first).
    vm: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DoctorArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// libvirt's hooks directory to check (tests).
    #[arg(long, hide = true, value_name = "DIR")]
    hooks_dir: Option<PathBuf>,
}

#[derive(Args)]
struct InstallHooksArgs {
    /// Remove exactly what install-hooks installed.
    #[arg(long)]
    uninstall: bool,
    /// Say what would change without changing anything.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// libvirt's hooks directory (tests).
    #[arg(long, hide = true, value_name = "DIR")]
    hooks_dir: Option<PathBuf>,
    /// On a Proxmox VE host: put the hookscript in a snippets storage and set it on the
    /// configured VMs (`[[vm]] vmid`) instead of installing libvirt's hook. Never replaces
    /// a VM's other hookscript; says how to combine them. See docs/proxmox.md.
    #[arg(long)]
    pve: bool,
    /// With --pve: the storage for the snippet (default: the first directory storage
    /// whose content includes snippets).
    #[arg(long, requires = "pve", value_name = "STORAGE")]
    storage: Option<String>,
    /// With --pve: guard these VMs (default: every [[vm]] with a vmid in the config).
    #[arg(long = "vmid", requires = "pve", value_name = "VMID")]
    vmids: Vec<u32>,
    /// With --pve: PVE's files under this root instead of / (tests).
    #[arg(long, hide = true, requires = "pve", value_name = "DIR")]
    pve_root: Option<PathBuf>,
}

#[derive(Args)]
struct RebindArgs {
    /// Required: this rewrites driver bindings as root.
    #[arg(long)]
    force: bool,
    /// Print the steps without doing them.
    #[arg(long)]
    dry_run: bool,
    /// Rebind even though a VM still holds the GPU. The VM loses its GPU and will likely crash.
    #[arg(long)]
    even_if_vm_runs: bool,
    /// Return this GPU (a [[gpu]] address; default: the primary one), and refuse unless the
    /// config has it. The tray passes it so that pkexec's password prompt names the GPU that
    /// will be touched.
    #[arg(long, value_name = "ADDRESS")]
    gpu: Option<handoff::pci::PciAddress>,
}

#[derive(Args)]
struct BindArgs {
    /// Print the steps without doing them.
    #[arg(long)]
    dry_run: bool,
    /// Record this VM as the GPU's holder.
    #[arg(long)]
    vm: Option<String>,
    /// Which GPU, with several [[gpu]] entries: its address or label (default: the primary one).
    #[arg(long, value_name = "GPU")]
    gpu: Option<String>,
}

#[derive(Args)]
struct GpuArgs {
    /// Only this GPU: its address (0000:01:00.0, or 01:00.0) or its [[gpu]] label.
    gpu: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct JsonFlag {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a config file (default: the one handoff would use); exit 2 with the error if broken.
    Check {
        /// The file to check.
        file: Option<PathBuf>,
    },
    /// Print the effective configuration, defaults filled in, and where it came from.
    Show,
}

fn main() -> ExitCode {
    if let Some(code) = generate::if_asked(Cli::command) {
        return code;
    }
    let cli: Cli = argv0::parse();
    init_logging(cli.verbose, cli.quiet);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("handoff: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, each said once: our errors already put their cause in their
/// own message ("cannot read X: No such file"), and anyhow's `{:#}` would repeat it.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text += ": ";
            text += &cause;
        }
    }
    text
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HANDOFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: as the hook, stderr becomes
        // libvirt's error text, and in a log or a pipe they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

fn load_config(explicit: Option<PathBuf>) -> anyhow::Result<(Config, Source)> {
    Ok(Config::load_cli(explicit)?)
}

/// The config of a command that writes as root (`rebind --force`, `bind`): see
/// [`Config::load_to_write`].
fn load_config_to_write(explicit: Option<PathBuf>) -> anyhow::Result<(Config, Source)> {
    Ok(Config::load_to_write(
        explicit,
        nix::unistd::geteuid().is_root(),
        std::path::Path::new(handoff::config::SYSTEM_CONFIG),
    )?)
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Config(ConfigCommand::Check { file }) => {
            let (cfg, source) = match file {
                Some(f) => (Config::load_file(&f)?, Source::File(f)),
                None => load_config(cli.config)?,
            };
            println!("{source}: ok ({} VM(s), {})", cfg.vms.len(), cfg.gpus_summary());
            Ok(config_check_vms(&cfg))
        }
        Command::Config(ConfigCommand::Show) => {
            let (cfg, source) = load_config(cli.config)?;
            println!("# from {source}");
            print!(
                "{}",
                toml::to_string_pretty(&cfg).context("rendering the config")?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => status_each(cli.config, args),
        Command::Blockers(args) => blockers_each(cli.config, args),
        #[cfg(all(feature = "kernel-sim", feature = "libvirt"))]
        Command::Demo(a) => {
            let exe = std::env::current_exe().context("finding the handoff binary")?;
            let bin_dir = exe.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
            let opts = handoff::demo::Options {
                script: a.script,
                tray: !a.no_tray && handoff::demo::have_display(),
            };
            let code = handoff::demo::run(&opts, &exe, &bin_dir).context("handoff demo")?;
            Ok(ExitCode::from(code))
        }
        #[cfg(all(feature = "kernel-sim", feature = "libvirt"))]
        Command::Agent => {
            let (cfg, _) = load_config(cli.config)?;
            handoff::agent::serve(&cfg, std::io::stdin().lock(), Box::new(std::io::stdout()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoHolder { node } => {
            handoff::demo::hold(&node).with_context(|| format!("opening {}", node.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Hook { args, system_config } => {
            let path = system_config.unwrap_or_else(|| PathBuf::from(handoff::config::SYSTEM_CONFIG));
            let code = handoff::hook::run(&args, &mut std::io::stdin(), &path, &mut std::io::stderr());
            Ok(ExitCode::from(code as u8))
        }
        Command::PveHook {
            vmid,
            phase,
            system_config,
            pve_root,
            node,
        } => {
            let path = system_config.unwrap_or_else(|| PathBuf::from(handoff::config::SYSTEM_CONFIG));
            let mut pve = handoff::pve::PveHost::system();
            if let Some(root) = pve_root {
                pve.root = root;
            }
            if let Some(node) = node {
                pve.node = node;
            }
            let mut err = std::io::stderr();
            let code = match handoff::config::Config::load_system(&path) {
                Ok((cfg, _)) => handoff::pve::run_hookscript(&cfg, &pve, vmid, &phase, &mut err),
                Err(e) => {
                    eprintln!("handoff: {e}");
                    // Refuse a start we cannot check; never block a stop.
                    i32::from(phase == "pre-start")
                }
            };
            Ok(ExitCode::from(code as u8))
        }
        Command::InstallHooks(a) if a.pve => {
            use handoff::pve_hooks;
            let vmids = if a.vmids.is_empty() && !a.uninstall {
                let (cfg, _) = load_config_to_write(cli.config)?;
                cfg.vms.iter().filter_map(|v| v.vmid).collect()
            } else {
                a.vmids.clone()
            };
            let roots = pve_hooks::Roots {
                root: a.pve_root.clone().unwrap_or_else(|| PathBuf::from("/")),
            };
            let exe = std::env::current_exe()?.canonicalize()?;
            let plan = pve_hooks::plan(&roots, &vmids, a.storage.as_deref(), &exe, a.uninstall)?;
            if !a.dry_run {
                pve_hooks::apply(&roots, &plan)?;
            }
            if a.json {
                print_json(&plan)?;
            } else {
                for action in &plan.actions {
                    println!("{}{action}", if a.dry_run { "would " } else { "" });
                }
                for f in &plan.foreign {
                    eprintln!("handoff: warning: {}", f.advice);
                }
                if plan.actions.is_empty() {
                    println!(
                        "nothing to do: the hookscript {} is {}",
                        plan.volid,
                        if a.uninstall { "not installed" } else { "in place" }
                    );
                }
            }
            Ok(if plan.foreign.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::InstallHooks(a) => {
            let opts = handoff::hooks::InstallOptions::for_cli(a.uninstall, a.dry_run, a.hooks_dir)?;
            let report = handoff::hooks::install_hooks(&opts)?;
            if a.json {
                print_json(&report)?;
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Start(a) => {
            if a.stop_holders {
                let (cfg, _) = load_config(cli.config.clone())?;
                if let Err(e) = stop_holders(&cfg, a.yes) {
                    eprintln!("handoff: {e}");
                    return Ok(ExitCode::from(1));
                }
            }
            start(cli.config, cli.quiet, a)
        }
        Command::Stop(a) => vm_command(cli.config, cli.quiet, a.json, |ctl, cfg| {
            let vm = handoff::vm::resolve(cfg, a.vm.as_deref())?;
            let timeout = std::time::Duration::from_secs(a.timeout.unwrap_or(vm.shutdown_timeout_s));
            Ok(VmDone::Stopped(ctl.stop(vm, a.force, timeout)?))
        }),
        Command::Switch(a) => vm_command(cli.config, cli.quiet, a.json, |ctl, cfg| {
            let vm = handoff::vm::resolve(cfg, Some(&a.vm))?;
            let timeout = a.timeout.map(std::time::Duration::from_secs);
            Ok(VmDone::Switched(ctl.switch(vm, a.force, timeout)?))
        }),
        Command::VmHealth(a) => vm_command(cli.config, true, a.json, |ctl, cfg| {
            let vm = handoff::vm::resolve(cfg, a.vm.as_deref())?;
            Ok(VmDone::Health(Box::new(ctl.health(vm)?)))
        }),
        Command::Rebind(args) => rebind(cli.config, args),
        Command::Lg(args) => lg(cli.config, args),
        Command::LgTest(args) => lg_test(cli.config, args),
        Command::InstallServices(args) => install_services(cli.config, args),
        Command::Watch(flags) => {
            let (cfg, _) = load_config(cli.config)?;
            watch(&cfg, flags.json)
        }
        Command::Bind(args) => bind(cli.config, args),
        Command::Doctor(flags) => {
            let (cfg, source) = load_config(cli.config)?;
            let report = doctor::run(
                &cfg,
                &source,
                &doctor::Caller::current(),
                flags
                    .hooks_dir
                    .as_deref()
                    .unwrap_or(std::path::Path::new(handoff::hooks::DEFAULT_HOOKS_DIR)),
                {
                    let mut hv = handoff::hypervisor::open(&cfg);
                    #[allow(unused_mut)]
                    let mut extra =
                        doctor::libvirt_checks(&cfg, &mut |vm| handoff::hypervisor::vm_status(&mut *hv, vm));
                    extra.extend(doctor::vm_definition_checks(&cfg, &mut |vm| {
                        hv.describe(&handoff::hypervisor::VmRef::from(vm))
                            .map(|d| d.definition)
                            .map_err(|e| e.to_string())
                    }));
                    #[cfg(feature = "inhibit")]
                    extra.push(handoff::inhibit::doctor_check());
                    extra
                },
            );
            if flags.json {
                print_json(&report)?;
            } else {
                print!("{}", report.render_text());
            }
            Ok(ExitCode::from(report.exit_code() as u8))
        }
    }
}

/// `handoff status [GPU]`: every GPU (or the one named), each with its verdict.
fn status_each(config: Option<PathBuf>, args: GpuArgs) -> anyhow::Result<ExitCode> {
    let (cfg, _) = load_config(config)?;
    let mut hv = handoff::hypervisor::open(&cfg);
    let each = status::collect_each(&cfg, args.gpu.as_deref(), &mut |vm| {
        handoff::hypervisor::vm_status(&mut *hv, vm)
    })?;
    let report = status::AllReport::new(&cfg, &each).context("no GPU to show")?;
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", report.report_text(&each));
    }
    Ok(ExitCode::SUCCESS)
}

/// `handoff blockers [GPU]`: every GPU's holders (or the one named's).
fn blockers_each(config: Option<PathBuf>, args: GpuArgs) -> anyhow::Result<ExitCode> {
    let (cfg, _) = load_config(config)?;
    let each = handoff::blockers::Each::check(&cfg, args.gpu.as_deref())?;
    if args.json {
        print_json(&each.json().context("no GPU to scan")?)?;
    } else {
        print!("{}", each.render_text());
    }
    Ok(ExitCode::from(each.exit_code()))
}

/// `config check`'s look at the VMs' definitions: devices they pass through that no
/// [[gpu]] names, a macOS VM given an NVIDIA card it has no driver for. Printed only when
/// there is something to say; never a failure of the check (the file itself is fine), and a
/// VM whose definition cannot be read is passed over (`handoff doctor` reports it).
fn config_check_vms(cfg: &Config) -> ExitCode {
    let mut hv = handoff::hypervisor::open(cfg);
    let checks = doctor::vm_definition_checks(cfg, &mut |vm| {
        hv.describe(&handoff::hypervisor::VmRef::from(vm))
            .map(|d| d.definition)
            .map_err(|e| e.to_string())
    });
    print!("{}", doctor::render_checks(&checks));
    ExitCode::SUCCESS
}

fn progress(step: &handoff::bind::plan::Step, host: &handoff::Host) {
    eprintln!("  {}", step.describe(host));
}

fn rebind(config: Option<PathBuf>, args: RebindArgs) -> anyhow::Result<ExitCode> {
    use handoff::bind::record::RestoreRecord;
    let writes = args.force && !args.dry_run;
    let (cfg, source) = if writes {
        load_config_to_write(config)?
    } else {
        load_config(config)?
    };
    let guard = handoff::bind::guard::RebindGuard {
        gpu: args.gpu,
        even_if_vm_runs: args.even_if_vm_runs,
    };
    // With several [[gpu]] entries, --gpu chooses; without it, the primary one.
    let gc = guard.pick_gpu(&cfg, &source)?;
    let host = &cfg.host;
    let g = handoff::gpu::read_gpu(host, gc.address)?;
    let record = RestoreRecord::load(host, gc.address)?;
    if !writes {
        let steps = handoff::bind::return_plan(&g, record.as_ref(), &gc.host_driver);
        if steps.is_empty() {
            println!(
                "GPU {} is {} and there is no restore record: nothing to return.",
                g.address,
                g.owner_phrase()
            );
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "GPU {} is {}. To return it to the host, handoff would:",
            g.address,
            g.owner_phrase()
        );
        for s in &steps {
            println!("  {}", s.describe(host));
        }
        if !args.force && !args.dry_run {
            println!("Nothing done: add --force to do it (as root).");
            return Ok(ExitCode::from(2));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let taken = guard.check_vm_users(g.address, &handoff::holders::vfio_users(host, &g))?;
    if !taken.is_empty() {
        eprintln!(
            "handoff: warning: taking the GPU from a running VM:\n{}",
            handoff::bind::guard::indented(&taken)
        );
    }
    let timeout = std::time::Duration::from_secs(gc.watchdog_s);
    eprintln!("Returning GPU {} to the host:", g.address);
    // Users were checked above: none, or the person said to take the GPU anyway.
    let vfio = if args.even_if_vm_runs {
        handoff::bind::VfioUsers::Ignore
    } else {
        handoff::bind::VfioUsers::Wait(std::time::Duration::ZERO)
    };
    match handoff::bind::return_to_host_with(host, gc.address, &gc.host_driver, timeout, vfio, &mut |s| {
        progress(s, host)
    }) {
        Ok(out) if out.steps.is_empty() => {
            println!(
                "GPU {} is {} and there is no restore record: nothing to return, nothing was changed.",
                g.address,
                g.owner_phrase()
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(_) => {
            // The hook's state.json still says "restore required": the tray, the details
            // window and the bar read it, so it must say the GPU is home now.
            if let Err(e) = handoff::state::HookState::returned_by_hand(host, gc.address) {
                eprintln!(
                    "handoff: warning: cannot update {}: {e}; the tray may still say a restore is required",
                    host.state_file().display()
                );
            }
            let g = handoff::gpu::read_gpu(host, gc.address)?;
            println!("GPU {} is back {}.", g.address, g.owner_phrase());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("handoff: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn bind(config: Option<PathBuf>, args: BindArgs) -> anyhow::Result<ExitCode> {
    use handoff::bind::plan;
    let (cfg, _) = if args.dry_run {
        load_config(config)?
    } else {
        load_config_to_write(config)?
    };
    let host = &cfg.host;
    // --gpu chooses among several [[gpu]] entries; without it, the primary one.
    let gc = match &args.gpu {
        Some(name) => cfg
            .gpu
            .find(name)
            .with_context(|| format!("no [[gpu]] is {name:?} (an address or label from the config)"))?,
        None => cfg.gpu.primary(),
    };
    let g = handoff::gpu::read_gpu(host, gc.address)?;
    if args.dry_run {
        println!(
            "GPU {} is {}. To hand it to vfio-pci, handoff would:",
            g.address,
            g.owner_phrase()
        );
        for s in plan::to_vfio(&g, host.pci_drivers().join(plan::VFIO).is_dir()) {
            println!("  {}", s.describe(host));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let timeout = std::time::Duration::from_secs(gc.watchdog_s);
    eprintln!("Handing GPU {} to vfio-pci:", g.address);
    match handoff::bind::hand_to_vfio(host, gc.address, args.vm.as_deref(), timeout, &mut |s| {
        progress(s, host)
    }) {
        Ok(_) => {
            println!("GPU {} is on vfio-pci.", g.address);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// What a VM command produced, for [`vm_command`] to print.
enum VmDone {
    Started(handoff::vm::StartOutcome),
    Stopped(handoff::vm::StopOutcome),
    Switched(handoff::vm::SwitchOutcome),
    Health(Box<handoff::vm::Health>),
}

/// Runs a VM command: progress lines on stderr (none with -q), the outcome on stdout as
/// text or JSON, errors as `handoff: …` with exit 1 (2 for a usage/config error).
/// `handoff start`.
fn start(config: Option<PathBuf>, quiet: bool, a: StartArgs) -> anyhow::Result<ExitCode> {
    vm_command(config, quiet, a.json, |ctl, cfg| {
        let vm = handoff::vm::resolve(cfg, a.vm.as_deref())?;
        let out = ctl.start(vm)?;
        Ok(VmDone::Started(out))
    })
}

/// `start --stop-holders`: end what holds the GPU ([`handoff::free`]), asking on a terminal.
fn stop_holders(cfg: &Config, yes: bool) -> Result<(), handoff::free::FreeError> {
    use std::io::{BufRead, IsTerminal, Write};
    let mut ask = |q: &str| {
        eprint!("{q}");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        matches!(answer.trim(), "y" | "Y" | "yes")
    };
    let terminal = std::io::stdin().is_terminal();
    let ask: Option<&mut dyn FnMut(&str) -> bool> = if terminal { Some(&mut ask) } else { None };
    handoff::free::before_start(cfg, yes, ask, &mut |line| eprintln!("{line}"))
}

fn vm_command(
    config: Option<PathBuf>,
    quiet: bool,
    json: bool,
    f: impl FnOnce(&mut handoff::vm::Ctl, &Config) -> Result<VmDone, handoff::vm::VmError>,
) -> anyhow::Result<ExitCode> {
    let (cfg, _) = load_config(config)?;
    let mut say = |line: &str| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let mut ctl = handoff::vm::Ctl::new(&cfg, &mut say);
    let done = match f(&mut ctl, &cfg) {
        Ok(done) => done,
        Err(e) => {
            if let handoff::vm::VmError::HookRefused { warnings, .. } = &e {
                for w in warnings {
                    eprintln!("handoff: warning: {w}");
                }
            }
            eprintln!("handoff: {e}");
            return Ok(ExitCode::from(e.exit_code()));
        }
    };
    drop(ctl);
    match &done {
        VmDone::Started(out) => {
            if json {
                print_json(out)?;
            } else {
                print_started(out);
            }
            after_start(&cfg, out);
        }
        VmDone::Stopped(out) => {
            if json {
                print_json(out)?;
            } else {
                print_stopped(out);
            }
            // Units stopped to free the GPU come back once it is home (handoff::stopped).
            for line in handoff::stopped::start_again(&cfg, handoff::stopped::Who::Person) {
                eprintln!("handoff: {line}");
            }
        }
        VmDone::Switched(out) => {
            if json {
                print_json(out)?;
            } else {
                print_started(&out.started);
            }
            after_start(&cfg, &out.started);
        }
        VmDone::Health(h) => {
            if json {
                print_json(h)?;
            } else {
                print!("{}", h.render_text());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_started(out: &handoff::vm::StartOutcome) {
    let gpu = match out.gpu_on_vfio {
        Some(true) => format!("GPU {} is on vfio-pci", out.gpu.address),
        Some(false) if !out.already_running => format!("GPU {} is still {}", out.gpu.address, out.gpu.phrase),
        _ => format!("GPU {} is {}", out.gpu.address, out.gpu.phrase),
    };
    let was = if out.already_running { "was already" } else { "is" };
    println!("{} ({}) {was} {}; {gpu}.", out.label, out.vm, out.state.words());
}

fn print_stopped(out: &handoff::vm::StopOutcome) {
    let gpu = match out.gpu_returned {
        Some(true) => format!("GPU {} is back {}", out.gpu.address, out.gpu.phrase),
        _ => format!("GPU {} is {}", out.gpu.address, out.gpu.phrase),
    };
    let what = match (out.was_running, out.forced) {
        (false, _) => "was not running",
        (true, true) => "was forced off",
        (true, false) => &format!("shut down after {:.0} s", out.waited_s),
    };
    println!("{} ({}) {what}; {gpu}.", out.label, out.vm);
}

/// Once a VM runs with the GPU and a Looking Glass device: open the client on its i3
/// workspace, from SSH too (through the desktop's i3 socket). The VM is running either way,
/// so a failure here is a warning, not the command's failure.
fn after_start(cfg: &Config, out: &handoff::vm::StartOutcome) {
    match out.after_start() {
        handoff::vm::AfterStart::OpenLookingGlass => {
            let session = handoff::i3::Session::from_env();
            match handoff::lg::open(cfg, &session, handoff::lg::WINDOW_WAIT) {
                Ok(outcome) => eprintln!("{}", outcome.describe(cfg, Some(&out.label))),
                Err(e) => eprintln!(
                    "handoff: warning: {} is running, but Looking Glass did not open: {e}",
                    out.label
                ),
            }
        }
        handoff::vm::AfterStart::Nothing(why) => tracing::info!("no Looking Glass: {why}"),
    }
}

fn lg(config: Option<PathBuf>, args: LgArgs) -> anyhow::Result<ExitCode> {
    use handoff::lg::{self, LgOutcome};
    let (cfg, _) = load_config(config)?;
    let session = handoff::i3::Session::from_env();
    if args.on_vm_start {
        return lg_on_vm_start(&cfg, &session, std::time::Duration::from_secs(args.wait));
    }
    match lg::open(&cfg, &session, std::time::Duration::from_secs(args.wait)) {
        Ok(outcome) => {
            if args.json {
                print_json(&outcome)?;
            } else {
                println!("{}", outcome.describe(&cfg, None));
            }
            Ok(match outcome {
                LgOutcome::NoDesktop { .. } => ExitCode::from(lg::EXIT_NO_DESKTOP),
                _ => ExitCode::SUCCESS,
            })
        }
        Err(e) => {
            eprintln!("handoff: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn lg_test(config: Option<PathBuf>, args: LgTestArgs) -> anyhow::Result<ExitCode> {
    use handoff::lg_test;
    let (cfg, _) = load_config(config)?;
    let vm = match cfg.vm(args.vm.as_deref()) {
        Some(v) => v.clone(),
        None => anyhow::bail!(
            "no [[vm]] named {:?} in the config",
            args.vm.as_deref().unwrap_or("(first)")
        ),
    };
    let xml = match &args.xml {
        Some(f) => std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display())),
        None => handoff::hypervisor::open(&cfg)
            .describe(&handoff::hypervisor::VmRef::from(&vm))
            .map(|d| d.definition)
            .map_err(|e| e.to_string()),
    };
    let inputs = lg_test::Inputs {
        xml,
        vm: vm.name.clone(),
        caller: lg_test::Caller::current(),
        path: std::env::var_os("PATH"),
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "(unknown)".into()),
    };
    let report = lg_test::run(&cfg, &inputs);
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", report.render_text());
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn install_services(config: Option<PathBuf>, args: InstallServicesArgs) -> anyhow::Result<ExitCode> {
    use handoff::services;
    let (cfg, _) = load_config(config)?;
    let mut layout = services::Layout::from_env()?;
    if let Some(dir) = args.bin_dir {
        layout.bin_dir = dir;
    }
    let report = if args.uninstall {
        services::uninstall(&layout, args.dry_run)?
    } else {
        services::install(&cfg, &layout, args.lg_autostart, args.dry_run)?
    };
    if args.json {
        print_json(&report)?;
    } else {
        print!("{report}");
    }
    Ok(if report.foreign() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `handoff lg --on-vm-start` (see [`handoff::lg::on_vm_start`]): opens the client and holds
/// a sleep inhibitor (when built with it) while the VM runs. Returns only on error (systemd
/// restarts the unit).
fn lg_on_vm_start(
    cfg: &Config,
    session: &handoff::i3::Session,
    wait: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let mut hv = handoff::hypervisor::open(cfg);
    // The guard is the sleep inhibitor, opaque here: dropping it releases the lock.
    let mut started = |vm: &handoff::config::VmConfig| -> Option<Box<dyn std::any::Any>> {
        match handoff::lg::open(cfg, session, wait) {
            Ok(o) => eprintln!("{}", o.describe(cfg, Some(vm.label()))),
            Err(e) => eprintln!("handoff: {e}"),
        }
        #[cfg(feature = "inhibit")]
        match handoff::inhibit::hold(&handoff::inhibit::reason_for(vm.label())) {
            Ok(i) => return Some(Box::new(i)),
            Err(e) => eprintln!("handoff: cannot block suspend while {} runs: {e}", vm.label()),
        }
        None
    };
    let e = handoff::lg::on_vm_start(cfg, &mut *hv, &mut started, &mut |line| eprintln!("{line}"));
    Err(e.into())
}

/// `handoff watch`: the live change stream, one line (or JSON object) per change.
fn watch(cfg: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let watcher = handoff::live::Watcher::new(cfg, handoff::live::Sources::for_watch(cfg))?;
    handoff::live::write_changes(
        std::iter::from_fn(|| watcher.recv().ok()),
        json,
        &mut std::io::stdout().lock(),
    )?;
    Ok(ExitCode::SUCCESS)
}
