//! What a checkpoint archive holds, read before moving it (`migrate inspect`; checkpointctl's
//! `show` is the model): container, pod, base image, runtime, CRIU version, memory and
//! rootfs-diff sizes, process count and times. One streaming pass over the archive through
//! [`archive::scan`], so it is validated on the way and never loaded whole; only `config.dump`,
//! `spec.dump`, `pstree.img` and the head of `dump.log` are kept, each bounded.

use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::archive::{self, ArchiveError, EntryInfo, EntryKind, Limits};

/// Largest `config.dump` or `spec.dump` read (real ones are tens of KiB).
pub const MAX_METADATA_BYTES: u64 = 16 << 20;
/// Bytes of `dump.log` read to find CRIU's version line (CRIU prints it first).
const DUMP_LOG_HEAD: u64 = 64 << 10;
/// Largest `pstree.img` parsed; beyond it processes are counted from `core-*.img`.
const MAX_PSTREE_BYTES: u64 = 4 << 20;

/// Why an archive could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The archive failed validation (or could not be read).
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// `config.dump` or `spec.dump` is larger than [`MAX_METADATA_BYTES`].
    #[error("{file} is {size} bytes, more than the {limit} bytes a container config can be")]
    MetadataTooLarge {
        /// Which file.
        file: &'static str,
        /// Its size.
        size: u64,
        /// The bound.
        limit: u64,
    },
    /// `config.dump` or `spec.dump` is not a JSON object.
    #[error("{file} is not valid JSON: {source}")]
    BadJson {
        /// Which file.
        file: &'static str,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
}

/// What `migrate inspect` shows. Fields the archive does not record are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Container name: the Kubernetes container name for a pod's container, else config.dump's `name`.
    pub container_name: Option<String>,
    /// Container ID (config.dump `id`).
    pub container_id: Option<String>,
    /// Pod name, for a Kubernetes container.
    pub pod_name: Option<String>,
    /// Pod namespace, for a Kubernetes container.
    pub pod_namespace: Option<String>,
    /// Who made the checkpoint: `podman`, `cri-o` or `unknown`, from spec.dump's annotations.
    pub engine: String,
    /// Base image as named (config.dump `rootfsImageName`, or `rootfsImage`/`RawImageName`).
    pub image: Option<String>,
    /// Base image reference or ID (`rootfsImageRef`, or Podman's `rootfsImageID`).
    pub image_ref: Option<String>,
    /// OCI runtime (config.dump `runtime`).
    pub runtime: Option<String>,
    /// CRIU version from dump.log's `Version:` line, or `unknown` (Podman drops dump.log
    /// from exports unless `--keep`).
    pub criu_version: String,
    /// Total bytes of `checkpoint/pages-*.img`: the memory that moves.
    pub memory_bytes: u64,
    /// Number of `pages-*.img` files.
    pub page_images: u64,
    /// Size of `rootfs-diff.tar` (files the container changed), if present.
    pub rootfs_diff_bytes: Option<u64>,
    /// Processes in the checkpoint.
    pub processes: u64,
    /// Threads, when `pstree.img` could be read.
    pub threads: Option<u64>,
    /// Where `processes` came from: `pstree.img` or `core-*.img` (one per thread).
    pub processes_source: String,
    /// When the container was created (config.dump `createdTime`).
    pub created: Option<String>,
    /// When it was checkpointed, RFC 3339.
    pub checkpointed: Option<String>,
    /// Where `checkpointed` came from: `config.dump checkpointedTime` or `archive entry time`.
    pub checkpointed_source: Option<String>,
    /// Size of the archive file in bytes.
    pub archive_bytes: u64,
    /// Entries in the archive.
    pub entries: u64,
}

/// Inspects the archive file at `path`.
pub fn inspect_file(path: &Path, limits: &Limits) -> Result<CheckpointInfo, InspectError> {
    let size = std::fs::metadata(path).map_err(ArchiveError::Io)?.len();
    let mut info = inspect_with(|visit| archive::scan_file(path, limits, visit))?;
    info.archive_bytes = size;
    Ok(info)
}

/// Inspects an archive read from `reader`; `archive_bytes` is what was read of it.
pub fn inspect(reader: impl Read, limits: &Limits) -> Result<CheckpointInfo, InspectError> {
    inspect_with(|visit| archive::scan(reader, limits, visit))
}

/// What a visitor of [`archive::scan`] is handed.
type Visit<'v> = &'v mut dyn FnMut(&EntryInfo<'_>, &mut dyn Read) -> io::Result<()>;

/// Inspects the archive that `scan` walks with the visitor it is given.
fn inspect_with(
    scan: impl FnOnce(Visit<'_>) -> Result<archive::ArchiveSummary, ArchiveError>,
) -> Result<CheckpointInfo, InspectError> {
    let mut found = Found::default();
    let summary = scan(&mut |entry, data| found.visit(entry, data))?;
    if let Some((file, size)) = found.too_large {
        return Err(InspectError::MetadataTooLarge {
            file,
            size,
            limit: MAX_METADATA_BYTES,
        });
    }
    let config = parse_json("config.dump", &found.config)?;
    let spec = parse_json("spec.dump", &found.spec)?;
    let annotations = spec.get("annotations").and_then(Value::as_object);
    let annotation = |key: &str| {
        annotations
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let text = |key: &str| {
        config
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };

    let config_name = text("name");
    let k8s = config_name
        .as_deref()
        .or(annotation("io.kubernetes.cri-o.Name").as_deref())
        .and_then(KubeName::parse);
    let container_name = annotation("io.kubernetes.container.name")
        .or_else(|| k8s.as_ref().map(|k| k.container.clone()))
        .or(config_name);
    let pod_name =
        annotation("io.kubernetes.pod.name").or_else(|| k8s.as_ref().map(|k| k.pod.clone()));
    let pod_namespace = annotation("io.kubernetes.pod.namespace")
        .or_else(|| k8s.as_ref().map(|k| k.namespace.clone()));
    let engine =
        if annotations.is_some_and(|a| a.keys().any(|k| k.starts_with("io.kubernetes.cri-o."))) {
            "cri-o"
        } else if annotation("io.container.manager").as_deref() == Some("libpod") {
            "podman"
        } else {
            "unknown"
        };

    let pstree = found.pstree.as_deref().and_then(parse_pstree);
    let (processes, threads, processes_source) = match pstree {
        Some((p, t)) => (p, Some(t), "pstree.img"),
        None => (found.core_images, None, "core-*.img"),
    };
    let checkpointed_field = text("checkpointedTime").filter(|t| !t.starts_with("0001-01-01"));
    let (checkpointed, checkpointed_source) = match checkpointed_field {
        Some(t) => (Some(t), Some("config.dump checkpointedTime")),
        None => match found.config_mtime {
            Some(m) if m > 0 => (Some(rfc3339(m)), Some("archive entry time")),
            _ => (None, None),
        },
    };

    Ok(CheckpointInfo {
        container_name,
        container_id: text("id"),
        pod_name,
        pod_namespace,
        engine: engine.to_string(),
        image: text("rootfsImageName")
            .or_else(|| text("rootfsImage"))
            .or_else(|| text("RawImageName")),
        image_ref: text("rootfsImageRef").or_else(|| text("rootfsImageID")),
        runtime: text("runtime"),
        criu_version: found
            .dump_log
            .as_deref()
            .and_then(criu_version)
            .unwrap_or_else(|| "unknown".to_string()),
        memory_bytes: found.pages_bytes,
        page_images: found.page_images,
        rootfs_diff_bytes: found.rootfs_diff,
        processes,
        threads,
        processes_source: processes_source.to_string(),
        created: text("createdTime"),
        checkpointed,
        checkpointed_source: checkpointed_source.map(str::to_owned),
        archive_bytes: summary.archive_bytes,
        entries: summary.entries,
    })
}

/// What the scan picks up on its way through the archive.
#[derive(Debug, Default)]
struct Found {
    config: Vec<u8>,
    config_mtime: Option<u64>,
    spec: Vec<u8>,
    too_large: Option<(&'static str, u64)>,
    dump_log: Option<Vec<u8>>,
    pstree: Option<Vec<u8>>,
    pages_bytes: u64,
    page_images: u64,
    core_images: u64,
    rootfs_diff: Option<u64>,
}

impl Found {
    fn visit(&mut self, entry: &EntryInfo<'_>, data: &mut dyn Read) -> io::Result<()> {
        if entry.kind != EntryKind::File {
            return Ok(());
        }
        let name = entry.path;
        match name {
            "config.dump" | "spec.dump" => {
                let file = if name == "config.dump" {
                    "config.dump"
                } else {
                    "spec.dump"
                };
                if entry.size > MAX_METADATA_BYTES {
                    self.too_large = Some((file, entry.size));
                    return Ok(());
                }
                let buf = read_up_to(data, MAX_METADATA_BYTES)?;
                if file == "config.dump" {
                    self.config = buf;
                    self.config_mtime = Some(entry.mtime);
                } else {
                    self.spec = buf;
                }
            }
            "dump.log" | "checkpoint/dump.log" => {
                self.dump_log = Some(read_up_to(data, DUMP_LOG_HEAD)?);
            }
            "rootfs-diff.tar" => self.rootfs_diff = Some(entry.size),
            "checkpoint/pstree.img" if entry.size <= MAX_PSTREE_BYTES => {
                self.pstree = Some(read_up_to(data, MAX_PSTREE_BYTES)?);
            }
            _ => {
                if let Some(image) = name.strip_prefix("checkpoint/") {
                    if is_numbered(image, "pages-") {
                        self.pages_bytes += entry.size;
                        self.page_images += 1;
                    } else if is_numbered(image, "core-") {
                        self.core_images += 1;
                    }
                }
            }
        }
        Ok(())
    }
}

/// `pages-12.img` with prefix `pages-` → true.
fn is_numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(".img"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn read_up_to(data: &mut dyn Read, limit: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    data.take(limit).read_to_end(&mut buf)?;
    Ok(buf)
}

fn parse_json(file: &'static str, bytes: &[u8]) -> Result<Value, InspectError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|source| InspectError::BadJson { file, source })?;
    if !value.is_object() {
        let source = <serde_json::Error as serde::de::Error>::custom("not a JSON object");
        return Err(InspectError::BadJson { file, source });
    }
    Ok(value)
}

/// The parts of a kubelet container name `k8s_<container>_<pod>_<namespace>_<uid>_<attempt>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeName {
    /// Container name in the pod spec.
    pub container: String,
    /// Pod name.
    pub pod: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod UID.
    pub uid: String,
    /// Restart attempt.
    pub attempt: u32,
}

impl KubeName {
    /// Parses a kubelet container name; `None` for any other name. Kubernetes names hold no `_`,
    /// so the split is unambiguous.
    pub fn parse(name: &str) -> Option<Self> {
        let parts: Vec<&str> = name.split('_').collect();
        match parts.as_slice() {
            ["k8s", container, pod, namespace, uid, attempt]
                if [container, pod, namespace, uid]
                    .iter()
                    .all(|p| !p.is_empty()) =>
            {
                Some(Self {
                    container: container.to_string(),
                    pod: pod.to_string(),
                    namespace: namespace.to_string(),
                    uid: uid.to_string(),
                    attempt: attempt.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

/// CRIU's log starts with `(00.000000) Version: 4.2.1 (gitid …)`.
fn criu_version(log: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(log);
    text.lines().find_map(|line| {
        let rest = line.split_once("Version: ")?.1;
        let version = rest.split_whitespace().next()?;
        version
            .starts_with(|c: char| c.is_ascii_digit())
            .then(|| version.to_string())
    })
}

/// CRIU image files start with the common magic, then the image's own magic.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;

/// Counts processes and threads in a CRIU `pstree.img`: after the magic(s), each entry is a
/// little-endian u32 length and a `PstreeEntry` protobuf whose field 5 lists the thread IDs.
/// `None` when the bytes do not have that shape.
fn parse_pstree(img: &[u8]) -> Option<(u64, u64)> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(img.get(at..at + 4)?.try_into().ok()?))
    };
    let mut at = if word(0)? == IMG_COMMON_MAGIC { 8 } else { 4 };
    let (mut processes, mut threads) = (0u64, 0u64);
    while at < img.len() {
        let len = word(at)? as usize;
        at += 4;
        let msg = img.get(at..at.checked_add(len)?)?;
        at += len;
        processes += 1;
        threads += count_threads(msg)?;
    }
    (processes > 0).then_some((processes, threads))
}

/// Thread IDs in one `PstreeEntry` (field 5, packed or not).
fn count_threads(mut msg: &[u8]) -> Option<u64> {
    let mut threads = 0;
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut msg)?;
                if field == 5 {
                    threads += 1;
                }
            }
            2 => {
                let len = usize::try_from(varint(&mut msg)?).ok()?;
                let mut body = msg.get(..len)?;
                msg = &msg[len..];
                if field == 5 {
                    while !body.is_empty() {
                        varint(&mut body)?;
                        threads += 1;
                    }
                }
            }
            5 => msg = msg.get(4..)?,
            1 => msg = msg.get(8..)?,
            _ => return None,
        }
    }
    Some(threads)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Seconds since the epoch → `2026-11-27T16:50:47Z` (proleptic Gregorian, UTC).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_names() {
        let k = KubeName::parse("k8s_counter_web-0_default_0d5e-11_2").unwrap();
        assert_eq!(
            (
                k.container.as_str(),
                k.pod.as_str(),
                k.namespace.as_str(),
                k.attempt
            ),
            ("counter", "web-0", "default", 2)
        );
        assert_eq!(KubeName::parse("counter"), None);
        assert_eq!(KubeName::parse("k8s_a_b_c_d_x"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_798_247), "2026-11-27T16:50:47Z");
    }

    #[test]
    fn criu_version_line() {
        let log = b"(00.000000) Version: 4.2.1 (gitid 0)\n(00.000010) Running on x\n";
        assert_eq!(criu_version(log).as_deref(), Some("4.2.1"));
        assert_eq!(criu_version(b"nothing here"), None);
    }

    #[test]
    fn pstree_from_a_real_dump() {
        // checkpoint/pstree.img of the lab's busybox counter (sh and its sleep), CRIU 4.2.1.
        let img = [
            0x19, 0x43, 0x56, 0x54, 0x30, 0x30, 0x27, 0x50, 0x0a, 0, 0, 0, 0x08, 0x01, 0x10, 0x00,
            0x18, 0x01, 0x20, 0x01, 0x28, 0x01, 0x0a, 0, 0, 0, 0x08, 0x0c, 0x10, 0x01, 0x18, 0x01,
            0x20, 0x01, 0x28, 0x0c,
        ];
        assert_eq!(parse_pstree(&img), Some((2, 2)));
        assert_eq!(parse_pstree(&img[..30]), None);
    }
}
