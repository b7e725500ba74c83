//! Checkpoint archives built with the `tar` crate in a tempdir, laid out like the ones Podman and
//! the kubelet write, and hostile variants of them: each must be refused with its own error, and
//! extracting one must write nothing outside the target directory. `inspect` is checked against
//! a CRI-O-like archive and against the config.dump/spec.dump of a real Podman checkpoint
//! (`tests/fixtures/podman-counter`, from the lab's busybox counter, podman 5.4.2, CRIU 4.2.1).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use engine::archive::{self, ArchiveError, Limits};
use engine::inspect::{self, InspectError};
use tar::{EntryType, Header};

const MTIME: u64 = 1_795_798_249; // 2026-11-27T16:50:49Z

/// Appends one entry whose name and link name are written into the header byte for byte, so
/// names `tar::Builder` would refuse (absolute, `..`, not UTF-8) can be made.
fn raw(b: &mut tar::Builder<Vec<u8>>, name: &[u8], kind: EntryType, link: &[u8], data: &[u8]) {
    let mut h = Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(if kind == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_mtime(MTIME);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    raw(b, name.as_bytes(), EntryType::Regular, b"", data);
}

const CRIO_CONFIG: &str = r#"{"id":"8f1c0d2e","name":"k8s_counter_web-0_shop_7d9e1c2a-11aa-4b7e-9c3d-2f1e0a9b8c7d_1","rootfsImage":"registry.example/counter:1.2","rootfsImageRef":"sha256:9a3f0c","rootfsImageName":"registry.example/counter:1.2","runtime":"runc","createdTime":"2026-11-27T16:40:00Z","checkpointedTime":"2026-11-27T16:50:00.5Z","restored":false}"#;
const CRIO_SPEC: &str = r#"{"ociVersion":"1.0.2","process":{"args":["sh","-c","counter"]},"annotations":{"io.kubernetes.cri-o.Name":"k8s_counter_web-0_shop_7d9e1c2a-11aa-4b7e-9c3d-2f1e0a9b8c7d_1","io.kubernetes.container.name":"counter","io.kubernetes.pod.name":"web-0","io.kubernetes.pod.namespace":"shop"}}"#;

/// A pstree.img of two processes, one with two threads.
fn pstree() -> Vec<u8> {
    let mut v = vec![0x19, 0x43, 0x56, 0x54, 0x30, 0x30, 0x27, 0x50];
    v.extend([
        10, 0, 0, 0, 0x08, 0x01, 0x10, 0x00, 0x18, 0x01, 0x20, 0x01, 0x28, 0x01,
    ]);
    v.extend([
        12, 0, 0, 0, 0x08, 0x07, 0x10, 0x01, 0x18, 0x01, 0x20, 0x01, 0x2a, 0x02, 0x07, 0x08,
    ]);
    v
}

/// The entries of a realistic archive, before `end`.
fn layout(b: &mut tar::Builder<Vec<u8>>, config: &[u8], spec: &[u8]) {
    file(b, "config.dump", config);
    file(b, "spec.dump", spec);
    file(b, "stats-dump", &[0x40, 0x59, 0x10, 0x55]);
    file(
        b,
        "dump.log",
        b"(00.000000) Version: 4.2.1 (gitid 0)\n(00.000050) Running on node1\n",
    );
    file(b, "network.status", b"null");
    raw(b, b"checkpoint/", EntryType::Directory, b"", b"");
    file(b, "checkpoint/inventory.img", &[0; 86]);
    file(b, "checkpoint/pstree.img", &pstree());
    file(b, "checkpoint/core-1.img", &[1; 2279]);
    file(b, "checkpoint/core-7.img", &[1; 2425]);
    file(b, "checkpoint/core-8.img", &[1; 2425]);
    file(b, "checkpoint/pagemap-1.img", &[0; 159]);
    file(b, "checkpoint/pages-1.img", &vec![0xa5; 73728]);
    file(b, "checkpoint/pages-2.img", &vec![0; 65536]);
    // A relative symlink that stays inside, as some runtimes write.
    raw(
        b,
        b"checkpoint/log",
        EntryType::Symlink,
        b"../dump.log",
        b"",
    );
    let mut diff = tar::Builder::new(Vec::new());
    file(&mut diff, "tmp/count", b"11\n");
    file(b, "rootfs-diff.tar", &diff.into_inner().unwrap());
}

fn end(b: tar::Builder<Vec<u8>>) -> Vec<u8> {
    b.into_inner().unwrap()
}

fn good() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    layout(&mut b, CRIO_CONFIG.as_bytes(), CRIO_SPEC.as_bytes());
    end(b)
}

/// A good archive plus one more entry made by `extra`.
fn with(extra: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    layout(&mut b, CRIO_CONFIG.as_bytes(), CRIO_SPEC.as_bytes());
    extra(&mut b);
    end(b)
}

/// Validates `bytes` read as a stream, and as a file whose unread data is skipped by seeking;
/// the two must agree (the same summary, or the same kind of refusal).
fn check(bytes: &[u8]) -> Result<archive::ArchiveSummary, ArchiveError> {
    let streamed = archive::validate(bytes, &Limits::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.tar");
    std::fs::write(&path, bytes).unwrap();
    let from_file = archive::validate_file(&path, &Limits::default());
    match (&streamed, &from_file) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(
            std::mem::discriminant(a),
            std::mem::discriminant(b),
            "streamed: {a}; from the file: {b}"
        ),
        _ => panic!("streamed: {streamed:?}; from the file: {from_file:?}"),
    }
    streamed
}

#[test]
fn a_realistic_archive_passes() {
    let bytes = good();
    let s = check(&bytes).unwrap();
    assert_eq!((s.files, s.dirs, s.links), (14, 1, 1));
    assert_eq!(s.entries, 16);
    // Reading stops at the first of the two zero blocks that end a tar.
    assert_eq!(s.archive_bytes, bytes.len() as u64 - 512);
}

#[test]
fn absolute_path_is_refused() {
    let bytes = with(|b| file(b, "/etc/cron.d/x", b"* * * * * root sh"));
    assert!(
        matches!(check(&bytes), Err(ArchiveError::AbsolutePath { path }) if path == "/etc/cron.d/x")
    );
}

#[test]
fn parent_component_is_refused() {
    let bytes = with(|b| file(b, "../x", b"x"));
    assert!(matches!(check(&bytes), Err(ArchiveError::ParentComponent { path }) if path == "../x"));
    let bytes = with(|b| file(b, "checkpoint/../../x", b"x"));
    assert!(matches!(
        check(&bytes),
        Err(ArchiveError::ParentComponent { .. })
    ));
}

#[test]
fn symlink_to_absolute_path_is_refused() {
    let bytes = with(|b| raw(b, b"passwd", EntryType::Symlink, b"/etc/passwd", b""));
    let err = check(&bytes).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::AbsoluteLink { path, target } if path == "passwd" && target == "/etc/passwd")
    );
    assert_eq!(
        err.to_string(),
        "link \"passwd\" points to the absolute path \"/etc/passwd\""
    );
}

#[test]
fn symlink_escaping_the_root_is_refused() {
    let bytes = with(|b| raw(b, b"a", EntryType::Symlink, b"../../x", b""));
    assert!(matches!(check(&bytes), Err(ArchiveError::LinkEscapes { path, .. }) if path == "a"));
    // Resolved from the link's directory: checkpoint/../.. is above the root.
    let bytes = with(|b| raw(b, b"checkpoint/b", EntryType::Symlink, b"../../etc", b""));
    assert!(matches!(
        check(&bytes),
        Err(ArchiveError::LinkEscapes { .. })
    ));
}

#[test]
fn hard_link_escaping_the_root_is_refused() {
    let bytes = with(|b| raw(b, b"h", EntryType::Link, b"../outside", b""));
    assert!(matches!(check(&bytes), Err(ArchiveError::LinkEscapes { path, .. }) if path == "h"));
    let bytes = with(|b| raw(b, b"h", EntryType::Link, b"/etc/shadow", b""));
    assert!(matches!(
        check(&bytes),
        Err(ArchiveError::AbsoluteLink { .. })
    ));
    // Hard links resolve from the root, so this one is fine.
    let bytes = with(|b| raw(b, b"checkpoint/h", EntryType::Link, b"config.dump", b""));
    check(&bytes).unwrap();
}

#[test]
fn links_through_symlinks_are_refused() {
    // An entry written through a symlink of the archive.
    let bytes = with(|b| {
        raw(b, b"d", EntryType::Symlink, b"checkpoint", b"");
        file(b, "d/x", b"x");
    });
    assert!(
        matches!(check(&bytes), Err(ArchiveError::ThroughSymlink { path, symlink }) if path == "d/x" && symlink == "d")
    );
    // `s -> .` then `t -> s/..`: by name inside, in fact the root's parent.
    let bytes = with(|b| {
        raw(b, b"s", EntryType::Symlink, b".", b"");
        raw(b, b"t", EntryType::Symlink, b"s/..", b"");
    });
    assert!(matches!(
        check(&bytes),
        Err(ArchiveError::ThroughSymlink { .. })
    ));
}

#[test]
fn device_and_fifo_entries_are_refused() {
    for (kind, name) in [
        (EntryType::Char, "character device"),
        (EntryType::Block, "block device"),
        (EntryType::Fifo, "fifo"),
    ] {
        let bytes = with(|b| raw(b, b"checkpoint/dev", kind, b"", b""));
        assert!(
            matches!(check(&bytes), Err(ArchiveError::SpecialFile { path, kind }) if path == "checkpoint/dev" && kind == name)
        );
    }
}

#[test]
fn missing_config_dump_is_refused() {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "spec.dump", CRIO_SPEC.as_bytes());
    file(&mut b, "checkpoint/pages-1.img", &[0; 4096]);
    let bytes = end(b);
    assert!(matches!(
        check(&bytes),
        Err(ArchiveError::Missing {
            name: "config.dump"
        })
    ));
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "config.dump", CRIO_CONFIG.as_bytes());
    assert!(matches!(
        check(&end(b)),
        Err(ArchiveError::Missing { name: "spec.dump" })
    ));
}

#[test]
fn non_utf8_names_are_refused() {
    let bytes = with(|b| raw(b, b"checkpoint/\xff\xfe.img", EntryType::Regular, b"", b"x"));
    assert!(matches!(
        check(&bytes),
        Err(ArchiveError::NonUtf8Name { .. })
    ));
}

#[test]
fn duplicate_entries_are_refused() {
    let bytes = with(|b| file(b, "config.dump", b"{}"));
    assert!(
        matches!(check(&bytes), Err(ArchiveError::Duplicate { path }) if path == "config.dump")
    );
}

#[test]
fn truncated_archives_are_refused() {
    let bytes = good();
    // Inside the data of pages-1.img, inside a header, and at an entry boundary without the
    // end-of-archive blocks.
    let pages_at = find(&bytes, b"checkpoint/pages-1.img") + 512;
    for cut in [pages_at + 1000, pages_at - 300, bytes.len() - 1024] {
        let err = check(&bytes[..cut]).unwrap_err();
        assert!(
            matches!(err, ArchiveError::Truncated { .. }),
            "cut at {cut}: {err}"
        );
    }
    assert!(matches!(check(&[]), Err(ArchiveError::Truncated { .. })));
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn size_bounds_are_enforced() {
    let small = Limits {
        max_entry_bytes: 70_000,
        ..Limits::default()
    };
    let err = archive::validate(&good()[..], &small).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::EntryTooLarge { path, size: 73728, limit: 70_000 } if path == "checkpoint/pages-1.img"),
        "{err}"
    );
    let few = Limits {
        max_entries: 5,
        ..Limits::default()
    };
    assert!(matches!(
        archive::validate(&good()[..], &few),
        Err(ArchiveError::TooManyEntries { limit: 5 })
    ));
}

#[test]
fn extraction_keeps_modes_tight() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    let s = archive::extract(&good()[..], &Limits::default(), &target).unwrap();
    assert_eq!(s.files, 14);
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&target), 0o700);
    assert_eq!(mode(&target.join("checkpoint")), 0o700);
    assert_eq!(mode(&target.join("checkpoint/pages-1.img")), 0o600);
    assert_eq!(
        fs::read(target.join("checkpoint/pages-1.img")).unwrap(),
        vec![0xa5; 73728]
    );
    assert_eq!(
        fs::read_link(target.join("checkpoint/log")).unwrap(),
        Path::new("../dump.log")
    );
    // A second extraction into the now non-empty directory is refused.
    assert!(matches!(
        archive::extract(&good()[..], &Limits::default(), &target),
        Err(ArchiveError::TargetNotEmpty(_))
    ));
}

#[test]
fn hostile_extraction_writes_nothing_outside() {
    let hostile: Vec<Vec<u8>> = vec![
        with(|b| file(b, "../outside/x", b"pwned")),
        with(|b| file(b, "/tmp/outside-abs", b"pwned")),
        with(|b| {
            raw(b, b"esc", EntryType::Symlink, b"../outside", b"");
            file(b, "esc/x", b"pwned");
        }),
        // Inside by name per entry, so it is created, but the write through it is refused.
        with(|b| {
            raw(b, b"in", EntryType::Symlink, b"checkpoint", b"");
            file(b, "in/x", b"pwned");
        }),
        with(|b| raw(b, b"h", EntryType::Link, b"../outside/x", b"")),
        with(|b| raw(b, b"checkpoint/null", EntryType::Char, b"", b"")),
        // A file over a symlink of the same name.
        with(|b| file(b, "checkpoint/log", b"pwned")),
    ];
    for (i, bytes) in hostile.iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("t");
        let err = archive::extract(&bytes[..], &Limits::default(), &target).unwrap_err();
        let left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "case {i} ({err}) left {left:?}");
        assert!(!Path::new("/tmp/outside-abs").exists());
    }
}

#[test]
fn inspect_reads_a_kubernetes_checkpoint() {
    let bytes = good();
    let info = inspect::inspect(&bytes[..], &Limits::default()).unwrap();
    assert_eq!(info.container_name.as_deref(), Some("counter"));
    assert_eq!(info.pod_name.as_deref(), Some("web-0"));
    assert_eq!(info.pod_namespace.as_deref(), Some("shop"));
    assert_eq!(info.engine, "cri-o");
    assert_eq!(info.image.as_deref(), Some("registry.example/counter:1.2"));
    assert_eq!(info.image_ref.as_deref(), Some("sha256:9a3f0c"));
    assert_eq!(info.runtime.as_deref(), Some("runc"));
    assert_eq!(info.criu_version, "4.2.1");
    assert_eq!((info.memory_bytes, info.page_images), (73728 + 65536, 2));
    assert_eq!(info.rootfs_diff_bytes, Some(2048));
    assert_eq!((info.processes, info.threads), (2, Some(3)));
    assert_eq!(info.processes_source, "pstree.img");
    assert_eq!(info.checkpointed.as_deref(), Some("2026-11-27T16:50:00.5Z"));
    assert_eq!(info.archive_bytes, bytes.len() as u64 - 512);
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["pod_namespace"], "shop");
}

#[test]
fn inspect_parses_a_real_podman_checkpoint() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/podman-counter");
    let config = fs::read(dir.join("config.dump")).unwrap();
    let spec = fs::read(dir.join("spec.dump")).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "config.dump", &config);
    file(&mut b, "spec.dump", &spec);
    file(&mut b, "checkpoint/core-1.img", &[1; 100]);
    file(&mut b, "checkpoint/core-12.img", &[1; 100]);
    file(&mut b, "checkpoint/pages-1.img", &[7; 8192]);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ckpt.tar");
    fs::write(&path, end(b)).unwrap();
    let info = inspect::inspect_file(&path, &Limits::default()).unwrap();
    assert_eq!(info.container_name.as_deref(), Some("counter"));
    assert_eq!(
        info.container_id.as_deref(),
        Some("45874932fa44393e4ecd309d6426aeb2e38854373e0860f114485b5fb5282af9")
    );
    assert_eq!(info.pod_name, None);
    assert_eq!(info.engine, "podman");
    assert_eq!(info.image.as_deref(), Some("localhost/lab/busybox:latest"));
    assert_eq!(
        info.image_ref.as_deref(),
        Some("1f82cfcfbf3c74ca5661f7880e486b86080744e16f9463f3faa66439e5cefbd6")
    );
    assert_eq!(info.runtime.as_deref(), Some("crun"));
    assert_eq!(info.criu_version, "unknown");
    assert_eq!(
        (info.processes, info.processes_source.as_str()),
        (2, "core-*.img")
    );
    assert_eq!(
        info.created.as_deref(),
        Some("2026-11-27T16:50:47.36688061Z")
    );
    assert_eq!(info.checkpointed.as_deref(), Some("2026-11-27T16:50:49Z"));
    assert_eq!(
        info.checkpointed_source.as_deref(),
        Some("archive entry time")
    );
    assert_eq!(info.archive_bytes, fs::metadata(&path).unwrap().len());
}

#[test]
fn inspect_reports_bad_json_and_hostile_archives() {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "config.dump", b"{not json");
    file(&mut b, "spec.dump", b"{}");
    let err = inspect::inspect(&end(b)[..], &Limits::default()).unwrap_err();
    assert!(matches!(
        err,
        InspectError::BadJson {
            file: "config.dump",
            ..
        }
    ));
    let hostile = with(|b| raw(b, b"passwd", EntryType::Symlink, b"/etc/passwd", b""));
    let err = inspect::inspect(&hostile[..], &Limits::default()).unwrap_err();
    assert!(matches!(
        err,
        InspectError::Archive(ArchiveError::AbsoluteLink { .. })
    ));
}
