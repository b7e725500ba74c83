//! The `migrate` binary's help, completions and exit codes, as a user meets them: `migrate
//! --help` lists every subcommand and the exit codes, every subcommand's help (found by
//! walking the help itself) has examples, the bash completion script completes in a real
//! bash, bad usage exits 2 and a failed operation exits 1 naming the problem. None of this
//! needs root or a lab.

use std::collections::BTreeSet;
use std::process::{Command, Output};

const MIGRATE: &str = env!("CARGO_BIN_EXE_migrate");

/// Runs `migrate ARGS` away from any lab of this machine.
fn migrate(args: &[&str]) -> Output {
    let lab = tempfile::tempdir().unwrap();
    Command::new(MIGRATE)
        .args(args)
        .env("MIGRATE_LAB_DIR", lab.path())
        .env("MIGRATE_LAB_PREFIX", "helptest")
        .env_remove("MIGRATE_LOG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// The help of `migrate WORDS --help`, which must succeed.
fn help(words: &[&str]) -> String {
    let mut args = words.to_vec();
    args.push("--help");
    let o = migrate(&args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    stdout(&o)
}

/// The names in the `Commands:` section of a help text, without clap's `help`.
fn commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn top_level_help_lists_every_subcommand_and_the_exit_codes() {
    let text = help(&[]);
    let listed: BTreeSet<String> = commands(&text).into_iter().collect();
    let expected = [
        "certs",
        "completions",
        "daemon",
        "drain",
        "inspect",
        "lab",
        "receive",
        "send",
    ];
    assert_eq!(
        listed,
        expected.iter().map(|s| s.to_string()).collect(),
        "{text}"
    );
    // The container form is no clap subcommand: the usage and the text name it.
    assert!(
        text.contains("migrate [OPTIONS] CONTAINER --from NODE --to NODE"),
        "{text}"
    );
    assert!(text.contains("migrate CONTAINER --help"), "{text}");

    let codes: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Exit codes"))
        .collect();
    assert!(!codes.is_empty(), "no exit codes in:\n{text}");
    for (code, words) in [
        ("0", "success"),
        ("1", "the operation failed"),
        ("2", "bad usage"),
    ] {
        let line = format!("  {code}  {words}");
        assert!(
            codes.iter().any(|l| l.starts_with(&line)),
            "no line {line:?} in:\n{}",
            codes.join("\n")
        );
    }
    assert!(
        codes.iter().any(|l| l.contains("drain: not everything")),
        "{text}"
    );
}

#[test]
fn every_subcommand_s_help_has_examples() {
    // Walk the help: every subcommand listed, and theirs in turn.
    let mut todo: Vec<Vec<String>> = commands(&help(&[])).into_iter().map(|c| vec![c]).collect();
    let mut seen = Vec::new();
    while let Some(words) = todo.pop() {
        let words_ref: Vec<&str> = words.iter().map(String::as_str).collect();
        let text = help(&words_ref);
        assert!(
            text.contains("Example"),
            "`migrate {} --help` has no examples:\n{text}",
            words.join(" ")
        );
        for sub in commands(&text) {
            let mut deeper = words.clone();
            deeper.push(sub);
            todo.push(deeper);
        }
        seen.push(words.join(" "));
    }
    // The walk did go down: the nested subcommands were found and checked.
    for nested in [
        "certs init",
        "lab up",
        "lab down",
        "lab status",
        "lab exec",
        "completions",
    ] {
        assert!(seen.iter().any(|s| s == nested), "{nested} not in {seen:?}");
    }
    // The container form has its own help.
    let text = help(&["web"]);
    assert!(
        text.contains("--from") && text.contains("Example"),
        "{text}"
    );
}

#[test]
fn the_bash_completion_script_completes_subcommands_and_the_container_form() {
    let o = migrate(&["completions", "bash"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let script = stdout(&o);
    assert!(
        script.contains("drain") && script.contains("lab"),
        "{script}"
    );
    assert!(script.contains("complete -F _migrate"), "{script}");

    // Complete in a real bash, as a TAB after these words would.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("migrate.bash");
    std::fs::write(&file, &script).unwrap();
    let complete = |line: &str| -> Vec<String> {
        let program = format!(
            "source {file}; COMP_WORDS=({line}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _migrate migrate \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file = file.display()
        );
        let o = Command::new("bash")
            .args(["--norc", "-c", &program])
            .output()
            .unwrap();
        assert!(o.status.success(), "{line}: {}", stderr(&o));
        stdout(&o).lines().map(str::to_string).collect()
    };
    assert_eq!(complete("migrate dr"), ["drain"]);
    let lab = complete("migrate lab ''");
    for sub in ["up", "down", "status", "exec"] {
        assert!(lab.iter().any(|w| w == sub), "{sub} not in {lab:?}");
    }
    assert!(complete("migrate drain node1 --con").contains(&"--concurrency".to_string()));
    // After a container's name, the flags of `migrate CONTAINER --from --to`.
    let flags = complete("migrate web --");
    for flag in ["--from", "--to", "--json", "--precopy"] {
        assert!(flags.iter().any(|w| w == flag), "{flag} not in {flags:?}");
    }
    assert_eq!(complete("migrate completions z"), ["zsh"]);
}

#[test]
fn bad_usage_exits_2_naming_what_is_wrong() {
    for (args, named) in [
        (&["--no-such-flag"][..], "--no-such-flag"),
        (&["drain", "node1", "--no-such-flag"], "--no-such-flag"),
        (&["drain"], "<NODE>"),
        (&["drain", "node1", "--concurrency", "0"], "--concurrency"),
        (&["completions", "tcsh"], "tcsh"),
        (&["web", "--from", "a", "--to", "b", "--bogus"], "--bogus"),
        (&["web", "--from", "a"], "--to"),
        (&["-q", "-v", "web", "--from", "a", "--to", "b"], "-q"),
        (&["web", "--from", "a", "--to", "b", "-q", "-v"], "--quiet"),
    ] {
        let o = migrate(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(named), "{args:?}: {err}");
    }
}

#[test]
fn a_failed_operation_exits_1_and_names_the_problem() {
    let o = migrate(&["web", "--from", "a", "--to", "a"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--from and --to are the same node (a)"),
        "{}",
        stderr(&o)
    );
    // -q and -v after the container's name are the global flags, not bad usage.
    for flag in ["-q", "-v", "--quiet"] {
        let o = migrate(&["web", "--from", "a", "--to", "a", flag]);
        assert_eq!(o.status.code(), Some(1), "{flag}: {}", stderr(&o));
        assert!(stderr(&o).contains("same node"), "{flag}: {}", stderr(&o));
    }
    // An archive that is no checkpoint: what, and which file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-checkpoint.tar");
    std::fs::write(&file, b"hello").unwrap();
    let o = migrate(&["inspect", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not-a-checkpoint.tar") && stderr(&o).starts_with("error: "),
        "{}",
        stderr(&o)
    );
}
