//! The engine on a real kernel: `handoff` and `handoff-block`, as built, inside a QEMU guest
//! running a stock Debian kernel with an emulated IOMMU and a GPU-shaped slot (VGA on
//! bochs-drm at 01:00.0, HDA on snd_hda_intel at 01:00.1, one IOMMU group). The PCI core,
//! the drivers, the IOMMU group, the uevents and the hung unbind are the kernel's own.
//!
//! One boot runs every scenario (`tests/kernel/scenarios.sh`; a boot is most of the cost);
//! each test below checks one scenario in its transcript. The harness is
//! `tests/kernel/mod.rs`; the image is built by `scripts/guest-image.sh` (Debian's
//! packages through apt, cached under /var/cache/handoff-test/guest). Without QEMU, cpio
//! or apt's packages the tests skip saying why; under `CI=true` they fail.

mod kernel;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use kernel::{GuestFile, Transcript};

const GPU: &str = "0000:01:00.0";
const RECORD: &str = "restore-0000:01:00.0.json";
/// The guest's `[gpu] watchdog_s` (tests/kernel/config.toml).
const WATCHDOG_S: u64 = 3;
/// Boot plus every scenario took ~60 s on two busy cores; the deadline leaves room.
const DEADLINE: Duration = Duration::from_secs(300);

/// The one boot's transcript, or None when the test is skipped (said on stderr).
fn guest() -> Option<&'static Transcript> {
    static BOOT: OnceLock<Result<Transcript, (bool, String)>> = OnceLock::new();
    let r = BOOT.get_or_init(|| {
        let image = kernel::image().map_err(|e| (true, e))?;
        let handoff = Path::new(handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff")));
        let block = handoff_test_support::bins::sibling(
            handoff.parent().unwrap(),
            "handoff-block",
            "handoff-block",
            &["src", "i3blocks/src"],
        );
        let files = [
            ("/init", GuestFile::Text(include_str!("kernel/init.sh"), 0o755)),
            (
                "/scenarios.sh",
                GuestFile::Text(include_str!("kernel/scenarios.sh"), 0o755),
            ),
            (
                "/etc/handoff/config.toml",
                GuestFile::Text(include_str!("kernel/config.toml"), 0o644),
            ),
            (
                "/etc/handoff/win11.xml",
                GuestFile::Text(include_str!("kernel/win11.xml"), 0o644),
            ),
            ("/bin/handoff", GuestFile::Binary(handoff)),
            ("/bin/handoff-block", GuestFile::Binary(&block)),
        ];
        let t = kernel::boot(&image, &files, DEADLINE).map_err(|e| (false, e))?;
        // The whole console, for reading what the guest did (opt-in: tests write nowhere
        // but their temp dirs unless asked).
        if let Some(log) = std::env::var_os("HANDOFF_GUEST_LOG") {
            std::fs::write(&log, t.serial.join("\n") + "\n").expect("writing HANDOFF_GUEST_LOG");
        }
        eprintln!(
            "real kernel: boot to drivers ready {:.1} s, all scenarios done {:.1} s",
            t.boot.as_secs_f64(),
            t.total.as_secs_f64()
        );
        Ok(t)
    });
    match r {
        Ok(t) => Some(t),
        Err((true, why)) => {
            kernel::missing(why);
            None
        }
        Err((false, why)) => panic!("{why}"),
    }
}

fn json(t: &Transcript, label: &str) -> serde_json::Value {
    let c = t.cmd(label);
    serde_json::from_str(&c.text()).unwrap_or_else(|e| panic!("{label}: not JSON ({e}):\n{}", c.text()))
}

#[test]
fn the_slot_is_one_iommu_group_on_its_host_drivers_at_boot() {
    let Some(t) = guest() else { return };
    assert_eq!(
        t.fact("boot.group0"),
        t.fact("boot.group1"),
        "both functions in one group"
    );
    assert_eq!(t.fact("boot.group_devices"), "0000:01:00.0 0000:01:00.1");
    assert_eq!(t.fact("boot.driver0"), "bochs-drm");
    assert_eq!(t.fact("boot.driver1"), "snd_hda_intel");
    assert_eq!(t.fact("boot.dri"), "card0", "bochs-drm has no render node");
    assert!(t.fact("boot.snd").contains("controlC0"), "{}", t.fact("boot.snd"));
    // What a never-set driver_override reads as on this kernel (the simulator agrees).
    assert_eq!(t.fact("boot.override1"), "(null)");
}

#[test]
fn hook_refuses_while_a_process_holds_the_audio_control_node() {
    let Some(t) = guest() else { return };
    let c = t.cmd("snd_holder.prepare");
    let text = c.text();
    assert_eq!(c.rc, 1, "prepare must refuse:\n{text}");
    let pid = t.fact("snd_holder.pid");
    assert!(
        text.contains(&format!("not handing GPU {GPU} to win11: 1 process uses it")),
        "{text}"
    );
    assert!(
        text.contains(pid) && text.contains("sleep"),
        "names the holder (pid {pid}):\n{text}"
    );
    assert!(text.contains("/dev/snd/controlC0"), "names the node:\n{text}");
    assert!(text.contains("Nothing was changed"), "{text}");
    for step in ["after", "released"] {
        assert_eq!(t.fact(&format!("snd_holder.{step}.driver0")), "bochs-drm");
        assert_eq!(t.fact(&format!("snd_holder.{step}.driver1")), "snd_hda_intel");
        assert_eq!(t.fact(&format!("snd_holder.{step}.vfio")), "");
        assert!(!t.fact(&format!("snd_holder.{step}.run")).contains(RECORD));
    }
    // libvirt's release after the refused start leaves the GPU where it is.
    assert_eq!(
        t.cmd("snd_holder.release").rc,
        0,
        "{}",
        t.cmd("snd_holder.release").text()
    );
}

#[test]
fn hook_refuses_while_a_process_holds_the_drm_card() {
    let Some(t) = guest() else { return };
    let c = t.cmd("drm_holder.prepare");
    let text = c.text();
    assert_eq!(c.rc, 1, "prepare must refuse:\n{text}");
    assert!(
        text.contains(t.fact("drm_holder.pid")),
        "names the holder:\n{text}"
    );
    assert!(text.contains("/dev/dri/card0"), "names the node:\n{text}");
    assert_eq!(t.fact("drm_holder.after.driver0"), "bochs-drm");
    assert_eq!(t.fact("drm_holder.after.driver1"), "snd_hda_intel");
}

#[test]
fn prepare_hands_both_functions_to_vfio_and_release_brings_them_home() {
    let Some(t) = guest() else { return };
    let c = t.cmd("handoff.prepare");
    assert_eq!(c.rc, 0, "prepare:\n{}", c.text());
    assert_eq!(t.fact("handoff.prepared.driver0"), "vfio-pci");
    assert_eq!(t.fact("handoff.prepared.driver1"), "vfio-pci");
    let group = t.fact("boot.group0");
    assert!(
        t.fact("handoff.prepared.vfio")
            .split_whitespace()
            .any(|g| g == group),
        "/dev/vfio/{group} present: {}",
        t.fact("handoff.prepared.vfio")
    );
    assert!(t.fact("handoff.prepared.run").contains(RECORD));
    assert_eq!(
        t.fact("handoff.prepared.dri"),
        "",
        "the card's nodes went with bochs-drm"
    );
    let s = json(t, "handoff.status_vfio");
    assert_eq!(s["gpu"]["owner"], "vfio", "{s}");
    // The group is viable for a VM: status sees every member of group 3 on vfio-pci (the
    // kernel's own VFIO_GROUP_GET_STATUS needs an ioctl no shell tool in the guest makes).
    let g = &s["gpu"]["iommu_group"];
    assert_eq!(g["id"].to_string(), group, "{s}");
    let members = g["members"].as_array().expect("group members");
    assert_eq!(members.len(), 2, "{s}");
    assert!(members.iter().all(|m| m["driver"] == "vfio-pci"), "{s}");

    let c = t.cmd("handoff.release");
    assert_eq!(c.rc, 0, "release:\n{}", c.text());
    assert_eq!(t.fact("handoff.released.driver0"), "bochs-drm");
    assert_eq!(t.fact("handoff.released.driver1"), "snd_hda_intel");
    assert!(!t.fact("handoff.released.run").contains(RECORD), "record gone");
    // A cleared override reads "(null)" again, as one never set does.
    assert_eq!(t.fact("handoff.override1"), "(null)");
    assert!(t.fact("handoff.released.snd").contains("controlC0"));
    let b = json(t, "handoff.blockers_home");
    assert_eq!(t.cmd("handoff.blockers_home").rc, 0, "{b}");
}

#[test]
fn a_card_held_through_the_handoff_comes_back_as_card1_and_its_holder_is_still_found() {
    let Some(t) = guest() else { return };
    // With nothing holding it, the returned card takes card0 again.
    assert_eq!(t.fact("handoff.card"), "card0");
    // A holder the scan cannot see (card0 opened through a node of its own) does not stop
    // bochs-drm's unbind (DRM hot-unplug): the handoff goes through, and since the old
    // minor is still open the card comes back as card1.
    let c = t.cmd("hotunplug.prepare");
    assert_eq!(c.rc, 0, "{}", c.text());
    assert_eq!(t.fact("hotunplug.prepared.driver0"), "vfio-pci");
    // The held card's node went at the unbind all the same (devtmpfs removes it with the
    // class device); only its minor stays taken. The simulator does the same.
    assert_eq!(t.fact("hotunplug.prepared.dri"), "");
    assert_eq!(t.cmd("hotunplug.release").rc, 0);
    assert_eq!(t.fact("hotunplug.released.driver0"), "bochs-drm");
    assert_eq!(t.fact("hotunplug.card"), "card1");
    assert_eq!(t.fact("hotunplug.released.dri"), "card1");
    // The surfaces find a holder of the card under its new name.
    let s = json(t, "hotunplug.status_held");
    let pid: u64 = t.fact("hotunplug.holder_pid").parse().unwrap();
    let blockers = s["gpu"]["blockers"].as_array().expect("blockers");
    let b = blockers
        .iter()
        .find(|b| b["pid"] == pid)
        .unwrap_or_else(|| panic!("status --json lists the holder of card1: {s}"));
    assert_eq!(b["paths"][0], "/dev/dri/card1", "{b}");
    let c = t.cmd("hotunplug.blockers_held");
    assert_eq!(c.rc, 1, "blockers exits 1 while card1 is held:\n{}", c.text());
    assert!(
        c.text()
            .contains(&format!("(pid {pid}, user root) holds /dev/dri/card1")),
        "{}",
        c.text()
    );
}

#[test]
fn watchdog_returns_from_a_real_hung_unbind_and_rebind_brings_the_gpu_home() {
    let Some(t) = guest() else { return };
    // The holder opened the audio controller through a node of its own (same device
    // numbers, another path): the scan, which matches nodes by path and inode, cannot see
    // it — the kind of holder the watchdog exists for.
    assert_eq!(t.cmd("hang.blockers").rc, 0, "{}", t.cmd("hang.blockers").text());

    let c = t.cmd("hang.prepare");
    let text = c.text();
    assert_eq!(c.rc, 1, "prepare fails:\n{text}");
    assert!(
        text.contains(&format!(
            "unbinding 0000:01:00.1 from snd_hda_intel did not return after {WATCHDOG_S} s"
        )),
        "{text}"
    );
    // The caller returned: the watchdog plus the rollback, not the hang.
    assert!(c.ms < (WATCHDOG_S + 6) * 1000, "the hook took {} ms", c.ms);
    let record = t.fact("hang.after.record");
    assert!(
        record.contains(r#""phase":"stuck""#) || record.contains(r#""phase": "stuck""#),
        "{record}"
    );
    // The graphics function was rolled back; the audio one is mid-unbind in the kernel,
    // its card already disconnected (`snd_card_free` removes the card's devices, then
    // waits for their holders): no controlC0 while the writer waits.
    assert_eq!(t.fact("hang.after.driver0"), "bochs-drm");
    assert!(
        !t.fact("hang.after.snd").contains("controlC0"),
        "{}",
        t.fact("hang.after.snd")
    );
    // While the unbind holds the device lock, reading driver_override blocks, and a
    // drivers_probe returns success at once and does nothing.
    assert_eq!(t.fact("hang.override1"), "blocked");
    assert!(
        t.fact("hang.probe_rc").starts_with("0 "),
        "{}",
        t.fact("hang.probe_rc")
    );

    // Still held: rebind changes nothing and says the writer is still in the kernel.
    let c = t.cmd("hang.rebind_held");
    assert_ne!(c.rc, 0, "{}", c.text());
    assert!(c.text().contains("still blocked in the kernel"), "{}", c.text());

    // The holder gone, the unbind finished; rebind --force brings both functions home.
    assert_eq!(t.fact("hang.released_holder.driver1"), "none");
    let c = t.cmd("hang.rebind");
    assert_eq!(c.rc, 0, "rebind --force:\n{}", c.text());
    assert_eq!(t.fact("hang.home.driver0"), "bochs-drm");
    assert_eq!(t.fact("hang.home.driver1"), "snd_hda_intel");
    assert!(!t.fact("hang.home.run").contains(RECORD), "record gone");
    assert_eq!(t.fact("hang.override1_home"), "(null)");
    assert_eq!(json(t, "hang.status")["gpu"]["owner"], "host");
}

#[test]
fn live_watchers_see_the_real_bind_and_unbind_uevents() {
    let Some(t) = guest() else { return };
    // `handoff watch --json`: one line per kernel bind/unbind uevent of the GPU's functions,
    // with the driver the kernel names in DRIVER=.
    let drivers: Vec<(String, String, String)> = t
        .lines("watch")
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["change"] == "driver")
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
            (s("function"), s("action"), s("driver"))
        })
        .collect();
    let saw = |f: &str, action: &str, driver: &str| {
        drivers
            .iter()
            .any(|(a, b, c)| a == f && b == action && c == driver)
    };
    let all = t.lines("watch").join("\n");
    for f in ["0000:01:00.0", "0000:01:00.1"] {
        assert!(saw(f, "unbind", "-"), "unbind of {f}:\n{all}");
        assert!(saw(f, "bind", "vfio-pci"), "bind of {f} to vfio-pci:\n{all}");
    }
    assert!(saw("0000:01:00.0", "bind", "bochs-drm"), "{all}");
    assert!(saw("0000:01:00.1", "bind", "snd_hda_intel"), "{all}");
    // Four handoffs there and back (prepare/release three times — the plain one, the VFIO
    // user's, the hot-unplug's —, the hung one rolled back and rebound): that many binds of
    // the graphics function to vfio-pci.
    let to_vfio = drivers
        .iter()
        .filter(|(f, a, d)| f == "0000:01:00.0" && a == "bind" && d == "vfio-pci")
        .count();
    assert_eq!(to_vfio, 4, "{all}");

    // The bar block's streaming mode followed the same changes: the VM took the GPU, the
    // hang showed, and the GPU ended at home.
    let block = t.lines("block");
    let text = block.join("\n");
    assert!(block.contains(&"GPU: win11"), "{text}");
    assert!(block.contains(&"GPU: restore!"), "{text}");
    assert_eq!(block.last(), Some(&"GPU: Linux"), "{text}");
}

#[test]
fn a_framebuffer_holder_is_refused_and_a_console_on_the_cards_framebuffer_does_not_stop_the_unbind() {
    let Some(t) = guest() else { return };
    // bochs-drm's fbdev emulation registers fb0 under the PCI device, and fbcon is on it.
    assert_eq!(t.fact("fb.graphics"), "fb0");
    assert_eq!(t.fact("fb.vtcon0"), "bind=1 (M) frame buffer device");
    let c = t.cmd("fb_holder.prepare");
    let text = c.text();
    assert_eq!(c.rc, 1, "a holder of /dev/fb0 refuses the start:\n{text}");
    assert!(
        text.contains(&format!(
            "sleep (pid {}, user root) holds /dev/fb0",
            t.fact("fb_holder.pid")
        )),
        "{text}"
    );
    assert_eq!(t.fact("fb_holder.after.driver0"), "bochs-drm", "nothing changed");
    // With only the console on fb0, the handoff went through (the kernel moved the console
    // off the framebuffer itself) and the console was back on it afterwards.
    assert_eq!(t.fact("handoff.prepared.driver0"), "vfio-pci");
    assert_eq!(t.fact("handoff.released.driver0"), "bochs-drm");
    assert_eq!(t.fact("handoff.vtcon0"), "bind=1 (M) frame buffer device");
}

#[test]
fn release_waits_for_a_vfio_group_user_then_leaves_the_gpu_on_vfio_naming_it() {
    let Some(t) = guest() else { return };
    let pid = t.fact("vfio_user.pid");
    let held = format!("sleep (pid {pid}, user root) holds /dev/vfio/3");
    // blockers and status show the group's user.
    let c = t.cmd("vfio_user.blockers");
    assert_eq!(c.rc, 1, "{}", c.text());
    assert!(c.text().contains("Holding its VFIO group"), "{}", c.text());
    assert!(c.text().contains(&held), "{}", c.text());
    let v = json(t, "vfio_user.blockers_json");
    assert_eq!(v["vfio_users"][0]["pid"].to_string(), pid, "{v:#}");
    let c = t.cmd("vfio_user.status");
    assert!(
        c.text()
            .contains("is on vfio-pci, no VM known to be running, but 1 process holds its VFIO group"),
        "{}",
        c.text()
    );
    // release waits the watchdog, then changes nothing and says who and what to do.
    let c = t.cmd("vfio_user.release");
    let text = c.text();
    assert_eq!(c.rc, 0, "a release never fails libvirt:\n{text}");
    assert!(
        text.contains(&format!(
            "not returning GPU {GPU} to the host: 1 process still holds its VFIO group /dev/vfio/3 after waiting {WATCHDOG_S} s"
        )),
        "{text}"
    );
    assert!(text.contains(&held), "{text}");
    assert!(text.contains("handoff rebind --force"), "{text}");
    assert!(c.ms >= WATCHDOG_S * 1000, "waited for the holder: {} ms", c.ms);
    assert_eq!(t.fact("vfio_user.after.driver0"), "vfio-pci");
    assert_eq!(
        t.fact("vfio_user.after.driver1"),
        "vfio-pci",
        "not left driverless"
    );
    assert_eq!(t.fact("vfio_user.after.vfio"), "3");
    let record: serde_json::Value = serde_json::from_str(t.fact("vfio_user.after.record")).unwrap();
    assert_eq!(record["phase"], "stuck");
    assert!(record["problem"].as_str().unwrap().contains(&held), "{record}");
    let v = json(t, "vfio_user.status_after");
    assert_eq!(v["verdict"]["state"], "restore_required", "{v:#}");
    assert_eq!(v["gpu"]["vfio_users"][0]["pid"].to_string(), pid, "{v:#}");
    // Measured, not assumed: with only the group fd open (no device fd), this kernel does
    // not make vfio-pci's unbind wait; the function is left with no driver.
    assert_eq!(t.fact("vfio_user.raw_unbind"), "returned");
    assert_eq!(t.fact("vfio_user.raw.driver1"), "none");
    // Once the holder is gone, rebind --force brings the GPU home.
    assert_eq!(
        t.cmd("vfio_user.rebind").rc,
        0,
        "{}",
        t.cmd("vfio_user.rebind").text()
    );
    assert_eq!(t.fact("vfio_user.home.driver0"), "bochs-drm");
    assert_eq!(t.fact("vfio_user.home.driver1"), "snd_hda_intel");
    assert_eq!(t.fact("vfio_user.home.vfio"), "");
}

#[test]
fn a_guest_that_overruns_its_deadline_is_killed_and_reaped() {
    // A guest whose /init never finishes: boot must give up at the deadline, say so, and
    // leave no QEMU behind (its own boot, not the shared one).
    let image = match kernel::image() {
        Ok(i) => i,
        Err(why) => return kernel::missing(&why),
    };
    let files = [("/init", GuestFile::Text("#!/bin/sh\nexec sleep 1000\n", 0o755))];
    let err = kernel::boot(&image, &files, Duration::from_secs(3)).expect_err("cannot finish");
    assert!(err.contains("did not finish within 3 s"), "{err}");
    let pid: u32 = err
        .split("pid ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in: {err}"));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU (pid {pid}) still exists after boot returned"
    );
}

#[test]
fn one_function_on_vfio_pci_already_has_the_group_node_and_a_free_card_returns_as_card0() {
    let Some(t) = guest() else { return };
    // vfio creates the group's node with the group's first device on vfio-pci, before the
    // group is viable (its other function is still on snd_hda_intel).
    assert_eq!(t.fact("partial.one.driver0"), "vfio-pci");
    assert_eq!(t.fact("partial.one.driver1"), "snd_hda_intel");
    assert_eq!(t.fact("partial.one.vfio"), "3");
    assert_eq!(t.fact("partial.drm"), "", "no DRM class devices on vfio-pci");
    // Back home with nothing holding any old card: the lowest free index, card0.
    assert_eq!(t.fact("partial.home.driver0"), "bochs-drm");
    assert_eq!(t.fact("partial.card"), "card0");
    assert_eq!(
        t.fact("partial.home.vfio"),
        "",
        "the group's node went with its last device"
    );
}
