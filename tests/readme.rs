//! The README and `docs/*.md` against the code, so that what a newcomer reads stays true:
//!
//! - every message quoted in a ```` ```text ```` block (the troubleshooting guide's messages,
//!   the setup guide's "if it says instead") still exists in the source: its fixed parts,
//!   between the `<placeholders>` and `…`, are looked up in the Rust sources of the four
//!   crates (comments and unit tests left out), so renaming a message fails here until the
//!   docs follow;
//! - every `handoff <subcommand>` in code (inline spans, shell and console blocks) is a
//!   subcommand of the built binary, and every `--flag` written after it is one of its flags;
//! - every TOML block that configures handoff (`[gpu]`, `[[vm]]`) parses as a config;
//! - every relative link and image points at a file that exists, and every `#anchor` at a
//!   heading of that file.
//!
//! It reads the files at test time (relative to `CARGO_MANIFEST_DIR`) and runs only
//! `handoff <sub> --help`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every `docs/*.md`, as (path relative to the root, text).
fn docs() -> Vec<(String, String)> {
    let mut files = vec!["README.md".to_owned()];
    let mut in_docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    in_docs.sort();
    files.extend(in_docs);
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(root().join(&f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            (f, text)
        })
        .collect()
}

/// A fenced code block: its info string, first content line (1-based) and lines.
struct Block {
    info: String,
    line: usize,
    lines: Vec<String>,
}

/// The fenced blocks of a markdown text, and the lines outside them (numbered from 1).
fn split_markdown(text: &str) -> (Vec<Block>, Vec<(usize, String)>) {
    let mut blocks = Vec::new();
    let mut prose = Vec::new();
    let mut open: Option<(String, Block)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = line.trim_start();
        match &mut open {
            Some((fence, block)) => {
                if trimmed.starts_with(fence.as_str()) && trimmed.trim_start_matches('`').trim().is_empty() {
                    blocks.push(open.take().unwrap().1);
                } else {
                    block.lines.push(line.to_owned());
                }
            }
            None if trimmed.starts_with("```") => {
                let ticks = trimmed.len() - trimmed.trim_start_matches('`').len();
                open = Some((
                    "`".repeat(ticks),
                    Block {
                        info: trimmed[ticks..].trim().to_owned(),
                        line: n + 1,
                        lines: Vec::new(),
                    },
                ));
            }
            None => prose.push((n, line.to_owned())),
        }
    }
    assert!(open.is_none(), "an unclosed ``` block");
    (blocks, prose)
}

/// The inline code spans of one line (`` `x` ``, ``` `` x `` ```).
fn code_spans(line: &str) -> Vec<String> {
    let mut spans = Vec::new();
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'`' {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && b[i] == b'`' {
            i += 1;
        }
        let ticks = &line[start..i];
        match line[i..].find(ticks) {
            Some(end) => {
                spans.push(line[i..i + end].trim().to_owned());
                i += end + ticks.len();
            }
            None => break,
        }
    }
    spans
}

/// The prose lines joined into paragraphs (a code span may wrap), each with its first line.
fn paragraphs(prose: &[(usize, String)]) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut last = 0;
    for (n, line) in prose {
        let continues = *n == last + 1 && !line.trim().is_empty();
        match out.last_mut() {
            Some((_, p)) if continues && !p.is_empty() => {
                p.push(' ');
                p.push_str(line.trim());
            }
            _ => out.push((*n, line.trim().to_owned())),
        }
        last = *n;
    }
    out
}

/// The Rust sources the messages come from, with Rust's string line continuations joined,
/// escaped quotes unescaped, comments and unit tests left out.
fn source_text() -> String {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "tests") {
                    walk(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "rs")
                && p.file_name().is_some_and(|n| n != "tests.rs")
            {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    for dir in [
        "src",
        "libvirt/src",
        "kernelsim/src",
        "inhibit/src",
        "applet/src",
        "i3blocks/src",
        "details/src",
    ] {
        walk(&root().join(dir), &mut files);
    }
    files.sort();
    let mut all = String::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let text = match text.find("\n#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => &text[..],
        };
        let code: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect();
        all += &unescape(&code.join("\n"));
        all.push('\n');
    }
    all
}

/// What a Rust string literal's text reads as: `\` + newline + indentation vanish, `\"`
/// is `"`, `\x20` a space, `{{`/`}}` in format strings single braces.
fn unescape(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('\n') => {
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
            }
            Some('"') => {
                chars.next();
                out.push('"');
            }
            Some('\\') => {
                chars.next();
                out.push('\\');
            }
            _ => out.push('\\'),
        }
    }
    out.replace("\\x20", " ").replace("{{", "{").replace("}}", "}")
}

/// What a line starts with in the output that is not part of the message itself: the
/// doctor's level marks and fix arrows, the `handoff: ` (and `warning: `) the binary puts
/// before an error.
const OUTPUT_PREFIXES: &[&str] = &[
    "[FAIL] ",
    "[warn] ",
    "[info] ",
    "[ok  ] ",
    "→ ",
    "handoff: ",
    "warning: ",
];

/// The fixed parts of one quoted line: the text between `<placeholders>` and `…`, with
/// the punctuation at their ends (often next to an interpolated value) trimmed. Parts of
/// fewer than 4 characters say nothing and are dropped.
fn fragments(line: &str) -> Vec<String> {
    let mut line = line.trim();
    for p in OUTPUT_PREFIXES {
        if let Some(rest) = line.strip_prefix(p) {
            line = rest.trim_start();
        }
    }
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if c == '<'
            && let Some(end) = rest.find('>')
            && !rest[1..end].contains('<')
        {
            parts.push(std::mem::take(&mut cur));
            rest = &rest[end + 1..];
            continue;
        }
        if c == '…' {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| p.trim_matches(|c: char| !c.is_alphanumeric()).to_owned())
        .filter(|p| p.chars().count() >= 4)
        .collect()
}

#[test]
fn every_quoted_message_still_exists_in_the_source() {
    let source = source_text();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (file, text) in docs() {
        let (blocks, _) = split_markdown(&text);
        for block in blocks.iter().filter(|b| b.info == "text") {
            let mut longest = 0;
            for (i, line) in block.lines.iter().enumerate() {
                for frag in fragments(line) {
                    longest = longest.max(frag.chars().count());
                    checked += 1;
                    if !source.contains(&frag) {
                        failures.push(format!(
                            "{file}:{}: {frag:?} is not in the source (any more?)\n    quoted line: {}",
                            block.line + i,
                            line.trim()
                        ));
                    }
                }
            }
            if longest < 12 {
                failures.push(format!(
                    "{file}:{}: this text block has no fixed part of 12 characters or more, so it checks nothing; \
                     quote more of the message, or use ```console for sample output",
                    block.line
                ));
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} message fragments found in the docs' ```text blocks: did the troubleshooting guide move?"
    );
    assert!(
        failures.is_empty(),
        "{} quoted message part(s) not found in the crates' src/:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_troubleshooting_guide_covers_the_common_failures() {
    let text = std::fs::read_to_string(root().join("docs/troubleshooting.md")).unwrap();
    let (blocks, _) = split_markdown(&text);
    let quoted: String = blocks
        .iter()
        .filter(|b| b.info == "text")
        .flat_map(|b| b.lines.iter().map(|l| format!("{l}\n")))
        .collect();
    // One phrase per failure a newcomer meets first (issue #8): each must be quoted.
    let must = [
        "processes use it",                              // GPU busy
        "nvidia-persistenced keeps the GPU initialised", // held without an fd
        "the boot framebuffer holds it",                 // efifb on the card
        "stop that VM first",                            // the hook: another VM has it
        "gracefully and then starts",                    // start: another VM has it
        "the libvirt hook is not installed",             // hook not installed
        "not owned by root",                             // install-hooks: binary writable by others
        "the libvirt hook runs as root and reads only",  // hook refuses the config
        "cannot connect to libvirt at",                  // libvirt unreachable
        "is your user in group libvirt",                 // permission denied
        "did not return after",                          // stuck unbind
        "Restore required",                              // restore required
        "did not come back to",                          // GPU not home
        "did not stop within",                           // shutdown timeout
        "Or switch anyway, forcing it off",              // a switch stopped
        "no tray icon can show yet",                     // i3bar without SNI host
        "they would have to go to the VM too",           // IOMMU group shared
        "IOMMU is off",                                  // IOMMU off
        "is not a PCI address",                          // config error
        "has no Looking Glass shared memory device",     // no shmem
        "Shared memory",                                 // shm missing
        "No desktop session is reachable from here",     // LG from SSH
    ];
    let missing: Vec<&str> = must.iter().copied().filter(|m| !quoted.contains(m)).collect();
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md quotes none of: {missing:?}"
    );
    let entries = text.lines().filter(|l| l.starts_with("### ")).count();
    assert!(entries >= 12, "only {entries} entries in docs/troubleshooting.md");
}

/// A `handoff …` command as written in the docs: where, the words after `handoff`.
struct Mention {
    at: String,
    words: Vec<String>,
}

/// Every `handoff <word> …` in code: inline spans (also those inside ```text blocks, where
/// messages quote commands, and in sample output), every line of the shell blocks, and the
/// `$ ` lines of ```console blocks.
fn mentions() -> Vec<Mention> {
    let shell_like = |info: &str| matches!(info, "" | "sh" | "bash" | "shell");
    let mut found = Vec::new();
    for (file, text) in docs() {
        let (blocks, prose) = split_markdown(&text);
        let mut pieces: Vec<(usize, String)> = Vec::new();
        for (n, paragraph) in paragraphs(&prose) {
            pieces.extend(code_spans(&paragraph).into_iter().map(|s| (n, s)));
        }
        for b in &blocks {
            for (i, line) in b.lines.iter().enumerate() {
                if shell_like(&b.info) {
                    pieces.push((b.line + i, line.clone()));
                } else if let Some(cmd) = line.strip_prefix("$ ").filter(|_| b.info == "console") {
                    pieces.push((b.line + i, cmd.to_owned()));
                } else if matches!(b.info.as_str(), "text" | "console") {
                    pieces.extend(code_spans(line).into_iter().map(|s| (b.line + i, s)));
                }
            }
        }
        for (n, piece) in pieces {
            let words: Vec<&str> = piece.split_whitespace().collect();
            for (i, w) in words.iter().enumerate() {
                // `handoff` as a command word: not `qemu.d/handoff`, `handoff:`, `handoff-tray`.
                let w = w.trim_start_matches(['`', '"', '\'']);
                if w != "handoff" {
                    continue;
                }
                let rest: Vec<String> = words[i + 1..]
                    .iter()
                    .take_while(|w| {
                        !matches!(**w, "|" | "||" | "&&" | ";" | "#" | ">" | "2>&1") && !w.starts_with('#')
                    })
                    .map(|w| w.to_string())
                    .collect();
                if rest.is_empty() {
                    continue;
                }
                found.push(Mention {
                    at: format!("{file}:{n}"),
                    words: rest,
                });
            }
        }
    }
    found
}

/// `handoff <args> --help`: (succeeded, stdout).
fn help(cache: &mut HashMap<Vec<String>, (bool, String)>, args: &[String]) -> (bool, String) {
    cache
        .entry(args.to_vec())
        .or_insert_with(|| {
            let out = Command::new(handoff_test_support::bins::cli(env!("CARGO_BIN_EXE_handoff")))
                .args(args)
                .arg("--help")
                .env_remove("HANDOFF_CONFIG")
                .output()
                .expect("running handoff");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        })
        .clone()
}

/// The subcommand names a `--help` lists under "Commands:".
fn listed_commands(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Whether `--flag` is one of the options a `--help` lists.
fn has_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let after = help[i + flag.len()..].chars().next();
        let before = help[..i].chars().last();
        !after.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '_')
            && !before.is_some_and(|c| c.is_alphanumeric() || c == '-')
    })
}

#[test]
fn every_handoff_command_in_the_docs_exists_with_its_flags() {
    let mut cache = HashMap::new();
    let mut failures = BTreeSet::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in mentions() {
        let clean = |w: &str| {
            w.trim_end_matches(['`', ')', ',', '.', '"', '\''])
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split('=')
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        let first = clean(&m.words[0]);
        let mut args: Vec<String> = Vec::new();
        let mut flags_from = 0;
        if first.starts_with("--") {
            // `handoff --version`: a top-level flag.
        } else if first
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        {
            let (ok, h) = help(&mut cache, std::slice::from_ref(&first));
            if !ok {
                failures.insert(format!(
                    "{}: `handoff {first}` is not a subcommand of handoff",
                    m.at
                ));
                continue;
            }
            *seen.entry(first.clone()).or_default() += 1;
            args.push(first);
            flags_from = 1;
            if let Some(second) = m.words.get(1).map(|w| clean(w))
                && listed_commands(&h).contains(&second)
            {
                args.push(second);
                flags_from = 2;
            }
        } else {
            continue; // `handoff <sub>`-style placeholders and prose
        }
        let (_, h) = help(&mut cache, &args);
        for w in &m.words[flags_from..] {
            let flag = clean(w);
            if flag.starts_with("--") && flag.len() > 2 && !has_flag(&h, &flag) {
                failures.insert(format!(
                    "{}: `handoff {}` has no flag {flag}",
                    m.at,
                    args.join(" ")
                ));
            }
        }
    }
    assert!(
        seen.len() >= 12,
        "only {} distinct subcommands found in the docs ({seen:?}): is the scan still finding them?",
        seen.len()
    );
    assert!(
        failures.is_empty(),
        "{}",
        failures.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// The TOML texts of a block that may configure handoff: a ```toml block whole, or the
/// here-documents (`<<'EOF'` … `EOF`) of a shell block; with the line each starts on.
fn toml_texts(b: &Block) -> Vec<(usize, String)> {
    if b.info == "toml" {
        return vec![(b.line, b.lines.join("\n"))];
    }
    if !matches!(b.info.as_str(), "sh" | "bash" | "shell") {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut doc: Option<(usize, Vec<&str>)> = None;
    for (i, line) in b.lines.iter().enumerate() {
        match &mut doc {
            Some(_) if line.trim() == "EOF" => {
                let (at, body) = doc.take().unwrap();
                out.push((at, body.join("\n")));
            }
            Some((_, body)) => body.push(line),
            None if line.contains("<<'EOF'") => doc = Some((b.line + i + 1, Vec::new())),
            None => {}
        }
    }
    out
}

#[test]
fn every_sample_config_in_the_docs_parses() {
    let mut checked = 0;
    for (file, text) in docs() {
        let (blocks, _) = split_markdown(&text);
        for (line, body) in blocks.iter().flat_map(toml_texts) {
            let configures_handoff = body.lines().any(|l| matches!(l.trim(), "[gpu]" | "[[vm]]"));
            if !configures_handoff {
                continue; // e.g. i3status-rust's config
            }
            let at = PathBuf::from(format!("{file}:{line}"));
            if let Err(e) = handoff::config::Config::parse(&body, &at) {
                panic!("the sample config at {} does not parse: {e}", at.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} sample configs found");
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let (_, prose) = split_markdown(text);
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose {
        let Some(h) = line.strip_prefix('#') else { continue };
        let h = h.trim_start_matches('#');
        if !h.starts_with(' ') {
            continue;
        }
        let s = slug(h);
        let n = count.entry(s.clone()).or_default();
        out.insert(if *n == 0 { s.clone() } else { format!("{s}-{n}") });
        *n += 1;
    }
    out
}

#[test]
fn every_link_and_image_points_at_something_that_exists() {
    let all: HashMap<String, String> = docs().into_iter().collect();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (file, text) in &all {
        let dir = Path::new(file).parent().unwrap_or(Path::new(""));
        let (_, prose) = split_markdown(text);
        for (n, line) in prose {
            // Targets of `](target)`.
            for (i, _) in line.match_indices("](") {
                let rest = &line[i + 2..];
                let Some(end) = rest.find(')') else { continue };
                let target = &rest[..end];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
                let rel = if path.is_empty() {
                    PathBuf::from(file)
                } else {
                    dir.join(path)
                };
                if !root().join(&rel).exists() {
                    failures.push(format!("{file}:{n}: {target}: {} does not exist", rel.display()));
                    continue;
                }
                if !anchor.is_empty() {
                    let key = rel.to_string_lossy().into_owned();
                    let target_text = match all.get(&key) {
                        Some(t) => t.clone(),
                        None => std::fs::read_to_string(root().join(&rel)).unwrap_or_default(),
                    };
                    if !anchors(&target_text).contains(anchor) {
                        failures.push(format!("{file}:{n}: {target}: no heading #{anchor} in {key}"));
                    }
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} links found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_fragment_rule_reads_placeholders_and_prefixes_as_intended() {
    assert_eq!(
        fragments("[FAIL] IOMMU group <id> also holds <devices>: they would have to go to the VM too"),
        ["IOMMU group", "also holds", "they would have to go to the VM too"]
    );
    assert_eq!(
        fragments("handoff: no domain \"<vm>\" at <uri>; `virsh -c <uri> list --all` lists …"),
        ["no domain", "virsh -c", "list --all` lists"]
    );
    assert_eq!(unescape("\"a \\\n      b \\\"c\\\" {{x}}\""), "\"a b \"c\" {x}\"");
    assert_eq!(code_spans("a `x` b ``y ` z`` c"), ["x", "y ` z"]);
    assert_eq!(
        slug("The host: IOMMU, the GPU, vfio-pci"),
        "the-host-iommu-the-gpu-vfio-pci"
    );
}
