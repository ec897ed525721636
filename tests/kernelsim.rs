//! The simulated kernel through its FUSE mount, written to with plain `std::fs::write`
//! and shell children, the way the binding engine and the libvirt hook will.
//!
//! Run with `cargo test` as root with `/dev/fuse`. Under `CI=true`
//! a missing `/dev/fuse` fails; elsewhere these tests skip, saying why.

use std::fs;
use std::io;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use handoff::simulated_tree::SimSpec;
use handoff_kernelsim::{Errno, FaultRule, FileKind, Release, WriteResult, read_log, send_command};
use handoff_test_support::fuse_gpu::{AUDIO, Sim, USB, mount, workstation};

fn write(path: impl AsRef<Path>, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

fn errno_of(r: io::Result<()>) -> Option<Errno> {
    r.err().and_then(|e| e.raw_os_error()).map(Errno)
}

fn is_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// A shell child writing to the mount. Dropping it kills it, releases any hung write
/// (a hung writer can't die before that) and reaps it.
struct Writer<'a> {
    child: Child,
    sim: &'a Sim,
}

impl<'a> Writer<'a> {
    fn spawn(sim: &'a Sim, script: &str) -> Writer<'a> {
        let child = Command::new("sh").arg("-c").arg(script).spawn().unwrap();
        Writer { child, sim }
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        self.sim.mount.release(Release::Fail(Errno::EIO));
        let _ = self.child.wait();
    }
}

const GPU: &str = "0000:01:00.0";

#[test]
fn override_unbind_probe_moves_the_gpu_to_vfio_and_back_to_nvidia() {
    let Some(sim) = workstation() else { return };
    let dev = sim.device(GPU);
    let sys = sim.sys();
    assert_eq!(
        fs::read_link(dev.join("driver")).unwrap(),
        Path::new("../../../../bus/pci/drivers/nvidia")
    );

    write(dev.join("driver_override"), "vfio-pci\n").unwrap();
    assert_eq!(
        fs::read_to_string(dev.join("driver_override")).unwrap(),
        "vfio-pci\n"
    );
    write(dev.join("driver/unbind"), GPU).unwrap();
    assert_eq!(sim.driver(GPU), None);
    assert!(!sys.join("bus/pci/drivers/nvidia").join(GPU).exists());
    write(sys.join("bus/pci/drivers_probe"), GPU).unwrap();
    assert_eq!(
        fs::read_link(dev.join("driver")).unwrap(),
        Path::new("../../../../bus/pci/drivers/vfio-pci")
    );
    let through_driver = sys.join("bus/pci/drivers/vfio-pci").join(GPU);
    assert_eq!(
        fs::read_to_string(through_driver.join("class")).unwrap(),
        "0x030000\n"
    );
    assert!(
        fs::read_to_string(dev.join("uevent"))
            .unwrap()
            .starts_with("DRIVER=vfio-pci\n")
    );

    write(dev.join("driver_override"), "\n").unwrap();
    assert_eq!(
        fs::read_to_string(dev.join("driver_override")).unwrap(),
        "(null)\n"
    );
    write(dev.join("driver/unbind"), GPU).unwrap();
    write(sys.join("bus/pci/drivers_probe"), GPU).unwrap();
    assert_eq!(sim.driver(GPU).as_deref(), Some("nvidia"));

    let s = |f: &str, v: &str| (f.to_owned(), v.to_owned());
    assert_eq!(
        sim.short_log(),
        vec![
            s("0000:01:00.0/driver_override", "vfio-pci"),
            s("nvidia/unbind", GPU),
            s("drivers_probe", GPU),
            s("0000:01:00.0/driver_override", ""),
            s("vfio-pci/unbind", GPU),
            s("drivers_probe", GPU),
        ]
    );
    let text = read_log(sys).unwrap();
    assert!(
        text.starts_with("1 0000:01:00.0/driver_override \"vfio-pci\\n\" ok\n"),
        "{text}"
    );
}

#[test]
fn bind_while_bound_is_ebusy_and_unbind_from_another_driver_is_enodev() {
    let Some(sim) = workstation() else { return };
    let drivers = sim.sys().join("bus/pci/drivers");
    assert_eq!(
        errno_of(write(drivers.join("nvidia/bind"), GPU)),
        Some(Errno::EBUSY)
    );
    assert_eq!(
        errno_of(write(drivers.join("i915/unbind"), GPU)),
        Some(Errno::ENODEV)
    );
    assert_eq!(
        errno_of(write(drivers.join("nvidia/unbind"), "0000:09:00.0")),
        Some(Errno::ENODEV)
    );
    write(drivers.join("nvidia/unbind"), GPU).unwrap();
    assert_eq!(
        errno_of(write(drivers.join("vfio-pci/bind"), GPU)),
        Some(Errno::ENODEV)
    );
    write(drivers.join("nvidia/bind"), GPU).unwrap();
    assert_eq!(sim.driver(GPU).as_deref(), Some("nvidia"));
    let results: Vec<WriteResult> = sim.mount.log().iter().map(|r| r.result).collect();
    assert_eq!(results[0], WriteResult::Err(Errno::EBUSY));
    assert_eq!(results[5], WriteResult::Ok);
}

#[test]
fn injected_errors_surface_as_the_writers_io_error_without_effect() {
    let Some(sim) = workstation() else { return };
    let dev = sim.device(GPU);
    let sys = sim.sys();
    sim.mount
        .inject(FaultRule::fail(FileKind::Unbind, Errno::EBUSY).device("0000:01:00.0".parse().unwrap()));
    sim.mount
        .inject(FaultRule::fail(FileKind::DriverOverride, Errno::EINVAL));
    sim.mount
        .inject(FaultRule::fail(FileKind::DriversProbe, Errno::ENODEV).always());

    // The audio function isn't the one the rule names.
    write(sys.join("bus/pci/drivers/snd_hda_intel/unbind"), "0000:01:00.1").unwrap();
    assert_eq!(
        errno_of(write(dev.join("driver/unbind"), GPU)),
        Some(Errno::EBUSY)
    );
    assert_eq!(sim.driver(GPU).as_deref(), Some("nvidia"));
    assert_eq!(
        errno_of(write(dev.join("driver_override"), "vfio-pci")),
        Some(Errno::EINVAL)
    );
    assert_eq!(
        fs::read_to_string(dev.join("driver_override")).unwrap(),
        "(null)\n"
    );
    for _ in 0..2 {
        assert_eq!(
            errno_of(write(sys.join("bus/pci/drivers_probe"), "0000:01:00.1")),
            Some(Errno::ENODEV)
        );
    }
    assert_eq!(sim.driver("0000:01:00.1"), None);
    // "once" rules are spent.
    write(dev.join("driver/unbind"), GPU).unwrap();
    write(dev.join("driver_override"), "vfio-pci").unwrap();

    // The same through the control file, from another process.
    send_command(sys, "fail bind EBUSY nvidia").unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo {GPU} > {}/bus/pci/drivers/nvidia/bind",
            sys.display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    // dash reports every failed write as "I/O error"; the log has the errno.
    assert_eq!(
        sim.mount.log().last().unwrap().result,
        WriteResult::Err(Errno::EBUSY)
    );
    assert!(send_command(sys, "frobnicate").is_err());
}

#[test]
fn a_hung_unbind_blocks_its_writer_and_driver_override_readers_until_released_while_other_reads_go_on() {
    let Some(sim) = workstation() else { return };
    let sys = sim.sys().to_owned();
    sim.mount
        .inject(FaultRule::hang(FileKind::Unbind).device(GPU.parse().unwrap()));
    let mut writer = Writer::spawn(
        &sim,
        &format!(
            "echo {GPU} > {}/bus/pci/devices/{GPU}/driver/unbind",
            sys.display()
        ),
    );
    assert!(
        sim.mount.wait_for_hung(1, Duration::from_secs(5)),
        "the write never arrived"
    );
    assert!(
        writer.wait_timeout(Duration::from_millis(300)).is_none(),
        "the writer should block"
    );

    // Like the kernel inside nvidia's remove callback: the driver links are gone already.
    assert_eq!(sim.driver(GPU), None);
    assert!(!sys.join(format!("bus/pci/drivers/nvidia/{GPU}")).exists());
    let uevent = fs::read_to_string(sim.device(GPU).join("uevent")).unwrap();
    assert!(!uevent.contains("DRIVER="), "{uevent}");
    // Everyone else keeps being served, in this process and in others.
    assert_eq!(fs::read_dir(sys.join("bus/pci/devices")).unwrap().count(), 6);
    let cat = Command::new("cat")
        .arg(sys.join("bus/pci/devices/0000:01:00.1/class"))
        .output()
        .unwrap();
    assert_eq!(cat.stdout, b"0x040300\n");
    write(sys.join("bus/pci/drivers/snd_hda_intel/unbind"), "0000:01:00.1").unwrap();
    assert!(
        fs::read_to_string(sys.join(".simctl"))
            .unwrap()
            .contains("hung 1 ")
    );
    // drivers_probe sees dev->driver still set inside the kernel: it returns at once
    // having done nothing.
    write(sys.join("bus/pci/drivers_probe"), GPU).unwrap();
    assert_eq!(sim.driver(GPU), None);
    // A write that needs the device's lock blocks its writer too.
    let mut second = Writer::spawn(
        &sim,
        &format!(
            "echo vfio-pci > {}/bus/pci/devices/{GPU}/driver_override",
            sys.display()
        ),
    );
    assert!(
        sim.mount.wait_for_blocked(1, Duration::from_secs(5)),
        "the override write never arrived"
    );
    assert!(
        second.wait_timeout(Duration::from_millis(300)).is_none(),
        "the override writer should block behind the hung unbind"
    );
    let ctl = fs::read_to_string(sys.join(".simctl")).unwrap();
    assert!(ctl.contains(&format!("(waits for {GPU})")), "{ctl}");
    // Reading the locked device's driver_override blocks too (its show takes
    // device_lock); the GPU's other attributes and the other functions' overrides don't.
    let seen = sim.tmp.path().join("override-seen");
    let mut reader = Writer::spawn(
        &sim,
        &format!(
            "cat {}/bus/pci/devices/{GPU}/driver_override > {}",
            sys.display(),
            seen.display()
        ),
    );
    assert!(
        sim.mount.wait_for_blocked_reads(1, Duration::from_secs(5)),
        "the override read never arrived"
    );
    assert!(
        reader.wait_timeout(Duration::from_millis(300)).is_none(),
        "the override reader should block behind the hung unbind"
    );
    assert_eq!(
        fs::read_to_string(sim.device(GPU).join("vendor")).unwrap(),
        "0x10de\n"
    );
    assert_eq!(
        fs::read_to_string(sim.device("0000:01:00.1").join("driver_override")).unwrap(),
        "(null)\n"
    );

    sim.mount.release(Release::Complete);
    for w in [&mut writer, &mut second, &mut reader] {
        let status = w
            .wait_timeout(Duration::from_secs(5))
            .expect("released writers exit");
        assert!(status.success());
    }
    assert_eq!(sim.driver(GPU), None, "no re-probe after an unbind");
    assert_eq!(
        fs::read_to_string(sim.device(GPU).join("driver_override")).unwrap(),
        "vfio-pci\n"
    );
    // The reader got the lock after the override write that was waiting before it.
    assert_eq!(fs::read_to_string(&seen).unwrap(), "vfio-pci\n");
    assert_eq!(sim.mount.log()[0].result, WriteResult::Ok);
    assert!(sim.mount.blocked().is_empty());
    assert_eq!(sim.mount.blocked_reads(), 0);
}

#[test]
fn a_killed_hung_writer_dies_once_released_and_control_works_across_processes() {
    let Some(sim) = workstation() else { return };
    let sys = sim.sys().to_owned();
    send_command(&sys, "hang unbind nvidia always").unwrap();
    let mut first = Writer::spawn(
        &sim,
        &format!("echo {GPU} > {}/bus/pci/drivers/nvidia/unbind", sys.display()),
    );
    assert!(sim.mount.wait_for_hung(1, Duration::from_secs(5)));
    // Like a write the kernel is already servicing, SIGKILL waits for the write to end.
    first.child.kill().unwrap();
    assert!(first.wait_timeout(Duration::from_millis(300)).is_none());
    let ctl = Command::new("sh")
        .arg("-c")
        .arg(format!("echo 'release EBUSY' > {}/.simctl", sys.display()))
        .status()
        .unwrap();
    assert!(ctl.success());
    let status = first
        .wait_timeout(Duration::from_secs(5))
        .expect("killed writer dies once released");
    assert!(!status.success());
    // The kernel ignores what nvidia's remove returns: released "with EBUSY", the device
    // is unbound all the same and the write reported as done.
    assert_eq!(sim.driver(GPU), None);

    // "always": the next one hangs too; dropping the writer cleans up after a failure.
    let _second = Writer::spawn(
        &sim,
        &format!("echo {GPU} > {}/bus/pci/drivers/nvidia/unbind", sys.display()),
    );
    assert!(sim.mount.wait_for_hung(1, Duration::from_secs(5)));
    let log = read_log(&sys).unwrap();
    assert!(log.contains("nvidia/unbind \"0000:01:00.0\\n\" ok"), "{log}");
    assert!(log.contains("nvidia/unbind \"0000:01:00.0\\n\" hung"), "{log}");
}

#[test]
fn remove_and_rescan_bring_functions_back_probed_without_override() {
    let Some(sim) = workstation() else { return };
    let sys = sim.sys();
    write(sim.device("0000:01:00.1").join("driver_override"), "vfio-pci").unwrap();
    write(sim.device("0000:01:00.1").join("remove"), "1\n").unwrap();
    assert!(!sim.device("0000:01:00.1").exists());
    assert!(!sys.join("bus/pci/drivers/snd_hda_intel/0000:01:00.1").exists());
    assert!(!sys.join("kernel/iommu_groups/13/devices/0000:01:00.1").exists());
    write(sys.join("bus/pci/rescan"), "1").unwrap();
    assert_eq!(sim.driver("0000:01:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(
        fs::read_to_string(sim.device("0000:01:00.1").join("driver_override")).unwrap(),
        "(null)\n"
    );
    assert!(
        sys.join("kernel/iommu_groups/13/devices/0000:01:00.1/vendor")
            .exists()
    );
}

#[test]
fn vfio_pci_takes_overridden_devices_once_loaded() {
    let mut spec = SimSpec::workstation();
    spec.drivers.retain(|d| d != "vfio-pci");
    let Some(sim) = mount(spec) else { return };
    let sys = sim.sys();
    let dev = sim.device(GPU);
    write(dev.join("driver_override"), "vfio-pci").unwrap();
    write(dev.join("driver/unbind"), GPU).unwrap();
    write(sys.join("bus/pci/drivers_probe"), GPU).unwrap();
    assert_eq!(
        sim.driver(GPU),
        None,
        "an override naming an unloaded driver leaves it unbound"
    );
    send_command(sys, "modprobe vfio-pci").unwrap();
    assert_eq!(sim.driver(GPU).as_deref(), Some("vfio-pci"));
    write(sys.join("bus/pci/drivers/vfio-pci/new_id"), "10de 1aef").unwrap();
    // new_id doesn't take bound devices.
    assert_eq!(sim.driver("0000:01:00.1").as_deref(), Some("snd_hda_intel"));
}

#[test]
fn the_mount_goes_away_on_drop_even_when_a_test_panics() {
    let Some(sim) = workstation() else { return };
    let path = sim.sys().to_owned();
    let root = sim.tmp.path().to_owned();
    assert!(is_mounted(&path));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _sim = sim;
        panic!("a failing test");
    }));
    assert!(r.is_err());
    assert!(!is_mounted(&path), "{} is still mounted", path.display());
    assert!(!root.exists(), "the temp dir should be gone with the mount");
}

/// Run `f` on a thread and return what it returns, or None if it has not returned after
/// `timeout`: a deadlock fails the test instead of hanging it (the thread is left behind).
fn within<T: Send + 'static>(timeout: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(timeout).ok()
}

/// The names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The proof that the simulator's DRM lifecycle cannot deadlock the way its first version
/// did (it read /proc inside the FUSE handler while a thread of the same process was stuck
/// in a write to the mount): here a write of this very process hangs in the mount, this
/// process has the GPU's card open, and the GPU goes to vfio-pci and back.
#[test]
fn a_drm_rebind_with_the_card_open_and_a_hung_write_in_this_process_does_not_block() {
    let Some(sim) = workstation() else { return };
    let sys = sim.sys().to_owned();
    sim.mount
        .inject(FaultRule::hang(FileKind::Unbind).device(USB.parse().unwrap()));
    let hung = {
        let p = sys.join("bus/pci/drivers/xhci_hcd/unbind");
        std::thread::spawn(move || fs::write(p, USB))
    };
    assert!(
        sim.mount.wait_for_hung(1, Duration::from_secs(5)),
        "the USB unbind never arrived"
    );
    // DRM hot-unplug: the DRM driver's unbind does not wait for the card's holders.
    let card = fs::File::open(sim.dev("dri/card1")).unwrap();
    let over = format!("bus/pci/devices/{GPU}/driver_override");
    let steps = [
        (over.clone(), "vfio-pci"),
        ("bus/pci/drivers/nvidia/unbind".to_owned(), GPU),
        ("bus/pci/drivers_probe".to_owned(), GPU),
        (over, "\n"),
        ("bus/pci/drivers/vfio-pci/unbind".to_owned(), GPU),
        ("bus/pci/drivers_probe".to_owned(), GPU),
    ];
    let root = sys.clone();
    let done = within(Duration::from_secs(20), move || {
        for (file, value) in steps {
            fs::write(root.join(&file), value).map_err(|e| format!("{file}: {e}"))?;
        }
        Ok::<(), String>(())
    });
    assert_eq!(done, Some(Ok(())), "the round trip returned");
    assert_eq!(sim.driver(GPU).as_deref(), Some("nvidia"));
    // card1 is still open here: its node is gone, its minor taken, the card is card2.
    assert_eq!(names(&sim.device(GPU).join("drm")), ["card2", "renderD129"]);
    assert!(!sim.dev("dri/card1").exists());
    assert!(sim.dev("dri/card2").exists());
    assert_eq!(
        fs::read_link(sim.dev("dri/by-path/pci-0000:01:00.0-card")).unwrap(),
        Path::new("../card2")
    );
    drop(card);
    sim.mount.release(Release::Complete);
    hung.join().unwrap().unwrap();
    assert_eq!(sim.driver(USB), None);
}

/// snd_hda_intel's unbind on the real kernel: the card is disconnected at once, then the
/// writer waits, unkillable, until the last holder of a node of that card closes it. Holder
/// and writer are in this process, as in the deadlock above.
#[test]
fn a_sound_unbind_waits_for_the_holder_of_its_control_node_and_ends_when_it_closes() {
    let Some(sim) = workstation() else { return };
    let sys = sim.sys().to_owned();
    let control = fs::File::open(sim.dev("snd/controlC1")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let p = sys.join("bus/pci/drivers/snd_hda_intel/unbind");
        std::thread::spawn(move || {
            let r = fs::write(p, AUDIO);
            let _ = tx.send(());
            r
        })
    };
    assert!(
        sim.mount.wait_for_hung(1, Duration::from_secs(5)),
        "the unbind waits for controlC1's holder"
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "its writer is blocked"
    );
    assert!(!sim.dev("snd/controlC1").exists(), "disconnected first");
    assert!(names(&sim.device(AUDIO).join("sound")).is_empty());
    assert_eq!(sim.driver(AUDIO), None);
    // The rest of the GPU keeps working meanwhile (a DRM round trip of the same process).
    write(
        sys.join(format!("bus/pci/devices/{GPU}/driver_override")),
        "vfio-pci",
    )
    .unwrap();
    write(sys.join("bus/pci/drivers/nvidia/unbind"), GPU).unwrap();
    write(sys.join("bus/pci/drivers_probe"), GPU).unwrap();
    assert_eq!(sim.driver(GPU).as_deref(), Some("vfio-pci"));

    drop(control);
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "the unbind ends once its holder closed the node"
    );
    writer.join().unwrap().unwrap();
    assert!(sim.mount.hung().is_empty());
    assert_eq!(sim.driver(AUDIO), None, "no re-probe after an unbind");
    write(sys.join("bus/pci/drivers_probe"), AUDIO).unwrap();
    assert_eq!(sim.driver(AUDIO).as_deref(), Some("snd_hda_intel"));
    assert!(sim.dev("snd/controlC1").exists(), "the card is back as card1");
}
