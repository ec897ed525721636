//! `handoff`: the command line. Thin: parse arguments, call the library, print.
//!
//! It links the core crate only, never libvirt: the hook (run by libvirtd for every event
//! of every VM), `blockers`, `bind`, `rebind`, and `status`, `doctor` and `watch` while no
//! VM is configured run here and load no libvirt. The commands that talk to libvirt are
//! run by `handoff-vm` (the `handoff-libvirt` crate), installed beside this binary, which
//! this one becomes (exec, same arguments) for them ([`handoff::cli::Command::needs_libvirt`];
//! ARCHITECTURE.md, "Binaries stay light").

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use handoff::cli::{
    BindArgs, Cli, Command, ConfigCommand, InstallServicesArgs, LgArgs, RebindArgs, error_text, init_logging,
    load_config, print_json,
};
use handoff::config::{Config, Source};

// The seed's command names (argv[0] dispatch) and `handoff __generate` (man pages,
// completions, links): packaging, binary-side.
mod argv0;
mod generate;

/// The sibling binary that runs the commands that talk to libvirt.
const VM_SIDE: &str = "handoff-vm";

fn main() -> ExitCode {
    if hook_ignores(std::env::args_os()) {
        return ExitCode::SUCCESS;
    }
    if let Some(code) = generate::if_asked(Cli::command) {
        return code;
    }
    let (cli, args): (Cli, _) = argv0::parse_with_args();
    let has_vms = || load_config(cli.config.clone()).is_ok_and(|(cfg, _)| !cfg.vms.is_empty());
    if cli.command.needs_libvirt(has_vms) {
        return vm_side(&args);
    }
    init_logging(cli.verbose, cli.quiet);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("handoff: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

/// libvirtd runs the hook for every event of every VM (`handoff hook -- <domain> <operation>
/// <sub-operation> <extra>`, the shim's exact form) and waits for it; it acts on two of them
/// ([`handoff::hook::run`]). The others are answered before the command line's grammar is
/// even built: that is most of a start-up libvirtd would wait on (benches/hook.sh).
fn hook_ignores(mut args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    let mut next = || args.next();
    let (_, hook, dashes, _domain, op, sub) = (next(), next(), next(), next(), next(), next());
    hook.is_some_and(|h| h == "hook")
        && dashes.is_some_and(|d| d == "--")
        && matches!((op, sub), (Some(op), Some(sub)) if !handoff::hook::acts_on(&op.to_string_lossy(), &sub.to_string_lossy()))
}

/// Becomes `handoff-vm` with the same arguments (after the seed's command names were
/// resolved); returns only when that cannot be run.
fn vm_side(args: &[std::ffi::OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let program = handoff::action::sibling(VM_SIDE);
    let e = std::process::Command::new(&program)
        .args(args.iter().skip(1))
        .exec();
    eprintln!(
        "handoff: this command talks to libvirt, which {VM_SIDE} does, and {} cannot be run: {e}; \
         it is installed beside handoff (make install, the .deb), or build it with `cargo build -p handoff-libvirt`",
        program.display()
    );
    ExitCode::from(2)
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Config(ConfigCommand::Check { file }) => {
            let (cfg, source) = match file {
                Some(f) => (Config::load_file(&f)?, Source::File(f)),
                None => load_config(cli.config)?,
            };
            // Only without VMs: with VMs, `handoff-vm` runs it and reads their definitions.
            println!("{source}: ok ({} VM(s), {})", cfg.vms.len(), cfg.gpus_summary());
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
        Command::Status(args) => {
            // Only without VMs: with VMs, `handoff-vm` runs it (see `main`).
            let (cfg, _) = load_config(cli.config)?;
            handoff::cli::status(&cfg, &args, &mut |vm| {
                handoff::status::VmStatus::new(vm, handoff::status::VmState::Unknown, None)
            })
        }
        Command::Blockers(args) => {
            let (cfg, _) = load_config(cli.config)?;
            let each = handoff::blockers::Each::check(&cfg, args.gpu.as_deref())?;
            if args.json {
                print_json(&each.json().context("no GPU to scan")?)?;
            } else {
                print!("{}", each.render_text());
            }
            Ok(ExitCode::from(each.exit_code()))
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
            use handoff::pve_hook_install;
            let vmids = if a.vmids.is_empty() && !a.uninstall {
                let (cfg, _) = load_config_to_write(cli.config)?;
                cfg.vms.iter().filter_map(|v| v.vmid).collect()
            } else {
                a.vmids.clone()
            };
            let roots = pve_hook_install::Roots {
                root: a.pve_root.clone().unwrap_or_else(|| PathBuf::from("/")),
            };
            let exe = std::env::current_exe()?.canonicalize()?;
            let plan = pve_hook_install::plan(&roots, &vmids, a.storage.as_deref(), &exe, a.uninstall)?;
            if !a.dry_run {
                pve_hook_install::apply(&roots, &plan)?;
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
            let opts = handoff::hook_install::InstallOptions::for_cli(a.uninstall, a.dry_run, a.hooks_dir)?;
            let report = handoff::hook_install::install_hooks(&opts)?;
            if a.json {
                print_json(&report)?;
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::PublishHolders { system_config } => {
            // Root: only the root-owned system config, like the hook.
            let path = system_config.unwrap_or_else(|| PathBuf::from(handoff::config::SYSTEM_CONFIG));
            let (cfg, _) = handoff::config::Config::load_system(&path)?;
            handoff::publish::run(&cfg)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::InstallPublisher(a) => install_publisher(a),
        Command::Rebind(args) => rebind(cli.config, args),
        Command::Lg(args) => lg(cli.config, args),
        Command::LgTest(args) => {
            // Only with --xml: without, `handoff-vm` asks libvirt for the definition.
            let (cfg, _) = load_config(cli.config)?;
            handoff::cli::lg_test(&cfg, &args, |_| Err("no --xml file given".into()))
        }
        Command::InstallServices(args) => install_services(cli.config, args),
        Command::Watch(flags) => {
            let (cfg, _) = load_config(cli.config)?;
            handoff::cli::watch(&cfg, handoff::live::Sources::for_watch(&cfg), flags.json)
        }
        Command::Bind(args) => bind(cli.config, args),
        // Only where libvirt is not looked at (a PVE node, --no-libvirt): else `handoff-vm`.
        Command::Setup(args) => handoff::cli::setup(cli.config, &args, None, &std::env::current_exe()?),
        Command::Doctor(args) => {
            // Only without VMs, so no libvirt checks (and no sleep inhibitor to check).
            let (cfg, source) = load_config(cli.config)?;
            handoff::cli::doctor(&cfg, &source, &args, Vec::new())
        }
        // The commands that talk to libvirt ran in `handoff-vm` (see `main`).
        Command::Start(_)
        | Command::Stop(_)
        | Command::Switch(_)
        | Command::VmHealth(_)
        | Command::Demo(_)
        | Command::DemoHolder { .. }
        | Command::Agent => anyhow::bail!("this command needs {VM_SIDE}, which `handoff` runs for it"),
    }
}

/// `handoff install-publisher`: plan, show, apply (see `handoff::publisher_install`).
fn install_publisher(a: handoff::cli::InstallPublisherArgs) -> anyhow::Result<ExitCode> {
    use handoff::publisher_install::{Options, apply, plan};
    let path = a
        .system_config
        .clone()
        .unwrap_or_else(|| PathBuf::from(handoff::config::SYSTEM_CONFIG));
    // Where the publisher writes: the system config's [host] run (what the service reads).
    let run = match handoff::config::Config::load_system(&path) {
        Ok((cfg, _)) => cfg.host.run,
        Err(e) if a.uninstall => {
            eprintln!(
                "handoff: {e}; removing the default {}",
                handoff::Host::system().run.display()
            );
            handoff::Host::system().run
        }
        Err(e) => return Err(e.into()),
    };
    let opts = Options {
        systemctl: a.root.is_none(),
        root: a.root.clone().unwrap_or_else(|| PathBuf::from("/")),
        exe: std::env::current_exe()?.canonicalize()?,
        published: run.join(handoff::publish::FILE),
        uninstall: a.uninstall,
    };
    let steps = plan(&opts)?;
    if !a.dry_run {
        apply(&steps)?;
    }
    if a.json {
        print_json(&steps)?;
    } else if steps.is_empty() {
        println!(
            "nothing to do: the holder publisher is {}",
            if a.uninstall { "not installed" } else { "in place" }
        );
    } else {
        for step in &steps {
            println!("{}{step}", if a.dry_run { "would " } else { "" });
        }
    }
    Ok(ExitCode::SUCCESS)
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

fn lg(config: Option<PathBuf>, args: LgArgs) -> anyhow::Result<ExitCode> {
    use handoff::lg::{self, LgOutcome};
    let (cfg, _) = load_config(config)?;
    let session = handoff::i3::Session::from_env();
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

#[cfg(test)]
mod tests {
    use super::hook_ignores;

    fn args(list: &[&str]) -> impl Iterator<Item = std::ffi::OsString> {
        list.iter()
            .map(std::ffi::OsString::from)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn only_the_shims_form_of_an_ignored_event_skips_the_parser() {
        assert!(hook_ignores(args(&[
            "handoff", "hook", "--", "router", "started", "begin", "-"
        ])));
        assert!(hook_ignores(args(&[
            "handoff", "hook", "--", "win11", "prepare", "end", "-"
        ])));
        // The two events the hook acts on, and anything not in the shim's form, go through
        // the grammar and the hook.
        assert!(!hook_ignores(args(&[
            "handoff", "hook", "--", "win11", "prepare", "begin", "-"
        ])));
        assert!(!hook_ignores(args(&[
            "handoff", "hook", "--", "win11", "release", "end", "-"
        ])));
        assert!(!hook_ignores(args(&[
            "handoff", "hook", "router", "started", "begin", "-"
        ])));
        assert!(!hook_ignores(args(&["handoff", "status", "--", "a", "b", "c"])));
        assert!(!hook_ignores(args(&["handoff", "hook", "--", "win11"])));
    }
}
