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
//!   lookups with byte permutes, see `cpu_kernels/avx512.rs`. bf16 activations on a bf16 grid
//!   (p = 2) run in bf16 precision there: rotated activations rounded to bf16, `vdpbf16ps`.
//! - `avx2`: x86-64 with AVX2 + FMA, for p ∈ {1, 2}, any n, `group_size % (8·p) == 0`:
//!   `vpermps` for small scalar grids, gathers otherwise, see `cpu_kernels/avx2.rs`.
//! - `scalar`: everything else (any p, n, group size, also groups that split a tuple), and the
//!   reference the SIMD path is tested against.
//!
//! Rows run in parallel on the current rayon pool (large products) or on the host process's
//! OpenMP team (mid-sized ones, when attached: see `cpu_kernels/omp_team.rs`); each output is
//! computed by one thread in a fixed order, so results do not depend on the thread count.
#![deny(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod omp_team;

use crate::codec::{unpack_codes, Layout, QuantSpec};
use crate::{hadamard, HiggsError, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// Activation rows rotated per piece (one Hadamard call, one rayon task).
const ROWS_PER_PIECE: usize = 16;

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
    Ok(LutPlan::new(w, KernelPath::Auto)?.kernel_path())
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
    LutPlan::new(w, path)?.run(
        w.codes,
        w.scales,
        Activations::F32(x),
        batch,
        Outputs::F32(out),
        None,
    )
}

/// Activation rows for [`LutPlan::run`]; bf16 rows are widened to f32 while they are rotated
/// (and, on a bf16 grid on the AVX-512 path, the rotated rows rounded back to bf16: the product
/// then runs in bf16 precision, like `F.linear` in bf16).
#[derive(Clone, Copy, Debug)]
pub enum Activations<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Activations<'_> {
    fn len(&self) -> usize {
        match self {
            Activations::F32(x) => x.len(),
            Activations::Bf16(x) => x.len(),
        }
    }
}

/// Where [`LutPlan::run`] writes its `batch × rows` outputs; bf16 outputs are rounded to nearest
/// even from the f32 results.
#[derive(Debug)]
pub enum Outputs<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
}

impl Outputs<'_> {
    fn len(&self) -> usize {
        match self {
            Outputs::F32(y) => y.len(),
            Outputs::Bf16(y) => y.len(),
        }
    }
}

/// Below this much work (code bytes × batch rows) a call runs on the calling thread alone: waking
/// the rayon pool and waiting for its slowest worker costs tens of µs, more than a layer of a
/// small model takes on one core, and much more on a loaded machine where a worker can be
/// descheduled (or torch's OpenMP worker still spins on the other core). SmolLM2 decode, 2 threads,
/// `benches/decode_cpu.py` A/B/A/B: with 128 KiB (its 576- and 1536-wide layers on the pool)
/// 29–31 tok/s, with every layer on the calling thread 39–40 tok/s.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// Everything about a quantized layer that does not change between calls, resolved once: the
/// layout, the kernel for this machine and its lookup tables, the grid and the signs. Codes and
/// scales are passed to each [`LutPlan::run`] (they are the bulk of the layer and stay where the
/// caller keeps them).
pub struct LutPlan {
    rows: usize,
    cols: usize,
    p: usize,
    group_size: usize,
    layout: Layout,
    grid: Vec<f32>,
    signs: Option<Vec<f32>>,
    kernel: Resolved,
}

impl LutPlan {
    /// Check `w` (every size, the grid's values) and prepare its kernel on `path`. The codes and
    /// scales of `w` are only checked for size here.
    pub fn new(w: &LutWeights<'_>, path: KernelPath) -> Result<LutPlan> {
        let layout = w.layout()?;
        let kernel = resolve(w, &layout, path)?;
        Ok(LutPlan {
            rows: w.rows,
            cols: w.cols,
            p: w.p,
            group_size: w.group_size,
            layout,
            grid: w.grid.to_vec(),
            signs: w.signs.map(<[f32]>::to_vec),
            kernel,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (before padding).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The codec layout of the weights.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The kernel this plan runs, as [`kernel_path`] names it.
    pub fn kernel_path(&self) -> &'static str {
        match &self.kernel {
            Resolved::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Resolved::Avx512(plan) => plan.name(),
            #[cfg(target_arch = "x86_64")]
            Resolved::Avx2(_) => "avx2",
        }
    }

    /// `out = x Wᵀ (+ bias)` for `batch` rows of `x` (`batch × cols`); `out` is `batch × rows`.
    /// `codes` and `scales` are the layer's (`rows × row_bytes`, `rows × groups`).
    ///
    /// Small products run on the calling thread, larger ones on the current rayon pool, and
    /// mid-sized ones (≥ [`omp_team::DEFAULT_MIN_WORK`]) on the process's OpenMP team when one is
    /// attached ([`omp_team::install`]); each output is computed by one thread in the same order
    /// either way, so the result does not depend on the thread count or on the other rows of
    /// the batch.
    pub fn run(
        &self,
        codes: &[u8],
        scales: &[f16],
        x: Activations<'_>,
        batch: usize,
        mut out: Outputs<'_>,
        bias: Option<&[f32]>,
    ) -> Result<()> {
        let layout = &self.layout;
        self.check_parts(codes, scales)?;
        if x.len() != batch * self.cols {
            return Err(HiggsError::invalid(format!(
                "activations hold {} values; batch {} × {} input features = {} are needed",
                x.len(),
                batch,
                self.cols,
                batch * self.cols
            )));
        }
        if out.len() != batch * self.rows {
            return Err(HiggsError::invalid(format!(
                "the output holds {} values; batch {} × {} output features = {} are needed",
                out.len(),
                batch,
                self.rows,
                batch * self.rows
            )));
        }
        if let Some(bias) = bias {
            if bias.len() != self.rows {
                return Err(HiggsError::invalid(format!(
                    "the bias holds {} values; one per output feature ({}) is needed",
                    bias.len(),
                    self.rows
                )));
            }
        }
        if batch == 0 {
            return Ok(());
        }
        let split = self.split_for(self.rows * layout.row_bytes * batch);
        // Batch rows are rotated on the same threads (one row is too little to split).
        let rotate_split = if batch > 1 {
            split
        } else {
            Split::CallingThread
        };
        let x_rot = self.rotate(x, batch, rotate_split)?;
        let bf16_in = matches!(x, Activations::Bf16(_));
        match (&mut out, batch, bias) {
            // Batch 1 in f32 without bias: the kernels write the caller's buffer directly.
            (Outputs::F32(y), 1, None) => self.product(codes, scales, &x_rot, 1, y, split, bf16_in),
            _ => {
                // Tiles fill (row, batch) order; transposed into (batch, row) while converting.
                let mut by_row = vec![0f32; batch * self.rows];
                self.product(codes, scales, &x_rot, batch, &mut by_row, split, bf16_in);
                let bias_of = |r: usize| bias.map_or(0.0, |b| b[r]);
                for (r, values) in by_row.chunks_exact(batch).enumerate() {
                    let add = bias_of(r);
                    for (b, &v) in values.iter().enumerate() {
                        let i = b * self.rows + r;
                        match &mut out {
                            Outputs::F32(y) => y[i] = v + add,
                            Outputs::Bf16(y) => y[i] = round_to_bf16(v + add),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Width of a rotated activation or weight row: `tuples · p` (zeros past the padded row).
    pub fn rotated_width(&self) -> usize {
        self.layout.tuples * self.p
    }

    fn check_parts(&self, codes: &[u8], scales: &[f16]) -> Result<()> {
        let layout = &self.layout;
        if codes.len() != self.rows * layout.row_bytes {
            return Err(HiggsError::invalid(format!(
                "codes hold {} bytes; {} rows × {} bytes are needed",
                codes.len(),
                self.rows,
                layout.row_bytes
            )));
        }
        if scales.len() != self.rows * layout.groups {
            return Err(HiggsError::invalid(format!(
                "scales hold {} values; {} rows × {} groups are needed",
                scales.len(),
                self.rows,
                layout.groups
            )));
        }
        Ok(())
    }

    /// Where `work` (code bytes × batch rows, or values written) runs: on the process's OpenMP
    /// team when one is attached and the work is worth its hand-off (torch's workers spin
    /// between its ops, so rayon's threads would compete with them for the cores), else on the
    /// rayon pool when worth waking it, else on the calling thread.
    fn split_for(&self, work: usize) -> Split {
        #[cfg(test)]
        if let Some(split) = tests::FORCED_SPLIT.get() {
            return split;
        }
        if self.rows <= ROWS_PER_TASK {
            return Split::CallingThread;
        }
        if let Some((team, threads)) = omp_team::for_work(work) {
            return Split::Team(team, threads);
        }
        if rayon::current_num_threads() > 1 && work >= PARALLEL_MIN_WORK {
            Split::Rayon
        } else {
            Split::CallingThread
        }
    }

    /// The batched path's weights: Ŵ_rot, `rows × rotated_width`, grid point × scale per rotated
    /// value (0 past the padded row). With activations from [`LutPlan::rotate_into`],
    /// `y = x_rot Ŵ_rotᵀ` in any matrix product: for large batches a dense GEMM on a transient
    /// tile beats the LUT product, whose table lookups are paid per batch block. On the AVX-512
    /// byte-plane path (p ≤ 2) the lookups write 64 codes at a time (~0.15–0.25 ns per weight
    /// here, vs ~0.5–0.8 scalar), the same bits as the scalar loop.
    pub fn dequantize_rotated(&self, codes: &[u8], scales: &[f16], out: Outputs<'_>) -> Result<()> {
        self.check_parts(codes, scales)?;
        let width = self.rotated_width();
        if out.len() != self.rows * width {
            return Err(HiggsError::invalid(format!(
                "the output holds {} values; {} rows × {} rotated values are needed",
                out.len(),
                self.rows,
                width
            )));
        }
        let split = self.split_for(self.rows * width);
        #[cfg(target_arch = "x86_64")]
        if let Resolved::Avx512(plan) = &self.kernel {
            if plan.can_dequantize() {
                match out {
                    Outputs::F32(y) => self.dequantize_simd(plan, codes, scales, y, split, 0.0),
                    Outputs::Bf16(y) => {
                        self.dequantize_simd(plan, codes, scales, y, split, bf16::ZERO)
                    }
                }
                return Ok(());
            }
        }
        match out {
            Outputs::F32(y) => self.dequantize_rows(codes, scales, y, split, |v| v),
            Outputs::Bf16(y) => self.dequantize_rows(codes, scales, y, split, finite_to_bf16),
        }
        Ok(())
    }

    /// [`LutPlan::dequantize_rotated`] with the AVX-512 lookups, tiles of `ROWS_PER_TASK` rows.
    #[cfg(target_arch = "x86_64")]
    fn dequantize_simd<T: SimdOutput>(
        &self,
        plan: &avx512::Plan,
        codes: &[u8],
        scales: &[f16],
        out: &mut [T],
        split: Split,
        zero: T,
    ) {
        let layout = &self.layout;
        let width = self.rotated_width();
        let (rb, groups) = (layout.row_bytes, layout.groups);
        let tile = |scratch: &mut avx512::Scratch, (task, tile): (usize, &mut [T])| {
            let r0 = task * ROWS_PER_TASK;
            let r1 = r0 + tile.len() / width;
            let (c, s) = (&codes[r0 * rb..r1 * rb], &scales[r0 * groups..r1 * groups]);
            plan.dequantize_rows(c, s, scratch, T::outputs(tile));
            for row in tile.chunks_exact_mut(width) {
                row[layout.padded_cols..].fill(zero);
            }
            Ok(())
        };
        // Infallible: the tiles return Ok.
        let _ = for_chunks(split, out, ROWS_PER_TASK * width, || plan.scratch(), tile);
    }

    fn dequantize_rows<T: Copy + Send + Sync>(
        &self,
        codes: &[u8],
        scales: &[f16],
        out: &mut [T],
        split: Split,
        convert: impl Fn(f32) -> T + Send + Sync,
    ) {
        let layout = &self.layout;
        let (p, g, grid) = (self.p, self.group_size, &self.grid[..]);
        let width = self.rotated_width();
        let bits = (grid.len() / p).trailing_zeros();
        let rows_per_task = ROWS_PER_TASK;
        let zero = convert(0.0);
        let tile = |row_codes: &mut Vec<u32>, (task, tile): (usize, &mut [T])| {
            for (i, values) in tile.chunks_exact_mut(width).enumerate() {
                let r = task * rows_per_task + i;
                unpack_codes(
                    &codes[r * layout.row_bytes..(r + 1) * layout.row_bytes],
                    bits,
                    row_codes,
                );
                let row_scales = &scales[r * layout.groups..(r + 1) * layout.groups];
                for (group, scale) in row_scales.iter().enumerate() {
                    let s = scale.to_f32();
                    let (start, end) = (group * g, ((group + 1) * g).min(layout.padded_cols));
                    let out = &mut values[start..end];
                    if g.is_multiple_of(p) {
                        // Whole tuples: one grid point per code, the group's scale hoisted.
                        let codes = &row_codes[start / p..end.div_ceil(p)];
                        match p {
                            1 => dequantize_group::<1, T>(codes, grid, s, out, &convert),
                            2 => dequantize_group::<2, T>(codes, grid, s, out, &convert),
                            4 => dequantize_group::<4, T>(codes, grid, s, out, &convert),
                            _ => out.iter_mut().enumerate().for_each(|(k, v)| {
                                let i = start + k;
                                *v = convert(grid[row_codes[i / p] as usize * p + i % p] * s)
                            }),
                        }
                    } else {
                        out.iter_mut().enumerate().for_each(|(k, v)| {
                            let i = start + k;
                            *v = convert(grid[row_codes[i / p] as usize * p + i % p] * s)
                        });
                    }
                }
                values[layout.padded_cols..].fill(zero);
            }
            Ok(())
        };
        let init = || vec![0u32; layout.tuples];
        // Infallible: the tiles return Ok.
        let _ = for_chunks(split, out, rows_per_task * width, init, tile);
    }

    /// The batched path's activations: `batch` rows of `x` rotated like the weights were
    /// (`batch × rotated_width`), for a product with [`LutPlan::dequantize_rotated`].
    pub fn rotate_into(&self, x: Activations<'_>, batch: usize, out: Outputs<'_>) -> Result<()> {
        let width = self.rotated_width();
        if x.len() != batch * self.cols || out.len() != batch * width {
            return Err(HiggsError::invalid(format!(
                "rotating {} activations into {} values: batch {batch} needs {} and {}",
                x.len(),
                out.len(),
                batch * self.cols,
                batch * width
            )));
        }
        let split = if batch > 1 {
            self.split_for(batch * width * 16)
        } else {
            Split::CallingThread
        };
        match out {
            Outputs::F32(y) => self.rotate_rows(x, split, y),
            Outputs::Bf16(y) => {
                // Piece by piece through a small f32 buffer (a whole-batch one would be a fresh
                // allocation per call, page faults included), rounded into `y`.
                let piece = |buffer: &mut Vec<f32>, (i, out): (usize, &mut [bf16])| {
                    let rotated = &mut buffer[..out.len()];
                    self.rotate_piece(x, i * ROWS_PER_PIECE, rotated)?;
                    out.iter_mut()
                        .zip(rotated.iter())
                        .for_each(|(o, &v)| *o = round_to_bf16(v));
                    Ok(())
                };
                let buffer = || vec![0f32; ROWS_PER_PIECE * width];
                for_chunks(split, y, ROWS_PER_PIECE * width, buffer, piece)
            }
        }
    }

    /// Rotate `batch` activation rows like the weights were (see [`rotate_activations`]).
    fn rotate(&self, x: Activations<'_>, batch: usize, split: Split) -> Result<Vec<f32>> {
        let mut rotated = vec![0f32; batch * self.rotated_width()];
        self.rotate_rows(x, split, &mut rotated)?;
        Ok(rotated)
    }

    /// Rotate the rows of `x` into `rotated` (`batch × rotated_width`), pieces of
    /// `ROWS_PER_PIECE` rows on `split`.
    fn rotate_rows(&self, x: Activations<'_>, split: Split, rotated: &mut [f32]) -> Result<()> {
        let width = self.rotated_width();
        let piece = |_: &mut (), (i, rows): (usize, &mut [f32])| {
            self.rotate_piece(x, i * ROWS_PER_PIECE, rows)
        };
        for_chunks(split, rotated, ROWS_PER_PIECE * width, || (), piece)
    }

    /// Rotate the activation rows from `first` on into `rows` (whole rows of `rotated_width`).
    /// Rows without a gap between them (width = padded_cols, as in every whole-row layout)
    /// take one Hadamard call.
    fn rotate_piece(&self, x: Activations<'_>, first: usize, rows: &mut [f32]) -> Result<()> {
        let layout = &self.layout;
        let (width, cols) = (self.rotated_width(), layout.cols);
        for (k, row) in rows.chunks_exact_mut(width).enumerate() {
            let b = first + k;
            match x {
                Activations::F32(x) => row[..cols].copy_from_slice(&x[b * cols..(b + 1) * cols]),
                Activations::Bf16(x) => row[..cols]
                    .iter_mut()
                    .zip(&x[b * cols..(b + 1) * cols])
                    .for_each(|(r, v)| *r = f32::from_bits((v.to_bits() as u32) << 16)),
            }
            row[cols..].fill(0.0);
            if let Some(signs) = &self.signs {
                row.iter_mut().zip(signs).for_each(|(v, s)| *v *= s);
            }
        }
        if width == layout.padded_cols {
            hadamard::forward(rows, layout.block)
        } else {
            rows.chunks_exact_mut(width)
                .try_for_each(|row| hadamard::forward(&mut row[..layout.padded_cols], layout.block))
        }
    }

    /// The LUT products on rotated activations: `out` is `rows × batch` (row-major). With
    /// `bf16_in` (the activations came as bf16) and a bf16 grid, the AVX-512 path rounds the
    /// rotated activations to bf16 and takes `vdpbf16ps` where the CPU has it.
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        codes: &[u8],
        scales: &[f16],
        x_rot: &[f32],
        batch: usize,
        out: &mut [f32],
        split: Split,
        bf16_in: bool,
    ) {
        match &self.kernel {
            Resolved::Scalar => self.for_row_tiles(
                codes,
                scales,
                batch,
                out,
                split,
                || vec![0u32; self.layout.tuples],
                |row_codes, codes, scales, tile| {
                    self.scalar_rows(codes, scales, x_rot, batch, row_codes, tile)
                },
            ),
            #[cfg(target_arch = "x86_64")]
            Resolved::Avx512(plan) if bf16_in && plan.takes_bf16_dots() => {
                let x_pairs = plan.prepare_activations_bf16(x_rot, batch);
                self.for_row_tiles(
                    codes,
                    scales,
                    batch,
                    out,
                    split,
                    || plan.scratch(),
                    |scratch, codes, scales, tile| {
                        plan.rows_bf16_dots(codes, scales, &x_pairs, batch, scratch, tile)
                    },
                )
            }
            #[cfg(target_arch = "x86_64")]
            Resolved::Avx512(plan) => {
                let x_simd = plan.prepare_activations(x_rot, batch);
                self.for_row_tiles(
                    codes,
                    scales,
                    batch,
                    out,
                    split,
                    || plan.scratch(),
                    |scratch, codes, scales, tile| {
                        plan.rows(codes, scales, &x_simd, batch, scratch, tile)
                    },
                )
            }
            #[cfg(target_arch = "x86_64")]
            Resolved::Avx2(plan) => {
                let x_simd = plan.prepare_activations(x_rot, batch);
                self.for_row_tiles(
                    codes,
                    scales,
                    batch,
                    out,
                    split,
                    || plan.scratch(),
                    |scratch, codes, scales, tile| {
                        plan.rows(codes, scales, &x_simd, batch, scratch, tile)
                    },
                )
            }
        }
    }

    /// Run `work(scratch, codes, scales, out)` on tiles of `ROWS_PER_TASK` rows, on the rayon
    /// pool, in contiguous parts on the OpenMP team, or in order on this thread; `out` is the
    /// tile's `rows × batch` outputs. One scratch per worker, from `init`. The tiles are the same
    /// whichever way, so each output comes from the same instructions.
    #[allow(clippy::too_many_arguments)]
    fn for_row_tiles<S>(
        &self,
        codes: &[u8],
        scales: &[f16],
        batch: usize,
        target: &mut [f32],
        split: Split,
        init: impl Fn() -> S + Send + Sync,
        work: impl Fn(&mut S, &[u8], &[f16], &mut [f32]) + Send + Sync,
    ) {
        let (rb, groups) = (self.layout.row_bytes, self.layout.groups);
        let tile = |scratch: &mut S, (task, tile): (usize, &mut [f32])| {
            let (r0, r1) = (
                task * ROWS_PER_TASK,
                task * ROWS_PER_TASK + tile.len() / batch,
            );
            work(
                scratch,
                &codes[r0 * rb..r1 * rb],
                &scales[r0 * groups..r1 * groups],
                tile,
            )
        };
        // Infallible: the tiles return Ok.
        let _ = for_chunks(split, target, ROWS_PER_TASK * batch, init, |s, t| {
            tile(s, t);
            Ok(())
        });
    }

    /// The portable kernel and the reference: any p, n and group size. `x_rot` is `batch` rows
    /// of `tuples · p`; `row_codes` is scratch of `tuples`; `out` is `rows × batch` for the rows
    /// of `codes`/`scales`.
    fn scalar_rows(
        &self,
        codes: &[u8],
        scales: &[f16],
        x_rot: &[f32],
        batch: usize,
        row_codes: &mut [u32],
        out: &mut [f32],
    ) {
        let layout = &self.layout;
        let (p, g, grid) = (self.p, self.group_size, &self.grid[..]);
        let width = layout.tuples * p;
        let bits = (grid.len() / p).trailing_zeros();
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
                            1 => group_dot::<1>(codes, grid, x),
                            2 => group_dot::<2>(codes, grid, x),
                            3 => group_dot::<3>(codes, grid, x),
                            4 => group_dot::<4>(codes, grid, x),
                            _ => (start..end)
                                .map(|i| grid[row_codes[i / p] as usize * p + i % p] * xb[i])
                                .sum(),
                        }
                    } else {
                        // A group boundary splits a tuple: value by value.
                        (start..end)
                            .map(|i| grid[row_codes[i / p] as usize * p + i % p] * xb[i])
                            .sum()
                    };
                    total += part * scale.to_f32();
                }
                *yb = total;
            }
        }
    }
}

/// Run `f(scratch, (index, chunk))` over `out.chunks_mut(chunk_len)` on `split`, one scratch
/// per worker from `init`; the first error is returned. On the OpenMP team each thread takes one
/// contiguous run of chunks, fixed by the chunk count and the thread count (a part whose thread
/// the runtime did not start is run by another one); the chunks are the same on every split, so
/// each value comes from the same instructions.
fn for_chunks<T: Send, S>(
    split: Split,
    out: &mut [T],
    chunk_len: usize,
    init: impl Fn() -> S + Send + Sync,
    f: impl Fn(&mut S, (usize, &mut [T])) -> Result<()> + Send + Sync,
) -> Result<()> {
    let chunks = out.len().div_ceil(chunk_len.max(1));
    match split {
        Split::Rayon => out
            .par_chunks_mut(chunk_len)
            .enumerate()
            .try_for_each_init(&init, &f),
        Split::Team(team, threads) if threads > 1 && chunks > 1 => {
            let parts = threads.min(chunks);
            let mut pieces = Vec::with_capacity(parts);
            let mut rest = out;
            for k in 0..parts {
                let range = omp_team::part(chunks, k, parts);
                let len = (range.len() * chunk_len).min(rest.len());
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
                pieces.push(std::sync::Mutex::new(Some((range.start, piece))));
                rest = tail;
            }
            let first_error = std::sync::Mutex::new(None);
            let timing = team.run(parts, &|index, count| {
                let mut scratch = init();
                for slot in pieces.iter().skip(index).step_by(count) {
                    let taken = slot.lock().ok().and_then(|mut s| s.take());
                    let Some((first, piece)) = taken else {
                        continue;
                    };
                    let done = piece
                        .chunks_mut(chunk_len)
                        .enumerate()
                        .try_for_each(|(i, c)| f(&mut scratch, (first + i, c)));
                    if let (Err(e), Ok(mut slot)) = (done, first_error.lock()) {
                        slot.get_or_insert(e);
                    }
                }
            });
            omp_team::note_timing(timing);
            match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
        Split::Team(..) | Split::CallingThread => {
            let mut scratch = init();
            out.chunks_mut(chunk_len)
                .enumerate()
                .try_for_each(|c| f(&mut scratch, c))
        }
    }
}

/// Where [`LutPlan::run`]'s row tiles run.
#[derive(Clone, Copy)]
enum Split {
    CallingThread,
    Rayon,
    /// The process's OpenMP team (see [`omp_team`]), with this many threads.
    Team(&'static omp_team::OmpTeam, usize),
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

/// The element types [`LutPlan::dequantize_rotated`] writes.
trait SimdOutput: Copy + Send + Sync {
    fn outputs(values: &mut [Self]) -> Outputs<'_>;
}

impl SimdOutput for f32 {
    fn outputs(values: &mut [f32]) -> Outputs<'_> {
        Outputs::F32(values)
    }
}

impl SimdOutput for bf16 {
    fn outputs(values: &mut [bf16]) -> Outputs<'_> {
        Outputs::Bf16(values)
    }
}

/// `bf16::from_f32` (nearest, ties to even; NaNs stay NaNs of the same sign), branch-free so
/// that loops over it vectorize (`half`'s branches cost ~1 ns per value).
fn round_to_bf16(v: f32) -> bf16 {
    let bits = v.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    let nan = (bits >> 16) as u16 | 0x0040;
    bf16::from_bits(if bits & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        rounded
    })
}

/// Round a finite f32 to the nearest bf16, ties to even: `bf16::from_f32` without its NaN branch,
/// so the dequantization loop vectorizes (grid points and scales are finite, checked up front).
fn finite_to_bf16(v: f32) -> bf16 {
    let bits = v.to_bits();
    bf16::from_bits(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16)
}

/// `out = grid[codes] · scale`, `P` values per code (the last code may be cut by `out`'s end).
fn dequantize_group<const P: usize, T>(
    codes: &[u32],
    grid: &[f32],
    scale: f32,
    out: &mut [T],
    convert: &impl Fn(f32) -> T,
) {
    let whole = out.len() / P;
    let (head, tail) = out.split_at_mut(whole * P);
    for (&code, values) in codes.iter().zip(head.chunks_exact_mut(P)) {
        let point: &[f32; P] = grid[code as usize * P..code as usize * P + P]
            .try_into()
            .expect("P values");
        for (v, &g) in values.iter_mut().zip(point) {
            *v = convert(g * scale);
        }
    }
    if let Some(&code) = codes.get(whole) {
        for (v, &g) in tail.iter_mut().zip(&grid[code as usize * P..]) {
            *v = convert(g * scale);
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

    thread_local! {
        /// The split every `LutPlan` call on this test thread takes, when set.
        pub(super) static FORCED_SPLIT: std::cell::Cell<Option<Split>> =
            const { std::cell::Cell::new(None) };
    }
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
        let plan = LutPlan::new(&w, path).unwrap();
        plan.product(
            &parts.codes,
            &parts.scales,
            &x_rot,
            batch,
            &mut by_row,
            Split::CallingThread,
            false,
        );
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

    #[test]
    fn bf16_rounding_is_half_crates() {
        let mut values = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            1e-40,
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7FFF_FFFF),
            f32::from_bits(0xFFFF_FFFF),
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0x3F80_8001),
            f32::from_bits(0x7F7F_FFFF),
        ];
        values.extend(gaussian(10_000, 3).iter().map(|v| v * 1e3));
        let mut rng = SplitMix64::new(5);
        values.extend((0..100_000).map(|_| f32::from_bits(rng.next_u64() as u32)));
        for v in values {
            assert_eq!(
                round_to_bf16(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
    }

    /// The AVX-512 dequantization (every byte-plane variant it takes: p = 1 and 2, table sizes,
    /// bf16 and symmetric grids, sub-byte codes, partial chunks) writes the scalar one's bits,
    /// in f32 and bf16, zeros past the padded row included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_dequantization_matches_scalar() {
        if !avx512::available() {
            eprintln!("skipped: this machine has no AVX-512 VBMI");
            return;
        }
        let shapes: [Shape; 8] = [
            (37, 576, 2, 256, 576, 64),
            (5, 100, 2, 256, 64, 32),
            (9, 1000, 2, 64, 8, 64),
            (4, 256, 2, 128, 256, 64),
            (7, 200, 2, 16, 8, 32),
            (3, 300, 1, 256, 4, 64),
            (6, 96, 1, 8, 32, 32),
            (2, 72, 1, 2, 8, 16),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (i, &shape) in shapes.iter().enumerate() {
            for variant in 0..3 {
                let mut parts = RandomParts::new(shape, i % 2 == 0, 900 + i as u64);
                let (p, n) = (parts.p, parts.n);
                if variant >= 1 && p == 2 {
                    parts
                        .grid
                        .iter_mut()
                        .for_each(|v| *v = bf16::from_f32(*v).to_f32());
                }
                if variant == 2 && n == 256 {
                    let half = 128 * p;
                    for k in 0..half {
                        parts.grid[half + k] = -parts.grid[k];
                    }
                }
                let simd = LutPlan::new(&parts.weights(), KernelPath::Avx512).unwrap();
                let Resolved::Avx512(inner) = &simd.kernel else {
                    panic!("not the AVX-512 path")
                };
                if !inner.can_dequantize() {
                    continue;
                }
                seen.insert(simd.kernel_path());
                let scalar = LutPlan::new(&parts.weights(), KernelPath::Scalar).unwrap();
                let len = parts.rows * simd.rotated_width();
                let (c, s) = (&parts.codes[..], &parts.scales[..]);
                let (mut a, mut b) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                simd.dequantize_rotated(c, s, Outputs::F32(&mut a)).unwrap();
                scalar
                    .dequantize_rotated(c, s, Outputs::F32(&mut b))
                    .unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "case {i} {shape:?} variant {variant}");
                let (mut a, mut b) = (vec![bf16::NAN; len], vec![bf16::NAN; len]);
                simd.dequantize_rotated(c, s, Outputs::Bf16(&mut a))
                    .unwrap();
                scalar
                    .dequantize_rotated(c, s, Outputs::Bf16(&mut b))
                    .unwrap();
                let bits = |v: &[bf16]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&a),
                    bits(&b),
                    "case {i} {shape:?} variant {variant} bf16"
                );
            }
        }
        for path in ["avx512/planes", "avx512/planes-bf16", "avx512/planes-sym"] {
            assert!(seen.contains(path), "{path} not exercised: {seen:?}");
        }
        assert!(seen.contains("avx512/planes-bf16-sym"), "{seen:?}");
    }

    /// bf16 activations on a bf16 grid (p = 2) take `vdpbf16ps` where the CPU has AVX-512 BF16:
    /// the product of the bf16-rounded rotated activations, every table size and the
    /// symmetric grid; a batch row's bits do not depend on its batch.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_bf16_dots_match_reference() {
        if !avx512::available() || !is_x86_feature_detected!("avx512bf16") {
            eprintln!("skipped: this machine has no AVX-512 VBMI + BF16");
            return;
        }
        let shapes: [Shape; 5] = [
            (9, 1000, 2, 64, 8, 64),
            (5, 100, 2, 128, 64, 32),
            (4, 256, 2, 256, 256, 64),
            (37, 576, 2, 256, 576, 64),
            (6, 200, 2, 256, 8, 64),
        ];
        for (i, &shape) in shapes.iter().enumerate() {
            for symmetric in [false, true] {
                let mut parts = RandomParts::new(shape, i % 2 == 0, 950 + i as u64);
                parts
                    .grid
                    .iter_mut()
                    .for_each(|v| *v = bf16::from_f32(*v).to_f32());
                if symmetric {
                    if parts.n != 256 {
                        continue;
                    }
                    for k in 0..256 {
                        parts.grid[256 + k] = -parts.grid[k];
                    }
                }
                let plan = LutPlan::new(&parts.weights(), KernelPath::Avx512).unwrap();
                let Resolved::Avx512(inner) = &plan.kernel else {
                    panic!("not the AVX-512 path")
                };
                assert!(inner.takes_bf16_dots(), "{shape:?}");
                let (rows, cols) = (parts.rows, parts.cols);
                let width = plan.rotated_width();
                for batch in [1usize, 3, 8, 9] {
                    let x: Vec<bf16> = gaussian(batch * cols, 60 + i as u64)
                        .iter()
                        .map(|&v| bf16::from_f32(v))
                        .collect();
                    let mut x_rot = vec![0f32; batch * width];
                    plan.rotate_into(Activations::Bf16(&x), batch, Outputs::F32(&mut x_rot))
                        .unwrap();
                    x_rot
                        .iter_mut()
                        .for_each(|v| *v = bf16::from_f32(*v).to_f32());
                    let expected = reference_rotated(&parts, &x_rot, batch);
                    let mut y = vec![f32::NAN; batch * rows];
                    let (c, s) = (&parts.codes[..], &parts.scales[..]);
                    plan.run(
                        c,
                        s,
                        Activations::Bf16(&x),
                        batch,
                        Outputs::F32(&mut y),
                        None,
                    )
                    .unwrap();
                    let err = relative_error(&y, &expected);
                    assert!(
                        err < 5e-6,
                        "case {i} {shape:?} sym {symmetric} batch {batch}: {err}"
                    );
                    let last = batch - 1;
                    let mut one = vec![0f32; rows];
                    let x_last = &x[last * cols..batch * cols];
                    plan.run(
                        c,
                        s,
                        Activations::Bf16(x_last),
                        1,
                        Outputs::F32(&mut one),
                        None,
                    )
                    .unwrap();
                    assert!(
                        one.iter()
                            .zip(&y[last * rows..])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "case {i} batch {batch}: the last row differs from its own call"
                    );
                }
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

    /// Grids with point c + 128 = −point c take the half-table front end (f32 and bf16 grids).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_symmetric_grids_match_reference() {
        if !avx512::available() {
            eprintln!("skipped: this machine has no AVX-512 VBMI");
            return;
        }
        let symmetrize = |parts: &mut RandomParts, bf16_grid: bool| {
            let half = 128 * parts.p;
            for i in 0..half {
                let mut v = parts.grid[i];
                if bf16_grid {
                    v = half::bf16::from_f32(v).to_f32();
                }
                parts.grid[i] = v;
                parts.grid[half + i] = -v;
            }
        };
        let shapes: [Shape; 4] = [
            (37, 256, 2, 256, 256, 64),
            (5, 100, 2, 256, 64, 32),
            (9, 1000, 2, 256, 8, 64),
            (5, 200, 4, 256, 8, 64),
        ];
        for (i, &shape) in shapes.iter().enumerate() {
            for bf16_grid in [false, true] {
                let mut parts = RandomParts::new(shape, i % 2 == 0, 700 + i as u64);
                symmetrize(&mut parts, bf16_grid);
                let want = if bf16_grid {
                    "avx512/planes-bf16-sym"
                } else {
                    "avx512/planes-sym"
                };
                assert_eq!(kernel_path(&parts.weights()).unwrap(), want);
                for batch in [1usize, 2, 3, 8, 9] {
                    let err = check_product(&parts, batch, KernelPath::Avx512);
                    assert!(err < 2e-6, "case {i} {shape:?} batch {batch}: {err}");
                }
                // One point that is not the exact negation keeps the full tables.
                parts.grid[128 * parts.p + 3] =
                    f32::from_bits(parts.grid[128 * parts.p + 3].to_bits() ^ 1);
                assert!(!kernel_path(&parts.weights()).unwrap().ends_with("-sym"));
            }
        }
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

    /// bf16 activations and outputs, and a fused bias: the same f32 product, converted.
    #[test]
    fn bf16_activations_and_bias() {
        for (i, &shape) in shapes().iter().enumerate() {
            let parts = RandomParts::new(shape, i % 2 == 0, 500 + i as u64);
            let (rows, cols) = (parts.rows, parts.cols);
            let plan = LutPlan::new(&parts.weights(), KernelPath::Auto).unwrap();
            for batch in [1usize, 3, 9] {
                let x: Vec<bf16> = gaussian(batch * cols, 6)
                    .iter()
                    .map(|&v| bf16::from_f32(v))
                    .collect();
                let x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                let bias = gaussian(rows, 7);
                let mut expected = vec![0f32; batch * rows];
                let (c, s) = (&parts.codes[..], &parts.scales[..]);
                plan.run(
                    c,
                    s,
                    Activations::F32(&x32),
                    batch,
                    Outputs::F32(&mut expected),
                    None,
                )
                .unwrap();
                let mut with_bias = vec![0f32; batch * rows];
                let out = Outputs::F32(&mut with_bias);
                plan.run(c, s, Activations::Bf16(&x), batch, out, Some(&bias))
                    .unwrap();
                let mut rounded = vec![bf16::ZERO; batch * rows];
                let out = Outputs::Bf16(&mut rounded);
                plan.run(c, s, Activations::Bf16(&x), batch, out, None)
                    .unwrap();
                for (o, (&e, (&b, &r))) in expected
                    .iter()
                    .zip(with_bias.iter().zip(&rounded))
                    .enumerate()
                {
                    assert_eq!(b, e + bias[o % rows], "case {i} batch {batch} output {o}");
                    assert_eq!(r, bf16::from_f32(e), "case {i} batch {batch} output {o}");
                }
            }
        }
    }

    /// The batched path's parts: rotated activations times dequantized rotated weights equal the
    /// LUT product (same values, another summation order).
    #[test]
    fn dequantized_rotated_product_matches() {
        let mut cases = shapes();
        cases.extend([(4, 50, 2, 256, 2, 7), (3, 96, 3, 64, 32, 24)]);
        for (i, &shape) in cases.iter().enumerate() {
            let parts = RandomParts::new(shape, i % 2 == 1, 600 + i as u64);
            let (rows, cols) = (parts.rows, parts.cols);
            let plan = LutPlan::new(&parts.weights(), KernelPath::Auto).unwrap();
            let width = plan.rotated_width();
            let batch = 4;
            let x = gaussian(batch * cols, 8);
            let mut w_rot = vec![f32::NAN; rows * width];
            let (c, s) = (&parts.codes[..], &parts.scales[..]);
            plan.dequantize_rotated(c, s, Outputs::F32(&mut w_rot))
                .unwrap();
            let reference = parts.rotated_weights();
            let l = parts.layout;
            for r in 0..rows {
                for k in 0..width {
                    let want = if k < l.padded_cols {
                        reference[r * l.padded_cols + k] as f32
                    } else {
                        0.0
                    };
                    assert_eq!(w_rot[r * width + k], want, "case {i} row {r} value {k}");
                }
            }
            let mut w_bf16 = vec![bf16::ZERO; rows * width];
            plan.dequantize_rotated(c, s, Outputs::Bf16(&mut w_bf16))
                .unwrap();
            assert!(w_bf16
                .iter()
                .zip(&w_rot)
                .all(|(a, b)| *a == bf16::from_f32(*b)));
            let mut x_rot = vec![f32::NAN; batch * width];
            plan.rotate_into(Activations::F32(&x), batch, Outputs::F32(&mut x_rot))
                .unwrap();
            let mut lut = vec![0f32; batch * rows];
            plan.run(
                c,
                s,
                Activations::F32(&x),
                batch,
                Outputs::F32(&mut lut),
                None,
            )
            .unwrap();
            let dense: Vec<f64> = (0..batch * rows)
                .map(|o| {
                    let (b, r) = (o / rows, o % rows);
                    (0..width)
                        .map(|k| x_rot[b * width + k] as f64 * w_rot[r * width + k] as f64)
                        .sum()
                })
                .collect();
            let err = relative_error(&lut, &dense);
            assert!(err < 2e-6, "case {i} {shape:?}: {err}");
            assert!(plan
                .dequantize_rotated(c, s, Outputs::F32(&mut w_rot[1..]))
                .is_err());
        }
    }

    /// Products large enough for the pool: the same bits on 1 and 3 threads, and as the one-row
    /// calls (which run on the calling thread).
    #[test]
    fn parallel_and_sequential_agree() {
        let rows = PARALLEL_MIN_WORK / 288 + 5;
        let parts = RandomParts::new((rows, 576, 2, 256, 576, 64), true, 10);
        let x = gaussian(2 * 576, 11);
        let run = |threads: usize, batch: usize| {
            let mut y = vec![0f32; batch * rows];
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    lut_linear(&parts.weights(), &x[..batch * 576], batch, &mut y).unwrap()
                });
            y
        };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let one = run(1, 2);
        assert_eq!(bits(&one), bits(&run(3, 2)));
        assert_eq!(bits(&one[..rows]), bits(&run(3, 1)));
    }

    /// Work split over an OpenMP team (GCC's libgomp, loaded here) gives the same bits as the
    /// calling thread and the rayon pool, for team sizes that do and do not divide the row
    /// tiles, f32 and bf16: the LUT product, the batched path's dequantization and rotation.
    #[test]
    fn openmp_team_matches_calling_thread() {
        let team = omp_team::tests::system_gomp();
        let shapes = [
            (67, 576, 2, 256, 576, 64),
            (576, 576, 2, 256, 576, 64),
            (40, 96, 1, 16, 32, 32),
            (33, 80, 3, 64, 16, 24),
        ];
        for (i, &shape) in shapes.iter().enumerate() {
            let parts = RandomParts::new(shape, true, 700 + i as u64);
            let (rows, cols) = (parts.rows, parts.cols);
            let rounded: Vec<f32> = parts
                .grid
                .iter()
                .map(|&v| bf16::from_f32(v).to_f32())
                .collect();
            for grid in ["f32", "bf16"] {
                let mut weights = parts.weights();
                if grid == "bf16" {
                    weights.grid = &rounded;
                }
                let plan = LutPlan::new(&weights, KernelPath::Auto).unwrap();
                let (c, s) = (&parts.codes[..], &parts.scales[..]);
                let width = plan.rotated_width();
                for batch in [1usize, 3, 40] {
                    let x32 = gaussian(batch * cols, 12 + batch as u64);
                    let x: Vec<bf16> = x32.iter().map(|&v| bf16::from_f32(v)).collect();
                    let run = |split: Split| {
                        FORCED_SPLIT.set(Some(split));
                        let mut y = vec![bf16::ZERO; batch * rows];
                        let (xa, out) = (Activations::Bf16(&x), Outputs::Bf16(&mut y));
                        plan.run(c, s, xa, batch, out, None).unwrap();
                        let mut y32 = vec![0f32; batch * rows];
                        let out = Outputs::F32(&mut y32);
                        plan.run(c, s, Activations::F32(&x32), batch, out, None)
                            .unwrap();
                        let mut w_rot = vec![bf16::ZERO; rows * width];
                        plan.dequantize_rotated(c, s, Outputs::Bf16(&mut w_rot))
                            .unwrap();
                        let mut w32 = vec![0f32; rows * width];
                        plan.dequantize_rotated(c, s, Outputs::F32(&mut w32))
                            .unwrap();
                        let mut x_rot = vec![bf16::ZERO; batch * width];
                        plan.rotate_into(Activations::Bf16(&x), batch, Outputs::Bf16(&mut x_rot))
                            .unwrap();
                        let mut x_rot32 = vec![0f32; batch * width];
                        let out = Outputs::F32(&mut x_rot32);
                        plan.rotate_into(Activations::F32(&x32), batch, out)
                            .unwrap();
                        FORCED_SPLIT.set(None);
                        let bits16 = |v: &[bf16]| v.iter().map(|b| b.to_bits() as u32).collect();
                        let bits32 = |v: &[f32]| v.iter().map(|b| b.to_bits()).collect();
                        let all: [Vec<u32>; 6] = [
                            bits16(&y),
                            bits32(&y32),
                            bits16(&w_rot),
                            bits32(&w32),
                            bits16(&x_rot),
                            bits32(&x_rot32),
                        ];
                        all
                    };
                    let one = run(Split::CallingThread);
                    assert_eq!(one, run(Split::Rayon), "case {i} grid {grid} batch {batch}");
                    for threads in [1, 2, 3, 64] {
                        let many = run(Split::Team(team, threads));
                        assert_eq!(
                            one, many,
                            "case {i} grid {grid} batch {batch}, {threads} threads"
                        );
                    }
                }
            }
        }
    }

    /// Every chunk runs once on every split, and an error from a chunk on a team thread comes
    /// back to the caller.
    #[test]
    fn chunks_run_once_and_errors_return() {
        let team = omp_team::tests::system_gomp();
        for split in [
            Split::CallingThread,
            Split::Rayon,
            Split::Team(team, 2),
            Split::Team(team, 5),
        ] {
            let mut out = vec![0u32; 37];
            for_chunks(
                split,
                &mut out,
                4,
                || (),
                |_, (i, c)| {
                    c.iter_mut().for_each(|v| *v += 1 + i as u32);
                    Ok(())
                },
            )
            .unwrap();
            let want: Vec<u32> = (0..37).map(|k| 1 + k / 4).collect();
            assert_eq!(out, want);
            let failed = for_chunks(
                split,
                &mut out,
                4,
                || (),
                |_, (i, _)| {
                    if i == 7 {
                        Err(HiggsError::invalid(format!("chunk {i}")))
                    } else {
                        Ok(())
                    }
                },
            );
            assert!(matches!(failed, Err(HiggsError::InvalidArgument(m)) if m == "chunk 7"));
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
