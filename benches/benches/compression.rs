//! Throughput of the per-chunk codec: `transport::codec::encode` at zstd levels 1 and 3, and
//! `decode_verified` (decompression plus the blake3 check) of the level-1 output, over the
//! chunks the sender would actually encode: 64 MiB of checkpoint-like data cut by the real
//! chunker, all-zero chunks left out (they are never compressed nor sent). Throughput counts
//! the raw bytes of those chunks. The compression ratio of each level is printed once.

use std::hint::black_box;

use benches::{
    micro_bench_data, MICRO_BENCH_MEASUREMENT, MICRO_BENCH_SAMPLES, MICRO_BENCH_WARM_UP,
};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use transport::chunker::{Chunker, Span};
use transport::codec::{decode_verified, encode, Encoded};

fn compression(c: &mut Criterion) {
    let data = micro_bench_data();
    let spans: Vec<Span> = Chunker::new(&data[..])
        .map(|span| span.expect("reading memory cannot fail"))
        .filter(|span| !span.entry.zero)
        .collect();
    let raw_bytes: u64 = spans.iter().map(|s| s.data.len() as u64).sum();
    let encode_all =
        |level: i32| -> Vec<Encoded> { spans.iter().map(|s| encode(&s.data, level)).collect() };
    for level in [1, 3] {
        let wire: usize = encode_all(level).iter().map(|e| e.payload.len()).sum();
        eprintln!(
            "codec level {level}: {} non-zero chunks, {raw_bytes} raw bytes -> {wire} ({:.1}%)",
            spans.len(),
            100.0 * wire as f64 / raw_bytes as f64
        );
    }
    let encoded = encode_all(1);

    let mut group = c.benchmark_group("compression");
    group
        .sample_size(MICRO_BENCH_SAMPLES)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(MICRO_BENCH_MEASUREMENT)
        .warm_up_time(MICRO_BENCH_WARM_UP)
        .throughput(Throughput::Bytes(raw_bytes));
    for level in [1, 3] {
        group.bench_function(format!("encode/level-{level}"), |b| {
            b.iter(|| {
                spans
                    .iter()
                    .map(|s| encode(black_box(&s.data), level).payload.len())
                    .sum::<usize>()
            })
        });
    }
    group.bench_function("decode_verified/level-1", |b| {
        b.iter(|| {
            spans
                .iter()
                .zip(&encoded)
                .map(|(s, e)| {
                    decode_verified(&s.entry.id, s.entry.len, e.encoding, black_box(&e.payload))
                        .expect("a chunk we encoded decodes")
                        .len()
                })
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, compression);
criterion_main!(benches);
