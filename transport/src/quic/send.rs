//! The sending node's side of a transfer: chunk the file on every core, answer the receiver's
//! needs from several chunk streams with compression spread over the cores, and reconnect to
//! resume when the connection drops. Connections come from a [`Dialer`]: [`send_file`] dials
//! with its own endpoint, [`send_file_via`] takes a caller's (a node daemon's) connections.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, info, warn};

use super::{
    classify, sleep_until, write_error, write_frame, FrameReader, SessionError, TransferError,
};
use crate::chunker::earlier::{Earlier, EarlierCut, EarlierCuts, EarlierFile, Recorded};
use crate::chunker::parallel;
use crate::codec;
use crate::frame::{AbortCode, Frame};
use crate::protocol::{ChunkRequest, ProtocolError, Sender, SenderConfig, SenderStats};
use crate::source::Source;
use crate::tls::SERVER_NAME;
use crate::ManifestEntry;

/// How to send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// zstd level for chunks (1 is fast and, on memory pages, nearly as small as higher levels).
    pub level: i32,
    /// Unidirectional streams carrying chunks; also how many chunks are compressed at once.
    pub streams: usize,
    /// Protocol tuning.
    pub protocol: SenderConfig,
    /// How long to keep trying to reconnect after the connection drops.
    pub resume_timeout: Duration,
    /// Where to publish progress, if anywhere: the number of source bytes chunked and announced
    /// to the receiver so far (the stream offset reached), updated as manifest frames go out.
    /// The chunks the receiver lacks follow the announcement within a small window of manifest
    /// batches. It never decreases (a resumed connection announces from the start again
    /// without lowering it) and equals the file's size once the transfer succeeds. Read it with
    /// `Ordering::Relaxed` from any task.
    pub progress: Option<Arc<AtomicU64>>,
    /// Return the stream's manifest in [`SendReport::manifest`]: every chunk's offset, id and
    /// length, so the caller can keep the chunks in its own store without cutting and hashing
    /// the stream again ([`crate::ingest::ingest_manifest`]). About 0.5 MB per GiB sent.
    pub keep_manifest: bool,
    /// Files of the stream as they were sent before, with the cuts made in them then: where
    /// their bytes have not changed, those cuts are taken instead of cutting and hashing again
    /// (see [`crate::chunker::earlier`]). Files the stream does not hold are ignored.
    pub earlier: Vec<EarlierFile>,
    /// Record every cut with its fingerprint in [`SendReport::cuts`], for a later stream over
    /// the same files to give as [`SendOptions::earlier`].
    pub record_cuts: bool,
    /// Map the files read-only and cut, hash and compress them where they lie, instead of
    /// reading them into buffers first ([`Source::open_mapped`]). Only for files nobody
    /// truncates while they are sent: that would kill this process (`SIGBUS`).
    pub map_files: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            level: 1,
            streams: 4,
            protocol: SenderConfig::default(),
            resume_timeout: Duration::from_secs(60),
            progress: None,
            keep_manifest: false,
            earlier: Vec::new(),
            record_cuts: false,
            map_files: false,
        }
    }
}

/// What a transfer moved.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SendReport {
    /// Bytes of the source file.
    pub input_bytes: u64,
    /// Payload bytes put on the wire for chunk and manifest frames, over all connections.
    pub wire_bytes: u64,
    /// Chunks in the stream (manifest entries).
    pub chunks: u64,
    /// Chunks the receiver did not need: zero chunks, chunks it already had, repeats.
    pub chunks_reused: u64,
    /// Chunks sent, over all connections.
    pub chunks_sent: u64,
    /// Connections used (more than one when the transfer resumed).
    pub connections: u32,
    /// Wall time from the first connection attempt to the receiver's confirmation.
    pub seconds: f64,
    /// The UDP payload size (path MTU) the last connection had reached when it closed: 1,472
    /// on plain Ethernet over IPv4, up to [`super::MAX_UDP_PAYLOAD`] with jumbo frames.
    pub path_mtu: u16,
    /// Source bytes whose cuts were taken from [`SendOptions::earlier`] files, over all
    /// connections (a resumed transfer cuts the stream again from its start).
    pub earlier_bytes: u64,
    /// Every cut made, by stream offset, when [`SendOptions::record_cuts`] asked for them.
    #[serde(skip)]
    pub cuts: Vec<EarlierCut>,
    /// The stream's chunks in order, as (offset, entry), when [`SendOptions::keep_manifest`]
    /// asked for them; empty otherwise.
    #[serde(skip)]
    pub manifest: Vec<(u64, ManifestEntry)>,
}

/// Makes the connections a sender uses: one per attempt (a resumed transfer dials again).
///
/// [`send_file`] dials with its endpoint; a node daemon that shares one endpoint between its
/// control protocol and transfers implements this to dial and, say, introduce the transfer on
/// a stream of its own before handing the connection over.
pub trait Dialer: Send + Sync {
    /// One connection attempt. The connection returned must be ready for a transfer session
    /// (the transport opens its own control stream on it next). [`send_file_via`] bounds the
    /// attempt by what is left of `resume_timeout`.
    fn dial(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<quinn::Connection, DialError>> + Send + '_>>;
    /// The peer, for messages and logs.
    fn peer(&self) -> String;
}

/// Why a [`Dialer`] produced no connection.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The connection attempt failed: classified and retried exactly like a failed handshake of
    /// [`send_file`] (a TLS refusal is fatal, a timeout or an unreachable peer is retried until
    /// `resume_timeout`).
    #[error("connection attempt failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Give up at once with this error.
    #[error(transparent)]
    Fatal(#[from] TransferError),
}

/// Dials `addr` through a client endpoint: what [`send_file`] uses.
struct EndpointDialer<'a> {
    endpoint: &'a quinn::Endpoint,
    addr: SocketAddr,
}

impl Dialer for EndpointDialer<'_> {
    fn dial(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<quinn::Connection, DialError>> + Send + '_>> {
        Box::pin(async move {
            let connecting = self
                .endpoint
                .connect(self.addr, SERVER_NAME)
                .map_err(|source| TransferError::Connect {
                    addr: self.addr,
                    source,
                })?;
            Ok(connecting.await?)
        })
    }

    fn peer(&self) -> String {
        self.addr.to_string()
    }
}

/// Sends `path` to the receiver at `addr` through `endpoint` (see [`super::client_endpoint`]).
/// Returns once the receiver confirmed the whole stream (see [`crate::protocol`] for what its
/// `Done` vouches for).
pub async fn send_file(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    path: &Path,
    options: &SendOptions,
) -> Result<SendReport, TransferError> {
    send_file_via(&EndpointDialer { endpoint, addr }, path, options).await
}

/// [`send_file`] for several files sent as one stream, back to back (see [`send_files_via`]).
pub async fn send_files<P: AsRef<Path>>(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    paths: &[P],
    options: &SendOptions,
) -> Result<SendReport, TransferError> {
    send_files_via(&EndpointDialer { endpoint, addr }, paths, options).await
}

/// Sends `path` over connections from `dialer`, dialing again to resume when a connection
/// drops, until `resume_timeout` passes without a working one. Returns once the receiver
/// confirmed the whole stream: every chunk verified and placed, the manifest digest equal.
///
/// Each connection belongs to the transfer once dialed: the transfer opens one bidirectional
/// control stream and `streams` unidirectional chunk streams on it, and closes it when its
/// session ends (code 0, reason `done` or `failed`), so it cannot carry anything afterwards.
pub async fn send_file_via(
    dialer: &dyn Dialer,
    path: &Path,
    options: &SendOptions,
) -> Result<SendReport, TransferError> {
    send_files_via(dialer, &[path], options).await
}

/// [`send_file_via`] for several files sent as one stream, back to back in the order given
/// (see [`Source`]): what a pre-copy round sends, CRIU's page images as they lie. The
/// receiver writes the stream to one output file.
pub async fn send_files_via<P: AsRef<Path>>(
    dialer: &dyn Dialer,
    paths: &[P],
    options: &SendOptions,
) -> Result<SendReport, TransferError> {
    let started = Instant::now();
    let opened = match options.map_files {
        true => Source::open_mapped(paths),
        false => Source::open(paths),
    };
    let source = Arc::new(opened.map_err(|(path, source)| TransferError::Source { path, source })?);
    let input_bytes = source.len();
    let earlier = (!options.earlier.is_empty())
        .then(|| Arc::new(Earlier::new(&options.earlier, |path| source.span_of(path))));
    let wire = Arc::new(AtomicU64::new(0));
    let mut report = SendReport {
        input_bytes,
        ..SendReport::default()
    };
    let peer = dialer.peer();
    // Since when the transfer has been without a working connection (from the start, until the
    // first connection is up), and why.
    let mut trouble_since = Instant::now();
    let mut connected_once = false;
    let mut backoff = Duration::from_millis(50);
    loop {
        let left = options
            .resume_timeout
            .saturating_sub(trouble_since.elapsed());
        let outcome = match tokio::time::timeout(left, dialer.dial()).await {
            Err(_) => Err(SessionError::Lost(
                "the connection attempt did not complete".into(),
            )),
            Ok(Err(DialError::Fatal(e))) => return Err(e),
            Ok(Err(DialError::Connection(e))) => Err(classify(&peer, &e)),
            Ok(Ok(conn)) => {
                info!(peer = %peer, resumed = connected_once, "connected");
                connected_once = true;
                report.connections += 1;
                let result =
                    session(&conn, &peer, &source, &earlier, options, &wire, &mut report).await;
                let reason: &[u8] = if result.is_ok() { b"done" } else { b"failed" };
                let stats = conn.stats();
                report.path_mtu = stats.path.current_mtu;
                info!(
                    rtt_ms = stats.path.rtt.as_secs_f64() * 1e3,
                    cwnd = stats.path.cwnd,
                    mtu = stats.path.current_mtu,
                    lost_packets = stats.path.lost_packets,
                    congestion_events = stats.path.congestion_events,
                    sent_packets = stats.path.sent_packets,
                    "connection closing"
                );
                conn.close(0u32.into(), reason);
                if result.is_err() {
                    trouble_since = Instant::now();
                }
                result
            }
        };
        match outcome {
            Ok(stats) => {
                report.chunks = stats.chunks;
                report.chunks_reused = stats.chunks_reused;
                report.wire_bytes = wire.load(Ordering::Relaxed);
                report.seconds = started.elapsed().as_secs_f64();
                report.earlier_bytes = earlier.as_ref().map_or(0, |e| e.reused_bytes());
                if let Some(progress) = &options.progress {
                    progress.fetch_max(input_bytes, Ordering::Relaxed);
                }
                return Ok(report);
            }
            Err(SessionError::Fatal(e)) => return Err(e),
            Err(SessionError::Lost(why)) => {
                if trouble_since.elapsed() >= options.resume_timeout {
                    return Err(if connected_once {
                        TransferError::Lost {
                            addr: peer,
                            waited: options.resume_timeout,
                            last: why,
                        }
                    } else {
                        TransferError::Unreachable {
                            addr: peer,
                            waited: options.resume_timeout,
                            last: why,
                        }
                    });
                }
                warn!(peer = %peer, error = %why, "no connection; trying again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// What the chunking thread hands the session.
enum Input {
    Entry(u64, ManifestEntry),
    /// The source ended after this many bytes.
    End(u64),
    Failed(std::io::Error),
}

/// One connection's worth of the transfer.
#[allow(clippy::too_many_arguments)]
async fn session(
    conn: &quinn::Connection,
    peer: &str,
    source: &Arc<Source>,
    earlier: &Option<Arc<Earlier>>,
    options: &SendOptions,
    wire: &Arc<AtomicU64>,
    report: &mut SendReport,
) -> Result<SenderStats, SessionError> {
    let peer = peer.to_string();
    let (mut ctrl_send, ctrl_recv) = conn.open_bi().await.map_err(|e| classify(&peer, &e))?;
    let mut reader = FrameReader::new(ctrl_recv, &peer);
    let mut sender = Sender::new(options.protocol.clone(), source.len(), Instant::now());

    let (input_tx, mut input_rx) = mpsc::channel(4096);
    let (chunk_source, chunk_earlier) = (source.clone(), earlier.clone());
    // A resumed session cuts the stream from the start again: it records anew.
    let recorded = options.record_cuts.then(|| Arc::new(Recorded::default()));
    let chunk_recorded = recorded.clone();
    std::thread::Builder::new()
        .name("chunker".into())
        .spawn(move || {
            let earlier = EarlierCuts {
                take: chunk_earlier.as_deref(),
                record: chunk_recorded.as_deref(),
            };
            chunk_source_stream(&chunk_source, earlier, &input_tx)
        })
        .map_err(|e| TransferError::Source {
            path: source.path_at(0).to_path_buf(),
            source: e,
        })?;

    // Chunk streams: each takes requests from a shared queue until it closes.
    let (req_tx, req_rx) = mpsc::channel::<ChunkRequest>(256);
    let req_rx = Arc::new(Mutex::new(req_rx));
    let (err_tx, mut err_rx) = mpsc::channel::<SessionError>(options.streams);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.streams.max(1) {
        let stream = conn.open_uni().await.map_err(|e| classify(&peer, &e))?;
        let worker = ChunkWorker {
            stream,
            source: source.clone(),
            level: options.level,
            wire: wire.clone(),
            peer: peer.clone(),
        };
        let (rx, err_tx) = (req_rx.clone(), err_tx.clone());
        workers.spawn(async move {
            if let Err(e) = worker.run(rx).await {
                let _ = err_tx.send(e).await;
            }
        });
    }
    drop(err_tx);
    // Only the workers hold the queue's receiving end: when they have all failed (the
    // connection died), a send into the full queue fails instead of waiting forever.
    drop(req_rx);

    let mut req_tx = Some(req_tx);
    let mut input_open = true;
    // A resumed session chunks the stream from the start again: its manifest starts empty.
    let mut manifest = options.keep_manifest.then(Vec::new);
    // Source bytes this session has announced in manifest frames: the stream offset reached.
    let mut announced = 0u64;
    let self_source = source.clone();
    let result = async {
        loop {
        while let Some(frame) = sender.poll_transmit() {
            let n = write_frame(&mut ctrl_send, &frame, &peer).await?;
            if let Frame::Manifest { entries, .. } = &frame {
                wire.fetch_add(n as u64, Ordering::Relaxed);
                announced += entries.iter().map(|e| u64::from(e.len)).sum::<u64>();
                if let Some(progress) = &options.progress {
                    // A resumed session starts over from offset 0: never go backwards.
                    progress.fetch_max(announced, Ordering::Relaxed);
                }
            }
        }
        while let Some(req) = sender.poll_chunk() {
            let tx = req_tx
                .as_ref()
                .expect("requests queue open while the session runs");
            if tx.send(req).await.is_err() {
                break;
            }
        }
        if sender.is_done() {
            break Ok(sender.stats());
        }
        if let Some(e) = sender.error() {
            break Err(SessionError::from(e.clone()));
        }
        let deadline = sender.poll_timeout();
        tokio::select! {
            input = input_rx.recv(), if input_open && sender.wants_input() => {
                match take_input(&mut sender, input, &mut input_rx, manifest.as_mut()) {
                    Ok(open) => input_open = open,
                    Err(source) => {
                        sender.fail(ProtocolError::Local {
                            code: AbortCode::Io,
                            message: "the sender could not read its source file".into(),
                        });
                        break Err(SessionError::Fatal(TransferError::Source {
                            path: self_source.path_at(announced).to_path_buf(),
                            source,
                        }));
                    }
                }
            }
            frame = reader.next() => match frame {
                Ok(Some(frame)) => { let _ = sender.handle_frame(frame, Instant::now()); }
                Ok(None) => break Err(SessionError::Lost(format!("{peer} closed the control stream"))),
                Err(e) => break Err(e),
            },
            Some(e) = err_rx.recv() => break Err(e),
            _ = sleep_until(deadline), if deadline.is_some() => sender.handle_timeout(Instant::now()),
        }
        }
    }
    .await;
    let result = match result {
        Err(lost @ SessionError::Lost(_)) => Err(explain(&mut sender, &mut reader, lost).await),
        other => other,
    };
    // Flush what the state machine still has to say (an Abort on failure), then stop workers.
    while let Some(frame) = sender.poll_transmit() {
        if write_frame(&mut ctrl_send, &frame, &peer).await.is_err() {
            break;
        }
    }
    let _ = ctrl_send.finish();
    req_tx.take();
    if result.is_err() {
        workers.abort_all();
    }
    while workers.join_next().await.is_some() {}
    let stats = sender.stats();
    report.chunks_sent += stats.chunks_sent;
    if let (Ok(_), Some(manifest)) = (&result, manifest) {
        report.manifest = manifest;
    }
    // The chunker records every cut before it says the stream ended.
    if let (Ok(_), Some(recorded)) = (&result, recorded) {
        report.cuts = recorded.take();
    }
    debug!(?stats, "session ended");
    result
}

/// How long a sender whose streams broke still listens for the receiver's reason.
const LAST_WORD: Duration = Duration::from_secs(2);

/// A stream or the connection broke: before calling the session lost (and resuming it),
/// read what the receiver still said on the control stream. A receiver that gives up sends
/// its Abort, then stops our streams; the stop can reach us before we read the Abort, and
/// resuming a transfer the receiver refused would only wait out the resume timeout.
async fn explain(
    sender: &mut Sender,
    reader: &mut FrameReader,
    lost: SessionError,
) -> SessionError {
    let deadline = tokio::time::Instant::now() + LAST_WORD;
    while let Ok(Ok(Some(frame))) = tokio::time::timeout_at(deadline, reader.next()).await {
        let _ = sender.handle_frame(frame, Instant::now());
        if let Some(e) = sender.error() {
            return SessionError::from(e.clone());
        }
    }
    lost
}

/// Feeds the state machine `first` and whatever else the chunker has ready, while the window
/// allows, noting each entry in `manifest` when one is kept. Returns whether more input will
/// come, or the chunker's read error.
fn take_input(
    sender: &mut Sender,
    first: Option<Input>,
    rx: &mut mpsc::Receiver<Input>,
    mut manifest: Option<&mut Vec<(u64, ManifestEntry)>>,
) -> std::io::Result<bool> {
    let mut next = first;
    loop {
        match next {
            Some(Input::Entry(offset, entry)) => {
                if let Some(manifest) = manifest.as_deref_mut() {
                    manifest.push((offset, entry));
                }
                sender.push_entry(offset, entry);
            }
            Some(Input::End(len)) => {
                debug!("source chunked");
                sender.finish_input(len);
                return Ok(false);
            }
            Some(Input::Failed(e)) => return Err(e),
            None => return Ok(false),
        }
        if !sender.wants_input() {
            return Ok(true);
        }
        match rx.try_recv() {
            Ok(input) => next = Some(input),
            Err(_) => return Ok(true),
        }
    }
}

/// Runs on its own thread: cuts the source on every core (the very cuts of a
/// [`crate::chunker::Chunker`]) and hands entries to the session in order, blocking when the
/// session's window is full. Cuts `earlier` has at hand are taken from it.
fn chunk_source_stream(source: &Arc<Source>, earlier: EarlierCuts<'_>, tx: &mpsc::Sender<Input>) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cut = parallel::cut_parallel(
        source.len(),
        source.as_ref(),
        threads,
        parallel::SEGMENT_LEN,
        earlier,
        |offset, entry| tx.blocking_send(Input::Entry(offset, entry)).is_ok(),
    );
    let last = match cut {
        Ok(Some(len)) => Input::End(len),
        // The session is gone.
        Ok(None) => return,
        Err(e) => Input::Failed(e),
    };
    let _ = tx.blocking_send(last);
}

/// Owns one chunk stream: reads each requested chunk from the source, compresses it on a
/// blocking thread, and writes it as a `Chunk` frame.
struct ChunkWorker {
    stream: quinn::SendStream,
    source: Arc<Source>,
    level: i32,
    wire: Arc<AtomicU64>,
    peer: String,
}

impl ChunkWorker {
    async fn run(
        mut self,
        requests: Arc<Mutex<mpsc::Receiver<ChunkRequest>>>,
    ) -> Result<(), SessionError> {
        loop {
            // Take what is queued, up to a small batch, so one hand-off to a blocking thread
            // covers several chunks.
            let batch = {
                let mut queue = requests.lock().await;
                let Some(first) = queue.recv().await else {
                    let _ = self.stream.finish();
                    return Ok(());
                };
                let mut batch = vec![first];
                while batch.len() < ENCODE_BATCH {
                    match queue.try_recv() {
                        Ok(req) => batch.push(req),
                        Err(_) => break,
                    }
                }
                batch
            };
            let (source, level) = (self.source.clone(), self.level);
            let first = batch[0].offset;
            let frames = tokio::task::spawn_blocking(move || {
                batch
                    .into_iter()
                    .map(|req| encode_chunk(&source, req, level))
                    .collect::<std::io::Result<Vec<[Bytes; 2]>>>()
            })
            .await
            .expect("chunk encoding does not panic")
            .map_err(|source| {
                SessionError::Fatal(TransferError::Source {
                    path: self.source.path_at(first).to_path_buf(),
                    source,
                })
            })?;
            for mut parts in frames {
                let len = parts.iter().map(Bytes::len).sum::<usize>();
                // Handed to quinn as they are: the payload is not copied again.
                self.stream
                    .write_all_chunks(&mut parts)
                    .await
                    .map_err(|e| write_error(&self.peer, e))?;
                self.wire.fetch_add(len as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Chunks one stream's worker encodes per hand-off to a blocking thread.
const ENCODE_BATCH: usize = 4;

/// Reads and compresses one chunk into a complete `Chunk` frame, as its head and its payload
/// (see [`Frame::encode_parts`]). The bytes are not hashed again here: the receiver checks
/// every chunk against its id, and refuses the transfer when a file changed since it was
/// chunked (hashing on both ends cost about 5 % of a pre-copy round's CPU).
///
/// From a mapped source the chunk is compressed where it lies. A chunk that goes raw is
/// copied out of the map all the same: QUIC keeps data it has not seen acknowledged until the
/// connection is gone, which can be after the transfer returns, and a range of the map would
/// keep the whole map, and so the memory of the images the caller deletes next, alive with it.
fn encode_chunk(source: &Source, req: ChunkRequest, level: i32) -> std::io::Result<[Bytes; 2]> {
    let len = req.len as usize;
    let encoded = match source.bytes_at(req.offset, len) {
        Some(raw) => codec::encode(raw, level),
        None => {
            let mut raw = vec![0u8; len];
            source.read_exact_at(&mut raw, req.offset)?;
            codec::encode_owned(raw, level)
        }
    };
    let frame = Frame::Chunk {
        id: req.id,
        raw_len: req.len,
        encoding: encoded.encoding as u8,
        payload: Bytes::from(encoded.payload),
    };
    Ok(frame.encode_parts())
}
