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
//! Text that reaches a bar is escaped for it ([`handoff::escape`]): a VM label or a
//! process name must neither break the line protocol (a newline) nor open markup.
//! `i3blocks` (three lines, i3blocks' default `markup=none`) and `i3status-rust` (which
//! escapes for itself) get plain text; `i3blocks-json` declares `"markup": "pango"` and is
//! escaped for it; waybar parses its text and tooltip as Pango markup; polybar's `%{`
//! would open a format tag.
//!
//! In `--watch` mode every format prints one line per change; for `i3blocks` that line is
//! the full text only (i3blocks reads a persist block's lines as full texts), so use
//! `i3blocks-json` there to keep the colour.

use handoff::escape::{markup, plain, polybar};
use serde_json::json;

use crate::view::{View, look_of};

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
    let look = look_of(v);
    let urgent = v.verdict.state.urgent();
    match format {
        Format::I3blocks if one_line => plain(text),
        Format::I3blocks => format!("{}\n{}\n{}", plain(text), plain(&v.short), look.colour),
        Format::I3blocksJson => json!({
            "full_text": markup(&plain(text)),
            "short_text": markup(&plain(&v.short)),
            "color": look.colour,
            "urgent": urgent,
            "markup": "pango",
        })
        .to_string(),
        Format::I3statusRust => json!({
            "icon": "gpu",
            "state": look.i3status,
            "text": plain(text),
            "short_text": plain(&v.short),
        })
        .to_string(),
        Format::Waybar => json!({
            "text": markup(&plain(text)),
            "alt": look.class,
            "tooltip": markup(&tooltip(v)),
            "class": look.class,
        })
        .to_string(),
        // `%{` starts a tag: a VM label must not open one.
        Format::Polybar => format!("%{{F{}}}{}%{{F-}}", look.colour, polybar(text)),
    }
}

/// What a tooltip or a notification body says: the detail, which names the holders. Plain
/// text, one line per line of ours: the parts that came from elsewhere (a label, a holder
/// line) were escaped with [`plain`] where the view was made, so a `\n` here is ours.
pub fn tooltip(v: &View) -> String {
    format!("{}\n{}", plain(&v.text), v.detail)
}
