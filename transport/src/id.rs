//! Content addresses and manifest entries: the small value types every other module speaks.
//!
//! A chunk is named by the blake3 hash of its raw (uncompressed) bytes. A manifest entry is one
//! chunk's place in a stream: its id, its length, and whether it is all zeros (such chunks are
//! never stored nor sent; the receiver writes zeros).

use std::fmt;

/// The blake3 hash of a chunk's raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hashes `data` to its content address.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, 64 characters: the form used for file names and logs.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses the 64-character hex form; `None` for anything else.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s)
            .ok()
            .map(|h| ChunkId(*h.as_bytes()))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

/// One chunk's place in a stream, as listed in the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Content address of the raw bytes.
    pub id: ChunkId,
    /// Raw length in bytes; never more than [`crate::MAX_CHUNK_LEN`].
    pub len: u32,
    /// The chunk is all zero bytes: it costs only its manifest entry.
    pub zero: bool,
}
