//! Hadamard transform throughput in bytes per second, with a memcpy of the same buffer beside
//! each case (ratio = transform / memcpy throughput). Every available path (avx512, avx2, neon,
//! scalar) is benchmarked by name. `cargo bench --bench hadamard`
//!
//! - `block/*`: one block of `n` f32 in place, again and again (in L1/L2: compute-bound).
//! - `rows/*`: 16 MiB of rows of `n` (past L2, as when quantizing a layer), in place.
//!
//! Time is the process's CPU time (`benches/common`, Linux), so other processes on a shared
//! machine do not inflate it.
#![forbid(unsafe_code)]
mod common;

use common::ProcessCpuTime;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use higgs_rs::hadamard;
use higgs_rs::rng::SplitMix64;
use std::hint::black_box;
use std::time::Duration;

const ORDERS: [usize; 7] = [64, 256, 1024, 4096, 576, 1536, 14336];

fn gaussian(len: usize) -> Vec<f32> {
    let mut v = vec![0f32; len];
    SplitMix64::new(42).fill_gaussian(&mut v);
    v
}

fn bench_case(
    c: &mut Criterion<ProcessCpuTime>,
    group_name: &str,
    len_for: impl Fn(usize) -> usize,
) {
    let mut group = c.benchmark_group(group_name);
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    for order in ORDERS {
        let len = len_for(order);
        group.throughput(Throughput::Bytes((len * 4) as u64));
        let src = gaussian(len);
        let mut dst = vec![0f32; len];
        group.bench_function(BenchmarkId::new("memcpy", order), |b| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
        for path in hadamard::available_paths() {
            let mut data = src.clone();
            group.bench_function(BenchmarkId::new(path.name(), order), |b| {
                b.iter(|| hadamard::forward_with(path, black_box(&mut data), order).unwrap())
            });
        }
    }
    group.finish();
}

fn bench_hadamard(c: &mut Criterion<ProcessCpuTime>) {
    bench_case(c, "block", |order| order);
    // 16 MiB, a whole number of rows.
    bench_case(c, "rows", |order| (4 << 20) / order * order);
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ProcessCpuTime);
    targets = bench_hadamard
}
criterion_main!(benches);
