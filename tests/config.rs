//! The config file as a person meets it: every class of mistake, through the library
//! (`Config::parse`, `load_file`, `load_from_paths`, `load_system`) and through the binary
//! (`handoff config check FILE` exits 2 and says file:line:col on stderr). The files are
//! under tests/fixtures/config/; tests that need a file's owner or mode copy it into a
//! temp dir first, and nothing outside temp dirs is written.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use handoff::config::{Config, ConfigError, Source};
use handoff::pci::PciAddress;
use handoff_test_support::tools::is_root;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

/// The binary's exit code, stdout and stderr, with HOME and XDG pointed at `home` so no
/// real user file is read.
fn handoff(home: &Path, env_config: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handoff"));
    cmd.args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env_remove("HANDOFF_CONFIG");
    if let Some(c) = env_config {
        cmd.env("HANDOFF_CONFIG", c);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().expect("handoff was killed by a signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `handoff config check FILE`.
fn check(file: &Path) -> (i32, String, String) {
    let home = tempfile::tempdir().unwrap();
    handoff(home.path(), None, &["config", "check", file.to_str().unwrap()])
}

/// A broken fixture: the library's error names the file, line and column and says
/// `wants`; the binary exits 2 and prints the same on stderr.
fn assert_broken(name: &str, line: usize, column: usize, wants: &[&str]) {
    let path = fixture(name);
    let err = Config::load_file(&path).unwrap_err();
    match &err {
        ConfigError::Parse {
            path: p,
            line: l,
            column: c,
            ..
        } => {
            assert_eq!(p, &path, "{name}: {err}");
            assert_eq!((*l, *c), (line, column), "{name}: {err}");
        }
        other => panic!("{name}: expected an error with a position, got {other:?}"),
    }
    let text = err.to_string();
    let at = format!("{}:{line}:{column}: ", path.display());
    assert!(
        text.starts_with(&at),
        "{name}: {text:?} does not start with {at:?}"
    );
    for w in wants {
        assert!(text.contains(w), "{name}: {text:?} does not say {w:?}");
    }
    // parse() says the same about the text alone, naming whatever path it was given.
    let again = Config::parse(&fs::read_to_string(&path).unwrap(), Path::new("x.toml")).unwrap_err();
    assert!(
        again
            .to_string()
            .starts_with(&format!("x.toml:{line}:{column}: ")),
        "{again}"
    );

    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, 2, "{name}: stdout {stdout:?} stderr {stderr:?}");
    assert!(stderr.contains(&at), "{name}: stderr {stderr:?} lacks {at:?}");
    for w in wants {
        assert!(stderr.contains(w), "{name}: stderr {stderr:?} does not say {w:?}");
    }
    assert_eq!(
        stderr.lines().count(),
        1,
        "{name}: one line, said once: {stderr:?}"
    );
}

#[test]
fn a_complete_file_is_accepted_by_library_and_binary() {
    let cfg = Config::load_file(&fixture("good.toml")).unwrap();
    assert_eq!(cfg.gpu.address, PciAddress::new(0, 1, 0, 0));
    assert_eq!(cfg.vms.len(), 2);
    assert_eq!(cfg.vms[1].label(), "Linux AI");
    assert_eq!(cfg.vms[1].uri, "qemu:///system", "uri defaults");
    assert_eq!(cfg.looking_glass.args, ["-F"]);

    let (code, stdout, stderr) = check(&fixture("good.toml"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("good.toml: ok (2 VM(s), GPU 0000:01:00.0)"),
        "{stdout}"
    );
}

#[test]
fn unknown_key_at_the_top_level_points_at_the_key() {
    assert_broken(
        "unknown-top-level.toml",
        2,
        1,
        &["unknown field `colour`", "`gpu`"],
    );
}

#[test]
fn unknown_key_in_gpu_points_at_the_key_and_lists_the_known_ones() {
    assert_broken(
        "unknown-in-gpu.toml",
        3,
        3,
        &["unknown field `colour`", "`address`", "`host_driver`"],
    );
}

#[test]
fn unknown_key_in_a_vm_points_at_the_key_and_suggests_label() {
    assert_broken("unknown-in-vm.toml", 3, 1, &["unknown field `lable`", "`label`"]);
}

#[test]
fn watchdog_as_a_string_names_the_key_and_the_type_wanted() {
    assert_broken(
        "watchdog-string.toml",
        2,
        14,
        &["[gpu] watchdog_s", "\"ten\"", "whole number"],
    );
}

#[test]
fn watchdog_zero_is_refused_at_its_value() {
    assert_broken(
        "watchdog-zero.toml",
        2,
        14,
        &["[gpu] watchdog_s must be at least 1"],
    );
}

#[test]
fn a_watchdog_too_long_to_count_to_is_refused_at_its_value() {
    // u64::MAX seconds used to panic the root hook mid-handoff (Instant + Duration).
    assert_broken(
        "watchdog-huge.toml",
        2,
        14,
        &[
            "[gpu] watchdog_s = 18446744073709551615 is too long",
            "at most 600",
        ],
    );
}

#[test]
fn a_shutdown_timeout_over_a_day_is_refused_at_its_value() {
    assert_broken(
        "shutdown-timeout-huge.toml",
        6,
        22,
        &["[[vm]] shutdown_timeout_s = 86401 of \"win11\"", "1 to 86400"],
    );
}

#[test]
fn vm_as_a_number_names_the_key() {
    assert_broken("vm-integer.toml", 2, 6, &["vm: ", "expected an array"]);
}

#[test]
fn broken_toml_syntax_is_located() {
    assert_broken("unclosed-table.toml", 1, 5, &["unclosed table"]);
    let err = Config::load_file(&fixture("unterminated-string.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Parse { line: 2, .. }), "{err:?}");
}

#[test]
fn path_tricks_in_the_gpu_address_are_refused_with_the_expected_form() {
    for name in [
        "address-dotdot.toml",
        "address-path-suffix.toml",
        "address-no-function.toml",
        "address-function-8.toml",
    ] {
        assert_broken(
            name,
            2,
            11,
            &[
                "[gpu] address",
                "is not a PCI address",
                "expected domain:bus:device.function",
            ],
        );
    }
    let err = Config::load_file(&fixture("address-function-8.toml")).unwrap_err();
    assert!(err.to_string().contains("at most 7"), "{err}");
}

#[test]
fn lspci_forms_of_the_address_are_normalised() {
    let short = Config::load_file(&fixture("address-short.toml")).unwrap();
    assert_eq!(short.gpu.address.to_string(), "0000:01:00.0");
    let upper = Config::load_file(&fixture("address-upper-case.toml")).unwrap();
    assert_eq!(upper.gpu.address.to_string(), "0000:0a:00.0");

    let (code, stdout, _) = check(&fixture("address-upper-case.toml"));
    assert_eq!(code, 0);
    assert!(stdout.contains("GPU 0000:0a:00.0"), "{stdout}");
}

#[test]
fn host_driver_with_a_path_is_refused_at_its_value() {
    assert_broken(
        "host-driver-dotdot.toml",
        2,
        15,
        &["[gpu] host_driver = \"../nvidia\"", "not a kernel driver name"],
    );
}

#[test]
fn a_vm_listed_twice_is_refused_at_the_second_name() {
    assert_broken(
        "duplicate-vm.toml",
        8,
        8,
        &["[[vm]] name = \"win11\" appears twice"],
    );
}

#[test]
fn relative_host_paths_are_refused_with_an_example() {
    assert_broken(
        "relative-host-dev.toml",
        3,
        7,
        &["[host] dev = \"dev\" must be an absolute path", "\"/dev\""],
    );
    assert_broken(
        "relative-host-run.toml",
        2,
        7,
        &["[host] run = \"run/handoff\" must be an absolute path"],
    );
}

#[test]
fn a_missing_file_given_to_config_check_is_named_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.toml");
    let err = Config::load_file(&missing).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    let (code, _, stderr) = check(&missing);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&format!("cannot read config {}", missing.display())),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("No such file").count(),
        1,
        "the cause is said once: {stderr}"
    );
}

#[test]
fn handoff_config_naming_a_missing_file_is_an_error_not_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.toml");
    let user = fixture("good.toml");
    let err =
        Config::load_from_paths(Some(missing.clone()), Some(user), &fixture("system.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::EnvMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("HANDOFF_CONFIG"), "{err}");

    let (code, _, stderr) = handoff(tmp.path(), Some(&missing), &["config", "check"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&format!("HANDOFF_CONFIG names {}", missing.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains("unset HANDOFF_CONFIG"),
        "says what to do: {stderr}"
    );
}

#[test]
fn handoff_config_wins_over_the_user_file() {
    let (cfg, source) = Config::load_from_paths(
        Some(fixture("address-upper-case.toml")),
        Some(fixture("good.toml")),
        &fixture("system.toml"),
    )
    .unwrap();
    assert_eq!(source, Source::File(fixture("address-upper-case.toml")));
    assert_eq!(cfg.gpu.address.to_string(), "0000:0a:00.0");

    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = handoff(
        home.path(),
        Some(&fixture("address-upper-case.toml")),
        &["config", "check"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("address-upper-case.toml: ok"), "{stdout}");
}

#[test]
fn a_missing_user_file_falls_back_to_the_system_file_then_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let user = tmp.path().join("handoff/config.toml");

    let (cfg, source) = Config::load_from_paths(None, Some(user.clone()), &fixture("system.toml")).unwrap();
    assert_eq!(source, Source::File(fixture("system.toml")));
    assert_eq!(cfg.vms[0].label(), "from the system file");

    let (cfg, source) =
        Config::load_from_paths(None, Some(user.clone()), &tmp.path().join("no-system.toml")).unwrap();
    assert_eq!(source, Source::Defaults);
    assert_eq!(cfg, Config::default());

    // And the user file wins when it is there.
    fs::create_dir_all(user.parent().unwrap()).unwrap();
    fs::copy(fixture("good.toml"), &user).unwrap();
    let (_, source) = Config::load_from_paths(None, Some(user.clone()), &fixture("system.toml")).unwrap();
    assert_eq!(source, Source::File(user));
}

#[test]
fn the_binary_reads_the_user_file_under_xdg_config_home() {
    let home = tempfile::tempdir().unwrap();
    let user = home.path().join(".config/handoff/config.toml");
    fs::create_dir_all(user.parent().unwrap()).unwrap();
    fs::copy(fixture("watchdog-string.toml"), &user).unwrap();
    let (code, _, stderr) = handoff(home.path(), None, &["config", "check"]);
    assert_eq!(code, 2);
    assert!(stderr.contains(&format!("{}:2:14:", user.display())), "{stderr}");
}

/// A copy of `name` in a temp dir, owned by root (we are root) with `mode`.
fn system_copy(tmp: &Path, name: &str, mode: u32) -> PathBuf {
    let p = tmp.join("config.toml");
    fs::copy(fixture(name), &p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// The system-file tests set owners; without root they can only run in part.
fn need_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{what} needs root under CI");
    eprintln!("skipping {what}: needs root to chown/chmod a root-owned file");
    false
}

#[test]
fn system_file_owned_by_root_and_not_writable_by_others_is_read() {
    if !need_root("system_file_owned_by_root_and_not_writable_by_others_is_read") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = system_copy(tmp.path(), "system.toml", 0o644);
    let (cfg, source) = Config::load_system(&p).unwrap();
    assert_eq!(source, Source::File(p));
    assert_eq!(cfg.vms[0].name, "ai");
}

#[test]
fn system_file_not_owned_by_root_is_refused_saying_how_to_fix_it() {
    let tmp = tempfile::tempdir().unwrap();
    let p = system_copy(tmp.path(), "system.toml", 0o644);
    if is_root() {
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
    }
    let err = Config::load_system(&p).unwrap_err();
    assert!(matches!(err, ConfigError::Insecure { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with(&p.display().to_string()), "{text}");
    assert!(text.contains("not root"), "{text}");
    assert!(
        text.contains(&format!("chown root:root {}", p.display())),
        "{text}"
    );
}

#[test]
fn system_file_writable_by_group_or_others_is_refused_saying_how_to_fix_it() {
    if !need_root("system_file_writable_by_group_or_others_is_refused") {
        return;
    }
    for mode in [0o664, 0o666, 0o646] {
        let tmp = tempfile::tempdir().unwrap();
        let p = system_copy(tmp.path(), "system.toml", mode);
        let err = Config::load_system(&p).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ConfigError::Insecure { .. }), "{mode:o}: {err:?}");
        assert!(text.contains(&format!("mode {mode:o}")), "{text}");
        assert!(text.contains(&format!("chmod 644 {}", p.display())), "{text}");
    }
}

#[test]
fn a_broken_system_file_is_located_like_any_other() {
    if !need_root("a_broken_system_file_is_located_like_any_other") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = system_copy(tmp.path(), "watchdog-string.toml", 0o644);
    let err = Config::load_system(&p).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Parse {
                line: 2,
                column: 14,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_missing_system_file_means_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, source) = Config::load_system(&tmp.path().join("config.toml")).unwrap();
    assert_eq!(source, Source::Defaults);
    assert_eq!(cfg, Config::default());
}

#[test]
fn a_dangling_system_config_link_is_an_error_not_defaults() {
    // /etc/handoff/config.toml -> a file that was moved away: the hook must not act on the
    // real /sys with the defaults.
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("config.toml");
    let target = tmp.path().join("managed/handoff.toml");
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let err = Config::load_system(&link).unwrap_err();
    assert!(matches!(err, ConfigError::BrokenLink { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with(&link.display().to_string()), "{text}");
    assert!(
        text.contains(&target.display().to_string()),
        "names the target: {text}"
    );
    assert!(text.contains("not the same as no config"), "{text}");

    // The interactive search stops there too, instead of falling through to defaults.
    let err = Config::load_from_paths(None, None, &link).unwrap_err();
    assert!(matches!(err, ConfigError::BrokenLink { .. }), "{err:?}");
    // And a dangling user file does not fall through to the system file.
    let err = Config::load_from_paths(None, Some(link.clone()), &fixture("system.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::BrokenLink { .. }), "{err:?}");

    let (code, _, stderr) = handoff(tmp.path(), Some(&link), &["config", "check"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is a symbolic link to"), "{stderr}");
}

#[test]
fn a_fifo_or_a_device_as_the_config_is_refused_at_once_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("config.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path in our temp dir.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let started = std::time::Instant::now();
    let err = Config::load_file(&fifo).unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "it did not hang"
    );
    let text = err.to_string();
    assert!(text.contains(&fifo.display().to_string()), "{text}");
    assert!(text.contains("a FIFO, not a regular file"), "{text}");

    // A device (here /dev/null, which reads as an empty file and so as the defaults).
    let null = tmp.path().join("null.toml");
    std::os::unix::fs::symlink("/dev/null", &null).unwrap();
    let text = Config::load_file(&null).unwrap_err().to_string();
    assert!(text.contains(&null.display().to_string()), "{text}");
    assert!(text.contains("a character device"), "{text}");
}

/// A command that writes, run by a person: their `--config` is read as given; run as root:
/// a `--config` naming another file than the system one is refused, never silently used.
#[test]
fn writing_commands_read_the_callers_file_unless_root_then_only_the_system_one() {
    let good = fixture("good.toml");
    let dir = tempfile::tempdir().unwrap();
    let system = dir.path().join("system.toml");
    let (cfg, source) = Config::load_to_write(Some(good.clone()), false, &system).unwrap();
    assert_eq!(source, Source::File(good.clone()));
    assert_eq!(cfg, Config::load_file(&good).unwrap());
    match Config::load_to_write(Some(good.clone()), true, &system) {
        Err(ConfigError::NotForRoot {
            path,
            given_by,
            system: s,
        }) => {
            assert_eq!((path, given_by, s), (good, "--config", system));
        }
        other => panic!("root read a caller's file: {other:?}"),
    }
}

#[test]
fn several_gpus_are_read_in_file_order_with_the_marked_one_primary() {
    let cfg = Config::load_file(&fixture("gpus.toml")).unwrap();
    let addresses: Vec<String> = cfg.gpu.iter().map(|g| g.address.to_string()).collect();
    assert_eq!(addresses, ["0000:00:02.0", "0000:01:00.0"]);
    // `cfg.gpu` is the primary GPU wherever one GPU is meant.
    assert_eq!(cfg.gpu.address, PciAddress::new(0, 1, 0, 0));
    assert!(
        cfg.gpu.isolated(),
        "host_driver vfio-pci: the card stays isolated"
    );
    let igpu = cfg.gpu.find("UHD 630").unwrap();
    assert_eq!(igpu.host_driver, "i915");
    assert!(igpu.allow_display);
    assert_eq!(cfg.gpu.find("00:02.0").unwrap().address, igpu.address);
    assert_eq!(
        cfg.gpu.find("0000:01:00.1").unwrap().label.as_deref(),
        Some("RTX")
    );
    assert!(cfg.gpu.find("RTX 9999").is_none());

    let (code, stdout, stderr) = check(&fixture("gpus.toml"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("gpus.toml: ok (2 VM(s), GPUs 0000:00:02.0, 0000:01:00.0)"),
        "{stdout}"
    );
}

#[test]
fn config_show_prints_the_array_form_which_reads_back_the_same() {
    for name in ["good.toml", "gpus.toml"] {
        let home = tempfile::tempdir().unwrap();
        let (code, stdout, stderr) = handoff(home.path(), Some(&fixture(name)), &["config", "show"]);
        assert_eq!(code, 0, "{name}: {stderr}");
        assert!(stdout.contains("[[gpu]]\n"), "{name}: {stdout}");
        assert!(!stdout.contains("\n[gpu]\n"), "{name}: {stdout}");
        let again = Config::parse(&stdout, Path::new("shown.toml")).unwrap();
        assert_eq!(again, Config::load_file(&fixture(name)).unwrap(), "{name}");
    }
}

#[test]
fn a_mistake_in_the_second_gpu_is_located_and_named_by_its_address() {
    assert_broken(
        "gpus-watchdog-zero.toml",
        7,
        14,
        &["[[gpu]] 0000:01:00.0: watchdog_s must be at least 1 (seconds)"],
    );
    assert_broken(
        "gpus-unknown-key.toml",
        7,
        1,
        &["unknown field `display`", "`allow_display`"],
    );
    assert_broken(
        "gpus-same-slot.toml",
        5,
        11,
        &["0000:01:00.1", "is the slot of GPU 0000:01:00.0 again"],
    );
    assert_broken(
        "gpus-two-primaries.toml",
        3,
        11,
        &["primary = true is set on 2 GPUs"],
    );
}

/// `[proxmox]` and `[[vm]] vmid`: the mistakes a Proxmox user makes, each pointed at its line.
#[test]
fn proxmox_sections_are_checked_and_name_the_line_and_the_fix() {
    let fp = ["AB"; 32].join(":");
    let base = |proxmox: &str| {
        format!(
            "[proxmox]\n{proxmox}\n\n[[vm]]\nvmid = 140\nlabel = \"Windows 11\"\n\n[[vm]]\nvmid = 141\nname = \"linux-ai\"\n"
        )
    };
    let good = format!(
        "url = \"https://pve.lan:8006\"\ntoken = \"handoff@pve!desk\"\ntoken_secret_file = \"/etc/handoff/pve-token\"\nfingerprint = \"{fp}\""
    );
    let cfg = Config::parse(&base(&good), Path::new("c.toml")).unwrap();
    // A VM is called by its VMID unless named, lives at the API's URL, and resolves by
    // either.
    assert_eq!(cfg.vms[0].name, "140");
    assert_eq!(cfg.vms[0].uri, "https://pve.lan:8006");
    assert_eq!(cfg.vm(Some("141")).unwrap().name, "linux-ai");
    assert_eq!(cfg.vm(Some("linux-ai")).unwrap().vmid, Some(141));
    assert_eq!(cfg.proxmox.as_ref().unwrap().poll_interval_s, 5);

    let err = |text: &str| Config::parse(text, Path::new("c.toml")).unwrap_err().to_string();
    let e = err(&base(&good.replace(&fp, "AB:CD")));
    assert!(e.starts_with("c.toml:5:"), "{e}");
    assert!(e.contains("is not a SHA-256 fingerprint"), "{e}");
    let e = err(&base(&good.replace("handoff@pve!desk", "handoff@pve")));
    assert!(e.contains("user@realm!tokenid"), "{e}");
    let e = err(&base(&good.replace("https://", "http://")));
    assert!(e.contains("PVE's API speaks only TLS"), "{e}");
    let e = err(&base(&good.replace(&format!("fingerprint = \"{fp}\""), "")));
    assert!(e.contains("never accepts any certificate"), "{e}");
    let e = err("[[vm]]\nvmid = 140\n");
    assert!(e.contains("no [proxmox] section"), "{e}");
}

#[test]
fn no_vm_is_made_up_when_none_is_configured() {
    // Issue 17: a built-in "win11" at qemu:///system had a right click start a domain
    // nobody named. Without [[vm]] there is no VM, and the surfaces say so.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.toml");
    fs::write(&path, "[gpu]\naddress = \"0000:01:00.0\"\n").unwrap();
    assert!(Config::load_file(&path).unwrap().vms.is_empty());
    assert!(Config::default().vms.is_empty());
    assert!(Config::default().vm(None).is_none());
}
