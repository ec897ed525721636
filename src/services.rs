//! `handoff install-services`: the user's session pieces (the seed's `install-services`).
//!
//! Writes, for the user running it (never as root for someone else):
//! - `$XDG_CONFIG_HOME/systemd/user/handoff-tray.service`, tied to
//!   `graphical-session.target`, and enabled by the same symlink `systemctl --user enable`
//!   makes (`graphical-session.target.wants/`);
//! - with `lg_autostart`, `handoff-lg-autostart.service`, which runs
//!   `handoff lg --on-vm-start` and so opens Looking Glass whenever the VM starts (from
//!   libvirt's lifecycle events in the session, never from the root hook);
//! - `$XDG_CONFIG_HOME/autostart/handoff-tray.desktop` for sessions without systemd user
//!   units (`X-systemd-skip=true`, so systemd's autostart generator leaves it to the unit);
//! - `$XDG_DATA_HOME/applications/handoff-windows.desktop`, a launcher that runs
//!   `handoff start` (the seed's `windows-start`).
//!
//! Every file starts with [`MARKER`]. A file that exists without it is someone else's:
//! it is neither overwritten nor removed. Installing twice writes identical bytes.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;

pub const MARKER: &str =
    "# Installed by `handoff install-services`; `handoff install-services --uninstall` removes it.";

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("neither XDG_CONFIG_HOME nor HOME is set; cannot tell where your user units go")]
    NoHome,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the binary directory {0} has no handoff binary; pass the directory handoff is installed in")]
    NoBinary(PathBuf),
}

/// Where things go and what they run.
#[derive(Debug, Clone)]
pub struct Layout {
    pub config_home: PathBuf,
    pub data_home: PathBuf,
    /// The directory holding `handoff` and `handoff-tray`.
    pub bin_dir: PathBuf,
}

impl Layout {
    /// From `XDG_CONFIG_HOME`/`XDG_DATA_HOME`/`HOME` and the running binary's directory.
    pub fn from_env() -> Result<Layout, ServicesError> {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = env("HOME");
        let config_home = env("XDG_CONFIG_HOME")
            .or_else(|| home.as_ref().map(|h| h.join(".config")))
            .ok_or(ServicesError::NoHome)?;
        let data_home = env("XDG_DATA_HOME")
            .or_else(|| home.as_ref().map(|h| h.join(".local/share")))
            .ok_or(ServicesError::NoHome)?;
        let exe = std::env::current_exe().map_err(|source| ServicesError::Io {
            path: "/proc/self/exe".into(),
            source,
        })?;
        let bin_dir = exe.parent().unwrap_or(Path::new("/")).to_owned();
        Ok(Layout {
            config_home,
            data_home,
            bin_dir,
        })
    }

    fn units(&self) -> PathBuf {
        self.config_home.join("systemd/user")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Created,
    Updated,
    AlreadyInstalled,
    Removed,
    NotInstalled,
    /// A file there that handoff did not write: left alone.
    Foreign,
}

#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub path: PathBuf,
    pub change: Change,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub items: Vec<Item>,
}

impl Report {
    pub fn foreign(&self) -> usize {
        self.items.iter().filter(|i| i.change == Change::Foreign).count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let would = if self.dry_run { "would be " } else { "" };
        for i in &self.items {
            let what = match i.change {
                Change::Created => format!("{would}created"),
                Change::Updated => format!("{would}updated"),
                Change::AlreadyInstalled => "already installed".into(),
                Change::Removed => format!("{would}removed"),
                Change::NotInstalled => "not installed".into(),
                Change::Foreign => "not handoff's: left alone".into(),
            };
            writeln!(f, "{}: {what}", i.path.display())?;
        }
        let changed = self
            .items
            .iter()
            .any(|i| matches!(i.change, Change::Created | Change::Updated));
        if changed && !self.dry_run {
            writeln!(
                f,
                "Next: systemctl --user daemon-reload && systemctl --user start handoff-tray.service"
            )?;
        }
        Ok(())
    }
}

/// Quotes one word for a systemd `ExecStart=` line.
fn systemd_word(w: &str) -> String {
    let w = w.replace('%', "%%");
    if w.bytes()
        .all(|b| b.is_ascii_graphic() && !b"\"'\\;$".contains(&b))
        && !w.is_empty()
    {
        return w;
    }
    format!(
        "\"{}\"",
        w.replace('\\', "\\\\").replace('"', "\\\"").replace('$', "$$")
    )
}

/// Quotes one word for a desktop entry's `Exec=` (Desktop Entry spec, "The Exec key").
fn desktop_word(w: &str) -> String {
    let w = w.replace('%', "%%");
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"'\\`$<>~|&;*?#()".contains(&b))
    {
        return w;
    }
    let mut q = String::from("\"");
    for c in w.chars() {
        if matches!(c, '"' | '`' | '$' | '\\') {
            // The spec's escaping, then the string-level escaping of the backslash.
            q.push_str("\\\\");
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// The files [`install`] writes, with their contents.
pub fn files(cfg: &Config, layout: &Layout, lg_autostart: bool) -> Vec<(PathBuf, String)> {
    let handoff = layout.bin_dir.join("handoff");
    let tray = layout.bin_dir.join("handoff-tray");
    let handoff_s = handoff.to_string_lossy();
    let tray_s = tray.to_string_lossy();
    let label = cfg
        .vm(None)
        .map(|v| v.label().to_owned())
        .unwrap_or_else(|| "Windows".into());
    let mut out = vec![(
        layout.units().join("handoff-tray.service"),
        format!(
            "{MARKER}\n\
             [Unit]\n\
             Description=handoff tray icon: who owns the GPU\n\
             PartOf=graphical-session.target\n\
             After=graphical-session.target\n\
             \n\
             [Service]\n\
             ExecStart={}\n\
             Restart=on-failure\n\
             \n\
             [Install]\n\
             WantedBy=graphical-session.target\n",
            systemd_word(&tray_s)
        ),
    )];
    if lg_autostart {
        out.push((
            layout.units().join("handoff-lg-autostart.service"),
            format!(
                "{MARKER}\n\
                 [Unit]\n\
                 Description=handoff: open Looking Glass when the VM starts\n\
                 PartOf=graphical-session.target\n\
                 After=graphical-session.target\n\
                 \n\
                 [Service]\n\
                 ExecStart={} lg --on-vm-start\n\
                 Restart=on-failure\n\
                 RestartSec=5\n\
                 \n\
                 [Install]\n\
                 WantedBy=graphical-session.target\n",
                systemd_word(&handoff_s)
            ),
        ));
    }
    out.push((
        layout.config_home.join("autostart/handoff-tray.desktop"),
        format!(
            "{MARKER}\n\
             [Desktop Entry]\n\
             Type=Application\n\
             Name=handoff tray\n\
             Comment=Shows who owns the GPU\n\
             Exec={}\n\
             Terminal=false\n\
             NoDisplay=true\n\
             X-systemd-skip=true\n",
            desktop_word(&tray_s)
        ),
    ));
    out.push((
        layout.data_home.join("applications/handoff-windows.desktop"),
        format!(
            "{MARKER}\n\
             [Desktop Entry]\n\
             Type=Application\n\
             Name={label}\n\
             Comment=Start {label} with the GPU and open Looking Glass\n\
             Exec={} start\n\
             Terminal=false\n\
             Icon=computer\n\
             Categories=System;Emulator;\n",
            desktop_word(&handoff_s)
        ),
    ));
    out
}

/// The enablement symlink for the tray unit (what `systemctl --user enable` creates).
fn wants_link(layout: &Layout) -> PathBuf {
    layout
        .units()
        .join("graphical-session.target.wants/handoff-tray.service")
}

const ALL_NAMES: [&str; 2] = ["handoff-tray.service", "handoff-lg-autostart.service"];

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ServicesError + '_ {
    move |source| ServicesError::Io {
        path: path.to_owned(),
        source,
    }
}

fn ours(path: &Path) -> Option<bool> {
    std::fs::read_to_string(path).ok().map(|t| t.starts_with(MARKER))
}

pub fn install(
    cfg: &Config,
    layout: &Layout,
    lg_autostart: bool,
    dry_run: bool,
) -> Result<Report, ServicesError> {
    let mut items = Vec::new();
    for (path, text) in files(cfg, layout, lg_autostart) {
        let change = match std::fs::read_to_string(&path) {
            Ok(old) if old == text => Change::AlreadyInstalled,
            Ok(old) if old.starts_with(MARKER) => Change::Updated,
            Ok(_) => Change::Foreign,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Change::Created,
            Err(e) => return Err(io(&path)(e)),
        };
        if !dry_run && matches!(change, Change::Created | Change::Updated) {
            let dir = path.parent().unwrap();
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let tmp = path.with_extension("handoff-tmp");
            std::fs::write(&tmp, &text).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        items.push(Item { path, change });
    }
    let link = wants_link(layout);
    let target = Path::new("../handoff-tray.service");
    let change = match std::fs::read_link(&link) {
        Ok(t) if t == target => Change::AlreadyInstalled,
        Ok(_) => Change::Foreign,
        Err(_) if link.symlink_metadata().is_ok() => Change::Foreign,
        Err(_) => Change::Created,
    };
    if !dry_run && change == Change::Created {
        let dir = link.parent().unwrap();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::os::unix::fs::symlink(target, &link).map_err(io(&link))?;
    }
    items.push(Item { path: link, change });
    Ok(Report { dry_run, items })
}

pub fn uninstall(layout: &Layout, dry_run: bool) -> Result<Report, ServicesError> {
    let mut items = Vec::new();
    let link = wants_link(layout);
    let change = match std::fs::read_link(&link) {
        Ok(t) if t == Path::new("../handoff-tray.service") => Change::Removed,
        Ok(_) => Change::Foreign,
        Err(_) => Change::NotInstalled,
    };
    if change == Change::Removed && !dry_run {
        std::fs::remove_file(&link).map_err(io(&link))?;
        // The wants directory goes too when nothing else is in it.
        let _ = std::fs::remove_dir(link.parent().unwrap());
    }
    items.push(Item { path: link, change });
    let mut paths: Vec<PathBuf> = ALL_NAMES.iter().map(|n| layout.units().join(n)).collect();
    paths.push(layout.config_home.join("autostart/handoff-tray.desktop"));
    paths.push(layout.data_home.join("applications/handoff-windows.desktop"));
    for path in paths {
        let change = match ours(&path) {
            Some(true) => Change::Removed,
            Some(false) => Change::Foreign,
            None => Change::NotInstalled,
        };
        if change == Change::Removed && !dry_run {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        items.push(Item { path, change });
    }
    Ok(Report { dry_run, items })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_paths_with_spaces() {
        assert_eq!(
            systemd_word("/opt/handoff/bin/handoff"),
            "/opt/handoff/bin/handoff"
        );
        assert_eq!(systemd_word("/home/a b/100%/h"), "\"/home/a b/100%%/h\"");
        assert_eq!(desktop_word("/home/a b/h"), "\"/home/a b/h\"");
        assert_eq!(desktop_word("/x/$y"), "\"/x/\\\\$y\"");
    }
}
