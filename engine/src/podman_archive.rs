//! The checkpoint archive `podman container checkpoint --export` writes, made here from a
//! checkpoint taken without `--export`.
//!
//! Podman's export copies CRIU's images (the container's whole memory) into a tar after CRIU
//! wrote them: on the final checkpoint, while the container is stopped, that copy took longer
//! than CRIU itself. A checkpoint without an export leaves the images and most of the
//! archive's other files in the container's static folder (`userdata`). What is missing is
//! made here, as Podman makes it on export:
//! - `config.dump`: the container's configuration, which Podman keeps as JSON in its SQLite
//!   database (`ContainerConfig`), with the container's short-ID network alias left out, since
//!   the restored container gets a new ID;
//! - `spec.dump`: the OCI spec, the `spec` of that configuration;
//! - `rootfs-diff.tar` and `deleted.files`: what the container changed in its root file system,
//!   from `podman diff`, with the files read from the overlay's upper layer.
//!
//! The archive's members, in the order written, are then [`Member`]s that
//! [`crate::tar_files`] streams without copying them. A container this cannot describe exactly
//! (named volumes, which Podman exports too, or a pod's container) is exported by Podman.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// The CRIU images folder in a checkpoint archive (and in the static folder).
pub const IMAGES: &str = "checkpoint";

/// Files of the static folder that Podman's export includes when they exist, in its order.
const STATIC_FILES: [&str; 4] = [
    "devshm-checkpoint.tar",
    "network.status",
    "stats-dump",
    "ctr.log",
];

/// One member of a checkpoint archive: a file or a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its path in the archive (`config.dump`, `checkpoint/pages-1.img`).
    pub name: String,
    /// The file holding its data, or `None` for a directory.
    pub path: Option<PathBuf>,
    /// Permission bits.
    pub mode: u32,
}

/// What `podman diff --format json` reports of a container's root file system.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Changes {
    /// Paths changed (directories whose entries changed, files rewritten).
    #[serde(default)]
    pub changed: Vec<String>,
    /// Paths added.
    #[serde(default)]
    pub added: Vec<String>,
    /// Paths deleted.
    #[serde(default)]
    pub deleted: Vec<String>,
}

/// Why the archive could not be made here.
#[derive(Debug, thiserror::Error)]
pub enum PodmanArchiveError {
    /// Podman's database could not be read.
    #[error("reading the container's configuration from Podman's database {db}: {source}")]
    Database {
        /// The database file.
        db: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The configuration is not what this module knows how to handle.
    #[error("the container's configuration in Podman's database {0}")]
    Config(String),
    /// Reading the container's files or writing the made ones failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PodmanArchiveError {
    let path = path.to_path_buf();
    move |source| PodmanArchiveError::Io { what, path, source }
}

/// Podman's SQLite database for a container whose static folder is `userdata`
/// (`GRAPHROOT/overlay-containers/ID/userdata`): `GRAPHROOT/db.sql`, if it is there.
pub fn database_of(userdata: &Path) -> Option<PathBuf> {
    let db = userdata.ancestors().nth(3)?.join("db.sql");
    db.is_file().then_some(db)
}

/// The configuration of container `id` as Podman's database `db` holds it.
pub fn read_config(db: &Path, id: &str) -> Result<Value, PodmanArchiveError> {
    let database = |source| PodmanArchiveError::Database {
        db: db.to_path_buf(),
        source,
    };
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(database)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(database)?;
    // Podman stores it as a BLOB of JSON text.
    let json: Vec<u8> = conn
        .query_row(
            "SELECT JSON FROM ContainerConfig WHERE ID = ?1",
            [id],
            |row| row.get(0),
        )
        .map_err(database)?;
    serde_json::from_slice(&json)
        .map_err(|e| PodmanArchiveError::Config(format!("is not JSON: {e}")))
}

/// Why Podman, not this module, must export the container with configuration `config`; `None`
/// when this module can.
pub fn unsupported(config: &Value) -> Option<&'static str> {
    let non_empty = |key: &str| match config.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    if non_empty("namedVolumes") {
        Some("it has named volumes, whose contents Podman's export carries")
    } else if non_empty("pod") {
        Some("it belongs to a pod")
    } else {
        None
    }
}

/// `config.dump` and `spec.dump` for container `id` with configuration `config`, as Podman's
/// export writes them: the configuration, its network aliases without the short ID, and its
/// `spec`.
pub fn dumps(mut config: Value, id: &str) -> Result<(Vec<u8>, Vec<u8>), PodmanArchiveError> {
    let short = &id[..id.len().min(12)];
    for key in ["newNetworks", "networks"] {
        let Some(Value::Object(networks)) = config.get_mut(key) else {
            continue;
        };
        for options in networks.values_mut() {
            if let Some(Value::Array(aliases)) = options.get_mut("aliases") {
                aliases.retain(|a| a.as_str() != Some(short));
            }
        }
    }
    let spec = config
        .get("spec")
        .filter(|s| s.is_object())
        .ok_or_else(|| PodmanArchiveError::Config("has no OCI spec".into()))?;
    let json = |v: &Value| serde_json::to_vec_pretty(v).expect("a JSON value serializes");
    Ok((json(&config), json(spec)))
}

/// Writes `rootfs-diff.tar` (the files added or rewritten, read from the overlay's upper
/// layer `upper`) and `deleted.files` (the paths deleted, as JSON) into `out`, as Podman does
/// on export: directories only when added, each file once. Returns their members; none when
/// nothing changed. A file that is only a metadata copy in the upper layer (overlay's
/// `metacopy`) has no data there: refused, so nothing is silently lost.
pub fn rootfs_diff(
    upper: &Path,
    changes: &Changes,
    out: &Path,
) -> Result<Vec<Member>, PodmanArchiveError> {
    let mut members = Vec::new();
    let mut include: Vec<&str> = changes.added.iter().map(String::as_str).collect();
    for path in &changes.changed {
        let meta = fs::symlink_metadata(within(upper, path));
        if meta.is_ok_and(|m| !m.is_dir()) {
            include.push(path);
        }
    }
    include.sort_unstable();
    include.dedup();
    if !include.is_empty() {
        let tar_path = out.join("rootfs-diff.tar");
        let file = private_file(&tar_path)?;
        let mut builder = tar::Builder::new(io::BufWriter::new(file));
        builder.follow_symlinks(false);
        for path in include {
            let source = within(upper, path);
            let name = path.trim_start_matches('/');
            // Sockets are skipped, as Podman's tar skips them: they cannot be archived.
            let kind = source.symlink_metadata().map(|m| m.file_type());
            if name.is_empty() || kind.is_err() || kind.is_ok_and(|k| k.is_socket()) {
                continue;
            }
            if is_metacopy(&source) {
                return Err(PodmanArchiveError::Io {
                    what: "reading the container's changed file",
                    path: source,
                    source: io::Error::other(
                        "it is an overlay metadata-only copy (metacopy=on), whose data is in a \
                         lower layer; turn metacopy off in storage.conf",
                    ),
                });
            }
            builder
                .append_path_with_name(&source, name)
                .map_err(io_error("adding to the rootfs diff", &source))?;
        }
        builder
            .into_inner()
            .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
            .and_then(|f| f.sync_all())
            .map_err(io_error("writing", &tar_path))?;
        members.push(Member {
            name: "rootfs-diff.tar".into(),
            path: Some(tar_path),
            mode: 0o600,
        });
    }
    if !changes.deleted.is_empty() {
        let path = out.join("deleted.files");
        let json = serde_json::to_vec_pretty(&changes.deleted).expect("strings serialize");
        write_private(&path, &json)?;
        members.push(Member {
            name: "deleted.files".into(),
            path: Some(path),
            mode: 0o600,
        });
    }
    Ok(members)
}

/// Writes `config.dump` and `spec.dump` (see [`dumps`]) into `out`; their members.
pub fn write_dumps(
    dumps: (Vec<u8>, Vec<u8>),
    out: &Path,
) -> Result<Vec<Member>, PodmanArchiveError> {
    let mut members = Vec::new();
    for (name, bytes) in [("config.dump", dumps.0), ("spec.dump", dumps.1)] {
        let path = out.join(name);
        write_private(&path, &bytes)?;
        members.push(file_member(name.into(), path));
    }
    Ok(members)
}

/// The members of the static folder `userdata` that the archive carries (`artifacts/` and
/// the files Podman's export includes, when they exist), copied into `out`: they go with the
/// container when it is removed, and the archive is read again after that (its chunks are
/// kept in this node's store).
pub fn static_members(userdata: &Path, out: &Path) -> Result<Vec<Member>, PodmanArchiveError> {
    let mut members = Vec::new();
    let artifacts = userdata.join("artifacts");
    if artifacts.is_dir() {
        members.push(Member {
            name: "artifacts".into(),
            path: None,
            mode: 0o755,
        });
        let copies = out.join("artifacts");
        private_dir(&copies)?;
        for (name, path) in sorted_files(&artifacts)? {
            let copy = copies.join(&name);
            copy_private(&path, &copy)?;
            members.push(file_member(format!("artifacts/{name}"), copy));
        }
    }
    for name in STATIC_FILES {
        let path = userdata.join(name);
        if path.is_file() {
            let copy = out.join(name);
            copy_private(&path, &copy)?;
            members.push(file_member(name.into(), copy));
        }
    }
    Ok(members)
}

/// The archive's members, in the order written: `made` (the static folder's files, the
/// dumps, the rootfs diff), then the CRIU images in `images`, their page images last.
pub fn members(made: Vec<Member>, images: &Path) -> Result<Vec<Member>, PodmanArchiveError> {
    let mut members = made;
    members.push(Member {
        name: IMAGES.into(),
        path: None,
        mode: 0o700,
    });
    let (pages, rest): (Vec<_>, Vec<_>) = sorted_files(images)?
        .into_iter()
        .partition(|(name, _)| crate::pages::is_page_image(name));
    for (name, path) in rest.into_iter().chain(pages) {
        members.push(file_member(format!("{IMAGES}/{name}"), path));
    }
    Ok(members)
}

/// A file member, 0600 like every file of a checkpoint archive made here.
fn file_member(name: String, path: PathBuf) -> Member {
    Member {
        name,
        path: Some(path),
        mode: 0o600,
    }
}

/// The regular files directly in `dir`, sorted by name (page images by their number).
fn sorted_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, PodmanArchiveError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("listing", dir))? {
        let entry = entry.map_err(io_error("listing", dir))?;
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        match entry.file_name().into_string() {
            Ok(name) if is_file => files.push((name, entry.path())),
            _ => {}
        }
    }
    let key = |name: &str| {
        let number = name
            .strip_prefix("pages-")
            .and_then(|n| n.strip_suffix(".img"))
            .and_then(|n| n.parse::<u64>().ok());
        (number, name.to_string())
    };
    files.sort_by_key(|(name, _)| key(name));
    Ok(files)
}

/// `path` (absolute, from `podman diff`) under `root`.
fn within(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Whether `path` carries overlay's metacopy mark (its data lives in a lower layer).
fn is_metacopy(path: &Path) -> bool {
    let mut value = [0u8; 64];
    match rustix::fs::lgetxattr(path, "trusted.overlay.metacopy", &mut value) {
        Ok(_) => true,
        Err(e) => e == rustix::io::Errno::RANGE,
    }
}

fn private_file(path: &Path) -> Result<fs::File, PodmanArchiveError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("creating", path))
}

fn copy_private(from: &Path, to: &Path) -> Result<(), PodmanArchiveError> {
    let mut source = fs::File::open(from).map_err(io_error("reading", from))?;
    let mut copy = private_file(to)?;
    io::copy(&mut source, &mut copy).map_err(io_error("copying to", to))?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PodmanArchiveError> {
    use std::io::Write;
    private_file(path)?
        .write_all(bytes)
        .map_err(io_error("writing", path))
}

/// Creates `dir` private (0700) if it is missing.
pub fn private_dir(dir: &Path) -> Result<(), PodmanArchiveError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .map_err(io_error("creating", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn dumps_drop_the_short_id_alias_and_carry_the_spec() {
        let config = json!({
            "id": ID,
            "name": "web",
            "spec": {"ociVersion": "1.2.0", "process": {"args": ["nginx"]}},
            "newNetworks": {"podman": {"aliases": ["0123456789ab", "web"]}},
        });
        assert_eq!(unsupported(&config), None);
        let (config_dump, spec_dump) = dumps(config, ID).unwrap();
        let config: Value = serde_json::from_slice(&config_dump).unwrap();
        assert_eq!(config["newNetworks"]["podman"]["aliases"], json!(["web"]));
        assert_eq!(config["name"], "web");
        let spec: Value = serde_json::from_slice(&spec_dump).unwrap();
        assert_eq!(spec["process"]["args"], json!(["nginx"]));

        assert!(
            dumps(json!({"name": "web"}), ID).is_err(),
            "no spec accepted"
        );
        assert!(unsupported(&json!({"namedVolumes": [{"Name": "data"}]})).is_some());
        assert!(unsupported(&json!({"pod": "abc"})).is_some());
        assert_eq!(unsupported(&json!({"namedVolumes": [], "pod": ""})), None);
    }

    #[test]
    fn the_rootfs_diff_holds_what_was_added_or_rewritten_and_lists_what_was_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (upper, out) = (dir.path().join("upper"), dir.path().join("out"));
        fs::create_dir_all(upper.join("etc/new")).unwrap();
        fs::create_dir_all(&out).unwrap();
        fs::write(upper.join("etc/new/file"), b"added").unwrap();
        fs::write(upper.join("etc/motd"), b"rewritten").unwrap();
        std::os::unix::fs::symlink("/etc/motd", upper.join("etc/link")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(upper.join("etc/new/sock")).unwrap();
        let changes = Changes {
            changed: vec!["/etc".into(), "/etc/motd".into()],
            added: vec![
                "/etc/new".into(),
                "/etc/new/file".into(),
                "/etc/new/sock".into(),
                "/etc/link".into(),
            ],
            deleted: vec!["/usr/bin/yes".into()],
        };
        let members = rootfs_diff(&upper, &changes, &out).unwrap();
        let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["rootfs-diff.tar", "deleted.files"]);

        let mut entries = Vec::new();
        let mut tar = tar::Archive::new(fs::File::open(out.join("rootfs-diff.tar")).unwrap());
        for entry in tar.entries().unwrap() {
            let entry = entry.unwrap();
            let kind = entry.header().entry_type();
            entries.push((entry.path().unwrap().display().to_string(), kind));
        }
        use tar::EntryType::{Directory, Regular, Symlink};
        let expected = [
            ("etc/link".to_string(), Symlink),
            ("etc/motd".to_string(), Regular),
            ("etc/new".to_string(), Directory),
            ("etc/new/file".to_string(), Regular),
        ];
        assert_eq!(entries, expected, "a changed directory is not carried");
        let deleted: Vec<String> =
            serde_json::from_slice(&fs::read(out.join("deleted.files")).unwrap()).unwrap();
        assert_eq!(deleted, ["/usr/bin/yes"]);
        assert!(
            rootfs_diff(&upper, &Changes::default(), &dir.path().join("none"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn page_images_come_last_in_number_order() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["pages-10.img", "inventory.img", "pages-2.img", "core-1.img"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        let members = members(Vec::new(), dir.path()).unwrap();
        let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
        let expected = [
            "checkpoint",
            "checkpoint/core-1.img",
            "checkpoint/inventory.img",
            "checkpoint/pages-2.img",
            "checkpoint/pages-10.img",
        ];
        assert_eq!(names, expected);
    }
}
