//! The fake-cluster process (src/bin/fake-cluster.rs) as the lab's Kubernetes tests drive it:
//! started in the source node's network namespace in front of two real lab nodes, asked for
//! the API server's objects over its stdin while it runs, and stopped for its report of the
//! requests both fakes saw. [`FakeCluster::kubernetes_daemon`] turns the source node's daemon
//! into a Kubernetes node's daemon that checkpoints through the fake kubelet.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use engine::lab as lab_nodes;
use serde_json::{json, Value};

use crate::lab::{migrate_binary, Lab};
use crate::wait_for;

/// The fake cluster process; killed when dropped, or stopped (and its report read) by
/// [`FakeCluster::finish`].
#[derive(Debug)]
pub struct FakeCluster {
    child: Child,
    /// Its folder (the kubeconfig, the kubelet's CA and token, its checkpoints, the report),
    /// seen in the nodes as `/shared/fake-cluster`.
    pub dir: PathBuf,
    /// The kubelet's URL.
    pub kubelet_url: String,
    lines: mpsc::Receiver<String>,
}

impl FakeCluster {
    /// Starts `binary` (the test's `env!("CARGO_BIN_EXE_fake-cluster")`: only integration
    /// tests know it) in `node`'s network namespace, its Pod `default/counter` (container
    /// `counter`) on `node`, `target` the node new Pods go to; the daemons are DaemonSet Pods
    /// when `daemon_set`, bare Pods otherwise.
    pub fn start(
        binary: &str,
        lab: &Lab,
        node: &str,
        target: &str,
        daemon_set: bool,
    ) -> FakeCluster {
        let dir = lab.opts.state_dir.join("shared/fake-cluster");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = json!({
            "dir": dir,
            "dir_in_node": "/shared/fake-cluster",
            "migrate": migrate_binary(),
            "lab_dir": lab.opts.state_dir,
            "lab_prefix": lab.opts.prefix,
            "source": node,
            "source_ip": lab.address(node),
            "target": target,
            "target_ip": lab.address(target),
            "namespace": "default",
            "pod": "counter",
            "container": "counter",
            "image": lab_nodes::BUSYBOX_IMAGE,
            "daemon_set": daemon_set,
        });
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        // nsenter, not `ip netns exec`: only the network changes, and /sys stays the host's
        // (the `migrate lab exec` it runs needs the host's cgroup tree).
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.netns(node)))
            .arg(binary)
            .arg(&config_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting fake-cluster");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut cluster = FakeCluster {
            child,
            dir,
            kubelet_url: String::new(),
            lines,
        };
        cluster.kubelet_url = cluster.answer("READY ");
        cluster
    }

    /// Restarts `node`'s daemon in its Kubernetes mode, checkpointing through this fake
    /// kubelet.
    pub fn kubernetes_daemon(&self, lab: &Lab, node: &str) {
        lab_nodes::kill_daemon(node, &lab.opts).unwrap();
        lab_nodes::start_daemon_with(
            node,
            &lab.opts,
            &[
                "--kubelet",
                &self.kubelet_url,
                "--kubelet-ca",
                "/shared/fake-cluster/kubelet-ca.pem",
                "--kubelet-token-file",
                "/shared/fake-cluster/token",
                "--kubelet-checkpoints",
                "/shared/fake-cluster/checkpoints",
            ],
        )
        .unwrap();
    }

    /// The kubeconfig that reaches its API server.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The next stdout line starting with `prefix`, without it.
    fn answer(&mut self, prefix: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("fake-cluster did not answer {prefix:?} within 30 s"));
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_string();
            }
        }
    }

    /// Writes `command` on its stdin; the JSON of its answer line (after `prefix`).
    fn ask(&mut self, command: &str, prefix: &str) -> Value {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let answer = self.answer(prefix);
        serde_json::from_str(&answer).unwrap_or(Value::String(answer))
    }

    /// The API server's object at `path` (`null` when there is none).
    pub fn get(&mut self, path: &str) -> Value {
        self.ask(&format!("GET {path}"), "OBJECT ")
    }

    /// Stores (or replaces) an object in the API server.
    pub fn seed(&mut self, obj: &Value) {
        self.ask(&format!("SEED {obj}"), "SEEDED ");
    }

    /// The names of the Pods in `namespace`.
    pub fn pods(&mut self, namespace: &str) -> Vec<String> {
        serde_json::from_value(self.ask(&format!("PODS {namespace}"), "PODS ")).unwrap()
    }

    /// Closes its stdin, waits for it to write its report, and returns the report.
    pub fn finish(mut self) -> Value {
        drop(self.child.stdin.take());
        let status = wait_for("fake-cluster to exit", Duration::from_secs(30), || {
            self.child.try_wait().unwrap()
        });
        assert!(status.success(), "fake-cluster failed: {status}");
        let text = std::fs::read_to_string(self.dir.join("report.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
