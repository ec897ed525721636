//! Issue 12 item 6: the helpers the tests share live once, in the dev-only
//! `handoff-test-support` crate (`test-support/`), which every test crate lists under
//! `[dev-dependencies]`. A `#[path]` include of another crate's test module, or an
//! `allow(dead_code)` that hides which binary uses which helper, is how the copies crept
//! in before; this test fails when either comes back.

use std::path::Path;

use handoff_test_support::source::{offences, rust_files};

/// What no test source may contain.
const FORBIDDEN: [&str; 2] = [concat!("#[", "path"), concat!("allow(", "dead_code)")];

/// Where test code lives: every test crate's `tests/` and the support crate itself.
const TEST_DIRS: [&str; 7] = [
    "tests",
    "applet/tests",
    "i3blocks/tests",
    "details/tests",
    "inhibit/tests",
    "proxmox/tests",
    "test-support/src",
];

#[test]
fn no_test_includes_a_helper_by_path_or_allows_dead_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    for dir in TEST_DIRS {
        rust_files(&root.join(dir), &mut sources);
    }
    // This file names the words it looks for (in its header and its own check's asserts).
    let me = root.join("tests/one_test_support.rs");
    assert!(sources.contains(&me), "the walk missed tests/one_test_support.rs");
    sources.retain(|f| *f != me);
    // The walk found the tests and the helpers (a moved directory must not make this pass
    // vacuously).
    for must in [
        "tests/hook.rs",
        "applet/tests/tray_actions.rs",
        "i3blocks/tests/vm_click.rs",
        "details/tests/buttons.rs",
        "test-support/src/stage.rs",
    ] {
        assert!(sources.contains(&root.join(must)), "{must} not found");
    }
    let found = offences(&sources, &FORBIDDEN);
    assert!(
        found.is_empty(),
        "shared test helpers belong in test-support/ (a `pub`, documented item of \
         handoff-test-support), used through [dev-dependencies]:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_test_crate_takes_the_support_crate_as_a_dev_dependency() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for manifest in [
        "Cargo.toml",
        "applet/Cargo.toml",
        "i3blocks/Cargo.toml",
        "details/Cargo.toml",
    ] {
        let text = std::fs::read_to_string(root.join(manifest)).unwrap();
        let dev = text
            .split("[dev-dependencies]")
            .nth(1)
            .unwrap_or_else(|| panic!("{manifest} has no [dev-dependencies]"));
        let dev = dev.split("\n[").next().unwrap();
        assert!(
            dev.lines().any(|l| l.starts_with("handoff-test-support = ")),
            "{manifest}: handoff-test-support is not among its [dev-dependencies]"
        );
    }
    // The support crate reaches libvirt through `virsh`, never by linking it, so the
    // block's tests link no libvirt either (ARCHITECTURE.md, "Binaries stay light").
    let support = std::fs::read_to_string(root.join("test-support/Cargo.toml")).unwrap();
    assert!(
        !support.contains("handoff-libvirt"),
        "test-support/Cargo.toml depends on handoff-libvirt"
    );
}
