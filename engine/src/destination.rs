//! The destination side of migrations: what a daemon holds for each migration coming in, and
//! the steps the source drives it through (prepare, receive rounds, assemble, restore, verify,
//! then finish or abort).
//!
//! Everything a migration makes here is recorded in its [`Incoming`] entry (work folder, the
//! image it imported, the container it restored), so `abort` can remove exactly that, and
//! nothing else, whatever step failed. An entry that sees no request for [`IDLE_LIMIT`] is
//! aborted by [`Destinations::reap`]: a source that vanished leaves nothing behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use transport::protocol::Held;
use transport::quic::{self, ReceiveOptions, ReceiveReport, TransferError};

use crate::archive::Limits;
use crate::control::{
    PrepareRequest, Reply, StepRequest, TransferHello, BASE_IMAGE_ROUND, KNOWS_CONTAINER,
};
use crate::daemon::Node;
use crate::image::{self, ImageOptions};
use crate::inspect;
use crate::memory_images::remove_images;
use crate::pages::{self, PageImage};
use crate::runtime::RuntimeError;

/// An incoming migration with no request for this long is aborted.
pub const IDLE_LIMIT: Duration = Duration::from_secs(300);

/// The incoming migrations of one daemon.
#[derive(Debug, Default)]
pub struct Destinations {
    inner: Mutex<HashMap<String, Incoming>>,
}

/// One incoming migration.
#[derive(Debug)]
struct Incoming {
    container: String,
    dir: PathBuf,
    rounds: HashMap<u32, Round>,
    /// The checkpoint image imported into the node's store.
    image: Option<String>,
    /// The container restored from it (its ID).
    restored: Option<String>,
    /// The deletion of the final round's files, started once the container was restored from
    /// them; `finish` and `abort` wait for it before they remove the work folder.
    deleting: Option<JoinHandle<()>>,
    touched: Instant,
}

/// One transfer round being received.
#[derive(Debug)]
struct Round {
    /// Connections of this round (a resumed transfer brings a new one).
    conns: mpsc::Sender<quinn::Connection>,
    task: Option<JoinHandle<Result<ReceiveReport, TransferError>>>,
    out: PathBuf,
    /// The page images received as files of their own, into [`IMAGES_FOLDER`] (final round).
    pages: Vec<PageImage>,
    /// What a pre-copy round's output holds, chunk by offset, once it is received: the next
    /// round is built over that output and leaves those chunks where they lie.
    held: Option<oneshot::Receiver<Held>>,
}

/// Where, in a migration's work folder, the final round's page images are received.
const IMAGES_FOLDER: &str = "images";

fn ok(detail: serde_json::Value) -> Reply {
    Reply::Ok { detail }
}

fn error(message: impl Into<String>) -> Reply {
    Reply::Error {
        message: message.into(),
    }
}

/// A migration ID as a path component and image tag: `[a-z0-9-]`, 1..=100 bytes, no leading `-`.
pub fn valid_migration_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The tag the checkpoint image of a migration is imported under.
pub fn image_reference(container: &str, migration_id: &str) -> String {
    let name: String = container
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' | '.' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .take(60)
        .collect();
    let name = name.trim_matches(|c| c == '-' || c == '_' || c == '.');
    let name = if name.is_empty() { "container" } else { name };
    format!("localhost/migrate/{name}:{migration_id}")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking runtime call does not panic")
}

impl Destinations {
    fn touch<R>(&self, id: &str, f: impl FnOnce(&mut Incoming) -> R) -> Option<R> {
        let mut map = self.inner.lock().expect("destinations lock");
        map.get_mut(id).map(|inc| {
            inc.touched = Instant::now();
            f(inc)
        })
    }

    /// Registers a migration after checking that it can be received.
    pub async fn prepare(&self, node: &Arc<Node>, req: PrepareRequest) -> Reply {
        // Chunks this node just sent away may be what this migration brings back.
        drop(node.ingesting.lock().await);
        if !valid_migration_id(&req.migration_id) {
            return error(format!("invalid migration id {:?}", req.migration_id));
        }
        if self
            .inner
            .lock()
            .expect("destinations lock")
            .contains_key(&req.migration_id)
        {
            return error(format!("migration {} is already here", req.migration_id));
        }
        // On Kubernetes only an image is made here: the kubelet creates the container.
        if !req.image_only {
            if let Err(reply) = no_container_named(node, &req.container).await {
                return reply;
            }
        }
        let has_base_image = match req.base_image.clone() {
            None => true,
            Some(image) => {
                let runtime = node.runtime.clone();
                match blocking(move || runtime.has_image(&image)).await {
                    Ok(has) => has,
                    Err(e) => {
                        return error(format!("checking the base image on {}: {e}", node.name))
                    }
                }
            }
        };
        // The checkpoint's files here, and the restored container beside them.
        let in_memory = req.memory_bytes.map(|b| b.saturating_mul(2));
        let dir = match node.work_dir(&req.migration_id, in_memory) {
            Ok(d) => d,
            Err(e) => return error(format!("creating the work folder on {}: {e}", node.name)),
        };
        let knows_container = req
            .container_id
            .as_deref()
            .is_some_and(|id| node.knows_container(id));
        let files_in_memory = dir.is_symlink();
        info!(migration_id = %req.migration_id, container = %req.container, files_in_memory, "incoming migration");
        self.inner.lock().expect("destinations lock").insert(
            req.migration_id,
            Incoming {
                container: req.container,
                dir,
                rounds: HashMap::new(),
                image: None,
                restored: None,
                deleting: None,
                touched: Instant::now(),
            },
        );
        ok(serde_json::json!({
            "node": node.name,
            "has_base_image": has_base_image,
            KNOWS_CONTAINER: knows_container,
        }))
    }

    /// Hands a transfer connection to the receiver of its round, starting it on first contact.
    pub fn route_transfer(
        &self,
        node: &Arc<Node>,
        hello: &TransferHello,
        conn: quinn::Connection,
    ) -> Reply {
        let store = node.store.clone();
        let mut options = ReceiveOptions {
            resume_timeout: node.config.resume_timeout,
            ..ReceiveOptions::default()
        };
        let mut held_before = None;
        let routed: Option<Result<bool, String>> = self.touch(&hello.migration_id, |inc| {
            let round = hello.round;
            if !inc.rounds.contains_key(&round) && round != BASE_IMAGE_ROUND {
                // The next checkpoint is mostly the last one's bytes: built over the last
                // pre-copy round's output, it rewrites those pages instead of allocating new
                // ones. That output is kept until then for this alone.
                if let Some((_, last)) = inc
                    .rounds
                    .iter_mut()
                    .filter(|(r, _)| **r != 0 && **r != BASE_IMAGE_ROUND)
                    .max_by_key(|(r, _)| **r)
                {
                    options.reuse = Some(last.out.clone());
                    held_before = last.held.take();
                }
                // The final archive's page images go straight to files CRIU restores from
                // (the first built over the last pre-copy round's pages).
                if round == 0 && !hello.pages.is_empty() {
                    let folder = inc.dir.join(IMAGES_FOLDER);
                    options.pieces = pages::pieces(&hello.pages, &folder, options.reuse.take())
                        .map_err(|e| {
                            format!("the page images the source named were refused: {e}")
                        })?;
                }
            }
            let entry = inc.rounds.entry(round).or_insert_with(|| {
                let out = inc.dir.join(match round {
                    0 => "checkpoint.tar".to_string(),
                    BASE_IMAGE_ROUND => "base-image.tar".to_string(),
                    // CRIU's page images back to back (a Podman source), or a whole archive.
                    _ => format!("precopy-{round}.bin"),
                });
                let (tx, mut rx) = mpsc::channel(4);
                let task_out = out.clone();
                // A pre-copy round's output is what the next round is built over.
                let (held_tx, held) = match round {
                    0 | BASE_IMAGE_ROUND => (None, None),
                    _ => {
                        let (tx, rx) = oneshot::channel();
                        (Some(tx), Some(rx))
                    }
                };
                options.keep_held = held_tx.is_some();
                let task = tokio::spawn(async move {
                    // The earlier round's output is at its final name once its receiver is
                    // done (at once: its sender waited for that before this round).
                    if let Some(before) = held_before {
                        options.held = before.await.ok().map(Arc::new);
                    }
                    let mut received =
                        quic::receive_file_from(&mut rx, store, &task_out, &options).await;
                    if let (Ok(report), Some(tx)) = (&mut received, held_tx) {
                        if let Some(held) = report.held.take() {
                            let _ = tx.send(held);
                        }
                    }
                    received
                });
                Round {
                    conns: tx,
                    task: Some(task),
                    out,
                    pages: hello.pages.clone(),
                    held,
                }
            });
            Ok(entry.conns.try_send(conn).is_ok())
        });
        match routed {
            Some(Err(e)) => error(e),
            None => error(format!(
                "no migration {} on {}: it was never prepared, was aborted, or the daemon \
                 restarted",
                hello.migration_id, node.name
            )),
            Some(Ok(false)) => error(format!(
                "round {} of migration {} is finished or not accepting connections",
                hello.round, hello.migration_id
            )),
            Some(Ok(true)) => ok(serde_json::Value::Null),
        }
    }

    /// Waits for the base image round and loads it into the node's image store. The image
    /// stays after the migration, whatever its outcome: it is whole, and the next container
    /// on it needs it too.
    pub async fn stage_image(&self, node: &Arc<Node>, req: StepRequest) -> Reply {
        let (report, file) = match self
            .finished_round(node, &req.migration_id, BASE_IMAGE_ROUND)
            .await
        {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let runtime = node.runtime.clone();
        let f = file.clone();
        let loaded = blocking(move || runtime.import_image(&f)).await;
        let _ = std::fs::remove_file(&file);
        match loaded {
            Ok(image) => {
                info!(migration_id = %req.migration_id, %image, "base image staged");
                ok(serde_json::json!({ "image": image, "bytes": report.bytes_written }))
            }
            Err(e) => error(format!("loading the base image on {}: {e}", node.name)),
        }
    }

    /// Waits for the receiver of `round` to finish; its report and output file.
    async fn finished_round(
        &self,
        node: &Arc<Node>,
        migration_id: &str,
        round: u32,
    ) -> Result<(ReceiveReport, PathBuf), Reply> {
        let Some(task) = self.touch(migration_id, |inc| {
            inc.rounds
                .get_mut(&round)
                .map(|r| (r.task.take(), r.out.clone()))
        }) else {
            return Err(error(format!(
                "no migration {migration_id} on {}",
                node.name
            )));
        };
        let Some((Some(task), out)) = task else {
            return Err(error(format!(
                "round {round} of migration {migration_id} was never sent, or used already"
            )));
        };
        match task.await {
            Ok(Ok(report)) => Ok((report, out)),
            Ok(Err(e)) => Err(error(format!("receiving round {round} failed: {e}"))),
            Err(e) => Err(error(format!("the receiving task ended: {e}"))),
        }
    }

    /// Waits for the final round, builds its OCI checkpoint image and imports it.
    pub async fn assemble(&self, node: &Arc<Node>, req: StepRequest) -> Reply {
        let split = self.touch(&req.migration_id, |inc| {
            inc.rounds.get(&0).is_some_and(|r| !r.pages.is_empty())
        });
        let (report, archive) = match self.finished_round(node, &req.migration_id, 0).await {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        if split == Some(true) {
            // Their ranges of the archive are holes: an image of it would restore no memory.
            return error(format!(
                "migration {}: the final round's page images were received as files of their \
                 own, so its archive cannot become an image (the source asked for both)",
                req.migration_id
            ));
        }
        let started = Instant::now();
        let dir = archive.parent().unwrap_or(Path::new(".")).to_path_buf();
        let reference = image_reference(&req.container, &req.migration_id);
        let runtime = node.runtime.clone();
        let (r, a) = (reference.clone(), archive.clone());
        let result = blocking(move || -> Result<String, String> {
            // An OCI layout directory whose layer is the received archive itself (hard-linked:
            // no copy), loaded by the runtime straight from the directory.
            let layout = dir.join("image");
            let options = ImageOptions {
                link_archive: true,
                ..ImageOptions::new(r.clone())
            };
            let built = image::write_layout(&a, &layout, &options);
            let _ = std::fs::remove_file(&a);
            if let Err(e) = built {
                let _ = std::fs::remove_dir_all(&layout);
                return Err(format!("building the checkpoint image: {e}"));
            }
            let built_after = started.elapsed();
            // Loaded from a directory, the image has no name yet: it gets the migration's tag.
            let loaded = runtime.import_image(&layout).and_then(|id| {
                if id == r {
                    return Ok(id);
                }
                match runtime.tag_image(&id, &r) {
                    Ok(()) => Ok(r.clone()),
                    Err(e) => {
                        let _ = runtime.remove_image(&id);
                        Err(e)
                    }
                }
            });
            let _ = std::fs::remove_dir_all(&layout);
            info!(
                build = built_after.as_secs_f64(),
                load = (started.elapsed() - built_after).as_secs_f64(),
                "checkpoint image assembled"
            );
            loaded.map_err(|e| format!("importing the checkpoint image: {e}"))
        })
        .await;
        match result {
            Ok(loaded) => {
                self.touch(&req.migration_id, |inc| inc.image = Some(loaded.clone()));
                info!(migration_id = %req.migration_id, image = %loaded, "checkpoint image imported");
                ok(serde_json::json!({
                    "image": loaded,
                    "archive_bytes": report.bytes_written,
                    "wire_bytes": report.wire_bytes,
                    "bytes_in_place": report.bytes_in_place,
                    "seconds": started.elapsed().as_secs_f64(),
                }))
            }
            Err(message) => {
                // A failed import may still have left the image: remove it.
                let runtime = node.runtime.clone();
                let _ = blocking(move || runtime.remove_image(&reference)).await;
                error(format!("{message} (on {})", node.name))
            }
        }
    }

    /// Restores the container from the imported image.
    pub async fn restore(&self, node: &Arc<Node>, req: StepRequest) -> Reply {
        let Some(Some(image)) = self.touch(&req.migration_id, |inc| inc.image.clone()) else {
            return error(format!(
                "migration {} has no imported image on {}",
                req.migration_id, node.name
            ));
        };
        let runtime = node.runtime.clone();
        let name = req.container.clone();
        let restored = blocking(move || runtime.restore(&image, Some(&name)))
            .await
            .map_err(|e| format!("restoring: {e}"));
        self.record_restore(node, &req, restored).await
    }

    /// Records a restore's container, or removes what a failed one left, and answers.
    async fn record_restore(
        &self,
        node: &Arc<Node>,
        req: &StepRequest,
        restored: Result<String, String>,
    ) -> Reply {
        match restored {
            Ok(id) => {
                self.touch(&req.migration_id, |inc| inc.restored = Some(id.clone()));
                ok(serde_json::json!({ "container_id": id }))
            }
            Err(message) => {
                // A failed restore can leave a created, stopped container under the name.
                let runtime = node.runtime.clone();
                let name = req.container.clone();
                let _ = blocking(move || runtime.remove_container(&name)).await;
                error(format!("{message} (on {})", node.name))
            }
        }
    }

    /// Validates the final round's archive (the same checks as for an image: no absolute
    /// paths, no `..`, no escaping links, bounded sizes, the right container) and restores the
    /// container straight from it, then deletes it. When its page images came as files of
    /// their own, Podman imports a small archive that links to them instead (see
    /// [`crate::pages`]).
    pub async fn restore_archive(&self, node: &Arc<Node>, req: StepRequest) -> Reply {
        let started = std::time::Instant::now();
        let images = self
            .touch(&req.migration_id, |inc| {
                let pages = inc.rounds.get(&0).map(|r| r.pages.clone());
                (pages.unwrap_or_default(), inc.dir.join(IMAGES_FOLDER))
            })
            .unwrap_or_default();
        let (report, archive) = match self.finished_round(node, &req.migration_id, 0).await {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let received = started.elapsed();
        let in_place = report.bytes_in_place;
        let runtime = node.runtime.clone();
        let container = req.container.clone();
        let a = archive.clone();
        let import = archive.with_file_name("import.tar");
        let (i, (pages, folder)) = (import.clone(), images.clone());
        let id = req.migration_id.clone();
        let restored = blocking(move || -> Result<String, String> {
            let checking = std::time::Instant::now();
            let info = inspect::inspect_file(&a, &Limits::default())
                .map_err(|e| format!("the checkpoint archive was refused: {e}"))?;
            if info.container_name.as_deref() != Some(container.as_str()) {
                return Err(format!(
                    "the checkpoint archive holds container {:?}, not {container:?}",
                    info.container_name
                ));
            }
            let import = match pages.is_empty() {
                true => a.clone(),
                false => {
                    pages::assemble(&a, &pages, &folder, &i, &Limits::default())
                        .map_err(|e| format!("the checkpoint archive was refused: {e}"))?;
                    i
                }
            };
            let checked = checking.elapsed();
            let restoring = std::time::Instant::now();
            let restored = runtime
                .restore_in_place(&import)
                .map_err(|e| format!("restoring: {e}"));
            info!(
                migration_id = %id,
                received_ms = received.as_millis() as u64,
                chunks = report.chunks,
                bytes_in_place = in_place,
                checked_ms = checked.as_millis() as u64,
                page_images_as_files = pages.len(),
                restored_ms = restoring.elapsed().as_millis() as u64,
                "restore: waited for the final round, checked the archive, restored"
            );
            restored
        })
        .await;
        // The restored container needs none of them: they only hold its memory. They go in the
        // background, so that the reply that ends the downtime does not wait while the kernel
        // frees their pages (0.24 s for a 1.3 GB checkpoint in the lab).
        let deleting = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&archive);
            let _ = std::fs::remove_file(&import);
            let _ = std::fs::remove_dir_all(&images.1);
        });
        self.touch(&req.migration_id, |inc| inc.deleting = Some(deleting));
        let mut reply = self.record_restore(node, &req, restored).await;
        if let Reply::Ok { detail } = &mut reply {
            detail["bytes_in_place"] = in_place.into();
        }
        reply
    }

    /// Checks that the restored container runs.
    pub async fn verify(&self, node: &Arc<Node>, req: StepRequest) -> Reply {
        let Some(Some(id)) = self.touch(&req.migration_id, |inc| inc.restored.clone()) else {
            return error(format!(
                "migration {} restored nothing on {}",
                req.migration_id, node.name
            ));
        };
        let runtime = node.runtime.clone();
        let probe = id.clone();
        match blocking(move || runtime.is_running(&probe)).await {
            Ok(true) => ok(serde_json::json!({ "container_id": id })),
            Ok(false) => error(format!(
                "the restored container {id} on {} is not running (`podman logs {id}` there)",
                node.name
            )),
            Err(e) => error(format!("checking the restored container: {e}")),
        }
    }

    /// Removes everything the migration made here; unknown migrations are already clean.
    pub async fn abort(&self, node: &Arc<Node>, migration_id: &str) -> Reply {
        let Some(inc) = self
            .inner
            .lock()
            .expect("destinations lock")
            .remove(migration_id)
        else {
            return ok(serde_json::Value::Null);
        };
        warn!(%migration_id, "aborting incoming migration");
        let mut problems = Vec::new();
        for round in inc.rounds.values() {
            if let Some(task) = &round.task {
                task.abort();
            }
        }
        if let Some(deleting) = inc.deleting {
            let _ = deleting.await;
        }
        let runtime = node.runtime.clone();
        let (restored, image) = (inc.restored.clone(), inc.image.clone());
        let removed = blocking(move || -> Vec<String> {
            let mut problems = Vec::new();
            if let Some(id) = restored {
                if let Err(e) = runtime.remove_container(&id) {
                    problems.push(format!("removing the restored container: {e}"));
                }
            }
            if let Some(image) = image {
                if let Err(e) = runtime.remove_image(&image) {
                    problems.push(format!("removing the checkpoint image: {e}"));
                }
            }
            problems
        })
        .await;
        problems.extend(removed);
        if let Err(e) = remove_images(&inc.dir) {
            problems.push(format!("removing {}: {e}", inc.dir.display()));
        }
        if problems.is_empty() {
            ok(serde_json::Value::Null)
        } else {
            error(problems.join("; "))
        }
    }

    /// The migration succeeded: delete its files and, unless `keep_image`, the checkpoint
    /// image (a container Podman restored does not need it), keep the container.
    pub async fn finish(&self, node: &Arc<Node>, migration_id: &str, keep_image: bool) -> Reply {
        let Some(inc) = self
            .inner
            .lock()
            .expect("destinations lock")
            .remove(migration_id)
        else {
            return error(format!("no migration {migration_id} on {}", node.name));
        };
        if let Some(image) = inc.image.clone().filter(|_| !keep_image) {
            let runtime = node.runtime.clone();
            if let Err(e) = blocking(move || runtime.remove_image(&image)).await {
                warn!(%migration_id, error = %e, "the checkpoint image stays");
            }
        }
        if let Some(id) = &inc.restored {
            node.remember_container(id);
        }
        // Its files go in the background, as the final round's did (see `restore_archive`):
        // the source's cleanup, and so the migration's end, need not wait for the kernel.
        let (id, container) = (migration_id.to_string(), inc.container);
        tokio::spawn(async move {
            if let Some(deleting) = inc.deleting {
                let _ = deleting.await;
            }
            let dir = inc.dir;
            let _ = blocking(move || remove_images(&dir)).await;
            info!(migration_id = %id, %container, "incoming migration finished, its files deleted");
        });
        ok(serde_json::Value::Null)
    }

    /// Aborts the migrations idle for longer than [`IDLE_LIMIT`].
    pub async fn reap(&self, node: &Arc<Node>) {
        let stale: Vec<String> = self
            .inner
            .lock()
            .expect("destinations lock")
            .iter()
            .filter(|(_, inc)| inc.touched.elapsed() > IDLE_LIMIT)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            warn!(migration_id = %id, "incoming migration idle too long; its source is gone");
            let _ = self.abort(node, &id).await;
        }
    }
}

/// Ok when `node` has no container named `name`, which the restored one would clash with.
async fn no_container_named(node: &Arc<Node>, name: &str) -> Result<(), Reply> {
    let runtime = node.runtime.clone();
    let n = name.to_string();
    match blocking(move || runtime.is_running(&n)).await {
        Err(RuntimeError::NoSuchContainer { .. }) => Ok(()),
        Ok(_) => Err(error(format!(
            "a container named {name:?} already exists on {}: remove it there first \
             (`podman rm {name}`), or it would clash with the restored one",
            node.name
        ))),
        Err(e) => Err(error(format!(
            "the container engine on {} does not answer: {e}",
            node.name
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_ids_are_safe_path_components() {
        assert!(valid_migration_id("web-1a2b3c4d"));
        for bad in ["", "../x", "a/b", "-x", "A", "a b", &"a".repeat(101)] {
            assert!(!valid_migration_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn image_references_are_lowercase_and_tagged() {
        assert_eq!(
            image_reference("My_Web!", "web-1"),
            "localhost/migrate/my_web:web-1"
        );
        assert_eq!(image_reference("!!!", "x"), "localhost/migrate/container:x");
    }
}
