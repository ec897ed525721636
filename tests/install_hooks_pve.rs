//! `handoff install-hooks --pve` on a Proxmox VE host's files in a temp tree: the snippet in
//! a snippets storage, `hookscript:` in the configured VMs' configs (what `qm set
//! --hookscript` writes), idempotent, never over another hookscript, and `--uninstall`
//! taking away exactly what it added.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const WIN11: &str = "boot: order=scsi0\nhostpci0: 0000:01:00,pcie=1\nmachine: q35\nname: win11\n\n[pre-driver]\nmachine: q35\nname: win11\n";
const LINUX_AI: &str = "hostpci0: mapping=rtx5070ti,pcie=1\nname: linux-ai\n";

fn node(storage_cfg: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let qs = root.join("etc/pve/qemu-server");
    fs::create_dir_all(&qs).unwrap();
    fs::write(root.join("etc/pve/storage.cfg"), storage_cfg).unwrap();
    fs::write(qs.join("140.conf"), WIN11).unwrap();
    fs::write(qs.join("141.conf"), LINUX_AI).unwrap();
    (tmp, root)
}

const STORAGE: &str = "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup,snippets\n\n\
                       lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n";

fn install(root: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(["install-hooks", "--pve", "--pve-root"])
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn conf(root: &Path, vmid: u32) -> String {
    fs::read_to_string(root.join(format!("etc/pve/qemu-server/{vmid}.conf"))).unwrap()
}

fn am_root() -> bool {
    // The snippet must call a root-owned handoff (PVE runs it as root).
    handoff_test_support::tools::is_root()
        || handoff_test_support::tools::required(
            "install-hooks --pve checks that handoff is root-owned: run as root",
        )
}

#[test]
fn installs_the_snippet_and_sets_the_hookscript_once_and_uninstall_restores_every_file() {
    if !am_root() {
        return;
    }
    let (_tmp, root) = node(STORAGE);
    let (code, out, err) = install(&root, &["--vmid", "140", "--vmid", "141"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("set VM 140's hookscript to local:snippets/handoff"),
        "{out}"
    );
    let snippet = root.join("var/lib/vz/snippets/handoff");
    let text = fs::read_to_string(&snippet).unwrap();
    assert!(text.contains(" pve-hook \"$@\""), "{text}");
    assert_eq!(
        fs::metadata(&snippet).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // In the main section, not in the snapshot's.
    assert_eq!(
        conf(&root, 140),
        WIN11.replace(
            "name: win11\n\n",
            "name: win11\nhookscript: local:snippets/handoff\n\n"
        )
    );
    assert_eq!(
        conf(&root, 141),
        format!("{LINUX_AI}hookscript: local:snippets/handoff\n")
    );

    let (code, out, _) = install(&root, &["--vmid", "140", "--vmid", "141"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to do"), "{out}");

    let (code, out, err) = install(&root, &["--uninstall"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(conf(&root, 140), WIN11);
    assert_eq!(conf(&root, 141), LINUX_AI);
    assert!(!snippet.exists());
}

#[test]
fn another_hookscript_is_left_in_place_naming_it_and_how_to_combine_them() {
    if !am_root() {
        return;
    }
    let (_tmp, root) = node(STORAGE);
    let theirs = format!("{LINUX_AI}hookscript: local:snippets/gpu-reset.sh\n");
    fs::write(root.join("etc/pve/qemu-server/141.conf"), &theirs).unwrap();
    let (code, out, err) = install(&root, &["--vmid", "140", "--vmid", "141"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("VM 141 already has hookscript local:snippets/gpu-reset.sh"),
        "{err}"
    );
    assert!(err.contains("pve-hook \"$1\" \"$2\" || exit $?"), "{err}");
    assert_eq!(conf(&root, 141), theirs, "theirs is untouched");
    assert!(conf(&root, 140).contains("hookscript: local:snippets/handoff"));

    let (_, _, _) = install(&root, &["--uninstall"]);
    assert_eq!(conf(&root, 141), theirs, "uninstall leaves theirs too");
    assert_eq!(conf(&root, 140), WIN11);
}

#[test]
fn without_a_snippets_storage_it_says_which_pvesm_command_enables_one() {
    if !am_root() {
        return;
    }
    let (_tmp, root) = node("dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup\n");
    let (code, _, err) = install(&root, &["--vmid", "140"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("pvesm set local --content iso,vztmpl,backup,snippets"),
        "{err}"
    );
    assert_eq!(conf(&root, 140), WIN11, "nothing was changed");
}
