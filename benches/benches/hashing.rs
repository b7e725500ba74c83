//! Throughput of blake3, the content address of every chunk: once over a whole 64 MiB buffer of
//! checkpoint-like data (one long input, where blake3's tree parallelism within a thread
//! shows) and once per 64 KiB piece of it (the average chunk length, as the chunker hashes),
//! in bytes per second.

use std::hint::black_box;

use benches::{
    micro_bench_data, MICRO_BENCH_MEASUREMENT, MICRO_BENCH_SAMPLES, MICRO_BENCH_WARM_UP,
};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use transport::{ChunkId, AVG_CHUNK_LEN};

fn hashing(c: &mut Criterion) {
    let data = micro_bench_data();
    let mut group = c.benchmark_group("hashing");
    group
        .sample_size(MICRO_BENCH_SAMPLES)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(MICRO_BENCH_MEASUREMENT)
        .warm_up_time(MICRO_BENCH_WARM_UP)
        .throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("blake3/whole-64MiB", |b| {
        b.iter(|| blake3::hash(black_box(&data)))
    });
    group.bench_function("blake3/per-64KiB-chunk", |b| {
        b.iter(|| {
            black_box(&data)
                .chunks(AVG_CHUNK_LEN as usize)
                .map(ChunkId::of)
                .fold(0u8, |acc, id| acc ^ id.0[0])
        })
    });
    group.finish();
}

criterion_group!(benches, hashing);
criterion_main!(benches);
