//! `fake-cluster CONFIG.json`: the Kubernetes parts that cannot run on this machine, in front
//! of real lab nodes, for tests/kubernetes.rs and tests/cli_drain_kubernetes.rs. Run inside
//! the source node's network namespace (`ip netns exec`), it serves
//! - a fake kubelet (HTTPS, bearer token) whose checkpoint endpoint has real CRIU checkpoint
//!   the container in the source lab node (`podman container checkpoint --leave-running
//!   --export`, as CRI-O does for the kubelet) into the checkpoints folder it reports;
//! - a fake API server holding the two Nodes, a migrate daemon Pod on each (with the nodes' lab
//!   addresses) and the source Pod; a Pod created on the target node is started the way the
//!   target's kubelet and CRI-O would: restored from the checkpoint image its spec names, in
//!   the target lab node, then marked Running and Ready.
//!
//! It writes the kubelet's CA, the token and a kubeconfig into the configured folder, prints
//! `READY <kubelet URL>`, and runs until its standard input closes; then it writes
//! `report.json` (the requests both fakes saw, and the Pods left) and exits.
//!
//! Meanwhile each line on its standard input may be a command to the fake API server, answered
//! on one line of standard output (tests/cli_drain_kubernetes.rs marks nodes with them; other
//! lines are ignored): `SEED <object JSON>` stores (or replaces) an object, `SEEDED <path>`;
//! `GET <path>` reads one, `OBJECT <JSON or null>`; `PODS <namespace>` names the Pods there,
//! `PODS <JSON array>`.

use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use e2e::fake_apiserver::FakeApiServer;
use e2e::fake_kubelet::{FakeKubelet, FakeKubeletConfig};
use serde::Deserialize;
use serde_json::{json, Value};

/// The token the daemon presents to the fake kubelet.
const TOKEN: &str = "lab-daemon-token";

#[derive(Debug, Deserialize)]
struct Config {
    /// Host folder for the CA, token, kubeconfig, checkpoints and report.
    dir: PathBuf,
    /// The same folder as the lab nodes see it (under /shared).
    dir_in_node: PathBuf,
    /// The `migrate` binary, for `migrate lab exec`.
    migrate: PathBuf,
    /// MIGRATE_LAB_DIR and MIGRATE_LAB_PREFIX of the lab.
    lab_dir: PathBuf,
    lab_prefix: String,
    /// Source and target node names, and their lab addresses.
    source: String,
    source_ip: String,
    target: String,
    target_ip: String,
    /// The Pod: namespace, name, its one container (a podman container of that name runs in
    /// the source node) and image.
    namespace: String,
    pod: String,
    container: String,
    image: String,
    /// The daemon Pods belong to a DaemonSet, as in a real cluster (a drain leaves them on
    /// their node); by default they are bare Pods.
    #[serde(default)]
    daemon_set: bool,
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: fake-cluster CONFIG.json");
    let text = std::fs::read_to_string(&path).expect("reading the config");
    let config: Config = serde_json::from_str(&text).expect("parsing the config");
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(serve(Arc::new(config)));
}

async fn serve(config: Arc<Config>) {
    let checkpoints = config.dir.join("checkpoints");
    std::fs::create_dir_all(&checkpoints).expect("creating the checkpoints folder");

    let c = config.clone();
    let kubelet = FakeKubelet::start(
        FakeKubeletConfig::new(move |call| {
            let name = format!(
                "checkpoint-{}_{}-{}-{}.tar",
                call.pod,
                call.namespace,
                call.container,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            );
            let in_node = c.dir_in_node.join("checkpoints").join(&name);
            let export = format!("--export={}", in_node.display());
            lab_exec(
                &c,
                &c.source,
                &[
                    "podman",
                    "container",
                    "checkpoint",
                    "--leave-running",
                    "--compress=none",
                    &export,
                    &call.container,
                ],
            )
            .map_err(|e| {
                (
                    500,
                    format!("checkpointing of {} failed ({e})", call.container),
                )
            })?;
            // The kubelet's archives are private, as CRI-O writes them.
            let on_host = c.dir.join("checkpoints").join(&name);
            let _ = std::fs::set_permissions(&on_host, std::fs::Permissions::from_mode(0o600));
            Ok(in_node)
        })
        .allow_token(TOKEN),
    )
    .await;
    write(&config.dir.join("kubelet-ca.pem"), &kubelet.ca_pem(), 0o644);
    write(&config.dir.join("token"), TOKEN.as_bytes(), 0o600);

    let api = FakeApiServer::start()
        .await
        .expect("starting the fake API server");
    seed(&api, &config);
    let c = config.clone();
    api.on_pod_create_run(Arc::new(move |pod: &Value| {
        // The target's kubelet and CRI-O: restore from the checkpoint image the Pod names, as
        // the container the Pod names (the configured one for the configured Pod).
        let Some(image) = pod["spec"]["containers"][0]["image"].as_str() else {
            return Err("the Pod names no image".to_string());
        };
        let container = pod["spec"]["containers"][0]["name"]
            .as_str()
            .unwrap_or(&c.container);
        if pod["spec"]["nodeName"] != c.target.as_str() {
            return Err(format!("the Pod is not pinned to {}", c.target));
        }
        lab_exec(
            &c,
            &c.target,
            &["podman", "container", "restore", "--name", container, image],
        )
        .map(drop)
    }));
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": api.url()}}],
        "users": [{"name": "tester", "user": {"token": "tester-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester",
                      "namespace": config.namespace}}],
        "current-context": "fake",
    });
    write(
        &config.dir.join("kubeconfig"),
        kubeconfig.to_string().as_bytes(),
        0o600,
    );
    println!("READY {}", kubelet.url());
    std::io::stdout().flush().expect("stdout");

    // Until the test closes our stdin, answering its commands.
    let api = Arc::new(api);
    let commands = api.clone();
    tokio::task::spawn_blocking(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else {
                break;
            };
            if let Some(answer) = command(&commands, &line) {
                println!("{answer}");
                let _ = std::io::stdout().flush();
            }
        }
    })
    .await
    .expect("stdin task");

    let report = json!({
        "api_requests": api.requests().iter().map(|r| json!({
            "line": r.line(),
            "body": r.body,
        })).collect::<Vec<_>>(),
        "kubelet_requests": kubelet.requests().iter().map(|r| json!({
            "method": r.method,
            "path": r.path,
            "query": r.query,
            "identity": format!("{:?}", r.identity),
        })).collect::<Vec<_>>(),
        "pods": api.pod_names(&config.namespace),
    });
    write(
        &config.dir.join("report.json"),
        report.to_string().as_bytes(),
        0o644,
    );
}

/// The answer to a command line of the test (`SEED`, `GET`, `PODS`), if it is one.
fn command(api: &FakeApiServer, line: &str) -> Option<String> {
    let (verb, rest) = line.split_once(' ')?;
    Some(match verb {
        "SEED" => match serde_json::from_str::<Value>(rest) {
            Ok(obj) => format!("SEEDED {}", api.seed(obj)),
            Err(e) => format!("ERROR not JSON: {e}"),
        },
        "GET" => format!("OBJECT {}", api.object(rest.trim()).unwrap_or(Value::Null)),
        "PODS" => format!("PODS {}", json!(api.pod_names(rest.trim()))),
        _ => return None,
    })
}

/// The Nodes, the daemon Pods and the source Pod.
fn seed(api: &FakeApiServer, c: &Config) {
    for (name, ip) in [(&c.source, &c.source_ip), (&c.target, &c.target_ip)] {
        api.seed(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name},
            "status": {
                "addresses": [{"type": "InternalIP", "address": ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }));
        let mut daemon = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("migrate-daemon-{name}"), "namespace": "migrate",
                         "labels": {"app.kubernetes.io/name": "migrate-daemon"}},
            "spec": {"nodeName": name, "hostNetwork": true,
                     "containers": [{"name": "daemon", "image": "localhost/migrate/daemon:dev"}]},
            "status": {"phase": "Running", "podIP": ip, "hostIP": ip,
                       "conditions": [{"type": "Ready", "status": "True"}]},
        });
        if c.daemon_set {
            daemon["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1",
                "kind": "DaemonSet", "name": "migrate-daemon", "uid": "migrate-daemon-uid",
                "controller": true}]);
        }
        api.seed(daemon);
    }
    api.seed(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": c.pod, "namespace": c.namespace, "labels": {"app": c.pod}},
        "spec": {"nodeName": c.source,
                 "containers": [{"name": c.container, "image": c.image}]},
        "status": {"phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }));
}

/// Runs `migrate lab exec NODE -- ARGS...`; stdout, or the error with its stderr.
fn lab_exec(c: &Config, node: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(&c.migrate)
        .args(["lab", "exec", node, "--"])
        .args(args)
        .env("MIGRATE_LAB_DIR", &c.lab_dir)
        .env("MIGRATE_LAB_PREFIX", &c.lab_prefix)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", c.migrate.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` in {node}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn write(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}
