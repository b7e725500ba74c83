//! The receiving node's side of a transfer: admit and verify chunks from several streams in
//! parallel, store them, write them at their offsets in the output, copy the chunks the store
//! already holds (verified as they are read), and confirm the stream once every chunk byte is
//! written and the manifest digest checked (see [`crate::protocol`] for why that is enough and
//! the output is not read back). A dropped connection is waited out: the sender reconnects and
//! only what the store still lacks is sent again. Connections come over a channel:
//! [`receive_file`] feeds it from its endpoint, [`receive_file_from`] takes a caller's (a node
//! daemon's).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use super::{classify, sleep_until, write_frame, FrameReader, SessionError, TransferError};
use crate::codec::{self, Encoding};
use crate::frame::{AbortCode, Frame};
use crate::protocol::{Held, ProtocolError, Receiver, ReceiverConfig, StoreCopy};
use crate::sink::{Layout, Piece, Sink};
use crate::store::{DiskStore, StoreError};
use crate::ChunkId;

/// How to receive.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Protocol tuning.
    pub protocol: ReceiverConfig,
    /// How long to wait for the sender to come back after the connection drops.
    pub resume_timeout: Duration,
    /// A file to build the output over instead of an empty one: an earlier round's output,
    /// which holds mostly the same bytes. It is renamed to the partial output and rewritten in
    /// place (zero runs punched as holes), so its pages are reused rather than allocated
    /// anew; it is gone afterwards, whatever the outcome. A missing file is ignored.
    pub reuse: Option<PathBuf>,
    /// What an earlier file held, chunk by offset: `reuse` or the `reuse` of a piece, the one
    /// named [`Held::path`]. Entries that lie in the file built over it where the same chunk
    /// already lay are not written again, nor fetched, nor copied from the store.
    pub held: Option<Arc<Held>>,
    /// Keep the output's chunks by offset in [`ReceiveReport::held`], for a later transfer
    /// built over the output. Only for an output without pieces.
    pub keep_held: bool,
    /// Ranges of the stream written to files of their own rather than the output, where they
    /// are left as holes (see [`crate::sink`]): in stream order, not overlapping.
    pub pieces: Vec<Piece>,
    /// Where to publish progress, if anywhere: the bytes of the output completed so far,
    /// whether written from a received chunk, copied from the store, or a run of zeros (never
    /// written). An approximation while the transfer runs (a resumed connection rebuilds the
    /// output from the start without lowering it); it never decreases and equals the output's
    /// size once the transfer succeeds. Read it with `Ordering::Relaxed` from any task.
    pub progress: Option<Arc<AtomicU64>>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            protocol: ReceiverConfig::default(),
            resume_timeout: Duration::from_secs(60),
            reuse: None,
            held: None,
            keep_held: false,
            pieces: Vec::new(),
            progress: None,
        }
    }
}

/// What a transfer delivered.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReceiveReport {
    /// Bytes of the stream (the output file's length; its pieces, if any, are holes in it).
    pub bytes_written: u64,
    /// Chunks in the stream.
    pub chunks: u64,
    /// Chunks that came over the wire in the final connection.
    pub chunks_received: u64,
    /// Chunks taken from the store, written as zeros or found in place.
    pub chunks_reused: u64,
    /// Chunks found in place in the file the output was built over (see
    /// [`ReceiveOptions::held`]): not written at all.
    pub chunks_in_place: u64,
    /// Their bytes, each occurrence counted.
    pub bytes_in_place: u64,
    /// The output's chunks by offset, when [`ReceiveOptions::keep_held`] asked for them.
    #[serde(skip)]
    pub held: Option<Held>,
    /// Encoded chunk bytes received, over all connections.
    pub wire_bytes: u64,
    /// Connections used (more than one when the transfer resumed).
    pub connections: u32,
    /// Node name from the sender's certificate.
    pub peer: String,
    /// Wall time from the first connection to the confirmation.
    pub seconds: f64,
}

/// Accepts connections on `endpoint` until one transfer completes, writing it to `out`.
/// Connections whose TLS handshake fails are refused and logged; a transfer whose connection
/// drops is resumed by the next connection within `resume_timeout`.
pub async fn receive_file(
    endpoint: &quinn::Endpoint,
    store: Arc<DiskStore>,
    out: &Path,
    options: &ReceiveOptions,
) -> Result<ReceiveReport, TransferError> {
    let (tx, mut rx) = mpsc::channel(1);
    let mut accepting = AbortOnDrop(tokio::spawn(accept_connections(endpoint.clone(), tx)));
    let result = receive_file_from(&mut rx, store, out, options).await;
    // Stop accepting before returning, so a later receive on the same endpoint gets the next
    // connection: abort, then wait for the task to be gone.
    accepting.0.abort();
    let _ = (&mut accepting.0).await;
    result
}

/// Aborts the accepting task if the receive is dropped before it finishes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts connections on `endpoint` and hands over those whose handshake succeeds, until the
/// endpoint or the receiving side closes.
async fn accept_connections(endpoint: quinn::Endpoint, conns: mpsc::Sender<quinn::Connection>) {
    while let Some(incoming) = endpoint.accept().await {
        let addr = incoming.remote_address();
        match incoming.await {
            Ok(conn) => {
                if conns.send(conn).await.is_err() {
                    return;
                }
            }
            // A peer without a valid certificate never gets a stream.
            Err(e) => warn!(peer = %addr, error = %e, "refused a connection"),
        }
    }
}

/// Receives one transfer from connections handed over `conns`, writing it to `out`: what a
/// node daemon that accepts every connection itself uses. The connections must have completed
/// their handshake (a peer's name is read from its certificate).
///
/// Same semantics as [`receive_file`]: the first connection starts the transfer; when one
/// drops, the next connection received within `resume_timeout` resumes it; a closed channel
/// while waiting for a connection fails the transfer with [`TransferError::Lost`].
///
/// On each connection the transfer takes the next bidirectional stream the peer opens as its
/// control stream (streams the caller accepted before handing the connection over are not
/// seen), and every unidirectional stream as a chunk stream. The connection belongs to the
/// transfer from then on: after a success the receiver waits up to 2 s for the sender to
/// close it; after a loss or a failure the receiver closes it itself.
pub async fn receive_file_from(
    conns: &mut mpsc::Receiver<quinn::Connection>,
    store: Arc<DiskStore>,
    out: &Path,
    options: &ReceiveOptions,
) -> Result<ReceiveReport, TransferError> {
    let mut report = ReceiveReport::default();
    let wire = Arc::new(AtomicU64::new(0));
    let mut started: Option<Instant> = None;
    let mut lost_since: Option<(Instant, String)> = None;
    let layout = Arc::new(Layout::new(out, options.reuse.as_deref(), &options.pieces)?);
    loop {
        let wait = lost_since
            .as_ref()
            .map(|(since, _)| options.resume_timeout.saturating_sub(since.elapsed()));
        let next = match wait {
            None => conns.recv().await,
            Some(left) => match tokio::time::timeout(left, conns.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    let (_, last) = lost_since.take().expect("waiting only after a loss");
                    layout.discard();
                    return Err(TransferError::Lost {
                        addr: report.peer.clone(),
                        waited: options.resume_timeout,
                        last,
                    });
                }
            },
        };
        let Some(conn) = next else {
            layout.discard();
            let closed = "no more connections can come (the endpoint or the connection channel \
                          was closed)";
            return Err(match lost_since {
                Some((since, last)) => TransferError::Lost {
                    addr: report.peer.clone(),
                    waited: since.elapsed(),
                    last: format!("{last}; then {closed}"),
                },
                None => TransferError::Lost {
                    addr: report.peer.clone(),
                    waited: Duration::ZERO,
                    last: closed.into(),
                },
            });
        };
        let addr = conn.remote_address().to_string();
        started.get_or_insert_with(Instant::now);
        report.connections += 1;
        report.peer = crate::tls::peer_name(&conn).unwrap_or(addr.clone());
        info!(peer = %report.peer, %addr, "sender connected");
        let result = session(&conn, &store, &layout, options, &wire, &mut report).await;
        // Chunks received so far reach their final names even if this transfer failed: the
        // next attempt, or the next transfer, will not need them again.
        let synced = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.sync())
                .await
                .expect("store sync does not panic")
        };
        match result {
            Ok(()) => {
                synced?;
                layout.commit()?;
                report.wire_bytes = wire.load(Ordering::Relaxed);
                report.seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
                if let Some(progress) = &options.progress {
                    progress.fetch_max(report.bytes_written, Ordering::Relaxed);
                }
                // The sender closes once it has read `Done`; wait for that, briefly.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                evict(&store);
                return Ok(report);
            }
            Err(SessionError::Lost(why)) => {
                warn!(peer = %report.peer, error = %why, "connection lost; waiting for the sender to resume");
                // Each drop gets a fresh resume window: the sender made contact since the last.
                lost_since = Some((Instant::now(), why));
                conn.close(0u32.into(), b"lost");
            }
            Err(SessionError::Fatal(e)) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
                conn.close(1u32.into(), b"failed");
                layout.discard();
                return Err(e);
            }
        }
    }
}

/// Applies the store's size cap now that nothing is in flight.
fn evict(store: &DiskStore) {
    match store.evict_to_cap(&|_| false) {
        Ok(stats) => debug!(?stats, "store eviction"),
        Err(e) => warn!(error = %e, "chunk store eviction failed"),
    }
}

/// Blocking tasks copying chunks from the store into the output at once: one per core.
const COPY_TASKS: usize = 2;
/// Copies handed to one such task.
const COPY_BATCH: usize = 64;

/// Pack commits (fdatasync, rename) in flight at once, beside the transfer.
const COMMIT_TASKS: usize = 2;

/// State shared by the control loop and the chunk-stream tasks.
struct Shared {
    receiver: Mutex<Receiver>,
    /// Woken whenever a task changed the state machine.
    wake: Notify,
    /// Chunk writes started and not finished: the output is only finished once this is 0.
    writes_in_flight: AtomicUsize,
    /// Bytes written into the output from chunks (received or copied), each offset counted:
    /// the receiver checks it against the manifest before confirming.
    written: AtomicU64,
    /// Chunks being verified and stored on blocking threads. A session waits for them before it
    /// returns, so no put lands in the store after the caller synced it.
    storing: std::sync::Mutex<usize>,
    stored: std::sync::Condvar,
    store: Arc<DiskStore>,
    /// The output and its pieces.
    sink: Sink,
    wire: Arc<AtomicU64>,
    /// Bounds the pack commits running beside the transfer.
    commit_slots: Arc<tokio::sync::Semaphore>,
    /// Output bytes this session completed (written, copied or zero).
    completed: AtomicU64,
    /// The caller's progress counter, raised to `completed`.
    progress: Option<Arc<AtomicU64>>,
}

impl Shared {
    fn fail(&self, code: AbortCode, message: String) {
        self.receiver
            .lock()
            .expect("receiver lock")
            .fail(ProtocolError::Local { code, message });
        self.wake.notify_one();
    }

    /// Counts `n` more output bytes as completed.
    fn advance(&self, n: u64) {
        let completed = self.completed.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(progress) = &self.progress {
            // A resumed session starts over from 0: never go backwards.
            progress.fetch_max(completed, Ordering::Relaxed);
        }
    }
}

async fn session(
    conn: &quinn::Connection,
    store: &Arc<DiskStore>,
    layout: &Arc<Layout>,
    options: &ReceiveOptions,
    wire: &Arc<AtomicU64>,
    report: &mut ReceiveReport,
) -> Result<(), SessionError> {
    let peer = report.peer.clone();
    let keep_held = options.keep_held && options.pieces.is_empty();
    let (mut ctrl_send, ctrl_recv) = conn.accept_bi().await.map_err(|e| classify(&peer, &e))?;
    // Truncated, whatever an earlier connection left in them, unless built over an earlier
    // file: then each zero run is punched out as it is listed.
    let sink = layout.open()?;
    let shared = Arc::new(Shared {
        receiver: Mutex::new(
            Receiver::new(options.protocol.clone(), Instant::now())
                .with_in_place(layout.in_place(options.held.as_ref()))
                .keeping_held(keep_held.then_some(layout.output())),
        ),
        wake: Notify::new(),
        writes_in_flight: AtomicUsize::new(0),
        written: AtomicU64::new(0),
        storing: std::sync::Mutex::new(0),
        stored: std::sync::Condvar::new(),
        store: store.clone(),
        sink,
        wire: wire.clone(),
        commit_slots: Arc::new(tokio::sync::Semaphore::new(COMMIT_TASKS)),
        completed: AtomicU64::new(0),
        progress: options.progress.clone(),
    });

    let mut tasks = tokio::task::JoinSet::new();
    {
        let (conn, shared, peer) = (conn.clone(), shared.clone(), peer.clone());
        tasks.spawn(async move { accept_chunk_streams(conn, shared, peer).await });
    }
    let mut reader = FrameReader::new(ctrl_recv, &peer);
    let mut copies = tokio::task::JoinSet::new();
    let mut lost: Option<SessionError> = None;
    // Where the next manifest entry lies in the output (manifests come in order, from 0).
    let mut next_offset = 0u64;
    let outcome = loop {
        // Drain the state machine: frames to send, copies to start (a bounded number of tasks,
        // each a batch), the final check.
        let (frames, new_copies, finishing, error, timeout) = {
            let mut r = shared.receiver.lock().expect("receiver lock");
            let frames: Vec<Frame> = std::iter::from_fn(|| r.poll_transmit()).collect();
            let mut batches = Vec::new();
            while copies.len() + batches.len() < COPY_TASKS {
                let batch: Vec<StoreCopy> = std::iter::from_fn(|| r.poll_copy())
                    .take(COPY_BATCH)
                    .collect();
                if batch.is_empty() {
                    break;
                }
                batches.push(batch);
            }
            (
                frames,
                batches,
                r.ready_to_finish() && r.copies_queued() == 0,
                r.error().cloned(),
                r.poll_timeout(),
            )
        };
        for frame in &frames {
            tracing::trace!(frame = frame.name(), "send");
            write_frame(&mut ctrl_send, frame, &peer).await?;
        }
        if frames.iter().any(|f| matches!(f, Frame::Done { .. })) {
            break Ok(());
        }
        if let Some(e) = error {
            break Err(SessionError::from(e));
        }
        if let Some(e) = lost.take() {
            break Err(e);
        }
        for batch in new_copies {
            let shared = shared.clone();
            copies.spawn_blocking(move || {
                batch
                    .into_iter()
                    .try_for_each(|c| copy_from_store(&shared, c))
            });
        }
        if finishing && copies.is_empty() && shared.writes_in_flight.load(Ordering::Acquire) == 0 {
            debug!("every chunk is in and written; sizing the output");
            let shared2 = shared.clone();
            let sized = tokio::task::spawn_blocking(move || size_output(&shared2))
                .await
                .expect("sizing the output does not panic");
            match sized {
                // On a mismatch the receiver fails itself and queues the Abort.
                Ok(()) => {
                    let written = shared.written.load(Ordering::Acquire);
                    let _ = shared
                        .receiver
                        .lock()
                        .expect("receiver lock")
                        .finish(written);
                }
                Err(e) => shared.fail(AbortCode::Io, e.to_string()),
            }
            continue;
        }
        tokio::select! {
            frame = reader.next() => match frame {
                Ok(Some(frame)) => {
                    tracing::trace!(frame = frame.name(), "recv");
                    // Zero chunks are complete as soon as they are listed: they are never written
                    // (over an earlier output, their runs are punched out as holes).
                    let (zeros, runs) = match &frame {
                        Frame::Manifest { entries, .. } => zero_runs(entries, &mut next_offset),
                        _ => (0, Vec::new()),
                    };
                    let has = |id: &ChunkId| store.contains(id);
                    // Entries found in place are complete as soon as they are listed, too.
                    let (handled, in_place) = {
                        let mut r = shared.receiver.lock().expect("receiver lock");
                        let before = r.stats().bytes_in_place;
                        let handled = r.handle_frame(frame, &has, Instant::now());
                        (handled, r.stats().bytes_in_place - before)
                    };
                    if handled.is_ok() {
                        if let Err(e) = runs.iter().try_for_each(|&(at, len)| shared.sink.zeros(at, len)) {
                            shared.fail(AbortCode::Io, format!("zeroing a run: {e}"));
                        }
                    }
                    if handled.is_ok() && zeros + in_place > 0 {
                        shared.advance(zeros + in_place);
                    }
                }
                Ok(None) => lost = Some(SessionError::Lost(format!("{peer} closed the control stream"))),
                Err(e) => lost = Some(e),
            },
            Some(done) = copies.join_next() => {
                if let Err(e) = done.expect("store copy does not panic") {
                    shared.fail(AbortCode::Io, e.to_string());
                }
            }
            Some(done) = tasks.join_next() => {
                if let Err(e) = done.expect("chunk stream task does not panic") {
                    lost = Some(e);
                }
            }
            _ = shared.wake.notified() => {}
            _ = sleep_until(timeout), if timeout.is_some() => {
                shared.receiver.lock().expect("receiver lock").handle_timeout(Instant::now());
            }
        }
    };
    // Say the last word (an Abort on failure) before the tasks go.
    let last: Vec<Frame> = {
        let mut r = shared.receiver.lock().expect("receiver lock");
        std::iter::from_fn(|| r.poll_transmit()).collect()
    };
    for frame in &last {
        if write_frame(&mut ctrl_send, frame, &peer).await.is_err() {
            break;
        }
    }
    let _ = ctrl_send.finish();
    tasks.abort_all();
    while copies.join_next().await.is_some() {}
    let waiting = shared.clone();
    tokio::task::spawn_blocking(move || {
        let mut storing = waiting.storing.lock().expect("storing lock");
        while *storing > 0 {
            storing = waiting.stored.wait(storing).expect("storing lock");
        }
    })
    .await
    .expect("waiting for stores does not panic");
    let stats = shared.receiver.lock().expect("receiver lock").stats();
    report.chunks = stats.chunks;
    report.chunks_received = stats.chunks_received;
    report.chunks_reused = stats.chunks_reused;
    report.chunks_in_place = stats.chunks_in_place;
    report.bytes_in_place = stats.bytes_in_place;
    if outcome.is_ok() {
        let mut r = shared.receiver.lock().expect("receiver lock");
        report.bytes_written = r.total_len().unwrap_or(0);
        report.held = r.take_held();
    }
    outcome
}

/// Accepts the sender's chunk streams and runs each on its own task.
async fn accept_chunk_streams(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    peer: String,
) -> Result<(), SessionError> {
    let mut streams = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            stream = conn.accept_uni() => {
                let stream = stream.map_err(|e| classify(&peer, &e))?;
                let (shared, peer) = (shared.clone(), peer.clone());
                streams.spawn(async move { receive_chunks(FrameReader::new(stream, &peer), shared).await });
            }
            Some(done) = streams.join_next() => {
                done.expect("chunk stream does not panic")?;
            }
        }
    }
}

/// Reads `Chunk` frames from one stream and queues each for the stream's blocking thread,
/// which verifies, stores and writes it; a stream holds at most [`STORE_QUEUE`] + 1 chunks in
/// memory beyond QUIC's window.
async fn receive_chunks(mut reader: FrameReader, shared: Arc<Shared>) -> Result<(), SessionError> {
    // One blocking thread per stream verifies, stores and writes its chunks, fed through a
    // short queue: the stream reads on while the thread works, and neither wakes the other
    // for every chunk (a hand-off and a completion per chunk cost two cross-core wake-ups).
    let (chunks, mut queue) = mpsc::channel::<ReceivedChunk>(STORE_QUEUE);
    let worker_shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        while let Some(c) = queue.blocking_recv() {
            store_chunk(&worker_shared, c.id, c.raw_len, c.encoding, &c.payload);
            drop(c);
            worker_shared.wake.notify_one();
        }
    });
    while let Some(frame) = reader.next().await? {
        let Frame::Chunk {
            id,
            raw_len,
            encoding,
            payload,
        } = frame
        else {
            shared.fail(
                AbortCode::Protocol,
                format!("{} frame on a chunk stream", frame.name()),
            );
            return Ok(());
        };
        let admitted = shared.receiver.lock().expect("receiver lock").accept_chunk(
            &id,
            raw_len,
            Instant::now(),
        );
        if admitted.is_err() {
            shared.wake.notify_one();
            return Ok(());
        }
        shared
            .wire
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        let chunk = ReceivedChunk {
            id,
            raw_len,
            encoding,
            payload,
            _storing: Storing::start(&shared),
        };
        if chunks.send(chunk).await.is_err() {
            // Only a panic ends the thread while this stream still feeds it.
            shared.fail(
                AbortCode::Io,
                "the thread storing a stream's chunks stopped (a bug: see the daemon's log)".into(),
            );
            return Ok(());
        }
        // Make sealed packs durable off the critical path; waiting for a slot is the
        // back-pressure when the disk falls behind.
        if shared.store.sealed() > 0 {
            let slot = shared
                .commit_slots
                .clone()
                .acquire_owned()
                .await
                .expect("the commit semaphore is never closed");
            let commit_shared = shared.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = commit_shared.store.commit_some(1) {
                    commit_shared.fail(
                        store_abort_code(&e),
                        format!("receiver could not store chunks: {e}"),
                    );
                }
                drop(slot);
            });
        }
    }
    Ok(())
}

/// Chunks one stream may have queued for its blocking thread.
const STORE_QUEUE: usize = 8;

/// A chunk as it came off a stream, queued to be verified and stored.
struct ReceivedChunk {
    id: ChunkId,
    raw_len: u32,
    encoding: u8,
    payload: Bytes,
    _storing: Storing,
}

/// Counts one chunk in [`Shared::storing`] from when it is queued until it is dropped: stored,
/// or never (a queue dropped with it), so the session's wait for stores always ends.
struct Storing(Arc<Shared>);

impl Storing {
    fn start(shared: &Arc<Shared>) -> Storing {
        *shared.storing.lock().expect("storing lock") += 1;
        Storing(shared.clone())
    }
}

impl Drop for Storing {
    fn drop(&mut self) {
        *self.0.storing.lock().expect("storing lock") -= 1;
        self.0.stored.notify_all();
    }
}

/// Verifies a chunk against its id, stores it, and writes it wherever the stream has it.
fn store_chunk(shared: &Shared, id: ChunkId, raw_len: u32, encoding: u8, payload: &[u8]) {
    let Ok(encoding) = Encoding::try_from(encoding) else {
        return shared.fail(
            AbortCode::BadChunk,
            format!("chunk {id} has unknown encoding {encoding}"),
        );
    };
    let raw = match codec::decode_verified(&id, raw_len, encoding, payload) {
        Ok(raw) => raw,
        Err(e) => {
            return shared.fail(
                AbortCode::BadChunk,
                format!(
                    "chunk {id} refused: {e} (a sender's file that changed while it was sent \
                     gives this too)"
                ),
            )
        }
    };
    if let Err(e) = shared.store.put_payload(&id, raw_len, encoding, payload) {
        let code = store_abort_code(&e);
        return shared.fail(code, format!("receiver could not store chunk {id}: {e}"));
    }
    let offsets = {
        let mut r = shared.receiver.lock().expect("receiver lock");
        shared.writes_in_flight.fetch_add(1, Ordering::AcqRel);
        r.chunk_stored(&id)
    };
    let written = write_at_offsets(shared, &raw, &offsets);
    shared.writes_in_flight.fetch_sub(1, Ordering::AcqRel);
    if let Err(e) = written {
        shared.fail(AbortCode::Io, e.to_string());
    }
}

/// The abort code that tells the sender why the store failed: a full disk is worth naming.
fn store_abort_code(e: &StoreError) -> AbortCode {
    if matches!(e, StoreError::NoSpace { .. }) {
        AbortCode::NoSpace
    } else {
        AbortCode::Io
    }
}

/// Writes a chunk the store holds wherever the stream has it. [`DiskStore::get`] decodes the
/// stored record and checks it against its id, so only verified bytes reach the output; a
/// corrupt record reads as missing (and leaves the index, so the next transfer fetches it).
fn copy_from_store(shared: &Shared, copy: StoreCopy) -> Result<(), TransferError> {
    let output_error = |message: String| TransferError::Output {
        path: shared.sink.partial_output().to_path_buf(),
        source: std::io::Error::other(message),
    };
    let raw = shared.store.get(&copy.id)?.ok_or_else(|| {
        output_error(format!(
            "chunk {} vanished from the chunk store mid-transfer (evicted, or its record failed \
             verification when read); run the transfer again: it will be fetched",
            copy.id
        ))
    })?;
    if raw.len() != copy.len as usize {
        return Err(output_error(format!(
            "chunk {} is {} bytes in the chunk store but the manifest says {}: the sender's \
             manifest is wrong",
            copy.id,
            raw.len(),
            copy.len
        )));
    }
    write_at_offsets(shared, &raw, &copy.offsets)
}

fn write_at_offsets(shared: &Shared, raw: &[u8], offsets: &[u64]) -> Result<(), TransferError> {
    for &off in offsets {
        shared.sink.write_all_at(raw, off)?;
        shared.written.fetch_add(raw.len() as u64, Ordering::AcqRel);
        shared.advance(raw.len() as u64);
    }
    Ok(())
}

/// The zero runs of a manifest batch whose first entry lies at `*offset`, as (offset, length)
/// with adjacent runs merged, and their total; advances `*offset` past the batch.
fn zero_runs(entries: &[crate::ManifestEntry], offset: &mut u64) -> (u64, Vec<(u64, u64)>) {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut total = 0;
    for e in entries {
        let len = u64::from(e.len);
        if e.zero {
            total += len;
            match runs.last_mut() {
                Some((at, run)) if *at + *run == *offset => *run += len,
                _ => runs.push((*offset, len)),
            }
        }
        *offset += len;
    }
    (total, runs)
}

/// Sizes the output and its pieces to the stream: zero entries were never written, and the
/// files were created empty (or the runs punched out of an earlier file), so they read back as
/// zeros; an earlier file longer than its part is cut. Nothing is read back: every byte written
/// was verified on its way in.
fn size_output(shared: &Shared) -> Result<(), TransferError> {
    let total = shared
        .receiver
        .lock()
        .expect("receiver lock")
        .total_len()
        .unwrap_or(0);
    shared.sink.finish(total)
}
