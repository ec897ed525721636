//! `handoff lg-test` on good and broken shared memory: temp files posing as
//! `/dev/shm/looking-glass` and a simulated `/sys/module/kvmfr`, fixture domain XMLs, a
//! stand-in client on a temp PATH, and a caller posing as an ordinary user (uid 4242).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use handoff::doctor::Level;
use handoff::lg_check::{self, Caller, Inputs};

const MIB: u64 = 1024 * 1024;
const USER: u32 = 4242;
const KVM: u32 = 4343;

struct Host {
    dir: tempfile::TempDir,
    cfg: handoff::Config,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = handoff::Config::default();
        cfg.host.dev = dir.path().join("dev");
        cfg.host.sysfs = dir.path().join("sys");
        std::fs::create_dir_all(cfg.host.dev.join("shm")).unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        Host { dir, cfg }
    }

    fn shm(&self) -> std::path::PathBuf {
        self.cfg.host.dev.join("shm/looking-glass")
    }

    /// The shared memory as QEMU leaves it: `size` bytes, owner/group/mode given.
    fn make_shm(&self, size: u64, uid: u32, gid: u32, mode: u32) {
        let f = std::fs::File::create(self.shm()).unwrap();
        f.set_len(size).unwrap();
        std::os::unix::fs::chown(self.shm(), Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(self.shm(), std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn install_client(&self) {
        let p = self.dir.path().join("bin/looking-glass-client");
        std::fs::write(&p, "#!/bin/sh\necho 'Looking Glass (B7)'\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn run(&self, fixture: &str) -> lg_check::Report {
        let xml = std::fs::read_to_string(Path::new("tests/fixtures/lg").join(fixture)).unwrap();
        lg_check::run(
            &self.cfg,
            &Inputs {
                xml: Ok(xml),
                vm: "win11".into(),
                caller: Caller {
                    uid: USER,
                    gids: vec![USER, KVM],
                    name: "alice".into(),
                },
                path: Some(self.dir.path().join("bin").into_os_string()),
                kernel_release: "6.8.0-test".into(),
            },
        )
    }
}

fn check<'a>(r: &'a lg_check::Report, id: &str) -> &'a handoff::doctor::Check {
    r.checks
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no {id} check in {}", r.render_text()))
}

#[test]
fn good_shm_of_the_right_size_owned_by_the_user_passes() {
    let h = Host::new();
    h.make_shm(32 * MIB, USER, KVM, 0o660);
    h.install_client();
    let r = h.run("win11-shmem.xml");
    assert!(r.ok(), "{}", r.render_text());
    assert!(
        check(&r, "client").summary.contains("Looking Glass (B7)"),
        "{}",
        r.render_text()
    );
}

#[test]
fn missing_shm_says_how_to_create_it() {
    let h = Host::new();
    h.install_client();
    let r = h.run("win11-shmem.xml");
    assert!(!r.ok());
    let c = check(&r, "shm-present");
    assert_eq!(c.level, Level::Fail);
    assert!(
        c.fix.as_deref().unwrap().contains("0660 alice kvm"),
        "{}",
        r.render_text()
    );
    assert!(
        c.fix.as_deref().unwrap().contains("tmpfiles"),
        "{}",
        r.render_text()
    );
}

#[test]
fn shm_of_another_size_than_the_vms_device_fails() {
    let h = Host::new();
    h.make_shm(64 * MIB, USER, KVM, 0o660);
    h.install_client();
    let r = h.run("win11-shmem.xml");
    let c = check(&r, "shm-size");
    assert_eq!(c.level, Level::Fail, "{}", r.render_text());
    assert!(
        c.summary.contains("64 MiB") && c.summary.contains("32 MiB"),
        "{}",
        c.summary
    );
}

#[test]
fn shm_owned_by_qemu_and_not_shared_with_the_users_groups_says_which_and_how() {
    let h = Host::new();
    h.make_shm(32 * MIB, 64055, 64055, 0o600);
    h.install_client();
    let r = h.run("win11-shmem.xml");
    let c = check(&r, "shm-access");
    assert_eq!(c.level, Level::Fail, "{}", r.render_text());
    assert!(c.summary.contains("mode 0600"), "{}", c.summary);
    assert!(
        c.summary.contains("neither its owner nor in its group"),
        "{}",
        c.summary
    );
    assert!(
        c.fix.as_deref().unwrap().contains("chmod 0660"),
        "{}",
        r.render_text()
    );
}

#[test]
fn shm_in_the_users_group_without_group_write_says_so() {
    let h = Host::new();
    h.make_shm(32 * MIB, 0, KVM, 0o640);
    h.install_client();
    let r = h.run("win11-shmem.xml");
    let c = check(&r, "shm-access");
    assert_eq!(c.level, Level::Fail);
    assert!(c.summary.contains("group bits lack read/write"), "{}", c.summary);
}

#[test]
fn missing_client_is_reported() {
    let h = Host::new();
    h.make_shm(32 * MIB, USER, KVM, 0o660);
    let r = h.run("win11-shmem.xml");
    assert!(!r.ok());
    let c = check(&r, "client");
    assert_eq!(c.level, Level::Fail);
    assert!(c.summary.contains("not on PATH"), "{}", c.summary);
}

#[test]
fn vm_without_shared_memory_device_says_what_to_add() {
    let h = Host::new();
    h.make_shm(32 * MIB, USER, KVM, 0o660);
    h.install_client();
    let r = h.run("win11-no-shmem.xml");
    let c = check(&r, "vm-shmem");
    assert_eq!(c.level, Level::Fail);
    assert!(c.fix.as_deref().unwrap().contains("<shmem name='looking-glass'>"));
}

#[test]
fn kvmfr_needs_the_module_and_warns_about_the_owner_udev_trap() {
    let h = Host::new();
    h.install_client();
    // The node exists (root-only, as udev leaves it with an ignored OWNER= rule), but the
    // module directory does not.
    h.make_kvmfr(0o600);
    let r = h.run("win11-kvmfr.xml");
    assert_eq!(
        check(&r, "kvmfr-module").level,
        Level::Fail,
        "{}",
        r.render_text()
    );
    assert!(
        check(&r, "kvmfr-module")
            .fix
            .as_deref()
            .unwrap()
            .contains("6.8.0-test")
    );
    let access = check(&r, "shm-access");
    assert_eq!(access.level, Level::Fail);
    let fix = access.fix.as_deref().unwrap();
    assert!(
        fix.contains("GROUP=\"kvm\", MODE=\"0660\"") && fix.contains("uaccess") && fix.contains("OWNER="),
        "{fix}"
    );

    // Loaded with the right size and a GROUP/MODE rule: all good.
    std::fs::create_dir_all(h.cfg.host.sysfs.join("module/kvmfr/parameters")).unwrap();
    std::fs::write(
        h.cfg.host.sysfs.join("module/kvmfr/parameters/static_size_mb"),
        "32\n",
    )
    .unwrap();
    std::os::unix::fs::chown(h.cfg.host.dev.join("kvmfr0"), Some(0), Some(KVM)).unwrap();
    std::fs::set_permissions(
        h.cfg.host.dev.join("kvmfr0"),
        std::fs::Permissions::from_mode(0o660),
    )
    .unwrap();
    let r = h.run("win11-kvmfr.xml");
    assert!(r.ok(), "{}", r.render_text());
}

impl Host {
    /// A stand-in kvmfr node (a regular file: only its owner and mode matter here).
    fn make_kvmfr(&self, mode: u32) {
        let p = self.cfg.host.dev.join("kvmfr0");
        std::fs::write(&p, "").unwrap();
        std::os::unix::fs::chown(&p, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

#[test]
fn cli_exits_1_with_fixes_and_json_for_a_missing_shm() {
    let h = Host::new();
    let conf = h.dir.path().join("config.toml");
    std::fs::write(
        &conf,
        format!(
            // The VM is named: a config without [[vm]] has none (issue 17).
            "[[vm]]\nname = \"win11\"\nlabel = \"Windows\"\n\n\
             [looking_glass]\nshm = \"{}\"\ncommand = \"/nonexistent/looking-glass-client\"\n",
            h.shm().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff")))
        .args([
            "lg-test",
            "--json",
            "--xml",
            "tests/fixtures/lg/win11-shmem.xml",
            "--config",
        ])
        .arg(&conf)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["level"] == "fail")
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["shm-present", "client"]);
}
