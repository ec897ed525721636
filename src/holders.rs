//! Who holds the GPU: processes with an open fd on one of its device nodes (found by
//! walking `/proc/*/fd`, in Rust, without lsof/fuser), and holders without an fd that can
//! be seen (nvidia-persistenced, a boot framebuffer on the GPU's BAR).
//!
//! The scan never opens a GPU node: opening `/dev/nvidia*` alone keeps the GPU busy.

use std::path::PathBuf;

use serde::Serialize;

use crate::gpu::Gpu;
use crate::host::Host;

/// A device node that belongs to the GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuNode {
    pub path: PathBuf,
}

/// One process that keeps the GPU from being handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    pub cmdline: Vec<String>,
    pub uid: u32,
    pub user: String,
    /// The systemd unit from `/proc/<pid>/cgroup`, e.g. "ollama.service".
    pub unit: Option<String>,
    /// The GPU's nodes it holds open; empty for holders without an fd.
    pub paths: Vec<PathBuf>,
    /// Why it counts, when not an open node (e.g. "nvidia-persistenced keeps the GPU initialised").
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Scan {
    pub holders: Vec<Holder>,
    /// Processes whose fds could not be read (not ours, and we are not root).
    pub uninspected: usize,
}

/// The GPU's device nodes under `host.dev`.
pub fn gpu_nodes(_host: &Host, _gpu: &Gpu) -> Vec<GpuNode> {
    todo!("holders helper")
}

/// Every process holding one of `nodes`, plus the holders without an fd.
pub fn scan(_host: &Host, _gpu: &Gpu, _nodes: &[GpuNode]) -> Scan {
    todo!("holders helper")
}
