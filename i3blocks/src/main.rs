//! `handoff-block`: who owns the GPU, for a bar (i3blocks, i3status-rust, waybar,
//! polybar), and what a click on it does. docs/bar.md has the bar configs.
//!
//! Answers from sysfs, `/proc` and the hook's files under `[host] run` only: it links
//! neither libvirt nor GTK and never opens a GPU node (ARCHITECTURE.md, "Binaries stay light").
//! [`view`] reads the machine, [`format`](mod@format) prints it per bar, [`click`] acts on a click
//! (detached), [`watch`] streams changes or signals i3blocks.

mod click;
mod format;
mod pve;
mod view;
mod watch;

use handoff::config::Config;
use std::process::ExitCode;

use handoff::escape::plain;

use click::Button;
use format::Format;

const HELP: &str = "\
handoff-block: who owns the GPU, for a bar.

Usage: handoff-block [--gpu GPU] [--format F] [--short] [--click BUTTON] [--watch | --signal-i3blocks N]

  --gpu GPU           with several [[gpu]] entries, show this one (its address or label).
                      Without it, i3blocks' instance= (BLOCK_INSTANCE) chooses when it names
                      a [[gpu]]; else the primary GPU

  --format F          i3blocks (default: three lines), i3blocks-json, i3status-rust,
                      waybar, polybar
  --short             the short text (\"L·2\") as the main text
  --click BUTTON      left, middle or right: act as for that click, then print.
                      i3blocks' BLOCK_BUTTON is read when this is not given.
  --watch             keep running, print a line per change (persistent blocks);
                      a config error is shown until the file is fixed, a saved
                      config is read again, a click refreshes it; ends with the bar
  --signal-i3blocks N keep running, send SIGRTMIN+N to your i3blocks on each change
                      (for one-shot blocks with signal=N; keeps i3blocks clicks working)
  --config FILE       use this config (same as HANDOFF_CONFIG=FILE)

Clicks: left opens Looking Glass while the VM runs, else shows the status and who uses
the GPU; right starts the first [[vm]] (refused, naming them, while anything holds the
GPU) or asks whether to stop it; middle runs [block] middle_click. Actions run detached.
";

#[derive(Debug)]
struct Args {
    help: bool,
    format: Format,
    short: bool,
    click: Option<Button>,
    watch: bool,
    signal: Option<i32>,
    job: Option<Vec<String>>,
    /// `--config FILE`: read as given, so a missing one is blamed on that flag.
    config: Option<std::path::PathBuf>,
    /// `--gpu GPU`: the GPU to show, by address or label; one it does not name is an error.
    gpu: Option<String>,
    /// i3blocks' `BLOCK_INSTANCE`: the GPU to show when it names one. Blocks configured before
    /// there were several GPUs say `instance=gpu`, which names none: the primary GPU then.
    instance: Option<String>,
}

/// The command line (without the program name), and i3blocks' `BLOCK_BUTTON` for the
/// click when `--click` is not given. Pure: `main` prints the help and sets the
/// environment. An error quotes the argument it is about (escaped: it goes to a terminal).
#[cfg(test)]
fn parse_args(argv: impl IntoIterator<Item = String>, block_button: Option<&str>) -> Result<Args, String> {
    parse_args_with_instance(argv, block_button, None)
}

/// `parse_args` with i3blocks' `BLOCK_INSTANCE`, the GPU when `--gpu` is not given.
fn parse_args_with_instance(
    argv: impl IntoIterator<Item = String>,
    block_button: Option<&str>,
    block_instance: Option<&str>,
) -> Result<Args, String> {
    let mut a = Args {
        help: false,
        format: Format::I3blocks,
        short: false,
        click: None,
        watch: false,
        signal: None,
        job: None,
        config: None,
        gpu: None,
        instance: block_instance.filter(|i| !i.is_empty()).map(str::to_owned),
    };
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => a.help = true,
            "--format" => {
                let v = value("--format")?;
                a.format = Format::parse(&v).ok_or_else(|| {
                    format!(
                        "--format {}: expected i3blocks, i3blocks-json, i3status-rust, waybar or polybar",
                        plain(&v)
                    )
                })?;
            }
            "--short" => a.short = true,
            "--click" => {
                let v = value("--click")?;
                a.click = Some(
                    Button::parse(&v)
                        .ok_or_else(|| format!("--click {}: expected left, middle or right", plain(&v)))?,
                );
            }
            "--watch" => a.watch = true,
            "--signal-i3blocks" => {
                let v = value("--signal-i3blocks")?;
                // Checked here, before anything runs: i3blocks' signal=N is SIGRTMIN+N, and
                // only a few of those exist.
                let n = v.parse().map_err(|_| watch::signal_range_error(&plain(&v)))?;
                watch::rt_signal(n)?;
                a.signal = Some(n);
            }
            "--config" => a.config = Some(value("--config")?.into()),
            "--gpu" => a.gpu = Some(value("--gpu")?),
            "--job" => {
                a.job = Some(it.by_ref().collect());
            }
            other => return Err(format!("unknown argument \"{}\" (see --help)", plain(other))),
        }
    }
    if a.click.is_none() {
        // i3blocks: 1 left, 2 middle, 3 right; 4/5 (wheel) do nothing.
        a.click = block_button.and_then(Button::parse);
    }
    Ok(a)
}

fn main() -> ExitCode {
    let button = std::env::var("BLOCK_BUTTON").ok();
    let instance = std::env::var("BLOCK_INSTANCE").ok();
    let args =
        match parse_args_with_instance(std::env::args().skip(1), button.as_deref(), instance.as_deref()) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("handoff-block: {e}");
                return ExitCode::from(2);
            }
        };
    if args.help {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &args.config {
        // For the `handoff` commands a click runs, which read HANDOFF_CONFIG.
        // SAFETY: single-threaded at this point; nothing else reads the environment.
        unsafe { std::env::set_var("HANDOFF_CONFIG", path) };
    }
    // One of several GPUs, when asked: the block then shows it as it shows the primary one.
    let focus = |cfg: Config| -> Result<Config, String> {
        match (&args.gpu, &args.instance) {
            (Some(name), _) => cfg.focused_on(name).ok_or_else(|| no_such_gpu(&cfg, name)),
            (None, Some(instance)) => Ok(cfg.focused_on(instance).unwrap_or(cfg)),
            (None, None) => Ok(cfg),
        }
    };
    if args.watch && args.signal.is_none() {
        // Loads (and reloads) the config itself: a streaming block stays up through a
        // config error and shows it until the file is fixed.
        return match watch::watch(args.config.as_deref(), &focus, args.format, args.short) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("handoff-block: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let cfg = match watch::load(args.config.as_deref()).0.map(focus) {
        Ok(Ok(cfg)) => cfg,
        Ok(Err(e)) => {
            eprintln!("handoff-block: {e}");
            let v = watch::no_such_gpu_view(&e);
            println!("{}", format::render(&v, args.format, args.short, false));
            return ExitCode::from(33); // i3blocks: urgent
        }
        Err(e) => {
            // A bar shows the first line: keep it short, put the detail on stderr.
            eprintln!("handoff-block: {e}");
            let v = watch::config_error_view(&e);
            println!("{}", format::render(&v, args.format, args.short, false));
            return ExitCode::from(33); // i3blocks: urgent
        }
    };
    if let Some(job) = &args.job {
        return match click::run_job(&cfg, job) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                click::log(&format!("handoff-block --job {}: {e}", job.join(" ")));
                ExitCode::FAILURE
            }
        };
    }
    if let Some(n) = args.signal {
        if let Err(e) = watch::signal_i3blocks(&cfg, n) {
            eprintln!("handoff-block: {e}");
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    let v = view::read(&cfg, &mut pve::Pve::default());
    if let Some(button) = args.click {
        // Acts on what the bar shows; what the click started shows on a later refresh.
        let action = click::action(&cfg, &v, button);
        if let Err(e) = click::perform(&action) {
            eprintln!("handoff-block: the {button:?} click failed: {e}");
        }
        // A `--watch` block of the same bar learns nothing of a click (and nothing
        // announces a process opening the GPU): tell it to read the machine again.
        watch::refresh_streaming_blocks(&cfg.host.procfs);
    }
    println!("{}", format::render(&v, args.format, args.short, false));
    if args.format == Format::I3blocks && v.verdict.state.urgent() {
        return ExitCode::from(33);
    }
    ExitCode::SUCCESS
}

/// What the block says when `--gpu` (or the instance) names no `[[gpu]]`.
fn no_such_gpu(cfg: &Config, name: &str) -> String {
    let known: Vec<String> = cfg
        .gpu
        .iter()
        .map(|g| g.label.clone().unwrap_or_else(|| g.address.to_string()))
        .collect();
    format!(
        "no [[gpu]] is \"{}\" (configured: {})",
        plain(name),
        known.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> proptest::test_runner::Config {
        proptest::test_runner::Config {
            cases: 256,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        }
    }

    const WORDS: &[&str] = &[
        "--format",
        "--short",
        "--click",
        "--watch",
        "--signal-i3blocks",
        "--config",
        "--job",
        "--help",
        "i3blocks",
        "waybar",
        "polybar",
        "left",
        "middle",
        "right",
        "1",
        "2",
        "3",
        "4",
        "0",
        "-1",
        "2147483647",
        "-2147483648",
        "99999999999",
        "",
        "\u{1b}[31m",
        "<b>",
    ];

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn the_click_reader_never_panics_and_a_refusal_quotes_the_argument(
            argv in proptest::collection::vec(
                prop_oneof![3 => proptest::sample::select(WORDS).prop_map(str::to_owned), 1 => any::<String>()],
                0..8,
            ),
            button in proptest::option::of(prop_oneof![
                proptest::sample::select(WORDS).prop_map(str::to_owned),
                any::<String>(),
            ]),
        ) {
            // BLOCK_BUTTON: anything that is not a button (wheel, junk) is no click.
            if let Some(b) = &button {
                let parsed = Button::parse(b);
                prop_assert_eq!(parsed.is_some(), ["1", "2", "3", "left", "middle", "right"].contains(&b.as_str()));
            }
            match parse_args(argv.clone(), button.as_deref()) {
                Ok(a) => {
                    if let Some(n) = a.signal {
                        prop_assert!(watch::rt_signal(n).is_ok());
                    }
                }
                Err(e) => {
                    // The message names the flag or argument it is about, escaped, on one line.
                    prop_assert!(!e.contains('\n') && !e.contains('\x1b'), "{e:?}");
                    let about = argv
                        .iter()
                        .any(|w| (!w.is_empty() && e.contains(&plain(w))) || e.contains(&format!("\"{}\"", plain(w))));
                    prop_assert!(about, "{e:?} names none of {argv:?}");
                }
            }
        }
    }

    #[test]
    fn block_button_and_click_flags_read_as_i3blocks_means_them() {
        let a = parse_args(Vec::<String>::new(), Some("3")).unwrap();
        assert_eq!(a.click, Some(Button::Right));
        let a = parse_args(["--click".to_owned(), "left".to_owned()], Some("3")).unwrap();
        assert_eq!(a.click, Some(Button::Left), "--click wins over BLOCK_BUTTON");
        assert_eq!(
            parse_args(Vec::<String>::new(), Some("4")).unwrap().click,
            None,
            "the wheel is no click"
        );
        let e = parse_args(["--click".to_owned(), "up\x1b".to_owned()], None).unwrap_err();
        assert_eq!(e, r"--click up\x1b: expected left, middle or right");
    }
}
