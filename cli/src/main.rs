//! `migrate`: the command users type. This file parses arguments and dispatches; each group of
//! subcommands lives in its own module (`certs`, `transfer`, `drain`, `completions`), `nodes`
//! finds the nodes and reaches their daemons, and `output` holds the shared printing helpers.
//! `migrate CONTAINER --from NODE --to NODE` is clap's external subcommand: any word that is
//! not a subcommand is a container's name, and `migrate.rs` parses the rest. Exit codes, the
//! same for every subcommand and listed in `migrate --help`: 0 success, 1 the operation failed
//! (the message says what, where and what to check), 2 bad usage.

mod certs;
mod cluster;
mod completions;
mod daemon;
mod drain;
mod drain_board;
mod inspect;
mod lab;
mod migrate;
mod nodes;
mod output;
mod progress;
#[cfg(test)]
mod testing;
mod transfer;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Live-migrate containers between nodes: checkpoint, move memory and all, restore.
#[derive(Debug, Parser)]
#[command(name = "migrate", version, long_about = None)]
#[command(override_usage = "migrate [OPTIONS] <COMMAND>
       migrate [OPTIONS] CONTAINER --from NODE --to NODE [--json] [...]")]
#[command(after_help = "\
Migrating a container is `migrate CONTAINER --from NODE --to NODE`, in the lab, between nodes
named with --node, or a Pod on Kubernetes: its options are in `migrate CONTAINER --help` (any
name, e.g. `migrate web --help`). -q and -v go before or after the container's name.

Examples:
  migrate lab up                                # a local lab, node1 and node2 (needs root)
  migrate lab exec node1 -- podman run -d --name web --network=host localhost/lab/nginx
  migrate web --from node1 --to node2           # phases, a transfer bar, then a summary
  migrate web --from node2 --to node1 --json    # one JSON event per line, for scripts
  migrate drain node1 --to node2                # every container of node1 that can move
  migrate nginx --from node1 --to node2 -n default   # a Pod, with your kubeconfig
  migrate certs init --out certs --name node1 --name node2
  migrate send ckpt.tar --to 10.0.0.2:7443 --certs certs/node1   # the transport alone
  migrate completions bash > /etc/bash_completion.d/migrate

Exit codes (every subcommand):
  0  success; for drain: every running container of NODE moved, or none ran
  1  the operation failed: the message says what failed, where (node, container or Pod,
     phase) and what to check; a failed migration rolls back. For drain: not everything
     moved (the table says which and why), or the drain could not start
  2  bad usage: an unknown flag, a missing or malformed argument (the message names it)
`migrate lab exec NODE -- CMD` exits with CMD's exit code instead.")]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). Logs go to stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors: no progress, no summary lines, no warnings.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the cluster CA and node certificates for mutual TLS.
    // The examples of the groups whose arguments live in other modules are given here.
    #[command(after_help = "Examples:
  migrate certs init --out certs --name node1 --name node2
  migrate certs init --out certs --name node3   # one more node, signed by the CA in certs/
See `migrate certs init --help`.")]
    Certs(certs::CertsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::CompletionsArgs),
    /// Run the node daemon: migrates containers away and receives migrating ones.
    Daemon(daemon::DaemonArgs),
    /// NODE [--to NODE]: migrate every container that can move off a node (`migrate drain
    /// --help`).
    Drain(drain::DrainArgs),
    /// Show what a checkpoint archive holds (validating it): container, pod, image, sizes.
    #[command(after_help = "Examples:
  migrate inspect ckpt.tar
  migrate inspect ckpt.tar --json
  podman container checkpoint web --export /tmp/web.tar && migrate inspect /tmp/web.tar
An archive with absolute paths, `..`, links that escape, special files or a truncated end is
refused, naming the entry (exit code 1).")]
    Inspect(inspect::InspectArgs),
    /// The local lab of nodes: up, down, status, exec.
    #[command(after_help = "Examples:
  migrate lab up                        # node1 and node2, a daemon in each
  migrate lab status
  migrate lab exec node1 -- podman ps
  migrate lab down
Needs root. MIGRATE_LAB_DIR, MIGRATE_LAB_PREFIX and MIGRATE_LAB_ROOTFS relocate the lab.")]
    Lab(lab::LabArgs),
    /// Receive one transfer into a file, deduplicating against a chunk store.
    Receive(transfer::ReceiveArgs),
    /// Send a file to a receiving node.
    Send(transfer::SendArgs),
    /// CONTAINER --from NODE --to NODE: migrate a running container (`migrate CONTAINER --help`).
    #[command(external_subcommand)]
    Migrate(Vec<OsString>),
}

fn main() -> ExitCode {
    // Installed (or linked) as `kubectl-migrate`, this is the kubectl plugin: `kubectl migrate
    // POD --from NODE --to NODE` is a Pod migration.
    let mut argv = std::env::args_os();
    let program = argv.next().unwrap_or_default();
    if std::path::Path::new(&program)
        .file_name()
        .is_some_and(|n| n == "kubectl-migrate")
    {
        let (mut words, flags) = take_global_flags(argv.collect());
        init_logging(flags.verbose, flags.quiet);
        words.push(
            if words.is_empty() {
                "--help"
            } else {
                "--kubernetes"
            }
            .into(),
        );
        let out = output::Output { quiet: flags.quiet };
        return exit_code(migrate::run(words, &out));
    }
    let cli = Cli::parse();
    // Words after a container's name reach `migrate.rs` unparsed: take -q and -v from them,
    // so they work there as they do before it.
    let (command, flags) = match cli.command {
        Command::Migrate(words) => {
            let (words, flags) = take_global_flags(words);
            (Command::Migrate(words), flags)
        }
        command => (command, GlobalFlags::default()),
    };
    let verbose = cli.verbose.saturating_add(flags.verbose);
    let quiet = cli.quiet || flags.quiet;
    if quiet && verbose > 0 {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "-q/--quiet cannot be used with -v/--verbose",
            )
            .exit();
    }
    init_logging(verbose, quiet);
    let out = output::Output { quiet };
    // Every arm ends in 0 (success) or 1 (failed, said on stderr); clap has already exited
    // with 2 on bad usage, and `migrate.rs` does so for the container form's own arguments.
    match command {
        Command::Certs(args) => exit_code(certs::run(args, &out).map(|()| ExitCode::SUCCESS)),
        Command::Completions(args) => {
            exit_code(completions::run(args, Cli::command()).map(|()| ExitCode::SUCCESS))
        }
        Command::Daemon(args) => exit_code(daemon::run(args, &out).map(|()| ExitCode::SUCCESS)),
        Command::Drain(args) => exit_code(drain::run(args, &out)),
        Command::Migrate(words) => exit_code(migrate::run(words, &out)),
        Command::Inspect(args) => exit_code(inspect::run(args, &out).map(|()| ExitCode::SUCCESS)),
        Command::Lab(args) => exit_code(lab::run(args, &out)),
        Command::Receive(args) => {
            exit_code(transfer::receive(args, &out).map(|()| ExitCode::SUCCESS))
        }
        Command::Send(args) => exit_code(transfer::send(args, &out).map(|()| ExitCode::SUCCESS)),
    }
}

/// A subcommand's exit code, or 1 with its error (and the error's causes) on stderr.
fn exit_code(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

/// `-q` and `-v` found among the words of `migrate CONTAINER ...`.
#[derive(Debug, Default, PartialEq)]
struct GlobalFlags {
    verbose: u8,
    quiet: bool,
}

/// Takes `-q`, `--quiet`, `-v`, `-vv`, ... and `--verbose` out of the words of `migrate
/// CONTAINER ...`, except where they are the value of an option (`--from -q`) or follow `--`.
fn take_global_flags(words: Vec<OsString>) -> (Vec<OsString>, GlobalFlags) {
    let with_value: Vec<String> = migrate::MigrateArgs::command()
        .get_arguments()
        .filter(|a| !a.is_positional() && a.get_action().takes_values())
        .flat_map(|a| {
            let long = a.get_long().map(|l| format!("--{l}"));
            let short = a.get_short().map(|s| format!("-{s}"));
            long.into_iter().chain(short)
        })
        .collect();
    let mut flags = GlobalFlags::default();
    let mut kept = Vec::with_capacity(words.len());
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        match word.to_str() {
            Some("--") => {
                kept.push(word);
                kept.extend(words.by_ref());
            }
            Some("-q" | "--quiet") => flags.quiet = true,
            Some("--verbose") => flags.verbose = flags.verbose.saturating_add(1),
            Some(w) if w.len() > 1 && w.starts_with('-') && w[1..].bytes().all(|b| b == b'v') => {
                let count = u8::try_from(w.len() - 1).unwrap_or(u8::MAX);
                flags.verbose = flags.verbose.saturating_add(count);
            }
            Some(w) if with_value.iter().any(|o| o == w) => {
                kept.push(word);
                kept.extend(words.next());
            }
            _ => kept.push(word),
        }
    }
    (kept, flags)
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MIGRATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn the_cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn quiet_and_verbose_are_taken_from_the_container_form() {
        let (kept, flags) = take_global_flags(words("web --from a -q --to b -vv --json"));
        assert_eq!(kept, words("web --from a --to b --json"));
        assert_eq!(
            flags,
            GlobalFlags {
                verbose: 2,
                quiet: true
            }
        );
        let (kept, flags) = take_global_flags(words("web --verbose --from a --to b"));
        assert_eq!(kept, words("web --from a --to b"));
        assert_eq!(flags.verbose, 1);
    }

    #[test]
    fn option_values_and_words_after_double_dash_stay() {
        let line = "web --from -q -n -v --to b -- -q";
        let (kept, flags) = take_global_flags(words(line));
        assert_eq!(kept, words(line));
        assert_eq!(flags, GlobalFlags::default());
        // `--json` takes no value: the -q after it is the flag.
        let (kept, flags) = take_global_flags(words("web --json -q"));
        assert_eq!((kept, flags.quiet), (words("web --json"), true));
    }
}
