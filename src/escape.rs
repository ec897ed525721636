//! Escaping text that came from someone else (process names and command lines, user and
//! unit names, VM names and labels) for the place it is shown.
//!
//! A process chooses its own name and argv: `exec -a "$(printf 'x\e[31m<b>\n')"` is one
//! line of shell. Shown raw, such a name recolours a terminal, forges extra lines in
//! libvirt's error (the hook's stderr) or in a bar's output protocol (one line per
//! reading), and opens markup in a notification or a waybar tooltip. Each destination has
//! its own rules, so each has its own function here. [`plain`] may be applied where a name
//! is joined into a line (it is idempotent); [`markup`] only where the text leaves for its
//! destination, once.
//!
//! | destination | function | what changes |
//! |---|---|---|
//! | terminal, stderr, libvirt's error, plain-text UIs | [`plain`] | control characters (newlines too) and bidi overrides become `\x1b`-style escapes |
//! | Pango markup: notification bodies, waybar text/tooltip, i3bar `markup=pango` | [`markup`] | `& < > " '` become entities; controls as in [`plain`], except `\n` (a line break of ours) |
//! | polybar's line | [`polybar`] | [`plain`], and `%{` (a format tag) is broken up |

use std::fmt::Write;

/// Whether `c` must not reach a terminal or a line-based protocol as is: C0/C1 controls
/// and DEL, and the Unicode format characters that reorder or hide text (bidi overrides
/// and isolates, which make a name read as something else).
fn is_dangerous(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    if (c as u32) < 0x100 {
        let _ = write!(out, "\\x{:02x}", c as u32);
    } else {
        let _ = write!(out, "\\u{{{:x}}}", c as u32);
    }
}

/// For a terminal, a log line or libvirt's error message: every control character
/// (newline, ESC, BEL, …) and bidi override shown as an escape (`\x1b`, `\x0a`,
/// `\u{202e}`). The result is one line with nothing a terminal acts on, and escaping it
/// again changes nothing (a backslash is left as it is), so a line built from escaped
/// parts may safely be escaped whole.
pub fn plain(s: &str) -> String {
    if !s.chars().any(is_dangerous) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_dangerous(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// For Pango markup (notification bodies, waybar's text and tooltip, i3bar with
/// `markup=pango`): `& < > " '` as entities, control characters as in [`plain`]. A `\n`
/// stays a line break: it is how our own multi-line texts separate lines, and text from
/// elsewhere has been through [`plain`] before it was joined into them.
pub fn markup(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' => out.push('\n'),
            c if is_dangerous(c) => push_escaped(&mut out, c),
            c => out.push(c),
        }
    }
    out
}

/// For polybar's `custom/script` line: one line ([`plain`]), and no `%{`, which would
/// open a format tag (colour, action, font). `%{` is shown as `% {`.
pub fn polybar(s: &str) -> String {
    plain(s).replace("%{", "% {")
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVIL: &str = "evil\x1b[31m<b>x\n\x07";

    #[test]
    fn plain_shows_controls_as_escapes_on_one_line() {
        assert_eq!(plain(EVIL), r"evil\x1b[31m<b>x\x0a\x07");
        assert_eq!(plain("python3"), "python3");
        assert_eq!(plain("a\tb\r\x7f"), r"a\x09b\x0d\x7f");
        // A C1 CSI and a right-to-left override.
        assert_eq!(plain("x\u{9b}31m\u{202e}gpj.exe"), r"x\x9b31m\u{202e}gpj.exe");
        assert!(!plain(EVIL).chars().any(char::is_control));
        // Escaping twice is escaping once: parts escaped at their source may be joined and
        // escaped again at the destination.
        assert_eq!(plain(&plain(EVIL)), plain(EVIL));
    }

    #[test]
    fn markup_escapes_entities_and_controls_but_keeps_line_breaks() {
        assert_eq!(markup(EVIL), "evil\\x1b[31m&lt;b&gt;x\n\\x07");
        assert_eq!(
            markup(r#"Tom & "Jerry's" <i>"#),
            "Tom &amp; &quot;Jerry&#39;s&quot; &lt;i&gt;"
        );
        assert_eq!(markup("GPU: Linux · 2 busy"), "GPU: Linux · 2 busy");
        // Text that went through `plain` first (a holder line) keeps its escapes visible.
        assert_eq!(markup(&plain(EVIL)), r"evil\x1b[31m&lt;b&gt;x\x0a\x07");
    }

    #[test]
    fn polybar_breaks_format_tags_and_lines() {
        assert_eq!(polybar("%{F#f00}red%{F-}\nx"), r"% {F#f00}red% {F-}\x0ax");
        assert_eq!(polybar("100%"), "100%");
    }
}
