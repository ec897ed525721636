//! Whether the parts a test needs are there, and what happens when one is not: under
//! `CI=true` a missing part fails the test (the CI machine has every part, so a missing one
//! is a broken machine, never a pass); elsewhere the test skips, saying why.

use std::process::{Command, Stdio};

/// Whether this is a CI run (`CI=true`), where nothing may be skipped.
pub fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether `tool` is on `PATH` (`command -v`). Says nothing; see [`have_all`] for the check
/// that also fails or skips.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A part the test needs is missing, `what` saying which and how to get it: panics under
/// `CI=true`; elsewhere prints `SKIPPED: <what>` and returns false, so a test can write
/// `if !ready { return; }` after it.
pub fn required(what: &str) -> bool {
    assert!(!ci(), "{what}");
    eprintln!("SKIPPED: {what}");
    false
}

/// Whether every tool in `tools` is installed; for the first that is not, [`required`]
/// with "`<tool>` is not installed (scripts/deps.sh installs it)".
pub fn have_all(tools: &[&str]) -> bool {
    match tools.iter().find(|t| !have(t)) {
        Some(t) => required(&format!("{t} is not installed (scripts/deps.sh installs it)")),
        None => true,
    }
}

/// Whether the test runs as root (what the system libvirtd, mounts and `/etc` need).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
