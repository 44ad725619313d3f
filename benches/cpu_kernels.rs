//! CPU LUT-GEMV/GEMM on packed codes, beside a memcpy of the same code + scale bytes and a dense
//! f32 matrix-vector product of the same shape.
//! `cargo bench --bench cpu_kernels` (all threads of the machine; `RAYON_NUM_THREADS` to change).
//!
//! Throughput is in bytes of codes + scales per second for `lut/*` and `memcpy/*` (so their
//! ratio is the target metric), in bytes of f32 weights per second for `dense_f32/*`.
//! Shapes are `rows × cols` of W (out × in): 4096×14336 (Llama-3-8B down_proj) and
//! 14336×4096 (up/gate). Codes are random (the speed does not depend on their values), the grid
//! is the shipped one, group size 64, whole-row Hadamard (14336 = 28·512), with signs.
//! `*_bf16grid` rounds the grid to bf16 (what the two-plane AVX-512 front end needs);
//! `*_one_thread` runs on a one-thread pool, beside `memcpy_one_thread`.
//!
//! `smollm2_<rows>x<cols>`: the layer shapes of SmolLM2-135M (small: the calls run on the calling
//! thread), with the shipped grid (symmetric: the half-table front end) and the same grid rounded
//! to bf16 (what bf16 activations use), batch 1 to 32, bf16 activations and outputs on the bf16
//! grid (`*_bf16io`, what `HiggsLinear` runs in bf16), and the batched path's dequantization of
//! the rotated weights (f32 and bf16 tiles). Throughput in weights × batch rows per second.
//!
//! `smollm2_team_<rows>x<cols>`: the bf16 batch-1 product (a decode step's call) on the calling
//! thread vs split over an OpenMP team (GCC's `libgomp.so.1` loaded here, standing in for torch's;
//! its workers spin between calls as torch's do), 2 threads (`OMP_NUM_THREADS` to change); skipped
//! when no `libgomp.so.1` can be loaded.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::f16;
use higgs_rs::codec::QuantSpec;
use higgs_rs::cpu_kernels::{
    kernel_path, lut_linear, lut_linear_with, Activations, KernelPath, LutPlan, LutWeights, Outputs,
};
use higgs_rs::grid::Grid;
use higgs_rs::hadamard;
use higgs_rs::rng::SplitMix64;
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Duration;

struct Layer {
    rows: usize,
    cols: usize,
    p: usize,
    n: usize,
    h: usize,
    codes: Vec<u8>,
    scales: Vec<f16>,
    grid: Vec<f32>,
    signs: Vec<f32>,
}

impl Layer {
    fn random(rows: usize, cols: usize, p: usize, n: usize) -> Layer {
        let h = hadamard::largest_supported_divisor(cols).expect("a supported Hadamard order");
        let spec = QuantSpec {
            p,
            n,
            hadamard_size: Some(h),
            group_size: 64,
            seed: Some(0),
        };
        let layout = spec.layout(rows, cols).unwrap();
        let mut rng = SplitMix64::new(1);
        let mut codes = vec![0u8; rows * layout.row_bytes];
        codes.chunks_mut(8).for_each(|c| {
            let v = rng.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        });
        let scales = (0..rows * layout.groups)
            .map(|_| f16::from_f64(0.01 + 0.01 * rng.next_f64()))
            .collect();
        Layer {
            rows,
            cols,
            p,
            n,
            h,
            codes,
            scales,
            grid: Grid::load(p, n).unwrap().points.clone(),
            signs: hadamard::random_signs(0, layout.padded_cols),
        }
    }

    fn weights(&self) -> LutWeights<'_> {
        LutWeights {
            rows: self.rows,
            cols: self.cols,
            p: self.p,
            n: self.n,
            hadamard_size: self.h,
            group_size: 64,
            codes: &self.codes,
            scales: &self.scales,
            grid: &self.grid,
            signs: Some(&self.signs),
        }
    }

    fn stored_bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len()
    }
}

fn gaussian(len: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; len];
    SplitMix64::new(seed).fill_gaussian(&mut v);
    v
}

/// Dense y = W x, rows in parallel; 8 accumulators so the compiler vectorizes the dot product.
fn dense_gemv(w: &[f32], x: &[f32], y: &mut [f32]) {
    let cols = x.len();
    y.par_iter_mut().enumerate().for_each(|(r, out)| {
        let row = &w[r * cols..(r + 1) * cols];
        let mut acc = [0f32; 16];
        for (wc, xc) in row.chunks_exact(16).zip(x.chunks_exact(16)) {
            for k in 0..16 {
                acc[k] += wc[k] * xc[k];
            }
        }
        *out = acc.iter().sum();
    });
}

fn bench_lut(c: &mut Criterion) {
    for (rows, cols) in [(4096usize, 14336usize), (14336, 4096)] {
        let mut group = c.benchmark_group(format!("{rows}x{cols}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for (p, n) in [(2usize, 256usize), (1, 16)] {
            let layer = Layer::random(rows, cols, p, n);
            let w = layer.weights();
            group.throughput(Throughput::Bytes(layer.stored_bytes() as u64));
            eprintln!(
                "{rows}x{cols} p{p} n{n}: automatic path {}",
                kernel_path(&w).unwrap()
            );
            for batch in [1usize, 8] {
                let x = gaussian(batch * cols, 2);
                let mut y = vec![0f32; batch * rows];
                group.bench_function(format!("lut_p{p}_n{n}/batch{batch}"), |b| {
                    b.iter(|| lut_linear(&w, black_box(&x), batch, &mut y).unwrap())
                });
            }
            // One thread, to compare with `memcpy_one_thread` (per-core rate).
            let one_thread = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let x = gaussian(cols, 2);
            let mut y = vec![0f32; rows];
            group.bench_function(format!("lut_p{p}_n{n}_one_thread/batch1"), |b| {
                b.iter(|| one_thread.install(|| lut_linear(&w, black_box(&x), 1, &mut y).unwrap()))
            });
            // The other paths, batch 1, all threads (a path that cannot take the layout on this
            // machine is skipped).
            for (name, path) in [("avx2", KernelPath::Avx2), ("scalar", KernelPath::Scalar)] {
                let x = gaussian(cols, 2);
                let mut y = vec![0f32; rows];
                if lut_linear_with(&w, &x, 1, &mut y, path).is_err() {
                    continue;
                }
                group.bench_function(format!("lut_p{p}_n{n}_{name}/batch1"), |b| {
                    b.iter(|| lut_linear_with(&w, black_box(&x), 1, &mut y, path).unwrap())
                });
            }
            if p == 2 {
                // The same layer with its grid rounded to bf16: the two-plane front end.
                let mut rounded = Layer::random(rows, cols, p, n);
                for v in rounded.grid.iter_mut() {
                    *v = half::bf16::from_f32(*v).to_f32();
                }
                let w = rounded.weights();
                eprintln!(
                    "{rows}x{cols} p{p} n{n} bf16 grid: path {}",
                    kernel_path(&w).unwrap()
                );
                let x = gaussian(cols, 2);
                let mut y = vec![0f32; rows];
                group.bench_function(format!("lut_p{p}_n{n}_bf16grid/batch1"), |b| {
                    b.iter(|| lut_linear(&w, black_box(&x), 1, &mut y).unwrap())
                });
                // bf16 activations and outputs, as `HiggsLinear` runs a bf16 model (`vdpbf16ps`
                // where the CPU has AVX-512 BF16).
                let plan = LutPlan::new(&w, KernelPath::Auto).unwrap();
                let x: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
                let mut y = vec![half::bf16::ZERO; rows];
                group.bench_function(format!("lut_p{p}_n{n}_bf16grid_bf16io/batch1"), |b| {
                    b.iter(|| {
                        let x = Activations::Bf16(black_box(&x));
                        plan.run(w.codes, w.scales, x, 1, Outputs::Bf16(&mut y), None)
                            .unwrap()
                    })
                });
            }
            if p == 2 {
                // The same byte count as codes + scales of the p = 2 layer.
                let src = vec![1u8; layer.stored_bytes()];
                let mut dst = vec![0u8; layer.stored_bytes()];
                group.bench_function("memcpy_all_threads", |b| {
                    b.iter(|| {
                        let piece = src.len().div_ceil(rayon::current_num_threads());
                        dst.par_chunks_mut(piece)
                            .zip(src.par_chunks(piece))
                            .for_each(|(d, s)| d.copy_from_slice(black_box(s)))
                    })
                });
                group.bench_function("memcpy_one_thread", |b| {
                    b.iter(|| dst.copy_from_slice(black_box(&src)))
                });
            }
        }
        let dense = gaussian(rows * cols, 3);
        group.throughput(Throughput::Bytes(4 * dense.len() as u64));
        let x = gaussian(cols, 2);
        let mut y = vec![0f32; rows];
        group.bench_function("dense_f32/batch1", |b| {
            b.iter(|| dense_gemv(black_box(&dense), black_box(&x), &mut y))
        });
        group.finish();
    }
}

fn bench_small_layers(c: &mut Criterion) {
    for (rows, cols) in [(576usize, 576usize), (192, 576), (1536, 576), (576, 1536)] {
        let mut group = c.benchmark_group(format!("smollm2_{rows}x{cols}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        let layer = Layer::random(rows, cols, 2, 256);
        let mut rounded = Layer::random(rows, cols, 2, 256);
        for v in rounded.grid.iter_mut() {
            *v = half::bf16::from_f32(*v).to_f32();
        }
        for (name, layer) in [("f32grid", &layer), ("bf16grid", &rounded)] {
            let w = layer.weights();
            let plan = LutPlan::new(&w, KernelPath::Auto).unwrap();
            eprintln!("smollm2 {rows}x{cols} {name}: path {}", plan.kernel_path());
            for batch in [1usize, 4, 8, 16, 32] {
                group.throughput(Throughput::Elements((rows * cols * batch) as u64));
                let x = gaussian(batch * cols, 2);
                let mut y = vec![0f32; batch * rows];
                group.bench_function(format!("lut_{name}/batch{batch}"), |b| {
                    b.iter(|| {
                        let x = Activations::F32(black_box(&x));
                        plan.run(w.codes, w.scales, x, batch, Outputs::F32(&mut y), None)
                            .unwrap()
                    })
                });
            }
            if name == "bf16grid" {
                // bf16 activations and outputs, as `HiggsLinear` runs them (`vdpbf16ps` where
                // the CPU has AVX-512 BF16).
                for batch in [1usize, 8] {
                    group.throughput(Throughput::Elements((rows * cols * batch) as u64));
                    let x: Vec<half::bf16> = gaussian(batch * cols, 2)
                        .iter()
                        .map(|&v| half::bf16::from_f32(v))
                        .collect();
                    let mut y = vec![half::bf16::ZERO; batch * rows];
                    group.bench_function(format!("lut_{name}_bf16io/batch{batch}"), |b| {
                        b.iter(|| {
                            let x = Activations::Bf16(black_box(&x));
                            plan.run(w.codes, w.scales, x, batch, Outputs::Bf16(&mut y), None)
                                .unwrap()
                        })
                    });
                }
            }
            group.throughput(Throughput::Elements((rows * cols) as u64));
            let mut w_rot = vec![0f32; rows * plan.rotated_width()];
            group.bench_function(format!("dequantize_rotated_{name}"), |b| {
                b.iter(|| {
                    plan.dequantize_rotated(w.codes, w.scales, Outputs::F32(&mut w_rot))
                        .unwrap()
                })
            });
            let mut w_bf16 = vec![half::bf16::ZERO; rows * plan.rotated_width()];
            group.bench_function(format!("dequantize_rotated_{name}_to_bf16"), |b| {
                b.iter(|| {
                    plan.dequantize_rotated(w.codes, w.scales, Outputs::Bf16(&mut w_bf16))
                        .unwrap()
                })
            });
        }
        group.finish();
    }
}

fn bench_team(c: &mut Criterion) {
    use higgs_rs::cpu_kernels::omp_team;
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/libgomp.so.1",
        "/usr/lib64/libgomp.so.1",
        "libgomp.so.1",
    ];
    let Some(path) = candidates
        .iter()
        .map(std::path::Path::new)
        .find(|p| omp_team::OmpTeam::load(p).is_ok() && omp_team::install(p).is_ok())
    else {
        eprintln!("smollm2_team: no libgomp.so.1 to load; skipped");
        return;
    };
    eprintln!("smollm2_team: {}", path.display());
    for (rows, cols) in [(192usize, 576usize), (576, 576), (1536, 576), (576, 1536)] {
        let mut group = c.benchmark_group(format!("smollm2_team_{rows}x{cols}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .throughput(Throughput::Elements((rows * cols) as u64));
        let mut layer = Layer::random(rows, cols, 2, 256);
        for v in layer.grid.iter_mut() {
            *v = half::bf16::from_f32(*v).to_f32();
        }
        let w = layer.weights();
        let plan = LutPlan::new(&w, KernelPath::Auto).unwrap();
        let x: Vec<half::bf16> = gaussian(cols, 2)
            .iter()
            .map(|&v| half::bf16::from_f32(v))
            .collect();
        let mut y = vec![half::bf16::ZERO; rows];
        for (name, enabled) in [("calling_thread", false), ("team", true)] {
            omp_team::configure(enabled, Some(0));
            group.bench_function(name, |b| {
                b.iter(|| {
                    let x = Activations::Bf16(black_box(&x));
                    plan.run(w.codes, w.scales, x, 1, Outputs::Bf16(&mut y), None)
                        .unwrap()
                })
            });
        }
        omp_team::configure(false, Some(omp_team::DEFAULT_MIN_WORK));
        group.finish();
    }
}

criterion_group!(benches, bench_small_layers, bench_team, bench_lut);
criterion_main!(benches);
