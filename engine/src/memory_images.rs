//! Where checkpoint images lie while a migration runs: in memory, not on the node's disk.
//!
//! `podman container checkpoint --keep` writes the images into the container's folder,
//! `StaticDir/checkpoint`, on the file system of Podman's storage. When the checkpoint stops
//! the container, Podman unmounts its root file system, and overlayfs syncs its upper file
//! system on unmount: every dirty page on that disk, the images just written among them
//! (1.3 GB for the lab's redis), goes to disk while the container is down. The images are read
//! once, sent and deleted: they need no disk. Measured in the lab (one machine, ext4 on a
//! virtual disk): `podman container checkpoint --keep` of that redis took 0.98 s with the
//! images on ext4 and 0.62–0.69 s on tmpfs; on a slower disk the difference is seconds of
//! downtime.
//!
//! So, before a checkpoint that keeps its images, [`MemoryImages::redirect`] makes
//! `StaticDir/checkpoint` a symbolic link to a fresh private folder (0700), named for the
//! container, under a root on a memory-backed file system (by default
//! [`DEFAULT_ROOT`], when `/dev/shm` is a tmpfs). Podman and CRIU follow the link, and so does
//! `podman container restore --keep`. Only when the images fit: the root's free space and the
//! host's available memory must both exceed the container's resident memory (anonymous and
//! shared pages: what CRIU dumps) plus [`MARGIN`]. Otherwise the images go to disk as before.
//!
//! The destination does the same with an incoming migration's work folder (see
//! `daemon::Node::work_dir`): the source says how much memory the container holds, and when
//! twice that fits (the files, and the restored container beside them), the folder links to
//! one under the root. The pre-copy output and the page images CRIU restores from then never
//! become dirty pages of a disk. In the lab, where the nodes share one disk, that also spares
//! the source's unmount from writing out the destination's files.
//!
//! Every removal of kept images goes through [`remove_images`], which removes a link's target as
//! well as the link (`remove_dir_all` on a link removes only the link, and a dangling link in
//! the container's folder would make Podman's next checkpoint fail). A daemon that dies leaves
//! its folders under the root until the same container's next redirect, or a reboot.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// The images root used when `/dev/shm` is a tmpfs and the daemon is given none.
pub const DEFAULT_ROOT: &str = "/dev/shm/migrate-images";

/// Room kept free beyond the images' estimated size, on the file system and in memory.
pub const MARGIN: u64 = 256 << 20;

/// `statfs` magic of tmpfs (linux/magic.h).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// A root folder for checkpoint images on a memory-backed file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryImages {
    root: PathBuf,
}

impl MemoryImages {
    /// Images under `root`, created private (0700) if missing. Fails when it cannot be made.
    pub fn at(root: &Path) -> io::Result<Self> {
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(root)?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// [`DEFAULT_ROOT`] when `/dev/shm` is a tmpfs on this host; `None` otherwise.
    pub fn host_default() -> Option<Self> {
        let statfs = rustix::fs::statfs("/dev/shm").ok()?;
        // `f_type`'s integer type differs between architectures.
        #[allow(clippy::useless_conversion)]
        if i64::from(statfs.f_type) != TMPFS_MAGIC {
            return None;
        }
        Self::at(Path::new(DEFAULT_ROOT))
            .inspect_err(|e| warn!(root = DEFAULT_ROOT, error = %e, "checkpoint images stay on disk: their folder in memory cannot be made"))
            .ok()
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Points `checkpoint` (the runtime's images folder of container `id`, a running container
    /// whose folder holds nothing of value) at a fresh folder under the root, when `needed`
    /// bytes fit there and in memory. Returns whether it did; when not, `checkpoint` is left
    /// for the runtime to make on its disk (a link left by an earlier redirect is removed).
    pub fn redirect(&self, checkpoint: &Path, id: &str, needed: u64) -> io::Result<bool> {
        remove_images(checkpoint)?;
        if let Some(short) = self.short_of(needed) {
            info!(
                needed,
                short,
                root = %self.root.display(),
                "checkpoint images go to disk: not enough room in memory for them"
            );
            return Ok(false);
        }
        let folder = self.root.join(id);
        remove_images(&folder)?;
        fs::DirBuilder::new().mode(0o700).create(&folder)?;
        std::os::unix::fs::symlink(&folder, checkpoint)?;
        Ok(true)
    }

    /// By how many bytes `needed` (plus [`MARGIN`]) exceeds the root's free space or the
    /// host's available memory, whichever is shorter; `None` when it fits.
    fn short_of(&self, needed: u64) -> Option<u64> {
        let want = needed.saturating_add(MARGIN);
        let free = rustix::fs::statvfs(&self.root)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(0);
        let room = free.min(mem_available().unwrap_or(0));
        (room < want).then(|| want - room)
    }
}

/// Removes kept images at `path`: a folder, or a link to one (both go). Nothing there is fine.
pub fn remove_images(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path)?;
        match fs::remove_dir_all(&target) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::remove_file(path)
    } else if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&meminfo, "MemAvailable:")
}

/// A `NAME: N kB` field of /proc/meminfo or /proc/PID/status, in bytes.
fn meminfo_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The memory CRIU would dump from the process tree under `pid` (this host's PID): the sum of
/// its processes' anonymous and shared resident pages. Processes that end meanwhile count 0.
pub fn resident_bytes(pid: u32) -> u64 {
    let mut total = 0;
    let mut todo = vec![pid];
    while let Some(pid) = todo.pop() {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        total += meminfo_field(&status, "RssAnon:").unwrap_or(0)
            + meminfo_field(&status, "RssShmem:").unwrap_or(0);
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text =
            "MemTotal:       24731444 kB\nMemAvailable:   22559116 kB\nRssAnon:\t    1284 kB\n";
        assert_eq!(
            meminfo_field(text, "MemAvailable:"),
            Some(22_559_116 * 1024)
        );
        assert_eq!(meminfo_field(text, "RssAnon:"), Some(1284 * 1024));
        assert_eq!(meminfo_field(text, "RssShmem:"), None);
        assert!(mem_available().is_some_and(|b| b > 0));
    }

    #[test]
    fn redirect_links_a_private_folder_and_remove_images_takes_both() {
        let tmp = tempfile::tempdir().unwrap();
        let images = MemoryImages::at(&tmp.path().join("root")).unwrap();
        let container = tmp.path().join("userdata");
        fs::create_dir(&container).unwrap();
        let checkpoint = container.join("checkpoint");
        // A stale folder from an earlier checkpoint is replaced.
        fs::create_dir(&checkpoint).unwrap();
        fs::write(checkpoint.join("pages-1.img"), b"stale").unwrap();

        assert!(images.redirect(&checkpoint, "abc", 4096).unwrap());
        let folder = images.root().join("abc");
        assert_eq!(fs::read_link(&checkpoint).unwrap(), folder);
        assert!(
            fs::read_dir(&folder).unwrap().next().is_none(),
            "a fresh folder"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&folder).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);

        // What CRIU writes through the link lands in the folder; removal takes both.
        fs::write(checkpoint.join("pages-1.img"), b"pages").unwrap();
        assert_eq!(fs::read(folder.join("pages-1.img")).unwrap(), b"pages");
        remove_images(&checkpoint).unwrap();
        assert!(fs::symlink_metadata(&checkpoint).is_err());
        assert!(!folder.exists());
        remove_images(&checkpoint).unwrap();
    }

    #[test]
    fn images_that_do_not_fit_stay_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let images = MemoryImages::at(&tmp.path().join("root")).unwrap();
        let checkpoint = tmp.path().join("checkpoint");
        // A link from an earlier redirect goes, so the runtime makes a real folder.
        let old = images.root().join("abc");
        fs::create_dir(&old).unwrap();
        std::os::unix::fs::symlink(&old, &checkpoint).unwrap();

        assert!(!images.redirect(&checkpoint, "abc", u64::MAX / 2).unwrap());
        assert!(fs::symlink_metadata(&checkpoint).is_err());
        assert!(!old.exists());
    }

    #[test]
    fn resident_bytes_counts_this_process() {
        let mine = resident_bytes(std::process::id());
        assert!(mine > 0, "this test process has anonymous memory");
        assert_eq!(resident_bytes(u32::MAX), 0);
    }
}
