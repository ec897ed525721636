//! `handoff-block` with several GPUs: the primary one by default, another by `--gpu` or
//! i3blocks' `instance` (`BLOCK_INSTANCE`), on the two-GPU scene (the iGPU in the running
//! macOS VM of libvirt's test driver, the RTX on Linux): by itself, and as the real
//! i3blocks runs two of them side by side.

use std::process::Command;
use std::time::Duration;

use handoff_test_support::block::I3blocks;
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
