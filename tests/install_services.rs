//! `handoff install-services` into a temp HOME: twice gives identical files, `--uninstall`
//! removes exactly them (never a foreign file), and the results pass the real validators
//! (`systemd-analyze --user verify`, `desktop-file-validate`). Under `CI=true` a missing
//! validator fails; elsewhere it is skipped, saying why.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use handoff_test_support::tools::have_all;

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        // Stand-ins for the installed binaries: systemd-analyze checks that ExecStart runs.
        let bin = dir.path().join("my bin");
        std::fs::create_dir_all(&bin).unwrap();
        for b in ["handoff", "handoff-tray"] {
            std::fs::write(bin.join(b), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(bin.join(b), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        Home { dir }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_handoff"))
            .arg("install-services")
            .args(args)
            .arg("--bin-dir")
            .arg(self.dir.path().join("my bin"))
            .env("HOME", self.home())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME")
            .env("HANDOFF_CONFIG", "")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install-services {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every file and symlink under HOME with its content (or link target).
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                let ft = e.file_type().unwrap();
                let rel = p.strip_prefix(base).unwrap().to_owned();
                if ft.is_symlink() {
                    out.insert(rel, format!("-> {}", std::fs::read_link(&p).unwrap().display()));
                } else if ft.is_dir() {
                    walk(&p, base, out);
                } else {
                    out.insert(rel, std::fs::read_to_string(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.home(), &self.home(), &mut out);
        out
    }
}

#[test]
fn installing_twice_gives_identical_files_and_uninstall_removes_exactly_them() {
    let h = Home::new();
    // Someone else's files in the same directories stay untouched throughout.
    let foreign = h.home().join(".config/autostart/other.desktop");
    std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
    std::fs::write(
        &foreign,
        "[Desktop Entry]\nType=Application\nName=Other\nExec=other\n",
    )
    .unwrap();
    let before = h.snapshot();

    let first_text = h.run(&["--lg-autostart"]);
    assert!(first_text.contains("created"), "{first_text}");
    let first = h.snapshot();
    let installed: Vec<&PathBuf> = first.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(
        installed,
        [
            ".config/autostart/handoff-tray.desktop",
            ".config/systemd/user/graphical-session.target.wants/handoff-tray.service",
            ".config/systemd/user/handoff-lg-autostart.service",
            ".config/systemd/user/handoff-tray.service",
            ".local/share/applications/handoff-windows.desktop",
        ]
        .map(PathBuf::from)
        .iter()
        .collect::<Vec<_>>()
    );
    let unit = &first[Path::new(".config/systemd/user/handoff-tray.service")];
    assert!(
        unit.contains("ExecStart=\""),
        "a path with a space is quoted: {unit}"
    );
    assert!(unit.contains("my bin/handoff-tray\""), "{unit}");

    let second_text = h.run(&["--lg-autostart"]);
    assert_eq!(h.snapshot(), first, "the second run changes nothing");
    assert!(
        !second_text.contains("created") && !second_text.contains("updated"),
        "{second_text}"
    );
    assert_eq!(
        second_text.matches("already installed").count(),
        5,
        "{second_text}"
    );

    // --dry-run --uninstall says what would go and changes nothing.
    let dry = h.run(&["--uninstall", "--dry-run"]);
    assert_eq!(dry.matches("would be removed").count(), 5, "{dry}");
    assert_eq!(h.snapshot(), first);

    h.run(&["--uninstall"]);
    let after = h.snapshot();
    assert!(
        after.iter().all(|(k, v)| before.get(k) == Some(v)),
        "uninstall leaves only what was there: {:?}",
        after.keys().collect::<Vec<_>>()
    );
    assert!(foreign.exists());
}

#[test]
fn a_foreign_file_in_place_is_neither_overwritten_nor_removed() {
    let h = Home::new();
    let theirs = h.home().join(".local/share/applications/handoff-windows.desktop");
    std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
    std::fs::write(&theirs, "mine\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(["install-services", "--bin-dir", "/usr/bin"])
        .env("HOME", h.home())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .env("HANDOFF_CONFIG", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not handoff's: left alone"));
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "mine\n");
    let out = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(["install-services", "--uninstall"])
        .env("HOME", h.home())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .env("HANDOFF_CONFIG", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a foreign file is reported");
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "mine\n");
}

#[test]
fn installed_units_and_desktop_files_pass_the_validators() {
    let h = Home::new();
    h.run(&["--lg-autostart"]);
    let units = h.home().join(".config/systemd/user");
    if have_all(&["systemd-analyze"]) {
        // --user needs a runtime dir; a private one keeps it off the real session.
        let rt = h.dir.path().join("runtime");
        std::fs::create_dir(&rt).unwrap();
        std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o700)).unwrap();
        for unit in ["handoff-tray.service", "handoff-lg-autostart.service"] {
            let out = Command::new("systemd-analyze")
                .args(["--user", "verify"])
                .arg(units.join(unit))
                .env("XDG_RUNTIME_DIR", &rt)
                .env("HOME", h.home())
                .output()
                .unwrap();
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "systemd-analyze --user verify {unit}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    if have_all(&["desktop-file-validate"]) {
        for f in [
            ".config/autostart/handoff-tray.desktop",
            ".local/share/applications/handoff-windows.desktop",
        ] {
            let out = Command::new("desktop-file-validate")
                .arg(h.home().join(f))
                .output()
                .unwrap();
            assert!(
                out.status.success() && out.stdout.is_empty(),
                "desktop-file-validate {f}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
