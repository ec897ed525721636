//! `handoff-pve`: the Proxmox VE API for the `handoff` CLI, over JSON lines on stdin and
//! stdout (`handoff::hypervisor::piped`). The CLI starts it when the config has PVE VMs;
//! it is separate so that the CLI, which is also the root hooks, links no HTTP or TLS.

use std::io::{BufReader, stdin, stdout};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut input = BufReader::new(stdin().lock());
    let mut output = stdout().lock();
    let make = |cfg: &handoff::Config| -> Result<Box<dyn handoff::hypervisor::Hypervisor>, String> {
        handoff_proxmox::Proxmox::new(cfg)
            .map(|p| Box::new(p) as Box<dyn handoff::hypervisor::Hypervisor>)
            .ok_or_else(|| "the config has no [proxmox] section".to_owned())
    };
    match handoff::hypervisor::piped::serve(&mut input, &mut output, &make) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handoff-pve: {e}");
            ExitCode::FAILURE
        }
    }
}
