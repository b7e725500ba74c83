//! `migrate drain` on Kubernetes, run as the binary (target/debug/migrate) the way an operator
//! types it, against fakes of the API server. One test drains a lab node for real: a fake API
//! server and kubelet (src/bin/fake-cluster.rs) in front of two lab nodes whose source daemon
//! runs in its Kubernetes mode, so `migrate drain kd1 --kubeconfig K` cordons kd1, checkpoints
//! the Pod's container with real CRIU, and the new Pod's container counts on in kd2; then
//! `migrate drain --watch` moves a second Pod the same way once kd1 is annotated
//! `migrate.dev/drain=true`, and removes the annotation. The other tests run the binary against
//! the fake API server alone (in this process), with Pods that need no daemon: DaemonSet and
//! hostPath Pods reported with their reasons and exit code 1, `--evict-rest` Evictions and a
//! PodDisruptionBudget's 429, a Pod no Ready node can take, bad kubeconfigs, unknown nodes and
//! bad usage, and `--watch` releasing a Cluster API Machine's pre-drain hook while keeping the
//! mark of a node whose Pod could not be evicted. Build the binary first (`cargo build -p
//! cli`); the lab test needs root and the lab root, and says so when they are missing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::fake_apiserver::{daemon_pod, machine_path, node_object, node_path, FakeApiServer};
use e2e::fake_cluster::FakeCluster;
use e2e::lab::{count, migrate_binary, parse_events, start_counter, start_counter_named, Lab};
use e2e::wait_for;
use engine::drain::MACHINE_HOOK;
use engine::lab;
use serde_json::{json, Value};

/// Another owner's pre-drain hook: the watcher leaves it.
const OTHER_HOOK: &str = "pre-drain.delete.hook.machine.cluster.x-k8s.io/backup";

/// What a run of the binary gave.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(what: &str, out: std::process::Output) -> Run {
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        println!(
            "$ {what}\n--- exit {} --- stdout:\n{}--- stderr:\n{}",
            run.code, run.stdout, run.stderr
        );
        run
    }

    /// The stdout line that mentions `needle` (a table row).
    fn row(&self, needle: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle} in:\n{}", self.stdout))
    }
}

// ----- the fake API server in this process ---------------------------------------------------

/// The fake API server, a kubeconfig naming it and an operator certificate (the drain loads it
/// before it starts, even when no Pod will move).
struct Fake {
    server: FakeApiServer,
    dir: tempfile::TempDir,
    // Last: the server's task runs on it.
    _rt: tokio::runtime::Runtime,
}

impl Fake {
    fn start() -> Fake {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let server = rt.block_on(FakeApiServer::start()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_kubeconfig(&dir.path().join("kubeconfig"), &server.url());
        transport::tls::init_certs(&dir.path().join("certs"), &["operator".to_string()]).unwrap();
        Fake {
            server,
            dir,
            _rt: rt,
        }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs/operator")
    }

    /// `migrate ARGS...` with nothing from the environment deciding for it (no lab, no
    /// ~/.kube/config, no KUBECONFIG).
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(migrate_binary());
        c.args(args)
            .env("HOME", self.dir.path())
            .env_remove("KUBECONFIG")
            .env("MIGRATE_LAB_DIR", self.dir.path().join("no-lab"))
            .env("MIGRATE_LAB_PREFIX", "mlmig-kd-none")
            .stdin(Stdio::null());
        c
    }

    /// `migrate drain ARGS... --kubeconfig K --certs C`.
    fn drain(&self, args: &[&str]) -> Run {
        let mut c = self.command(&[&["drain"], args].concat());
        c.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--certs")
            .arg(self.certs());
        Run::of(
            &format!("migrate drain {}", args.join(" ")),
            c.output().unwrap(),
        )
    }

    /// `METHOD /path` of the requests that changed something (not GET).
    fn changes(&self) -> Vec<String> {
        self.server
            .lines()
            .into_iter()
            .filter(|l| !l.starts_with("GET "))
            .collect()
    }

    fn count(&self, line: &str) -> usize {
        self.server.lines().iter().filter(|l| *l == line).count()
    }
}

fn write_kubeconfig(path: &Path, server: &str) {
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "operator", "user": {"token": "operator-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "operator"}}],
        "current-context": "fake",
    });
    std::fs::write(path, kubeconfig.to_string()).unwrap();
}

/// A Ready node with room for every Pod here.
fn node(name: &str) -> Value {
    node_object(name, "4", "8Gi")
}

/// The migrate daemon's Pod on `node`, at an address where no daemon answers.
fn daemon(node: &str) -> Value {
    daemon_pod(node, "127.0.0.1")
}

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "nginx:1.27",
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]},
        "status": {"phase": "Running", "podIP": "10.244.0.7",
                   "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn owned(mut p: Value, kind: &str, owner: &str) -> Value {
    p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind,
        "name": owner, "uid": format!("{owner}-uid"), "controller": true}]);
    p
}

/// A bare Pod with a hostPath volume: it cannot move, and nothing recreates it.
fn with_host_path(name: &str, node: &str) -> Value {
    let mut p = pod("shop", name, node);
    p["spec"]["volumes"] = json!([{"name": "logs", "hostPath": {"path": "/var/log/shop"}}]);
    p["spec"]["containers"][0]["volumeMounts"] = json!([{"name": "logs", "mountPath": "/logs"}]);
    p
}

/// node-a (to drain) and node-b, each with its daemon.
fn two_nodes() -> Fake {
    let fake = Fake::start();
    for n in ["node-a", "node-b"] {
        fake.server.seed(node(n));
        fake.server.seed(daemon(n));
    }
    fake
}

/// The cordon: one merge PATCH of `spec.unschedulable`, and the node is cordoned.
fn assert_cordoned(fake: &Fake, name: &str) {
    let path = node_path(name);
    let patches: Vec<Option<Value>> = fake
        .server
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path == path)
        .map(|r| r.body)
        .collect();
    assert_eq!(
        patches,
        [Some(json!({"spec": {"unschedulable": true}}))],
        "{:#?}",
        fake.server.lines()
    );
    assert_eq!(
        fake.server.object(&path).unwrap()["spec"]["unschedulable"],
        true
    );
}

/// The JSON lines of a `--json` run: the Pod events by `namespace/pod`, and the summary. The
/// drain's progress objects are checked and left out: the last one counts every Pod to
/// migrate as moved or failed.
fn json_report(run: &Run) -> (Vec<(String, Value)>, Value) {
    let (progress, events): (Vec<Value>, Vec<Value>) = parse_events(&run.stdout)
        .into_iter()
        .partition(|e| e["event"] == "progress");
    if let Some(last) = progress.last() {
        let count = |field: &str| last[field].as_u64().unwrap();
        assert_eq!(
            count("moved") + count("failed"),
            count("containers"),
            "{last}"
        );
        assert_eq!(last["done_fraction"], 1.0, "{last}");
    }
    let (summaries, pods): (Vec<Value>, Vec<Value>) =
        events.into_iter().partition(|e| e["event"] == "summary");
    assert_eq!(summaries.len(), 1, "{}", run.stdout);
    let pods = pods
        .into_iter()
        .map(|p| {
            assert_eq!(p["event"], "pod", "{p}");
            (
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap(),
                    p["pod"].as_str().unwrap()
                ),
                p,
            )
        })
        .collect();
    (pods, summaries.into_iter().next().unwrap())
}

fn event<'a>(pods: &'a [(String, Value)], id: &str) -> &'a Value {
    &pods
        .iter()
        .find(|(p, _)| p == id)
        .unwrap_or_else(|| panic!("no {id} in {pods:#?}"))
        .1
}

#[test]
fn daemonset_and_host_path_pods_stay_reported_and_the_drain_fails() {
    let fake = two_nodes();
    fake.server.seed(with_host_path("logs", "node-a"));

    let run = fake.drain(&["node-a"]);
    assert_eq!(run.code, 1, "a Pod stays on node-a");
    assert_cordoned(&fake, "node-a");
    assert!(
        run.stderr.contains("cordoned (spec.unschedulable)"),
        "{}",
        run.stderr
    );
    let logs = run.row("shop/logs");
    assert!(
        logs.contains("not movable: volume logs is a hostPath volume (/var/log/shop)"),
        "{logs}"
    );
    let daemon = run.row("migrate/migrate-daemon-node-a");
    assert!(
        daemon.contains("stays on the node: ") && daemon.contains("DaemonSet migrate-daemon"),
        "{daemon}"
    );
    let last = run.stdout.lines().last().unwrap();
    assert!(
        last.starts_with("node-a NOT drained: 1 Pod(s) did not move (--evict-rest evicts them)")
            && last.contains("node-a stays cordoned"),
        "{last}"
    );
    // Nothing was created, evicted or deleted; both Pods are where they were.
    assert_eq!(fake.changes(), ["PATCH /api/v1/nodes/node-a"]);
    assert!(fake.server.pod("shop", "logs").is_some());

    // Again with --json: the node is cordoned already, so nothing is sent at all.
    let run = fake.drain(&["node-a", "--json"]);
    assert_eq!(run.code, 1);
    let (pods, summary) = json_report(&run);
    assert_eq!(pods.len(), 2, "{pods:#?}");
    let logs = event(&pods, "shop/logs");
    assert_eq!(
        (&logs["result"], &logs["node"]),
        (&json!("not_movable"), &json!("node-a"))
    );
    assert!(
        logs["reason"].as_str().unwrap().contains("hostPath"),
        "{logs}"
    );
    let daemon = event(&pods, "migrate/migrate-daemon-node-a");
    assert_eq!(daemon["result"], "stays");
    assert!(
        daemon["reason"].as_str().unwrap().contains("DaemonSet"),
        "{daemon}"
    );
    for key in ["pods", "moved", "was_cordoned", "all_moved", "drained"] {
        assert!(summary.get(key).is_some(), "{key} missing: {summary}");
    }
    assert_eq!(
        (
            &summary["node"],
            &summary["pods"],
            &summary["moved"],
            &summary["was_cordoned"],
            &summary["drained"]
        ),
        (
            &json!("node-a"),
            &json!(2),
            &json!(0),
            &json!(true),
            &json!(false)
        )
    );
    assert!(summary["seconds"].is_f64(), "{summary}");
    assert_eq!(fake.changes(), ["PATCH /api/v1/nodes/node-a"]);
}

#[test]
fn evict_rest_evicts_what_stays_and_reports_a_budget_refusal() {
    let fake = two_nodes();
    fake.server.seed(with_host_path("logs", "node-a"));
    fake.server
        .seed(owned(pod("shop", "db-0", "node-a"), "StatefulSet", "db"));
    fake.server.refuse_eviction(
        "shop",
        "db-0",
        "Cannot evict pod as it would violate the pod's disruption budget.",
    );

    let run = fake.drain(&["node-a", "--evict-rest"]);
    assert_eq!(run.code, 1, "db-0 is still on node-a");
    assert_cordoned(&fake, "node-a");
    let evictions: Vec<String> = fake
        .changes()
        .into_iter()
        .filter(|l| l.ends_with("/eviction"))
        .collect();
    assert_eq!(
        evictions,
        [
            "POST /api/v1/namespaces/shop/pods/db-0/eviction",
            "POST /api/v1/namespaces/shop/pods/logs/eviction",
        ],
        "the DaemonSet Pod is not evicted"
    );
    assert!(fake.server.pod("shop", "logs").is_none(), "evicted");
    assert!(
        fake.server.pod("shop", "db-0").is_some(),
        "the budget kept it"
    );
    let db = run.row("shop/db-0");
    assert!(
        db.contains("not movable: ")
            && db.contains("StatefulSet db")
            && db.contains("; eviction refused (a PodDisruptionBudget does not allow it now")
            && db.contains("violate the pod's disruption budget"),
        "{db}"
    );
    assert!(run.row("shop/logs").contains("; evicted"), "{}", run.stdout);
    assert!(
        run.row("migrate/migrate-daemon-node-a")
            .contains("; not evicted: a DaemonSet or static Pod: left on the node"),
        "{}",
        run.stdout
    );
    let last = run.stdout.lines().last().unwrap();
    assert!(
        last.starts_with(
            "node-a NOT drained: 1 Pod(s) did not move and were not evicted; 0 moved, 1 evicted"
        ),
        "{last}"
    );

    // A node whose only other Pod can be evicted drains: exit 0.
    let fake = two_nodes();
    fake.server.seed(with_host_path("logs", "node-a"));
    let run = fake.drain(&["node-a", "--evict-rest", "--json"]);
    assert_eq!(run.code, 0, "everything that stays was evicted");
    let (pods, summary) = json_report(&run);
    let logs = event(&pods, "shop/logs");
    assert_eq!(
        (&logs["result"], &logs["eviction"]),
        (&json!("not_movable"), &json!("evicted"))
    );
    let daemon = event(&pods, "migrate/migrate-daemon-node-a");
    assert_eq!(daemon["eviction"], "skipped", "{daemon}");
    assert_eq!(
        (
            &summary["drained"],
            &summary["all_moved"],
            &summary["moved"]
        ),
        (&json!(true), &json!(false), &json!(0))
    );
    assert_eq!(
        fake.count("POST /api/v1/namespaces/shop/pods/logs/eviction"),
        1
    );
    assert!(fake.server.pod("shop", "logs").is_none());
}

#[test]
fn a_pod_no_ready_node_can_take_is_reported_with_the_nodes_reasons() {
    let fake = two_nodes();
    // The only node with disk=ssd is not Ready.
    let mut c = node("node-c");
    c["metadata"]["labels"]["disk"] = json!("ssd");
    c["status"]["conditions"] =
        json!([{"type": "Ready", "status": "False", "reason": "KubeletNotReady"}]);
    fake.server.seed(c);
    fake.server.seed(daemon("node-c"));
    let mut web = pod("shop", "web", "node-a");
    web["spec"]["nodeSelector"] = json!({"disk": "ssd"});
    fake.server.seed(web);

    let run = fake.drain(&["node-a"]);
    assert_eq!(run.code, 1);
    assert_cordoned(&fake, "node-a");
    let row = run.row("shop/web");
    assert!(
        row.contains(
            "failed while choosing a target: no node can take Pod shop/web: node-a: it is the \
             node being drained; node-b: nodeSelector disk=ssd does not match its labels; \
             node-c: not Ready (Ready=False, KubeletNotReady)"
        ),
        "{row}"
    );
    assert!(
        run.stderr
            .contains("error: migrating Pod shop/web failed while choosing a target: no node"),
        "{}",
        run.stderr
    );
    assert!(
        run.stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("node-a NOT drained: 1 Pod(s) did not move"),
        "{}",
        run.stdout
    );
    assert_eq!(
        fake.changes(),
        ["PATCH /api/v1/nodes/node-a"],
        "no Pod made"
    );
    assert!(fake.server.pod("shop", "web").is_some());

    let run = fake.drain(&["node-a", "--json"]);
    assert_eq!(run.code, 1);
    let (pods, summary) = json_report(&run);
    let web = event(&pods, "shop/web");
    assert_eq!(
        (&web["result"], &web["phase"]),
        (&json!("failed"), &json!("choosing a target"))
    );
    assert!(web.get("to").is_none(), "no target was chosen: {web}");
    assert!(
        web["message"]
            .as_str()
            .unwrap()
            .contains("node-c: not Ready"),
        "{web}"
    );
    assert_eq!(summary["drained"], false);
}

#[test]
fn a_migration_that_fails_leaves_the_pod_and_evict_rest_evicts_it() {
    // The daemons' port: a socket that never answers, so the checkpoint cannot start.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port().to_string();
    let fake = two_nodes();
    fake.server.seed(pod("shop", "web", "node-a"));

    let run = fake.drain(&["node-a", "--evict-rest", "--json", "--daemon-port", &port]);
    assert_eq!(run.code, 0, "web did not move but was evicted");
    let (pods, summary) = json_report(&run);
    let web = event(&pods, "shop/web");
    assert_eq!(
        (&web["result"], &web["to"], &web["eviction"]),
        (&json!("failed"), &json!("node-b"), &json!("evicted")),
        "{web}"
    );
    let message = web["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "no answer from the daemon of node-a at 127.0.0.1:{port}"
        )),
        "{web}"
    );
    assert!(
        run.stderr.contains(
            "error: migrating Pod shop/web to node-b failed while preparing the checkpoint images"
        ),
        "{}",
        run.stderr
    );
    assert_eq!(
        (
            &summary["drained"],
            &summary["all_moved"],
            &summary["moved"]
        ),
        (&json!(true), &json!(false), &json!(0))
    );
    // No new Pod was made; the source was evicted, not deleted.
    assert_eq!(
        fake.changes(),
        [
            "PATCH /api/v1/nodes/node-a",
            "POST /api/v1/namespaces/shop/pods/web/eviction"
        ]
    );
    assert!(fake.server.pod("shop", "web").is_none());
}

#[test]
fn bad_kubeconfigs_unknown_nodes_and_bad_usage_say_what_to_check() {
    let fake = two_nodes();

    // An unknown node: the 404, and where to look. Nothing is changed.
    let run = fake.drain(&["node-x"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("error: cannot get node node-x: 404")
            && run.stderr.contains("not found")
            && run.stderr.contains("kubectl get nodes"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stdout, "");

    // --to is the node being drained.
    let run = fake.drain(&["node-a", "--to", "node-a"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("--to names the node being drained (node-a)"),
        "{}",
        run.stderr
    );

    // No operator certificate: said before anything is touched.
    let run = Run::of(
        "migrate drain node-a --certs MISSING",
        fake.command(&["drain", "node-a"])
            .arg("--kubeconfig")
            .arg(fake.kubeconfig())
            .arg("--certs")
            .arg(fake.dir.path().join("missing"))
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("loading this client's certificate from")
            && run.stderr.contains("missing")
            && run.stderr.contains("--certs"),
        "{}",
        run.stderr
    );
    assert!(fake.changes().is_empty(), "{:#?}", fake.server.lines());

    // A kubeconfig that does not exist, or is not one.
    let missing = fake.dir.path().join("nowhere/kubeconfig");
    let garbage = fake.dir.path().join("garbage");
    std::fs::write(&garbage, "clusters: [this is not a kubeconfig").unwrap();
    for (label, kubeconfig) in [("MISSING", &missing), ("GARBAGE", &garbage)] {
        let run = Run::of(
            &format!("migrate drain node-a --kubeconfig {label}"),
            fake.command(&["drain", "node-a", "--certs"])
                .arg(fake.certs())
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .output()
                .unwrap(),
        );
        assert_eq!(run.code, 1);
        assert!(
            run.stderr
                .contains(&format!("reading the kubeconfig {}", kubeconfig.display())),
            "{}",
            run.stderr
        );
    }

    // An API server nobody answers at.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let unreachable = fake.dir.path().join("unreachable");
    write_kubeconfig(&unreachable, &url);
    let run = Run::of(
        "migrate drain node-a --kubeconfig UNREACHABLE",
        fake.command(&["drain", "node-a", "--certs"])
            .arg(fake.certs())
            .arg("--kubeconfig")
            .arg(&unreachable)
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("error: cannot get node node-a: ")
            && run.stderr.contains("Connection refused")
            && run
                .stderr
                .contains("is the API server of your kubeconfig reachable"),
        "{}",
        run.stderr
    );

    // Bad usage is 2, said by clap: NODE with --watch; neither.
    for args in [
        &["drain", "node-a", "--watch"][..],
        &["drain", "--kubernetes"],
    ] {
        let run = Run::of(&args.join(" "), fake.command(args).output().unwrap());
        assert_eq!(run.code, 2, "{args:?}");
        assert!(run.stderr.contains("Usage:"), "{}", run.stderr);
    }
    assert!(fake.changes().is_empty(), "{:#?}", fake.server.lines());
}

/// A child process killed (if still running) on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Sends it SIGINT, as Ctrl-C does.
    fn signal_interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (at most `limit`) for it to exit; its exit code.
    fn exit_code(&mut self, limit: Duration) -> i32 {
        let status = wait_for("the watcher to stop on SIGINT", limit, || {
            self.0.try_wait().unwrap()
        });
        status.code().unwrap_or(-1)
    }

    /// Interrupts it as Ctrl-C does, and waits for its exit code.
    fn interrupt(&mut self) -> i32 {
        self.signal_interrupt();
        self.exit_code(Duration::from_secs(30))
    }
}

fn machine(name: &str, node: &str, hooks: &[&str]) -> Value {
    let annotations: serde_json::Map<String, Value> =
        hooks.iter().map(|h| (h.to_string(), json!(""))).collect();
    json!({"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine",
        "metadata": {"name": name, "namespace": "capi", "annotations": annotations,
                     "deletionTimestamp": "2025-06-01T11:59:00Z"},
        "spec": {"clusterName": "prod"},
        "status": {"nodeRef": {"kind": "Node", "name": node}}})
}

#[test]
fn watch_releases_a_machine_hook_and_keeps_the_mark_of_a_node_it_could_not_empty() {
    // Pods that need no daemon: a Job's Pod to evict on node-a, a StatefulSet Pod on node-c
    // whose PodDisruptionBudget refuses its eviction.
    let fake = two_nodes();
    fake.server.seed(node("node-c"));
    fake.server.seed(daemon("node-c"));
    fake.server
        .seed(owned(pod("shop", "report-x", "node-a"), "Job", "report"));
    fake.server
        .seed(owned(pod("shop", "db-0", "node-c"), "StatefulSet", "db"));
    fake.server.refuse_eviction(
        "shop",
        "db-0",
        "Cannot evict pod as it would violate the pod's disruption budget.",
    );

    let (stdout, stderr) = (
        fake.dir.path().join("watch.out"),
        fake.dir.path().join("watch.err"),
    );
    let mut watcher = Running(
        fake.command(&["drain", "--watch", "--interval", "1", "--evict-rest"])
            .arg("--kubeconfig")
            .arg(fake.kubeconfig())
            .arg("--certs")
            .arg(fake.certs())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let machines = "GET /apis/cluster.x-k8s.io/v1beta1/machines";
    // A pass with nothing marked, then the marks: our hook on node-a's Machine being deleted
    // (beside another owner's hook), the annotation on node-c.
    wait_for("the watcher's first pass", Duration::from_secs(30), || {
        (fake.count(machines) >= 1).then_some(())
    });
    assert!(fake.changes().is_empty(), "{:#?}", fake.server.lines());
    fake.server
        .seed(machine("md-0-a", "node-a", &[MACHINE_HOOK, OTHER_HOOK]));
    let mut c = fake.server.object(&node_path("node-c")).unwrap();
    c["metadata"]["annotations"] = json!({"migrate.dev/drain": "true"});
    fake.server.seed(c);

    let m = wait_for("the hook removed", Duration::from_secs(60), || {
        let m = fake.server.object(&machine_path("capi", "md-0-a")).unwrap();
        m["metadata"]["annotations"]
            .get(MACHINE_HOOK)
            .is_none()
            .then_some(m)
    });
    assert_eq!(
        m["metadata"]["annotations"],
        json!({OTHER_HOOK: ""}),
        "only our hook goes"
    );
    wait_for("node-c's Pod handled", Duration::from_secs(60), || {
        (fake.count("POST /api/v1/namespaces/shop/pods/db-0/eviction") == 1).then_some(())
    });
    // Two more passes: node-c stays marked but is not drained again.
    let passes = fake.count(machines);
    wait_for("two more passes", Duration::from_secs(30), || {
        (fake.count(machines) >= passes + 2).then_some(())
    });
    assert_eq!(watcher.interrupt(), 0, "Ctrl-C ends the watch");
    let (stdout, stderr) = (
        std::fs::read_to_string(stdout).unwrap(),
        std::fs::read_to_string(stderr).unwrap(),
    );
    println!("$ migrate drain --watch --interval 1 --evict-rest\n{stdout}\n{stderr}");

    assert!(fake.server.pod("shop", "report-x").is_none(), "evicted");
    assert!(
        fake.server.pod("shop", "db-0").is_some(),
        "the budget kept it"
    );
    assert_eq!(
        fake.count("POST /api/v1/namespaces/shop/pods/db-0/eviction"),
        1,
        "node-c was not drained again"
    );
    assert_cordoned(&fake, "node-a");
    let c = fake.server.object(&node_path("node-c")).unwrap();
    assert_eq!(c["metadata"]["annotations"]["migrate.dev/drain"], "true");
    assert_eq!(c["spec"]["unschedulable"], true);
    assert!(
        fake.server.object(&node_path("node-b")).unwrap()["spec"]
            .get("unschedulable")
            .is_none(),
        "node-b is not marked"
    );
    assert!(
        fake.server
            .pod("migrate", "migrate-daemon-node-a")
            .is_some()
            && fake
                .server
                .pod("migrate", "migrate-daemon-node-c")
                .is_some()
    );

    for said in [
        "node node-a is marked for drain (hook pre-drain.delete.hook.machine.cluster.x-k8s.io/migrate on Machine capi/md-0-a)",
        "node-a: shop/report-x: evicted",
        "node-a: drained; removed the hook",
        "node node-c is marked for drain (annotation migrate.dev/drain=true)",
        "warning: node node-c: 1 Pod(s) did not move and could not be evicted: shop/db-0; the annotation migrate.dev/drain=true stay(s)",
    ] {
        assert!(stderr.contains(said), "{said:?} not in:\n{stderr}");
    }
    assert!(
        stdout.contains("node-a drained in") && stdout.contains("node-c NOT drained: 1 Pod(s)"),
        "{stdout}"
    );
}

// ----- a real drain in the lab ---------------------------------------------------------------

/// The counter of container `name` in `node`, if it answers.
fn count_of(lab: &Lab, node: &str, name: &str) -> Option<u64> {
    let (code, out) = lab.run(node, &["podman", "exec", name, "cat", "/c"]);
    (code == 0).then(|| out.trim().parse().ok()).flatten()
}

#[test]
fn drain_and_watch_move_pods_with_real_criu() {
    let lab = Lab::up("kd");
    let (a, b) = (lab.a.clone(), lab.b.clone());
    start_counter(&lab, &a);
    start_counter_named(&lab, &a, "counter2");
    let before = wait_for("counter in the source", Duration::from_secs(30), || {
        count(&lab, &a).filter(|&c| c > 20)
    });

    let mut cluster = FakeCluster::start(env!("CARGO_BIN_EXE_fake-cluster"), &lab, &a, &b, true);
    // The source node's daemon becomes a Kubernetes node's daemon.
    cluster.kubernetes_daemon(&lab, &a);
    let kubeconfig = cluster.kubeconfig();
    // The CLI runs where the fake API server listens (its node's network), as kubectl would.
    let migrate = |args: &[&str]| {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", lab.netns(&a)))
            .arg(migrate_binary())
            .args(args)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--certs")
            .arg(lab.state.operator_certs())
            .args(["--ready-timeout", "60"])
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        c
    };

    // 1. `migrate drain kd1`: the counter Pod moves, the daemon's Pod stays.
    let run = Run::of(
        &format!("migrate drain {a}"),
        migrate(&["drain", &a]).output().unwrap(),
    );
    assert_eq!(run.code, 0, "the drain failed");
    // On a pipe, the drain's status when its one Pod has moved.
    assert!(
        run.stderr
            .contains(&format!("drain {a}: 1 of 1 moved; 100 % done")),
        "{}",
        run.stderr
    );
    let row = run.row("default/counter");
    assert!(row.contains(&format!("moved to {b} as counter-")), "{row}");
    let new_pod = row
        .split_whitespace()
        .find(|w| w.starts_with("counter-"))
        .unwrap()
        .to_string();
    assert!(
        run.row(&format!("migrate/migrate-daemon-{a}"))
            .contains("stays on the node: "),
        "{}",
        run.stdout
    );
    let last = run.stdout.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("{a} drained in "))
            && last.contains("1 Pod(s) moved, 0 evicted, 1 DaemonSet or static Pod(s) stay"),
        "{last}"
    );
    for said in [
        "cordoned (spec.unschedulable)".to_string(),
        format!("default/counter: moving to {b}"),
    ] {
        assert!(run.stderr.contains(&said), "{said:?} not in {}", run.stderr);
    }
    // The state went on: the new Pod's container counts on from the checkpoint, in kd2.
    let after = wait_for("counter in the target", Duration::from_secs(30), || {
        count(&lab, &b).filter(|&c| c > before)
    });
    println!("counter: {before} on {a} before, {after} on {b} after");
    let node_a = cluster.get(&node_path(&a));
    assert_eq!(node_a["spec"]["unschedulable"], true, "{node_a}");
    let moved = cluster.get(&format!("/api/v1/namespaces/default/pods/{new_pod}"));
    assert_eq!(moved["spec"]["nodeName"], b.as_str(), "{moved}");
    assert_eq!(moved["status"]["phase"], "Running", "{moved}");
    assert_eq!(cluster.pods("default"), [new_pod.as_str()]);
    assert_eq!(lab.migration_images(&b).len(), 1);

    // 2. `migrate drain --watch --json`, then kd1 is marked: counter2's Pod moves and the mark
    // is removed.
    cluster.seed(&json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "counter2", "namespace": "default", "labels": {"app": "counter2"}},
        "spec": {"nodeName": a, "containers": [{"name": "counter2", "image": lab::BUSYBOX_IMAGE}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}));
    let before2 = wait_for("counter2 in the source", Duration::from_secs(30), || {
        count_of(&lab, &a, "counter2").filter(|&c| c > 20)
    });
    let logs = tempfile::tempdir().unwrap();
    let (stdout, stderr) = (logs.path().join("watch.out"), logs.path().join("watch.err"));
    let mut watcher = Running(
        migrate(&["drain", "--watch", "--interval", "1", "--json"])
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut marked = cluster.get(&node_path(&a));
    marked["metadata"]["annotations"] = json!({"migrate.dev/drain": "true"});
    cluster.seed(&marked);
    // Ctrl-C while the pass migrates (its new Pod exists, the source too): the pass finishes,
    // then the watcher stops.
    wait_for("counter2's new Pod", Duration::from_secs(120), || {
        cluster
            .pods("default")
            .iter()
            .any(|p| p.starts_with("counter2-"))
            .then_some(())
    });
    watcher.signal_interrupt();
    wait_for(
        "the mark removed and counter2 moved",
        Duration::from_secs(180),
        || {
            let node = cluster.get(&node_path(&a));
            let source = cluster.get("/api/v1/namespaces/default/pods/counter2");
            (node["metadata"]["annotations"]
                .get("migrate.dev/drain")
                .is_none()
                && source.is_null())
            .then_some(())
        },
    );
    assert_eq!(
        watcher.exit_code(Duration::from_secs(60)),
        0,
        "Ctrl-C ends the watch after its pass"
    );
    let watched = Run {
        code: 0,
        stdout: std::fs::read_to_string(stdout).unwrap(),
        stderr: std::fs::read_to_string(stderr).unwrap(),
    };
    println!(
        "$ migrate drain --watch --interval 1 --json\n{}\n{}",
        watched.stdout, watched.stderr
    );
    let after2 = wait_for("counter2 in the target", Duration::from_secs(30), || {
        count_of(&lab, &b, "counter2").filter(|&c| c > before2)
    });
    println!("counter2: {before2} on {a} before, {after2} on {b} after");
    let (pods, summary) = json_report(&watched);
    let counter2 = event(&pods, "default/counter2");
    assert_eq!(
        (&counter2["result"], &counter2["to"], &counter2["node"]),
        (&json!("moved"), &json!(b), &json!(a)),
        "{counter2}"
    );
    let new_pod2 = counter2["new_pod"].as_str().unwrap().to_string();
    assert!(new_pod2.starts_with("counter2-"), "{counter2}");
    assert!(counter2["seconds"].as_f64().unwrap() > 0.0, "{counter2}");
    assert_eq!(
        event(&pods, &format!("migrate/migrate-daemon-{a}"))["result"],
        "stays"
    );
    assert_eq!(
        (
            &summary["node"],
            &summary["pods"],
            &summary["moved"],
            &summary["was_cordoned"],
            &summary["all_moved"],
            &summary["drained"]
        ),
        (
            &json!(a),
            &json!(2),
            &json!(1),
            &json!(true),
            &json!(true),
            &json!(true)
        ),
        "{summary}"
    );
    let mut pods_now = cluster.pods("default");
    pods_now.sort();
    assert_eq!(pods_now, [new_pod.clone(), new_pod2.clone()]);
    assert_eq!(lab.migration_images(&b).len(), 2);

    // 3. Drained already: a one-shot drain finds only the daemon's Pod, sends nothing, exit 0.
    let run = Run::of(
        &format!("migrate drain {a} --json"),
        migrate(&["drain", &a, "--json"]).output().unwrap(),
    );
    assert_eq!(run.code, 0);
    let (pods, summary) = json_report(&run);
    assert_eq!(pods.len(), 1, "{pods:#?}");
    assert_eq!(
        (
            &summary["drained"],
            &summary["was_cordoned"],
            &summary["moved"]
        ),
        (&json!(true), &json!(true), &json!(0))
    );

    let report = cluster.finish();
    let requests = report["api_requests"].as_array().unwrap();
    let lines: Vec<&str> = requests
        .iter()
        .map(|r| r["line"].as_str().unwrap())
        .collect();
    let node_patches: Vec<&Value> = requests
        .iter()
        .filter(|r| r["line"] == format!("PATCH {}", node_path(&a)))
        .map(|r| &r["body"])
        .collect();
    assert_eq!(
        node_patches,
        [
            &json!({"spec": {"unschedulable": true}}),
            &json!({"metadata": {"annotations": {"migrate.dev/drain": null}}})
        ],
        "one cordon, one release: {lines:#?}"
    );
    let cordon = lines
        .iter()
        .position(|l| *l == format!("PATCH {}", node_path(&a)))
        .unwrap();
    let first_post = lines
        .iter()
        .position(|l| *l == "POST /api/v1/namespaces/default/pods")
        .unwrap();
    assert!(
        cordon < first_post,
        "cordoned after a Pod moved: {lines:#?}"
    );
    for source in ["counter", "counter2"] {
        assert!(
            lines.contains(&format!("DELETE /api/v1/namespaces/default/pods/{source}").as_str()),
            "{source} not deleted: {lines:#?}"
        );
    }
    let checkpoints: Vec<&str> = report["kubelet_requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        checkpoints,
        [
            "/checkpoint/default/counter/counter",
            "/checkpoint/default/counter2/counter2"
        ]
    );
}
