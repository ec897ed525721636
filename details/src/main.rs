//! `handoff-details`: the GTK4 details window — who owns the GPU, its functions and
//! drivers, the IOMMU group, each VM's state, what holds the GPU, the hook's last refusal,
//! and buttons for the same actions as the tray.
//!
//! A process of its own so the tray does not link GTK (ARCHITECTURE.md, "Binaries stay light");
//! the tray runs `handoff-details` with no arguments. It is a single-instance GTK
//! application (`org.handoff.Details` on the session bus): running it again raises the open
//! window instead of opening a second one.
//!
//! Environment: `HANDOFF_CONFIG` (the config file, as for every handoff binary),
//! `HANDOFF_LOG` (tracing filter), and `HANDOFF_DETAILS_DUMP=1`, a test and debugging aid
//! that prints every view-model read as one JSON line on stdout, drawn or not (a GTK4 window's text
//! cannot be read back without AT-SPI).

mod actions;
mod ui;
mod view;

use std::cell::RefCell;
use std::process::ExitCode;
use std::rc::Rc;

use clap::Parser;
use gtk4 as gtk;
use gtk4::gio;
use gtk4::prelude::*;

use handoff::config::Config;

const APP_ID: &str = "org.handoff.Details";
const NO_DISPLAY: &str = "handoff-details: no display: run it on the desktop, or use `handoff status`";

/// The handoff details window: who owns the GPU, what holds it, and the actions.
#[derive(Parser)]
#[command(
    name = "handoff-details",
    version,
    after_help = "\
Environment:
  HANDOFF_CONFIG=<file>    the config file (default ~/.config/handoff/config.toml, then /etc/handoff/config.toml)
  HANDOFF_DETAILS_DUMP=1   print each view read as one JSON line on stdout, drawn or not (tests, debugging)

Exit status: 0 when the window is closed, 1 without a display, 2 for a broken config."
)]
struct Args {
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, conflicts_with = "verbose")]
    quiet: bool,
}

fn init_logging(args: &Args) {
    let level = match (args.quiet, args.verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HANDOFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: as the hook, stderr becomes
        // libvirt's error text, and in a log or a pipe they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn has_display() -> bool {
    ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

/// A session bus is reachable (the env var, or systemd's per-user socket). Without one,
/// GApplication cannot register, so the window runs non-unique instead of failing.
fn has_session_bus() -> bool {
    std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some_and(|v| !v.is_empty())
        || std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).join("bus").exists())
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args);
    if !has_display() {
        eprintln!("{NO_DISPLAY}");
        return ExitCode::from(1);
    }
    let cfg = match Config::load() {
        Ok((cfg, _)) => cfg,
        Err(e) => {
            eprintln!("handoff-details: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = gtk::init() {
        eprintln!("{NO_DISPLAY} ({e})");
        return ExitCode::from(1);
    }
    handoff_libvirt::libvirt::quiet();
    let dump = std::env::var_os("HANDOFF_DETAILS_DUMP").is_some_and(|v| v == "1");

    let flags = if has_session_bus() {
        gio::ApplicationFlags::empty()
    } else {
        gio::ApplicationFlags::NON_UNIQUE
    };
    let app = gtk::Application::new(Some(APP_ID), flags);
    let cfg = RefCell::new(Some(cfg));
    let window: Rc<RefCell<Option<Rc<ui::Details>>>> = Rc::default();
    app.connect_activate(move |app| {
        if let Some(w) = &*window.borrow() {
            w.present();
            return;
        }
        if let Some(cfg) = cfg.borrow_mut().take() {
            *window.borrow_mut() = Some(ui::Details::new(app, cfg, dump));
        }
    });
    // clap has read the arguments; GApplication gets none of them.
    let argv0 = std::env::args()
        .next()
        .unwrap_or_else(|| "handoff-details".to_owned());
    let code = app.run_with_args(&[argv0]);
    ExitCode::from(u8::from(code))
}
