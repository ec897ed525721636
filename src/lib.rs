//! handoff: hand one passthrough GPU between the Linux host and a VM, safely, and show who
//! owns it. The library owns the logic; `handoff`, `handoff-tray` and `handoff-block` are
//! thin binaries over it.
//!
//! Layers, bottom up: [`pci`], [`host`] and [`config`] (pure values); [`gpu`] and
//! [`holders`] (read-only sysfs and `/proc`), [`gpus`] (which GPUs a VM takes, which drives
//! the display, what each kind needs); [`status`] and [`doctor`] (what surfaces
//! show); [`verdict`] (the one decision of what state a GPU is in, which every surface
//! renders) and [`action`] (the one vocabulary of what a person can do, with one
//! implementation of each action that needs no libvirt); [`bind`] (plans and executes a handoff), [`hook`] (what libvirtd runs) and
//! [`state`] (the hook's state file); [`live`] streams changes to the surfaces. [`sim`] and [`kernelsim`] simulate the kernel for
//! tests and the demo; [`scenes`] puts a simulated machine in each state the surfaces tell
//! apart. [`hypervisor`] is the interface to whatever runs the VMs; its [`libvirt`]
//! implementation (feature `libvirt`) is, with [`live`]'s libvirt event source, the only
//! part that calls libvirt, and [`vm`] (start, stop, switch and health of the configured
//! VMs) works through it. [`escape`] makes names safe for each place they are shown, and
//! [`bounded`] reads the files root trusts without hanging or growing.
//! The session side: [`i3`] and [`lg`] (open Looking Glass on its workspace), [`lg_test`],
//! [`services`] (user units and .desktop files) and [`inhibit`] (feature `inhibit`: a
//! logind sleep inhibitor while a VM owns the GPU).

pub mod action;
pub mod agent;
pub mod bind;
pub mod blockers;
pub mod bounded;
pub mod config;
pub mod containers;
#[cfg(all(feature = "kernel-sim", feature = "libvirt"))]
pub mod demo;
pub mod doctor;
pub mod escape;
pub mod free;
pub mod gpu;
pub mod gpus;
pub mod holders;
pub mod hook;
pub mod hooks;
pub mod host;
pub mod hypervisor;
pub mod i3;
#[cfg(feature = "inhibit")]
pub mod inhibit;
pub mod kernelsim;
pub mod lg;
pub mod lg_test;
#[cfg(feature = "libvirt")]
pub use hypervisor::libvirt;
pub mod live;
pub mod pci;
pub mod pve;
pub mod pve_hooks;
pub mod refusals;
pub mod scenes;
pub mod services;
pub mod sim;
pub mod state;
pub mod status;
pub mod stopped;
pub mod sysfs_read;
pub mod verdict;
#[cfg(feature = "libvirt")]
pub mod vm;

pub use config::Config;
pub use host::Host;
pub use pci::PciAddress;
