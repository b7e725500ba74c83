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
use engine::control::{self, Event, MigrateRequest, Phase, Request, Summary, BASE_IMAGE_ROUND};
use engine::lab::{self, LabOptions};
use transport::quic;
use transport::tls::{NodeIdentity, SERVER_NAME};

use crate::output::{bytes, Output};

/// Set in the environment of the command re-run inside a lab namespace.
const IN_NETNS_ENV: &str = "MIGRATE_IN_NETNS";

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

fn parse_node(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ADDR:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?}: not an ADDR:PORT ({e})"))?;
    Ok((name.to_string(), addr))
}

/// Where the command connects from and to.
struct Plan {
    from_addr: SocketAddr,
    to_addr: SocketAddr,
    certs: PathBuf,
    /// The lab namespace to run in, when not already there.
    netns: Option<String>,
}

fn plan(args: &MigrateArgs) -> anyhow::Result<Plan> {
    if !args.nodes.is_empty() {
        let find = |name: &str| {
            args.nodes
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, a)| *a)
                .with_context(|| format!("node {name:?} is not among the --node options"))
        };
        let certs = args
            .certs
            .clone()
            .context("--certs is needed with --node (this client's certificate folder)")?;
        return Ok(Plan {
            from_addr: find(&args.from)?,
            to_addr: find(&args.to)?,
            certs,
            netns: None,
        });
    }
    let opts = LabOptions::from_env();
    let state = lab::read_state(&opts)?.with_context(|| {
        format!(
            "no lab is up ({} not found): run `migrate lab up`, or name the nodes with \
             --node NAME=ADDR:PORT and --certs",
            opts.state_file().display()
        )
    })?;
    let node = |name: &str| {
        state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| {
                format!(
                    "the lab has no node {name:?} (it has {})",
                    state
                        .nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    };
    let (from, to) = (node(&args.from)?, node(&args.to)?);
    if from.name == to.name {
        bail!("--from and --to are the same node ({})", from.name);
    }
    Ok(Plan {
        from_addr: from.daemon_addr(),
        to_addr: to.daemon_addr(),
        certs: args.certs.clone().unwrap_or_else(|| state.operator_certs()),
        netns: Some(from.netns.clone()),
    })
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
    let plan = plan(&args)?;
    if let Some(ns) = &plan.netns {
        if std::env::var_os(IN_NETNS_ENV).as_deref() != Some(ns.as_ref()) {
            // Lab daemons are only reachable inside the lab's network: run there.
            let exe = std::env::current_exe().context("finding this program")?;
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(exe)
                .args(std::env::args_os().skip(1))
                .env(IN_NETNS_ENV, ns)
                .status()
                .context("running `ip netns exec` (the lab needs root)")?;
            return Ok(ExitCode::from(status.code().unwrap_or(1) as u8));
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(drive(args, plan, out))
}

async fn drive(args: MigrateArgs, plan: Plan, out: &Output) -> anyhow::Result<ExitCode> {
    let identity = NodeIdentity::load(&plan.certs).with_context(|| {
        format!(
            "loading the client certificate from {}",
            plan.certs.display()
        )
    })?;
    let endpoint = quic::client_endpoint(&identity, Some(&args.from), quic::DEFAULT_IDLE_TIMEOUT)?;
    let conn = connect(&endpoint, &args.from, plan.from_addr).await?;
    let request = MigrateRequest {
        container: args.name.clone(),
        to: plan.to_addr,
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
    let (mut send, mut recv) = conn.open_bi().await?;
    control::write_message(&mut send, &Request::Migrate(request), from).await?;
    let _ = send.finish();
    loop {
        let event: Option<Event> = control::read_message(&mut recv, from).await?;
        let Some(event) = event else {
            bail!(
                "the daemon of {from} stopped reporting before the migration ended: see its \
                 log; check on both nodes where the container is"
            );
        };
        view.show(&event);
        match event {
            Event::Done(summary) => return Ok(Some(summary)),
            Event::Failed { .. } => return Ok(None),
            _ => {}
        }
    }
}

/// Shows events to people (phases on stderr, a progress bar while bytes move, the summary on
/// stdout) or as JSON lines.
pub(crate) struct View<'a> {
    out: &'a Output,
    json: bool,
    bar: Option<indicatif::ProgressBar>,
    /// The migrations make checkpoint images for a Pod (Kubernetes): nothing stops, and the
    /// summary is the image.
    pods: bool,
}

impl<'a> View<'a> {
    pub(crate) fn new(out: &'a Output, json: bool) -> Self {
        Self {
            out,
            json,
            bar: None,
            pods: false,
        }
    }

    /// A view of the checkpoint-image migrations of a Pod's containers.
    pub(crate) fn for_pods(mut self) -> Self {
        self.pods = true;
        self
    }

    pub(crate) fn show(&mut self, event: &Event) {
        if self.json {
            self.out.json(event);
            // A failure is also said in words, on stderr.
            if !matches!(event, Event::Failed { .. }) {
                return;
            }
        }
        match event {
            Event::Phase {
                migration_id,
                phase,
                round,
            } => {
                self.finish_bar();
                if self.out.quiet {
                    return;
                }
                let what = match (phase, round) {
                    (Phase::Plan, _) => format!("migration {migration_id}: checking both nodes"),
                    (Phase::StageImage, _) => {
                        "the destination lacks the container's image: sending it too".into()
                    }
                    (Phase::Precopy, Some(r)) => {
                        format!("pre-copy round {r}: checkpoint (container keeps running), send")
                    }
                    (Phase::Checkpoint, _) if self.pods => {
                        "checkpoint through the kubelet (the container keeps running)".into()
                    }
                    (Phase::Checkpoint, _) => "final checkpoint (the container stops)".into(),
                    (Phase::Transfer, _) if self.pods => "sending the checkpoint".into(),
                    (Phase::Transfer, _) => "sending what changed".into(),
                    (Phase::Assemble, _) => "assembling and importing the image".into(),
                    (Phase::Restore, _) => "restoring on the destination".into(),
                    (Phase::Verify, _) => "checking that it runs".into(),
                    (Phase::Cleanup, _) => "removing the source container and checkpoints".into(),
                    (Phase::Rollback, _) => "rolling back".into(),
                    (p, _) => p.to_string(),
                };
                eprintln!("[{phase}] {what}");
            }
            Event::Progress { done, total, .. } => {
                if self.out.quiet {
                    return;
                }
                let bar = self.bar.get_or_insert_with(|| {
                    let bar = indicatif::ProgressBar::new(*total);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "  {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
                        )
                        .expect("valid template"),
                    );
                    bar
                });
                bar.set_length(*total);
                bar.set_position(*done);
            }
            Event::Round {
                round,
                archive_bytes,
                wire_bytes,
                seconds,
            } => {
                self.finish_bar();
                let which = match *round {
                    0 => "final round".to_string(),
                    BASE_IMAGE_ROUND => "base image".to_string(),
                    r => format!("pre-copy round {r}"),
                };
                if !self.out.quiet {
                    eprintln!(
                        "  {which}: {} checkpoint, {} over the wire, {seconds:.1} s",
                        bytes(*archive_bytes),
                        bytes(*wire_bytes)
                    );
                }
            }
            Event::Done(s) if self.pods => {
                self.finish_bar();
                if !self.out.quiet {
                    eprintln!(
                        "  {}: checkpoint image {} on {}; checkpoint {}, {} over the wire",
                        s.container,
                        s.image.as_deref().unwrap_or("?"),
                        s.to,
                        bytes(s.archive_bytes),
                        bytes(s.wire_bytes_total)
                    );
                }
            }
            Event::Done(s) => {
                self.finish_bar();
                self.out.line(format!(
                    "migrated {} from {} to {} in {:.1} s (downtime {:.1} s); checkpoint {}, \
                     {} over the wire in the final round ({} in all)",
                    s.container,
                    s.from,
                    s.to,
                    s.total_seconds,
                    s.downtime_seconds,
                    bytes(s.archive_bytes),
                    bytes(s.wire_bytes),
                    bytes(s.wire_bytes_total)
                ));
            }
            Event::Failed {
                phase,
                message,
                rolled_back,
                destination_clean,
                ..
            } => {
                self.finish_bar();
                eprintln!("error: the migration failed in phase {phase}: {message}");
                if !destination_clean {
                    eprintln!(
                        "the destination did not confirm its cleanup: its daemon removes what \
                         the migration left when it restarts, or after 5 minutes"
                    );
                }
                if *rolled_back {
                    eprintln!("rolled back: the container runs on the source node as before");
                } else {
                    eprintln!(
                        "ROLLBACK INCOMPLETE: check `podman ps -a` on both nodes and the source \
                         daemon's log; a stopped container's checkpoint is kept in the daemon's \
                         work folder"
                    );
                }
            }
        }
    }

    fn finish_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
