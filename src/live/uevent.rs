//! Kernel uevents, straight from netlink (`NETLINK_KOBJECT_UEVENT`, multicast group 1,
//! the kernel's own group; udevd re-broadcasts on group 2), so no udevd is needed.
//!
//! Parsing is a pure function over the datagram ([`parse_uevent`]); the socket is plain
//! libc (`socket`/`bind`/`recv`), three calls that did not seem worth a crate.
//!
//! Userspace may *send* to group 1 too when it has `CAP_NET_ADMIN` (the kernel allows
//! multicast sends from privileged sockets; the datagram reaches every listener in the
//! network namespace, and the kernel then refuses the unicast part with `ECONNREFUSED`,
//! which udevd also ignores). [`send_uevent`] does that: tests deliver synthetic uevents
//! through the real socket path with it, and the kernel simulator announces its binds.
//! Since only root can send there, the receiver accepts any sender.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, setsockopt, sockopt,
};
use std::sync::Arc;
use std::thread;

use super::{Change, DriverAction, Sink, Source};
use crate::pci::PciAddress;

/// The kernel's uevent multicast group.
pub const KERNEL_GROUP: u32 = 1;

/// One kernel uevent: the header's action and devpath, and the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    /// `KEY=value` pairs in the order the kernel sent them.
    pub env: Vec<(String, String)>,
}

impl Uevent {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn subsystem(&self) -> Option<&str> {
        self.get("SUBSYSTEM")
    }

    /// The PCI function: `PCI_SLOT_NAME`, else the devpath's last component.
    pub fn pci_address(&self) -> Option<PciAddress> {
        self.get("PCI_SLOT_NAME")
            .or_else(|| self.devpath.rsplit('/').next())
            .and_then(|s| s.parse().ok())
    }

    /// The datagram the kernel would send: `action@devpath\0KEY=value\0…`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{}@{}\0", self.action, self.devpath).into_bytes();
        for (k, v) in &self.env {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out
    }

    /// A PCI driver-core uevent (`bind`, `unbind`, `add`, `remove`) for `function` at
    /// `devpath` (relative to sysfs, like `/devices/pci0000:00/0000:00:01.0/0000:01:00.0`),
    /// shaped like the kernel's; `driver` is sent as `DRIVER=` (the kernel sends it with
    /// `bind`).
    pub fn pci(action: DriverAction, devpath: &str, function: PciAddress, driver: Option<&str>) -> Self {
        let mut env = vec![
            ("ACTION".to_owned(), action.as_str().to_owned()),
            ("DEVPATH".to_owned(), devpath.to_owned()),
            ("SUBSYSTEM".to_owned(), "pci".to_owned()),
        ];
        if let Some(d) = driver {
            env.push(("DRIVER".to_owned(), d.to_owned()));
        }
        env.push(("PCI_SLOT_NAME".to_owned(), function.to_string()));
        Uevent {
            action: action.as_str().to_owned(),
            devpath: devpath.to_owned(),
            env,
        }
    }
}

/// Parses one datagram from group 1. `None` for anything that is not a kernel uevent
/// (udevd's `libudev\0…` messages, garbage, a header without `@`).
pub fn parse_uevent(bytes: &[u8]) -> Option<Uevent> {
    let mut parts = bytes.split(|&b| b == 0);
    let header = std::str::from_utf8(parts.next()?).ok()?;
    let (action, devpath) = header.split_once('@')?;
    if action.is_empty() || !devpath.starts_with('/') {
        return None;
    }
    let env = parts
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let s = std::str::from_utf8(p).ok()?;
            let (k, v) = s.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect();
    Some(Uevent {
        action: action.to_owned(),
        devpath: devpath.to_owned(),
        env,
    })
}

/// Which uevents matter: `SUBSYSTEM=pci`, a driver-core action, a function in the slot of
/// one of the configured GPUs.
#[derive(Debug, Clone)]
pub struct SlotFilter {
    gpus: Vec<PciAddress>,
}

impl SlotFilter {
    pub fn new(gpu: PciAddress) -> Self {
        Self { gpus: vec![gpu] }
    }

    /// The slots of several GPUs (each `[[gpu]]`).
    pub fn for_gpus(gpus: impl IntoIterator<Item = PciAddress>) -> Self {
        Self {
            gpus: gpus.into_iter().collect(),
        }
    }

    /// The change a uevent means for the GPU, if any.
    pub fn change(&self, ev: &Uevent) -> Option<Change> {
        if ev.subsystem() != Some("pci") {
            return None;
        }
        let action = DriverAction::parse(ev.get("ACTION").unwrap_or(&ev.action))?;
        let function = ev.pci_address()?;
        if !self.gpus.iter().any(|g| function.same_slot(g)) {
            return None;
        }
        Some(Change::Driver {
            function,
            action,
            driver: ev.get("DRIVER").map(str::to_owned),
        })
    }
}

/// A netlink socket bound to the kernel's uevent group.
pub struct UeventSocket {
    fd: OwnedFd,
}

fn netlink_socket() -> io::Result<OwnedFd> {
    Ok(nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )?)
}

/// The kernel's uevent group, port 0 (the kernel; a bind picks our own port).
fn sockaddr(groups: u32) -> NetlinkAddr {
    NetlinkAddr::new(0, groups)
}

impl UeventSocket {
    /// Subscribes to group 1. Works unprivileged (the kernel lets anyone listen).
    pub fn open() -> io::Result<Self> {
        let fd = netlink_socket()?;
        nix::sys::socket::bind(fd.as_raw_fd(), &sockaddr(KERNEL_GROUP))?;
        // A burst (a rescan, a module load) can overflow the default buffer; ask for 1 MiB
        // and live with what we get (FORCE works for root only).
        let size: usize = 1 << 20;
        if setsockopt(&fd, sockopt::RcvBufForce, &size).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &size);
        }
        Ok(Self { fd })
    }

    /// One datagram, without blocking (`WouldBlock` when none is queued).
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::sys::socket::recv(
            self.fd.as_raw_fd(),
            buf,
            MsgFlags::MSG_DONTWAIT,
        )?)
    }
}

/// Broadcasts `bytes` on the uevent group (1) of this network namespace, as the kernel
/// does. Needs `CAP_NET_ADMIN` (root): `EPERM` otherwise.
pub fn send_uevent(bytes: &[u8]) -> io::Result<()> {
    let fd = netlink_socket()?;
    match nix::sys::socket::sendto(fd.as_raw_fd(), bytes, &sockaddr(KERNEL_GROUP), MsgFlags::empty()) {
        Ok(_) => Ok(()),
        // The broadcast went out; only the unicast to the kernel (port 0) was refused.
        Err(Errno::ECONNREFUSED) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn spawn(
    socket: UeventSocket,
    filter: SlotFilter,
    sink: Sink,
    stop: Arc<OwnedFd>,
) -> io::Result<()> {
    thread::Builder::new()
        .name("handoff-uevents".into())
        .spawn(move || run(socket, filter, sink, &stop))
        .map(drop)
}

fn run(socket: UeventSocket, filter: SlotFilter, sink: Sink, stop: &OwnedFd) {
    // The kernel caps one uevent's environment at 2 KiB; 8 KiB leaves room.
    let mut buf = vec![0u8; 8192];
    loop {
        match super::wait_readable(socket.fd.as_fd(), stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = sink(Change::SourceLost {
                    source: Source::Uevents,
                    why: format!("poll: {e}"),
                });
                return;
            }
        }
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let Some(ev) = parse_uevent(&buf[..n]) else {
                        continue;
                    };
                    tracing::trace!(action = %ev.action, devpath = %ev.devpath, "uevent");
                    if let Some(change) = filter.change(&ev)
                        && !sink(change)
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(Errno::ENOBUFS as i32) => {
                    // The kernel dropped uevents: say so, and that the stream goes on.
                    let lost = sink(Change::SourceLost {
                        source: Source::Uevents,
                        why: "the kernel dropped uevents (receive buffer full)".into(),
                    });
                    if !lost
                        || !sink(Change::SourceBack {
                            source: Source::Uevents,
                        })
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = sink(Change::SourceLost {
                        source: Source::Uevents,
                        why: format!("recv: {e}"),
                    });
                    return;
                }
            }
        }
    }
}
