//! `redis-fill`: writes the Redis protocol (RESP) `SET` commands that fill the migration
//! benchmark's redis (`benches/run-migration.sh`), for `redis-cli --pipe` to read on stdin.
//!
//! Keys are `<prefix><index, 8 digits>`. The first half of the values are random bytes
//! (incompressible: think of encrypted or already compressed blobs), the second half printable
//! text: log lines, prose and JSON-like records with fresh numbers in every line, which zstd -1
//! shrinks a few times, not a hundred times. Every byte comes from a [`fastrand::Rng`] seeded by
//! `--seed`, so the same arguments give the same commands, and a new seed gives values that
//! share nothing with the old ones (no chunk store can have seen them before). It generates
//! well over 1 GB/s, so the fill is bounded by redis, not by this program.

use std::io::{self, BufWriter, Write};

use clap::Parser;
use fastrand::Rng;

/// Write RESP `SET` commands for `redis-cli --pipe`: half random values, half text.
#[derive(Debug, Parser)]
#[command(after_help = "Example:
  redis-fill --keys 250000 --value-bytes 4096 --seed 1 | redis-cli --pipe")]
struct Args {
    /// How many keys.
    #[arg(long, default_value_t = 250_000)]
    keys: u64,
    /// Size of every value, in bytes.
    #[arg(long, default_value_t = 4096)]
    value_bytes: usize,
    /// Seed: the same seed gives the same keys and values.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Key prefix.
    #[arg(long, default_value = "key:")]
    prefix: String,
}

/// The vocabulary of prose lines, most frequent first.
const WORDS: &str = "the of and to in is for on with as by at from not request response handler \
    worker thread queue buffer cache session connection socket stream message client server \
    service process memory page error warning failed started stopped closed pending ready running \
    idle expired user account order invoice payment customer product item price quantity total \
    index table query commit transaction snapshot node cluster replica leader offset length count \
    limit batch block volume path config value key list string number object token cookie latency \
    bytes seconds";
const LEVELS: &[&str] = &["DEBUG", "INFO", "INFO", "INFO", "WARN", "ERROR"];
const STATUS: &[&str] = &["200", "200", "200", "201", "204", "304", "404", "500"];

/// An endless stream of text lines; values are cut from it back to back.
struct Text {
    rng: Rng,
    words: Vec<&'static str>,
    clock_ms: u64,
    line: Vec<u8>,
    pos: usize,
}

impl Text {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::with_seed(seed);
        let clock_ms = 1_700_000_000_000 + rng.u64(0..1 << 32);
        Text {
            rng,
            words: WORDS.split_whitespace().collect(),
            clock_ms,
            line: Vec::with_capacity(256),
            pos: 0,
        }
    }

    /// A word, the first ones of the list more often (as in real text).
    fn word(&mut self) -> &'static str {
        let n = self.words.len();
        let (a, b) = (self.rng.usize(..n), self.rng.usize(..n));
        self.words[a.min(b)]
    }

    fn next_line(&mut self) {
        self.line.clear();
        self.pos = 0;
        match self.rng.u8(0..10) {
            0..=4 => {
                self.clock_ms += self.rng.u64(0..50);
                let (s, ms) = (self.clock_ms / 1000 % 86_400, self.clock_ms % 1000);
                let level = LEVELS[self.rng.usize(..LEVELS.len())];
                let (w1, w2, w3) = (self.word(), self.word(), self.word());
                let tid = self.rng.u32(1..64);
                let id = self.rng.u64(..1 << 40);
                let user = self.rng.u32(..1_000_000);
                let status = STATUS[self.rng.usize(..STATUS.len())];
                let dur = self.rng.u32(..5000);
                let _ = writeln!(
                    self.line,
                    "2024-05-17T{:02}:{:02}:{:02}.{ms:03}Z {level} {w1}[{tid}] {w2} {w3} \
                     id={id:x} user=u{user} path=/api/v1/{w1}s/{} status={status} dur_ms={dur}",
                    s / 3600,
                    s / 60 % 60,
                    s % 60,
                    id % 100_000,
                );
            }
            5..=7 => {
                let n = self.rng.usize(6..18);
                for i in 0..n {
                    let w = self.word();
                    if i > 0 {
                        self.line.push(b' ');
                    }
                    self.line.extend_from_slice(w.as_bytes());
                }
                self.line.extend_from_slice(b".\n");
            }
            _ => {
                let id = self.rng.u32(..10_000_000);
                let (name, w) = (self.word(), self.word());
                let cents = self.rng.u32(..1_000_000);
                let qty = self.rng.u32(1..100);
                let at = self.clock_ms / 1000 - self.rng.u64(..10_000_000);
                let _ = writeln!(
                    self.line,
                    "{{\"id\":{id},\"name\":\"{name}-{}\",\"email\":\"{w}{}@example.com\",\
                     \"price\":{}.{:02},\"qty\":{qty},\"updated_at\":{at}}}",
                    id % 977,
                    id % 10_007,
                    cents / 100,
                    cents % 100,
                );
            }
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            if self.pos == self.line.len() {
                self.next_line();
            }
            let n = (out.len() - done).min(self.line.len() - self.pos);
            out[done..done + n].copy_from_slice(&self.line[self.pos..self.pos + n]);
            self.pos += n;
            done += n;
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rng = Rng::with_seed(args.seed);
    let mut text = Text::new(rng.u64(..));
    let mut out = BufWriter::with_capacity(1 << 20, io::stdout().lock());
    let mut value = vec![0u8; args.value_bytes];
    let mut key = Vec::with_capacity(args.prefix.len() + 16);
    for i in 0..args.keys {
        key.clear();
        write!(key, "{}{i:08}", args.prefix)?;
        if i < args.keys / 2 {
            rng.fill(&mut value);
        } else {
            text.fill(&mut value);
        }
        write!(out, "*3\r\n$3\r\nSET\r\n${}\r\n", key.len())?;
        out.write_all(&key)?;
        write!(out, "\r\n${}\r\n", value.len())?;
        out.write_all(&value)?;
        out.write_all(b"\r\n")?;
    }
    out.flush()?;
    Ok(())
}
