//! Draining a Kubernetes node by migration, on the API-server side: [`choose_target`] picks the
//! node a Pod goes to the way the scheduler would filter (no IO); [`drain`] cordons a node and
//! migrates every Pod that can move with [`crate::cluster::preflight`] and
//! [`crate::cluster::migrate`], several at once, then optionally evicts the rest, and reports
//! what became of each Pod ([`DrainReport`]); [`Watcher`] is the hook mode (`migrate drain
//! --watch`): it finds nodes marked for drain (our annotation or taint on the Node, or our
//! Cluster API pre-drain hook on the node's Machine), drains them, and removes the mark so the
//! ordinary drain proceeds. The daemon part of each migration stays behind
//! [`CheckpointImages`].
//!
//! A drained node stays cordoned, as after `kubectl drain`: whoever drained it uncordons it
//! (`kubectl uncordon NODE`) when it is back.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{
    Api, ApiResource, DynamicObject, EvictParams, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::Client;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cluster::{self, CheckpointImages, ClusterError, MigrateOptions, PodPlan, Progress};
use crate::pod::{self, Refusal};

/// Node annotation that asks the watcher to drain the node (value `true`).
pub const DRAIN_ANNOTATION: &str = "migrate.dev/drain";
/// Node taint (any value and effect) that asks the watcher to drain the node.
pub const DRAIN_TAINT: &str = "migrate.dev/drain";
/// Prefix of Cluster API's pre-drain hook annotations on a Machine: while one is present on a
/// Machine being deleted, Cluster API does not drain its node.
pub const MACHINE_HOOK_PREFIX: &str = "pre-drain.delete.hook.machine.cluster.x-k8s.io/";
/// Our pre-drain hook on a Machine.
pub const MACHINE_HOOK: &str = "pre-drain.delete.hook.machine.cluster.x-k8s.io/migrate";

// ---------------------------------------------------------------------------------------------
// Target selection
// ---------------------------------------------------------------------------------------------

/// Parses a Kubernetes quantity (`100m`, `1`, `1.5`, `512Mi`, `1G`, `2e3`) into base units
/// (cores, bytes). `None` when it is not one.
pub fn parse_quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => 10f64.powi(exp[1..].parse().ok()?),
        _ => return None,
    };
    Some(value * factor)
}

/// CPU (millicores) and memory (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Resources {
    cpu_milli: f64,
    memory: f64,
}

impl Resources {
    fn of(map: Option<&BTreeMap<String, Quantity>>) -> Self {
        let get = |key: &str| {
            map.and_then(|m| m.get(key))
                .and_then(|q| parse_quantity(&q.0))
                .unwrap_or(0.0)
        };
        Resources {
            cpu_milli: get("cpu") * 1000.0,
            memory: get("memory"),
        }
    }

    fn add(self, other: Resources) -> Self {
        Resources {
            cpu_milli: self.cpu_milli + other.cpu_milli,
            memory: self.memory + other.memory,
        }
    }

    fn max(self, other: Resources) -> Self {
        Resources {
            cpu_milli: self.cpu_milli.max(other.cpu_milli),
            memory: self.memory.max(other.memory),
        }
    }
}

/// What a Pod requests, as the scheduler counts it: the sum of its containers' requests (or
/// their limits when a container sets limits only), at least the largest init container's, plus
/// the Pod overhead.
fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = &pod.spec else {
        return Resources::default();
    };
    let of = |c: &k8s_openapi::api::core::v1::Container| {
        let r = c.resources.as_ref();
        let requests = Resources::of(r.and_then(|r| r.requests.as_ref()));
        let limits = Resources::of(r.and_then(|r| r.limits.as_ref()));
        Resources {
            cpu_milli: if requests.cpu_milli > 0.0 {
                requests.cpu_milli
            } else {
                limits.cpu_milli
            },
            memory: if requests.memory > 0.0 {
                requests.memory
            } else {
                limits.memory
            },
        }
    };
    let containers = spec
        .containers
        .iter()
        .map(of)
        .fold(Resources::default(), Resources::add);
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(of)
        .fold(Resources::default(), Resources::max);
    containers
        .max(init)
        .add(Resources::of(spec.overhead.as_ref()))
}

fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn node_ready(node: &Node) -> Result<(), String> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => Ok(()),
        Some(c) => Err(format!(
            "not Ready (Ready={}{})",
            c.status,
            c.reason
                .as_deref()
                .map(|r| format!(", {r}"))
                .unwrap_or_default()
        )),
        None => Err("not Ready (no Ready condition)".into()),
    }
}

fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(have), Some(bound)) = (
                value.and_then(number),
                values.first().and_then(|b| number(b)),
            ) else {
                return false;
            };
            if req.operator == "Gt" {
                have > bound
            } else {
                have < bound
            }
        }
        _ => false,
    }
}

/// Whether the Pod's required node affinity admits `node`: one of the terms matches, a term
/// matching when all its label expressions and field expressions (`metadata.name`) do; an
/// empty term matches nothing, as in the API.
fn affinity_admits(pod: &Pod, node: &Node) -> bool {
    let Some(required) = pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    else {
        return true;
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let name = node.metadata.name.as_deref();
    required.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        (!exprs.is_empty() || !fields.is_empty())
            && exprs
                .iter()
                .all(|e| requirement_matches(e, labels.get(&e.key).map(String::as_str)))
            && fields
                .iter()
                .all(|f| requirement_matches(f, if f.key == "metadata.name" { name } else { None }))
    })
}

fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let operator = t.operator.as_deref().unwrap_or("Equal");
        let effect = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key = match t.key.as_deref() {
            None | Some("") => operator == "Exists",
            Some(k) => k == taint.key,
        };
        let value = operator == "Exists"
            || t.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default();
        effect && key && value
    })
}

fn taint_words(t: &Taint) -> String {
    match &t.value {
        Some(v) if !v.is_empty() => format!("{}={v}:{}", t.key, t.effect),
        _ => format!("{}:{}", t.key, t.effect),
    }
}

fn cpu_words(milli: f64) -> String {
    format!("{}m", milli.ceil())
}

fn memory_words(bytes: f64) -> String {
    format!("{:.0}Mi", (bytes / (1024.0 * 1024.0)).ceil())
}

/// Picks the node `pod` should move to among `nodes`, filtering as the scheduler does:
///
/// - the node is Ready and not cordoned (`spec.unschedulable`), and not in `exclude` (node →
///   why, e.g. the node being drained, nodes without a migrate daemon);
/// - the Pod's `nodeSelector` labels all match;
/// - its required node affinity (`requiredDuringSchedulingIgnoredDuringExecution`: one of the
///   `nodeSelectorTerms` matches; `matchExpressions` on labels with In, NotIn, Exists,
///   DoesNotExist, Gt, Lt; `matchFields` on `metadata.name`) admits the node;
/// - every taint with effect NoSchedule or NoExecute is tolerated by the Pod's tolerations
///   (PreferNoSchedule taints are preferences, not filters);
/// - its CPU and memory requests (containers' sum, at least the largest init container's, plus
///   overhead) fit in the node's `status.allocatable` minus the requests of the Pods in
///   `pods_on_nodes` that run there and have not finished. A node that reports no allocatable
///   CPU or memory is not checked for it.
///
/// Among the nodes that pass, the one with the largest free share of CPU plus free share of
/// memory after placing the Pod wins (the scheduler's default "least allocated" score); ties go
/// to the first name in alphabetical order.
///
/// Not modeled: inter-Pod affinity and anti-affinity, topology spread constraints, preferred
/// (soft) node affinity, resources other than CPU and memory (ephemeral storage, extended
/// resources, the Pod count limit), host ports, volume topology and attach limits, priorities
/// and preemption, scheduler profiles and extenders. The preflight of the migration checks the
/// target's PersistentVolume affinity afterwards.
///
/// The error names the Pod and says, per node, why it was rejected.
pub fn choose_target(
    pod: &Pod,
    nodes: &[Node],
    pods_on_nodes: &[Pod],
    exclude: &BTreeMap<String, String>,
) -> Result<String, String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let wanted = pod_requests(pod);
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    let mut sorted: Vec<&Node> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut best: Option<(f64, String)> = None;
    let mut rejected = Vec::new();
    for node in sorted {
        let name = node.metadata.name.clone().unwrap_or_default();
        match fits(
            pod,
            &spec,
            wanted,
            &tolerations,
            node,
            pods_on_nodes,
            exclude,
        ) {
            Ok(score) => {
                if best.as_ref().is_none_or(|(s, _)| score > *s) {
                    best = Some((score, name));
                }
            }
            Err(why) => rejected.push(format!("{name}: {why}")),
        }
    }
    match best {
        Some((_, name)) => Ok(name),
        None => Err(format!(
            "no node can take Pod {}/{}: {}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
            if rejected.is_empty() {
                "there are no nodes".to_string()
            } else {
                rejected.join("; ")
            }
        )),
    }
}

/// Whether `pod` fits on `node`; its score (free CPU share + free memory share) if it does.
fn fits(
    pod: &Pod,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    wanted: Resources,
    tolerations: &[Toleration],
    node: &Node,
    pods_on_nodes: &[Pod],
    exclude: &BTreeMap<String, String>,
) -> Result<f64, String> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    if let Some(why) = exclude.get(name) {
        return Err(why.clone());
    }
    node_ready(node)?;
    let node_spec = node.spec.clone().unwrap_or_default();
    if node_spec.unschedulable == Some(true) {
        return Err("cordoned (spec.unschedulable)".into());
    }
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let unmatched: Vec<String> = spec
        .node_selector
        .iter()
        .flatten()
        .filter(|(k, v)| labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !unmatched.is_empty() {
        return Err(format!(
            "nodeSelector {} does not match its labels",
            unmatched.join(",")
        ));
    }
    if !affinity_admits(pod, node) {
        return Err("the Pod's required node affinity does not admit it".into());
    }
    let untolerated: Vec<String> = node_spec
        .taints
        .iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .filter(|t| !tolerates(tolerations, t))
        .map(taint_words)
        .collect();
    if !untolerated.is_empty() {
        return Err(format!(
            "taint {} not tolerated by the Pod",
            untolerated.join(", ")
        ));
    }
    let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let has = |key: &str| allocatable.is_some_and(|a| a.contains_key(key));
    let capacity = Resources::of(allocatable);
    let used = pods_on_nodes
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name))
        .filter(|p| !is_finished(p))
        .map(pod_requests)
        .fold(Resources::default(), Resources::add);
    let free = Resources {
        cpu_milli: capacity.cpu_milli - used.cpu_milli,
        memory: capacity.memory - used.memory,
    };
    let mut short = Vec::new();
    if has("cpu") && wanted.cpu_milli > free.cpu_milli {
        short.push(format!(
            "insufficient cpu (the Pod requests {}, {} free of {} allocatable)",
            cpu_words(wanted.cpu_milli),
            cpu_words(free.cpu_milli.max(0.0)),
            cpu_words(capacity.cpu_milli)
        ));
    }
    if has("memory") && wanted.memory > free.memory {
        short.push(format!(
            "insufficient memory (the Pod requests {}, {} free of {} allocatable)",
            memory_words(wanted.memory),
            memory_words(free.memory.max(0.0)),
            memory_words(capacity.memory)
        ));
    }
    if !short.is_empty() {
        return Err(short.join(", "));
    }
    let share = |free: f64, wanted: f64, total: f64| {
        if total > 0.0 {
            (free - wanted) / total
        } else {
            0.0
        }
    };
    Ok(share(free.cpu_milli, wanted.cpu_milli, capacity.cpu_milli)
        + share(free.memory, wanted.memory, capacity.memory))
}

// ---------------------------------------------------------------------------------------------
// Drain
// ---------------------------------------------------------------------------------------------

/// How [`drain`] runs.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// Every Pod goes to this node (`--to`); `None`: [`choose_target`] picks one per Pod.
    pub to: Option<String>,
    /// At most this many migrations at once (at least 1).
    pub concurrency: usize,
    /// Evict what could not move (`--evict-rest`), except DaemonSet and static Pods.
    pub evict_rest: bool,
    /// Where the daemon Pods run.
    pub daemon_namespace: String,
    /// Label selector of the daemon Pods.
    pub daemon_selector: String,
    /// The time of the drain, RFC 3339 (the new Pods' `migrate.dev/migrated-at`).
    pub now: String,
    /// How long each new Pod may take to become Ready.
    pub ready_timeout: Duration,
    /// How long a ReplicaSet may take to remove a source Pod.
    pub handover_timeout: Duration,
    /// How often Pods are read while waiting.
    pub poll_interval: Duration,
    /// How long one Eviction may take. kube's default client retries a 429 itself (up to 15
    /// times, honouring Retry-After): give `drain` a client built with
    /// `Config::default_retry = false` to see a PodDisruptionBudget's refusal at once; with
    /// retries on, the eviction is given up after this long.
    pub eviction_timeout: Duration,
}

impl DrainOptions {
    /// Two at once, no `--to`, no eviction, the default daemons, the `migrate` timeouts.
    pub fn new(now: &str) -> Self {
        DrainOptions {
            to: None,
            concurrency: 2,
            evict_rest: false,
            daemon_namespace: cluster::DEFAULT_DAEMON_NAMESPACE.into(),
            daemon_selector: cluster::DEFAULT_DAEMON_SELECTOR.into(),
            now: now.into(),
            ready_timeout: Duration::from_secs(180),
            handover_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(500),
            eviction_timeout: Duration::from_secs(30),
        }
    }
}

/// What became of one Pod's migration.
#[derive(Debug, Clone, PartialEq)]
pub enum PodResult {
    /// It runs on `to` now, as `new_pod`.
    Moved {
        /// The target node.
        to: String,
        /// The new Pod's name (same namespace).
        new_pod: String,
        /// From the preflight to the source's removal.
        took: Duration,
    },
    /// Its migration failed (and was rolled back: the source runs as before), or no target fit.
    Failed {
        /// The target node, when one was chosen.
        to: Option<String>,
        /// What failed: `choosing a target`, `preflight`, or a phase of [`cluster::migrate`].
        phase: String,
        /// Why, and what the rollback did.
        message: String,
    },
    /// It cannot move.
    NotMovable {
        /// Why.
        reason: String,
        /// A DaemonSet or static Pod: it belongs to the node and stays there by design; it does
        /// not keep the node from counting as drained (as `kubectl drain --ignore-daemonsets`).
        node_bound: bool,
    },
    /// Nothing to move: it has finished (Succeeded, Failed) or is being deleted.
    Skipped {
        /// Which.
        reason: String,
    },
}

/// What `--evict-rest` did for a Pod that did not move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// The Eviction was accepted (or the Pod was already gone).
    Evicted,
    /// The API server answered 429: a PodDisruptionBudget does not allow it now. Not retried.
    Blocked {
        /// The API server's message.
        message: String,
    },
    /// Any other failure.
    Failed {
        /// What the API server or the connection said.
        message: String,
    },
    /// Not evicted on purpose: DaemonSet and static Pods, as `kubectl drain
    /// --ignore-daemonsets` leaves them (the DaemonSet would recreate its Pod, the kubelet its
    /// static Pod).
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One Pod of the drained node.
#[derive(Debug, Clone, PartialEq)]
pub struct PodReport {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The migration's outcome.
    pub result: PodResult,
    /// With `--evict-rest`, for a Pod that did not move.
    pub eviction: Option<Eviction>,
}

impl PodReport {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether this Pod no longer holds the drain up: moved, nothing to move, a DaemonSet or
    /// static Pod, or evicted.
    pub fn settled(&self) -> bool {
        match &self.result {
            PodResult::Moved { .. } | PodResult::Skipped { .. } => true,
            PodResult::NotMovable {
                node_bound: true, ..
            } => true,
            _ => self.eviction == Some(Eviction::Evicted),
        }
    }
}

/// What [`drain`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainReport {
    /// The drained node.
    pub node: String,
    /// It was cordoned before the drain began (the drain did not change it).
    pub was_cordoned: bool,
    /// Every Pod that was on the node, sorted by namespace and name.
    pub pods: Vec<PodReport>,
}

impl DrainReport {
    /// Every Pod that can move moved (DaemonSet, static and finished Pods aside).
    pub fn all_moved(&self) -> bool {
        self.pods.iter().all(|p| {
            matches!(
                p.result,
                PodResult::Moved { .. }
                    | PodResult::Skipped { .. }
                    | PodResult::NotMovable {
                        node_bound: true,
                        ..
                    }
            )
        })
    }

    /// Nothing holds the node up: every Pod moved, or was evicted, or stays by design.
    pub fn settled(&self) -> bool {
        self.pods.iter().all(PodReport::settled)
    }
}

/// What [`drain`] reports as it goes. `pod` is `namespace/name`.
#[derive(Debug, Clone, PartialEq)]
pub enum DrainEvent {
    /// The node is cordoned (`already`: it was before).
    Cordoned {
        /// It was cordoned already.
        already: bool,
    },
    /// The node's Pods were listed and sorted.
    Found {
        /// Pods to migrate.
        movable: usize,
        /// Pods that stay (not movable, finished).
        staying: usize,
        /// The Pods to migrate, `namespace/name`, in the order they are taken.
        pods: Vec<String>,
    },
    /// A Pod stays where it is ([`PodResult::NotMovable`] or [`PodResult::Skipped`]).
    Staying {
        /// The Pod.
        pod: String,
        /// Why.
        result: PodResult,
    },
    /// A target was chosen for a Pod.
    Target {
        /// The Pod.
        pod: String,
        /// The node.
        to: String,
    },
    /// A step of a Pod's migration.
    Step {
        /// The Pod.
        pod: String,
        /// The step.
        progress: Progress,
    },
    /// A Pod's migration ended ([`PodResult::Moved`] or [`PodResult::Failed`]).
    Done {
        /// The Pod.
        pod: String,
        /// How.
        result: PodResult,
    },
    /// `--evict-rest` dealt with a Pod.
    Evicted {
        /// The Pod.
        pod: String,
        /// What happened.
        eviction: Eviction,
    },
}

/// A failure that stops a drain before or while it lists the node's Pods.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// An API call failed.
    #[error("cannot {verb} {what}: {detail}{hint}")]
    Api {
        /// The API verb.
        verb: &'static str,
        /// The object(s).
        what: String,
        /// The status code, reason and message, or the connection error.
        detail: String,
        /// What to check.
        hint: String,
    },
    /// `--to` is the node being drained.
    #[error("--to names the node being drained ({0}): name the node its Pods go to")]
    SameNode(String),
}

fn api_error(verb: &'static str, resource: &str, what: String, err: kube::Error) -> DrainError {
    let (detail, hint) = match &err {
        kube::Error::Api(s) => (
            format!("{} {}: {}", s.code, s.reason, s.message),
            match s.code {
                403 => format!(
                    "; the user of your kubeconfig needs RBAC permission to {verb} {resource} \
                     (check with `kubectl auth can-i {verb} {resource}`)"
                ),
                404 => format!("; check the name with `kubectl get {resource}`"),
                _ => String::new(),
            },
        ),
        // kube's own words for these are the outermost only ("ServiceError: client error
        // (Connect)"): the causes say what went wrong (refused, no route, a certificate).
        other @ (kube::Error::Service(_) | kube::Error::HyperError(_)) => (
            with_causes(other),
            "; is the API server of your kubeconfig reachable from here? (check with \
             `kubectl cluster-info`)"
                .into(),
        ),
        other => (with_causes(other), String::new()),
    };
    DrainError::Api {
        verb,
        what,
        detail,
        hint,
    }
}

/// `err` and its causes, `: `-separated, each said once.
fn with_causes(err: &kube::Error) -> String {
    let mut words = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        let text = c.to_string();
        if !words.contains(&text) {
            words = format!("{words}: {text}");
        }
        cause = c.source();
    }
    words
}

fn pod_id(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Sorts a Pod of the drained node: `None` when it should move, or why it stays.
fn staying_reason(pod: &Pod) -> Option<PodResult> {
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        return Some(PodResult::Skipped {
            reason: "it is being deleted".into(),
        });
    }
    if is_finished(pod) {
        return Some(PodResult::Skipped {
            reason: format!("it has finished ({phase}): nothing runs to move"),
        });
    }
    if let Err(refusal) = pod::ownership(pod) {
        let node_bound = matches!(refusal, Refusal::DaemonSet { .. } | Refusal::Static { .. });
        return Some(PodResult::NotMovable {
            reason: refusal.to_string(),
            node_bound,
        });
    }
    if let Err(refusal) = pod::review_volumes(pod) {
        return Some(PodResult::NotMovable {
            reason: refusal.to_string(),
            node_bound: false,
        });
    }
    if phase != "Running" {
        return Some(PodResult::NotMovable {
            reason: format!(
                "it is {}, not Running: only a running Pod can be checkpointed",
                if phase.is_empty() {
                    "without a phase"
                } else {
                    &phase
                }
            ),
            node_bound: false,
        });
    }
    None
}

/// Polls every future until all are done; their outputs in order. (The engine has no
/// `futures` dependency; the futures borrow the caller's state, so they are not spawned.)
async fn join_all<'a, T>(mut futures: Vec<Pin<Box<dyn Future<Output = T> + Send + 'a>>>) -> Vec<T> {
    let mut done: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, slot) in futures.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    done.into_iter()
        .map(|d| d.expect("every future finished"))
        .collect()
}

/// Drains `node` by migration:
///
/// 1. cordons it (merge-PATCH `spec.unschedulable: true`; nothing is sent when it already is,
///    which [`DrainReport::was_cordoned`] records);
/// 2. lists its Pods in all namespaces and sorts them: finished and terminating Pods are
///    skipped, DaemonSet, static, StatefulSet, Job and other controllers' Pods, Pods with
///    hostPath volumes and Pods not Running are not movable (the rules of [`crate::pod`]);
/// 3. picks a target per movable Pod ([`choose_target`] among the nodes with a running migrate
///    daemon, counting the Pods already placed by this drain; or `opts.to`);
/// 4. migrates at most `opts.concurrency` at once ([`cluster::preflight`] then
///    [`cluster::migrate`], with the images of `images_for(plan)`); a failed migration rolls back
///    and the source Pod runs on as before;
/// 5. with `opts.evict_rest`, POSTs an Eviction (policy/v1) for every Pod that did not move,
///    except DaemonSet and static Pods; a 429 (a PodDisruptionBudget) is reported, not retried.
///
/// The node stays cordoned afterwards, as after `kubectl drain`: uncordon it when it is back.
/// `progress` hears each step.
pub async fn drain<I, F>(
    client: &Client,
    node: &str,
    opts: &DrainOptions,
    images_for: impl Fn(&PodPlan) -> I + Sync,
    progress: F,
) -> Result<DrainReport, DrainError>
where
    I: CheckpointImages,
    F: Fn(DrainEvent) + Send + Sync,
{
    if opts.to.as_deref() == Some(node) {
        return Err(DrainError::SameNode(node.into()));
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let current = nodes
        .get(node)
        .await
        .map_err(|e| api_error("get", "nodes", format!("node {node}"), e))?;
    let was_cordoned = current.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    if !was_cordoned {
        let patch = json!({"spec": {"unschedulable": true}});
        nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| api_error("patch", "nodes", format!("node {node} (cordon)"), e))?;
    }
    progress(DrainEvent::Cordoned {
        already: was_cordoned,
    });

    let all_pods: Api<Pod> = Api::all(client.clone());
    let on_node = all_pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(|e| api_error("list", "pods", format!("the Pods on node {node}"), e))?
        .items;
    let mut reports = Vec::new();
    let mut movable = Vec::new();
    for pod in on_node {
        match staying_reason(&pod) {
            Some(result) => reports.push(PodReport {
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                result,
                eviction: None,
            }),
            None => movable.push(pod),
        }
    }
    movable.sort_by_key(pod_id);
    reports.sort_by_key(PodReport::id);
    progress(DrainEvent::Found {
        movable: movable.len(),
        staying: reports.len(),
        pods: movable.iter().map(pod_id).collect(),
    });
    for r in &reports {
        progress(DrainEvent::Staying {
            pod: r.id(),
            result: r.result.clone(),
        });
    }

    let targets = pick_targets(client, node, opts, &movable).await?;
    for (pod, target) in movable.iter().zip(&targets) {
        if let Ok(to) = target {
            progress(DrainEvent::Target {
                pod: pod_id(pod),
                to: to.clone(),
            });
        }
    }

    let limit = Semaphore::new(opts.concurrency.max(1));
    let (limit, images_for, progress) = (&limit, &images_for, &progress);
    let runs: Vec<Pin<Box<dyn Future<Output = PodReport> + Send + '_>>> = movable
        .iter()
        .zip(targets)
        .map(|(pod, target)| {
            Box::pin(async move {
                let result = match target {
                    Err(message) => PodResult::Failed {
                        to: None,
                        phase: "choosing a target".into(),
                        message,
                    },
                    Ok(to) => {
                        let _permit = limit.acquire().await.expect("the semaphore stays open");
                        move_pod(client, node, pod, &to, opts, images_for, progress).await
                    }
                };
                progress(DrainEvent::Done {
                    pod: pod_id(pod),
                    result: result.clone(),
                });
                PodReport {
                    namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    result,
                    eviction: None,
                }
            }) as Pin<Box<dyn Future<Output = PodReport> + Send + '_>>
        })
        .collect();
    reports.extend(join_all(runs).await);
    reports.sort_by_key(PodReport::id);

    if opts.evict_rest {
        for report in reports.iter_mut() {
            let eviction = match &report.result {
                PodResult::Moved { .. } | PodResult::Skipped { .. } => continue,
                PodResult::NotMovable {
                    node_bound: true, ..
                } => Eviction::Skipped {
                    // Why it stays is the Pod's result already; said again, a table row would
                    // carry it twice.
                    reason: "a DaemonSet or static Pod: left on the node, as `kubectl drain \
                             --ignore-daemonsets` leaves it"
                        .into(),
                },
                _ => {
                    let pending = evict(client, &report.namespace, &report.name);
                    match tokio::time::timeout(opts.eviction_timeout, pending).await {
                        Ok(eviction) => eviction,
                        Err(_) => Eviction::Failed {
                            message: format!(
                                "no final answer within {:?}: the API server kept answering 429 \
                                 TooManyRequests (a PodDisruptionBudget?) and the client kept \
                                 retrying, or it did not answer",
                                opts.eviction_timeout
                            ),
                        },
                    }
                }
            };
            progress(DrainEvent::Evicted {
                pod: report.id(),
                eviction: eviction.clone(),
            });
            report.eviction = Some(eviction);
        }
    }
    tracing::info!(node, pods = reports.len(), "drain done");
    Ok(DrainReport {
        node: node.to_string(),
        was_cordoned,
        pods: reports,
    })
}

/// The target of each movable Pod: `opts.to`, or [`choose_target`] among the nodes with a
/// running daemon, each choice counted on its node for the next ones.
async fn pick_targets(
    client: &Client,
    node: &str,
    opts: &DrainOptions,
    movable: &[Pod],
) -> Result<Vec<Result<String, String>>, DrainError> {
    if let Some(to) = &opts.to {
        return Ok(movable.iter().map(|_| Ok(to.clone())).collect());
    }
    if movable.is_empty() {
        return Ok(Vec::new());
    }
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error("list", "nodes", "nodes".into(), e))?
        .items;
    let mut placed = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error("list", "pods", "the Pods of all namespaces".into(), e))?
        .items;
    let daemons = Api::<Pod>::namespaced(client.clone(), &opts.daemon_namespace)
        .list(&ListParams::default().labels(&opts.daemon_selector))
        .await
        .map_err(|e| {
            api_error(
                "list",
                "pods",
                format!(
                    "the migrate daemons ({} in namespace {})",
                    opts.daemon_selector, opts.daemon_namespace
                ),
                e,
            )
        })?
        .items;
    let with_daemon: BTreeSet<String> = daemons
        .iter()
        .filter(|d| {
            d.metadata.deletion_timestamp.is_none()
                && d.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .filter_map(|d| d.spec.as_ref().and_then(|s| s.node_name.clone()))
        .collect();
    let mut exclude = BTreeMap::from([(node.to_string(), "it is the node being drained".into())]);
    for n in &nodes {
        let name = n.metadata.name.clone().unwrap_or_default();
        if !with_daemon.contains(&name) {
            exclude.entry(name).or_insert_with(|| {
                format!(
                    "no running migrate daemon ({} in namespace {})",
                    opts.daemon_selector, opts.daemon_namespace
                )
            });
        }
    }
    let mut targets = Vec::new();
    for pod in movable {
        let target = choose_target(pod, &nodes, &placed, &exclude);
        if let Ok(to) = &target {
            let mut copy = pod.clone();
            if let Some(spec) = copy.spec.as_mut() {
                spec.node_name = Some(to.clone());
            }
            placed.push(copy);
        }
        targets.push(target);
    }
    Ok(targets)
}

/// One Pod's migration to `to`.
async fn move_pod<I, F>(
    client: &Client,
    node: &str,
    pod: &Pod,
    to: &str,
    opts: &DrainOptions,
    images_for: &(impl Fn(&PodPlan) -> I + Sync),
    progress: &F,
) -> PodResult
where
    I: CheckpointImages,
    F: Fn(DrainEvent) + Send + Sync,
{
    let started = Instant::now();
    let id = pod_id(pod);
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut request = cluster::Request::new(&namespace, &name, node, to);
    request.daemon_namespace = opts.daemon_namespace.clone();
    request.daemon_selector = opts.daemon_selector.clone();
    let plan = match cluster::preflight(client, &request).await {
        Ok(plan) => plan,
        Err(ClusterError::Refused { reason, .. }) => {
            return PodResult::NotMovable {
                reason: reason.to_string(),
                node_bound: false,
            }
        }
        Err(e) => {
            return PodResult::Failed {
                to: Some(to.into()),
                phase: "preflight".into(),
                message: e.to_string(),
            }
        }
    };
    let images = images_for(&plan);
    let migrate_opts = MigrateOptions {
        migration_id: crate::migration::new_id(&name),
        now: opts.now.clone(),
        ready_timeout: opts.ready_timeout,
        handover_timeout: opts.handover_timeout,
        poll_interval: opts.poll_interval,
    };
    let result = cluster::migrate(client, &plan, &images, &migrate_opts, |p| {
        progress(DrainEvent::Step {
            pod: id.clone(),
            progress: p,
        })
    })
    .await;
    match result {
        Ok(outcome) => PodResult::Moved {
            to: outcome.target_node,
            new_pod: outcome.target_pod,
            took: started.elapsed(),
        },
        Err(ClusterError::Failed {
            phase,
            cause,
            rollback,
            ..
        }) => PodResult::Failed {
            to: Some(to.into()),
            phase: phase.to_string(),
            message: format!("{cause}; {rollback}"),
        },
        Err(e) => PodResult::Failed {
            to: Some(to.into()),
            phase: cluster::Phase::HandOver.to_string(),
            message: e.to_string(),
        },
    }
}

/// POSTs a policy/v1 Eviction for `namespace/name`.
async fn evict(client: &Client, namespace: &str, name: &str) -> Eviction {
    let url = format!("/api/v1/namespaces/{namespace}/pods");
    let mut request = match kube::core::Request::new(url).evict(name, &EvictParams::default()) {
        Ok(r) => r,
        Err(e) => {
            return Eviction::Failed {
                message: e.to_string(),
            }
        }
    };
    // kube's body has no apiVersion and kind; send the Eviction kubectl sends.
    *request.body_mut() = json!({
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": name, "namespace": namespace}
    })
    .to_string()
    .into_bytes();
    match client.request::<kube::core::Status>(request).await {
        Ok(_) => Eviction::Evicted,
        Err(kube::Error::Api(s)) if s.code == 404 => Eviction::Evicted,
        Err(kube::Error::Api(s)) if s.code == 429 => Eviction::Blocked { message: s.message },
        Err(e) => Eviction::Failed {
            message: e.to_string(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Watch mode
// ---------------------------------------------------------------------------------------------

/// Why a node is to be drained.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mark {
    /// The Node has annotation [`DRAIN_ANNOTATION`]`=true`.
    Annotation,
    /// The Node has taint [`DRAIN_TAINT`].
    Taint,
    /// The node's Machine is being deleted and carries our hook [`MACHINE_HOOK`].
    MachineHook {
        /// The Machine's namespace.
        namespace: String,
        /// The Machine's name.
        machine: String,
    },
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mark::Annotation => write!(f, "annotation {DRAIN_ANNOTATION}=true"),
            Mark::Taint => write!(f, "taint {DRAIN_TAINT}"),
            Mark::MachineHook { namespace, machine } => {
                write!(f, "hook {MACHINE_HOOK} on Machine {namespace}/{machine}")
            }
        }
    }
}

/// The Cluster API Machine resource (cluster.x-k8s.io/v1beta1).
fn machine_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cluster.x-k8s.io", "v1beta1", "Machine"),
        "machines",
    )
}

/// What the watcher found and did on one pass, per node.
#[derive(Debug)]
pub struct WatchOutcome {
    /// The node.
    pub node: String,
    /// What marked it.
    pub marks: Vec<Mark>,
    /// The drain's report, or why it could not run.
    pub report: Result<DrainReport, String>,
    /// The marks were removed (the drain settled every Pod).
    pub released: bool,
}

/// What the watcher reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// A marked node is being drained.
    Draining {
        /// The node.
        node: String,
        /// What marked it.
        marks: Vec<Mark>,
    },
    /// A step of that drain.
    Drain {
        /// The node.
        node: String,
        /// The step.
        event: DrainEvent,
    },
    /// A mark was removed: the ordinary drain may proceed.
    Released {
        /// The node.
        node: String,
        /// The mark.
        mark: Mark,
    },
    /// The marks stay: some Pods did not move (and were not evicted); the watcher does not
    /// retry this node while it stays marked.
    Kept {
        /// The node.
        node: String,
        /// What is left.
        why: String,
    },
    /// Something to know that does not stop the watch (e.g. Machines cannot be listed).
    Warning(String),
}

/// The hook mode of `migrate drain --watch`: each [`Watcher::watch_once`] finds the marked
/// nodes, drains each (one after another) and removes its marks when every Pod was settled
/// (moved; or with `evict_rest`, evicted; DaemonSet, static and finished Pods aside). When
/// some were not, the marks stay, so nothing else drains the node with them still on it (the
/// ordinary drain would evict them cold, and a Cluster API deletion waits on our hook): the
/// operator decides (move them by hand, or remove the mark). Such a node is not drained again
/// while it stays marked; a new watcher (a restart) retries it.
///
/// Marks: the Node annotation [`DRAIN_ANNOTATION`]`=true`, the Node taint [`DRAIN_TAINT`], or
/// our pre-drain hook [`MACHINE_HOOK`] on the Cluster API Machine whose `status.nodeRef.name`
/// is the node, once that Machine is being deleted (Cluster API consults pre-drain hooks only
/// then; the hook may sit on a Machine for its whole life). Other owners' hooks are not ours
/// and are left alone.
#[derive(Debug)]
pub struct Watcher {
    opts: DrainOptions,
    /// Nodes drained with Pods left behind, not retried while they stay marked.
    given_up: BTreeSet<String>,
}

impl Watcher {
    /// A watcher draining with `opts` (`opts.to` is ignored: each Pod's target is chosen).
    pub fn new(mut opts: DrainOptions) -> Self {
        opts.to = None;
        Watcher {
            opts,
            given_up: BTreeSet::new(),
        }
    }

    /// The nodes marked for drain now, with their marks, by node name. Machines are only
    /// looked for where Cluster API is installed (a 404 on the Machine list means it is not).
    pub async fn marked_nodes(
        client: &Client,
        warn: &(impl Fn(WatchEvent) + Sync),
    ) -> Result<BTreeMap<String, Vec<Mark>>, DrainError> {
        let mut marked: BTreeMap<String, Vec<Mark>> = BTreeMap::new();
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error("list", "nodes", "nodes".into(), e))?
            .items;
        for node in &nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            let annotated = node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DRAIN_ANNOTATION))
                .is_some_and(|v| v == "true");
            if annotated {
                marked
                    .entry(name.clone())
                    .or_default()
                    .push(Mark::Annotation);
            }
            let tainted = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == DRAIN_TAINT));
            if tainted {
                marked.entry(name).or_default().push(Mark::Taint);
            }
        }
        let machines: Api<DynamicObject> = Api::all_with(client.clone(), &machine_resource());
        match machines.list(&ListParams::default()).await {
            Ok(list) => {
                for m in list.items {
                    let ours = m
                        .metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(MACHINE_HOOK));
                    let deleting = m.metadata.deletion_timestamp.is_some();
                    let node = m.data["status"]["nodeRef"]["name"].as_str();
                    if let (true, true, Some(node)) = (ours, deleting, node) {
                        marked
                            .entry(node.to_string())
                            .or_default()
                            .push(Mark::MachineHook {
                                namespace: m.metadata.namespace.clone().unwrap_or_default(),
                                machine: m.metadata.name.clone().unwrap_or_default(),
                            });
                    }
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => warn(WatchEvent::Warning(format!(
                "{}; Cluster API hooks are not seen",
                api_error("list", "machines.cluster.x-k8s.io", "Machines".into(), e)
            ))),
        }
        Ok(marked)
    }

    /// One pass: finds the marked nodes, drains those not given up on, and removes the marks
    /// of those it settled. Callable on its own (tests drive it pass by pass).
    pub async fn watch_once<I, F>(
        &mut self,
        client: &Client,
        images_for: impl Fn(&PodPlan) -> I + Sync,
        progress: F,
    ) -> Result<Vec<WatchOutcome>, DrainError>
    where
        I: CheckpointImages,
        F: Fn(WatchEvent) + Send + Sync,
    {
        let marked = Self::marked_nodes(client, &progress).await?;
        self.given_up.retain(|n| marked.contains_key(n));
        let mut outcomes = Vec::new();
        for (node, marks) in marked {
            if self.given_up.contains(&node) {
                continue;
            }
            progress(WatchEvent::Draining {
                node: node.clone(),
                marks: marks.clone(),
            });
            let report = drain(client, &node, &self.opts, &images_for, |event| {
                progress(WatchEvent::Drain {
                    node: node.clone(),
                    event,
                })
            })
            .await
            .map_err(|e| e.to_string());
            let mut released = false;
            match &report {
                Ok(r) if r.settled() => {
                    released = true;
                    for mark in &marks {
                        match release(client, &node, mark).await {
                            Ok(()) => progress(WatchEvent::Released {
                                node: node.clone(),
                                mark: mark.clone(),
                            }),
                            Err(e) => {
                                released = false;
                                progress(WatchEvent::Warning(format!(
                                    "node {node} is drained but its {mark} could not be \
                                     removed: {e}"
                                )))
                            }
                        }
                    }
                }
                Ok(r) => {
                    self.given_up.insert(node.clone());
                    let left: Vec<String> = r
                        .pods
                        .iter()
                        .filter(|p| !p.settled())
                        .map(PodReport::id)
                        .collect();
                    progress(WatchEvent::Kept {
                        node: node.clone(),
                        why: format!(
                            "{} Pod(s) did not move{}: {}; the {} stay(s) until they are dealt \
                             with",
                            left.len(),
                            if self.opts.evict_rest {
                                " and could not be evicted"
                            } else {
                                " (--evict-rest would evict them)"
                            },
                            left.join(", "),
                            marks
                                .iter()
                                .map(Mark::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
                Err(e) => progress(WatchEvent::Warning(format!("draining node {node}: {e}"))),
            }
            outcomes.push(WatchOutcome {
                node,
                marks,
                report,
                released,
            });
        }
        Ok(outcomes)
    }

    /// Runs [`Watcher::watch_once`] every `interval` forever; a failed pass is reported as a
    /// warning and the next one runs.
    pub async fn run<I, F>(
        &mut self,
        client: &Client,
        interval: Duration,
        images_for: impl Fn(&PodPlan) -> I + Sync,
        progress: F,
    ) where
        I: CheckpointImages,
        F: Fn(WatchEvent) + Send + Sync,
    {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.watch_once(client, &images_for, &progress).await {
                progress(WatchEvent::Warning(format!(
                    "watching for nodes to drain: {e}"
                )));
            }
        }
    }
}

/// Removes `mark` from `node` (or its Machine).
async fn release(client: &Client, node: &str, mark: &Mark) -> Result<(), DrainError> {
    let params = PatchParams::default();
    match mark {
        Mark::Annotation => {
            let patch = json!({"metadata": {"annotations": {DRAIN_ANNOTATION: null}}});
            Api::<Node>::all(client.clone())
                .patch(node, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| api_error("patch", "nodes", format!("node {node}"), e))?;
        }
        Mark::Taint => {
            let nodes: Api<Node> = Api::all(client.clone());
            let current = nodes
                .get(node)
                .await
                .map_err(|e| api_error("get", "nodes", format!("node {node}"), e))?;
            let taints: Vec<&Taint> = current
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .into_iter()
                .flatten()
                .filter(|t| t.key != DRAIN_TAINT)
                .collect();
            // The taint list is replaced whole: resourceVersion makes a concurrent change fail
            // (409) instead of being overwritten.
            let patch = json!({
                "metadata": {"resourceVersion": current.metadata.resource_version},
                "spec": {"taints": taints}
            });
            nodes
                .patch(node, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| api_error("patch", "nodes", format!("node {node}"), e))?;
        }
        Mark::MachineHook { namespace, machine } => {
            let patch = json!({"metadata": {"annotations": {MACHINE_HOOK: null}}});
            Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &machine_resource())
                .patch(machine, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| {
                    api_error(
                        "patch",
                        "machines.cluster.x-k8s.io",
                        format!("Machine {namespace}/{machine}"),
                        e,
                    )
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_quantities_parse() {
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9 * b.max(1.0));
        assert!(close(parse_quantity("100m"), 0.1));
        assert!(close(parse_quantity("1"), 1.0));
        assert!(close(parse_quantity("1.5"), 1.5));
        assert!(close(parse_quantity("512Mi"), 512.0 * 1024.0 * 1024.0));
        assert!(close(parse_quantity("1G"), 1e9));
        assert!(close(parse_quantity("1Gi"), 1073741824.0));
        assert!(close(parse_quantity("2e3"), 2000.0));
        assert!(close(parse_quantity("128974848"), 128974848.0));
        assert_eq!(parse_quantity("12x"), None);
        assert_eq!(parse_quantity("Mi"), None);
    }

    #[test]
    fn drain_requests_sum_containers_and_respect_init() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [
                    {"name": "a", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}},
                    {"name": "b", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}],
                "initContainers": [
                    {"name": "i", "resources": {"requests": {"cpu": "2", "memory": "1Mi"}}}],
                "overhead": {"cpu": "10m"}}}))
        .unwrap();
        let r = pod_requests(&pod);
        assert!((r.cpu_milli - 2010.0).abs() < 1e-6, "{r:?}");
        assert!(
            (r.memory - (1024.0 + 64.0) * 1024.0 * 1024.0).abs() < 1.0,
            "{r:?}"
        );
    }

    #[test]
    fn drain_tolerations_match_taints() {
        let taint = Taint {
            key: "dedicated".into(),
            value: Some("gpu".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        };
        let tol =
            |key: Option<&str>, op: Option<&str>, value: Option<&str>, effect: Option<&str>| {
                Toleration {
                    key: key.map(Into::into),
                    operator: op.map(Into::into),
                    value: value.map(Into::into),
                    effect: effect.map(Into::into),
                    toleration_seconds: None,
                }
            };
        assert!(tolerates(
            &[tol(Some("dedicated"), None, Some("gpu"), None)],
            &taint
        ));
        assert!(!tolerates(
            &[tol(Some("dedicated"), None, Some("cpu"), None)],
            &taint
        ));
        assert!(tolerates(
            &[tol(
                Some("dedicated"),
                Some("Exists"),
                None,
                Some("NoSchedule")
            )],
            &taint
        ));
        assert!(!tolerates(
            &[tol(
                Some("dedicated"),
                Some("Exists"),
                None,
                Some("NoExecute")
            )],
            &taint
        ));
        assert!(tolerates(&[tol(None, Some("Exists"), None, None)], &taint));
        assert!(!tolerates(&[], &taint));
    }
}
