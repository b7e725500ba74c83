//! `migrate certs init`: a development CA and one certificate per node, for the mutual TLS
//! between node daemons.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::output::Output;

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create (or reuse) a CA in DIR and a certificate for each --name, in DIR/NAME/.
    #[command(after_help = "Example:
  migrate certs init --out certs --name node1 --name node2
  # copy certs/node1/ to node1 and certs/node2/ to node2; keep certs/ca.key off the nodes")]
    Init {
        /// Directory for ca.crt, ca.key and one subdirectory per node.
        #[arg(long)]
        out: PathBuf,
        /// Node name (a DNS label). Repeat for several nodes. Default: node1 and node2.
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

pub fn run(args: CertsArgs, out: &Output) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Init { out: dir, names } => {
            let names = if names.is_empty() {
                vec!["node1".to_string(), "node2".to_string()]
            } else {
                names
            };
            let written = transport::tls::init_certs(&dir, &names)
                .with_context(|| format!("creating certificates in {}", dir.display()))?;
            out.line(format!("CA: {}", dir.join("ca.crt").display()));
            for node in written {
                out.line(format!("node: {}", node.display()));
            }
            Ok(())
        }
    }
}
