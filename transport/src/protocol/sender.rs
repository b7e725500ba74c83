//! The sending side of one transfer session: batches the manifest, digests it as it goes,
//! answers `Need` with chunk requests for its driver, and finishes when the receiver confirms
//! the whole stream.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::ProtocolError;
use crate::frame::{Frame, MAX_BATCH_ENTRIES, VERSION};
use crate::{ChunkId, ManifestDigest, ManifestEntry};

/// Tuning for a [`Sender`].
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Entries per manifest batch (at most [`MAX_BATCH_ENTRIES`]).
    pub batch_entries: usize,
    /// Manifest batches sent but not yet answered by `Need`; bounds how far the manifest runs
    /// ahead of the chunks.
    pub max_batches_in_flight: usize,
    /// Give up when the receiver says nothing for this long while we wait on it.
    pub idle_timeout: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            batch_entries: 256,
            max_batches_in_flight: 8,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A chunk the receiver lacks: the driver reads `len` bytes at `offset` of the source, encodes
/// them and sends them as a `Chunk` frame on a chunk stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRequest {
    /// Content address of the chunk.
    pub id: ChunkId,
    /// Where the chunk starts in the source stream.
    pub offset: u64,
    /// Raw length.
    pub len: u32,
}

/// What a session moved, for the caller's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// Manifest entries (chunks of the stream, zero chunks included).
    pub chunks: u64,
    /// Entries the receiver did not need: zero chunks, chunks it already stored, and repeats
    /// within this stream.
    pub chunks_reused: u64,
    /// Chunks requested by the receiver.
    pub chunks_sent: u64,
    /// Raw bytes of the requested chunks.
    pub bytes_requested: u64,
    /// Bytes of manifest frames produced.
    pub manifest_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Input still arriving or batches unanswered.
    Streaming,
    /// `End` sent; waiting for `Done`.
    Ending,
    Done,
    Failed,
}

/// A batch that was sent and awaits its `Need`: what the receiver will index into.
#[derive(Debug)]
struct SentBatch {
    first_index: u64,
    entries: Vec<(u64, ManifestEntry)>,
}

/// The sender's state machine. Feed it spans with [`Sender::push_entry`], frames from the
/// receiver with [`Sender::handle_frame`], and drain [`Sender::poll_transmit`] (control frames)
/// and [`Sender::poll_chunk`] (chunks to send).
#[derive(Debug)]
pub struct Sender {
    config: SenderConfig,
    phase: Phase,
    stream_len: u64,
    /// Entries pushed but not yet put in a batch frame, with their source offsets.
    pending: Vec<(u64, ManifestEntry)>,
    next_index: u64,
    in_flight: VecDeque<SentBatch>,
    /// Digest of every entry pushed, with its offset, in order: what `End` carries.
    digest: ManifestDigest,
    /// The stream's total length, once the input ended.
    input_done: Option<u64>,
    welcomed: bool,
    transmit: VecDeque<Frame>,
    chunks: VecDeque<ChunkRequest>,
    /// Ids already requested in this session: a chunk is sent once per stream.
    scheduled: HashSet<ChunkId>,
    last_heard: Instant,
    stats: SenderStats,
    error: Option<ProtocolError>,
    receiver_report: Option<(u64, u64)>,
}

impl Sender {
    /// Starts a session for a stream of `stream_len` bytes; queues `Hello`.
    pub fn new(config: SenderConfig, stream_len: u64, now: Instant) -> Self {
        assert!(config.batch_entries > 0 && config.batch_entries <= MAX_BATCH_ENTRIES);
        assert!(config.max_batches_in_flight > 0);
        let mut transmit = VecDeque::new();
        transmit.push_back(Frame::Hello {
            version: VERSION,
            stream_len,
        });
        Sender {
            config,
            phase: Phase::Streaming,
            stream_len,
            pending: Vec::new(),
            next_index: 0,
            in_flight: VecDeque::new(),
            digest: ManifestDigest::new(),
            input_done: None,
            welcomed: false,
            transmit,
            chunks: VecDeque::new(),
            scheduled: HashSet::new(),
            last_heard: now,
            stats: SenderStats::default(),
            error: None,
            receiver_report: None,
        }
    }

    /// Whether the driver should push more entries now. False while the window of unanswered
    /// batches is full: that is the back-pressure that keeps memory flat.
    pub fn wants_input(&self) -> bool {
        self.phase == Phase::Streaming
            && self.input_done.is_none()
            && self.in_flight.len() < self.config.max_batches_in_flight
    }

    /// Adds the next chunk of the stream, found at `offset` of the source (the offset goes into
    /// the manifest digest: the receiver places the entry where the lengths before it end, so
    /// a gap or overlap in the offsets is refused at `End`).
    pub fn push_entry(&mut self, offset: u64, entry: ManifestEntry) {
        debug_assert!(self.input_done.is_none(), "entry pushed after finish_input");
        self.digest.push(offset, &entry);
        self.pending.push((offset, entry));
        if self.pending.len() >= self.config.batch_entries {
            self.flush_batch();
        }
    }

    /// The stream ended after `total_len` bytes. `End` follows, with the digest of the entries
    /// pushed, once every manifest batch is answered.
    pub fn finish_input(&mut self, total_len: u64) {
        self.flush_batch();
        self.input_done = Some(total_len);
        self.maybe_end();
    }

    /// The manifest digest of the entries pushed so far; final once the input ended.
    pub fn manifest_digest(&self) -> ChunkId {
        self.digest.digest()
    }

    fn flush_batch(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.pending);
        let first_index = self.next_index;
        self.next_index += entries.len() as u64;
        self.stats.chunks += entries.len() as u64;
        let frame = Frame::Manifest {
            first_index,
            entries: entries.iter().map(|(_, e)| *e).collect(),
        };
        self.stats.manifest_bytes += frame.encoded_len() as u64;
        self.transmit.push_back(frame);
        self.in_flight.push_back(SentBatch {
            first_index,
            entries,
        });
    }

    fn maybe_end(&mut self) {
        if self.phase != Phase::Streaming || !self.in_flight.is_empty() {
            return;
        }
        if let Some(total_len) = self.input_done {
            self.transmit.push_back(Frame::End {
                total_len,
                entries: self.next_index,
                manifest_digest: self.digest.digest(),
            });
            self.phase = Phase::Ending;
        }
    }

    /// Handles a frame from the receiver's control stream.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), ProtocolError> {
        if self.phase == Phase::Failed || self.phase == Phase::Done {
            return self.error.clone().map_or(Ok(()), Err);
        }
        self.last_heard = now;
        let result = self.handle_inner(frame);
        if let Err(e) = &result {
            self.fail(e.clone());
        }
        result
    }

    fn handle_inner(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        match frame {
            Frame::Welcome { version } if !self.welcomed => {
                if version != VERSION {
                    return Err(ProtocolError::Version {
                        ours: VERSION,
                        theirs: version,
                    });
                }
                self.welcomed = true;
                Ok(())
            }
            Frame::Need {
                first_index,
                count,
                needed,
            } if self.welcomed => self.handle_need(first_index, count, &needed),
            Frame::Done {
                bytes_written,
                chunks_received,
            } if self.phase == Phase::Ending => {
                if bytes_written != self.input_done.unwrap_or(0) {
                    return Err(ProtocolError::EndMismatch(format!(
                        "receiver reports {bytes_written} bytes written, the stream has {}",
                        self.stream_len
                    )));
                }
                self.receiver_report = Some((bytes_written, chunks_received));
                self.phase = Phase::Done;
                Ok(())
            }
            Frame::Abort { code, message } => Err(ProtocolError::PeerAborted { code, message }),
            other => Err(ProtocolError::UnexpectedFrame {
                frame: other.name(),
                state: self.state_name(),
            }),
        }
    }

    fn handle_need(
        &mut self,
        first_index: u64,
        count: u32,
        needed: &[u32],
    ) -> Result<(), ProtocolError> {
        let Some(batch) = self.in_flight.pop_front() else {
            return Err(ProtocolError::UnexpectedFrame {
                frame: "Need",
                state: "no manifest batch was awaiting an answer",
            });
        };
        if batch.first_index != first_index || batch.entries.len() != count as usize {
            return Err(ProtocolError::OutOfOrder {
                frame: "Need",
                expected: batch.first_index,
                got: first_index,
            });
        }
        let mut requested = 0u64;
        for &i in needed {
            let Some((offset, entry)) = batch.entries.get(i as usize) else {
                return Err(ProtocolError::BadNeed(format!(
                    "entry {i} is outside a batch of {count}"
                )));
            };
            if entry.zero {
                return Err(ProtocolError::BadNeed(format!(
                    "entry {} is a zero chunk, which is never sent",
                    first_index + i as u64
                )));
            }
            requested += 1;
            if self.scheduled.insert(entry.id) {
                self.stats.chunks_sent += 1;
                self.stats.bytes_requested += entry.len as u64;
                self.chunks.push_back(ChunkRequest {
                    id: entry.id,
                    offset: *offset,
                    len: entry.len,
                });
            }
        }
        self.stats.chunks_reused += count as u64 - requested;
        self.maybe_end();
        Ok(())
    }

    /// The next control frame to write, if any.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// The next chunk the receiver asked for, if any.
    pub fn poll_chunk(&mut self) -> Option<ChunkRequest> {
        self.chunks.pop_front()
    }

    /// When [`Sender::handle_timeout`] should be called next, if the sender waits on its peer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let waiting = match self.phase {
            Phase::Streaming => !self.in_flight.is_empty() || !self.welcomed,
            Phase::Ending => true,
            Phase::Done | Phase::Failed => false,
        };
        waiting.then(|| self.last_heard + self.config.idle_timeout)
    }

    /// Advances the clock; fails the session when the receiver has been silent too long.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout() {
            if now >= deadline {
                let waiting_for = match self.phase {
                    Phase::Ending => "the receiver to confirm the whole stream",
                    _ if !self.welcomed => "the receiver's welcome",
                    _ => "the receiver's answer to a manifest batch",
                };
                self.fail(ProtocolError::Timeout {
                    waiting_for,
                    after: self.config.idle_timeout,
                });
            }
        }
    }

    /// Stops the session for a local reason; an `Abort` is queued for the peer.
    pub fn fail(&mut self, error: ProtocolError) {
        if self.phase == Phase::Failed || self.phase == Phase::Done {
            return;
        }
        self.transmit.extend(super::abort_frame(&error));
        self.phase = Phase::Failed;
        self.chunks.clear();
        self.error = Some(error);
    }

    /// True once the receiver confirmed the whole stream.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The error that ended the session, if it failed.
    pub fn error(&self) -> Option<&ProtocolError> {
        self.error.as_ref()
    }

    /// Counters so far.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    /// What the receiver reported in `Done`: bytes written and chunks received.
    pub fn receiver_report(&self) -> Option<(u64, u64)> {
        self.receiver_report
    }

    fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Streaming if !self.welcomed => "waiting for the receiver's welcome",
            Phase::Streaming => "streaming the manifest",
            Phase::Ending => "waiting for the receiver to confirm",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}
