//! `install-hooks` on temporary hook directories: what it writes, what it leaves alone,
//! and that running it twice or uninstalling does exactly what it says.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use handoff::hook_install::{
    self, Action, HooksError, InstallOptions, LibvirtVersion, Reload, SHIM_MARKER, Warning,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hooks");

struct Scene {
    _tmp: tempfile::TempDir,
    hooks_dir: PathBuf,
    exe: PathBuf,
}

/// A temp dir holding `hooks/` (not yet created) and a stand-in handoff binary.
fn scene() -> Scene {
    scene_with_exe_dir("bin")
}

fn scene_with_exe_dir(exe_dir: &str) -> Scene {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join(exe_dir);
    fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("handoff");
    fs::copy(Path::new(FIXTURES).join("argv-logger.sh"), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    Scene {
        hooks_dir: tmp.path().join("hooks"),
        exe,
        _tmp: tmp,
    }
}

fn options(scene: &Scene) -> InstallOptions {
    InstallOptions {
        hooks_dir: scene.hooks_dir.clone(),
        handoff_exe: scene.exe.clone(),
        reload_daemon: false,
        check_version: false,
        ..InstallOptions::default()
    }
}

fn put_foreign_qemu_hook(scene: &Scene, fixture: &str) -> Vec<u8> {
    fs::create_dir_all(&scene.hooks_dir).unwrap();
    let path = scene.hooks_dir.join("qemu");
    fs::copy(Path::new(FIXTURES).join(fixture), &path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    fs::read(path).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn fresh_install_creates_qemu_d_and_an_executable_shim_that_execs_handoff_hook() {
    let s = scene();
    let report = hook_install::install_hooks(&options(&s)).unwrap();

    let shim = s.hooks_dir.join("qemu.d/handoff");
    assert_eq!(
        report
            .plan
            .actions
            .iter()
            .map(std::mem::discriminant)
            .collect::<Vec<_>>(),
        [
            std::mem::discriminant(&Action::CreateDir { path: PathBuf::new() }),
            std::mem::discriminant(&Action::CreateDir { path: PathBuf::new() }),
            std::mem::discriminant(&Action::WriteShim {
                path: PathBuf::new(),
                contents: String::new(),
                replaces_older: false
            }),
        ]
    );
    assert_eq!(mode(&shim), 0o755);
    let text = fs::read_to_string(&shim).unwrap();
    assert!(text.starts_with("#!/bin/sh\n"));
    assert!(text.lines().any(|l| l == SHIM_MARKER));
    assert!(
        text.ends_with(&format!("exec '{}' hook -- \"$@\"\n", s.exe.display())),
        "{text}"
    );
    assert_eq!(report.summary, format!("installing {}", shim.display()));
    assert_eq!(report.reload, Reload::Skipped);
    // Nothing but the shim: no temp file left behind.
    assert_eq!(fs::read_dir(&s.hooks_dir).unwrap().count(), 1);
    assert_eq!(fs::read_dir(s.hooks_dir.join("qemu.d")).unwrap().count(), 1);
}

#[test]
fn second_install_finds_nothing_to_do_and_leaves_the_shim_byte_identical() {
    let s = scene();
    hook_install::install_hooks(&options(&s)).unwrap();
    let shim = s.hooks_dir.join("qemu.d/handoff");
    let before = fs::read(&shim).unwrap();
    let mtime = fs::metadata(&shim).unwrap().modified().unwrap();

    let again = hook_install::install_hooks(&options(&s)).unwrap();

    assert!(again.plan.actions.is_empty(), "{:?}", again.plan.actions);
    assert_eq!(again.summary, format!("already installed: {}", shim.display()));
    assert!(again.to_string().starts_with("already installed"));
    assert_eq!(fs::read(&shim).unwrap(), before);
    assert_eq!(fs::metadata(&shim).unwrap().modified().unwrap(), mtime);
}

#[test]
fn a_shim_with_the_wrong_mode_gets_its_mode_back() {
    let s = scene();
    hook_install::install_hooks(&options(&s)).unwrap();
    let shim = s.hooks_dir.join("qemu.d/handoff");
    fs::set_permissions(&shim, fs::Permissions::from_mode(0o644)).unwrap();

    let report = hook_install::install_hooks(&options(&s)).unwrap();

    assert_eq!(
        report.plan.actions,
        [Action::SetMode {
            path: shim.clone(),
            mode: 0o755
        }]
    );
    assert_eq!(mode(&shim), 0o755);
}

#[test]
fn a_shim_for_another_handoff_binary_is_replaced() {
    let s = scene();
    hook_install::install_hooks(&options(&s)).unwrap();
    let other = s.exe.with_file_name("handoff-new");
    fs::copy(&s.exe, &other).unwrap();

    let report = hook_install::install_hooks(&InstallOptions {
        handoff_exe: other.clone(),
        ..options(&s)
    })
    .unwrap();

    assert!(matches!(
        report.plan.actions[..],
        [Action::WriteShim {
            replaces_older: true,
            ..
        }]
    ));
    let text = fs::read_to_string(s.hooks_dir.join("qemu.d/handoff")).unwrap();
    assert!(text.contains(&format!("exec '{}' hook", other.display())));
}

#[test]
fn a_foreign_qemu_hook_that_binds_gpus_is_left_untouched_and_warned_about() {
    let s = scene();
    let foreign = put_foreign_qemu_hook(&s, "qemu-binds-gpu.sh");

    let report = hook_install::install_hooks(&options(&s)).unwrap();

    let qemu = s.hooks_dir.join("qemu");
    assert_eq!(fs::read(&qemu).unwrap(), foreign);
    assert_eq!(mode(&qemu), 0o755);
    assert_eq!(report.plan.left_alone, std::slice::from_ref(&qemu));
    let [Warning::ForeignGpuHook { path, mentions }] = &report.plan.warnings[..] else {
        panic!("expected one GPU-hook warning, got {:?}", report.plan.warnings)
    };
    assert_eq!(path, &qemu);
    assert!(mentions.contains(&"vfio".to_string()) && mentions.contains(&"nodedev-detach".to_string()));
    let shown = report.to_string();
    assert!(shown.contains("fight over the GPU"), "{shown}");
    assert!(s.hooks_dir.join("qemu.d/handoff").exists());
}

#[test]
fn a_foreign_qemu_hook_unrelated_to_gpus_is_left_untouched_without_a_warning() {
    let s = scene();
    let foreign = put_foreign_qemu_hook(&s, "qemu-harmless.sh");

    let report = hook_install::install_hooks(&options(&s)).unwrap();

    assert_eq!(fs::read(s.hooks_dir.join("qemu")).unwrap(), foreign);
    assert!(report.plan.warnings.is_empty(), "{:?}", report.plan.warnings);
    assert_eq!(report.plan.left_alone, [s.hooks_dir.join("qemu")]);
}

#[test]
fn another_script_in_qemu_d_that_unbinds_gpus_is_warned_about_too() {
    let s = scene();
    fs::create_dir_all(s.hooks_dir.join("qemu.d")).unwrap();
    let other = s.hooks_dir.join("qemu.d/50-gpu");
    fs::write(
        &other,
        "#!/bin/sh\necho 0000:01:00.0 > /sys/bus/pci/devices/0000:01:00.0/driver/unbind\n",
    )
    .unwrap();
    fs::set_permissions(&other, fs::Permissions::from_mode(0o755)).unwrap();

    let report = hook_install::install_hooks(&options(&s)).unwrap();

    assert!(matches!(&report.plan.warnings[..], [Warning::ForeignGpuHook { path, .. }] if *path == other));
}

#[test]
fn uninstall_removes_exactly_the_shim_and_leaves_foreign_files() {
    let s = scene();
    let foreign = put_foreign_qemu_hook(&s, "qemu-binds-gpu.sh");
    fs::create_dir_all(s.hooks_dir.join("qemu.d")).unwrap();
    let neighbour = s.hooks_dir.join("qemu.d/10-hugepages");
    fs::write(&neighbour, "#!/bin/sh\nexit 0\n").unwrap();
    hook_install::install_hooks(&options(&s)).unwrap();

    let report = hook_install::install_hooks(&InstallOptions {
        uninstall: true,
        ..options(&s)
    })
    .unwrap();

    let shim = s.hooks_dir.join("qemu.d/handoff");
    assert_eq!(report.plan.actions, [Action::RemoveShim { path: shim.clone() }]);
    assert!(!shim.exists());
    assert_eq!(fs::read(s.hooks_dir.join("qemu")).unwrap(), foreign);
    assert_eq!(fs::read_to_string(&neighbour).unwrap(), "#!/bin/sh\nexit 0\n");
    assert!(s.hooks_dir.join("qemu.d").is_dir());

    let again = hook_install::install_hooks(&InstallOptions {
        uninstall: true,
        ..options(&s)
    })
    .unwrap();
    assert!(again.plan.actions.is_empty());
    assert!(again.summary.starts_with("not installed"), "{}", again.summary);
}

#[test]
fn uninstall_leaves_a_qemu_d_handoff_it_did_not_write() {
    let s = scene();
    fs::create_dir_all(s.hooks_dir.join("qemu.d")).unwrap();
    let theirs = s.hooks_dir.join("qemu.d/handoff");
    fs::write(
        &theirs,
        "#!/bin/sh\n# my own script that happens to be called handoff\n",
    )
    .unwrap();

    let report = hook_install::install_hooks(&InstallOptions {
        uninstall: true,
        ..options(&s)
    })
    .unwrap();

    assert!(report.plan.actions.is_empty());
    assert!(matches!(
        &report.plan.warnings[..],
        [Warning::ForeignShimLeft { .. }]
    ));
    assert!(theirs.exists());
}

#[test]
fn install_refuses_to_overwrite_a_qemu_d_handoff_it_did_not_write() {
    let s = scene();
    fs::create_dir_all(s.hooks_dir.join("qemu.d")).unwrap();
    let theirs = s.hooks_dir.join("qemu.d/handoff");
    fs::write(&theirs, "#!/bin/sh\nexit 0\n").unwrap();

    let err = hook_install::install_hooks(&options(&s)).unwrap_err();

    assert!(
        matches!(&err, HooksError::ForeignShim { path } if *path == theirs),
        "{err}"
    );
    assert!(err.to_string().contains("move it away"), "{err}");
    assert_eq!(fs::read_to_string(&theirs).unwrap(), "#!/bin/sh\nexit 0\n");
}

#[test]
fn dry_run_plans_but_changes_nothing() {
    let s = scene();
    let report = hook_install::install_hooks(&InstallOptions {
        dry_run: true,
        ..options(&s)
    })
    .unwrap();

    assert_eq!(report.plan.actions.len(), 3);
    assert!(!s.hooks_dir.exists());
    let shown = report.to_string();
    assert!(shown.starts_with("dry run: installing"), "{shown}");
    assert!(shown.contains("would write"), "{shown}");
}

/// Runs the installed shim the way libvirt does: args, domain XML on stdin.
fn run_shim_like_libvirt(shim: &Path) -> std::process::Output {
    run_shim_for(shim, "win11")
}

fn run_shim_for(shim: &Path, domain: &str) -> std::process::Output {
    let mut child = Command::new(shim)
        .args([domain, "prepare", "begin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A shim that refuses may exit before reading its stdin: the write then meets a closed
    // pipe, which libvirt tolerates too.
    let written = std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        b"<domain><name>win11</name></domain>\n",
    );
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_handoff_path_with_spaces_quotes_and_dollars_reaches_the_shim_intact() {
    let s = scene_with_exe_dir("it's a $HOME `dir`; \"quoted\"");
    hook_install::install_hooks(&options(&s)).unwrap();
    eprintln!(
        "{}",
        fs::read_to_string(s.hooks_dir.join("qemu.d/handoff")).unwrap()
    );

    let out = run_shim_like_libvirt(&s.hooks_dir.join("qemu.d/handoff"));

    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = s.exe.parent().unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("argv")).unwrap(),
        "hook\n--\nwin11\nprepare\nbegin\n-\n"
    );
    assert_eq!(
        fs::read_to_string(dir.join("stdin")).unwrap(),
        "<domain><name>win11</name></domain>\n"
    );
}

#[test]
fn a_relative_or_multi_line_handoff_path_is_refused() {
    assert!(matches!(
        hook_install::shim_contents(Path::new("target/debug/handoff")),
        Err(HooksError::ExeNotAbsolute { .. })
    ));
    let err = hook_install::shim_contents(Path::new("/opt/x\nrm -rf /\n/handoff")).unwrap_err();
    assert!(matches!(err, HooksError::ExeUnusable { .. }), "{err}");
}

#[test]
fn a_missing_handoff_binary_is_refused_before_anything_is_written() {
    let s = scene();
    let err = hook_install::install_hooks(&InstallOptions {
        handoff_exe: s.exe.with_file_name("nope"),
        ..options(&s)
    })
    .unwrap_err();
    assert!(matches!(err, HooksError::ExeMissing { .. }), "{err}");
    assert!(!s.hooks_dir.exists());
}

#[test]
fn libvirt_older_than_6_5_is_refused_with_what_to_do() {
    let v = |text| LibvirtVersion::from_version_output(text).unwrap();
    assert_eq!(
        v("libvirtd (libvirt) 9.0.0\n"),
        LibvirtVersion {
            major: 9,
            minor: 0,
            micro: 0
        }
    );
    assert_eq!(
        v("virtqemud (libvirt) 10.10.0"),
        LibvirtVersion {
            major: 10,
            minor: 10,
            micro: 0
        }
    );

    let exe = Path::new("/usr/local/bin/handoff");
    assert!(hook_install::check_libvirt_version(v("libvirtd (libvirt) 6.5.0"), exe).is_ok());
    let err = hook_install::check_libvirt_version(v("libvirtd (libvirt) 6.0.0"), exe).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("6.0.0") && msg.contains("6.5.0") && msg.contains("/usr/local/bin/handoff hook"),
        "{msg}"
    );
}

#[test]
fn reload_reports_no_daemon_when_proc_has_none() {
    let proc_root = tempfile::tempdir().unwrap();
    fs::create_dir(proc_root.path().join("1")).unwrap();
    fs::write(proc_root.path().join("1/comm"), "init\n").unwrap();
    fs::write(proc_root.path().join("1/stat"), "1 (init) S 0 1 1").unwrap();
    fs::create_dir(proc_root.path().join("7")).unwrap();
    fs::write(proc_root.path().join("7/comm"), "libvirtd\n").unwrap();
    fs::write(proc_root.path().join("7/stat"), "7 (libvirtd) Z 1 7 7").unwrap();

    assert_eq!(hook_install::reload_libvirt(proc_root.path()), Reload::NotRunning);
    assert!(
        Reload::NotRunning
            .to_string()
            .contains("takes effect when it starts")
    );
}

#[test]
fn a_shim_whose_handoff_was_removed_refuses_with_a_message_that_says_so() {
    let s = scene();
    hook_install::install_hooks(&options(&s)).unwrap();
    fs::remove_file(&s.exe).unwrap();

    let out = run_shim_like_libvirt(&s.hooks_dir.join("qemu.d/handoff"));

    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{} is missing; reinstall handoff", s.exe.display())),
        "{stderr}"
    );
}

#[test]
fn cli_options_signal_libvirtd_only_for_the_real_hooks_directory() {
    let real = InstallOptions::for_cli(false, false, None).unwrap();
    assert!(real.reload_daemon && real.check_version);
    assert_eq!(real.hooks_dir, Path::new(hook_install::DEFAULT_HOOKS_DIR));
    assert!(real.handoff_exe.is_absolute());
    let test = InstallOptions::for_cli(true, true, Some("/tmp/x".into())).unwrap();
    assert!(!test.reload_daemon && test.uninstall && test.dry_run);
}

#[test]
fn a_domain_named_like_an_option_reaches_handoff_as_a_domain_name() {
    // libvirt passes the domain name first; `--` keeps `--help` or `--config=x` from being
    // read as handoff's options (which skipped the holder check).
    let s = scene();
    hook_install::install_hooks(&options(&s)).unwrap();
    for domain in ["--help", "-q", "--config=/tmp/x.toml"] {
        let out = run_shim_for(&s.hooks_dir.join("qemu.d/handoff"), domain);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            fs::read_to_string(s.exe.parent().unwrap().join("argv")).unwrap(),
            format!("hook\n--\n{domain}\nprepare\nbegin\n-\n")
        );
    }
}

#[test]
fn a_handoff_binary_others_can_change_is_refused_before_anything_is_written() {
    use std::os::unix::fs::chown;
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    type Spoil = fn(&Path);
    let mut cases: Vec<(&str, Spoil, &str)> = vec![
        (
            "group-writable binary",
            |exe| fs::set_permissions(exe, fs::Permissions::from_mode(0o775)).unwrap(),
            "(mode 775: group or others can write it)",
        ),
        (
            "world-writable directory",
            |exe| fs::set_permissions(exe.parent().unwrap(), fs::Permissions::from_mode(0o777)).unwrap(),
            "has mode 777: group or others can put another binary there",
        ),
    ];
    if root {
        cases.push((
            "binary owned by another user",
            |exe| chown(exe, Some(1000), Some(1000)).unwrap(),
            "(owned by uid 1000)",
        ));
    } else {
        eprintln!("not checked: a binary owned by another user (needs root to chown)");
    }
    for (case, spoil, why) in cases {
        let s = scene();
        spoil(&s.exe);
        let err = hook_install::install_hooks(&options(&s)).unwrap_err();
        assert!(matches!(err, HooksError::ExeNotTrusted { .. }), "{case}: {err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "not installing a hook that runs {}: it is not owned by root and writable only by root",
                s.exe.display()
            )),
            "{case}: {msg}"
        );
        assert!(msg.contains(why), "{case}: {msg}");
        assert!(!s.hooks_dir.exists(), "{case}: nothing is written");
    }
}
