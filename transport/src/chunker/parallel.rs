//! The same cuts as [`Chunker`](super::Chunker), made on several threads.
//!
//! Cutting is sequential by nature: where a chunk ends depends on where it began. But a cut
//! depends only on the bytes from the chunk's start on, so two cutters that ever start a chunk
//! at the same offset make the same cuts from there. [`cut_parallel`] splits the stream into
//! segments of [`SEGMENT_LEN`]; each worker thread cuts whole segments as if a chunk began at
//! the segment's first byte, and hashes its chunks. The calling thread walks the segments in
//! order from the true position: where a segment's cuts include that position, it adopts them;
//! where they do not (the true chunk straddling the segment's start ended elsewhere), it cuts
//! on its own until it lands on one of the worker's cuts. Content-defined cuts fall back into
//! step within a chunk or two, so the calling thread does little, and the result is exactly
//! the sequential chunker's: the same offsets, ids, lengths and zero flags, in order. Long runs
//! without cut points (zeros, cut at the maximal length) may not fall back into step; then the
//! calling thread cuts them alone, as slowly as the sequential chunker, and still correctly.
//!
//! Given [`EarlierCuts`], every thread takes the earlier cuts it can instead of cutting (the
//! result is the same, see [`super::earlier`]) and records the cuts it makes.
//!
//! Memory: each worker holds one segment plus one maximal chunk (none when the stream lends
//! its bytes, see [`ReadAt::bytes_at`]), and at most one finished segment's entries waits per
//! worker.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use super::earlier::{self, EarlierCut, EarlierCuts};
use super::{cut_entry, Masks};
use crate::{ChunkId, ManifestEntry, MAX_CHUNK_LEN};

/// Bytes of the stream each worker cuts at a time.
pub const SEGMENT_LEN: usize = 4 << 20;

/// One segment's cuts, as (offset, entry), or why it could not be read.
type SegmentCuts = io::Result<Vec<(u64, ManifestEntry)>>;

/// The stream being cut (see [`crate::source::Source`]): read at any offset, or, where its
/// bytes already lie in memory (a mapped file), lent as they are, without a copy. A closure
/// `|buf, offset|` that fills `buf` is one that only reads.
pub trait ReadAt: Sync {
    /// Fills `buf` from stream offset `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The `len` bytes at `offset` when they can be lent without copying; `None` has the
    /// cutter read them with [`ReadAt::read_exact_at`].
    fn bytes_at(&self, _offset: u64, _len: usize) -> Option<&[u8]> {
        None
    }
}

impl<F: Fn(&mut [u8], u64) -> io::Result<()> + Sync> ReadAt for F {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self(buf, offset)
    }
}

/// Cuts the `len`-byte stream that `read_at` reads on `threads` worker threads (at least
/// one), in segments of `segment_len` bytes, and calls `emit` with every chunk's offset and
/// entry in stream order, exactly as [`super::Chunker`] would yield them. Where `earlier`
/// has the cut at hand, it is taken instead of cutting and hashing; every cut made (also those
/// of positions the true cuts skip) is recorded where it says. `emit` returns `false` to
/// stop early. Returns the stream's length once every chunk was emitted, `None` when `emit`
/// stopped, or the first read error.
pub fn cut_parallel(
    len: u64,
    read_at: &dyn ReadAt,
    threads: usize,
    segment_len: usize,
    earlier: EarlierCuts<'_>,
    mut emit: impl FnMut(u64, ManifestEntry) -> bool,
) -> io::Result<Option<u64>> {
    let segment_len = segment_len.max(1) as u64;
    let segments = len.div_ceil(segment_len);
    let threads = threads.clamp(1, segments.max(1) as usize);
    let masks = Masks::new();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut results = Vec::with_capacity(threads);
        for first in 0..threads {
            let (tx, rx) = mpsc::sync_channel(1);
            results.push(rx);
            let stop = &stop;
            s.spawn(move || {
                let mut worker = Worker::new(masks, earlier);
                let mut k = first as u64;
                while k < segments && !stop.load(Ordering::Relaxed) {
                    let start = k * segment_len;
                    let end = (start + segment_len).min(len);
                    let cut = worker.cut_segment(read_at, start, end, len);
                    let failed = cut.is_err();
                    if tx.send(cut).is_err() || failed {
                        return;
                    }
                    k += threads as u64;
                }
            });
        }
        // Returning drops the receivers: a worker blocked on a full channel then stops.
        let outcome = merge(
            len,
            read_at,
            masks,
            earlier,
            segments,
            segment_len,
            &results,
            &mut emit,
        );
        stop.store(true, Ordering::Relaxed);
        outcome
    })
}

/// The calling thread's part: the segments' cuts in order, mended where they were not in
/// step with the true position.
#[allow(clippy::too_many_arguments)]
fn merge(
    len: u64,
    read_at: &dyn ReadAt,
    masks: Masks,
    earlier: EarlierCuts<'_>,
    segments: u64,
    segment_len: u64,
    results: &[mpsc::Receiver<SegmentCuts>],
    emit: &mut impl FnMut(u64, ManifestEntry) -> bool,
) -> io::Result<Option<u64>> {
    let mut own = Worker::new(masks, earlier);
    let outcome = merge_with(&mut own, len, read_at, segments, segment_len, results, emit);
    own.flush();
    outcome
}

fn merge_with(
    own: &mut Worker<'_>,
    len: u64,
    read_at: &dyn ReadAt,
    segments: u64,
    segment_len: u64,
    results: &[mpsc::Receiver<SegmentCuts>],
    emit: &mut impl FnMut(u64, ManifestEntry) -> bool,
) -> io::Result<Option<u64>> {
    let mut pos = 0u64;
    for k in 0..segments {
        let cuts = results[(k % results.len() as u64) as usize]
            .recv()
            .map_err(|_| io::Error::other("a chunking thread ended early"))??;
        let end = ((k + 1) * segment_len).min(len);
        while pos < end {
            if let Ok(i) = cuts.binary_search_by_key(&pos, |(offset, _)| *offset) {
                // In step: the worker's cuts from here are the true ones.
                for &(offset, entry) in &cuts[i..] {
                    if !emit(offset, entry) {
                        return Ok(None);
                    }
                    pos = offset + u64::from(entry.len);
                }
                break;
            }
            let entry = own.cut_one(read_at, pos, len)?;
            if !emit(pos, entry) {
                return Ok(None);
            }
            pos += u64::from(entry.len);
        }
    }
    Ok(Some(len))
}

/// One thread's cutting state: its read buffer, its cache of zero-chunk ids, the earlier cuts
/// it may take and the cuts it made that are not recorded yet.
struct Worker<'a> {
    masks: Masks,
    buf: Vec<u8>,
    zero_ids: HashMap<u32, ChunkId>,
    earlier: EarlierCuts<'a>,
    made: Vec<EarlierCut>,
}

impl<'a> Worker<'a> {
    fn new(masks: Masks, earlier: EarlierCuts<'a>) -> Self {
        Worker {
            masks,
            buf: Vec::new(),
            zero_ids: HashMap::new(),
            earlier,
            made: Vec::new(),
        }
    }

    /// Hands the cuts made so far to the record.
    fn flush(&mut self) {
        if let Some(record) = self.earlier.record {
            record.add(&mut self.made);
        }
    }

    /// `[start, end)` of the stream and as much beyond as a chunk may need: lent by the
    /// stream where it can, or else read into this worker's buffer, which is then taken out
    /// (and goes back with [`Worker::give_back`]).
    fn window<'r>(
        &mut self,
        read_at: &'r dyn ReadAt,
        start: u64,
        end: u64,
        len: u64,
    ) -> io::Result<Window<'r>> {
        let read_end = (end + u64::from(MAX_CHUNK_LEN)).min(len);
        let n = (read_end - start) as usize;
        if let Some(bytes) = read_at.bytes_at(start, n) {
            return Ok(Window::Lent(bytes));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(n, 0);
        match read_at.read_exact_at(&mut buf, start) {
            Ok(()) => Ok(Window::Read(buf)),
            Err(e) => {
                self.buf = buf;
                Err(e)
            }
        }
    }

    /// Keeps a window's buffer for the next read.
    fn give_back(&mut self, window: Window<'_>) {
        if let Window::Read(buf) = window {
            self.buf = buf;
        }
    }

    /// The entry of the chunk at stream `offset`, the start of `window`.
    fn entry(&mut self, offset: u64, window: &[u8]) -> ManifestEntry {
        // A cut taken comes with its fingerprint: recording it costs nothing more.
        let taken = self.earlier.take.and_then(|e| e.reuse(offset, window));
        let entry = match taken {
            Some(cut) => cut.entry,
            None => cut_entry(self.masks, &mut self.zero_ids, window),
        };
        if self.earlier.record.is_some() {
            self.made
                .extend(taken.or_else(|| earlier::record(offset, entry, window)));
        }
        entry
    }

    /// Cuts the chunks that start in `[start, end)`, as if one started at `start`.
    fn cut_segment(&mut self, read_at: &dyn ReadAt, start: u64, end: u64, len: u64) -> SegmentCuts {
        let window = self.window(read_at, start, end, len)?;
        let mut cuts = Vec::new();
        let mut at = 0usize;
        let stop = (end - start) as usize;
        while at < stop {
            let entry = self.entry(start + at as u64, &window.bytes()[at..]);
            cuts.push((start + at as u64, entry));
            at += entry.len as usize;
        }
        self.give_back(window);
        self.flush();
        Ok(cuts)
    }

    /// Cuts the one chunk that starts at `pos`.
    fn cut_one(&mut self, read_at: &dyn ReadAt, pos: u64, len: u64) -> io::Result<ManifestEntry> {
        let window = self.window(read_at, pos, pos, len)?;
        let entry = self.entry(pos, window.bytes());
        self.give_back(window);
        Ok(entry)
    }
}

/// The bytes a worker cuts: lent by the stream, or read into the worker's buffer.
enum Window<'r> {
    Lent(&'r [u8]),
    Read(Vec<u8>),
}

impl Window<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Window::Lent(bytes) => bytes,
            Window::Read(buf) => buf,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::chunker::Chunker;

    pub(crate) fn sequential(data: &[u8]) -> Vec<(u64, ManifestEntry)> {
        Chunker::new(data)
            .map(|s| s.map(|s| (s.offset, s.entry)))
            .collect::<io::Result<_>>()
            .unwrap()
    }

    fn parallel(data: &[u8], threads: usize, segment_len: usize) -> Vec<(u64, ManifestEntry)> {
        let read_at = |buf: &mut [u8], at: u64| {
            let at = at as usize;
            buf.copy_from_slice(&data[at..at + buf.len()]);
            Ok(())
        };
        cut_all(&read_at, data.len(), threads, segment_len)
    }

    /// Every cut of the `len`-byte `stream`, on `threads` threads.
    fn cut_all(
        stream: &dyn ReadAt,
        len: usize,
        threads: usize,
        segment_len: usize,
    ) -> Vec<(u64, ManifestEntry)> {
        let mut out = Vec::new();
        let total = cut_parallel(
            len as u64,
            stream,
            threads,
            segment_len,
            EarlierCuts::default(),
            |o, e| {
                out.push((o, e));
                true
            },
        )
        .unwrap();
        assert_eq!(total, Some(len as u64));
        out
    }

    /// Random runs, text-like runs and zero runs, the mix a memory dump has.
    pub(crate) fn mixed(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            let run = rng.usize(1..=64) * 4096;
            match rng.u8(0..3) {
                0 => data.extend(std::iter::repeat_n(0u8, run)),
                1 => data.extend((0..run).map(|_| rng.u8(..))),
                _ => data.extend((0..run).map(|i| b"abcdefgh "[(i * 7 + run) % 9])),
            }
        }
        data.truncate(len);
        data
    }

    #[test]
    fn the_cuts_are_the_sequential_chunkers_whatever_the_segments_and_threads() {
        let data = mixed(11 * 1024 * 1024 + 12_345, 1);
        let expected = sequential(&data);
        for (threads, segment_len) in [
            (1, SEGMENT_LEN),
            (2, SEGMENT_LEN),
            (2, 1 << 20),
            (3, 300_001),
        ] {
            assert_eq!(
                parallel(&data, threads, segment_len),
                expected,
                "{threads} threads, segments of {segment_len}"
            );
        }
        // Segments far shorter than a chunk: nearly every cut is mended by the caller.
        let data = &data[..1536 * 1024];
        assert_eq!(parallel(data, 4, 4096), sequential(data));
    }

    /// A stream that lends its bytes, and counts the reads it is asked for.
    struct Lending<'d> {
        data: &'d [u8],
        reads: std::sync::atomic::AtomicUsize,
    }

    impl ReadAt for Lending<'_> {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let at = offset as usize;
            buf.copy_from_slice(&self.data[at..at + buf.len()]);
            Ok(())
        }

        fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
            self.data.get(offset as usize..offset as usize + len)
        }
    }

    #[test]
    fn a_stream_that_lends_its_bytes_is_cut_where_it_lies_into_the_same_chunks() {
        let data = mixed(9 * 1024 * 1024 + 777, 3);
        let lending = Lending {
            data: &data,
            reads: Default::default(),
        };
        assert_eq!(cut_all(&lending, data.len(), 2, 1 << 20), sequential(&data));
        assert_eq!(
            lending.reads.load(Ordering::Relaxed),
            0,
            "lent bytes were read"
        );
    }

    #[test]
    fn long_zero_runs_and_tiny_or_empty_streams_match_too() {
        let mut data = vec![0u8; 5 * 1024 * 1024 + 3];
        data.extend(mixed(1024 * 1024, 2));
        assert_eq!(parallel(&data, 2, 1 << 20), sequential(&data));
        for len in [0, 1, 100, 70_000] {
            let data = mixed(len, 3);
            assert_eq!(parallel(&data, 2, 4096), sequential(&data), "{len} bytes");
        }
    }

    #[test]
    fn emit_can_stop_and_read_errors_come_back() {
        let data = mixed(4 * 1024 * 1024, 4);
        let read_at = |buf: &mut [u8], at: u64| {
            let at = at as usize;
            buf.copy_from_slice(&data[at..at + buf.len()]);
            Ok(())
        };
        let mut seen = 0;
        let stopped = cut_parallel(
            data.len() as u64,
            &read_at,
            2,
            1 << 20,
            EarlierCuts::default(),
            |_, _| {
                seen += 1;
                seen < 3
            },
        )
        .unwrap();
        assert_eq!((stopped, seen), (None, 3));

        let failing = |_: &mut [u8], at: u64| {
            if at >= 2 << 20 {
                Err(io::Error::other("disk gone"))
            } else {
                Ok(())
            }
        };
        let err = cut_parallel(
            4 << 20,
            &failing,
            2,
            1 << 20,
            EarlierCuts::default(),
            |_, _| true,
        )
        .unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
    }
}
