//! The source side of one migration: the state machine the source daemon runs for a `Migrate`
//! request, phase by phase (plan, pre-copy rounds, checkpoint, transfer, assemble, restore,
//! verify, cleanup), reporting [`Event`]s as it goes.
//!
//! Any failure rolls back: the destination is told to abort (it removes whatever this
//! migration made there), and the source container, if the final checkpoint had stopped it, is
//! restored in place from its own archive. The source container is removed only after the
//! destination confirmed that its copy runs. Logs carry the `migration_id` span set by the
//! daemon.
//!
//! Every checkpoint goes through [`restart::rewind_archive`]: CRIU hands a task it interrupted
//! in a sleep `EINTR` (see [`crate::restart`]), also the task it leaves running after a
//! pre-copy checkpoint, and a program that does not retry (busybox `sleep` as PID 1) exits
//! there. When the container stopped right after a pre-copy checkpoint that interrupted one,
//! that checkpoint, taken before it stopped, becomes the final one: the container is stopped
//! already, as the final checkpoint would leave it, and restores from it with its sleeps
//! restarted.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};
use transport::chunker::earlier::EarlierFile;
use transport::quic::{self, DialError, Dialer, SendOptions, SendReport, TransferError};
use transport::tls::SERVER_NAME;
use transport::ManifestEntry;

use crate::control::{
    self, Event, MigrateRequest, Phase, PrepareRequest, Reply, Request, StepRequest, Summary,
    TransferHello, BASE_IMAGE_ROUND, KNOWS_CONTAINER,
};
use crate::cut_ahead::CutAhead;
use crate::daemon::Node;
use crate::earlier_cuts;
use crate::memory_images::remove_images;
use crate::pages::{self, PageImage};
use crate::podman_archive;
use crate::restart::{self, Rewound};
use crate::runtime::{CheckpointStats, ContainerFacts, KeptCheckpoint, RuntimeError};
use crate::tar_files::{self, Layout};

/// How long to wait for the destination daemon's QUIC handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often transfer progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A fresh migration ID: the container's name (sanitized) and 32 random bits.
pub fn new_id(container: &str) -> String {
    let name: String = container
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' => Some(c),
            'A'..='Z' => Some(c.to_ascii_lowercase()),
            '-' | '_' | '.' => Some('-'),
            _ => None,
        })
        .take(40)
        .collect();
    let name = name.trim_matches('-');
    let name = if name.is_empty() { "container" } else { name };
    format!("{name}-{:08x}", fastrand::u32(..))
}

/// The CRIU images of a final checkpoint the runtime kept (see
/// [`crate::runtime::Runtime::checkpoint_stopped`]).
#[derive(Debug, Clone)]
struct KeptImages {
    /// Where they are now: moved into the work folder, so they outlive the container's removal
    /// (its chunks are kept in this node's store afterwards), or still `home`.
    images: PathBuf,
    /// Where the runtime keeps them, and restores the container from.
    home: PathBuf,
    /// Whether `home` links to them in memory (see [`crate::memory_images`]).
    in_memory: bool,
}

/// In a migration's work folder: the final checkpoint's images, moved there from the runtime's
/// folder, and the record of where they came from.
const KEPT_IMAGES: &str = "images";
const KEPT_RECORD: &str = "kept.json";

/// Where a migration's kept images came from, written before they move.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct KeptRecord {
    container: String,
    home: PathBuf,
}

fn write_record(path: &Path, record: &KeptRecord) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&serde_json::to_vec(record).expect("a record serializes"))?;
    file.sync_all()
}

/// After a daemon restart, before its work folder is emptied: a migration that died after its
/// final checkpoint left the stopped container's only copy (its kept images) in `work`. Each
/// goes back where the runtime keeps it, and the container is restored in place from it;
/// when that fails, the images stay there (`podman container restore --keep NAME` by hand).
/// A container that runs again, or is gone (its copy ran on the destination), needs nothing.
pub fn recover_kept(work: &Path, runtime: &dyn crate::runtime::Runtime) {
    let Ok(entries) = std::fs::read_dir(work) else {
        return;
    };
    for dir in entries.flatten().map(|e| e.path()) {
        let Ok(bytes) = std::fs::read(dir.join(KEPT_RECORD)) else {
            continue;
        };
        let Ok(record) = serde_json::from_slice::<KeptRecord>(&bytes) else {
            warn!(record = %dir.join(KEPT_RECORD).display(), "unreadable record of kept images");
            continue;
        };
        let container = record.container.as_str();
        match runtime.is_running(container) {
            Ok(false) => {}
            Ok(true) | Err(RuntimeError::NoSuchContainer { .. }) => continue,
            Err(e) => {
                warn!(container, error = %e, "cannot tell whether a migration's stopped container needs its checkpoint back");
                continue;
            }
        }
        let images = dir.join(KEPT_IMAGES);
        if images.is_dir() && !record.home.exists() {
            if let Err(e) = std::fs::rename(&images, &record.home) {
                warn!(container, error = %e, images = %images.display(), "cannot put a stopped container's checkpoint back; it is lost with the work folder");
                continue;
            }
        }
        match runtime.restore_kept(container) {
            Ok(()) => {
                let _ = remove_images(&record.home);
                warn!(container, "a migration died after its final checkpoint; the container was restored in place");
            }
            Err(e) => warn!(
                container,
                error = %e,
                images = %record.home.display(),
                "a migration died after its final checkpoint, and restoring the container failed: \
                 its checkpoint stays (`podman container restore --keep NAME`)"
            ),
        }
    }
}

/// A failure: the phase and what to tell the user.
struct Failure {
    phase: Phase,
    message: String,
}

/// Runs one migration to its end (success or rollback), sending events to `events`.
pub async fn run(node: Arc<Node>, id: String, req: MigrateRequest, events: mpsc::Sender<Event>) {
    let mut m = Migration {
        node,
        id,
        req,
        events,
        started: Instant::now(),
        phases: Vec::new(),
        phase: Phase::Plan,
        phase_started: Instant::now(),
        dest: None,
        stopped: false,
        archive: None,
        kept: None,
        wire_total: 0,
        in_place: 0,
        earlier: Vec::new(),
        keep_dir: false,
    };
    info!(container = %m.req.container, to = %m.req.to_node, precopy = ?m.req.precopy, "migration started");
    match m.forward().await {
        Ok(summary) => {
            info!(
                total = summary.total_seconds,
                downtime = summary.downtime_seconds,
                "migration done"
            );
            m.emit(Event::Done(summary)).await;
        }
        Err(f) => {
            warn!(phase = %f.phase, error = %f.message, "migration failed; rolling back");
            let (rolled_back, destination_clean, note) = m.rollback().await;
            let message = match note {
                Some(note) => format!("{}; rollback: {note}", f.message),
                None => f.message,
            };
            m.emit(Event::Failed {
                migration_id: m.id.clone(),
                phase: f.phase,
                message,
                rolled_back,
                destination_clean,
            })
            .await;
        }
    }
    m.remove_work_dir();
}

struct Migration {
    node: Arc<Node>,
    id: String,
    req: MigrateRequest,
    events: mpsc::Sender<Event>,
    started: Instant,
    phases: Vec<(Phase, f64)>,
    phase: Phase,
    phase_started: Instant,
    /// The control connection to the destination daemon, once made.
    dest: Option<quinn::Connection>,
    /// Whether the final checkpoint stopped the source container (or a pre-copy checkpoint
    /// did, and became the final one).
    stopped: bool,
    /// The final checkpoint archive, when the runtime exported one.
    archive: Option<PathBuf>,
    /// The final checkpoint's images, when the runtime kept them and the archive is made here.
    kept: Option<KeptImages>,
    wire_total: u64,
    /// Bytes the destination found in place in its last pre-copy output (final round).
    in_place: u64,
    /// The cuts of the last pre-copy round's page images, for the next round to take where
    /// they have not changed (see [`crate::earlier_cuts`]).
    earlier: Vec<EarlierFile>,
    /// The work folder must stay: a background task still reads it, or it holds the only
    /// copy of a container that could not be restored.
    keep_dir: bool,
}

impl Migration {
    async fn emit(&self, event: Event) {
        let _ = self.events.send(event).await;
    }

    async fn enter(&mut self, phase: Phase, round: Option<u32>) {
        self.close_phase();
        self.phase = phase;
        self.phase_started = Instant::now();
        info!(%phase, ?round, "phase");
        self.emit(Event::Phase {
            migration_id: self.id.clone(),
            phase,
            round,
        })
        .await;
    }

    fn close_phase(&mut self) {
        let secs = self.phase_started.elapsed().as_secs_f64();
        match self.phases.last_mut() {
            Some((p, s)) if *p == self.phase => *s += secs,
            _ => self.phases.push((self.phase, secs)),
        }
        self.phase_started = Instant::now();
    }

    fn fail(&self, message: impl Into<String>) -> Failure {
        Failure {
            phase: self.phase,
            message: message.into(),
        }
    }

    fn dir(&self) -> Result<PathBuf, Failure> {
        self.node.work_dir(&self.id, None).map_err(|e| {
            self.fail(format!(
                "creating the work folder on {}: {e}",
                self.node.name
            ))
        })
    }

    async fn forward(&mut self) -> Result<Summary, Failure> {
        let container = self.req.container.clone();
        // Plan: the container runs here, the destination answers and can take it.
        self.enter(Phase::Plan, None).await;
        let (base_image, container_id, memory_bytes) = if self.req.image_only {
            (self.pod_container_image().await?, None, None)
        } else {
            let facts = self.plan_podman_container().await?;
            (facts.image, Some(facts.id), facts.memory_bytes)
        };
        let conn = self.connect().await?;
        self.dest = Some(conn.clone());
        let prepared = self
            .call(Request::Prepare(PrepareRequest {
                migration_id: self.id.clone(),
                container: container.clone(),
                base_image: Some(base_image.clone()),
                container_id: container_id.clone(),
                image_only: self.req.image_only,
                memory_bytes,
            }))
            .await?;
        let dir = self.dir()?;

        // The destination lacks the base image (no registry, or a private one): send it too,
        // through the same deduplicating transfer.
        if prepared["has_base_image"] == false {
            self.enter(Phase::StageImage, None).await;
            let started = Instant::now();
            let path = dir.join("base-image.tar");
            let runtime = self.node.runtime.clone();
            let (image, p) = (base_image.clone(), path.clone());
            blocking(move || runtime.save_image(&image, &p))
                .await
                .map_err(|e| self.fail(format!("saving the base image {base_image}: {e}")))?;
            let sent = self.send(BASE_IMAGE_ROUND, &path).await;
            let _ = std::fs::remove_file(&path);
            let report = sent?;
            self.round_done(BASE_IMAGE_ROUND, &report, started).await;
            self.call(Request::StageImage(StepRequest {
                migration_id: self.id.clone(),
                container: container.clone(),
            }))
            .await?;
        }

        // Pre-copy rounds: the container keeps running; the destination's store warms up.
        let precopy = self.req.precopy.unwrap_or(
            if self.req.image_only || prepared[KNOWS_CONTAINER] == true {
                0
            } else {
                1
            },
        );
        let mut precopy_done = 0;
        let mut ended_at = None;
        for round in 1..=precopy {
            self.enter(Phase::Precopy, Some(round)).await;
            let started = Instant::now();
            if !self.req.image_only {
                if let Some(kept) = self.checkpoint_kept().await? {
                    if let Some(report) = self.precopy_kept(round, kept).await? {
                        self.round_done(round, &report, started).await;
                        precopy_done = round;
                    }
                    continue;
                }
            }
            let path = dir.join(format!("precopy-{round}.tar"));
            let rewound = self.checkpoint(&path, true).await?;
            if !self.req.image_only && rewound.interrupted_any() && !self.still_runs().await? {
                // CRIU's resume ended it; this checkpoint is its last state.
                self.ended_by_precopy(round, &path, &rewound)?;
                ended_at = Some(started);
                break;
            }
            let sent = self.send(round, &path).await;
            let _ = std::fs::remove_file(&path);
            let report = sent?;
            self.round_done(round, &report, started).await;
            precopy_done = round;
        }

        // The final checkpoint: the container freezes and stops here (on Kubernetes it keeps
        // running until its Pod is replaced). Unless a pre-copy checkpoint stopped it already.
        self.enter(Phase::Checkpoint, None).await;
        let (files, pages, downtime_started) = match (self.archive.clone(), ended_at) {
            (Some(path), Some(ended_at)) => {
                let pages = self.page_images(&path).await;
                (vec![path], pages, ended_at)
            }
            _ => {
                let downtime_started = Instant::now();
                if let Some(layout) = self.checkpoint_stopped(&dir).await? {
                    let pages = match self.req.via_image {
                        true => Vec::new(),
                        false => layout.pages,
                    };
                    (layout.files, pages, downtime_started)
                } else {
                    let path = dir.join("checkpoint.tar");
                    let rewound = self.checkpoint(&path, self.req.image_only).await?;
                    self.stopped = !self.req.image_only;
                    self.archive = Some(path.clone());
                    log_left(&rewound.left);
                    let pages = self.page_images(&path).await;
                    (vec![path], pages, downtime_started)
                }
            }
        };

        self.enter(Phase::Transfer, None).await;
        let started = Instant::now();
        let mut report = self.send_files(0, &files, pages, false).await?;
        self.round_done(0, &report, started).await;
        // The source has nothing to do while the destination restores: start keeping the
        // chunks now, unless another migration's are still going in (then at clean-up).
        let mut manifest = std::mem::take(&mut report.manifest);
        let mut keeping = None;
        if !self.req.image_only {
            if let Ok(held) = self.node.ingesting.clone().try_lock_owned() {
                let manifest = std::mem::take(&mut manifest);
                keeping = Some(self.keep_chunks(files.clone(), manifest, held));
            }
        }

        let step = StepRequest {
            migration_id: self.id.clone(),
            container: container.clone(),
        };
        if self.req.image_only {
            self.enter(Phase::Assemble, None).await;
            let assembled = self.call(Request::Assemble(step)).await?;
            let image = assembled["image"].as_str().map(str::to_string);
            return Ok(self
                .image_only_summary(files, manifest, report, precopy_done, image)
                .await);
        }
        // The reply of the step that waited for the final round says what it found in place.
        let restored = if self.req.via_image {
            self.enter(Phase::Assemble, None).await;
            let assembled = self.call(Request::Assemble(step.clone())).await?;
            self.in_place = assembled["bytes_in_place"].as_u64().unwrap_or(0);
            self.enter(Phase::Restore, None).await;
            self.call(Request::Restore(step.clone())).await?
        } else {
            self.enter(Phase::Restore, None).await;
            let restored = self.call(Request::RestoreArchive(step.clone())).await?;
            self.in_place = restored["bytes_in_place"].as_u64().unwrap_or(0);
            restored
        };
        self.enter(Phase::Verify, None).await;
        self.call(Request::Verify(step)).await?;
        let downtime = downtime_started.elapsed().as_secs_f64();

        // Cleanup: the copy runs on the destination; only now does the source let go.
        self.enter(Phase::Cleanup, None).await;
        if let Err(f) = self
            .call(Request::Finish {
                migration_id: self.id.clone(),
                keep_image: false,
            })
            .await
        {
            warn!(error = %f.message, "the destination could not clean up its checkpoint files");
        }
        let kept = match keeping {
            Some(kept) => kept,
            None => {
                // Taken here at the latest, before the summary goes out: a migration coming
                // straight back waits for these chunks (see `Node::ingesting`).
                let held = self.node.ingesting.clone().lock_owned().await;
                self.keep_chunks(files, manifest, held)
            }
        };
        let kept = if let Some(home) = self.kept.as_ref().filter(|k| k.images == k.home) {
            // The images are still the container's: they go now (podman's removal of the
            // container would leave those it keeps in memory).
            let _ = kept.await;
            let _ = remove_images(&home.home);
            None
        } else {
            Some(kept)
        };
        self.remove_work_dir_after(kept);
        let runtime = self.node.runtime.clone();
        let c = container.clone();
        if let Err(e) = blocking(move || runtime.remove_container(&c)).await {
            warn!(error = %e, "removing the stopped source container failed; remove it by hand");
        }
        self.stopped = false;
        // This node's store holds the container's chunks, under its ID here and there (a
        // restore through an image gives it a new one).
        if let Some(id) = &container_id {
            self.node.remember_container(id);
        }
        if let Some(id) = restored["container_id"].as_str() {
            self.node.remember_container(id);
        }
        Ok(self.summary(&report, precopy_done, downtime, None))
    }

    /// The plan of a Podman container: it runs here and is asked for by name; its image, ID
    /// and memory.
    async fn plan_podman_container(&self) -> Result<ContainerFacts, Failure> {
        let container = self.req.container.clone();
        let runtime = self.node.runtime.clone();
        let c = container.clone();
        let facts = match blocking(move || runtime.facts(&c)).await {
            Ok(facts) if facts.running => facts,
            Ok(_) => {
                return Err(self.fail(format!(
                    "container {container:?} exists on {} but is not running: only a running \
                     container can be migrated",
                    self.node.name
                )))
            }
            Err(e @ RuntimeError::NoSuchContainer { .. }) => {
                return Err(self.fail(format!("on {}: {e}", self.node.name)))
            }
            Err(e) => return Err(self.fail(format!("asking the container engine: {e}"))),
        };
        if facts.id.starts_with(&container) {
            // The archive carries the name, and the container keeps it on the destination.
            return Err(self.fail(format!(
                "{container:?} is a container ID: give the container's name (`podman ps` on {} \
                 shows it)",
                self.node.name
            )));
        }
        Ok(facts)
    }

    /// The image of a Pod's container: the caller (the CLI, from the Pod's spec) says it; the
    /// API server, not this daemon, knows that the Pod runs.
    async fn pod_container_image(&self) -> Result<String, Failure> {
        if let Some(image) = &self.req.base_image {
            return Ok(image.clone());
        }
        let runtime = self.node.runtime.clone();
        let c = self.req.container.clone();
        blocking(move || runtime.image_of(&c))
            .await
            .map_err(|e| self.fail(format!("finding the container's image: {e}")))
    }

    /// The end of an `image_only` migration: the image waits on the destination for the Pod
    /// that will name it; the source still runs, and its chunks are kept here.
    async fn image_only_summary(
        &mut self,
        files: Vec<PathBuf>,
        manifest: Vec<(u64, ManifestEntry)>,
        report: SendReport,
        precopy: u32,
        image: Option<String>,
    ) -> Summary {
        let held = self.node.ingesting.clone().lock_owned().await;
        let kept = self.keep_chunks(files, manifest, held);
        self.remove_work_dir_after(Some(kept));
        // Nothing was stopped: the Pod that replaces the source decides the switch-over.
        self.summary(&report, precopy, 0.0, image)
    }

    /// The summary of a migration that succeeded.
    fn summary(
        &mut self,
        report: &SendReport,
        precopy: u32,
        downtime_seconds: f64,
        image: Option<String>,
    ) -> Summary {
        self.close_phase();
        Summary {
            migration_id: self.id.clone(),
            container: self.req.container.clone(),
            from: self.node.name.clone(),
            to: self.req.to_node.clone(),
            archive_bytes: report.input_bytes,
            wire_bytes: report.wire_bytes,
            wire_bytes_total: self.wire_total,
            precopy_rounds: precopy,
            total_seconds: self.started.elapsed().as_secs_f64(),
            downtime_seconds,
            phases: self.phases.clone(),
            image,
            archive_made_here: self.kept.is_some(),
            images_in_memory: self.kept.as_ref().is_some_and(|k| k.in_memory),
            bytes_in_place: self.in_place,
        }
    }

    /// Opens the control connection to the destination daemon.
    async fn connect(&self) -> Result<quinn::Connection, Failure> {
        let to = self.req.to;
        let config = self
            .node
            .client_config(&self.req.to_node)
            .map_err(|e| self.fail(e.to_string()))?;
        let connecting = self
            .node
            .endpoint
            .connect_with(config, to, SERVER_NAME)
            .map_err(|e| self.fail(format!("connecting to {to}: {e}")))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(self.fail(format!(
                "connecting to the daemon of {} at {to}: {e} (is `migrate daemon` running there, \
                 with a certificate named {} from the same CA?)",
                self.req.to_node, self.req.to_node
            ))),
            Err(_) => Err(self.fail(format!(
                "no answer from the daemon of {} at {to} within {CONNECT_TIMEOUT:?}: is it \
                 running, and is UDP port {} reachable from {}?",
                self.req.to_node,
                to.port(),
                self.node.name
            ))),
        }
    }

    /// Sends `request` to the destination and waits for its reply.
    async fn call(&self, request: Request) -> Result<serde_json::Value, Failure> {
        let conn = self
            .dest
            .as_ref()
            .ok_or_else(|| self.fail("not connected to the destination"))?;
        match control::call(conn, &request).await {
            Ok(Reply::Ok { detail }) => Ok(detail),
            Ok(Reply::Error { message }) => {
                Err(self.fail(format!("{} refused: {message}", self.req.to_node)))
            }
            Err(e) => Err(self.fail(format!("talking to {}: {e}", self.req.to_node))),
        }
    }

    /// Checkpoints the container into `path`, with the calls CRIU interrupted set to restart
    /// (see [`crate::restart`]); says which those were.
    async fn checkpoint(&self, path: &Path, leave_running: bool) -> Result<Rewound, Failure> {
        let runtime = self.node.runtime.clone();
        let (c, p) = (self.req.container.clone(), path.to_path_buf());
        match blocking(move || runtime.checkpoint(&c, &p, leave_running)).await {
            Ok(outcome) => log_checkpoint(outcome.elapsed, outcome.stats, None),
            Err(e) => return Err(self.fail(format!("checkpointing on {}: {e}", self.node.name))),
        }
        // Best effort: the checkpoint exists (and the final one stopped the container); an
        // archive that cannot be read here is the destination's to refuse.
        let p = path.to_path_buf();
        let rewound = match blocking(move || restart::rewind_archive(&p)).await {
            Ok(rewound) => rewound,
            Err(e) => {
                warn!(error = %e, "reading the checkpoint for interrupted calls failed; sent as it is");
                Rewound::default()
            }
        };
        log_rewound(&rewound.rewound);
        Ok(rewound)
    }

    /// A pre-copy checkpoint whose images the runtime keeps (no archive); `None` when the
    /// runtime keeps none. Without earlier cuts (the first round), the page images are cut
    /// while CRIU writes them, and those cuts become the earlier cuts (see
    /// [`crate::cut_ahead`]).
    async fn checkpoint_kept(&mut self) -> Result<Option<KeptCheckpoint>, Failure> {
        let runtime = self.node.runtime.clone();
        let c = self.req.container.clone();
        let ahead = match self.earlier.is_empty() {
            true => CutAhead::start()
                .inspect_err(|e| warn!(error = %e, "could not start cutting page images ahead"))
                .ok(),
            false => None,
        };
        let writing_to = ahead.as_ref().map(CutAhead::writing_to);
        let checkpointed = blocking(move || {
            let told = |dir: &Path| {
                if let Some(writing_to) = &writing_to {
                    writing_to(dir);
                }
            };
            runtime.checkpoint_kept(&c, &told)
        })
        .await;
        if let Some(ahead) = ahead {
            let cut = blocking(move || ahead.finish()).await;
            if matches!(checkpointed, Ok(Some(_))) {
                self.earlier = cut;
            }
        }
        match checkpointed {
            Ok(Some(kept)) => {
                log_checkpoint(kept.elapsed, kept.stats, Some(&kept.dir));
                Ok(Some(kept))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.fail(format!("checkpointing on {}: {e}", self.node.name))),
        }
    }

    /// One pre-copy round from kept images: sends the memory pages as they lie (they are
    /// nearly all of a checkpoint, and all a pre-copy round is for), then removes the images.
    /// When the checkpoint ended the container (CRIU resumed an interrupted sleep with `EINTR`;
    /// see [`crate::restart`]), the container is restored in place from those images, with the
    /// calls set to restart, and nothing is sent: `None`.
    async fn precopy_kept(
        &mut self,
        round: u32,
        kept: KeptCheckpoint,
    ) -> Result<Option<SendReport>, Failure> {
        let d = kept.dir.clone();
        let rewound = match blocking(move || restart::rewind_dir(&d)).await {
            Ok(rewound) => rewound,
            Err(e) => {
                warn!(error = %e, "reading the kept images for interrupted calls failed");
                Rewound::default()
            }
        };
        // The images are removed whatever happens here: they hold the container's memory.
        let ended = match rewound.interrupted_any() {
            true => self.still_runs().await.map(|runs| !runs),
            false => Ok(false),
        };
        let outcome = match ended {
            Ok(true) => self
                .resume_after_precopy(round, &rewound)
                .await
                .map(|()| None),
            Ok(false) => {
                // Their lengths, before the images go.
                let lens: Vec<u64> = kept
                    .pages
                    .iter()
                    .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
                    .collect();
                let sent = self.send_files(round, &kept.pages, Vec::new(), true).await;
                if let Ok(report) = &sent {
                    self.earlier = earlier_cuts::per_page_file(&kept.pages, &lens, &report.cuts);
                }
                sent.map(Some)
            }
            Err(f) => Err(f),
        };
        if let Err(e) = remove_images(&kept.dir) {
            warn!(error = %e, images = %kept.dir.display(), "removing the kept checkpoint images failed");
        }
        outcome
    }

    /// The container stopped right after pre-copy checkpoint `round`, whose kept images hold
    /// the calls CRIU interrupted (`rewound`, already set to restart): restores it in place
    /// from them, so it runs on from that checkpoint. Fails when a call cannot restart.
    async fn resume_after_precopy(&self, round: u32, rewound: &Rewound) -> Result<(), Failure> {
        let what = restart::list(&[&rewound.rewound[..], &rewound.left[..]].concat());
        if !rewound.left.is_empty() {
            return Err(self.fail(format!(
                "the container stopped on {} right after pre-copy checkpoint {round}: CRIU \
                 interrupted {what} and resumed the calls failing with EINTR (a CRIU \
                 limitation), and it ended on that; {} cannot be restarted",
                self.node.name,
                restart::list(&rewound.left)
            )));
        }
        warn!(
            round,
            threads = %what,
            "the container stopped after the pre-copy checkpoint: CRIU resumed these calls with \
             EINTR and it ended; restoring it in place from that checkpoint, the calls set to \
             restart"
        );
        let runtime = self.node.runtime.clone();
        let c = self.req.container.clone();
        blocking(move || runtime.restore_kept(&c))
            .await
            .map_err(|e| {
                self.fail(format!(
                    "the container stopped on {} right after pre-copy checkpoint {round} (CRIU \
                 interrupted {what}), and restoring it in place from that checkpoint failed: {e}",
                    self.node.name
                ))
            })
    }

    /// The final checkpoint with no archive written (see
    /// [`crate::runtime::Runtime::checkpoint_stopped`]): the container stops, its images move
    /// into the work folder `dir`, and the archive is laid out from them and the runtime's
    /// other files as a list of files ([`crate::tar_files`]). `None` when the runtime cannot
    /// (nothing was stopped).
    async fn checkpoint_stopped(&mut self, dir: &Path) -> Result<Option<Layout>, Failure> {
        if self.req.image_only {
            return Ok(None);
        }
        let made = dir.join("archive");
        let runtime = self.node.runtime.clone();
        let (c, m) = (self.req.container.clone(), made.clone());
        let checkpoint = blocking(move || {
            podman_archive::private_dir(&m).map_err(|e| RuntimeError::Local {
                message: e.to_string(),
            })?;
            runtime.checkpoint_stopped(&c, &m)
        })
        .await;
        let stopped = match checkpoint {
            Ok(Some(stopped)) => stopped,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.fail(format!("checkpointing on {}: {e}", self.node.name))),
        };
        log_checkpoint(
            stopped.kept.elapsed,
            stopped.kept.stats,
            Some(&stopped.kept.dir),
        );
        self.stopped = true;
        // Moved, not copied (one file system): the container's removal would take them. A
        // record says where from first, so a daemon that dies now puts them back on its next
        // start (see `recover_kept`) rather than emptying its work folder of the only copy.
        let home = stopped.kept.dir;
        let in_memory = home.is_symlink();
        let moved = dir.join(KEPT_IMAGES);
        let record = KeptRecord {
            container: self.req.container.clone(),
            home: home.clone(),
        };
        let recorded = write_record(&dir.join(KEPT_RECORD), &record)
            .inspect_err(|e| {
                warn!(error = %e, "cannot record where the checkpoint images come from; they stay there")
            })
            .is_ok();
        let images = match recorded.then(|| std::fs::rename(&home, &moved)) {
            None => home.clone(),
            Some(Ok(())) => moved,
            Some(Err(e)) => {
                warn!(error = %e, images = %home.display(), "the checkpoint images stay where the runtime keeps them");
                home.clone()
            }
        };
        self.kept = Some(KeptImages {
            images: images.clone(),
            home,
            in_memory,
        });
        let glue = dir.join("glue");
        let laid_out = blocking(move || -> Result<(Rewound, Layout), String> {
            let rewound = restart::rewind_dir(&images).unwrap_or_else(|e| {
                warn!(error = %e, "reading the checkpoint for interrupted calls failed; sent as it is");
                Rewound::default()
            });
            let members = podman_archive::members(stopped.made, &images).map_err(|e| e.to_string())?;
            podman_archive::private_dir(&glue).map_err(|e| e.to_string())?;
            let layout = tar_files::lay_out(&members, &glue)
                .map_err(|e| format!("writing the archive's headers into {}: {e}", glue.display()))?;
            Ok((rewound, layout))
        })
        .await;
        let (rewound, layout) =
            laid_out.map_err(|e| self.fail(format!("laying out the checkpoint archive: {e}")))?;
        log_rewound(&rewound.rewound);
        log_left(&rewound.left);
        Ok(Some(layout))
    }

    /// Whether the source container still runs (after a pre-copy checkpoint).
    async fn still_runs(&self) -> Result<bool, Failure> {
        let runtime = self.node.runtime.clone();
        let c = self.req.container.clone();
        blocking(move || runtime.is_running(&c))
            .await
            .map_err(|e| self.fail(format!("asking the container engine: {e}")))
    }

    /// The container stopped right after pre-copy round `round`, whose checkpoint at `path`
    /// interrupted calls (`rewound`): CRIU resumed them with `EINTR`, and the container ended
    /// on it. That checkpoint, from just before, becomes the final one; the rollback restores
    /// the source from it. Fails when it holds calls that cannot restart: restored, the
    /// container would end the same way.
    fn ended_by_precopy(
        &mut self,
        round: u32,
        path: &Path,
        rewound: &Rewound,
    ) -> Result<(), Failure> {
        self.stopped = true;
        self.archive = Some(path.to_path_buf());
        let what = restart::list(&[&rewound.rewound[..], &rewound.left[..]].concat());
        if rewound.left.is_empty() {
            warn!(
                round,
                threads = %what,
                "the container stopped after the pre-copy checkpoint: CRIU resumed these calls \
                 with EINTR and it ended; that checkpoint, with the calls set to restart, is the \
                 final one"
            );
            return Ok(());
        }
        Err(self.fail(format!(
            "the container stopped on {} right after pre-copy checkpoint {round}: CRIU interrupted \
             {what} and resumed the calls failing with EINTR (a CRIU limitation), and it ended on \
             that; {} cannot be restarted, so a copy restored from the checkpoint would end the \
             same way",
            self.node.name,
            restart::list(&rewound.left)
        )))
    }

    /// Where the final archive at `path` holds its page images, when the destination restores
    /// straight from it and can take them as files (see [`crate::pages`]); none otherwise, or
    /// when the archive cannot be read here (it is the destination's to refuse).
    async fn page_images(&self, path: &Path) -> Vec<PageImage> {
        if self.req.image_only || self.req.via_image {
            return Vec::new();
        }
        let p = path.to_path_buf();
        match blocking(move || pages::locate(&p)).await {
            Ok(images) => images,
            Err(e) => {
                warn!(error = %e, "locating the page images in the checkpoint failed; the destination untars them");
                Vec::new()
            }
        }
    }

    /// Sends one round's archive over its own transfer connection(s).
    async fn send(&mut self, round: u32, path: &Path) -> Result<SendReport, Failure> {
        self.send_files(round, &[path], Vec::new(), false).await
    }

    /// Sends files as one round's stream, back to back (see [`transport::source::Source`]),
    /// telling the destination where the stream holds `pages`. With `record_cuts` (a pre-copy
    /// round of page images) the report holds the cuts, for the next round to take those of
    /// what did not change instead of cutting and hashing it again.
    async fn send_files<P: AsRef<Path>>(
        &mut self,
        round: u32,
        paths: &[P],
        pages: Vec<PageImage>,
        record_cuts: bool,
    ) -> Result<SendReport, Failure> {
        let total = paths
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        let progress = Arc::new(AtomicU64::new(0));
        let options = SendOptions {
            level: self.node.config.level,
            resume_timeout: self.node.config.resume_timeout,
            progress: Some(progress.clone()),
            // The final round's chunks are kept here afterwards, from this manifest.
            keep_manifest: round == 0,
            record_cuts,
            earlier: earlier_cuts::matched(&self.earlier, paths),
            // Checkpoint images and archives in this daemon's own private folders: nobody
            // else writes them while they are sent.
            map_files: true,
            ..SendOptions::default()
        };
        let config = self
            .node
            .client_config(&self.req.to_node)
            .map_err(|e| self.fail(e.to_string()))?;
        let dialer = HelloDialer {
            endpoint: self.node.endpoint.clone(),
            addr: self.req.to,
            config,
            peer: self.req.to_node.clone(),
            hello: TransferHello {
                migration_id: self.id.clone(),
                round,
                pages,
            },
        };
        let phase = self.phase;
        let events = self.events.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(PROGRESS_EVERY);
            loop {
                every.tick().await;
                let done = progress.load(Ordering::Relaxed);
                let _ = events.send(Event::Progress { phase, done, total }).await;
            }
        });
        let result = quic::send_files_via(&dialer, paths, &options).await;
        ticker.abort();
        let report = result.map_err(|e| {
            self.fail(format!(
                "sending the checkpoint to {}: {e}",
                self.req.to_node
            ))
        })?;
        self.emit(Event::Progress {
            phase,
            done: report.input_bytes,
            total: report.input_bytes,
        })
        .await;
        self.wire_total += report.wire_bytes;
        if report.earlier_bytes > 0 {
            info!(
                round,
                bytes = report.earlier_bytes,
                "cuts made earlier (while CRIU wrote the images, or in the last pre-copy round) taken again, not cut and hashed"
            );
        }
        Ok(report)
    }

    async fn round_done(&self, round: u32, report: &SendReport, started: Instant) {
        self.emit(Event::Round {
            round,
            archive_bytes: report.input_bytes,
            wire_bytes: report.wire_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
        .await;
    }

    /// After a failure: the destination drops what it made, the source runs again. Returns
    /// (the source runs again, the destination confirmed it holds nothing of the migration,
    /// what went wrong with the source when it does not run).
    async fn rollback(&mut self) -> (bool, bool, Option<String>) {
        self.enter(Phase::Rollback, None).await;
        let mut clean = true;
        if self.dest.is_some() {
            let abort = Request::Abort {
                migration_id: self.id.clone(),
            };
            match tokio::time::timeout(Duration::from_secs(60), self.call(abort)).await {
                Ok(Ok(_)) => {}
                Ok(Err(f)) => {
                    warn!(error = %f.message, "the destination could not abort");
                    clean = false;
                }
                Err(_) => {
                    warn!("the destination did not answer the abort");
                    clean = false;
                }
            }
        }
        if self.req.image_only {
            // The kubelet's checkpoint left the container running; the API server, not this
            // daemon, knows its Pod.
            self.close_phase();
            return (true, clean, None);
        }
        let runtime = self.node.runtime.clone();
        let container = self.req.container.clone();
        let archive = self.archive.clone().filter(|_| self.stopped);
        let images = self.kept.clone().filter(|_| self.stopped);
        let node = self.node.name.clone();
        // Where the container's only copy is, should it not run again.
        let copy = match (&archive, &images) {
            (Some(archive), _) => Some(format!(
                "its checkpoint is kept at {} on {node} (`podman container restore \
                 --import=` it there)",
                archive.display()
            )),
            (None, Some(kept)) => Some(format!(
                "its checkpoint is kept at {} on {node} (`podman container restore --keep {}` \
                 there)",
                kept.home.display(),
                self.req.container
            )),
            (None, None) => None,
        };
        let back = blocking(move || -> Result<bool, RuntimeError> {
            if let Some(archive) = archive {
                runtime.remove_container(&container)?;
                runtime.restore_in_place(&archive)?;
            } else if let Some(kept) = images {
                // Back where the runtime restores them from; they are not needed once it ran.
                if kept.images != kept.home {
                    std::fs::rename(&kept.images, &kept.home).map_err(|e| RuntimeError::Local {
                        message: format!(
                            "moving the checkpoint images back from {} to {}: {e}",
                            kept.images.display(),
                            kept.home.display()
                        ),
                    })?;
                }
                runtime.restore_kept(&container)?;
                let _ = remove_images(&kept.home);
            }
            runtime.is_running(&container)
        })
        .await;
        self.close_phase();
        match (back, copy) {
            (Ok(true), _) => {
                info!("the source container runs again");
                self.stopped = false;
                (true, clean, None)
            }
            (Ok(false), Some(copy)) => {
                warn!("the source container, restored from its checkpoint, is not running");
                // Keep the archive: it is the container's only copy now.
                self.keep_dir = true;
                let note = format!(
                    "the source container was restored on {node} from its checkpoint but \
                     stopped again (`podman ps -a` and `podman logs` there); {copy}"
                );
                (false, clean, Some(note))
            }
            (Ok(false), None) => {
                warn!("the source container is not running, and the migration had not stopped it");
                let note = format!(
                    "the source container is not running on {node}, and the migration had not \
                     stopped it (it stopped during the migration, with no checkpoint of it \
                     taken to restore: `podman ps -a` and `podman logs` there)"
                );
                (false, clean, Some(note))
            }
            (Err(e), Some(copy)) => {
                warn!(error = %e, "restoring the source container failed; its checkpoint stays");
                self.keep_dir = true;
                let note = format!("restoring the source container on {node} failed: {e}; {copy}");
                (false, clean, Some(note))
            }
            (Err(e), None) => {
                warn!(error = %e, "the source container could not be checked");
                let note = format!("checking the source container on {node}: {e}");
                (false, clean, Some(note))
            }
        }
    }

    /// Keeps the final archive's chunks in this node's store (so the container, coming back,
    /// sends little), in the background, holding `held` (see `Node::ingesting`) until done.
    /// With the manifest its transfer returned, only the chunks the store lacks are read and
    /// encoded. The files are opened at once and read through those handles, so a rollback
    /// may move or delete them meanwhile; nothing here deletes them (see
    /// [`Self::remove_work_dir_after`]).
    fn keep_chunks(
        &self,
        files: Vec<PathBuf>,
        manifest: Vec<(u64, ManifestEntry)>,
        held: tokio::sync::OwnedMutexGuard<()>,
    ) -> tokio::task::JoinHandle<()> {
        let store = self.node.store.clone();
        let level = self.node.config.level;
        tokio::task::spawn_blocking(move || {
            let _held = held;
            let kept = match manifest.is_empty() {
                true => transport::ingest::ingest_files(&store, &files, level),
                false => transport::ingest::ingest_manifest(&store, &files, &manifest, level, true),
            };
            match kept {
                Ok(r) => info!(
                    chunks_added = r.chunks_added,
                    seconds = r.seconds,
                    "kept the sent chunks"
                ),
                Err(e) => warn!(error = %e, "keeping the sent chunks failed"),
            }
            if let Err(e) = store.evict_to_cap(&|_| false) {
                warn!(error = %e, "chunk store eviction failed");
            }
        })
    }

    /// After a migration that succeeded: deletes the work folder in the background, once
    /// `keeping` (the chunks going into the store from its files) is done.
    fn remove_work_dir_after(&mut self, keeping: Option<tokio::task::JoinHandle<()>>) {
        self.keep_dir = true;
        let dir = self.node.work.join(&self.id);
        tokio::spawn(async move {
            if let Some(keeping) = keeping {
                let _ = keeping.await;
            }
            let _ = blocking(move || remove_work_folder(&dir)).await;
        });
    }

    /// Deletes the work folder, unless something still needs it (see `keep_dir`).
    fn remove_work_dir(&self) {
        if !self.keep_dir {
            let _ = remove_work_folder(&self.node.work.join(&self.id));
        }
    }
}

/// Removes a migration's work folder `dir`, and the final checkpoint's images in memory that
/// its [`KEPT_IMAGES`] may link to; `dir` itself may be a link to a folder in memory (an
/// incoming migration's; see [`crate::memory_images`]).
pub fn remove_work_folder(dir: &Path) -> std::io::Result<()> {
    remove_images(&dir.join(KEPT_IMAGES))?;
    remove_images(dir)
}

/// Logs the threads whose interrupted calls a checkpoint was set to restart.
fn log_rewound(threads: &[restart::Interrupted]) {
    if !threads.is_empty() {
        info!(
            threads = %restart::list(threads),
            "CRIU interrupted these calls; the checkpoint restarts them"
        );
    }
}

/// Logs the threads of a final checkpoint whose interrupted calls cannot restart.
fn log_left(threads: &[restart::Interrupted]) {
    if !threads.is_empty() {
        warn!(
            threads = %restart::list(threads),
            "CRIU interrupted calls it cannot restart: restored, they fail with EINTR"
        );
    }
}

/// Logs a checkpoint's timings (and where its images were kept, when they were).
fn log_checkpoint(elapsed: Duration, stats: Option<CheckpointStats>, kept: Option<&Path>) {
    info!(
        seconds = elapsed.as_secs_f64(),
        criu = ?stats.map(|s| s.runtime_duration),
        frozen = ?stats.map(|s| s.frozen_time),
        pages_written = ?stats.map(|s| s.pages_written),
        images_kept = ?kept,
        "checkpointed"
    );
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking runtime call does not panic")
}

/// Dials the destination daemon for one transfer round: a new connection whose first stream
/// says which migration and round it carries.
struct HelloDialer {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    config: quinn::ClientConfig,
    peer: String,
    hello: TransferHello,
}

impl Dialer for HelloDialer {
    fn dial(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<quinn::Connection, DialError>> + Send + '_>> {
        Box::pin(async move {
            let connecting = self
                .endpoint
                .connect_with(self.config.clone(), self.addr, SERVER_NAME)
                .map_err(|source| {
                    DialError::Fatal(TransferError::Connect {
                        addr: self.addr,
                        source,
                    })
                })?;
            let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(r) => r.map_err(DialError::Connection)?,
                Err(_) => return Err(DialError::Connection(quinn::ConnectionError::TimedOut)),
            };
            let lost = |conn: &quinn::Connection| {
                DialError::Connection(
                    conn.close_reason()
                        .unwrap_or(quinn::ConnectionError::TimedOut),
                )
            };
            let reply = control::call(&conn, &Request::Transfer(self.hello.clone())).await;
            match reply {
                Ok(Reply::Ok { .. }) => Ok(conn),
                Ok(Reply::Error { message }) => Err(DialError::Fatal(TransferError::Refused {
                    addr: self.peer.clone(),
                    reason: message,
                })),
                Err(_) => Err(lost(&conn)),
            }
        })
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }
}
