//! handoff: hand one passthrough GPU between the Linux host and a VM, safely, and show who
//! owns it. The library owns the logic; `handoff`, `handoff-tray` and `handoff-block` are
//! thin binaries over it.

pub mod config;
pub mod hooks;
pub mod host;
pub mod pci;

pub use config::Config;
pub use host::Host;
pub use pci::PciAddress;
pub mod gpu;
pub mod holders;
pub mod kernelsim;
pub mod sim;
