//! `migrate drain NODE [--to NODE]` on the Podman platform (the lab, or nodes named with
//! `--node`): asks NODE's daemon which containers run there and which may move
//! (`Request::ListContainers`; the rules are in `engine::runtime`), migrates those that may
//! to the target, several at once (each its own `Request::Migrate` on its own stream of one
//! connection to NODE's daemon, which serves them side by side), shows one line per phase
//! start of each, and ends with a table of outcomes, or with `--json` one object per
//! container and a summary. The exit code says whether NODE is empty of running containers.
//!
//! There is no scheduler on Podman nodes, so nothing is cordoned.
//!
//! On a Kubernetes cluster (chosen as `migrate POD` chooses it: a Kubernetes option, or a
//! kubeconfig found when no lab is up and no `--node` is given) the same command drains a
//! Node through [`engine::drain::drain`]: cordon, each movable Pod to a node chosen as the
//! scheduler would (or `--to`), `--evict-rest` for the rest; the daemon part of each Pod's
//! migration is [`crate::cluster::DaemonImages`]. `--watch` runs [`engine::drain::Watcher`]:
//! nodes marked for drain (annotation or taint `migrate.dev/drain`, or our Cluster API
//! pre-drain hook on their Machine) are drained and their mark removed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use engine::control::{self, ContainerList, Event, MigrateRequest, Phase, Reply, Request};
use engine::runtime::ListedContainer;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::drain_board::{Board, Show, Work};
use crate::nodes::{self, NodeAddr, Nodes};
use crate::output::{bytes, Output};

/// Migrate every container of a node that can move to another node.
#[derive(Debug, Args)]
#[command(after_help = "\
Lists the running containers of NODE through its daemon and migrates each one that can move
to the --to node (memory and all, as `migrate NAME --from NODE --to TO` does), at most
--concurrency at once. Each migration prints one line per phase as it starts (on stderr); a
table follows on stdout: container, seconds, bytes over the wire, and the result: moved,
failed (the phase and why; a failed migration rolls back, the container runs on NODE again),
or not movable (why).

Not moved, and reported with the reason: containers in a podman pod (and pods' infra
containers), with a bind mount of a host path (it exists on NODE only; named volumes and
tmpfs move), run with --privileged, or labelled migrate.dev/pinned=true. Containers that do
not run are left alone and not counted.

No cordon: Podman nodes have no scheduler, so nothing keeps new containers off NODE while or
after it drains; stop whatever starts them first.

On Kubernetes (chosen by --kubernetes, --kubeconfig, --context, --evict-rest or --watch, or
by a kubeconfig being found when no lab is up and no --node is given): NODE is cordoned and
stays cordoned afterwards, as after `kubectl drain` (`kubectl uncordon NODE` when it is back).
Its Pods, in all namespaces, move one by one as `migrate POD --from NODE --to TARGET` does,
at most --concurrency at once; without --to each goes to a Ready, schedulable node with a
migrate daemon that fits its requests, nodeSelector, required node affinity and taints (the
scheduler's filters; among those, the node with the most free CPU and memory). DaemonSet and
static Pods stay (they belong to the node) and do not count against the drain; finished Pods
are skipped. Not movable, and reported: StatefulSet, Job and other controllers' Pods, hostPath
volumes, PersistentVolumes pinned to NODE, Pods not Running. --evict-rest evicts those, and
Pods whose migration failed, the normal way (an Eviction, so PodDisruptionBudgets apply; a
refusal is reported, not retried).

--watch drains nodes as they are marked, until interrupted: annotation migrate.dev/drain=true
or taint migrate.dev/drain on the Node, or the Cluster API pre-drain hook
pre-drain.delete.hook.machine.cluster.x-k8s.io/migrate on its Machine being deleted. When
every Pod moved (or with --evict-rest was evicted) the mark is removed, so `kubectl drain` or
Cluster API proceeds; otherwise it stays, and the node is not retried until the watcher
restarts.

Exit codes: 0 every running container (Pod) of NODE moved, or none ran (with --evict-rest:
moved or evicted); 1 at least one did not, or the drain could not start (the message says
what to check); 2 bad usage.

Examples:
  migrate drain node1                   # in a two-node lab: everything to the other node
  migrate drain node1 --to node3 --concurrency 4
  migrate drain node1 --to node2 --json # one JSON object per container, then a summary
  migrate drain a --to b --node a=10.0.0.1:7400 --node b=10.0.0.2:7400 --certs certs/operator
  migrate drain worker-3 --kubernetes   # a Kubernetes node: targets chosen per Pod
  migrate drain worker-3 --evict-rest   # ... and evict what cannot move
  migrate drain --watch --evict-rest    # drain marked nodes: kubectl annotate node worker-3 migrate.dev/drain=true")]
pub struct DrainArgs {
    /// The node to empty (not with --watch).
    #[arg(
        value_name = "NODE",
        required_unless_present = "watch",
        conflicts_with = "watch"
    )]
    node: Option<String>,
    /// The node the containers move to. Needed outside the lab and in a lab of more than
    /// two nodes; in a two-node lab it defaults to the other node.
    #[arg(long, value_name = "NODE")]
    to: Option<String>,
    /// At most this many migrations at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    /// One JSON object per line: each container's outcome as it is known, then a summary
    /// (`"event":"summary"`). Failures are also said in words on stderr.
    #[arg(long)]
    json: bool,
    /// A node's daemon address, NAME=ADDR:PORT (repeatable); without it, the lab's nodes.
    #[arg(long = "node", value_name = "NAME=ADDR:PORT", value_parser = nodes::parse_node)]
    nodes: Vec<(String, SocketAddr)>,
    /// Certificate folder of this client (from `migrate certs init`); the lab's operator
    /// certificate by default, on Kubernetes ~/.config/migrate/certs/operator.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Kubernetes: evict the Pods that could not move (not DaemonSet or static Pods), through
    /// the Eviction API so PodDisruptionBudgets apply.
    #[arg(long)]
    evict_rest: bool,
    /// Kubernetes: drain nodes as they are marked for drain, until interrupted.
    #[arg(long)]
    watch: bool,
    /// Kubernetes: seconds between two looks for marked nodes (--watch).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    interval: u64,
    /// Kubernetes: the kubeconfig file (default: as kubectl finds it).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes: the kubeconfig context.
    #[arg(long)]
    context: Option<String>,
    /// Kubernetes, even when nothing else says so.
    #[arg(long)]
    kubernetes: bool,
    /// Kubernetes: the daemons' UDP port on every node.
    #[arg(long, default_value_t = control::DEFAULT_PORT)]
    daemon_port: u16,
    /// Kubernetes: seconds each new Pod may take to become Ready before it is rolled back.
    #[arg(long, default_value_t = 180)]
    ready_timeout: u64,
}

impl DrainArgs {
    /// Whether this is a Kubernetes drain: a Kubernetes option was given, or nothing else
    /// (no `--node`, no lab up) says where the nodes are and a kubeconfig exists.
    fn on_kubernetes(&self, lab_is_up: bool) -> bool {
        if self.kubernetes
            || self.evict_rest
            || self.watch
            || self.kubeconfig.is_some()
            || self.context.is_some()
        {
            return true;
        }
        self.nodes.is_empty() && !lab_is_up && crate::cluster::kubeconfig_exists()
    }
}

/// Runs `migrate drain`.
pub fn run(args: DrainArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let lab_is_up = engine::lab::read_state(&engine::lab::LabOptions::from_env())
        .ok()
        .flatten()
        .is_some();
    if args.on_kubernetes(lab_is_up) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        return rt.block_on(kubernetes::run(&args, *out));
    }
    let node = args
        .node
        .clone()
        .context("NODE is needed: the node to drain")?;
    let nodes = Nodes::find(&args.nodes, args.certs.as_deref())?;
    let from = nodes.get(&node)?.clone();
    let to = target(&nodes, &from.name, args.to.as_deref())?.clone();
    if let Some(code) = nodes::run_inside(&from)? {
        return Ok(code);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(drain(&args, &nodes, from, to, *out))
}

/// The node the containers go to: `--to`, or in a two-node lab the other node.
fn target<'a>(nodes: &'a Nodes, from: &str, to: Option<&str>) -> anyhow::Result<&'a NodeAddr> {
    match to {
        Some(to) if to == from => {
            bail!("--to names the node being drained ({from}): name the node its containers go to")
        }
        Some(to) => nodes.get(to),
        None if !nodes.lab => bail!(
            "--to is needed outside the lab: the node {from}'s containers go to, named with \
             --node NAME=ADDR:PORT too (known besides {from}: {})",
            nodes.names(Some(from))
        ),
        None => {
            let others: Vec<&NodeAddr> = nodes.nodes.iter().filter(|n| n.name != from).collect();
            match others.as_slice() {
                [one] => Ok(one),
                [] => bail!("the lab has no node besides {from} to move its containers to"),
                _ => bail!(
                    "--to is needed: the lab has {} nodes besides {from} ({}); say which one \
                     takes its containers",
                    others.len(),
                    nodes.names(Some(from))
                ),
            }
        }
    }
}

async fn drain(
    args: &DrainArgs,
    nodes: &Nodes,
    from: NodeAddr,
    to: NodeAddr,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let endpoint = nodes.client(&from.name)?;
    let conn = crate::migrate::connect(&endpoint, &from.name, from.addr).await?;
    let list = list_containers(&conn, &from).await?;
    let (movable, staying): (Vec<ListedContainer>, Vec<ListedContainer>) = list
        .containers
        .into_iter()
        .partition(ListedContainer::movable);
    let show = Show::of(args.json, out.quiet);
    let work: Vec<Work> = movable.iter().map(Work::from).collect();
    let title = format!("{} → {}", from.name, to.name);
    let board = Arc::new(Board::on_stderr(&title, &work, show));
    let memory: Option<u64> = movable.iter().map(|c| c.memory_bytes).sum();
    let memory = memory.filter(|_| !movable.is_empty());
    board.say(&format!(
        "draining {}: {} running container(s), {} to move to {} (at most {} at once{}), {} \
         not movable; no cordon (Podman nodes have no scheduler)",
        from.name,
        movable.len() + staying.len(),
        movable.len(),
        to.name,
        args.concurrency,
        memory.map_or(String::new(), |m| format!(
            "; {} of memory in use to move",
            bytes(m)
        )),
        staying.len()
    ));

    let mut reports = Vec::new();
    for c in staying {
        let reason = c.not_movable.clone().unwrap_or_default();
        board.say(&format!("{}: not movable: {reason}", c.name));
        let report = Report::new(&c, &from, &to, Outcome::NotMovable { reason });
        if args.json {
            out.json(&report);
        }
        reports.push(report);
    }

    let limit = Arc::new(Semaphore::new(usize::from(args.concurrency)));
    let mut running = JoinSet::new();
    for c in movable {
        let (conn, limit, board) = (conn.clone(), limit.clone(), board.clone());
        let (from, to) = (from.clone(), to.clone());
        running.spawn(async move {
            let _permit = limit
                .acquire_owned()
                .await
                .expect("the semaphore stays open");
            migrate_one(&conn, c, &from, &to, &board).await
        });
    }
    // The board's time left moves, and a pipe gets its status lines, between events too.
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let done = tokio::select! {
            done = running.join_next() => done,
            _ = ticks.tick() => {
                board.tick();
                continue;
            }
        };
        let Some(done) = done else { break };
        let report = done.context("a migration task panicked")?;
        if args.json {
            out.json(&report);
        }
        board.finished(&report.container, report.outcome == Outcome::Moved);
        reports.push(report);
    }
    board.close();
    conn.close(0u32.into(), b"done");

    let summary = DrainSummary::of(&reports, &from, &to, started);
    if args.json {
        out.json(&summary);
    } else if reports.is_empty() {
        out.line(format!(
            "nothing to drain: no containers run on {}",
            from.name
        ));
    } else {
        reports.sort_by(|a, b| a.container.cmp(&b.container));
        for line in table(&reports) {
            out.line(line);
        }
        out.line(summary.sentence());
    }
    Ok(if summary.drained {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Asks `from`'s daemon for its running containers.
async fn list_containers(
    conn: &quinn::Connection,
    from: &NodeAddr,
) -> anyhow::Result<ContainerList> {
    let reply = control::call(conn, &Request::ListContainers)
        .await
        .with_context(|| {
            format!(
                "asking the daemon of {} at {} for its containers",
                from.name, from.addr
            )
        })?;
    match reply {
        Reply::Ok { detail } => serde_json::from_value(detail).with_context(|| {
            format!(
                "the daemon of {} answered the container list with something this client does \
                 not read: does it run the same version of migrate?",
                from.name
            )
        }),
        Reply::Error { message } if message.contains("unknown variant") => bail!(
            "the daemon of {} does not know how to list its containers: it is older than this \
             client; upgrade migrate there ({message})",
            from.name
        ),
        Reply::Error { message } => bail!("{message} (asked through the daemon of {})", from.name),
    }
}

/// Migrates one container, printing a line per phase; what became of it.
async fn migrate_one(
    conn: &quinn::Connection,
    c: ListedContainer,
    from: &NodeAddr,
    to: &NodeAddr,
    board: &Board,
) -> Report {
    let started = Instant::now();
    let request = MigrateRequest {
        container: c.name.clone(),
        to: to.addr,
        to_node: to.name.clone(),
        precopy: None,
        via_image: false,
        image_only: false,
        base_image: None,
    };
    let mut last_phase = None;
    let mut wire_bytes = 0;
    let mut failed = None;
    let result = nodes::migrate_on(conn, request, &from.name, |event| match event {
        Event::Phase { phase, round, .. } => {
            last_phase = Some(*phase);
            let what = describe(*phase, *round, from, to);
            board.say(&format!("{}: {what}", c.name));
            board.phase(&c.name, *phase, *round, &what);
        }
        Event::Progress { phase, done, total } => board.progress(&c.name, *phase, *done, *total),
        Event::Round { wire_bytes: w, .. } => wire_bytes += w,
        Event::Failed {
            phase,
            message,
            rolled_back,
            destination_clean,
            ..
        } => {
            failed = Some(Outcome::Failed {
                phase: Some(*phase),
                message: message.clone(),
                rolled_back: Some(*rolled_back),
                destination_clean: Some(*destination_clean),
            })
        }
        _ => {}
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let mut report = match result {
        Ok(Some(s)) => {
            board.say(&format!(
                "{}: moved to {} in {:.1} s (downtime {:.1} s), {} over the wire",
                c.name,
                to.name,
                s.total_seconds,
                s.downtime_seconds,
                bytes(s.wire_bytes_total)
            ));
            let mut r = Report::new(&c, from, to, Outcome::Moved);
            r.migration_id = Some(s.migration_id);
            r.seconds = Some(s.total_seconds);
            r.wire_bytes = s.wire_bytes_total;
            r.downtime_seconds = Some(s.downtime_seconds);
            return r;
        }
        Ok(None) => Report::new(
            &c,
            from,
            to,
            failed.unwrap_or_else(|| Outcome::Failed {
                phase: last_phase,
                message: "the daemon reported a failure without saying why: see its log".into(),
                rolled_back: None,
                destination_clean: None,
            }),
        ),
        Err(e) => Report::new(
            &c,
            from,
            to,
            Outcome::Failed {
                phase: last_phase,
                message: format!("{e:#}"),
                rolled_back: None,
                destination_clean: None,
            },
        ),
    };
    report.seconds = Some(seconds);
    report.wire_bytes = wire_bytes;
    // Failures are said in words even with --json and -q, as `migrate` does.
    board.error(&report.failure_words());
    report
}

/// What a phase does, in a few words.
fn describe(phase: Phase, round: Option<u32>, from: &NodeAddr, to: &NodeAddr) -> String {
    match phase {
        Phase::Plan => format!("plan: checking it and {}", to.name),
        Phase::StageImage => format!("sending its image ({} lacks it)", to.name),
        Phase::Precopy => format!("pre-copy round {} (it keeps running)", round.unwrap_or(1)),
        Phase::Checkpoint => "final checkpoint (it stops)".into(),
        Phase::Transfer => "sending what changed".into(),
        Phase::Assemble => "assembling its checkpoint image".into(),
        Phase::Restore => format!("restoring on {}", to.name),
        Phase::Verify => format!("checking that it runs on {}", to.name),
        Phase::Cleanup => format!("removing it from {}", from.name),
        Phase::Rollback => format!("rolling back (back to running on {})", from.name),
    }
}

/// The Kubernetes drain's progress lines on stderr, stamped with the seconds since the drain
/// started; silent with `-q` and `--json`. (The Podman drain shows a [`Board`].)
#[derive(Debug, Clone, Copy)]
struct Clock {
    started: Instant,
    quiet: bool,
}

impl Clock {
    fn say(&self, line: &str) {
        if !self.quiet {
            eprintln!("[{:6.1}s] {line}", self.started.elapsed().as_secs_f64());
        }
    }

    /// [`Clock::say`] of `prefix` and `line`, when there is a line.
    fn say_prefixed(&self, prefix: &str, line: Option<&str>) {
        if let Some(line) = line {
            self.say(&format!("{prefix}{line}"));
        }
    }
}

/// What became of one container.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Moved,
    Failed {
        /// The phase that failed; `None` when the daemon's stream broke before any began.
        phase: Option<Phase>,
        message: String,
        /// Whether it runs on the source again; `None` when the daemon did not say.
        rolled_back: Option<bool>,
        destination_clean: Option<bool>,
    },
    NotMovable {
        reason: String,
    },
}

/// One container's outcome, as a JSON line and a table row.
#[derive(Debug, Clone, Serialize)]
struct Report {
    /// Always `"container"`.
    event: &'static str,
    container: String,
    id: String,
    image: String,
    from: String,
    to: String,
    /// `moved`, `failed` or `not_movable`.
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phase: Option<Phase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rolled_back: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination_clean: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    migration_id: Option<String>,
    /// Seconds its migration took; absent when none ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    downtime_seconds: Option<f64>,
    /// Bytes over the wire, every round (also those of a failed migration).
    wire_bytes: u64,
    #[serde(skip)]
    outcome: Outcome,
}

impl Report {
    fn new(c: &ListedContainer, from: &NodeAddr, to: &NodeAddr, outcome: Outcome) -> Self {
        let (result, reason, phase, message, rolled_back, destination_clean) = match &outcome {
            Outcome::Moved => ("moved", None, None, None, None, None),
            Outcome::NotMovable { reason } => {
                ("not_movable", Some(reason.clone()), None, None, None, None)
            }
            Outcome::Failed {
                phase,
                message,
                rolled_back,
                destination_clean,
            } => (
                "failed",
                None,
                *phase,
                Some(message.clone()),
                *rolled_back,
                *destination_clean,
            ),
        };
        Report {
            event: "container",
            container: c.name.clone(),
            id: c.id.clone(),
            image: c.image.clone(),
            from: from.name.clone(),
            to: to.name.clone(),
            result,
            reason,
            phase,
            message,
            rolled_back,
            destination_clean,
            migration_id: None,
            seconds: None,
            downtime_seconds: None,
            wire_bytes: 0,
            outcome,
        }
    }

    /// The result column.
    fn result_words(&self) -> String {
        match &self.outcome {
            Outcome::Moved => format!("moved to {}", self.to),
            Outcome::NotMovable { reason } => format!("not movable: {reason}"),
            Outcome::Failed { phase, message, .. } => {
                let phase = phase.map_or("before any phase".to_string(), |p| p.to_string());
                format!("failed in {phase}: {message}")
            }
        }
    }

    /// A failed migration said in words: what, where, and where the container is now.
    fn failure_words(&self) -> String {
        let Outcome::Failed {
            rolled_back,
            destination_clean,
            ..
        } = &self.outcome
        else {
            return String::new();
        };
        let mut words = format!(
            "error: migrating {} from {} to {} {}",
            self.container,
            self.from,
            self.to,
            self.result_words()
        );
        match rolled_back {
            Some(true) => words += &format!("; rolled back: it runs on {} as before", self.from),
            Some(false) => {
                words += &format!(
                    "; ROLLBACK INCOMPLETE: check `podman ps -a` on {} and {} and the daemon log \
                     of {}",
                    self.from, self.to, self.from
                )
            }
            None => {
                words += &format!(
                    "; where it is now is unknown: check `podman ps -a` on {} and {}",
                    self.from, self.to
                )
            }
        }
        if *destination_clean == Some(false) {
            words += &format!(
                "; {} did not confirm its cleanup (its daemon removes what the migration left \
                 when it restarts, or after 5 minutes)",
                self.to
            );
        }
        words
    }
}

/// The table of outcomes, a header first.
fn table(reports: &[Report]) -> Vec<String> {
    let width = reports
        .iter()
        .map(|r| r.container.chars().count())
        .max()
        .unwrap_or(0)
        .max("CONTAINER".len());
    let mut lines = vec![format!(
        "{:<width$}  {:>7}  {:>10}  RESULT",
        "CONTAINER", "SECONDS", "WIRE"
    )];
    for r in reports {
        let seconds = r.seconds.map_or("-".to_string(), |s| format!("{s:.1}"));
        let wire = match r.outcome {
            Outcome::NotMovable { .. } => "-".to_string(),
            _ => bytes(r.wire_bytes),
        };
        lines.push(format!(
            "{:<width$}  {seconds:>7}  {wire:>10}  {}",
            r.container,
            r.result_words()
        ));
    }
    lines
}

/// The drain's outcome (the last JSON line).
#[derive(Debug, Clone, Serialize)]
struct DrainSummary {
    /// Always `"summary"`.
    event: &'static str,
    node: String,
    to: String,
    /// Running containers found on the node.
    containers: usize,
    moved: usize,
    failed: usize,
    not_movable: usize,
    /// Bytes over the wire, all migrations.
    wire_bytes: u64,
    seconds: f64,
    /// Every running container moved (the exit code is 0).
    drained: bool,
}

impl DrainSummary {
    fn of(reports: &[Report], from: &NodeAddr, to: &NodeAddr, started: Instant) -> Self {
        let count = |f: fn(&Outcome) -> bool| reports.iter().filter(|r| f(&r.outcome)).count();
        let moved = count(|o| matches!(o, Outcome::Moved));
        DrainSummary {
            event: "summary",
            node: from.name.clone(),
            to: to.name.clone(),
            containers: reports.len(),
            moved,
            failed: count(|o| matches!(o, Outcome::Failed { .. })),
            not_movable: count(|o| matches!(o, Outcome::NotMovable { .. })),
            wire_bytes: reports.iter().map(|r| r.wire_bytes).sum(),
            seconds: started.elapsed().as_secs_f64(),
            drained: moved == reports.len(),
        }
    }

    fn sentence(&self) -> String {
        let how = format!(
            "{} moved to {} in {:.1} s, {} over the wire",
            self.moved,
            self.to,
            self.seconds,
            bytes(self.wire_bytes)
        );
        if self.drained {
            format!("{} drained: {how}", self.node)
        } else {
            format!(
                "{} NOT drained: {} of {} containers did not move ({} not movable, {} \
                 failed); {how}",
                self.node,
                self.containers - self.moved,
                self.containers,
                self.not_movable,
                self.failed
            )
        }
    }
}

/// The Kubernetes drain: [`engine::drain`] with the daemons behind
/// [`crate::cluster::DaemonImages`], per-Pod progress lines, a table and an exit code.
mod kubernetes {
    use super::*;

    use engine::cluster::{CheckpointImages, PodPlan, Progress};
    use engine::drain::{
        self, DrainEvent, DrainOptions, DrainReport, Eviction, PodReport, PodResult, WatchEvent,
        Watcher,
    };
    use std::collections::BTreeMap;
    use std::sync::OnceLock;

    use crate::cluster::{self, DaemonImages};
    use crate::drain_board::{Board, Show, Work};
    use crate::progress::View;

    /// The daemons' own progress is not drawn (several Pods move at once and their bars would
    /// interleave): drain prints one line per step; daemon failures are still shown.
    static QUIET: Output = Output { quiet: true };

    /// The images of one Pod, or why its daemons cannot be reached.
    enum PodImages {
        Daemons(Arc<DaemonImages<'static>>),
        Unreachable(String),
    }

    impl CheckpointImages for PodImages {
        async fn prepare(
            &self,
            plan: &PodPlan,
            migration_id: &str,
        ) -> Result<BTreeMap<String, String>, String> {
            match self {
                PodImages::Daemons(d) => d.prepare(plan, migration_id).await,
                PodImages::Unreachable(why) => Err(why.clone()),
            }
        }

        async fn discard(&self, plan: &PodPlan, migration_id: &str) {
            if let PodImages::Daemons(d) = self {
                d.discard(plan, migration_id).await
            }
        }
    }

    /// Makes the [`PodImages`] of each planned Pod and keeps them, to tell the target daemons
    /// to finish once the Pods run.
    struct Images {
        endpoint: quinn::Endpoint,
        port: u16,
        made: Mutex<Vec<Arc<DaemonImages<'static>>>>,
        /// The drain's board, once the drain has found its Pods: the daemons' phases and bytes
        /// go there. Unset in watch mode, which shows lines only.
        board: Option<Arc<OnceLock<Board>>>,
    }

    impl Images {
        fn for_plan(&self, plan: &PodPlan) -> PodImages {
            let mut view = View::new(&QUIET, false).for_pods();
            if let Some(slot) = &self.board {
                let (slot, pod) = (
                    slot.clone(),
                    format!("{}/{}", plan.namespace, plan.pod_name()),
                );
                view = view.tapped(Box::new(move |event| {
                    if let Some(board) = slot.get() {
                        daemon_event(board, &pod, event);
                    }
                }));
            }
            let images = DaemonImages::for_plan(self.endpoint.clone(), plan, self.port, view);
            match images {
                Ok(images) => {
                    let images = Arc::new(images);
                    self.made
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(images.clone());
                    PodImages::Daemons(images)
                }
                Err(e) => PodImages::Unreachable(format!("{e:#}")),
            }
        }

        /// The target daemons keep the images and drop the checkpoint files (nothing is left
        /// to do for rolled back migrations: their images were discarded).
        async fn finish(&self) {
            let made: Vec<_> = self
                .made
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
                .collect();
            for images in made {
                images.finish().await;
            }
        }
    }

    pub(super) async fn run(args: &DrainArgs, out: Output) -> anyhow::Result<ExitCode> {
        let mut config =
            cluster::kube_config_for(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
        // kube retries a 429 up to 15 times: an Eviction refused by a PodDisruptionBudget is to
        // be reported, not retried for minutes.
        config.default_retry = false;
        let client = kube::Client::try_from(config).context("creating the Kubernetes client")?;
        let endpoint = cluster::operator_endpoint(args.certs.as_deref())?;
        let slot = Arc::new(OnceLock::new());
        let images = Images {
            endpoint,
            port: args.daemon_port,
            made: Mutex::new(Vec::new()),
            board: (!args.watch).then(|| slot.clone()),
        };
        let clock = Clock {
            started: Instant::now(),
            quiet: out.quiet || args.json,
        };
        let mut opts = DrainOptions::new(&cluster::now_rfc3339());
        opts.to = args.to.clone();
        opts.concurrency = usize::from(args.concurrency);
        opts.evict_rest = args.evict_rest;
        opts.ready_timeout = Duration::from_secs(args.ready_timeout);
        if args.watch {
            return watch(args, &client, opts, &images, clock, out).await;
        }
        let node = args
            .node
            .clone()
            .context("NODE is needed: the node to drain")?;
        clock.say(&format!(
            "draining Kubernetes node {node}: cordon, then each Pod that can move to {} (at \
             most {} at once){}",
            args.to
                .as_deref()
                .unwrap_or("a node chosen as the scheduler would"),
            args.concurrency,
            if args.evict_rest {
                "; the rest is evicted"
            } else {
                ""
            }
        ));
        let show = Show::of(args.json, out.quiet);
        let drained = drain::drain(
            &client,
            &node,
            &opts,
            |p| images.for_plan(p),
            |e| {
                if let DrainEvent::Found { pods, .. } = &e {
                    let work: Vec<Work> = pods
                        .iter()
                        .map(|p| Work {
                            name: p.clone(),
                            bytes: None,
                        })
                        .collect();
                    let board = Board::on_stderr(&node, &work, show).started_at(clock.started);
                    let _ = slot.set(board);
                }
                match slot.get() {
                    Some(board) => board_event(board, &e),
                    None => say_event(clock, &e),
                }
            },
        );
        tokio::pin!(drained);
        // The board's time left moves between events too.
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let report = loop {
            tokio::select! {
                report = &mut drained => break report,
                _ = ticks.tick() => {
                    if let Some(board) = slot.get() {
                        board.tick();
                    }
                }
            }
        };
        if let Some(board) = slot.get() {
            board.close();
        }
        images.finish().await;
        let report = report.map_err(|e| anyhow::anyhow!("{e}"))?;
        print_report(&report, args, out, clock.started);
        Ok(if report.settled() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    /// `--watch`: a pass every `--interval` seconds until Ctrl-C.
    async fn watch(
        args: &DrainArgs,
        client: &kube::Client,
        opts: DrainOptions,
        images: &Images,
        clock: Clock,
        out: Output,
    ) -> anyhow::Result<ExitCode> {
        clock.say(&format!(
            "watching for nodes marked for drain (annotation {}=true, taint {}, or hook {} on \
             a Machine being deleted), every {} s; Ctrl-C stops",
            drain::DRAIN_ANNOTATION,
            drain::DRAIN_TAINT,
            drain::MACHINE_HOOK,
            args.interval
        ));
        let mut watcher = Watcher::new(opts);
        let mut tick = tokio::time::interval(Duration::from_secs(args.interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One listener for the whole watch: once tokio handles SIGINT, a Ctrl-C that comes
        // while no listener exists is lost, and one during a pass (a pass is not cut short:
        // its migrations would not roll back) would be. It ends the watch after the pass.
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                biased;
                _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
                _ = tick.tick() => {}
            }
            // When each node's drain began: its report's seconds count from there, not from
            // the start of the watch.
            let began: Mutex<BTreeMap<String, Instant>> = Mutex::new(BTreeMap::new());
            let pass = watcher
                .watch_once(
                    client,
                    |p| images.for_plan(p),
                    |e| {
                        if let WatchEvent::Draining { node, .. } = &e {
                            began
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(node.clone(), Instant::now());
                        }
                        say_watch(clock, &e)
                    },
                )
                .await;
            images.finish().await;
            let began = began.into_inner().unwrap_or_else(|e| e.into_inner());
            match pass {
                Ok(outcomes) => {
                    for o in outcomes {
                        if let Ok(report) = &o.report {
                            let started = began.get(&o.node).copied().unwrap_or(clock.started);
                            print_report(report, args, out, started);
                        }
                    }
                }
                Err(e) => eprintln!("warning: watching for nodes to drain: {e}"),
            }
        }
    }

    fn say_watch(clock: Clock, event: &WatchEvent) {
        match event {
            WatchEvent::Draining { node, marks } => clock.say(&format!(
                "node {node} is marked for drain ({})",
                marks
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            WatchEvent::Drain { node, event } => {
                clock.say_prefixed(&format!("{node}: "), event_line(event).as_deref())
            }
            WatchEvent::Released { node, mark } => {
                clock.say(&format!("{node}: drained; removed the {mark}"))
            }
            WatchEvent::Kept { node, why } => eprintln!("warning: node {node}: {why}"),
            WatchEvent::Warning(w) => eprintln!("warning: {w}"),
        }
    }

    fn say_event(clock: Clock, event: &DrainEvent) {
        clock.say_prefixed("", event_line(event).as_deref());
        if let Some(words) = failure_words(event) {
            // Failures are said in words even with --json and -q, as `migrate` does.
            eprintln!("{words}");
        }
    }

    /// A failed Pod migration, in words.
    fn failure_words(event: &DrainEvent) -> Option<String> {
        let DrainEvent::Done {
            pod,
            result: PodResult::Failed { to, phase, message },
        } = event
        else {
            return None;
        };
        Some(format!(
            "error: migrating Pod {pod}{} failed while {phase}: {message}",
            to.as_ref().map(|t| format!(" to {t}")).unwrap_or_default()
        ))
    }

    /// A drain step on the board: its line, and where its Pod is now.
    fn board_event(board: &Board, event: &DrainEvent) {
        if let Some(line) = event_line(event) {
            board.say(&line);
        }
        if let Some(words) = failure_words(event) {
            board.error(&words);
        }
        let (pod, phase, what) = match event {
            DrainEvent::Step { pod, progress } => match progress {
                Progress::Created { .. } => (
                    pod,
                    Phase::Restore,
                    "new Pod created; waiting until it is Ready",
                ),
                Progress::Ready { .. } => (pod, Phase::Verify, "new Pod Ready"),
                Progress::DeletingSource | Progress::HandingOver { .. } => {
                    (pod, Phase::Cleanup, "the source Pod goes")
                }
                Progress::RollingBack(_) => (pod, Phase::Rollback, "rolling back"),
                _ => return,
            },
            DrainEvent::Done { pod, result } => {
                board.finished(pod, matches!(result, PodResult::Moved { .. }));
                return;
            }
            _ => return,
        };
        board.phase(pod, phase, None, what);
    }

    /// A Pod's daemon event on the board: the image phases and their bytes.
    fn daemon_event(board: &Board, pod: &str, event: &Event) {
        match event {
            Event::Phase { phase, round, .. } => {
                let what = match phase {
                    Phase::Plan => "checking both daemons",
                    Phase::StageImage => "sending the base image (the target lacks it)",
                    Phase::Checkpoint => "kubelet checkpoint (the Pod keeps running)",
                    Phase::Transfer => "sending the checkpoint",
                    Phase::Assemble => "building the checkpoint image on the target",
                    _ => "",
                };
                board.phase(pod, *phase, *round, what);
            }
            Event::Progress { phase, done, total } => board.progress(pod, *phase, *done, *total),
            _ => {}
        }
    }

    /// The progress line of a drain step, if it has one.
    fn event_line(event: &DrainEvent) -> Option<String> {
        Some(match event {
            DrainEvent::Cordoned { already: true } => "the node was cordoned already".into(),
            DrainEvent::Cordoned { already: false } => {
                "cordoned (spec.unschedulable): no new Pod starts there".into()
            }
            DrainEvent::Found {
                movable, staying, ..
            } => {
                format!("{movable} Pod(s) to move, {staying} staying")
            }
            DrainEvent::Staying { pod, result } => format!("{pod}: {}", result_words(result)),
            DrainEvent::Target { pod, to } => format!("{pod}: moving to {to}"),
            DrainEvent::Step { pod, progress } => {
                let step = match progress {
                    Progress::Preparing => {
                        "checkpointing through the kubelet (the Pod keeps running)".to_string()
                    }
                    Progress::Prepared(images) => {
                        format!("{} checkpoint image(s) ready on the target", images.len())
                    }
                    Progress::Created { pod } => {
                        format!("created Pod {pod}; waiting until it is Ready")
                    }
                    Progress::Starting { .. } => return None,
                    Progress::Ready { after } => {
                        format!("new Pod Ready after {:.1} s", after.as_secs_f64())
                    }
                    Progress::DeletingSource => "deleting the source Pod".into(),
                    Progress::HandingOver { replicaset } => {
                        format!("handing the new Pod to ReplicaSet {replicaset}")
                    }
                    Progress::RollingBack(phase) => format!("{phase} failed: rolling back"),
                };
                format!("{pod}: {step}")
            }
            DrainEvent::Done { pod, result } => match result {
                PodResult::Failed { .. } => return None,
                other => format!("{pod}: {}", result_words(other)),
            },
            DrainEvent::Evicted { pod, eviction } => {
                format!("{pod}: {}", eviction_words(eviction))
            }
        })
    }

    fn result_words(result: &PodResult) -> String {
        match result {
            PodResult::Moved { to, new_pod, took } => {
                format!("moved to {to} as {new_pod} in {:.1} s", took.as_secs_f64())
            }
            PodResult::Failed { phase, message, .. } => {
                format!("failed while {phase}: {message}")
            }
            PodResult::NotMovable {
                reason,
                node_bound: true,
            } => format!("stays on the node: {reason}"),
            PodResult::NotMovable { reason, .. } => format!("not movable: {reason}"),
            PodResult::Skipped { reason } => format!("skipped: {reason}"),
        }
    }

    fn eviction_words(eviction: &Eviction) -> String {
        match eviction {
            Eviction::Evicted => "evicted".into(),
            Eviction::Blocked { message } => format!(
                "eviction refused (a PodDisruptionBudget does not allow it now; not retried): \
                 {message}"
            ),
            Eviction::Failed { message } => format!("eviction failed: {message}"),
            Eviction::Skipped { reason } => format!("not evicted: {reason}"),
        }
    }

    /// One Pod's outcome as a JSON line.
    fn pod_json(node: &str, p: &PodReport) -> serde_json::Value {
        let mut v = serde_json::json!({
            "event": "pod", "node": node, "namespace": p.namespace, "pod": p.name,
        });
        match &p.result {
            PodResult::Moved { to, new_pod, took } => {
                v["result"] = "moved".into();
                v["to"] = to.as_str().into();
                v["new_pod"] = new_pod.as_str().into();
                v["seconds"] = took.as_secs_f64().into();
            }
            PodResult::Failed { to, phase, message } => {
                v["result"] = "failed".into();
                if let Some(to) = to {
                    v["to"] = to.as_str().into();
                }
                v["phase"] = phase.as_str().into();
                v["message"] = message.as_str().into();
            }
            PodResult::NotMovable { reason, node_bound } => {
                v["result"] = if *node_bound { "stays" } else { "not_movable" }.into();
                v["reason"] = reason.as_str().into();
            }
            PodResult::Skipped { reason } => {
                v["result"] = "skipped".into();
                v["reason"] = reason.as_str().into();
            }
        }
        if let Some(e) = &p.eviction {
            let (word, message) = match e {
                Eviction::Evicted => ("evicted", None),
                Eviction::Blocked { message } => ("blocked", Some(message)),
                Eviction::Failed { message } => ("failed", Some(message)),
                Eviction::Skipped { reason } => ("skipped", Some(reason)),
            };
            v["eviction"] = word.into();
            if let Some(m) = message {
                v["eviction_message"] = m.as_str().into();
            }
        }
        v
    }

    /// The table of a drain's Pods, a header first: Pod, result, target, seconds.
    pub(super) fn pod_table(report: &DrainReport) -> Vec<String> {
        let rows: Vec<(String, String, String, String)> = report
            .pods
            .iter()
            .map(|p| {
                let (target, seconds) = match &p.result {
                    PodResult::Moved { to, took, .. } => {
                        (to.clone(), format!("{:.1}", took.as_secs_f64()))
                    }
                    PodResult::Failed { to: Some(to), .. } => (to.clone(), "-".into()),
                    _ => ("-".into(), "-".into()),
                };
                let mut result = result_words(&p.result);
                if let Some(e) = &p.eviction {
                    result = format!("{result}; {}", eviction_words(e));
                }
                (p.id(), result, target, seconds)
            })
            .collect();
        let width = |f: fn(&(String, String, String, String)) -> &String, head: &str| {
            rows.iter()
                .map(|r| f(r).chars().count())
                .max()
                .unwrap_or(0)
                .max(head.len())
        };
        let pod_w = width(|r| &r.0, "POD");
        let target_w = width(|r| &r.2, "TARGET");
        let mut lines = vec![format!(
            "{:<pod_w$}  {:<target_w$}  {:>7}  RESULT",
            "POD", "TARGET", "SECONDS"
        )];
        for (pod, result, target, seconds) in rows {
            lines.push(format!(
                "{pod:<pod_w$}  {target:<target_w$}  {seconds:>7}  {result}"
            ));
        }
        lines
    }

    /// The last sentence: drained or not, what stays, and that the node stays cordoned.
    pub(super) fn sentence(report: &DrainReport, seconds: f64) -> String {
        let count = |f: fn(&PodReport) -> bool| report.pods.iter().filter(|p| f(p)).count();
        let moved = count(|p| matches!(p.result, PodResult::Moved { .. }));
        let evicted = count(|p| p.eviction == Some(Eviction::Evicted));
        let stays = count(|p| {
            matches!(
                p.result,
                PodResult::NotMovable {
                    node_bound: true,
                    ..
                }
            )
        });
        let left = count(|p| !p.settled());
        let node = &report.node;
        let cordon = format!("{node} stays cordoned (`kubectl uncordon {node}` when it is back)");
        if left == 0 {
            format!(
                "{node} drained in {seconds:.1} s: {moved} Pod(s) moved, {evicted} evicted, \
                 {stays} DaemonSet or static Pod(s) stay; {cordon}"
            )
        } else {
            format!(
                "{node} NOT drained: {left} Pod(s) did not move{}; {moved} moved, {evicted} \
                 evicted in {seconds:.1} s; {cordon}",
                if report.pods.iter().any(|p| p.eviction.is_some()) {
                    " and were not evicted"
                } else {
                    " (--evict-rest evicts them)"
                }
            )
        }
    }

    fn print_report(report: &DrainReport, args: &DrainArgs, out: Output, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        if args.json {
            for p in &report.pods {
                out.json(&pod_json(&report.node, p));
            }
            out.json(&serde_json::json!({
                "event": "summary", "node": report.node, "pods": report.pods.len(),
                "moved": report.pods.iter().filter(|p| matches!(p.result, PodResult::Moved { .. })).count(),
                "was_cordoned": report.was_cordoned, "all_moved": report.all_moved(),
                "drained": report.settled(), "seconds": seconds,
            }));
            return;
        }
        if report.pods.is_empty() {
            out.line(format!("nothing to drain: no Pods run on {}", report.node));
            return;
        }
        for line in pod_table(report) {
            out.line(line);
        }
        out.line(sentence(report, seconds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeAddr {
        NodeAddr {
            name: name.into(),
            addr: "10.0.0.1:7400".parse().unwrap(),
            netns: None,
        }
    }

    fn nodes(names: &[&str], lab: bool) -> Nodes {
        Nodes {
            nodes: names.iter().map(|n| node(n)).collect(),
            certs: "certs".into(),
            lab,
        }
    }

    fn container(name: &str) -> ListedContainer {
        ListedContainer {
            name: name.into(),
            id: "abc".into(),
            image: "img".into(),
            not_movable: None,
            memory_bytes: None,
        }
    }

    #[test]
    fn the_target_is_named_or_the_other_lab_node() {
        let two = nodes(&["a", "b"], true);
        assert_eq!(target(&two, "a", None).unwrap().name, "b");
        assert_eq!(target(&two, "b", None).unwrap().name, "a");
        assert_eq!(target(&two, "a", Some("b")).unwrap().name, "b");
        let err = target(&two, "a", Some("a")).unwrap_err().to_string();
        assert!(err.contains("node being drained"), "{err}");
        let err = target(&two, "a", Some("z")).unwrap_err().to_string();
        assert!(err.contains("no node \"z\""), "{err}");
        let three = nodes(&["a", "b", "c"], true);
        let err = target(&three, "a", None).unwrap_err().to_string();
        assert!(
            err.contains("--to is needed") && err.contains("b, c"),
            "{err}"
        );
        assert_eq!(target(&three, "a", Some("c")).unwrap().name, "c");
        let named = nodes(&["a", "b"], false);
        let err = target(&named, "a", None).unwrap_err().to_string();
        assert!(err.contains("--to is needed outside the lab"), "{err}");
        let one = nodes(&["a"], true);
        assert!(target(&one, "a", None).is_err());
    }

    #[test]
    fn reports_read_as_json_and_as_a_table() {
        let (a, b) = (node("a"), node("b"));
        let mut moved = Report::new(&container("web"), &a, &b, Outcome::Moved);
        moved.seconds = Some(2.5);
        moved.wire_bytes = 2048;
        let stays = Report::new(
            &container("data-keeper"),
            &a,
            &b,
            Outcome::NotMovable {
                reason: "bind mount of host path /srv".into(),
            },
        );
        let mut failed = Report::new(
            &container("db"),
            &a,
            &b,
            Outcome::Failed {
                phase: Some(Phase::Restore),
                message: "b refused: no room".into(),
                rolled_back: Some(true),
                destination_clean: Some(true),
            },
        );
        failed.seconds = Some(1.0);

        let json = serde_json::to_value(&moved).unwrap();
        assert_eq!(json["event"], "container");
        assert_eq!(json["result"], "moved");
        assert_eq!(json["wire_bytes"], 2048);
        assert!(
            json.get("reason").is_none() && json.get("outcome").is_none(),
            "{json}"
        );
        let json = serde_json::to_value(&stays).unwrap();
        assert_eq!(json["result"], "not_movable");
        assert_eq!(json["reason"], "bind mount of host path /srv");
        let json = serde_json::to_value(&failed).unwrap();
        assert_eq!(
            (&json["result"], &json["phase"], &json["rolled_back"]),
            (&"failed".into(), &"restore".into(), &true.into())
        );

        let lines = table(&[moved.clone(), stays.clone(), failed.clone()]);
        assert_eq!(lines[0], "CONTAINER    SECONDS        WIRE  RESULT");
        assert_eq!(lines[1], "web              2.5     2.0 KiB  moved to b");
        assert_eq!(
            lines[2],
            "data-keeper        -           -  not movable: bind mount of host path /srv"
        );
        assert!(lines[3].ends_with("failed in restore: b refused: no room"));
        let words = failed.failure_words();
        assert!(
            words.contains("migrating db from a to b failed in restore")
                && words.contains("runs on a as before"),
            "{words}"
        );

        let s = DrainSummary::of(&[moved.clone()], &a, &b, Instant::now());
        assert!(s.drained && s.sentence().starts_with("a drained: 1 moved to b"));
        let s = DrainSummary::of(&[moved, stays, failed], &a, &b, Instant::now());
        assert!(!s.drained);
        assert_eq!((s.moved, s.failed, s.not_movable), (1, 1, 1));
        assert!(
            s.sentence()
                .starts_with("a NOT drained: 2 of 3 containers did not move"),
            "{}",
            s.sentence()
        );
        assert!(DrainSummary::of(&[], &a, &b, Instant::now()).drained);
    }

    #[test]
    fn kubernetes_drains_read_as_a_table_and_a_sentence() {
        use engine::drain::{DrainReport, Eviction, PodReport, PodResult};
        let pod = |name: &str, result: PodResult, eviction: Option<Eviction>| PodReport {
            namespace: "shop".into(),
            name: name.into(),
            result,
            eviction,
        };
        let moved = pod(
            "web",
            PodResult::Moved {
                to: "node-b".into(),
                new_pod: "web-1a2b".into(),
                took: std::time::Duration::from_millis(2500),
            },
            None,
        );
        let stays = pod(
            "ds-x",
            PodResult::NotMovable {
                reason: "it belongs to DaemonSet ds".into(),
                node_bound: true,
            },
            None,
        );
        let mut report = DrainReport {
            node: "node-a".into(),
            was_cordoned: false,
            pods: vec![moved, stays],
        };
        let lines = kubernetes::pod_table(&report);
        assert_eq!(lines[0], "POD        TARGET  SECONDS  RESULT");
        assert_eq!(
            lines[1],
            "shop/web   node-b      2.5  moved to node-b as web-1a2b in 2.5 s"
        );
        assert!(lines[2].ends_with("stays on the node: it belongs to DaemonSet ds"));
        let s = kubernetes::sentence(&report, 3.0);
        assert!(
            s.starts_with("node-a drained in 3.0 s: 1 Pod(s) moved, 0 evicted, 1 DaemonSet")
                && s.contains("`kubectl uncordon node-a`"),
            "{s}"
        );
        report.pods.push(pod(
            "db-0",
            PodResult::NotMovable {
                reason: "StatefulSet".into(),
                node_bound: false,
            },
            Some(Eviction::Blocked {
                message: "budget".into(),
            }),
        ));
        let s = kubernetes::sentence(&report, 3.0);
        assert!(
            s.starts_with("node-a NOT drained: 1 Pod(s) did not move and were not evicted"),
            "{s}"
        );
        let lines = kubernetes::pod_table(&report);
        assert!(
            lines[3].contains("not movable: StatefulSet; eviction refused"),
            "{lines:?}"
        );
    }

    #[test]
    fn kubernetes_options_choose_the_kubernetes_drain() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            args: DrainArgs,
        }
        let parse = |words: &[&str]| Cli::try_parse_from(words).map(|c| c.args);
        assert!(parse(&["drain", "node-a", "--evict-rest"])
            .unwrap()
            .on_kubernetes(true));
        assert!(parse(&["drain", "--watch"]).unwrap().on_kubernetes(true));
        assert!(parse(&["drain", "n", "--kubernetes"])
            .unwrap()
            .on_kubernetes(true));
        let lab = parse(&["drain", "node1"]).unwrap();
        assert!(!lab.on_kubernetes(true), "a lab is up");
        let named = parse(&["drain", "a", "--to", "b", "--node", "a=10.0.0.1:7400"]).unwrap();
        assert!(!named.on_kubernetes(false));
        assert!(parse(&["drain"]).is_err(), "NODE or --watch");
        assert!(parse(&["drain", "node-a", "--watch"]).is_err());
    }
}
