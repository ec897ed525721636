//! `handoff`: the command line. Thin: parse arguments, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use handoff::config::{Config, Source};
use handoff::{doctor, status};

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
        Exit codes: 0 success, 1 the answer is a problem (blockers: something holds the GPU; doctor: the host is not ready; a handoff failed), 2 usage or config error."
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
    /// Who owns the GPU, which VM runs, and what uses the GPU (the seed's `vfio-status`).
    #[command(visible_alias = "vfio-status")]
    Status(JsonFlag),
    /// The processes that would stop a handoff now: what holds the GPU's device nodes.
    ///
    /// Exit status 0 when nothing holds the GPU, 1 when something does. Unprivileged, it sees
    /// your own processes and counts the ones it could not inspect; as root it sees all.
    Blockers(JsonFlag),
    /// Is this host ready for passthrough, and what to fix (exit 0 ready, 1 problems found).
    Doctor(JsonFlag),
    /// Validate or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Return the GPU to the host driver from whatever state it is in (the seed's
    /// `gpu-rebind-nvidia`). Needs root: `sudo handoff rebind --force` or `pkexec handoff rebind --force`.
    ///
    /// Uses the restore record under [host] run when there is one (each function goes back to the
    /// driver it had), else returns the graphics function to [gpu] host_driver. Refuses while a VM
    /// still uses the GPU.
    #[command(visible_alias = "gpu-rebind-nvidia")]
    Rebind(RebindArgs),
    /// Move the GPU to vfio-pci by hand, as the hook does before a VM starts (root).
    ///
    /// Refuses, changing nothing, while any process holds the GPU.
    Bind(BindArgs),
    /// Install (or with --uninstall remove) the libvirt hook that guards and binds the GPU
    /// (the seed's `install-hooks`). Idempotent; needs root.
    ///
    /// Puts a small shim at /etc/libvirt/hooks/qemu.d/handoff that runs `handoff hook`, never
    /// touching an existing /etc/libvirt/hooks/qemu, and makes libvirtd re-read its hooks (SIGHUP).
    InstallHooks(InstallHooksArgs),
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
    /// Print one line per change as it happens: driver binds of the GPU's functions, VM
    /// lifecycle events, the hook's state file, libvirtd going away and coming back.
    ///
    /// What the tray and `handoff-block --watch` listen to; no polling. Runs until
    /// interrupted (or stdout closes).
    Watch(JsonFlag),
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
}

#[derive(Args)]
struct BindArgs {
    /// Print the steps without doing them.
    #[arg(long)]
    dry_run: bool,
    /// Record this VM as the GPU's holder.
    #[arg(long)]
    vm: Option<String>,
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
    let cli = Cli::parse();
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
        .without_time()
        .init();
}

fn load_config(explicit: Option<PathBuf>) -> anyhow::Result<(Config, Source)> {
    // `--config FILE` is read as given, so a missing one is reported as that file, not
    // as HANDOFF_CONFIG.
    if let Some(path) = explicit {
        return Ok((Config::load_file(&path)?, Source::File(path)));
    }
    Ok(Config::load()?)
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
            println!("{source}: ok ({} VM(s), GPU {})", cfg.vms.len(), cfg.gpu.address);
            Ok(ExitCode::SUCCESS)
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
        Command::Status(flags) => {
            let (cfg, _) = load_config(cli.config)?;
            let st = collect_status(&cfg)?;
            if flags.json {
                print_json(&st)?;
            } else {
                print!("{}", st.render_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Blockers(flags) => {
            let (cfg, _) = load_config(cli.config)?;
            let g = handoff::gpu::read_gpu(&cfg.host, cfg.gpu.address)?;
            let nodes = handoff::holders::gpu_nodes(&cfg.host, &g);
            let scan = handoff::holders::scan(&cfg.host, &g, &nodes);
            if flags.json {
                print_json(&scan)?;
            } else if g.owner == handoff::gpu::Owner::Absent {
                println!("No GPU at {}: nothing to hold.", cfg.gpu.address);
            } else {
                if scan.holders.is_empty() {
                    println!(
                        "Nothing holds GPU {} ({} device nodes checked).",
                        g.address,
                        nodes.len()
                    );
                }
                for h in &scan.holders {
                    println!("{}", h.summary());
                }
                if scan.uninspected > 0 {
                    println!("{}", status::uninspected_line(scan.uninspected));
                }
                for n in &scan.notes {
                    println!("Note: {n}");
                }
            }
            Ok(if scan.holders.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Watch(flags) => {
            let (cfg, _) = load_config(cli.config)?;
            watch(&cfg, flags.json)
        }
        Command::Hook { args, system_config } => {
            let path = system_config.unwrap_or_else(|| PathBuf::from(handoff::config::SYSTEM_CONFIG));
            let code = handoff::hook::run(&args, &mut std::io::stdin(), &path, &mut std::io::stderr());
            Ok(ExitCode::from(code as u8))
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
        Command::Rebind(args) => rebind(cli.config, args),
        Command::Bind(args) => bind(cli.config, args),
        Command::Doctor(flags) => {
            let (cfg, source) = load_config(cli.config)?;
            let report = doctor::run(
                &cfg,
                &source,
                &doctor::Caller::current(),
                std::path::Path::new(handoff::hooks::DEFAULT_HOOKS_DIR),
                libvirt_checks(&cfg),
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

fn collect_status(cfg: &Config) -> anyhow::Result<status::Status> {
    let mut prober = handoff::libvirt::Prober::new();
    Ok(status::collect(cfg, &mut |vm| prober.probe(vm))?)
}

/// Doctor's libvirt checks: each configured VM's URI answers and defines the domain.
fn libvirt_checks(cfg: &Config) -> Vec<doctor::Check> {
    let mut prober = handoff::libvirt::Prober::new();
    cfg.vms
        .iter()
        .map(|vm| {
            let st = prober.probe(vm);
            match st.state {
                status::VmState::Unknown | status::VmState::Undefined => doctor::Check {
                    id: "libvirt",
                    level: doctor::Level::Fail,
                    summary: format!("VM {} at {}: {}", vm.name, vm.uri, st.state.words()),
                    fix: st.error,
                },
                s => doctor::Check {
                    id: "libvirt",
                    level: doctor::Level::Ok,
                    summary: format!(
                        "VM {} ({}) at {} is defined, {}",
                        vm.name,
                        vm.label(),
                        vm.uri,
                        s.words()
                    ),
                    fix: None,
                },
            }
        })
        .collect()
}

fn progress(step: &handoff::bind::plan::Step, host: &handoff::Host) {
    eprintln!("  {}", step.describe(host));
}

fn rebind(config: Option<PathBuf>, args: RebindArgs) -> anyhow::Result<ExitCode> {
    use handoff::bind::{plan, record::RestoreRecord};
    let (cfg, _) = load_config(config)?;
    let host = &cfg.host;
    let g = handoff::gpu::read_gpu(host, cfg.gpu.address)?;
    let record = RestoreRecord::load(host, cfg.gpu.address)?;
    if args.dry_run || !args.force {
        let steps = plan::to_host(&g, record.as_ref(), &cfg.gpu.host_driver);
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
    let users = handoff::holders::vfio_users(host, &g);
    if !users.is_empty() {
        let list: Vec<String> = users.iter().map(|h| format!("  {}", h.summary())).collect();
        if !args.even_if_vm_runs {
            anyhow::bail!(
                "a VM still uses GPU {}:\n{}\nStop the VM first (handoff stop), or add --even-if-vm-runs: the VM loses its GPU and will likely crash",
                g.address,
                list.join("\n")
            );
        }
        eprintln!(
            "handoff: warning: taking the GPU from a running VM:\n{}",
            list.join("\n")
        );
    }
    let timeout = std::time::Duration::from_secs(cfg.gpu.watchdog_s);
    eprintln!("Returning GPU {} to the host:", g.address);
    match handoff::bind::return_to_host(host, cfg.gpu.address, &cfg.gpu.host_driver, timeout, &mut |s| {
        progress(s, host)
    }) {
        Ok(_) => {
            let g = handoff::gpu::read_gpu(host, cfg.gpu.address)?;
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
    let (cfg, _) = load_config(config)?;
    let host = &cfg.host;
    let g = handoff::gpu::read_gpu(host, cfg.gpu.address)?;
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
    let timeout = std::time::Duration::from_secs(cfg.gpu.watchdog_s);
    eprintln!("Handing GPU {} to vfio-pci:", g.address);
    match handoff::bind::hand_to_vfio(host, cfg.gpu.address, args.vm.as_deref(), timeout, &mut |s| {
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

/// `handoff watch`: the live change stream, one line (or JSON object) per change.
fn watch(cfg: &Config, json: bool) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let sources = handoff::live::Sources {
        libvirt: cfg!(feature = "libvirt") && !cfg.vms.is_empty(),
        ..handoff::live::Sources::without_libvirt()
    };
    let watcher = handoff::live::Watcher::new(cfg, sources)?;
    let mut out = std::io::stdout().lock();
    while let Ok(change) = watcher.recv() {
        let line = if json {
            serde_json::to_string(&change)?
        } else {
            change.to_string()
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break; // stdout closed: nobody is reading
        }
    }
    Ok(ExitCode::SUCCESS)
}
