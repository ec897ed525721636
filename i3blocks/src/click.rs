//! Clicks: what each button does, and running it without the bar waiting.
//!
//! | button | the VM runs (hook state `vfio`) | otherwise |
//! |---|---|---|
//! | left | `handoff lg` (Looking Glass on its workspace) | a notification: the status and who uses the GPU |
//! | right | a notification "Stop Windows?" whose *Stop* action runs `handoff stop` (graceful) | `handoff start` of the first `[[vm]]` (with several `[[gpu]]`s, `handoff start --gpu` the block's GPU: the first VM whose definition passes it through); refused at once, with the holders, when anything holds the GPU |
//! | middle | `[block] middle_click` (argv), when set | the same |
//!
//! **Detached.** Anything that can take longer than printing a line runs in a new
//! session (`setsid` in the child before exec) with stdin/stdout on `/dev/null` and stderr
//! appended to `$XDG_RUNTIME_DIR/handoff-block.log`; the block never waits for it and
//! exits, so the bar gets its refreshed line at once. Jobs that report an outcome
//! (start, the stop question, Looking Glass, the middle command) run as
//! `handoff-block --job …`: that detached copy of this binary waits for `handoff` and
//! then sends a notification saying how it went.
//!
//! **Notifications** go through `notify-send` (libnotify-bin), spawned the same way. Not
//! through a D-Bus library: zbus would add its crates and its startup to every run of the
//! one-shot block, which runs on every refresh, while a notification is rare. `notify-send
//! -A stop=Stop` (libnotify ≥ 0.7.9) waits for the choice and prints `stop`, which is how
//! the stop question gets its answer — in the detached job, never in the bar.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use handoff::config::Config;

use handoff::verdict::State;

use crate::view::{self, View};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Button {
    Left,
    Middle,
    Right,
}

impl Button {
    pub fn parse(s: &str) -> Option<Button> {
        Some(match s {
            "left" | "1" => Button::Left,
            "middle" | "2" => Button::Middle,
            "right" | "3" => Button::Right,
            _ => return None,
        })
    }
}

/// What a button does in the state the bar shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Tell the person something (title, body, urgency).
    Notify(String, String, Urgency),
    /// A detached `handoff-block --job …`.
    Job(Vec<String>),
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    Normal,
    Critical,
}

/// Decides, without side effects, what `button` does while the block shows `v`.
pub fn action(cfg: &Config, v: &View, button: Button) -> Action {
    let vm = v.vm_shown().map(str::to_owned);
    match (button, vm) {
        (Button::Left, Some(_)) => Action::Job(vec!["lg".into()]),
        (Button::Left, None) => Action::Notify(v.text.clone(), v.detail.clone(), urgency(v)),
        (Button::Right, Some(vm)) => Action::Job(vec!["ask-stop".into(), vm]),
        (Button::Right, None) => right_when_off(cfg, v),
        (Button::Middle, _) if cfg.block.middle_click.is_empty() => Action::Nothing,
        (Button::Middle, _) => Action::Job(vec!["middle".into()]),
    }
}

fn urgency(v: &View) -> Urgency {
    if v.verdict.state.urgent() {
        Urgency::Critical
    } else {
        Urgency::Normal
    }
}

fn right_when_off(cfg: &Config, v: &View) -> Action {
    let Some(first) = cfg.vms.first() else {
        return Action::Notify(
            "No VM configured".into(),
            "Add a [[vm]] with the libvirt domain's name to the handoff config.".into(),
            Urgency::Normal,
        );
    };
    // With several GPUs the block shows one (the config is focused on it: its primary),
    // and the VM to start is one that takes it. Which one is in the VMs' definitions,
    // which only the CLI reads (the block links no libvirt): `handoff start --gpu`.
    let several = cfg.gpu.len() > 1;
    let not_started = if several {
        format!("No VM started on {}", gpu_name(cfg))
    } else {
        format!("{} not started", handoff::escape::plain(first.label()))
    };
    match v.verdict.state {
        State::Idle if several => Action::Job(vec!["start-gpu".into(), cfg.gpu.address.to_string()]),
        State::Idle => Action::Job(vec!["start".into(), first.name.clone()]),
        State::Busy => Action::Notify(
            format!("{not_started}: the GPU is in use"),
            format!("Stop these first, then click again:\n{}", v.holders.join("\n")),
            Urgency::Critical,
        ),
        State::Switching => Action::Notify(
            format!("{not_started}: the GPU is switching"),
            v.detail.clone(),
            Urgency::Normal,
        ),
        _ => Action::Notify(not_started, v.detail.clone(), Urgency::Critical),
    }
}

/// The block's GPU as a person names it: its label, else its address.
fn gpu_name(cfg: &Config) -> String {
    match &cfg.gpu.label {
        Some(l) => handoff::escape::plain(l),
        None => cfg.gpu.address.to_string(),
    }
}

/// Carries out an [`Action`] without waiting for anything it starts.
pub fn perform(action: &Action) -> io::Result<()> {
    match action {
        Action::Nothing => Ok(()),
        Action::Notify(title, body, u) => spawn_detached(&notify_argv(title, body, *u, &[])),
        Action::Job(args) => {
            let mut argv: Vec<OsString> = vec![std::env::current_exe()?.into(), "--job".into()];
            argv.extend(args.iter().map(OsString::from));
            spawn_detached(&argv)
        }
    }
}

/// `notify-send` with handoff's app name; `actions` are `name=Label` pairs. The body is
/// markup to the server (body-markup), so it is escaped for it; the title is plain text
/// by the spec, so only its controls are.
pub fn notify_argv(title: &str, body: &str, u: Urgency, actions: &[&str]) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        "notify-send".into(),
        "--app-name=handoff".into(),
        "--icon=video-display".into(),
        match u {
            Urgency::Normal => "--urgency=normal".into(),
            Urgency::Critical => "--urgency=critical".into(),
        },
    ];
    for a in actions {
        argv.push(format!("--action={a}").into());
    }
    argv.push(handoff::escape::plain(title).into());
    argv.push(handoff::escape::markup(body).into());
    argv
}

/// Where detached children's stderr goes.
fn log_path() -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    dir.join("handoff-block.log")
}

/// Starts `argv` in a session of its own and returns at once; the child is never waited
/// for (this process exits soon, and init or the session's subreaper reaps it).
pub fn spawn_detached(argv: &[OsString]) -> io::Result<()> {
    let (program, args) = argv.split_first().expect("argv has a program");
    let log = OpenOptions::new().create(true).append(true).open(log_path());
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.map(Stdio::from).unwrap_or_else(|_| Stdio::null()));
    // SAFETY: the closure runs between fork and exec, so it may only make async-signal-safe
    // calls: nix's setsid is setsid(2) and nothing else (no allocation, no lock). It only
    // fails when we already lead a group, which a freshly forked child never does.
    unsafe {
        cmd.pre_exec(|| {
            let _ = nix::unistd::setsid();
            Ok(())
        });
    }
    cmd.spawn().map(drop)
}

/// The `handoff` CLI: next to this binary when installed together, else on PATH.
pub fn handoff_bin() -> OsString {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("handoff")))
        .filter(|p| p.is_file())
        .map(OsString::from)
        .unwrap_or_else(|| "handoff".into())
}

/// The detached half of a click (`handoff-block --job …`): runs `handoff`, waits for it
/// (nobody waits for us), and says how it went.
pub fn run_job(cfg: &Config, args: &[String]) -> io::Result<()> {
    let label = |vm: &str| view::label(cfg, vm);
    match args {
        [kind, vm] if kind == "start" => {
            let l = label(vm);
            let out = run(&[handoff_bin(), "start".into(), vm.into()]);
            // What the start did shows at once, not at the next poll of a PVE node.
            crate::watch::refresh_streaming_blocks(&cfg.host.procfs);
            let out = out?;
            match out {
                Ok(_) => notify(
                    &format!("{l} started"),
                    &format!("The GPU is in {l}."),
                    Urgency::Normal,
                ),
                Err(why) => notify(&format!("{l} did not start"), &why, Urgency::Critical),
            }
        }
        [kind, gpu] if kind == "start-gpu" => {
            // The CLI picks the VM (it reads the definitions) and says which in its JSON.
            let out = run(&[
                handoff_bin(),
                "start".into(),
                "--gpu".into(),
                gpu.into(),
                "--json".into(),
                "-q".into(),
            ]);
            crate::watch::refresh_streaming_blocks(&cfg.host.procfs);
            let shown = cfg
                .focused_on(gpu)
                .map_or_else(|| handoff::escape::plain(gpu), |c| gpu_name(&c));
            match out? {
                Ok(json) => {
                    let l = serde_json::from_str::<serde_json::Value>(&json)
                        .ok()
                        .and_then(|j| j["label"].as_str().map(handoff::escape::plain))
                        .unwrap_or_else(|| "The VM".into());
                    notify(
                        &format!("{l} started"),
                        &format!("{shown} is in {l}."),
                        Urgency::Normal,
                    )
                }
                Err(why) => notify(&format!("No VM started on {shown}"), &why, Urgency::Critical),
            }
        }
        [kind, vm] if kind == "ask-stop" => {
            let l = label(vm);
            let ask = notify_argv(
                &format!("Stop {l}?"),
                &format!("Shut {l} down gracefully; the GPU then returns to Linux."),
                Urgency::Normal,
                &["stop=Stop"],
            );
            let chosen = Command::new(&ask[0])
                .args(&ask[1..])
                .stdin(Stdio::null())
                .output()?;
            if String::from_utf8_lossy(&chosen.stdout).trim() != "stop" {
                return Ok(());
            }
            let out = run(&[handoff_bin(), "stop".into(), vm.into()]);
            crate::watch::refresh_streaming_blocks(&cfg.host.procfs);
            match out? {
                Ok(_) => notify(
                    &format!("{l} stopped"),
                    "The GPU is back on Linux.",
                    Urgency::Normal,
                ),
                Err(why) => notify(&format!("{l} did not stop"), &why, Urgency::Critical),
            }
        }
        [kind] if kind == "lg" => match run(&[handoff_bin(), "lg".into()])? {
            Ok(_) => Ok(()),
            Err(why) => notify("Looking Glass did not open", &why, Urgency::Critical),
        },
        [kind] if kind == "middle" => {
            let argv: Vec<OsString> = cfg.block.middle_click.iter().map(OsString::from).collect();
            if argv.is_empty() {
                return Ok(());
            }
            match run(&argv)? {
                Ok(_) => Ok(()),
                Err(why) => notify(
                    &format!("{} failed", cfg.block.middle_click[0]),
                    &why,
                    Urgency::Critical,
                ),
            }
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown job {args:?}"),
        )),
    }
}

/// Runs and waits; Err carries what it said (stderr, else stdout), trimmed for a
/// notification.
fn run(argv: &[OsString]) -> io::Result<Result<String, String>> {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", argv[0].to_string_lossy())))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let name = argv
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    for line in stderr.lines() {
        log(&format!("{name}: {line}"));
    }
    if out.status.success() {
        Ok(Ok(stdout))
    } else {
        let said = if stderr.is_empty() { stdout } else { stderr };
        Ok(Err(if said.is_empty() {
            format!("{} exited with {}", argv[0].to_string_lossy(), out.status)
        } else {
            said
        }))
    }
}

/// One line of `handoff-block.log` (the detached jobs' stderr): the time (UTC), the
/// message, and a newline, so that entries of jobs that ran days apart don't run together.
pub fn log(msg: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    eprintln!("{} {}", utc(now), handoff::escape::plain(msg));
}

/// `2026-12-06T07:01:02Z` for seconds since the epoch (Howard Hinnant's days-to-civil;
/// the block links no date crate for one log line).
pub fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A notification from the detached job; it may wait (nobody waits for the job).
fn notify(title: &str, body: &str, u: Urgency) -> io::Result<()> {
    let argv = notify_argv(title, body, u, &[]);
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()?;
    // No notification daemon, most often: the log is then the only place that says so.
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        log(&format!("notify-send: {line}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_are_utc_calendar_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_540_462), "2026-12-06T07:01:02Z");
    }

    #[test]
    fn a_notification_body_is_escaped_for_markup_and_its_title_for_plain_text() {
        let argv = notify_argv(
            "Win\x1b[31m not started",
            "Stop these first:\nevil\\x1b[31m<b>x (pid 1, user root) & more",
            Urgency::Critical,
            &[],
        );
        let n = argv.len();
        assert_eq!(argv[n - 2], OsString::from(r"Win\x1b[31m not started"));
        // The line break is ours and stays; the name's markup shows as text.
        assert_eq!(
            argv[n - 1],
            OsString::from("Stop these first:\nevil\\x1b[31m&lt;b&gt;x (pid 1, user root) &amp; more")
        );
    }
}
