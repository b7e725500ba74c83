//! Keeps the chunks of an archive this node sent in its own chunk store, so that when the
//! container migrates back, the transfer towards this node finds most chunks already here.
//!
//! [`ingest_file`] does to a local file what a transfer does to it, minus the network: it cuts
//! the file with the same [`Chunker`] (so the same chunk ids, which are the blake3 of the raw
//! bytes), skips zero chunks (a receiver never stores them: it writes zeros), encodes every
//! other chunk with [`codec::encode`] at the sender's zstd level (the very call the sender
//! makes before putting a chunk on the wire, and the receiver stores the wire payload as is),
//! and [`DiskStore::put`]s the ones the store lacks. A later receiver asks its store
//! [`DiskStore::contains`] for every manifest entry, so these chunks are never sent again.
//!
//! When the sender returned the stream's manifest ([`crate::quic::SendOptions::keep_manifest`]),
//! [`ingest_manifest`] skips the cutting: it reads only the chunks the store lacks, where the
//! manifest puts them, and checks each against its id before storing it.
//!
//! Work is split over the cores: the calling thread reads and chunks the file and checks the
//! store's index; `cores - 1` threads (at least one; every core for [`ingest_manifest`])
//! compress and append to the store; one more thread, mostly asleep in `fdatasync`, commits
//! sealed packs as they fill. Chunks are
//! handed over through a bounded queue, so memory stays at a few dozen chunks whatever the
//! file size. A chunk repeated within the file is compressed and stored once.
//!
//! Durability follows the store's rules: before returning, [`ingest_file`] runs
//! [`DiskStore::sync`], so every chunk it reports as added survives a crash. When it fails
//! midway, it still syncs what it stored (best effort): those chunks are valid and useful.
//! It does not apply the store's size cap; call [`DiskStore::evict_to_cap`] afterwards, as the
//! receiver does after each transfer.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use thiserror::Error;
use tracing::{debug, warn};

use crate::chunker::{Chunker, Span};
use crate::codec;
use crate::source::Source;
use crate::store::{DiskStore, StoreError};
use crate::{ChunkId, ManifestEntry};

/// Chunks queued between the chunking thread and the encoders (at most 256 KiB each).
const QUEUE_CHUNKS: usize = 32;
/// Upper bound on encoding threads, whatever the core count.
const MAX_ENCODERS: usize = 8;

/// What [`ingest_file`] did. Every chunk of the file is counted once in exactly one of
/// `zero_chunks`, `chunks_added` and `chunks_present`, so they sum to `chunks`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IngestReport {
    /// Bytes of the file.
    pub bytes: u64,
    /// Chunks the file was cut into (what a transfer's manifest would list).
    pub chunks: u64,
    /// Chunks written to the store by this call.
    pub chunks_added: u64,
    /// Non-zero chunks that needed no write: already in the store, or repeating a chunk met
    /// earlier in the file.
    pub chunks_present: u64,
    /// All-zero chunks, never stored (a receiver writes zeros for them).
    pub zero_chunks: u64,
    /// Wall time, including the final sync of the store.
    pub seconds: f64,
}

/// Why [`ingest_file`] failed. Chunks stored before the failure stay in the store.
#[derive(Debug, Error)]
pub enum IngestError {
    /// The file could not be opened.
    #[error(
        "opening {path} to keep its chunks: {source}; check that the file exists and this user \
         can read it"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading the file failed partway.
    #[error(
        "reading {path} near byte {offset} to keep its chunks: {source}; check that the file is \
         a regular, readable file and that nothing truncates it meanwhile"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// Where in the file: the bytes chunked or read before the failure.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Putting a chunk into the store, or committing one of its packs, failed.
    #[error("keeping the chunks of {path} in the chunk store {root}: {source}")]
    Store {
        /// The file being ingested.
        path: PathBuf,
        /// The store's root.
        root: PathBuf,
        /// What the store reported (it names the pack and the operation); boxed to keep
        /// `Result<_, IngestError>` small.
        source: Box<StoreError>,
    },
    /// The final sync failed: the chunks added may not survive a crash.
    #[error(
        "making the chunks of {path} durable in the chunk store {root}: {source}; they may not \
         survive a crash, check the disk holding the store"
    )]
    Sync {
        /// The file being ingested.
        path: PathBuf,
        /// The store's root.
        root: PathBuf,
        /// What the store reported.
        source: Box<StoreError>,
    },
    /// The manifest given is not one of these files.
    #[error(
        "the manifest given for {path} does not match the files: {detail}; pass the manifest \
         their sender returned for exactly these files"
    )]
    Manifest {
        /// The first file.
        path: PathBuf,
        /// Where it stops matching.
        detail: String,
    },
    /// A worker thread could not be started.
    #[error("starting a thread to ingest {path}: {source}; check the process's thread limit")]
    Thread {
        /// The file being ingested.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Chunks `path` exactly as a transfer would and puts every non-zero chunk the store lacks
/// (encoded with zstd `level` like the sender does), then syncs/commits the store so they
/// survive a crash.
///
/// Pass the level the sending side uses (`SendOptions::level`, 1 by default) so the stored
/// encodings are byte for byte what a receiver would have stored, and the node's one
/// [`DiskStore`] for its store root (the same instance a concurrent receive uses). Chunks
/// already present are marked used, which protects them from eviction. Blocking: it reads the
/// whole file and writes to disk, so call it from `spawn_blocking` in async code.
pub fn ingest_file(
    store: &DiskStore,
    path: &Path,
    level: i32,
) -> Result<IngestReport, IngestError> {
    ingest_files(store, &[path], level)
}

/// [`ingest_file`] of several files read back to back as one stream, as a transfer of them
/// sends it (see [`crate::source::Source`]). Errors name the first file.
pub fn ingest_files<P: AsRef<Path>>(
    store: &DiskStore,
    paths: &[P],
    level: i32,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let (path, source) = open(paths)?;
    let file = Arc::new(source).reader();
    // One core chunks; the others encode.
    let encoders = cores().saturating_sub(1).clamp(1, MAX_ENCODERS);
    let mut report = IngestReport::default();
    let (span_tx, span_rx) = mpsc::sync_channel::<Span>(QUEUE_CHUNKS);
    let span_rx = Mutex::new(span_rx);
    // After a failure the encoders keep draining the queue, so the chunking thread never
    // blocks on a full one; the chunking thread sees the failure and stops.
    let next = || {
        let span = span_rx.lock().expect("ingest queue lock").recv().ok()?;
        Some(Ok(span))
    };
    let failed = AtomicBool::new(false);
    let threads = Threads {
        encoders,
        background: false,
    };
    let outcome = encode_all(store, path, level, threads, &next, &failed, || {
        chunk_loop(store, path, file, span_tx, &failed, &mut report)
    });
    finish(store, path, started, outcome, report)
}

/// [`ingest_files`] for files whose manifest is already known: the one their sender returned
/// ([`crate::quic::SendOptions::keep_manifest`]). Nothing is cut or hashed twice: the chunks
/// the store lacks are read where the manifest puts them, checked against their ids (the files
/// must not have changed since they were sent), encoded on every core and stored. A manifest
/// that does not tile the files exactly, from offset 0 to their end, is refused before
/// anything is stored.
///
/// With `background`, the threads it starts run at the lowest CPU priority (nice 19): they
/// take only CPU time nothing else on the node wants, as when a source keeps its chunks while
/// the destination, on the same machine or a busy one, restores the container.
pub fn ingest_manifest<P: AsRef<Path>>(
    store: &DiskStore,
    paths: &[P],
    manifest: &[(u64, ManifestEntry)],
    level: i32,
    background: bool,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let (path, source) = open(paths)?;
    let mut report = IngestReport::default();
    let mut at = 0u64;
    for (offset, entry) in manifest {
        if *offset != at {
            return Err(IngestError::Manifest {
                path: path.to_path_buf(),
                detail: format!("an entry starts at byte {offset}, not {at}"),
            });
        }
        at += u64::from(entry.len);
    }
    if at != source.len() {
        return Err(IngestError::Manifest {
            path: path.to_path_buf(),
            detail: format!("it covers {at} bytes of {}", source.len()),
        });
    }
    report.bytes = at;
    report.chunks = manifest.len() as u64;
    let mut seen = HashSet::new();
    let mut lacking = Vec::new();
    for (offset, entry) in manifest {
        if entry.zero {
            report.zero_chunks += 1;
        } else if !seen.insert(entry.id) || store.contains(&entry.id) {
            store.touch(&entry.id);
            report.chunks_present += 1;
        } else {
            lacking.push((*offset, *entry));
        }
    }
    let taken = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    // Once any encoder failed, the rest of the chunks are not even read.
    let next = || {
        if failed.load(Ordering::Relaxed) {
            return None;
        }
        let (offset, entry) = *lacking.get(taken.fetch_add(1, Ordering::Relaxed))?;
        Some(read_chunk(&source, offset, &entry))
    };
    let encoders = cores().clamp(1, MAX_ENCODERS);
    let threads = Threads {
        encoders,
        background,
    };
    let outcome = encode_all(store, path, level, threads, &next, &failed, || Ok(()));
    finish(store, path, started, outcome, report)
}

/// Reads one chunk of the manifest and checks it is still the chunk that was sent.
fn read_chunk(source: &Source, offset: u64, entry: &ManifestEntry) -> Result<Span, IngestError> {
    let mut data = vec![0u8; entry.len as usize];
    let read = source.read_exact_at(&mut data, offset).and_then(|()| {
        if ChunkId::of(&data) == entry.id {
            Ok(())
        } else {
            Err(io::Error::other(
                "these bytes differ from the chunk sent: the file changed after it was sent",
            ))
        }
    });
    read.map_err(|source_err| {
        let (path, offset) = source.locate(offset);
        IngestError::Read {
            path: path.to_path_buf(),
            offset,
            source: source_err,
        }
    })?;
    Ok(Span {
        offset,
        entry: *entry,
        data,
    })
}

/// Opens the files as one stream; the first file names them in errors.
fn open<P: AsRef<Path>>(paths: &[P]) -> Result<(&Path, Source), IngestError> {
    let path = paths.first().map_or(Path::new(""), |p| p.as_ref());
    let source =
        Source::open(paths).map_err(|(path, source)| IngestError::Open { path, source })?;
    Ok((path, source))
}

/// The cores this process may use.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The threads [`encode_all`] starts.
#[derive(Clone, Copy)]
struct Threads {
    /// How many encode.
    encoders: usize,
    /// They run at the lowest CPU priority (see [`ingest_manifest`]).
    background: bool,
}

impl Threads {
    /// Called first on each thread started.
    fn started(self) {
        if self.background {
            // On Linux the priority is the calling thread's own.
            if let Err(e) = rustix::process::setpriority_process(None, 19) {
                debug!(error = %e, "could not lower an ingest thread's priority");
            }
        }
    }
}

/// What may come next for an encoder: a chunk to store, a failure to report, or the end.
type Next<'a> = dyn Fn() -> Option<Result<Span, IngestError>> + Sync + 'a;

/// Runs `threads.encoders` threads that store what `next` yields, one committer thread, and `feed` on
/// the calling thread. Any thread that fails sets `failed`, which `next` and `feed` may watch
/// to stop early. Returns (chunks added, chunks a concurrent put stored first); the first
/// error wins.
fn encode_all(
    store: &DiskStore,
    path: &Path,
    level: i32,
    threads: Threads,
    next: &Next<'_>,
    failed: &AtomicBool,
    feed: impl FnOnce() -> Result<(), IngestError>,
) -> Result<(u64, u64), IngestError> {
    let store_err = |source| IngestError::Store {
        path: path.to_path_buf(),
        root: store.root().to_path_buf(),
        source: Box::new(source),
    };
    let (commit_tx, commit_rx) = mpsc::sync_channel::<()>(1);
    std::thread::scope(move |s| {
        let spawn_err = |source| IngestError::Thread {
            path: path.to_path_buf(),
            source,
        };
        // If a spawn fails, returning drops the committer's sender: the threads already
        // started see their queues close and end.
        let committer = std::thread::Builder::new()
            .name("ingest-commit".into())
            .spawn_scoped(s, move || {
                threads.started();
                commit_loop(store, commit_rx, failed)
            })
            .map_err(spawn_err)?;
        let mut workers = Vec::with_capacity(threads.encoders);
        for _ in 0..threads.encoders {
            let commit_tx = commit_tx.clone();
            let worker = std::thread::Builder::new()
                .name("ingest-encode".into())
                .spawn_scoped(s, move || {
                    threads.started();
                    encode_loop(store, next, level, &commit_tx, failed)
                })
                .map_err(spawn_err)?;
            workers.push(worker);
        }
        drop(commit_tx);
        let fed = feed();
        let mut errors = vec![fed.err()];
        let (mut added, mut present) = (0, 0);
        for worker in workers {
            match worker.join().expect("an ingest encoder does not panic") {
                Ok((a, p)) => {
                    added += a;
                    present += p;
                }
                Err(EncodeError::Store(e)) => errors.push(Some(store_err(e))),
                Err(EncodeError::Input(e)) => errors.push(Some(e)),
            }
        }
        let committed = committer
            .join()
            .expect("the ingest committer does not panic");
        errors.push(committed.err().map(store_err));
        errors
            .into_iter()
            .flatten()
            .next()
            .map_or(Ok((added, present)), Err)
    })
}

/// Syncs the store whatever happened (chunks stored before a failure are valid and useful),
/// and completes the report.
fn finish(
    store: &DiskStore,
    path: &Path,
    started: Instant,
    outcome: Result<(u64, u64), IngestError>,
    mut report: IngestReport,
) -> Result<IngestReport, IngestError> {
    let synced = store.sync().map_err(|source| IngestError::Sync {
        path: path.to_path_buf(),
        root: store.root().to_path_buf(),
        source: Box::new(source),
    });
    report.seconds = started.elapsed().as_secs_f64();
    match (outcome, synced) {
        (Ok((added, present)), Ok(())) => {
            report.chunks_added += added;
            report.chunks_present += present;
            debug!(path = %path.display(), ?report, "ingested");
            Ok(report)
        }
        (Ok(_), Err(e)) => Err(e),
        (Err(e), synced) => {
            if let Err(sync) = synced {
                warn!(error = %sync, "could not sync the chunks stored before the ingest failed");
            }
            Err(e)
        }
    }
}

/// Runs on the calling thread: chunks the file, counts, and queues the chunks the store lacks
/// (each distinct one once). Stops early, without error, once another thread failed.
fn chunk_loop(
    store: &DiskStore,
    path: &Path,
    file: impl std::io::Read,
    tx: SyncSender<Span>,
    failed: &AtomicBool,
    report: &mut IngestReport,
) -> Result<(), IngestError> {
    let mut chunker = Chunker::new(file);
    let mut seen = HashSet::new();
    while let Some(span) = chunker.next() {
        if failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let span = span.map_err(|source| IngestError::Read {
            path: path.to_path_buf(),
            offset: chunker.position(),
            source,
        })?;
        report.chunks += 1;
        report.bytes += u64::from(span.entry.len);
        let id = span.entry.id;
        if span.entry.zero {
            report.zero_chunks += 1;
        } else if !seen.insert(id) {
            report.chunks_present += 1;
        } else if store.contains(&id) {
            store.touch(&id);
            report.chunks_present += 1;
        } else if tx.send(span).is_err() {
            // Cannot happen while the encoders drain the queue; stop rather than hang.
            return Ok(());
        }
    }
    Ok(())
}

/// Why an encoder stopped.
enum EncodeError {
    /// Its input failed (a read, in [`ingest_manifest`]).
    Input(IngestError),
    /// The store refused a chunk.
    Store(StoreError),
}

/// Runs on each encoder thread: compresses and stores what `next` yields, and wakes the
/// committer when a pack is sealed. Returns (chunks added, chunks another put stored first).
/// After a failure it keeps taking from `next` without storing, until `next` ends.
fn encode_loop(
    store: &DiskStore,
    next: &Next<'_>,
    level: i32,
    commit: &SyncSender<()>,
    failed: &AtomicBool,
) -> Result<(u64, u64), EncodeError> {
    let (mut added, mut present) = (0, 0);
    let mut error = None;
    while let Some(span) = next() {
        if failed.load(Ordering::Relaxed) {
            continue;
        }
        let span = match span {
            Ok(span) => span,
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                error = Some(EncodeError::Input(e));
                continue;
            }
        };
        let encoded = codec::encode(&span.data, level);
        match store.put(&span.entry.id, span.entry.len, &encoded) {
            Ok(true) => added += 1,
            // A concurrent receive into the same store stored it meanwhile.
            Ok(false) => present += 1,
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                error = Some(EncodeError::Store(e));
                continue;
            }
        }
        if store.sealed() > 0 {
            // Full: a wake-up is already pending, and that commit round will see this pack.
            let _ = commit.try_send(());
        }
    }
    error.map_or(Ok((added, present)), Err)
}

/// Runs on its own thread: commits sealed packs (fdatasync, rename) whenever woken, until
/// every encoder is gone. What is left is committed by the final [`DiskStore::sync`].
fn commit_loop(
    store: &DiskStore,
    wake: Receiver<()>,
    failed: &AtomicBool,
) -> Result<(), StoreError> {
    let mut error = None;
    while wake.recv().is_ok() {
        if error.is_none() {
            if let Err(e) = store.commit_some(usize::MAX) {
                failed.store(true, Ordering::Relaxed);
                error = Some(e);
            }
        }
    }
    error.map_or(Ok(()), Err)
}
