//! A right click on the block under the real i3blocks 1.4 starts the real VM: the system
//! libvirtd, a tiny TCG domain mapped (through `[[vm]]`) to a simulated RTX 3090 Ti on a
//! FUSE sysfs, the real hook installed by `handoff install-hooks`. And while a process
//! holds the GPU, the same click is refused with a notification naming it.
//!
//! The click's detached job runs the `handoff` CLI next to `handoff-block` (the workspace
//! build puts both in `target/debug/`); the test fails, saying so, when it is not there.
//!
//! What it changes on the machine, for the length of the test only (as the root crate's
//! `tests/hook_e2e.rs`): `/etc/libvirt/hooks` and `/etc/handoff` are moved aside and put
//! back on drop (libvirtd is SIGHUPed afterwards), the test's domain is destroyed and
//! undefined, the mount is unmounted, and every process it started — i3blocks' group,
//! the bus, dunst, Xvfb and the clicks' detached jobs (found by an environment mark) — is
//! killed, also when the test fails. Needs root and `/dev/fuse`; under `CI=true` a
//! missing part fails the test, elsewhere it skips, saying why.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use handoff::simulated_tree::RTX_3090_TI;
use handoff::state::{HookPhase, HookState};
use handoff_test_support::block::{I3blocks, Notifications};
use handoff_test_support::libvirt::TestDomain;
use handoff_test_support::process::{Stragglers, holder};
use handoff_test_support::stage::{SYSTEM_CONFIG, Stage};
use handoff_test_support::tools::{have_all, is_root, required};
use handoff_test_support::wait::wait_until;

/// The block under test.
const BLOCK: &str = env!("CARGO_BIN_EXE_handoff-block");

const T: Duration = Duration::from_secs(10);
/// A TCG start through the hook is ~1 s on an idle machine; generous for a loaded one.
const VM_START: Duration = Duration::from_secs(60);

/// The `handoff` CLI the click's job runs (`click::handoff_bin`: next to the block).
fn handoff_cli() -> PathBuf {
    let p = Path::new(BLOCK)
        .parent()
        .expect("the block binary has a directory")
        .join("handoff");
    assert!(
        p.is_file(),
        "{} is missing: a right click runs `handoff start` from beside handoff-block. Build it \
         first with `cargo build -p handoff` (a workspace `cargo test` does)",
        p.display()
    );
    p
}

/// Fields drop in declaration order: the domain first (its destroy runs the hook's
/// `release`, which needs the mount), then the stage (the mount, the temp tree,
/// /etc/handoff, the hooks + SIGHUP, and the libvirtd lock last).
struct Scene {
    domain: TestDomain,
    /// The simulated kernel's own tree under the FUSE view (`stage.host`, what the hook and
    /// the one-shot block read and write).
    tree_sysfs: PathBuf,
    stage: Stage,
}

impl Scene {
    fn set_up(handoff: &Path) -> Option<Scene> {
        let stage = Stage::set_up()?;
        let tree_sysfs = stage.dir().join("machine").join("sys");
        assert!(tree_sysfs.is_dir(), "{}", tree_sysfs.display());
        let domain = TestDomain::define();
        let text = format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\nwatchdog_s = 2\n\n{}\
             [[vm]]\nname = \"{}\"\nlabel = \"Windows\"\nshutdown_timeout_s = 3\n",
            stage.host_section(),
            domain.name()
        );
        stage.install(&text, handoff);
        Some(Scene {
            domain,
            tree_sysfs,
            stage,
        })
    }
}

/// Watches the hook's `state.json` from a thread (every 2 ms) and keeps the ctime of the
/// first version whose phase is `vfio`: when the hook said the VM has the GPU.
///
/// ctime, not mtime: the hook writes a temp file, fsyncs it, chmods it and renames it
/// over `state.json`; the mtime is from before the fsync, while the rename (which sets
/// the ctime) is when a reader can see the change.
struct VfioSeen {
    at: Arc<std::sync::Mutex<Option<SystemTime>>>,
    stop: Arc<AtomicBool>,
}

impl VfioSeen {
    fn watch(state_file: PathBuf) -> VfioSeen {
        let at = Arc::new(std::sync::Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (at.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                // Content and mtime from one open file: the hook replaces it by rename.
                if let Ok(mut f) = fs::File::open(&state_file) {
                    let mut text = String::new();
                    if f.read_to_string(&mut text).is_ok()
                        && let Ok(st) = serde_json::from_str::<HookState>(&text)
                        && st.phase == HookPhase::Vfio
                        && let Ok(m) = f.metadata()
                    {
                        let ctime =
                            SystemTime::UNIX_EPOCH + Duration::new(m.ctime() as u64, m.ctime_nsec() as u32);
                        *a.lock().unwrap() = Some(ctime);
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        VfioSeen { at, stop }
    }

    fn get(&self) -> Option<SystemTime> {
        *self.at.lock().unwrap()
    }
}

impl Drop for VfioSeen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn right_click_starts_the_real_vm_and_is_refused_while_a_process_holds_the_gpu() {
    if !have_all(&["i3blocks", "virsh", "notify-send"]) {
        return;
    }
    if !is_root() {
        required("the real hook, /etc and libvirtd need root");
        return;
    }
    let handoff = handoff_cli();
    let Some(scene) = Scene::set_up(&handoff) else {
        return;
    };
    let vm = scene.domain.name().to_owned();
    let Some(notes) = Notifications::start(scene.stage.dir()) else {
        return;
    };
    let mark = scene.stage.dir().display().to_string();
    let _stragglers = Stragglers(mark.clone());
    let xdg = scene.stage.dir().join("xdg");
    fs::create_dir(&xdg).unwrap();
    let bus = PathBuf::from(&notes.address);
    let config = PathBuf::from(SYSTEM_CONFIG);
    let mark_path = PathBuf::from(&mark);
    let env = [
        ("HANDOFF_CONFIG", config.as_path()),
        ("DBUS_SESSION_BUS_ADDRESS", bus.as_path()),
        ("XDG_RUNTIME_DIR", xdg.as_path()),
        (Stragglers::VAR, mark_path.as_path()),
    ];
    // The one-shot block takes the clicks; the persist block beside it shows how fast
    // `--watch` follows the hook. It reads the simulated kernel's tree directly rather
    // than through the FUSE view (same files: the FUSE layer only gives writes the
    // kernel's effects): every read through FUSE is a round trip to this test process,
    // and one reading of the GPU took 15–80 ms that way at load 7 on 2 cores against
    // 4–8 ms from the tree — real sysfs is served in the kernel, with no such trip.
    let watch_cfg = scene.stage.dir().join("watch.toml");
    fs::write(
        &watch_cfg,
        fs::read_to_string(SYSTEM_CONFIG).unwrap().replace(
            &format!("sysfs = \"{}\"", scene.stage.host.sysfs.display()),
            &format!("sysfs = \"{}\"", scene.tree_sysfs.display()),
        ),
    )
    .unwrap();
    let blocks = format!(
        "[handoff]\ninstance=gpu\ncommand={BLOCK}\ninterval=once\n\n\
         [handoff-watch]\ninstance=gpu\n\
         command={BLOCK} --watch --format i3blocks-json --config {}\n\
         interval=persist\nformat=json\n",
        watch_cfg.display()
    );
    let mut bar = I3blocks::start(scene.stage.dir(), &blocks, &env);
    let log = || fs::read_to_string(xdg.join("handoff-block.log")).unwrap_or_default();
    bar.wait_for("GPU: Linux", T);
    bar.wait_for_block("handoff-watch", "GPU: Linux", T);
    assert_eq!(scene.domain.state(), "shut off");

    // (a) A stand-in CUDA job holds /dev/nvidia0: the click is refused, naming it, and
    // nothing starts.
    let job = holder(&scene.stage.host.dev.join("nvidia0"));
    let t = Instant::now();
    bar.click(3);
    bar.wait_for("GPU: Linux · 1 busy", T);
    notes.wait_for(
        &[
            "Windows not started: the GPU is in use",
            &format!("sleep (pid {}, user root", job.pid()),
            "nvidia0",
        ],
        T,
    );
    eprintln!("(a) refusal notification {:?} after the click", t.elapsed());
    // Had a job started, `handoff start` would be asking libvirtd by now.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(scene.domain.state(), "shut off", "block log:\n{}", log());
    assert!(
        HookState::load(&scene.stage.host).is_none_or(|s| s.last_refusal.is_none()),
        "the hook ran: the block must refuse before asking libvirt"
    );
    drop(job);

    // (b) Nothing holds it: the click's detached `handoff start` starts the domain.
    let vfio = VfioSeen::watch(scene.stage.host.state_file());
    let t = Instant::now();
    bar.click(3);
    bar.wait_for("GPU: Linux", T); // the click's own refresh: the job runs on, detached
    let clicked_back = t.elapsed();
    let running = wait_until(VM_START, || scene.domain.state() == "running");
    assert!(
        running,
        "the domain did not start within {VM_START:?}; block log:\n{}\nnotifications:\n{}",
        log(),
        notes.seen()
    );
    let started = t.elapsed();
    let (shown, line_at) = bar.wait_for_block("handoff-watch", "GPU: Windows", T);
    assert_eq!(shown.color.as_deref(), Some("#00AAFF"));
    let hook_at = vfio.get().expect("the hook never wrote phase vfio");
    let lag = line_at
        .duration_since(hook_at)
        .expect("the line came before the hook's state.json said vfio");
    eprintln!(
        "(b) click answered in {clicked_back:?}; domain running after {started:?}; \
         persist block 'GPU: Windows' {lag:?} after the hook's state.json"
    );
    assert!(lag < Duration::from_millis(100), "{lag:?}");
    notes.wait_for(&["Windows started", "The GPU is in Windows."], T);
    // The one-shot block shows it on its next run (a middle click with nothing set
    // is just a refresh).
    bar.click(2);
    let s = bar.wait_for("GPU: Windows", T);
    assert_eq!(
        (s.short_text.as_deref(), s.color.as_deref()),
        (Some("W"), Some("#00AAFF"))
    );
    let st = HookState::load(&scene.stage.host).unwrap();
    assert_eq!((st.phase, st.vm.as_deref()), (HookPhase::Vfio, Some(vm.as_str())));
    assert!(notes.dunstctl(&["close-all"]));
}
