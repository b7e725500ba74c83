//! `migrate CONTAINER --from NODE --to NODE`: asks the source node's daemon to migrate a
//! container and shows its progress (phases, a transfer bar) or, with `--json`, prints every
//! event as one JSON object per line, the last one the summary.
//!
//! Nodes are found in the lab's state when a lab is up (its daemons, addresses and the
//! operator certificate it made), or given with `--node NAME=ADDR` and `--certs`. On a
//! Kubernetes cluster the name is a Pod's and [`crate::cluster`] takes over. Lab daemons
//! live in the lab's network namespaces, so in the lab the command re-runs itself inside the
//! source node's namespace (`ip netns exec`) before it connects.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use engine::control::{self, MigrateRequest, Summary};
use engine::lab::{self, LabOptions};
use transport::tls::SERVER_NAME;

use crate::nodes::{self, parse_node, Nodes};
use crate::output::Output;
use crate::progress::View;

/// Migrate a running container, or a Kubernetes Pod, to another node.
#[derive(Debug, Parser)]
#[command(name = "migrate", no_binary_name = true)]
#[command(after_help = "Examples:
  migrate web --from node1 --to node2                  # in the lab (`migrate lab up`)
  migrate web --from node1 --to node2 --json
  migrate web --from a --to b --node a=10.0.0.1:7400 --node b=10.0.0.2:7400 --certs certs/operator
  migrate nginx --from node1 --to node2 -n default     # a Pod, with your kubeconfig
  kubectl migrate nginx --from node1 --to node2        # the same, as a kubectl plugin

On Kubernetes the mode is chosen by -n, -c, --kubeconfig, --context or --kubernetes, or by
a kubeconfig being found when no lab is up and no --node is given.")]
pub struct MigrateArgs {
    /// The container's name on the source node (it keeps it on the destination); on
    /// Kubernetes, the Pod's name.
    pub(crate) name: String,
    /// The source node.
    #[arg(long)]
    pub(crate) from: String,
    /// The destination node.
    #[arg(long)]
    pub(crate) to: String,
    /// Kubernetes: the Pod's namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long)]
    pub(crate) namespace: Option<String>,
    /// Kubernetes: migrate only this container of the Pod (repeatable; default: all). The
    /// others restart from their image in the new Pod.
    #[arg(short = 'c', long = "container")]
    pub(crate) containers: Vec<String>,
    /// Kubernetes: the kubeconfig file (default: as kubectl finds it).
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// Kubernetes: the kubeconfig context.
    #[arg(long)]
    pub(crate) context: Option<String>,
    /// Kubernetes, even when nothing else says so.
    #[arg(long)]
    pub(crate) kubernetes: bool,
    /// Kubernetes: the daemons' UDP port on every node (deploy/daemonset.yaml).
    #[arg(long, default_value_t = control::DEFAULT_PORT)]
    pub(crate) daemon_port: u16,
    /// Kubernetes: seconds the new Pod may take to become Ready before it is rolled back.
    #[arg(long, default_value_t = 180)]
    pub(crate) ready_timeout: u64,
    /// Pre-copy rounds before the final checkpoint (the container keeps running during them):
    /// a number (0 turns pre-copy off), or `auto`: one round, none when the destination already
    /// holds this container's chunks (it had it before).
    #[arg(long, default_value = "auto", value_parser = parse_precopy)]
    pub(crate) precopy: Precopy,
    /// Restore through an OCI checkpoint image assembled and imported on the destination (the
    /// way a Kubernetes node restores) instead of straight from the checkpoint archive.
    #[arg(long)]
    via_image: bool,
    /// A node's daemon address, NAME=ADDR:PORT (repeatable); without it, the lab's nodes.
    #[arg(long = "node", value_parser = parse_node)]
    pub(crate) nodes: Vec<(String, SocketAddr)>,
    /// Certificate folder of this client (from `migrate certs init`); the lab's operator
    /// certificate by default, on Kubernetes ~/.config/migrate/certs/operator.
    #[arg(long)]
    pub(crate) certs: Option<PathBuf>,
    /// One JSON object per line: every event, then the summary.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `--precopy`: a number of rounds, or `auto` (`None`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Precopy(pub(crate) Option<u32>);

fn parse_precopy(s: &str) -> Result<Precopy, String> {
    if s == "auto" {
        return Ok(Precopy(None));
    }
    s.parse()
        .map(|n| Precopy(Some(n)))
        .map_err(|_| format!("{s:?}: a number of rounds, or `auto`"))
}

/// Runs `migrate CONTAINER ...` from the words after `migrate`.
pub fn run(words: Vec<OsString>, out: &Output) -> anyhow::Result<ExitCode> {
    let args = match MigrateArgs::try_parse_from(&words) {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return Ok(ExitCode::from(code));
        }
    };
    if args.from == args.to {
        bail!("--from and --to are the same node ({})", args.from);
    }
    let lab_is_up = lab::read_state(&LabOptions::from_env())
        .ok()
        .flatten()
        .is_some();
    if crate::cluster::wanted(&args, lab_is_up) {
        return crate::cluster::run(args, out);
    }
    let nodes = Nodes::find(&args.nodes, args.certs.as_deref())?;
    let from = nodes.get(&args.from)?;
    nodes.get(&args.to)?;
    // Lab daemons are only reachable inside the lab's network: run there.
    if let Some(code) = nodes::run_inside(from)? {
        return Ok(code);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(drive(args, nodes, out))
}

async fn drive(args: MigrateArgs, nodes: Nodes, out: &Output) -> anyhow::Result<ExitCode> {
    let (from, to) = (nodes.get(&args.from)?, nodes.get(&args.to)?);
    let endpoint = nodes.client(&args.from)?;
    let conn = connect(&endpoint, &args.from, from.addr).await?;
    let request = MigrateRequest {
        container: args.name.clone(),
        to: to.addr,
        to_node: args.to.clone(),
        precopy: args.precopy.0,
        via_image: args.via_image,
        image_only: false,
        base_image: None,
    };
    let mut view = View::new(out, args.json);
    let outcome = run_on_source(&conn, request, &args.from, &mut view).await;
    conn.close(0u32.into(), b"done");
    Ok(match outcome? {
        Some(_) => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
    })
}

/// Connects to the daemon of node `name` at `addr`.
pub(crate) async fn connect(
    endpoint: &quinn::Endpoint,
    name: &str,
    addr: SocketAddr,
) -> anyhow::Result<quinn::Connection> {
    let connecting = endpoint.connect(addr, SERVER_NAME)?;
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from the daemon of {name} at {addr} within 10 s: is `migrate daemon` \
                 running there, and is UDP port {} open?",
                addr.port()
            )
        })?
        .with_context(|| {
            format!(
                "connecting to the daemon of {name} at {addr} (is this client's certificate \
                 signed by the daemons' CA?)"
            )
        })
}

/// Asks the source daemon behind `conn` to run one migration, showing its events in `view`.
/// The summary when it succeeded; `None` when it failed (the failure was shown).
pub(crate) async fn run_on_source(
    conn: &quinn::Connection,
    request: MigrateRequest,
    from: &str,
    view: &mut View<'_>,
) -> anyhow::Result<Option<Summary>> {
    nodes::migrate_on(conn, request, from, |event| view.show(event)).await
}
