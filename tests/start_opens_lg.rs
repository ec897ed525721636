//! `handoff start` opens Looking Glass once the VM is up (issue 7), end to end: the real
//! system libvirtd and the real hook moving a simulated RTX 3090 Ti (FUSE sysfs) to
//! vfio-pci, a tiny TCG domain with a real ivshmem `<shmem>` device (QEMU creates
//! `/dev/shm/<name>`), and a real i3 4.22 on Xvfb with a stand-in client
//! (`xterm -class looking-glass-client`).
//!
//! `handoff start` runs as over SSH on the same machine: no DISPLAY, no session bus — only
//! `I3SOCK` pointing at the test's i3. Then again with no i3 reachable at all (no I3SOCK,
//! no DISPLAY, an empty tmpfs over `/run/user` in a private mount namespace): the VM
//! still starts, and the command says Looking Glass can be opened on the desktop.
//!
//! What it changes on the machine, for the length of the test only (as `vm_libvirtd.rs`):
//! `/etc/libvirt/hooks` and `/etc/handoff` are moved aside and put back on drop (libvirtd
//! is SIGHUPed afterwards), the domain is destroyed and undefined, `/dev/shm/<name>` is
//! removed, the mount is unmounted, and Xvfb, i3 and the clients i3 started are killed by
//! process group — also when the test fails. It holds the libvirtd test lock throughout.
//!
//! Run with `cargo test --test start_opens_lg` as root with
//! `/dev/fuse`, libvirtd, QEMU, Xvfb, i3 and xterm. Under `CI=true` a missing part fails.

use handoff_test_support::bins::Run;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use handoff::bind::record::RestoreRecord;
use handoff::simulated_tree::RTX_3090_TI;
use handoff_test_support::desktop::Desktop;
use handoff_test_support::libvirt::TestDomain;
use handoff_test_support::stage::{SYSTEM_CONFIG, Stage};
use handoff_test_support::tools::{have, required};

/// `handoff`, with `handoff-vm` (which runs its libvirt commands) built beside it.
fn handoff() -> &'static str {
    handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff"))
}
const CLASS: &str = "looking-glass-client";
const WORKSPACE: &str = "lg 10";
/// In the scene's temp dir: the same config, but a client that is not installed (and a
/// window class no open window has).
const MISSING_CLIENT_CONFIG: &str = "missing-client.toml";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Removes QEMU's shared-memory file on drop (libvirt leaves it when the domain stops).
struct ShmFile(PathBuf);

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Fields drop in declaration order: the domain first (its destroy runs the hook's
/// `release`, which needs the mount), its shm file, the desktop, then the stage (the mount,
/// /etc/handoff, the hooks, and the lock last).
struct Scene {
    vm: TestDomain,
    shm: ShmFile,
    desk: Desktop,
    stage: Stage,
}

impl Scene {
    fn set_up() -> Option<Scene> {
        for tool in ["xterm", "unshare", "qemu-system-x86_64"] {
            if !have(tool) {
                required(&format!("{tool} is not installed (scripts/deps.sh installs it)"));
                return None;
            }
        }
        let stage = Stage::set_up()?;
        let desk = Desktop::start(None)?;

        // A name of its own, so parallel runs and a real Looking Glass never share it;
        // handoff recognises any shmem whose name contains "looking".
        let shm_name = format!("looking-glass-handoff-test-{}", std::process::id());
        let shm = ShmFile(Path::new("/dev/shm").join(&shm_name));
        let vm = TestDomain::define_with_devices(&format!(
            "<shmem name='{shm_name}'><model type='ivshmem-plain'/><size unit='M'>32</size></shmem>"
        ));

        let args = ["-class", CLASS, "-e", "sleep", "600"].map(toml_string);
        let host_section = stage.host_section();
        let config = |command: &str, class: &str| {
            format!(
                "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\nwatchdog_s = 2\n\n{host_section}\
             [looking_glass]\ncommand = \"{command}\"\nargs = [{}]\nworkspace = {}\nwindow_class = \"{class}\"\n\n\
             [[vm]]\nname = \"{}\"\nlabel = \"Windows\"\nshutdown_timeout_s = 3\n",
                args.join(", "),
                toml_string(WORKSPACE),
                vm.name()
            )
        };
        fs::write(
            stage.dir().join(MISSING_CLIENT_CONFIG),
            config(
                "looking-glass-client-not-installed",
                "looking-glass-not-installed",
            ),
        )
        .unwrap();
        stage.install(&config("xterm", CLASS), Path::new(handoff()));
        Some(Scene { vm, shm, desk, stage })
    }

    /// `<prefix…> handoff <args>` in an SSH-like environment: PATH, HOME, the config and
    /// `extra`; no DISPLAY, no WAYLAND_DISPLAY, no session bus, no XDG_RUNTIME_DIR.
    fn handoff_via(&self, prefix: &[&str], extra: &[(&str, &Path)], args: &[&str]) -> Run {
        let mut c = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(handoff());
                c
            }
            None => Command::new(handoff()),
        };
        c.args(args)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("HANDOFF_CONFIG", SYSTEM_CONFIG)
            .stdin(Stdio::null());
        for (k, v) in extra {
            c.env(k, v);
        }
        let t = Instant::now();
        let out = c.output().unwrap();
        let r = Run::from_output(out, Some(t.elapsed()));
        eprintln!("$ {} handoff {}\n{r:?}", prefix.join(" "), args.join(" "));
        r
    }

    fn drivers(&self) -> Vec<Option<String>> {
        self.stage.drivers()
    }

    fn all_on_vfio(&self) -> bool {
        self.drivers().iter().all(|d| d.as_deref() == Some("vfio-pci"))
    }

    fn all_on_host(&self) -> bool {
        self.drivers() == ["nvidia", "snd_hda_intel", "xhci_hcd", "nvidia-gpu"].map(|d| Some(d.to_owned()))
    }

    fn record_vm(&self) -> Option<String> {
        RestoreRecord::load(&self.stage.host, RTX_3090_TI)
            .unwrap()
            .and_then(|r| r.vm)
    }

    fn clients(&self) -> Vec<handoff::i3::Window> {
        self.desk.windows().into_iter().filter(|w| w.is(CLASS)).collect()
    }

    fn running_line(&self) -> String {
        format!(
            "Windows ({}) is running; GPU 0000:01:00.0 is on vfio-pci.\n",
            self.vm.name()
        )
    }

    fn stop_force_brings_the_gpu_home(&self) {
        let r = self.handoff_via(&[], &[], &["stop", "--force", self.vm.name()]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(
            r.stdout,
            format!(
                "Windows ({}) was forced off; GPU 0000:01:00.0 is back on Linux (nvidia).\n",
                self.vm.name()
            )
        );
        assert_eq!(self.vm.state(), "shut off");
        assert!(self.all_on_host(), "{:?}", self.drivers());
        assert_eq!(self.record_vm(), None);
    }
}

#[test]
fn start_opens_looking_glass_on_its_workspace_and_without_a_desktop_says_so() {
    let Some(s) = Scene::set_up() else { return };
    let t = Instant::now();
    over_ssh_with_i3sock_the_client_lands_on_its_workspace(&s);
    again_from_the_runtime_dir_it_focuses_the_open_client(&s);
    s.stop_force_brings_the_gpu_home();
    with_no_desktop_reachable_the_vm_still_starts(&s);
    a_client_that_is_not_installed_is_a_prompt_warning(&s);
    s.stop_force_brings_the_gpu_home();
    eprintln!("whole scenario: {:?}", t.elapsed());
}

fn over_ssh_with_i3sock_the_client_lands_on_its_workspace(s: &Scene) {
    assert!(s.clients().is_empty());
    assert_eq!(s.desk.focused_workspace().as_deref(), Some("1"));

    let r = s.handoff_via(&[], &[("I3SOCK", &s.desk.socket)], &["start", s.vm.name()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, s.running_line(), "{r:?}");
    assert_eq!(s.vm.state(), "running");
    assert!(s.all_on_vfio(), "{:?}", s.drivers());
    assert_eq!(s.record_vm().as_deref(), Some(s.vm.name()));
    assert!(s.shm.0.exists(), "QEMU did not create {}", s.shm.0.display());
    assert!(
        r.stderr.contains(&format!(
            "Started Looking Glass (xterm) on workspace {WORKSPACE}."
        )),
        "{r:?}"
    );
    assert!(!r.stderr.contains("warning"), "{r:?}");

    let lg = s.clients();
    assert_eq!(lg.len(), 1, "{lg:?}");
    assert_eq!(lg[0].workspace.as_deref(), Some(WORKSPACE), "{lg:?}");
    assert!(lg[0].focused, "{lg:?}");
    assert_eq!(s.desk.focused_workspace().as_deref(), Some(WORKSPACE));
}

/// `ssh host windows-start` as the desktop's user: no I3SOCK, but i3's socket in the
/// runtime dir (`/run/user/<uid>/i3/ipc-socket.<pid>`, here a link to the test's socket on
/// a tmpfs over /run/user in a private mount namespace).
fn again_from_the_runtime_dir_it_focuses_the_open_client(s: &Scene) {
    let before = s.clients();
    s.desk.i3().command("workspace 1").unwrap();
    assert_eq!(s.desk.focused_workspace().as_deref(), Some("1"));
    let script = format!(
        "mount -t tmpfs handoff-test /run/user && mkdir -p /run/user/0/i3 && \
         ln -s '{}' /run/user/0/i3/ipc-socket.4242 && exec \"$0\" \"$@\"",
        s.desk.socket.display()
    );
    let prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ];
    let r = s.handoff_via(&prefix, &[], &["windows-start", s.vm.name()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        format!(
            "Windows ({}) was already running; GPU 0000:01:00.0 is on vfio-pci.\n",
            s.vm.name()
        ),
        "{r:?}"
    );
    assert!(
        r.stderr.contains(&format!(
            "Looking Glass was already open; focused it on workspace {WORKSPACE}."
        )),
        "{r:?}"
    );
    let lg = s.clients();
    assert_eq!(lg.len(), 1, "exactly one client: {lg:?}");
    assert_eq!(lg[0].con_id, before[0].con_id);
    assert!(lg[0].focused, "{lg:?}");
    assert_eq!(s.desk.focused_workspace().as_deref(), Some(WORKSPACE));
}

fn with_no_desktop_reachable_the_vm_still_starts(s: &Scene) {
    // A private mount namespace with an empty tmpfs over /run/user: no i3 socket in any
    // runtime dir, whatever the machine has there; libvirt's socket (/run/libvirt) stays.
    let prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"mount -t tmpfs handoff-test /run/user && exec "$0" "$@""#,
    ];
    let before = s.clients();
    let r = s.handoff_via(&prefix, &[], &["start", s.vm.name()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, s.running_line(), "{r:?}");
    assert_eq!(s.vm.state(), "running");
    assert!(s.all_on_vfio(), "{:?}", s.drivers());
    assert!(
        r.stderr.contains(
            "Windows is running. No desktop session is reachable from here (no i3 socket, no DISPLAY), \
             so Looking Glass was not opened. Run `handoff lg` on the desktop"
        ),
        "{r:?}"
    );
    assert!(r.stderr.contains("/run/user/0/i3"), "{r:?}");
    assert!(!r.stderr.contains("warning"), "{r:?}");
    assert!(
        r.took.unwrap() < Duration::from_secs(10),
        "it did not wait for a window: {r:?}"
    );
    assert_eq!(
        s.clients().len(),
        before.len(),
        "nothing was started on the desktop"
    );
}

/// A client that is not installed does not hold `handoff start` up for the whole window
/// wait: i3 reports its exit (127) and the command warns at once, the VM running.
fn a_client_that_is_not_installed_is_a_prompt_warning(s: &Scene) {
    let config = s.stage.dir().join(MISSING_CLIENT_CONFIG);
    let r = s.handoff_via(
        &[],
        &[("I3SOCK", &s.desk.socket), ("HANDOFF_CONFIG", &config)],
        &["start", s.vm.name()],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("was already running; GPU 0000:01:00.0 is on vfio-pci"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains(
            "handoff: warning: Windows is running, but Looking Glass did not open: i3 ran \
             `looking-glass-client-not-installed -class looking-glass-client -e sleep 600`, but it exited \
             with status 127 before its window appeared: it is not found on the desktop session's PATH."
        ),
        "{r:?}"
    );
    assert!(
        r.took.unwrap() < Duration::from_secs(5),
        "it waited for a window: {r:?}"
    );
    assert_eq!(s.vm.state(), "running");
}
