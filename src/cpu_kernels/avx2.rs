//! The AVX2 + FMA LUT kernel (x86-64 without AVX-512 VBMI), tested against the scalar path.
//!
//! A row's codes are first widened to one u32 index each (SIMD for 8- and 4-bit codes, the
//! codec's unpacker otherwise), then processed in runs of 8 codes:
//! - p = 1: `vpermps` for grids of up to 8 points, two `vpermps` and a blend on bit 3 for 16,
//!   `vgatherdps` above;
//! - p = 2: `vpgatherdq` fetches each code's (x, y) pair as one qword, already interleaved like
//!   the activations.
//!
//! Groups must hold whole runs (`group_size % (8·p) == 0`); each group's partial sum is scaled
//! once. The activations keep their natural order, zero-extended to whole runs.
//!
//! Safety: [`Plan::new`] is the only constructor and checks the CPU features at run time, so
//! holding a `Plan` proves the `target_feature` functions may run. Indices are below `n` by
//! construction (at most `log2 n` bits each), so every gather reads inside the grid; all other
//! loads stay within buffers sized in whole runs.
#![allow(unsafe_code)]

use super::LutWeights;
use crate::codec::{unpack_codes, Layout};
use half::f16;
use std::arch::x86_64::*;

/// Codes per run (one ymm register of indices).
const RUN: usize = 8;
/// Activation rows processed per pass over a row's codes.
const BATCH_BLOCK: usize = 4;

/// Whether this CPU has the instructions the kernel uses.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lookup {
    /// p = 1, n ≤ 8: one `vpermps`.
    Permute8,
    /// p = 1, n = 16: two `vpermps` and a blend.
    Permute16,
    /// p = 1, n > 16: `vgatherdps`.
    Gather1,
    /// p = 2: `vpgatherdq` of (x, y) pairs.
    Gather2,
}

/// Everything a call needs, resolved once.
pub(super) struct Plan {
    lookup: Lookup,
    p: usize,
    bits: u32,
    row_bytes: usize,
    groups: usize,
    group_size: usize,
    padded_cols: usize,
    /// Runs of 8 codes per row (the codes of the last one may be padding).
    runs: usize,
    /// Prepared activation floats per batch row: `runs · 8 · p`.
    stride: usize,
    /// Grid points (n × p), padded with zeros to at least 16 values.
    grid: Vec<f32>,
}

/// Per-thread buffers.
pub(super) struct Scratch {
    indices: Vec<u32>,
}

impl Plan {
    /// The plan for these weights, or why the kernel cannot take them.
    pub(super) fn new(w: &LutWeights<'_>, layout: &Layout) -> Result<Plan, String> {
        if !available() {
            return Err("this CPU lacks AVX2 and FMA".into());
        }
        if w.p > 2 {
            return Err(format!("it takes p ≤ 2 (got p = {})", w.p));
        }
        if !w.group_size.is_multiple_of(RUN * w.p) {
            return Err(format!(
                "it needs group_size to be a multiple of 8·p = {} (got {})",
                RUN * w.p,
                w.group_size
            ));
        }
        let lookup = match (w.p, w.n) {
            (1, n) if n <= 8 => Lookup::Permute8,
            (1, 16) => Lookup::Permute16,
            (1, _) => Lookup::Gather1,
            _ => Lookup::Gather2,
        };
        let mut grid = w.grid.to_vec();
        grid.resize(grid.len().max(16), 0.0);
        let runs = layout.tuples.div_ceil(RUN);
        Ok(Plan {
            lookup,
            p: w.p,
            bits: w.n.trailing_zeros(),
            row_bytes: layout.row_bytes,
            groups: layout.groups,
            group_size: w.group_size,
            padded_cols: layout.padded_cols,
            runs,
            stride: runs * RUN * w.p,
            grid,
        })
    }

    pub(super) fn scratch(&self) -> Scratch {
        Scratch {
            indices: vec![0; self.runs * RUN],
        }
    }

    /// Rotated activations (`batch` rows of `tuples · p`) zero-extended to whole runs.
    pub(super) fn prepare_activations(&self, x_rot: &[f32], batch: usize) -> Vec<f32> {
        let width = x_rot.len() / batch;
        let mut out = vec![0f32; batch * self.stride];
        for (dst, src) in out
            .chunks_exact_mut(self.stride)
            .zip(x_rot.chunks_exact(width))
        {
            dst[..width].copy_from_slice(src);
        }
        out
    }

    /// One row's codes as u32 indices, zero past the last code.
    fn widen_codes(&self, row: &[u8], indices: &mut [u32]) {
        let done = match self.bits {
            // SAFETY: holding a `Plan` proves AVX2 (`Plan::new`).
            8 | 4 => unsafe { widen_codes_simd(row, self.bits, indices) },
            _ => 0,
        };
        let tuples_in_row = row.len() * 8 / self.bits as usize;
        let end = indices.len().min(tuples_in_row);
        if done < end {
            // The codec's unpacker, from the first code the SIMD loop left (its byte offset is
            // whole: `done` is a multiple of 8 codes).
            let from = done * self.bits as usize / 8;
            unpack_codes(&row[from..], self.bits, &mut indices[done..end]);
        }
        indices[end..].fill(0);
    }

    /// `out` (rows × batch, row-major) for the rows of `codes` / `scales`; `x` from
    /// [`Plan::prepare_activations`] for `batch` rows.
    pub(super) fn rows(
        &self,
        codes: &[u8],
        scales: &[f16],
        x: &[f32],
        batch: usize,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        assert_eq!(
            x.len(),
            batch * self.stride,
            "activations not prepared for this plan"
        );
        assert_eq!(codes.len(), out.len() / batch * self.row_bytes);
        assert_eq!(scales.len(), out.len() / batch * self.groups);
        for ((row, row_scales), y) in codes
            .chunks_exact(self.row_bytes)
            .zip(scales.chunks_exact(self.groups))
            .zip(out.chunks_exact_mut(batch))
        {
            self.widen_codes(row, &mut scratch.indices);
            for b0 in (0..batch).step_by(BATCH_BLOCK) {
                let nb = BATCH_BLOCK.min(batch - b0);
                let xb = &x[b0 * self.stride..(b0 + nb) * self.stride];
                let kernel: Kernel = match nb {
                    1 => row_kernel::<1>,
                    2 => row_kernel::<2>,
                    3 => row_kernel::<3>,
                    4 => row_kernel::<4>,
                    _ => unreachable!("batch blocks hold 1 to {BATCH_BLOCK} rows"),
                };
                // SAFETY: holding a `Plan` proves the CPU features (`Plan::new`); the slices have
                // the lengths the kernel reads (asserted above and in `row_kernel`).
                unsafe { kernel(self, &scratch.indices, row_scales, xb, &mut y[b0..b0 + nb]) };
            }
        }
    }
}

/// A row kernel: (plan, one row's indices, its scales, `B` rows of prepared activations,
/// `B` outputs).
type Kernel = unsafe fn(&Plan, &[u32], &[f16], &[f32], &mut [f32]);

/// Widen 8- or 4-bit codes to u32 (4-bit: low nibble first), 32 codes per step; returns how
/// many it wrote.
///
/// # Safety
/// Needs AVX2.
#[target_feature(enable = "avx2")]
unsafe fn widen_codes_simd(row: &[u8], bits: u32, out: &mut [u32]) -> usize {
    let step_bytes = if bits == 8 { 32 } else { 16 };
    let low_nibbles = _mm_set1_epi8(0x0F);
    let (mut done, mut at) = (0, 0);
    while at + step_bytes <= row.len() && done + 32 <= out.len() {
        // SAFETY: `step_bytes` bytes from `at` are in the row and 32 indices from `done` are in
        // `out` (loop condition).
        unsafe {
            let src = row.as_ptr().add(at) as *const __m128i;
            let (first, second) = if bits == 8 {
                (_mm_loadu_si128(src), _mm_loadu_si128(src.add(1)))
            } else {
                // Byte k holds code 2k in its low nibble and code 2k + 1 in its high one.
                let v = _mm_loadu_si128(src);
                let lo = _mm_and_si128(v, low_nibbles);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low_nibbles);
                (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi))
            };
            let dst = out.as_mut_ptr().add(done) as *mut __m256i;
            _mm256_storeu_si256(dst, _mm256_cvtepu8_epi32(first));
            _mm256_storeu_si256(dst.add(1), _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(first)));
            _mm256_storeu_si256(dst.add(2), _mm256_cvtepu8_epi32(second));
            _mm256_storeu_si256(
                dst.add(3),
                _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(second)),
            );
        }
        done += 32;
        at += step_bytes;
    }
    done
}

/// The grid values of the 8 codes in `idx`: `[coordinate x (or the value), coordinate y]`,
/// each in code order (p = 2: the pairs interleaved over two registers, codes 0-3 then 4-7).
///
/// # Safety
/// Needs AVX2; indices below n; `plan.grid` holds n·p values (at least 16).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn lookup(plan: &Plan, idx: __m256i, table_lo: __m256, table_hi: __m256) -> [__m256; 2] {
    let grid = plan.grid.as_ptr();
    // SAFETY: every index is below n and the grid holds n·p values (caller).
    unsafe {
        match plan.lookup {
            Lookup::Permute8 => [_mm256_permutevar8x32_ps(table_lo, idx), _mm256_setzero_ps()],
            Lookup::Permute16 => {
                let lo = _mm256_permutevar8x32_ps(table_lo, idx);
                let hi = _mm256_permutevar8x32_ps(table_hi, idx);
                // Bit 3 of the index, moved to the sign bit, picks the upper table.
                let upper = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
                [_mm256_blendv_ps(lo, hi, upper), _mm256_setzero_ps()]
            }
            Lookup::Gather1 => [_mm256_i32gather_ps::<4>(grid, idx), _mm256_setzero_ps()],
            Lookup::Gather2 => {
                let pairs = grid as *const f64;
                let first = _mm256_i32gather_pd::<8>(pairs, _mm256_castsi256_si128(idx));
                let second = _mm256_i32gather_pd::<8>(pairs, _mm256_extracti128_si256::<1>(idx));
                [_mm256_castpd_ps(first), _mm256_castpd_ps(second)]
            }
        }
    }
}

/// Row kernel for `B` batch rows.
///
/// # Safety
/// Needs AVX2 and FMA (a `Plan` proves it); `indices` holds `runs · 8` codes below n,
/// `scales` one row's scales, `x` holds `B · stride`, `out` holds `B`.
#[target_feature(enable = "avx2,fma")]
unsafe fn row_kernel<const B: usize>(
    plan: &Plan,
    indices: &[u32],
    scales: &[f16],
    x: &[f32],
    out: &mut [f32],
) {
    assert!(indices.len() >= plan.runs * RUN && x.len() >= B * plan.stride && out.len() >= B);
    let p = plan.p;
    // SAFETY: the grid holds at least 16 values (`Plan::new`).
    let (table_lo, table_hi) = unsafe {
        (
            _mm256_loadu_ps(plan.grid.as_ptr()),
            _mm256_loadu_ps(plan.grid.as_ptr().add(8)),
        )
    };
    let runs_per_group = plan.group_size / (RUN * p);
    let mut acc = [_mm256_setzero_ps(); B];
    for (group, scale) in scales.iter().enumerate() {
        let first_run = group * runs_per_group;
        // The last group may be shorter (it ends with the padded row).
        let last_run = ((group + 1) * runs_per_group)
            .min((plan.padded_cols).div_ceil(RUN * p))
            .min(plan.runs);
        let mut part = [[_mm256_setzero_ps(); 2]; B];
        for run in first_run..last_run {
            // SAFETY: run < runs, so its 8 indices are in `indices` (asserted).
            let idx =
                unsafe { _mm256_loadu_si256(indices.as_ptr().add(run * RUN) as *const __m256i) };
            // SAFETY: indices are below n (at most log2 n bits each); grid per `Plan::new`.
            let values = unsafe { lookup(plan, idx, table_lo, table_hi) };
            // The same operations in the same order for every batch row.
            for (b, part_b) in part.iter_mut().enumerate() {
                let xr = x.as_ptr().wrapping_add(b * plan.stride + run * RUN * p);
                for (half, &v) in values.iter().enumerate().take(p) {
                    // SAFETY: batch row b < B, run < runs: 8·p floats inside the row's stride.
                    let xv = unsafe { _mm256_loadu_ps(xr.add(8 * half)) };
                    part_b[half] = _mm256_fmadd_ps(v, xv, part_b[half]);
                }
            }
        }
        let s = _mm256_set1_ps(scale.to_f32());
        for (acc_b, part_b) in acc.iter_mut().zip(part) {
            *acc_b = _mm256_fmadd_ps(_mm256_add_ps(part_b[0], part_b[1]), s, *acc_b);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        let quad = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        *o = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)));
    }
}
