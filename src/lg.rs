//! Opening the Looking Glass client on its own i3 (or sway) workspace, also from SSH.
//!
//! [`open`] is what `handoff lg` and `handoff start` call. In order:
//! 1. Find the desktop's i3 or sway ([`crate::i3::find`]: `I3SOCK`, `SWAYSOCK`,
//!    `/run/user/<uid>/`, the X root window). If a window whose X class or instance, or
//!    Wayland `app_id` (sway), is `[looking_glass] window_class` is already there, focus it
//!    (the window manager switches to its workspace) and stop: never a second client.
//! 2. Otherwise subscribe to i3's window events, switch to `[looking_glass] workspace`,
//!    and have i3 `exec` the client — i3 runs it in the desktop session, with the
//!    session's environment, even when we were called from SSH. When the client's window
//!    appears, move it (by `con_id`) to the workspace and focus it, in case the user
//!    switched away meanwhile. A client that exits before its window appears (not
//!    installed: 127; no shared memory; a bad argument) is reported at once with its exit
//!    status: the shell line i3 runs sends an i3 tick with it (`i3-msg -t send_tick`,
//!    shipped with i3; i3 gives its children `I3SOCK`). No window within the wait is an
//!    error that says what to check.
//! 3. Without i3 but with a `DISPLAY`/`WAYLAND_DISPLAY`, start the client directly and
//!    say that placement needs i3.
//! 4. With no desktop reachable at all, report that ([`LgOutcome::NoDesktop`]); for
//!    `handoff start` that is not a failure: the VM runs, and the client can be opened on
//!    the desktop later.
//!
//! The command and its arguments reach the client exactly as configured: each is
//! single-quoted for `sh -c` (which i3's exec uses), and the whole is quoted for i3's
//! command parser, so spaces, quotes and `;` survive both. The shell stays as the
//! client's parent (no `exec`) so that it can report the exit status.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::i3::{self, I3, I3Error, Session, Window};

/// How long [`open`] waits for the client's window by default.
pub const WINDOW_WAIT: Duration = Duration::from_secs(15);

/// Exit code of `handoff lg` when no desktop session is reachable from here.
pub const EXIT_NO_DESKTOP: u8 = 3;

/// What [`open`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum LgOutcome {
    /// The client was running; its window is focused now.
    Focused { con_id: u64, workspace: Option<String> },
    /// Started through i3 and placed on the workspace.
    Started { con_id: u64, workspace: String },
    /// No i3 to ask, but a display: started directly, placement left to the desktop.
    StartedWithoutI3 { pid: u32, why_no_i3: Vec<String> },
    /// No i3 and no display reachable from this process (e.g. plain SSH).
    NoDesktop { tried: Vec<String> },
}

impl LgOutcome {
    /// One paragraph for a person; `vm` is the VM's label when called after a start.
    pub fn describe(&self, cfg: &Config, vm: Option<&str>) -> String {
        let lg = &cfg.looking_glass;
        match self {
            LgOutcome::Focused { workspace, .. } => match workspace {
                Some(ws) => format!("Looking Glass was already open; focused it on workspace {ws}."),
                None => "Looking Glass was already open; focused it.".into(),
            },
            LgOutcome::Started { workspace, .. } => {
                format!("Started Looking Glass ({}) on workspace {workspace}.", lg.command)
            }
            LgOutcome::StartedWithoutI3 { pid, .. } => format!(
                "Started Looking Glass ({}, pid {pid}) without i3: no i3 session answered, so it is \
                 not moved to workspace {}; placement needs i3.",
                lg.command, lg.workspace
            ),
            LgOutcome::NoDesktop { tried } => {
                let vm = vm.map(|v| format!("{v} is running. ")).unwrap_or_default();
                format!(
                    "{vm}No desktop session is reachable from here (no i3 socket, no DISPLAY), so \
                     Looking Glass was not opened. Run `handoff lg` on the desktop, or from here with \
                     I3SOCK set to the session's socket.\n  looked at: {}",
                    tried.join("; ")
                )
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LgError {
    #[error(transparent)]
    I3(#[from] I3Error),
    #[error(
        "i3 ran `{command}` but no window with class or instance {class:?} appeared within {waited_s} s.\n  \
         check: does the client start when run by hand on the desktop? Does [looking_glass] window_class \
         match its window (`xprop WM_CLASS`, then click it)?"
    )]
    NoWindow {
        command: String,
        class: String,
        waited_s: u64,
    },
    #[error(
        "i3 ran `{command}`, but it exited with status {status} before its window appeared{}",
        exit_hint(*.status)
    )]
    ClientExited { command: String, status: i32 },
    #[error("cannot start {command:?}: {source}; is it installed and on PATH? (`handoff lg-test` checks)")]
    Spawn { command: String, source: std::io::Error },
    #[error("[looking_glass] command is empty; set it to the client, e.g. \"looking-glass-client\"")]
    NoCommand,
}

fn exit_hint(status: i32) -> &'static str {
    match status {
        127 => {
            ": it is not found on the desktop session's PATH. Is Looking Glass installed, and is \
               [looking_glass] command right? (`handoff lg-test` checks)"
        }
        126 => ": it is not executable. Is [looking_glass] command the client's binary?",
        _ => {
            ".\n  check: run it by hand on the desktop to see why; `handoff lg-test` checks its shared memory"
        }
    }
}

/// Quotes one word for `sh`: single quotes, each `'` as `'\''`.
pub fn sh_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The client's command line for `sh`, each word quoted.
pub fn shell_line(command: &str, args: &[String]) -> String {
    let mut line = sh_quote(command);
    for a in args {
        line.push(' ');
        line += &sh_quote(a);
    }
    line
}

/// The payload of the tick the shell sends when the client exits: `<tag> <status>`.
fn exit_tick_tag(nonce: &str) -> String {
    format!("handoff-lg-exited {nonce}")
}

/// The i3 command that starts the client; when the client exits, the shell sends an i3
/// tick `handoff-lg-exited <nonce> <status>` (to nobody once [`open`] stopped waiting).
///
/// Under sway (`sway`), `swaymsg` sends the tick (a sway desktop may have no i3-msg), and
/// the shell line travels base64-encoded: sway strips the quotes around an `exec`'s
/// argument but, unlike i3, leaves its `\"` escapes in, so a quoted argument would reach
/// the shell with backslashes in it. `echo <base64> | base64 -d | sh` has no character
/// either parser treats specially.
pub fn exec_command(command: &str, args: &[String], nonce: &str, sway: bool) -> String {
    if sway {
        let line = format!(
            "{} </dev/null; swaymsg -t send_tick {}$? >/dev/null 2>&1\n",
            shell_line(command, args),
            sh_quote(&format!("{} ", exit_tick_tag(nonce))),
        );
        return format!("exec echo {} | base64 -d | sh", base64(line.as_bytes()));
    }
    let line = format!(
        "{}; i3-msg -t send_tick {}\"$?\" >/dev/null 2>&1",
        shell_line(command, args),
        sh_quote(&format!("{} ", exit_tick_tag(nonce))),
    );
    format!("exec --no-startup-id {}", i3::quote(&line))
}

/// Standard base64 (RFC 4648, padded): one shell line for sway, no crate for it.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn client_window(conn: &mut I3, class: &str) -> Result<Option<Window>, I3Error> {
    let tree = conn.tree()?;
    Ok(i3::windows(&tree).into_iter().find(|w| w.is(class)))
}

/// Opens (or focuses) the Looking Glass client on the desktop `session` reaches, waiting
/// at most `wait` for a started client's window. See the module docs for the steps.
pub fn open(cfg: &Config, session: &Session, wait: Duration) -> Result<LgOutcome, LgError> {
    let lg = &cfg.looking_glass;
    if lg.command.trim().is_empty() {
        return Err(LgError::NoCommand);
    }
    let mut conn = match i3::find(session) {
        Ok(c) => c,
        Err(tried) => {
            if !session.has_display() {
                return Ok(LgOutcome::NoDesktop { tried });
            }
            let child = Command::new(&lg.command)
                .args(&lg.args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .map_err(|source| LgError::Spawn {
                    command: lg.command.clone(),
                    source,
                })?;
            return Ok(LgOutcome::StartedWithoutI3 {
                pid: child.id(),
                why_no_i3: tried,
            });
        }
    };
    tracing::info!("i3 at {}", conn.path().display());
    if let Some(w) = client_window(&mut conn, &lg.window_class)? {
        conn.command(&format!("[con_id={}] focus", w.con_id))?;
        return Ok(LgOutcome::Focused {
            con_id: w.con_id,
            workspace: w.workspace,
        });
    }

    // Subscribe before exec, on a second connection, so the new window's event cannot
    // be missed.
    let mut events = I3::connect(conn.path())?;
    events.subscribe(&["window", "tick"])?;
    let ws = i3::quote(&lg.workspace);
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let exited = format!("{} ", exit_tick_tag(&nonce));
    let exec = exec_command(&lg.command, &lg.args, &nonce, conn.is_sway()?);
    conn.command(&format!("workspace {ws}; {exec}"))?;
    // `--wait` is any u64 of seconds: a plain `+` could overflow and panic.
    let deadline = crate::sysfs_read::deadline_after(wait);
    let con_id = loop {
        match events.next_event(deadline)? {
            None => {
                // A window can also come up through a path that sends no "new" event we
                // saw (e.g. i3 restarted); look once more before giving up.
                if let Some(w) = client_window(&mut conn, &lg.window_class)? {
                    break w.con_id;
                }
                return Err(LgError::NoWindow {
                    command: shell_line(&lg.command, &lg.args),
                    class: lg.window_class.clone(),
                    waited_s: wait.as_secs(),
                });
            }
            Some((i3::EVENT_TICK, ev)) => {
                let status = ev["payload"].as_str().and_then(|p| p.strip_prefix(&exited));
                if let Some(status) = status {
                    return Err(LgError::ClientExited {
                        command: shell_line(&lg.command, &lg.args),
                        status: status.trim().parse().unwrap_or(-1),
                    });
                }
            }
            Some((i3::EVENT_WINDOW, ev)) if ev["change"] == "new" => {
                if let Some(w) = Window::from_container(&ev["container"])
                    && w.is(&lg.window_class)
                {
                    break w.con_id;
                }
            }
            Some(_) => {}
        }
    };
    conn.command(&format!(
        "[con_id={con_id}] move container to workspace {ws}; workspace {ws}; [con_id={con_id}] focus"
    ))?;
    Ok(LgOutcome::Started {
        con_id,
        workspace: lg.workspace.clone(),
    })
}

/// Why `handoff lg --on-vm-start` stopped watching; it runs until one of these, and systemd
/// restarts the unit, which then looks at the VM afresh.
#[derive(Debug, thiserror::Error)]
pub enum OnVmStartError {
    #[error("no [[vm]] in the config to wait for")]
    NoVm,
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::HypervisorError),
    #[error("lost libvirt's events for VM {vm} at {uri}: {why}")]
    Lost { vm: String, uri: String, why: String },
    /// The event stream ended without saying why.
    #[error("lost libvirt's events for VM {vm} at {uri}")]
    Ended { vm: String, uri: String },
}

/// `handoff lg --on-vm-start`: calls `started` whenever the first `[[vm]]` starts or resumes
/// (and at once when it already runs), keeping what it returns (the client's sleep inhibitor)
/// until the VM stops or crashes. `say` gets the progress line. Returns only when the VM's
/// events are lost.
pub fn on_vm_start<G>(
    cfg: &Config,
    hv: &mut dyn crate::hypervisor::Hypervisor,
    started: &mut dyn FnMut(&crate::config::VmConfig) -> Option<G>,
    say: &mut dyn FnMut(&str),
) -> OnVmStartError {
    use crate::hypervisor::{VmEvent, VmRef};
    use crate::live::DomainEvent;
    let Some(vm) = cfg.vm(None) else {
        return OnVmStartError::NoVm;
    };
    let (tx, events) = std::sync::mpsc::channel();
    let _subscription = match hv.subscribe(
        &[VmRef::from(vm)],
        std::sync::Arc::new(move |ev| tx.send(ev).is_ok()),
    ) {
        Ok(s) => s,
        Err(e) => return e.into(),
    };
    say(&format!(
        "Waiting for VM {} to start (Looking Glass opens then).",
        vm.name
    ));
    let mut held = None;
    match hv.probe(&VmRef::from(vm)) {
        Ok(p) if p.state == crate::status::VmState::Running => held = started(vm),
        Ok(_) => {}
        Err(e) => return e.into(),
    }
    for ev in events {
        match ev {
            VmEvent::Lifecycle {
                event: DomainEvent::Started | DomainEvent::Resumed,
                ..
            } => held = started(vm),
            VmEvent::Lifecycle {
                event: DomainEvent::Stopped | DomainEvent::Crashed,
                ..
            } => held = None,
            VmEvent::Lifecycle { .. } | VmEvent::Back { .. } | VmEvent::Refused(_) => {}
            VmEvent::Lost { why, .. } => {
                drop(held);
                return OnVmStartError::Lost {
                    vm: vm.name.clone(),
                    uri: vm.uri.clone(),
                    why,
                };
            }
        }
    }
    drop(held);
    OnVmStartError::Ended {
        vm: vm.name.clone(),
        uri: vm.uri.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_survive_quoting() {
        assert_eq!(sh_quote("looking-glass-client"), "looking-glass-client");
        assert_eq!(sh_quote("a; b 'c'"), r"'a; b '\''c'\'''");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(
            exec_command("xterm", &["-title".into(), "a; b \"c\"".into()], "42-7", false),
            r#"exec --no-startup-id "xterm -title 'a; b \"c\"'; i3-msg -t send_tick 'handoff-lg-exited 42-7 '\"$?\" >/dev/null 2>&1""#
        );
    }

    #[test]
    fn base64_is_rfc_4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
        let sway = exec_command("foot", &["a; b \"c\"".into()], "42-7", true);
        assert!(
            sway.starts_with("exec echo ") && sway.ends_with(" | base64 -d | sh"),
            "{sway}"
        );
        assert!(!sway.contains(['"', '\'', ';', ',']), "{sway}");
    }

    /// A hypervisor whose VM is in `state` and whose event stream delivers `events`, then ends.
    struct Scripted {
        state: crate::status::VmState,
        events: Vec<crate::hypervisor::VmEvent>,
    }

    impl crate::hypervisor::Hypervisor for Scripted {
        fn kind(&self) -> &'static str {
            "scripted"
        }
        fn list(
            &mut self,
            _: &str,
        ) -> Result<Vec<(crate::hypervisor::VmRef, crate::status::VmState)>, crate::hypervisor::HypervisorError>
        {
            unreachable!("on_vm_start lists nothing")
        }
        fn probe(
            &mut self,
            _: &crate::hypervisor::VmRef,
        ) -> Result<crate::hypervisor::Probe, crate::hypervisor::HypervisorError> {
            Ok(crate::hypervisor::Probe {
                state: self.state,
                reason: None,
            })
        }
        fn start(
            &mut self,
            _: &crate::hypervisor::VmRef,
        ) -> Result<crate::hypervisor::Start, crate::hypervisor::HypervisorError> {
            unreachable!("on_vm_start starts nothing")
        }
        fn shutdown(
            &mut self,
            _: &crate::hypervisor::VmRef,
        ) -> Result<crate::hypervisor::Task, crate::hypervisor::HypervisorError> {
            unreachable!("on_vm_start stops nothing")
        }
        fn destroy(
            &mut self,
            _: &crate::hypervisor::VmRef,
        ) -> Result<crate::hypervisor::Task, crate::hypervisor::HypervisorError> {
            unreachable!("on_vm_start stops nothing")
        }
        fn poll(
            &mut self,
            _: &crate::hypervisor::Task,
        ) -> Result<crate::hypervisor::TaskState, crate::hypervisor::HypervisorError> {
            unreachable!("on_vm_start has no task")
        }
        fn describe(
            &mut self,
            _: &crate::hypervisor::VmRef,
        ) -> Result<crate::hypervisor::Description, crate::hypervisor::HypervisorError> {
            unreachable!("on_vm_start describes nothing")
        }
        fn guest(&mut self, _: &crate::hypervisor::VmRef) -> crate::hypervisor::Guest {
            unreachable!("on_vm_start asks no guest")
        }
        fn subscribe(
            &mut self,
            vms: &[crate::hypervisor::VmRef],
            sink: crate::hypervisor::EventSink,
        ) -> Result<crate::hypervisor::Subscription, crate::hypervisor::HypervisorError> {
            assert_eq!(vms.len(), 1);
            for ev in self.events.drain(..) {
                sink(ev);
            }
            Ok(crate::hypervisor::Subscription::new(|| {}))
        }
    }

    fn lifecycle(event: crate::live::DomainEvent) -> crate::hypervisor::VmEvent {
        crate::hypervisor::VmEvent::Lifecycle {
            vm: crate::hypervisor::VmRef::named("test:///default", "win11"),
            event,
        }
    }

    /// What `started` saw: each call's VM, and how many of its guards are still held.
    fn run(
        state: crate::status::VmState,
        events: Vec<crate::hypervisor::VmEvent>,
    ) -> (
        Vec<String>,
        std::rc::Rc<std::cell::Cell<i32>>,
        OnVmStartError,
        Vec<String>,
    ) {
        struct Guard(std::rc::Rc<std::cell::Cell<i32>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.set(self.0.get() - 1);
            }
        }
        let held = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut opened = Vec::new();
        let mut said = Vec::new();
        let cfg = Config {
            vms: vec![crate::config::VmConfig::named("win11", "Windows")],
            ..Config::default()
        };
        let e = on_vm_start(
            &cfg,
            &mut Scripted { state, events },
            &mut |vm| {
                opened.push(vm.name.clone());
                held.set(held.get() + 1);
                Some(Guard(held.clone()))
            },
            &mut |line| said.push(line.to_owned()),
        );
        (opened, held, e, said)
    }

    #[test]
    fn on_vm_start_opens_on_each_start_and_releases_when_the_vm_stops() {
        use crate::live::DomainEvent::{Crashed, Resumed, Started, Stopped, Suspended};
        use crate::status::VmState;
        let lost = crate::hypervisor::VmEvent::Lost {
            at: "test:///default".into(),
            why: "libvirtd went away".into(),
        };
        let (opened, held, e, said) = run(
            VmState::Shutoff,
            vec![
                lifecycle(Started),
                lifecycle(Suspended),
                lifecycle(Stopped),
                lifecycle(Resumed),
                lifecycle(Crashed),
                lost,
            ],
        );
        assert_eq!(opened, ["win11", "win11"]);
        assert_eq!(held.get(), 0, "a guard outlived its VM");
        assert_eq!(
            said,
            ["Waiting for VM win11 to start (Looking Glass opens then)."]
        );
        assert_eq!(
            e.to_string(),
            "lost libvirt's events for VM win11 at qemu:///system: libvirtd went away"
        );
    }

    #[test]
    fn on_vm_start_opens_at_once_for_a_running_vm_and_lets_go_when_events_end() {
        let (opened, held, e, _) = run(crate::status::VmState::Running, vec![]);
        assert_eq!(opened, ["win11"]);
        assert_eq!(held.get(), 0);
        assert_eq!(
            e.to_string(),
            "lost libvirt's events for VM win11 at qemu:///system"
        );
    }

    #[test]
    fn on_vm_start_without_a_vm_says_so() {
        let cfg = Config {
            vms: vec![],
            ..Config::default()
        };
        let e = on_vm_start::<()>(
            &cfg,
            &mut Scripted {
                state: crate::status::VmState::Running,
                events: vec![],
            },
            &mut |_| unreachable!(),
            &mut |_| {},
        );
        assert_eq!(e.to_string(), "no [[vm]] in the config to wait for");
    }
}
