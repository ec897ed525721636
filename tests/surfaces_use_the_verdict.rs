//! Issue 12 item 2: the tray (`applet/`), the bar block (`i3blocks/`) and the details window
//! (`details/`) learn the GPU's state only from the library's verdict and status API
//! (`handoff::verdict`, `handoff::status`). None of them may read the hook's state file or
//! the restore record by itself, nor name their types: a surface that did would be
//! deciding the state its own way again.

use std::path::Path;

use handoff_test_support::source::{offences, rust_files};

/// What a surface's source must not contain: the modules and the types of the hook's files.
const FORBIDDEN: [&str; 6] = [
    "bind::record",
    "handoff::state",
    "state::HookState",
    "HookState",
    "HookPhase",
    "RestoreRecord",
];

#[test]
fn no_surface_crate_reads_the_restore_record_or_the_hook_state_directly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    for krate in ["applet/src", "i3blocks/src", "details/src"] {
        rust_files(&root.join(krate), &mut sources);
    }
    // The walk found the surfaces (a moved directory must not make this pass vacuously).
    for must in [
        "applet/src/model.rs",
        "i3blocks/src/view.rs",
        "details/src/view.rs",
    ] {
        assert!(sources.contains(&root.join(must)), "{must} not found");
    }
    let found = offences(&sources, &FORBIDDEN);
    assert!(
        found.is_empty(),
        "surfaces must use handoff::verdict (HookFiles, decide) or handoff::status instead:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_finds_a_surface_that_reads_the_record_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("view.rs");
    std::fs::write(
        &file,
        "use handoff::gpu::Owner;\nuse handoff::bind::record::{Phase, RestoreRecord};\n",
    )
    .unwrap();
    let found = offences(&[file], &FORBIDDEN);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("view.rs:2: bind::record"), "{found:?}");
}
