//! The files under `desktop-files/` that other programs read: checked with those programs'
//! own rules where the machine has them.
//!
//! The polkit policy is what lets the tray run `pkexec /usr/bin/handoff rebind --force`:
//! polkitd ignores a malformed file silently, and pkexec then asks for the generic
//! "run a program as root" action instead, so a broken file shows up only as a worse
//! password prompt. `xmllint` [libxml2-utils] checks it against polkit's DTD [polkitd].

use std::path::Path;
use std::process::Command;

const POLICY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/desktop-files/org.handoff.rebind.policy"
);
const POLKIT_DTD: &str = "/usr/share/polkit-1/policyconfig-1.dtd";

fn xmllint(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("xmllint").args(args).output() {
        Ok(out) => Some(out),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("xmllint is needed (Debian libxml2-utils): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run xmllint (Debian libxml2-utils): {e}");
            None
        }
    }
}

#[test]
fn the_polkit_policy_is_well_formed_and_valid_against_polkits_dtd() {
    let Some(out) = xmllint(&["--noout", POLICY]) else {
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    if !Path::new(POLKIT_DTD).exists() {
        eprintln!("not validated against {POLKIT_DTD}: it is missing (Debian polkitd)");
        return;
    }
    let Some(out) = xmllint(&["--noout", "--dtdvalid", POLKIT_DTD, POLICY]) else {
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_polkit_policy_lets_pkexec_run_exactly_handoff_rebind() {
    let text = std::fs::read_to_string(POLICY).unwrap();
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&text, opts).unwrap();
    let actions: Vec<_> = doc.descendants().filter(|n| n.has_tag_name("action")).collect();
    assert_eq!(actions.len(), 1);
    let action = actions[0];
    assert_eq!(action.attribute("id"), Some("org.handoff.rebind"));
    let annotation = |key: &str| {
        action
            .children()
            .find(|n| n.has_tag_name("annotate") && n.attribute("key") == Some(key))
            .and_then(|n| n.text())
    };
    assert_eq!(
        annotation("org.freedesktop.policykit.exec.path"),
        Some("/usr/bin/handoff")
    );
    assert_eq!(annotation("org.freedesktop.policykit.exec.argv1"), Some("rebind"));
    let default = |who: &str| {
        action
            .descendants()
            .find(|n| n.has_tag_name(who))
            .and_then(|n| n.text())
    };
    assert_eq!(default("allow_active"), Some("auth_admin_keep"));
    assert_eq!(default("allow_inactive"), Some("auth_admin"));
    assert_eq!(default("allow_any"), Some("auth_admin"));
}

#[test]
fn the_polkit_prompt_names_the_gpu_the_tray_asks_to_return() {
    // pkexec fills $(command_line) into the message; the tray and the details window put
    // the GPU's address on that command line.
    let text = std::fs::read_to_string(POLICY).unwrap();
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&text, opts).unwrap();
    let message = doc
        .descendants()
        .find(|n| n.has_tag_name("message"))
        .and_then(|n| n.text())
        .unwrap();
    assert!(message.contains("$(command_line)"), "{message}");
    let gpu: handoff::PciAddress = "0000:0a:00.0".parse().unwrap();
    let args = handoff::bind::pkexec_rebind_args(gpu);
    assert_eq!(args[0], "rebind", "the policy matches argv1 == rebind");
    assert!(args.contains(&"--force".to_owned()), "{args:?}");
    assert!(args.contains(&gpu.to_string()), "{args:?}");
}

/// The shipped launchers (tray, details window) and the tray's XDG autostart entry.
const ENTRIES: [&str; 3] = [
    "handoff-tray.desktop",
    "handoff-details.desktop",
    "autostart/handoff-tray.desktop",
];

#[test]
fn the_shipped_desktop_entries_are_valid_by_desktop_file_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("desktop-files");
    let paths: Vec<_> = ENTRIES.iter().map(|e| dir.join(e)).collect();
    let out = match Command::new("desktop-file-validate").args(&paths).output() {
        Ok(out) => out,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("desktop-file-validate is needed (Debian desktop-file-utils): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run desktop-file-validate (Debian desktop-file-utils): {e}");
            return;
        }
    };
    // It exits 0 with hints on stdout; errors and warnings are what it complains about.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn each_desktop_entry_runs_a_shipped_binary_with_a_shipped_icon() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for e in ENTRIES {
        let text = std::fs::read_to_string(root.join("desktop-files").join(e)).unwrap();
        let key = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("{e}: no {k}"))
        };
        let exe = key("Exec");
        assert!(
            ["handoff-tray", "handoff-details"].contains(&exe),
            "{e}: Exec={exe} (a bare name: the binary is on PATH wherever the prefix is)"
        );
        let crate_dir = if exe == "handoff-tray" {
            "applet"
        } else {
            "details"
        };
        let manifest = std::fs::read_to_string(root.join(crate_dir).join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains(&format!("name = \"{exe}\"")),
            "{crate_dir} builds no {exe}"
        );
        let icon = root
            .join("icons/hicolor/scalable/apps")
            .join(format!("{}.svg", key("Icon")));
        assert!(icon.is_file(), "{e}: no icon {}", icon.display());
        assert_eq!(key("Type"), "Application", "{e}");
        if e.starts_with("autostart/") {
            assert_eq!(
                key("NoDisplay"),
                "true",
                "{e}: an autostart entry is no menu item"
            );
        }
    }
}
