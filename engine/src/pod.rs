//! The Kubernetes rules of a Pod migration, without IO: which source Pods can move at all
//! ([`ownership`], [`review_volumes`], [`check_persistent_volume`]), which labels a
//! ReplicaSet selects on ([`withheld_label_keys`]) and what the new Pod on the target node looks
//! like ([`target_pod`], [`target_pod_name`]). [`crate::cluster`] does the API calls around them.
//!
//! What moves is the containers' state (memory, processes, the writable layer) as checkpoint
//! images; volumes stay where they are. So a Pod may only move when every volume either is
//! recreated from the API on the target (configMap, secret, downwardAPI, projected), lives on
//! storage any node reaches (a PersistentVolume not pinned to the source node), or starts empty
//! by design (emptyDir, generic ephemeral volumes: allowed, but **their contents are not
//! carried**; that is returned as a warning). A `hostPath` volume, or a PersistentVolume that is
//! local to the source node, refuses the migration.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Annotation on the new Pod: the migration's ID (also in the checkpoint image tags).
pub const ANNOTATION_MIGRATION_ID: &str = "migrate.dev/migration-id";
/// Annotation on the new Pod: the node the source Pod ran on.
pub const ANNOTATION_SOURCE_NODE: &str = "migrate.dev/source-node";
/// Annotation on the new Pod: the source Pod's name.
pub const ANNOTATION_SOURCE_POD: &str = "migrate.dev/source-pod";
/// Annotation on the new Pod: when the migration ran (RFC 3339).
pub const ANNOTATION_MIGRATED_AT: &str = "migrate.dev/migrated-at";
/// The kubelet marks the API copy (mirror) of a static Pod with this annotation.
pub const ANNOTATION_MIRROR: &str = "kubernetes.io/config.mirror";
/// The ReplicaSet controller deletes the Pods with the lowest cost first when it has too many.
pub const ANNOTATION_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The deletion cost put on the source Pod of a ReplicaSet during the hand-over: `i32::MIN`, the
/// lowest value the API server accepts (the annotation is validated as an int32), so no other
/// Pod of the ReplicaSet ranks before it. The controller ranks unscheduled, Pending and
/// not-Ready Pods first anyway; between Running and Ready Pods the cost decides.
pub const SOURCE_DELETION_COST: &str = "-2147483648";
/// Prefix of the projected service-account token volume that admission adds to every Pod
/// (`kube-api-access-<random>`); admission adds a fresh one to the new Pod at the same path.
pub const SERVICE_ACCOUNT_VOLUME_PREFIX: &str = "kube-api-access-";

/// Who manages the source Pod, among the cases a migration supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// No controller: the migration deletes the source Pod itself once the new one is Ready.
    Bare,
    /// A ReplicaSet (usually a Deployment's) controls it: the ReplicaSet adopts the new Pod and
    /// removes the source (see [`SOURCE_DELETION_COST`]).
    ReplicaSet {
        /// The ReplicaSet's name, in the Pod's namespace.
        name: String,
    },
}

/// Why a Pod cannot be migrated. The messages complete "cannot migrate Pod ns/name: ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// StatefulSet Pods have a stable identity and per-Pod volumes.
    #[error(
        "it belongs to StatefulSet {name}: StatefulSet Pods have a stable name and per-Pod \
         volumes, and the controller recreates a Pod under the same name; a copy under another \
         name cannot take its place"
    )]
    StatefulSet {
        /// The StatefulSet's name.
        name: String,
    },
    /// DaemonSet Pods are one per node by design.
    #[error(
        "it belongs to DaemonSet {name}: a DaemonSet runs exactly one Pod per node by design, \
         so its Pods never move between nodes"
    )]
    DaemonSet {
        /// The DaemonSet's name.
        name: String,
    },
    /// A static Pod: defined by a manifest file on its node, the API only shows a mirror.
    #[error(
        "it is a static Pod ({why}): the kubelet of its node runs it from a manifest file on \
         that node, and the API object is only a mirror of it"
    )]
    Static {
        /// What marks it as static (the mirror annotation or a Node owner).
        why: String,
    },
    /// A Job counts its Pods' completions; a copy would not be counted.
    #[error(
        "it belongs to {kind} {name}: a Job tracks its own Pods' completions and would not \
         count a copy made under another name"
    )]
    Job {
        /// `Job` or `CronJob`.
        kind: String,
        /// The owner's name.
        name: String,
    },
    /// Any other controller: nothing tells it to accept the copy and let the source go.
    #[error(
        "it is controlled by {kind} {name}, which this tool cannot hand a Pod over to; only bare \
         Pods and Pods of a ReplicaSet (a Deployment's) can move"
    )]
    Controller {
        /// The controller's kind.
        kind: String,
        /// The controller's name.
        name: String,
    },
    /// A hostPath volume: the directory stays on the source node.
    #[error(
        "volume {volume} is a hostPath volume ({path}): that directory is on the source node \
         and does not follow the Pod"
    )]
    HostPath {
        /// The volume's name in the Pod.
        volume: String,
        /// The host path.
        path: String,
    },
    /// A PersistentVolume only the source node can reach.
    #[error(
        "volume {volume} uses PersistentVolumeClaim {claim}, bound to PersistentVolume {pv}, \
         which {why}: its data cannot follow the Pod to another node"
    )]
    NodeBoundVolume {
        /// The volume's name in the Pod.
        volume: String,
        /// The claim's name.
        claim: String,
        /// The PersistentVolume's name.
        pv: String,
        /// What pins it (local, hostPath, node affinity).
        why: String,
    },
    /// A claim not bound to any PersistentVolume.
    #[error(
        "volume {volume} uses PersistentVolumeClaim {claim}, which is not bound to a \
         PersistentVolume"
    )]
    UnboundClaim {
        /// The volume's name in the Pod.
        volume: String,
        /// The claim's name.
        claim: String,
    },
    /// The ReplicaSet's selector only has terms that a Pod without the label satisfies
    /// (`NotIn`, `DoesNotExist`), so withholding labels cannot keep it from adopting the new
    /// Pod while it is Pending.
    #[error(
        "the selector of ReplicaSet {name} has no matchLabels, In or Exists term: the new Pod \
         cannot be kept out of it while it starts"
    )]
    UnwithholdableSelector {
        /// The ReplicaSet's name.
        name: String,
    },
}

/// Decides who owns `pod` (its controller owner reference) and whether that allows a
/// migration.
pub fn ownership(pod: &Pod) -> Result<Ownership, Refusal> {
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_MIRROR))
    {
        return Err(Refusal::Static {
            why: format!("annotation {ANNOTATION_MIRROR}"),
        });
    }
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    if let Some(node) = owners.iter().find(|o| o.kind == "Node") {
        return Err(Refusal::Static {
            why: format!("owned by Node {}", node.name),
        });
    }
    let Some(controller) = owners.iter().find(|o| o.controller == Some(true)) else {
        return Ok(Ownership::Bare);
    };
    let name = controller.name.clone();
    match controller.kind.as_str() {
        "ReplicaSet" if controller.api_version.starts_with("apps/") => {
            Ok(Ownership::ReplicaSet { name })
        }
        "StatefulSet" => Err(Refusal::StatefulSet { name }),
        "DaemonSet" => Err(Refusal::DaemonSet { name }),
        "Job" | "CronJob" => Err(Refusal::Job {
            kind: controller.kind.clone(),
            name,
        }),
        _ => Err(Refusal::Controller {
            kind: format!("{} ({})", controller.kind, controller.api_version),
            name,
        }),
    }
}

/// A volume backed by a PersistentVolumeClaim, to be checked with the API
/// ([`check_persistent_volume`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The volume's name in the Pod.
    pub volume: String,
    /// The claim's name, in the Pod's namespace.
    pub claim: String,
}

/// What [`review_volumes`] found in a Pod that may move.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeReview {
    /// The PersistentVolumeClaims to look up before deciding.
    pub claims: Vec<Claim>,
    /// What the user should know but does not stop the migration (emptyDir contents lost...).
    pub warnings: Vec<String>,
}

/// Checks the volumes of `pod` that need no lookup: a `hostPath` volume refuses the migration;
/// emptyDir and generic ephemeral volumes are allowed but start empty on the target (their
/// contents are not carried: one warning each); init containers (sidecars included) are not
/// checkpointed and run again (a warning); PersistentVolumeClaims are returned for
/// [`check_persistent_volume`].
pub fn review_volumes(pod: &Pod) -> Result<VolumeReview, Refusal> {
    let mut review = VolumeReview::default();
    let Some(spec) = &pod.spec else {
        return Ok(review);
    };
    for volume in spec.volumes.as_deref().unwrap_or_default() {
        if let Some(host) = &volume.host_path {
            return Err(Refusal::HostPath {
                volume: volume.name.clone(),
                path: host.path.clone(),
            });
        }
        if volume.empty_dir.is_some() {
            review.warnings.push(format!(
                "emptyDir volume {} starts empty on the target node: its contents are not carried",
                volume.name
            ));
        }
        if volume.ephemeral.is_some() {
            review.warnings.push(format!(
                "ephemeral volume {} gets a new, empty claim on the target node: its contents are \
                 not carried",
                volume.name
            ));
        }
        if let Some(pvc) = &volume.persistent_volume_claim {
            review.claims.push(Claim {
                volume: volume.name.clone(),
                claim: pvc.claim_name.clone(),
            });
        }
    }
    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    if !init.is_empty() {
        review.warnings.push(format!(
            "init containers {} are not checkpointed: they run again, from their images, on the \
             target node before the restore",
            init.join(", ")
        ));
    }
    Ok(review)
}

/// The rule for a PersistentVolume bound to a claim of the Pod: refused when it is a `local`
/// or `hostPath` volume, or when its required node affinity admits only nodes other than
/// `target` (a volume pinned to the source node). `target`'s `kubernetes.io/hostname` label
/// and name are what affinity terms are compared with.
pub fn check_persistent_volume(
    claim: &Claim,
    pv: &PersistentVolume,
    target: &Node,
) -> Result<(), Refusal> {
    let refuse = |why: String| Refusal::NodeBoundVolume {
        volume: claim.volume.clone(),
        claim: claim.claim.clone(),
        pv: pv.metadata.name.clone().unwrap_or_default(),
        why,
    };
    let Some(spec) = &pv.spec else {
        return Ok(());
    };
    if let Some(local) = &spec.local {
        return Err(refuse(format!(
            "is a local volume ({}) on one node",
            local.path
        )));
    }
    if let Some(host) = &spec.host_path {
        return Err(refuse(format!(
            "is a hostPath volume ({}) on one node",
            host.path
        )));
    }
    let terms = spec
        .node_affinity
        .as_ref()
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    if terms.is_empty() {
        return Ok(());
    }
    let target_name = target.metadata.name.as_deref().unwrap_or_default();
    let target_hostname = target
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/hostname"))
        .map(String::as_str)
        .unwrap_or(target_name);
    // Terms are ORed. A term pins to named nodes when one of its requirements is
    // `kubernetes.io/hostname In [...]` or `metadata.name In [...]`.
    let mut pinned_to = Vec::new();
    for term in terms {
        let by_label = term
            .match_expressions
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|r| r.key == "kubernetes.io/hostname" && r.operator == "In")
            .map(|r| (r.values.clone().unwrap_or_default(), target_hostname));
        let by_field = term
            .match_fields
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|r| r.key == "metadata.name" && r.operator == "In")
            .map(|r| (r.values.clone().unwrap_or_default(), target_name));
        match by_label.or(by_field) {
            Some((names, target)) if !names.iter().any(|n| n == target) => pinned_to.extend(names),
            // A term that admits the target (or does not name nodes): the volume may follow.
            _ => return Ok(()),
        }
    }
    Err(refuse(format!(
        "its node affinity admits only node(s) {}, not the target node {target_name}",
        pinned_to.join(", ")
    )))
}

/// The label keys a ReplicaSet selects on (its `matchLabels` keys and the keys of its
/// `matchExpressions`): the new Pod is created without them so the ReplicaSet does not adopt
/// it while it is Pending (a ReplicaSet with one Pod too many deletes a Pending one first).
/// Refused when no term requires a label to be present.
pub fn withheld_label_keys(rs: &ReplicaSet) -> Result<Vec<String>, Refusal> {
    let selector = rs.spec.as_ref().map(|s| &s.selector);
    let mut keys: Vec<String> = Vec::new();
    let mut requires_presence = false;
    if let Some(labels) = selector.and_then(|s| s.match_labels.as_ref()) {
        requires_presence |= !labels.is_empty();
        keys.extend(labels.keys().cloned());
    }
    for expr in selector
        .and_then(|s| s.match_expressions.as_deref())
        .unwrap_or_default()
    {
        requires_presence |= matches!(expr.operator.as_str(), "In" | "Exists");
        keys.push(expr.key.clone());
    }
    if !requires_presence {
        return Err(Refusal::UnwithholdableSelector {
            name: rs.metadata.name.clone().unwrap_or_default(),
        });
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// What [`target_pod`] needs besides the source Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// The new Pod's name (see [`target_pod_name`]).
    pub name: String,
    /// The node the new Pod is pinned to (`spec.nodeName`).
    pub target_node: String,
    /// Container name → checkpoint image reference, for the migrated containers only.
    pub images: BTreeMap<String, String>,
    /// The migration's ID (annotation [`ANNOTATION_MIGRATION_ID`]).
    pub migration_id: String,
    /// The node the source Pod runs on (annotation [`ANNOTATION_SOURCE_NODE`]).
    pub source_node: String,
    /// When the migration ran, RFC 3339 (annotation [`ANNOTATION_MIGRATED_AT`]).
    pub migrated_at: String,
    /// Label keys left out of the new Pod (see [`withheld_label_keys`]); empty for a bare Pod.
    pub withheld_labels: Vec<String>,
}

/// The name of the new Pod: the source name, `-` and a short suffix from the migration ID (its
/// last `-`-separated part, at most 8 characters, e.g. `web-1a2b3c4d` for ID `web-1a2b3c4d`),
/// cut to 63 characters.
pub fn target_pod_name(source: &str, migration_id: &str) -> String {
    let last = migration_id.rsplit('-').next().unwrap_or_default();
    let mut suffix: String = last
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        .collect();
    if suffix.len() > 8 {
        suffix = suffix.split_off(suffix.len() - 8);
    }
    if suffix.is_empty() {
        // FNV-1a: any ID still gives a stable suffix.
        let hash = migration_id.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        suffix = format!("{hash:08x}");
    }
    let room = 63 - 1 - suffix.len();
    let base: String = source.chars().take(room).collect();
    let base = base.trim_end_matches(['-', '.']);
    format!("{base}-{suffix}")
}

/// Whether a volume is the service-account token volume admission generated.
fn is_service_account_volume(volume: &k8s_openapi::api::core::v1::Volume) -> bool {
    volume.name.starts_with(SERVICE_ACCOUNT_VOLUME_PREFIX) && volume.projected.is_some()
}

/// Builds the new Pod from the source Pod. Metadata keeps the namespace, the labels (minus
/// `spec.withheld_labels`) and the annotations, and adds the four `migrate.dev/` annotations;
/// everything the API server or controllers own (uid, resourceVersion, timestamps, generation,
/// managedFields, generateName, ownerReferences, finalizers) is left out. The spec is the
/// source's with `nodeName` = the target node, each migrated container's image = its checkpoint
/// image with `imagePullPolicy: Never` (other containers unchanged), without ephemeral
/// containers and without the generated `kube-api-access-*` volume and its mounts (admission
/// adds a fresh one at the same path). Every other volume and mount stays: CRI-O needs every
/// bind mount of the checkpoint at the same path. No status.
pub fn target_pod(source: &Pod, spec: &TargetSpec) -> Pod {
    let meta = &source.metadata;
    let labels: BTreeMap<String, String> = meta
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| !spec.withheld_labels.contains(k))
        .collect();
    let mut annotations = meta.annotations.clone().unwrap_or_default();
    annotations.insert(ANNOTATION_MIGRATION_ID.into(), spec.migration_id.clone());
    annotations.insert(ANNOTATION_SOURCE_NODE.into(), spec.source_node.clone());
    annotations.insert(
        ANNOTATION_SOURCE_POD.into(),
        meta.name.clone().unwrap_or_default(),
    );
    annotations.insert(ANNOTATION_MIGRATED_AT.into(), spec.migrated_at.clone());
    let metadata = ObjectMeta {
        name: Some(spec.name.clone()),
        namespace: meta.namespace.clone(),
        labels: (!labels.is_empty()).then_some(labels),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    };

    let mut pod_spec = source.spec.clone().unwrap_or_default();
    pod_spec.node_name = Some(spec.target_node.clone());
    pod_spec.ephemeral_containers = None;
    let dropped: Vec<String> = pod_spec
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|v| is_service_account_volume(v))
        .map(|v| v.name.clone())
        .collect();
    if let Some(volumes) = &mut pod_spec.volumes {
        volumes.retain(|v| !dropped.contains(&v.name));
        if volumes.is_empty() {
            pod_spec.volumes = None;
        }
    }
    let init = pod_spec.init_containers.iter_mut().flatten();
    for container in pod_spec.containers.iter_mut().chain(init) {
        if let Some(mounts) = &mut container.volume_mounts {
            mounts.retain(|m| !dropped.contains(&m.name));
            if mounts.is_empty() {
                container.volume_mounts = None;
            }
        }
    }
    for container in &mut pod_spec.containers {
        if let Some(image) = spec.images.get(&container.name) {
            container.image = Some(image.clone());
            container.image_pull_policy = Some("Never".into());
        }
    }
    Pod {
        metadata,
        spec: Some(pod_spec),
        status: None,
    }
}

/// Waiting reasons of a container that will not fix themselves while a migration waits: the
/// restore failed (`CreateContainerError`), the checkpoint image is not on the node
/// (`ErrImageNeverPull`), or the restored process keeps dying (`CrashLoopBackOff`).
pub const FATAL_WAITING_REASONS: &[&str] = &[
    "CreateContainerError",
    "CreateContainerConfigError",
    "ErrImageNeverPull",
    "InvalidImageName",
    "ErrImagePull",
    "ImagePullBackOff",
    "RunContainerError",
    "CrashLoopBackOff",
];

/// Where a new Pod stands on its way to Ready, from its status ([`readiness`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Condition `Ready` is `True`.
    Ready,
    /// Not Ready yet; a short description of the state (phase, waiting reasons).
    Starting(String),
    /// It will not become Ready: phase `Failed`/`Succeeded`, or a container waiting with one
    /// of the [`FATAL_WAITING_REASONS`].
    Failed {
        /// The Pod's or the container's reason (e.g. `CreateContainerError`).
        reason: String,
        /// The accompanying message, with the container's name when it is a container's.
        message: String,
    },
}

/// Reads a Pod's status: Ready, still starting, or failed for good.
pub fn readiness(pod: &Pod) -> Readiness {
    let Some(status) = &pod.status else {
        return Readiness::Starting("no status yet".into());
    };
    let phase = status.phase.as_deref().unwrap_or("Pending");
    if matches!(phase, "Failed" | "Succeeded") {
        return Readiness::Failed {
            reason: status.reason.clone().unwrap_or_else(|| phase.to_string()),
            message: status
                .message
                .clone()
                .unwrap_or_else(|| format!("the Pod ended in phase {phase}")),
        };
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    let mut waiting = Vec::new();
    for container in containers {
        let Some(w) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = w.reason.clone().unwrap_or_default();
        if FATAL_WAITING_REASONS.contains(&reason.as_str()) {
            return Readiness::Failed {
                message: format!(
                    "container {}: {}",
                    container.name,
                    w.message.as_deref().unwrap_or("(no message)")
                ),
                reason,
            };
        }
        waiting.push(format!("{} waiting ({reason})", container.name));
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready");
    if ready.is_some_and(|c| c.status == "True") {
        return Readiness::Ready;
    }
    let mut state = format!("phase {phase}");
    if let Some(c) = ready {
        state += &format!(", Ready={}", c.status);
        if let Some(reason) = &c.reason {
            state += &format!(" ({reason})");
        }
    }
    for w in waiting {
        state += &format!(", {w}");
    }
    Readiness::Starting(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    /// A Running Pod as the API server returns it: two containers, a configMap, an emptyDir and
    /// the generated token volume mounted in both containers and the init container.
    fn source() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web", "namespace": "shop", "generateName": "web-",
                "uid": "1111", "resourceVersion": "42", "generation": 3,
                "creationTimestamp": "2025-01-01T00:00:00Z",
                "deletionTimestamp": "2025-01-01T00:01:00Z",
                "labels": {"app": "web", "pod-template-hash": "abc", "tier": "front"},
                "annotations": {"note": "kept"},
                "finalizers": ["example.com/keep"],
                "managedFields": [{"manager": "kubectl", "operation": "Update"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc",
                                     "uid": "2222", "controller": true}]
            },
            "spec": {
                "nodeName": "node-a",
                "initContainers": [{"name": "init", "image": "busybox",
                    "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
                "containers": [
                    {"name": "app", "image": "nginx:1.27", "imagePullPolicy": "IfNotPresent",
                     "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/app"},
                        {"name": "cache", "mountPath": "/cache"},
                        {"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]},
                    {"name": "sidecar", "image": "envoy:1",
                     "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}
                ],
                "ephemeralContainers": [{"name": "debugger", "image": "busybox"}],
                "volumes": [
                    {"name": "config", "configMap": {"name": "web-config"}},
                    {"name": "cache", "emptyDir": {}},
                    {"name": "kube-api-access-x7k2p", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}
                ]
            },
            "status": {"phase": "Running", "podIP": "10.0.0.5"}
        })
    }

    fn spec(images: &[(&str, &str)], withheld: &[&str]) -> TargetSpec {
        TargetSpec {
            name: "web-1a2b3c4d".into(),
            target_node: "node-b".into(),
            images: images
                .iter()
                .map(|(c, i)| (c.to_string(), i.to_string()))
                .collect(),
            migration_id: "web-1a2b3c4d".into(),
            source_node: "node-a".into(),
            migrated_at: "2025-06-01T12:00:00Z".into(),
            withheld_labels: withheld.iter().map(|k| k.to_string()).collect(),
        }
    }

    fn owned_by(kind: &str, api_version: &str) -> Pod {
        pod(json!({"metadata": {"name": "p", "ownerReferences": [
            {"apiVersion": api_version, "kind": kind, "name": "owner", "uid": "u", "controller": true}]}}))
    }

    #[test]
    fn bare_and_replicaset_pods_may_move() {
        assert_eq!(
            ownership(&pod(json!({"metadata": {"name": "p"}}))),
            Ok(Ownership::Bare)
        );
        // A non-controller owner does not manage the Pod's lifecycle.
        let shared = pod(json!({"metadata": {"name": "p", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "u"}]}}));
        assert_eq!(ownership(&shared), Ok(Ownership::Bare));
        assert_eq!(
            ownership(&owned_by("ReplicaSet", "apps/v1")),
            Ok(Ownership::ReplicaSet {
                name: "owner".into()
            })
        );
    }

    #[test]
    fn controllers_that_cannot_hand_over_are_refused() {
        let refusal = ownership(&owned_by("StatefulSet", "apps/v1")).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::StatefulSet {
                name: "owner".into()
            }
        );
        assert!(refusal.to_string().contains("stable name"), "{refusal}");
        let refusal = ownership(&owned_by("DaemonSet", "apps/v1")).unwrap_err();
        assert!(
            refusal.to_string().contains("one Pod per node"),
            "{refusal}"
        );
        for kind in ["Job", "CronJob"] {
            assert_eq!(
                ownership(&owned_by(kind, "batch/v1")),
                Err(Refusal::Job {
                    kind: kind.into(),
                    name: "owner".into()
                })
            );
        }
        let refusal = ownership(&owned_by("Rollout", "argoproj.io/v1alpha1")).unwrap_err();
        assert!(
            refusal
                .to_string()
                .contains("Rollout (argoproj.io/v1alpha1) owner"),
            "{refusal}"
        );
    }

    #[test]
    fn static_pods_are_refused() {
        let mirror = pod(
            json!({"metadata": {"name": "etcd-a", "annotations": {"kubernetes.io/config.mirror": "abc"}}}),
        );
        assert!(matches!(ownership(&mirror), Err(Refusal::Static { .. })));
        let refusal = ownership(&owned_by("Node", "v1")).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Static {
                why: "owned by Node owner".into()
            }
        );
    }

    #[test]
    fn host_path_is_refused_and_empty_dir_warned() {
        let host = pod(json!({"metadata": {"name": "p"}, "spec": {"containers": [],
            "volumes": [{"name": "data", "hostPath": {"path": "/srv/data"}}]}}));
        assert_eq!(
            review_volumes(&host),
            Err(Refusal::HostPath {
                volume: "data".into(),
                path: "/srv/data".into()
            })
        );
        let review = review_volumes(&pod(source())).unwrap();
        assert!(review.claims.is_empty());
        assert_eq!(review.warnings.len(), 2, "{:?}", review.warnings);
        assert!(
            review.warnings[0].contains("emptyDir volume cache"),
            "{:?}",
            review.warnings
        );
        assert!(
            review.warnings[0].contains("not carried"),
            "{:?}",
            review.warnings
        );
        assert!(
            review.warnings[1].contains("init containers init are not checkpointed"),
            "{:?}",
            review.warnings
        );
    }

    #[test]
    fn claims_are_listed_for_lookup() {
        let p = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [], "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": "data-p"}},
            {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]}}),
        );
        let review = review_volumes(&p).unwrap();
        assert_eq!(
            review.claims,
            vec![Claim {
                volume: "data".into(),
                claim: "data-p".into()
            }]
        );
        assert!(
            review.warnings[0].contains("ephemeral volume scratch"),
            "{:?}",
            review.warnings
        );
    }

    fn node_b() -> Node {
        serde_json::from_value(
            json!({"metadata": {"name": "node-b", "labels": {"kubernetes.io/hostname": "node-b"}}}),
        )
        .unwrap()
    }

    fn pv(spec: Value) -> PersistentVolume {
        serde_json::from_value(json!({"metadata": {"name": "pv-1"}, "spec": spec})).unwrap()
    }

    fn pinned(key_kind: &str, key: &str, nodes: &[&str]) -> Value {
        json!({"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {key_kind: [{"key": key, "operator": "In", "values": nodes}]}]}}})
    }

    #[test]
    fn persistent_volumes_pinned_to_a_node_are_refused() {
        let claim = Claim {
            volume: "data".into(),
            claim: "data-p".into(),
        };
        let local = pv(json!({"local": {"path": "/mnt/disk1"}}));
        let refusal = check_persistent_volume(&claim, &local, &node_b()).unwrap_err();
        assert!(
            matches!(&refusal, Refusal::NodeBoundVolume { pv, why, .. } if pv == "pv-1" && why.contains("local"))
        );
        assert!(check_persistent_volume(
            &claim,
            &pv(json!({"hostPath": {"path": "/x"}})),
            &node_b()
        )
        .is_err());
        let on_a = pv(pinned(
            "matchExpressions",
            "kubernetes.io/hostname",
            &["node-a"],
        ));
        let refusal = check_persistent_volume(&claim, &on_a, &node_b()).unwrap_err();
        assert!(
            refusal
                .to_string()
                .contains("admits only node(s) node-a, not the target node node-b"),
            "{refusal}"
        );
        let by_field = pv(pinned("matchFields", "metadata.name", &["node-a"]));
        assert!(check_persistent_volume(&claim, &by_field, &node_b()).is_err());
    }

    #[test]
    fn persistent_volumes_any_node_reaches_are_allowed() {
        let claim = Claim {
            volume: "data".into(),
            claim: "data-p".into(),
        };
        assert_eq!(
            check_persistent_volume(
                &claim,
                &pv(json!({"nfs": {"server": "s", "path": "/e"}})),
                &node_b()
            ),
            Ok(())
        );
        let zonal = pv(pinned(
            "matchExpressions",
            "topology.kubernetes.io/zone",
            &["z1"],
        ));
        assert_eq!(check_persistent_volume(&claim, &zonal, &node_b()), Ok(()));
        let both = pv(pinned(
            "matchExpressions",
            "kubernetes.io/hostname",
            &["node-a", "node-b"],
        ));
        assert_eq!(check_persistent_volume(&claim, &both, &node_b()), Ok(()));
    }

    #[test]
    fn withheld_keys_are_the_selector_keys() {
        let rs: ReplicaSet = serde_json::from_value(
            json!({"metadata": {"name": "web-abc"}, "spec": {"selector": {
            "matchLabels": {"app": "web", "pod-template-hash": "abc"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]},
                                 {"key": "app", "operator": "Exists"}]}}}),
        )
        .unwrap();
        assert_eq!(
            withheld_label_keys(&rs).unwrap(),
            vec!["app", "pod-template-hash", "tier"]
        );
        let absent_only: ReplicaSet =
            serde_json::from_value(json!({"metadata": {"name": "odd"}, "spec": {"selector": {
            "matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}}}))
            .unwrap();
        assert_eq!(
            withheld_label_keys(&absent_only),
            Err(Refusal::UnwithholdableSelector { name: "odd".into() })
        );
    }

    #[test]
    fn target_metadata_keeps_labels_and_annotations_and_drops_server_fields() {
        let target = target_pod(
            &pod(source()),
            &spec(
                &[("app", "localhost/ckpt-app:web-1a2b3c4d")],
                &["app", "pod-template-hash"],
            ),
        );
        let value = serde_json::to_value(&target).unwrap();
        let meta = &value["metadata"];
        assert_eq!(meta["name"], "web-1a2b3c4d");
        assert_eq!(meta["namespace"], "shop");
        assert_eq!(meta["labels"], json!({"tier": "front"}));
        assert_eq!(
            meta["annotations"],
            json!({
                "note": "kept",
                "migrate.dev/migration-id": "web-1a2b3c4d",
                "migrate.dev/source-node": "node-a",
                "migrate.dev/source-pod": "web",
                "migrate.dev/migrated-at": "2025-06-01T12:00:00Z"
            })
        );
        let keys: Vec<&String> = meta.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["annotations", "labels", "name", "namespace"]);
        assert!(value.get("status").is_none(), "{value}");
    }

    #[test]
    fn target_spec_pins_the_node_and_replaces_migrated_images() {
        let target = target_pod(
            &pod(source()),
            &spec(&[("app", "localhost/ckpt-app:web-1a2b3c4d")], &[]),
        );
        let value = serde_json::to_value(&target).unwrap();
        let spec = &value["spec"];
        assert_eq!(spec["nodeName"], "node-b");
        assert_eq!(
            spec["containers"][0]["image"],
            "localhost/ckpt-app:web-1a2b3c4d"
        );
        assert_eq!(spec["containers"][0]["imagePullPolicy"], "Never");
        // Not migrated (a -c subset): unchanged.
        assert_eq!(spec["containers"][1]["image"], "envoy:1");
        assert!(spec["containers"][1].get("imagePullPolicy").is_none());
        assert_eq!(spec["initContainers"][0]["image"], "busybox");
        assert!(spec.get("ephemeralContainers").is_none(), "{spec}");
        // No labels left at all: the field is absent rather than empty.
        let bare = target_pod(
            &pod(
                json!({"metadata": {"name": "p", "labels": {"app": "x"}}, "spec": {"containers": []}}),
            ),
            &self::spec(&[], &["app"]),
        );
        assert!(bare.metadata.labels.is_none());
    }

    #[test]
    fn target_drops_the_token_volume_and_keeps_the_others() {
        let target = target_pod(
            &pod(source()),
            &spec(&[("app", "i1"), ("sidecar", "i2")], &[]),
        );
        let value = serde_json::to_value(&target).unwrap();
        let spec = &value["spec"];
        assert_eq!(
            spec["volumes"],
            json!([{"name": "config", "configMap": {"name": "web-config"}}, {"name": "cache", "emptyDir": {}}])
        );
        assert_eq!(
            spec["containers"][0]["volumeMounts"],
            json!([{"name": "config", "mountPath": "/etc/app"}, {"name": "cache", "mountPath": "/cache"}])
        );
        assert!(
            spec["containers"][1].get("volumeMounts").is_none(),
            "{spec}"
        );
        assert!(
            spec["initContainers"][0].get("volumeMounts").is_none(),
            "{spec}"
        );
        assert_eq!(spec["containers"][1]["image"], "i2");
        // A user volume that only looks like the token volume stays.
        let lookalike = pod(json!({"metadata": {"name": "p"}, "spec": {"containers": [],
            "volumes": [{"name": "kube-api-access-mine", "configMap": {"name": "c"}}]}}));
        assert_eq!(
            target_pod(&lookalike, &self::spec(&[], &[]))
                .spec
                .unwrap()
                .volumes
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn target_names_fit_in_63_characters() {
        assert_eq!(target_pod_name("web", "web-1a2b3c4d"), "web-1a2b3c4d");
        assert_eq!(
            target_pod_name("web-7f9c-xk2p", "web-1a2b3c4d"),
            "web-7f9c-xk2p-1a2b3c4d"
        );
        assert_eq!(
            target_pod_name("web", "long-0123456789abcdef"),
            "web-89abcdef"
        );
        let long = "a".repeat(60) + "-b";
        let name = target_pod_name(&long, "x-1a2b3c4d");
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("a-1a2b3c4d"), "{name}");
        // A cut that ends on '-' is trimmed.
        let dashed = "a".repeat(53) + "-" + &"b".repeat(20);
        assert_eq!(
            target_pod_name(&dashed, "x-1a2b3c4d"),
            "a".repeat(53) + "-1a2b3c4d"
        );
        // An ID without a usable last part still gives a stable suffix.
        let hashed = target_pod_name("web", "X_Y-");
        assert_eq!(hashed.len(), "web-".len() + 8);
        assert_eq!(hashed, target_pod_name("web", "X_Y-"));
    }
    #[test]
    fn readiness_reads_the_ready_condition_and_fatal_reasons() {
        let with =
            |status: Value| readiness(&pod(json!({"metadata": {"name": "p"}, "status": status})));
        assert_eq!(
            with(json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]})),
            Readiness::Ready
        );
        assert_eq!(
            with(
                json!({"phase": "Pending", "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
                "containerStatuses": [{"name": "app", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "ContainerCreating"}}}]})
            ),
            Readiness::Starting(
                "phase Pending, Ready=False (ContainersNotReady), app waiting (ContainerCreating)"
                    .into()
            )
        );
        assert_eq!(
            with(
                json!({"phase": "Pending", "containerStatuses": [{"name": "app", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "CreateContainerError", "message": "restore failed"}}}]})
            ),
            Readiness::Failed {
                reason: "CreateContainerError".into(),
                message: "container app: restore failed".into()
            }
        );
        assert_eq!(
            with(
                json!({"phase": "Failed", "reason": "NodeAffinity", "message": "Predicate NodeAffinity failed"})
            ),
            Readiness::Failed {
                reason: "NodeAffinity".into(),
                message: "Predicate NodeAffinity failed".into()
            }
        );
        assert_eq!(
            readiness(&pod(json!({"metadata": {"name": "p"}}))),
            Readiness::Starting("no status yet".into())
        );
    }
}
