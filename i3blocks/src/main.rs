//! `handoff-block`: who owns the GPU, for a bar. One-shot i3blocks output for now (full
//! text, short text, colour), answered from sysfs, `/proc` and the hook's state file only:
//! it links neither libvirt nor GTK and never opens a GPU node (DESIGN.md, "Binaries stay
//! light"). The other bar formats, clicks and `--watch` come with the bar-block work.

use std::process::ExitCode;

use handoff::bind::record::{Phase, RestoreRecord};
use handoff::config::Config;
use handoff::gpu::{self, Owner};
use handoff::holders;
use handoff::state::HookState;

fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        println!(
            "handoff-block: who owns the GPU, for i3blocks.\n\n\
             Prints three lines (full text, short text, colour), e.g. \"GPU: Linux · 2 busy\".\n\
             Config as for `handoff` ($HANDOFF_CONFIG, ~/.config/handoff/config.toml, /etc/handoff/config.toml)."
        );
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::load() {
        Ok((cfg, _)) => cfg,
        Err(e) => {
            // i3blocks shows the first line: keep it short, put the detail on stderr.
            eprintln!("handoff-block: {e}");
            println!("GPU: config error\nGPU: cfg!\n#FF0000");
            return ExitCode::from(33); // i3blocks: urgent
        }
    };
    let (text, short, colour) = line(&cfg);
    println!("{text}\n{short}\n{colour}");
    ExitCode::SUCCESS
}

fn line(cfg: &Config) -> (String, String, &'static str) {
    let host = &cfg.host;
    let g = match gpu::read_gpu(host, cfg.gpu.address) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("handoff-block: {e}");
            return ("GPU: unreadable".into(), "GPU: ?".into(), "#FF0000");
        }
    };
    // The kernel holds a function's lock (an unbind stuck in the driver): whatever the
    // links say is not the last word.
    if !g.locked_functions().is_empty() {
        if let Some(note) = g.lock_note() {
            eprintln!("handoff-block: {note}");
        }
        return ("GPU: stuck!".into(), "GPU!".into(), "#FF0000");
    }
    if let Ok(Some(r)) = RestoreRecord::load(host, cfg.gpu.address)
        && r.phase == Phase::Stuck
    {
        return ("GPU: restore!".into(), "GPU!".into(), "#FF0000");
    }
    match g.owner {
        Owner::Absent => ("GPU: none".into(), "GPU: -".into(), "#888888"),
        Owner::Mixed => ("GPU: split!".into(), "GPU!".into(), "#FF0000"),
        Owner::Unbound => ("GPU: unbound".into(), "GPU: -".into(), "#FFAA00"),
        Owner::Vfio => {
            let vm = HookState::load(host).and_then(|s| s.vm);
            let label = vm
                .as_deref()
                .and_then(|name| cfg.vms.iter().find(|v| v.name == name))
                .map(|v| v.label().to_owned())
                .or(vm)
                .unwrap_or_else(|| "VM".into());
            (
                format!("GPU: {label}"),
                format!("{}", label.chars().next().unwrap_or('V')),
                "#00AAFF",
            )
        }
        Owner::Host => {
            let nodes = holders::gpu_nodes(host, &g);
            let busy = holders::scan(host, &g, &nodes).holders.len();
            if busy == 0 {
                ("GPU: Linux".into(), "L".into(), "#00CC00")
            } else {
                (
                    format!("GPU: Linux · {busy} busy"),
                    format!("L·{busy}"),
                    "#FFAA00",
                )
            }
        }
    }
}
