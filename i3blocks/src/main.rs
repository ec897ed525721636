//! `handoff-block`: who owns the GPU, for a bar (i3blocks, i3status-rust, waybar,
//! polybar), and what a click on it does. docs/bar.md has the bar configs.
//!
//! Answers from sysfs, `/proc` and the hook's files under `[host] run` only: it links
//! neither libvirt nor GTK and never opens a GPU node (DESIGN.md, "Binaries stay light").
//! [`view`] reads the machine, [`format`] prints it per bar, [`click`] acts on a click
//! (detached), [`watch`] streams changes or signals i3blocks.

mod click;
mod format;
mod view;
mod watch;

use std::process::ExitCode;

use handoff::config::Config;

use click::Button;
use format::Format;

const HELP: &str = "\
handoff-block: who owns the GPU, for a bar.

Usage: handoff-block [--format F] [--short] [--click BUTTON] [--watch | --signal-i3blocks N]

  --format F          i3blocks (default: three lines), i3blocks-json, i3status-rust,
                      waybar, polybar
  --short             the short text (\"L·2\") as the main text
  --click BUTTON      left, middle or right: act as for that click, then print.
                      i3blocks' BLOCK_BUTTON is read when this is not given.
  --watch             keep running, print a line per change (persistent blocks)
  --signal-i3blocks N keep running, send SIGRTMIN+N to your i3blocks on each change
                      (for one-shot blocks with signal=N; keeps i3blocks clicks working)
  --config FILE       use this config (same as HANDOFF_CONFIG=FILE)

Clicks: left opens Looking Glass while the VM runs, else shows the status and who uses
the GPU; right starts the first [[vm]] (refused, naming them, while anything holds the
GPU) or asks whether to stop it; middle runs [block] middle_click. Actions run detached.
";

struct Args {
    format: Format,
    short: bool,
    click: Option<Button>,
    watch: bool,
    signal: Option<i32>,
    job: Option<Vec<String>>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        format: Format::I3blocks,
        short: false,
        click: None,
        watch: false,
        signal: None,
        job: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--format" => {
                let v = value("--format")?;
                a.format = Format::parse(&v).ok_or_else(|| {
                    format!(
                        "--format {v}: expected i3blocks, i3blocks-json, i3status-rust, waybar or polybar"
                    )
                })?;
            }
            "--short" => a.short = true,
            "--click" => {
                let v = value("--click")?;
                a.click = Some(
                    Button::parse(&v)
                        .ok_or_else(|| format!("--click {v}: expected left, middle or right"))?,
                );
            }
            "--watch" => a.watch = true,
            "--signal-i3blocks" => {
                let v = value("--signal-i3blocks")?;
                a.signal = Some(
                    v.parse()
                        .map_err(|_| format!("--signal-i3blocks {v}: expected a number"))?,
                );
            }
            "--config" => {
                // SAFETY: single-threaded at this point; nothing else reads the environment.
                unsafe { std::env::set_var("HANDOFF_CONFIG", value("--config")?) };
            }
            "--job" => {
                a.job = Some(it.by_ref().collect());
            }
            other => return Err(format!("unknown argument {other} (see --help)")),
        }
    }
    if a.click.is_none() {
        // i3blocks: 1 left, 2 middle, 3 right; 4/5 (wheel) do nothing.
        a.click = std::env::var("BLOCK_BUTTON").ok().and_then(|b| Button::parse(&b));
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("handoff-block: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = match Config::load() {
        Ok((cfg, _)) => cfg,
        Err(e) => {
            // A bar shows the first line: keep it short, put the detail on stderr.
            eprintln!("handoff-block: {e}");
            let v = view::View::error(&e.to_string());
            let v = view::View {
                text: "GPU: config error".into(),
                short: "GPU: cfg!".into(),
                ..v
            };
            println!("{}", format::render(&v, args.format, args.short, false));
            return ExitCode::from(33); // i3blocks: urgent
        }
    };
    if let Some(job) = &args.job {
        return match click::run_job(&cfg, job) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("handoff-block --job {}: {e}", job.join(" "));
                ExitCode::FAILURE
            }
        };
    }
    if args.watch || args.signal.is_some() {
        let r = match args.signal {
            Some(n) => watch::signal_i3blocks(&cfg, n),
            None => watch::watch(&cfg, args.format, args.short),
        };
        if let Err(e) = r {
            eprintln!("handoff-block: {e}");
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    let v = view::read(&cfg);
    if let Some(button) = args.click {
        // Acts on what the bar shows; what the click started shows on a later refresh.
        let action = click::action(&cfg, &v, button);
        if let Err(e) = click::perform(&action) {
            eprintln!("handoff-block: the {button:?} click failed: {e}");
        }
    }
    println!("{}", format::render(&v, args.format, args.short, false));
    if args.format == Format::I3blocks && v.verdict.state.urgent() {
        return ExitCode::from(33);
    }
    ExitCode::SUCCESS
}
