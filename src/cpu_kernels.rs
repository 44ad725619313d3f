//! CPU LUT matrix products on packed HIGGS codes: `y = x Wᵀ` without materializing `W`.
//!
//! The codec stores `Ŵ_rot`: grid points × scales in the rotated basis, where each row of `W`
//! was zero-padded, multiplied by the signs `D` and transformed by the orthonormal Hadamard
//! matrix `H` per block. Since `R = H·D` is orthogonal, `W x ≈ Ŵ_rot (R x)`: each activation row
//! is rotated once ([`rotate_activations`]), then every output is
//! `y[r] = Σ_groups scale[r, g] · Σ_{tuples t in g} ⟨grid[code[r, t]], x_rot[t·p .. t·p + p]⟩`.
//!
//! Paths (picked per call by [`kernel_path`], the same for every thread count):
//! - `avx512`: x86-64 with AVX-512 F/BW/VL/VBMI, for p ∈ {1, 2} with n ≤ 256 or p = 4 with
//!   n = 256, and groups holding whole runs of 16 codes (`group_size % (16·p) == 0`): table
//!   lookups with byte permutes, see `cpu_kernels/avx512.rs`.
//! - `avx2`: x86-64 with AVX2 + FMA, for p ∈ {1, 2}, any n, `group_size % (8·p) == 0`:
//!   `vpermps` for small scalar grids, gathers otherwise, see `cpu_kernels/avx2.rs`.
//! - `scalar`: everything else (any p, n, group size, also groups that split a tuple), and the
//!   reference the SIMD path is tested against.
//!
//! Rows run in parallel on the current rayon pool; each output is computed by one thread in a
//! fixed order, so results do not depend on the thread count.
#![deny(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use crate::codec::{unpack_codes, Layout, QuantSpec};
use crate::{hadamard, HiggsError, Result};
use half::f16;
use rayon::prelude::*;

/// Rows handed to one rayon task: small enough to balance two to a few dozen threads, large
/// enough that the per-task overhead vanishes next to a row of thousands of codes.
const ROWS_PER_TASK: usize = 16;

/// A quantized weight matrix (`rows × cols`, rows = out_features) as borrowed parts, in the
/// layout of [`crate::codec`].
#[derive(Clone, Copy, Debug)]
pub struct LutWeights<'a> {
    /// Output features.
    pub rows: usize,
    /// Input features, before padding.
    pub cols: usize,
    /// Grid dimension.
    pub p: usize,
    /// Grid points (a power of two).
    pub n: usize,
    /// Hadamard order the weights were rotated with.
    pub hadamard_size: usize,
    /// Rotated values per scale.
    pub group_size: usize,
    /// `rows × row_bytes` packed codes.
    pub codes: &'a [u8],
    /// `rows × groups` scales.
    pub scales: &'a [f16],
    /// `n × p` grid points.
    pub grid: &'a [f32],
    /// `padded_cols` ±1 signs, when the weights were rotated with them.
    pub signs: Option<&'a [f32]>,
}

impl LutWeights<'_> {
    /// The layout the parts must follow, after checking every size against it.
    pub fn layout(&self) -> Result<Layout> {
        if self.rows == 0 || self.cols == 0 {
            return Err(HiggsError::invalid(format!(
                "a quantized layer needs at least one output and one input feature (got {} × {})",
                self.rows, self.cols
            )));
        }
        if self.p == 0 {
            return Err(HiggsError::invalid("grid dimension p must be at least 1"));
        }
        if !self.n.is_power_of_two() || !(2..=1 << 16).contains(&self.n) {
            return Err(HiggsError::invalid(format!(
                "grid size n = {} must be a power of two from 2 to 65536",
                self.n
            )));
        }
        let spec = QuantSpec {
            p: self.p,
            n: self.n,
            hadamard_size: Some(self.hadamard_size),
            group_size: self.group_size,
            seed: None,
        };
        let layout = spec.layout(self.rows, self.cols)?;
        if self.grid.len() != self.n * self.p {
            return Err(HiggsError::invalid(format!(
                "the grid holds {} values; n × p = {} × {} = {} are needed",
                self.grid.len(),
                self.n,
                self.p,
                self.n * self.p
            )));
        }
        if let Some(i) = self.grid.iter().position(|v| !v.is_finite()) {
            return Err(HiggsError::invalid(format!(
                "grid point {} holds the non-finite value {}",
                i / self.p,
                self.grid[i]
            )));
        }
        if self.codes.len() != self.rows * layout.row_bytes {
            return Err(HiggsError::invalid(format!(
                "codes hold {} bytes; {} rows × {} bytes are needed ({} columns padded to {}, {} codes of {} bits per row)",
                self.codes.len(),
                self.rows,
                layout.row_bytes,
                self.cols,
                layout.padded_cols,
                layout.tuples,
                spec.code_bits()
            )));
        }
        if self.scales.len() != self.rows * layout.groups {
            return Err(HiggsError::invalid(format!(
                "scales hold {} values; {} rows × {} groups are needed ({} padded columns, group size {})",
                self.scales.len(),
                self.rows,
                layout.groups,
                layout.padded_cols,
                self.group_size
            )));
        }
        if let Some(signs) = self.signs {
            if signs.len() != layout.padded_cols {
                return Err(HiggsError::invalid(format!(
                    "signs hold {} values; the padded row width is {}",
                    signs.len(),
                    layout.padded_cols
                )));
            }
        }
        Ok(layout)
    }
}

/// Which implementation to run; [`KernelPath::Auto`] picks the fastest one that takes the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    Auto,
    Scalar,
    /// Fails with [`HiggsError::Unsupported`] when the machine or the layout does not allow it.
    Avx512,
    /// As [`KernelPath::Avx512`].
    Avx2,
}

/// The path [`lut_linear`] takes for these weights on this machine: "avx512/planes",
/// "avx512/planes-bf16", "avx512/nibbles", "avx2" or "scalar".
pub fn kernel_path(w: &LutWeights<'_>) -> Result<&'static str> {
    let layout = w.layout()?;
    Ok(match resolve(w, &layout, KernelPath::Auto)? {
        Resolved::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx512(plan) => plan.name(),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx2(_) => "avx2",
    })
}

/// `out = x Wᵀ` for `batch` rows of `x` (`batch × cols`); `out` is `batch × rows`.
pub fn lut_linear(w: &LutWeights<'_>, x: &[f32], batch: usize, out: &mut [f32]) -> Result<()> {
    lut_linear_with(w, x, batch, out, KernelPath::Auto)
}

/// [`lut_linear`] on a chosen path (for tests and benchmarks).
pub fn lut_linear_with(
    w: &LutWeights<'_>,
    x: &[f32],
    batch: usize,
    out: &mut [f32],
    path: KernelPath,
) -> Result<()> {
    let layout = w.layout()?;
    if x.len() != batch * w.cols {
        return Err(HiggsError::invalid(format!(
            "activations hold {} values; batch {} × {} input features = {} are needed",
            x.len(),
            batch,
            w.cols,
            batch * w.cols
        )));
    }
    if out.len() != batch * w.rows {
        return Err(HiggsError::invalid(format!(
            "the output holds {} values; batch {} × {} output features = {} are needed",
            out.len(),
            batch,
            w.rows,
            batch * w.rows
        )));
    }
    if batch == 0 {
        return Ok(());
    }
    let resolved = resolve(w, &layout, path)?;
    let x_rot = rotate_activations(x, batch, &layout, w.p, w.signs)?;
    // Each task fills `ROWS_PER_TASK` rows for the whole batch, row-major (row, batch);
    // transposed into (batch, row) at the end when batch > 1.
    let mut by_row = if batch == 1 {
        Vec::new()
    } else {
        vec![0f32; batch * w.rows]
    };
    let target: &mut [f32] = if batch == 1 { out } else { &mut by_row };
    match resolved {
        Resolved::Scalar => for_row_tiles(
            w,
            &layout,
            batch,
            target,
            || vec![0u32; layout.tuples],
            |row_codes, codes, scales, tile| {
                scalar_rows(w, &layout, codes, scales, &x_rot, batch, row_codes, tile)
            },
        ),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx512(plan) => {
            let x_simd = plan.prepare_activations(&x_rot, batch);
            for_row_tiles(
                w,
                &layout,
                batch,
                target,
                || plan.scratch(),
                |scratch, codes, scales, tile| {
                    plan.rows(codes, scales, &x_simd, batch, scratch, tile)
                },
            )
        }
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx2(plan) => {
            let x_simd = plan.prepare_activations(&x_rot, batch);
            for_row_tiles(
                w,
                &layout,
                batch,
                target,
                || plan.scratch(),
                |scratch, codes, scales, tile| {
                    plan.rows(codes, scales, &x_simd, batch, scratch, tile)
                },
            )
        }
    }
    if batch > 1 {
        for (r, values) in by_row.chunks_exact(batch).enumerate() {
            for (b, &v) in values.iter().enumerate() {
                out[b * w.rows + r] = v;
            }
        }
    }
    Ok(())
}

/// Run `work(scratch, codes, scales, out)` on tiles of `ROWS_PER_TASK` rows in parallel; `out` is
/// the tile's `rows × batch` outputs. One scratch per rayon worker, from `init`.
fn for_row_tiles<S>(
    w: &LutWeights<'_>,
    layout: &Layout,
    batch: usize,
    target: &mut [f32],
    init: impl Fn() -> S + Send + Sync,
    work: impl Fn(&mut S, &[u8], &[f16], &mut [f32]) + Send + Sync,
) {
    let (rb, groups) = (layout.row_bytes, layout.groups);
    target
        .par_chunks_mut(ROWS_PER_TASK * batch)
        .enumerate()
        .for_each_init(init, |scratch, (task, tile)| {
            let (r0, r1) = (
                task * ROWS_PER_TASK,
                task * ROWS_PER_TASK + tile.len() / batch,
            );
            work(
                scratch,
                &w.codes[r0 * rb..r1 * rb],
                &w.scales[r0 * groups..r1 * groups],
                tile,
            )
        });
}

enum Resolved {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx512(Box<avx512::Plan>),
    #[cfg(target_arch = "x86_64")]
    Avx2(Box<avx2::Plan>),
}

fn resolve(w: &LutWeights<'_>, layout: &Layout, path: KernelPath) -> Result<Resolved> {
    let unsupported = |name: &str, why: String| {
        HiggsError::Unsupported(format!("the {name} LUT kernel cannot run: {why}"))
    };
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = || avx512::Plan::new(w, layout).map(|plan| Resolved::Avx512(Box::new(plan)));
        let avx2 = || avx2::Plan::new(w, layout).map(|plan| Resolved::Avx2(Box::new(plan)));
        match path {
            KernelPath::Scalar => Ok(Resolved::Scalar),
            KernelPath::Auto => Ok(avx512().or_else(|_| avx2()).unwrap_or(Resolved::Scalar)),
            KernelPath::Avx512 => avx512().map_err(|why| unsupported("AVX-512", why)),
            KernelPath::Avx2 => avx2().map_err(|why| unsupported("AVX2", why)),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, layout);
        match path {
            KernelPath::Scalar | KernelPath::Auto => Ok(Resolved::Scalar),
            KernelPath::Avx512 | KernelPath::Avx2 => {
                Err(unsupported("x86", "this build is not for x86-64".into()))
            }
        }
    }
}

/// Rotate each activation row like the weights were: zero-pad to `padded_cols`, multiply by the
/// signs, Hadamard-transform each block. Rows of the result are `tuples · p` long (zeros past
/// `padded_cols`, so the last tuple may be read whole).
pub fn rotate_activations(
    x: &[f32],
    batch: usize,
    layout: &Layout,
    p: usize,
    signs: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let width = layout.tuples * p;
    let cols = layout.cols;
    let mut rotated = vec![0f32; batch * width];
    rotated
        .par_chunks_mut(width)
        .zip(x.par_chunks(cols))
        .try_for_each(|(row, src)| {
            row[..cols].copy_from_slice(src);
            let padded = &mut row[..layout.padded_cols];
            if let Some(signs) = signs {
                padded.iter_mut().zip(signs).for_each(|(v, s)| *v *= s);
            }
            hadamard::forward(padded, layout.block)
        })?;
    Ok(rotated)
}

/// The portable kernel and the reference: any p, n and group size. `x_rot` is `batch` rows of
/// `tuples · p`; `row_codes` is scratch of `tuples`; `out` is `rows × batch` for the rows of
/// `codes`/`scales`.
#[allow(clippy::too_many_arguments)]
fn scalar_rows(
    w: &LutWeights<'_>,
    layout: &Layout,
    codes: &[u8],
    scales: &[f16],
    x_rot: &[f32],
    batch: usize,
    row_codes: &mut [u32],
    out: &mut [f32],
) {
    let p = w.p;
    let g = w.group_size;
    let width = layout.tuples * p;
    let bits = w.n.trailing_zeros();
    for ((row_bytes, row_scales), y) in codes
        .chunks_exact(layout.row_bytes)
        .zip(scales.chunks_exact(layout.groups))
        .zip(out.chunks_exact_mut(batch))
    {
        unpack_codes(row_bytes, bits, row_codes);
        for (yb, xb) in y.iter_mut().zip(x_rot.chunks_exact(width)) {
            let mut total = 0f32;
            for (group, scale) in row_scales.iter().enumerate() {
                let start = group * g;
                let end = (start + g).min(layout.padded_cols);
                let part = if g.is_multiple_of(p) {
                    // Whole tuples (the last one may reach into the zero padding of x).
                    let (t0, t1) = (start / p, end.div_ceil(p));
                    let (codes, x) = (&row_codes[t0..t1], &xb[t0 * p..t1 * p]);
                    match p {
                        1 => group_dot::<1>(codes, w.grid, x),
                        2 => group_dot::<2>(codes, w.grid, x),
                        3 => group_dot::<3>(codes, w.grid, x),
                        4 => group_dot::<4>(codes, w.grid, x),
                        _ => (start..end)
                            .map(|i| w.grid[row_codes[i / p] as usize * p + i % p] * xb[i])
                            .sum(),
                    }
                } else {
                    // A group boundary splits a tuple: value by value.
                    (start..end)
                        .map(|i| w.grid[row_codes[i / p] as usize * p + i % p] * xb[i])
                        .sum()
                };
                total += part * scale.to_f32();
            }
            *yb = total;
        }
    }
}

/// Σ_t ⟨grid[codes[t]], x[t·P .. t·P + P]⟩, with four running sums for instruction parallelism.
fn group_dot<const P: usize>(codes: &[u32], grid: &[f32], x: &[f32]) -> f32 {
    let mut sums = [0f32; 4];
    for (t, (&code, xs)) in codes.iter().zip(x.chunks_exact(P)).enumerate() {
        let point = &grid[code as usize * P..code as usize * P + P];
        let dot: f32 = point.iter().zip(xs).map(|(a, b)| a * b).sum();
        sums[t % 4] += dot;
    }
    (sums[0] + sums[1]) + (sums[2] + sums[3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::pack_codes;
    use crate::rng::SplitMix64;

    /// Parts of a random quantized matrix (random grid, codes, scales and signs) with the
    /// codec's layout, so the kernel can be tested without the quantizer.
    pub(super) struct RandomParts {
        pub rows: usize,
        pub cols: usize,
        pub p: usize,
        pub n: usize,
        pub h: usize,
        pub g: usize,
        pub layout: Layout,
        pub codes: Vec<u8>,
        pub scales: Vec<f16>,
        pub grid: Vec<f32>,
        pub signs: Option<Vec<f32>>,
    }

    impl RandomParts {
        /// `shape` is (rows, cols, p, n, hadamard size, group size).
        pub fn new(shape: Shape, signs: bool, seed: u64) -> Self {
            let (rows, cols, p, n, h, g) = shape;
            let spec = QuantSpec {
                p,
                n,
                hadamard_size: Some(h),
                group_size: g,
                seed: None,
            };
            let layout = spec.layout(rows, cols).unwrap();
            let mut rng = SplitMix64::new(seed);
            let mut grid = vec![0f32; n * p];
            rng.fill_gaussian(&mut grid);
            let mut codes = vec![0u8; rows * layout.row_bytes];
            let mut row_codes = vec![0u32; layout.tuples];
            for row in codes.chunks_exact_mut(layout.row_bytes) {
                row_codes
                    .iter_mut()
                    .for_each(|c| *c = (rng.next_u64() % n as u64) as u32);
                pack_codes(&row_codes, spec.code_bits(), row);
            }
            let scales = (0..rows * layout.groups)
                .map(|_| f16::from_f64(0.05 + rng.next_f64()))
                .collect();
            let signs = signs.then(|| {
                (0..layout.padded_cols)
                    .map(|_| if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 })
                    .collect()
            });
            RandomParts {
                rows,
                cols,
                p,
                n,
                h,
                g,
                layout,
                codes,
                scales,
                grid,
                signs,
            }
        }

        pub fn weights(&self) -> LutWeights<'_> {
            LutWeights {
                rows: self.rows,
                cols: self.cols,
                p: self.p,
                n: self.n,
                hadamard_size: self.h,
                group_size: self.g,
                codes: &self.codes,
                scales: &self.scales,
                grid: &self.grid,
                signs: self.signs.as_deref(),
            }
        }

        /// Ŵ_rot, `rows × padded_cols`, in f64: grid point × scale per rotated value.
        pub fn rotated_weights(&self) -> Vec<f64> {
            let l = self.layout;
            let mut codes = vec![0u32; l.tuples];
            let mut out = vec![0f64; self.rows * l.padded_cols];
            for r in 0..self.rows {
                unpack_codes(
                    &self.codes[r * l.row_bytes..(r + 1) * l.row_bytes],
                    self.n.trailing_zeros(),
                    &mut codes,
                );
                for i in 0..l.padded_cols {
                    let v = self.grid[codes[i / self.p] as usize * self.p + i % self.p] as f64;
                    out[r * l.padded_cols + i] =
                        v * self.scales[r * l.groups + i / self.g].to_f64();
                }
            }
            out
        }
    }

    fn gaussian(len: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0f32; len];
        SplitMix64::new(seed).fill_gaussian(&mut v);
        v
    }

    /// y = Ŵ_rot · x_rot in f64, from already-rotated activations (no Hadamard involved).
    fn reference_rotated(parts: &RandomParts, x_rot: &[f32], batch: usize) -> Vec<f64> {
        let l = parts.layout;
        let wr = parts.rotated_weights();
        let width = l.tuples * parts.p;
        let mut y = vec![0f64; batch * parts.rows];
        for b in 0..batch {
            for r in 0..parts.rows {
                y[b * parts.rows + r] = (0..l.padded_cols)
                    .map(|i| wr[r * l.padded_cols + i] * x_rot[b * width + i] as f64)
                    .sum();
            }
        }
        y
    }

    /// max |a − b| / max |b|: the error relative to the output's scale (outputs near zero
    /// would make an elementwise relative error meaningless).
    fn relative_error(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = a
            .iter()
            .zip(b)
            .fold(0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
        err / scale
    }

    /// The LUT products alone (activations already rotated) on one path, vs the f64 reference.
    fn check_product(parts: &RandomParts, batch: usize, path: KernelPath) -> f64 {
        let l = parts.layout;
        let w = parts.weights();
        let width = l.tuples * parts.p;
        let mut x_rot = gaussian(batch * width, 77);
        for row in x_rot.chunks_exact_mut(width) {
            row[l.padded_cols..].fill(0.0);
        }
        let expected = reference_rotated(parts, &x_rot, batch);
        let mut by_row = vec![0f32; batch * parts.rows];
        match resolve(&w, &l, path).unwrap() {
            Resolved::Scalar => scalar_rows(
                &w,
                &l,
                &parts.codes,
                &parts.scales,
                &x_rot,
                batch,
                &mut vec![0; l.tuples],
                &mut by_row,
            ),
            #[cfg(target_arch = "x86_64")]
            Resolved::Avx512(plan) => {
                let xs = plan.prepare_activations(&x_rot, batch);
                let mut scratch = plan.scratch();
                plan.rows(
                    &parts.codes,
                    &parts.scales,
                    &xs,
                    batch,
                    &mut scratch,
                    &mut by_row,
                )
            }
            #[cfg(target_arch = "x86_64")]
            Resolved::Avx2(plan) => {
                let xs = plan.prepare_activations(&x_rot, batch);
                let mut scratch = plan.scratch();
                plan.rows(
                    &parts.codes,
                    &parts.scales,
                    &xs,
                    batch,
                    &mut scratch,
                    &mut by_row,
                )
            }
        }
        let mut got = vec![0f32; batch * parts.rows];
        for r in 0..parts.rows {
            for b in 0..batch {
                got[b * parts.rows + r] = by_row[r * batch + b];
            }
        }
        relative_error(&got, &expected)
    }

    /// (rows, cols, p, n, hadamard size, group size).
    type Shape = (usize, usize, usize, usize, usize, usize);

    /// Shapes that exercise odd row counts, tails of chunks, sub-byte codes and padding.
    fn shapes() -> Vec<Shape> {
        // (rows, cols, p, n, hadamard, group)
        vec![
            (37, 256, 2, 256, 256, 64),
            (5, 100, 2, 256, 64, 64),
            (3, 100, 2, 256, 64, 32),
            (9, 1000, 2, 64, 8, 64),
            (7, 200, 2, 16, 8, 32),
            (11, 576, 1, 16, 64, 64),
            (4, 100, 1, 16, 64, 16),
            (6, 96, 1, 8, 32, 32),
            (5, 130, 1, 4, 2, 48),
            (3, 300, 1, 256, 4, 64),
            (2, 72, 1, 2, 8, 16),
            (13, 64, 2, 128, 64, 64),
            (5, 200, 4, 256, 8, 64),
        ]
    }

    #[test]
    fn scalar_matches_reference_on_every_layout() {
        // Including layouts only the scalar path takes: groups splitting a tuple (p = 2, g = 7),
        // p = 3 and 4, grids larger than 256 points.
        let mut cases = shapes();
        cases.extend([
            (4, 50, 2, 256, 2, 7),
            (3, 96, 3, 64, 32, 24),
            (2, 64, 4, 8192, 64, 64),
            (5, 128, 2, 1024, 128, 64),
        ]);
        for (i, &(rows, cols, p, n, h, g)) in cases.iter().enumerate() {
            for &batch in &[1usize, 5] {
                let parts = RandomParts::new((rows, cols, p, n, h, g), i % 2 == 0, i as u64);
                let err = check_product(&parts, batch, KernelPath::Scalar);
                assert!(
                    err < 2e-6,
                    "case {i} {:?} batch {batch}: {err}",
                    (rows, cols, p, n, h, g)
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_matches_reference() {
        if !avx512::available() {
            eprintln!("skipped: this machine has no AVX-512 VBMI");
            return;
        }
        for (i, &(rows, cols, p, n, h, g)) in shapes().iter().enumerate() {
            for batch in [1usize, 2, 3, 5, 8, 9, 19] {
                let parts = RandomParts::new((rows, cols, p, n, h, g), i % 2 == 1, 100 + i as u64);
                let err = check_product(&parts, batch, KernelPath::Avx512);
                assert!(
                    err < 2e-6,
                    "case {i} {:?} batch {batch}: {err}",
                    (rows, cols, p, n, h, g)
                );
            }
        }
    }

    /// Grids whose values are all bf16 take the two-plane front end; it must agree too.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_bf16_grids_match_reference() {
        if !avx512::available() {
            eprintln!("skipped: this machine has no AVX-512 VBMI");
            return;
        }
        for (i, shape) in [
            (9, 1000, 2, 64, 8, 64),
            (5, 100, 2, 256, 64, 32),
            (4, 256, 2, 128, 256, 64),
            (5, 200, 4, 256, 8, 64),
        ]
        .into_iter()
        .enumerate()
        {
            let mut parts = RandomParts::new(shape, i % 2 == 0, 400 + i as u64);
            for v in parts.grid.iter_mut() {
                *v = half::bf16::from_f32(*v).to_f32();
            }
            let w = parts.weights();
            assert_eq!(kernel_path(&w).unwrap(), "avx512/planes-bf16");
            for batch in [1usize, 3, 8] {
                let err = check_product(&parts, batch, KernelPath::Avx512);
                assert!(err < 2e-6, "case {i} {shape:?} batch {batch}: {err}");
            }
        }
        // One value off the bf16 grid keeps the four-plane path.
        let mut parts = RandomParts::new((5, 100, 2, 256, 64, 32), false, 1);
        for v in parts.grid.iter_mut().skip(1) {
            *v = half::bf16::from_f32(*v).to_f32();
        }
        assert_eq!(kernel_path(&parts.weights()).unwrap(), "avx512/planes");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_matches_reference() {
        if !avx2::available() {
            eprintln!("skipped: this machine has no AVX2");
            return;
        }
        let mut cases: Vec<Shape> = shapes().into_iter().filter(|s| s.2 <= 2).collect();
        // Grids only this path takes among the SIMD ones (p = 1 with 512 points, p = 2 with
        // 1024), and 8-bit codes long enough for the SIMD widening loop.
        cases.extend([
            (3, 200, 1, 512, 8, 64),
            (4, 128, 2, 1024, 128, 64),
            (5, 1024, 2, 256, 1024, 64),
        ]);
        for (i, &(rows, cols, p, n, h, g)) in cases.iter().enumerate() {
            for batch in [1usize, 2, 4, 5, 9] {
                let parts = RandomParts::new((rows, cols, p, n, h, g), i % 2 == 1, 300 + i as u64);
                let err = check_product(&parts, batch, KernelPath::Avx2);
                assert!(
                    err < 2e-6,
                    "case {i} {:?} batch {batch}: {err}",
                    (rows, cols, p, n, h, g)
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_paths_decline_layouts_they_cannot_take() {
        let declines = |path, shape: Shape| {
            let parts = RandomParts::new(shape, false, 1);
            match resolve(&parts.weights(), &parts.layout, path) {
                Err(HiggsError::Unsupported(why)) => !why.is_empty(),
                Err(other) => panic!("{other}"),
                Ok(_) => false,
            }
        };
        // Groups splitting a 16-code run, p = 3, n = 1024.
        for shape in [
            (3, 64, 2, 256, 64, 16),
            (3, 96, 3, 64, 32, 24),
            (3, 128, 2, 1024, 128, 64),
        ] {
            assert!(declines(KernelPath::Avx512, shape), "{shape:?}");
        }
        // Groups splitting an 8-code run, p = 3.
        for shape in [(3, 96, 2, 256, 32, 24), (3, 96, 3, 64, 32, 24)] {
            assert!(declines(KernelPath::Avx2, shape), "{shape:?}");
            let parts = RandomParts::new(shape, false, 1);
            let auto = resolve(&parts.weights(), &parts.layout, KernelPath::Auto);
            assert!(matches!(auto, Ok(Resolved::Scalar)), "{shape:?}");
        }
    }

    #[test]
    fn matches_dequantize_then_matmul() {
        use crate::codec::{dequantize, quantize, Source};
        use crate::grid::Grid;
        // (rows, cols, p, n, hadamard (None: automatic), group, seed)
        type Case = (
            usize,
            usize,
            usize,
            usize,
            Option<usize>,
            usize,
            Option<u64>,
        );
        let cases: [Case; 10] = [
            (37, 256, 2, 256, None, 64, Some(1)),
            (5, 100, 2, 256, Some(64), 64, Some(2)),
            (8, 100, 2, 256, Some(64), 64, None),
            (7, 100, 1, 8, Some(64), 32, Some(3)),
            (11, 576, 1, 16, None, 64, Some(4)),
            (9, 1000, 2, 64, Some(8), 64, None),
            (3, 1536, 2, 16, None, 32, Some(5)),
            (6, 130, 1, 4, Some(2), 48, Some(6)),
            (4, 96, 3, 64, Some(32), 24, Some(7)),
            (5, 256, 4, 256, None, 64, Some(8)),
        ];
        for (i, &(rows, cols, p, n, h, g, seed)) in cases.iter().enumerate() {
            let spec = QuantSpec {
                p,
                n,
                hadamard_size: h,
                group_size: g,
                seed,
            };
            let weights = gaussian(rows * cols, i as u64);
            let q = quantize(Source::F32(&weights), rows, cols, &spec).unwrap();
            let dense = dequantize(&q).unwrap();
            let grid = Grid::load(p, n).unwrap();
            let signs = seed.map(|s| hadamard::random_signs(s, q.layout.padded_cols));
            let w = LutWeights {
                rows,
                cols,
                p,
                n,
                hadamard_size: q.layout.block,
                group_size: g,
                codes: &q.codes,
                scales: &q.scales,
                grid: &grid.points,
                signs: signs.as_deref(),
            };
            for batch in [1usize, 5] {
                let x = gaussian(batch * cols, 1000 + i as u64);
                let expected: Vec<f64> = (0..batch * rows)
                    .map(|o| {
                        let (b, r) = (o / rows, o % rows);
                        (0..cols)
                            .map(|c| x[b * cols + c] as f64 * dense[r * cols + c] as f64)
                            .sum()
                    })
                    .collect();
                for path in [KernelPath::Auto, KernelPath::Scalar] {
                    let mut y = vec![f32::NAN; batch * rows];
                    lut_linear_with(&w, &x, batch, &mut y, path).unwrap();
                    let err = relative_error(&y, &expected);
                    assert!(
                        err < 1e-5,
                        "case {i} batch {batch} {path:?}: relative error {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn same_bits_for_any_thread_count() {
        let parts = RandomParts::new((67, 576, 2, 256, 64, 64), true, 9);
        let x = gaussian(3 * 576, 4);
        let run = |threads: usize, batch: usize| {
            let mut y = vec![0f32; batch * 67];
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    lut_linear(&parts.weights(), &x[..batch * 576], batch, &mut y).unwrap()
                });
            y
        };
        for batch in [1, 3] {
            let one = run(1, batch);
            for threads in [2, 3] {
                let many = run(threads, batch);
                assert!(
                    one.iter()
                        .zip(&many)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "batch {batch}, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        for (i, &(rows, cols, p, n, h, g)) in shapes().iter().enumerate() {
            let parts = RandomParts::new((rows, cols, p, n, h, g), true, 200 + i as u64);
            let batch = 11;
            let x = gaussian(batch * cols, 5);
            let mut all = vec![0f32; batch * rows];
            lut_linear(&parts.weights(), &x, batch, &mut all).unwrap();
            for b in [0, 7, 10] {
                let mut one = vec![0f32; rows];
                lut_linear(&parts.weights(), &x[b * cols..(b + 1) * cols], 1, &mut one).unwrap();
                let same = one
                    .iter()
                    .zip(&all[b * rows..])
                    .all(|(a, c)| a.to_bits() == c.to_bits());
                assert!(same, "case {i}, batch row {b}");
            }
        }
    }

    #[test]
    fn sizes_are_checked_and_named() {
        let parts = RandomParts::new((4, 100, 2, 256, 64, 64), true, 3);
        let x = gaussian(2 * 100, 1);
        let mut out = vec![0f32; 2 * 4];
        let mut w = parts.weights();
        assert!(lut_linear(&w, &x, 2, &mut out).is_ok());
        let err = lut_linear(&w, &x[..150], 2, &mut out).unwrap_err();
        assert!(err.to_string().contains("activations hold 150"), "{err}");
        let err = lut_linear(&w, &x, 2, &mut out[..7]).unwrap_err();
        assert!(err.to_string().contains("output holds 7"), "{err}");
        w.codes = &parts.codes[..parts.codes.len() - 1];
        let err = lut_linear(&w, &x, 2, &mut out).unwrap_err();
        assert!(err.to_string().contains("codes hold"), "{err}");
        w = parts.weights();
        w.scales = &parts.scales[1..];
        assert!(lut_linear(&w, &x, 2, &mut out)
            .unwrap_err()
            .to_string()
            .contains("scales hold"));
        w = parts.weights();
        let short_signs = vec![1f32; 100];
        w.signs = Some(&short_signs);
        assert!(lut_linear(&w, &x, 2, &mut out)
            .unwrap_err()
            .to_string()
            .contains("signs hold 100"));
        w = parts.weights();
        w.grid = &parts.grid[1..];
        assert!(lut_linear(&w, &x, 2, &mut out)
            .unwrap_err()
            .to_string()
            .contains("grid holds"));
        w = parts.weights();
        w.n = 48;
        assert!(lut_linear(&w, &x, 2, &mut out)
            .unwrap_err()
            .to_string()
            .contains("power of two"));
        w = parts.weights();
        w.p = 0;
        assert!(lut_linear(&w, &x, 2, &mut out).is_err());
        w = parts.weights();
        w.rows = 0;
        let err = lut_linear(&w, &x, 2, &mut []).unwrap_err();
        assert!(err.to_string().contains("at least one output"), "{err}");
        w = parts.weights();
        w.group_size = 0;
        assert!(lut_linear(&w, &x, 2, &mut out).is_err());
        let mut bad_grid = parts.grid.clone();
        bad_grid[7] = f32::NAN;
        w = parts.weights();
        w.grid = &bad_grid;
        assert!(lut_linear(&w, &x, 2, &mut out)
            .unwrap_err()
            .to_string()
            .contains("grid point 3"));
        // An empty batch is fine and touches nothing.
        assert!(lut_linear(&parts.weights(), &[], 0, &mut []).is_ok());
    }
}
