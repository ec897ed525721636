//! What the block shows, read from sysfs, `/proc` and the hook's files under `[host] run`
//! only: no libvirt (so "which VM" comes from `state.json`), never a GPU node.
//!
//! [`read`] turns the machine into a [`View`]: one [`Kind`] plus the words and the people
//! behind it. The bar formats ([`crate::format`]) and the clicks ([`crate::click`]) both
//! start from it, so a click always acts on exactly what the bar shows.

use handoff::bind::record::{Phase, RestoreRecord};
use handoff::config::Config;
use handoff::escape::plain;
use handoff::gpu::{self, Owner};
use handoff::holders;
use handoff::state::{HookPhase, HookState};

/// The states the block tells apart; each has one colour per bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// On the host driver, nothing uses it.
    Linux,
    /// On the host driver, used by processes (a VM start would be refused).
    Busy,
    /// On vfio-pci for a running VM.
    Vm,
    /// The hook is binding or returning it.
    Switching,
    /// A handoff got stuck: `handoff rebind --force` is needed.
    Restore,
    /// On vfio-pci with no VM (bound by hand, or the VM is gone).
    Vfio,
    Unbound,
    /// Functions on different drivers.
    Split,
    /// No device at `[gpu] address`.
    Absent,
    /// Config or sysfs unreadable.
    Error,
}

impl Kind {
    /// The word waybar uses as `class` and `alt`, and tests match on.
    pub fn class(self) -> &'static str {
        match self {
            Kind::Linux => "linux",
            Kind::Busy => "busy",
            Kind::Vm => "vm",
            Kind::Switching => "switching",
            Kind::Restore => "restore",
            Kind::Vfio => "vfio",
            Kind::Unbound => "unbound",
            Kind::Split => "split",
            Kind::Absent => "absent",
            Kind::Error => "error",
        }
    }

    /// i3bar/i3blocks/polybar colour. Green: Linux has it and may start a VM; amber: in
    /// use or in between; blue: the VM has it; red: a person must act.
    pub fn colour(self) -> &'static str {
        match self {
            Kind::Linux => "#00CC00",
            Kind::Busy | Kind::Unbound => "#FFAA00",
            Kind::Switching => "#FFDD00",
            Kind::Vm | Kind::Vfio => "#00AAFF",
            Kind::Restore | Kind::Split | Kind::Error => "#FF0000",
            Kind::Absent => "#888888",
        }
    }

    /// i3status-rust's state words (Idle/Info/Good/Warning/Critical).
    pub fn i3status_state(self) -> &'static str {
        match self {
            Kind::Linux => "Good",
            Kind::Vm | Kind::Vfio => "Info",
            Kind::Busy | Kind::Switching | Kind::Unbound => "Warning",
            Kind::Restore | Kind::Split | Kind::Error => "Critical",
            Kind::Absent => "Idle",
        }
    }

    /// Worth the urgent flag (i3bar draws it red): a person must act.
    pub fn urgent(self) -> bool {
        matches!(self, Kind::Restore | Kind::Split | Kind::Error)
    }
}

/// One reading of the machine, in the block's words.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub kind: Kind,
    /// "GPU: Linux · 2 busy".
    pub text: String,
    /// "L·2", for narrow bars.
    pub short: String,
    /// A sentence or two for tooltips and notifications.
    pub detail: String,
    /// The VM holding the GPU, by libvirt name (from the hook's state file).
    pub vm: Option<String>,
    /// One line per process holding the GPU.
    pub holders: Vec<String>,
    /// Their pids, for `--watch` to hear when one exits.
    pub holder_pids: Vec<u32>,
}

impl View {
    fn new(kind: Kind, text: impl Into<String>, short: impl Into<String>, detail: impl Into<String>) -> Self {
        View {
            kind,
            text: text.into(),
            short: short.into(),
            detail: detail.into(),
            vm: None,
            holders: Vec::new(),
            holder_pids: Vec::new(),
        }
    }

    pub fn error(why: &str) -> Self {
        View::new(Kind::Error, "GPU: error", "GPU!", why)
    }
}

/// The label a person gave the VM (`[[vm]] label`), else its name (as the hook's state
/// file has it): as plain text, since either may hold a newline or a terminal control.
pub fn label(cfg: &Config, vm: &str) -> String {
    plain(
        cfg.vms
            .iter()
            .find(|v| v.name == vm)
            .map(|v| v.label())
            .unwrap_or(vm),
    )
}

/// Reads the GPU, the hook's files and, while the host has the GPU, who holds it.
///
/// The hook writes its state file before it touches sysfs (`binding`, `returning`) and
/// again once the GPU has settled (`vfio`, `host`). A reading of sysfs pairs with the
/// state file only when that file did not change around it; otherwise a reading taken
/// mid-handoff, paired with the `host` written just after, would show a GPU "split!" across
/// drivers that is only on its way home. So the state is read before and after, and the
/// reading is taken again (a few times at most) when the two differ.
pub fn read(cfg: &Config) -> View {
    let mut state = HookState::load(&cfg.host);
    for _ in 0..3 {
        let v = read_with(cfg, state.clone());
        let after = HookState::load(&cfg.host);
        if after == state {
            return v;
        }
        state = after;
    }
    read_with(cfg, state)
}

fn read_with(cfg: &Config, state: Option<HookState>) -> View {
    let host = &cfg.host;
    let g = match gpu::read_gpu(host, cfg.gpu.address) {
        Ok(g) => g,
        Err(e) => return View::error(&e.to_string()),
    };
    // The kernel holds a function's lock (an unbind stuck in the driver): whatever the
    // links say is not the last word, and no handoff can run until it ends.
    if !g.locked_functions().is_empty() {
        let note = g.lock_note().unwrap_or_default();
        eprintln!("handoff-block: {note}");
        return View::new(Kind::Restore, "GPU: stuck!", "GPU!", note);
    }
    let record = RestoreRecord::load(host, cfg.gpu.address).ok().flatten();
    let stuck = record.as_ref().is_some_and(|r| r.phase == Phase::Stuck)
        || state
            .as_ref()
            .is_some_and(|s| s.phase == HookPhase::RestoreRequired);
    if stuck {
        let mut v = View::new(
            Kind::Restore,
            "GPU: restore!",
            "GPU!",
            format!(
                "A handoff of {} did not finish; bring the GPU home with: pkexec handoff rebind --force",
                cfg.gpu.address
            ),
        );
        if let Some(e) = state.as_ref().and_then(|s| s.last_error.clone()) {
            v.detail = format!("{}\n{e}", v.detail);
        }
        return v;
    }
    let hook_vm = state
        .as_ref()
        .filter(|s| {
            matches!(
                s.phase,
                HookPhase::Binding | HookPhase::Vfio | HookPhase::Returning
            )
        })
        .and_then(|s| s.vm.clone());
    if let Some(s) = &state
        && matches!(s.phase, HookPhase::Binding | HookPhase::Returning)
    {
        let towards = match (s.phase, &hook_vm) {
            (HookPhase::Binding, Some(vm)) => format!("to {}", label(cfg, vm)),
            (HookPhase::Binding, None) => "to vfio-pci".to_owned(),
            _ => "back to Linux".to_owned(),
        };
        let mut v = View::new(
            Kind::Switching,
            "GPU: switching…",
            "GPU…",
            format!("The GPU is moving {towards}."),
        );
        v.vm = hook_vm;
        return v;
    }
    match g.owner {
        Owner::Absent => View::new(
            Kind::Absent,
            "GPU: none",
            "GPU: -",
            format!("No PCI device at {} (set [gpu] address)", cfg.gpu.address),
        ),
        Owner::Mixed => View::new(
            Kind::Split,
            "GPU: split!",
            "GPU!",
            format!(
                "The GPU's functions are on different drivers: {}. Fix with: pkexec handoff rebind --force",
                g.split_description().unwrap_or_default()
            ),
        ),
        Owner::Unbound => View::new(
            Kind::Unbound,
            "GPU: unbound",
            "GPU: -",
            "The GPU has no driver. Bring it home with: pkexec handoff rebind --force",
        ),
        Owner::Vfio => match hook_vm {
            Some(vm) => {
                let l = label(cfg, &vm);
                let mut v = View::new(
                    Kind::Vm,
                    format!("GPU: {l}"),
                    l.chars().next().unwrap_or('V').to_string(),
                    format!("The GPU is in the VM {l} ({}).", plain(&vm)),
                );
                v.vm = Some(vm);
                v
            }
            None => View::new(
                Kind::Vfio,
                "GPU: VFIO",
                "V",
                "The GPU is on vfio-pci and no VM of handoff's holds it.",
            ),
        },
        Owner::Host => {
            let nodes = holders::gpu_nodes(host, &g);
            let scan = holders::scan(host, &g, &nodes);
            let holders = scan.summary_lines();
            let n = holders.len();
            let mut v = if n == 0 {
                View::new(
                    Kind::Linux,
                    "GPU: Linux",
                    "L",
                    "The GPU is on Linux; nothing uses it.",
                )
            } else {
                let who = if n == 1 {
                    "1 process uses it"
                } else {
                    "processes use it"
                };
                View::new(
                    Kind::Busy,
                    format!("GPU: Linux · {n} busy"),
                    format!("L·{n}"),
                    format!(
                        "The GPU is on Linux; {}:\n{}",
                        if n == 1 {
                            who.to_owned()
                        } else {
                            format!("{n} {who}")
                        },
                        holders.join("\n")
                    ),
                )
            };
            if scan.uninspected > 0 {
                v.detail = format!(
                    "{}\n{}",
                    v.detail,
                    handoff::status::uninspected_line(scan.uninspected)
                );
            }
            v.holders = holders;
            v.holder_pids = scan.holders.iter().map(|h| h.pid).collect();
            v
        }
    }
}
