//! Lifecycle events from libvirt's built-in `test:///default` driver (in-process, emits
//! events, no daemon): the watcher sees the VM stop and start.

use std::time::Duration;

use handoff::vm_events::{self, Lifecycle};

#[test]
fn sees_the_vm_stop_and_start() {
    vm_events::start_event_loop().unwrap();
    handoff::libvirt::quiet();
    let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let rx = vm_events::watch(&conn, "test").unwrap();
    let dom = conn.lookup_domain_by_name("test").unwrap();
    dom.destroy().unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(Lifecycle::Stopped));
    dom.create().unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(Lifecycle::Started));
}
