//! `handoff lg-test` (the seed's `lg-test`): can Looking Glass work on this host?
//!
//! Reads the VM's domain XML (given by the caller: from libvirt, or a file), the shared
//! memory it names (`<shmem name='looking-glass'>` → `[looking_glass] shm`, default
//! `<[host] dev>/shm/looking-glass`; a kvmfr `memory-backend-file` in
//! `<qemu:commandline>` → its `mem-path`, re-rooted under `[host] dev`), `[host]
//! sysfs`'s `module/kvmfr`, and finds the client on `PATH`. Permissions are judged for
//! the given [`Caller`] from owner, group and mode (not `access(2)`), so that a root
//! caller is told what the desktop user would meet, and tests can pose as a user.
//!
//! Every failed check says how to fix it; [`Report::ok`] is true only when all pass.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Config;
use crate::doctor::{Check, Level};

const MIB: u64 = 1024 * 1024;

/// Who will run the client.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    pub gids: Vec<u32>,
    pub name: String,
}

impl Caller {
    pub fn current() -> Caller {
        use nix::unistd::{getgid, getgroups, getuid};
        let uid = getuid().as_raw();
        let mut gids: Vec<u32> = getgroups()
            .unwrap_or_default()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        gids.push(getgid().as_raw());
        let name = std::env::var("USER").unwrap_or_else(|_| uid.to_string());
        Caller { uid, gids, name }
    }
}

/// The VM's shared-memory device, as its XML describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ShmDevice {
    /// `<shmem name='looking-glass'>`: a file under /dev/shm that QEMU sizes.
    Shmem { size: Option<u64> },
    /// A kvmfr device node passed with `-object memory-backend-file,mem-path=/dev/kvmfr0`.
    Kvmfr { mem_path: String, size: Option<u64> },
}

/// Finds the Looking Glass shared memory in a domain XML.
pub fn shm_device(xml: &str) -> Result<Option<ShmDevice>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("the domain XML does not parse: {e}"))?;
    for n in doc.descendants() {
        if n.has_tag_name("shmem") && n.attribute("name") == Some("looking-glass") {
            let size = n
                .children()
                .find(|c| c.has_tag_name("size"))
                .and_then(|s| scaled(s.text()?.trim(), s.attribute("unit").unwrap_or("b")));
            return Ok(Some(ShmDevice::Shmem { size }));
        }
    }
    for n in doc.descendants().filter(|n| n.tag_name().name() == "arg") {
        let Some(v) = n.attribute("value") else { continue };
        if !v.contains("memory-backend-file") {
            continue;
        }
        let (path, size) = if v.trim_start().starts_with('{') {
            let j: serde_json::Value = serde_json::from_str(v).map_err(|e| format!("qemu:arg {v:?}: {e}"))?;
            let size = match &j["size"] {
                serde_json::Value::Number(n) => n.as_u64(),
                serde_json::Value::String(s) => qemu_size(s),
                _ => None,
            };
            (j["mem-path"].as_str().map(str::to_owned), size)
        } else {
            let kv = |k: &str| v.split(',').find_map(|p| p.strip_prefix(k)?.strip_prefix('='));
            (kv("mem-path").map(str::to_owned), kv("size").and_then(qemu_size))
        };
        if let Some(mem_path) = path {
            return Ok(Some(ShmDevice::Kvmfr { mem_path, size }));
        }
    }
    Ok(None)
}

/// libvirt's scaled integers: `b`/`bytes`, `KB`/`MB`/… (powers of 1000), `k`/`KiB`/`M`/… (1024).
fn scaled(n: &str, unit: &str) -> Option<u64> {
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "K" | "KiB" => 1024,
        "MB" => 1000 * 1000,
        "M" | "MiB" => MIB,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => 1024 * MIB,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// QEMU sizes: bytes, or a k/M/G/T suffix (powers of 1024).
fn qemu_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1024),
        'M' => (&s[..s.len() - 1], MIB),
        'G' => (&s[..s.len() - 1], 1024 * MIB),
        'T' => (&s[..s.len() - 1], 1024 * 1024 * MIB),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn mib(bytes: u64) -> String {
    if bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// What `lg-test` works from besides the config.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The domain XML, or why it could not be had.
    pub xml: Result<String, String>,
    pub vm: String,
    pub caller: Caller,
    /// `PATH`, to find the client.
    pub path: Option<OsString>,
    /// `uname -r`, to say which kernel the kvmfr module must be built for.
    pub kernel_release: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub device: Option<ShmDevice>,
    pub shm_path: Option<PathBuf>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.level != Level::Fail)
    }

    pub fn render_text(&self) -> String {
        let mut s = crate::doctor::render_checks(&self.checks);
        s += if self.ok() {
            "\nLooking Glass should work.\n"
        } else {
            "\nLooking Glass will not work until the problems above are fixed.\n"
        };
        s
    }
}

fn check(id: &'static str, level: Level, summary: String, fix: Option<String>) -> Check {
    Check {
        id,
        level,
        summary,
        fix,
    }
}

const SHMEM_SNIPPET: &str =
    "<shmem name='looking-glass'>\n  <model type='ivshmem-plain'/>\n  <size unit='M'>32</size>\n</shmem>";

pub fn run(cfg: &Config, inputs: &Inputs) -> Report {
    let mut checks = Vec::new();
    let vm = &inputs.vm;
    let device = match &inputs.xml {
        Err(why) => {
            checks.push(check(
                "vm-shmem",
                Level::Fail,
                format!("Cannot read VM {vm}'s definition: {why}"),
                None,
            ));
            None
        }
        Ok(xml) => match shm_device(xml) {
            Err(why) => {
                checks.push(check("vm-shmem", Level::Fail, format!("VM {vm}: {why}"), None));
                None
            }
            Ok(None) => {
                checks.push(check(
                    "vm-shmem",
                    Level::Fail,
                    format!("VM {vm} has no Looking Glass shared memory device"),
                    Some(format!(
                        "add to its <devices> (virsh edit {vm}):\n{SHMEM_SNIPPET}\nor a kvmfr device (see the Looking Glass docs, \"kvmfr\")"
                    )),
                ));
                None
            }
            Ok(Some(d)) => {
                let what = match &d {
                    ShmDevice::Shmem { .. } => "<shmem name='looking-glass'>".to_owned(),
                    ShmDevice::Kvmfr { mem_path, .. } => format!("kvmfr at {mem_path}"),
                };
                checks.push(check(
                    "vm-shmem",
                    Level::Ok,
                    format!("VM {vm} has Looking Glass shared memory: {what}"),
                    None,
                ));
                Some(d)
            }
        },
    };

    let shm_path = match &device {
        Some(ShmDevice::Kvmfr { mem_path, .. }) => {
            let rel = Path::new(mem_path)
                .strip_prefix("/dev")
                .unwrap_or(Path::new(mem_path));
            Some(cfg.host.dev.join(rel))
        }
        _ => Some(
            cfg.looking_glass
                .shm
                .clone()
                .unwrap_or_else(|| cfg.host.dev.join("shm/looking-glass")),
        ),
    };
    let kvmfr = matches!(device, Some(ShmDevice::Kvmfr { .. }));
    let want_size = match &device {
        Some(ShmDevice::Shmem { size }) | Some(ShmDevice::Kvmfr { size, .. }) => *size,
        None => None,
    };

    if kvmfr {
        let module = cfg.host.sysfs.join("module/kvmfr");
        if module.is_dir() {
            checks.push(check(
                "kvmfr-module",
                Level::Ok,
                "The kvmfr module is loaded".into(),
                None,
            ));
        } else {
            let mb = want_size.map(|s| s.div_ceil(MIB)).unwrap_or(32);
            checks.push(check(
                "kvmfr-module",
                Level::Fail,
                format!("The kvmfr module is not loaded ({} is missing)", module.display()),
                Some(format!(
                    "sudo modprobe kvmfr static_size_mb={mb}; if modprobe cannot find it, build it for kernel {} \
                     (the Looking Glass source's module/ directory, via dkms), and load it at boot with \
                     /etc/modules-load.d/kvmfr.conf and /etc/modprobe.d/kvmfr.conf (options kvmfr static_size_mb={mb})",
                    inputs.kernel_release
                )),
            ));
        }
    }

    if let Some(path) = &shm_path {
        check_shm(cfg, inputs, path, kvmfr, want_size, &mut checks);
    }
    checks.push(check_client(cfg, inputs));
    Report {
        device,
        shm_path,
        checks,
    }
}

fn check_shm(
    cfg: &Config,
    inputs: &Inputs,
    path: &Path,
    kvmfr: bool,
    want: Option<u64>,
    checks: &mut Vec<Check>,
) {
    let user = &inputs.caller.name;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            let fix = if kvmfr {
                format!(
                    "load the kvmfr module (it creates {}), and give your user access with a udev rule, \
                     e.g. /etc/udev/rules.d/99-kvmfr.rules: SUBSYSTEM==\"kvmfr\", GROUP=\"kvm\", MODE=\"0660\"",
                    path.display()
                )
            } else {
                format!(
                    "create it before the VM starts, owned by you and QEMU's group: put \
                     `f {} 0660 {user} kvm -` in /etc/tmpfiles.d/10-looking-glass.conf and run \
                     `sudo systemd-tmpfiles --create /etc/tmpfiles.d/10-looking-glass.conf`",
                    path.display()
                )
            };
            checks.push(check(
                "shm-present",
                Level::Fail,
                format!("Shared memory {} is not there: {e}", path.display()),
                Some(fix),
            ));
            return;
        }
    };
    checks.push(check(
        "shm-present",
        Level::Ok,
        format!("Shared memory {} exists", path.display()),
        None,
    ));

    // Size. A kvmfr node reports no size; its size is the module's static_size_mb.
    let have = if kvmfr {
        std::fs::read_to_string(cfg.host.sysfs.join("module/kvmfr/parameters/static_size_mb"))
            .ok()
            .and_then(|s| s.trim().split(',').next()?.trim().parse::<u64>().ok())
            .map(|m| m * MIB)
    } else {
        Some(meta.len())
    };
    match (want, have) {
        (Some(w), Some(0)) if !kvmfr => checks.push(check(
            "shm-size",
            Level::Info,
            format!("{} is empty; QEMU sizes it to {} when the VM starts", path.display(), mib(w)),
            None,
        )),
        (Some(w), Some(h)) if w == h => {
            checks.push(check("shm-size", Level::Ok, format!("Its size, {}, matches the VM's", mib(h)), None))
        }
        (Some(w), Some(h)) => checks.push(check(
            "shm-size",
            Level::Fail,
            format!("{} is {} but the VM's device is {}", path.display(), mib(h), mib(w)),
            Some(if kvmfr {
                format!("load kvmfr with static_size_mb={} (or change the size in the VM's XML to match)", w / MIB)
            } else {
                format!(
                    "with the VM off, remove {} and let it be recreated (QEMU sizes it at start), or set the VM's \
                     <size unit='M'>{}</size> to match",
                    path.display(),
                    h / MIB
                )
            }),
        )),
        _ => checks.push(check("shm-size", Level::Info, "The size could not be compared".into(), None)),
    }

    // Access, judged from owner/group/mode for the caller.
    let mode = meta.permissions().mode() & 0o7777;
    let caller = &inputs.caller;
    let bits = if caller.uid == 0 {
        0o6
    } else if meta.uid() == caller.uid {
        (mode >> 6) & 0o7
    } else if caller.gids.contains(&meta.gid()) {
        (mode >> 3) & 0o7
    } else {
        mode & 0o7
    };
    let facts = format!(
        "owner {}, group {}, mode {:04o}",
        user_name(meta.uid()),
        group_name(meta.gid()),
        mode
    );
    let acl = has_acl(path);
    if bits & 0o6 == 0o6 {
        let note = if acl { "; it also has an ACL (getfacl)" } else { "" };
        checks.push(check(
            "shm-access",
            Level::Ok,
            format!("{user} can read and write it ({facts}{note})"),
            None,
        ));
    } else {
        let who = if meta.uid() == caller.uid {
            "you own it but the owner bits lack read/write".to_owned()
        } else if caller.gids.contains(&meta.gid()) {
            format!(
                "you are in its group {} but the group bits lack read/write",
                group_name(meta.gid())
            )
        } else {
            format!(
                "you ({user}) are neither its owner nor in its group {}, and others may not read and write",
                group_name(meta.gid())
            )
        };
        let acl_note = if acl {
            format!(
                "\nit has an ACL, which may grant or deny more: getfacl {}",
                path.display()
            )
        } else {
            String::new()
        };
        let fix = if kvmfr {
            format!(
                "give access with a udev rule, e.g. /etc/udev/rules.d/99-kvmfr.rules:\n  \
                 SUBSYSTEM==\"kvmfr\", GROUP=\"kvm\", MODE=\"0660\"   (and: sudo usermod -aG kvm {user})\n  \
                 or SUBSYSTEM==\"kvmfr\", TAG+=\"uaccess\"   (access for the logged-in user)\n\
                 A rule with OWNER=\"{user}\" does not work from systemd 258 on: udev ignores OWNER= for normal users.\n\
                 then: sudo udevadm control --reload && sudo udevadm trigger -s kvmfr{acl_note}"
            )
        } else {
            format!(
                "sudo chown {user}:kvm {p} && sudo chmod 0660 {p}; to keep it that way, create it with \
                 systemd-tmpfiles: `f {p} 0660 {user} kvm -` in /etc/tmpfiles.d/10-looking-glass.conf{acl_note}",
                p = path.display()
            )
        };
        checks.push(check(
            "shm-access",
            Level::Fail,
            format!("{user} cannot read and write {}: {who} ({facts})", path.display()),
            Some(fix),
        ));
    }
}

fn has_acl(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a size query (null buffer, size 0) with valid C strings.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    n > 0
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => uid.to_string(),
    }
}

fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(group)) => group.name,
        _ => gid.to_string(),
    }
}

/// The client on `PATH` (or the configured path itself).
pub fn find_on_path(command: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let is_exe =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if command.contains('/') {
        return is_exe(Path::new(command)).then(|| PathBuf::from(command));
    }
    std::env::split_paths(path?)
        .map(|d| d.join(command))
        .find(|p| is_exe(p))
}

fn check_client(cfg: &Config, inputs: &Inputs) -> Check {
    let cmd = &cfg.looking_glass.command;
    let Some(exe) = find_on_path(cmd, inputs.path.as_deref()) else {
        return check(
            "client",
            Level::Fail,
            format!("The Looking Glass client {cmd:?} is not on PATH"),
            Some(
                "install the client of the same release as the host application in the VM (looking-glass.io; \
                 a mismatch fails silently), or set [looking_glass] command to its path"
                    .into(),
            ),
        );
    };
    let version = client_version(&exe).unwrap_or_else(|| "version unknown".into());
    check(
        "client",
        Level::Ok,
        format!(
            "Client {} ({version}); it must match the host application in the VM",
            exe.display()
        ),
        None,
    )
}

/// The first line `--version` prints, waiting at most 3 s.
fn client_version(exe: &Path) -> Option<String> {
    let mut child = Command::new(exe)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while child.try_wait().ok()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_device_styles() {
        let shmem = "<domain><devices><shmem name='looking-glass'><model type='ivshmem-plain'/><size unit='M'>32</size></shmem></devices></domain>";
        assert_eq!(
            shm_device(shmem).unwrap(),
            Some(ShmDevice::Shmem { size: Some(32 * MIB) })
        );
        let kvmfr = r#"<domain xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"><qemu:commandline>
            <qemu:arg value="-object"/>
            <qemu:arg value='{"qom-type":"memory-backend-file","id":"looking-glass","mem-path":"/dev/kvmfr0","size":33554432,"share":true}'/>
            </qemu:commandline></domain>"#;
        assert_eq!(
            shm_device(kvmfr).unwrap(),
            Some(ShmDevice::Kvmfr {
                mem_path: "/dev/kvmfr0".into(),
                size: Some(32 * MIB)
            })
        );
        let old = r#"<domain xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"><qemu:commandline>
            <qemu:arg value="memory-backend-file,id=looking-glass,mem-path=/dev/kvmfr0,size=64M,share=yes"/>
            </qemu:commandline></domain>"#;
        assert_eq!(
            shm_device(old).unwrap(),
            Some(ShmDevice::Kvmfr {
                mem_path: "/dev/kvmfr0".into(),
                size: Some(64 * MIB)
            })
        );
        assert_eq!(shm_device("<domain/>").unwrap(), None);
    }
}
