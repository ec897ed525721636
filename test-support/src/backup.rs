//! Moving a system directory aside for the length of a test and putting it back exactly
//! as it was, also when the test panics (the guard's `Drop` runs while unwinding).
//!
//! The directory is renamed, not copied: the original comes back with the same inode,
//! files, owners and modes, and whatever the test wrote there is removed. A directory
//! that did not exist is removed again afterwards. The backup sits beside the original
//! (`<dir>.handoff-test-backup`, same filesystem, so rename is atomic); finding one there
//! at the start means an earlier run died before restoring it, and the test stops rather
//! than overwrite the only copy.

use std::fs;
use std::path::{Path, PathBuf};

/// Holds `dir` moved aside; restores it on drop.
pub struct DirBackup {
    dir: PathBuf,
    aside: PathBuf,
    had_dir: bool,
    /// Run after restoring (e.g. make libvirtd re-read its hooks).
    after: Option<fn()>,
}

impl DirBackup {
    /// Moves `dir` (if it exists) to `<dir>.handoff-test-backup`; the test starts with no
    /// `dir` at all.
    pub fn take(dir: impl AsRef<Path>) -> DirBackup {
        let dir = dir.as_ref().to_owned();
        let mut aside = dir.clone().into_os_string();
        aside.push(".handoff-test-backup");
        let aside = PathBuf::from(aside);
        assert!(
            !aside.exists(),
            "{} exists: an earlier test run died before restoring it. Compare it with {}, move it \
             back by hand, then run the test again",
            aside.display(),
            dir.display()
        );
        let had_dir = dir.exists();
        if had_dir {
            fs::rename(&dir, &aside)
                .unwrap_or_else(|e| panic!("move {} aside to {}: {e}", dir.display(), aside.display()));
        }
        DirBackup {
            dir,
            aside,
            had_dir,
            after: None,
        }
    }

    /// Also run `f` once the directory is back.
    pub fn then(mut self, f: fn()) -> DirBackup {
        self.after = Some(f);
        self
    }
}

impl Drop for DirBackup {
    fn drop(&mut self) {
        // Nothing here may panic: drop can run while a failed test is already unwinding.
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "cannot remove the test's {}: {e}; the original is at {}",
                self.dir.display(),
                self.aside.display()
            );
            return;
        }
        if self.had_dir
            && let Err(e) = fs::rename(&self.aside, &self.dir)
        {
            eprintln!(
                "cannot move {} back to {}: {e}; do it by hand",
                self.aside.display(),
                self.dir.display()
            );
        }
        if let Some(f) = self.after {
            f();
        }
    }
}
