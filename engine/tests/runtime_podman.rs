//! The runtime seam against the real thing: two lab nodes (lab/enter.sh), each driven only
//! through `engine::runtime::Runtime` by a `Podman` whose command prefix is `lab/exec.sh NODE
//! --`. A busybox counter on node A is checkpointed with leave-running (it must still run),
//! turned into an image by `engine::image`, imported and restored on node B, where it must go
//! on from its checkpointed value; then cleanup, the rollback path (a stopped source restored
//! in place from its own archive) and the "no such container" error. Needs root and the lab
//! root at /var/lib/migrate-lab/rootfs (`make test` builds it); without them it fails and says why.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use engine::image::{self, ImageOptions};
use engine::runtime::{Runtime, RuntimeError};

/// Runs `f`, printing how long it took under `what`.
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let v = f();
    println!("timing: {what}: {:.2} s", t.elapsed().as_secs_f64());
    v
}

#[test]
fn lab_podman_runtime_moves_a_counter() {
    support::require_lab("lab_podman_runtime_moves_a_counter");
    let nodes = timed("two nodes up", || {
        support::Lab::start("runtime", &["rt-a", "rt-b"])
    });
    let (a, b) = (nodes.podman(0), nodes.podman(1));
    println!("source: {}\ntarget: {}", a.describe(), b.describe());

    // Setup, not under test: the busybox image in both nodes and the counter on A.
    nodes.start_counter(0, "counter");
    assert!(a.is_running("counter").unwrap());

    // Pre-copy style checkpoint: the source keeps running.
    let shared = nodes.shared();
    let outcome = timed("checkpoint --leave-running on A", || {
        a.checkpoint("counter", Path::new("/shared/ckpt.tar"), true)
            .unwrap()
    });
    println!("{outcome:?}");
    assert_eq!(outcome.container_id.len(), 64, "{outcome:?}");
    let stats = outcome.stats.expect("podman --print-stats gave statistics");
    assert!(stats.pages_written > 0, "{stats:?}");
    assert!(a.is_running("counter").unwrap(), "the source stopped");
    let archive = shared.join("ckpt.tar");
    assert_eq!(
        fs::metadata(&archive).unwrap().permissions().mode() & 0o777,
        0o600,
        "the checkpoint archive is not private"
    );
    let count = support::checkpointed_count(&archive);

    // The image, imported and restored on B under another name.
    let version = nodes.exec(0, &["podman", "version", "--format", "{{.Client.Version}}"]);
    let reference = "localhost/migrate/counter:rt-test";
    let mut opts = ImageOptions::new(reference);
    opts.engine_version = Some(version.trim().to_string());
    timed("write_oci_archive", || {
        image::write_oci_archive(&archive, &shared.join("img.tar"), &opts).unwrap()
    });
    let loaded = timed("import_image on B", || {
        b.import_image(Path::new("/shared/img.tar")).unwrap()
    });
    assert_eq!(loaded, reference);
    let id = timed("restore on B", || {
        b.restore(&loaded, Some("moved")).unwrap()
    });
    // A restore under a new name gets a new ID (without --name podman keeps the old one).
    assert_eq!(id.len(), 64, "{id}");
    assert!(b.is_running("moved").unwrap());
    nodes.assert_continues(1, "moved", count);
    assert!(a.is_running("counter").unwrap(), "the source stopped");

    // Cleanup on B, twice (the second finds nothing and still succeeds).
    for _ in 0..2 {
        timed("remove_container + remove_image on B", || {
            b.remove_container("moved").unwrap();
            b.remove_image(reference).unwrap();
        });
    }
    assert!(matches!(
        b.is_running("moved"),
        Err(RuntimeError::NoSuchContainer { .. })
    ));
    let images = nodes.exec(
        1,
        &["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
    );
    assert!(!images.contains(reference), "{reference} is still on B");

    // The rollback path: a final (stopping) checkpoint, the container removed, then restored
    // in place from its own archive; it continues.
    timed("checkpoint (stopping) on A", || {
        a.checkpoint("counter", Path::new("/shared/final.tar"), false)
            .unwrap()
    });
    assert!(!a.is_running("counter").unwrap(), "the source still runs");
    let count = support::checkpointed_count(&shared.join("final.tar"));
    a.remove_container("counter").unwrap();
    let back = timed("restore_in_place on A", || {
        a.restore_in_place(Path::new("/shared/final.tar")).unwrap()
    });
    assert_eq!(back, outcome.container_id);
    assert!(a.is_running("counter").unwrap());
    nodes.assert_continues(0, "counter", count);

    // A container that does not exist is named in the error.
    let err = a
        .checkpoint("no-such-ctr", Path::new("/shared/none.tar"), true)
        .unwrap_err();
    println!("error: {err}");
    match &err {
        RuntimeError::NoSuchContainer { container, .. } => assert_eq!(container, "no-such-ctr"),
        other => panic!("expected NoSuchContainer, got {other:?}"),
    }
    assert!(err.to_string().contains("no-such-ctr"), "{err}");
    assert!(!shared.join("none.tar").exists());
}
