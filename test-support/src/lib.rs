//! What the tests of every crate of the workspace share, written once: whether a tool is
//! installed and what to do when it is not ([`tools`]), process groups and their clean-up
//! ([`process`]), waits ([`wait`]), Xvfb ([`xvfb`]), a real i3 desktop ([`desktop`]), the
//! tray's desktop session with dunst and xfce4-panel (`tray`), the bar's i3blocks and
//! notification helpers ([`block`]), the details window's accessibility bus (`a11y`), a
//! private system bus with polkitd ([`system_bus`]), a systemd user manager
//! ([`systemd_user`]), the real system libvirtd ([`libvirt`]) and the end-to-end scene
//! around it (`stage`), the simulated GPU behind FUSE (`fuse_gpu`), processes that hold a
//! node under a chosen name ([`named_holder`]) or open and close one on command
//! ([`opener`]), headless sway as another user ([`sway`]), screenshots and their colours
//! ([`screenshot`]), system directories moved aside ([`backup`]), the workspace's other
//! binaries ([`bins`]) and configs for simulated machines ([`config`]), looking at the machine
//! as a normal user from a root test ([`unprivileged`]), and fakepve, the
//! Proxmox VE API the `proxmox` crate is tested against ([`fakepve`]).
//!
//! Rules every helper keeps: a missing component fails the test under `CI=true` and skips
//! it, saying why, elsewhere ([`tools::required`]); every process a helper starts is
//! killed and reaped when the value that owns it drops, assertion failure or not; nothing
//! outside the test's temp dir is touched, except the shared system libvirtd, its hook dir
//! and `/etc/handoff`, which `stage` and [`backup`] restore under [`libvirt`]'s lock.
//!
//! Features: `sim` (the kernel simulator: `fuse_gpu`, `stage`) and `dbus` (zbus: `tray`,
//! `a11y`). Neither turns on the library's `libvirt`: libvirt is driven through `virsh`.
#![warn(missing_docs)]

#[cfg(feature = "dbus")]
pub mod a11y;
pub mod backup;
pub mod bins;
pub mod block;
pub mod config;
pub mod desktop;
pub mod fakepve;
#[cfg(feature = "sim")]
pub mod fuse_gpu;
pub mod hook_run;
pub mod libvirt;
pub mod named_holder;
pub mod opener;
pub mod process;
pub mod screenshot;
pub mod source;
#[cfg(feature = "sim")]
pub mod stage;
pub mod sway;
pub mod system_bus;
pub mod systemd_user;
pub mod tools;
#[cfg(feature = "dbus")]
pub mod tray;
pub mod unprivileged;
pub mod wait;
pub mod xvfb;
