//! `handoff __generate man|completions DIR`: the man pages render with groff without a
//! warning and name every subcommand; the bash completion loads in bash and completes
//! `handoff sta` to `start`/`status`. Needs groff [groff-base] and bash; under CI a missing
//! tool fails the test, elsewhere it skips saying why.

use std::path::Path;
use std::process::Command;

use handoff_test_support::tools::have_all;

const BIN: &str = env!("CARGO_BIN_EXE_handoff");

fn generate(what: &str, dir: &Path) {
    let out = Command::new(BIN)
        .args(["__generate", what])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "__generate {what}: {out:?}");
}

fn subcommands() -> Vec<String> {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let commands = help.split("Commands:\n").nth(1).unwrap();
    commands
        .lines()
        .take_while(|l| l.starts_with("  "))
        // Continuation lines of a wrapped description are indented further.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn man_pages_render_without_warnings_one_per_subcommand_and_seed_name() {
    if !have_all(&["groff"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let man1 = tmp.path().join("man1");
    generate("man", &man1);

    let subs = subcommands();
    assert!(subs.contains(&"status".to_owned()), "{subs:?}");
    for sub in &subs {
        assert!(
            man1.join(format!("handoff-{sub}.1")).exists(),
            "no page for {sub}"
        );
    }
    for name in ["vfio-status", "windows-start", "gpu-rebind-nvidia"] {
        assert!(man1.join(format!("{name}.1")).exists(), "no page for {name}");
    }

    let mut pages: Vec<_> = std::fs::read_dir(&man1)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pages.sort();
    for page in &pages {
        // -I: a seed name's page is `.so man1/handoff-<sub>.1`, resolved from the man root.
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-I"])
            .arg(tmp.path())
            .arg(page)
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "{}: {stderr}",
            page.display()
        );
        assert!(!out.stdout.is_empty(), "{} rendered nothing", page.display());
    }

    let top = render(tmp.path(), &man1.join("handoff.1"));
    for sub in &subs {
        assert!(
            top.contains(&format!("handoff-{sub}(1)")),
            "handoff.1 lacks {sub}:\n{top}"
        );
    }
    let vfio = render(tmp.path(), &man1.join("vfio-status.1"));
    assert!(vfio.contains("handoff-status"), "{vfio}");
    assert!(vfio.contains("--json"), "{vfio}");
}

fn render(root: &Path, page: &Path) -> String {
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-P-c", "-P-b", "-P-u", "-I"])
        .arg(root)
        .arg(page)
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bash_completion_loads_and_completes_subcommands() {
    if !have_all(&["bash"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    generate("completions", tmp.path());
    for f in ["bash/handoff", "zsh/_handoff", "fish/handoff.fish"] {
        assert!(tmp.path().join(f).exists(), "{f} missing");
    }
    let script = r#"
        set -eu
        source "$1"
        complete -p handoff
        complete_line() {
            COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
            COMPREPLY=()
            _handoff handoff "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
            echo "${COMPREPLY[*]}"
        }
        complete_line handoff sta
        complete_line handoff status --
    "#;
    let out = Command::new("bash")
        .args(["-c", script, "bash"])
        .arg(tmp.path().join("bash/handoff"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("-F _handoff handoff"), "{stdout}");
    let mut first: Vec<&str> = lines[1].split_whitespace().collect();
    first.sort();
    assert_eq!(first, ["start", "status"], "{stdout}");
    assert!(lines[2].contains("--json"), "{stdout}");
    assert!(!stdout.contains("__generate"), "{stdout}");
}

#[test]
fn zsh_and_fish_completions_parse_when_those_shells_exist() {
    let tmp = tempfile::tempdir().unwrap();
    generate("completions", tmp.path());
    // Optional shells: checked when installed, never required.
    for (shell, file) in [("zsh", "zsh/_handoff"), ("fish", "fish/handoff.fish")] {
        let Ok(out) = Command::new(shell).arg("-n").arg(tmp.path().join(file)).output() else {
            eprintln!("{shell} not installed: {file} not syntax-checked");
            continue;
        };
        assert!(out.status.success(), "{shell} -n {file}: {out:?}");
    }
}
