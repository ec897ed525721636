//! The seed's command names (`windows-start`, `vfio-status`, …): links to the `handoff`
//! binary that behave as the subcommand they stand for. Part of the `handoff` binary, not
//! the library.
//!
//! Invoked under one of these names, the arguments are rewritten to `handoff <subcommand>
//! [implied flags] <the rest>` before clap sees them, and the subcommand's usage line is
//! rendered under the link's name, so `vfio-status --help` reads `Usage: vfio-status …`.
//! `make install`, the `.deb` and `handoff __generate links` all take their list from
//! [`LINKS`].

use std::ffi::OsString;
use std::path::Path;

/// A seed command name and what it runs.
pub struct Link {
    /// The name on PATH (a symlink to `handoff`).
    pub name: &'static str,
    /// The subcommand it runs.
    pub subcommand: &'static str,
    /// Flags the name implies, added unless the person already gave them.
    pub implies: &'static [&'static str],
}

/// Every seed command name. `gpu-rebind-nvidia` is the seed's "force GPU back to Linux if
/// passthrough gets stuck", so it implies `rebind --force` (it still needs root, and still
/// refuses while a VM holds the GPU unless given `--even-if-vm-runs`).
pub const LINKS: &[Link] = &[
    link("windows-start", "start", &[]),
    link("windows-stop", "stop", &[]),
    link("vfio-status", "status", &[]),
    link("gpu-rebind-nvidia", "rebind", &["--force"]),
    link("install-hooks", "install-hooks", &[]),
    link("install-services", "install-services", &[]),
    link("lg-test", "lg-test", &[]),
    link("vm-health", "vm-health", &[]),
];

const fn link(name: &'static str, subcommand: &'static str, implies: &'static [&'static str]) -> Link {
    Link {
        name,
        subcommand,
        implies,
    }
}

/// The link `argv0` names (by its file name), if any.
pub fn link_for(argv0: &Path) -> Option<&'static Link> {
    let name = argv0.file_name()?.to_str()?;
    LINKS.iter().find(|l| l.name == name)
}

/// Parses the process's arguments into `C`, dispatching on argv[0] when the binary was
/// invoked under a seed command name; also returns the arguments clap saw (`handoff
/// start …` for `windows-start …`), which `handoff-vm` is given for the commands it runs.
pub fn parse_with_args<C: clap::Parser>() -> (C, Vec<OsString>) {
    let (mut cmd, args) = dispatch(C::command(), std::env::args_os().collect());
    let matches = cmd.clone().get_matches_from(args.clone());
    let c = C::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit());
    (c, args)
}

/// The command (its usage under the link's name) and the arguments clap should see.
pub fn dispatch(cmd: clap::Command, args: Vec<OsString>) -> (clap::Command, Vec<OsString>) {
    let Some(link) = args.first().and_then(|a0| link_for(Path::new(a0))) else {
        return (cmd, args);
    };
    let rest = &args[1..];
    let main_name = OsString::from(cmd.get_name());
    // Only the top level has --version: `vfio-status --version` is `handoff --version`.
    if matches!(rest.first().and_then(|a| a.to_str()), Some("--version" | "-V")) {
        return (cmd, vec![main_name, rest[0].clone()]);
    }
    let mut new_args = vec![main_name, OsString::from(link.subcommand)];
    for flag in link.implies {
        if !rest.iter().any(|a| a == *flag) {
            new_args.push(OsString::from(*flag));
        }
    }
    new_args.extend(rest.iter().cloned());
    (under_link_name(cmd, link), new_args)
}

/// `cmd` with `link`'s subcommand showing the link's name in its usage line and help.
pub fn under_link_name(cmd: clap::Command, link: &Link) -> clap::Command {
    let Some(sub) = cmd.find_subcommand(link.subcommand) else {
        return cmd;
    };
    // The usage line clap renders for the subcommand on its own, under the link's name
    // (the parent's global flags collapse into [OPTIONS] either way).
    let usage = sub.clone().bin_name(link.name).render_usage().to_string();
    let usage = usage.trim_start_matches("Usage:").trim().to_owned();
    let note = if link.implies.is_empty() {
        format!("{} is `handoff {}`.", link.name, link.subcommand)
    } else {
        format!(
            "{} is `handoff {} {}`.",
            link.name,
            link.subcommand,
            link.implies.join(" ")
        )
    };
    cmd.mut_subcommand(link.subcommand, |s| {
        let after = match s.get_after_help() {
            Some(existing) => format!("{existing}\n\n{note}"),
            None => note,
        };
        s.override_usage(usage).after_help(after)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> clap::Command {
        clap::Command::new("handoff")
            .subcommand(
                clap::Command::new("rebind")
                    .arg(clap::arg!(--force))
                    .arg(clap::arg!(--"dry-run")),
            )
            .subcommand(clap::Command::new("status").arg(clap::arg!(--json)))
    }

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn dispatched(list: &[&str]) -> Vec<OsString> {
        dispatch(cmd(), args(list)).1
    }

    #[test]
    fn gpu_rebind_nvidia_is_rebind_force_with_the_rest_passed_through() {
        assert_eq!(
            dispatched(&["/usr/bin/gpu-rebind-nvidia", "--dry-run"]),
            args(&["handoff", "rebind", "--force", "--dry-run"])
        );
        assert_eq!(
            dispatched(&["gpu-rebind-nvidia", "--force"]),
            args(&["handoff", "rebind", "--force"])
        );
    }

    #[test]
    fn vfio_status_is_status_and_version_goes_to_the_top_level() {
        assert_eq!(
            dispatched(&["/usr/local/bin/vfio-status", "--json"]),
            args(&["handoff", "status", "--json"])
        );
        assert_eq!(
            dispatched(&["vfio-status", "--version"]),
            args(&["handoff", "--version"])
        );
    }

    #[test]
    fn handoff_and_unknown_names_are_left_alone() {
        for a in [&["handoff", "status"][..], &["/opt/x/handoff-dev", "rebind"]] {
            assert_eq!(dispatched(a), args(a));
        }
    }

    #[test]
    fn link_names_are_unique() {
        // That each names a subcommand of the real CLI (in main.rs) is checked by running
        // each one in tests/argv0.rs.
        let mut names: Vec<&str> = LINKS.iter().map(|l| l.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), LINKS.len());
    }
}
