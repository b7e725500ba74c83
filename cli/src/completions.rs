//! `migrate completions SHELL`: prints a shell completion script made by clap_complete from
//! the same clap definitions that parse the command line, so it cannot drift from them.
//!
//! `migrate CONTAINER --from NODE --to NODE` is not a clap subcommand (a container's name can
//! be anything, so `main.rs` takes it as an external subcommand and `migrate.rs` parses it).
//! For the script to know its flags, [`for_completion`] adds them to the top-level command;
//! bash then offers them after a container's name, the other shells before it.

use std::io::Write;

use anyhow::Context;
use clap::{Args, Command};
use clap_complete::Shell;

use crate::migrate::MigrateArgs;

/// Print a shell completion script on stdout.
#[derive(Debug, Args)]
#[command(after_help = "\
Completes subcommands (also of `lab` and `certs`) and every flag. For the
`migrate CONTAINER --from NODE --to NODE` form it completes the flags (--from, --to, --json,
--precopy, --node, -n, ...): bash after the container's name, the other shells before it.
It does not complete container, node, Pod or namespace names (it does not ask the lab or a
cluster), and not `kubectl migrate` (kubectl's plugin completion is not set up).

Where to put it:
  bash        migrate completions bash > /etc/bash_completion.d/migrate
              (or ~/.local/share/bash-completion/completions/migrate; needs bash-completion)
  zsh         migrate completions zsh > ~/.zfunc/_migrate
              and in ~/.zshrc, before compinit: fpath=(~/.zfunc $fpath)
  fish        migrate completions fish > ~/.config/fish/completions/migrate.fish
  elvish      in ~/.config/elvish/rc.elv: eval (migrate completions elvish | slurp)
  powershell  in $PROFILE: migrate completions powershell | Out-String | Invoke-Expression
Then open a new shell.

Examples:
  migrate completions bash > /etc/bash_completion.d/migrate
  source <(migrate completions bash)      # this shell only")]
pub struct CompletionsArgs {
    /// The shell to complete in.
    #[arg(value_enum, value_name = "SHELL")]
    shell: Shell,
}

/// Prints the completion script of `cli` (the top-level command) for the chosen shell.
pub fn run(args: CompletionsArgs, cli: Command) -> anyhow::Result<()> {
    let script = script(args.shell, cli);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&script)
        .and_then(|()| stdout.flush())
        .context("writing the completion script to stdout")
}

/// The script, made in memory: clap_complete panics when its writer fails (a closed pipe).
fn script(shell: Shell, cli: Command) -> Vec<u8> {
    let mut cmd = for_completion(cli);
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "migrate", &mut script);
    script
}

/// `cli` with the flags of `migrate CONTAINER --from --to` added at the top level, where a
/// completion script finds them. Only for completion: parsing does not use this command.
fn for_completion(mut cli: Command) -> Command {
    let taken: Vec<String> = cli
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    for arg in <MigrateArgs as clap::CommandFactory>::command().get_arguments() {
        let id = arg.get_id().to_string();
        if arg.is_positional() || id == "help" || taken.contains(&id) {
            continue;
        }
        cli = cli.arg(
            arg.clone()
                .help_heading("Migrating a container (migrate CONTAINER --from NODE --to NODE)"),
        );
    }
    cli
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Command {
        Command::new("migrate")
            .arg(clap::Arg::new("quiet").short('q').long("quiet"))
            .subcommand(Command::new("drain").arg(clap::Arg::new("to").long("to")))
            .allow_external_subcommands(true)
    }

    #[test]
    fn the_container_form_s_flags_join_the_top_level() {
        let cmd = for_completion(cli());
        let longs: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
        for flag in [
            "from",
            "to",
            "json",
            "precopy",
            "node",
            "namespace",
            "quiet",
        ] {
            assert!(longs.contains(&flag), "--{flag} missing from {longs:?}");
        }
        assert!(
            !cmd.get_arguments().any(clap::Arg::is_positional),
            "the container's name is not a flag"
        );
        assert_eq!(longs.iter().filter(|l| **l == "to").count(), 1);
    }

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let text = String::from_utf8(script(shell, cli())).unwrap();
            assert!(text.contains("drain"), "{shell}: {text}");
            // fish spells it `from=` in its option spec, the others `--from`.
            assert!(text.contains("from"), "{shell}: {text}");
        }
    }
}
