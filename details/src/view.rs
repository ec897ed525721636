//! The details window's view-model: everything the window shows and which buttons it
//! offers, computed from the library's [`Status`] and its verdict (`handoff::verdict`,
//! which reads the hook's files). Pure (no GTK, no I/O), so which button exists for which
//! verdict, and when it is disabled, is unit-tested here; `ui.rs` only renders a [`View`].
//!
//! `HANDOFF_DETAILS_DUMP=1` prints each rendered [`View`] as one JSON line on stdout: a
//! test and debugging aid, since a GTK4 window's text is not readable without AT-SPI.

use serde::Serialize;

use handoff::escape::plain;
use handoff::gpu::{self, FunctionKind};
use handoff::holders::Holder;
use handoff::status::{Status, VmState, VmStatus};
use handoff::verdict::{HookFiles, Offer, State, Verdict};

/// What the window is built from: one reading of the machine.
#[derive(Debug, Clone)]
pub struct Facts {
    pub status: Status,
    /// The hook's files under `[host] run` (its state and the restore record).
    pub files: HookFiles,
    /// The uid the window runs as: only its own processes get "Terminate".
    pub uid: u32,
    /// Unix time now, for "… ago".
    pub now: u64,
    /// The other configured GPUs (`[[gpu]]` besides the primary one), in the config's
    /// order: each gets a section of its own under the primary GPU's.
    pub others: Vec<OtherGpu>,
}

/// One more GPU's reading: its status and the hook's files about it.
#[derive(Debug, Clone)]
pub struct OtherGpu {
    pub status: Status,
    pub files: HookFiles,
    /// Its `label` in the config, when it has one.
    pub label: Option<String>,
}

/// A GPU besides the primary one: what it is, its verdict, its functions and what holds
/// it. Its VMs are the window's (one list: which GPU a VM takes is its own definition's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuSection {
    /// "UHD 630 · 0000:00:02.0": the config's label, else the short name, and the address.
    pub title: String,
    pub address: String,
    pub gpu_name: String,
    pub owner: &'static str,
    pub verdict: Verdict,
    pub headline: String,
    pub subline: String,
    pub functions: Vec<FunctionRow>,
    pub holders: Vec<HolderRow>,
    pub uninspected: Option<String>,
    /// The holder scan's notes about it.
    pub notes: Vec<String>,
}

/// Something a button does: the one vocabulary of actions every surface shares
/// (`handoff::action`). The UI runs it off the main thread (`actions.rs`).
pub use handoff::action::Action;

/// A question asked before an action runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Confirm {
    pub question: String,
    pub detail: String,
    /// The label of the button that goes ahead.
    pub accept: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Button {
    pub label: String,
    pub action: Action,
    pub enabled: bool,
    /// Why it is disabled, or what it will do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tooltip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirm: Option<Confirm>,
    /// The thing to do now (rendered as GTK's suggested action).
    pub suggested: bool,
}

impl Button {
    fn new(label: impl Into<String>, action: Action) -> Self {
        Self {
            label: label.into(),
            action,
            enabled: true,
            tooltip: None,
            confirm: None,
            suggested: false,
        }
    }

    fn tooltip(mut self, t: impl Into<String>) -> Self {
        self.tooltip = Some(t.into());
        self
    }

    fn disabled_because(mut self, why: impl Into<String>) -> Self {
        self.enabled = false;
        self.tooltip = Some(why.into());
        self
    }

    fn confirm(mut self, question: String, detail: String, accept: &str) -> Self {
        self.confirm = Some(Confirm {
            question,
            detail,
            accept: accept.to_owned(),
        });
        self
    }

    fn suggested(mut self) -> Self {
        self.suggested = true;
        self
    }
}

/// The window's word for a verdict state (the dump's `owner`, and the headline's CSS
/// class in `ui.rs`): a render table, the rules are the library's.
pub fn owner_word(state: State) -> &'static str {
    match state {
        State::Idle | State::Busy => "host",
        State::InVm => "vm",
        State::Switching => "switching",
        State::RestoreRequired => "restore-required",
        State::Absent => "absent",
        State::LibvirtUnreachable => "libvirt-unreachable",
        State::Unreadable => "unreadable",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionRow {
    pub address: String,
    pub kind: String,
    pub driver: String,
    /// `driver_override`, "—" when none.
    pub driver_override: String,
    /// `power/runtime_status`.
    pub power: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberRow {
    pub address: String,
    /// "GPU function", "bridge", or "not part of the GPU".
    pub role: String,
    pub driver: String,
    /// Neither the GPU's nor a bridge: it would have to go to the VM too.
    pub foreign: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IommuView {
    pub id: u32,
    pub members: Vec<MemberRow>,
    /// One sentence: fine, or what the foreign members mean.
    pub verdict: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmRow {
    pub name: String,
    pub label: String,
    pub uri: String,
    pub state: String,
    pub active: bool,
    /// Holds the GPU now.
    pub holds_gpu: bool,
    /// The other GPUs it holds now (their [`GpuSection::title`]s).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub holds_other: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub buttons: Vec<Button>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HolderRow {
    pub pid: u32,
    pub command: String,
    pub user: String,
    pub unit: Option<String>,
    /// What it holds open, or why it counts.
    pub what: String,
    pub mine: bool,
    pub buttons: Vec<Button>,
}

/// Everything the window shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct View {
    /// The window title: "handoff — RTX 3090 Ti".
    pub title: String,
    /// [`owner_word`] of the verdict's state.
    pub owner: &'static str,
    /// The library's verdict: the headline and subline render it.
    pub verdict: Verdict,
    /// The big line: "GPU is on Linux (nvidia)", "RTX 3090 Ti: Windows", "Restore required".
    pub headline: String,
    /// The line under it: who uses the GPU, or what to do.
    pub subline: String,
    pub gpu_name: String,
    pub address: String,
    pub functions: Vec<FunctionRow>,
    pub iommu: Option<IommuView>,
    pub vms: Vec<VmRow>,
    pub holders: Vec<HolderRow>,
    /// Processes the scan could not read, said plainly.
    pub uninspected: Option<String>,
    pub notes: Vec<String>,
    /// The last start the hook refused: "Windows, 3 min ago: …".
    pub last_refusal: Option<String>,
    /// The hook's last failure.
    pub last_error: Option<String>,
    /// Window-wide buttons: Open Looking Glass, Return GPU to Linux, Refresh.
    pub actions: Vec<Button>,
    /// An action under way ("Stopping Windows…"): every button but Refresh is disabled.
    pub busy: Option<String>,
    /// Every other configured GPU, a section each.
    pub other_gpus: Vec<GpuSection>,
}

fn vm_label<'a>(vms: &'a [VmStatus], name: &'a str) -> &'a str {
    vms.iter()
        .find(|v| v.name == name)
        .map(|v| v.label.as_str())
        .unwrap_or(name)
}

fn ago(now: u64, at: u64) -> String {
    let s = now.saturating_sub(at);
    match s {
        0..60 => "just now".to_owned(),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}

fn kind_word(kind: FunctionKind) -> &'static str {
    match kind {
        FunctionKind::Vga => "graphics",
        FunctionKind::Audio => "audio",
        FunctionKind::Usb => "USB",
        FunctionKind::Serial => "USB-C (UCSI)",
        FunctionKind::Bridge => "bridge",
        FunctionKind::Other => "other",
    }
}

fn holder_row(h: &Holder, uid: u32, busy: bool) -> HolderRow {
    let mine = h.uid == uid;
    let mut buttons = Vec::new();
    if mine {
        buttons.push(
            Button::new(
                "Terminate",
                Action::Terminate {
                    pid: h.pid,
                    command: h.command.clone(),
                },
            )
            .confirm(
                format!("Terminate {} (pid {})?", plain(&h.command), h.pid),
                "It is sent SIGTERM and may lose unsaved work.".to_owned(),
                "Terminate",
            ),
        );
    }
    // Only services: stopping a .scope would end a whole login session or app.
    if let Some(unit) = h.unit.as_ref().filter(|u| u.ends_with(".service")) {
        buttons.push(
            Button::new(
                format!("Stop {}", plain(unit)),
                Action::StopUnit {
                    unit: unit.clone(),
                    pid: h.pid,
                },
            )
            .confirm(
                format!("Stop {}?", plain(unit)),
                format!(
                    "`systemctl stop {}` ends every process of the unit, not only {}.",
                    plain(unit),
                    plain(&h.command)
                ),
                "Stop",
            ),
        );
    }
    if busy {
        buttons = buttons.into_iter().map(|b| b.disabled_because(BUSY)).collect();
    }
    let what = if h.paths.is_empty() {
        h.reason.clone().unwrap_or_default()
    } else {
        let paths: Vec<String> = h.paths.iter().map(|p| p.display().to_string()).collect();
        format!("holds {}", paths.join(", "))
    };
    HolderRow {
        pid: h.pid,
        // Shown in GTK labels: the names are the processes' own, kept to one line.
        command: plain(&h.command),
        user: plain(&h.user),
        unit: h.unit.as_deref().map(plain),
        what,
        mine,
        buttons,
    }
}

const BUSY: &str = "Another action is running";

impl View {
    /// The view of `facts`; `busy` names an action under way.
    pub fn build(facts: &Facts, busy: Option<&str>) -> View {
        let st = &facts.status;
        let g = &st.gpu;
        let verdict = st.verdict(&facts.files);
        let restore = verdict.state == State::RestoreRequired;
        let active: Vec<&VmStatus> = st.vms.iter().filter(|v| v.state.is_active()).collect();
        let headline = verdict.headline.clone();
        let subline = match &verdict.reason {
            Some(why) => format!("{why}.\n{}", verdict.next),
            None => verdict.next.clone(),
        };

        let is_busy = busy.is_some();
        // The configured GPUs, the primary first.
        let gpus: Vec<handoff::PciAddress> = std::iter::once(g.address)
            .chain(facts.others.iter().map(|o| o.status.gpu.address))
            .collect();
        let vms = st
            .vms
            .iter()
            .map(|v| {
                // "Switch to" only when a running VM has a GPU this one takes: the
                // library's one rule, as in the tray (issue 15).
                let others_active = handoff::gpus::start_switches(&gpus, &st.vms, v);
                let mut buttons = Vec::new();
                if v.state.is_active() {
                    buttons.push(
                        Button::new("Stop", Action::Stop { vm: v.name.clone() })
                            .tooltip(format!("Shut {} down gracefully", v.label)),
                    );
                    buttons.push(
                        Button::new("Force stop…", Action::ForceStop { vm: v.name.clone() }).confirm(
                            format!("Force {} off?", v.label),
                            "This is pulling the plug: the guest cannot save anything.".to_owned(),
                            "Force stop",
                        ),
                    );
                } else {
                    let b = if others_active {
                        Button::new(
                            format!("Switch to {}", v.label),
                            Action::Switch { vm: v.name.clone() },
                        )
                        .tooltip("Stop the running VM gracefully, then start this one")
                    } else {
                        Button::new("Start", Action::Start { vm: v.name.clone() })
                    };
                    let b = match (restore, v.state) {
                        (true, _) => b.disabled_because("Return the GPU to Linux first"),
                        (false, VmState::Undefined | VmState::Unknown) => {
                            b.disabled_because(v.error.clone().unwrap_or_else(|| v.words().to_owned()))
                        }
                        _ => b,
                    };
                    buttons.push(b);
                }
                if is_busy {
                    buttons = buttons.into_iter().map(|b| b.disabled_because(BUSY)).collect();
                }
                VmRow {
                    name: v.name.clone(),
                    label: v.label.clone(),
                    uri: v.uri.clone(),
                    state: v.words().to_owned(),
                    active: v.state.is_active(),
                    holds_gpu: g.vm.as_deref() == Some(v.name.as_str()),
                    holds_other: Vec::new(),
                    error: v.error.clone(),
                    buttons,
                }
            })
            .collect();

        let mut actions = Vec::new();
        if !active.is_empty() {
            actions.push(
                Button::new("Open Looking Glass", Action::OpenLookingGlass)
                    .tooltip("Open (or focus) the Looking Glass client on its workspace"),
            );
        }
        if verdict.offers.contains(&Offer::ReturnToLinux) {
            actions.push(
                Button::new("Return GPU to Linux", Action::ReturnToLinux { gpu: g.address })
                    .tooltip("pkexec handoff rebind --force: asks for an administrator's password")
                    .suggested(),
            );
        }
        if is_busy {
            actions = actions.into_iter().map(|b| b.disabled_because(BUSY)).collect();
        }
        actions.push(Button::new("Refresh", Action::Refresh));

        let last_refusal = facts.files.last_refusal().map(|r| {
            format!(
                "{}, {}: {}",
                vm_label(&st.vms, &r.vm),
                ago(facts.now, r.at),
                r.message.trim()
            )
        });

        let other_gpus: Vec<GpuSection> = facts
            .others
            .iter()
            .map(|o| GpuSection::build(o, facts.uid, facts.now, busy))
            .collect();
        let mut vms: Vec<VmRow> = vms;
        for (o, section) in facts.others.iter().zip(&other_gpus) {
            if let Some(row) = vms
                .iter_mut()
                .find(|r| o.status.gpu.vm.as_deref() == Some(r.name.as_str()))
            {
                row.holds_other.push(section.title.clone());
            }
        }

        let gpu_name = g.name.clone().unwrap_or_else(|| "unknown GPU".to_owned());
        View {
            title: format!(
                "handoff — {}",
                g.name.as_deref().map(gpu::short_name).unwrap_or("GPU")
            ),
            owner: owner_word(verdict.state),
            verdict,
            headline,
            subline,
            gpu_name,
            address: g.address.to_string(),
            functions: g
                .functions
                .iter()
                .map(|f| FunctionRow {
                    address: f.address.to_string(),
                    kind: kind_word(f.kind).to_owned(),
                    driver: f.driver.clone().unwrap_or_else(|| "(no driver)".to_owned()),
                    driver_override: f.driver_override.clone().unwrap_or_else(|| "—".to_owned()),
                    power: f.runtime_status.clone().unwrap_or_else(|| "?".to_owned()),
                })
                .collect(),
            iommu: g.iommu_group.as_ref().map(|grp| {
                let foreign = grp.foreign_members().len();
                IommuView {
                    id: grp.id,
                    members: grp
                        .members
                        .iter()
                        .map(|m| {
                            let foreign = !m.gpu_function && !m.bridge;
                            MemberRow {
                                address: m.address.to_string(),
                                role: if m.gpu_function {
                                    "GPU function"
                                } else if m.bridge {
                                    "bridge"
                                } else {
                                    "not part of the GPU"
                                }
                                .to_owned(),
                                driver: m.driver.clone().unwrap_or_else(|| "(no driver)".to_owned()),
                                foreign,
                            }
                        })
                        .collect(),
                    verdict: match foreign {
                        0 => "Only the GPU's functions (and bridges): it can be passed through alone.".to_owned(),
                        1 => "1 device that is not the GPU shares its group: it would have to go to the VM too."
                            .to_owned(),
                        n => format!(
                            "{n} devices that are not the GPU share its group: they would have to go to the VM too."
                        ),
                    },
                }
            }),
            vms,
            holders: g.blockers.iter().map(|h| holder_row(h, facts.uid, is_busy)).collect(),
            uninspected: (g.uninspected > 0).then(|| handoff::status::uninspected_line(g.uninspected)),
            notes: g.notes.clone(),
            last_refusal,
            last_error: facts
                .files
                .last_error()
                .map(str::to_owned)
                .filter(|_| !restore),
            actions,
            busy: busy.map(str::to_owned),
            other_gpus,
        }
    }
}

impl GpuSection {
    /// The section of `other`: the same rendering of the verdict, functions and holders as
    /// the primary GPU's (one [`View::build`]), under a title that says which GPU it is.
    pub fn build(other: &OtherGpu, uid: u32, now: u64, busy: Option<&str>) -> GpuSection {
        let v = View::build(
            &Facts {
                status: other.status.clone(),
                files: other.files.clone(),
                uid,
                now,
                others: Vec::new(),
            },
            busy,
        );
        let name = other
            .label
            .as_deref()
            .map(plain)
            .or_else(|| {
                other
                    .status
                    .gpu
                    .name
                    .as_deref()
                    .map(|n| gpu::short_name(n).to_owned())
            })
            .unwrap_or_else(|| "GPU".to_owned());
        GpuSection {
            title: format!("{name} · {}", v.address),
            address: v.address,
            gpu_name: v.gpu_name,
            owner: v.owner,
            verdict: v.verdict,
            headline: v.headline,
            subline: v.subline,
            functions: v.functions,
            holders: v.holders,
            uninspected: v.uninspected,
            notes: v.notes,
        }
    }
}

impl View {
    /// Every button, in the order shown.
    #[cfg(test)]
    pub fn buttons(&self) -> impl Iterator<Item = &Button> {
        self.vms
            .iter()
            .flat_map(|v| v.buttons.iter())
            .chain(self.holders.iter().flat_map(|h| h.buttons.iter()))
            .chain(self.actions.iter())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use handoff::gpu::{Function, IommuGroup, IommuMember, Owner};
    use handoff::pci::PciAddress;
    use handoff::status::GpuStatus;

    use super::*;

    const GPU: PciAddress = PciAddress::new(0, 1, 0, 0);
    const ME: u32 = 1000;

    fn function(n: u8, driver: &str) -> Function {
        Function {
            address: GPU.with_function(n),
            kind: if n == 0 {
                FunctionKind::Vga
            } else {
                FunctionKind::Audio
            },
            driver: Some(driver.to_owned()),
            vendor: 0x10de,
            device: 0x2203,
            class: if n == 0 { 0x030000 } else { 0x040300 },
            driver_override: (driver == "vfio-pci").then(|| "vfio-pci".to_owned()),
            runtime_status: Some("active".to_owned()),
            iommu_group: Some(14),
            locked: false,
        }
    }

    fn vm(name: &str, label: &str, state: VmState) -> VmStatus {
        VmStatus {
            name: name.to_owned(),
            label: label.to_owned(),
            uri: "qemu:///system".to_owned(),
            state,
            error: None,
            vmid: None,
            passthrough: None,
        }
    }

    fn holder(pid: u32, command: &str, uid: u32, unit: Option<&str>) -> Holder {
        Holder {
            pid,
            command: command.to_owned(),
            cmdline: vec![command.to_owned()],
            uid,
            user: if uid == ME { "alice" } else { "ollama" }.to_owned(),
            unit: unit.map(str::to_owned),
            paths: vec![PathBuf::from("/dev/nvidia0")],
            reason: None,
            vm: None,
            container: None,
        }
    }

    /// The workstation: GPU on `driver` (both functions), the given VMs.
    fn facts(driver: &str, vms: Vec<VmStatus>) -> Facts {
        let owner = if driver == "vfio-pci" {
            Owner::Vfio
        } else {
            Owner::Host
        };
        let active: Vec<_> = vms.iter().filter(|v| v.state.is_active()).collect();
        let holding = (owner == Owner::Vfio && active.len() == 1).then(|| active[0].name.clone());
        Facts {
            status: Status {
                gpu: GpuStatus {
                    address: GPU,
                    name: Some("NVIDIA GeForce RTX 3090 Ti".to_owned()),
                    owner,
                    driver: Some(driver.to_owned()),
                    functions: vec![
                        function(0, driver),
                        function(
                            1,
                            if owner == Owner::Vfio {
                                driver
                            } else {
                                "snd_hda_intel"
                            },
                        ),
                    ],
                    vm: holding,
                    blockers: Vec::new(),
                    vfio_users: Vec::new(),
                    uninspected: 0,
                    locked: Vec::new(),
                    rests_on_vfio: false,
                    label: None,
                    candidates: Vec::new(),
                    iommu_group: Some(IommuGroup {
                        id: 14,
                        members: vec![
                            IommuMember {
                                address: GPU,
                                class: 0x030000,
                                driver: Some(driver.to_owned()),
                                gpu_function: true,
                                bridge: false,
                            },
                            IommuMember {
                                address: GPU.with_function(1),
                                class: 0x040300,
                                driver: None,
                                gpu_function: true,
                                bridge: false,
                            },
                        ],
                    }),
                    notes: Vec::new(),
                    split: None,
                },
                vms,
            },
            files: HookFiles::default(),
            uid: ME,
            now: 1_700_000_000,
            others: Vec::new(),
        }
    }

    #[test]
    fn every_other_gpu_gets_a_section_with_its_own_verdict_functions_and_holders() {
        let igpu = PciAddress::new(0, 0, 2, 0);
        let mut other = facts("i915", Vec::new()).status;
        other.gpu.address = igpu;
        other.gpu.name = Some("Intel UHD Graphics 630".to_owned());
        other.gpu.blockers = vec![holder(4242, "ffmpeg", ME, None)];
        let mut f = facts("nvidia", vec![vm("win11", "Windows", VmState::Shutoff)]);
        f.others = vec![OtherGpu {
            status: other,
            files: HookFiles::default(),
            label: Some("UHD 630".to_owned()),
        }];
        let v = View::build(&f, None);
        assert_eq!(v.address, "0000:01:00.0", "the primary GPU stays on top");
        assert!(v.holders.is_empty());
        assert_eq!(v.other_gpus.len(), 1);
        let s = &v.other_gpus[0];
        assert_eq!(s.title, "UHD 630 · 0000:00:02.0");
        assert_eq!(s.verdict.state, State::Busy);
        assert_eq!(s.headline, s.verdict.headline);
        assert_eq!(s.functions.len(), 2);
        assert_eq!(s.holders[0].pid, 4242);
        assert_eq!(labels_of(&s.holders[0].buttons), ["Terminate"]);
        // A VM that has the iGPU says so in its row.
        f.others[0].status.gpu.vm = Some("win11".to_owned());
        let v = View::build(&f, None);
        assert_eq!(v.vms[0].holds_other, ["UHD 630 · 0000:00:02.0"]);
        assert!(!v.vms[0].holds_gpu);
        // Without a label: the short name.
        f.others[0].label = None;
        assert!(
            View::build(&f, None).other_gpus[0]
                .title
                .ends_with("· 0000:00:02.0")
        );
    }

    fn labels_of(buttons: &[Button]) -> Vec<&str> {
        buttons.iter().map(|b| b.label.as_str()).collect()
    }

    fn labels(buttons: &[Button]) -> Vec<&str> {
        buttons.iter().map(|b| b.label.as_str()).collect()
    }

    /// The hook's files with a restore record in `phase` (its file's word) for win11.
    fn record(phase: &str) -> HookFiles {
        let problem = (phase == "stuck").then_some("unbinding 0000:01:00.0 from nvidia hung");
        HookFiles::default().with_record(GPU, phase, Some("win11"), problem)
    }

    #[test]
    fn gpu_on_linux_with_nothing_using_it_offers_start_and_refresh() {
        let v = View::build(
            &facts("nvidia", vec![vm("win11", "Windows", VmState::Shutoff)]),
            None,
        );
        assert_eq!(v.owner, "host");
        assert_eq!(v.headline, "GPU is on Linux (nvidia)");
        assert_eq!(v.subline, "Nothing uses it: a VM can take it.");
        assert_eq!(v.title, "handoff — RTX 3090 Ti");
        assert_eq!(labels(&v.vms[0].buttons), ["Start"]);
        assert!(v.vms[0].buttons[0].enabled);
        assert_eq!(labels(&v.actions), ["Refresh"]);
        assert_eq!(v.functions[1].driver, "snd_hda_intel");
        assert_eq!(v.functions[0].driver_override, "—");
    }

    #[test]
    fn gpu_in_the_running_vm_offers_stop_force_stop_and_looking_glass() {
        let v = View::build(
            &facts("vfio-pci", vec![vm("win11", "Windows", VmState::Running)]),
            None,
        );
        assert_eq!(v.owner, "vm");
        assert_eq!(v.headline, "GPU: Windows");
        assert!(v.vms[0].holds_gpu);
        assert_eq!(labels(&v.vms[0].buttons), ["Stop", "Force stop…"]);
        let force = &v.vms[0].buttons[1];
        assert_eq!(force.action, Action::ForceStop { vm: "win11".into() });
        assert_eq!(force.confirm.as_ref().unwrap().question, "Force Windows off?");
        assert!(
            v.vms[0].buttons[0].confirm.is_none(),
            "a graceful stop needs no question"
        );
        assert_eq!(labels(&v.actions), ["Open Looking Glass", "Refresh"]);
        assert_eq!(v.functions[0].driver_override, "vfio-pci");
    }

    #[test]
    fn gpu_on_vfio_with_no_vm_says_so_and_offers_start() {
        let v = View::build(
            &facts("vfio-pci", vec![vm("win11", "Windows", VmState::Shutoff)]),
            None,
        );
        // Issue 12: left on vfio-pci with no VM is what every surface calls "restore
        // required" now (it was "GPU is on vfio-pci, no VM running" with Start here only):
        // the start waits for the return, which the window offers.
        assert_eq!(v.owner, "restore-required");
        assert_eq!(v.headline, "Restore required");
        assert!(
            v.subline
                .starts_with("the GPU is on vfio-pci and no VM is running.\n"),
            "{}",
            v.subline
        );
        assert_eq!(labels(&v.vms[0].buttons), ["Start"]);
        assert!(!v.vms[0].buttons[0].enabled);
        assert_eq!(labels(&v.actions), ["Return GPU to Linux", "Refresh"]);
    }

    #[test]
    fn a_stuck_restore_record_says_restore_required_and_offers_return_only() {
        let mut f = facts("vfio-pci", vec![vm("win11", "Windows", VmState::Shutoff)]);
        f.files = record("stuck");
        let v = View::build(&f, None);
        assert_eq!(v.owner, "restore-required");
        assert_eq!(v.headline, "Restore required");
        assert!(
            v.subline.starts_with("unbinding 0000:01:00.0 from nvidia hung."),
            "{}",
            v.subline
        );
        assert!(!v.vms[0].buttons[0].enabled, "no start while the GPU is stuck");
        assert_eq!(
            v.vms[0].buttons[0].tooltip.as_deref(),
            Some("Return the GPU to Linux first")
        );
        assert_eq!(labels(&v.actions), ["Return GPU to Linux", "Refresh"]);
        assert!(matches!(v.actions[0].action, Action::ReturnToLinux { .. }));
        assert!(v.actions[0].suggested);
    }

    #[test]
    fn a_bound_record_is_a_restore_only_when_no_vm_runs_and_every_vm_answered() {
        let mut f = facts("vfio-pci", vec![vm("win11", "Windows", VmState::Running)]);
        f.files = record("bound");
        assert_eq!(View::build(&f, None).owner, "vm");
        f.status.vms[0].state = VmState::Shutoff;
        f.status.gpu.vm = None;
        assert_eq!(View::build(&f, None).owner, "restore-required");
        f.status.vms[0].state = VmState::Unknown;
        assert_eq!(
            View::build(&f, None).owner,
            "libvirt-unreachable",
            "libvirt unreachable: don't guess"
        );
        f.files = record("binding");
        f.status.vms[0].state = VmState::Shutoff;
        assert_eq!(View::build(&f, None).owner, "switching", "a handoff under way");
    }

    #[test]
    fn the_hook_saying_restore_required_is_believed() {
        let mut f = facts("nvidia", vec![vm("win11", "Windows", VmState::Shutoff)]);
        f.files = HookFiles::default()
            .with_hook(GPU, "restore-required", None)
            .with_hook_error(GPU, "0000:01:00.1 did not come back to snd_hda_intel");
        let v = View::build(&f, None);
        assert_eq!(v.owner, "restore-required");
        assert!(v.subline.contains("did not come back"));
        assert_eq!(v.last_error, None, "said once, in the subline");
    }

    #[test]
    fn a_holder_named_with_controls_shows_as_one_escaped_line_but_is_acted_on_by_its_name() {
        let mut f = facts("nvidia", vec![vm("win11", "Windows", VmState::Shutoff)]);
        f.status.gpu.blockers = vec![holder(4242, "evil\x1b[31m<b>\n", ME, Some("x\ny.service"))];
        let v = View::build(&f, None);
        let row = &v.holders[0];
        assert_eq!(row.command, r"evil\x1b[31m<b>\x0a");
        assert_eq!(row.unit.as_deref(), Some(r"x\x0ay.service"));
        assert_eq!(labels(&row.buttons), ["Terminate", r"Stop x\x0ay.service"]);
        // The action itself carries the real name (the kill checks it against /proc).
        assert_eq!(
            row.buttons[0].action,
            Action::Terminate {
                pid: 4242,
                command: "evil\x1b[31m<b>\n".into()
            }
        );
    }

    #[test]
    fn holders_get_terminate_when_mine_and_stop_unit_for_services_each_confirmed() {
        let mut f = facts("nvidia", vec![vm("win11", "Windows", VmState::Shutoff)]);
        f.status.gpu.blockers = vec![
            holder(4242, "python3", ME, Some("session-2.scope")),
            holder(777, "ollama", 998, Some("ollama.service")),
            holder(900, "cuda-job", ME, Some("cuda-job.service")),
        ];
        let v = View::build(&f, None);
        assert_eq!(
            v.subline,
            "3 processes use it: a VM start would be refused until they let go."
        );
        assert_eq!(
            labels(&v.holders[0].buttons),
            ["Terminate"],
            "never stop a session scope"
        );
        assert_eq!(
            labels(&v.holders[1].buttons),
            ["Stop ollama.service"],
            "not mine: no terminate"
        );
        assert_eq!(
            labels(&v.holders[2].buttons),
            ["Terminate", "Stop cuda-job.service"]
        );
        assert!(
            v.holders
                .iter()
                .flat_map(|h| &h.buttons)
                .all(|b| b.confirm.is_some() && !b.suggested)
        );
        assert_eq!(
            v.holders[0].buttons[0].action,
            Action::Terminate {
                pid: 4242,
                command: "python3".into()
            }
        );
        assert_eq!(v.holders[1].what, "holds /dev/nvidia0");
        assert!(!v.holders[1].mine);
    }

    #[test]
    fn with_several_vms_the_idle_ones_offer_switch_to() {
        let v = View::build(
            &facts(
                "vfio-pci",
                vec![
                    vm("win11", "Windows", VmState::Running),
                    vm("ai", "AI", VmState::Shutoff),
                    vm("mac", "macOS", VmState::Shutoff),
                ],
            ),
            None,
        );
        assert_eq!(v.headline, "GPU: Windows");
        assert_eq!(labels(&v.vms[0].buttons), ["Stop", "Force stop…"]);
        assert_eq!(labels(&v.vms[1].buttons), ["Switch to AI"]);
        assert_eq!(v.vms[2].buttons[0].action, Action::Switch { vm: "mac".into() });
    }

    /// Two GPUs (issue 15): macOS runs on the iGPU; Windows takes the RTX, which is free,
    /// so it is started, not switched to; a second macOS VM wants the iGPU: switched to. A
    /// VM whose definition was not read is switched to, as with one GPU.
    #[test]
    fn with_two_gpus_only_a_vm_wanting_a_running_vms_gpu_offers_switch_to() {
        let igpu = PciAddress::new(0, 0, 2, 0);
        let with = |mut v: VmStatus, devs: Option<Vec<PciAddress>>| {
            v.passthrough = devs;
            v
        };
        let mut other = facts("vfio-pci", Vec::new()).status;
        other.gpu.address = igpu;
        let mut f = facts(
            "nvidia",
            vec![
                with(vm("mac", "macOS", VmState::Running), Some(vec![igpu])),
                with(
                    vm("win11", "Windows", VmState::Shutoff),
                    Some(vec![GPU, GPU.with_function(1)]),
                ),
                with(vm("mac2", "macOS 14", VmState::Shutoff), Some(vec![igpu])),
                with(vm("unread", "Unread", VmState::Shutoff), None),
            ],
        );
        f.others = vec![OtherGpu {
            status: other,
            files: HookFiles::default(),
            label: Some("UHD 630".to_owned()),
        }];
        let v = View::build(&f, None);
        assert_eq!(labels(&v.vms[1].buttons), ["Start"]);
        assert_eq!(v.vms[1].buttons[0].action, Action::Start { vm: "win11".into() });
        assert_eq!(labels(&v.vms[2].buttons), ["Switch to macOS 14"]);
        assert_eq!(labels(&v.vms[3].buttons), ["Switch to Unread"]);
        // With one GPU any running VM stands in the way, whatever the definitions say.
        f.others.clear();
        assert_eq!(
            labels(&View::build(&f, None).vms[1].buttons),
            ["Switch to Windows"]
        );
    }

    #[test]
    fn with_several_vms_and_none_running_each_offers_start() {
        let v = View::build(
            &facts(
                "nvidia",
                vec![
                    vm("win11", "Windows", VmState::Shutoff),
                    vm("ai", "AI", VmState::Shutoff),
                ],
            ),
            None,
        );
        assert!(v.vms.iter().all(|r| labels(&r.buttons) == ["Start"]));
    }

    #[test]
    fn a_vm_libvirt_does_not_know_cannot_be_started_and_says_why() {
        let mut gone = vm("win11", "Windows", VmState::Undefined);
        gone.error = Some("no domain win11 at qemu:///system".into());
        let v = View::build(&facts("nvidia", vec![gone]), None);
        let start = &v.vms[0].buttons[0];
        assert!(!start.enabled);
        assert_eq!(
            start.tooltip.as_deref(),
            Some("no domain win11 at qemu:///system")
        );
        assert_eq!(v.vms[0].state, "not defined in libvirt");
    }

    #[test]
    fn a_pve_vm_the_token_cannot_see_is_not_said_to_be_undefined_in_libvirt() {
        let mut hidden = vm("old-win", "Old Windows", VmState::Undefined);
        hidden.vmid = Some(150);
        hidden.uri = "https://pve:8006".into();
        let v = View::build(&facts("vfio-pci", vec![hidden]), None);
        assert_eq!(
            v.vms[0].state,
            "not visible to the API token (no VM.Audit on it, or no such VMID)"
        );
        assert!(!v.vms[0].buttons[0].enabled);
    }

    #[test]
    fn while_an_action_runs_every_button_but_refresh_is_disabled() {
        let mut f = facts("vfio-pci", vec![vm("win11", "Windows", VmState::Running)]);
        f.status.gpu.blockers = vec![holder(1, "x", ME, None)];
        let v = View::build(&f, Some("Stopping Windows…"));
        assert_eq!(v.busy.as_deref(), Some("Stopping Windows…"));
        let enabled: Vec<_> = v
            .buttons()
            .filter(|b| b.enabled)
            .map(|b| b.label.as_str())
            .collect();
        assert_eq!(enabled, ["Refresh"]);
        assert_eq!(v.buttons().count(), 5);
    }

    #[test]
    fn the_last_refusal_names_the_vm_when_and_why() {
        let mut f = facts("nvidia", vec![vm("win11", "Windows", VmState::Shutoff)]);
        f.files = HookFiles::default().with_refusal(
            GPU,
            "win11",
            f.now - 180,
            vec![holder(4242, "python3", ME, None)],
            "GPU 0000:01:00.0 is busy: python3 (pid 4242, user alice) holds /dev/nvidia0\n",
        );
        let v = View::build(&f, None);
        assert_eq!(
            v.last_refusal.as_deref(),
            Some(
                "Windows, 3 min ago: GPU 0000:01:00.0 is busy: python3 (pid 4242, user alice) holds /dev/nvidia0"
            )
        );
    }

    /// A desktop whose VMs are on Proxmox VE: a refusal logged from PVE's task list that is
    /// later than the hook's is the one shown, with its words.
    #[test]
    fn the_last_refusal_is_the_later_of_the_hooks_and_pves() {
        let mut f = facts(
            "nvidia",
            vec![
                vm("win11", "Windows", VmState::Shutoff),
                vm("linux-ai", "Linux AI", VmState::Shutoff),
            ],
        );
        f.files = HookFiles::default()
            .with_refusal(GPU, "win11", f.now - 600, Vec::new(), "busy")
            .with_pve_refusal(
                "linux-ai",
                f.now - 120,
                "not starting Linux AI (VM 141): GPU 0000:01:00.0 is busy\n",
            );
        assert_eq!(
            View::build(&f, None).last_refusal.as_deref(),
            Some("Linux AI, 2 min ago: not starting Linux AI (VM 141): GPU 0000:01:00.0 is busy")
        );
        f.files = f.files.with_refusal(GPU, "win11", f.now - 60, Vec::new(), "busy");
        assert_eq!(
            View::build(&f, None).last_refusal.as_deref(),
            Some("Windows, 1 min ago: busy")
        );
    }

    #[test]
    fn foreign_iommu_group_members_are_flagged() {
        let mut f = facts("nvidia", vec![]);
        f.status
            .gpu
            .iommu_group
            .as_mut()
            .unwrap()
            .members
            .push(IommuMember {
                address: PciAddress::new(0, 2, 0, 0),
                class: 0x010802,
                driver: Some("nvme".into()),
                gpu_function: false,
                bridge: false,
            });
        let g = View::build(&f, None).iommu.unwrap();
        assert_eq!(g.id, 14);
        assert!(g.members[2].foreign);
        assert_eq!(g.members[2].role, "not part of the GPU");
        assert!(!g.members[0].foreign);
        assert!(
            g.verdict.starts_with("1 device that is not the GPU"),
            "{}",
            g.verdict
        );
    }

    #[test]
    fn the_view_serialises_for_the_dump() {
        let v = View::build(
            &facts("nvidia", vec![vm("win11", "Windows", VmState::Shutoff)]),
            None,
        );
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["owner"], "host");
        assert_eq!(j["vms"][0]["buttons"][0]["action"]["action"], "start");
        assert_eq!(j["vms"][0]["buttons"][0]["action"]["vm"], "win11");
    }
}

/// Every surface, one verdict (issue 12): the window's view of each scene, read the way the
/// window reads it (status with libvirt asked, the hook's files through the library), says
/// what `handoff status --json` says.
#[cfg(test)]
mod every_surface {
    use std::process::Command;

    use handoff_libvirt::libvirt::Prober;

    use super::*;

    #[test]
    fn the_window_says_what_status_says_in_every_state() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let st = Command::new(env!("CARGO"))
            // `handoff status` asks libvirt through handoff-vm.
            .args(["build", "-q", "-p", "handoff", "--bin", "handoff"])
            .args(["-p", "handoff-libvirt", "--bin", "handoff-vm"])
            .current_dir(root)
            .status()
            .expect("cargo build");
        assert!(st.success(), "building handoff and handoff-vm failed");
        let bin = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("handoff");
        for name in handoff::scenes::ALL {
            let tmp = tempfile::tempdir().unwrap();
            let scene = handoff::scenes::Scene::put(tmp.path(), name).unwrap();
            // A scene about a normal user's view is looked at as that user, by both.
            let user = scene.as_user;
            let mut cmd = match user {
                Some(uid) => handoff_test_support::unprivileged::command(uid, &bin),
                None => Command::new(&bin),
            };
            let out = cmd
                .args(["status", "--json"])
                .env("HANDOFF_CONFIG", &scene.config)
                .env("HOME", tmp.path())
                .output()
                .unwrap();
            let status: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{name}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
            let want = &status["verdict"];

            let cfg = handoff::config::Config::load_from(Some(scene.config.clone()), None)
                .unwrap()
                .0;
            let mut p = Prober::new();
            let vms: Vec<_> = cfg.vms.iter().map(|vm| p.probe(vm)).collect();
            let collect = || {
                handoff::status::collect(&cfg, &mut |vm| {
                    vms.iter().find(|v| v.name == vm.name).unwrap().clone()
                })
                .unwrap()
            };
            let status = match user {
                Some(uid) => handoff_test_support::unprivileged::on_thread_as(uid, collect),
                None => collect(),
            };
            let facts = Facts {
                status,
                files: HookFiles::load(&cfg.host, cfg.gpu.address),
                uid: 1000,
                now: 0,
                others: Vec::new(),
            };
            let v = View::build(&facts, None);
            assert_eq!(v.verdict.state.word(), want["state"], "{name}");
            assert_eq!(v.headline, want["headline"], "{name}");
            assert_eq!(v.verdict.unseen, want["unseen"] == true, "{name}");
            assert_eq!(v.verdict.unseen, name == "idle, unseen", "{name}");
            if v.verdict.unseen {
                assert!(
                    v.subline.contains("sudo handoff blockers"),
                    "{name}: {}",
                    v.subline
                );
            }
            assert_eq!(v.owner, owner_word(v.verdict.state), "{name}");
            let offers_return = v
                .actions
                .iter()
                .any(|b| matches!(b.action, Action::ReturnToLinux { .. }));
            assert_eq!(
                offers_return,
                want["state"] == "restore_required",
                "{name}: {:?}",
                v.actions
            );
        }
    }
}
