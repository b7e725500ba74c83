//! The runtime seam: everything a migration asks of the container engine on a node —
//! checkpoint a container into an archive, import a checkpoint image, restore from that image
//! (or, to roll back, from the source's own archive), ask whether a container runs, and
//! remove what a failed migration left behind — behind one trait, [`Runtime`], so the
//! migration state machine does not know whether Podman or (later) the kubelet/CRI-O does it.
//! A drain also asks it which containers run and which of them may move
//! ([`Runtime::list_containers`]).
//!
//! **What a drain moves** (Podman): every running container, except one that
//! - runs in a podman pod, or is a pod's infra container: pods are not migrated (the pod's
//!   containers share its namespaces, and the pod itself stays on this node);
//! - has a bind mount of a host path (`podman inspect` `.Mounts` of type `bind`): that path
//!   exists on this node only, and restoring without it fails on the destination. Named
//!   volumes and tmpfs mounts are not refused: podman's checkpoint export carries them;
//! - runs `--privileged`: it holds every capability and sees this node's devices, so its
//!   state may refer to hardware the destination lacks; it is moved only when asked by name
//!   (`migrate NAME --from --to`);
//! - carries the label `migrate.dev/pinned=true` ([`PINNED_LABEL`]): its owner pinned it here.
//!
//! Containers that do not run (created, exited, paused) are not listed: only running
//! containers migrate. A container that may move can still fail in its migration (CRIU
//! cannot dump it, the destination refuses it); the migration then says why and rolls back.
//!
//! [`Podman`] drives the `podman` CLI, run through a command prefix: empty on a real host,
//! `lab/exec.sh NODE_DIR --` in a lab node. The CLI, not the libpod REST API, because:
//! the API needs `podman system service` running on a socket in every node (one more daemon
//! per lab node to start, supervise and tear down, and on real hosts a socket unit that is
//! often disabled), while the CLI needs nothing but the binary; the commands are exactly the
//! documented ones (`podman container checkpoint --export`, `podman load`, `podman container
//! restore`), so what the engine does can be replayed by hand and compared with Podman's own
//! manual migration; and a failure arrives as podman's own stderr, which we pass on. The cost
//! is a process spawn per call (milliseconds, next to a CRIU dump) and parsing output, which
//! is kept to the stable bits: container IDs, `Loaded image:` and the `--print-stats` JSON.
//!
//! The trait is synchronous and object safe (`Box<dyn Runtime>`): every call is one blocking
//! child process, so the tokio daemon runs it under `spawn_blocking`, and a fake runtime for
//! tests stays a plain struct. Paths are as the runtime sees them: in the lab that is inside
//! the node (e.g. a `/shared` bind mount), not the caller's filesystem.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::memory_images::{self, MemoryImages};
use crate::podman_archive::{self, Member};

/// At most this many bytes of a command's stderr go into an error (the end is kept: podman
/// prints its `Error:` line last).
const STDERR_LIMIT: usize = 2000;

/// What a checkpoint produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOutcome {
    /// The full container ID (from the runtime's statistics; the name given when it printed none).
    pub container_id: String,
    /// The archive written (as the runtime sees it).
    pub archive: PathBuf,
    /// Whether the container was left running (pre-copy rounds) or stopped (the final round).
    pub left_running: bool,
    /// Wall-clock time of the whole call, seen from here.
    pub elapsed: Duration,
    /// The runtime's own timings and page counts, when it reports them.
    pub stats: Option<CheckpointStats>,
}

/// A checkpoint whose CRIU images the runtime kept in its own folder for the container,
/// without an archive ([`Runtime::checkpoint_kept`]).
#[derive(Debug, Clone)]
pub struct KeptCheckpoint {
    /// The images folder (as the runtime's host sees it; private to root, 0700).
    pub dir: PathBuf,
    /// Its memory page images (`pages-N.img`), in the order of N: nearly all of its bytes.
    pub pages: Vec<PathBuf>,
    /// Wall-clock time of the whole call, seen from here.
    pub elapsed: Duration,
    /// The runtime's own timings and page counts, when it reports them.
    pub stats: Option<CheckpointStats>,
}

/// A final checkpoint taken without an archive (see [`Runtime::checkpoint_stopped`]).
#[derive(Debug)]
pub struct StoppedCheckpoint {
    /// CRIU's images, kept where the runtime keeps them.
    pub kept: KeptCheckpoint,
    /// The archive's other members, made in the work folder, in the order written.
    pub made: Vec<Member>,
}

/// The checkpoint whose images a runtime kept in `dir`, its page images listed.
fn kept_in(
    dir: PathBuf,
    elapsed: Duration,
    stats: Option<CheckpointStats>,
) -> Result<KeptCheckpoint, RuntimeError> {
    let pages = page_images(&dir).map_err(|e| RuntimeError::UnexpectedOutput {
        command: format!("listing {}", dir.display()),
        what: "CRIU's page images (pages-N.img)",
        output: e.to_string(),
    })?;
    Ok(KeptCheckpoint {
        dir,
        pages,
        elapsed,
        stats,
    })
}

/// Checkpoint statistics as reported by podman `--print-stats` (from CRIU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointStats {
    /// podman's whole checkpoint, export included.
    pub engine_duration: Duration,
    /// The OCI runtime's (crun's) checkpoint call.
    pub runtime_duration: Duration,
    /// Time CRIU spent freezing the processes.
    pub freezing_time: Duration,
    /// Time the processes stayed frozen: the downtime of a checkpoint that leaves them running.
    pub frozen_time: Duration,
    /// Memory pages CRIU scanned.
    pub pages_scanned: u64,
    /// Memory pages CRIU wrote to the image.
    pub pages_written: u64,
}

/// The label that pins a container to its node: `migrate.dev/pinned=true` keeps a drain from
/// moving it.
pub const PINNED_LABEL: &str = "migrate.dev/pinned";

/// What a migration's plan asks of the container it moves ([`Runtime::facts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerFacts {
    /// Whether it runs.
    pub running: bool,
    /// The image it was created from, as a reference.
    pub image: String,
    /// Its full ID.
    pub id: String,
    /// The memory a checkpoint of it would hold, when the runtime can tell (see
    /// [`Runtime::memory_bytes`]).
    pub memory_bytes: Option<u64>,
}

/// A running container, as a drain sees it: what it is, and whether it may move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedContainer {
    /// Its name (migrations ask for containers by name).
    pub name: String,
    /// Its full ID.
    pub id: String,
    /// The image it was created from.
    pub image: String,
    /// Why a drain leaves it here (every reason, joined by `; `); `None` when it may move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_movable: Option<String>,
    /// The memory it uses now (its cgroup's, as `podman stats` reports it): about what its
    /// checkpoint will hold, for estimating how long a drain takes. `None` when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

impl ListedContainer {
    /// Whether a drain may migrate it.
    pub fn movable(&self) -> bool {
        self.not_movable.is_none()
    }
}

/// Why a runtime call failed. Each message names the command, and says what to check.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The command could not be started at all.
    #[error("could not run `{command}`: {source} (is podman installed, and is the command prefix right?)")]
    Spawn {
        /// The command line, prefix included.
        command: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime has no container by that name or ID.
    #[error("`{command}` failed: there is no container {container:?} on this node (check `podman ps -a` there): {stderr}")]
    NoSuchContainer {
        /// The command line.
        command: String,
        /// The container asked for.
        container: String,
        /// podman's stderr, trimmed and bounded.
        stderr: String,
    },
    /// The runtime has no image by that reference.
    #[error("`{command}` failed: there is no image {image:?} on this node (was it imported? check `podman images` there): {stderr}")]
    NoSuchImage {
        /// The command line.
        command: String,
        /// The image reference asked for.
        image: String,
        /// podman's stderr, trimmed and bounded.
        stderr: String,
    },
    /// The command failed and its stderr mentions CRIU.
    #[error("`{command}` failed ({status}): {stderr}{} (is CRIU >= 4.2 installed in the node? `criu check` there; CRIU's log is in the container's checkpoint directory)", criu_says(.criu_errors))]
    Criu {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// podman's stderr, trimmed and bounded.
        stderr: String,
        /// The last `Error` lines of the CRIU log that stderr names, read where podman runs;
        /// empty when it names none or the log could not be read.
        criu_errors: Vec<String>,
    },
    /// The command failed for another reason.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// podman's stderr, trimmed and bounded.
        stderr: String,
    },
    /// This node's runtime does not do that (a Kubernetes node leaves restores and removals to
    /// the kubelet).
    #[error("{runtime} does not {operation}")]
    Unsupported {
        /// What was asked.
        operation: &'static str,
        /// The runtime asked.
        runtime: String,
    },
    /// Work on this node's own files around a runtime call failed (what, and what to check).
    #[error("{message}")]
    Local {
        /// What failed.
        message: String,
    },
    /// The kubelet's checkpoint call, or taking its archive, failed.
    #[error("{message}")]
    Kubelet {
        /// What failed and what to check (from [`crate::kubelet::KubeletError`]).
        message: String,
    },
    /// The command succeeded but printed something we could not read.
    #[error("`{command}` succeeded but its output is not what was expected ({what}): {output:?}")]
    UnexpectedOutput {
        /// The command line.
        command: String,
        /// What was looked for.
        what: &'static str,
        /// Its stdout, bounded.
        output: String,
    },
}

/// The container engine on one node, as a migration uses it.
pub trait Runtime: Send + Sync + fmt::Debug {
    /// Which runtime, on which node, for logs and errors.
    fn describe(&self) -> String;

    /// Checkpoints `container` into the uncompressed archive `out` (mode 0600). With
    /// `leave_running` the container goes on after the dump (a pre-copy round); without, it is
    /// stopped and its memory is only in the archive. Restore only archives of stopping
    /// checkpoints: Podman takes a left-running container's file changes after it resumed, so
    /// a file it had open during the dump may be gone from the archive, and CRIU fails to
    /// restore it.
    fn checkpoint(
        &self,
        container: &str,
        out: &Path,
        leave_running: bool,
    ) -> Result<CheckpointOutcome, RuntimeError>;

    /// A pre-copy checkpoint without an archive: checkpoints `container` with it left running
    /// and keeps CRIU's images where the runtime keeps them for the container. A pre-copy
    /// round only needs the memory pages to warm the destination's chunk store; an archive
    /// (Podman's export: a tar of every image, written to disk) costs seconds per GiB. The
    /// caller removes [`KeptCheckpoint::dir`] once it has sent the pages. `Ok(None)`: this
    /// runtime keeps no images (use [`Runtime::checkpoint`] with `leave_running`).
    /// `writing_to` is told that folder, when this process can read it, as soon as it is
    /// known and before CRIU starts writing there (see [`crate::cut_ahead`]).
    fn checkpoint_kept(
        &self,
        _container: &str,
        _writing_to: &dyn Fn(&Path),
    ) -> Result<Option<KeptCheckpoint>, RuntimeError> {
        Ok(None)
    }

    /// The final checkpoint without an archive: `container` stops and its CRIU images are
    /// kept as by [`Runtime::checkpoint_kept`], and the archive's other members, as the
    /// runtime's own export would write them, are made in `work` (see
    /// [`crate::podman_archive`]). `None`, with the container untouched, when this runtime
    /// cannot (then [`Runtime::checkpoint`] exports the archive). When making the members fails
    /// after the container stopped, it is restored in place before the error returns.
    fn checkpoint_stopped(
        &self,
        _container: &str,
        _work: &Path,
    ) -> Result<Option<StoppedCheckpoint>, RuntimeError> {
        Ok(None)
    }

    /// Restores `container`, which stopped after [`Runtime::checkpoint_kept`] or
    /// [`Runtime::checkpoint_stopped`], in place from the images that call kept (`podman
    /// container restore --keep`).
    fn restore_kept(&self, _container: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported {
            operation: "restore a container from kept checkpoint images",
            runtime: self.describe(),
        })
    }

    /// Loads an image (an `engine::image` checkpoint image as an OCI archive or OCI layout
    /// directory, or an image archive from [`Runtime::save_image`]) into the node's image
    /// store; returns the reference it was loaded under.
    fn import_image(&self, oci_archive: &Path) -> Result<String, RuntimeError>;

    /// Gives `image` (an ID or reference) the extra name `reference`.
    fn tag_image(&self, image: &str, reference: &str) -> Result<(), RuntimeError>;

    /// Restores a container from a checkpoint image, named `name` or as it was checkpointed;
    /// returns the new container's ID.
    fn restore(&self, image_ref: &str, name: Option<&str>) -> Result<String, RuntimeError>;

    /// Restores a container from a checkpoint archive (`podman container restore --import`):
    /// the rollback when the source had been stopped, and the destination's restore without an
    /// image. No container of the same name may exist (remove a stopped one first). Returns its ID.
    fn restore_in_place(&self, archive: &Path) -> Result<String, RuntimeError>;

    /// Whether `container` is running; [`RuntimeError::NoSuchContainer`] if it does not exist.
    fn is_running(&self, container: &str) -> Result<bool, RuntimeError>;

    /// Whether `container` runs, its image, ID and memory, as [`Runtime::is_running`],
    /// [`Runtime::image_of`], [`Runtime::container_id`] and [`Runtime::memory_bytes`] tell
    /// them; [`RuntimeError::NoSuchContainer`] if it does not exist. A runtime that can answer
    /// in one question should: each `podman` command costs tens of milliseconds, and the plan
    /// of a migration waits for them.
    fn facts(&self, container: &str) -> Result<ContainerFacts, RuntimeError> {
        Ok(ContainerFacts {
            running: self.is_running(container)?,
            image: self.image_of(container)?,
            id: self.container_id(container)?,
            memory_bytes: self.memory_bytes(container),
        })
    }

    /// The memory a checkpoint of `container` would hold (see
    /// [`memory_images::resident_bytes`]); `None` when this runtime cannot tell.
    fn memory_bytes(&self, _container: &str) -> Option<u64> {
        None
    }

    /// Removes `container`, stopping it at once if it runs. Removing one that does not exist
    /// succeeds, so cleanup can run twice.
    fn remove_container(&self, container: &str) -> Result<(), RuntimeError>;

    /// Removes the image `image_ref`; an absent image is not an error. An image a container
    /// still uses is not removed (the error says so): remove the container first.
    fn remove_image(&self, image_ref: &str) -> Result<(), RuntimeError>;

    /// The image `container` was created from, as a reference (`localhost/lab/busybox:latest`).
    fn image_of(&self, container: &str) -> Result<String, RuntimeError>;

    /// The full ID of `container` (a name or ID).
    fn container_id(&self, container: &str) -> Result<String, RuntimeError>;

    /// Whether the node's image store holds `image_ref`.
    fn has_image(&self, image_ref: &str) -> Result<bool, RuntimeError>;

    /// Writes `image_ref` to `out` as an uncompressed image archive that [`Runtime::import_image`]
    /// loads on another node (base image staging). Uncompressed, so the transfer deduplicates it.
    fn save_image(&self, image_ref: &str, out: &Path) -> Result<(), RuntimeError>;

    /// The containers running on this node, sorted by name, each with the reasons a drain
    /// must leave it here (the rules are in this module's documentation).
    fn list_containers(&self) -> Result<Vec<ListedContainer>, RuntimeError>;
}

/// [`Runtime`] through the `podman` CLI, run after a command prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Podman {
    /// Words run before `podman`: empty on a host, `lab/exec.sh NODE_DIR --` in a lab node.
    prefix: Vec<OsString>,
    /// Pass `--tcp-established` to checkpoint and restore (containers with open TCP connections).
    tcp_established: bool,
    /// Where kept checkpoints write their images when they fit, instead of the container's
    /// disk (see [`crate::memory_images`]); only for podman in this process's namespaces.
    memory_images: Option<MemoryImages>,
}

impl Podman {
    /// Podman run as `PREFIX... podman ARGS...`.
    pub fn new<S: Into<OsString>>(prefix: impl IntoIterator<Item = S>) -> Self {
        Self {
            prefix: prefix.into_iter().map(Into::into).collect(),
            tcp_established: false,
            memory_images: None,
        }
    }

    /// Podman on this host, run as plain `podman`.
    pub fn local() -> Self {
        Self::new(Vec::<OsString>::new())
    }

    /// Checkpoints and restores established TCP connections too (off by default: CRIU then
    /// needs the connections' peers to be reachable from the destination).
    pub fn with_tcp_established(mut self, on: bool) -> Self {
        self.tcp_established = on;
        self
    }

    /// Kept checkpoints write their CRIU images under `images` when they fit (see
    /// [`crate::memory_images`]). Ignored for podman run through a prefix: its files are not
    /// this process's to link.
    pub fn with_memory_images(mut self, images: Option<MemoryImages>) -> Self {
        self.memory_images = images.filter(|_| self.prefix.is_empty());
        self
    }

    /// Before a checkpoint of `container` (ID `id`, main process `pid`) that keeps its images
    /// in `checkpoint`: points that folder into memory when the images fit there. A failure
    /// only leaves the images on disk.
    fn images_to_memory(&self, checkpoint: &Path, id: &str, pid: u32) {
        let Some(images) = &self.memory_images else {
            return;
        };
        let needed = memory_images::resident_bytes(pid);
        match images.redirect(checkpoint, id, needed) {
            Ok(true) => {
                debug!(needed, root = %images.root().display(), "checkpoint images go to memory")
            }
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, folder = %checkpoint.display(), "checkpoint images go to disk: linking their folder into memory failed");
                let _ = memory_images::remove_images(checkpoint);
            }
        }
    }

    /// Runs `podman ARGS`; Ok(stdout) on success, else the classified error. `subject` is the
    /// container or image the command is about, for the "no such" errors.
    fn run(&self, args: &[&OsStr], subject: Subject<'_>) -> Result<String, RuntimeError> {
        let words = self.podman_words(args);
        let command = command_line(&words);
        let output = Command::new(words[0])
            .args(&words[1..])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| RuntimeError::Spawn {
                command: command.clone(),
                source,
            })?;
        let mut checked = check(command, &output, subject);
        if let Err(RuntimeError::Criu {
            stderr,
            criu_errors,
            ..
        }) = &mut checked
        {
            *criu_errors = self.criu_errors(stderr);
        }
        checked
    }

    /// The words that run `WORDS` through this prefix.
    fn words<'w>(&'w self, words: impl IntoIterator<Item = &'w OsStr>) -> Vec<&'w OsStr> {
        let prefix = self.prefix.iter().map(OsString::as_os_str);
        prefix.chain(words).collect()
    }

    /// The words that run `podman ARGS` through this prefix.
    fn podman_words<'w>(&'w self, args: &[&'w OsStr]) -> Vec<&'w OsStr> {
        self.words(std::iter::once(OsStr::new("podman")).chain(args.iter().copied()))
    }

    /// The last [`CRIU_ERROR_LINES`] `Error` lines of the CRIU log a failed command's
    /// `stderr` names (crun: "Please check CRIU logfile `PATH`"), read through this prefix,
    /// where the path is valid. Empty when there is none or it cannot be read: the error
    /// still names the log.
    fn criu_errors(&self, stderr: &str) -> Vec<String> {
        let Some(log) = criu_log_path(stderr) else {
            return Vec::new();
        };
        let words = self.words(["grep", "-F", "Error (", "--", log].map(OsStr::new));
        let output = Command::new(words[0])
            .args(&words[1..])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        let Ok(output) = output else {
            return Vec::new();
        };
        let text = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let first = lines.len().saturating_sub(CRIU_ERROR_LINES);
        lines[first..].iter().map(|l| bounded(l)).collect()
    }
}

/// At most this many of CRIU's `Error` lines go into an error: the first one that failed is
/// usually among the last few.
const CRIU_ERROR_LINES: usize = 6;

/// The log file a crun error names: "Please check CRIU logfile `PATH`".
fn criu_log_path(stderr: &str) -> Option<&str> {
    let (_, rest) = stderr.split_once("CRIU logfile `")?;
    let (path, _) = rest.split_once('`')?;
    path.starts_with('/').then_some(path)
}

/// How [`RuntimeError::Criu`] quotes CRIU's log: nothing when there are no lines.
fn criu_says(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    format!("; its log says: {}", lines.join(" | "))
}

impl Runtime for Podman {
    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            "podman".to_string()
        } else {
            format!("podman via `{}`", command_line(&self.words([])))
        }
    }

    fn checkpoint(
        &self,
        container: &str,
        out: &Path,
        leave_running: bool,
    ) -> Result<CheckpointOutcome, RuntimeError> {
        let mut export = OsString::from("--export=");
        export.push(out);
        let mut options = vec![OsStr::new("--compress=none"), export.as_os_str()];
        if leave_running {
            options.push(OsStr::new("--leave-running"));
        }
        let (stdout, elapsed) = self.run_checkpoint(container, &options)?;
        let (container_id, stats) = match parse_stats(&stdout) {
            Some((id, stats)) => (id, Some(stats)),
            None => (container.to_string(), None),
        };
        Ok(CheckpointOutcome {
            container_id,
            archive: out.to_path_buf(),
            left_running: leave_running,
            elapsed,
            stats,
        })
    }

    fn checkpoint_kept(
        &self,
        container: &str,
        writing_to: &dyn Fn(&Path),
    ) -> Result<Option<KeptCheckpoint>, RuntimeError> {
        // podman keeps the images in the container's static folder, `checkpoint/`.
        let format = "{{.Id}}\t{{.StaticDir}}\t{{.State.Pid}}";
        let (id, dir, pid) = self.inspect(container, format, "ID, folder, PID", |out| {
            let mut words = out.split('\t');
            let id = words.next().filter(|w| is_container_id(w))?.to_string();
            let dir = Path::new(words.next().filter(|w| w.starts_with('/'))?).join("checkpoint");
            Some((id, dir, words.next()?.parse::<u32>().ok()?))
        })?;
        self.images_to_memory(&dir, &id, pid);
        // Through a prefix, the folder is another mount namespace's.
        if self.prefix.is_empty() {
            writing_to(&dir);
        }
        let (stdout, elapsed) =
            self.run_checkpoint(container, &["--keep", "--leave-running"].map(OsStr::new))?;
        let stats = parse_stats(&stdout).map(|(_, stats)| stats);
        kept_in(dir, elapsed, stats).map(Some)
    }

    fn checkpoint_stopped(
        &self,
        container: &str,
        work: &Path,
    ) -> Result<Option<StoppedCheckpoint>, RuntimeError> {
        // Podman's files are read here: only when podman runs in this process's namespaces.
        if !self.prefix.is_empty() {
            return Ok(None);
        }
        let format = "{{.Id}}\t{{.StaticDir}}\t{{.GraphDriver.Data.UpperDir}}\t{{.State.Pid}}";
        let (id, userdata, upper, pid) =
            self.inspect(container, format, "ID, folder, layer, PID", |out| {
                let mut words = out.split('\t').map(str::to_string);
                let id = words.next().filter(|w| is_container_id(w))?;
                let userdata = PathBuf::from(words.next().filter(|w| w.starts_with('/'))?);
                let upper = PathBuf::from(words.next().filter(|w| w.starts_with('/'))?);
                let pid = words.next()?.parse::<u32>().ok()?;
                Some((id, userdata, upper, pid))
            })?;
        // Before stopping anything: can the archive be made here at all?
        let made = match podman_archive::database_of(&userdata) {
            None => Err("Podman keeps no SQLite database beside its storage".to_string()),
            Some(db) => podman_archive::read_config(&db, &id)
                .map_err(|e| e.to_string())
                .and_then(|config| match podman_archive::unsupported(&config) {
                    Some(why) => Err(why.to_string()),
                    None => podman_archive::dumps(config, &id).map_err(|e| e.to_string()),
                }),
        };
        let dumps = match made {
            Ok(dumps) => dumps,
            Err(why) => {
                info!(container, %why, "podman exports this container's checkpoint itself");
                return Ok(None);
            }
        };
        let dir = userdata.join(podman_archive::IMAGES);
        self.images_to_memory(&dir, &id, pid);
        let (stdout, elapsed) = self.run_checkpoint(container, &[OsStr::new("--keep")])?;
        let stats = parse_stats(&stdout).map(|(_, stats)| stats);
        // The container is stopped from here: if the rest fails, it runs again.
        let rest = (|| -> Result<StoppedCheckpoint, RuntimeError> {
            let args = ["diff", "--format", "json", "--", &id].map(OsStr::new);
            let stdout = self.run(&args, Subject::Container(container))?;
            let changes: podman_archive::Changes =
                serde_json::from_str(&stdout).map_err(|e| RuntimeError::UnexpectedOutput {
                    command: self.command_for(&args),
                    what: "a JSON object of changed, added and deleted paths",
                    output: format!("{e}: {}", bounded(&stdout)),
                })?;
            let made = (|| {
                let mut made = podman_archive::static_members(&userdata, work)?;
                made.extend(podman_archive::write_dumps(dumps, work)?);
                made.extend(podman_archive::rootfs_diff(&upper, &changes, work)?);
                Ok::<_, podman_archive::PodmanArchiveError>(made)
            })()
            .map_err(|e| RuntimeError::Local {
                message: format!("making the checkpoint archive's files: {e}"),
            })?;
            Ok(StoppedCheckpoint {
                kept: kept_in(dir.clone(), elapsed, stats)?,
                made,
            })
        })();
        rest.map(Some)
            .map_err(|e| match self.restore_kept(container) {
                Ok(()) => {
                    let _ = memory_images::remove_images(&dir);
                    e
                }
                Err(back) => RuntimeError::Local {
                    message: format!(
                        "{e}; then restoring the container in place failed too: {back} (its \
                     checkpoint is in {}: `podman container restore --keep {container}`)",
                        dir.display()
                    ),
                },
            })
    }

    fn restore_kept(&self, container: &str) -> Result<(), RuntimeError> {
        let args = self.restore_args(&[OsStr::new("--keep")], Some(OsStr::new(container)));
        self.run(&args, Subject::Container(container)).map(drop)
    }

    fn import_image(&self, oci_archive: &Path) -> Result<String, RuntimeError> {
        let args = [OsStr::new("load"), OsStr::new("-q"), OsStr::new("-i")];
        let mut args = args.to_vec();
        args.push(oci_archive.as_os_str());
        let stdout = self.run(&args, Subject::None)?;
        parse_loaded(&stdout).ok_or_else(|| RuntimeError::UnexpectedOutput {
            command: self.command_for(&args),
            what: "a `Loaded image: REF` line",
            output: bounded(&stdout),
        })
    }

    fn tag_image(&self, image: &str, reference: &str) -> Result<(), RuntimeError> {
        let args = ["tag", image, reference].map(OsStr::new);
        self.run(&args, Subject::Image(image)).map(drop)
    }

    fn restore(&self, image_ref: &str, name: Option<&str>) -> Result<String, RuntimeError> {
        let mut options = Vec::new();
        if let Some(name) = name {
            options.extend([OsStr::new("--name"), OsStr::new(name)]);
        }
        let args = self.restore_args(&options, Some(OsStr::new(image_ref)));
        let stdout = self.run(&args, Subject::Image(image_ref))?;
        self.container_id(&args, &stdout)
    }

    fn restore_in_place(&self, archive: &Path) -> Result<String, RuntimeError> {
        let mut import = OsString::from("--import=");
        import.push(archive);
        let args = self.restore_args(&[&import], None);
        let stdout = self.run(&args, Subject::None)?;
        self.container_id(&args, &stdout)
    }

    fn memory_bytes(&self, container: &str) -> Option<u64> {
        self.facts(container).ok()?.memory_bytes
    }

    fn facts(&self, container: &str) -> Result<ContainerFacts, RuntimeError> {
        // One `podman container inspect` for what the plan would otherwise ask in four.
        let format = "{{.State.Running}}\t{{.ImageName}}\t{{.Id}}\t{{.State.Pid}}";
        let (running, image, id, pid) = self.inspect(
            container,
            format,
            "running, image, ID and PID, tab-separated",
            parse_facts,
        )?;
        Ok(ContainerFacts {
            running,
            image,
            id,
            memory_bytes: self.resident_bytes(pid),
        })
    }

    fn is_running(&self, container: &str) -> Result<bool, RuntimeError> {
        self.inspect(
            container,
            "{{.State.Running}}",
            "`true` or `false`",
            parse_running,
        )
    }

    fn remove_container(&self, container: &str) -> Result<(), RuntimeError> {
        let args = [
            "container",
            "rm",
            "--ignore",
            "--force",
            "--time",
            "0",
            "--",
            container,
        ]
        .map(OsStr::new);
        self.run(&args, Subject::Container(container)).map(drop)
    }

    fn remove_image(&self, image_ref: &str) -> Result<(), RuntimeError> {
        let args = ["image", "rm", "--ignore", "--", image_ref].map(OsStr::new);
        self.run(&args, Subject::Image(image_ref)).map(drop)
    }

    fn image_of(&self, container: &str) -> Result<String, RuntimeError> {
        self.inspect(container, "{{.ImageName}}", "an image name", parse_image)
    }

    fn container_id(&self, container: &str) -> Result<String, RuntimeError> {
        self.inspect(container, "{{.Id}}", "a container ID", parse_id)
    }

    fn has_image(&self, image_ref: &str) -> Result<bool, RuntimeError> {
        let words = self.podman_words(&["image", "exists", "--", image_ref].map(OsStr::new));
        let command = command_line(&words);
        let output = Command::new(words[0])
            .args(&words[1..])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| RuntimeError::Spawn {
                command: command.clone(),
                source,
            })?;
        // `podman image exists`: 0 yes, 1 no, anything else an error.
        match output.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => check(command, &output, Subject::Image(image_ref)).map(|_| false),
        }
    }

    fn save_image(&self, image_ref: &str, out: &Path) -> Result<(), RuntimeError> {
        let mut args: Vec<&OsStr> = ["save", "--quiet", "--format", "docker-archive", "-o"]
            .map(OsStr::new)
            .to_vec();
        args.extend([out.as_os_str(), OsStr::new("--"), OsStr::new(image_ref)]);
        self.run(&args, Subject::Image(image_ref)).map(drop)
    }

    fn list_containers(&self) -> Result<Vec<ListedContainer>, RuntimeError> {
        let args = ["ps", "--quiet", "--no-trunc"].map(OsStr::new);
        let stdout = self.run(&args, Subject::None)?;
        let ids: Vec<&str> = stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let inspected = match self.inspect_containers(&ids) {
            Ok(all) => all,
            // One went away between `ps` and `inspect`: ask one at a time, skipping the gone.
            Err(_) if ids.len() > 1 => {
                let mut all = Vec::new();
                for id in &ids {
                    match self.inspect_containers(&[id]) {
                        Ok(one) => all.extend(one),
                        Err(RuntimeError::NoSuchContainer { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                all
            }
            Err(RuntimeError::NoSuchContainer { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut listed: Vec<ListedContainer> = inspected
            .into_iter()
            .filter(|c| c.state.running)
            .map(|c| {
                let reasons = refusals(&c);
                ListedContainer {
                    not_movable: (!reasons.is_empty()).then(|| reasons.join("; ")),
                    name: c.name,
                    id: c.id,
                    image: c.image_name,
                    memory_bytes: None,
                }
            })
            .collect();
        // Only an estimate: a drain goes on without it when podman cannot say.
        let ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
        if let Ok(usage) = self.memory_usage(&ids) {
            for c in &mut listed {
                c.memory_bytes = usage.get(&c.id).copied();
            }
        }
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listed)
    }
}

impl Podman {
    /// The memory each of `ids` uses, by full ID: `podman stats --no-stream` (one JSON object
    /// per container; its `MemUsage` is the cgroup's usage in bytes).
    fn memory_usage(&self, ids: &[&str]) -> Result<HashMap<String, u64>, RuntimeError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut args: Vec<&OsStr> = [
            "stats",
            "--no-stream",
            "--no-reset",
            "--format",
            "{{json .}}",
        ]
        .map(OsStr::new)
        .to_vec();
        args.extend(ids.iter().map(OsStr::new));
        let stdout = self.run(&args, Subject::None)?;
        Ok(parse_memory_usage(&stdout))
    }

    /// The resident memory of the container whose init is `pid`, read in this process's
    /// `/proc`: only without a prefix is that PID this process's to read.
    fn resident_bytes(&self, pid: u32) -> Option<u64> {
        if !self.prefix.is_empty() || pid == 0 {
            return None;
        }
        Some(memory_images::resident_bytes(pid)).filter(|b| *b > 0)
    }

    /// One field of `podman container inspect --format FORMAT CONTAINER`, parsed from its
    /// trimmed output by `parse`; `what` names the expected value when it does not parse.
    fn inspect<T>(
        &self,
        container: &str,
        format: &str,
        what: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, RuntimeError> {
        let args = ["container", "inspect", "--format", format, "--", container].map(OsStr::new);
        let stdout = self.run(&args, Subject::Container(container))?;
        parse(stdout.trim()).ok_or_else(|| RuntimeError::UnexpectedOutput {
            command: self.command_for(&args),
            what,
            output: bounded(&stdout),
        })
    }

    /// `podman container checkpoint --print-stats OPTIONS... [--tcp-established] -- CONTAINER`;
    /// its stdout (the statistics) and how long it took.
    fn run_checkpoint(
        &self,
        container: &str,
        options: &[&OsStr],
    ) -> Result<(String, Duration), RuntimeError> {
        let mut args: Vec<&OsStr> = ["container", "checkpoint", "--print-stats"]
            .map(OsStr::new)
            .to_vec();
        args.extend_from_slice(options);
        if self.tcp_established {
            args.push(OsStr::new("--tcp-established"));
        }
        args.extend([OsStr::new("--"), OsStr::new(container)]);
        let started = Instant::now();
        let stdout = self.run(&args, Subject::Container(container))?;
        Ok((stdout, started.elapsed()))
    }

    /// `container restore OPTIONS... [--tcp-established] [-- TARGET]`: the words of a restore.
    fn restore_args<'a>(&self, options: &[&'a OsStr], target: Option<&'a OsStr>) -> Vec<&'a OsStr> {
        let mut args: Vec<&OsStr> = vec![OsStr::new("container"), OsStr::new("restore")];
        args.extend_from_slice(options);
        if self.tcp_established {
            args.push(OsStr::new("--tcp-established"));
        }
        if let Some(target) = target {
            args.extend([OsStr::new("--"), target]);
        }
        args
    }

    /// `podman container inspect IDS...`, parsed.
    fn inspect_containers(&self, ids: &[&str]) -> Result<Vec<InspectedContainer>, RuntimeError> {
        let mut args: Vec<&OsStr> = ["container", "inspect", "--"].map(OsStr::new).to_vec();
        args.extend(ids.iter().map(OsStr::new));
        let subject = match ids {
            [one] => Subject::Container(one),
            _ => Subject::None,
        };
        let stdout = self.run(&args, subject)?;
        serde_json::from_str(&stdout).map_err(|_| RuntimeError::UnexpectedOutput {
            command: self.command_for(&args),
            what: "a JSON array of containers",
            output: bounded(&stdout),
        })
    }

    /// The command line of `podman ARGS` with this prefix, for errors.
    fn command_for(&self, args: &[&OsStr]) -> String {
        command_line(&self.podman_words(args))
    }

    /// The container ID a restore printed (its last line).
    fn container_id(&self, args: &[&OsStr], stdout: &str) -> Result<String, RuntimeError> {
        let id = stdout.lines().map(str::trim).rfind(|l| !l.is_empty());
        match id {
            Some(id) if is_container_id(id) => Ok(id.to_string()),
            _ => Err(RuntimeError::UnexpectedOutput {
                command: self.command_for(args),
                what: "a container ID",
                output: bounded(stdout),
            }),
        }
    }
}

/// [`Podman::facts`]'s inspect output: `RUNNING\tIMAGE\tID\tPID`.
fn parse_facts(out: &str) -> Option<(bool, String, String, u32)> {
    let mut fields = out.split('\t');
    let running = parse_running(fields.next()?)?;
    let image = parse_image(fields.next()?)?;
    let id = parse_id(fields.next()?)?;
    let pid = fields.next()?.parse().ok()?;
    fields.next().is_none().then_some((running, image, id, pid))
}

/// `{{.State.Running}}` of an inspect.
fn parse_running(out: &str) -> Option<bool> {
    match out {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// `{{.ImageName}}` of an inspect: never empty.
fn parse_image(out: &str) -> Option<String> {
    (!out.is_empty()).then(|| out.to_string())
}

/// `{{.Id}}` of an inspect: a full container ID.
fn parse_id(out: &str) -> Option<String> {
    is_container_id(out).then(|| out.to_string())
}

/// What a command is about, so that "no such …" can be said of the right thing.
#[derive(Debug, Clone, Copy)]
enum Subject<'a> {
    None,
    Container(&'a str),
    Image(&'a str),
}

/// Ok(stdout) if the command succeeded, else the error its stderr points to.
fn check(command: String, output: &Output, subject: Subject<'_>) -> Result<String, RuntimeError> {
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = bounded(&String::from_utf8_lossy(&output.stderr));
    let status = output.status.to_string();
    let lower = stderr.to_lowercase();
    match subject {
        Subject::Container(c)
            if lower.contains("no such container")
                || lower.contains("no container with name or id") =>
        {
            return Err(RuntimeError::NoSuchContainer {
                command,
                container: c.to_string(),
                stderr,
            });
        }
        Subject::Image(i)
            if lower.contains("no such container or image")
                || lower.contains("image not known")
                || lower.contains("no such image") =>
        {
            return Err(RuntimeError::NoSuchImage {
                command,
                image: i.to_string(),
                stderr,
            });
        }
        _ => {}
    }
    if lower.contains("criu") {
        Err(RuntimeError::Criu {
            command,
            status,
            stderr,
            criu_errors: Vec::new(),
        })
    } else {
        Err(RuntimeError::Failed {
            command,
            status,
            stderr,
        })
    }
}

/// `text` trimmed, and if longer than [`STDERR_LIMIT`] bytes only its end, marked with `…`.
fn bounded(text: &str) -> String {
    let text = text.trim();
    if text.len() <= STDERR_LIMIT {
        return text.to_string();
    }
    let mut start = text.len() - STDERR_LIMIT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

/// Words joined by spaces, each quoted if it would not read back as one word.
fn command_line(words: &[&OsStr]) -> String {
    let quoted: Vec<String> = words
        .iter()
        .map(|w| {
            let w = w.to_string_lossy();
            let plain = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
            if plain {
                w.into_owned()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect();
    quoted.join(" ")
}

/// A full (64 hex digits) or short container ID.
fn is_container_id(s: &str) -> bool {
    (12..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The reference from `podman load` output: the last `Loaded image: REF` (or
/// `Loaded image(s): REF, …`, first of the list).
fn parse_loaded(stdout: &str) -> Option<String> {
    stdout.lines().rev().find_map(|line| {
        let rest = line.trim().strip_prefix("Loaded image")?;
        let (_, refs) = rest.split_once(':')?;
        let first = refs.split(',').next()?.trim();
        (!first.is_empty()).then(|| first.to_string())
    })
}

/// What `podman container inspect` says of a container, as far as a drain needs it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedContainer {
    id: String,
    name: String,
    #[serde(default)]
    image_name: String,
    state: InspectedState,
    /// The pod's ID, empty when in none.
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    is_infra: bool,
    #[serde(default)]
    mounts: Option<Vec<InspectedMount>>,
    #[serde(default)]
    host_config: Option<InspectedHostConfig>,
    #[serde(default)]
    config: Option<InspectedConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedState {
    #[serde(default)]
    running: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedMount {
    #[serde(default, rename = "Type")]
    kind: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedHostConfig {
    #[serde(default)]
    privileged: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedConfig {
    #[serde(default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
}

/// `podman stats --format '{{json .}}'` output: one object per container. Objects that do
/// not parse, or lack the ID or the usage, are left out.
fn parse_memory_usage(stdout: &str) -> HashMap<String, u64> {
    #[derive(Deserialize)]
    struct Stats {
        #[serde(rename = "ContainerID")]
        id: String,
        #[serde(rename = "MemUsage")]
        mem_usage: u64,
    }
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Stats>()
        .map_while(Result::ok)
        .map(|s| (s.id, s.mem_usage))
        .collect()
}

/// Why a drain must leave `c` on its node (the rules in this module's documentation); empty
/// when it may move.
fn refusals(c: &InspectedContainer) -> Vec<String> {
    let mut reasons = Vec::new();
    if let Some(pod) = c.pod.as_deref().filter(|p| !p.is_empty()) {
        let pod: String = pod.chars().take(12).collect();
        reasons.push(if c.is_infra {
            format!("the infra container of podman pod {pod}: pods are not migrated")
        } else {
            format!(
                "runs in podman pod {pod}: pods are not migrated (its containers share the \
                 pod's namespaces, which stay on this node)"
            )
        });
    }
    for m in c.mounts.iter().flatten().filter(|m| m.kind == "bind") {
        reasons.push(format!(
            "bind mount of host path {} at {}: that path is on this node only (a named \
             volume would move with the container)",
            m.source, m.destination
        ));
    }
    if c.host_config.as_ref().is_some_and(|h| h.privileged) {
        reasons.push(
            "runs --privileged: it has every capability and this node's devices, so its \
             state may depend on this node (move it by name, `migrate NAME --from --to`, if \
             you know it does not)"
                .to_string(),
        );
    }
    let pinned = c
        .config
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .and_then(|l| l.get(PINNED_LABEL))
        .is_some_and(|v| v == "true");
    if pinned {
        reasons.push(format!(
            "pinned to this node by the label {PINNED_LABEL}=true"
        ));
    }
    reasons
}

/// podman `--print-stats` JSON (times in microseconds).
#[derive(Debug, Deserialize)]
struct PrintedStats {
    podman_checkpoint_duration: u64,
    container_statistics: Vec<ContainerStats>,
}

#[derive(Debug, Deserialize)]
struct ContainerStats {
    #[serde(rename = "Id")]
    id: String,
    runtime_checkpoint_duration: u64,
    criu_statistics: CriuStats,
}

#[derive(Debug, Deserialize)]
struct CriuStats {
    #[serde(default)]
    freezing_time: u64,
    #[serde(default)]
    frozen_time: u64,
    #[serde(default)]
    pages_scanned: u64,
    #[serde(default)]
    pages_written: u64,
}

/// The `pages-N.img` files of a CRIU images folder, ordered by N; an error if there are none.
fn page_images(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("pages-")?.strip_suffix(".img"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.file_type()?.is_file() {
            pages.push((n, entry.path()));
        }
    }
    if pages.is_empty() {
        return Err(std::io::Error::other(format!(
            "no pages-N.img in {}",
            dir.display()
        )));
    }
    pages.sort();
    Ok(pages.into_iter().map(|(_, p)| p).collect())
}

/// The container ID and statistics of a checkpoint's `--print-stats` output, if readable.
fn parse_stats(stdout: &str) -> Option<(String, CheckpointStats)> {
    let printed: PrintedStats = serde_json::from_str(stdout.trim()).ok()?;
    let c = printed.container_statistics.into_iter().next()?;
    let us = Duration::from_micros;
    Some((
        c.id,
        CheckpointStats {
            engine_duration: us(printed.podman_checkpoint_duration),
            runtime_duration: us(c.runtime_checkpoint_duration),
            freezing_time: us(c.criu_statistics.freezing_time),
            frozen_time: us(c.criu_statistics.frozen_time),
            pages_scanned: c.criu_statistics.pages_scanned,
            pages_written: c.criu_statistics.pages_written,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn facts_parse_from_one_inspect_line() {
        let id = "0123456789abcdef".repeat(4);
        let line = format!("true\tlocalhost/lab/redis:latest\t{id}\t4242");
        assert_eq!(
            parse_facts(&line),
            Some((true, "localhost/lab/redis:latest".into(), id.clone(), 4242))
        );
        let stopped = format!("false\tlocalhost/lab/redis:latest\t{id}\t0");
        assert_eq!(parse_facts(&stopped).map(|f| (f.0, f.3)), Some((false, 0)));
        for bad in [
            String::new(),
            format!("yes\tlocalhost/lab/redis\t{id}\t1"),
            format!("true\t\t{id}\t1"),
            "true\tlocalhost/lab/redis\tnot-an-id\t1".to_string(),
            format!("true\tlocalhost/lab/redis\t{id}\t-1"),
            format!("true\tlocalhost/lab/redis\t{id}"),
            format!("true\tlocalhost/lab/redis\t{id}\t1\textra"),
        ] {
            assert_eq!(parse_facts(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn page_images_are_ordered_by_number_and_required() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "pages-10.img",
            "pages-2.img",
            "pagemap-1.img",
            "core-1.img",
            "pages-x.img",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let pages = page_images(dir.path()).unwrap();
        let names: Vec<_> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["pages-2.img", "pages-10.img"]);
        let empty = tempfile::tempdir().unwrap();
        let err = page_images(empty.path()).unwrap_err();
        assert!(err.to_string().contains("no pages-N.img"), "{err}");
    }

    #[test]
    fn memory_usage_is_read_from_podman_stats_json() {
        // As podman 5.4 prints it, one object per container.
        let out = r#"{"AvgCPU":1.1,"ContainerID":"1740","Name":"web","MemUsage":2482176,"MemLimit":25276502016,"PIDs":3}
{"AvgCPU":0.5,"ContainerID":"bf6a","Name":"c1","MemUsage":122880,"PIDs":2}
"#;
        let usage = super::parse_memory_usage(out);
        assert_eq!(usage.len(), 2);
        assert_eq!(usage["1740"], 2_482_176);
        assert_eq!(usage["bf6a"], 122_880);
        assert!(super::parse_memory_usage("Error: no such container").is_empty());
    }

    /// A "podman" that is a shell script: the prefix runs `sh -c SCRIPT` and the podman
    /// arguments land in `$@`.
    fn fake(script: &str) -> Podman {
        Podman::new(["sh", "-c", script])
    }

    #[test]
    fn missing_container_is_named() {
        let p = fake(
            r#"echo 'Error: no container with name or ID "ghost" found: no such container' >&2; exit 125"#,
        );
        let err = p
            .checkpoint("ghost", Path::new("/tmp/x.tar"), true)
            .unwrap_err();
        match &err {
            RuntimeError::NoSuchContainer { container, .. } => assert_eq!(container, "ghost"),
            other => panic!("wrong variant: {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("\"ghost\"") && msg.contains("--export=/tmp/x.tar"),
            "{msg}"
        );
    }

    #[test]
    fn criu_failures_point_at_criu() {
        let p = fake("echo 'Error: crun: CRIU version 30000 too old' >&2; exit 125");
        let err = p.checkpoint("c", Path::new("/o.tar"), false).unwrap_err();
        assert!(matches!(err, RuntimeError::Criu { .. }), "{err}");
        assert!(err.to_string().contains("CRIU >= 4.2"), "{err}");
        assert!(err.to_string().contains("exit status: 125"), "{err}");
    }

    #[test]
    fn a_failed_restore_quotes_the_error_lines_of_criu_s_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("restore.log");
        let mut text = String::from("(00.000001) Version: 4.2\n");
        for i in 0..8 {
            text.push_str(&format!(
                "(00.0000{i}) 1: Error (criu/files.c:{i}): failure {i}\n"
            ));
        }
        text.push_str("(00.000100) mnt: Switching to new ns to clean ghosts\n");
        fs::write(&log, text).unwrap();
        // Run as `podman ...`, crun's answer; run as `grep ...`, the real grep.
        let p = fake(&format!(
            r#"[ "$0" = grep ] && exec "$0" "$@"; echo 'Error: OCI runtime error: crun: CRIU restoring failed -52.  Please check CRIU logfile `{}`' >&2; exit 125"#,
            log.display()
        ));
        let err = p.restore("localhost/x:y", Some("n")).unwrap_err();
        let RuntimeError::Criu { criu_errors, .. } = &err else {
            panic!("wrong variant: {err}");
        };
        let expected: Vec<String> = (2..8)
            .map(|i| format!("(00.0000{i}) 1: Error (criu/files.c:{i}): failure {i}"))
            .collect();
        assert_eq!(criu_errors, &expected);
        let msg = err.to_string();
        assert!(msg.contains("its log says: (00.00002)"), "{msg}");
        assert!(msg.contains("failure 7"), "{msg}");

        // A log that is gone: the error still names it, and quotes nothing.
        fs::remove_file(&log).unwrap();
        let err = p.restore("localhost/x:y", Some("n")).unwrap_err();
        assert!(matches!(&err, RuntimeError::Criu { criu_errors, .. } if criu_errors.is_empty()));
        assert!(err.to_string().contains("restore.log"), "{err}");
    }

    #[test]
    fn missing_image_on_restore() {
        let p = fake("echo 'Error: no such container or image: localhost/x:y' >&2; exit 125");
        let err = p.restore("localhost/x:y", Some("n")).unwrap_err();
        assert!(
            matches!(&err, RuntimeError::NoSuchImage { image, .. } if image == "localhost/x:y"),
            "{err}"
        );
    }

    #[test]
    fn spawn_failure_names_the_command() {
        let p = Podman::new(["/nonexistent/prefix"]);
        let err = p.is_running("c").unwrap_err();
        assert!(matches!(err, RuntimeError::Spawn { .. }), "{err}");
        assert!(err
            .to_string()
            .contains("/nonexistent/prefix podman container inspect"));
    }

    #[test]
    fn outputs_are_parsed() {
        let p = fake(r#"echo "$@" >&2; echo true"#);
        assert!(p.is_running("c").unwrap());
        let p = fake("echo 'Loaded image: localhost/migrate/c:m1'");
        assert_eq!(
            p.import_image(Path::new("/i.tar")).unwrap(),
            "localhost/migrate/c:m1"
        );
        assert_eq!(
            parse_loaded("Getting image source signatures\nLoaded image(s): a/b:c, d/e:f\n"),
            Some("a/b:c".into())
        );
        let id = "1b9711202e13e97d13bd857f05053b66950a33a010260996e5096b549da4ecb5";
        let p = fake(&format!("echo {id}"));
        assert_eq!(p.restore("img", None).unwrap(), id);
        let p = fake("echo hello");
        assert!(matches!(
            p.restore_in_place(Path::new("/a.tar")),
            Err(RuntimeError::UnexpectedOutput { .. })
        ));
    }

    #[test]
    fn stats_are_read() {
        let json = r#"{"podman_checkpoint_duration": 300808, "container_statistics": [{"Id": "abc",
            "runtime_checkpoint_duration": 255133, "criu_statistics": {"freezing_time": 100834,
            "frozen_time": 63446, "memdump_time": 1308, "memwrite_time": 192, "pages_scanned": 49,
            "pages_written": 33}}]}"#;
        let (id, s) = parse_stats(json).unwrap();
        assert_eq!(id, "abc");
        assert_eq!(s.frozen_time, Duration::from_micros(63446));
        assert_eq!(s.pages_written, 33);
        assert_eq!(parse_stats("abc\n"), None);
    }

    #[test]
    fn stderr_is_bounded_and_commands_quoted() {
        let long = format!("{}Error: the end", "é".repeat(3000));
        let b = bounded(&long);
        assert!(b.len() <= STDERR_LIMIT + "…".len() && b.ends_with("Error: the end"));
        let words = ["podman", "run", "sh", "-c", "echo it's"].map(OsStr::new);
        assert_eq!(command_line(&words), r#"podman run sh -c 'echo it'\''s'"#);
        assert_eq!(
            Podman::new(["lab/exec.sh", "/n", "--"]).describe(),
            "podman via `lab/exec.sh /n --`"
        );
    }

    /// `podman container inspect` output (podman 5.4, trimmed to what is read, plus noise),
    /// one container per rule.
    const INSPECTED: &str = r#"[
      {"Id": "aaaa", "Name": "plain", "ImageName": "localhost/lab/busybox:latest",
       "State": {"Running": true, "Status": "running"}, "Pod": "", "IsInfra": false,
       "Mounts": [{"Type": "volume", "Name": "v", "Source": "/var/lib/containers/storage/volumes/v/_data", "Destination": "/v"}],
       "HostConfig": {"Privileged": false, "Tmpfs": {"/t": "rw"}}, "Config": {"Labels": null}},
      {"Id": "bbbb", "Name": "data", "ImageName": "localhost/lab/busybox:latest",
       "State": {"Running": true}, "Pod": "",
       "Mounts": [{"Type": "bind", "Source": "/srv/data", "Destination": "/data", "Options": ["rbind"]}],
       "HostConfig": {"Privileged": false}, "Config": {"Labels": {"a": "b"}}},
      {"Id": "cccc", "Name": "priv", "ImageName": "i", "State": {"Running": true},
       "Pod": "", "Mounts": [], "HostConfig": {"Privileged": true}, "Config": {}},
      {"Id": "dddd", "Name": "inpod", "ImageName": "i", "State": {"Running": true},
       "Pod": "03ceec88cb2190251e441d248bd3a5def9e5d5556add33fda242697d7cb0ab41",
       "IsInfra": false, "Mounts": [], "HostConfig": {}, "Config": {}},
      {"Id": "eeee", "Name": "03ceec88cb21-infra", "ImageName": "localhost/podman-pause:5.4.2",
       "State": {"Running": true},
       "Pod": "03ceec88cb2190251e441d248bd3a5def9e5d5556add33fda242697d7cb0ab41",
       "IsInfra": true, "Mounts": [], "HostConfig": {}, "Config": {}},
      {"Id": "ffff", "Name": "pinned", "ImageName": "i", "State": {"Running": true},
       "Mounts": null, "HostConfig": {"Privileged": false},
       "Config": {"Labels": {"migrate.dev/pinned": "true"}}},
      {"Id": "gggg", "Name": "unpinned", "ImageName": "i", "State": {"Running": true},
       "Config": {"Labels": {"migrate.dev/pinned": "false"}}},
      {"Id": "hhhh", "Name": "gone", "ImageName": "i", "State": {"Running": false}}
    ]"#;

    #[test]
    fn drain_rules_refuse_with_reasons() {
        let p = fake(&format!(
            "case \"$1\" in ps) printf 'aaaa\\nbbbb\\ncccc\\ndddd\\neeee\\nffff\\ngggg\\nhhhh\\n';; \
             container) printf '%s' '{INSPECTED}';; *) exit 3;; esac"
        ));
        let listed = p.list_containers().unwrap();
        let names: Vec<&str> = listed.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "03ceec88cb21-infra",
                "data",
                "inpod",
                "pinned",
                "plain",
                "priv",
                "unpinned"
            ],
            "sorted by name, running only"
        );
        let reason = |name: &str| {
            listed
                .iter()
                .find(|c| c.name == name)
                .unwrap()
                .not_movable
                .clone()
        };
        assert_eq!(reason("plain"), None, "volumes and tmpfs move");
        assert_eq!(reason("unpinned"), None, "only pinned=true pins");
        let data = reason("data").unwrap();
        assert!(
            data.contains("bind mount of host path /srv/data at /data"),
            "{data}"
        );
        assert!(reason("priv").unwrap().contains("--privileged"));
        assert!(reason("inpod")
            .unwrap()
            .starts_with("runs in podman pod 03ceec88cb21:"));
        assert!(reason("03ceec88cb21-infra")
            .unwrap()
            .starts_with("the infra container of podman pod 03ceec88cb21"));
        assert!(reason("pinned")
            .unwrap()
            .contains("migrate.dev/pinned=true"));
        let plain = listed.iter().find(|c| c.name == "plain").unwrap();
        assert!(plain.movable());
        assert_eq!(
            (plain.id.as_str(), plain.image.as_str()),
            ("aaaa", "localhost/lab/busybox:latest")
        );
    }

    #[test]
    fn listing_survives_a_container_that_went_away() {
        // Asked for both, inspect fails; asked one at a time, "bbbb" is missing.
        let one =
            r#"[{"Id": "aaaa", "Name": "stays", "ImageName": "i", "State": {"Running": true}}]"#;
        let p = fake(&format!(
            "case \"$1\" in ps) printf 'aaaa\\nbbbb\\n';; \
             container) if [ \"$#\" -eq 4 ] && [ \"$4\" = aaaa ]; then printf '%s' '{one}'; \
             else echo 'Error: no container with name or ID \"bbbb\" found: no such container' >&2; \
             exit 125; fi;; esac"
        ));
        let listed = p.list_containers().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "stays");
        assert!(fake("exit 0").list_containers().unwrap().is_empty());
        let err = fake("case \"$1\" in ps) echo aaaa;; *) echo nonsense;; esac")
            .list_containers()
            .unwrap_err();
        assert!(
            matches!(err, RuntimeError::UnexpectedOutput { .. }),
            "{err}"
        );
        let err = fake("echo 'Error: boom' >&2; exit 125")
            .list_containers()
            .unwrap_err();
        assert!(
            err.to_string().contains("podman ps --quiet --no-trunc"),
            "{err}"
        );
    }
}
