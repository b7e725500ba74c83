//! Content-defined chunking of a checkpoint stream into manifest entries.
//!
//! [`Chunker`] reads any [`Read`] through a fixed buffer of a few chunk lengths, cuts it with
//! FastCDC (2020, normalisation level 1, the crate's default gear table) using the crate-wide
//! [`MIN_CHUNK_LEN`] / [`AVG_CHUNK_LEN`] / [`MAX_CHUNK_LEN`], and yields one [`Span`] per chunk
//! with its id (blake3 of the raw bytes), its length and whether it is all zeros. Because cut
//! points depend on content only, an insertion near the start of an archive moves a few chunk
//! boundaries and leaves later chunks, and hence their ids, unchanged: that is what makes
//! deduplication against earlier transfers work. There is no hash of the whole stream: the
//! transfer names a stream by its manifest digest ([`crate::ManifestDigest`]), so each byte is
//! hashed once, for its chunk id. Memory stays bounded by the buffer (one mebibyte) plus the
//! spans the caller keeps, whatever the stream length. [`parallel::cut_parallel`] makes the
//! very same cuts on several threads, for a sender that only needs the manifest entries.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::iter::FusedIterator;

use fastcdc::v2020;

pub mod appending;
pub mod earlier;
pub mod parallel;

use crate::{ChunkId, ManifestEntry, AVG_CHUNK_LEN, MAX_CHUNK_LEN, MIN_CHUNK_LEN};

/// Size of the read buffer: four maximal chunks, so a refill moves at most a quarter of it.
const BUFFER_LEN: usize = 4 * MAX_CHUNK_LEN as usize;

/// One chunk cut from a stream.
#[derive(Clone, PartialEq, Eq)]
pub struct Span {
    /// Position of the chunk's first byte in the stream.
    pub offset: u64,
    /// Id, length and zero flag of the chunk.
    pub entry: ManifestEntry,
    /// The raw bytes of the chunk; `data.len() == entry.len`.
    pub data: Vec<u8>,
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The data is up to 256 KiB: show its length, not its bytes.
        f.debug_struct("Span")
            .field("offset", &self.offset)
            .field("entry", &self.entry)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// The FastCDC masks for [`AVG_CHUNK_LEN`] at normalisation level 1, as
/// `fastcdc::v2020::StreamCDC::new` computes them, so cuts match that iterator exactly.
#[derive(Clone, Copy, Debug)]
struct Masks {
    small: u64,
    large: u64,
}

impl Masks {
    fn new() -> Self {
        let bits = v2020::logarithm2(AVG_CHUNK_LEN) as usize;
        Masks {
            small: v2020::MASKS[bits + 1],
            large: v2020::MASKS[bits - 1],
        }
    }

    /// Length of the next chunk at the start of `window`, which holds at least
    /// [`MAX_CHUNK_LEN`] bytes unless the stream ends within it.
    fn cut(&self, window: &[u8]) -> usize {
        let (_, len) = v2020::cut(
            window,
            MIN_CHUNK_LEN as usize,
            AVG_CHUNK_LEN as usize,
            MAX_CHUNK_LEN as usize,
            self.small,
            self.large,
            self.small << 1,
            self.large << 1,
        );
        len
    }
}

/// Where the chunker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// More spans may follow.
    Running,
    /// The stream ended; [`Chunker::finish`] has its answer.
    Done,
    /// A read failed; the error was yielded and iteration is over without a total.
    Failed,
}

/// Cuts a stream into content-defined chunks; an iterator of [`Span`]s.
///
/// After the iterator returns `None`, [`Chunker::finish`] gives the stream's length.
/// A read error is yielded once as `Some(Err(_))`; iteration then ends and `finish` stays
/// `None`, since the stream was not seen whole. Reads interrupted by a signal are retried.
pub struct Chunker<R: Read> {
    reader: R,
    /// Read buffer; the unconsumed bytes are `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The reader reported end of stream.
    eof: bool,
    /// Offset in the stream of `buf[start]`.
    offset: u64,
    masks: Masks,
    /// Id of an all-zero chunk, by length: zero runs give the same few lengths over and over.
    zero_ids: HashMap<u32, ChunkId>,
    state: State,
    total: Option<u64>,
}

impl<R: Read> fmt::Debug for Chunker<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunker")
            .field("offset", &self.offset)
            .field("buffered", &(self.end - self.start))
            .field("eof", &self.eof)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Chunker<R> {
    /// Chunks everything `reader` yields until it reports end of stream.
    pub fn new(reader: R) -> Self {
        Chunker {
            reader,
            buf: vec![0u8; BUFFER_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
            masks: Masks::new(),
            zero_ids: HashMap::new(),
            state: State::Running,
            total: None,
        }
    }

    /// After the iterator is exhausted: total bytes of the stream.
    ///
    /// `None` until the end of the stream was reached, and after a read error.
    pub fn finish(&self) -> Option<u64> {
        self.total
    }

    /// Bytes yielded as spans so far.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// Makes the buffer hold at least [`MAX_CHUNK_LEN`] unconsumed bytes, or everything up to
    /// the end of the stream.
    fn fill(&mut self) -> io::Result<()> {
        if self.eof || self.end - self.start >= MAX_CHUNK_LEN as usize {
            return Ok(());
        }
        // Move the tail (less than one chunk) to the front, then read until the buffer is full.
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < self.buf.len() {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Cuts the rest of the stream without keeping its bytes, and returns every cut as a
    /// later stream over the same bytes can take it again ([`earlier::Earlier::reuse`]). The
    /// last cuts, made with less than a maximal chunk of stream left, are not among them:
    /// more bytes could have moved them.
    pub fn record_cuts(mut self) -> io::Result<Vec<earlier::EarlierCut>> {
        let mut cuts = Vec::new();
        while let Some(cut) = self.cut_next(earlier::record)? {
            cuts.extend(cut);
        }
        Ok(cuts)
    }

    fn next_span(&mut self) -> io::Result<Option<Span>> {
        self.cut_next(|offset, entry, window| Span {
            offset,
            data: window[..entry.len as usize].to_vec(),
            entry,
        })
    }

    /// Cuts the next chunk and moves past it, handing `seen` its offset, its entry and the
    /// window it was cut from (the chunk's bytes first); `None` at the end of the stream.
    fn cut_next<T>(
        &mut self,
        seen: impl FnOnce(u64, ManifestEntry, &[u8]) -> T,
    ) -> io::Result<Option<T>> {
        self.fill()?;
        let window = &self.buf[self.start..self.end];
        if window.is_empty() {
            return Ok(None);
        }
        let entry = cut_entry(self.masks, &mut self.zero_ids, window);
        let len = entry.len;
        let out = seen(self.offset, entry, window);
        self.start += len as usize;
        self.offset += u64::from(len);
        Ok(Some(out))
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = io::Result<Span>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.state != State::Running {
            return None;
        }
        match self.next_span() {
            Ok(Some(span)) => Some(Ok(span)),
            Ok(None) => {
                self.state = State::Done;
                self.total = Some(self.offset);
                None
            }
            Err(e) => {
                self.state = State::Failed;
                Some(Err(e))
            }
        }
    }
}

impl<R: Read> FusedIterator for Chunker<R> {}

/// The entry of the chunk FastCDC cuts at the start of `window` (see [`Masks::cut`] for what
/// the window must hold); `zero_ids` caches the ids of all-zero chunks by length.
fn cut_entry(masks: Masks, zero_ids: &mut HashMap<u32, ChunkId>, window: &[u8]) -> ManifestEntry {
    // FastCDC looks at no more than MAX_CHUNK_LEN bytes, so every window opening with that many
    // zeros cuts where an all-zero one does: memory dumps are full of zero runs, which this
    // checks at memory speed instead of rolling the gear hash over every byte.
    let max = MAX_CHUNK_LEN as usize;
    let zero_window = window.len() >= max && is_zero(&window[..max]);
    let n = if zero_window {
        zero_window_cut()
    } else {
        masks.cut(window)
    };
    let bytes = &window[..n];
    let len = u32::try_from(n).expect("FastCDC never cuts beyond MAX_CHUNK_LEN");
    let zero = zero_window || is_zero(bytes);
    let id = if zero {
        *zero_ids.entry(len).or_insert_with(|| ChunkId::of(bytes))
    } else {
        ChunkId::of(bytes)
    };
    ManifestEntry { id, len, zero }
}

/// Where FastCDC cuts a window of [`MAX_CHUNK_LEN`] zeros, computed once.
fn zero_window_cut() -> usize {
    static CUT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CUT.get_or_init(|| Masks::new().cut(&vec![0u8; MAX_CHUNK_LEN as usize]))
}

/// True when every byte of `data` is zero (true for an empty slice).
///
/// Works in 256-byte blocks OR-folded as `u64` words, which the compiler vectorises, and stops
/// at the first block holding a non-zero byte, so non-zero pages cost almost nothing.
pub fn is_zero(data: &[u8]) -> bool {
    const BLOCK: usize = 256;
    let mut blocks = data.chunks_exact(BLOCK);
    for block in &mut blocks {
        let acc = block
            .chunks_exact(8)
            .map(|w| u64::from_ne_bytes(w.try_into().expect("8-byte word")))
            .fold(0u64, |acc, w| acc | w);
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().fold(0u8, |acc, &b| acc | b) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (fastrand with a fixed seed).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut out = vec![0u8; len];
        rng.fill(&mut out);
        out
    }

    /// A reader that returns at most `step` bytes per call and an `Interrupted` error every
    /// third call, to exercise the refill loop.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        calls: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn spans(data: &[u8]) -> Vec<Span> {
        Chunker::new(data)
            .collect::<io::Result<Vec<_>>>()
            .expect("reading a slice cannot fail")
    }

    #[test]
    fn concatenation_offsets_and_bounds() {
        let data = noise(5 * 1024 * 1024 + 12_345, 1);
        let spans = spans(&data);
        assert!(spans.len() > 20, "5 MiB at 64 KiB average: {}", spans.len());
        let mut expected_offset = 0u64;
        let mut joined = Vec::with_capacity(data.len());
        for (i, span) in spans.iter().enumerate() {
            assert_eq!(span.offset, expected_offset, "span {i} not contiguous");
            assert_eq!(span.entry.len as usize, span.data.len());
            assert!(span.entry.len <= MAX_CHUNK_LEN, "span {i} too long");
            if i + 1 < spans.len() {
                assert!(span.entry.len >= MIN_CHUNK_LEN, "span {i} too short");
            }
            assert_eq!(span.entry.id, ChunkId::of(&span.data));
            assert!(!span.entry.zero);
            expected_offset += span.data.len() as u64;
            joined.extend_from_slice(&span.data);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn cuts_are_deterministic_and_independent_of_read_sizes() {
        let data = noise(3 * 1024 * 1024, 2);
        let a: Vec<(u64, ManifestEntry)> = spans(&data)
            .into_iter()
            .map(|s| (s.offset, s.entry))
            .collect();
        let b: Vec<(u64, ManifestEntry)> = spans(&data)
            .into_iter()
            .map(|s| (s.offset, s.entry))
            .collect();
        assert_eq!(a, b);
        let trickle = Trickle {
            data: &data,
            step: 7_777,
            calls: 0,
        };
        let c: Vec<(u64, ManifestEntry)> = Chunker::new(trickle)
            .map(|s| s.map(|s| (s.offset, s.entry)))
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(a, c);
    }

    #[test]
    fn matches_fastcdc_stream_cdc() {
        let data = noise(2 * 1024 * 1024 + 99, 3);
        let ours: Vec<(u64, usize)> = spans(&data)
            .into_iter()
            .map(|s| (s.offset, s.data.len()))
            .collect();
        let theirs: Vec<(u64, usize)> =
            v2020::StreamCDC::new(&data[..], MIN_CHUNK_LEN, AVG_CHUNK_LEN, MAX_CHUNK_LEN)
                .map(|c| c.map(|c| (c.offset, c.length)))
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(ours, theirs);
    }

    /// Zero runs shorter than, as long as and longer than a maximal chunk, starting mid-chunk
    /// or at a cut, cut exactly as FastCDC cuts them: the zero-window shortcut changes nothing.
    #[test]
    fn zero_runs_cut_as_fastcdc_cuts_them() {
        let max = MAX_CHUNK_LEN as usize;
        let mut data = noise(100_000, 8);
        for (i, run) in [max - 1, max, max + 1, 3 * max + 4097, 5000, 2 * max]
            .into_iter()
            .enumerate()
        {
            data.extend(std::iter::repeat_n(0u8, run));
            data.extend(noise(20_000 + 7_919 * i, 9 + i as u64));
        }
        data.extend(std::iter::repeat_n(0u8, 2 * max + 3));
        let ours: Vec<(u64, usize, bool)> = spans(&data)
            .into_iter()
            .map(|s| (s.offset, s.data.len(), s.entry.zero))
            .collect();
        let theirs: Vec<(u64, usize, bool)> =
            v2020::StreamCDC::new(&data[..], MIN_CHUNK_LEN, AVG_CHUNK_LEN, MAX_CHUNK_LEN)
                .map(|c| c.map(|c| (c.offset, c.length, c.data.iter().all(|&b| b == 0))))
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(ours, theirs);
        assert!(
            ours.iter()
                .filter(|(_, len, zero)| *zero && *len == max)
                .count()
                >= 4,
            "the runs must give maximal zero chunks, or the shortcut went untested"
        );
    }

    #[test]
    fn insertion_near_start_keeps_most_ids() {
        let data = noise(8 * 1024 * 1024, 4);
        let mut shifted = data[..1000].to_vec();
        shifted.extend_from_slice(b"seventeen bytes!!");
        shifted.extend_from_slice(&data[1000..]);
        let before: Vec<ChunkId> = spans(&data).iter().map(|s| s.entry.id).collect();
        let after: std::collections::HashSet<ChunkId> =
            spans(&shifted).iter().map(|s| s.entry.id).collect();
        let survived = before.iter().filter(|id| after.contains(id)).count();
        assert!(
            survived + 3 >= before.len(),
            "only {survived} of {} chunk ids survived a 17-byte insertion",
            before.len()
        );
        assert!(survived < before.len(), "the edited chunk cannot survive");
    }

    #[test]
    fn zero_runs_are_flagged_and_share_ids() {
        let mut data = noise(300 * 1024, 5);
        data.extend(std::iter::repeat_n(0u8, 2 * 1024 * 1024));
        data.extend(noise(300 * 1024, 6));
        let spans = spans(&data);
        let zeros: Vec<&Span> = spans.iter().filter(|s| s.entry.zero).collect();
        assert!(
            zeros.len() >= 6,
            "2 MiB of zeros gave {} zero spans",
            zeros.len()
        );
        for span in &spans {
            assert_eq!(span.entry.zero, span.data.iter().all(|&b| b == 0));
            // Cached ids must still be the real hash.
            assert_eq!(span.entry.id, ChunkId::of(&span.data));
        }
    }

    #[test]
    fn is_zero_finds_any_non_zero_byte() {
        assert!(is_zero(&[]));
        for len in [1usize, 7, 8, 255, 256, 257, 1000, 4096] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v), "len {len}");
            for pos in [0, len / 2, len - 1] {
                v[pos] = 0x10;
                assert!(!is_zero(&v), "len {len}, non-zero at {pos}");
                v[pos] = 0;
            }
        }
    }

    #[test]
    fn finish_gives_the_stream_length() {
        let data = noise(1024 * 1024 + 3, 7);
        let mut chunker = Chunker::new(&data[..]);
        let mut count = 0;
        while let Some(span) = chunker.next() {
            span.unwrap();
            assert_eq!(chunker.finish(), None, "no total before the end");
            count += 1;
        }
        assert!(count > 1);
        assert_eq!(chunker.finish(), Some(data.len() as u64));
        assert!(chunker.next().is_none(), "fused after the end");
    }

    #[test]
    fn empty_input() {
        let mut chunker = Chunker::new(io::empty());
        assert!(chunker.next().is_none());
        assert_eq!(chunker.finish(), Some(0));
    }

    #[test]
    fn short_input_is_one_short_span() {
        let data = noise(100, 8);
        let spans = spans(&data);
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].data, data);
    }

    #[test]
    fn read_error_is_yielded_once_and_leaves_no_total() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk on fire"));
                }
                let n = self.0.min(out.len());
                out[..n].fill(1);
                self.0 -= n;
                Ok(n)
            }
        }
        let mut chunker = Chunker::new(Failing(10));
        let err = chunker.next().unwrap().unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
        assert!(chunker.next().is_none());
        assert_eq!(chunker.finish(), None);
    }
}
