//! The side-by-side transfer benchmark: the same checkpoint-like data, in one run, through our
//! `migrate send` / `migrate receive` on loopback and through the baseline
//! `zstd -1 -c FILE | TCP | zstd -d -c > OUT`, in three scenarios:
//!
//! 1. first transfer into an empty chunk store (a fresh store per run) vs the baseline;
//! 2. a copy with 5% of its pages rewritten, sent to a receiver whose store already holds the
//!    first file (primed once into a template, copied with `cp -a` before each run) vs the
//!    baseline on the same copy;
//! 3. peak resident memory of each side for one large stream (4 GiB by default).
//!
//! Runs are interleaved (ours, baseline, ours, baseline, ...) so the machine's noise hits both
//! alike; tables report medians and ratios. A run's time is wall clock from spawning the sender
//! until both sides have exited; the receiver is already listening (ours) or already accepted
//! and blocked reading the socket (baseline). Everything else — generating and hashing data,
//! copying stores, checking every output is byte-identical to its input, `sync` — happens
//! outside the timed region. Peak RSS is what `migrate` reports, next to `VmHWM` sampled from
//! `/proc` every 10 ms (the only figure there is for the zstd processes). Baseline wire bytes
//! are the compressed size, measured once per input by a separate `zstd -1` pass.
//!
//! Timings are printed, never asserted: the targets in the table are marked met or missed.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::Value;

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;
/// How often the wait loop samples `/proc/PID/status` for `VmHWM`.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// How long the receiver gets to print its `listening` line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Side-by-side transfer benchmark: `migrate send | receive` vs `zstd -1 | TCP | zstd -d`.
#[derive(Debug, Parser)]
#[command(name = "transfer", about, long_about = None)]
struct Args {
    /// The `migrate` binary [default: `migrate` next to this binary, else
    /// target/release/migrate].
    #[arg(long, value_name = "PATH")]
    migrate: Option<PathBuf>,
    /// The zstd command line tool used by the baseline.
    #[arg(long, value_name = "PATH", default_value = "zstd")]
    zstd: PathBuf,
    /// Size of the data set for scenarios 1 and 2 (suffixes K, M, G, T are powers of 1024).
    #[arg(long, default_value = "1GiB", value_parser = benches::parse_size)]
    size: u64,
    /// Size of the stream for the peak-RSS scenario 3.
    #[arg(long, default_value = "4GiB", value_parser = benches::parse_size)]
    rss_size: u64,
    /// Timed runs per scenario and tool (scenario 3 runs once).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Fraction of pages rewritten in the copy sent in scenario 2.
    #[arg(long, default_value_t = 0.05)]
    rewrite_fraction: f64,
    /// Seed of the data generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to work (on disk, not tmpfs); a temporary directory is made in it and removed at
    /// the end.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    dir: PathBuf,
    /// Keep the generated data in DIR/transfer-bench-data and reuse it next time.
    #[arg(long)]
    keep_data: bool,
    /// Write every raw figure as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// zstd level of `migrate send` (negative levels are zstd's `--fast=N`).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    level: i32,
    /// Run only the zstd baseline (no `migrate` needed).
    #[arg(long)]
    baseline_only: bool,
    /// Skip scenario 3 (the large peak-RSS stream).
    #[arg(long)]
    skip_rss: bool,
    /// Give up on a transfer (and kill its processes) after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    timeout: u64,
}

/// One input file, generated (or found in the cache) and hashed.
#[derive(Debug, Clone, Serialize)]
struct Input {
    name: &'static str,
    path: PathBuf,
    size: u64,
    blake3: String,
    /// Pages rewritten relative to the first file (scenario 2's copy only).
    pages_rewritten: Option<u64>,
    /// Size of `zstd -1 -c FILE`: what the baseline puts on the wire.
    baseline_wire_bytes: Option<u64>,
}

/// The raw figures of one timed transfer.
#[derive(Debug, Clone, Default, Serialize)]
struct RunRecord {
    scenario: &'static str,
    tool: &'static str,
    run: u32,
    seconds: f64,
    input_bytes: u64,
    wire_bytes: Option<u64>,
    chunks: Option<u64>,
    chunks_reused: Option<u64>,
    chunks_received: Option<u64>,
    bytes_written: Option<u64>,
    /// `seconds` as the sender itself reports it.
    sender_reported_seconds: Option<f64>,
    sender_peak_rss_reported: Option<u64>,
    receiver_peak_rss_reported: Option<u64>,
    sender_peak_rss_sampled: Option<u64>,
    receiver_peak_rss_sampled: Option<u64>,
    sender_json: Option<Value>,
    receiver_json: Option<Value>,
}

impl RunRecord {
    fn sender_rss(&self) -> Option<u64> {
        self.sender_peak_rss_reported
            .or(self.sender_peak_rss_sampled)
    }

    fn receiver_rss(&self) -> Option<u64> {
        self.receiver_peak_rss_reported
            .or(self.receiver_peak_rss_sampled)
    }
}

/// Median, min and max of one scenario and tool.
#[derive(Debug, Clone, Serialize)]
struct Stats {
    runs: usize,
    seconds_median: f64,
    seconds_min: f64,
    seconds_max: f64,
    mb_per_s_median: f64,
    wire_bytes_median: Option<f64>,
    wire_percent_of_input: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct Ratio {
    name: &'static str,
    value: Option<f64>,
    unit: &'static str,
    target: String,
    met: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Report {
    size: u64,
    rss_size: u64,
    runs: u32,
    seed: u64,
    rewrite_fraction: f64,
    baseline_only: bool,
    migrate: Option<PathBuf>,
    level: i32,
    zstd_version: String,
    inputs: Vec<Input>,
    runs_raw: Vec<RunRecord>,
    stats: Vec<(String, String, Stats)>,
    ratios: Vec<Ratio>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        (0.0..=1.0).contains(&args.rewrite_fraction),
        "--rewrite-fraction must be within 0..=1"
    );
    let migrate = if args.baseline_only {
        None
    } else {
        Some(find_migrate(args.migrate.as_deref())?)
    };
    let zstd_version = zstd_version(&args.zstd)?;

    fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    warn_if_tmpfs(&args.dir);
    let work = tempfile::Builder::new()
        .prefix("transfer-bench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("making a work directory in {}", args.dir.display()))?;
    let data_dir = if args.keep_data {
        args.dir.join("transfer-bench-data")
    } else {
        work.path().join("data")
    };
    fs::create_dir_all(&data_dir)?;
    let bench = Bench {
        args: &args,
        migrate: migrate.clone(),
        work: work.path().to_path_buf(),
        timeout: Duration::from_secs(args.timeout),
    };

    // Inputs, generated or reused, hashed; all outside any timed region.
    let first = bench.checkpoint_input("first", &data_dir, args.size)?;
    let repeat = bench.rewritten_input(&data_dir, &first)?;
    let rss = if args.skip_rss {
        None
    } else {
        Some(bench.checkpoint_input("rss", &data_dir, args.rss_size)?)
    };
    let mut inputs = vec![first.clone(), repeat.clone()];
    inputs.extend(rss.clone());
    for input in &mut inputs[..2] {
        input.baseline_wire_bytes = Some(bench.zstd_compressed_size(&input.path)?);
    }
    let (first, repeat) = (inputs[0].clone(), inputs[1].clone());

    let certs = match &migrate {
        Some(migrate) => Some(make_certs(migrate, &bench.work)?),
        None => None,
    };
    let mut records = Vec::new();

    // Scenario 1: first transfer into an empty store.
    for run in 1..=args.runs {
        if let Some(certs) = &certs {
            let store = bench.work.join(format!("store-first-{run}"));
            let rec = bench.ours("first", run, &first, &store, None, certs)?;
            records.push(rec);
        }
        records.push(bench.baseline("first", run, &first)?);
    }

    // Scenario 2: the rewritten copy, into a store primed with the first file.
    if let Some(certs) = &certs {
        let template = bench.work.join("store-template");
        eprintln!("priming the template store with the first file");
        bench.ours("prime", 0, &first, &template, None, certs)?;
        for run in 1..=args.runs {
            let store = bench.work.join(format!("store-repeat-{run}"));
            records.push(bench.ours("repeat", run, &repeat, &store, Some(&template), certs)?);
            records.push(bench.baseline("repeat", run, &repeat)?);
        }
        remove(&template)?;
    } else {
        for run in 1..=args.runs {
            records.push(bench.baseline("repeat", run, &repeat)?);
        }
    }

    // Scenario 3: peak RSS of each side on one large stream.
    if let Some(rss) = &rss {
        if let Some(certs) = &certs {
            let store = bench.work.join("store-rss");
            records.push(bench.ours("rss", 1, rss, &store, None, certs)?);
        }
        records.push(bench.baseline("rss", 1, rss)?);
    }

    let (stats, ratios) = summarize(&records, &repeat);
    print_tables(&args, &zstd_version, &inputs, &records, &stats, &ratios);

    if let Some(path) = &args.json_out {
        let report = Report {
            size: args.size,
            rss_size: args.rss_size,
            runs: args.runs,
            seed: args.seed,
            rewrite_fraction: args.rewrite_fraction,
            baseline_only: args.baseline_only,
            level: args.level,
            migrate,
            zstd_version,
            inputs,
            runs_raw: records,
            stats,
            ratios,
        };
        let json = serde_json::to_string_pretty(&report)?;
        fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("raw figures written to {}", path.display());
    }
    work.close().context("removing the work directory")?;
    Ok(())
}

/// The `migrate` binary: the given path, else `migrate` beside this executable (both come out
/// of the same `cargo build --release`), else `target/release/migrate`.
fn find_migrate(given: Option<&Path>) -> Result<PathBuf> {
    let candidate = match given {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join("migrate")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("target/release/migrate")),
    };
    ensure!(
        candidate.is_file(),
        "no migrate binary at {} (build it with `cargo build --release -p cli`, pass --migrate \
         PATH, or use --baseline-only)",
        candidate.display()
    );
    Ok(candidate.canonicalize()?)
}

fn zstd_version(zstd: &Path) -> Result<String> {
    let out = Command::new(zstd)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "running {} --version (install zstd: apt-get install -y zstd)",
                zstd.display()
            )
        })?;
    ensure!(out.status.success(), "{} --version failed", zstd.display());
    // "*** Zstandard CLI (64-bit) v1.5.4, by Yann Collet ***" -> "zstd 1.5.4".
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split(|c: char| c.is_whitespace() || c == ',')
        .find_map(|w| {
            w.strip_prefix('v')
                .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        });
    Ok(match version {
        Some(v) => format!("zstd {v}"),
        None => text.trim().to_string(),
    })
}

/// Prints a warning when `dir` is on tmpfs: memory-backed files make disk-bound sides look
/// faster than they are and eat into the memory being measured.
fn warn_if_tmpfs(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
        return;
    };
    let fstype = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            dir.starts_with(mount).then_some((mount.len(), fstype))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fstype)| fstype);
    if fstype == Some("tmpfs") {
        eprintln!(
            "warning: {} is on tmpfs; pass --dir on a disk for meaningful figures",
            dir.display()
        );
    }
}

/// `migrate certs init` for a sender and a receiver; returns the directory holding both.
fn make_certs(migrate: &Path, work: &Path) -> Result<PathBuf> {
    let dir = work.join("certs");
    let out = Command::new(migrate)
        .args(["certs", "init", "--out"])
        .arg(&dir)
        .args(["--name", "sender", "--name", "receiver"])
        .output()
        .context("running migrate certs init")?;
    ensure!(
        out.status.success(),
        "migrate certs init failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(dir)
}

struct Bench<'a> {
    args: &'a Args,
    migrate: Option<PathBuf>,
    work: PathBuf,
    timeout: Duration,
}

impl Bench<'_> {
    /// The checkpoint-like file of `size` bytes for the bench's seed, from the cache or new.
    fn checkpoint_input(&self, name: &'static str, dir: &Path, size: u64) -> Result<Input> {
        let path = dir.join(format!("checkpoint-{size}-s{}.bin", self.args.seed));
        cached(&path, size, |tmp| {
            eprintln!("generating {} of checkpoint-like data", fmt_size(size));
            benches::write_checkpoint_like(tmp, size, self.args.seed)
        })?;
        hashed_input(name, path, None)
    }

    /// The copy of `first` with `--rewrite-fraction` of its pages rewritten.
    fn rewritten_input(&self, dir: &Path, first: &Input) -> Result<Input> {
        let fraction = self.args.rewrite_fraction;
        let stem = format!("rewritten-{}-s{}-f{fraction}", first.size, self.args.seed);
        let path = dir.join(format!("{stem}.bin"));
        let count_path = dir.join(format!("{stem}.pages"));
        let mut pages = None;
        cached(&path, first.size, |tmp| {
            eprintln!(
                "writing the copy with {:.1}% of pages rewritten",
                fraction * 100.0
            );
            let n = benches::write_rewritten_copy(&first.path, tmp, fraction, !self.args.seed)?;
            fs::write(&count_path, n.to_string())?;
            pages = Some(n);
            Ok(())
        })?;
        let pages = pages.or_else(|| fs::read_to_string(&count_path).ok()?.trim().parse().ok());
        hashed_input("repeat", path, pages)
    }

    /// Size of `zstd -1 -c path`: the bytes the baseline sends over TCP.
    fn zstd_compressed_size(&self, path: &Path) -> Result<u64> {
        let mut child = Command::new(&self.args.zstd)
            .args(["-1", "-q", "-c"])
            .arg(path)
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning zstd to measure the baseline's wire bytes")?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let n = io::copy(&mut stdout, &mut io::sink())?;
        ensure!(
            child.wait()?.success(),
            "zstd -1 -c {} failed",
            path.display()
        );
        Ok(n)
    }

    /// One timed transfer through `migrate receive` and `migrate send`, into `store` (a copy of
    /// `template` when given, else empty); checks the output and removes it and the store.
    /// Scenario `prime` keeps the store: it fills the template.
    fn ours(
        &self,
        scenario: &'static str,
        run: u32,
        input: &Input,
        store: &Path,
        template: Option<&Path>,
        certs: &Path,
    ) -> Result<RunRecord> {
        let migrate = self.migrate.as_deref().expect("not baseline-only");
        let out = self.work.join("out-migrate");
        if let Some(template) = template {
            copy_dir(template, store)?;
        }
        settle();

        let mut command = Command::new(migrate);
        command
            .args(["receive", "--listen", "127.0.0.1:0", "--store"])
            .arg(store)
            .arg("--out")
            .arg(&out)
            .arg("--certs")
            .arg(certs.join("receiver"))
            .arg("--json")
            .stdout(Stdio::piped());
        let mut receiver = Proc::spawn("migrate receive", command, &self.work)?;
        let lines = LineReader::start(receiver.child.stdout.take().expect("piped"));
        let addr = lines
            .listening_addr(LISTEN_TIMEOUT)
            .with_context(|| receiver.failure("did not start listening"))?;

        let mut command = Command::new(migrate);
        command
            .arg("send")
            .arg(&input.path)
            .args(["--to", &addr, "--certs"])
            .arg(certs.join("sender"))
            .arg(format!("--level={}", self.args.level))
            .arg("--json")
            .stdout(Stdio::piped());
        let start = Instant::now();
        let mut sender = Proc::spawn("migrate send", command, &self.work)?;
        let sender_out = LineReader::start(sender.child.stdout.take().expect("piped"));
        let end = wait_all(&mut [&mut sender, &mut receiver], start + self.timeout)?;
        let seconds = (end - start).as_secs_f64();
        for proc in [&sender, &receiver] {
            ensure!(
                proc.succeeded(),
                "{}",
                proc.failure(&format!("failed in {scenario} run {run}"))
            );
        }

        let sent = last_object(&sender_out.finish(), None)
            .ok_or_else(|| anyhow!("migrate send printed no JSON object"))?;
        let received = last_object(&lines.finish(), Some("bytes_written"))
            .ok_or_else(|| anyhow!("migrate receive printed no final JSON line"))?;
        verify(&out, input, "migrate")?;
        remove(&out)?;
        if scenario != "prime" {
            remove(store)?;
        }

        let rec = RunRecord {
            scenario,
            tool: "migrate",
            run,
            seconds,
            input_bytes: input.size,
            wire_bytes: get_u64(&sent, "wire_bytes"),
            chunks: get_u64(&sent, "chunks"),
            chunks_reused: get_u64(&sent, "chunks_reused"),
            chunks_received: get_u64(&received, "chunks_received"),
            bytes_written: get_u64(&received, "bytes_written"),
            sender_reported_seconds: sent.get("seconds").and_then(Value::as_f64),
            sender_peak_rss_reported: get_u64(&sent, "peak_rss_bytes"),
            receiver_peak_rss_reported: get_u64(&received, "peak_rss_bytes"),
            sender_peak_rss_sampled: sender.peak_hwm,
            receiver_peak_rss_sampled: receiver.peak_hwm,
            sender_json: Some(sent),
            receiver_json: Some(received),
        };
        progress(&rec);
        Ok(rec)
    }

    /// One timed transfer through `zstd -1 -c FILE | TCP | zstd -d -c > OUT`; checks the
    /// output and removes it.
    fn baseline(&self, scenario: &'static str, run: u32, input: &Input) -> Result<RunRecord> {
        let out_path = self.work.join("out-baseline");
        settle();

        // The receiving side is set up first, as a listening receiver would be: connected,
        // accepted, and the decompressor blocked reading the socket.
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let to_receiver = TcpStream::connect(listener.local_addr()?)?;
        let (from_sender, _) = listener.accept()?;
        drop(listener);
        let mut command = Command::new(&self.args.zstd);
        command
            .args(["-d", "-q", "-c"])
            .stdin(Stdio::from(OwnedFd::from(from_sender)))
            .stdout(File::create(&out_path)?);
        let mut decompressor = Proc::spawn("zstd -d", command, &self.work)?;

        let mut command = Command::new(&self.args.zstd);
        command
            .args(["-1", "-q", "-c"])
            .arg(&input.path)
            .stdout(Stdio::from(OwnedFd::from(to_receiver)));
        let start = Instant::now();
        let mut compressor = Proc::spawn("zstd -1", command, &self.work)?;
        let end = wait_all(
            &mut [&mut compressor, &mut decompressor],
            start + self.timeout,
        )?;
        let seconds = (end - start).as_secs_f64();
        for proc in [&compressor, &decompressor] {
            ensure!(
                proc.succeeded(),
                "{}",
                proc.failure(&format!("failed in {scenario} run {run}"))
            );
        }
        verify(&out_path, input, "baseline")?;
        remove(&out_path)?;

        let rec = RunRecord {
            scenario,
            tool: "baseline",
            run,
            seconds,
            input_bytes: input.size,
            wire_bytes: input.baseline_wire_bytes,
            bytes_written: Some(input.size),
            sender_peak_rss_sampled: compressor.peak_hwm,
            receiver_peak_rss_sampled: decompressor.peak_hwm,
            ..RunRecord::default()
        };
        progress(&rec);
        Ok(rec)
    }
}

/// Makes `path` (of exactly `size` bytes) with `make` unless it is already there: `make`
/// writes a temporary name that is renamed into place only once complete, so an interrupted
/// run never leaves a truncated file to be reused.
fn cached(path: &Path, size: u64, make: impl FnOnce(&Path) -> io::Result<()>) -> Result<()> {
    if fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size) {
        eprintln!("reusing {}", path.display());
        return Ok(());
    }
    let tmp = path.with_extension("partial");
    let start = Instant::now();
    make(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)?;
    eprintln!(
        "  {} in {:.1} s",
        path.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn hashed_input(name: &'static str, path: PathBuf, pages_rewritten: Option<u64>) -> Result<Input> {
    let (size, hash) = hash_file(&path)?;
    Ok(Input {
        name,
        path,
        size,
        blake3: hash.to_hex().to_string(),
        pages_rewritten,
        baseline_wire_bytes: None,
    })
}

fn hash_file(path: &Path) -> Result<(u64, blake3::Hash)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file)?;
    Ok((size, hasher.finalize()))
}

/// Fails unless `out` is byte-identical to `input` (same length and blake3).
fn verify(out: &Path, input: &Input, tool: &str) -> Result<()> {
    let (size, hash) = hash_file(out).with_context(|| format!("{tool} wrote no output"))?;
    ensure!(
        size == input.size && hash.to_hex().as_str() == input.blake3,
        "{tool}: output {} ({size} bytes, blake3 {}) differs from input {} ({} bytes, blake3 {})",
        out.display(),
        &hash.to_hex()[..16],
        input.path.display(),
        input.size,
        &input.blake3[..16],
    );
    Ok(())
}

/// Flushes dirty pages left by the previous run (outputs, copied stores) so their writeback
/// does not land in the next timed region.
fn settle() {
    let _ = Command::new("sync").status();
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .context("running cp -a")?;
    ensure!(
        status.success(),
        "cp -a {} {} failed",
        from.display(),
        to.display()
    );
    Ok(())
}

fn remove(path: &Path) -> Result<()> {
    let result = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// A spawned child, killed if dropped while still running, with its stderr in a log file and
/// the highest `VmHWM` seen while it ran.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
    exited_at: Option<Instant>,
    peak_hwm: Option<u64>,
}

impl Proc {
    /// Spawns `command` with stderr to a log file. The
    /// command is consumed so that the parent's copies of any sockets handed to the child as
    /// stdin or stdout are closed as soon as it is spawned: otherwise the other side would
    /// never see end of stream.
    fn spawn(name: &'static str, mut command: Command, work: &Path) -> Result<Proc> {
        let log = work.join(format!("{}.log", name.replace(' ', "-")));
        command.stderr(File::create(&log)?);
        let child = command.spawn().with_context(|| {
            format!(
                "spawning {name} ({})",
                command.get_program().to_string_lossy()
            )
        })?;
        drop(command);
        Ok(Proc {
            name,
            child,
            log,
            status: None,
            exited_at: None,
            peak_hwm: None,
        })
    }

    fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// What went wrong, with the exit status and the tail of the child's stderr.
    fn failure(&self, what: &str) -> String {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "still running".to_string(),
        };
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{} {what} ({status}); its stderr ends with:\n{}",
            self.name,
            tail.join("\n")
        )
    }

    fn sample_hwm(&mut self) {
        let path = format!("/proc/{}/status", self.child.id());
        let Ok(status) = fs::read_to_string(path) else {
            return;
        };
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024);
        if let Some(hwm) = hwm {
            self.peak_hwm = Some(self.peak_hwm.unwrap_or(0).max(hwm));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for every process to exit, polling each millisecond and sampling their `VmHWM` every
/// [`SAMPLE_EVERY`]; returns when the last one exited. Fails as soon as one exits with an
/// error, and kills them all (by dropping them) then or at `deadline`.
fn wait_all(procs: &mut [&mut Proc], deadline: Instant) -> Result<Instant> {
    let mut next_sample = Instant::now();
    loop {
        let now = Instant::now();
        let sample = now >= next_sample;
        if sample {
            next_sample = now + SAMPLE_EVERY;
        }
        let mut running = 0;
        for proc in procs.iter_mut().filter(|p| p.status.is_none()) {
            if sample {
                proc.sample_hwm();
            }
            match proc.child.try_wait()? {
                Some(status) => {
                    proc.status = Some(status);
                    proc.exited_at = Some(Instant::now());
                }
                None => running += 1,
            }
        }
        if running == 0 {
            let last = procs.iter().filter_map(|p| p.exited_at).max();
            return Ok(last.expect("at least one process"));
        }
        // One side failed: the other would only wait for it until the deadline.
        if let Some(failed) = procs
            .iter()
            .find(|p| p.status.is_some_and(|s| !s.success()))
        {
            bail!("{}", failed.failure("failed while its peer still ran"));
        }
        if now >= deadline {
            let stuck: Vec<&str> = procs
                .iter()
                .filter(|p| p.status.is_none())
                .map(|p| p.name)
                .collect();
            let detail = procs
                .iter()
                .map(|p| p.failure("timed out"))
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "{} still running at the deadline\n{detail}",
                stuck.join(", ")
            );
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Drains a child's stdout on a thread, line by line, so the pipe never fills.
struct LineReader {
    lines: mpsc::Receiver<String>,
    thread: JoinHandle<()>,
}

impl LineReader {
    fn start(stdout: impl Read + Send + 'static) -> Self {
        let (tx, lines) = mpsc::channel();
        let thread = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LineReader { lines, thread }
    }

    /// Waits for the receiver's `{"event":"listening","addr":"..."}` line.
    fn listening_addr(&self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => bail!("no listening line in {timeout:?}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("stdout closed before a listening line")
                }
            };
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v.get("event").and_then(Value::as_str) == Some("listening") {
                let addr = v.get("addr").and_then(Value::as_str);
                return addr
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("listening line without an addr: {line}"));
            }
        }
    }

    /// Every line not consumed yet, once the child has closed its stdout.
    fn finish(self) -> Vec<String> {
        let _ = self.thread.join();
        self.lines.try_iter().collect()
    }
}

/// The last JSON object in `lines` (which may also be one pretty-printed object), optionally
/// the last one with a field `key`.
fn last_object(lines: &[String], key: Option<&str>) -> Option<Value> {
    let text = lines.join("\n");
    serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .filter(|v| v.is_object() && key.is_none_or(|k| v.get(k).is_some()))
        .last()
}

fn get_u64(v: &Value, key: &str) -> Option<u64> {
    let field = v.get(key)?;
    field
        .as_u64()
        .or_else(|| field.as_f64().map(|f| f.round() as u64))
}

fn progress(rec: &RunRecord) {
    let wire = rec
        .wire_bytes
        .map(|w| format!(", wire {:.1}%", 100.0 * w as f64 / rec.input_bytes as f64))
        .unwrap_or_default();
    eprintln!(
        "[{} {}] {:>8}: {:.3} s, {:.0} MB/s{wire}",
        rec.scenario,
        rec.run,
        rec.tool,
        rec.seconds,
        rec.input_bytes as f64 / 1e6 / rec.seconds
    );
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn stats_of(records: &[&RunRecord]) -> Option<Stats> {
    let first = records.first()?;
    let mut seconds: Vec<f64> = records.iter().map(|r| r.seconds).collect();
    let mut wire: Vec<f64> = records
        .iter()
        .filter_map(|r| r.wire_bytes)
        .map(|w| w as f64)
        .collect();
    let seconds_median = median(&mut seconds);
    let wire_bytes_median = (!wire.is_empty()).then(|| median(&mut wire));
    Some(Stats {
        runs: records.len(),
        seconds_median,
        seconds_min: seconds[0],
        seconds_max: seconds[seconds.len() - 1],
        mb_per_s_median: first.input_bytes as f64 / 1e6 / seconds_median,
        wire_bytes_median,
        wire_percent_of_input: wire_bytes_median.map(|w| 100.0 * w / first.input_bytes as f64),
    })
}

type StatsTable = Vec<(String, String, Stats)>;

fn summarize(records: &[RunRecord], repeat: &Input) -> (StatsTable, Vec<Ratio>) {
    let select = |scenario: &str, tool: &str| -> Option<Stats> {
        let picked: Vec<&RunRecord> = records
            .iter()
            .filter(|r| r.scenario == scenario && r.tool == tool)
            .collect();
        stats_of(&picked)
    };
    let mut table = Vec::new();
    for scenario in ["first", "repeat"] {
        for tool in ["migrate", "baseline"] {
            if let Some(s) = select(scenario, tool) {
                table.push((scenario.to_string(), tool.to_string(), s));
            }
        }
    }
    let seconds = |scenario: &str, tool: &str| select(scenario, tool).map(|s| s.seconds_median);
    let (first_ours, first_base) = (seconds("first", "migrate"), seconds("first", "baseline"));
    let repeat_ours = seconds("repeat", "migrate");
    let repeat_wire = select("repeat", "migrate").and_then(|s| s.wire_bytes_median);
    let rss = records
        .iter()
        .find(|r| r.scenario == "rss" && r.tool == "migrate");

    let speedup = |slow: Option<f64>, fast: Option<f64>| Some(slow? / fast?);
    let at_least = |v: Option<f64>, t: f64| v.map(|v| v >= t);
    let at_most = |v: Option<f64>, t: f64| v.map(|v| v <= t);
    let first_speedup = speedup(first_base, first_ours);
    let repeat_pct = repeat_wire.map(|w| 100.0 * w / repeat.size as f64);
    let repeat_speedup = speedup(first_ours, repeat_ours);
    let sender_rss = rss.and_then(RunRecord::sender_rss).map(|b| b as f64 / MIB);
    let receiver_rss = rss
        .and_then(RunRecord::receiver_rss)
        .map(|b| b as f64 / MIB);
    let ratios = vec![
        Ratio {
            name: "first transfer: speedup vs baseline",
            value: first_speedup,
            unit: "x",
            target: ">= 1.5x".into(),
            met: at_least(first_speedup, 1.5),
        },
        Ratio {
            name: "repeat: wire bytes, % of input",
            value: repeat_pct,
            unit: "%",
            target: "<= 10%".into(),
            met: at_most(repeat_pct, 10.0),
        },
        Ratio {
            name: "repeat: speedup vs our first transfer",
            value: repeat_speedup,
            unit: "x",
            target: ">= 5x".into(),
            met: at_least(repeat_speedup, 5.0),
        },
        Ratio {
            name: "peak RSS, sender",
            value: sender_rss,
            unit: "MiB",
            target: "<= 128 MiB".into(),
            met: at_most(sender_rss, 128.0),
        },
        Ratio {
            name: "peak RSS, receiver",
            value: receiver_rss,
            unit: "MiB",
            target: "<= 128 MiB".into(),
            met: at_most(receiver_rss, 128.0),
        },
    ];
    (table, ratios)
}

fn fmt_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= MIB {
        format!("{:.1} MiB", b / MIB)
    } else {
        format!("{bytes} B")
    }
}

fn fmt_mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / MIB))
}

fn print_tables(
    args: &Args,
    zstd_version: &str,
    inputs: &[Input],
    records: &[RunRecord],
    stats: &StatsTable,
    ratios: &[Ratio],
) {
    println!();
    println!(
        "Transfer benchmark: {} checkpoint-like data (seed {}), {} run(s) per scenario and tool, interleaved",
        fmt_size(args.size),
        args.seed,
        args.runs
    );
    println!("baseline: zstd -1 -c FILE | TCP 127.0.0.1 | zstd -d -c > OUT  ({zstd_version})");
    if !args.baseline_only {
        println!(
            "migrate: send --level={} (zstd level of each chunk)",
            args.level
        );
    }
    if let Some(repeat) = inputs.iter().find(|i| i.name == "repeat") {
        if let Some(pages) = repeat.pages_rewritten {
            println!(
                "repeat input: {pages} of {} pages rewritten ({:.1}%)",
                repeat.size.div_ceil(benches::PAGE_SIZE as u64),
                100.0 * pages as f64 / repeat.size.div_ceil(benches::PAGE_SIZE as u64) as f64
            );
        }
    }
    println!("medians; MB = 10^6 bytes; wire % = wire bytes / input bytes");
    println!();
    println!(
        "{:<34} {:<9} {:>9} {:>19} {:>8} {:>14} {:>7}",
        "scenario", "tool", "seconds", "(min - max)", "MB/s", "wire bytes", "wire %"
    );
    for (scenario, tool, s) in stats {
        let label = match scenario.as_str() {
            "first" => "1. first transfer, empty store".to_string(),
            _ => format!(
                "2. {:.0}% rewritten, primed store",
                args.rewrite_fraction * 100.0
            ),
        };
        println!(
            "{:<34} {:<9} {:>9.3} {:>19} {:>8.1} {:>14} {:>7}",
            label,
            tool,
            s.seconds_median,
            format!("({:.3} - {:.3})", s.seconds_min, s.seconds_max),
            s.mb_per_s_median,
            s.wire_bytes_median
                .map_or("-".into(), |w| format!("{w:.0}")),
            s.wire_percent_of_input
                .map_or("-".into(), |p| format!("{p:.1}%")),
        );
    }

    let rss: Vec<&RunRecord> = records.iter().filter(|r| r.scenario == "rss").collect();
    if !rss.is_empty() {
        println!();
        println!(
            "3. peak RSS, one {} stream      {:>16} {:>16} {:>9}",
            fmt_size(args.rss_size),
            "sender",
            "receiver",
            "seconds"
        );
        for r in rss {
            if r.tool == "migrate" {
                println!(
                    "   {:<36} {:>16} {:>16} {:>9.3}",
                    "migrate (self-reported)",
                    fmt_mib(r.sender_peak_rss_reported),
                    fmt_mib(r.receiver_peak_rss_reported),
                    r.seconds
                );
                println!(
                    "   {:<36} {:>16} {:>16}",
                    "migrate (VmHWM sampled)",
                    fmt_mib(r.sender_peak_rss_sampled),
                    fmt_mib(r.receiver_peak_rss_sampled),
                );
            } else {
                println!(
                    "   {:<36} {:>16} {:>16} {:>9.3}",
                    "zstd -1 | zstd -d (VmHWM sampled)",
                    fmt_mib(r.sender_peak_rss_sampled),
                    fmt_mib(r.receiver_peak_rss_sampled),
                    r.seconds
                );
            }
        }
    }

    println!();
    println!("{:<42} {:>12} {:>12}  verdict", "ratio", "value", "target");
    for r in ratios {
        let value = r.value.map_or("-".into(), |v| match r.unit {
            "x" => format!("{v:.2}x"),
            "%" => format!("{v:.1}%"),
            unit => format!("{v:.1} {unit}"),
        });
        let verdict = match r.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        println!("{:<42} {:>12} {:>12}  {verdict}", r.name, value, r.target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn last_object_finds_the_summary_line() {
        let lines = [
            r#"{"event":"listening","addr":"127.0.0.1:1"}"#.to_string(),
            "not json".to_string(),
        ];
        assert_eq!(
            last_object(&lines[..1], Some("bytes_written")),
            None,
            "no summary yet"
        );
        let lines = [
            r#"{"event":"progress","chunks":3}"#.to_string(),
            r#"{"bytes_written":10,"chunks_received":2}"#.to_string(),
        ];
        let v = last_object(&lines, Some("bytes_written")).unwrap();
        assert_eq!(get_u64(&v, "chunks_received"), Some(2));
        // One pretty-printed object over several lines.
        let lines = [
            "{".to_string(),
            r#"  "wire_bytes": 5.0"#.to_string(),
            "}".to_string(),
        ];
        let v = last_object(&lines, None).unwrap();
        assert_eq!(get_u64(&v, "wire_bytes"), Some(5));
    }
}
