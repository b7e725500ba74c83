//! The Kubernetes path on real data: `migrate POD --from --to -n NS` against a fake API server
//! and a fake kubelet (src/bin/fake-cluster.rs) in front of two real lab nodes. Everything
//! else is real: the fake kubelet has real CRIU checkpoint the container in the source node
//! (podman, leaving it running, as CRI-O does for the kubelet); the source node's daemon runs
//! in its Kubernetes mode (`--kubelet`), claims the archive and streams it over QUIC to the
//! target's daemon, which builds and imports the CRI-O checkpoint image; the CLI creates the
//! new Pod pinned to the target with that image, and the target's "kubelet" restores the
//! container from the very image the Pod names, as a CRI-O node would. Root and the lab root
//! are required; without them the test fails saying so.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::fake_cluster::FakeCluster;
use e2e::lab::{count, migrate_binary, start_counter, Lab};
use e2e::wait_for;
use serde_json::Value;

#[test]
fn pod_moves_through_the_kubelet_and_a_checkpoint_image() {
    let lab = Lab::up("k");
    let (a, b) = (lab.a.clone(), lab.b.clone());
    start_counter(&lab, &a);
    let before = wait_for("counter in the source", Duration::from_secs(30), || {
        count(&lab, &a).filter(|&c| c > 20)
    });

    let cluster = FakeCluster::start(env!("CARGO_BIN_EXE_fake-cluster"), &lab, &a, &b, false);
    // The source node's daemon becomes a Kubernetes node's daemon.
    cluster.kubernetes_daemon(&lab, &a);

    let out = Command::new("ip")
        .args(["netns", "exec", &lab.netns(&a)])
        .arg(migrate_binary())
        .args(["counter", "--from", &a, "--to", &b, "-n", "default"])
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .arg("--certs")
        .arg(lab.state.operator_certs())
        .args(["--ready-timeout", "60"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!("$ migrate counter --from {a} --to {b} -n default\n{stdout}\n{stderr}");
    assert!(out.status.success(), "the Pod migration failed");
    assert!(
        stdout.contains("the new Pod is default/counter-"),
        "{stdout}"
    );

    // The target's "kubelet" restored the container from the image the Pod names: it runs
    // there and counts on from where the checkpoint was taken.
    let after = wait_for("counter in the target", Duration::from_secs(30), || {
        count(&lab, &b).filter(|&c| c > before)
    });
    println!("counter: {before} on {a} before, {after} on {b} after");
    // The image stays on the target: the kubelet needs it again if the container restarts.
    let images = lab.migration_images(&b);
    assert_eq!(images.len(), 1, "{images:?}");
    // The kubelet's archive was taken out of its folder; no work files are left.
    let left: Vec<_> = std::fs::read_dir(cluster.dir.join("checkpoints"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "archives left by the kubelet: {left:?}");
    wait_for("empty work folders", Duration::from_secs(30), || {
        (lab.work_files(&a).is_empty() && lab.work_files(&b).is_empty()).then_some(())
    });

    let report = cluster.finish();
    let kubelet: Vec<&Value> = report["kubelet_requests"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(kubelet.len(), 1, "{kubelet:?}");
    assert_eq!(kubelet[0]["path"], "/checkpoint/default/counter/counter");
    assert!(
        kubelet[0]["identity"].as_str().unwrap().contains("Token"),
        "{kubelet:?}"
    );
    let requests = report["api_requests"].as_array().unwrap();
    let lines: Vec<&str> = requests
        .iter()
        .map(|r| r["line"].as_str().unwrap())
        .collect();
    let post = requests
        .iter()
        .position(|r| r["line"] == "POST /api/v1/namespaces/default/pods")
        .unwrap_or_else(|| panic!("no Pod created: {lines:?}"));
    let delete = lines
        .iter()
        .position(|l| *l == "DELETE /api/v1/namespaces/default/pods/counter")
        .unwrap_or_else(|| panic!("the source Pod was not deleted: {lines:?}"));
    assert!(
        post < delete,
        "deleted before the new Pod existed: {lines:?}"
    );
    let pod = &requests[post]["body"];
    assert_eq!(pod["spec"]["nodeName"], b.as_str(), "{pod}");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["imagePullPolicy"], "Never", "{pod}");
    assert_eq!(
        container["image"].as_str(),
        Some(images[0].as_str()),
        "the Pod does not name the imported image: {pod}"
    );
    let pods = report["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert!(
        pods[0].as_str().unwrap().starts_with("counter-"),
        "{pods:?}"
    );
    let _ = std::io::stdout().flush();
}
