//! Lifecycle events from libvirt's built-in `test:///default` driver (in-process, emits
//! events, no daemon), through the hypervisor interface's subscription: the subscriber sees
//! the VM stop and start.

use std::sync::{Arc, mpsc};
use std::time::Duration;

use handoff::hypervisor::{Hypervisor, VmEvent, VmRef};
use handoff::live::DomainEvent;
use handoff_libvirt::libvirt::Libvirt;

#[test]
fn sees_the_vm_stop_and_start() {
    let vm = VmRef::named("test:///default", "test");
    let mut hv = Libvirt::new();
    let (tx, rx) = mpsc::channel();
    // Before anything else opens the driver: libvirt's event loop must exist first.
    let _subscription = hv
        .subscribe(std::slice::from_ref(&vm), Arc::new(move |ev| tx.send(ev).is_ok()))
        .unwrap();
    let lifecycle = |event| VmEvent::Lifecycle {
        vm: vm.clone(),
        event,
    };
    hv.destroy(&vm).unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(lifecycle(DomainEvent::Stopped))
    );
    hv.start(&vm).unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(lifecycle(DomainEvent::Started))
    );
}
