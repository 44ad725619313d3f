//! Nearest-grid-point assignment throughput on Gaussian inputs, in weights (coordinates) per second.
//!
//! `cargo bench --bench assign` measures wall-clock time (criterion's default).
//! `HIGGS_BENCH_CPU_TIME=1 cargo bench --bench assign` measures the benchmark thread's CPU time
//! instead (Linux: `benches/common`), which stays meaningful on a machine shared
//! with other busy processes, where wall-clock time mostly measures the waiting.
#![forbid(unsafe_code)]
mod common;

use criterion::measurement::Measurement;
use criterion::{Criterion, Throughput};
use higgs_rs::assign::{AssignStats, Assigner};
use higgs_rs::rng::SplitMix64;
use std::hint::black_box;

fn bench_assign<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group("assign");
    for (p, n) in [(1usize, 16usize), (2, 256), (3, 4096), (4, 8192)] {
        let assigner = Assigner::for_grid(p, n).expect("shipped grid");
        // About 2^20 weights (whole tuples): a few rows of a large layer, past the L2 cache.
        let weights = (1 << 20) / p * p;
        let mut xs = vec![0f32; weights];
        SplitMix64::new(42).fill_gaussian(&mut xs);
        let mut codes = vec![0u32; weights / p];
        group.throughput(Throughput::Elements(weights as u64));
        group.bench_function(format!("p{p}_n{n}"), |b| {
            b.iter(|| assigner.assign(black_box(&xs), black_box(&mut codes)))
        });
        group.bench_function(format!("p{p}_n{n}_scalar"), |b| {
            b.iter(|| assigner.assign_scalar(black_box(&xs), black_box(&mut codes)))
        });
        // What the p = 4 scale search calls (groups of 64): one group per call (`score_scale`),
        // or its 6 starting scalings in one call (`score_scales`), to show any per-call cost.
        if p == 4 {
            for tuples_per_call in [64 / p, 6 * (64 / p)] {
                group.bench_function(format!("p{p}_n{n}_calls_of_{tuples_per_call}"), |b| {
                    b.iter(|| {
                        for (x, c) in black_box(&xs)
                            .chunks(tuples_per_call * p)
                            .zip(black_box(&mut codes).chunks_mut(tuples_per_call))
                        {
                            assigner.assign(x, c);
                        }
                    })
                });
            }
        }
        // What the quantizer calls per row: codes and per-group sums, groups of 64.
        let mut stats = vec![AssignStats::default(); weights.div_ceil(64)];
        if 64 % p == 0 {
            group.bench_function(format!("p{p}_n{n}_stats_g64"), |b| {
                b.iter(|| {
                    assigner.assign_stats_groups(
                        black_box(&xs),
                        64,
                        black_box(&mut codes),
                        black_box(&mut stats),
                    )
                })
            });
        }
    }
    group.finish();
}

fn main() {
    common::main_picking_measurement(bench_assign, bench_assign);
}
