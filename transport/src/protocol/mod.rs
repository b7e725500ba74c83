//! The transfer protocol as two state machines, [`Sender`] and [`Receiver`], that do no IO.
//!
//! They exchange [`Frame`](crate::frame::Frame)s and tell their driver what to do next; the
//! driver (see [`crate::quic`]) owns the sockets, files, threads and the clock. This split, the
//! quinn-proto way, is what lets `tests.rs` run a whole transfer over a simulated, reordering
//! and failing link with a fake clock, and what keeps the quinn glue thin.
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
//!   End{total_len, entries, digest} ─────▶  check the manifest digest at once, then wait for
//!                                           the last chunks and writes
//!                               ◀─────────  Done{bytes_written, ..} or Abort{code, message}
//! ```
//!
//! ## What `Done` vouches for
//!
//! Nothing hashes the whole stream (wire version 1 did, twice: the sender over every byte
//! beside the chunk ids, the receiver by reading its output back). Instead, each byte the
//! receiver's driver writes has been checked against its manifest entry, and the manifest
//! itself against the sender's:
//! - a received chunk is decoded into at most its declared length and hashed against its id
//!   before it is stored or written ([`crate::codec::decode_verified`]); its length was checked
//!   against the manifest when it was admitted ([`Receiver::accept_chunk`]);
//! - a chunk copied from the store is decoded and hashed against its id as it is read
//!   ([`crate::store::DiskStore::get`]; a corrupt record reads as missing and fails the
//!   transfer), and its length checked against the manifest by the driver;
//! - a zero entry is never written (the output is created empty, so it reads back as zeros),
//!   and its id must be the hash of that many zero bytes ([`ProtocolError::BadZeroEntry`]), so
//!   the sender cannot flag other data as zeros;
//! - an entry found in place ([`InPlace`]) is not written: the same chunk lies at the same
//!   offset of the file the output is built over, verified when an earlier round wrote it;
//! - both sides compute the [`crate::ManifestDigest`] of the manifest, the sender over the
//!   entries it chunked with their source offsets, the receiver over the entries it placed
//!   with their output offsets; the receiver refuses an `End` whose digest differs
//!   ([`ProtocolError::ManifestMismatch`]), so entries lost, reordered, altered or placed
//!   elsewhere are caught;
//! - the driver counts the bytes it wrote from chunks and [`Receiver::finish`] refuses a
//!   count other than the manifest's non-zero bytes ([`ProtocolError::Incomplete`]): a write
//!   that went missing is caught without reading the output back.
//!
//! The sender keeps at most `max_batches_in_flight` manifest batches unanswered, so neither side
//! waits for the whole manifest and neither holds more than a window of it. Resume needs no
//! extra frames: a new connection starts a new pair of sessions over the same chunk store, and
//! every chunk that reached the store before the drop is simply not needed again.

pub mod held;
mod receiver;
mod sender;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use held::{Held, InPlace};
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
    /// The manifest the receiver assembled the stream from does not have the digest the
    /// sender computed over the manifest it meant.
    #[error(
        "manifest digest mismatch: the sender's manifest digest is {expected}, the manifest the \
         receiver assembled has {actual}; entries were lost, reordered or altered between the two \
         ends, so the output is refused"
    )]
    ManifestMismatch {
        /// The sender's digest, from `End`.
        expected: ChunkId,
        /// The digest of the entries the receiver placed.
        actual: ChunkId,
    },
    /// A manifest entry is flagged all-zero but its id is not the hash of that many zeros.
    #[error(
        "manifest entry {index} is flagged all-zero but its id {id} is not the blake3 of {len} \
         zero bytes: the sender's manifest is wrong"
    )]
    BadZeroEntry {
        /// Stream index of the entry.
        index: u64,
        /// Its length.
        len: u32,
        /// The id it carries.
        id: ChunkId,
    },
    /// The receiver's driver wrote fewer (or more) chunk bytes than the manifest places.
    #[error(
        "the receiver wrote {written} bytes of chunk data but the manifest places {expected}: a \
         write went missing, so the output is refused"
    )]
    Incomplete {
        /// Bytes of the manifest's non-zero entries, each occurrence counted.
        expected: u64,
        /// Bytes the driver reported written.
        written: u64,
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
            ProtocolError::ManifestMismatch { .. } => AbortCode::HashMismatch,
            ProtocolError::Incomplete { .. } => AbortCode::Io,
            ProtocolError::ChunkLength { .. } | ProtocolError::UnexpectedChunk(_) => {
                AbortCode::BadChunk
            }
            ProtocolError::Local { code, .. } | ProtocolError::PeerAborted { code, .. } => *code,
            ProtocolError::Timeout { .. } => AbortCode::Cancelled,
            _ => AbortCode::Protocol,
        }
    }
}
