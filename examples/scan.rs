//! Scan for GPU holders from the command line, for benchmarks and poking at a real machine.
//!
//! ```text
//! scan <sysfs> <procfs> <dev> <BDF>    print the GPU's nodes, its holders and the totals
//! scan --build-sim <dir>               build the workstation sim tree under <dir>
//! ```
//!
//! It reads the slot's functions with a minimal reader of its own (vendor and driver
//! only), so that it does not depend on `gpu::read_gpu`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use handoff::gpu::{Function, FunctionKind, Gpu, Owner};
use handoff::holders;
use handoff::sim::{SimHost, SimSpec};
use handoff::{Host, PciAddress};

fn read_function(host: &Host, address: PciAddress) -> Function {
    let dir = host.pci_devices().join(address.to_string());
    let hex = |name: &str| {
        fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            .unwrap_or(0)
    };
    Function {
        address,
        kind: FunctionKind::Other,
        driver: fs::read_link(dir.join("driver"))
            .ok()
            .and_then(|l| Some(l.file_name()?.to_string_lossy().into_owned())),
        vendor: hex("vendor") as u16,
        device: hex("device") as u16,
        class: hex("class"),
        driver_override: None,
        runtime_status: None,
        iommu_group: None,
    }
}

fn read_slot(host: &Host, address: PciAddress) -> Gpu {
    let mut functions: Vec<Function> = fs::read_dir(host.pci_devices())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<PciAddress>().ok())
        .filter(|a| a.same_slot(&address))
        .map(|a| read_function(host, a))
        .collect();
    functions.sort_by_key(|f| (f.address != address, f.address));
    Gpu {
        address,
        name: None,
        owner: Owner::Host,
        functions,
        iommu_group: None,
    }
}

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
            };
            let Ok(address) = bdf.parse::<PciAddress>() else {
                eprintln!("not a PCI address: {bdf}");
                return ExitCode::FAILURE;
            };
            let gpu = read_slot(&host, address);
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
            println!(
                "{} holders on {} nodes ({} processes uninspected)",
                scan.holders.len(),
                nodes.len(),
                scan.uninspected
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: scan <sysfs> <procfs> <dev> <BDF> | scan --build-sim <dir>");
            ExitCode::FAILURE
        }
    }
}
