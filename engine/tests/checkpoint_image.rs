//! The checkpoint image (`engine::image`): blobs match the digests and sizes that name them,
//! the manifest carries the CRI-O, Podman and checkpointctl annotations, the layer lists the
//! archive's entries at `/`, a hostile archive leaves nothing behind, and outputs are 0600/0700.
//! `lab_podman_restores_the_image` is the proof with the real thing: two lab nodes (lab/enter.sh),
//! a busybox counter checkpointed on node A, this crate's image loaded with `podman load` on
//! node B and restored with `podman container restore IMAGE`; the counter must go on from its
//! checkpointed value. It needs root and the lab root at /var/lib/migrate-lab/rootfs, which
//! `make test` builds (lab/rootfs.sh); without them it fails and says why.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use engine::image::{self, ImageError, ImageOptions, Index, Manifest};
use tar::{EntryType, Header};

const CONFIG: &str = r#"{"id":"45874932","name":"counter","RawImageName":"localhost/lab/busybox","rootfsImageID":"1f82cfcf","rootfsImageName":"localhost/lab/busybox:latest","runtime":"crun","createdTime":"2026-11-27T16:40:00Z","checkpointedTime":"2026-11-27T16:50:00Z"}"#;
const SPEC: &str = r#"{"ociVersion":"1.0.2","annotations":{"io.container.manager":"libpod"}}"#;

fn entry(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: EntryType, link: &str, data: &[u8]) {
    let mut h = Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_795_798_249);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// A Podman-like archive; `extra` adds entries before the end.
fn archive(dir: &Path, extra: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    entry(
        &mut b,
        "config.dump",
        EntryType::Regular,
        "",
        CONFIG.as_bytes(),
    );
    entry(&mut b, "spec.dump", EntryType::Regular, "", SPEC.as_bytes());
    entry(&mut b, "checkpoint/", EntryType::Directory, "", b"");
    entry(
        &mut b,
        "checkpoint/pages-1.img",
        EntryType::Regular,
        "",
        &[7u8; 8192],
    );
    entry(
        &mut b,
        "checkpoint/dump.log",
        EntryType::Regular,
        "",
        b"(00.000000) Version: 4.2.1 (gitid 0)\n",
    );
    entry(
        &mut b,
        "./rootfs-diff.tar",
        EntryType::Regular,
        "",
        &[0u8; 1024],
    );
    entry(
        &mut b,
        "checkpoint/link",
        EntryType::Symlink,
        "pages-1.img",
        b"",
    );
    extra(&mut b);
    let path = dir.join("ckpt.tar");
    fs::write(&path, b.into_inner().unwrap()).unwrap();
    path
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap()),
    )
    .unwrap()
}

fn options() -> ImageOptions {
    let mut o = ImageOptions::new("localhost/migrate/counter:mig-1");
    o.engine_version = Some("5.4.2".into());
    o
}

#[test]
fn layout_blobs_match_their_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = archive(tmp.path(), |_| {});
    let out = tmp.path().join("img");
    let made = image::write_layout(&src, &out, &options()).unwrap();

    let index: Index = serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index.manifests.len(), 1);
    let m = &index.manifests[0];
    assert_eq!(
        m.annotations["org.opencontainers.image.ref.name"],
        "localhost/migrate/counter:mig-1"
    );
    let manifest_bytes = blob(&out, &m.digest);
    assert_eq!(image::sha256_digest(&manifest_bytes), m.digest);
    assert_eq!(manifest_bytes.len() as u64, m.size);
    assert_eq!(made.manifest.digest, m.digest);
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest, made.manifest_body);

    let config_bytes = blob(&out, &manifest.config.digest);
    assert_eq!(image::sha256_digest(&config_bytes), manifest.config.digest);
    assert_eq!(config_bytes.len() as u64, manifest.config.size);
    let config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
    assert_eq!(config["architecture"], image::node_architecture());
    assert_eq!(config["os"], "linux");

    assert_eq!(manifest.layers.len(), 1);
    let layer = &manifest.layers[0];
    assert_eq!(layer.media_type, image::LAYER_MEDIA_TYPE);
    let layer_bytes = blob(&out, &layer.digest);
    assert_eq!(image::sha256_digest(&layer_bytes), layer.digest);
    assert_eq!(layer_bytes.len() as u64, layer.size);
    assert_eq!(config["rootfs"]["diff_ids"][0], layer.digest.as_str());

    // Exactly the blobs named, nothing left over.
    let on_disk: BTreeSet<String> = fs::read_dir(out.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let named: BTreeSet<String> = [&m.digest, &manifest.config.digest, &layer.digest]
        .iter()
        .map(|d| d.strip_prefix("sha256:").unwrap().to_string())
        .collect();
    assert_eq!(on_disk, named);
}

#[test]
fn manifest_has_the_runtime_annotations() {
    let tmp = tempfile::tempdir().unwrap();
    let src = archive(tmp.path(), |_| {});
    let made = image::write_layout(&src, &tmp.path().join("img"), &options()).unwrap();
    let a = &made.manifest_body.annotations;
    let want = [
        ("io.kubernetes.cri-o.annotations.checkpoint.name", "counter"),
        ("io.podman.annotations.checkpoint.name", "counter"),
        (
            "io.podman.annotations.checkpoint.rawImageName",
            "localhost/lab/busybox",
        ),
        ("io.podman.annotations.checkpoint.rootfsImageID", "1f82cfcf"),
        (
            "io.podman.annotations.checkpoint.rootfsImageName",
            "localhost/lab/busybox:latest",
        ),
        ("io.podman.annotations.checkpoint.runtime.name", "crun"),
        ("io.podman.annotations.checkpoint.podman.version", "5.4.2"),
        ("io.podman.annotations.checkpoint.criu.version", "40201"),
        ("org.criu.checkpoint.container.name", "counter"),
        ("org.criu.checkpoint.engine.name", "podman"),
        ("org.criu.checkpoint.engine.version", "5.4.2"),
        (
            "org.criu.checkpoint.rootfsImageName",
            "localhost/lab/busybox:latest",
        ),
        ("org.criu.checkpoint.rootfsImageID", "1f82cfcf"),
        ("org.criu.checkpoint.rawImageName", "localhost/lab/busybox"),
        ("org.criu.checkpoint.runtime.name", "crun"),
        ("org.criu.checkpoint.criu.version", "4.2.1"),
    ];
    for (k, v) in want {
        assert_eq!(a.get(k).map(String::as_str), Some(v), "annotation {k}");
    }
}

#[test]
fn layer_holds_the_archive_entries_at_root() {
    let tmp = tempfile::tempdir().unwrap();
    let src = archive(tmp.path(), |_| {});
    let out = tmp.path().join("img");
    let made = image::write_layout(&src, &out, &options()).unwrap();
    let layer = blob(&out, &made.manifest_body.layers[0].digest);
    let mut listed = Vec::new();
    let mut tar = tar::Archive::new(&layer[..]);
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        assert_eq!(e.header().uid().unwrap(), 0);
        if path == "checkpoint/pages-1.img" {
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            assert_eq!(data, vec![7u8; 8192]);
        }
        if path == "checkpoint/link" {
            assert_eq!(e.header().entry_type(), EntryType::Symlink);
            assert_eq!(
                e.link_name().unwrap().unwrap().to_str(),
                Some("pages-1.img")
            );
        }
        listed.push(path);
    }
    assert_eq!(
        listed,
        [
            "config.dump",
            "spec.dump",
            "checkpoint",
            "checkpoint/pages-1.img",
            "checkpoint/dump.log",
            "rootfs-diff.tar",
            "checkpoint/link"
        ]
    );
}

#[test]
fn hostile_archive_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // The escaping symlink comes last: only the whole-archive pass can refuse it in time.
    let src = archive(tmp.path(), |b| {
        entry(
            b,
            "checkpoint/evil",
            EntryType::Symlink,
            "../../etc/shadow",
            b"",
        );
    });
    let out = tmp.path().join("img");
    let err = image::write_layout(&src, &out, &options()).unwrap_err();
    assert!(matches!(err, ImageError::Inspect(_)), "{err}");
    let err = image::write_oci_archive(&src, &tmp.path().join("img.tar"), &options()).unwrap_err();
    assert!(matches!(err, ImageError::Inspect(_)), "{err}");
    let linked = ImageOptions {
        link_archive: true,
        ..options()
    };
    let err = image::write_layout(&src, &out, &linked).unwrap_err();
    assert!(matches!(err, ImageError::Inspect(_)), "{err}");
    let left: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("ckpt.tar")]);
}

/// With `link_archive` the layer is the archive file itself: same bytes, same inode, digest
/// and size in the manifest; the annotations are those of the copying path.
#[test]
fn linked_layer_is_the_archive_itself() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = archive(tmp.path(), |_| {});
    let copied = image::write_layout(&src, &tmp.path().join("copied"), &options()).unwrap();
    let linked_options = ImageOptions {
        link_archive: true,
        ..options()
    };
    let out = tmp.path().join("linked");
    let linked = image::write_layout(&src, &out, &linked_options).unwrap();
    let layer = &linked.manifest_body.layers[0];
    let bytes = fs::read(&src).unwrap();
    assert_eq!(layer.digest, image::sha256_digest(&bytes));
    assert_eq!(layer.size, bytes.len() as u64);
    let blob_path = out
        .join("blobs/sha256")
        .join(&layer.digest["sha256:".len()..]);
    assert_eq!(
        fs::metadata(&blob_path).unwrap().ino(),
        fs::metadata(&src).unwrap().ino(),
        "the layer is not a hard link to the archive"
    );
    assert_eq!(
        linked.manifest_body.annotations, copied.manifest_body.annotations,
        "RawImageName and the rest must not depend on how the layer was made"
    );
    assert_eq!(linked.manifest_body.config.digest.len(), 71);
}

#[test]
fn outputs_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let src = archive(tmp.path(), |_| {});
    let out = tmp.path().join("img");
    image::write_layout(&src, &out, &options()).unwrap();
    for e in walk(&out) {
        let mode = fs::symlink_metadata(&e).unwrap().permissions().mode() & 0o777;
        let want = if e.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{}", e.display());
    }
    let tar_out = tmp.path().join("img.tar");
    image::write_oci_archive(&src, &tar_out, &options()).unwrap();
    assert_eq!(
        fs::metadata(&tar_out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The oci-archive holds the same layout.
    let mut names = Vec::new();
    for e in tar::Archive::new(fs::File::open(&tar_out).unwrap())
        .entries()
        .unwrap()
    {
        names.push(e.unwrap().path().unwrap().to_string_lossy().into_owned());
    }
    assert!(names.contains(&"index.json".to_string()) && names.contains(&"oci-layout".to_string()));
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("blobs/sha256/") && n.len() > 20)
            .count(),
        3
    );
    // An existing target is refused.
    assert!(matches!(
        image::write_layout(&src, &out, &options()),
        Err(ImageError::TargetExists(_))
    ));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all.extend(walk(&p));
        } else {
            all.push(p);
        }
    }
    all
}

// ---- the lab proof ----

#[test]
fn lab_podman_restores_the_image() {
    support::require_lab("lab_podman_restores_the_image");
    let nodes = support::Lab::start("image", &["img-a", "img-b"]);
    nodes.start_counter(0, "counter");
    nodes.exec(
        0,
        &[
            "podman",
            "container",
            "checkpoint",
            "--export=/shared/ckpt.tar",
            "--compress=none",
            "counter",
        ],
    );
    let version = nodes.exec(0, &["podman", "version", "--format", "{{.Client.Version}}"]);

    let shared = nodes.shared();
    let count = support::checkpointed_count(&shared.join("ckpt.tar"));
    let mut opts = ImageOptions::new("localhost/migrate/counter:mig-test");
    opts.engine_version = Some(version.trim().to_string());
    let made =
        image::write_oci_archive(&shared.join("ckpt.tar"), &shared.join("img.tar"), &opts).unwrap();
    println!(
        "manifest {}:\n{}",
        made.manifest.digest,
        serde_json::to_string_pretty(&made.manifest_body).unwrap()
    );
    // An oci-archive: `podman load -i DIR` loads a layout untagged (it ignores the ref name).
    nodes.exec(1, &["podman", "load", "-i", "/shared/img.tar"]);
    nodes.exec(1, &["podman", "images"]);
    nodes.exec(
        1,
        &[
            "podman",
            "container",
            "restore",
            "localhost/migrate/counter:mig-test",
        ],
    );
    nodes.assert_continues(1, "counter", count);
    nodes.exec(1, &["podman", "ps"]);
}
