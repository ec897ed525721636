//! Processes a test starts, each in a process group of its own so that it and whatever it
//! starts can be ended together, and the detached ones that left every group.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Ends the process group `child` leads (it was spawned with `process_group(0)`): SIGTERM,
/// up to 5 s for the leader to exit, then SIGKILL; the leader is reaped, and whatever is
/// left in the group afterwards (a daemon it started) is killed too.
pub fn kill_group(child: &mut Child) {
    let pg = child.id() as i32;
    // SAFETY: signalling the process group this test created for its own child.
    unsafe { libc::kill(-pg, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !matches!(child.try_wait(), Ok(Some(_))) {
        if Instant::now() > deadline {
            // SAFETY: as above; the leader ignored SIGTERM.
            unsafe { libc::kill(-pg, libc::SIGKILL) };
            let _ = child.wait();
            break;
        }
        sleep(Duration::from_millis(10));
    }
    // SAFETY: as above; members that outlived the leader (the kernel keeps the group id
    // from being reused while any member lives).
    unsafe { libc::kill(-pg, libc::SIGKILL) };
}

/// A child in its own process group; the whole group is killed and reaped on drop
/// ([`kill_group`]).
pub struct Group(pub Child);

impl Group {
    /// Spawns `cmd` as the leader of a new process group; panics when it cannot start.
    pub fn spawn(cmd: &mut Command) -> Group {
        let what = format!("{cmd:?}");
        Group(
            cmd.process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("start {what}: {e}")),
        )
    }

    /// The leader's pid, which is also the group's id.
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        kill_group(&mut self.0);
    }
}

/// `sleep 600` holding `node` open on stdin, in a process group of its own: a stand-in CUDA
/// job, as far as a holder scan can tell. Killed on drop; until then it is not reaped, so
/// one that ended stays a zombie, as the child of a busy parent does.
pub fn holder(node: &Path) -> Group {
    Group::spawn(
        Command::new("sleep")
            .arg("600")
            .stdin(File::open(node).unwrap_or_else(|e| panic!("open {}: {e}", node.display())))
            .stdout(Stdio::null()),
    )
}

/// [`holder`] that no inotify watch hears: `sleep 600` whose stdin is an `O_PATH`
/// descriptor of `node` (an `O_PATH` open raises no `IN_OPEN`, yet the descriptor shows in
/// `/proc/<pid>/fd` like any other). For a surface that should see the job only when it
/// looks again, as after a click. python3 does the open, then becomes `sleep`.
pub fn holder_unheard(node: &Path) -> Group {
    const OPEN_THEN_SLEEP: &str = "import os, sys\n\
fd = os.open(sys.argv[1], os.O_PATH)\n\
os.dup2(fd, 0)\n\
os.execvp('sleep', ['sleep', '600'])\n";
    Group::spawn(
        Command::new("python3")
            .args(["-c", OPEN_THEN_SLEEP])
            .arg(node)
            .stdout(Stdio::null()),
    )
}

/// Kills, on drop, every process whose environment carries `HANDOFF_TEST_MARK=<mark>`:
/// the detached jobs a click starts (`setsid`, so outside any group of the test) and
/// whatever they run. Give the mark to what the test starts; children inherit it.
pub struct Stragglers(pub String);

impl Stragglers {
    /// The environment variable that carries the mark.
    pub const VAR: &str = "HANDOFF_TEST_MARK";

    /// The processes (other than this one) that carry the mark now.
    pub fn pids(&self) -> Vec<i32> {
        let want = format!("{}={}", Self::VAR, self.0).into_bytes();
        let me = std::process::id() as i32;
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != me)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == want.as_slice()))
            })
            .collect()
    }
}

impl Drop for Stragglers {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: a process this test started (it carries the test's mark).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The processes below `pid` (children, their children…), from `/proc/<pid>/task/*/children`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for task in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// A process's `comm` (its name as `ps` shows it), empty when it has gone.
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Whether `pid` still runs (a zombie has ended).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// What `child` writes to its (piped) stdout, line by line as it comes, read by a thread of
/// its own: each line `keep` turns into a `T` is sent, the others are dropped. The thread
/// ends when the child closes its stdout or the receiver is dropped.
pub fn stdout_lines<T: Send + 'static>(
    child: &mut Child,
    keep: impl Fn(String) -> Option<T> + Send + 'static,
) -> mpsc::Receiver<T> {
    let stdout = child.stdout.take().expect("a child spawned with a piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(t) = keep(line)
                && tx.send(t).is_err()
            {
                return;
            }
        }
    });
    rx
}
