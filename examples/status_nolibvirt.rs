//! `handoff status --json` without libvirt linked in, for benchmarks only.
//!
//! ```text
//! status_nolibvirt <config.toml>
//! ```
//!
//! The same `status::collect` and JSON as the CLI, but VMs are not asked about (each is
//! reported unknown). This binary doesn't call libvirt, so the linker leaves libvirt.so
//! and its ~55 dependencies out: the difference from `handoff status --json` with
//! `vm = []` is what loading them costs at every start.

use std::path::Path;
use std::process::ExitCode;

use handoff::config::Config;
use handoff::status::{self, VmState, VmStatus};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path] = args.as_slice() else {
        eprintln!("usage: status_nolibvirt <config.toml>");
        return ExitCode::FAILURE;
    };
    let cfg = match Config::load_file(Path::new(path)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let not_asked = |vm: &_| VmStatus::new(vm, VmState::Unknown, Some("not asked (benchmark)".into()));
    match status::collect(&cfg, &mut |vm| not_asked(vm)) {
        Ok(st) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&st).expect("status is serialisable")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
