//! The runtime seam against the real thing: two lab nodes (lab/enter.sh), each driven only
//! through `engine::runtime::Runtime` by a `Podman` whose command prefix is `lab/exec.sh NODE
//! --`. A busybox counter on node A is checkpointed with leave-running (it must still run),
//! then with a stopping checkpoint, whose archive is turned into an image by `engine::image`,
//! imported and restored on node B, where it must go on from its checkpointed value; then
//! cleanup, the rollback path (the stopped source restored in place from the same archive),
//! a restore CRIU fails (the error must quote CRIU's log) and the "no such container" error.
//! Needs root and the lab root at /var/lib/migrate-lab/rootfs (`make test` builds it); without them it fails and says why.

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

    // Pre-copy style checkpoint: the source keeps running. Its archive is never restored:
    // Podman takes the file changes after the container resumed, so a file the counter had
    // open during the dump may be missing from it (see `Runtime::checkpoint`).
    let shared = nodes.shared();
    let outcome = timed("checkpoint --leave-running on A", || {
        a.checkpoint("counter", Path::new("/shared/pre.tar"), true)
            .unwrap()
    });
    println!("{outcome:?}");
    assert_eq!(outcome.container_id.len(), 64, "{outcome:?}");
    assert!(outcome.left_running);
    let stats = outcome.stats.expect("podman --print-stats gave statistics");
    assert!(stats.pages_written > 0, "{stats:?}");
    assert!(a.is_running("counter").unwrap(), "the source stopped");
    assert_private(&shared.join("pre.tar"));

    // The final checkpoint stops the source; its archive is what moves.
    let last = timed("checkpoint (stopping) on A", || {
        a.checkpoint("counter", Path::new("/shared/final.tar"), false)
            .unwrap()
    });
    assert_eq!(last.container_id, outcome.container_id);
    assert!(!last.left_running);
    assert!(!a.is_running("counter").unwrap(), "the source still runs");
    let archive = shared.join("final.tar");
    assert_private(&archive);
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
    assert_ne!(id, outcome.container_id);
    assert!(b.is_running("moved").unwrap());
    nodes.assert_continues(1, "moved", count);

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

    // The rollback path: the stopped source removed, then restored in place from its own
    // final archive; it continues.
    a.remove_container("counter").unwrap();
    let back = timed("restore_in_place on A", || {
        a.restore_in_place(Path::new("/shared/final.tar")).unwrap()
    });
    assert_eq!(back, outcome.container_id);
    assert!(a.is_running("counter").unwrap());
    nodes.assert_continues(0, "counter", count);

    // A restore CRIU fails: the error quotes CRIU's own log. The archive of a container
    // holding /tmp/held open, with that file taken out of its file changes.
    nodes.exec(
        0,
        &[
            "podman",
            "run",
            "-d",
            "--name",
            "held",
            "--network=host",
            engine::lab::BUSYBOX_IMAGE,
            "sh",
            "-c",
            "echo x > /tmp/held; exec 3</tmp/held; while true; do sleep 0.2; done",
        ],
    );
    a.checkpoint("held", Path::new("/shared/held.tar"), false)
        .unwrap();
    without_changed_file(
        &shared.join("held.tar"),
        &shared.join("bad.tar"),
        "tmp/held",
    );
    let err = b
        .restore_in_place(Path::new("/shared/bad.tar"))
        .unwrap_err();
    println!("error: {err}");
    match &err {
        RuntimeError::Criu { criu_errors, .. } => assert!(
            criu_errors.iter().any(|l| l.contains("tmp/held")),
            "CRIU's log lines do not name the missing file: {criu_errors:?}"
        ),
        other => panic!("expected a CRIU error, got {other:?}"),
    }

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

/// Asserts the checkpoint archive at `path` is readable by its owner only.
fn assert_private(path: &Path) {
    assert_eq!(
        fs::metadata(path).unwrap().permissions().mode() & 0o777,
        0o600,
        "the checkpoint archive {} is not private",
        path.display()
    );
}

/// Copies the checkpoint archive `from` to `to` (mode 0600) without `file` in its file
/// changes (`rootfs-diff.tar`): a restore then misses a file the process had open.
fn without_changed_file(from: &Path, to: &Path, file: &str) {
    let mut outer = tar::Archive::new(fs::File::open(from).unwrap());
    let mut out = tar::Builder::new(fs::File::create(to).unwrap());
    let mut dropped = false;
    for entry in outer.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut header = entry.header().clone();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut body).unwrap();
        if entry.path().unwrap().to_str() == Some("rootfs-diff.tar") {
            let mut diff = tar::Builder::new(Vec::new());
            let mut inner = tar::Archive::new(&body[..]);
            for f in inner.entries().unwrap() {
                let mut f = f.unwrap();
                if f.path().unwrap().to_string_lossy().trim_start_matches("./") == file {
                    dropped = true;
                    continue;
                }
                let h = f.header().clone();
                diff.append(&h, &mut f).unwrap();
            }
            body = diff.into_inner().unwrap();
            header.set_size(body.len() as u64);
            header.set_cksum();
        }
        out.append(&header, &body[..]).unwrap();
    }
    out.finish().unwrap();
    assert!(
        dropped,
        "no {file} in the file changes of {}",
        from.display()
    );
    fs::set_permissions(to, fs::Permissions::from_mode(0o600)).unwrap();
}
