//! Content addresses, manifest entries and the manifest digest: the small value types every
//! other module speaks.
//!
//! A chunk is named by the blake3 hash of its raw (uncompressed) bytes. A manifest entry is one
//! chunk's place in a stream: its id, its length, and whether it is all zeros (such chunks are
//! never stored nor sent; the receiver writes zeros).
//!
//! ## The manifest digest
//!
//! [`ManifestDigest`] names a whole stream by its manifest rather than by its bytes: both ends
//! of a transfer compute it, the sender over the entries it chunked (with their offsets in the
//! source), the receiver over the entries it assembled the output from (with the offsets it
//! wrote them at), and the receiver refuses the stream when they differ. Since every byte the
//! receiver writes is checked against its entry's id (received chunks before they are stored,
//! stored chunks when read back, zero chunks by their id being the hash of that many zeros),
//! an equal digest means the output holds exactly the bytes the sender chunked, in place,
//! without hashing the stream a second time on either side.
//!
//! Encoding, exactly (version 1 of the digest, used by wire version 2):
//! - blake3 in key-derivation mode with the context string [`MANIFEST_DIGEST_CONTEXT`]
//!   (`"migrate transport manifest digest v1"`), i.e. `blake3::derive_key(CONTEXT, input)`
//!   with a 32-byte output;
//! - `input` is the concatenation, in stream order (entry 0 first), of one 45-byte record per
//!   manifest entry: `offset` (`u64`, little-endian: where the entry's first byte is in the
//!   stream), `len` (`u32`, little-endian), `id` (the 32 bytes of the [`ChunkId`]), `flags`
//!   (`u8`: `0x01` for an all-zero chunk, `0x00` otherwise, as in a `Manifest` frame);
//! - nothing else: no header, count or trailer. The records are of fixed size, so the input
//!   determines the entry list and the entry list determines the input. An empty stream's
//!   digest is the digest of the empty input.

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

/// The key-derivation context of [`ManifestDigest`]: it keeps the digest apart from any other
/// blake3 hash of the same bytes (a chunk id, say). Changing it changes every digest, so it is
/// part of the wire format.
pub const MANIFEST_DIGEST_CONTEXT: &str = "migrate transport manifest digest v1";

/// Length of one entry's record in the digest's input: offset, len, id, flags.
pub const MANIFEST_DIGEST_RECORD_LEN: usize = 8 + 4 + 32 + 1;

/// The manifest digest of a stream, computed entry by entry; see the
/// [module documentation](self) for the exact encoding.
#[derive(Clone)]
pub struct ManifestDigest {
    hasher: blake3::Hasher,
    entries: u64,
}

impl ManifestDigest {
    /// The digest of no entries yet.
    pub fn new() -> Self {
        ManifestDigest {
            hasher: blake3::Hasher::new_derive_key(MANIFEST_DIGEST_CONTEXT),
            entries: 0,
        }
    }

    /// Appends the next entry of the stream, found at `offset`.
    pub fn push(&mut self, offset: u64, entry: &ManifestEntry) {
        self.hasher.update(&Self::record(offset, entry));
        self.entries += 1;
    }

    /// The 45-byte record of one entry, as hashed.
    pub fn record(offset: u64, entry: &ManifestEntry) -> [u8; MANIFEST_DIGEST_RECORD_LEN] {
        let mut record = [0u8; MANIFEST_DIGEST_RECORD_LEN];
        record[..8].copy_from_slice(&offset.to_le_bytes());
        record[8..12].copy_from_slice(&entry.len.to_le_bytes());
        record[12..44].copy_from_slice(&entry.id.0);
        record[44] = u8::from(entry.zero);
        record
    }

    /// Entries pushed so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The digest of the entries pushed so far (more may be pushed afterwards).
    pub fn digest(&self) -> ChunkId {
        ChunkId(*self.hasher.finalize().as_bytes())
    }
}

impl Default for ManifestDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ManifestDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManifestDigest")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
impl ManifestEntry {
    /// For tests: the entry of `len` bytes equal to `byte` (a zero entry when `byte` is 0).
    pub(crate) fn filled(byte: u8, len: u32) -> ManifestEntry {
        ManifestEntry {
            id: ChunkId::of(&vec![byte; len as usize]),
            len,
            zero: byte == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(byte: u8, len: u32) -> ManifestEntry {
        ManifestEntry::filled(byte, len)
    }

    #[test]
    fn digest_is_derive_key_over_fixed_records() {
        let (a, z) = (entry(7, 100), entry(0, 50));
        let mut d = ManifestDigest::new();
        d.push(0, &a);
        d.push(100, &z);
        // The documented encoding, spelled out byte by byte.
        let mut input = Vec::new();
        for (offset, e, flags) in [(0u64, &a, 0u8), (100, &z, 1)] {
            input.extend_from_slice(&offset.to_le_bytes());
            input.extend_from_slice(&e.len.to_le_bytes());
            input.extend_from_slice(&e.id.0);
            input.push(flags);
        }
        assert_eq!(input.len(), 2 * MANIFEST_DIGEST_RECORD_LEN);
        assert_eq!(
            d.digest(),
            ChunkId(blake3::derive_key(MANIFEST_DIGEST_CONTEXT, &input))
        );
        assert_eq!(d.entries(), 2);
        assert_eq!(
            ManifestDigest::new().digest(),
            ChunkId(blake3::derive_key(MANIFEST_DIGEST_CONTEXT, &[]))
        );
    }

    #[test]
    fn every_field_and_the_order_count() {
        let (a, b) = (entry(1, 100), entry(2, 100));
        let digest = |entries: &[(u64, ManifestEntry)]| {
            let mut d = ManifestDigest::new();
            for (offset, e) in entries {
                d.push(*offset, e);
            }
            d.digest()
        };
        let base = digest(&[(0, a), (100, b)]);
        let variants = [
            digest(&[(0, b), (100, a)]),
            digest(&[(0, a), (101, b)]),
            digest(&[(0, a), (100, ManifestEntry { len: 99, ..b })]),
            digest(&[(0, a), (100, ManifestEntry { zero: true, ..b })]),
            digest(&[(0, a), (100, ManifestEntry { id: a.id, ..b })]),
            digest(&[(0, a)]),
            digest(&[(0, a), (100, b), (200, b)]),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i} has the same digest");
        }
        assert_eq!(digest(&[(0, a), (100, b)]), base);
        // Not a plain hash of the records: the context keeps it apart from chunk ids.
        let mut plain = ManifestDigest::record(0, &a).to_vec();
        plain.extend_from_slice(&ManifestDigest::record(100, &b));
        assert_ne!(ChunkId::of(&plain), base);
    }
}
