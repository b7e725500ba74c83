//! What an earlier output holds, so that a transfer built over it writes only what differs.
//!
//! A migration's rounds send nearly the same bytes: a pre-copy round's output is mostly the
//! final checkpoint's memory pages, at the same offsets. The destination builds the next
//! round's file over the last one (see [`crate::sink`]), and a receiver told what that file
//! holds ([`Held`], from the earlier round's manifest) treats every manifest entry that lies
//! where the same chunk already lies as written: it neither asks for it nor copies it from the
//! store, and those bytes are never touched. The bytes were verified against their id when the
//! earlier round received them, and the earlier file is private to its receiver since.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{ChunkId, ManifestEntry};

/// The non-zero chunks of a file, by the offset each lies at: an earlier round's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    path: PathBuf,
    chunks: HashMap<u64, (ChunkId, u32)>,
}

impl Held {
    /// Nothing held yet, in the file that will be at `path`.
    pub fn new(path: &Path) -> Held {
        Held {
            path: path.to_path_buf(),
            chunks: HashMap::new(),
        }
    }

    /// The file these chunks lie in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that `entry` lies at `offset` of the file; zero entries are not recorded (a
    /// file built over this one has its zero runs punched out anyway).
    pub fn push(&mut self, offset: u64, entry: &ManifestEntry) {
        if !entry.zero {
            self.chunks.insert(offset, (entry.id, entry.len));
        }
    }

    /// Non-zero chunks recorded.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// True when no chunk is recorded.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Whether `entry` lies at `offset` of the file.
    fn holds(&self, offset: u64, entry: &ManifestEntry) -> bool {
        self.chunks.get(&offset) == Some(&(entry.id, entry.len))
    }
}

/// A range of the stream written into a file built over a [`Held`] one: the stream's bytes at
/// `start..start + len` (to the end when `len` is `None`) land at the file's offsets `0..`.
#[derive(Debug, Clone)]
pub struct InPlace {
    /// The range's first byte in the stream.
    pub start: u64,
    /// The range's length; `None`: to the end of the stream.
    pub len: Option<u64>,
    /// What the file held before this transfer.
    pub held: Arc<Held>,
}

impl InPlace {
    /// Whether the non-zero `entry`, at stream offset `offset`, is already in place: wholly
    /// inside the range, and the same chunk lies at the same offset of the file.
    pub fn holds(&self, offset: u64, entry: &ManifestEntry) -> bool {
        let Some(at) = offset.checked_sub(self.start) else {
            return false;
        };
        let end = at + u64::from(entry.len);
        if self.len.is_some_and(|len| end > len) {
            return false;
        }
        self.held.holds(at, entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(byte: u8, len: u32) -> ManifestEntry {
        ManifestEntry::filled(byte, len)
    }

    #[test]
    fn an_entry_is_in_place_only_where_the_same_chunk_lies() {
        let mut held = Held::new(Path::new("old"));
        held.push(0, &entry(1, 100));
        held.push(100, &entry(0, 50));
        held.push(150, &entry(2, 100));
        assert_eq!(held.len(), 2, "zero entries are not recorded");
        let whole = InPlace {
            start: 0,
            len: None,
            held: Arc::new(held.clone()),
        };
        assert!(whole.holds(0, &entry(1, 100)));
        assert!(whole.holds(150, &entry(2, 100)));
        assert!(!whole.holds(100, &entry(1, 100)), "another offset");
        assert!(!whole.holds(150, &entry(1, 100)), "another chunk");
        assert!(!whole.holds(100, &entry(0, 50)), "zeros are never held");

        // The file takes the stream from byte 1000 on, 200 bytes of it.
        let piece = InPlace {
            start: 1000,
            len: Some(200),
            held: Arc::new(held),
        };
        assert!(piece.holds(1000, &entry(1, 100)));
        assert!(!piece.holds(0, &entry(1, 100)), "before the range");
        assert!(
            !piece.holds(1150, &entry(2, 100)),
            "runs past the range's end"
        );
    }
}
