//! `handoff demo`'s hypervisor: libvirt's in-process test driver, plus the hook.
//!
//! The test driver (`test:///<dir>/node.xml`) runs no hooks, so this wraps
//! [`Libvirt`] and runs the hook's logic ([`handoff::hook::run_event`]) in this process at the
//! moments libvirtd would run the hook: `prepare begin` before the domain starts (its
//! refusal becomes [`Start::Refused`], read back exactly as libvirt's wrapped error is),
//! `release end` once it is off (after a destroy, after a shutdown has finished, or after
//! a start failed). The hook binds and returns the simulated GPU and writes the state file
//! the surfaces read, as on a real host.
//!
//! It refuses to exist for a real host ([`Simulated::new`]): the hook's logic writes to
//! sysfs, which is only safe on the demo's simulated one.

use std::collections::HashSet;

use crate::libvirt::{Libvirt, hook_message};
use handoff::config::Config;
use handoff::hypervisor::{
    Action, Description, EventSink, Guest, Hypervisor, HypervisorError, Probe, Start, Subscription, Task,
    TaskState, VmRef,
};
use handoff::status::VmState;

pub struct Simulated {
    cfg: Config,
    libvirt: Libvirt,
    /// VMs asked to shut down whose `release` has not run yet (it runs when a poll sees
    /// them off, as libvirtd runs it when QEMU exits).
    releasing: HashSet<VmRef>,
}

impl Simulated {
    /// For `cfg`, which must be a simulated host (no real `/sys`, `/dev`, `/proc`) whose
    /// VMs are all on libvirt's `test://` driver.
    pub fn new(cfg: &Config) -> Result<Self, HypervisorError> {
        if cfg.host.is_system() {
            return Err(HypervisorError::NotSimulated {
                why: "the config's [host] is this machine's real /sys, /proc and /dev".into(),
            });
        }
        if let Some(vm) = cfg.vms.iter().find(|v| !v.uri.starts_with("test://")) {
            return Err(HypervisorError::NotSimulated {
                why: format!("VM {} is at {}, not on libvirt's test:// driver", vm.name, vm.uri),
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            libvirt: Libvirt::new(),
            releasing: HashSet::new(),
        })
    }

    /// Runs one hook event as libvirtd would; returns its exit code and what it said.
    fn hook(&mut self, vm: &VmRef, op: &str, sub: &str) -> (i32, String) {
        let xml = self.libvirt.xml(vm).unwrap_or_default();
        let mut said = Vec::new();
        let code = handoff::hook::run_event(&self.cfg, &vm.name, op, sub, &xml, &mut said);
        (code, String::from_utf8_lossy(&said).into_owned())
    }

    fn release(&mut self, vm: &VmRef) -> Vec<String> {
        self.releasing.remove(vm);
        let (_, said) = self.hook(vm, "release", "end");
        said.lines().map(str::to_owned).collect()
    }
}

impl Hypervisor for Simulated {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn list(&mut self, at: &str) -> Result<Vec<(VmRef, VmState)>, HypervisorError> {
        self.libvirt.list(at)
    }

    fn probe(&mut self, vm: &VmRef) -> Result<Probe, HypervisorError> {
        self.libvirt.probe(vm)
    }

    fn start(&mut self, vm: &VmRef) -> Result<Start, HypervisorError> {
        let (code, said) = self.hook(vm, "prepare", "begin");
        if code != 0 {
            // What libvirt wraps the hook's stderr in, read back the same way.
            let wrapped = format!("Hook script execution failed: unexpected exit status {code}: {said}");
            return Ok(Start::Refused(hook_message(&wrapped).unwrap_or_default()));
        }
        match self.libvirt.start(vm) {
            Ok(Start::Begun(mut task)) => {
                task.notes = said.lines().map(str::to_owned).collect();
                Ok(Start::Begun(task))
            }
            other => {
                // libvirtd runs `release` after a start that failed past `prepare`.
                self.release(vm);
                other
            }
        }
    }

    fn shutdown(&mut self, vm: &VmRef) -> Result<Task, HypervisorError> {
        let was_active = self.libvirt.probe(vm)?.state.is_active();
        let task = self.libvirt.shutdown(vm)?;
        if was_active {
            self.releasing.insert(vm.clone());
        }
        Ok(task)
    }

    fn destroy(&mut self, vm: &VmRef) -> Result<Task, HypervisorError> {
        let was_active = self.libvirt.probe(vm)?.state.is_active();
        let mut task = self.libvirt.destroy(vm)?;
        if was_active {
            task.notes = self.release(vm);
        }
        Ok(task)
    }

    fn poll(&mut self, task: &Task) -> Result<TaskState, HypervisorError> {
        let state = self.libvirt.poll(task)?;
        Ok(match state {
            TaskState::Done { state, mut notes }
                if task.action == Action::Shutdown && self.releasing.contains(&task.vm) =>
            {
                notes.extend(self.release(&task.vm));
                TaskState::Done { state, notes }
            }
            other => other,
        })
    }

    fn describe(&mut self, vm: &VmRef) -> Result<Description, HypervisorError> {
        self.libvirt.describe(vm)
    }

    fn guest(&mut self, vm: &VmRef) -> Guest {
        self.libvirt.guest(vm)
    }

    fn subscribe(&mut self, vms: &[VmRef], sink: EventSink) -> Result<Subscription, HypervisorError> {
        self.libvirt.subscribe(vms, sink)
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;
    use crate::test_node;
    use handoff::config::VmConfig;
    use handoff::simulated_tree::{SimHost, SimSpec};

    #[test]
    fn refuses_to_run_the_hook_for_a_real_host_or_a_real_libvirt() {
        match Simulated::new(&Config::default()) {
            Err(e @ HypervisorError::NotSimulated { .. }) => {
                let e = e.to_string();
                assert!(
                    e.contains("real /sys") && e.contains(handoff::hypervisor::SIMULATED_ENV),
                    "{e}"
                )
            }
            other => panic!("{:?}", other.err()),
        }
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
        let cfg = Config {
            host: sim.host(),
            vms: vec![VmConfig::named("win11", "Windows")], // at qemu:///system
            ..Config::default()
        };
        let e = Simulated::new(&cfg)
            .err()
            .expect("qemu:///system is refused")
            .to_string();
        assert!(e.contains("win11 is at qemu:///system"), "{e}");
    }

    #[test]
    fn refuses_a_start_while_a_process_holds_the_gpu_naming_it_and_leaves_the_vm_off() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::build(tmp.path(), &SimSpec::workstation()).unwrap();
        let uri = test_node(tmp.path());
        let cfg = Config {
            host: sim.host(),
            vms: vec![VmConfig {
                name: "lab".into(),
                vmid: None,
                label: Some("Lab".into()),
                uri: uri.clone(),
                shutdown_timeout_s: 5,
            }],
            ..Config::default()
        };
        // A real process holding the GPU's node, as a CUDA job would.
        let node = std::fs::File::open(sim.dev().join("nvidia0")).unwrap();
        let mut holder = Command::new("sleep")
            .arg("60")
            .stdin(Stdio::from(node))
            .spawn()
            .expect("sleep");
        let pid = holder.id();
        let lab = VmRef::named(&uri, "lab");
        let mut hv = Simulated::new(&cfg).unwrap();
        let started = hv.start(&lab);
        let state = hv.probe(&lab).map(|p| p.state);
        let _ = holder.kill();
        let _ = holder.wait();

        let Ok(Start::Refused(r)) = started else {
            panic!("not refused: {started:?}")
        };
        assert!(
            r.message.starts_with("not handing GPU 0000:01:00.0 to lab"),
            "{}",
            r.message
        );
        assert!(r.message.contains(&format!("sleep (pid {pid}")), "{}", r.message);
        assert!(
            !r.message.contains("handoff: "),
            "unwrapped like libvirt's error: {}",
            r.message
        );
        assert_eq!(state.unwrap(), VmState::Shutoff, "the domain was never started");
        assert_eq!(
            sim.driver(handoff::simulated_tree::RTX_3090_TI).as_deref(),
            Some("nvidia")
        );
    }
}
