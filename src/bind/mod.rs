//! The binding engine: moves the GPU's functions to vfio-pci and back, safely.
//!
//! A handoff is planned as a list of [`plan::Step`]s and then executed step by step.
//! Before anything changes, the holder scan runs: any holder means no change at all.
//! Every write that can hang goes through [`write::write_with_watchdog`]. A restore record
//! is saved before the first change; a failed step rolls back what was done, and what
//! cannot be rolled back leaves the record in phase `stuck` ("restore required").
//!
//! Every change happens under the GPU's [`lock::GpuLock`], from reading the restore record
//! to saving what was done: two handoffs of one GPU never interleave. A record that says
//! the GPU is with (or being handed to) one VM makes a handoff to any other VM
//! [`BindError::Busy`].

pub mod guard;
pub mod lock;
pub mod plan;
pub mod record;
pub mod write;

use std::time::Duration;

pub use lock::GpuLock;
use lock::LockError;
use plan::{Expect, Step, VFIO};
use record::{Phase, RecordError, RestoreRecord};
use write::{WriteError, write_with_watchdog};

use crate::gpu::{self, Gpu, Owner};
use crate::holders::{self, Framebuffer, Holder};
use crate::host::Host;
use crate::pci::PciAddress;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{}", refusal_with_unchecked(*.gpu, vm.as_deref(), holders, framebuffers, unchecked))]
    Refused {
        gpu: PciAddress,
        vm: Option<String>,
        holders: Vec<Holder>,
        framebuffers: Vec<Framebuffer>,
        /// What the scan could not check besides (see [`holders::Verdict::Held`]).
        unchecked: Vec<String>,
    },
    #[error("{}", held_on_host_text(*.gpu, *.function, driver, holders, framebuffers, unchecked))]
    HeldOnHost {
        gpu: PciAddress,
        function: PciAddress,
        driver: String,
        holders: Vec<Holder>,
        framebuffers: Vec<Framebuffer>,
        /// What the scan could not check (see [`holders::Verdict`]).
        unchecked: Vec<String>,
    },
    #[error("{}", unchecked_text(*.gpu, vm.as_deref(), what))]
    Unchecked {
        gpu: PciAddress,
        vm: Option<String>,
        /// What could not be checked, one line each.
        what: Vec<String>,
    },
    #[error("{}", busy_text(*.gpu, vm.as_deref(), with, *phase))]
    Busy {
        gpu: PciAddress,
        /// The VM this handoff was for.
        vm: Option<String>,
        /// The VM the restore record names.
        with: String,
        phase: Phase,
    },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("no GPU at {0}: nothing to hand over (check [gpu] address; `handoff doctor`)")]
    Absent(PciAddress),
    #[error(
        "GPU {gpu} needs restoring first: {why}\n  run `handoff rebind --force` (gpu-rebind-nvidia) to return it to the host"
    )]
    RestoreRequired { gpu: PciAddress, why: String },
    #[error(
        "{what} did not return after {} s: something still holds the GPU — see `handoff blockers`.\n  \
         {state}",
        timeout.as_secs()
    )]
    Hung {
        what: String,
        timeout: Duration,
        state: String,
    },
    #[error("{what} failed: {cause}\n  {state}")]
    Failed {
        what: String,
        cause: String,
        state: String,
    },
    #[error("{}", vfio_in_use_text(*.gpu, users, *.waited, group))]
    VfioInUse {
        gpu: PciAddress,
        /// The processes still holding the group's node (normally the VM's QEMU).
        users: Vec<Holder>,
        /// How long the return waited for them to exit.
        waited: Duration,
        /// The group's node, `/dev/vfio/<group>`.
        group: std::path::PathBuf,
    },
    #[error(
        "GPU {gpu}: {note}.\n  Nothing was changed: any write to it would block behind the stuck one. \
         Once whatever holds the GPU lets go (`handoff blockers`), try again."
    )]
    Locked { gpu: PciAddress, note: String },
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Sysfs(#[from] gpu::SysfsError),
}

/// The arguments after the `handoff` binary that the tray and the details window give
/// `pkexec` for "Return GPU to Linux". The polkit action's message shows pkexec's
/// `$(command_line)`, so the address here is how the password prompt names the GPU that
/// will be touched; `rebind` refuses when it is not the system config's GPU.
pub fn pkexec_rebind_args(gpu: PciAddress) -> [String; 4] {
    ["rebind".into(), "--force".into(), "--gpu".into(), gpu.to_string()]
}

/// What [`hand_to_vfio`] or [`return_to_host`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub steps: Vec<Step>,
}

/// The refusal people read in `virsh start`'s error and in a notification: one line per
/// holder and what to do.
pub fn refusal_text(
    gpu: PciAddress,
    vm: Option<&str>,
    holders: &[Holder],
    framebuffers: &[Framebuffer],
) -> String {
    let to = vm
        .map(|v| format!(" to {}", crate::escape::plain(v)))
        .unwrap_or_default();
    let what = match holders.len() {
        0 => "the boot framebuffer holds it".to_owned(),
        1 => "1 process uses it".to_owned(),
        n => format!("{n} processes use it"),
    };
    let mut s = format!("handoff: not handing GPU {gpu}{to}: {what}:\n");
    for h in holders {
        s += &format!("  {}\n", h.summary());
        // A container's processes are the engine's: its scope is not a unit to stop.
        if let Some(c) = &h.container {
            s += &format!("    stop its container: {}\n", c.stop_argv().join(" "));
        }
    }
    for f in framebuffers {
        s += &format!("  {}\n", f.summary());
    }
    s += "Nothing was changed. Stop them (systemctl stop <unit>, or end the process), then start the VM again.";
    s
}

/// Why a return to the host stopped before unbinding a function from a host driver.
fn held_on_host_text(
    gpu: PciAddress,
    function: PciAddress,
    driver: &str,
    holders: &[Holder],
    framebuffers: &[Framebuffer],
    unchecked: &[String],
) -> String {
    let what = match (holders.len(), framebuffers.is_empty()) {
        (0, false) => "the boot framebuffer holds it".to_owned(),
        // Clear of known holders but not clear: the scan could not look everywhere.
        (0, true) => "what holds it could not be checked".to_owned(),
        (1, _) => "1 process uses it".to_owned(),
        (n, _) => format!("{n} processes use it"),
    };
    let mut s = format!(
        "handoff: not unbinding {function} from {driver} (GPU {gpu} is on a host driver there): {what}:\n"
    );
    for h in holders {
        s += &format!("  {}\n", h.summary());
    }
    for f in framebuffers {
        s += &format!("  {}\n", f.summary());
    }
    for u in unchecked {
        s += &format!("  not checked: {u}\n");
    }
    s += "Nothing was changed. Stop them (systemctl stop <unit>, or end the process), then run `handoff rebind --force` again.";
    s
}

/// The refusal when the holder scan could not look everywhere: what it could not check,
/// and that nothing was changed. A hidden holder would hang the unbind.
pub fn unchecked_text(gpu: PciAddress, vm: Option<&str>, what: &[String]) -> String {
    let to = vm.map(|v| format!(" to {v}")).unwrap_or_default();
    let mut s = format!(
        "handoff: not handing GPU {gpu}{to}: it could not be checked for holders, and a holder it cannot see would hang the unbind:\n"
    );
    for w in what {
        s += &format!("  {w}\n");
    }
    s += "Nothing was changed. Fix what is named above, then start the VM again (`sudo handoff blockers` checks).";
    s
}

/// [`refusal_text`], then what could not be checked besides, so that stopping the named
/// holders is not taken as the whole story.
fn refusal_with_unchecked(
    gpu: PciAddress,
    vm: Option<&str>,
    holders: &[Holder],
    framebuffers: &[Framebuffer],
    unchecked: &[String],
) -> String {
    let mut s = refusal_text(gpu, vm, holders, framebuffers);
    if !unchecked.is_empty() {
        s += "\nAlso not checked:";
        for u in unchecked {
            s += &format!("\n  {u}");
        }
    }
    s
}

/// Why a return left every function on vfio-pci: who still holds the VFIO group, and what
/// to do.
fn vfio_in_use_text(gpu: PciAddress, users: &[Holder], waited: Duration, group: &std::path::Path) -> String {
    let who = match users {
        [one] => match &one.vm {
            Some(vm) => format!("the QEMU of VM {} still holds", crate::escape::plain(vm)),
            None => "1 process still holds".to_owned(),
        },
        more => format!("{} processes still hold", more.len()),
    };
    let mut s = format!(
        "handoff: not returning GPU {gpu} to the host: {who} its VFIO group {} after waiting {} s:\n",
        group.display(),
        waited.as_secs()
    );
    for h in users {
        s += &format!("  {}\n", h.summary());
    }
    s += "Nothing was changed: every function stays on vfio-pci (unbinding it now would hang). \
          Once that process has exited (stop the VM, or end the process), run `handoff rebind --force` \
          (gpu-rebind-nvidia) to return the GPU.";
    s
}

/// The one line a restore record keeps about VFIO users that stopped a return.
fn vfio_in_use_problem(users: &[Holder], group: &std::path::Path) -> String {
    let list: Vec<String> = users.iter().map(Holder::summary).collect();
    format!(
        "still in use through its VFIO group {}: {}; the GPU stays on vfio-pci until that ends",
        group.display(),
        list.join("; ")
    )
}

/// How a return treats processes that hold the GPU's VFIO group (`/dev/vfio/<group>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfioUsers {
    /// Wait up to this long for them to exit (a VM's QEMU is still exiting when libvirt
    /// runs the release hook), then change nothing if they are still there.
    Wait(Duration),
    /// Go ahead anyway: a person asked to take the GPU from a running VM
    /// (`rebind --force --even-if-vm-runs`).
    Ignore,
}

/// How often a return looks again for VFIO users while it waits for them.
const VFIO_POLL: Duration = Duration::from_millis(100);

/// The processes holding the GPU's VFIO group after waiting up to `wait` for them to go,
/// and the group's node. Empty when the GPU has no group node (nothing on vfio-pci).
fn vfio_users_after(host: &Host, g: &Gpu, wait: Duration) -> (Vec<Holder>, std::path::PathBuf) {
    let node = g
        .iommu_group
        .as_ref()
        .map(|group| host.dev.join("vfio").join(group.id.to_string()))
        .unwrap_or_default();
    let deadline = std::time::Instant::now() + wait;
    loop {
        let users = holders::vfio_users(host, g);
        if users.is_empty() || std::time::Instant::now() >= deadline {
            return (users, node);
        }
        std::thread::sleep(VFIO_POLL.min(deadline.saturating_duration_since(std::time::Instant::now())));
    }
}

/// The refusal when the restore record gives the GPU to another VM.
fn busy_text(gpu: PciAddress, vm: Option<&str>, with: &str, phase: Phase) -> String {
    // Domain names reach libvirt's error and terminals: no control characters through.
    let vm = vm.map(crate::escape::plain);
    let vm = vm.as_deref();
    let with = crate::escape::plain(with);
    let mut s = match vm {
        Some(vm) => format!(
            "handoff: not handing GPU {gpu} to {vm}: it is with {with}; stop that VM first, then start {vm} again"
        ),
        None => {
            format!("handoff: not handing GPU {gpu}: it is with {with}; stop that VM first, then try again")
        }
    };
    if phase == Phase::Binding {
        s += " (if its start failed and it is not running, `handoff rebind --force` returns the GPU)";
    }
    s
}

/// How a step failed.
#[derive(Debug)]
enum StepError {
    Hung {
        what: String,
        timeout: Duration,
        /// The writer process, still blocked in the kernel, and its start time.
        pid: i32,
        start: Option<u64>,
    },
    Failed {
        what: String,
        cause: String,
    },
}

impl StepError {
    fn what(&self) -> &str {
        match self {
            StepError::Hung { what, .. } | StepError::Failed { what, .. } => what,
        }
    }
}

/// Runs steps against a host's sysfs.
pub struct Executor<'a> {
    pub host: &'a Host,
    pub timeout: Duration,
    /// Told about each step before it runs (progress for people, a log for tests).
    pub progress: &'a mut dyn FnMut(&Step),
}

impl Executor<'_> {
    fn write(&self, path: std::path::PathBuf, value: &str, what: String) -> Result<(), StepError> {
        match write_with_watchdog(&path, value, self.timeout) {
            Ok(()) => Ok(()),
            Err(WriteError::Hung {
                timeout, pid, start, ..
            }) => Err(StepError::Hung {
                what,
                timeout,
                pid,
                start,
            }),
            Err(e @ (WriteError::Failed { .. } | WriteError::Spawn { .. })) => Err(StepError::Failed {
                what,
                cause: e.to_string(),
            }),
        }
    }

    /// The `driver` link: a kernfs symlink, read without any device lock, so this can't
    /// block behind a stuck unbind (unlike `driver_override`, read only via `gpu`).
    fn driver_of(&self, function: PciAddress) -> Option<String> {
        let link =
            std::fs::read_link(self.host.pci_devices().join(function.to_string()).join("driver")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    fn run_step(&mut self, step: &Step, record: &mut RestoreRecord) -> Result<(), StepError> {
        (self.progress)(step);
        let dev = |f: &PciAddress| self.host.pci_devices().join(f.to_string());
        match step {
            Step::LoadVfio => {
                if self.host.pci_drivers().join(VFIO).is_dir() {
                    return Ok(());
                }
                if !self.host.is_system() {
                    // The kernel simulator takes `modprobe` on its control file.
                    let ctl = self.host.sysfs.join(".simctl");
                    if std::fs::write(&ctl, "modprobe vfio-pci\n").is_ok() {
                        return Ok(());
                    }
                    return Err(StepError::Failed {
                        what: "loading vfio-pci".into(),
                        cause: format!(
                            "vfio-pci is not registered in the simulated sysfs {}",
                            self.host.sysfs.display()
                        ),
                    });
                }
                let out = std::process::Command::new("modprobe").arg("vfio-pci").output();
                match out {
                    Ok(o) if o.status.success() => Ok(()),
                    Ok(o) => Err(StepError::Failed {
                        what: "modprobe vfio-pci".into(),
                        cause: String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                    }),
                    Err(e) => Err(StepError::Failed {
                        what: "modprobe vfio-pci".into(),
                        cause: e.to_string(),
                    }),
                }
            }
            Step::SaveRecord => record.save(self.host).map_err(|e| StepError::Failed {
                what: "saving the restore record".into(),
                cause: e.to_string(),
            }),
            Step::SetOverride { function, driver } => {
                // The kernel clears the override on an empty write ("\n").
                let value = driver.as_deref().unwrap_or("\n");
                let what = match driver {
                    Some(d) => format!("setting driver_override of {function} to {d}"),
                    None => format!("clearing driver_override of {function}"),
                };
                self.write(dev(function).join("driver_override"), value, what)
            }
            Step::Unbind { function, driver } => {
                if self.driver_of(*function).as_deref() != Some(driver.as_str()) {
                    return Ok(()); // already gone from that driver
                }
                let path = self.host.pci_drivers().join(driver).join("unbind");
                self.write(
                    path,
                    &function.to_string(),
                    format!("unbinding {function} from {driver}"),
                )
            }
            Step::Probe { function } => self.write(
                self.host.sysfs.join("bus/pci/drivers_probe"),
                &function.to_string(),
                format!("probing a driver for {function}"),
            ),
            Step::Verify { function, expect } => self.verify(*function, expect),
            Step::RemoveRecord => {
                RestoreRecord::remove(self.host, record.gpu).map_err(|e| StepError::Failed {
                    what: "removing the restore record".into(),
                    cause: e.to_string(),
                })
            }
        }
    }

    fn verify(&self, function: PciAddress, expect: &Expect) -> Result<(), StepError> {
        let mut found = self.driver_of(function);
        // drivers_probe found nothing (say the override was cleared but the host driver
        // does not claim the ID by itself): bind to the recorded driver directly, once.
        if let (None, Expect::Driver(d)) = (&found, expect)
            && !d.is_empty()
        {
            let path = self.host.pci_drivers().join(d).join("bind");
            self.write(path, &function.to_string(), format!("binding {function} to {d}"))?;
            found = self.driver_of(function);
        }
        let ok = match expect {
            Expect::Driver(d) if d.is_empty() => found.as_deref().is_some_and(|f| f != VFIO),
            Expect::Driver(d) => found.as_deref() == Some(d.as_str()),
            Expect::Unbound => found.is_none(),
        };
        if ok {
            return Ok(());
        }
        let want = match expect {
            Expect::Driver(d) if d.is_empty() => "a host driver".to_owned(),
            Expect::Driver(d) => d.clone(),
            Expect::Unbound => "no driver".to_owned(),
        };
        Err(StepError::Failed {
            what: format!("checking {function}"),
            cause: format!(
                "it is on {} instead of {want}",
                found.as_deref().unwrap_or("no driver")
            ),
        })
    }

    /// Run `steps` in order; stop at the first failure.
    fn run(
        &mut self,
        steps: &[Step],
        record: &mut RestoreRecord,
        done: &mut Vec<Step>,
    ) -> Result<(), StepError> {
        for step in steps {
            self.run_step(step, record)?;
            done.push(step.clone());
        }
        Ok(())
    }
}

/// Change nothing while the kernel holds a function's lock (someone's unbind is stuck in
/// the driver's `remove`): the state read is uncertain, and every write of ours would only
/// block behind it.
fn refuse_if_locked(g: &Gpu) -> Result<(), BindError> {
    match g.lock_note() {
        Some(note) => Err(BindError::Locked { gpu: g.address, note }),
        None => Ok(()),
    }
}

fn vfio_loaded(host: &Host) -> bool {
    host.pci_drivers().join(VFIO).is_dir()
}

fn describe_state(host: &Host, address: PciAddress) -> String {
    match gpu::read_gpu(host, address) {
        Ok(g) => match g.lock_note() {
            Some(note) => format!("GPU {address} reads as {}, but {note}", g.owner_phrase()),
            None => format!("GPU {address} is now {}", g.owner_phrase()),
        },
        Err(e) => format!("the GPU's state could not be read: {e}"),
    }
}

/// [`BindError::Busy`] when `record` says the GPU is with, or being handed to, a VM other
/// than `vm`: that VM has it, and handing it on would pull it from under a running guest.
pub fn check_not_with_another(record: Option<&RestoreRecord>, vm: Option<&str>) -> Result<(), BindError> {
    match record {
        Some(r) if matches!(r.phase, Phase::Binding | Phase::Bound) => match r.vm.as_deref() {
            Some(with) if Some(with) != vm => Err(BindError::Busy {
                gpu: r.gpu,
                vm: vm.map(str::to_owned),
                with: with.to_owned(),
                phase: r.phase,
            }),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Refuse when anything holds the GPU (or the scan could not look everywhere), when
/// another VM has it, or when another handoff of it is running; otherwise move every
/// function to vfio-pci. Takes the GPU's lock for the whole handoff.
pub fn hand_to_vfio(
    host: &Host,
    address: PciAddress,
    vm: Option<&str>,
    timeout: Duration,
    progress: &mut dyn FnMut(&Step),
) -> Result<Outcome, BindError> {
    let lock = GpuLock::acquire(host, address, lock::wait_for(timeout))?;
    hand_to_vfio_locked(&lock, host, vm, timeout, progress)
}

/// [`hand_to_vfio`] for a caller that already holds the GPU's lock (the hook, which keeps
/// it across its own state file writes too).
pub fn hand_to_vfio_locked(
    lock: &GpuLock,
    host: &Host,
    vm: Option<&str>,
    timeout: Duration,
    progress: &mut dyn FnMut(&Step),
) -> Result<Outcome, BindError> {
    let address = lock.gpu();
    let g = gpu::read_gpu(host, address)?;
    if g.owner == Owner::Absent {
        return Err(BindError::Absent(address));
    }
    let earlier = RestoreRecord::load(host, address)?;
    if let Some(r) = &earlier
        && r.phase == Phase::Stuck
    {
        return Err(BindError::RestoreRequired {
            gpu: address,
            why: r
                .problem
                .clone()
                .unwrap_or_else(|| "an earlier handoff did not finish".into()),
        });
    }
    check_not_with_another(earlier.as_ref(), vm)?;
    refuse_if_locked(&g)?;
    let nodes = holders::gpu_nodes(host, &g);
    let scan = holders::scan(host, &g, &nodes);
    match scan.verdict() {
        holders::Verdict::Clear => {}
        holders::Verdict::Held { unchecked } => {
            return Err(BindError::Refused {
                gpu: address,
                vm: vm.map(str::to_owned),
                holders: scan.holders,
                framebuffers: scan.framebuffers,
                unchecked,
            });
        }
        holders::Verdict::Unchecked { what } => {
            return Err(BindError::Unchecked {
                gpu: address,
                vm: vm.map(str::to_owned),
                what,
            });
        }
    }
    let steps = plan::to_vfio(&g, vfio_loaded(host));
    let mut record = RestoreRecord::new(&g, vm);
    // The GPU is (partly) away already under an earlier record: that record still knows
    // where each function came from; the current state would say "vfio-pci".
    if let Some(r) = earlier {
        record.functions = r.functions;
        record.created = r.created;
    }
    let mut done = Vec::new();
    let mut ex = Executor {
        host,
        timeout,
        progress,
    };
    match ex.run(&steps, &mut record, &mut done) {
        Ok(()) => {
            record.phase = Phase::Bound;
            record.save(host)?;
            Ok(Outcome { steps: done })
        }
        Err(e) => Err(roll_back(&mut ex, &g, record, e)),
    }
}

/// Undo a failed host → vfio handoff. After a hang, the function whose write hung is left
/// alone (its write is still in flight in the kernel) and the record stays, phase `stuck`.
fn roll_back(ex: &mut Executor<'_>, before: &Gpu, mut record: RestoreRecord, cause: StepError) -> BindError {
    let host = ex.host;
    let hung = match &cause {
        StepError::Hung { .. } => before
            .functions
            .iter()
            .find(|f| cause.what().contains(&f.address.to_string())),
        StepError::Failed { .. } => None,
    }
    .map(|f| f.address);
    let rollback = gpu::read_gpu(host, before.address)
        .map_err(|e| (e.to_string(), None))
        .and_then(|mut now| {
            now.functions.retain(|f| Some(f.address) != hung);
            let mut steps = plan::to_host(&now, Some(&record), &record_host_driver(&record));
            if hung.is_some() {
                steps.retain(|s| *s != Step::RemoveRecord);
            }
            let mut done = Vec::new();
            ex.run(&steps, &mut record, &mut done)
                .map_err(|e| (format!("{}: {}", e.what(), step_cause(&e)), hung_pid(&e)))
        })
        .map_err(|e| match e {
            (e, None) => (e, None),
            // A rollback write can block too (behind another hung write on that device):
            // its writer is in flight just the same.
            (e, Some((pid, start))) => (format!("{e} (writer process {pid})"), Some((pid, start))),
        });
    let state = describe_state(host, before.address);
    let state = match (&rollback, hung) {
        (Ok(()), None) => format!("Rolled back: {state}."),
        (Ok(()), Some(f)) => {
            record.phase = Phase::Stuck;
            record.problem = Some(format!("{} hung; the kernel may still finish it", cause.what()));
            record.set_hung_writer(hung_pid(&cause));
            let _ = record.save(host);
            format!(
                "The other functions were rolled back, but {f} is in the middle of a write the kernel has not finished: {state}. {RESTORE_REQUIRED}"
            )
        }
        (Err((e, rollback_writer)), _) => {
            record.phase = Phase::Stuck;
            record.problem = Some(format!("{}; rolling back failed too: {e}", cause.what()));
            record.set_hung_writer(hung_pid(&cause).or(*rollback_writer));
            let _ = record.save(host);
            format!("Rolling back failed too ({e}): {state}. {RESTORE_REQUIRED}")
        }
    };
    match cause {
        StepError::Hung { what, timeout, .. } => BindError::Hung { what, timeout, state },
        StepError::Failed { what, cause } => BindError::Failed { what, cause, state },
    }
}

/// After a failed return: put every function that was on vfio-pci before the return and
/// now has no driver back on vfio-pci (override, probe, check), so that none is left
/// driverless — the host driver refused it, or its probe failed. A function whose write
/// hung is left alone: the kernel is still in the middle of it. Returns what it did, for
/// the record and the message, or None when no function needed it.
fn back_to_vfio(
    ex: &mut Executor<'_>,
    before: &Gpu,
    cause: &StepError,
    record: &mut RestoreRecord,
) -> Option<String> {
    let hung = match cause {
        StepError::Hung { what, .. } => before
            .functions
            .iter()
            .find(|f| what.contains(&f.address.to_string()))
            .map(|f| f.address),
        StepError::Failed { .. } => None,
    };
    let driverless: Vec<PciAddress> = before
        .functions
        .iter()
        .filter(|f| f.driver.as_deref() == Some(VFIO) && Some(f.address) != hung)
        .map(|f| f.address)
        .filter(|a| ex.driver_of(*a).is_none())
        .collect();
    if driverless.is_empty() {
        return None;
    }
    let mut notes = Vec::new();
    for function in driverless {
        let steps = [
            Step::SetOverride {
                function,
                driver: Some(VFIO.into()),
            },
            Step::Probe { function },
            Step::Verify {
                function,
                expect: Expect::Driver(VFIO.into()),
            },
        ];
        let mut done = Vec::new();
        notes.push(match ex.run(&steps, record, &mut done) {
            Ok(()) => format!("{function} was put back on vfio-pci rather than left with no driver"),
            Err(e) => format!(
                "{function} has no driver: putting it back on vfio-pci failed too ({}: {})",
                e.what(),
                step_cause(&e)
            ),
        });
    }
    Some(notes.join("; "))
}

/// `s` with its first letter in upper case, to start a sentence.
fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The hung writer of a failed step: its pid and start time.
fn hung_pid(e: &StepError) -> Option<(i32, Option<u64>)> {
    match e {
        StepError::Hung { pid, start, .. } => Some((*pid, *start)),
        StepError::Failed { .. } => None,
    }
}

/// What a person does about a GPU left between drivers.
const RESTORE_REQUIRED: &str =
    "Restore required: `handoff rebind --force` (gpu-rebind-nvidia) returns it to the host.";

fn step_cause(e: &StepError) -> String {
    match e {
        StepError::Hung { timeout, .. } => format!("did not return after {} s", timeout.as_secs()),
        StepError::Failed { cause, .. } => cause.clone(),
    }
}

/// The graphics function's recorded driver, the fallback for functions not in the record.
fn record_host_driver(r: &RestoreRecord) -> String {
    r.functions
        .first()
        .and_then(|f| f.driver.clone())
        .unwrap_or_default()
}

/// Whether any function is away from the host: on vfio-pci, on no driver, with a
/// `driver_override` set, or locked (its override unknown).
fn is_away(g: &Gpu) -> bool {
    g.functions.iter().any(|f| {
        f.driver.is_none() || f.driver.as_deref() == Some(VFIO) || f.driver_override.is_some() || f.locked
    })
}

/// What returning the GPU to the host would do, as [`return_to_host`] plans it. Without a
/// restore record only a GPU that is away is touched: one on host drivers with no record
/// is not handoff's to move (it may be the desktop's iGPU, busy, with [gpu] address or
/// host_driver wrong), so the plan is empty — nothing to do.
pub fn return_plan(g: &Gpu, record: Option<&RestoreRecord>, host_driver: &str) -> Vec<Step> {
    if record.is_none() && !is_away(g) {
        return Vec::new();
    }
    plan::to_host(g, record, host_driver)
}

/// The first unbind of a function from a host driver (not vfio-pci) in `steps`: that takes
/// the function from whatever uses it on the host, so the holders are checked first.
fn unbind_from_host_driver(steps: &[Step]) -> Option<(PciAddress, &str)> {
    steps.iter().find_map(|s| match s {
        Step::Unbind { function, driver } if driver != VFIO => Some((*function, driver.as_str())),
        _ => None,
    })
}

/// Return every function to the driver the restore record names (or, without a record,
/// the graphics function to `host_driver`). The record is removed only when all are home.
/// Without a record a GPU already on host drivers is left alone ([`return_plan`]); before
/// any unbind from a host driver the holders are checked, and any holder means no change.
/// Takes the GPU's lock for the whole handoff.
pub fn return_to_host(
    host: &Host,
    address: PciAddress,
    host_driver: &str,
    timeout: Duration,
    progress: &mut dyn FnMut(&Step),
) -> Result<Outcome, BindError> {
    return_to_host_with(
        host,
        address,
        host_driver,
        timeout,
        VfioUsers::Wait(timeout),
        progress,
    )
}

/// [`return_to_host`], saying what to do about VFIO users.
pub fn return_to_host_with(
    host: &Host,
    address: PciAddress,
    host_driver: &str,
    timeout: Duration,
    vfio: VfioUsers,
    progress: &mut dyn FnMut(&Step),
) -> Result<Outcome, BindError> {
    let lock = GpuLock::acquire(host, address, lock::wait_for(timeout))?;
    return_to_host_locked(&lock, host, host_driver, timeout, vfio, progress)
}

/// [`return_to_host`] for a caller that already holds the GPU's lock.
///
/// Before the first unbind from vfio-pci it looks for processes holding the GPU's VFIO
/// group ([`VfioUsers`]): an unbind from vfio-pci blocks in the kernel while a VFIO device
/// fd is open, and QEMU's exit races libvirt's release hook. If they stay, nothing changes:
/// every function stays on vfio-pci, the record turns `stuck` naming them, and the error
/// says who and what to do. A function that a failed step left with no driver is put back
/// on vfio-pci, never left driverless.
pub fn return_to_host_locked(
    lock: &GpuLock,
    host: &Host,
    host_driver: &str,
    timeout: Duration,
    vfio: VfioUsers,
    progress: &mut dyn FnMut(&Step),
) -> Result<Outcome, BindError> {
    let address = lock.gpu();
    let g = gpu::read_gpu(host, address)?;
    if g.owner == Owner::Absent {
        return Err(BindError::Absent(address));
    }
    let loaded = RestoreRecord::load(host, address)?;
    // A write of an earlier handoff is still blocked in the kernel: whatever is done now,
    // it may land afterwards and undo it (an unbind finishing after the GPU was declared
    // home leaves it unbound with no record). Change nothing until it has returned.
    if let Some(r) = &loaded
        && let Some(pid) = r.hung_writer
        && r.hung_writer_alive()
    {
        return Err(BindError::RestoreRequired {
            gpu: address,
            why: format!(
                "{} (writer process {pid} is still blocked in the kernel; \
                 nothing was changed — once whatever holds the GPU lets go, try again)",
                r.problem
                    .as_deref()
                    .unwrap_or("a write of the earlier handoff hung")
            ),
        });
    }
    refuse_if_locked(&g)?;
    let mut record = loaded.clone().unwrap_or_else(|| RestoreRecord::new(&g, None));
    let steps = return_plan(&g, loaded.as_ref(), host_driver);
    if steps.is_empty() {
        return Ok(Outcome::default());
    }
    if let Some((function, driver)) = unbind_from_host_driver(&steps) {
        let nodes = holders::gpu_nodes(host, &g);
        let scan = holders::scan(host, &g, &nodes);
        let verdict = scan.verdict();
        if verdict != holders::Verdict::Clear {
            return Err(BindError::HeldOnHost {
                gpu: address,
                function,
                driver: driver.to_owned(),
                holders: scan.holders,
                framebuffers: scan.framebuffers,
                unchecked: verdict.unchecked().to_vec(),
            });
        }
    }
    let unbinds_vfio = steps
        .iter()
        .any(|s| matches!(s, Step::Unbind { driver, .. } if driver == VFIO));
    if let (true, VfioUsers::Wait(wait)) = (unbinds_vfio, vfio) {
        let (users, group) = vfio_users_after(host, &g, wait);
        if !users.is_empty() {
            // Only a record of ours is updated: without one, a record made now would
            // note vfio-pci as where the functions came from.
            if loaded.is_some() {
                record.phase = Phase::Stuck;
                record.problem = Some(vfio_in_use_problem(&users, &group));
                record.save(host)?;
            }
            return Err(BindError::VfioInUse {
                gpu: address,
                users,
                waited: wait,
                group,
            });
        }
    }
    if loaded.is_some() {
        record.phase = Phase::Returning;
        record.save(host)?;
    }
    let mut done = Vec::new();
    let mut ex = Executor {
        host,
        timeout,
        progress,
    };
    match ex.run(&steps, &mut record, &mut done) {
        Ok(()) => Ok(Outcome { steps: done }),
        Err(e) => {
            record.phase = Phase::Stuck;
            record.problem = Some(format!("{}: {}", e.what(), step_cause(&e)));
            record.set_hung_writer(hung_pid(&e));
            let back = back_to_vfio(&mut ex, &g, &e, &mut record);
            if let Some(note) = &back {
                record.problem = Some(format!("{}; {note}", record.problem.take().unwrap_or_default()));
            }
            record.save(host)?;
            let state = match back {
                Some(note) => format!(
                    "{}; {}. {RESTORE_REQUIRED}",
                    capitalised(&note),
                    describe_state(host, address)
                ),
                None => format!("{}. {RESTORE_REQUIRED}", describe_state(host, address)),
            };
            Err(match e {
                StepError::Hung { what, timeout, .. } => BindError::Hung { what, timeout, state },
                StepError::Failed { what, cause } => BindError::Failed { what, cause, state },
            })
        }
    }
}
