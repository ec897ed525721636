//! Waiting for one VM to start or stop, from libvirt's lifecycle events (feature
//! `libvirt`), for `handoff lg --on-vm-start`. A minimal stand-in until the shared
//! live-state stream exists: one domain, started/stopped only.
//!
//! virt 0.5 has no safe wrapper for domain events, so this registers a
//! `VIR_DOMAIN_EVENT_ID_LIFECYCLE` callback through `virt::sys` and runs libvirt's default
//! event loop on a thread; the callback forwards each event over a channel.

use std::sync::mpsc::{Receiver, Sender, channel};

use virt::connect::Connect;
use virt::sys;

/// What happened to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Started,
    Stopped,
}

/// Registers libvirt's default event loop and runs it on a thread. Must happen before
/// the connection that events are wanted on is opened.
pub fn start_event_loop() -> Result<(), String> {
    virt::event::event_register_default_impl().map_err(|e| e.message().to_owned())?;
    std::thread::Builder::new()
        .name("libvirt-events".into())
        .spawn(|| {
            loop {
                if virt::event::event_run_default_impl().is_err() {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    _dom: sys::virDomainPtr,
    event: std::os::raw::c_int,
    _detail: std::os::raw::c_int,
    opaque: *mut std::os::raw::c_void,
) -> std::os::raw::c_int {
    // SAFETY: opaque is the Sender leaked in `watch`; it lives as long as the connection.
    let tx = unsafe { &*(opaque as *const Sender<Lifecycle>) };
    let ev = match event as u32 {
        sys::VIR_DOMAIN_EVENT_STARTED | sys::VIR_DOMAIN_EVENT_RESUMED => Some(Lifecycle::Started),
        sys::VIR_DOMAIN_EVENT_STOPPED | sys::VIR_DOMAIN_EVENT_CRASHED => Some(Lifecycle::Stopped),
        _ => None,
    };
    if let Some(ev) = ev {
        let _ = tx.send(ev);
    }
    0
}

/// Lifecycle events of domain `name` on `conn` (opened after [`start_event_loop`]).
pub fn watch(conn: &Connect, name: &str) -> Result<Receiver<Lifecycle>, String> {
    let dom = conn
        .lookup_domain_by_name(name)
        .map_err(|e| e.message().to_owned())?;
    let (tx, rx) = channel();
    // Leaked on purpose: the registration lasts as long as the process.
    let opaque = Box::into_raw(Box::new(tx)) as *mut std::os::raw::c_void;
    // SAFETY: the callback type is what libvirt calls for LIFECYCLE (cast to the generic
    // type, as libvirt's VIR_DOMAIN_EVENT_CALLBACK macro does); pointers are valid.
    let cb: sys::virConnectDomainEventGenericCallback = unsafe {
        std::mem::transmute::<
            Option<
                unsafe extern "C" fn(
                    sys::virConnectPtr,
                    sys::virDomainPtr,
                    std::os::raw::c_int,
                    std::os::raw::c_int,
                    *mut std::os::raw::c_void,
                ) -> std::os::raw::c_int,
            >,
            sys::virConnectDomainEventGenericCallback,
        >(Some(on_lifecycle))
    };
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            dom.as_ptr(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as i32,
            cb,
            opaque,
            None,
        )
    };
    if id < 0 {
        return Err(virt::error::Error::last_error().message().to_owned());
    }
    Ok(rx)
}
