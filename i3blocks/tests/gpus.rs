//! `handoff-block` with several GPUs: the primary one by default, another by `--gpu` or
//! i3blocks' `instance` (`BLOCK_INSTANCE`), on the two-GPU scene (the iGPU in the running
//! macOS VM of libvirt's test driver, the RTX on Linux).

use std::process::Command;

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
