//! Deterministic synthetic data that looks, to a chunker and a compressor, like a checkpoint.
//!
//! A container checkpoint is mostly memory pages, and memory comes in stretches of one kind:
//! untouched (zero) pages, heaps full of strings and small numbers, and buffers that are
//! already compressed or encrypted. The generator lays 4 KiB pages out in runs of 1–256 pages,
//! each run one kind: ~40% zero, ~30% text-like (log lines, prose from a small vocabulary,
//! key/value records, all with enough fresh numbers in them that zstd -1 gets a few times, not a
//! hundred times), ~30% random. Every byte comes from a [`fastrand::Rng`] seeded by the caller,
//! so the same `(size, seed)` always gives the same bytes, and no two text pages repeat.
//!
//! Everything streams through a buffered writer: the memory used does not grow with the size.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use fastrand::Rng;

/// The page size the generator lays data out in.
pub const PAGE_SIZE: usize = 4096;
/// Longest run of same-kind pages in a checkpoint-like stream.
pub const MAX_RUN_PAGES: u64 = 256;
/// Longest run of rewritten pages in [`write_rewritten_copy`].
pub const MAX_REWRITE_RUN_PAGES: u64 = 64;

const IO_BUFFER: usize = 1 << 20;
const ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// What a page (or a run of pages) is filled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// All zero bytes.
    Zero,
    /// Printable ASCII text that compresses a few times.
    Text,
    /// Uniformly random bytes: incompressible.
    Random,
}

impl PageKind {
    /// Draws a run's kind: 40% zero, 30% text, 30% random.
    fn draw(rng: &mut Rng) -> Self {
        match rng.u32(0..10) {
            0..=3 => PageKind::Zero,
            4..=6 => PageKind::Text,
            _ => PageKind::Random,
        }
    }

    /// Classifies existing bytes: all zero, all printable ASCII or newline, or anything else.
    /// Random pages are never all ASCII in practice (the odds are 2^-4096 per page).
    pub fn classify(page: &[u8]) -> Self {
        if page.iter().all(|&b| b == 0) {
            PageKind::Zero
        } else if page
            .iter()
            .all(|&b| b == b'\n' || (0x20..0x7f).contains(&b))
        {
            PageKind::Text
        } else {
            PageKind::Random
        }
    }
}

/// Writes `size` bytes of checkpoint-like data, deterministic in `seed`, to a new file at
/// `path` (truncating any old one).
pub fn write_checkpoint_like(path: &Path, size: u64, seed: u64) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(IO_BUFFER, File::create(path)?);
    checkpoint_like_to(&mut out, size, seed)?;
    out.flush()
}

/// Returns `size` bytes of checkpoint-like data, the same bytes [`write_checkpoint_like`]
/// writes for the same `seed`.
pub fn checkpoint_like_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    checkpoint_like_to(&mut out, size as u64, seed).expect("writing to a Vec cannot fail");
    out
}

/// Streams `size` bytes of checkpoint-like data into `out`. The last page is cut short when
/// `size` is not a multiple of [`PAGE_SIZE`].
pub fn checkpoint_like_to(out: &mut impl Write, size: u64, seed: u64) -> io::Result<()> {
    let mut rng = Rng::with_seed(seed);
    let mut text = TextGen::new(rng.u64(..));
    let mut buf = vec![0u8; MAX_RUN_PAGES as usize * PAGE_SIZE];
    let mut left = size;
    while left > 0 {
        let pages = rng.u64(1..=MAX_RUN_PAGES);
        let len = left.min(pages * PAGE_SIZE as u64) as usize;
        match PageKind::draw(&mut rng) {
            PageKind::Zero => write_zeros(out, len)?,
            PageKind::Text => {
                text.fill(&mut buf[..len]);
                out.write_all(&buf[..len])?;
            }
            PageKind::Random => {
                rng.fill(&mut buf[..len]);
                out.write_all(&buf[..len])?;
            }
        }
        left -= len as u64;
    }
    Ok(())
}

fn write_zeros(out: &mut impl Write, mut len: usize) -> io::Result<()> {
    while len > 0 {
        let n = len.min(PAGE_SIZE);
        out.write_all(&ZEROS[..n])?;
        len -= n;
    }
    Ok(())
}

/// Copies `src` to `dst`, rewriting about `fraction` of its pages with new content (random or
/// text, chosen per run) in runs of 1–64 pages at places drawn from `seed`. Returns how many
/// pages were rewritten; each of them differs from the original (barring a 2^-32768 chance).
/// Memory use is one byte per page of `src` plus buffers.
pub fn write_rewritten_copy(src: &Path, dst: &Path, fraction: f64, seed: u64) -> io::Result<u64> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fraction {fraction} is not within 0..=1"),
        ));
    }
    let input = File::open(src)?;
    let size = input.metadata()?.len();
    let pages = size.div_ceil(PAGE_SIZE as u64);
    let mut rng = Rng::with_seed(seed);
    let plan = plan_rewrites(&mut rng, pages, fraction);
    let rewritten = plan.iter().filter(|k| k.is_some()).count() as u64;

    let mut text = TextGen::new(rng.u64(..));
    let mut input = BufReader::with_capacity(IO_BUFFER, input);
    let mut out = BufWriter::with_capacity(IO_BUFFER, File::create(dst)?);
    let mut page = [0u8; PAGE_SIZE];
    let mut left = size;
    for kind in plan {
        let len = left.min(PAGE_SIZE as u64) as usize;
        input.read_exact(&mut page[..len])?;
        match kind {
            None => {}
            Some(PageKind::Text) => text.fill(&mut page[..len]),
            Some(_) => rng.fill(&mut page[..len]),
        }
        out.write_all(&page[..len])?;
        left -= len as u64;
    }
    out.flush()?;
    Ok(rewritten)
}

/// Picks the pages to rewrite: runs of 1–64 pages at random places until `fraction` of the
/// pages are covered (runs may touch or overlap; overlaps are counted once).
fn plan_rewrites(rng: &mut Rng, pages: u64, fraction: f64) -> Vec<Option<PageKind>> {
    let mut plan = vec![None; pages as usize];
    let target = ((pages as f64 * fraction).round() as u64).min(pages);
    let mut marked = 0;
    while marked < target {
        let run = rng.u64(1..=MAX_REWRITE_RUN_PAGES).min(target - marked);
        let start = rng.u64(0..pages);
        let end = (start + run).min(pages);
        let kind = if rng.bool() {
            PageKind::Text
        } else {
            PageKind::Random
        };
        for slot in &mut plan[start as usize..end as usize] {
            if slot.is_none() {
                *slot = Some(kind);
                marked += 1;
            }
        }
    }
    plan
}

/// Words for prose lines and names: the vocabulary of a runtime's heap.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "not",
    "request",
    "response",
    "handler",
    "worker",
    "thread",
    "queue",
    "buffer",
    "cache",
    "session",
    "connection",
    "socket",
    "stream",
    "message",
    "packet",
    "frame",
    "header",
    "payload",
    "client",
    "server",
    "service",
    "container",
    "process",
    "memory",
    "page",
    "region",
    "heap",
    "stack",
    "alloc",
    "free",
    "mapped",
    "dirty",
    "clean",
    "shared",
    "private",
    "anonymous",
    "file",
    "descriptor",
    "pipe",
    "signal",
    "timer",
    "event",
    "epoll",
    "futex",
    "mutex",
    "lock",
    "retry",
    "timeout",
    "deadline",
    "backoff",
    "error",
    "warning",
    "failed",
    "succeeded",
    "started",
    "stopped",
    "closed",
    "opened",
    "accepted",
    "rejected",
    "pending",
    "ready",
    "running",
    "blocked",
    "idle",
    "active",
    "expired",
    "valid",
    "invalid",
    "user",
    "account",
    "order",
    "invoice",
    "payment",
    "customer",
    "product",
    "item",
    "price",
    "quantity",
    "total",
    "index",
    "table",
    "row",
    "column",
    "query",
    "commit",
    "rollback",
    "transaction",
    "snapshot",
    "checkpoint",
    "restore",
    "migrate",
    "node",
    "cluster",
    "replica",
    "leader",
    "follower",
    "term",
    "vote",
    "log",
    "entry",
    "offset",
    "length",
    "size",
    "count",
    "limit",
    "batch",
    "chunk",
    "block",
    "sector",
    "device",
    "volume",
    "mount",
    "path",
    "config",
    "option",
    "value",
    "key",
    "map",
    "list",
    "set",
    "string",
    "number",
    "object",
    "array",
    "null",
    "true",
    "false",
    "json",
    "http",
    "tcp",
    "udp",
    "tls",
    "certificate",
    "token",
    "cookie",
    "header",
    "metrics",
    "latency",
    "throughput",
    "bytes",
    "seconds",
    "millis",
    "percent",
    "ratio",
];
/// Log messages come from a fixed set of templates, as real log lines do.
const MESSAGES: &[&str] = &[
    "request handled",
    "connection accepted from peer",
    "connection closed by peer",
    "cache miss, fetching from backend",
    "cache entry expired",
    "retrying after timeout",
    "worker thread started",
    "worker thread idle, parking",
    "transaction committed",
    "transaction rolled back after conflict",
    "snapshot written to disk",
    "session token refreshed",
    "payment authorized",
    "order queued for processing",
    "slow query detected",
    "buffer pool resized",
    "gc cycle finished",
    "heartbeat sent to leader",
    "lease renewed",
    "config reloaded",
    "tls handshake completed",
    "rate limit reached, backing off",
    "file descriptor limit close",
    "metrics flushed",
];
const LEVELS: &[&str] = &[
    "TRACE", "DEBUG", "INFO ", "INFO ", "INFO ", "WARN ", "ERROR",
];
const STATES: &[&str] = &["running", "idle", "blocked", "stopped", "pending", "ready"];
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Produces an endless, never-repeating stream of printable text: log lines, prose and
/// key/value records, mixed line by line, with fresh numbers, hex addresses and timestamps.
#[derive(Debug)]
struct TextGen {
    rng: Rng,
    /// Microseconds of the fake log clock; moves forward a little every log line.
    clock_us: u64,
    /// Carry-over: text generated past the end of the last fill.
    pending: Vec<u8>,
}

impl TextGen {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::with_seed(seed);
        let clock_us = 1_700_000_000_000_000 + rng.u64(0..1 << 40);
        TextGen {
            rng,
            clock_us,
            pending: Vec::with_capacity(MAX_RUN_PAGES as usize * PAGE_SIZE + 512),
        }
    }

    /// Fills `out` with the next bytes of the text stream.
    fn fill(&mut self, out: &mut [u8]) {
        while self.pending.len() < out.len() {
            self.line();
        }
        out.copy_from_slice(&self.pending[..out.len()]);
        self.pending.drain(..out.len());
    }

    fn line(&mut self) {
        match self.rng.u32(0..10) {
            0..=4 => self.log_line(),
            5..=7 => self.prose_line(),
            _ => self.record_line(),
        }
    }

    /// A word of the vocabulary, the first ones more often (as in real text).
    fn word(&mut self) -> &'static str {
        let (a, b) = (self.rng.usize(..WORDS.len()), self.rng.usize(..WORDS.len()));
        WORDS[a.min(b)]
    }

    fn log_line(&mut self) {
        self.clock_us += self.rng.u64(0..20_000);
        let secs = self.clock_us / 1_000_000;
        let (day_secs, micros) = (secs % 86_400, self.clock_us % 1_000_000);
        self.push(b"2024-05-17T");
        self.dec_padded(day_secs / 3600, 2);
        self.push(b":");
        self.dec_padded(day_secs / 60 % 60, 2);
        self.push(b":");
        self.dec_padded(day_secs % 60, 2);
        self.push(b".");
        self.dec_padded(micros, 6);
        self.push(b"Z ");
        let level = LEVELS[self.rng.usize(..LEVELS.len())];
        self.push(level.as_bytes());
        self.push(b" ");
        let component = self.word();
        self.push(component.as_bytes());
        self.push(b"[");
        let tid = self.rng.u64(1..64);
        self.dec(tid);
        self.push(b"] ");
        let message = MESSAGES[self.rng.usize(..MESSAGES.len())];
        self.push(message.as_bytes());
        self.push(b" ");
        // Heap addresses share their high digits and are 16-byte aligned.
        self.push(b"addr=0x7f3a");
        let addr = self.rng.u64(0..1 << 24) << 4;
        self.hex(addr, 8);
        self.push(b" id=");
        let id = self.rng.u64(0..100_000);
        self.dec(id);
        self.push(b" took=");
        let took = self.rng.u64(0..2_000);
        self.dec(took);
        self.push(b"us\n");
    }

    fn prose_line(&mut self) {
        let words = self.rng.usize(6..16);
        for i in 0..words {
            let w = self.word();
            self.push(w.as_bytes());
            if self.rng.u32(0..8) == 0 {
                let n = self.rng.u64(0..100_000);
                self.push(b" ");
                self.dec(n);
            }
            self.push(if i + 1 == words { b".\n" } else { b" " });
        }
    }

    fn record_line(&mut self) {
        self.push(b"{\"id\":");
        let id = self.rng.u64(0..1_000_000);
        self.dec(id);
        self.push(b",\"name\":\"");
        let (a, b) = (self.word(), self.word());
        self.push(a.as_bytes());
        self.push(b"-");
        self.push(b.as_bytes());
        self.push(b"\",\"state\":\"");
        let state = STATES[self.rng.usize(..STATES.len())];
        self.push(state.as_bytes());
        self.push(b"\",\"mem\":");
        let mem = self.rng.u64(0..1 << 16) * 4096;
        self.dec(mem);
        self.push(b",\"cpu\":");
        let cpu = self.rng.u64(0..100);
        self.dec(cpu);
        self.push(b".");
        let frac = self.rng.u64(0..10);
        self.dec(frac);
        self.push(b",\"tags\":[\"");
        let tag = self.word();
        self.push(tag.as_bytes());
        self.push(b"\"]}\n");
    }

    fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    fn dec(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.pending.extend_from_slice(&digits[i..]);
    }

    fn dec_padded(&mut self, n: u64, width: usize) {
        let mut digits = [b'0'; 20];
        let mut n = n;
        for d in digits[..width].iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        self.pending.extend_from_slice(&digits[..width]);
    }

    fn hex(&mut self, n: u64, width: usize) {
        for shift in (0..width).rev() {
            let nibble = (n >> (4 * shift)) & 0xf;
            self.pending.push(HEX[nibble as usize]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(data: &[u8]) -> impl Iterator<Item = &[u8]> {
        data.chunks(PAGE_SIZE)
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let a = checkpoint_like_bytes(8 << 20, 7);
        let b = checkpoint_like_bytes(8 << 20, 7);
        let c = checkpoint_like_bytes(8 << 20, 8);
        assert_eq!(a.len(), 8 << 20);
        assert!(a == b, "same seed gave different bytes");
        assert!(a != c, "different seeds gave the same bytes");
        // A size that is no multiple of the page size is honoured exactly, and is a prefix.
        let short = checkpoint_like_bytes(5 * PAGE_SIZE + 123, 7);
        assert_eq!(short.len(), 5 * PAGE_SIZE + 123);
        assert_eq!(&short[..], &a[..short.len()]);
    }

    #[test]
    fn kinds_come_in_the_promised_proportions() {
        let data = checkpoint_like_bytes(256 << 20, 1);
        let mut counts = [0usize; 3];
        for page in pages(&data) {
            counts[PageKind::classify(page) as usize] += 1;
        }
        let total = counts.iter().sum::<usize>() as f64;
        let [zero, text, random] = counts.map(|c| c as f64 / total);
        // ~1000 runs of ~128 pages: each share is within a few points of its expectation.
        assert!((0.33..0.47).contains(&zero), "zero share {zero}");
        assert!((0.23..0.37).contains(&text), "text share {text}");
        assert!((0.23..0.37).contains(&random), "random share {random}");
    }

    #[test]
    fn text_pages_do_not_repeat() {
        let data = checkpoint_like_bytes(32 << 20, 3);
        let mut seen = std::collections::HashSet::new();
        for page in pages(&data).filter(|p| PageKind::classify(p) == PageKind::Text) {
            assert!(seen.insert(blake3::hash(page)), "a text page repeats");
        }
        assert!(seen.len() > 100, "only {} text pages", seen.len());
    }

    #[test]
    fn rewritten_copy_differs_in_about_the_requested_fraction() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let size = (64 << 20) + 100; // a short last page too
        write_checkpoint_like(&src, size, 11).unwrap();
        let rewritten = write_rewritten_copy(&src, &dst, 0.05, 12).unwrap();

        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert_eq!(a.len() as u64, size);
        assert_eq!(b.len() as u64, size);
        let total = a.len().div_ceil(PAGE_SIZE);
        let differing = pages(&a).zip(pages(&b)).filter(|(x, y)| x != y).count();
        assert_eq!(
            differing as u64, rewritten,
            "every rewritten page differs, no other"
        );
        let expected = (total as f64 * 0.05).round() as u64;
        assert_eq!(rewritten, expected);

        // The rewrites come in runs, not as isolated pages all over the file.
        let runs = pages(&a)
            .zip(pages(&b))
            .map(|(x, y)| x != y)
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| !w[0] && w[1])
            .count();
        assert!(runs * 4 < differing, "{runs} runs for {differing} pages");

        // Same seed, same copy.
        let again = dir.path().join("again");
        assert_eq!(
            write_rewritten_copy(&src, &again, 0.05, 12).unwrap(),
            rewritten
        );
        assert!(std::fs::read(&again).unwrap() == b);
    }

    #[test]
    fn rewrite_fraction_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write_checkpoint_like(&src, 10 * PAGE_SIZE as u64, 1).unwrap();
        let dst = dir.path().join("dst");
        assert!(write_rewritten_copy(&src, &dst, 1.5, 1).is_err());
        assert_eq!(write_rewritten_copy(&src, &dst, 1.0, 1).unwrap(), 10);
        assert_eq!(write_rewritten_copy(&src, &dst, 0.0, 1).unwrap(), 0);
    }
}
