//! libvirt domain lifecycle events: the VM source of [`handoff::live`]'s stream, plugged in
//! through [`sources`] (the core links no libvirt).
//!
//! `virt` 0.5 has no safe wrapper for events, so this uses the raw API through
//! `virt::sys`: `virEventRegisterDefaultImpl` once per process before any connection is
//! opened for events, `virEventRunDefaultImpl` in a loop on one thread, and per URI one
//! connection with `virConnectDomainEventRegisterAny(VIR_DOMAIN_EVENT_ID_LIFECYCLE)` for
//! all domains (filtered here to the configured names) plus
//! `virConnectRegisterCloseCallback`, which is how a dead libvirtd is noticed (EOF on
//! the socket, seen by the event loop).
//!
//! The C callbacks only look up the domain's name (no RPC) and hand a value to the sink
//! or a channel, inside `catch_unwind`: nothing may unwind into libvirt.
//!
//! Per URI a supervisor thread owns the connection. Connected, it blocks on a channel
//! (no timeout) until the close callback or `Supervisor::stop`. Disconnected, it
//! retries every [`LIBVIRT_RETRY`].

use std::ffi::{CStr, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread;

use virt::connect::Connect;
use virt::sys;

use handoff::config::Config;
use handoff::live::{Change, DomainEvent, LIBVIRT_RETRY, Sink, Source, WatchError};

static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers libvirt's default event loop and runs it on a thread, once per process.
pub fn ensure_event_loop() -> Result<(), WatchError> {
    EVENT_LOOP
        .get_or_init(|| {
            crate::libvirt::quiet();
            virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
            thread::Builder::new()
                .name("handoff-libvirt-events".into())
                .spawn(|| {
                    loop {
                        // Returns after each dispatch; errors only if no impl is registered.
                        if virt::event::event_run_default_impl().is_err() {
                            tracing::error!("libvirt's event loop failed; no more VM events");
                            return;
                        }
                    }
                })
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(WatchError::EventLoop)
}

enum Ctl {
    /// The close callback of connection `generation` fired.
    Closed {
        generation: u64,
        reason: c_int,
    },
    Stop,
}

/// One URI's supervisor; [`Supervisor::stop`] ends it.
pub(crate) struct Supervisor {
    ctl: Sender<Ctl>,
}

impl Supervisor {
    pub(crate) fn stop(&self) {
        let _ = self.ctl.send(Ctl::Stop);
    }
}

/// Stops the supervisors when dropped: what a [`handoff::live::Watcher`] keeps of this source.
struct Running(Vec<Supervisor>);

impl Drop for Running {
    fn drop(&mut self) {
        for s in &self.0 {
            s.stop();
        }
    }
}

/// This source as a [`handoff::live::VmEventSource`].
pub fn source(config: &Config, sink: &Sink) -> Result<Box<dyn Send>, WatchError> {
    Ok(Box::new(Running(start(config, sink)?)))
}

/// `sources` with libvirt's lifecycle events plugged in: what a [`handoff::live::Watcher`]
/// of a program that links libvirt asks for.
pub fn sources(sources: handoff::live::Sources) -> handoff::live::Sources {
    handoff::live::Sources {
        vm_events: Some(source),
        ..sources
    }
}

/// A supervisor per distinct URI of the configured VMs.
pub(crate) fn start(config: &Config, sink: &Sink) -> Result<Vec<Supervisor>, WatchError> {
    ensure_event_loop()?;
    // Proxmox VE's VMs (`vmid`) are not libvirt's: their states are polled through the
    // hypervisor interface instead (`crate::agent`).
    let mut uris: Vec<&str> = config
        .vms
        .iter()
        .filter(|vm| vm.vmid.is_none())
        .map(|vm| vm.uri.as_str())
        .collect();
    uris.sort();
    uris.dedup();
    let mut out = Vec::new();
    let mut ready = Vec::new();
    for uri in uris {
        let names = config
            .vms
            .iter()
            .filter(|vm| vm.uri == uri && vm.vmid.is_none())
            .map(|vm| vm.name.clone())
            .collect();
        let (tx, rx) = mpsc::channel();
        let ctx = Supervise {
            uri: uri.to_owned(),
            names,
            sink: sink.clone(),
            ctl_tx: tx.clone(),
        };
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        thread::Builder::new()
            .name(format!("handoff-libvirt-{uri}"))
            .spawn(move || ctx.run(rx, ready_tx))
            .map_err(WatchError::Thread)?;
        out.push(Supervisor { ctl: tx });
        ready.push(ready_rx);
    }
    // Callers read the full status once `Watcher::new` returns and rely on the stream for
    // everything after: an event between that read and the registration would be lost.
    // So wait (bounded: a dead remote host must not hang a surface) until each URI's
    // first attempt has registered its callbacks or failed (then SourceLost says so).
    let deadline = std::time::Instant::now() + FIRST_CONNECT_WAIT;
    for rx in ready {
        let _ = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }
    Ok(out)
}

/// How long [`start`] waits for the first connection to each URI.
const FIRST_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

struct Supervise {
    uri: String,
    names: Vec<String>,
    sink: Sink,
    ctl_tx: Sender<Ctl>,
}

/// What the lifecycle callback needs; freed by libvirt through [`free_box`].
struct LifecycleCtx {
    uri: String,
    names: Vec<String>,
    sink: Sink,
}

struct CloseCtx {
    generation: u64,
    ctl: Mutex<Sender<Ctl>>,
}

/// A connection with both callbacks registered.
struct Session {
    conn: Connect,
    callback_id: c_int,
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: conn is open; deregistering an id or callback that libvirt already
        // dropped (dead daemon) just fails. libvirt frees the contexts via free_box.
        unsafe {
            sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.callback_id);
            sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(on_close));
        }
    }
}

impl Supervise {
    fn source(&self) -> Source {
        Source::Libvirt {
            uri: self.uri.clone(),
        }
    }

    fn run(self, ctl: Receiver<Ctl>, ready: mpsc::SyncSender<()>) {
        let mut generation = 0u64;
        let mut lost = false;
        let mut ready = Some(ready);
        loop {
            generation += 1;
            let attempt = self.connect(generation);
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            match attempt {
                Ok(session) => {
                    tracing::debug!(uri = %self.uri, "watching libvirt events");
                    if lost
                        && !(self.sink)(Change::SourceBack {
                            source: self.source(),
                        })
                    {
                        return;
                    }
                    // Connected and idle: block without a timeout.
                    let why = loop {
                        match ctl.recv() {
                            Ok(Ctl::Closed {
                                generation: g,
                                reason,
                            }) if g == generation => {
                                break close_reason(reason);
                            }
                            Ok(Ctl::Closed { .. }) => continue, // an older connection's
                            Ok(Ctl::Stop) | Err(_) => return,
                        }
                    };
                    drop(session);
                    lost = true;
                    if !(self.sink)(Change::SourceLost {
                        source: self.source(),
                        why,
                    }) {
                        return;
                    }
                }
                Err(why) => {
                    if !lost {
                        lost = true;
                        if !(self.sink)(Change::SourceLost {
                            source: self.source(),
                            why,
                        }) {
                            return;
                        }
                    }
                    // Disconnected: the one bounded wake-up (module docs).
                    match ctl.recv_timeout(LIBVIRT_RETRY) {
                        Ok(Ctl::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        Ok(Ctl::Closed { .. }) | Err(RecvTimeoutError::Timeout) => {}
                    }
                }
            }
        }
    }

    fn connect(&self, generation: u64) -> Result<Session, String> {
        let conn = crate::libvirt::connect(&self.uri).map_err(|e| match e {
            crate::libvirt::VirtError::Connect { message, .. } => message,
            other => other.to_string(),
        })?;
        let lifecycle = Box::into_raw(Box::new(LifecycleCtx {
            uri: self.uri.clone(),
            names: self.names.clone(),
            sink: self.sink.clone(),
        }));
        // SAFETY: the callback has the lifecycle signature libvirt calls for
        // VIR_DOMAIN_EVENT_ID_LIFECYCLE (cast to the generic type, as libvirt's
        // VIR_DOMAIN_EVENT_CALLBACK macro does); the context is freed by free_box.
        let callback_id = unsafe {
            let cb: unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) =
                on_lifecycle;
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                Some(std::mem::transmute::<
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void),
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                >(cb)),
                lifecycle as *mut c_void,
                Some(free_box::<LifecycleCtx>),
            )
        };
        if callback_id < 0 {
            // SAFETY: libvirt did not take the context on failure.
            drop(unsafe { Box::from_raw(lifecycle) });
            return Err(format!(
                "cannot register for domain events: {}",
                virt::error::Error::last_error()
            ));
        }
        let close = Box::into_raw(Box::new(CloseCtx {
            generation,
            ctl: Mutex::new(self.ctl_tx.clone()),
        }));
        // SAFETY: on_close matches virConnectCloseFunc; the context is freed by free_box.
        let rc = unsafe {
            sys::virConnectRegisterCloseCallback(
                conn.as_ptr(),
                Some(on_close),
                close as *mut c_void,
                Some(free_box::<CloseCtx>),
            )
        };
        if rc < 0 {
            // SAFETY: not registered, so still ours; the lifecycle callback goes with the
            // session.
            drop(unsafe { Box::from_raw(close) });
            let session = Session { conn, callback_id };
            drop(session);
            return Err(format!(
                "cannot register a close callback: {}",
                virt::error::Error::last_error()
            ));
        }
        Ok(Session { conn, callback_id })
    }
}

fn close_reason(reason: c_int) -> String {
    match reason as u32 {
        sys::VIR_CONNECT_CLOSE_REASON_EOF => "libvirtd closed the connection (stopped or restarted?)".into(),
        sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE => "libvirtd stopped answering keepalives".into(),
        sys::VIR_CONNECT_CLOSE_REASON_CLIENT => "the connection was closed".into(),
        _ => "the connection to libvirtd failed".into(),
    }
}

unsafe extern "C" fn free_box<T>(opaque: *mut c_void) {
    if !opaque.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: opaque came from Box::<T>::into_raw and libvirt frees it once.
            drop(unsafe { Box::from_raw(opaque as *mut T) });
        }));
    }
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: opaque is the LifecycleCtx registered with this callback, alive until
        // free_box; dom is valid for the duration of the callback.
        let ctx = unsafe { &*(opaque as *const LifecycleCtx) };
        // SAFETY: dom is valid for the duration of the callback (above).
        let name = unsafe { sys::virDomainGetName(dom) };
        if name.is_null() {
            return;
        }
        // SAFETY: not null, and libvirt returns a NUL-terminated name owned by dom, which
        // outlives this borrow (the callback).
        let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
        if !ctx.names.iter().any(|n| *n == name) {
            return;
        }
        (ctx.sink)(Change::Domain {
            uri: ctx.uri.clone(),
            name: name.into_owned(),
            event: DomainEvent::from_raw(event),
        });
    }));
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: opaque is the CloseCtx registered with this callback, alive until free_box.
        let ctx = unsafe { &*(opaque as *const CloseCtx) };
        if let Ok(tx) = ctx.ctl.lock() {
            let _ = tx.send(Ctl::Closed {
                generation: ctx.generation,
                reason,
            });
        }
    }));
}
