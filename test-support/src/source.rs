//! The project's own source files, for tests that check rules about the source itself
//! (no path includes of helpers, no surface reading the hook's files, a `SAFETY:` per `unsafe`).

use std::path::{Path, PathBuf};

/// Appends every `.rs` file under `dir`, recursively, to `out`. Panics naming `dir` when it
/// cannot be read: a moved directory must fail the check, not make it pass on no files.
pub fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every line of `sources` containing one of `forbidden`, as `file:line: word: text`.
pub fn offences(sources: &[PathBuf], forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for file in sources {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (n, line) in text.lines().enumerate() {
            if let Some(word) = forbidden.iter().find(|w| line.contains(*w)) {
                found.push(format!("{}:{}: {word}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    found
}
