//! `migrate`: the command users type. This file parses arguments and dispatches; each group of
//! subcommands lives in its own module (`certs`, `transfer`, `drain`), `nodes` finds the nodes
//! and reaches their daemons, and `output` holds the shared printing helpers. Exit codes: 0
//! success, 1 the operation failed (the message says what and what to check), 2 bad usage.

mod certs;
mod cluster;
mod daemon;
mod drain;
mod inspect;
mod lab;
mod migrate;
mod nodes;
mod output;
mod progress;
mod transfer;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Live-migrate containers between nodes: checkpoint, move memory and all, restore.
#[derive(Debug, Parser)]
#[command(name = "migrate", version, about, long_about = None)]
#[command(after_help = "Examples:
  migrate lab up && migrate web --from node1 --to node2
  migrate drain node1 --to node2        # every container of node1 that can move
  migrate certs init --out certs --name node1 --name node2
  migrate receive --listen 0.0.0.0:7070 --store /var/lib/migrate/chunks --out ckpt.tar --certs certs/node2
  migrate send ckpt.tar --to 10.0.0.2:7070 --certs certs/node1")]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). Logs go to stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors: no summary lines, no warnings.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the cluster CA and node certificates for mutual TLS.
    Certs(certs::CertsArgs),
    /// Run the node daemon: migrates containers away and receives migrating ones.
    Daemon(daemon::DaemonArgs),
    /// NODE [--to NODE]: migrate every container that can move off a node (`migrate drain
    /// --help`).
    Drain(drain::DrainArgs),
    /// Show what a checkpoint archive holds (validating it): container, pod, image, sizes.
    Inspect(inspect::InspectArgs),
    /// The local lab of nodes: up, down, status, exec.
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
        init_logging(0, false);
        let mut words: Vec<OsString> = argv.collect();
        words.push(
            if words.is_empty() {
                "--help"
            } else {
                "--kubernetes"
            }
            .into(),
        );
        let out = output::Output { quiet: false };
        return match migrate::run(words, &out) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let out = output::Output { quiet: cli.quiet };
    let result = match cli.command {
        Command::Certs(args) => certs::run(args, &out),
        Command::Daemon(args) => daemon::run(args, &out),
        Command::Drain(args) => match drain::run(args, &out) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Migrate(words) => match migrate::run(words, &out) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Inspect(args) => inspect::run(args, &out),
        Command::Lab(args) => match lab::run(args, &out) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Receive(args) => transfer::receive(args, &out),
        Command::Send(args) => transfer::send(args, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
