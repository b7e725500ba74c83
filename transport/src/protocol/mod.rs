//! The transfer protocol as two state machines, [`Sender`] and [`Receiver`], that do no IO.
//!
//! They exchange [`Frame`]s and tell their driver what to do next; the driver (see
//! [`crate::quic`]) owns the sockets, files, threads and the clock. This split, the quinn-proto
//! way, is what lets `tests.rs` run a whole transfer over a simulated, reordering and failing link
//! with a fake clock, and what keeps the quinn glue thin.
//!
//! One transfer, on one control stream plus any number of chunk streams:
//!
//! ```text
//! sender                                   receiver
//!   Hello{version, stream_len}  ─────────▶
//!   Manifest{first_index, entries} ──────▶  (answers each batch at once)
//!                               ◀─────────  Welcome{version}
//!                               ◀─────────  Need{first_index, needed}
//!   Chunk{id, ..} (chunk streams) ───────▶  verify, store, write at every offset
//!   End{total_len, entries, hash} ───────▶  when every chunk is in: check the whole-stream hash
//!                               ◀─────────  Done{bytes_written, ..} or Abort{code, message}
//! ```
//!
//! The sender keeps at most `max_batches_in_flight` manifest batches unanswered, so neither side
//! waits for the whole manifest and neither holds more than a window of it. Resume needs no
//! extra frames: a new connection starts a new pair of sessions over the same chunk store, and
//! every chunk that reached the store before the drop is simply not needed again.

mod receiver;
mod sender;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use receiver::{Receiver, ReceiverConfig, ReceiverStats, StoreCopy};
pub use sender::{ChunkRequest, Sender, SenderConfig, SenderStats};

use crate::frame::AbortCode;
use crate::ChunkId;

/// Why a transfer session stopped before it completed. Either side's error is also sent to the
/// peer as an `Abort` frame, so both ends report the same cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The peer speaks another wire version.
    #[error("peer speaks wire version {theirs}, this build speaks {ours}: run the same `migrate` version on both nodes")]
    Version {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// A frame arrived that is not allowed in the current state.
    #[error("unexpected {frame} frame while {state}: the peer does not follow the protocol")]
    UnexpectedFrame {
        /// Name of the frame.
        frame: &'static str,
        /// What this side was doing.
        state: &'static str,
    },
    /// A manifest batch or need answer did not start where the previous one ended.
    #[error("{frame} for entry {got}, expected entry {expected}: the peer skipped or repeated part of the manifest")]
    OutOfOrder {
        /// Which frame kind.
        frame: &'static str,
        /// The index this side expected.
        expected: u64,
        /// The index the peer sent.
        got: u64,
    },
    /// The manifest lists more bytes than the sender announced in `Hello`.
    #[error("manifest lists {listed} bytes but the sender announced {announced}")]
    StreamTooLong {
        /// Bytes announced in `Hello`.
        announced: u64,
        /// Bytes listed so far.
        listed: u64,
    },
    /// A `Need` names entries that were never sent or asks for a zero chunk.
    #[error("need answer is invalid: {0}")]
    BadNeed(String),
    /// A chunk arrived that the receiver did not ask for (or already has).
    #[error("chunk {0} was not requested: the peer sent data nobody asked for")]
    UnexpectedChunk(ChunkId),
    /// A chunk's declared length differs from its manifest entry.
    #[error("chunk {id} declares {frame} bytes but the manifest says {manifest}")]
    ChunkLength {
        /// The chunk.
        id: ChunkId,
        /// Length in the manifest.
        manifest: u32,
        /// Length in the chunk frame.
        frame: u32,
    },
    /// `End` disagrees with the manifest that was received.
    #[error("end of stream does not match the manifest: {0}")]
    EndMismatch(String),
    /// The reassembled stream does not hash to what the sender computed.
    #[error("whole-stream hash mismatch: sender computed {expected}, receiver wrote {actual}")]
    HashMismatch {
        /// Sender's hash.
        expected: ChunkId,
        /// Hash of what was written.
        actual: ChunkId,
    },
    /// Nothing arrived from the peer for too long.
    #[error("no progress from the peer for {after:?} while waiting for {waiting_for}: is the peer alive and reachable?")]
    Timeout {
        /// What this side was waiting for.
        waiting_for: &'static str,
        /// The idle timeout that expired.
        after: Duration,
    },
    /// The peer gave up and said why.
    #[error("peer aborted the transfer ({code:?}): {message}")]
    PeerAborted {
        /// The peer's reason code.
        code: AbortCode,
        /// The peer's message.
        message: String,
    },
    /// The driver failed locally (a bad chunk, IO, a full disk) and stopped the session.
    #[error("{message}")]
    Local {
        /// The code sent to the peer.
        code: AbortCode,
        /// What failed.
        message: String,
    },
}

/// The `Abort` frame that tells the peer why this side stopped; none for a peer that already
/// aborted (it knows why).
fn abort_frame(error: &ProtocolError) -> Option<crate::frame::Frame> {
    (!matches!(error, ProtocolError::PeerAborted { .. })).then(|| crate::frame::Frame::Abort {
        code: error.abort_code(),
        message: error.to_string(),
    })
}

impl ProtocolError {
    /// The code to send to the peer in an `Abort` frame.
    pub fn abort_code(&self) -> AbortCode {
        match self {
            ProtocolError::Version { .. } => AbortCode::Version,
            ProtocolError::HashMismatch { .. } => AbortCode::HashMismatch,
            ProtocolError::ChunkLength { .. } | ProtocolError::UnexpectedChunk(_) => {
                AbortCode::BadChunk
            }
            ProtocolError::Local { code, .. } | ProtocolError::PeerAborted { code, .. } => *code,
            ProtocolError::Timeout { .. } => AbortCode::Cancelled,
            _ => AbortCode::Protocol,
        }
    }
}
