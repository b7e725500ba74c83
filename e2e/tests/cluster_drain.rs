//! Draining a Kubernetes node by migration ([`engine::drain`]) against the fake API server:
//! target selection as the scheduler filters (no IO), a drain of a node with Pods of every kind
//! (the cordon first, the movable Pods migrated to the chosen targets, the others reported,
//! no uncordon), `--evict-rest` (Evictions, a PodDisruptionBudget's 429), and the watch mode
//! driven one pass at a time: a Node annotation, a Node taint, our Cluster API pre-drain hook,
//! someone else's hook. The daemon part is a recording fake of [`CheckpointImages`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use e2e::fake_apiserver::{daemon_pod, machine_path, node_object, node_path, FakeApiServer};
use engine::cluster::{CheckpointImages, PodPlan};
use engine::drain::{
    choose_target, drain, DrainEvent, DrainOptions, DrainReport, Eviction, Mark, PodResult,
    Watcher, MACHINE_HOOK,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};

const OTHER_HOOK: &str = "pre-drain.delete.hook.machine.cluster.x-k8s.io/backup";

/// The daemon part: records its calls; makes `localhost/checkpoint-<container>:<id>` images,
/// or fails for the Pods named in `fail_for`.
#[derive(Debug, Default)]
struct FakeImages {
    fail_for: Vec<String>,
    calls: Mutex<Vec<String>>,
}

impl FakeImages {
    fn calls(&self) -> Vec<String> {
        let mut calls = self.calls.lock().unwrap().clone();
        calls.sort();
        calls
    }
}

/// One Pod's view of the shared recorder (what `images_for` returns).
struct PodImages<'a>(&'a FakeImages);

impl CheckpointImages for PodImages<'_> {
    async fn prepare(
        &self,
        plan: &PodPlan,
        migration_id: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        self.0.calls.lock().unwrap().push(format!(
            "prepare {}/{} {}->{}",
            plan.namespace,
            plan.pod_name(),
            plan.from,
            plan.to
        ));
        if self.0.fail_for.iter().any(|p| p == plan.pod_name()) {
            return Err("the kubelet refused the checkpoint: ContainerCheckpoint is off".into());
        }
        Ok(plan
            .containers
            .iter()
            .map(|c| {
                (
                    c.clone(),
                    format!("localhost/checkpoint-{c}:{migration_id}"),
                )
            })
            .collect())
    }

    async fn discard(&self, plan: &PodPlan, _migration_id: &str) {
        self.0.calls.lock().unwrap().push(format!(
            "discard {}/{}",
            plan.namespace,
            plan.pod_name()
        ));
    }
}

// ----- objects ------------------------------------------------------------------------------

fn running() -> Value {
    json!({"phase": "Running", "podIP": "10.244.0.7",
        "conditions": [{"type": "Ready", "status": "True"}]})
}

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "nginx:1.27",
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]},
        "status": running()})
}

fn owned(mut p: Value, kind: &str, owner: &str) -> Value {
    p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind,
        "name": owner, "uid": format!("{owner}-uid"), "controller": true}]);
    p
}

fn replicaset() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "api-7f9c", "namespace": "shop", "uid": "api-7f9c-uid"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}}}}})
}

fn mirror(node: &str) -> Value {
    let mut p = pod("kube-system", &format!("etcd-{node}"), node);
    p["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": "abc123"});
    p
}

/// A client as `migrate drain` makes it: without kube's own retries of 429.
fn client_of(server: &FakeApiServer) -> kube::Client {
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

/// node-a (to drain), node-b (4 CPUs, 8 GiB) and node-c (2 CPUs, 4 GiB, label disk=ssd), each
/// with a daemon (a DaemonSet Pod).
async fn three_nodes() -> (FakeApiServer, kube::Client) {
    let server = FakeApiServer::start().await.unwrap();
    server.seed(node_object("node-a", "4", "8Gi"));
    server.seed(node_object("node-b", "4", "8Gi"));
    let mut c = node_object("node-c", "2", "4Gi");
    c["metadata"]["labels"]["disk"] = json!("ssd");
    server.seed(c);
    for n in ["node-a", "node-b", "node-c"] {
        server.seed(daemon_pod(n, "10.0.0.1"));
    }
    let client = client_of(&server);
    (server, client)
}

fn options() -> DrainOptions {
    let mut opts = DrainOptions::new("2025-06-01T12:00:00Z");
    opts.concurrency = 2;
    opts.ready_timeout = Duration::from_secs(3);
    opts.handover_timeout = Duration::from_secs(3);
    opts.poll_interval = Duration::from_millis(20);
    opts
}

fn result_of<'a>(report: &'a DrainReport, id: &str) -> &'a PodResult {
    &report
        .pods
        .iter()
        .find(|p| p.id() == id)
        .unwrap_or_else(|| panic!("no {id} in {report:#?}"))
        .result
}

/// The new Pods POSTed in `ns`, by the source Pod they replace → their body.
fn posted(server: &FakeApiServer, ns: &str) -> BTreeMap<String, Value> {
    let collection = format!("/api/v1/namespaces/{ns}/pods");
    server
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == collection)
        .filter_map(|r| r.body)
        .map(|b| {
            let source = b["metadata"]["annotations"]["migrate.dev/source-pod"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (source, b)
        })
        .collect()
}

/// Requests that change something (not GET), as `METHOD /path`.
fn changes(server: &FakeApiServer) -> Vec<String> {
    server
        .lines()
        .into_iter()
        .filter(|l| !l.starts_with("GET "))
        .collect()
}

// ----- target selection ----------------------------------------------------------------------

fn typed_nodes(values: Vec<Value>) -> Vec<Node> {
    values
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect()
}

fn typed_pod(v: Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

fn draining_a() -> BTreeMap<String, String> {
    BTreeMap::from([("node-a".into(), "it is the node being drained".into())])
}

fn labelled(mut n: Value, labels: Value) -> Value {
    for (k, v) in labels.as_object().unwrap() {
        n["metadata"]["labels"][k] = v.clone();
    }
    n
}

#[test]
fn target_follows_the_node_selector_and_otherwise_the_most_free_node() {
    let nodes = typed_nodes(vec![
        node_object("node-a", "8", "16Gi"),
        node_object("node-b", "4", "8Gi"),
        labelled(node_object("node-c", "2", "4Gi"), json!({"disk": "ssd"})),
    ]);
    let plain = typed_pod(pod("shop", "web", "node-a"));
    // node-a is the largest but is being drained; node-b has the larger free share.
    assert_eq!(
        choose_target(&plain, &nodes, &[], &draining_a()).unwrap(),
        "node-b"
    );
    // Pods already on node-b use most of it: node-c wins.
    let mut heavy = pod("shop", "batch", "node-b");
    heavy["spec"]["containers"][0]["resources"]["requests"] =
        json!({"cpu": "3500m", "memory": "7Gi"});
    let on_nodes = vec![typed_pod(heavy.clone())];
    assert_eq!(
        choose_target(&plain, &nodes, &on_nodes, &draining_a()).unwrap(),
        "node-c"
    );
    // ...unless that Pod has finished.
    heavy["status"]["phase"] = json!("Succeeded");
    assert_eq!(
        choose_target(&plain, &nodes, &[typed_pod(heavy)], &draining_a()).unwrap(),
        "node-b"
    );

    let mut ssd = pod("shop", "db", "node-a");
    ssd["spec"]["nodeSelector"] = json!({"disk": "ssd"});
    assert_eq!(
        choose_target(&typed_pod(ssd.clone()), &nodes, &[], &draining_a()).unwrap(),
        "node-c"
    );
    ssd["spec"]["nodeSelector"] = json!({"disk": "nvme"});
    let err = choose_target(&typed_pod(ssd), &nodes, &[], &draining_a()).unwrap_err();
    assert!(err.starts_with("no node can take Pod shop/db: "), "{err}");
    assert!(
        err.contains("node-a: it is the node being drained"),
        "{err}"
    );
    assert!(
        err.contains("node-b: nodeSelector disk=nvme does not match"),
        "{err}"
    );
    assert!(
        err.contains("node-c: nodeSelector disk=nvme does not match"),
        "{err}"
    );
}

#[test]
fn target_respects_required_node_affinity() {
    let nodes = typed_nodes(vec![
        labelled(
            node_object("node-b", "4", "8Gi"),
            json!({"zone": "z1", "cores": "4"}),
        ),
        labelled(
            node_object("node-c", "2", "4Gi"),
            json!({"zone": "z2", "cores": "16", "gpu": "yes"}),
        ),
    ]);
    let with = |exprs: Value| {
        let mut p = pod("shop", "web", "node-a");
        p["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [{"matchExpressions": exprs}]}}});
        typed_pod(p)
    };
    let pick = |exprs: Value| choose_target(&with(exprs), &nodes, &[], &draining_a());
    assert_eq!(
        pick(json!([{"key": "zone", "operator": "In", "values": ["z2"]}])).unwrap(),
        "node-c"
    );
    assert_eq!(
        pick(json!([{"key": "zone", "operator": "NotIn", "values": ["z1"]}])).unwrap(),
        "node-c"
    );
    assert_eq!(
        pick(json!([{"key": "gpu", "operator": "Exists"}])).unwrap(),
        "node-c"
    );
    assert_eq!(
        pick(json!([{"key": "gpu", "operator": "DoesNotExist"}])).unwrap(),
        "node-b"
    );
    assert_eq!(
        pick(json!([{"key": "cores", "operator": "Gt", "values": ["8"]}])).unwrap(),
        "node-c"
    );
    assert_eq!(
        pick(json!([{"key": "cores", "operator": "Lt", "values": ["8"]}])).unwrap(),
        "node-b"
    );
    // All expressions of a term must hold.
    let err = pick(json!([{"key": "zone", "operator": "In", "values": ["z1"]},
                          {"key": "gpu", "operator": "Exists"}]))
    .unwrap_err();
    assert!(
        err.contains("node-b: the Pod's required node affinity does not admit it"),
        "{err}"
    );
    assert!(
        err.contains("node-c: the Pod's required node affinity does not admit it"),
        "{err}"
    );
    // Terms are alternatives; matchFields compares the node's name.
    let mut p = pod("shop", "web", "node-a");
    p["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
        {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z9"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-b"]}]}]}}});
    assert_eq!(
        choose_target(&typed_pod(p), &nodes, &[], &draining_a()).unwrap(),
        "node-b"
    );
}

#[test]
fn target_needs_its_taints_tolerated() {
    let mut b = node_object("node-b", "4", "8Gi");
    b["spec"]["taints"] = json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]);
    let mut c = node_object("node-c", "2", "4Gi");
    c["spec"]["taints"] = json!([{"key": "maintenance", "effect": "NoExecute"},
                                 {"key": "slow", "effect": "PreferNoSchedule"}]);
    let nodes = typed_nodes(vec![b, c]);
    let plain = typed_pod(pod("shop", "web", "node-a"));
    let err = choose_target(&plain, &nodes, &[], &draining_a()).unwrap_err();
    assert!(
        err.contains("node-b: taint dedicated=gpu:NoSchedule not tolerated"),
        "{err}"
    );
    assert!(
        err.contains("node-c: taint maintenance:NoExecute not tolerated"),
        "{err}"
    );
    assert!(
        !err.contains("slow"),
        "PreferNoSchedule is no filter: {err}"
    );

    let mut gpu = pod("shop", "web", "node-a");
    gpu["spec"]["tolerations"] =
        json!([{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]);
    assert_eq!(
        choose_target(&typed_pod(gpu), &nodes, &[], &draining_a()).unwrap(),
        "node-b"
    );
    let mut maint = pod("shop", "web", "node-a");
    maint["spec"]["tolerations"] = json!([{"key": "maintenance", "operator": "Exists"}]);
    assert_eq!(
        choose_target(&typed_pod(maint), &nodes, &[], &draining_a()).unwrap(),
        "node-c"
    );
}

#[test]
fn target_needs_room_for_the_requests() {
    let nodes = typed_nodes(vec![
        node_object("node-b", "4", "8Gi"),
        node_object("node-c", "2", "4Gi"),
    ]);
    let mut big = pod("shop", "big", "node-a");
    big["spec"]["containers"][0]["resources"]["requests"] = json!({"cpu": "3", "memory": "1Gi"});
    let mut busy = pod("shop", "busy", "node-b");
    busy["spec"]["containers"][0]["resources"]["requests"] =
        json!({"cpu": "1500m", "memory": "7680Mi"});
    let big = typed_pod(big);
    // Alone, node-b fits it.
    assert_eq!(
        choose_target(&big, &nodes, &[], &draining_a()).unwrap(),
        "node-b"
    );
    let err = choose_target(&big, &nodes, &[typed_pod(busy)], &draining_a()).unwrap_err();
    assert!(
        err.contains("node-b: insufficient cpu (the Pod requests 3000m, 2500m free of 4000m allocatable), insufficient memory (the Pod requests 1024Mi, 512Mi free of 8192Mi allocatable)"),
        "{err}"
    );
    assert!(
        err.contains("node-c: insufficient cpu (the Pod requests 3000m, 2000m free"),
        "{err}"
    );
}

#[test]
fn target_is_never_cordoned_not_ready_or_excluded() {
    let mut cordoned = node_object("node-b", "4", "8Gi");
    cordoned["spec"]["unschedulable"] = json!(true);
    let mut not_ready = node_object("node-c", "4", "8Gi");
    not_ready["status"]["conditions"] =
        json!([{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]);
    let mut no_condition = node_object("node-d", "4", "8Gi");
    no_condition["status"]["conditions"] = json!([]);
    let nodes = typed_nodes(vec![
        node_object("node-a", "4", "8Gi"),
        cordoned,
        not_ready,
        no_condition,
        node_object("node-e", "4", "8Gi"),
    ]);
    let plain = typed_pod(pod("shop", "web", "node-a"));
    let mut exclude = draining_a();
    exclude.insert("node-e".into(), "no running migrate daemon".into());
    let err = choose_target(&plain, &nodes, &[], &exclude).unwrap_err();
    assert_eq!(
        err,
        "no node can take Pod shop/web: node-a: it is the node being drained; node-b: cordoned \
         (spec.unschedulable); node-c: not Ready (Ready=Unknown, NodeStatusUnknown); node-d: not \
         Ready (no Ready condition); node-e: no running migrate daemon"
    );
    exclude.remove("node-e");
    assert_eq!(
        choose_target(&plain, &nodes, &[], &exclude).unwrap(),
        "node-e"
    );
}

// ----- drain ---------------------------------------------------------------------------------

/// node-a runs a bare Pod (nodeSelector disk=ssd: only node-c), a ReplicaSet's Pod, its daemon
/// (a DaemonSet Pod) and a mirror Pod.
async fn node_a_with_four_pods() -> (FakeApiServer, kube::Client) {
    let (server, client) = three_nodes().await;
    let mut web = pod("shop", "web", "node-a");
    web["spec"]["nodeSelector"] = json!({"disk": "ssd"});
    server.seed(web);
    server.seed(replicaset());
    let mut api = owned(
        pod("shop", "api-7f9c-xk2p", "node-a"),
        "ReplicaSet",
        "api-7f9c",
    );
    api["metadata"]["labels"] = json!({"app": "api"});
    api["metadata"]["ownerReferences"][0]["uid"] = json!("api-7f9c-uid");
    server.seed(api);
    server.seed(mirror("node-a"));
    (server, client)
}

#[tokio::test]
async fn drain_cordons_then_moves_what_can_move_and_reports_the_rest() {
    let (server, client) = node_a_with_four_pods().await;
    let images = FakeImages::default();
    let events = Mutex::new(Vec::new());
    let report = drain(
        &client,
        "node-a",
        &options(),
        |_| PodImages(&images),
        |e| events.lock().unwrap().push(e),
    )
    .await
    .unwrap();

    // The cordon comes first, before any Pod is touched, and nothing uncordons.
    let changed = changes(&server);
    assert_eq!(changed[0], "PATCH /api/v1/nodes/node-a", "{changed:#?}");
    let cordon = &server
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .unwrap();
    assert_eq!(
        cordon.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(cordon.body, Some(json!({"spec": {"unschedulable": true}})));
    assert_eq!(
        changed.iter().filter(|l| l.contains("/nodes/")).count(),
        1,
        "only the cordon touches the node: {changed:#?}"
    );
    assert_eq!(
        server.object(&node_path("node-a")).unwrap()["spec"]["unschedulable"],
        true
    );
    assert!(!report.was_cordoned);
    let list = server
        .requests()
        .into_iter()
        .find(|r| {
            r.method == "GET" && r.path == "/api/v1/pods" && r.param("fieldSelector").is_some()
        })
        .expect("the node's Pods are listed across namespaces");
    assert_eq!(list.param("fieldSelector"), Some("spec.nodeName=node-a"));

    // The movable ones went to the chosen targets.
    let new_pods = posted(&server, "shop");
    assert_eq!(new_pods.len(), 2, "{new_pods:#?}");
    assert_eq!(new_pods["web"]["spec"]["nodeName"], "node-c");
    assert_eq!(new_pods["api-7f9c-xk2p"]["spec"]["nodeName"], "node-b");
    assert_eq!(
        images.calls(),
        [
            "prepare shop/api-7f9c-xk2p node-a->node-b",
            "prepare shop/web node-a->node-c"
        ]
    );
    assert!(
        server.pod("shop", "web").is_none(),
        "the bare source is deleted"
    );
    assert!(
        server.pod("shop", "api-7f9c-xk2p").is_none(),
        "the ReplicaSet removed the source"
    );
    assert!(
        matches!(result_of(&report, "shop/web"), PodResult::Moved { to, .. } if to == "node-c")
    );
    assert!(
        matches!(result_of(&report, "shop/api-7f9c-xk2p"), PodResult::Moved { to, .. } if to == "node-b")
    );

    // The two others stay, with their reasons, and do not count against the drain.
    match result_of(&report, "migrate/migrate-daemon-node-a") {
        PodResult::NotMovable {
            reason,
            node_bound: true,
        } => {
            assert!(reason.contains("DaemonSet migrate-daemon"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    match result_of(&report, "kube-system/etcd-node-a") {
        PodResult::NotMovable {
            reason,
            node_bound: true,
        } => {
            assert!(reason.contains("static Pod"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(server.pod("migrate", "migrate-daemon-node-a").is_some());
    assert!(server.pod("kube-system", "etcd-node-a").is_some());
    assert_eq!(report.pods.len(), 4);
    assert!(report.all_moved() && report.settled(), "{report:#?}");
    assert!(
        !changed.iter().any(|l| l.ends_with("/eviction")),
        "{changed:#?}"
    );

    let events = events.into_inner().unwrap();
    assert_eq!(events[0], DrainEvent::Cordoned { already: false });
    assert_eq!(
        events[1],
        DrainEvent::Found {
            movable: 2,
            staying: 2,
            pods: vec!["shop/api-7f9c-xk2p".into(), "shop/web".into()],
        }
    );
    assert!(events.contains(&DrainEvent::Target {
        pod: "shop/web".into(),
        to: "node-c".into()
    }));
}

#[tokio::test]
async fn drain_of_a_cordoned_node_with_to_sends_no_cordon() {
    let (server, client) = three_nodes().await;
    let mut a = node_object("node-a", "4", "8Gi");
    a["spec"]["unschedulable"] = json!(true);
    server.seed(a); // replaces node-a
    server.seed(pod("shop", "web", "node-a"));
    let images = FakeImages::default();
    let mut opts = options();
    opts.to = Some("node-c".into());
    let report = drain(&client, "node-a", &opts, |_| PodImages(&images), |_| {})
        .await
        .unwrap();
    assert!(report.was_cordoned);
    assert!(
        !changes(&server).iter().any(|l| l.contains("/nodes/")),
        "{:#?}",
        server.lines()
    );
    assert_eq!(posted(&server, "shop")["web"]["spec"]["nodeName"], "node-c");
    assert!(report.settled());

    opts.to = Some("node-a".into());
    let err = drain(&client, "node-a", &opts, |_| PodImages(&images), |_| {})
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("--to names the node being drained"),
        "{err}"
    );
}

#[tokio::test]
async fn evict_rest_evicts_what_did_not_move_and_reports_a_budget_refusal() {
    let (server, client) = three_nodes().await;
    server.seed(pod("shop", "web", "node-a")); // its checkpoint fails
    server.seed(owned(pod("shop", "report-x", "node-a"), "Job", "report")); // not movable
    server.seed(owned(pod("shop", "db-0", "node-a"), "StatefulSet", "db")); // a PDB protects it
    server.seed(mirror("node-a"));
    server.refuse_eviction(
        "shop",
        "db-0",
        "Cannot evict pod as it would violate the pod's disruption budget.",
    );
    let images = FakeImages {
        fail_for: vec!["web".into()],
        ..Default::default()
    };
    let mut opts = options();
    opts.to = Some("node-b".into());
    opts.evict_rest = true;
    let report = drain(&client, "node-a", &opts, |_| PodImages(&images), |_| {})
        .await
        .unwrap();

    let evictions: Vec<String> = changes(&server)
        .into_iter()
        .filter(|l| l.ends_with("/eviction"))
        .collect();
    assert_eq!(
        evictions,
        [
            "POST /api/v1/namespaces/shop/pods/db-0/eviction",
            "POST /api/v1/namespaces/shop/pods/report-x/eviction",
            "POST /api/v1/namespaces/shop/pods/web/eviction",
        ]
    );
    let body = server
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/web/eviction"))
        .and_then(|r| r.body)
        .unwrap();
    assert_eq!(
        body,
        json!({"apiVersion": "policy/v1", "kind": "Eviction",
               "metadata": {"name": "web", "namespace": "shop"}})
    );

    let pod_report = |id: &str| report.pods.iter().find(|p| p.id() == id).unwrap().clone();
    let web = pod_report("shop/web");
    assert!(
        matches!(&web.result, PodResult::Failed { phase, message, .. }
            if phase == "preparing the checkpoint images" && message.contains("ContainerCheckpoint is off")),
        "{web:?}"
    );
    assert_eq!(web.eviction, Some(Eviction::Evicted));
    assert_eq!(
        pod_report("shop/report-x").eviction,
        Some(Eviction::Evicted)
    );
    assert_eq!(
        pod_report("shop/db-0").eviction,
        Some(Eviction::Blocked {
            message: "Cannot evict pod as it would violate the pod's disruption budget.".into()
        })
    );
    // DaemonSet and static Pods are left, as kubectl drain --ignore-daemonsets leaves them.
    for id in ["migrate/migrate-daemon-node-a", "kube-system/etcd-node-a"] {
        assert!(
            matches!(pod_report(id).eviction, Some(Eviction::Skipped { reason }) if reason.contains("--ignore-daemonsets")),
            "{id}"
        );
    }
    assert!(server.pod("shop", "web").is_none() && server.pod("shop", "report-x").is_none());
    assert!(server.pod("shop", "db-0").is_some(), "the budget kept it");
    assert!(server.pod("migrate", "migrate-daemon-node-a").is_some());
    assert!(!report.all_moved());
    assert!(!report.settled(), "db-0 is still there");
    assert_eq!(
        images.calls(),
        ["discard shop/web", "prepare shop/web node-a->node-b"]
    );
}

// ----- watch ---------------------------------------------------------------------------------

#[tokio::test]
async fn watch_drains_an_annotated_node_and_removes_the_annotation() {
    let (server, client) = three_nodes().await;
    let mut a = node_object("node-a", "4", "8Gi");
    a["metadata"]["annotations"] = json!({"migrate.dev/drain": "true", "team": "infra"});
    server.seed(a);
    let mut b = node_object("node-b", "4", "8Gi");
    b["metadata"]["annotations"] = json!({"migrate.dev/drain": "false"});
    server.seed(b);
    server.seed(pod("shop", "web", "node-a"));
    let images = FakeImages::default();
    let mut watcher = Watcher::new(options());

    let outcomes = watcher
        .watch_once(&client, |_| PodImages(&images), |_| {})
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
    assert_eq!(
        (outcomes[0].node.as_str(), outcomes[0].released),
        ("node-a", true)
    );
    assert_eq!(outcomes[0].marks, [Mark::Annotation]);
    assert_eq!(posted(&server, "shop")["web"]["spec"]["nodeName"], "node-b");
    assert!(server.pod("shop", "web").is_none());
    let a = server.object(&node_path("node-a")).unwrap();
    assert_eq!(a["metadata"]["annotations"], json!({"team": "infra"}));
    assert_eq!(a["spec"]["unschedulable"], true, "it stays cordoned");
    let b = server.object(&node_path("node-b")).unwrap();
    assert_eq!(b["metadata"]["annotations"]["migrate.dev/drain"], "false");
    assert!(
        b["spec"].get("unschedulable").is_none(),
        "node-b is not marked"
    );

    // Nothing is marked any more: the next pass does nothing.
    let before = server.lines().len();
    assert!(watcher
        .watch_once(&client, |_| PodImages(&images), |_| {})
        .await
        .unwrap()
        .is_empty());
    assert!(
        changes(&server).len() == changes_upto(&server, before),
        "{:#?}",
        server.lines()
    );
}

/// The number of non-GET requests among the first `n`.
fn changes_upto(server: &FakeApiServer, n: usize) -> usize {
    server.lines()[..n]
        .iter()
        .filter(|l| !l.starts_with("GET "))
        .count()
}

#[tokio::test]
async fn watch_removes_only_its_taint() {
    let (server, client) = three_nodes().await;
    let mut a = node_object("node-a", "4", "8Gi");
    a["spec"]["taints"] = json!([{"key": "migrate.dev/drain", "effect": "NoSchedule"},
                                 {"key": "team", "value": "infra", "effect": "PreferNoSchedule"}]);
    server.seed(a);
    server.seed(pod("shop", "web", "node-a"));
    let images = FakeImages::default();
    let outcomes = Watcher::new(options())
        .watch_once(&client, |_| PodImages(&images), |_| {})
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].marks, [Mark::Taint]);
    assert!(outcomes[0].released);
    assert!(server.pod("shop", "web").is_none());
    let a = server.object(&node_path("node-a")).unwrap();
    assert_eq!(
        a["spec"]["taints"],
        json!([{"key": "team", "value": "infra", "effect": "PreferNoSchedule"}])
    );
}

fn machine(name: &str, node: &str, hooks: &[&str], deleting: bool) -> Value {
    let annotations: serde_json::Map<String, Value> =
        hooks.iter().map(|h| (h.to_string(), json!(""))).collect();
    let mut m = json!({"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine",
        "metadata": {"name": name, "namespace": "capi", "annotations": annotations},
        "spec": {"clusterName": "prod"},
        "status": {"nodeRef": {"kind": "Node", "name": node}}});
    if deleting {
        m["metadata"]["deletionTimestamp"] = json!("2025-06-01T11:59:00Z");
    }
    m
}

#[tokio::test]
async fn watch_drains_the_node_of_a_machine_with_our_hook_and_removes_the_hook() {
    let (server, client) = three_nodes().await;
    server.seed(machine(
        "prod-md-0-a",
        "node-a",
        &[MACHINE_HOOK, OTHER_HOOK],
        true,
    ));
    // Our hook on a Machine that is not being deleted is not a request to drain.
    server.seed(machine("prod-md-0-b", "node-b", &[MACHINE_HOOK], false));
    server.seed(pod("shop", "web", "node-a"));
    let images = FakeImages::default();
    let events = Mutex::new(Vec::new());
    let outcomes = Watcher::new(options())
        .watch_once(
            &client,
            |_| PodImages(&images),
            |e| events.lock().unwrap().push(e),
        )
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
    assert_eq!(outcomes[0].node, "node-a");
    assert_eq!(
        outcomes[0].marks,
        [Mark::MachineHook {
            namespace: "capi".into(),
            machine: "prod-md-0-a".into()
        }]
    );
    assert!(outcomes[0].released);
    assert_eq!(posted(&server, "shop")["web"]["spec"]["nodeName"], "node-b");
    let m = server.object(&machine_path("capi", "prod-md-0-a")).unwrap();
    assert_eq!(
        m["metadata"]["annotations"],
        json!({OTHER_HOOK: ""}),
        "only our hook goes"
    );
    let untouched = server.object(&machine_path("capi", "prod-md-0-b")).unwrap();
    assert_eq!(
        untouched["metadata"]["annotations"],
        json!({MACHINE_HOOK: ""})
    );
    let patches: Vec<String> = changes(&server)
        .into_iter()
        .filter(|l| l.starts_with("PATCH "))
        .collect();
    assert_eq!(
        patches,
        [
            "PATCH /api/v1/nodes/node-a".to_string(),
            format!("PATCH {}", machine_path("capi", "prod-md-0-a")),
        ]
    );
    let machine_list = server
        .lines()
        .into_iter()
        .any(|l| l == "GET /apis/cluster.x-k8s.io/v1beta1/machines");
    assert!(machine_list, "{:#?}", server.lines());
}

#[tokio::test]
async fn watch_leaves_a_machine_with_only_another_hook_alone() {
    let (server, client) = three_nodes().await;
    server.seed(machine("prod-md-0-a", "node-a", &[OTHER_HOOK], true));
    server.seed(pod("shop", "web", "node-a"));
    let images = FakeImages::default();
    let outcomes = Watcher::new(options())
        .watch_once(&client, |_| PodImages(&images), |_| {})
        .await
        .unwrap();
    assert!(outcomes.is_empty(), "{outcomes:#?}");
    assert!(changes(&server).is_empty(), "{:#?}", server.lines());
    assert!(server.pod("shop", "web").is_some());
    assert!(images.calls().is_empty());
    let m = server.object(&machine_path("capi", "prod-md-0-a")).unwrap();
    assert_eq!(m["metadata"]["annotations"], json!({OTHER_HOOK: ""}));
}

#[tokio::test]
async fn watch_keeps_the_mark_when_pods_stay_and_does_not_retry() {
    let (server, client) = three_nodes().await;
    let mut a = node_object("node-a", "4", "8Gi");
    a["metadata"]["annotations"] = json!({"migrate.dev/drain": "true"});
    server.seed(a);
    server.seed(owned(pod("shop", "db-0", "node-a"), "StatefulSet", "db"));
    let images = FakeImages::default();
    let mut watcher = Watcher::new(options());
    let outcomes = watcher
        .watch_once(&client, |_| PodImages(&images), |_| {})
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 1);
    assert!(!outcomes[0].released);
    let report = outcomes[0].report.as_ref().unwrap();
    assert!(matches!(
        result_of(report, "shop/db-0"),
        PodResult::NotMovable {
            node_bound: false,
            ..
        }
    ));
    let a = server.object(&node_path("node-a")).unwrap();
    assert_eq!(
        a["metadata"]["annotations"]["migrate.dev/drain"], "true",
        "the mark stays"
    );
    assert!(server.pod("shop", "db-0").is_some());

    // The next pass sees the mark but does not drain the node again.
    let before = server.lines().len();
    assert!(watcher
        .watch_once(&client, |_| PodImages(&images), |_| {})
        .await
        .unwrap()
        .is_empty());
    let again: Vec<String> = server.lines()[before..].to_vec();
    assert!(
        !again
            .iter()
            .any(|l| l == "GET /api/v1/pods" || !l.starts_with("GET ")),
        "{again:#?}"
    );
    assert!(
        !again.iter().any(|l| l == "GET /api/v1/nodes/node-a"),
        "{again:#?}"
    );
}
