//! A stand-in GPU job that opens and closes a node *itself*, on command: what the live
//! stream's node watch ([`handoff::live::nodes`]) must hear. [`crate::process::holder`]
//! inherits its node from the test, whose own open and close the watch would hear instead.
//!
//! bash names itself first (`/proc/self/comm`, so the holder scan sees the name from the
//! first open on) and then runs only builtins: `open` opens the node on fd 3, `again` on fd
//! 4 as well (the same holder holding it twice), `close` closes both. It answers each
//! command with a line once done, so the test knows the open happened.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The job; killed and reaped on drop.
pub struct Opener {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Opener {
    /// Starts a process named `name` (at most 15 bytes) that will open `node`; it holds
    /// nothing yet.
    pub fn start(node: &Path, name: &str) -> Opener {
        assert!(name.len() <= 15, "the kernel keeps 15 bytes of a name");
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(
                r#"printf '%s' "$NAME" > /proc/self/comm || exit 1
echo ready
while read -r cmd; do
  case $cmd in
    open) exec 3<"$NODE" && echo opened ;;
    again) exec 4<"$NODE" && echo opened ;;
    close) exec 3<&- 4<&- && echo closed ;;
  esac
done"#,
            )
            .env("NAME", OsStr::from_bytes(name.as_bytes()))
            .env("NODE", node)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start bash: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut o = Opener { child, stdin, stdout };
        o.expect("ready");
        o
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Opens the node (fd 3); returns once it is open.
    pub fn open(&mut self) {
        self.say("open", "opened");
    }

    /// Opens the node a second time (fd 4), already holding it.
    pub fn open_again(&mut self) {
        self.say("again", "opened");
    }

    /// Closes every fd it has on the node; returns once they are closed.
    pub fn close(&mut self) {
        self.say("close", "closed");
    }

    fn say(&mut self, cmd: &str, answer: &str) {
        writeln!(self.stdin, "{cmd}")
            .and_then(|()| self.stdin.flush())
            .unwrap();
        self.expect(answer);
    }

    fn expect(&mut self, want: &str) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim_end(), want, "the opener did not answer");
    }
}

impl Drop for Opener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
