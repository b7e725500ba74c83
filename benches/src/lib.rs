//! Shared helpers for the benchmarks: the deterministic checkpoint-like data generator that the
//! criterion micro-benches and the side-by-side `transfer` bench both feed on.

pub mod data;

pub use data::{
    checkpoint_like_bytes, checkpoint_like_to, write_checkpoint_like, write_rewritten_copy,
    PageKind, PAGE_SIZE,
};
