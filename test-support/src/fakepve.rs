//! `fakepve` (PyPI, a third-party fake of the Proxmox VE 9 API) on a loopback port of its
//! own, for the Proxmox backend's tests: VMs, API tokens, per-path privileges, locks, slow
//! or ignored shutdowns and failing starts, set per test as a scenario (JSON), and a
//! self-signed certificate whose SHA-256 fingerprint and PEM file the test's config pins.
//!
//! fakepve's command line has no tokens or privileges, so `fakepve.py` (next to this file)
//! starts fakepve's `FakePve` through its documented Python API instead. The server runs in
//! a process group of its own and is killed with it when the [`FakePve`] drops.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::process::Group;

/// The fakepve version `scripts/deps.sh` installs and these tests were written against.
pub const VERSION: &str = "0.5.0";

const DRIVER: &str = include_str!("fakepve.py");

/// A running fakepve; killed (its whole process group) on drop.
pub struct FakePve {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The SHA-256 fingerprint of its certificate, as PVE prints it (`AB:CD:…`).
    pub fingerprint: String,
    /// Its certificate as a PEM file (a CA file that verifies it).
    pub ca_file: PathBuf,
    _group: Group,
    _dir: tempfile::TempDir,
}

/// Whether fakepve (the pinned version) can be imported; when not, [`crate::tools::required`]
/// says how to install it (fails under `CI=true`).
pub fn available() -> bool {
    let ok = Command::new("python3")
        .args([
            "-c",
            // cryptography makes the server's certificate (fakepve's [crypto] extra).
            &format!("import fakepve, cryptography, sys; sys.exit(fakepve.__version__ != {VERSION:?})"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok || crate::tools::required(&format!(
        "fakepve {VERSION} is not installed (scripts/deps.sh installs it: pip install 'fakepve[crypto]=={VERSION}')"
    ))
}

impl FakePve {
    /// Starts fakepve with `scenario` (see `fakepve.py`: `tokens`, `grants`, `guests` with
    /// `vmid`, `name`, `status`, `config`, `lock`, `acpi`, `shutdown_secs`, `start_error`, `agent`
    /// (the guest agent's answers by command, `{}` for fakepve's defaults), `stats`
    /// (`status/current` fields such as `uptime`);
    /// `time_scale`, real seconds per PVE second, default 0.01). None when fakepve is
    /// missing outside CI (the test skips).
    pub fn start(scenario: &serde_json::Value) -> Option<FakePve> {
        if !available() {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let driver = dir.path().join("fakepve_driver.py");
        std::fs::write(&driver, DRIVER).expect("write driver");
        let file = dir.path().join("scenario.json");
        std::fs::write(&file, serde_json::to_vec(scenario).unwrap()).expect("write scenario");
        let mut group = Group::spawn(
            Command::new("python3")
                .arg(&driver)
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let stdout = group.0.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("fakepve did not say where it listens within 30 s");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("fakepve's first line {line:?} is not its address: {e}"));
        let s = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("fakepve said no {k}"))
                .to_owned()
        };
        Some(FakePve {
            url: s("url"),
            fingerprint: s("fingerprint"),
            ca_file: PathBuf::from(s("ca_file")),
            _group: group,
            _dir: dir,
        })
    }

    /// The temp dir the server's files are in (the scenario, the certificate).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

/// A loopback URL where nothing listens (a port that was free a moment ago).
pub fn unreachable_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("https://127.0.0.1:{port}")
}

/// A `start_error` that makes fakepve fail a start task the way PVE fails one its
/// hookscript refused. fakepve runs no hookscripts: it ends the task with this one message
/// (the task's exit status) and puts it in the task's log before `TASK ERROR: …`. In PVE
/// (`PVE::GuestHelpers::exec_hookscript`) the log holds the script's output line by line,
/// then the task dies with `hookscript error for <vmid> on pre-start: command '…' failed:
/// exit code 1`. So: the hookscript's `lines`, then that die message, one per line; handoff
/// reads a log entry holding line breaks as the lines it holds.
pub fn hookscript_refusal(vmid: u32, lines: &[&str]) -> String {
    let mut s: String = lines.iter().map(|l| format!("{l}\n")).collect();
    s += &format!(
        "hookscript error for {vmid} on pre-start: command '/var/lib/vz/snippets/handoff {vmid} pre-start' failed: exit code 1"
    );
    s
}

/// An API token's secret in `dir/pve-token`, owner-only as handoff demands of it (a secret
/// file others may read is refused): the file `[proxmox] token_secret_file` names.
pub fn token_secret_file(dir: &Path, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("pve-token");
    std::fs::write(&file, secret).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    file
}

/// A desktop's roots under `dir` (`sys`, `dev`, `run`, empty): a machine without the GPU,
/// whose VMs are on the node.
pub fn desktop_roots(dir: &Path) {
    for d in ["sys", "dev", "run"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
}

/// The homelab's RTX 5070 Ti as a desktop without it configures it: its address on the
/// node, on vfio-pci there.
pub const DESKTOP_GPU: &str =
    "[gpu]\naddress = \"0000:01:00.0\"\nhost_driver = \"vfio-pci\"\nlabel = \"RTX 5070 Ti\"\n";

/// A desktop whose VMs are on the node at `url` (pinned to `fingerprint`): `dir/config.toml`
/// with [`DESKTOP_GPU`], a `[proxmox]` table for `token` (its secret in a
/// [`token_secret_file`]) plus the lines `proxmox_extra`, the `vms` (`[[vm]]` tables), and
/// the empty [`desktop_roots`].
pub fn desktop_config(
    dir: &Path,
    (url, fingerprint): (&str, &str),
    (token, secret): (&str, &str),
    proxmox_extra: &str,
    vms: &str,
) -> PathBuf {
    let secret = token_secret_file(dir, secret);
    desktop_roots(dir);
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "{DESKTOP_GPU}\n[proxmox]\nurl = {url:?}\ntoken = {token:?}\ntoken_secret_file = {:?}\n\
             fingerprint = {fingerprint:?}\n{proxmox_extra}\n\n{vms}\n\
             [host]\nsysfs = {:?}\ndev = {:?}\nrun = {:?}\n",
            secret.display().to_string(),
            dir.join("sys").display().to_string(),
            dir.join("dev").display().to_string(),
            dir.join("run").display().to_string(),
        ),
    )
    .unwrap();
    config
}
