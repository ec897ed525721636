//! The holder publisher (`handoff publish-holders`, `install-publisher`): root's real
//! process watching the simulated workstation's mknod'ed nodes, real holder processes
//! opening them, and `handoff blockers` / `status` run as `nobody` (setpriv) seeing root's
//! holder through `holders.json` — and not once the publisher is gone.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff_test_support::opener::Opener;
use handoff_test_support::process::Group;
use handoff_test_support::tools::{have_all, is_root, required};
use handoff_test_support::wait::wait_until;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_handoff")
}

/// Root, and setpriv to become nobody: else skip (fail under CI).
fn ready() -> bool {
    if !is_root() {
        return required("the publisher runs as root and its reader as nobody: run the tests as root");
    }
    have_all(&["setpriv"])
}

/// A workstation anyone may read (the tempdir is 0700), its root-owned config (no VMs: the
/// commands run without libvirt), and the path of the publisher's file.
fn machine(tmp: &Path) -> (SimHost, PathBuf, PathBuf) {
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o755)).unwrap();
    let sim = SimHost::build(&tmp.join("machine"), &SimSpec::workstation()).unwrap();
    let config = tmp.join("config.toml");
    fs::write(
        &config,
        format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n{}",
            handoff_test_support::config::host_section(&sim.host())
        ),
    )
    .unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    let published = sim.run().join(handoff::publish::FILE);
    (sim, config, published)
}

/// What `nobody` sees: `handoff blockers --json`'s exit status and JSON.
fn blockers_as_nobody(config: &Path, home: &Path) -> (i32, serde_json::Value) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin())
        .args(["blockers", "--json"])
        .env("HANDOFF_CONFIG", config)
        .env("HOME", home)
        .env_remove("HANDOFF_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "blockers --json as nobody: {e}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// `handoff-block`'s one-shot i3blocks lines as `nobody`.
fn block_as_nobody(config: &Path) -> Vec<String> {
    let dir = Path::new(bin()).parent().unwrap();
    let block =
        handoff_test_support::bins::sibling(dir, "handoff-block", "handoff-block", &["src", "i3blocks/src"]);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(block)
        .arg("--config")
        .arg(config)
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn holder_pids(json: &serde_json::Value) -> Vec<u64> {
    json["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["pid"].as_u64().unwrap())
        .collect()
}

fn unchecked_text(json: &serde_json::Value) -> String {
    json["unchecked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn publish(config: &Path) -> Group {
    Group::spawn(
        Command::new(bin())
            .args(["publish-holders", "--system-config"])
            .arg(config)
            .stdin(Stdio::null()),
    )
}

/// The publisher's holders of the GPU, from its file as root reads it.
fn published_pids(published: &Path) -> Option<Vec<u32>> {
    let p: handoff::publish::Published = serde_json::from_slice(&fs::read(published).ok()?).ok()?;
    Some(p.gpus[0].holders.iter().map(|h| h.pid).collect())
}

#[test]
fn nobody_sees_roots_holder_through_the_publisher_and_not_without_it() {
    if !ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (sim, config, published) = machine(tmp.path());
    let home = tmp.path().join("home");
    let mut job = Opener::start(&sim.dev().join("nvidia0"), "cuda-training");
    job.open();

    // No publisher: nobody cannot see root's job, says so, and names the publisher.
    let (code, json) = blockers_as_nobody(&config, &home);
    assert_eq!(code, 4, "{json}");
    assert!(holder_pids(&json).is_empty(), "{json}");
    let text = unchecked_text(&json);
    assert!(text.contains("could not be inspected"), "{text}");
    assert!(text.contains("install-publisher"), "{text}");
    assert_eq!(block_as_nobody(&config)[0], "GPU: Linux · ? unseen");

    let publisher = publish(&config);
    assert!(
        wait_until(Duration::from_secs(10), || published_pids(&published)
            == Some(vec![job.pid()])),
        "the publisher did not publish the job: {:?}",
        fs::read_to_string(&published)
    );
    let mode = fs::metadata(&published).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "world-readable, written by root only");
    // Nothing but the listed fields leaves root.
    let raw: serde_json::Value = serde_json::from_slice(&fs::read(&published).unwrap()).unwrap();
    let mut keys: Vec<&str> = raw["gpus"][0]["holders"][0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["command", "nodes", "pid", "unit", "user"], "{raw}");

    // With it: nobody sees root's job, named, and "could not be inspected" is gone.
    let (code, json) = blockers_as_nobody(&config, &home);
    assert_eq!(code, 1, "held: {json}");
    assert_eq!(holder_pids(&json), vec![u64::from(job.pid())], "{json}");
    let h = &json["holders"][0];
    assert_eq!(h["command"], "cuda-training", "{json}");
    assert_eq!(h["user"], "root", "{json}");
    assert!(h["paths"][0].as_str().unwrap().ends_with("/nvidia0"), "{json}");
    let text = unchecked_text(&json);
    assert!(!text.contains("could not be inspected"), "{text}");
    assert!(!text.contains("install-publisher"), "{text}");
    assert_eq!(block_as_nobody(&config)[0], "GPU: Linux · 1 busy");

    // `handoff status --json` as nobody names it too.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin())
        .args(["status", "--json"])
        .env("HANDOFF_CONFIG", &config)
        .env("HOME", &home)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        status["gpu"]["blockers"][0]["pid"].as_u64(),
        Some(u64::from(job.pid())),
        "{status}"
    );
    assert_eq!(status["verdict"]["state"], "busy", "{status}");

    // The close is published (no timer: the publisher heard it).
    let t = Instant::now();
    job.close();
    assert!(
        wait_until(Duration::from_secs(5), || published_pids(&published)
            == Some(vec![])),
        "the close was not published"
    );
    eprintln!("close → published: {:?}", t.elapsed());
    // Root saw everything (the boot framebuffers too, which /proc/iomem hides from
    // nobody): nobody may now call the GPU free.
    let (code, json) = blockers_as_nobody(&config, &home);
    assert_eq!((code, json["verdict"].as_str()), (0, Some("clear")), "{json}");
    assert!(holder_pids(&json).is_empty(), "{json}");
    assert_eq!(block_as_nobody(&config)[0], "GPU: Linux");
    let t = Instant::now();
    job.open();
    assert!(
        wait_until(Duration::from_secs(5), || published_pids(&published)
            == Some(vec![job.pid()])),
        "the reopen was not published"
    );
    eprintln!("open → published: {:?}", t.elapsed());

    // The publisher gone, its file stays but is stale: the old behaviour again.
    drop(publisher); // SIGKILL to its group, reaped
    assert!(published.exists());
    let (code, json) = blockers_as_nobody(&config, &home);
    assert_eq!(code, 4, "a stale file is not believed: {json}");
    assert!(holder_pids(&json).is_empty(), "{json}");
    let text = unchecked_text(&json);
    assert!(text.contains("could not be inspected"), "{text}");
    assert!(text.contains("install-publisher"), "{text}");
    assert_eq!(block_as_nobody(&config)[0], "GPU: Linux · ? unseen");

    // Gone altogether: the same.
    fs::remove_file(&published).unwrap();
    let (code, _) = blockers_as_nobody(&config, &home);
    assert_eq!(code, 4);
}

/// A file not written by root (here: nobody's, planted in a run dir nobody may write) is
/// not believed, even naming a live root process as its publisher.
#[test]
fn a_file_not_owned_by_root_is_not_believed() {
    if !ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (sim, config, published) = machine(tmp.path());
    fs::create_dir_all(sim.run()).unwrap();
    let fake = handoff::publish::Published {
        schema: handoff::publish::SCHEMA,
        publisher: handoff::publish::Publisher {
            pid: 1,
            start_time: fs::read_to_string("/proc/1/stat")
                .ok()
                .and_then(|s| handoff::publish::parse_start_time(&s))
                .unwrap(),
        },
        gpus: vec![handoff::publish::PublishedGpu {
            address: RTX_3090_TI,
            holders: Vec::new(),
            uninspected: 0,
            boot_framebuffers: Some(Vec::new()),
        }],
    };
    fs::write(&published, serde_json::to_vec(&fake).unwrap()).unwrap();
    let home = tmp.path().join("home");
    // Root's own: believed (PID 1 runs as root and has that start time).
    let (_, json) = blockers_as_nobody(&config, &home);
    assert!(
        !unchecked_text(&json).contains("could not be inspected"),
        "{json}"
    );
    std::os::unix::fs::chown(&published, Some(65534), Some(65534)).unwrap();
    let (code, json) = blockers_as_nobody(&config, &home);
    assert_eq!(code, 4, "{json}");
    assert!(unchecked_text(&json).contains("could not be inspected"), "{json}");
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out.sort();
    out
}

fn install(root: &Path, config: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
        .arg("install-publisher")
        .arg("--root")
        .arg(root)
        .arg("--system-config")
        .arg(config)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn install_and_uninstall_into_a_temp_root_are_exact() {
    if !is_root() {
        required("install-publisher refuses a binary root does not own: run the tests as root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (sim, config, published) = machine(tmp.path());
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    let other = root.join("etc/systemd/system/other.service");
    fs::write(&other, "[Service]\nExecStart=/bin/true\n").unwrap();
    let before = files_under(&root);

    let (code, out) = install(&root, &config, &["--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("would write"), "{out}");
    assert_eq!(files_under(&root), before, "a dry run changes nothing");

    let (code, out) = install(&root, &config, &[]);
    assert_eq!(code, 0, "{out}");
    let unit = root.join("etc/systemd/system/handoff-publisher.service");
    let mut after = before.clone();
    after.push(unit.clone());
    after.sort();
    assert_eq!(files_under(&root), after, "one file more: {out}");
    let text = fs::read_to_string(&unit).unwrap();
    let exe = fs::canonicalize(bin()).unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("ExecStart={} publish-holders", exe.display())),
        "{text}"
    );
    assert!(text.contains(handoff::publisher_install::MARKER), "{text}");
    assert!(text.contains("WantedBy=multi-user.target"), "{text}");
    assert_eq!(fs::metadata(&unit).unwrap().permissions().mode() & 0o777, 0o644);

    // systemd's own check of the unit (no systemd needs to run).
    if have_all(&["systemd-analyze"]) {
        let v = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        assert!(
            v.status.success() && v.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&v.stderr)
        );
    }

    let (code, out) = install(&root, &config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to do"), "twice is once: {out}");

    // Uninstall removes the unit and the publisher's file, and nothing else.
    fs::create_dir_all(sim.run()).unwrap();
    fs::write(&published, "{}").unwrap();
    fs::write(sim.run().join("state.json"), "{}").unwrap();
    let (code, out) = install(&root, &config, &["--uninstall"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(files_under(&root), before, "{out}");
    assert!(!published.exists(), "{out}");
    assert!(sim.run().join("state.json").exists(), "{out}");
    let (code, out) = install(&root, &config, &["--uninstall"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to do"), "{out}");

    // A unit of the same name that handoff did not write is neither replaced nor removed.
    fs::write(&unit, "[Service]\nExecStart=/bin/true\n").unwrap();
    for extra in [&[][..], &["--uninstall"][..]] {
        let (code, out) = install(&root, &config, extra);
        assert_ne!(code, 0, "{out}");
        assert!(out.contains("not written by handoff"), "{out}");
        assert_eq!(
            fs::read_to_string(&unit).unwrap(),
            "[Service]\nExecStart=/bin/true\n"
        );
    }
}

/// A surface's live stream (the tray's, `handoff-block --watch`'s) hears the publisher:
/// root's open of a node it could not see reaches it as a holder change through
/// `holders.json`, with nothing else moving.
#[test]
fn the_live_stream_hears_the_published_holders() {
    use handoff::live::{Change, Sources, Watcher};
    if !ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (sim, config_path, _) = machine(tmp.path());
    fs::create_dir_all(sim.run()).unwrap();
    let mut config = handoff::Config::default();
    config.gpu.address = RTX_3090_TI;
    config.host = sim.host();
    config.vms.clear();
    let run_dir_only = Sources {
        uevents: false,
        run_dir: true,
        nodes: false,
        libvirt: false,
        vm_events: None,
    };
    let w = Watcher::new(&config, run_dir_only).expect("watcher");
    let _publisher = publish(&config_path);
    let mut job = Opener::start(&sim.dev().join("nvidia0"), "cuda-training");
    let heard = |want: Vec<u32>| {
        let end = Instant::now() + Duration::from_secs(10);
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match w.recv_timeout(left) {
                Ok(Change::Holders { holders, .. })
                    if holders.iter().map(|h| h.pid).collect::<Vec<_>>() == want =>
                {
                    return true;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    };
    assert!(heard(vec![]), "the first publication");
    job.open();
    assert!(heard(vec![job.pid()]), "the open, through holders.json");
    job.close();
    assert!(heard(vec![]), "the close, through holders.json");
}
