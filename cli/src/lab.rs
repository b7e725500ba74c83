//! `migrate lab up|down|status|exec`: the local lab of nodes (network namespaces on a private
//! bridge, each node in its own mount, PID and UTS namespaces over the shared podman + CRIU
//! root). The work is done by `engine::lab`; this file parses arguments and prints results.
//! `MIGRATE_LAB_DIR`, `MIGRATE_LAB_ROOTFS` and `MIGRATE_LAB_PREFIX` relocate the lab (tests use
//! them so a user's lab is not disturbed).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use engine::lab::{self, LabOptions};

use crate::output::Output;

#[derive(Debug, Args)]
pub struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Start the lab: build the root if needed, then one node per name, each with its own
    /// network namespace and address on the lab bridge, certificates and the busybox image.
    #[command(after_help = "Examples:
  migrate lab up                      # node1 (10.231.0.10) and node2 (10.231.0.11)
  migrate lab up --nodes 3            # node1..node3
  migrate lab up --node a --node b    # nodes named a and b
  migrate lab up --mtu 9000           # links with jumbo frames, as many node networks have
Running it again while the lab is up only shows its status. Needs root.")]
    Up {
        /// Number of nodes, named node1..nodeN.
        #[arg(long, default_value_t = 2, conflicts_with = "node")]
        nodes: usize,
        /// A node name (repeatable), instead of --nodes.
        #[arg(long)]
        node: Vec<String>,
        /// MTU of the lab's links: 1500 is plain Ethernet, 9000 a network with jumbo frames.
        #[arg(long, default_value_t = lab::DEFAULT_MTU)]
        mtu: u32,
    },
    /// Stop every node and remove namespaces, bridge, node folders, certificates and state,
    /// also after a crash. The root filesystem stays.
    #[command(after_help = "Example:
  migrate lab down")]
    Down,
    /// Show each node: address, whether it runs, how many containers run in it.
    #[command(after_help = "Examples:
  migrate lab status
  migrate lab status --json")]
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a node; exits with the command's exit code.
    #[command(after_help = "Examples:
  migrate lab exec node1 -- hostname
  migrate lab exec node1 -- podman run -d --name c localhost/lab/busybox sleep 1000
  migrate lab exec node2 -- podman ps")]
    Exec {
        /// The node's name (see `migrate lab status`).
        node: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

/// Runs a lab subcommand; `exec` passes on the command's exit code.
pub fn run(args: LabArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let mut opts = LabOptions::from_env();
    // Each node runs this very binary as its daemon.
    opts.daemon_binary = Some(std::env::current_exe().context("finding this program")?);
    match args.command {
        LabCommand::Up { nodes, node, mtu } => {
            opts.mtu = mtu;
            let names = if node.is_empty() {
                lab::default_nodes(nodes)
            } else {
                node
            };
            let up = lab::up(&names, &opts).context("bringing the lab up")?;
            if up.already_up {
                out.line(format!("lab: already up, links at MTU {}", up.state.mtu));
            } else {
                out.line(format!(
                    "lab: up with {} nodes, links at MTU {} (state {})",
                    up.state.nodes.len(),
                    up.state.mtu,
                    opts.state_file().display()
                ));
            }
            for n in &up.state.nodes {
                out.line(format!(
                    "  {:<12} {:<14} certs {}",
                    n.name,
                    n.address.to_string(),
                    n.certs.display()
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Down => {
            let r = lab::down(&opts).context("tearing the lab down")?;
            out.line(format!(
                "lab: down ({} nodes, {} network namespaces removed, {} processes killed)",
                r.nodes.len(),
                r.netns.len(),
                r.killed
            ));
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Status { json } => {
            let st = lab::status(&opts).context("reading the lab status")?;
            if json {
                println!("{}", serde_json::to_string(&st)?);
            } else if !st.up {
                println!("lab: not up (state dir {})", st.state_dir.display());
                for l in &st.leftovers {
                    println!("  leftover: {l} (remove with `migrate lab down`)");
                }
            } else {
                if let Some(mtu) = st.mtu {
                    println!("links at MTU {mtu}");
                }
                println!("{:<12} {:<14} {:<6} CONTAINERS", "NODE", "ADDRESS", "ALIVE");
                for n in &st.nodes {
                    println!(
                        "{:<12} {:<14} {:<6} {}",
                        n.name,
                        n.address.to_string(),
                        if n.alive { "yes" } else { "no" },
                        n.containers.map_or("-".to_string(), |c| c.to_string())
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Exec { node, cmd } => {
            let code = lab::exec(&node, &cmd, &opts)
                .with_context(|| format!("running `{}` in node {node}", cmd.join(" ")))?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    }
}
