//! Moves a checkpoint archive from one node to another, sending each distinct chunk once, ever.
//!
//! Layout, from the bytes up:
//! - [`id`]: chunk ids (blake3 of the raw bytes), manifest entries and the manifest digest
//!   that names a whole stream by its entries.
//! - [`chunker`]: content-defined chunking (FastCDC) of a file into manifest entries.
//! - [`codec`]: per-chunk zstd compression and the verification of a received chunk.
//! - [`store`]: the on-disk, content-addressed chunk store kept across transfers.
//! - [`frame`]: the versioned, length-bounded wire format.
//! - [`protocol`]: the sender and receiver state machines. They do no IO and take `now`
//!   explicitly, so tests drive them over a simulated link with a fake clock.
//! - [`source`]: what a sender reads: one file, or several read back to back as one stream.
//! - [`sink`]: what a receiver writes: the output, with some ranges in files of their own.
//! - [`tls`]: the cluster CA, node certificates and the mutual-TLS configurations.
//! - [`quic`]: the thin quinn driver that runs the state machines over one connection.

pub mod chunker;
pub mod codec;
pub mod frame;
pub mod id;
pub mod ingest;
pub mod protocol;
pub mod quic;
pub mod sink;
pub mod source;
pub mod store;
pub mod tls;

pub use id::{ChunkId, ManifestDigest, ManifestEntry};

/// Smallest chunk FastCDC cuts (except the last one of a stream).
pub const MIN_CHUNK_LEN: u32 = 16 * 1024;
/// Target average chunk length.
pub const AVG_CHUNK_LEN: u32 = 64 * 1024;
/// Largest chunk; also the bound on a chunk's decompressed size on the receiver.
pub const MAX_CHUNK_LEN: u32 = 256 * 1024;
