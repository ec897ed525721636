//! The tray under sway: waybar's `tray` module (a real StatusNotifierWatcher and host) on a
//! headless sway 1.7, run as another user (sway refuses root), on a private session bus.
//! The tray's icon shows in waybar and follows the GPU: green host icon while Linux has it,
//! blue VM icon once the VM does. (A headless sway has no pointer: the menu is tested over
//! D-Bus in tray_desktop.rs.)

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};
use handoff::state::{HookPhase, HookState};
use handoff_test_support::block::{Notifications, write_config};
use handoff_test_support::process::Group;
use handoff_test_support::screenshot::{colours, crop, out_dir, pixels_of};
use handoff_test_support::sway::{self, Sway};
use handoff_test_support::tools::have_all;
use handoff_test_support::wait::wait_until;

/// The main colours of icons/hicolor/scalable/apps/handoff-{host,vm}.svg.
const HOST_GREEN: &str = "#2E9E44";
const VM_BLUE: &str = "#2F6FDB";

fn wait_for_colour(sway: &Sway, png: &Path, colour: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        sway.screenshot(png);
        crop(png, "200x30+440+0");
        let h = colours(png);
        if pixels_of(&h, colour) >= 10 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{colour} not in waybar's tray ({}):\n{h}\nsway's log:\n{}",
            png.display(),
            sway.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_tray_icon_shows_in_waybar_under_sway_and_follows_the_gpu() {
    if !have_all(&["sway", "waybar", "grim", "convert", "dbus-send"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A private session bus any user may use (waybar runs as sway's user, the tray as root).
    let Some(n) = Notifications::start(dir) else {
        return;
    };
    let sim = SimHost::build(&dir.join("machine"), &SimSpec::workstation()).unwrap();
    let cfg = write_config(dir, &sim, "");
    // libvirt's test driver, whose domain "test" always runs: the VM the hook's state names.
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("name = \"win11\"", "name = \"test\"\nuri = \"test:///default\"");
    fs::write(&cfg, text).unwrap();
    let out = out_dir(dir);
    fs::write(
        dir.join("waybar.json"),
        "{\"layer\": \"top\", \"position\": \"top\", \"height\": 30, \"modules-right\": [\"tray\"],\n\
         \"tray\": {\"icon-size\": 22, \"spacing\": 4}}\n",
    )
    .unwrap();
    fs::write(dir.join("waybar.css"), "window#waybar { background: #222222; }\n").unwrap();
    sway::open_up(dir);
    Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(dir)
        .status()
        .unwrap();
    let Some(sway) = Sway::start(
        dir,
        &format!(
            "exec waybar -c {} -s {}\n",
            dir.join("waybar.json").display(),
            dir.join("waybar.css").display()
        ),
        640,
        120,
        &[("DBUS_SESSION_BUS_ADDRESS", &n.address)],
    ) else {
        return;
    };
    // waybar's tray module owns the watcher once it is up.
    let watcher = wait_until(Duration::from_secs(20), || {
        Command::new("dbus-send")
            .env("DBUS_SESSION_BUS_ADDRESS", &n.address)
            .args([
                "--session",
                "--print-reply",
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                "string:org.kde.StatusNotifierWatcher",
            ])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("boolean true"))
    });
    assert!(
        watcher,
        "waybar's tray did not take org.kde.StatusNotifierWatcher:\n{}",
        sway.log()
    );

    let _tray = Group::spawn(
        Command::new(env!("CARGO_BIN_EXE_handoff-tray"))
            .env("HANDOFF_CONFIG", &cfg)
            .env("DBUS_SESSION_BUS_ADDRESS", &n.address)
            .env("XDG_RUNTIME_DIR", dir)
            .env("HOME", dir)
            .env_remove("DISPLAY")
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("tray.log")).unwrap()),
    );
    wait_for_colour(&sway, &out.join("waybar-tray-linux.png"), HOST_GREEN);

    for f in 0..4 {
        sim.set_driver(RTX_3090_TI.with_function(f), Some("vfio-pci"))
            .unwrap();
    }
    let mut s = HookState::new(RTX_3090_TI);
    s.phase = HookPhase::Vfio;
    s.vm = Some("test".into());
    s.save(&sim.host()).unwrap();
    wait_for_colour(&sway, &out.join("waybar-tray-windows.png"), VM_BLUE);
}
