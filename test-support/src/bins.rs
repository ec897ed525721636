//! The workspace's other binaries, for tests that run them side by side (as `handoff demo`
//! runs `handoff-tray` and `handoff-block` from its own directory).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// `bin` of `package` in `dir` (the directory of a binary cargo built for this test), built
/// when missing or older than any file under `sources` (directories relative to the
/// workspace root): a test run of one package builds neither the other packages' binaries
/// nor, after a change, its own other binaries.
pub fn sibling(dir: &Path, bin: &str, package: &str, sources: &[&str]) -> PathBuf {
    let path = dir.join(bin);
    if bin == "handoff" {
        // `handoff` runs this for its libvirt commands (see [`cli`]).
        sibling(dir, "handoff-vm", "handoff-libvirt", VM_SIDE_SOURCES);
    }
    let root = workspace_root();
    let built = fs::metadata(&path).and_then(|m| m.modified()).ok();
    let stale = built.is_none_or(|built| {
        sources
            .iter()
            .any(|d| newest(&root.join(d)).is_some_and(|t| t > built))
    });
    if stale {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--bin", bin])
            .current_dir(&root)
            .status()
            .unwrap_or_else(|e| panic!("cargo build --bin {bin}: {e}"));
        assert!(st.success(), "cargo build -p {package} --bin {bin} failed");
    }
    path
}

/// The sources `handoff-vm` is built from (the libvirt side of the CLI and what it links).
const VM_SIDE_SOURCES: &[&str] = &["src", "libvirt/src", "kernelsim/src", "inhibit/src"];

/// `handoff` (the binary cargo built for this test, `env!("CARGO_BIN_EXE_handoff")`), with
/// `handoff-vm` built beside it: `handoff` runs it for every command that talks to libvirt
/// (start, stop, status with VMs, the agent, the demo…), and a test run of the `handoff`
/// package does not build another package's binaries.
pub fn cli(handoff: &str) -> &str {
    let dir = Path::new(handoff).parent().expect("a binary in a directory");
    sibling(dir, "handoff-vm", "handoff-libvirt", VM_SIDE_SOURCES);
    handoff
}

/// The workspace root: where the `Cargo.lock` is, above this crate's manifest.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|d| d.join("Cargo.lock").exists())
        .expect("a Cargo.lock above the manifest")
        .to_owned()
}

/// The newest modification time of the files under `dir`.
fn newest(dir: &Path) -> Option<SystemTime> {
    let mut t = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        let m = if e.file_type().ok()?.is_dir() {
            newest(&e.path())
        } else {
            e.metadata().and_then(|m| m.modified()).ok()
        };
        t = t.max(m);
    }
    t
}

/// How a command a test ran ended and what it printed; its `Debug` shows all of it, for
/// assertion messages.
pub struct Run {
    /// The exit status, or 128 + the signal that killed it, as a shell says.
    pub code: i32,
    /// Everything it printed on stdout, lossily decoded.
    pub stdout: String,
    /// Everything it printed on stderr, lossily decoded.
    pub stderr: String,
    /// How long it ran, when the test timed it.
    pub took: Option<std::time::Duration>,
}

impl Run {
    /// Runs `c` to its end, both streams captured, timed.
    pub fn of(c: &mut Command) -> Run {
        let t = std::time::Instant::now();
        let out = c.output().unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
        Run::from_output(out, Some(t.elapsed()))
    }

    /// What `out` says; `took` when the caller timed it.
    pub fn from_output(out: std::process::Output, took: Option<std::time::Duration>) -> Run {
        use std::os::unix::process::ExitStatusExt;
        Run {
            code: out
                .status
                .code()
                .or_else(|| out.status.signal().map(|s| 128 + s))
                .unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took,
        }
    }

    /// Its stdout as JSON; a panic naming both streams when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// The first line of stdout (empty when there is none).
    pub fn first_line(&self) -> &str {
        self.stdout.lines().next().unwrap_or("")
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.code)?;
        if let Some(took) = self.took {
            write!(f, " after {took:?}")?;
        }
        write!(f, "\n--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}
