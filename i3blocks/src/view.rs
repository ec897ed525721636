//! What the block shows, read from sysfs, `/proc` and the hook's files under `[host] run`
//! only: no libvirt (so "which VM" comes from `state.json`), never a GPU node. A desktop
//! whose GPU is in a Proxmox VE node asks the node's API through `handoff-pve`
//! ([`crate::pve`]) instead.
//!
//! [`read`] turns the machine into a [`View`]: the library's verdict (`handoff::verdict`,
//! with the VMs not asked) rendered in the bar's words, plus the people behind it. The bar formats ([`crate::format`]) and the clicks ([`crate::click`]) both
//! start from it, so a click always acts on exactly what the bar shows.

use handoff::config::Config;
use handoff::escape::plain;
use handoff::gpu;
use handoff::holders;
use handoff::verdict::{self, Cause, Facts, GpuFacts, HookFiles, State, Verdict, Vms};

/// The bar's render table: the verdict's state (and, for a restore, its cause) in each
/// bar's words and colours. The rules themselves are the library's
/// (`handoff::verdict`); this only says them the bar's way.
///
/// | state | text | short | colour | waybar class | i3status-rust |
/// |---|---|---|---|---|---|
/// | idle | `GPU: Linux` | `L` | `#00CC00` | `linux` | Good |
/// | idle, on a Proxmox VE node (a desktop's view) | `GPU: free on PVE` | `F` | `#00CC00` | `linux` | Good |
/// | idle on vfio-pci where it rests (`host_driver = "vfio-pci"`, a PVE node) | `GPU: free on vfio-pci` | `F` | `#00CC00` | `linux` | Good |
/// | idle, but the scan could not look everywhere | `GPU: Linux · ? unseen` | `L·?` | `#AAAAAA` | `unseen` | Idle |
/// | busy | `GPU: Linux · N busy` | `L·N` | `#FFAA00` | `busy` | Warning |
/// | in_vm | `GPU: <label>`, `GPU: <label> (VM <id>)` for a PVE VM | its first letter | `#00AAFF` | `vm` | Info |
/// | switching | `GPU: switching…` | `GPU…` | `#FFDD00` | `switching` | Info (Warning is busy's: "wait", not "act") |
/// | restore_required | `GPU: restore!` (`stuck!` locked, `split!` split) | `GPU!` | `#FF0000`, urgent | `restore` | Critical |
/// | absent | `GPU: none` | `GPU: -` | `#888888` | `absent` | Idle |
/// | libvirt_unreachable | `GPU: libvirt?` (never from the bar itself); `GPU: PVE?` when the node's API did not answer | `GPU?` | `#888888` | `offline` | Idle |
/// | unreadable | `GPU: error` | `GPU!` | `#FF0000`, urgent | `error` | Critical |
pub struct Look {
    pub class: &'static str,
    pub colour: &'static str,
    pub i3status: &'static str,
}

/// How a view looks: its state's, except an idle GPU the scan could not fully inspect
/// (the verdict's `unseen`), which must not wear the green of "free".
pub fn look_of(v: &View) -> Look {
    if v.verdict.unseen {
        return Look {
            class: "unseen",
            colour: "#AAAAAA",
            i3status: "Idle",
        };
    }
    look(v.verdict.state)
}

pub fn look(state: State) -> Look {
    let (class, colour, i3status) = match state {
        State::Idle => ("linux", "#00CC00", "Good"),
        State::Busy => ("busy", "#FFAA00", "Warning"),
        State::InVm => ("vm", "#00AAFF", "Info"),
        State::Switching => ("switching", "#FFDD00", "Info"),
        State::RestoreRequired => ("restore", "#FF0000", "Critical"),
        State::Absent => ("absent", "#888888", "Idle"),
        State::LibvirtUnreachable => ("offline", "#888888", "Idle"),
        State::Unreadable => ("error", "#FF0000", "Critical"),
    };
    Look {
        class,
        colour,
        i3status,
    }
}

/// One reading of the machine, in the block's words.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub verdict: Verdict,
    /// "GPU: Linux · 2 busy".
    pub text: String,
    /// "L·2", for narrow bars.
    pub short: String,
    /// A sentence or two for tooltips and notifications.
    pub detail: String,
    /// One line per process holding the GPU.
    pub holders: Vec<String>,
    /// Their pids, for `--watch` to hear when one exits.
    pub holder_pids: Vec<u32>,
}

/// Whether the block asked a Proxmox VE node about the GPU: it is not in this machine.
fn on_pve_node(v: &Verdict) -> bool {
    v.headline.contains("Proxmox VE")
}

impl View {
    /// The bar's rendering of a verdict.
    pub fn of(v: Verdict) -> View {
        let (text, short) = match v.state {
            State::Idle if on_pve_node(&v) => ("GPU: free on PVE".to_owned(), "F".to_owned()),
            // The verdict's rule 10a: nothing seen using it, but the scan could not look
            // everywhere, so not "free".
            State::Idle if v.unseen => ("GPU: Linux · ? unseen".to_owned(), "L·?".to_owned()),
            State::Idle if v.driver.as_deref() == Some("vfio-pci") => {
                ("GPU: free on vfio-pci".to_owned(), "F".to_owned())
            }
            State::Idle => ("GPU: Linux".to_owned(), "L".to_owned()),
            State::Busy => (format!("GPU: Linux · {} busy", v.users), format!("L·{}", v.users)),
            State::InVm => {
                let l = v.vm_label.clone().unwrap_or_else(|| "VM".to_owned());
                let short = l.chars().next().unwrap_or('V').to_string();
                match v.vmid {
                    Some(id) if l != id.to_string() => (format!("GPU: {l} (VM {id})"), short),
                    Some(id) => (format!("GPU: VM {id}"), short),
                    None => (format!("GPU: {l}"), short),
                }
            }
            State::Switching => ("GPU: switching…".to_owned(), "GPU…".to_owned()),
            State::RestoreRequired => (
                match v.cause {
                    Some(Cause::Locked) => "GPU: stuck!",
                    Some(Cause::Split) => "GPU: split!",
                    _ => "GPU: restore!",
                }
                .to_owned(),
                "GPU!".to_owned(),
            ),
            State::Absent => ("GPU: none".to_owned(), "GPU: -".to_owned()),
            State::LibvirtUnreachable if on_pve_node(&v) => ("GPU: PVE?".to_owned(), "GPU?".to_owned()),
            State::LibvirtUnreachable => ("GPU: libvirt?".to_owned(), "GPU?".to_owned()),
            State::Unreadable => ("GPU: error".to_owned(), "GPU!".to_owned()),
        };
        let detail = format!("{}\n{}", v.line(), v.next);
        View {
            verdict: v,
            text,
            short,
            detail,
            holders: Vec::new(),
            holder_pids: Vec::new(),
        }
    }

    pub fn error(why: &str) -> Self {
        View::of(verdict::decide(&Facts {
            gpu: Err(why),
            files: &HookFiles::default(),
            vms: Vms::NotAsked(&[]),
            doing: None,
            orphan_seen_for: None,
        }))
    }

    /// The VM holding the GPU, by libvirt name, when the bar shows it in a VM.
    pub fn vm_shown(&self) -> Option<&str> {
        self.verdict
            .vm
            .as_deref()
            .filter(|_| self.verdict.state == State::InVm)
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

/// Reads the GPU, the hook's files and, while the host has the GPU, who holds it, and
/// renders the library's verdict (VMs not asked: this binary links no libvirt). A GPU
/// absent here whose VMs are all on a Proxmox VE node is the node's: `pve` asks the API
/// (rule 3b of the verdict).
///
/// The hook writes its state file before it touches sysfs (`binding`, `returning`) and
/// again once the GPU has settled (`vfio`, `host`). A reading of sysfs pairs with the
/// state file only when that file did not change around it; otherwise a reading taken
/// mid-handoff, paired with the `host` written just after, would show a GPU "split!" across
/// drivers that is only on its way home. So the state is read before and after, and the
/// reading is taken again (a few times at most) when the two differ.
pub fn read(cfg: &Config, pve: &mut crate::pve::Pve) -> View {
    let load = || HookFiles::load_state(&cfg.host, cfg.gpu.address);
    let mut state = load();
    for _ in 0..3 {
        let v = read_with(cfg, state.clone(), pve);
        let after = load();
        if after == state {
            return v;
        }
        state = after;
    }
    read_with(cfg, state, pve)
}

fn read_with(cfg: &Config, state: HookFiles, pve: &mut crate::pve::Pve) -> View {
    let host = &cfg.host;
    let g = match gpu::read_gpu(host, cfg.gpu.address) {
        Ok(g) => g,
        Err(e) => return View::error(&e.to_string()),
    };
    // The kernel holds a function's lock (an unbind stuck in the driver): whatever the
    // links say is not the last word; say why on stderr, where a bar's log keeps it.
    if let Some(note) = g.lock_note() {
        eprintln!("handoff-block: {note}");
    }
    let files = state.with_record_of(host, cfg.gpu.address);
    // The GPU is in a Proxmox VE node: only its API knows which VM has it.
    let remote = (g.owner == gpu::Owner::Absent && crate::pve::asks(cfg)).then(|| pve.vms(cfg));
    // Holders matter while the host has the GPU (a VM start would be refused); the /proc
    // walk is skipped otherwise.
    let scan = (g.owner == gpu::Owner::Host).then(|| {
        let nodes = holders::gpu_nodes(host, &g);
        let mut scan = holders::scan(host, &g, &nodes);
        // As root, what cannot be inspected is mostly there for an instant: a child of a
        // container's init between fork and exec (a `docker exec`, a sandbox's runner).
        // Another look or two tells those from the ones that stay (that init itself),
        // which are then said as "? unseen". As a user the other users' processes stay
        // uninspectable, so more looks would only cost.
        let unchecked = |s: &holders::Scan| matches!(s.verdict(), holders::Verdict::Unchecked { .. });
        for _ in 0..2 {
            if !(nix::unistd::geteuid().is_root() && unchecked(&scan)) {
                break;
            }
            scan = holders::scan(host, &g, &nodes);
        }
        // Other users' holders, from the holder publisher when it runs.
        handoff::publish::complete(host, g.address, &mut scan);
        scan
    });
    let lines = scan.as_ref().map(|s| s.summary_lines()).unwrap_or_default();
    let split = g.split_description();
    let locked = g.locked_functions();
    let driver = g.functions.first().and_then(|f| f.driver.clone());
    let label = handoff::status::gpu_label(&cfg.gpu, g.name.as_deref());
    let verdict = verdict::decide(&Facts {
        gpu: Ok(GpuFacts {
            address: g.address,
            owner: g.owner,
            driver: driver.as_deref(),
            split: split.as_deref(),
            locked: &locked,
            users: lines.len(),
            vm: None,
            rests_on_vfio: cfg.gpu.host_driver == "vfio-pci",
            uninspected: scan.as_ref().map_or(0, |s| s.uninspected),
            not_checked: scan.as_ref().map_or(&[], |s| &s.notes),
            label: label.as_deref(),
        }),
        files: &files,
        vms: match &remote {
            Some(vms) => Vms::Known(vms),
            None => Vms::NotAsked(&cfg.vms),
        },
        doing: None,
        orphan_seen_for: None,
    });
    let mut v = View::of(verdict);
    if !lines.is_empty() {
        v.detail = format!("{}\n{}", v.detail, lines.join("\n"));
    }
    if let Some(s) = &scan {
        // Said already when the verdict is unseen (its reason); otherwise (busy) it
        // qualifies the count.
        if s.uninspected > 0 && !v.verdict.unseen {
            v.detail = format!(
                "{}\n{}",
                v.detail,
                handoff::status::uninspected_line(s.uninspected)
            );
        }
        v.holder_pids = s.holders.iter().map(|h| h.pid).collect();
    }
    v.holders = lines;
    v
}
