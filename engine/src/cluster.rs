//! The Kubernetes side of a Pod migration, through `kube::Client` with the user's kubeconfig:
//! [`preflight`] checks everything that can be checked before anything changes (the Pod, both
//! nodes, the daemons, the owner, the volumes) and returns a [`PodPlan`]; [`migrate`] runs it:
//! the daemons make the checkpoint images ([`CheckpointImages`], implemented by the CLI), the
//! new Pod is created on the target node, and only once it is Ready does the source Pod go
//! (deleted when bare, handed to its ReplicaSet otherwise). Any failure before that rolls back:
//! the new Pod is deleted, the images discarded, and the source Pod is left as it was.
//!
//! The rules themselves (what may move, what the new Pod looks like) are in [`crate::pod`].

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

use crate::pod::{self, Ownership, Readiness, Refusal, TargetSpec};

/// Namespace the migrate daemons run in, unless the request says otherwise.
pub const DEFAULT_DAEMON_NAMESPACE: &str = "migrate";
/// Label selector of the migrate daemon Pods, unless the request says otherwise.
pub const DEFAULT_DAEMON_SELECTOR: &str = "app.kubernetes.io/name=migrate-daemon";

/// What the user asked for: move Pod `namespace/pod` from node `from` to node `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The Pod's namespace.
    pub namespace: String,
    /// The Pod's name.
    pub pod: String,
    /// The node the user believes the Pod runs on (checked: a stale belief is refused).
    pub from: String,
    /// The target node.
    pub to: String,
    /// The containers to migrate (`-c`); `None` for all of `spec.containers`.
    pub containers: Option<Vec<String>>,
    /// Where the daemon Pods run.
    pub daemon_namespace: String,
    /// Label selector of the daemon Pods (equality terms).
    pub daemon_selector: String,
}

impl Request {
    /// A request for all containers, with the default daemon namespace and selector.
    pub fn new(namespace: &str, pod: &str, from: &str, to: &str) -> Self {
        Request {
            namespace: namespace.into(),
            pod: pod.into(),
            from: from.into(),
            to: to.into(),
            containers: None,
            daemon_namespace: DEFAULT_DAEMON_NAMESPACE.into(),
            daemon_selector: DEFAULT_DAEMON_SELECTOR.into(),
        }
    }
}

/// The migrate daemon Pod found on a node: what the CLI talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonPod {
    /// The node it runs on.
    pub node: String,
    /// The daemon Pod's name (in the daemon namespace).
    pub name: String,
    /// Its Pod IP, if it has one yet.
    pub ip: Option<String>,
}

/// Everything [`preflight`] established, which [`migrate`] and the daemons need.
#[derive(Debug, Clone)]
pub struct PodPlan {
    /// The Pod's namespace.
    pub namespace: String,
    /// The source Pod as read during the preflight (the new Pod is built from it).
    pub source: Pod,
    /// The node it runs on.
    pub from: String,
    /// The target node.
    pub to: String,
    /// Who owns it, which decides how the source goes away.
    pub ownership: Ownership,
    /// The containers to checkpoint, in the Pod's order.
    pub containers: Vec<String>,
    /// Label keys the new Pod is created without and gets once Ready (its ReplicaSet's
    /// selector keys); empty for a bare Pod.
    pub withheld_labels: Vec<String>,
    /// What the user should know (emptyDir contents not carried, init containers rerun...).
    pub warnings: Vec<String>,
    /// The daemon on the source node.
    pub source_daemon: DaemonPod,
    /// The daemon on the target node.
    pub target_daemon: DaemonPod,
}

impl PodPlan {
    /// The source Pod's name.
    pub fn pod_name(&self) -> &str {
        self.source.metadata.name.as_deref().unwrap_or_default()
    }
}

/// The daemon part of a migration, which the CLI implements by talking to the daemons.
pub trait CheckpointImages: Send + Sync {
    /// Checkpoints `plan.containers` of the Pod on `plan.from` and makes one checkpoint image
    /// per container on `plan.to`, tagged with `migration_id`; returns container name → image
    /// reference. The source containers keep running.
    fn prepare(
        &self,
        plan: &PodPlan,
        migration_id: &str,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, String>> + Send;
    /// Removes whatever `prepare` made on the target for `migration_id` (rollback), best
    /// effort; also called after a failed `prepare`, which may have made some images.
    fn discard(&self, plan: &PodPlan, migration_id: &str) -> impl Future<Output = ()> + Send;
}

/// How [`migrate`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateOptions {
    /// The migration's ID: tags of the images, the new Pod's name suffix, an annotation.
    pub migration_id: String,
    /// The time of the migration, RFC 3339 (annotation `migrate.dev/migrated-at`).
    pub now: String,
    /// How long the new Pod may take to become Ready before the migration is rolled back.
    pub ready_timeout: Duration,
    /// How long a ReplicaSet may take to remove the source Pod once it has adopted the new one.
    pub handover_timeout: Duration,
    /// How often the Pods are read while waiting.
    pub poll_interval: Duration,
}

/// The phases of [`migrate`], named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The daemons checkpoint and build the images.
    Prepare,
    /// POST of the new Pod.
    Create,
    /// Polling the new Pod until Ready.
    WaitReady,
    /// DELETE of a bare source Pod.
    DeleteSource,
    /// Deletion cost on the source, labels on the new Pod, the ReplicaSet's removal of the source.
    HandOver,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Prepare => "preparing the checkpoint images",
            Phase::Create => "creating the new Pod",
            Phase::WaitReady => "waiting for the new Pod to be Ready",
            Phase::DeleteSource => "deleting the source Pod",
            Phase::HandOver => "handing the Pod over to its ReplicaSet",
        })
    }
}

/// What [`migrate`] reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The daemons are checkpointing and building the images.
    Preparing,
    /// The images are on the target node: container → image reference.
    Prepared(BTreeMap<String, String>),
    /// The new Pod was created.
    Created {
        /// Its name.
        pod: String,
    },
    /// The new Pod is not Ready yet (one per poll).
    Starting {
        /// What its status says.
        state: String,
    },
    /// The new Pod is Ready.
    Ready {
        /// How long after its creation.
        after: Duration,
    },
    /// The source Pod is being deleted (bare Pod).
    DeletingSource,
    /// The new Pod is being handed to the ReplicaSet, which removes the source.
    HandingOver {
        /// The ReplicaSet.
        replicaset: String,
    },
    /// A phase failed; the rollback runs.
    RollingBack(Phase),
}

/// How the source Pod went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRemoval {
    /// The migration deleted it (bare Pod).
    Deleted,
    /// Its ReplicaSet adopted the new Pod and deleted the source (or started to).
    ByReplicaSet {
        /// The ReplicaSet.
        replicaset: String,
    },
}

/// A finished migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The new Pod's name, in the plan's namespace.
    pub target_pod: String,
    /// The node it runs on.
    pub target_node: String,
    /// Container → checkpoint image it was restored from.
    pub images: BTreeMap<String, String>,
    /// How the source Pod went away.
    pub source: SourceRemoval,
    /// Time from the creation of the new Pod to its Ready condition, as polled.
    pub ready_after: Duration,
    /// The plan's warnings.
    pub warnings: Vec<String>,
}

/// What the rollback after a failure did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollback {
    /// Steps done (e.g. "deleted the new Pod shop/web-1a2b3c4d").
    pub done: Vec<String>,
    /// Steps that failed, with what to do by hand.
    pub failed: Vec<String>,
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.done.is_empty() {
            f.write_str("nothing to roll back")?;
        } else {
            write!(f, "rolled back: {}", self.done.join(", "))?;
        }
        if self.failed.is_empty() {
            f.write_str("; the source Pod was left untouched")
        } else {
            write!(f, "; rollback incomplete: {}", self.failed.join("; "))
        }
    }
}

/// A failure of [`preflight`] or [`migrate`]: what failed, where, and what to check.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The API server refused a call (403): the kubeconfig's user lacks an RBAC permission.
    #[error(
        "cannot {verb} {resource} ({target}): forbidden: {message}; the user of your kubeconfig \
         needs RBAC permission to {verb} {resource}{scope} (check with `kubectl auth can-i \
         {verb} {resource}{ns_flag}`)",
        scope = namespace.as_ref().map(|n| format!(" in namespace {n}")).unwrap_or_default(),
        ns_flag = namespace.as_ref().map(|n| format!(" -n {n}")).unwrap_or_default()
    )]
    Forbidden {
        /// The API verb (get, list, create, patch, delete).
        verb: &'static str,
        /// The resource (pods, nodes, replicasets, ...).
        resource: &'static str,
        /// Which object(s).
        target: String,
        /// Its namespace, for namespaced resources.
        namespace: Option<String>,
        /// The API server's message.
        message: String,
    },
    /// 404.
    #[error("{resource} {target} not found: check the name{hint}")]
    NotFound {
        /// The resource.
        resource: &'static str,
        /// Which object.
        target: String,
        /// How to list them.
        hint: String,
    },
    /// Any other failed API call.
    #[error("cannot {verb} {resource} ({target}): {detail}")]
    Api {
        /// The API verb.
        verb: &'static str,
        /// The resource.
        resource: &'static str,
        /// Which object(s).
        target: String,
        /// The status code, reason and message, or the connection error.
        detail: String,
        /// kube's error (an API `Status` or a connection error).
        #[source]
        source: kube::Error,
    },
    /// The Pod cannot move at all.
    #[error("cannot migrate Pod {pod}: {reason}")]
    Refused {
        /// namespace/name.
        pod: String,
        /// Why.
        #[source]
        reason: Refusal,
    },
    /// The Pod is not on the `from` node.
    #[error(
        "Pod {pod} runs on {actual}, not on node {expected}: name the node it runs on as the \
         source"
    )]
    WrongNode {
        /// namespace/name.
        pod: String,
        /// The `from` of the request.
        expected: String,
        /// "node X", or "no node (it is not scheduled)".
        actual: String,
    },
    /// The Pod is not Running (or is being deleted).
    #[error("Pod {pod} is {state}, not Running: only a running Pod can be checkpointed")]
    NotRunning {
        /// namespace/name.
        pod: String,
        /// Its phase, or "terminating".
        state: String,
    },
    /// `from` = `to`.
    #[error("the source and target node are both {node}: choose another target node")]
    SameNode {
        /// The node.
        node: String,
    },
    /// The target node's Ready condition is not True.
    #[error(
        "target node {node} is not Ready (Ready={status}, reason {reason}: {message}): check \
         `kubectl describe node {node}`"
    )]
    NodeNotReady {
        /// The node.
        node: String,
        /// The condition's status (False, Unknown, or "missing").
        status: String,
        /// The condition's reason.
        reason: String,
        /// The condition's message.
        message: String,
    },
    /// The target node is cordoned.
    #[error(
        "target node {node} is cordoned (spec.unschedulable): no new Pod may start there; \
         `kubectl uncordon {node}` or choose another target"
    )]
    Cordoned {
        /// The node.
        node: String,
    },
    /// No Running daemon Pod on a node.
    #[error(
        "no running migrate daemon on node {node} (Pods with {selector} in namespace \
         {namespace}): check `kubectl -n {namespace} get pods -o wide -l {selector}`"
    )]
    NoDaemon {
        /// The node.
        node: String,
        /// The daemon namespace.
        namespace: String,
        /// The daemon selector.
        selector: String,
    },
    /// `-c` named containers the Pod does not have.
    #[error("Pod {pod} has no container named {}; its containers are {}", missing.join(", "), available.join(", "))]
    UnknownContainers {
        /// namespace/name.
        pod: String,
        /// The requested names not found.
        missing: Vec<String>,
        /// The Pod's containers.
        available: Vec<String>,
    },
    /// The daemons could not make the images.
    #[error("the checkpoint images could not be made: {message}")]
    Prepare {
        /// What the daemon part reported.
        message: String,
    },
    /// The daemons made no image for some containers.
    #[error("the daemons returned no checkpoint image for container(s) {}", .0.join(", "))]
    MissingImages(Vec<String>),
    /// The new Pod did not become Ready in time.
    #[error(
        "new Pod {namespace}/{pod} was not Ready on node {node} within {waited:?} (last seen: \
         {state}): check `kubectl -n {namespace} describe pod {pod}` and the kubelet and CRI-O \
         logs of {node}"
    )]
    ReadyTimeout {
        /// Its namespace.
        namespace: String,
        /// The new Pod's name.
        pod: String,
        /// The target node.
        node: String,
        /// The timeout.
        waited: Duration,
        /// Its last state.
        state: String,
    },
    /// The new Pod will not become Ready (restore failed, image missing, Pod failed).
    #[error(
        "new Pod {namespace}/{pod} failed on node {node}: {reason}: {message}: check `kubectl -n \
         {namespace} describe pod {pod}` (before retrying) and the kubelet and CRI-O logs of \
         {node}"
    )]
    TargetFailed {
        /// Its namespace.
        namespace: String,
        /// The new Pod's name.
        pod: String,
        /// The target node.
        node: String,
        /// The reason (e.g. `CreateContainerError`).
        reason: String,
        /// The message.
        message: String,
    },
    /// The new Pod disappeared or is being deleted (by someone else, or by the ReplicaSet).
    #[error("new Pod {pod} disappeared or is being deleted: {why}")]
    TargetGone {
        /// namespace/name.
        pod: String,
        /// Who or what was seen.
        why: String,
    },
    /// A phase of [`migrate`] failed and was rolled back.
    #[error("migration {migration_id} of Pod {pod} failed while {phase}: {cause}; {rollback}")]
    Failed {
        /// namespace/name of the source Pod.
        pod: String,
        /// The migration's ID.
        migration_id: String,
        /// The phase that failed.
        phase: Phase,
        /// Why.
        #[source]
        cause: Box<ClusterError>,
        /// What the rollback did.
        rollback: Rollback,
    },
    /// The new Pod runs, but its ReplicaSet did not remove the source: both run.
    #[error(
        "new Pod {namespace}/{target} is Ready on node {node} and owned by ReplicaSet \
         {replicaset}, but the source Pod {namespace}/{source_pod} still runs after \
         {waited:?}{detail}: both run now; check `kubectl -n {namespace} describe replicaset \
         {replicaset}`, and if it stays, `kubectl -n {namespace} delete pod {source_pod}` (it \
         carries {cost_key}={cost}, so a scale-down removes it first)",
        cost_key = pod::ANNOTATION_DELETION_COST,
        cost = pod::SOURCE_DELETION_COST
    )]
    SourceStillRunning {
        /// The namespace of both Pods.
        namespace: String,
        /// The new Pod's name.
        target: String,
        /// The target node.
        node: String,
        /// The ReplicaSet.
        replicaset: String,
        /// The source Pod's name.
        source_pod: String,
        /// How long the migration waited.
        waited: Duration,
        /// The last error reading the source, if any (" (last error reading it: ...)").
        detail: String,
    },
}

/// Converts a kube error of `verb resource` on `name` into a [`ClusterError`] that says what to
/// check (403: the RBAC permission; 404: how to list the objects).
fn api_error(
    verb: &'static str,
    resource: &'static str,
    namespace: Option<&str>,
    name: &str,
    err: kube::Error,
) -> ClusterError {
    let target = match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    };
    match err {
        kube::Error::Api(status) if status.code == 403 => ClusterError::Forbidden {
            verb,
            resource,
            target,
            namespace: namespace.map(str::to_string),
            message: status.message,
        },
        kube::Error::Api(status) if status.code == 404 => ClusterError::NotFound {
            resource,
            target,
            hint: match namespace {
                Some(ns) => format!(" and namespace: `kubectl -n {ns} get {resource}`"),
                None => format!(": `kubectl get {resource}`"),
            },
        },
        source => ClusterError::Api {
            verb,
            resource,
            target,
            detail: describe(&source),
            source,
        },
    }
}

/// A kube error in one line: `code reason: message` for an API `Status`.
fn describe(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => {
            format!("{} {}: {}", status.code, status.reason, status.message)
        }
        other => other.to_string(),
    }
}

fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == code)
}

/// Checks everything about a migration that can be checked without changing anything, in
/// this order: the Pod (exists, on `from`, Running, an owner and volumes that allow a move,
/// the requested containers), the target node (exists, differs from `from`, Ready, not
/// cordoned), a Running daemon on both nodes, the ReplicaSet's selector, and the
/// PersistentVolumes of the Pod's claims.
pub async fn preflight(client: &Client, req: &Request) -> Result<PodPlan, ClusterError> {
    let ns = req.namespace.as_str();
    let pod_ref = format!("{ns}/{}", req.pod);
    if req.from == req.to {
        return Err(ClusterError::SameNode {
            node: req.to.clone(),
        });
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let source = pods
        .get(&req.pod)
        .await
        .map_err(|e| api_error("get", "pods", Some(ns), &req.pod, e))?;
    let spec = source.spec.clone().unwrap_or_default();
    let on = spec.node_name.clone().unwrap_or_default();
    if on != req.from {
        return Err(ClusterError::WrongNode {
            pod: pod_ref,
            expected: req.from.clone(),
            actual: if on.is_empty() {
                "no node (it is not scheduled)".into()
            } else {
                format!("node {on}")
            },
        });
    }
    let phase = source
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if source.metadata.deletion_timestamp.is_some() {
        return Err(ClusterError::NotRunning {
            pod: pod_ref,
            state: "terminating".into(),
        });
    }
    if phase != "Running" {
        return Err(ClusterError::NotRunning {
            pod: pod_ref,
            state: if phase.is_empty() {
                "without a phase".into()
            } else {
                phase
            },
        });
    }
    let refused = |reason| ClusterError::Refused {
        pod: pod_ref.clone(),
        reason,
    };
    let ownership = pod::ownership(&source).map_err(refused)?;
    let volumes = pod::review_volumes(&source).map_err(refused)?;
    let available: Vec<String> = spec.containers.iter().map(|c| c.name.clone()).collect();
    let containers = match &req.containers {
        None => available.clone(),
        Some(wanted) => {
            let missing: Vec<String> = wanted
                .iter()
                .filter(|w| !available.contains(w))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(ClusterError::UnknownContainers {
                    pod: pod_ref,
                    missing,
                    available,
                });
            }
            available
                .iter()
                .filter(|a| wanted.contains(a))
                .cloned()
                .collect()
        }
    };

    let nodes: Api<Node> = Api::all(client.clone());
    let target = nodes
        .get(&req.to)
        .await
        .map_err(|e| api_error("get", "nodes", None, &req.to, e))?;
    let ready = target
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    if ready.is_none_or(|c| c.status != "True") {
        return Err(ClusterError::NodeNotReady {
            node: req.to.clone(),
            status: ready
                .map(|c| c.status.clone())
                .unwrap_or_else(|| "missing".into()),
            reason: ready
                .and_then(|c| c.reason.clone())
                .unwrap_or_else(|| "none".into()),
            message: ready
                .and_then(|c| c.message.clone())
                .unwrap_or_else(|| "no message".into()),
        });
    }
    if target.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        return Err(ClusterError::Cordoned {
            node: req.to.clone(),
        });
    }

    let source_daemon = find_daemon(client, req, &req.from).await?;
    let target_daemon = find_daemon(client, req, &req.to).await?;

    let withheld_labels = match &ownership {
        Ownership::Bare => Vec::new(),
        Ownership::ReplicaSet { name } => {
            let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
            let rs = sets
                .get(name)
                .await
                .map_err(|e| api_error("get", "replicasets", Some(ns), name, e))?;
            pod::withheld_label_keys(&rs).map_err(refused)?
        }
    };

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let volumes_api: Api<PersistentVolume> = Api::all(client.clone());
    for claim in &volumes.claims {
        let pvc = claims
            .get(&claim.claim)
            .await
            .map_err(|e| api_error("get", "persistentvolumeclaims", Some(ns), &claim.claim, e))?;
        let Some(pv_name) = pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|n| !n.is_empty())
        else {
            return Err(refused(Refusal::UnboundClaim {
                volume: claim.volume.clone(),
                claim: claim.claim.clone(),
            }));
        };
        let pv = volumes_api
            .get(&pv_name)
            .await
            .map_err(|e| api_error("get", "persistentvolumes", None, &pv_name, e))?;
        pod::check_persistent_volume(claim, &pv, &target).map_err(refused)?;
    }

    Ok(PodPlan {
        namespace: ns.to_string(),
        source,
        from: req.from.clone(),
        to: req.to.clone(),
        ownership,
        containers,
        withheld_labels,
        warnings: volumes.warnings,
        source_daemon,
        target_daemon,
    })
}

/// The Running daemon Pod on `node`.
async fn find_daemon(
    client: &Client,
    req: &Request,
    node: &str,
) -> Result<DaemonPod, ClusterError> {
    let ns = req.daemon_namespace.as_str();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let params = ListParams::default()
        .labels(&req.daemon_selector)
        .fields(&format!("spec.nodeName={node}"));
    let list = pods.list(&params).await.map_err(|e| {
        api_error(
            "list",
            "pods",
            Some(ns),
            &format!("{} on node {node}", req.daemon_selector),
            e,
        )
    })?;
    list.items
        .into_iter()
        .find(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .map(|p| DaemonPod {
            node: node.to_string(),
            name: p.metadata.name.unwrap_or_default(),
            ip: p.status.and_then(|s| s.pod_ip),
        })
        .ok_or_else(|| ClusterError::NoDaemon {
            node: node.to_string(),
            namespace: ns.to_string(),
            selector: req.daemon_selector.clone(),
        })
}

/// The state a failed migration leaves behind, for the rollback.
struct Undo<'a, I> {
    pods: &'a Api<Pod>,
    plan: &'a PodPlan,
    images: &'a I,
    id: &'a str,
    /// The new Pod's name, once it may exist.
    target: Option<String>,
    /// The source's deletion cost before the hand-over (`Some(None)`: it had none), once set.
    cost_before: Option<Option<String>>,
}

impl<I: CheckpointImages> Undo<'_, I> {
    /// Rolls back and builds the error for `cause` in `phase`.
    async fn fail(self, phase: Phase, cause: ClusterError) -> ClusterError {
        tracing::warn!(%phase, error = %cause, "migration failed, rolling back");
        let ns = &self.plan.namespace;
        let mut rollback = Rollback::default();
        if let Some(target) = &self.target {
            match self.pods.delete(target, &DeleteParams::default()).await {
                Ok(_) => rollback.done.push(format!("deleted the new Pod {ns}/{target}")),
                Err(e) if is_status(&e, 404) => {}
                Err(e) => rollback.failed.push(format!(
                    "the new Pod {ns}/{target} could not be deleted ({}); delete it with `kubectl -n \
                     {ns} delete pod {target}`",
                    api_error("delete", "pods", Some(ns), target, e)
                )),
            }
        }
        self.images.discard(self.plan, self.id).await;
        rollback.done.push(format!(
            "discarded the checkpoint images on node {}",
            self.plan.to
        ));
        if let Some(before) = &self.cost_before {
            let source = self.plan.pod_name();
            let patch =
                json!({"metadata": {"annotations": {pod::ANNOTATION_DELETION_COST: before}}});
            match self.pods.patch(source, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => rollback.done.push("reverted the deletion cost of the source Pod".into()),
                Err(e) => rollback.failed.push(format!(
                    "the source Pod {ns}/{source} still carries {}={} ({}); remove it with `kubectl \
                     -n {ns} annotate pod {source} {}-`",
                    pod::ANNOTATION_DELETION_COST,
                    pod::SOURCE_DELETION_COST,
                    api_error("patch", "pods", Some(ns), source, e),
                    pod::ANNOTATION_DELETION_COST,
                )),
            }
        }
        ClusterError::Failed {
            pod: format!("{ns}/{}", self.plan.pod_name()),
            migration_id: self.id.to_string(),
            phase,
            cause: Box::new(cause),
            rollback,
        }
    }
}

/// Runs a planned migration: `images.prepare`, POST of the new Pod (see [`pod::target_pod`]),
/// polling until it is Ready, then the source goes: a bare Pod is deleted; for a ReplicaSet's
/// Pod, the source gets the lowest deletion cost ([`pod::SOURCE_DELETION_COST`]) and the new
/// Pod its withheld labels, so the ReplicaSet adopts it and deletes the source; the migration
/// waits until the source is gone or terminating. A failure up to the label patch rolls back
/// (new Pod deleted, images discarded, deletion cost reverted) and names the phase; the source
/// Pod is never deleted or otherwise changed then. `progress` hears each step.
pub async fn migrate<I, F>(
    client: &Client,
    plan: &PodPlan,
    images: &I,
    opts: &MigrateOptions,
    progress: F,
) -> Result<Outcome, ClusterError>
where
    I: CheckpointImages,
    F: FnMut(Progress) + Send,
{
    let span = tracing::info_span!(
        "migration",
        migration_id = %opts.migration_id,
        pod = %format!("{}/{}", plan.namespace, plan.pod_name()),
        from = %plan.from,
        to = %plan.to,
    );
    run(client, plan, images, opts, progress)
        .instrument(span)
        .await
}

async fn run<I, F>(
    client: &Client,
    plan: &PodPlan,
    images: &I,
    opts: &MigrateOptions,
    mut progress: F,
) -> Result<Outcome, ClusterError>
where
    I: CheckpointImages,
    F: FnMut(Progress) + Send,
{
    let ns = plan.namespace.as_str();
    let id = opts.migration_id.as_str();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut undo = Undo {
        pods: &pods,
        plan,
        images,
        id,
        target: None,
        cost_before: None,
    };

    progress(Progress::Preparing);
    let made = match images.prepare(plan, id).await {
        Ok(made) => made,
        Err(message) => {
            progress(Progress::RollingBack(Phase::Prepare));
            return Err(undo
                .fail(Phase::Prepare, ClusterError::Prepare { message })
                .await);
        }
    };
    let missing: Vec<String> = plan
        .containers
        .iter()
        .filter(|c| !made.contains_key(*c))
        .cloned()
        .collect();
    if !missing.is_empty() {
        progress(Progress::RollingBack(Phase::Prepare));
        return Err(undo
            .fail(Phase::Prepare, ClusterError::MissingImages(missing))
            .await);
    }
    let images_used: BTreeMap<String, String> = made
        .into_iter()
        .filter(|(c, _)| plan.containers.contains(c))
        .collect();
    progress(Progress::Prepared(images_used.clone()));

    let name = pod::target_pod_name(plan.pod_name(), id);
    let target_ref = format!("{ns}/{name}");
    let new_pod = pod::target_pod(
        &plan.source,
        &TargetSpec {
            name: name.clone(),
            target_node: plan.to.clone(),
            images: images_used.clone(),
            migration_id: id.to_string(),
            source_node: plan.from.clone(),
            migrated_at: opts.now.clone(),
            withheld_labels: plan.withheld_labels.clone(),
        },
    );
    if let Err(e) = pods.create(&PostParams::default(), &new_pod).await {
        // An API refusal (4xx) created nothing, and a 409 names someone else's Pod: only after
        // a server or connection error may the Pod exist.
        let refused = matches!(&e, kube::Error::Api(s) if (400..500).contains(&s.code));
        if !refused {
            undo.target = Some(name.clone());
        }
        progress(Progress::RollingBack(Phase::Create));
        let cause = api_error("create", "pods", Some(ns), &name, e);
        return Err(undo.fail(Phase::Create, cause).await);
    }
    undo.target = Some(name.clone());
    tracing::info!(target_pod = %name, "new Pod created");
    progress(Progress::Created { pod: name.clone() });

    let ready_after = match wait_ready(&pods, &name, &target_ref, plan, opts, &mut progress).await {
        Ok(after) => after,
        Err(cause) => {
            progress(Progress::RollingBack(Phase::WaitReady));
            return Err(undo.fail(Phase::WaitReady, cause).await);
        }
    };
    progress(Progress::Ready { after: ready_after });

    let source_name = plan.pod_name();
    let removal = match &plan.ownership {
        Ownership::Bare => {
            progress(Progress::DeletingSource);
            match pods.delete(source_name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if is_status(&e, 404) => tracing::warn!("the source Pod was already gone"),
                Err(e) => {
                    progress(Progress::RollingBack(Phase::DeleteSource));
                    let cause = api_error("delete", "pods", Some(ns), source_name, e);
                    return Err(undo.fail(Phase::DeleteSource, cause).await);
                }
            }
            SourceRemoval::Deleted
        }
        Ownership::ReplicaSet { name: replicaset } => {
            progress(Progress::HandingOver {
                replicaset: replicaset.clone(),
            });
            hand_over(&pods, plan, opts, &name, replicaset, undo).await?;
            SourceRemoval::ByReplicaSet {
                replicaset: replicaset.clone(),
            }
        }
    };
    tracing::info!(target_pod = %name, "migration done");
    Ok(Outcome {
        target_pod: name,
        target_node: plan.to.clone(),
        images: images_used,
        source: removal,
        ready_after,
        warnings: plan.warnings.clone(),
    })
}

/// Polls the new Pod until its Ready condition is True; fails early when it cannot get there.
async fn wait_ready<F: FnMut(Progress)>(
    pods: &Api<Pod>,
    name: &str,
    target_ref: &str,
    plan: &PodPlan,
    opts: &MigrateOptions,
    progress: &mut F,
) -> Result<Duration, ClusterError> {
    let start = Instant::now();
    let deadline = start + opts.ready_timeout;
    let mut tick = tokio::time::interval(opts.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut state: String;
    loop {
        tick.tick().await;
        match pods.get(name).await {
            Ok(current) => {
                if current.metadata.deletion_timestamp.is_some() {
                    return Err(ClusterError::TargetGone {
                        pod: target_ref.into(),
                        why: "it has a deletionTimestamp".into(),
                    });
                }
                match pod::readiness(&current) {
                    Readiness::Ready => return Ok(start.elapsed()),
                    Readiness::Failed { reason, message } => {
                        return Err(ClusterError::TargetFailed {
                            namespace: plan.namespace.clone(),
                            pod: name.into(),
                            node: plan.to.clone(),
                            reason,
                            message,
                        })
                    }
                    Readiness::Starting(now) => {
                        progress(Progress::Starting { state: now.clone() });
                        state = now;
                    }
                }
            }
            Err(e) if is_status(&e, 404) => {
                return Err(ClusterError::TargetGone {
                    pod: target_ref.into(),
                    why: "GET answers 404".into(),
                })
            }
            Err(e) if is_status(&e, 403) => {
                return Err(api_error("get", "pods", Some(&plan.namespace), name, e))
            }
            // Anything else may pass (a restarting API server): retried until the deadline.
            Err(e) => state = format!("reading it failed: {}", describe(&e)),
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::ReadyTimeout {
                namespace: plan.namespace.clone(),
                pod: name.into(),
                node: plan.to.clone(),
                waited: opts.ready_timeout,
                state,
            });
        }
    }
}

/// The ReplicaSet hand-over: lowest deletion cost on the source, the withheld labels on the new
/// Pod, then wait until the ReplicaSet has removed the source.
async fn hand_over<I: CheckpointImages>(
    pods: &Api<Pod>,
    plan: &PodPlan,
    opts: &MigrateOptions,
    target: &str,
    replicaset: &str,
    mut undo: Undo<'_, I>,
) -> Result<(), ClusterError> {
    let ns = plan.namespace.as_str();
    let source = plan.pod_name();
    let before = plan
        .source
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(pod::ANNOTATION_DELETION_COST))
        .cloned();
    let cost = json!({"metadata": {"annotations": {pod::ANNOTATION_DELETION_COST: pod::SOURCE_DELETION_COST}}});
    if let Err(e) = pods
        .patch(source, &PatchParams::default(), &Patch::Merge(&cost))
        .await
    {
        let cause = api_error("patch", "pods", Some(ns), source, e);
        return Err(undo.fail(Phase::HandOver, cause).await);
    }
    undo.cost_before = Some(before);

    let source_labels = plan.source.metadata.labels.clone().unwrap_or_default();
    let labels: BTreeMap<&String, &String> = plan
        .withheld_labels
        .iter()
        .filter_map(|k| source_labels.get(k).map(|v| (k, v)))
        .collect();
    let patch = json!({"metadata": {"labels": labels}});
    if let Err(e) = pods
        .patch(target, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        let cause = api_error("patch", "pods", Some(ns), target, e);
        return Err(undo.fail(Phase::HandOver, cause).await);
    }

    let start = Instant::now();
    let deadline = start + opts.handover_timeout;
    let mut tick = tokio::time::interval(opts.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut detail = String::new();
    loop {
        tick.tick().await;
        match pods.get(source).await {
            Err(e) if is_status(&e, 404) => return Ok(()),
            Ok(p) if p.metadata.deletion_timestamp.is_some() => return Ok(()),
            Ok(_) => {}
            Err(e) => detail = format!(" (last error reading it: {})", describe(&e)),
        }
        // The ReplicaSet may rank differently than expected and delete the new Pod instead.
        let gone = match pods.get(target).await {
            Ok(p) => p.metadata.deletion_timestamp.is_some(),
            Err(e) => is_status(&e, 404),
        };
        if gone {
            undo.target = None;
            let cause = ClusterError::TargetGone {
                pod: format!("{ns}/{target}"),
                why: format!("ReplicaSet {replicaset} removed it instead of the source Pod"),
            };
            return Err(undo.fail(Phase::HandOver, cause).await);
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::SourceStillRunning {
                namespace: ns.to_string(),
                target: target.to_string(),
                node: plan.to.clone(),
                replicaset: replicaset.to_string(),
                source_pod: source.to_string(),
                waited: opts.handover_timeout,
                detail,
            });
        }
    }
}
