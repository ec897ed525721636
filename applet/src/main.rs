//! `handoff-tray`: the StatusNotifierItem. Not built yet; until it is, it says so plainly
//! instead of pretending, and points at what works today.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "handoff-tray: the tray icon is not available in this version yet.\n\
         Use `handoff status` (or `handoff-block` in your bar) to see who owns the GPU."
    );
    ExitCode::from(2)
}
