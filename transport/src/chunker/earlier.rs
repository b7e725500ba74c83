//! Cuts made in an earlier version of a file, taken again where its bytes have not changed.
//!
//! A migration's final checkpoint holds nearly the same memory pages as its pre-copy
//! checkpoint, at the same places in their files. Cutting and hashing those bytes again costs
//! most of a core-second per GiB while the container is frozen. So the cutting of the pre-copy
//! round records, for every cut it makes, a [`fingerprint`] of the bytes FastCDC read to make
//! it: the chunk and the byte after it (that byte's hash triggers the cut; a maximal chunk has
//! no such byte). Given those cuts for some files of the next stream ([`EarlierFile`]),
//! [`Earlier::reuse`] fingerprints the same bytes at a chunk start where the file had a cut
//! before; when the fingerprints agree, and both cuts had a maximal chunk's worth of stream in
//! front of them (so they had the same bounds), the cut is the earlier one: same length, id
//! and zero flag, exactly what cutting would find. Anything else is cut as usual, so the cuts
//! are the sequential chunker's, whatever the earlier cuts were, barring a collision of
//! fingerprints.
//!
//! The fingerprint is XXH3-128 keyed with a secret drawn from the kernel at random for each
//! process, the way rsync tells unchanged blocks with XXH128: four times blake3's speed on the
//! project's machine (14.8 against 3.5 GB/s on one core). A chunk would be taken for unchanged
//! only if its new bytes collided with its old ones under a 128-bit key they cannot know: the
//! bytes are a container's own memory. Every chunk that is sent is still checked by the
//! receiver against its blake3 id.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use xxhash_rust::xxh3::xxh3_128_with_secret;

use crate::{ManifestEntry, MAX_CHUNK_LEN};

/// Bytes of the fingerprint's secret (XXH3 needs at least 136).
const SECRET_LEN: usize = 192;

/// A cut and the fingerprint of the bytes that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlierCut {
    /// Where the chunk starts: a stream offset as recorded, an offset in its file in an
    /// [`EarlierFile`].
    pub offset: u64,
    /// The chunk as cut.
    pub entry: ManifestEntry,
    /// [`fingerprint`] of the chunk's bytes and, unless it is maximal, the byte after them.
    pub fingerprint: u128,
}

/// One file of a stream and the cuts made in it when it was sent before.
#[derive(Debug, Clone)]
pub struct EarlierFile {
    /// The file as the stream holds it now (a path of the stream's files, as given).
    pub current: PathBuf,
    /// The cuts made in it before, by offset in the file, in order.
    pub cuts: Vec<EarlierCut>,
}

/// The process's fingerprint of `bytes` (see the module documentation).
pub fn fingerprint(bytes: &[u8]) -> u128 {
    xxh3_128_with_secret(bytes, secret())
}

/// The fingerprints' secret, read from `/dev/urandom` once per process.
fn secret() -> &'static [u8] {
    static SECRET: OnceLock<[u8; SECRET_LEN]> = OnceLock::new();
    SECRET.get_or_init(|| {
        let mut secret = [0u8; SECRET_LEN];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut secret))
            .expect("reading /dev/urandom for the chunk fingerprints' secret");
        secret
    })
}

/// How many bytes from a chunk's start its cut depended on, when the window it was cut from
/// (the stream from there) held at least a maximal chunk; `None` otherwise.
fn cut_span(entry: &ManifestEntry, window: &[u8]) -> Option<usize> {
    if window.len() < MAX_CHUNK_LEN as usize {
        return None;
    }
    Some(match entry.len < MAX_CHUNK_LEN {
        true => entry.len as usize + 1,
        false => entry.len as usize,
    })
}

/// The cut of a chunk at `offset` as [`Earlier::reuse`] can take it again, when it can.
pub(crate) fn record(offset: u64, entry: ManifestEntry, window: &[u8]) -> Option<EarlierCut> {
    let span = cut_span(&entry, window)?;
    Some(EarlierCut {
        offset,
        entry,
        fingerprint: fingerprint(&window[..span]),
    })
}

/// The cuts one stream's cutting made, for the next stream over the same files.
#[derive(Debug, Default)]
pub struct Recorded {
    cuts: Mutex<Vec<EarlierCut>>,
}

impl Recorded {
    /// Adds cuts made by one thread (in any order; a cut may come twice).
    pub(crate) fn add(&self, cuts: &mut Vec<EarlierCut>) {
        self.cuts.lock().expect("recorded cuts lock").append(cuts);
    }

    /// Every cut recorded, by stream offset, each once. Cuts a thread made from a position
    /// the stream's true cuts did not pass through are among them: they are as true as any
    /// (a cut depends only on the bytes from where it starts).
    pub fn take(&self) -> Vec<EarlierCut> {
        let mut cuts = std::mem::take(&mut *self.cuts.lock().expect("recorded cuts lock"));
        cuts.sort_unstable_by_key(|c| c.offset);
        cuts.dedup_by_key(|c| c.offset);
        cuts
    }
}

/// What cutting a stream does with earlier cuts: takes them where it can, records its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct EarlierCuts<'a> {
    /// Cuts to take where the bytes have not changed.
    pub take: Option<&'a Earlier>,
    /// Where to record every cut made, for the next stream.
    pub record: Option<&'a Recorded>,
}

/// Where a stream's files were cut before; shared by the threads that cut the stream.
#[derive(Debug, Default)]
pub struct Earlier {
    /// By stream offset, not overlapping.
    regions: Vec<Region>,
    /// Bytes whose cuts [`Earlier::reuse`] took from the earlier cuts.
    reused: AtomicU64,
}

/// One file's earlier cuts, at the file's place in the stream.
#[derive(Debug)]
struct Region {
    /// Stream offset of the file's first byte.
    start: u64,
    len: u64,
    cuts: Vec<EarlierCut>,
}

impl Earlier {
    /// Places `files` in a stream: `locate` gives a file's stream offset and length, or `None`
    /// when the stream does not hold it (it is then left out).
    pub fn new(files: &[EarlierFile], locate: impl Fn(&Path) -> Option<(u64, u64)>) -> Earlier {
        let mut regions: Vec<Region> = files
            .iter()
            .filter_map(|file| {
                let (start, len) = locate(&file.current)?;
                Some(Region {
                    start,
                    len,
                    cuts: file.cuts.clone(),
                })
            })
            .collect();
        regions.sort_by_key(|r| r.start);
        Earlier {
            regions,
            reused: AtomicU64::new(0),
        }
    }

    /// The chunk starting at stream `offset`, whose bytes from there `window` holds (at least
    /// [`MAX_CHUNK_LEN`] of them unless the stream ends sooner), when it is an earlier cut (see
    /// the module documentation): that cut, at `offset`, as recording would make it; `None` to
    /// cut it.
    pub fn reuse(&self, offset: u64, window: &[u8]) -> Option<EarlierCut> {
        let i = self.regions.partition_point(|r| r.start + r.len <= offset);
        let region = self.regions.get(i).filter(|r| r.start <= offset)?;
        let at = offset - region.start;
        let k = region.cuts.binary_search_by_key(&at, |c| c.offset).ok()?;
        let cut = region.cuts[k];
        let span = cut_span(&cut.entry, window)?;
        if fingerprint(&window[..span]) != cut.fingerprint {
            return None;
        }
        self.reused
            .fetch_add(u64::from(cut.entry.len), Ordering::Relaxed);
        Some(EarlierCut { offset, ..cut })
    }

    /// Bytes whose cuts were taken from earlier cuts so far.
    pub fn reused_bytes(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }
}

/// Splits cuts recorded over a stream of `files` (their lengths, in stream order) into each
/// file's cuts, by offset in the file; a cut belongs to the file it starts in.
pub fn per_file(cuts: &[EarlierCut], lens: &[u64]) -> Vec<Vec<EarlierCut>> {
    let mut start = 0u64;
    lens.iter()
        .map(|&len| {
            let first = cuts.partition_point(|c| c.offset < start);
            let mine = cuts[first..]
                .iter()
                .take_while(|c| c.offset < start + len)
                .map(|c| EarlierCut {
                    offset: c.offset - start,
                    ..*c
                })
                .collect();
            start += len;
            mine
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::parallel::cut_parallel;
    use crate::chunker::parallel::tests::{mixed, sequential};
    use crate::ChunkId;

    /// Cuts `stream` on two threads with `earlier`; returns the cuts and the cuts recorded.
    fn cut_with(
        stream: &[u8],
        take: Option<&Earlier>,
    ) -> (Vec<(u64, ManifestEntry)>, Vec<EarlierCut>) {
        let read_at = |buf: &mut [u8], at: u64| {
            let at = at as usize;
            buf.copy_from_slice(&stream[at..at + buf.len()]);
            Ok(())
        };
        let recorded = Recorded::default();
        let earlier = EarlierCuts {
            take,
            record: Some(&recorded),
        };
        let mut out = Vec::new();
        let total = cut_parallel(
            stream.len() as u64,
            &read_at,
            2,
            1 << 20,
            earlier,
            |o, e| {
                out.push((o, e));
                true
            },
        )
        .unwrap();
        assert_eq!(total, Some(stream.len() as u64));
        (out, recorded.take())
    }

    /// The cuts recorded for `file` in the stream `before ++ file ++ after`.
    fn recorded_for(before: &[u8], file: &[u8], after: &[u8]) -> Vec<EarlierCut> {
        let stream = [before, file, after].concat();
        let (cuts, recorded) = cut_with(&stream, None);
        assert_eq!(cuts, sequential(&stream), "recording changes no cut");
        let lens = [before.len() as u64, file.len() as u64, after.len() as u64];
        per_file(&recorded, &lens).swap_remove(1)
    }

    #[test]
    fn unchanged_cuts_are_taken_and_the_result_is_the_sequential_chunkers() {
        let old = mixed(12 << 20, 7);
        let cuts = recorded_for(&mixed(70_000, 8), &old, &mixed(5000, 9));

        // The file now: a few bytes changed inside chunks, one changed byte exactly after a
        // chunk's end (the byte that triggers its cut), and it grew at the end.
        let mut new = old.clone();
        for i in [1_000usize, 3 << 20, (9 << 20) + 17] {
            new[i] ^= 0x5a;
        }
        let cut = *cuts[cuts.len() / 2..]
            .iter()
            .find(|c| c.entry.len < MAX_CHUNK_LEN && !c.entry.zero)
            .expect("a cut that the byte after it triggered");
        let after = (cut.offset + u64::from(cut.entry.len)) as usize;
        new[after] = new[after].wrapping_add(1);
        new.extend(mixed(300_000, 10));

        // The stream now: the file lies at another offset, between other bytes.
        let head = mixed(1234, 11);
        let stream = [&head[..], &new, &mixed(400_000, 12)].concat();
        let files = [EarlierFile {
            current: PathBuf::from("now/pages-1.img"),
            cuts,
        }];
        let (start, len) = (head.len() as u64, new.len() as u64);
        let earlier = Earlier::new(&files, |p| {
            (p == Path::new("now/pages-1.img")).then_some((start, len))
        });

        let expected = sequential(&stream);
        assert!(
            !expected.contains(&(start + cut.offset, cut.entry)),
            "changing the byte after a chunk moves its cut"
        );
        let (cuts, recorded) = cut_with(&stream, Some(&earlier));
        assert_eq!(cuts, expected);
        assert_eq!(
            recorded,
            cut_with(&stream, None).1,
            "cuts taken are recorded as cutting records them"
        );
        let reused = earlier.reused_bytes();
        assert!(
            reused > old.len() as u64 * 9 / 10 && reused < old.len() as u64,
            "{reused} of {} bytes taken from the earlier cuts",
            old.len()
        );
    }

    #[test]
    fn unrelated_shorter_or_missing_earlier_cuts_change_nothing() {
        let stream = mixed(6 << 20, 20);
        for (name, earlier_data) in [
            ("unrelated", mixed(6 << 20, 21)),
            ("shorter", stream[..(2 << 20) + 999].to_vec()),
        ] {
            let files = [EarlierFile {
                current: PathBuf::from("now"),
                cuts: recorded_for(&[], &earlier_data, &[]),
            }];
            let earlier = Earlier::new(&files, |_| Some((0, stream.len() as u64)));
            assert_eq!(
                cut_with(&stream, Some(&earlier)).0,
                sequential(&stream),
                "{name}"
            );
            match name {
                "unrelated" => assert_eq!(earlier.reused_bytes(), 0),
                _ => assert!(earlier.reused_bytes() > 1 << 20, "{name}"),
            }
        }
        // Files the stream does not hold are left out.
        let files = [EarlierFile {
            current: PathBuf::from("elsewhere"),
            cuts: recorded_for(&[], &stream, &[]),
        }];
        let earlier = Earlier::new(&files, |_| None);
        assert_eq!(cut_with(&stream, Some(&earlier)).0, sequential(&stream));
        assert_eq!(earlier.reused_bytes(), 0);
    }

    #[test]
    fn recorded_cuts_split_by_the_file_they_start_in() {
        let entry = |len| ManifestEntry {
            id: ChunkId::of(b"x"),
            len,
            zero: false,
        };
        let cut = |offset, len| EarlierCut {
            offset,
            entry: entry(len),
            fingerprint: u128::from(offset as u32),
        };
        let cuts = [cut(0, 100), cut(100, 150), cut(250, 100), cut(350, 150)];
        let files = per_file(&cuts, &[300, 0, 200]);
        assert_eq!(files[0], vec![cut(0, 100), cut(100, 150), cut(250, 100)]);
        assert!(files[1].is_empty());
        let moved = EarlierCut {
            offset: 50,
            ..cut(350, 150)
        };
        assert_eq!(files[2], vec![moved]);
    }
}
