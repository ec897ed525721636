//! `handoff-vm`: the `handoff` commands that talk to libvirt (start, stop, switch,
//! vm-health, status, doctor and watch with VMs configured, lg --on-vm-start, lg-test
//! without --xml, demo, __agent). `handoff` links no libvirt and runs this binary with its
//! own arguments for those (ARCHITECTURE.md, "Binaries stay light"); run on its own it
//! takes the same arguments. Thin: parse, call the libraries, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use handoff::action::Action;
use handoff::cli::{Cli, Command, ConfigCommand, LgArgs, init_logging, load_config, print_json};
use handoff::config::Config;
use handoff_libvirt::vm;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("handoff: {}", handoff::cli::error_text(&e));
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Status(args) => {
            let (cfg, _) = load_config(cli.config)?;
            let mut hv = handoff_libvirt::open(&cfg);
            // With each VM's devices: status says which VMs could take each GPU.
            handoff::cli::status(&cfg, &args, &mut |vm| {
                handoff::hypervisor::vm_status_with_devices(&mut *hv, vm)
            })
        }
        Command::Config(ConfigCommand::Check { file }) => {
            // With VMs configured (else `handoff` runs it): the file, then what the VMs'
            // definitions say about the GPUs.
            let (cfg, source) = match file {
                Some(f) => (Config::load_file(&f)?, handoff::config::Source::File(f)),
                None => load_config(cli.config)?,
            };
            println!("{source}: ok ({} VM(s), {})", cfg.vms.len(), cfg.gpus_summary());
            let mut hv = handoff_libvirt::open(&cfg);
            Ok(handoff::cli::config_check_vms(&cfg, &mut |vm| {
                hv.describe(&handoff::hypervisor::VmRef::from(vm))
                    .map_err(|e| e.to_string())
            }))
        }
        Command::Doctor(args) => {
            let (cfg, source) = load_config(cli.config)?;
            let mut hv = handoff_libvirt::open(&cfg);
            let mut extra =
                handoff::doctor::libvirt_checks(&cfg, &mut |vm| handoff::hypervisor::vm_status(&mut *hv, vm));
            extra.extend(handoff::doctor::vm_definition_checks(&cfg, &mut |vm| {
                hv.describe(&handoff::hypervisor::VmRef::from(vm))
                    .map_err(|e| e.to_string())
            }));
            extra.push(handoff_inhibit::doctor_check());
            handoff::cli::doctor(&cfg, &source, &args, extra)
        }
        Command::Watch(flags) => {
            let (cfg, _) = load_config(cli.config)?;
            let sources = handoff_libvirt::events::sources(handoff::live::Sources::for_watch(&cfg));
            handoff::cli::watch(&cfg, sources, flags.json)
        }
        Command::LgTest(args) => {
            let (cfg, _) = load_config(cli.config)?;
            handoff::cli::lg_test(&cfg, &args, |vm| {
                handoff_libvirt::open(&cfg)
                    .describe(&handoff::hypervisor::VmRef::from(vm))
                    .map(|d| d.definition)
                    .map_err(|e| e.to_string())
            })
        }
        Command::Lg(LgArgs {
            wait,
            on_vm_start: true,
            ..
        }) => {
            let (cfg, _) = load_config(cli.config)?;
            let session = handoff::i3::Session::from_env();
            lg_on_vm_start(&cfg, &session, std::time::Duration::from_secs(wait))
        }
        Command::Demo(a) => {
            let exe = std::env::current_exe().context("finding the handoff-vm binary")?;
            let bin_dir = exe.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
            let opts = handoff_libvirt::demo::Options {
                script: a.script,
                tray: !a.no_tray && handoff_libvirt::demo::have_display(),
            };
            let code = handoff_libvirt::demo::run(&opts, &exe, &bin_dir).context("handoff demo")?;
            Ok(ExitCode::from(code))
        }
        Command::Setup(args) => {
            // The hook runs `handoff` (installed beside this binary), not handoff-vm.
            let handoff = handoff::action::sibling("handoff");
            let mut list = |uri: &str, notes: &mut Vec<String>| {
                let mut hv = handoff_libvirt::libvirt::Libvirt::new();
                handoff::setup::discover_vms(&mut hv, uri, notes)
            };
            handoff::cli::setup(cli.config, &args, Some(&mut list), &handoff)
        }
        Command::Agent => {
            let (cfg, _) = load_config(cli.config)?;
            handoff_libvirt::agent::serve(&cfg, std::io::stdin().lock(), Box::new(std::io::stdout()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoHolder { node } => {
            handoff_libvirt::demo::hold(&node).with_context(|| format!("opening {}", node.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        // The VM commands are the vocabulary's actions (handoff::action), run by the one
        // implementation the tray's agent and the details window run too.
        Command::Start(a) => {
            if a.stop_holders {
                let (cfg, _) = load_config(cli.config.clone())?;
                if let Err(e) = stop_holders(&cfg, a.yes) {
                    eprintln!("handoff: {e}");
                    return Ok(ExitCode::from(1));
                }
            }
            vm_command(cli.config, cli.quiet, a.json, |ctl, cfg| {
                let vm = match &a.gpu {
                    Some(gpu) => ctl.vm_for_gpu(gpu)?.name,
                    None => vm::resolve(cfg, a.vm.as_deref())?.name.clone(),
                };
                act(ctl, Action::Start { vm }, None)
            })
        }
        Command::Stop(a) => vm_command(cli.config, cli.quiet, a.json, |ctl, cfg| {
            let vm = vm::resolve(cfg, a.vm.as_deref())?.name.clone();
            let action = if a.force {
                Action::ForceStop { vm }
            } else {
                Action::Stop { vm }
            };
            act(ctl, action, a.timeout.map(std::time::Duration::from_secs))
        }),
        Command::Switch(a) => vm_command(cli.config, cli.quiet, a.json, |ctl, cfg| {
            let vm = vm::resolve(cfg, Some(&a.vm))?.name.clone();
            let action = if a.force {
                Action::ForceSwitch { vm }
            } else {
                Action::Switch { vm }
            };
            act(ctl, action, a.timeout.map(std::time::Duration::from_secs))
        }),
        Command::VmHealth(a) => vm_command(cli.config, true, a.json, |ctl, cfg| {
            let vm = vm::resolve(cfg, a.vm.as_deref())?;
            Ok(VmDone::Health(ctl.health(vm)?))
        }),
        // The rest needs no libvirt: `handoff` runs it itself.
        _ => {
            eprintln!("handoff-vm: this command needs no libvirt; run it as `handoff`");
            Ok(ExitCode::from(2))
        }
    }
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

/// What a VM command produced, for [`vm_command`] to print.
enum VmDone {
    Acted(vm::Done),
    Health(vm::Health),
}

/// Runs a VM action of the vocabulary ([`vm::Ctl::act`]).
fn act(
    ctl: &mut vm::Ctl,
    action: Action,
    timeout: Option<std::time::Duration>,
) -> Result<VmDone, vm::VmError> {
    match ctl.act(&action, timeout) {
        Some(done) => done.map(VmDone::Acted),
        None => unreachable!("{action:?} is a VM action"),
    }
}

/// Runs a VM command: progress lines on stderr (none with -q), the outcome on stdout as
/// text or JSON, errors as `handoff: …` with exit 1 (2 for a usage/config error).
fn vm_command(
    config: Option<PathBuf>,
    quiet: bool,
    json: bool,
    f: impl FnOnce(&mut vm::Ctl, &Config) -> Result<VmDone, vm::VmError>,
) -> anyhow::Result<ExitCode> {
    let (cfg, _) = load_config(config)?;
    let mut say = |line: &str| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let mut ctl = vm::Ctl::new(&cfg, &mut say);
    let done = match f(&mut ctl, &cfg) {
        Ok(done) => done,
        Err(e) => {
            if let vm::VmError::HookRefused { warnings, .. } = &e {
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
        VmDone::Acted(vm::Done::Started(out)) => {
            if json {
                print_json(out)?;
            } else {
                print_started(out);
            }
            after_start(&cfg, out);
        }
        VmDone::Acted(vm::Done::Stopped(out)) => {
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
        VmDone::Acted(vm::Done::Switched(out)) => {
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

fn print_started(out: &vm::StartOutcome) {
    let gpu = out.gpus_words();
    let was = if out.already_running { "was already" } else { "is" };
    println!("{} ({}) {was} {}; {gpu}.", out.label, out.vm, out.state.words());
}

fn print_stopped(out: &vm::StopOutcome) {
    let gpu = out.gpus_words();
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
fn after_start(cfg: &Config, out: &vm::StartOutcome) {
    match out.after_start() {
        vm::AfterStart::OpenLookingGlass => {
            let session = handoff::i3::Session::from_env();
            match handoff::lg::open(cfg, &session, handoff::lg::WINDOW_WAIT) {
                Ok(outcome) => eprintln!("{}", outcome.describe(cfg, Some(&out.label))),
                Err(e) => eprintln!(
                    "handoff: warning: {} is running, but Looking Glass did not open: {e}",
                    out.label
                ),
            }
        }
        vm::AfterStart::Nothing(why) => tracing::info!("no Looking Glass: {why}"),
    }
}

/// `handoff lg --on-vm-start` (see [`handoff::lg::on_vm_start`]): opens the client and holds
/// a sleep inhibitor while the VM runs. Returns only on error (systemd
/// restarts the unit).
fn lg_on_vm_start(
    cfg: &Config,
    session: &handoff::i3::Session,
    wait: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let mut hv = handoff_libvirt::open(cfg);
    // The guard is the sleep inhibitor, opaque here: dropping it releases the lock.
    let mut started = |vm: &handoff::config::VmConfig| -> Option<Box<dyn std::any::Any>> {
        match handoff::lg::open(cfg, session, wait) {
            Ok(o) => eprintln!("{}", o.describe(cfg, Some(vm.label()))),
            Err(e) => eprintln!("handoff: {e}"),
        }
        match handoff_inhibit::hold(&handoff_inhibit::reason_for(vm.label())) {
            Ok(i) => Some(Box::new(i)),
            Err(e) => {
                eprintln!("handoff: cannot block suspend while {} runs: {e}", vm.label());
                None
            }
        }
    };
    let e = handoff::lg::on_vm_start(cfg, &mut *hv, &mut started, &mut |line| eprintln!("{line}"));
    Err(e.into())
}
