//! Whole-tensor quantization throughput (`codec::quantize_with`) on a 4096×4096 bf16 matrix, in
//! weights per second: 4-bit p = 2 n = 256 (the default), 4-bit p = 1 n = 16 and p = 3 n = 4096,
//! 3.25-bit p = 4 n = 8192 (each scale search: "fast", the default; "full"; "rms") and 3-bit
//! p = 4 n = 4096 ("fast" only), on a 1-thread rayon pool, and the default on all cores.
//!
//! The matrix is seeded Gaussian (σ = 0.02) with every 97th row scaled ×8 (outlier rows), rounded
//! to bf16 and passed as raw little-endian bytes, as the pipeline reads a mmap'd safetensors file.
//! Grid tables are built before timing.
//!
//! `cargo bench --bench quantize` measures wall-clock time (criterion's default).
//! `HIGGS_BENCH_CPU_TIME=1 cargo bench --bench quantize` measures the CPU time of the whole
//! process instead (Linux: the sum of `/proc/self/task/*/schedstat`), which stays meaningful on
//! a machine shared with other busy processes. For the 1-thread cases that is the quantizer's
//! time; for the all-cores cases it is the CPU time summed over the threads, so the throughput
//! shown is per core (multiply by the cores for the ideal wall-clock rate).
#![forbid(unsafe_code)]
mod common;

use criterion::measurement::Measurement;
use criterion::{Criterion, Throughput};
use half::bf16;
use higgs_rs::codec::{quantize, quantize_with, ElemType, QuantSpec, ScaleSearch, Source};
use higgs_rs::rng::SplitMix64;
use std::hint::black_box;

const ROWS: usize = 4096;
const COLS: usize = 4096;

fn matrix_bytes() -> Vec<u8> {
    let mut w = vec![0f32; ROWS * COLS];
    SplitMix64::new(7).fill_gaussian(&mut w);
    w.chunks_mut(COLS).enumerate().for_each(|(r, row)| {
        let sigma = if r % 97 == 0 { 0.16 } else { 0.02 };
        row.iter_mut().for_each(|x| *x *= sigma);
    });
    w.iter()
        .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

fn bench_quantize<M: Measurement>(c: &mut Criterion<M>) {
    let bytes = matrix_bytes();
    let source = Source::Bytes(ElemType::Bf16, &bytes);
    let mut group = c.benchmark_group("quantize_4096x4096_bf16");
    group.sample_size(10);
    group.throughput(Throughput::Elements((ROWS * COLS) as u64));
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let specs = [
        ("p2_n256_4bit", 2usize, 4.0),
        ("p1_n16_4bit", 1, 4.0),
        ("p3_n4096_4bit", 3, 4.0),
        ("p4_n8192_3.25bit", 4, 3.25),
        ("p4_n4096_3bit", 4, 3.0),
    ];
    for (name, p, bits) in specs {
        let spec = QuantSpec {
            p,
            n: QuantSpec::grid_size_for_bits(bits, p).expect("valid bits"),
            hadamard_size: None,
            group_size: 64,
            seed: Some(0),
        };
        // Grid tables are built once per process: keep that out of the timing.
        let warm = Source::Bytes(ElemType::Bf16, &bytes[..64 * COLS * 2]);
        quantize(warm, 64, COLS, &spec).expect("warm-up");
        // p = 3 does not divide the group of 64: every search is the RMS there; p = 1 and the
        // second p = 4 grid are not targets of the other searches, so only their default.
        let searches: &[ScaleSearch] = if p == 3 || p == 1 || name == "p4_n4096_3bit" {
            &[ScaleSearch::Fast]
        } else {
            &[ScaleSearch::Fast, ScaleSearch::Full, ScaleSearch::Rms]
        };
        for &search in searches {
            // All cores for the default search only.
            let thread_counts: &[usize] = if search == ScaleSearch::default() {
                &[1, all]
            } else {
                &[1]
            };
            for &threads in thread_counts {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let id = format!("{name}/{}/{threads}thread", search.name());
                group.bench_function(id, |b| {
                    b.iter(|| {
                        pool.install(|| {
                            quantize_with(black_box(source), ROWS, COLS, &spec, search)
                                .expect("quantize")
                        })
                    })
                });
            }
        }
    }
    group.finish();
}

fn main() {
    common::main_picking_measurement(bench_quantize, bench_quantize);
}
