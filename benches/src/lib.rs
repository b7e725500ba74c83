//! Shared helpers for the benchmarks: the deterministic checkpoint-like data generator that the
//! criterion micro-benches and the side-by-side `transfer` bench both feed on, the settings
//! the micro-benches share, and the size parser of the bench binaries.

pub mod data;

use std::time::Duration;

pub use data::{
    checkpoint_like_bytes, checkpoint_like_to, write_checkpoint_like, write_rewritten_copy,
    PageKind, PAGE_SIZE,
};

/// How much data each criterion micro-bench chews through per iteration.
pub const MICRO_BENCH_LEN: usize = 64 << 20;
/// Seed of the micro-benches' data: the same bytes in every bench and every run.
pub const MICRO_BENCH_SEED: u64 = 0x5eed;

/// The micro-benches' input: [`MICRO_BENCH_LEN`] bytes of checkpoint-like data, in memory.
pub fn micro_bench_data() -> Vec<u8> {
    checkpoint_like_bytes(MICRO_BENCH_LEN, MICRO_BENCH_SEED)
}

/// Measurement time of one micro-bench. An iteration takes tens to hundreds of milliseconds,
/// so ten flat samples fit in a few seconds and `cargo bench -p benches` ends in minutes.
pub const MICRO_BENCH_MEASUREMENT: Duration = Duration::from_secs(4);
/// Warm-up time of one micro-bench.
pub const MICRO_BENCH_WARM_UP: Duration = Duration::from_secs(1);
/// Samples per micro-bench: criterion's minimum.
pub const MICRO_BENCH_SAMPLES: usize = 10;

/// Parses `1073741824`, `64M`, `64MiB`, `1G`, `1.5GiB`...: K, M, G, T are powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 64M or 1GiB"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    let bytes = (number * (1u64 << shift) as f64).round();
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("size {s:?} must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64mb"), Ok(64 << 20));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("G").is_err());
    }
}
