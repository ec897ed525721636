//! `handoff blockers`' answer: what holds the GPU's device nodes now, what that allows, and
//! the exit status scripts branch on. Reads sysfs, `/proc` and `[host] dev` through
//! [`crate::holders`]; decides here, once, what an absent GPU and a partial scan mean.

use std::fmt::Write as _;

use serde::Serialize;

use crate::gpu::{self, Owner, SysfsError};
use crate::holders::{self, Scan, Verdict};
use crate::host::Host;
use crate::pci::PciAddress;

/// The exit status when nothing was seen holding the GPU but not everything could be
/// checked: a handoff would be refused.
pub const EXIT_UNCHECKED: u8 = 4;

/// One look at the GPU's holders.
#[derive(Debug)]
pub struct Blockers {
    pub address: PciAddress,
    /// No GPU at `address`: nothing can hold it.
    pub absent: bool,
    /// How many of the GPU's device nodes were checked.
    pub nodes: usize,
    pub scan: Scan,
    pub verdict: Verdict,
    /// Processes holding the GPU's VFIO group `/dev/vfio/<group>` (with `vm` when one is a
    /// VM's QEMU): what keeps a GPU on vfio-pci from going home, and what a hung unbind from
    /// vfio-pci waits for.
    pub vfio_users: Vec<holders::Holder>,
}

/// `handoff blockers --json`: the scan, and what it allows.
#[derive(Serialize)]
pub struct BlockersJson<'a> {
    /// `clear`, `held` or `unchecked` (see [`Verdict`]).
    pub verdict: &'static str,
    /// What could not be checked, one line each.
    pub unchecked: &'a [String],
    /// Processes holding the GPU's VFIO group (with `vm` when one is a VM's QEMU).
    pub vfio_users: &'a [holders::Holder],
    #[serde(flatten)]
    pub scan: &'a Scan,
}

impl Blockers {
    /// Scans for what holds the GPU at `address` under `host`.
    pub fn check(host: &Host, address: PciAddress) -> Result<Self, SysfsError> {
        // Without the name and the driver_override reads (a forked child each): nothing
        // here shows them.
        let g = gpu::read_gpu_bindings(host, address)?;
        let nodes = holders::gpu_nodes(host, &g);
        // One walk over /proc for the GPU's nodes and its VFIO group node: the walk is
        // nearly all of the time `blockers` takes.
        let (mut scan, vfio_users) = holders::scan_with_vfio(host, &g, &nodes);
        crate::publish::complete(host, g.address, &mut scan);
        crate::containers::name_all(scan.holders.iter_mut().filter_map(|h| h.container.as_mut()));
        let verdict = scan.verdict();
        Ok(Self {
            address: g.address,
            absent: g.owner == Owner::Absent,
            nodes: nodes.len(),
            scan,
            verdict,
            vfio_users,
        })
    }

    /// `clear`, `held` or `unchecked`; an absent GPU is clear.
    pub fn word(&self) -> &'static str {
        if self.absent { "clear" } else { self.verdict.word() }
    }

    /// 0 clear (or no GPU), 1 held (on the host, or its VFIO group by a process),
    /// [`EXIT_UNCHECKED`] when not everything was checked.
    pub fn exit_code(&self) -> u8 {
        match self.verdict {
            _ if self.absent => 0,
            Verdict::Clear if self.vfio_users.is_empty() => 0,
            Verdict::Clear | Verdict::Held { .. } => 1,
            Verdict::Unchecked { .. } => EXIT_UNCHECKED,
        }
    }

    pub fn json(&self) -> BlockersJson<'_> {
        BlockersJson {
            verdict: self.word(),
            unchecked: self.verdict.unchecked(),
            vfio_users: &self.vfio_users,
            scan: &self.scan,
        }
    }

    /// What `handoff blockers` prints: a headline when nothing was seen holding the GPU,
    /// then each holder, each framebuffer and each thing not checked, one line each.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if self.absent {
            let _ = writeln!(out, "No GPU at {}: nothing to hold.", self.address);
            return out;
        }
        match &self.verdict {
            Verdict::Clear if !self.vfio_users.is_empty() => {
                let _ = writeln!(
                    out,
                    "Nothing holds GPU {} on the host ({} device nodes checked).",
                    self.address, self.nodes
                );
            }
            Verdict::Clear => {
                let _ = writeln!(
                    out,
                    "Nothing holds GPU {} ({} device nodes checked).",
                    self.address, self.nodes
                );
            }
            Verdict::Unchecked { .. } => {
                let _ = writeln!(
                    out,
                    "Nothing seen holding GPU {} ({} device nodes checked), but not everything could be checked; a handoff would be refused:",
                    self.address, self.nodes
                );
            }
            Verdict::Held { .. } => {}
        }
        for line in self.scan.summary_lines() {
            let _ = writeln!(out, "{line}");
        }
        if !self.vfio_users.is_empty() {
            let _ = writeln!(
                out,
                "Holding its VFIO group (GPU {} cannot return to the host until they exit):",
                self.address
            );
            for h in &self.vfio_users {
                let _ = writeln!(out, "  {}", h.summary());
            }
        }
        for u in self.verdict.unchecked() {
            let _ = writeln!(out, "Not checked: {u}");
        }
        out
    }
}

/// `blockers --json`'s schema: 2 added `schema` and `gpus` (each GPU's scan); the fields of
/// 1 (the scan of the primary GPU, or of the one asked for) stay at the top.
pub const SCHEMA: u32 = 2;

/// `handoff blockers --json` with every GPU.
#[derive(Serialize)]
pub struct AllJson<'a> {
    pub schema: u32,
    #[serde(flatten)]
    pub first: BlockersJson<'a>,
    pub gpus: Vec<GpuJson<'a>>,
}

/// One GPU of [`AllJson`].
#[derive(Serialize)]
pub struct GpuJson<'a> {
    pub address: PciAddress,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub primary: bool,
    #[serde(flatten)]
    pub scan: BlockersJson<'a>,
}

/// The scans of several GPUs (each configured GPU, or the one asked for), in file order.
pub struct Each {
    pub gpus: Vec<(crate::config::GpuConfig, Blockers)>,
    /// The primary GPU's address.
    pub primary: PciAddress,
}

impl Each {
    /// Scans the GPUs `only` chooses ([`crate::status::chosen_gpus`]).
    pub fn check(cfg: &crate::config::Config, only: Option<&str>) -> Result<Self, EachError> {
        let chosen = crate::status::chosen_gpus(cfg, only).map_err(|e| EachError::Choose(e.to_string()))?;
        let mut gpus = Vec::new();
        for g in chosen {
            gpus.push((g.clone(), Blockers::check(&cfg.host, g.address)?));
        }
        Ok(Self {
            gpus,
            primary: cfg.gpu.address,
        })
    }

    /// 1 when something holds any GPU, else 4 when any was not wholly checked, else 0.
    pub fn exit_code(&self) -> u8 {
        let codes: Vec<u8> = self.gpus.iter().map(|(_, b)| b.exit_code()).collect();
        if codes.contains(&1) {
            1
        } else {
            codes.into_iter().max().unwrap_or(0)
        }
    }

    pub fn json(&self) -> Option<AllJson<'_>> {
        let first = self
            .gpus
            .iter()
            .find(|(g, _)| g.address == self.primary)
            .or_else(|| self.gpus.first())?;
        Some(AllJson {
            schema: SCHEMA,
            first: first.1.json(),
            gpus: self
                .gpus
                .iter()
                .map(|(g, b)| GpuJson {
                    address: g.address,
                    label: g.label.clone(),
                    primary: g.address == self.primary,
                    scan: b.json(),
                })
                .collect(),
        })
    }

    /// One GPU: exactly [`Blockers::render_text`]; several: each under its own heading.
    pub fn render_text(&self) -> String {
        if let [(_, one)] = self.gpus.as_slice() {
            return one.render_text();
        }
        let mut out = String::new();
        for (i, (g, b)) in self.gpus.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let _ = writeln!(
                out,
                "== GPU {}{} ==",
                g.address,
                g.label
                    .as_deref()
                    .map(|l| format!(" {}", crate::escape::plain(l)))
                    .unwrap_or_default()
            );
            out += &b.render_text();
        }
        out
    }
}

/// Why [`Each::check`] could not scan.
#[derive(Debug, thiserror::Error)]
pub enum EachError {
    #[error("{0}")]
    Choose(String),
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blockers(absent: bool, verdict: Verdict) -> Blockers {
        Blockers {
            address: "0000:01:00.0".parse().unwrap(),
            absent,
            nodes: 7,
            scan: Scan::default(),
            verdict,
            vfio_users: Vec::new(),
        }
    }

    #[test]
    fn exit_status_and_word_follow_the_verdict_and_an_absent_gpu_is_clear() {
        let held = || Verdict::Held { unchecked: vec![] };
        let unchecked = || Verdict::Unchecked {
            what: vec!["3 processes could not be inspected: run as root to see them".into()],
        };
        for (b, word, code) in [
            (blockers(false, Verdict::Clear), "clear", 0),
            (blockers(false, held()), "held", 1),
            (blockers(false, unchecked()), "unchecked", EXIT_UNCHECKED),
            (blockers(true, unchecked()), "clear", 0),
        ] {
            assert_eq!((b.word(), b.exit_code()), (word, code), "{b:?}");
        }
    }

    #[test]
    fn text_says_what_was_checked_and_what_was_not() {
        assert_eq!(
            blockers(false, Verdict::Clear).render_text(),
            "Nothing holds GPU 0000:01:00.0 (7 device nodes checked).\n"
        );
        assert_eq!(
            blockers(true, Verdict::Clear).render_text(),
            "No GPU at 0000:01:00.0: nothing to hold.\n"
        );
        let text = blockers(
            false,
            Verdict::Unchecked {
                what: vec!["/proc/iomem could not be read".into()],
            },
        )
        .render_text();
        assert!(text.starts_with("Nothing seen holding GPU 0000:01:00.0 (7 device nodes checked), but not everything could be checked; a handoff would be refused:\n"), "{text}");
        assert!(
            text.ends_with("Not checked: /proc/iomem could not be read\n"),
            "{text}"
        );
    }
}
