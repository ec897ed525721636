//! Talking to libvirt (feature `libvirt`; links libvirt, so only the CLI and the tray
//! turn it on). Any URI works: `qemu:///system`, `qemu+ssh://host/system`, `test:///default`.

use std::collections::HashMap;

use virt::connect::Connect;
use virt::domain::DomainState;
use virt::error::ErrorNumber;

use crate::config::VmConfig;
use crate::status::{VmState, VmStatus};

#[derive(Debug, thiserror::Error)]
pub enum VirtError {
    #[error(
        "cannot connect to libvirt at {uri}: {message}\n  check: is libvirtd running (systemctl status libvirtd)? \
         is your user in group libvirt (id -nG)? does polkit allow it?"
    )]
    Connect { uri: String, message: String },
    #[error("no domain {name:?} at {uri}; `virsh -c {uri} list --all` lists the defined ones")]
    NoDomain { uri: String, name: String },
    #[error("libvirt at {uri}, domain {name:?}: {message}")]
    Domain {
        uri: String,
        name: String,
        message: String,
    },
}

/// Stop libvirt from printing every error to stderr itself; we report them.
pub fn quiet() {
    virt::error::clear_error_callback();
}

pub fn connect(uri: &str) -> Result<Connect, VirtError> {
    quiet();
    // The test driver with a node file (`test:///path/node.xml`) builds a fresh machine
    // for every open; `test:///default` is shared by the process's connections. Share the
    // node-file ones too, so that in one process (the tray, `handoff demo`) a VM started
    // by one action is still running for the next, as with a real libvirtd.
    let shared = uri.starts_with("test:///") && uri != "test:///default";
    if shared && let Some(c) = test_conns().lock().unwrap_or_else(|e| e.into_inner()).get(uri) {
        return Ok(c.clone());
    }
    let c = Connect::open(Some(uri)).map_err(|e| VirtError::Connect {
        uri: uri.to_owned(),
        message: e.message().to_owned(),
    })?;
    if shared {
        test_conns()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(uri.to_owned())
            .or_insert_with(|| c.clone());
    }
    Ok(c)
}

fn test_conns() -> &'static std::sync::Mutex<HashMap<String, Connect>> {
    static CONNS: std::sync::OnceLock<std::sync::Mutex<HashMap<String, Connect>>> =
        std::sync::OnceLock::new();
    CONNS.get_or_init(Default::default)
}

fn map_state(s: DomainState) -> VmState {
    match s {
        DomainState::Running | DomainState::Blocked | DomainState::NoState => VmState::Running,
        DomainState::Paused => VmState::Paused,
        DomainState::Shutdown => VmState::Shutdown,
        DomainState::Shutoff => VmState::Shutoff,
        DomainState::Crashed => VmState::Crashed,
        DomainState::PMSuspended => VmState::Suspended,
    }
}

pub fn domain_state(conn: &Connect, uri: &str, name: &str) -> Result<VmState, VirtError> {
    let dom = conn.lookup_domain_by_name(name).map_err(|e| {
        if e.code().is_known_and(|c| c == ErrorNumber::NoDomain) {
            VirtError::NoDomain {
                uri: uri.to_owned(),
                name: name.to_owned(),
            }
        } else {
            VirtError::Domain {
                uri: uri.to_owned(),
                name: name.to_owned(),
                message: e.message().to_owned(),
            }
        }
    })?;
    let (state, _reason) = dom.state().map_err(|e| VirtError::Domain {
        uri: uri.to_owned(),
        name: name.to_owned(),
        message: e.message().to_owned(),
    })?;
    Ok(if state.is_known() {
        map_state(state.unwrap())
    } else {
        VmState::Unknown
    })
}

/// The domain's live XML (`virsh dumpxml`), e.g. for `handoff lg-test`.
pub fn domain_xml(vm: &VmConfig) -> Result<String, VirtError> {
    let conn = connect(&vm.uri)?;
    let err = |e: virt::error::Error| VirtError::Domain {
        uri: vm.uri.clone(),
        name: vm.name.clone(),
        message: e.message().to_owned(),
    };
    let dom = conn.lookup_domain_by_name(&vm.name).map_err(|e| {
        if e.code().is_known_and(|c| c == ErrorNumber::NoDomain) {
            VirtError::NoDomain {
                uri: vm.uri.clone(),
                name: vm.name.clone(),
            }
        } else {
            err(e)
        }
    })?;
    dom.xml_desc(0).map_err(err)
}

/// A status probe for [`crate::status::collect`] that opens one connection per URI and
/// reuses it for every VM there.
pub struct Prober {
    conns: HashMap<String, Result<Connect, String>>,
}

impl Default for Prober {
    fn default() -> Self {
        Self::new()
    }
}

impl Prober {
    pub fn new() -> Self {
        Self {
            conns: HashMap::new(),
        }
    }

    pub fn probe(&mut self, vm: &VmConfig) -> VmStatus {
        let conn = self
            .conns
            .entry(vm.uri.clone())
            .or_insert_with(|| connect(&vm.uri).map_err(|e| e.to_string()));
        match conn {
            Err(e) => VmStatus::new(vm, VmState::Unknown, Some(e.clone())),
            Ok(c) => match domain_state(c, &vm.uri, &vm.name) {
                Ok(s) => VmStatus::new(vm, s, None),
                Err(e @ VirtError::NoDomain { .. }) => {
                    VmStatus::new(vm, VmState::Undefined, Some(e.to_string()))
                }
                Err(e) => VmStatus::new(vm, VmState::Unknown, Some(e.to_string())),
            },
        }
    }
}
