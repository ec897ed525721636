//! One [`View`] in the shape each bar parses.
//!
//! | `--format` | what the bar reads | colour/state |
//! |---|---|---|
//! | `i3blocks` | three lines: full text, short text, colour (`format=` unset); exit 33 marks it urgent | `#rrggbb` |
//! | `i3blocks-json` | one i3bar block object (`format=json`): `full_text`, `short_text`, `color`, `urgent` | `#rrggbb` |
//! | `i3status-rust` | `custom` block with `json = true`: `icon`, `state`, `text`, `short_text` | `state`: Idle/Info/Good/Warning/Critical |
//! | `waybar` | `custom` module with `return-type = "json"`: `text`, `alt`, `tooltip`, `class` | `class` (style it in CSS) |
//! | `polybar` | `custom/script`: one line with `%{F#rrggbb}…%{F-}` colour tags | the tag |
//!
//! In `--watch` mode every format prints one line per change; for `i3blocks` that line is
//! the full text only (i3blocks reads a persist block's lines as full texts), so use
//! `i3blocks-json` there to keep the colour.

use serde_json::json;

use crate::view::{View, look};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    I3blocks,
    I3blocksJson,
    I3statusRust,
    Waybar,
    Polybar,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "i3blocks" => Format::I3blocks,
            "i3blocks-json" => Format::I3blocksJson,
            "i3status-rust" => Format::I3statusRust,
            "waybar" => Format::Waybar,
            "polybar" => Format::Polybar,
            _ => return None,
        })
    }
}

/// The output for one reading. `short` puts the short text in the main text (polybar and
/// waybar have no short form of their own). `one_line`: for `--watch`.
pub fn render(v: &View, format: Format, short: bool, one_line: bool) -> String {
    let text = if short { &v.short } else { &v.text };
    let tooltip = tooltip(v);
    let look = look(v.verdict.state);
    let urgent = v.verdict.state.urgent();
    match format {
        Format::I3blocks if one_line => text.clone(),
        Format::I3blocks => format!("{text}\n{}\n{}", v.short, look.colour),
        Format::I3blocksJson => json!({
            "full_text": text,
            "short_text": v.short,
            "color": look.colour,
            "urgent": urgent,
        })
        .to_string(),
        Format::I3statusRust => json!({
            "icon": "gpu",
            "state": look.i3status,
            "text": text,
            "short_text": v.short,
        })
        .to_string(),
        Format::Waybar => json!({
            "text": text,
            "alt": look.class,
            "tooltip": tooltip,
            "class": look.class,
        })
        .to_string(),
        // `%{` starts a tag: a VM label must not open one.
        Format::Polybar => format!("%{{F{}}}{}%{{F-}}", look.colour, text.replace("%{", "% {")),
    }
}

/// What a tooltip or a notification body says: the detail, which names the holders.
pub fn tooltip(v: &View) -> String {
    format!("{}\n{}", v.text, v.detail)
}
