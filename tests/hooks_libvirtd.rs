//! `install-hooks` against the real system libvirtd: the installed shim is run by libvirt
//! with `<domain> prepare begin -` and the domain XML on stdin, and a `prepare` that exits
//! non-zero refuses `virsh start` with the hook's stderr in libvirt's error.
//!
//! It changes `/etc/libvirt/hooks` for the length of the test: the directory is moved aside
//! and moved back on drop (also when the test fails), then libvirtd is told to re-read it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use handoff::hook_install::{self, DEFAULT_HOOKS_DIR, InstallOptions, Reload};
use handoff_test_support::libvirt::{TestDomain, require_libvirtd, virsh};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hooks");
const BACKUP: &str = "/etc/libvirt/hooks.handoff-test-backup";

/// Moves `/etc/libvirt/hooks` aside (if it exists) and puts it back on drop, exactly as it
/// was (same inode, files, modes), then SIGHUPs libvirtd so it forgets the test's hook.
struct HooksDirBackup {
    had_dir: bool,
}

impl HooksDirBackup {
    fn take() -> HooksDirBackup {
        assert!(
            !Path::new(BACKUP).exists(),
            "{BACKUP} exists: an earlier run of this test died before restoring it. Compare it with \
             {DEFAULT_HOOKS_DIR}, move it back by hand, then run the test again"
        );
        let had_dir = Path::new(DEFAULT_HOOKS_DIR).exists();
        if had_dir {
            fs::rename(DEFAULT_HOOKS_DIR, BACKUP).expect("move /etc/libvirt/hooks aside");
        }
        HooksDirBackup { had_dir }
    }
}

impl Drop for HooksDirBackup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(DEFAULT_HOOKS_DIR)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cannot remove the test's {DEFAULT_HOOKS_DIR}: {e}; the original is at {BACKUP}");
            return;
        }
        if self.had_dir
            && let Err(e) = fs::rename(BACKUP, DEFAULT_HOOKS_DIR)
        {
            eprintln!("cannot move {BACKUP} back to {DEFAULT_HOOKS_DIR}: {e}; do it by hand");
        }
        hook_install::reload_libvirt(Path::new("/proc"));
    }
}

/// libvirtd handles SIGHUP on a thread of its own; give it a moment before the next start.
fn let_libvirtd_reload() {
    std::thread::sleep(Duration::from_millis(500));
}

fn calls_for(log: &Path, domain: &str) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(2) == Some(domain))
        .map(str::to_owned)
        .collect()
}

#[test]
fn libvirt_runs_the_installed_hook_and_a_refused_prepare_fails_the_start_with_its_message() {
    let Some(_libvirtd) = require_libvirtd() else {
        return;
    };
    let _backup = HooksDirBackup::take();

    let stand_in_dir = tempfile::tempdir().unwrap();
    let stand_in: PathBuf = stand_in_dir.path().join("handoff");
    fs::copy(Path::new(FIXTURES).join("recording-handoff.sh"), &stand_in).unwrap();
    fs::set_permissions(&stand_in, fs::Permissions::from_mode(0o755)).unwrap();
    let calls = stand_in_dir.path().join("calls");

    let opts = InstallOptions {
        handoff_exe: stand_in.clone(),
        ..InstallOptions::default()
    };
    let report = hook_install::install_hooks(&opts).expect("install-hooks into /etc/libvirt/hooks");
    eprintln!("{report}");
    assert!(
        matches!(report.reload, Reload::Signalled { .. }),
        "{:?}",
        report.reload
    );
    assert!(
        report
            .libvirt_version
            .is_some_and(|v| v >= hook_install::MIN_LIBVIRT)
    );
    let_libvirtd_reload();

    let domain = TestDomain::define();
    let name = domain.name();

    // A start the hook allows.
    domain.start().expect("start with a hook that allows it");
    assert_eq!(domain.state(), "running");
    let started = calls_for(&calls, name);
    assert_eq!(
        started.first().map(String::as_str),
        Some(format!("hook -- {name} prepare begin -").as_str())
    );
    eprintln!("hook calls for an allowed start: {started:?}");
    let xml = fs::read_to_string(stand_in_dir.path().join(format!("stdin.{name}.prepare.begin"))).unwrap();
    assert!(
        xml.contains(&format!("<name>{name}</name>")),
        "prepare's stdin is not the domain XML: {xml}"
    );
    domain.destroy().expect("destroy");
    eprintln!(
        "hook calls after destroy: {:?}",
        &calls_for(&calls, name)[started.len()..]
    );
    assert!(calls_for(&calls, name).contains(&format!("hook -- {name} release end -")));

    // A start the hook refuses.
    fs::write(
        stand_in_dir.path().join("refuse"),
        "handoff: the GPU 0000:01:00.0 is in use: pid 4242 python3 (alice, ollama.service) holds /dev/nvidia0\n",
    )
    .unwrap();
    let before = calls_for(&calls, name).len();
    let err = domain
        .start()
        .expect_err("prepare exited 1, so the start must fail");
    eprintln!("virsh start said: {err}");
    assert!(
        err.contains("pid 4242 python3 (alice, ollama.service) holds /dev/nvidia0"),
        "{err}"
    );
    assert_eq!(domain.state(), "shut off");
    eprintln!(
        "hook calls for a refused start: {:?}",
        &calls_for(&calls, name)[before..]
    );

    let asked = Instant::now();
    let list = virsh(&["list"]);
    assert!(
        list.success && asked.elapsed() < Duration::from_secs(1),
        "virsh list after a refused start: {list:?}"
    );

    // Uninstalled and reloaded: libvirt no longer runs it.
    fs::remove_file(stand_in_dir.path().join("refuse")).unwrap();
    let removed = hook_install::install_hooks(&InstallOptions {
        uninstall: true,
        ..opts.clone()
    })
    .unwrap();
    assert!(
        matches!(removed.reload, Reload::Signalled { .. }),
        "{:?}",
        removed.reload
    );
    assert!(!Path::new(DEFAULT_HOOKS_DIR).join("qemu.d/handoff").exists());
    let_libvirtd_reload();
    let before = calls_for(&calls, name).len();
    domain.start().expect("start without the hook");
    assert_eq!(
        calls_for(&calls, name).len(),
        before,
        "the uninstalled hook still ran"
    );
}
