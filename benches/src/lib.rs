//! Shared helpers for the benchmarks: the deterministic checkpoint-like data generator that the
//! criterion micro-benches and the side-by-side `transfer` bench both feed on, and the settings
//! the micro-benches share.

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
