//! libvirt's hook run the two ways the tests run it: in this process, through
//! [`handoff::hook::run`] (fast, every fault of the simulated GPU at hand), and as libvirtd
//! runs it, `handoff hook --system-config CONFIG <domain> <op> <sub> -` with the domain XML on
//! stdin, for tests of several hooks at once (the GPU's lock is between processes).

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// What one hook run returned: its exit status and what it said on stderr (what a person
/// reads in `virsh start`).
pub struct Run {
    /// The exit status (-1 when a signal ended it).
    pub code: i32,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// `handoff hook <domain> <op> <sub> -` in this process, with `stdin` as libvirtd's input.
pub fn in_process(config: &Path, domain: &str, op: &str, sub: &str, stdin: &[u8]) -> Run {
    let args: Vec<String> = [domain, op, sub, "-"].map(String::from).to_vec();
    let mut input = stdin;
    let mut stderr = Vec::new();
    let code = handoff::hook::run(&args, &mut input, config, &mut stderr);
    Run {
        code,
        stderr: String::from_utf8(stderr).expect("the hook writes UTF-8"),
    }
}

/// The `handoff` binary `bin` run as libvirtd runs the hook, with `xml` on stdin: started,
/// not waited for ([`finish`] waits).
pub fn spawn(bin: &str, config: &Path, domain: &str, op: &str, sub: &str, xml: &str) -> Child {
    let mut child = Command::new(bin)
        .args(["hook", "--system-config"])
        .arg(config)
        .args([domain, op, sub, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(xml.as_bytes())
        .expect("the hook reads its XML");
    child
}

/// Waits for a hook [`spawn`] started.
pub fn finish(child: Child) -> Run {
    let out = child.wait_with_output().expect("the hook's exit");
    Run {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
