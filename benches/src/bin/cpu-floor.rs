//! `cpu-floor`: how fast could a transfer of the checkpoint-like data be on this machine, at
//! best? It times, each on one thread, the work issue 2 requires of every transfer: cutting the
//! stream (held in memory, copied once into the cutter's buffers as a sender reads its file)
//! with FastCDC and naming every chunk by its blake3 (sender), compressing the non-zero chunks
//! at a zstd level (sender), decompressing them and checking each against its id (receiver),
//! writing the output's non-zero chunks into the page cache (receiver; zero chunks are holes),
//! and sealing and opening the compressed payload in QUIC-sized packets with AES-128-GCM, the
//! AEAD our QUIC connections negotiate (both sides). Nothing else is counted: no QUIC framing
//! or acknowledgements, no sockets, no store. Spread perfectly over the machine's cores, that
//! sum is a floor no real transfer can beat. For the repeat (a copy sent to a receiver that
//! holds the first), the floor is cutting and hashing the whole copy plus writing the output,
//! which the receiver must do whatever it keeps.
//!
//! Given the baseline's time (`--baseline-seconds`, the median `benches/run-transfer.sh`
//! printed in the same session), it prints what issue 2's targets demand next to the floors:
//! first transfer ≤ baseline / 1.5, and repeat ≤ first / 5, both at that first target and,
//! given `--first-seconds`, at our measured first. Timings are printed, never asserted.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use transport::chunker::parallel::{cut_parallel, SEGMENT_LEN};
use transport::codec::{self, Encoding};

/// A lower bound on a transfer's time from its mandatory CPU work, timed in memory.
#[derive(Debug, Parser)]
#[command(name = "cpu-floor", about, long_about = None)]
struct Args {
    /// Size of the generated checkpoint-like data (suffixes K, M, G are powers of 1024).
    #[arg(long, default_value = "1GiB", value_parser = benches::parse_size)]
    size: u64,
    /// Seed of the data generator (the transfer bench's default is 1).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// zstd levels to time the compression at (negative levels are zstd's `--fast=N`).
    #[arg(long = "level", default_values_t = [1, -3], allow_negative_numbers = true)]
    levels: Vec<i32>,
    /// Timed runs of each step; the fastest is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Cores the work could be spread over.
    #[arg(long, default_value_t = 2)]
    cores: u32,
    /// Directory (on disk, as the receiver's output would be) where the output write is timed.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    dir: PathBuf,
    /// The baseline's median time for the same data, from `benches/run-transfer.sh`.
    #[arg(long, value_name = "SECONDS")]
    baseline_seconds: Option<f64>,
    /// Our own first transfer's median time, from the same run of `benches/run-transfer.sh`.
    #[arg(long, value_name = "SECONDS")]
    first_seconds: Option<f64>,
    /// Take both medians, and the data's size and seed, from the JSON report
    /// `benches/run-transfer.sh --json-out FILE` wrote.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["baseline_seconds", "first_seconds"])]
    transfer_json: Option<PathBuf>,
}

/// The median seconds of `tool`'s first transfers in the transfer bench's JSON report, whose
/// `stats` is a list of `[scenario, tool, {"seconds_median": ..}]`.
fn first_transfer_median(report: &serde_json::Value, tool: &str) -> Option<f64> {
    report["stats"].as_array()?.iter().find_map(|row| {
        (row[0] == "first" && row[1] == tool).then(|| row[2]["seconds_median"].as_f64())?
    })
}

/// The fastest of `runs` timings of `step` (a floor errs low: the machine's noise only ever
/// adds time), and what `step` returned.
fn fastest_seconds<T>(runs: u32, mut step: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut fastest = f64::INFINITY;
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        let out = step()?;
        fastest = fastest.min(start.elapsed().as_secs_f64());
        // Dropping the previous run's output is not part of the step.
        last = Some(out);
    }
    Ok((fastest, last.expect("runs >= 1")))
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(path) = &args.transfer_json {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the transfer bench's report {}", path.display()))?;
        let report: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        // The same data as the bench moved: its size and seed.
        if let (Some(size), Some(seed)) = (report["size"].as_u64(), report["seed"].as_u64()) {
            args.size = size;
            args.seed = seed;
        }
        args.baseline_seconds = first_transfer_median(&report, "baseline");
        args.first_seconds = first_transfer_median(&report, "migrate");
        ensure!(
            args.baseline_seconds.is_some(),
            "{} holds no median of the baseline's first transfer: was it written by \
             `benches/run-transfer.sh --json-out`?",
            path.display()
        );
    }
    let size = usize::try_from(args.size).context("--size does not fit in memory")?;
    let cores = f64::from(args.cores);
    eprintln!("generating {} MiB of checkpoint-like data", size >> 20);
    let data = benches::data::checkpoint_like_bytes(size, args.seed);

    // Cutting and naming, as the sender does it but on one thread: every chunk's offset, id
    // and zero flag.
    let read_at = |buf: &mut [u8], offset: u64| -> std::io::Result<()> {
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    };
    let (cut, spans) = fastest_seconds(args.runs, || {
        let mut spans = Vec::new();
        cut_parallel(
            args.size,
            &read_at,
            1,
            SEGMENT_LEN,
            Default::default(),
            |offset, entry| {
                spans.push((offset as usize, entry));
                true
            },
        )
        .context("cutting the in-memory data")?;
        Ok(spans)
    })?;
    let nonzero: Vec<_> = spans.iter().filter(|(_, e)| !e.zero).collect();
    let nonzero_bytes: usize = nonzero.iter().map(|(_, e)| e.len as usize).sum();
    println!(
        "data: {} MiB, {} chunks, {} non-zero ({} MiB)",
        size >> 20,
        spans.len(),
        nonzero.len(),
        nonzero_bytes >> 20
    );
    println!("cut + blake3 of every chunk, 1 thread: {cut:.3} s");

    // The output write, on disk like the receiver's: page cache only, no fsync, and only the
    // non-zero chunks (a zero chunk is a hole, as our receiver leaves it).
    let out_path = args
        .dir
        .join(format!("cpu-floor-{}.out", std::process::id()));
    let (write, ()) = fastest_seconds(args.runs, || {
        let out =
            File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
        for (offset, e) in &nonzero {
            out.write_all_at(&data[*offset..*offset + e.len as usize], *offset as u64)
                .with_context(|| format!("writing {}", out_path.display()))?;
        }
        out.set_len(args.size)
            .with_context(|| format!("sizing {}", out_path.display()))?;
        Ok(())
    })?;
    std::fs::remove_file(&out_path).with_context(|| format!("removing {}", out_path.display()))?;
    println!(
        "writing the output's non-zero chunks ({} MiB) to {}: {write:.3} s",
        nonzero_bytes >> 20,
        args.dir.display()
    );

    let repeat_floor = (cut + write) / cores;
    println!(
        "repeat floor, (cut + write) / {} cores: {repeat_floor:.3} s",
        args.cores
    );
    if let Some(first) = args.first_seconds {
        println!(
            "  target: repeat ≤ our first {first:.3} s / 5 = {:.3} s: {}",
            first / 5.0,
            verdict(repeat_floor, first / 5.0)
        );
    }
    for &level in &args.levels {
        let (encode, encoded) = fastest_seconds(args.runs, || {
            Ok(nonzero
                .iter()
                .map(|(offset, e)| codec::encode(&data[*offset..*offset + e.len as usize], level))
                .collect::<Vec<_>>())
        })?;
        let wire: usize = encoded.iter().map(|e| e.payload.len()).sum();
        let (decode, ()) = fastest_seconds(args.runs, || {
            for ((_, entry), enc) in nonzero.iter().zip(&encoded) {
                let raw = codec::decode_verified(&entry.id, entry.len, enc.encoding, &enc.payload)
                    .context("decoding a chunk just encoded")?;
                ensure!(raw.len() == entry.len as usize, "decoded length differs");
            }
            Ok(())
        })?;
        let kept_raw = encoded
            .iter()
            .filter(|e| e.encoding == Encoding::Raw)
            .count();
        let (aead, ()) = fastest_seconds(args.runs, || seal_and_open(&encoded))?;
        let first_floor = (cut + encode + decode + write + aead) / cores;
        println!(
            "level {level}: encode {encode:.3} s, decode + verify {decode:.3} s, \
             seal + open {aead:.3} s, {kept_raw} chunks kept raw, payload {:.1} % of the input",
            100.0 * wire as f64 / size as f64
        );
        println!(
            "  first-transfer floor, (cut + encode + decode + write + seal + open) / {} cores: \
             {first_floor:.3} s",
            args.cores
        );
        let unwritten = first_floor - write / cores;
        println!("  the same without the output's write (as if it cost nothing): {unwritten:.3} s");
        if let Some(baseline) = args.baseline_seconds {
            let first_target = baseline / 1.5;
            println!(
                "  target: first ≤ baseline {baseline:.3} s / 1.5 = {first_target:.3} s: {}",
                verdict(first_floor, first_target)
            );
            println!(
                "  target: repeat ≤ first / 5 ≤ {:.3} s (at the first target): {}",
                first_target / 5.0,
                verdict(repeat_floor, first_target / 5.0)
            );
        }
    }
    Ok(())
}

/// Seals every payload in packets of [`PACKET_PAYLOAD`] bytes with AES-128-GCM, as a QUIC
/// sender does, and opens each packet again, as the receiver does.
fn seal_and_open(payloads: &[codec::Encoded]) -> Result<()> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, &[7u8; 16]).map_err(|_| anyhow::anyhow!("AES key"))?,
    );
    let mut packet = Vec::with_capacity(PACKET_PAYLOAD + AES_128_GCM.tag_len());
    let mut number = 0u64;
    for payload in payloads {
        for piece in payload.payload.chunks(PACKET_PAYLOAD) {
            number += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&number.to_be_bytes());
            packet.clear();
            packet.extend_from_slice(piece);
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut packet,
            )
            .map_err(|_| anyhow::anyhow!("sealing a packet"))?;
            let opened = key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut packet,
                )
                .map_err(|_| anyhow::anyhow!("opening a packet just sealed"))?;
            ensure!(
                opened.len() == piece.len(),
                "opened packet has the wrong length"
            );
        }
    }
    Ok(())
}

/// Payload bytes of one QUIC packet: a 1,500-byte Ethernet MTU less IP, UDP and QUIC headers.
const PACKET_PAYLOAD: usize = 1400;

/// Whether a floor leaves room under a target.
fn verdict(floor: f64, target: f64) -> String {
    if floor <= target {
        format!("the floor {floor:.3} s leaves room")
    } else {
        format!(
            "out of reach, the floor alone is {:.2}× the target",
            floor / target
        )
    }
}
