//! Checkpoint images: turns a validated checkpoint archive into the OCI image that Podman
//! (`podman load` + `podman container restore IMAGE`) and CRI-O (a Pod whose image is a
//! checkpoint) restore from. [`write_layout`] writes an OCI image layout directory
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) holding one uncompressed layer — a tar of the
//! archive's entries at `/` — an image config and a manifest whose annotations carry what the
//! runtimes read: `io.kubernetes.cri-o.annotations.checkpoint.name` (CRI-O),
//! `io.podman.annotations.checkpoint.*` (Podman; it checks `runtime.name` on restore) and
//! checkpointctl's `org.criu.checkpoint.*`. `podman load -i DIR` takes such a directory as it
//! is; [`pack_oci_archive`] and [`write_oci_archive`] also make the single-file `oci-archive`
//! tar that `podman load` and `skopeo` take. The archive is read twice and never held in
//! memory: once by [`inspect`](crate::inspect) (full validation, before anything is written),
//! once to stream the layer while its sha256 is computed. Directories are 0700, files 0600;
//! a failure removes everything this call made.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

use crate::archive::{self, ArchiveError, EntryInfo, EntryKind, Limits};
use crate::inspect::{self, CheckpointInfo, InspectError, MAX_METADATA_BYTES};

/// Media type of the (uncompressed) checkpoint layer. Uncompressed keeps the layer's bytes
/// close to the archive's, so the chunk store dedups them, and costs no zstd/gzip time.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of the image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of the manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of `index.json`.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Index annotation naming the image; `podman load` tags the image with it.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// CRI-O restores a container from an image whose manifest has this annotation.
pub const CRIO_CHECKPOINT_NAME: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";
/// Prefix of Podman's checkpoint annotations (`podman container checkpoint --create-image`).
pub const PODMAN_PREFIX: &str = "io.podman.annotations.checkpoint.";
/// Prefix of checkpointctl's annotations.
pub const CRIU_PREFIX: &str = "org.criu.checkpoint.";

/// What the caller knows that the archive does not record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageOptions {
    /// Name the image is loaded under, e.g. `localhost/migrate/counter:mig-42`.
    pub reference: String,
    /// The source's container engine version (`podman version`), for
    /// `…checkpoint.podman.version`; omitted when `None`.
    pub engine_version: Option<String>,
    /// CRIU version (`4.2.1`) when the archive has no dump.log to read it from; the archive's
    /// own value wins when it has one. Omitted when neither is known.
    pub criu_version: Option<String>,
    /// OCI architecture of the node (`amd64`); [`node_architecture`] by default.
    pub architecture: String,
    /// Archive validation bounds.
    pub limits: Limits,
    /// Use the validated archive itself as the layer blob (hard-linked into the layout, or
    /// copied across file systems) instead of writing a normalized copy of its entries: one
    /// pass over the archive instead of three. For archives the caller made or received whole
    /// (a migration's); the copy normalizes owners and modes.
    pub link_archive: bool,
}

impl ImageOptions {
    /// Options for `reference` on this node, with nothing else known.
    pub fn new(reference: impl Into<String>) -> Self {
        Self {
            reference: reference.into(),
            engine_version: None,
            criu_version: None,
            architecture: node_architecture().to_string(),
            limits: Limits::default(),
            link_archive: false,
        }
    }
}

/// Why the image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The archive was refused (hostile, truncated, not a checkpoint) or unreadable.
    #[error("the checkpoint archive was refused: {0}")]
    Inspect(#[from] InspectError),
    /// The archive changed between validation and the layer pass and is now refused.
    #[error("the checkpoint archive was refused while writing the layer: {0}")]
    Archive(#[from] ArchiveError),
    /// The archive names no container, so CRI-O and Podman could not restore it.
    #[error("the checkpoint archive names no container (config.dump has no name)")]
    NoContainerName,
    /// The reference is empty or has whitespace or control characters.
    #[error("{0:?} is not a usable image reference")]
    BadReference(String),
    /// The output path exists already.
    #[error("{0} exists already; remove it or choose another path")]
    TargetExists(PathBuf),
    /// Writing the image failed (disk full, permissions).
    #[error("writing {path} failed: {source}")]
    Write {
        /// What was being written.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A blob of the layout: `sha256:<hex>` and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<hex>` of the blob's bytes.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Annotations (only the index's entry has one: the ref name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The OCI image manifest, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// [`MANIFEST_MEDIA_TYPE`].
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// The image config blob.
    pub config: Descriptor,
    /// The one checkpoint layer.
    pub layers: Vec<Descriptor>,
    /// What CRI-O, Podman and checkpointctl read.
    pub annotations: BTreeMap<String, String>,
}

/// The OCI image config, as written (no entrypoint: a checkpoint is restored, not run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// When the checkpoint was taken, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// `amd64`, `arm64`...
    pub architecture: String,
    /// `linux`.
    pub os: String,
    /// The layers' uncompressed digests.
    pub rootfs: RootFs,
}

/// `rootfs` of the image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `sha256:<hex>` of each uncompressed layer.
    pub diff_ids: Vec<String>,
}

/// `index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// [`INDEX_MEDIA_TYPE`].
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// The one manifest, with its ref name.
    pub manifests: Vec<Descriptor>,
}

/// What [`write_layout`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointImage {
    /// The layout directory (or, from [`write_oci_archive`], the tar file).
    pub path: PathBuf,
    /// The reference written as the index's ref name.
    pub reference: String,
    /// The manifest's descriptor.
    pub manifest: Descriptor,
    /// The manifest itself.
    pub manifest_body: Manifest,
    /// What the archive holds, as inspected.
    pub info: CheckpointInfo,
}

/// The node's architecture as OCI names it.
pub fn node_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => other,
    }
}

/// Writes the checkpoint image of `archive_path` as an OCI image layout at `out`, which must
/// not exist. It is built at a sibling `.NAME.partial` and renamed into place at the end, so
/// `out` appears whole or not at all.
pub fn write_layout(
    archive_path: &Path,
    out: &Path,
    options: &ImageOptions,
) -> Result<CheckpointImage, ImageError> {
    check_reference(&options.reference)?;
    if fs::symlink_metadata(out).is_ok() {
        return Err(ImageError::TargetExists(out.to_path_buf()));
    }
    // Full validation first: nothing is written for a refused archive.
    let (info, digest) = if options.link_archive {
        let (info, digest) = inspect_and_hash(archive_path, &options.limits)?;
        (info, Some(digest))
    } else {
        (inspect::inspect_file(archive_path, &options.limits)?, None)
    };
    if info.container_name.is_none() {
        return Err(ImageError::NoContainerName);
    }
    let partial = partial_path(out);
    let _ = fs::remove_dir_all(&partial);
    let built = build_layout(archive_path, &partial, options, info, digest);
    let result = built.and_then(|mut image| {
        fs::rename(&partial, out).map_err(|e| write_err(out, e))?;
        image.path = out.to_path_buf();
        Ok(image)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result
}

/// [`write_layout`] into a temporary layout beside `out`, then [`pack_oci_archive`] into the
/// file `out` (0600), then the layout is removed.
pub fn write_oci_archive(
    archive_path: &Path,
    out: &Path,
    options: &ImageOptions,
) -> Result<CheckpointImage, ImageError> {
    if fs::symlink_metadata(out).is_ok() {
        return Err(ImageError::TargetExists(out.to_path_buf()));
    }
    let layout = sibling(out, ".layout");
    let _ = fs::remove_dir_all(&layout);
    let mut image = write_layout(archive_path, &layout, options)?;
    let packed = pack_oci_archive(&layout, out);
    let _ = fs::remove_dir_all(&layout);
    packed?;
    image.path = out.to_path_buf();
    Ok(image)
}

/// Packs an OCI layout directory into an `oci-archive` tar at `out` (0600, must not exist):
/// `oci-layout`, `index.json`, then every blob. Blobs are copied, streaming.
pub fn pack_oci_archive(layout: &Path, out: &Path) -> Result<(), ImageError> {
    let file = create_file(out)?;
    let result = (|| -> io::Result<()> {
        let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
        builder.mode(tar::HeaderMode::Deterministic);
        let mut names = vec!["oci-layout".to_string(), "index.json".to_string()];
        let mut blobs: Vec<String> = fs::read_dir(layout.join("blobs/sha256"))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()?;
        blobs.sort();
        for dir in ["blobs", "blobs/sha256"] {
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Directory);
            h.set_mode(0o700);
            h.set_size(0);
            builder.append_data(&mut h, dir, io::empty())?;
        }
        names.extend(blobs.into_iter().map(|b| format!("blobs/sha256/{b}")));
        for name in names {
            let mut src = File::open(layout.join(&name))?;
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Regular);
            h.set_mode(0o600);
            h.set_size(src.metadata()?.len());
            builder.append_data(&mut h, &name, &mut src)?;
        }
        builder.into_inner()?.flush()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(out);
        return Err(write_err(out, e));
    }
    Ok(())
}

/// The manifest annotations for `info`. Keys with no known value are left out.
pub fn annotations(
    info: &CheckpointInfo,
    raw_image_name: Option<&str>,
    options: &ImageOptions,
) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    let criu = if info.criu_version != "unknown" {
        Some(info.criu_version.clone())
    } else {
        options.criu_version.clone()
    };
    let raw = raw_image_name
        .map(str::to_owned)
        .or_else(|| info.image.clone());
    if let Some(name) = &info.container_name {
        a.insert(CRIO_CHECKPOINT_NAME.to_string(), name.clone());
    }
    let mut podman = |key: &str, value: Option<String>| {
        if let Some(v) = value {
            a.insert(format!("{PODMAN_PREFIX}{key}"), v);
        }
    };
    podman("name", info.container_name.clone());
    podman("rawImageName", raw.clone());
    podman("rootfsImageID", info.image_ref.clone());
    podman("rootfsImageName", info.image.clone());
    podman("runtime.name", info.runtime.clone());
    podman("podman.version", options.engine_version.clone());
    // Podman writes CRIU's version as the number `criu --version` reports internally: 40201.
    podman("criu.version", criu.as_deref().and_then(criu_number));
    podman("host.arch", Some(options.architecture.clone()));
    let mut criu_key = |key: &str, value: Option<String>| {
        if let Some(v) = value {
            a.insert(format!("{CRIU_PREFIX}{key}"), v);
        }
    };
    criu_key("container.name", info.container_name.clone());
    criu_key("engine.name", Some(info.engine.clone()));
    criu_key("engine.version", options.engine_version.clone());
    criu_key("pod.name", info.pod_name.clone());
    criu_key("pod.namespace", info.pod_namespace.clone());
    criu_key("rootfsImageName", info.image.clone());
    criu_key("rootfsImageID", info.image_ref.clone());
    criu_key("rawImageName", raw);
    criu_key("runtime.name", info.runtime.clone());
    criu_key("criu.version", criu);
    criu_key("host.arch", Some(options.architecture.clone()));
    a
}

/// `4.2.1` → `40201`, Podman's form; `None` for anything else.
fn criu_number(version: &str) -> Option<String> {
    let mut parts = version.trim().split('.');
    let mut n = 0u64;
    for _ in 0..3 {
        let p: u64 = match parts.next() {
            Some(p) => p.parse().ok().filter(|v| *v < 100)?,
            None => 0,
        };
        n = n * 100 + p;
    }
    parts.next().is_none().then(|| n.to_string())
}

fn build_layout(
    archive_path: &Path,
    dir: &Path,
    options: &ImageOptions,
    info: CheckpointInfo,
    archive_digest: Option<String>,
) -> Result<CheckpointImage, ImageError> {
    make_dir(dir)?;
    make_dir(&dir.join("blobs"))?;
    let blobs = dir.join("blobs/sha256");
    make_dir(&blobs)?;

    let (layer, raw_image_name) = match archive_digest {
        Some(digest) => link_layer(archive_path, &blobs, digest, &info, &options.limits)?,
        None => write_layer(archive_path, &blobs, &options.limits)?,
    };
    let config = ImageConfig {
        created: info.checkpointed.clone(),
        architecture: options.architecture.clone(),
        os: "linux".to_string(),
        rootfs: RootFs {
            kind: "layers".to_string(),
            diff_ids: vec![layer.digest.clone()],
        },
    };
    let config = write_json_blob(&blobs, CONFIG_MEDIA_TYPE, &config)?;
    let manifest_body = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.to_string(),
        config,
        layers: vec![layer],
        annotations: annotations(&info, raw_image_name.as_deref(), options),
    };
    let mut manifest = write_json_blob(&blobs, MANIFEST_MEDIA_TYPE, &manifest_body)?;
    manifest
        .annotations
        .insert(REF_NAME_ANNOTATION.to_string(), options.reference.clone());
    let index = Index {
        schema_version: 2,
        media_type: INDEX_MEDIA_TYPE.to_string(),
        manifests: vec![manifest.clone()],
    };
    write_small(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let index = serde_json::to_vec(&index).map_err(|e| write_err(dir, e.into()))?;
    write_small(&dir.join("index.json"), &index)?;
    manifest.annotations.clear();
    Ok(CheckpointImage {
        path: dir.to_path_buf(),
        reference: options.reference.clone(),
        manifest,
        manifest_body,
        info,
    })
}

/// Validates and inspects the archive in one read, hashing its bytes on the way.
fn inspect_and_hash(path: &Path, limits: &Limits) -> Result<(CheckpointInfo, String), ImageError> {
    let file = File::open(path).map_err(|e| ImageError::Archive(ArchiveError::Io(e)))?;
    let mut reader = HashingRead {
        inner: io::BufReader::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        n: 0,
    };
    let mut info = inspect::inspect(&mut reader, limits)?;
    // The tar reader stops at the end-of-archive marker; the padding after it is hashed too.
    io::copy(&mut reader, &mut io::sink()).map_err(|e| ImageError::Archive(ArchiveError::Io(e)))?;
    info.archive_bytes = reader.n;
    Ok((info, format_digest(&reader.hasher.finalize())))
}

/// The archive itself as the layer blob: hard-linked under its digest (copied when the
/// layout is on another file system). Reads config.dump's `RawImageName` from the archive.
fn link_layer(
    archive_path: &Path,
    blobs: &Path,
    digest: String,
    info: &CheckpointInfo,
    limits: &Limits,
) -> Result<(Descriptor, Option<String>), ImageError> {
    let path = blobs.join(&digest["sha256:".len()..]);
    if fs::hard_link(archive_path, &path).is_err() {
        fs::copy(archive_path, &path).map_err(|e| write_err(&path, e))?;
    }
    // config.dump comes first in Podman's and CRI-O's archives: stop reading once it is seen.
    let mut config_dump = Vec::new();
    let reader = archive::open(archive_path)?;
    let _ = archive::scan(reader, limits, |entry, data| {
        if entry.path == Path::new("config.dump") {
            data.take(1 << 20).read_to_end(&mut config_dump)?;
            return Err(io::Error::other("found"));
        }
        Ok(())
    });
    let layer = Descriptor {
        media_type: LAYER_MEDIA_TYPE.to_string(),
        digest,
        size: info.archive_bytes,
        annotations: BTreeMap::new(),
    };
    Ok((layer, raw_image_name(&config_dump)))
}

/// config.dump's `RawImageName`, if it has one.
fn raw_image_name(config_dump: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(config_dump)
        .ok()
        .and_then(|v| {
            v.get("RawImageName")
                .or_else(|| v.get("rawImageName"))
                .and_then(|n| n.as_str())
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
        })
}

/// Streams the archive's entries into a new tar at `blobs/.layer.partial` while hashing it,
/// then renames it to its digest. Also returns config.dump's `RawImageName`, read on the way.
fn write_layer(
    archive_path: &Path,
    blobs: &Path,
    limits: &Limits,
) -> Result<(Descriptor, Option<String>), ImageError> {
    let tmp = blobs.join(".layer.partial");
    let file = create_file(&tmp)?;
    let mut builder = tar::Builder::new(Hashing::new(BufWriter::with_capacity(1 << 20, file)));
    let mut config_dump = Vec::new();
    let mut write_failure = None;
    let reader = archive::open(archive_path)?;
    let scanned = archive::scan(reader, limits, |entry, data| {
        append_entry(&mut builder, entry, data, &mut config_dump).inspect_err(|e| {
            write_failure = Some(io::Error::new(e.kind(), e.to_string()));
        })
    });
    let finished = match (scanned, write_failure) {
        (Err(_), Some(e)) => Err(write_err(&tmp, e)),
        (Err(e), None) => Err(ImageError::Archive(e)),
        (Ok(_), _) => builder
            .into_inner()
            .and_then(|mut h| h.inner.flush().map(|()| h))
            .map_err(|e| write_err(&tmp, e)),
    };
    let hashing = match finished {
        Ok(h) => h,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let (digest, size) = hashing.finish();
    let path = blobs.join(&digest["sha256:".len()..]);
    fs::rename(&tmp, &path).map_err(|e| write_err(&path, e))?;
    let raw_image_name = raw_image_name(&config_dump);
    let layer = Descriptor {
        media_type: LAYER_MEDIA_TYPE.to_string(),
        digest,
        size,
        annotations: BTreeMap::new(),
    };
    Ok((layer, raw_image_name))
}

/// Appends one validated entry to the layer, owned by root, with its mode (permission bits
/// only) and time. config.dump's bytes are also kept (bounded) for `RawImageName`.
fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    entry: &EntryInfo<'_>,
    data: &mut dyn Read,
    config_dump: &mut Vec<u8>,
) -> io::Result<()> {
    let mut h = Header::new_gnu();
    h.set_mode(entry.mode & 0o777);
    h.set_mtime(entry.mtime);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    match entry.kind {
        EntryKind::File => {
            h.set_entry_type(EntryType::Regular);
            h.set_size(entry.size);
            if entry.path == "config.dump" && entry.size <= MAX_METADATA_BYTES {
                let mut tee = Tee {
                    inner: data,
                    copy: config_dump,
                };
                builder.append_data(&mut h, entry.path, &mut tee)
            } else {
                builder.append_data(&mut h, entry.path, data)
            }
        }
        EntryKind::Dir => {
            h.set_entry_type(EntryType::Directory);
            builder.append_data(&mut h, entry.path, io::empty())
        }
        EntryKind::Symlink => {
            h.set_entry_type(EntryType::Symlink);
            builder.append_link(&mut h, entry.path, entry.link_target.unwrap_or_default())
        }
        EntryKind::HardLink => {
            // Hard link targets name another entry, which the layer holds normalised.
            let target: Vec<&str> = entry
                .link_target
                .unwrap_or_default()
                .split('/')
                .filter(|p| !p.is_empty() && *p != ".")
                .collect();
            h.set_entry_type(EntryType::Link);
            builder.append_link(&mut h, entry.path, target.join("/"))
        }
    }
}

/// Serialises `value`, writes it as a blob named by its digest, returns its descriptor.
fn write_json_blob<T: Serialize>(
    blobs: &Path,
    media_type: &str,
    value: &T,
) -> Result<Descriptor, ImageError> {
    let bytes = serde_json::to_vec(value).map_err(|e| write_err(blobs, e.into()))?;
    let digest = sha256_digest(&bytes);
    write_small(&blobs.join(&digest["sha256:".len()..]), &bytes)?;
    Ok(Descriptor {
        media_type: media_type.to_string(),
        digest,
        size: bytes.len() as u64,
        annotations: BTreeMap::new(),
    })
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format_digest(&Sha256::digest(bytes))
}

fn format_digest(hash: &[u8]) -> String {
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn check_reference(reference: &str) -> Result<(), ImageError> {
    let ok = !reference.is_empty()
        && reference.len() <= 255
        && reference
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadReference(reference.to_string()))
    }
}

fn partial_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".to_string());
    out.with_file_name(format!(".{name}.partial"))
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".to_string());
    out.with_file_name(format!(".{name}{suffix}"))
}

fn make_dir(path: &Path) -> Result<(), ImageError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|e| write_err(path, e))
}

fn create_file(path: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| write_err(path, e))
}

fn write_small(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut f = create_file(path)?;
    f.write_all(bytes).map_err(|e| write_err(path, e))
}

fn write_err(path: &Path, source: io::Error) -> ImageError {
    ImageError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// A writer that hashes and counts what passes through it.
/// A reader that hashes what passes through it.
struct HashingRead<R> {
    inner: R,
    hasher: Sha256,
    n: u64,
}

impl<R: Read> Read for HashingRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    n: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            n: 0,
        }
    }

    fn finish(self) -> (String, u64) {
        (format_digest(&self.hasher.finalize()), self.n)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that keeps a copy of what it reads.
struct Tee<'a> {
    inner: &'a mut dyn Read,
    copy: &'a mut Vec<u8>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_numbers_like_podman() {
        assert_eq!(criu_number("4.2.1").as_deref(), Some("40201"));
        assert_eq!(criu_number("3.17").as_deref(), Some("31700"));
        assert_eq!(criu_number("unknown"), None);
        assert_eq!(criu_number("4.2.1.5"), None);
    }

    #[test]
    fn references_are_checked() {
        assert!(check_reference("localhost/migrate/counter:mig-1").is_ok());
        assert!(check_reference("").is_err());
        assert!(check_reference("a b").is_err());
    }

    #[test]
    fn digest_is_hex_sha256() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
