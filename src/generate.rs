//! `handoff __generate`: writes what packaging installs and derives from the CLI definition
//! itself — man pages (clap_mangen), shell completions (clap_complete) and the seed's command
//! links — so none of it is written by hand or goes stale. Part of the `handoff` binary, not
//! the library. Not a subcommand of the CLI it describes, so it appears in none of the help,
//! man pages or completions. `make` runs it; a plain `cargo build` never pays for it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, FromArgMatches, ValueEnum};
use clap_complete::Shell;

use crate::argv0::LINKS;

/// The first argument that asks for generation instead of the CLI.
const TRIGGER: &str = "__generate";

/// Runs `handoff __generate WHAT DIR` when that is what was asked, describing the CLI that
/// `cli` builds; `None` otherwise.
pub fn if_asked(cli: impl FnOnce() -> clap::Command) -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_none_or(|a| a != TRIGGER) {
        return None;
    }
    let mut cmd = GenerateArgs::augment_args(
        clap::Command::new(TRIGGER)
            .bin_name(format!("handoff {TRIGGER}"))
            .about("Write man pages, shell completions or the command-name links (windows-start, vfio-status, …) into DIR"),
    );
    let matches = cmd
        .clone()
        .get_matches_from(std::iter::once(TRIGGER.into()).chain(args));
    let args = GenerateArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit());
    Some(match run(args, cli()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handoff {TRIGGER}: {e:#}");
            ExitCode::from(2)
        }
    })
}

#[derive(Args)]
struct GenerateArgs {
    /// What to write.
    what: What,
    /// The directory to write into (created if missing).
    dir: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum What {
    /// handoff.1, handoff-<subcommand>.1, and <seed name>.1 pointing at its subcommand's page.
    Man,
    /// bash/handoff, zsh/_handoff, fish/handoff.fish.
    Completions,
    /// The seed's command names as relative symlinks to `handoff`.
    Links,
}

fn run(args: GenerateArgs, cmd: clap::Command) -> anyhow::Result<()> {
    let dir = &args.dir;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    match args.what {
        What::Man => man(cmd, dir),
        What::Completions => completions(cmd, dir),
        What::Links => links(dir),
    }
}

fn man(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    // `man vfio-status` shows `handoff status`'s page.
    for link in LINKS {
        let path = dir.join(format!("{}.1", link.name));
        let page = format!(".so man1/handoff-{}.1\n", link.subcommand);
        fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn completions(mut cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    let name = cmd.get_name().to_owned();
    for (shell, sub, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let path = dir.join(sub).join(file);
        fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut out);
        fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn links(dir: &Path) -> anyhow::Result<()> {
    for link in LINKS {
        let path = dir.join(link.name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot replace {}", path.display())),
        }
        std::os::unix::fs::symlink("handoff", &path)
            .with_context(|| format!("cannot link {} to handoff", path.display()))?;
    }
    Ok(())
}
