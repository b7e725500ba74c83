//! The Kubernetes side of a Pod migration ([`engine::cluster`]) against the fake API server:
//! the exact requests a migration makes (paths, order, bodies), the refusals that stop it before
//! anything is created, and the rollback at each failure point. The daemon part is a recording
//! fake of [`CheckpointImages`] (the daemons are tested elsewhere).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use e2e::fake_apiserver::{pod_path, FakeApiServer, PodReaction};
use engine::cluster::{
    self, CheckpointImages, ClusterError, MigrateOptions, Outcome, Phase, PodPlan, Progress,
    Request, SourceRemoval,
};
use engine::pod::{Ownership, Refusal};
use serde_json::{json, Value};

const NS: &str = "shop";
const ID: &str = "mig-1a2b3c4d";
const TARGET: &str = "web-1a2b3c4d";
const RS_POD: &str = "web-7f9c-xk2p";
const RS_TARGET: &str = "web-7f9c-xk2p-1a2b3c4d";
const DAEMONS: &str = "/api/v1/namespaces/migrate/pods";
const PODS: &str = "/api/v1/namespaces/shop/pods";

/// The daemon part: records its calls; makes `localhost/checkpoint-<container>:<id>` images.
#[derive(Debug, Default)]
struct FakeImages {
    fail: Option<String>,
    calls: Mutex<Vec<String>>,
}

impl FakeImages {
    fn failing(message: &str) -> Self {
        FakeImages {
            fail: Some(message.into()),
            calls: Mutex::default(),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl CheckpointImages for FakeImages {
    async fn prepare(
        &self,
        plan: &PodPlan,
        migration_id: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        self.calls.lock().unwrap().push(format!(
            "prepare {migration_id} {}/{} {}->{} [{}]",
            plan.namespace,
            plan.pod_name(),
            plan.from,
            plan.to,
            plan.containers.join(",")
        ));
        match &self.fail {
            Some(message) => Err(message.clone()),
            None => Ok(plan
                .containers
                .iter()
                .map(|c| {
                    (
                        c.clone(),
                        format!("localhost/checkpoint-{c}:{migration_id}"),
                    )
                })
                .collect()),
        }
    }

    async fn discard(&self, _plan: &PodPlan, migration_id: &str) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("discard {migration_id}"));
    }
}

fn ready_node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {"conditions": [
            {"type": "MemoryPressure", "status": "False"},
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"}]}})
}

fn daemon(node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("migrate-daemon-{node}"), "namespace": "migrate",
                     "labels": {"app.kubernetes.io/name": "migrate-daemon"}},
        "spec": {"nodeName": node, "containers": [{"name": "daemon", "image": "migrate:dev"}]},
        "status": {"phase": "Running", "podIP": format!("10.0.0.{}", node.len())}})
}

fn running_ready() -> Value {
    json!({"phase": "Running", "podIP": "10.244.0.7",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "app", "image": "nginx:1.27", "imageID": "", "ready": true,
                               "restartCount": 0, "state": {"running": {}}}]})
}

/// The source Pod `web` on node-a: one container, a configMap, an emptyDir and the generated
/// token volume.
fn source_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": NS, "labels": {"app": "web"},
                     "annotations": {"team": "checkout"}},
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": "app", "image": "nginx:1.27", "imagePullPolicy": "IfNotPresent",
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/nginx/conf.d"},
                    {"name": "cache", "mountPath": "/var/cache/nginx"},
                    {"name": "kube-api-access-4x9zq", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]}],
            "volumes": [
                {"name": "config", "configMap": {"name": "web-config"}},
                {"name": "cache", "emptyDir": {}},
                {"name": "kube-api-access-4x9zq", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}]},
        "status": running_ready()})
}

/// A cluster of node-a and node-b, each with a daemon; `pod` seeded in it.
async fn cluster(pod: Value) -> (FakeApiServer, kube::Client) {
    let server = FakeApiServer::start().await.unwrap();
    for node in ["node-a", "node-b"] {
        server.seed(ready_node(node));
        server.seed(daemon(node));
    }
    server.seed(pod);
    let config = kube::Config::new(server.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    (server, client)
}

fn options(ready_timeout: Duration) -> MigrateOptions {
    MigrateOptions {
        migration_id: ID.into(),
        now: "2025-06-01T12:00:00Z".into(),
        ready_timeout,
        handover_timeout: Duration::from_secs(2),
        poll_interval: Duration::from_millis(50),
    }
}

fn request(pod: &str) -> Request {
    Request::new(NS, pod, "node-a", "node-b")
}

/// What the CLI does: preflight, then migrate; with the progress events heard.
async fn run(
    client: &kube::Client,
    req: &Request,
    images: &FakeImages,
    opts: &MigrateOptions,
) -> (Result<Outcome, ClusterError>, Vec<Progress>) {
    let plan = match cluster::preflight(client, req).await {
        Ok(plan) => plan,
        Err(e) => return (Err(e), Vec::new()),
    };
    let mut events = Vec::new();
    let result = cluster::migrate(client, &plan, images, opts, |p| events.push(p)).await;
    (result, events)
}

fn lines(server: &FakeApiServer) -> Vec<String> {
    server.lines()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The requests of a preflight that gets past the target node checks.
fn preflight_lines(pod: &str) -> Vec<String> {
    vec![
        format!("GET {PODS}/{pod}"),
        "GET /api/v1/nodes/node-b".into(),
        format!("GET {DAEMONS}"),
        format!("GET {DAEMONS}"),
    ]
}

fn body_of(server: &FakeApiServer, method: &str, path: &str) -> Value {
    let found: Vec<Value> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == method && r.path == path)
        .filter_map(|r| r.body)
        .collect();
    assert_eq!(found.len(), 1, "one {method} {path} with a body");
    found[0].clone()
}

#[tokio::test]
async fn bare_pod_moves_and_the_source_is_deleted_after_ready() {
    let (server, client) = cluster(source_pod()).await;
    server.on_pod_create(PodReaction::ReadyAfterGets(3));
    let images = FakeImages::default();
    let (result, events) = run(
        &client,
        &request("web"),
        &images,
        &options(Duration::from_secs(2)),
    )
    .await;
    let outcome = result.unwrap();

    let mut expected = preflight_lines("web");
    expected.push(format!("POST {PODS}"));
    expected.extend(std::iter::repeat_n(format!("GET {PODS}/{TARGET}"), 3));
    expected.push(format!("DELETE {PODS}/web"));
    assert_eq!(lines(&server), expected);

    let requests = server.requests();
    assert_eq!(
        requests[2].param("labelSelector"),
        Some("app.kubernetes.io/name=migrate-daemon")
    );
    assert_eq!(
        requests[2].param("fieldSelector"),
        Some("spec.nodeName=node-a")
    );
    assert_eq!(
        requests[3].param("fieldSelector"),
        Some("spec.nodeName=node-b")
    );
    assert_eq!(
        requests[4].content_type.as_deref(),
        Some("application/json")
    );

    let posted = body_of(&server, "POST", PODS);
    assert_eq!(posted["metadata"]["name"], TARGET);
    assert_eq!(posted["metadata"]["namespace"], NS);
    assert_eq!(posted["metadata"]["labels"], json!({"app": "web"}));
    assert_eq!(
        posted["metadata"]["annotations"],
        json!({"team": "checkout", "migrate.dev/migration-id": ID, "migrate.dev/source-node": "node-a",
               "migrate.dev/source-pod": "web", "migrate.dev/migrated-at": "2025-06-01T12:00:00Z"})
    );
    for absent in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "ownerReferences",
    ] {
        assert!(
            posted["metadata"].get(absent).is_none(),
            "{absent} in {posted}"
        );
    }
    assert!(posted.get("status").is_none(), "{posted}");
    let spec = &posted["spec"];
    assert_eq!(spec["nodeName"], "node-b");
    assert_eq!(
        spec["containers"][0]["image"],
        format!("localhost/checkpoint-app:{ID}")
    );
    assert_eq!(spec["containers"][0]["imagePullPolicy"], "Never");
    assert_eq!(
        spec["volumes"],
        json!([{"name": "config", "configMap": {"name": "web-config"}}, {"name": "cache", "emptyDir": {}}])
    );
    assert_eq!(
        spec["containers"][0]["volumeMounts"],
        json!([{"name": "config", "mountPath": "/etc/nginx/conf.d"}, {"name": "cache", "mountPath": "/var/cache/nginx"}])
    );

    assert_eq!(
        outcome,
        Outcome {
            target_pod: TARGET.into(),
            target_node: "node-b".into(),
            images: BTreeMap::from([("app".to_string(), format!("localhost/checkpoint-app:{ID}"))]),
            source: SourceRemoval::Deleted,
            ready_after: outcome.ready_after,
            warnings: vec!["emptyDir volume cache starts empty on the target node: its contents are not carried".into()],
        }
    );
    assert_eq!(
        images.calls(),
        [format!("prepare {ID} shop/web node-a->node-b [app]")]
    );
    assert!(server.pod(NS, "web").is_none());
    assert_eq!(
        server.pod(NS, TARGET).unwrap()["status"]["phase"],
        "Running"
    );
    // Two polls saw it starting, then Ready, then the source went.
    let starting = events
        .iter()
        .filter(|e| matches!(e, Progress::Starting { .. }))
        .count();
    assert_eq!(starting, 2, "{events:?}");
    assert!(
        matches!(events.last(), Some(Progress::DeletingSource)),
        "{events:?}"
    );
}

fn replicaset() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "web-7f9c", "namespace": NS, "uid": "rs-uid-1",
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "d-1", "controller": true}]},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web", "pod-template-hash": "7f9c"}},
                 "template": {"metadata": {"labels": {"app": "web", "pod-template-hash": "7f9c"}}}}})
}

fn replicaset_pod() -> Value {
    let mut pod = source_pod();
    pod["metadata"]["name"] = json!(RS_POD);
    pod["metadata"]["labels"] = json!({"app": "web", "pod-template-hash": "7f9c", "tier": "front"});
    pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": "web-7f9c", "uid": "rs-uid-1", "controller": true, "blockOwnerDeletion": true}]);
    pod
}

#[tokio::test]
async fn replicaset_pod_is_handed_over_and_the_replicaset_deletes_the_source() {
    let (server, client) = cluster(replicaset_pod()).await;
    server.seed(replicaset());
    let images = FakeImages::default();
    let (result, _) = run(
        &client,
        &request(RS_POD),
        &images,
        &options(Duration::from_secs(2)),
    )
    .await;
    let outcome = result.unwrap();
    assert_eq!(
        outcome.source,
        SourceRemoval::ByReplicaSet {
            replicaset: "web-7f9c".into()
        }
    );
    assert_eq!(outcome.target_pod, RS_TARGET);

    let mut expected = preflight_lines(RS_POD);
    expected.extend([
        format!("GET /apis/apps/v1/namespaces/{NS}/replicasets/web-7f9c"),
        format!("POST {PODS}"),
        format!("GET {PODS}/{RS_TARGET}"),
        format!("PATCH {PODS}/{RS_POD}"),
        format!("PATCH {PODS}/{RS_TARGET}"),
        format!("GET {PODS}/{RS_POD}"),
    ]);
    assert_eq!(lines(&server), expected);

    // Created without the selector's labels, so the ReplicaSet ignores it while it starts.
    let posted = body_of(&server, "POST", PODS);
    assert_eq!(posted["metadata"]["labels"], json!({"tier": "front"}));
    assert!(
        posted["metadata"].get("ownerReferences").is_none(),
        "{posted}"
    );
    // First the source's deletion cost, then the labels on the new Pod.
    let requests = server.requests();
    let patches: Vec<_> = requests.iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches[0].path, format!("{PODS}/{RS_POD}"));
    assert_eq!(
        patches[0].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        patches[0].body,
        Some(
            json!({"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-2147483648"}}})
        )
    );
    assert_eq!(patches[1].path, format!("{PODS}/{RS_TARGET}"));
    assert_eq!(
        patches[1].body,
        Some(json!({"metadata": {"labels": {"app": "web", "pod-template-hash": "7f9c"}}}))
    );
    // The ReplicaSet deleted the source, not the new Pod, which it now owns.
    assert_eq!(server.controller_deletions(), [format!("{PODS}/{RS_POD}")]);
    assert_eq!(server.pod_names(NS), [RS_TARGET]);
    let target = server.pod(NS, RS_TARGET).unwrap();
    assert_eq!(target["metadata"]["ownerReferences"][0]["uid"], "rs-uid-1");
    assert_eq!(
        target["metadata"]["labels"],
        json!({"app": "web", "pod-template-hash": "7f9c", "tier": "front"})
    );
    assert!(
        images.calls().iter().all(|c| !c.starts_with("discard")),
        "{:?}",
        images.calls()
    );
}

fn two_containers() -> Value {
    let mut pod = source_pod();
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "sidecar", "image": "envoyproxy/envoy:v1.31"}));
    pod
}

#[tokio::test]
async fn every_container_of_a_multi_container_pod_is_replaced() {
    let (server, client) = cluster(two_containers()).await;
    let images = FakeImages::default();
    let (result, _) = run(
        &client,
        &request("web"),
        &images,
        &options(Duration::from_secs(2)),
    )
    .await;
    assert_eq!(result.unwrap().images.len(), 2);
    let posted = body_of(&server, "POST", PODS);
    let containers = &posted["spec"]["containers"];
    assert_eq!(
        containers[0]["image"],
        format!("localhost/checkpoint-app:{ID}")
    );
    assert_eq!(
        containers[1]["image"],
        format!("localhost/checkpoint-sidecar:{ID}")
    );
    assert_eq!(containers[1]["imagePullPolicy"], "Never");
    assert_eq!(
        images.calls(),
        [format!(
            "prepare {ID} shop/web node-a->node-b [app,sidecar]"
        )]
    );
}

#[tokio::test]
async fn a_container_subset_replaces_only_those_images() {
    let (server, client) = cluster(two_containers()).await;
    let images = FakeImages::default();
    let mut req = request("web");
    req.containers = Some(vec!["sidecar".into()]);
    let (result, _) = run(&client, &req, &images, &options(Duration::from_secs(2))).await;
    assert_eq!(
        result.unwrap().images,
        BTreeMap::from([(
            "sidecar".to_string(),
            format!("localhost/checkpoint-sidecar:{ID}")
        )])
    );
    let posted = body_of(&server, "POST", PODS);
    let containers = &posted["spec"]["containers"];
    assert_eq!(containers[0]["image"], "nginx:1.27");
    assert_eq!(containers[0]["imagePullPolicy"], "IfNotPresent");
    assert_eq!(
        containers[1]["image"],
        format!("localhost/checkpoint-sidecar:{ID}")
    );
    assert_eq!(
        images.calls(),
        [format!("prepare {ID} shop/web node-a->node-b [sidecar]")]
    );
}

/// Runs a migration that preflight must refuse; asserts nothing was created or deleted and the
/// daemons were never asked. Returns the error and the requests seen.
async fn refused(
    server: &FakeApiServer,
    client: &kube::Client,
    req: &Request,
) -> (ClusterError, Vec<String>) {
    let images = FakeImages::default();
    let (result, _) = run(client, req, &images, &options(Duration::from_secs(2))).await;
    let err = result.unwrap_err();
    let seen = lines(server);
    assert!(seen.iter().all(|l| l.starts_with("GET ")), "{seen:?}");
    assert!(images.calls().is_empty(), "{:?}", images.calls());
    (err, seen)
}

fn owned_by(kind: &str, name: &str) -> Value {
    let mut pod = source_pod();
    pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind, "name": name,
                                                 "uid": "o-1", "controller": true}]);
    pod
}

#[tokio::test]
async fn statefulset_and_daemonset_pods_are_refused() {
    for (kind, reason) in [
        ("StatefulSet", Refusal::StatefulSet { name: "db".into() }),
        ("DaemonSet", Refusal::DaemonSet { name: "db".into() }),
    ] {
        let (server, client) = cluster(owned_by(kind, "db")).await;
        let (err, seen) = refused(&server, &client, &request("web")).await;
        assert!(
            matches!(&err, ClusterError::Refused { pod, reason: r } if pod == "shop/web" && *r == reason),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with(&format!(
                "cannot migrate Pod shop/web: it belongs to {kind} db"
            )),
            "{err}"
        );
        assert_eq!(seen, [format!("GET {PODS}/web")]);
    }
}

#[tokio::test]
async fn mirror_pods_are_refused() {
    let mut pod = source_pod();
    pod["metadata"]["annotations"] =
        json!({"kubernetes.io/config.mirror": "0f3c", "kubernetes.io/config.source": "file"});
    let (server, client) = cluster(pod).await;
    let (err, _) = refused(&server, &client, &request("web")).await;
    assert!(
        matches!(
            &err,
            ClusterError::Refused {
                reason: Refusal::Static { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("static Pod"), "{err}");
}

#[tokio::test]
async fn host_path_volumes_are_refused() {
    let mut pod = source_pod();
    pod["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "logs", "hostPath": {"path": "/var/log/web"}}));
    let (server, client) = cluster(pod).await;
    let (err, _) = refused(&server, &client, &request("web")).await;
    assert!(
        err.to_string()
            .contains("volume logs is a hostPath volume (/var/log/web)"),
        "{err}"
    );
}

#[tokio::test]
async fn claims_bound_to_a_local_volume_are_refused() {
    let mut pod = source_pod();
    pod["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "data", "persistentVolumeClaim": {"claimName": "web-data"}}));
    let (server, client) = cluster(pod).await;
    server.seed(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "web-data", "namespace": NS}, "spec": {"volumeName": "local-pv-1"},
        "status": {"phase": "Bound"}}));
    server.seed(json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "local-pv-1"},
        "spec": {"local": {"path": "/mnt/disks/ssd1"}, "capacity": {"storage": "10Gi"},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]}]}]}}}}));
    let (err, seen) = refused(&server, &client, &request("web")).await;
    let mut expected = preflight_lines("web");
    expected.extend([
        format!("GET /api/v1/namespaces/{NS}/persistentvolumeclaims/web-data"),
        "GET /api/v1/persistentvolumes/local-pv-1".into(),
    ]);
    assert_eq!(seen, expected);
    assert!(
        err.to_string().contains(
            "volume data uses PersistentVolumeClaim web-data, bound to PersistentVolume local-pv-1, \
             which is a local volume (/mnt/disks/ssd1)"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_pod_on_another_node_is_refused_naming_that_node() {
    let mut pod = source_pod();
    pod["spec"]["nodeName"] = json!("node-c");
    let (server, client) = cluster(pod).await;
    let (err, _) = refused(&server, &client, &request("web")).await;
    assert!(
        matches!(&err, ClusterError::WrongNode { actual, .. } if actual == "node node-c"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("runs on node node-c, not on node node-a"),
        "{err}"
    );
}

#[tokio::test]
async fn a_target_node_that_is_not_ready_is_refused() {
    let (server, client) = cluster(source_pod()).await;
    let mut node = ready_node("node-b");
    node["status"]["conditions"][1] = json!({"type": "Ready", "status": "False", "reason": "KubeletNotReady",
        "message": "container runtime network not ready"});
    server.seed(node);
    let (err, seen) = refused(&server, &client, &request("web")).await;
    assert_eq!(
        seen,
        [format!("GET {PODS}/web"), "GET /api/v1/nodes/node-b".into()]
    );
    assert_eq!(
        err.to_string(),
        "target node node-b is not Ready (Ready=False, reason KubeletNotReady: container runtime \
         network not ready): check `kubectl describe node node-b`"
    );
}

#[tokio::test]
async fn a_cordoned_target_node_is_refused() {
    let (server, client) = cluster(source_pod()).await;
    let mut node = ready_node("node-b");
    node["spec"]["unschedulable"] = json!(true);
    server.seed(node);
    let (err, _) = refused(&server, &client, &request("web")).await;
    assert!(
        matches!(&err, ClusterError::Cordoned { node } if node == "node-b"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("cordoned (spec.unschedulable)"),
        "{err}"
    );
}

#[tokio::test]
async fn a_target_without_a_daemon_is_refused() {
    let (server, client) = cluster(source_pod()).await;
    let mut pending = daemon("node-b");
    pending["status"]["phase"] = json!("Pending");
    server.seed(pending);
    let (err, seen) = refused(&server, &client, &request("web")).await;
    assert_eq!(seen, preflight_lines("web"));
    assert!(
        matches!(&err, ClusterError::NoDaemon { node, .. } if node == "node-b"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(
            "check `kubectl -n migrate get pods -o wide -l app.kubernetes.io/name=migrate-daemon`"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_containers_are_refused_by_name() {
    let (server, client) = cluster(source_pod()).await;
    let mut req = request("web");
    req.containers = Some(vec!["app".into(), "worker".into()]);
    let (err, _) = refused(&server, &client, &req).await;
    assert_eq!(
        err.to_string(),
        "Pod shop/web has no container named worker; its containers are app"
    );
}

fn phase_and_cause(err: &ClusterError) -> (Phase, &ClusterError) {
    match err {
        ClusterError::Failed { phase, cause, .. } => (*phase, cause),
        other => panic!("not a rolled-back failure: {other:?}"),
    }
}

#[tokio::test]
async fn a_failed_prepare_creates_nothing_and_discards_partial_images() {
    let (server, client) = cluster(source_pod()).await;
    let images = FakeImages::failing("kubelet on node-a: checkpointing container app failed");
    let (result, _) = run(
        &client,
        &request("web"),
        &images,
        &options(Duration::from_secs(2)),
    )
    .await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            phase_and_cause(&err),
            (Phase::Prepare, ClusterError::Prepare { .. })
        ),
        "{err:?}"
    );
    assert_eq!(lines(&server), preflight_lines("web"));
    // prepare may have imported some images before failing: discard runs anyway.
    assert_eq!(images.calls()[1..], [format!("discard {ID}")]);
    assert!(
        err.to_string()
            .contains("the source Pod was left untouched"),
        "{err}"
    );
    assert!(server.pod(NS, "web").is_some());
}

#[tokio::test]
async fn a_forbidden_create_names_the_permission_and_discards_the_images() {
    let (server, client) = cluster(source_pod()).await;
    server.fail_once(
        "POST",
        PODS,
        403,
        "Forbidden",
        "pods is forbidden: User \"alice\" cannot create resource \"pods\" in API group \"\" in the namespace \"shop\"",
    );
    let images = FakeImages::default();
    let (result, _) = run(
        &client,
        &request("web"),
        &images,
        &options(Duration::from_secs(2)),
    )
    .await;
    let err = result.unwrap_err();
    let (phase, cause) = phase_and_cause(&err);
    assert_eq!(phase, Phase::Create);
    assert!(
        matches!(
            cause,
            ClusterError::Forbidden {
                verb: "create",
                resource: "pods",
                ..
            }
        ),
        "{cause:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(
            "failed while creating the new Pod: cannot create pods (shop/web-1a2b3c4d): forbidden"
        ),
        "{message}"
    );
    assert!(
        message.contains("kubectl auth can-i create pods -n shop"),
        "{message}"
    );
    let mut expected = preflight_lines("web");
    expected.push(format!("POST {PODS}"));
    assert_eq!(lines(&server), expected, "no DELETE of anything");
    assert_eq!(images.calls().last().unwrap(), &format!("discard {ID}"));
    assert!(server.pod(NS, "web").is_some());
}

#[tokio::test]
async fn a_pod_never_ready_is_deleted_when_the_deadline_passes() {
    let (server, client) = cluster(source_pod()).await;
    server.on_pod_create(PodReaction::NeverReady);
    let images = FakeImages::default();
    let (result, _) = run(
        &client,
        &request("web"),
        &images,
        &options(Duration::from_millis(300)),
    )
    .await;
    let err = result.unwrap_err();
    let (phase, cause) = phase_and_cause(&err);
    assert_eq!(phase, Phase::WaitReady);
    assert!(
        matches!(cause, ClusterError::ReadyTimeout { state, .. } if state.contains("Ready=False (ContainersNotReady)")),
        "{cause:?}"
    );
    let seen = lines(&server);
    let polls = seen
        .iter()
        .filter(|l| **l == format!("GET {PODS}/{TARGET}"))
        .count();
    assert!(polls >= 2, "{seen:?}");
    assert_eq!(seen.last().unwrap(), &format!("DELETE {PODS}/{TARGET}"));
    assert!(!seen.contains(&format!("DELETE {PODS}/web")), "{seen:?}");
    assert!(!seen.iter().any(|l| l.starts_with("PATCH")), "{seen:?}");
    assert_eq!(images.calls().last().unwrap(), &format!("discard {ID}"));
    assert_eq!(server.pod_names(NS), ["web"]);
    assert!(
        err.to_string()
            .contains(&format!("rolled back: deleted the new Pod shop/{TARGET}")),
        "{err}"
    );
}

#[tokio::test]
async fn a_restore_error_fails_at_the_first_poll_with_its_reason() {
    let (server, client) = cluster(source_pod()).await;
    server.on_pod_create(PodReaction::ContainersWaiting {
        reason: "CreateContainerError".into(),
        message: "failed to restore container app: bind mount /data missing".into(),
    });
    let images = FakeImages::default();
    // A deadline far away: the failure must come from the status, not the clock.
    let (result, _) = run(
        &client,
        &request("web"),
        &images,
        &options(Duration::from_secs(600)),
    )
    .await;
    let err = result.unwrap_err();
    let (phase, cause) = phase_and_cause(&err);
    assert_eq!(phase, Phase::WaitReady);
    assert!(
        matches!(cause, ClusterError::TargetFailed { reason, .. } if reason == "CreateContainerError"),
        "{cause:?}"
    );
    assert!(
        err.to_string()
            .contains("container app: failed to restore container app: bind mount /data missing"),
        "{err}"
    );
    let mut expected = preflight_lines("web");
    expected.extend([
        format!("POST {PODS}"),
        format!("GET {PODS}/{TARGET}"),
        format!("DELETE {PODS}/{TARGET}"),
    ]);
    assert_eq!(lines(&server), expected);
    assert_eq!(images.calls().last().unwrap(), &format!("discard {ID}"));
}

#[tokio::test]
async fn a_failed_source_delete_rolls_back_the_new_pod() {
    let (server, client) = cluster(source_pod()).await;
    server.fail_once(
        "DELETE",
        &pod_path(NS, "web"),
        403,
        "Forbidden",
        "pods \"web\" is forbidden",
    );
    let images = FakeImages::default();
    let (result, _) = run(
        &client,
        &request("web"),
        &images,
        &options(Duration::from_secs(2)),
    )
    .await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            phase_and_cause(&err),
            (
                Phase::DeleteSource,
                ClusterError::Forbidden { verb: "delete", .. }
            )
        ),
        "{err:?}"
    );
    assert_eq!(
        lines(&server).last().unwrap(),
        &format!("DELETE {PODS}/{TARGET}")
    );
    assert_eq!(server.pod_names(NS), ["web"]);
}

#[tokio::test]
async fn a_failed_label_patch_deletes_the_new_pod_and_reverts_the_deletion_cost() {
    let (server, client) = cluster(replicaset_pod()).await;
    server.seed(replicaset());
    server.fail_once(
        "PATCH",
        &pod_path(NS, RS_TARGET),
        422,
        "Invalid",
        "metadata.labels: Invalid value",
    );
    let images = FakeImages::default();
    let (result, _) = run(
        &client,
        &request(RS_POD),
        &images,
        &options(Duration::from_secs(2)),
    )
    .await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            phase_and_cause(&err),
            (Phase::HandOver, ClusterError::Api { verb: "patch", .. })
        ),
        "{err:?}"
    );

    let seen = lines(&server);
    let tail = &seen[seen.len() - 4..];
    assert_eq!(
        strs(tail),
        [
            format!("PATCH {PODS}/{RS_POD}").as_str(),
            &format!("PATCH {PODS}/{RS_TARGET}"),
            &format!("DELETE {PODS}/{RS_TARGET}"),
            &format!("PATCH {PODS}/{RS_POD}"),
        ]
    );
    let revert = server.requests().pop().unwrap();
    assert_eq!(
        revert.body,
        Some(
            json!({"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": null}}})
        )
    );
    let source = server.pod(NS, RS_POD).unwrap();
    assert_eq!(
        source["metadata"]["annotations"],
        json!({"team": "checkout"})
    );
    assert_eq!(server.pod_names(NS), [RS_POD]);
    assert!(server.controller_deletions().is_empty());
    assert_eq!(images.calls().last().unwrap(), &format!("discard {ID}"));
    let message = err.to_string();
    assert!(
        message.contains(
            "reverted the deletion cost of the source Pod; the source Pod was left untouched"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn preflight_plans_a_replicaset_pod_with_its_selector_keys() {
    let (server, client) = cluster(replicaset_pod()).await;
    server.seed(replicaset());
    let plan = cluster::preflight(&client, &request(RS_POD)).await.unwrap();
    assert_eq!(
        plan.ownership,
        Ownership::ReplicaSet {
            name: "web-7f9c".into()
        }
    );
    assert_eq!(plan.withheld_labels, ["app", "pod-template-hash"]);
    assert_eq!(plan.containers, ["app"]);
    assert_eq!(plan.source_daemon.name, "migrate-daemon-node-a");
    assert_eq!(plan.target_daemon.name, "migrate-daemon-node-b");
    assert_eq!(plan.target_daemon.ip.as_deref(), Some("10.0.0.6"));
}

#[tokio::test]
async fn a_replicaset_that_keeps_the_source_is_reported_without_rollback() {
    let (server, client) = cluster(replicaset_pod()).await;
    // Two replicas: it adopts the new Pod and has no excess to delete.
    let mut rs = replicaset();
    rs["spec"]["replicas"] = json!(2);
    server.seed(rs);
    let images = FakeImages::default();
    let mut opts = options(Duration::from_secs(2));
    opts.handover_timeout = Duration::from_millis(300);
    let (result, _) = run(&client, &request(RS_POD), &images, &opts).await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, ClusterError::SourceStillRunning { replicaset, .. } if replicaset == "web-7f9c"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("both run now"), "{message}");
    assert!(
        message.contains(&format!("kubectl -n shop delete pod {RS_POD}")),
        "{message}"
    );
    let seen = lines(&server);
    assert!(!seen.iter().any(|l| l.starts_with("DELETE")), "{seen:?}");
    assert!(
        seen.ends_with(&[
            format!("GET {PODS}/{RS_POD}"),
            format!("GET {PODS}/{RS_TARGET}")
        ]),
        "{seen:?}"
    );
    assert!(
        images.calls().iter().all(|c| !c.starts_with("discard")),
        "{:?}",
        images.calls()
    );
    let mut names = server.pod_names(NS);
    names.sort();
    assert_eq!(names, [RS_POD, RS_TARGET]);
    assert_eq!(
        server.pod(NS, RS_TARGET).unwrap()["metadata"]["ownerReferences"][0]["name"],
        "web-7f9c"
    );
}

#[tokio::test]
async fn a_replicaset_that_deletes_the_new_pod_fails_and_restores_the_previous_cost() {
    // The source already has the lowest cost: a tie, and the controller deletes the newest Pod.
    let mut pod = replicaset_pod();
    pod["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] =
        json!("-2147483648");
    let (server, client) = cluster(pod).await;
    server.seed(replicaset());
    let images = FakeImages::default();
    let (result, _) = run(
        &client,
        &request(RS_POD),
        &images,
        &options(Duration::from_secs(2)),
    )
    .await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            phase_and_cause(&err),
            (Phase::HandOver, ClusterError::TargetGone { .. })
        ),
        "{err:?}"
    );
    assert_eq!(
        server.controller_deletions(),
        [format!("{PODS}/{RS_TARGET}")]
    );
    let seen = lines(&server);
    // No DELETE: the ReplicaSet already removed the new Pod.
    assert!(!seen.iter().any(|l| l.starts_with("DELETE")), "{seen:?}");
    let revert = server.requests().pop().unwrap();
    assert_eq!(revert.line(), format!("PATCH {PODS}/{RS_POD}"));
    assert_eq!(
        revert.body,
        Some(
            json!({"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-2147483648"}}})
        )
    );
    assert_eq!(server.pod_names(NS), [RS_POD]);
    assert_eq!(images.calls().last().unwrap(), &format!("discard {ID}"));
}

#[tokio::test]
async fn a_kubelet_hook_sees_the_created_pod_and_its_result_decides() {
    let (server, client) = cluster(source_pod()).await;
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    server.on_pod_create_run(std::sync::Arc::new(move |pod: &Value| {
        record
            .lock()
            .unwrap()
            .push(pod["spec"]["containers"][0]["image"].clone());
        Ok(())
    }));
    let images = FakeImages::default();
    let (result, _) = run(
        &client,
        &request("web"),
        &images,
        &options(Duration::from_secs(5)),
    )
    .await;
    assert_eq!(result.unwrap().target_pod, TARGET);
    assert_eq!(
        *seen.lock().unwrap(),
        [json!(format!("localhost/checkpoint-app:{ID}"))]
    );

    let (server, client) = cluster(source_pod()).await;
    server.on_pod_create_run(std::sync::Arc::new(|_: &Value| {
        Err("restore: CRIU failed".to_string())
    }));
    let (result, _) = run(
        &client,
        &request("web"),
        &images,
        &options(Duration::from_secs(5)),
    )
    .await;
    let err = result.unwrap_err();
    assert!(
        matches!(phase_and_cause(&err), (Phase::WaitReady, ClusterError::TargetFailed { reason, message, .. })
            if reason == "CreateContainerError" && message == "container app: restore: CRIU failed"),
        "{err:?}"
    );
    assert_eq!(server.pod_names(NS), ["web"]);
}
