//! `handoff-block` with several GPUs: the primary one by default, another by `--gpu` or
//! i3blocks' `instance` (`BLOCK_INSTANCE`), on the two-GPU scene (the iGPU in the running
//! macOS VM of libvirt's test driver, the RTX on Linux): by itself, and as the real
//! i3blocks runs two of them side by side; and a right click on each GPU's block starts a
//! VM that takes that GPU.

use std::process::Command;
use std::time::Duration;

use handoff::simulated_tree::{IGPU, RTX_3090_TI, SimHost, SimSpec};
use handoff_test_support::block::{I3blocks, Notifications, uninspectable_ok_line};
use handoff_test_support::process::Stragglers;
use handoff_test_support::tools::have_all;

fn block(config: &std::path::Path, args: &[&str], instance: Option<&str>) -> (i32, Vec<String>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handoff-block"));
    cmd.args(args)
        .env("HANDOFF_CONFIG", config)
        .env_remove("BLOCK_BUTTON");
    match instance {
        Some(i) => cmd.env("BLOCK_INSTANCE", i),
        None => cmd.env_remove("BLOCK_INSTANCE"),
    };
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_block_shows_the_primary_gpu_or_the_one_its_instance_names() {
    let tmp = tempfile::tempdir().unwrap();
    let scene = handoff::scenes::Scene::put(tmp.path(), "macOS has the iGPU").unwrap();
    let (code, rtx, stderr) = block(&scene.config, &[], None);
    assert_eq!((code, rtx[0].as_str()), (0, "GPU: Linux"), "{stderr}");

    for (args, instance) in [(&["--gpu", "UHD 630"][..], None), (&[][..], Some("0000:00:02.0"))] {
        let (code, igpu, stderr) = block(&scene.config, args, instance);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(igpu[0], "GPU: macOS", "{args:?} {instance:?}: {igpu:?} {stderr}");
    }
    // --gpu wins over the instance.
    let (_, rtx_again, _) = block(&scene.config, &["--gpu", "RTX"], Some("UHD 630"));
    assert_eq!(rtx_again[0], "GPU: Linux");
    // The instance of blocks configured before several GPUs (docs/bar.md's `instance=gpu`)
    // names no GPU: the primary one, no error.
    let (code, old, stderr) = block(&scene.config, &[], Some("gpu"));
    assert_eq!((code, old[0].as_str(), stderr.as_str()), (0, "GPU: Linux", ""));

    let (code, wrong, stderr) = block(&scene.config, &["--gpu", "Radeon"], None);
    assert_eq!(code, 33, "urgent");
    assert_eq!(wrong[0], "GPU: no such GPU");
    assert!(
        stderr.contains("no [[gpu]] is \"Radeon\" (configured: UHD 630, RTX)"),
        "{stderr}"
    );
}

/// The real i3blocks with a block per GPU, the iGPU's named by its `instance` (the RTX's is
/// the primary one's, by default): the bar shows both, each its own GPU's owner.
#[test]
fn i3blocks_shows_both_gpus_side_by_side() {
    if !have_all(&["i3blocks"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = handoff::scenes::Scene::put(tmp.path(), "macOS has the iGPU").unwrap();
    let bin = env!("CARGO_BIN_EXE_handoff-block");
    let blocks = format!(
        "[rtx]\ninstance=gpu\ncommand={bin}\ninterval=once\n\n\
         [igpu]\ninstance=0000:00:02.0\ncommand={bin}\ninterval=once\n"
    );
    let mut bar = I3blocks::start(tmp.path(), &blocks, &[("HANDOFF_CONFIG", scene.config.as_path())]);
    let t = Duration::from_secs(20);
    let (rtx, _) = bar.wait_for_block("rtx", "GPU: Linux", t);
    let (igpu, _) = bar.wait_for_block("igpu", "GPU: macOS", t);
    assert_ne!(
        rtx.color, igpu.color,
        "each in its own owner's colour: {rtx:?} {igpu:?}"
    );
}

/// Under the real i3blocks, a right click on the iGPU's block (its `instance`) starts the
/// macOS VM, the one whose definition passes the iGPU through, although Windows is the
/// first `[[vm]]`; on the RTX's block (`--gpu RTX`) it starts Windows. The click's detached
/// job runs `handoff start --gpu ADDRESS` (the CLI reads the definitions; the block links
/// no libvirt) and says which VM it started in a notification (dunst on a private bus).
#[test]
fn a_right_click_starts_a_vm_that_takes_the_gpu_the_block_shows() {
    if !have_all(&["i3blocks"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(notes) = Notifications::start(tmp.path()) else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_handoff-block");
    let cli = std::path::Path::new(bin).parent().unwrap().join("handoff");
    assert!(
        cli.is_file(),
        "{} is missing: the click's job runs `handoff start` from beside handoff-block; \
         build it first (`cargo build -p handoff -p handoff-libvirt`)",
        cli.display()
    );
    let mark = tmp.path().display().to_string();
    let _stragglers = Stragglers(mark.clone());
    let sim = SimHost::build(&tmp.path().join("root"), &SimSpec::workstation()).unwrap();
    // Two VMs, both shut off, listed in the order that made the click start the wrong one:
    // `win11` ("Windows") passes the RTX through, `macos` the iGPU.
    let uri = handoff_test_support::libvirt::test_driver_node(
        &tmp.path().join("libvirt-test.xml"),
        &[("win11", false, &[RTX_3090_TI]), ("macos", false, &[IGPU])],
    );
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[gpu]]\naddress = \"{IGPU}\"\nlabel = \"UHD 630\"\nhost_driver = \"i915\"\nallow_display = true\n\n\
             [[gpu]]\naddress = \"{RTX_3090_TI}\"\nlabel = \"RTX\"\nhost_driver = \"nvidia\"\nprimary = true\n\n\
             [[vm]]\nname = \"win11\"\nlabel = \"Windows\"\nuri = {uri:?}\n\n\
             [[vm]]\nname = \"macos\"\nlabel = \"macOS\"\nuri = {uri:?}\n\n\
             [host]\nsysfs = {:?}\ndev = {:?}\nrun = {:?}\n{}",
            sim.sysfs(),
            sim.dev(),
            sim.run(),
            uninspectable_ok_line(),
        ),
    )
    .unwrap();
    let xdg = tmp.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    let bus = std::path::PathBuf::from(&notes.address);
    let mark_path = std::path::PathBuf::from(&mark);
    let env = [
        ("HANDOFF_CONFIG", config.as_path()),
        ("DBUS_SESSION_BUS_ADDRESS", bus.as_path()),
        ("XDG_RUNTIME_DIR", xdg.as_path()),
        (Stragglers::VAR, mark_path.as_path()),
    ];
    let blocks = format!(
        "[rtx]\ninstance=gpu\ncommand={bin} --gpu RTX\ninterval=once\n\n\
         [igpu]\ninstance=0000:00:02.0\ncommand={bin}\ninterval=once\n"
    );
    let mut bar = I3blocks::start(tmp.path(), &blocks, &env);
    let t = Duration::from_secs(20);
    let log = || std::fs::read_to_string(xdg.join("handoff-block.log")).unwrap_or_default();
    bar.wait_for_block("rtx", "GPU: Linux", t);
    bar.wait_for_block("igpu", "GPU: Linux", t);

    bar.click_block("igpu", "0000:00:02.0", 3);
    let seen = notes.wait_for(&["macOS started", "UHD 630 is in macOS."], t);
    assert!(!seen.contains("Windows started"), "{seen}\n{}", log());

    bar.click_block("rtx", "gpu", 3);
    notes.wait_for(&["Windows started", "RTX is in Windows."], t);
}
