//! Throughput of content-defined chunking: `transport::chunker::Chunker` (FastCDC cut points,
//! blake3 of every chunk, zero-chunk detection, one copy per span; no whole-stream hash since
//! wire version 2) over 64 MiB of checkpoint-like data held in memory, in bytes per second.

use std::hint::black_box;

use benches::{
    micro_bench_data, MICRO_BENCH_MEASUREMENT, MICRO_BENCH_SAMPLES, MICRO_BENCH_WARM_UP,
};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use transport::chunker::Chunker;

fn chunker(c: &mut Criterion) {
    let data = micro_bench_data();
    let mut group = c.benchmark_group("chunker");
    group
        .sample_size(MICRO_BENCH_SAMPLES)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(MICRO_BENCH_MEASUREMENT)
        .warm_up_time(MICRO_BENCH_WARM_UP)
        .throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("fastcdc+blake3/64MiB", |b| {
        b.iter(|| {
            let mut chunker = Chunker::new(black_box(&data[..]));
            let mut chunks = 0u32;
            for span in &mut chunker {
                black_box(span.expect("reading memory cannot fail"));
                chunks += 1;
            }
            let len = chunker.finish().expect("whole stream seen");
            assert_eq!(len, data.len() as u64);
            chunks
        })
    });
    group.finish();
}

criterion_group!(benches, chunker);
criterion_main!(benches);
