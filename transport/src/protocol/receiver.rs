//! The receiving side of one transfer session: answers each manifest batch with what it lacks,
//! admits only the chunks it asked for, tells its driver where every chunk goes in the output,
//! digests the manifest as it places its entries, refuses an `End` whose manifest digest
//! differs, and confirms the stream once its driver has written every chunk byte.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::{Held, InPlace, ProtocolError};
use crate::frame::{Frame, VERSION};
use crate::{ChunkId, ManifestDigest, ManifestEntry, MAX_CHUNK_LEN};

/// Zero bytes to hash a zero entry's expected id from.
static ZEROS: [u8; MAX_CHUNK_LEN as usize] = [0; MAX_CHUNK_LEN as usize];
/// Most zero-entry lengths whose id is remembered; real streams use a handful.
const MAX_ZERO_IDS: usize = 4096;

/// Tuning for a [`Receiver`].
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Give up when the sender says nothing for this long while we wait on it.
    pub idle_timeout: Duration,
    /// Most chunks requested and not yet arrived; a sender that outruns this is refused. The
    /// sender's window (batches in flight × entries per batch) stays well below it.
    pub max_pending: usize,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            idle_timeout: Duration::from_secs(30),
            max_pending: 64 * 1024,
        }
    }
}

/// A chunk already in the store that must be copied into the output at `offsets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCopy {
    /// The chunk.
    pub id: ChunkId,
    /// Its raw length.
    pub len: u32,
    /// Output offsets to write it at.
    pub offsets: Vec<u64>,
}

/// What a session received, for the caller's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Manifest entries.
    pub chunks: u64,
    /// Chunks that came over the wire.
    pub chunks_received: u64,
    /// Entries served from the store, from zeros, or found in place.
    pub chunks_reused: u64,
    /// Entries found in place in a file the output is built over (see [`InPlace`]).
    pub chunks_in_place: u64,
    /// Their bytes, each occurrence counted.
    pub bytes_in_place: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Streaming,
    /// `End` received and its manifest digest checked; chunks may still be arriving.
    Ending,
    /// Every chunk is in; the driver finishes its writes, sizes the output and calls `finish`.
    Finishing,
    Done,
    Failed,
}

/// A chunk asked for and not yet arrived.
#[derive(Debug)]
struct Pending {
    len: u32,
    offsets: Vec<u64>,
    /// A frame for it is being verified; a second copy would be a protocol error.
    arriving: bool,
}

/// The receiver's state machine. Feed it control frames with [`Receiver::handle_frame`] and
/// chunk headers with [`Receiver::accept_chunk`]; drain [`Receiver::poll_transmit`] and
/// [`Receiver::poll_copy`]; call [`Receiver::finish`] once [`Receiver::ready_to_finish`].
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    phase: Phase,
    stream_len: u64,
    listed: u64,
    next_index: u64,
    pending: HashMap<ChunkId, Pending>,
    /// Chunks stored during this session (the store's index may also say so; this avoids
    /// asking it while a put is still in flight).
    received: HashSet<ChunkId>,
    /// The total length from `End`, once it arrived and checked.
    end: Option<u64>,
    /// Digest of the entries placed so far, each with the offset it was placed at.
    digest: ManifestDigest,
    /// Bytes of non-zero entries placed (each occurrence) and not found in place: what the
    /// driver must write.
    data_bytes: u64,
    /// The id of `len` zero bytes, by `len`, for the zero entries seen.
    zero_ids: HashMap<u32, ChunkId>,
    transmit: VecDeque<Frame>,
    copies: VecDeque<StoreCopy>,
    last_heard: Instant,
    stats: ReceiverStats,
    error: Option<ProtocolError>,
    /// Where entries may already lie in the output, if it is built over a known file.
    in_place: Option<InPlace>,
    /// The output's chunks by offset, when the caller wants them kept.
    held: Option<Held>,
}

impl Receiver {
    /// Starts a session that waits for `Hello`.
    pub fn new(config: ReceiverConfig, now: Instant) -> Self {
        Receiver {
            config,
            phase: Phase::AwaitHello,
            stream_len: 0,
            listed: 0,
            next_index: 0,
            pending: HashMap::new(),
            received: HashSet::new(),
            end: None,
            digest: ManifestDigest::new(),
            data_bytes: 0,
            zero_ids: HashMap::new(),
            transmit: VecDeque::new(),
            copies: VecDeque::new(),
            last_heard: now,
            stats: ReceiverStats::default(),
            error: None,
            in_place: None,
            held: None,
        }
    }

    /// The output is built over a file whose chunks are known: entries found in place there
    /// are neither asked for nor copied (see [`super::held`]).
    pub fn with_in_place(mut self, in_place: Option<InPlace>) -> Self {
        self.in_place = in_place;
        self
    }

    /// Keeps the output's chunks by offset as they are listed, for [`Receiver::take_held`]:
    /// a later transfer built over the output (at `path`) then writes only what differs.
    pub fn keeping_held(mut self, path: Option<&std::path::Path>) -> Self {
        self.held = path.map(Held::new);
        self
    }

    /// The chunks of the output, once [`Receiver::finish`] succeeded and if they were kept.
    pub fn take_held(&mut self) -> Option<Held> {
        match self.phase {
            Phase::Done => self.held.take(),
            _ => None,
        }
    }

    /// Handles a frame from the sender's control stream. `has` answers whether the chunk store
    /// already holds a chunk.
    pub fn handle_frame(
        &mut self,
        frame: Frame,
        has: &dyn Fn(&ChunkId) -> bool,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.last_heard = now;
        let result = self.handle_inner(frame, has);
        if let Err(e) = &result {
            self.fail(e.clone());
        }
        result
    }

    fn handle_inner(
        &mut self,
        frame: Frame,
        has: &dyn Fn(&ChunkId) -> bool,
    ) -> Result<(), ProtocolError> {
        match (self.phase, frame) {
            (
                Phase::AwaitHello,
                Frame::Hello {
                    version,
                    stream_len,
                },
            ) => {
                if version != VERSION {
                    return Err(ProtocolError::Version {
                        ours: VERSION,
                        theirs: version,
                    });
                }
                self.stream_len = stream_len;
                self.transmit.push_back(Frame::Welcome { version: VERSION });
                self.phase = Phase::Streaming;
                Ok(())
            }
            (
                Phase::Streaming,
                Frame::Manifest {
                    first_index,
                    entries,
                },
            ) => self.handle_manifest(first_index, &entries, has),
            (
                Phase::Streaming,
                Frame::End {
                    total_len,
                    entries,
                    manifest_digest,
                },
            ) => {
                if entries != self.next_index {
                    return Err(ProtocolError::EndMismatch(format!(
                        "end says {entries} entries, the manifest had {}",
                        self.next_index
                    )));
                }
                if total_len != self.listed || total_len != self.stream_len {
                    return Err(ProtocolError::EndMismatch(format!(
                        "end says {total_len} bytes, the manifest listed {} and hello announced {}",
                        self.listed, self.stream_len
                    )));
                }
                let actual = self.digest.digest();
                if manifest_digest != actual {
                    return Err(ProtocolError::ManifestMismatch {
                        expected: manifest_digest,
                        actual,
                    });
                }
                self.end = Some(total_len);
                self.phase = Phase::Ending;
                self.maybe_finishing();
                Ok(())
            }
            (_, Frame::Abort { code, message }) => {
                Err(ProtocolError::PeerAborted { code, message })
            }
            (_, other) => Err(ProtocolError::UnexpectedFrame {
                frame: other.name(),
                state: self.state_name(),
            }),
        }
    }

    fn handle_manifest(
        &mut self,
        first_index: u64,
        entries: &[ManifestEntry],
        has: &dyn Fn(&ChunkId) -> bool,
    ) -> Result<(), ProtocolError> {
        if first_index != self.next_index {
            return Err(ProtocolError::OutOfOrder {
                frame: "Manifest",
                expected: self.next_index,
                got: first_index,
            });
        }
        let mut needed = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let offset = self.listed;
            self.listed += entry.len as u64;
            if self.listed > self.stream_len {
                return Err(ProtocolError::StreamTooLong {
                    announced: self.stream_len,
                    listed: self.listed,
                });
            }
            self.digest.push(offset, entry);
            if let Some(held) = &mut self.held {
                held.push(offset, entry);
            }
            if entry.zero {
                // The output is created empty and sized at the end: zeros cost nothing. The
                // zeros it reads back are this entry's bytes only if its id says so.
                if entry.id != self.zero_id(entry.len) {
                    return Err(ProtocolError::BadZeroEntry {
                        index: first_index + i as u64,
                        len: entry.len,
                        id: entry.id,
                    });
                }
                self.stats.chunks_reused += 1;
                continue;
            }
            if self
                .in_place
                .as_ref()
                .is_some_and(|p| p.holds(offset, entry))
            {
                self.stats.chunks_reused += 1;
                self.stats.chunks_in_place += 1;
                self.stats.bytes_in_place += u64::from(entry.len);
                continue;
            }
            self.data_bytes += u64::from(entry.len);
            if let Some(p) = self.pending.get_mut(&entry.id) {
                if p.len != entry.len {
                    return Err(ProtocolError::ChunkLength {
                        id: entry.id,
                        manifest: p.len,
                        frame: entry.len,
                    });
                }
                p.offsets.push(offset);
                self.stats.chunks_reused += 1;
            } else if self.received.contains(&entry.id) || has(&entry.id) {
                self.push_copy(entry, offset);
                self.stats.chunks_reused += 1;
            } else {
                if self.pending.len() >= self.config.max_pending {
                    return Err(ProtocolError::BadNeed(format!(
                        "more than {} chunks outstanding: the sender ignores the window",
                        self.config.max_pending
                    )));
                }
                self.pending.insert(
                    entry.id,
                    Pending {
                        len: entry.len,
                        offsets: vec![offset],
                        arriving: false,
                    },
                );
                needed.push(i as u32);
            }
        }
        self.stats.chunks += entries.len() as u64;
        self.next_index += entries.len() as u64;
        self.transmit.push_back(Frame::Need {
            first_index,
            count: entries.len() as u32,
            needed,
        });
        Ok(())
    }

    /// The id of `len` zero bytes.
    fn zero_id(&mut self, len: u32) -> ChunkId {
        if let Some(id) = self.zero_ids.get(&len) {
            return *id;
        }
        // The frame decoder bounds a manifest entry's length to MAX_CHUNK_LEN.
        let id = ChunkId::of(&ZEROS[..(len as usize).min(ZEROS.len())]);
        if self.zero_ids.len() < MAX_ZERO_IDS {
            self.zero_ids.insert(len, id);
        }
        id
    }

    /// Queues a copy from the store, merging with the previous one for runs of the same chunk.
    fn push_copy(&mut self, entry: &ManifestEntry, offset: u64) {
        if let Some(last) = self.copies.back_mut() {
            if last.id == entry.id && last.len == entry.len {
                last.offsets.push(offset);
                return;
            }
        }
        self.copies.push_back(StoreCopy {
            id: entry.id,
            len: entry.len,
            offsets: vec![offset],
        });
    }

    /// A `Chunk` frame's header arrived on a chunk stream. Admits it when it was asked for and
    /// matches its manifest length; the driver then verifies and stores it and calls
    /// [`Receiver::chunk_stored`].
    pub fn accept_chunk(
        &mut self,
        id: &ChunkId,
        raw_len: u32,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.last_heard = now;
        let result = match self.pending.get_mut(id) {
            Some(p) if !p.arriving && p.len == raw_len => {
                p.arriving = true;
                Ok(())
            }
            Some(p) if !p.arriving => Err(ProtocolError::ChunkLength {
                id: *id,
                manifest: p.len,
                frame: raw_len,
            }),
            _ => Err(ProtocolError::UnexpectedChunk(*id)),
        };
        if let Err(e) = &result {
            self.fail(e.clone());
        }
        result
    }

    /// The chunk passed verification and is in the store. Returns the output offsets to write
    /// its raw bytes at.
    pub fn chunk_stored(&mut self, id: &ChunkId) -> Vec<u64> {
        let Some(p) = self.pending.remove(id) else {
            return Vec::new();
        };
        self.received.insert(*id);
        self.stats.chunks_received += 1;
        self.maybe_finishing();
        p.offsets
    }

    fn maybe_finishing(&mut self) {
        if self.phase == Phase::Ending && self.pending.is_empty() {
            self.phase = Phase::Finishing;
        }
    }

    /// True once `End` arrived (its manifest digest checked) and every chunk is in: the driver
    /// should drain its writes and copies, size the output to [`Receiver::total_len`] (zero
    /// entries were never written) and call [`Receiver::finish`].
    pub fn ready_to_finish(&self) -> bool {
        self.phase == Phase::Finishing
    }

    /// The total length from `End`, once known.
    pub fn total_len(&self) -> Option<u64> {
        self.end
    }

    /// Bytes of the non-zero entries placed so far, each occurrence counted: once
    /// [`Receiver::ready_to_finish`], what the driver must have written from chunks.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// The driver has written every chunk at every offset it was given, `written` bytes in
    /// all, and sized the output. Queues `Done`, or fails with [`ProtocolError::Incomplete`]
    /// when `written` is not the manifest's non-zero bytes.
    pub fn finish(&mut self, written: u64) -> Result<(), ProtocolError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let Some(total_len) = self.end.filter(|_| self.phase == Phase::Finishing) else {
            return Err(ProtocolError::UnexpectedFrame {
                frame: "finish",
                state: self.state_name(),
            });
        };
        if written != self.data_bytes {
            let e = ProtocolError::Incomplete {
                expected: self.data_bytes,
                written,
            };
            self.fail(e.clone());
            return Err(e);
        }
        self.transmit.push_back(Frame::Done {
            bytes_written: total_len,
            chunks_received: self.stats.chunks_received,
        });
        self.phase = Phase::Done;
        Ok(())
    }

    /// The next control frame to write, if any.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// The next copy from the store into the output, if any.
    pub fn poll_copy(&mut self) -> Option<StoreCopy> {
        self.copies.pop_front()
    }

    /// Copies queued and not yet taken with [`Receiver::poll_copy`].
    pub fn copies_queued(&self) -> usize {
        self.copies.len()
    }

    /// When [`Receiver::handle_timeout`] should be called next, if the receiver waits on its peer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        matches!(
            self.phase,
            Phase::AwaitHello | Phase::Streaming | Phase::Ending
        )
        .then(|| self.last_heard + self.config.idle_timeout)
    }

    /// Advances the clock; fails the session when the sender has been silent too long.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout() {
            if now >= deadline {
                let waiting_for = match self.phase {
                    Phase::AwaitHello => "the sender's hello",
                    Phase::Ending => "the chunks it asked for",
                    _ => "the manifest or chunks",
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
        if matches!(self.phase, Phase::Failed | Phase::Done) {
            return;
        }
        self.transmit.extend(super::abort_frame(&error));
        self.phase = Phase::Failed;
        self.copies.clear();
        self.error = Some(error);
    }

    /// True once `Done` is queued.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The error that ended the session, if it failed.
    pub fn error(&self) -> Option<&ProtocolError> {
        self.error.as_ref()
    }

    /// Counters so far.
    pub fn stats(&self) -> ReceiverStats {
        self.stats
    }

    /// Bytes announced by the sender's `Hello` (0 before it).
    pub fn stream_len(&self) -> u64 {
        self.stream_len
    }

    fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::AwaitHello => "waiting for hello",
            Phase::Streaming => "receiving the manifest",
            Phase::Ending => "waiting for the last chunks",
            Phase::Finishing => "finishing the output",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}
