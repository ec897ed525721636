//! handoff: hand one passthrough GPU between the Linux host and a VM, safely, and show who
//! owns it. This is the core crate: it links neither libvirt, FUSE, D-Bus nor GTK, so every
//! binary can use it and stay light (ARCHITECTURE.md, "Binaries stay light"). libvirt is
//! the `handoff-libvirt` crate, the FUSE simulator `handoff-kernelsim`, logind's sleep
//! inhibitor `handoff-inhibit`.
//!
//! Layers, bottom up: [`pci`], [`host`] and [`config`] (pure values); [`gpu`] and
//! [`holders`] (read-only sysfs and `/proc`), [`gpus`] (which GPUs a VM takes, which drives
//! the display, what each kind needs); [`status`] and [`doctor`] (what surfaces
//! show); [`verdict`] (the one decision of what state a GPU is in, which every surface
//! renders) and [`action`] (the one vocabulary of what a person can do, with one
//! implementation of each action that needs no libvirt); [`bind`] (plans and executes a
//! handoff), [`hook`] (what libvirtd runs) and [`state`] (the hook's state file); [`live`]
//! streams changes to the surfaces. [`simulated_tree`] builds the simulated kernel's tree for tests
//! and the demo; [`scenes`] puts a simulated machine in each state the surfaces tell
//! apart. [`hypervisor`] is the interface to whatever runs the VMs (its implementations
//! live in `handoff-libvirt`); [`agent`] is the wire to `handoff __agent`. [`escape`] makes
//! names safe for each place they are shown, and [`bounded`] reads the files root trusts
//! without hanging or growing. [`cli`] is the `handoff` command line's grammar, shared by
//! the two binaries that parse it. The session side: [`i3`] and [`lg`] (open Looking
//! Glass on its workspace), [`lg_check`] and [`services`] (user units and .desktop files). [`setup`] finds the GPUs and
//! the VMs that pass them through and writes the first config.

pub mod action;
pub mod agent;
pub mod bind;
pub mod blockers;
pub mod bounded;
pub mod cli;
pub mod config;
pub mod containers;
pub mod doctor;
pub mod escape;
pub mod free;
pub mod gpu;
pub mod gpus;
pub mod holders;
pub mod hook;
pub mod hook_install;
pub mod host;
pub mod hypervisor;
pub mod i3;
pub mod lg;
pub mod lg_check;
pub mod live;
pub mod pci;
pub mod publish;
pub mod publisher_install;
pub mod pve;
pub mod pve_hook_install;
pub mod refusals;
pub mod scenes;
pub mod services;
pub mod setup;
pub mod simulated_tree;
pub mod state;
pub mod status;
pub mod stopped;
pub mod sysfs_read;
pub mod verdict;

pub use config::Config;
pub use host::Host;
pub use pci::PciAddress;
