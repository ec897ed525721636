//! Rules about the source itself that the compiler does not check.
//!
//! - Every `unsafe {` block in product code (`src/`, `applet/src`, `i3blocks/src`,
//!   `details/src`) has a `// SAFETY:` comment on its line or within the 3 lines above,
//!   saying why it holds: an unsafe block without its reason cannot be reviewed, and one
//!   whose reason went stale is found by reading the comment beside it.
//!
//! It reads the files at test time, relative to `CARGO_MANIFEST_DIR`.

use std::path::PathBuf;

use handoff_test_support::source::rust_files;

/// How many lines above an `unsafe {` its `// SAFETY:` comment may start.
const SAFETY_REACH: usize = 3;

/// The directories whose `.rs` files are product code.
const PRODUCT_DIRS: [&str; 7] = [
    "src",
    "libvirt/src",
    "kernelsim/src",
    "inhibit/src",
    "applet/src",
    "i3blocks/src",
    "details/src",
];

/// The 1-based line numbers of `unsafe {` blocks in `text` that have no `SAFETY:` comment on
/// their line or within [`SAFETY_REACH`] lines above. Lines that are comments are not code.
fn unexplained_unsafe(text: &str) -> Vec<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        // The code part only: a `// … unsafe { …` trailing comment is not a block.
        let code = code.split("//").next().unwrap_or("");
        if !code.contains("unsafe {") {
            continue;
        }
        let from = i.saturating_sub(SAFETY_REACH);
        if !lines[from..=i].iter().any(|l| l.contains("SAFETY:")) {
            missing.push(i + 1);
        }
    }
    missing
}

#[test]
fn the_rule_finds_an_unsafe_block_without_its_reason() {
    let text = "fn a() {\n    // SAFETY: getuid cannot fail.\n    let _ = unsafe { f() };\n}\n\
                fn b() {\n    let _ = unsafe { f() };\n}\n\
                fn c() {\n    // SAFETY: the fd is ours and open.\n    let x = 1;\n    let y = 2;\n    unsafe {\n        g()\n    }\n}\n\
                // unsafe { in a comment is not code\n";
    assert_eq!(unexplained_unsafe(text), vec![6]);
}

#[test]
fn every_unsafe_block_says_why_it_holds() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in PRODUCT_DIRS {
        rust_files(&root.join(dir), &mut files);
    }
    files.sort();
    assert!(
        files.len() > 20,
        "found only {} Rust files under {PRODUCT_DIRS:?}",
        files.len()
    );
    let mut missing = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for line in unexplained_unsafe(&text) {
            missing.push(format!("{}:{line}", file.strip_prefix(&root).unwrap().display()));
        }
    }
    assert!(
        missing.is_empty(),
        "unsafe blocks without a `// SAFETY:` comment within {SAFETY_REACH} lines above (say why the block holds):\n  {}",
        missing.join("\n  ")
    );
}
