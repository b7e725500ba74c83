//! `migrate POD --from NODE --to NODE` on a Kubernetes cluster: the user's kubeconfig (as
//! kubectl finds it) for the API server, the migrate daemons (deploy/) for the checkpoints.
//!
//! The order of work: [`engine::cluster::preflight`] checks the Pod, both nodes and their
//! daemons; then, for each container, the source node's daemon checkpoints it through the
//! kubelet and sends it to the target node's daemon, which imports a CRI-O checkpoint image
//! ([`DaemonImages`]); then [`engine::cluster::migrate`] creates the new Pod pinned to the
//! target, waits until it is Ready, and only then lets the source Pod go. On any failure the
//! new Pod and the images are removed and the source Pod is left as it was.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::cluster::{self, CheckpointImages, DaemonPod, PodPlan, Progress, SourceRemoval};
use engine::control::{self, MigrateRequest, Reply, Request};
use tokio::sync::Mutex;
use transport::quic;
use transport::tls::NodeIdentity;

use crate::migrate::{self, MigrateArgs};
use crate::output::Output;
use crate::progress::View;

/// Where `deploy/certs.sh` leaves the operator's certificate folder, under the home directory.
const OPERATOR_CERTS: &str = ".config/migrate/certs/operator";

/// Whether `args` ask for a cluster migration: Kubernetes options were given, or nothing
/// else (no `--node`, no lab up) can say where the nodes are and a kubeconfig exists.
pub fn wanted(args: &MigrateArgs, lab_is_up: bool) -> bool {
    if args.kubernetes
        || args.namespace.is_some()
        || !args.containers.is_empty()
        || args.kubeconfig.is_some()
        || args.context.is_some()
    {
        return true;
    }
    args.nodes.is_empty() && !lab_is_up && kubeconfig_exists()
}

pub(crate) fn kubeconfig_exists() -> bool {
    if std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        return true;
    }
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".kube/config").exists())
        .unwrap_or(false)
}

/// Runs one Pod migration.
pub fn run(args: MigrateArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(drive(args, out))
}

async fn drive(args: MigrateArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let client = kube_client(&args).await?;
    let namespace = match &args.namespace {
        Some(ns) => ns.clone(),
        None => client.default_namespace().to_string(),
    };
    let mut request = cluster::Request::new(&namespace, &args.name, &args.from, &args.to);
    request.containers = (!args.containers.is_empty()).then(|| args.containers.clone());
    if !out.quiet && !args.json {
        eprintln!(
            "[plan] checking Pod {namespace}/{}, nodes {} and {}, and their daemons",
            args.name, args.from, args.to
        );
    }
    let plan = cluster::preflight(&client, &request)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for warning in &plan.warnings {
        eprintln!("warning: {warning}");
    }

    let endpoint = operator_endpoint(args.certs.as_deref())?;
    let mut images = DaemonImages::for_plan(
        endpoint,
        &plan,
        args.daemon_port,
        View::new(out, args.json).for_pods(),
    )?;
    images.precopy = args.precopy.0;
    let options = cluster::MigrateOptions {
        migration_id: engine::migration::new_id(&args.name),
        now: now_rfc3339(),
        ready_timeout: Duration::from_secs(args.ready_timeout),
        handover_timeout: Duration::from_secs(60),
        poll_interval: Duration::from_millis(500),
    };
    let started = Instant::now();
    let show = !out.quiet && !args.json;
    let result = cluster::migrate(&client, &plan, &images, &options, |p| {
        if show {
            show_progress(&p)
        }
    })
    .await;
    match result {
        Ok(outcome) => {
            images.finish().await;
            if args.json {
                out.json(&serde_json::json!({
                    "event": "pod_migrated",
                    "namespace": namespace,
                    "source_pod": args.name,
                    "target_pod": outcome.target_pod,
                    "from": args.from,
                    "to": outcome.target_node,
                    "images": outcome.images,
                    "ready_seconds": outcome.ready_after.as_secs_f64(),
                    "total_seconds": started.elapsed().as_secs_f64(),
                }));
            } else {
                let gone = match &outcome.source {
                    SourceRemoval::Deleted => "deleted".to_string(),
                    SourceRemoval::ByReplicaSet { replicaset } => {
                        format!("removed by ReplicaSet {replicaset}")
                    }
                };
                out.line(format!(
                    "migrated Pod {namespace}/{} from {} to {} in {:.1} s: the new Pod is \
                     {namespace}/{} (Ready {:.1} s after creation); the source Pod was {gone}",
                    args.name,
                    args.from,
                    outcome.target_node,
                    started.elapsed().as_secs_f64(),
                    outcome.target_pod,
                    outcome.ready_after.as_secs_f64(),
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// One line per step of the Pod hand-over, on stderr.
fn show_progress(p: &Progress) {
    match p {
        Progress::Preparing => {
            eprintln!("[checkpoint] checkpointing through the kubelet; the Pod keeps running")
        }
        Progress::Prepared(images) => {
            for (container, image) in images {
                eprintln!("  {container}: checkpoint image {image}");
            }
        }
        Progress::Created { pod } => eprintln!("[restore] created Pod {pod}; waiting until Ready"),
        Progress::Starting { state } => eprintln!("  {state}"),
        Progress::Ready { after } => eprintln!("  Ready after {:.1} s", after.as_secs_f64()),
        Progress::DeletingSource => eprintln!("[cleanup] deleting the source Pod"),
        Progress::HandingOver { replicaset } => eprintln!(
            "[cleanup] handing the new Pod to ReplicaSet {replicaset}, which removes the source"
        ),
        Progress::RollingBack(phase) => eprintln!("[rollback] {phase} failed: rolling back"),
    }
}

/// Now, as RFC 3339 in UTC (second precision).
pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    engine::inspect::rfc3339(secs)
}

/// The user's client: `--kubeconfig`/`--context`, else what kubectl would use (KUBECONFIG,
/// ~/.kube/config, or the in-cluster ServiceAccount).
async fn kube_client(args: &MigrateArgs) -> anyhow::Result<kube::Client> {
    kube_client_for(args.kubeconfig.as_deref(), args.context.as_deref()).await
}

/// [`kube_client`] from a kubeconfig path and a context.
async fn kube_client_for(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> anyhow::Result<kube::Client> {
    let config = kube_config_for(kubeconfig, context).await?;
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// The client configuration of [`kube_client_for`] (`migrate drain` turns kube's retries off).
pub(crate) async fn kube_config_for(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> anyhow::Result<kube::Config> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    const WHAT: &str =
        "loading the Kubernetes client configuration (is KUBECONFIG or ~/.kube/config set?)";
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .context(WHAT)?
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context(WHAT)?,
        None => kube::Config::infer().await.context(WHAT)?,
    };
    Ok(config)
}

/// A QUIC client endpoint with the operator's certificate: `certs`, or where deploy/certs.sh
/// leaves it.
pub(crate) fn operator_endpoint(
    certs: Option<&std::path::Path>,
) -> anyhow::Result<quinn::Endpoint> {
    let certs = match certs {
        Some(c) => c.to_path_buf(),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(OPERATOR_CERTS)
        }
    };
    let identity = NodeIdentity::load(&certs).with_context(|| {
        format!(
            "loading this client's certificate from {} (deploy/certs.sh writes it; or pass \
             --certs)",
            certs.display()
        )
    })?;
    Ok(quic::client_endpoint(
        &identity,
        None,
        quic::DEFAULT_IDLE_TIMEOUT,
    )?)
}

/// A daemon's address: its Pod IP (the daemons use the host network, so it is the node's)
/// and the port.
fn daemon_addr(daemon: &DaemonPod, port: u16) -> anyhow::Result<SocketAddr> {
    let ip = daemon
        .ip
        .as_deref()
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .with_context(|| {
            format!(
                "the migrate daemon Pod {} on node {} has no IP yet: check `kubectl -n migrate \
                 get pods -o wide`",
                daemon.name, daemon.node
            )
        })?;
    Ok(SocketAddr::new(ip, port))
}

/// The checkpoint images, made by the daemons: each container is checkpointed by the source
/// node's daemon through its kubelet, sent, and imported by the target node's daemon.
pub(crate) struct DaemonImages<'a> {
    endpoint: quinn::Endpoint,
    from: (String, SocketAddr),
    to: (String, SocketAddr),
    precopy: Option<u32>,
    view: Mutex<View<'a>>,
    /// The migrations whose images exist on the target.
    made: Mutex<Vec<String>>,
}

impl<'a> DaemonImages<'a> {
    /// The images of `plan`'s migration, made by the daemons the preflight found on its two
    /// nodes (reached on `port`); `view` shows their events.
    pub(crate) fn for_plan(
        endpoint: quinn::Endpoint,
        plan: &PodPlan,
        port: u16,
        view: View<'a>,
    ) -> anyhow::Result<Self> {
        Ok(DaemonImages {
            endpoint,
            from: (plan.from.clone(), daemon_addr(&plan.source_daemon, port)?),
            to: (plan.to.clone(), daemon_addr(&plan.target_daemon, port)?),
            precopy: None,
            view: Mutex::new(view),
            made: Mutex::new(Vec::new()),
        })
    }

    /// Sends `request` to the target node's daemon for every image made.
    async fn tell_target(&self, request: impl Fn(String) -> Request) -> Vec<String> {
        let ids: Vec<String> = self.made.lock().await.drain(..).collect();
        let mut problems = Vec::new();
        if ids.is_empty() {
            return problems;
        }
        let conn = match migrate::connect(&self.endpoint, &self.to.0, self.to.1).await {
            Ok(c) => c,
            Err(e) => return vec![format!("{e:#}")],
        };
        for id in ids {
            match control::call(&conn, &request(id.clone())).await {
                Ok(Reply::Ok { .. }) => {}
                Ok(Reply::Error { message }) => problems.push(format!("{id}: {message}")),
                Err(e) => problems.push(format!("{id}: {e}")),
            }
        }
        conn.close(0u32.into(), b"done");
        problems
    }

    /// The Pod runs: the target keeps the images (the kubelet needs them if a container
    /// restarts) and deletes the checkpoint files.
    pub(crate) async fn finish(&self) {
        for problem in self
            .tell_target(|migration_id| Request::Finish {
                migration_id,
                keep_image: true,
            })
            .await
        {
            eprintln!("warning: cleaning up on {}: {problem}", self.to.0);
        }
    }
}

impl CheckpointImages for DaemonImages<'_> {
    async fn prepare(
        &self,
        plan: &PodPlan,
        _migration_id: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        let conn = migrate::connect(&self.endpoint, &self.from.0, self.from.1)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let mut images = BTreeMap::new();
        for container in &plan.containers {
            let request = MigrateRequest {
                container: format!("{}/{}/{}", plan.namespace, plan.pod_name(), container),
                to: self.to.1,
                to_node: self.to.0.clone(),
                precopy: self.precopy,
                via_image: true,
                image_only: true,
                base_image: image_of(plan, container),
            };
            let mut view = self.view.lock().await;
            let summary = migrate::run_on_source(&conn, request, &self.from.0, &mut view)
                .await
                .map_err(|e| format!("{e:#}"))?;
            drop(view);
            let Some(summary) = summary else {
                return Err(format!("container {container}: see the error above"));
            };
            self.made.lock().await.push(summary.migration_id.clone());
            let image = summary.image.ok_or_else(|| {
                format!(
                    "the daemon of {} reported no image for {container}",
                    self.to.0
                )
            })?;
            images.insert(container.clone(), image);
        }
        conn.close(0u32.into(), b"done");
        Ok(images)
    }

    async fn discard(&self, _plan: &PodPlan, _migration_id: &str) {
        for problem in self
            .tell_target(|migration_id| Request::Abort { migration_id })
            .await
        {
            eprintln!(
                "warning: removing a checkpoint image on {} failed: {problem} (its daemon \
                 removes leftovers after 5 minutes)",
                self.to.0
            );
        }
    }
}

/// The image `container` of the source Pod runs (what the destination must hold to restore).
fn image_of(plan: &PodPlan, container: &str) -> Option<String> {
    plan.source
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?
        .image
        .clone()
}
