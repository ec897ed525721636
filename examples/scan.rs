//! Scan for GPU holders from the command line, for benchmarks and poking at a real machine.
//!
//! ```text
//! scan <sysfs> <procfs> <dev> <BDF>    print the GPU's nodes, its holders and the totals
//! scan --build-sim <dir>               build the workstation sim tree under <dir>
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use handoff::holders;
use handoff::simulated_tree::{SimHost, SimSpec};
use handoff::{Host, PciAddress};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, dir] if flag == "--build-sim" => {
            let sim = SimHost::build(Path::new(dir), &SimSpec::workstation()).expect("build sim");
            println!("{}", sim.dev().display());
            ExitCode::SUCCESS
        }
        [sysfs, procfs, dev, bdf] => {
            let host = Host {
                sysfs: PathBuf::from(sysfs),
                procfs: PathBuf::from(procfs),
                dev: PathBuf::from(dev),
                run: PathBuf::from("/nonexistent"),
                ..Host::system()
            };
            let Ok(address) = bdf.parse::<PciAddress>() else {
                eprintln!("not a PCI address: {bdf}");
                return ExitCode::FAILURE;
            };
            let gpu = match handoff::gpu::read_gpu(&host, address) {
                Ok(gpu) => gpu,
                Err(e) => {
                    eprintln!("cannot read GPU {address}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let nodes = holders::gpu_nodes(&host, &gpu);
            let scan = holders::scan(&host, &gpu, &nodes);
            if std::env::var_os("SCAN_VERBOSE").is_some() {
                for n in &nodes {
                    println!("node {}", n.path.display());
                }
                for line in scan.summary_lines() {
                    println!("{line}");
                }
                for note in &scan.notes {
                    println!("note: {note}");
                }
            }
            let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
            println!(
                "{} on {} ({} uninspected)",
                plural(scan.holders.len(), "holder", "holders"),
                plural(nodes.len(), "node", "nodes"),
                plural(scan.uninspected, "process", "processes"),
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: scan <sysfs> <procfs> <dev> <BDF> | scan --build-sim <dir>");
            ExitCode::FAILURE
        }
    }
}
