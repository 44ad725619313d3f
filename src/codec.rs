//! One tensor in the HIGGS format: rotate each row, scale per group, assign each p-tuple
//! to its nearest grid point, pack the codes; and the way back.
//!
//! Layout of a quantized `rows × cols` weight (the checkpoint stores exactly these arrays):
//! - Each row is zero-padded to `padded_cols`, the next multiple of the Hadamard order `h`
//!   (no padding when `h` divides `cols`, which the automatic choice of `h` ensures whenever it can).
//! - With a seed, the padded row is multiplied by `hadamard::random_signs(seed, padded_cols)`.
//! - Each block of `h` values is transformed by `hadamard::forward` (orthonormal).
//! - Group `j` of `group_size` consecutive rotated values gets one f16 scale `s` (the last group
//!   may be shorter); values are divided by `s`. The format fixes only that; the quantizer
//!   chooses `s` by a [`ScaleSearch`]: among the RMS × a few multipliers and least-squares
//!   refits, the candidate with the least squared error of the group after assignment (see
//!   `choose_scale`; for p = 2 the candidates are scored by table scans, then the chosen one
//!   and the RMS exactly), or the RMS when `p` does not divide the group size.
//! - The scaled row, zero-extended to a multiple of `p`, is cut into p-tuples; each becomes the
//!   index of its nearest grid point, `log2(n)` bits, packed LSB-first into a little-endian
//!   bit stream; each row's stream is padded to whole bytes (`row_bytes`).
//!
//! Dequantization reverses it: grid point × scale, `hadamard::inverse`, signs, crop.
#![forbid(unsafe_code)]

use crate::assign::{AssignStats, Assigner, SCAN_MAX_FACTORS};
use crate::grid::Grid;
use crate::{hadamard, HiggsError, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::Arc;

/// What to quantize a tensor to.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantSpec {
    /// Grid dimension (1 = scalar).
    pub p: usize,
    /// Grid size; bits per weight before scales = log2(n) / p.
    pub n: usize,
    /// Hadamard order; `None` picks the largest supported order dividing the row width.
    pub hadamard_size: Option<usize>,
    /// Rotated values per scale.
    pub group_size: usize,
    /// Seed of the random ±1 signs applied before the rotation; `None` for none.
    pub seed: Option<u64>,
}

impl QuantSpec {
    /// The grid size for `bits` per weight in `p` dimensions: n = 2^(p·bits), which must be a
    /// whole power of two (3.25 bits with p = 4 gives n = 8192).
    pub fn grid_size_for_bits(bits: f64, p: usize) -> Result<usize> {
        let code_bits = bits * p as f64;
        let rounded = code_bits.round();
        if !(1.0..=16.0).contains(&rounded) || (code_bits - rounded).abs() > 1e-9 {
            return Err(HiggsError::invalid(format!(
                "{bits} bits per weight with p = {p} gives {code_bits} bits per code; it must be a whole number from 1 to 16"
            )));
        }
        Ok(1usize << rounded as u32)
    }

    /// Bits in one code.
    pub fn code_bits(&self) -> u32 {
        self.n.trailing_zeros()
    }

    /// Bits per weight of the codes alone (before scales and padding).
    pub fn bits(&self) -> f64 {
        self.code_bits() as f64 / self.p as f64
    }

    /// The layout this spec gives a `rows × cols` matrix, or why it cannot take it.
    pub fn layout(&self, rows: usize, cols: usize) -> Result<Layout> {
        if rows == 0 || cols == 0 {
            return Err(HiggsError::invalid(format!(
                "cannot quantize an empty matrix ({rows} × {cols})"
            )));
        }
        if !self.n.is_power_of_two() || self.n < 2 {
            return Err(HiggsError::invalid(format!(
                "grid size n = {} must be a power of two >= 2",
                self.n
            )));
        }
        if self.group_size == 0 {
            return Err(HiggsError::invalid("group_size must be at least 1"));
        }
        let block = match self.hadamard_size {
            Some(h) => {
                if !hadamard::is_supported_order(h) {
                    return Err(HiggsError::invalid(format!(
                        "Hadamard size {h} is not supported: use m·2^k with m in {{1, 12, 20, 28, 144, 240, 336, 400, 560, 784}}, 2 <= size <= {}",
                        hadamard::MAX_ORDER
                    )));
                }
                h
            }
            None => hadamard::largest_supported_divisor(cols)
                .unwrap_or_else(|| cols.next_power_of_two().min(1024)),
        };
        let padded_cols = cols.div_ceil(block) * block;
        let tuples = padded_cols.div_ceil(self.p);
        let code_bits = self.code_bits() as usize;
        Ok(Layout {
            rows,
            cols,
            block,
            padded_cols,
            tuples,
            groups: padded_cols.div_ceil(self.group_size),
            row_bytes: (tuples * code_bits).div_ceil(8),
        })
    }
}

/// Sizes derived from a spec and a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub rows: usize,
    pub cols: usize,
    /// Hadamard order actually used.
    pub block: usize,
    /// Row width after zero padding to a multiple of `block`.
    pub padded_cols: usize,
    /// p-tuples (codes) per row.
    pub tuples: usize,
    /// Scales per row.
    pub groups: usize,
    /// Packed code bytes per row.
    pub row_bytes: usize,
}

/// The elements of a row-major matrix to quantize, borrowed without a copy.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
    /// Raw little-endian bytes of one of the float types (possibly unaligned, as in a mmap).
    Bytes(ElemType, &'a [u8]),
}

/// Element types [`Source::Bytes`] can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemType {
    F32,
    F16,
    Bf16,
}

impl ElemType {
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::F16 | ElemType::Bf16 => 2,
        }
    }
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Source::F32(v) => v.len(),
            Source::F16(v) => v.len(),
            Source::Bf16(v) => v.len(),
            Source::Bytes(t, b) => b.len() / t.size(),
        }
    }

    /// Elements [start, start + out.len()) as f32.
    #[inline(always)]
    fn read(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Source::F32(v) => out.copy_from_slice(&v[start..end]),
            Source::F16(v) => out
                .iter_mut()
                .zip(&v[start..end])
                .for_each(|(o, x)| *o = x.to_f32()),
            Source::Bf16(v) => out
                .iter_mut()
                .zip(&v[start..end])
                .for_each(|(o, x)| *o = x.to_f32()),
            Source::Bytes(ElemType::F32, b) => {
                for (o, c) in out.iter_mut().zip(b[start * 4..end * 4].chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Source::Bytes(ElemType::F16, b) => {
                for (o, c) in out.iter_mut().zip(b[start * 2..end * 2].chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            Source::Bytes(ElemType::Bf16, b) => {
                for (o, c) in out.iter_mut().zip(b[start * 2..end * 2].chunks_exact(2)) {
                    // bf16 is the high half of an f32.
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        }
    }
}

/// A quantized matrix: the arrays the checkpoint stores, and how it was made.
#[derive(Clone, Debug)]
pub struct QuantizedTensor {
    pub spec: QuantSpec,
    pub layout: Layout,
    /// `rows × row_bytes` packed codes.
    pub codes: Vec<u8>,
    /// `rows × groups` scales.
    pub scales: Vec<f16>,
    /// Σ (Ŵ − W)² and Σ W², for the relative MSE.
    pub squared_error: f64,
    pub squared_norm: f64,
}

impl QuantizedTensor {
    /// Bits per weight as stored: codes (padding included) and scales, over the real weights.
    pub fn bits_per_weight(&self) -> f64 {
        let bits = self.codes.len() as f64 * 8.0 + self.scales.len() as f64 * 16.0;
        bits / (self.layout.rows * self.layout.cols) as f64
    }

    /// ‖Ŵ − W‖² / ‖W‖² (0 for an all-zero matrix quantized exactly).
    pub fn relative_mse(&self) -> f64 {
        if self.squared_norm == 0.0 {
            self.squared_error
        } else {
            self.squared_error / self.squared_norm
        }
    }
}

/// Everything the per-row work needs, resolved once per tensor.
struct Prepared {
    spec: QuantSpec,
    layout: Layout,
    grid: Arc<Grid>,
    assigner: Arc<Assigner>,
    signs: Option<Vec<f32>>,
    search: ScaleSearch,
    /// The fast paths: whole-row group searches ([`quantize_groups`]) and rows compiled for
    /// the widest SIMD ([`crate::assign::with_wide_simd`]). Tests turn them off to compare
    /// with the plain group-by-group path; the bytes out are the same.
    fast_paths: bool,
}

impl Prepared {
    fn new(spec: &QuantSpec, rows: usize, cols: usize) -> Result<Prepared> {
        let layout = spec.layout(rows, cols)?;
        let assigner = Assigner::for_grid(spec.p, spec.n)?;
        Ok(Prepared {
            spec: spec.clone(),
            layout,
            grid: assigner.grid.clone(),
            assigner,
            signs: spec
                .seed
                .map(|seed| hadamard::random_signs(seed, layout.padded_cols)),
            search: ScaleSearch::default(),
            fast_paths: true,
        })
    }
}

/// How the quantizer picks each group's scale. Every choice writes the same format (one f16
/// scale per group, nearest grid points for it); they differ in speed and weight error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ScaleSearch {
    /// The group's RMS (one assignment per group): fastest, about 24 % more weight MSE.
    Rms,
    /// RMS × 6 multipliers, each with a least-squares refit, then refit rounds from the best
    /// (p = 2: all scored by table scans, then 2 exact assignments; other p: refits scored by a
    /// bound, about 8 exact assignments). About 1 % more weight MSE than `Full`; SmolLM2
    /// perplexity level with it (within seed noise). The default.
    #[default]
    Fast,
    /// RMS × 11 multipliers, each with a least-squares refit, then up to 4 more refit rounds
    /// (p = 2: scored by table scans; other p: about 26 exact assignments per group).
    Full,
}

impl ScaleSearch {
    /// The names `"rms"`, `"fast"`, `"full"` (as the CLI and Python take them).
    pub fn parse(name: &str) -> Result<ScaleSearch> {
        match name {
            "rms" => Ok(ScaleSearch::Rms),
            "fast" => Ok(ScaleSearch::Fast),
            "full" => Ok(ScaleSearch::Full),
            other => Err(HiggsError::invalid(format!(
                "scale search {other:?} is not one of \"fast\", \"full\", \"rms\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ScaleSearch::Rms => "rms",
            ScaleSearch::Fast => "fast",
            ScaleSearch::Full => "full",
        }
    }
}

/// Per-thread buffers, reused across rows.
struct Scratch {
    row: Vec<f32>,
    codes: Vec<u32>,
    back: Vec<f32>,
    search: SearchScratch,
    groups: GroupScratch,
}

impl Scratch {
    fn new(layout: &Layout, p: usize, group_size: usize) -> Scratch {
        Scratch {
            row: vec![0.0; layout.tuples * p],
            codes: vec![0; layout.tuples],
            back: vec![0.0; layout.padded_cols],
            search: SearchScratch::new(group_size.min(layout.padded_cols), p),
            groups: GroupScratch::default(),
        }
    }
}

/// Buffers of [`quantize_groups`]: whole rows of scaled values and codes, and per group.
#[derive(Default)]
struct GroupScratch {
    /// The row scaled by each group's chosen (or only) candidate, and the stats of its codes.
    scaled: Vec<f32>,
    stats: Vec<AssignStats>,
    /// p = 2 searches: the row scaled by each group's RMS, its codes and stats.
    rms_scaled: Vec<f32>,
    rms_codes: Vec<u32>,
    rms_stats: Vec<AssignStats>,
    /// Per group: Σx², and the candidate and RMS scales (zero for a group that keeps a zero
    /// scale).
    xx: Vec<f64>,
    candidate: Vec<(f16, f16)>,
}

/// Buffers of the per-group scale search.
struct SearchScratch {
    scaled: Vec<f32>,
    codes: Vec<u32>,
    best_codes: Vec<u32>,
    /// The group scaled by each of [`FAST_MULTIPLIERS`]' scales, one after another, and their
    /// codes (see [`score_scales`]).
    batch_scaled: Vec<f32>,
    batch_codes: Vec<u32>,
}

impl SearchScratch {
    fn new(group_size: usize, p: usize) -> SearchScratch {
        SearchScratch {
            scaled: vec![0.0; group_size],
            codes: vec![0; group_size.div_ceil(p)],
            best_codes: vec![0; group_size.div_ceil(p)],
            batch_scaled: Vec::new(),
            batch_codes: Vec::new(),
        }
    }
}

/// Multipliers of the group's RMS tried as scales by [`ScaleSearch::Full`]. The grid is
/// MSE-optimal for N(0, 1), but a group of 32–128 rotated values is one sample, not the
/// distribution: the scale that fits this sample best is often 10–25 % off its RMS, and the
/// error as a function of the scale has many local minima (a refit only finds the nearest), so
/// the search starts from many points. Choosing the scale cuts the weight MSE by about a fifth
/// (p = 2, n = 256, g = 64) in the same stored format.
const SCALE_MULTIPLIERS: [f64; 11] = [
    0.80, 0.85, 0.90, 0.95, 1.00, 1.05, 1.10, 1.15, 1.20, 1.25, 1.30,
];
/// Starting multipliers of [`ScaleSearch::Fast`]: every other one of the full search.
const FAST_MULTIPLIERS: [f64; 6] = [0.80, 0.90, 1.00, 1.10, 1.20, 1.30];
/// Rounds of (least-squares scale for the current codes → nearest codes for that scale).
const LEAST_SQUARES_ROUNDS: usize = 4;
/// Refit rounds of [`ScaleSearch::Fast`] with exact assignments (p ≠ 2).
const FAST_EXACT_ROUNDS: usize = 1;

/// The best scale found so far for one group, with its codes in `SearchScratch::best_codes`.
struct Best {
    /// Σ‖x − s·q‖² (f64, from the f32 sums of the assignment).
    error: f64,
    scale: f16,
    /// Least-squares scale of the best codes.
    refit: f16,
}

/// A candidate scale worth scoring: finite and positive.
fn usable(s: f16) -> bool {
    s.is_finite() && s.to_f32() > 0.0
}

/// Scores scale `s` for group `x` by exact assignment: returns its error Σ‖x − s·q‖² with
/// nearest codes (kept in `best_codes` when `s` beats `best`), the least-squares scale of those
/// codes (or `s` itself when that is not usable), and the error of that refit with the same
/// codes (an upper bound of its error with nearest codes).
fn score_scale(
    assigner: &Assigner,
    x: &[f32],
    s: f16,
    scratch: &mut SearchScratch,
    best: &mut Best,
) -> (f64, f16, f64) {
    if !usable(s) {
        return (f64::INFINITY, s, f64::INFINITY);
    }
    let sf = s.to_f32();
    let tuples = x.len() / assigner.grid.p;
    let scaled = &mut scratch.scaled[..x.len()];
    let inv = 1.0 / sf;
    scaled.iter_mut().zip(x).for_each(|(y, &v)| *y = v * inv);
    let stats = assigner.assign_stats(scaled, &mut scratch.codes[..tuples]);
    let (error, refit, refit_bound) = scale_score(s, stats);
    if error < best.error {
        *best = Best {
            error,
            scale: s,
            refit,
        };
        std::mem::swap(&mut scratch.codes, &mut scratch.best_codes);
    }
    (error, refit, refit_bound)
}

/// [`score_scale`] for several scales in order (the same results and the same updates of
/// `best`), with one assignment call for all of them: the searches of many tuples then
/// overlap their table loads.
fn score_scales(
    assigner: &Assigner,
    x: &[f32],
    scales: &[f16],
    scratch: &mut SearchScratch,
    best: &mut Best,
    out: &mut [(f64, f16, f64)],
) {
    let tuples = x.len() / assigner.grid.p;
    let usable_scales = scales.iter().filter(|&&s| usable(s)).count();
    scratch.batch_scaled.resize(usable_scales * x.len(), 0.0);
    scratch.batch_codes.resize(usable_scales * tuples, 0);
    let mut slots = scratch.batch_scaled.chunks_exact_mut(x.len());
    for &s in scales.iter().filter(|&&s| usable(s)) {
        let inv = 1.0 / s.to_f32();
        let slot = slots.next().expect("one slot per usable scale");
        slot.iter_mut().zip(x).for_each(|(y, &v)| *y = v * inv);
    }
    assigner.assign(&scratch.batch_scaled, &mut scratch.batch_codes);
    let mut k = 0;
    for (&s, o) in scales.iter().zip(out.iter_mut()) {
        if !usable(s) {
            *o = (f64::INFINITY, s, f64::INFINITY);
            continue;
        }
        let scaled = &scratch.batch_scaled[k * x.len()..(k + 1) * x.len()];
        let codes = &scratch.batch_codes[k * tuples..(k + 1) * tuples];
        k += 1;
        *o = scale_score(s, assigner.stats(scaled, codes));
        if o.0 < best.error {
            *best = Best {
                error: o.0,
                scale: s,
                refit: o.1,
            };
            scratch.best_codes[..tuples].copy_from_slice(codes);
        }
    }
}

/// Σ‖x − s·q‖² of a group from the sums of its assignment scaled by 1/s.
#[inline(always)]
fn scaled_error(s: f16, stats: AssignStats) -> f64 {
    let sd = s.to_f32() as f64;
    stats.error as f64 * sd * sd
}

/// (error, least-squares refit, error bound of the refit) of scale `s` from the sums of the
/// scaled group's assignment (see [`score_scale`]).
fn scale_score(s: f16, stats: AssignStats) -> (f64, f16, f64) {
    let sd = s.to_f32() as f64;
    let error = scaled_error(s, stats);
    // In x's units Σx·q = s·dot and Σ‖q‖² = norm.
    let (dot, norm) = (stats.dot as f64, stats.norm as f64);
    let mut refit = s;
    if norm > 0.0 && dot > 0.0 {
        let ls = f16::from_f64(sd * dot / norm);
        if usable(ls) {
            refit = ls;
        }
    }
    // Σ‖x − r·q‖² = Σ‖x − s·q‖² + 2(s − r)·Σ(x − s·q)·q + (s − r)²·Σ‖q‖².
    let delta = sd - refit.to_f64();
    let refit_bound = error + 2.0 * delta * sd * (dot - norm) + delta * delta * norm;
    (error, refit, refit_bound)
}

/// The scale search of `search` (not RMS) scored with [`Assigner::scan_pairs`] estimates instead
/// of exact assignments: p = 2 only (`None` otherwise). The estimate of a scale's error uses
/// grid points that are nearest or almost so, so it is close to (and never below) the exact
/// error. `xx` is Σx² of the group.
fn scan_search(
    assigner: &Assigner,
    x: &[f32],
    xx: f64,
    rms: f64,
    search: ScaleSearch,
) -> Option<f16> {
    // Estimated errors of the scales, with the least-squares refits of their points, updating
    // `best` (error, scale, refit); unusable candidates are skipped.
    let estimate = |scales: &[f16], refits: &mut [f16], best: &mut (f64, f16, f16)| -> Option<()> {
        let mut invs = [0f32; SCAN_MAX_FACTORS];
        let mut sums = [(0f32, 0f32); SCAN_MAX_FACTORS];
        for (inv, &s) in invs.iter_mut().zip(scales) {
            *inv = if usable(s) { 1.0 / s.to_f32() } else { 0.0 };
        }
        assigner.scan_pairs(x, &invs[..scales.len()], &mut sums)?;
        for ((&s, &(dot, norm)), refit) in scales.iter().zip(&sums).zip(refits.iter_mut()) {
            *refit = s;
            if !usable(s) {
                continue;
            }
            let (sd, dot, norm) = (s.to_f64(), dot as f64, norm as f64);
            let error = xx - 2.0 * sd * dot + sd * sd * norm;
            if norm > 0.0 && dot > 0.0 {
                let ls = f16::from_f64(dot / norm);
                if usable(ls) {
                    *refit = ls;
                }
            }
            if error < best.0 {
                *best = (error, s, *refit);
            }
        }
        Some(())
    };
    let multipliers: &[f64] = match search {
        ScaleSearch::Rms => return None,
        ScaleSearch::Fast => &FAST_MULTIPLIERS,
        ScaleSearch::Full => &SCALE_MULTIPLIERS,
    };
    const { assert!(SCALE_MULTIPLIERS.len() <= SCAN_MAX_FACTORS) };
    let count = multipliers.len();
    let mut best = (f64::INFINITY, f16::from_f64(rms), f16::from_f64(rms));
    let mut starts = [f16::ZERO; SCAN_MAX_FACTORS];
    for (s, &m) in starts.iter_mut().zip(multipliers) {
        *s = f16::from_f64(rms * m);
    }
    let mut refits = [f16::ZERO; SCAN_MAX_FACTORS];
    estimate(&starts[..count], &mut refits[..count], &mut best)?;
    let mut unused = [f16::ZERO; SCAN_MAX_FACTORS];
    estimate(&refits[..count], &mut unused[..count], &mut best)?;
    for _ in 0..LEAST_SQUARES_ROUNDS {
        let (error, scale, refit) = best;
        if refit == scale {
            break;
        }
        estimate(&[refit], &mut [f16::ZERO], &mut best)?;
        if best.0 >= error {
            break;
        }
    }
    Some(best.1)
}

/// The f16 scale for one group of rotated values `x` (a whole number of p-tuples) chosen as
/// `search` says; writes the nearest codes for it into `codes` and returns (scale, Σ‖x − s·q‖²).
/// Every search scores the RMS scale exactly as well, so none is worse than [`ScaleSearch::Rms`].
/// Ties keep the earlier candidate (the order is fixed), so the result is deterministic. The
/// scale is finite; 0 for an all-zero group. `xx` is Σx² of the group.
fn choose_scale(
    assigner: &Assigner,
    x: &[f32],
    xx: f64,
    search: ScaleSearch,
    scratch: &mut SearchScratch,
    codes: &mut [u32],
) -> (f16, f64) {
    let tuples = x.len() / assigner.grid.p;
    let rms = (xx / x.len() as f64).sqrt();
    let rms16 = f16::from_f64(rms);
    if rms == 0.0 || !usable(rms16) {
        // All zeros (or an RMS below f16's range): a zero scale, and the codes of the origin
        // (dequantization gives zeros whatever they are).
        let zeros = &mut scratch.scaled[..x.len()];
        zeros.fill(0.0);
        assigner.assign(zeros, codes);
        return (f16::ZERO, xx);
    }
    let mut best = Best {
        error: f64::INFINITY,
        scale: rms16,
        refit: rms16,
    };
    if let Some(s) = scan_search(assigner, x, xx, rms, search) {
        // p = 2: the scan's estimates picked the scale; exact assignment gives its codes.
        score_scale(assigner, x, s, scratch, &mut best);
        score_scale(assigner, x, rms16, scratch, &mut best);
    } else {
        match search {
            ScaleSearch::Rms => {
                score_scale(assigner, x, rms16, scratch, &mut best);
            }
            ScaleSearch::Fast => {
                // Each start scored exactly; its refit by the bound from the start's codes, and
                // the refit with the lowest bound scored exactly, then refit rounds.
                let mut bound_best = (f64::INFINITY, rms16);
                let starts = FAST_MULTIPLIERS.map(|m| f16::from_f64(rms * m));
                let mut scores = [(0.0, f16::ZERO, 0.0); FAST_MULTIPLIERS.len()];
                if assigner.grid.p >= 3 {
                    // Cell searches wait on table loads: one call for all starts.
                    score_scales(assigner, x, &starts, scratch, &mut best, &mut scores);
                } else {
                    // p = 1 has a fused assign-and-sum path per call.
                    for (&s, o) in starts.iter().zip(scores.iter_mut()) {
                        *o = score_scale(assigner, x, s, scratch, &mut best);
                    }
                }
                for (_, refit, bound) in scores {
                    if bound < bound_best.0 {
                        bound_best = (bound, refit);
                    }
                }
                if bound_best.0 < best.error {
                    score_scale(assigner, x, bound_best.1, scratch, &mut best);
                }
                refit_rounds(assigner, x, FAST_EXACT_ROUNDS, scratch, &mut best);
            }
            ScaleSearch::Full => {
                for m in SCALE_MULTIPLIERS {
                    let (_, refit, _) =
                        score_scale(assigner, x, f16::from_f64(rms * m), scratch, &mut best);
                    score_scale(assigner, x, refit, scratch, &mut best);
                }
                refit_rounds(assigner, x, LEAST_SQUARES_ROUNDS, scratch, &mut best);
            }
        }
    }
    // The RMS scale is usable, so `best` holds a scored candidate and its codes.
    debug_assert!(best.error.is_finite());
    codes.copy_from_slice(&scratch.best_codes[..tuples]);
    (best.scale, best.error)
}

/// Up to `rounds` of: score the best's least-squares refit; stop when it does not improve.
fn refit_rounds(
    assigner: &Assigner,
    x: &[f32],
    rounds: usize,
    scratch: &mut SearchScratch,
    best: &mut Best,
) {
    for _ in 0..rounds {
        let (error, scale, refit) = (best.error, best.scale, best.refit);
        if refit == scale {
            break;
        }
        score_scale(assigner, x, refit, scratch, best);
        if best.error >= error {
            break;
        }
    }
}

/// Quantize a row-major `rows × cols` matrix with the default [`ScaleSearch`]. Rows run in
/// parallel on the current rayon pool; the bytes out do not depend on the number of threads.
pub fn quantize(
    source: Source<'_>,
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
) -> Result<QuantizedTensor> {
    quantize_with(source, rows, cols, spec, ScaleSearch::default())
}

/// [`quantize`] with the given scale search.
pub fn quantize_with(
    source: Source<'_>,
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
    search: ScaleSearch,
) -> Result<QuantizedTensor> {
    quantize_rows(source, rows, cols, spec, search, true)
}

/// [`quantize_with`], with or without the fast paths (see `Prepared::fast_paths`).
fn quantize_rows(
    source: Source<'_>,
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
    search: ScaleSearch,
    fast_paths: bool,
) -> Result<QuantizedTensor> {
    // Shape problems (empty, unsupported sizes) first: they say more than a length mismatch.
    spec.layout(rows, cols)?;
    if source.len() != rows.saturating_mul(cols) {
        return Err(HiggsError::invalid(format!(
            "the data holds {} elements, but the shape {rows} × {cols} needs {}",
            source.len(),
            rows as u128 * cols as u128
        )));
    }
    let mut prep = Prepared::new(spec, rows, cols)?;
    prep.search = search;
    prep.fast_paths = fast_paths;
    let layout = prep.layout;
    let mut codes = vec![0u8; rows * layout.row_bytes];
    let mut scales = vec![f16::ZERO; rows * layout.groups];
    let mut errors = vec![(0f64, 0f64); rows];
    codes
        .par_chunks_mut(layout.row_bytes)
        .zip(scales.par_chunks_mut(layout.groups))
        .zip(errors.par_iter_mut())
        .enumerate()
        .try_for_each_init(
            || Scratch::new(&layout, spec.p, spec.group_size),
            |scratch, (r, ((row_codes, row_scales), err))| {
                let job = RowJob {
                    prep: &prep,
                    source,
                    r,
                    scratch,
                    row_codes,
                    row_scales,
                };
                // The row's plain loops (conversion, sums, scaling, packing) vectorize wider.
                *err = if prep.fast_paths {
                    crate::assign::with_wide_simd(job)?
                } else {
                    crate::assign::WideWork::run(job)?
                };
                Ok::<(), HiggsError>(())
            },
        )?;
    // Summed in row order so the result does not depend on the thread count.
    let (squared_error, squared_norm) = errors
        .iter()
        .fold((0.0, 0.0), |(e, n), &(re, rn)| (e + re, n + rn));
    Ok(QuantizedTensor {
        spec: spec.clone(),
        layout,
        codes,
        scales,
        squared_error,
        squared_norm,
    })
}

/// One row of [`quantize_with`], for [`crate::assign::with_wide_simd`].
struct RowJob<'a, 'b> {
    prep: &'a Prepared,
    source: Source<'a>,
    r: usize,
    scratch: &'b mut Scratch,
    row_codes: &'b mut [u8],
    row_scales: &'b mut [f16],
}

impl crate::assign::WideWork for RowJob<'_, '_> {
    type Output = Result<(f64, f64)>;
    #[inline(always)]
    fn run(self) -> Self::Output {
        quantize_row(
            self.prep,
            self.source,
            self.r,
            self.scratch,
            self.row_codes,
            self.row_scales,
        )
    }
}

/// Σ x² in f64, with 8 independent accumulators (a fixed order, so deterministic; and
/// vectorizable, unlike one serial sum).
#[inline(always)]
fn sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v as f64 * v as f64;
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += v as f64 * v as f64;
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// One row: returns (Σ error², Σ w²) of the row in the original coordinates.
#[inline(always)]
fn quantize_row(
    prep: &Prepared,
    source: Source<'_>,
    r: usize,
    scratch: &mut Scratch,
    row_codes: &mut [u8],
    row_scales: &mut [f16],
) -> Result<(f64, f64)> {
    let layout = &prep.layout;
    let Scratch {
        row,
        codes,
        back,
        search,
        groups,
    } = scratch;
    let cols = layout.cols;
    source.read(r * cols, &mut row[..cols]);
    row[cols..].fill(0.0);
    // A branch-free check first (it vectorizes); the position only when something is wrong.
    if !row[..cols].iter().fold(true, |ok, x| ok & x.is_finite()) {
        let c = row[..cols].iter().position(|x| !x.is_finite()).unwrap_or(0);
        return Err(HiggsError::NonFinite {
            what: "the weights".into(),
            row: r,
            col: c,
            value: row[c],
        });
    }
    let norm = sum_squares(&row[..cols]);
    let padded = &mut row[..layout.padded_cols];
    if let Some(signs) = &prep.signs {
        padded.iter_mut().zip(signs).for_each(|(x, s)| *x *= s);
    }
    hadamard::forward(padded, layout.block)?;
    let g = prep.spec.group_size;
    let p = prep.spec.p;
    let padded_cols = layout.padded_cols;
    // The search needs groups of whole tuples; otherwise (p ∤ g) tuples straddle groups, each
    // group gets its RMS and the whole row is assigned at once.
    let per_group = g.is_multiple_of(p) && padded_cols.is_multiple_of(p);
    let mut rotated_error = if per_group
        && prep.fast_paths
        && (prep.search == ScaleSearch::Rms || prep.assigner.scans_pairs())
    {
        quantize_groups(prep, r, padded, groups, codes, row_scales)?
    } else {
        quantize_group_by_group(prep, r, padded, per_group, search, codes, row_scales)?
    };
    if !per_group {
        prep.assigner.assign(row, codes);
        rotated_error = rotated_squared_error(prep, row, codes, row_scales);
    }
    pack_codes(codes, prep.spec.code_bits(), row_codes);
    finish_row(
        prep,
        source,
        r,
        codes,
        row_scales,
        back,
        rotated_error,
        norm,
    )
}

/// The groups of a rotated row one at a time: each [`choose_scale`] (or, when p ∤ g, its RMS,
/// scaling the row in place for one assignment of the whole row by the caller). Returns the
/// summed error of the chosen scales (0 when p ∤ g).
fn quantize_group_by_group(
    prep: &Prepared,
    r: usize,
    padded: &mut [f32],
    per_group: bool,
    search: &mut SearchScratch,
    codes: &mut [u32],
    row_scales: &mut [f16],
) -> Result<f64> {
    let g = prep.spec.group_size;
    let p = prep.spec.p;
    let padded_cols = prep.layout.padded_cols;
    let mut rotated_error = 0f64;
    for (j, scale) in row_scales.iter_mut().enumerate() {
        let (start, end) = (j * g, ((j + 1) * g).min(padded_cols));
        let group = &mut padded[start..end];
        let xx = sum_squares(group);
        let rms = (xx / group.len() as f64).sqrt();
        if f16::from_f64(rms).is_infinite() {
            return Err(rms_overflow(r, rms));
        }
        if per_group {
            let (s, error) = choose_scale(
                &prep.assigner,
                group,
                xx,
                prep.search,
                search,
                &mut codes[start / p..end / p],
            );
            *scale = s;
            rotated_error += error;
        } else {
            let s = f16::from_f64(rms);
            *scale = s;
            let inv = if s.to_f32() > 0.0 {
                1.0 / s.to_f32()
            } else {
                0.0
            };
            group.iter_mut().for_each(|x| *x *= inv);
        }
    }
    Ok(rotated_error)
}

/// Σx² of each group of a rotated row into `xx`; the error of the first group whose RMS
/// overflows the f16 scale.
#[inline(always)]
fn group_sums(prep: &Prepared, r: usize, padded: &[f32], xx: &mut Vec<f64>) -> Result<()> {
    let g = prep.spec.group_size;
    xx.clear();
    for group in padded.chunks(g) {
        let sum = sum_squares(group);
        let rms = (sum / group.len() as f64).sqrt();
        if f16::from_f64(rms).is_infinite() {
            return Err(rms_overflow(r, rms));
        }
        xx.push(sum);
    }
    Ok(())
}

fn rms_overflow(r: usize, rms: f64) -> HiggsError {
    HiggsError::Unsupported(format!(
        "row {r}: a group's RMS {rms:.3e} overflows the f16 scale; weights this large are not supported"
    ))
}

/// The RMS scale of a group with Σx² = `xx` over `len` values, or None when the group keeps a
/// zero scale (all zeros, or an RMS below f16's range; see [`choose_scale`]).
#[inline(always)]
fn rms_scale(xx: f64, len: usize) -> (f64, Option<f16>) {
    let rms = (xx / len as f64).sqrt();
    let rms16 = f16::from_f64(rms);
    (rms, (rms != 0.0 && usable(rms16)).then_some(rms16))
}

/// `out` = `x` / `s` as the search scales a group (zeros for no scale).
#[inline(always)]
fn scale_group(x: &[f32], s: Option<f16>, out: &mut [f32]) {
    match s {
        Some(s) => {
            let inv = 1.0 / s.to_f32();
            out.iter_mut().zip(x).for_each(|(y, &v)| *y = v * inv);
        }
        None => out.fill(0.0),
    }
}

/// The groups of a rotated row (p | g) with whole-row assignments: the RMS search, or a p = 2
/// search whose scan picks each group's candidate, then the candidate and the RMS are assigned
/// exactly, the better kept. The same scales, codes and errors as [`choose_scale`] per group
/// (the same candidates scored in the same order; a candidate equal to one already scored
/// cannot win, so it is not scored again). Returns the summed error.
#[inline(always)]
fn quantize_groups(
    prep: &Prepared,
    r: usize,
    padded: &[f32],
    scratch: &mut GroupScratch,
    codes: &mut [u32],
    row_scales: &mut [f16],
) -> Result<f64> {
    let g = prep.spec.group_size;
    let assigner = &prep.assigner;
    let n = padded.len();
    let GroupScratch {
        scaled,
        stats,
        rms_scaled,
        rms_codes,
        rms_stats,
        xx,
        candidate,
    } = scratch;
    group_sums(prep, r, padded, xx)?;
    let groups = xx.len();
    scaled.resize(n, 0.0);
    stats.resize(groups, AssignStats::default());
    candidate.clear();
    let searched = prep.search != ScaleSearch::Rms;
    if searched {
        rms_scaled.resize(n, 0.0);
        rms_codes.resize(codes.len(), 0);
        rms_stats.resize(groups, AssignStats::default());
    }
    for (j, (x, &sum)) in padded.chunks(g).zip(xx.iter()).enumerate() {
        let (rms, rms16) = rms_scale(sum, x.len());
        let range = j * g..j * g + x.len();
        let chosen = if searched {
            scale_group(x, rms16, &mut rms_scaled[range.clone()]);
            rms16.map(|_| {
                scan_search(assigner, x, sum, rms, prep.search)
                    .expect("scans_pairs: the scan is available")
            })
        } else {
            rms16
        };
        scale_group(x, chosen, &mut scaled[range]);
        candidate.push((chosen.unwrap_or(f16::ZERO), rms16.unwrap_or(f16::ZERO)));
    }
    assigner.assign_stats_groups(scaled, g, codes, stats);
    if searched {
        assigner.assign_stats_groups(rms_scaled, g, rms_codes, rms_stats);
    }
    let p = prep.spec.p;
    let mut rotated_error = 0f64;
    for j in 0..groups {
        let (s, rms16) = candidate[j];
        if s == f16::ZERO {
            // A zero scale: the codes of the origin (the group was scaled to zeros).
            row_scales[j] = f16::ZERO;
            rotated_error += xx[j];
            continue;
        }
        let mut best = (f64::INFINITY, s);
        let error = scaled_error(s, stats[j]);
        if error < best.0 {
            best = (error, s);
        }
        // The RMS, unless it is the candidate (then its error is the same and cannot win).
        if searched && rms16 != s {
            let error = scaled_error(rms16, rms_stats[j]);
            if error < best.0 {
                best = (error, rms16);
                let tuples = j * g / p..(j * g + g).min(n) / p;
                codes[tuples.clone()].copy_from_slice(&rms_codes[tuples]);
            }
        }
        row_scales[j] = best.1;
        rotated_error += best.0;
    }
    Ok(rotated_error)
}

/// The row's (Σ error², Σ w²) in the original coordinates (see [`quantize_row`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn finish_row(
    prep: &Prepared,
    source: Source<'_>,
    r: usize,
    codes: &[u32],
    row_scales: &[f16],
    back: &mut [f32],
    rotated_error: f64,
    norm: f64,
) -> Result<(f64, f64)> {
    let layout = &prep.layout;
    let cols = layout.cols;
    let err = if layout.padded_cols == cols {
        // The rotation is orthonormal, so the error is the same in rotated coordinates: no
        // inverse transform needed (equal up to float rounding).
        rotated_error
    } else {
        // With padding, only the real columns count: dequantize the row and compare.
        dequantize_row_into(prep, codes, row_scales, back)?;
        let mut err = 0f64;
        let mut chunk = [0f32; 256];
        let mut start = 0;
        while start < cols {
            let len = (cols - start).min(chunk.len());
            source.read(r * cols + start, &mut chunk[..len]);
            for (a, b) in chunk[..len].iter().zip(&back[start..start + len]) {
                let d = (*a - *b) as f64;
                err += d * d;
            }
            start += len;
        }
        err
    };
    Ok((err, norm))
}

/// Σ over the row of (scale · (x − grid point))², with `scaled` the scaled rotated values.
fn rotated_squared_error(prep: &Prepared, scaled: &[f32], codes: &[u32], scales: &[f16]) -> f64 {
    let p = prep.spec.p;
    let g = prep.spec.group_size;
    let padded_cols = prep.layout.padded_cols;
    let points = &prep.grid.points;
    let mut group_err = vec![0f32; scales.len()];
    for (t, &code) in codes.iter().enumerate() {
        let point = &points[code as usize * p..code as usize * p + p];
        for (k, &v) in point.iter().enumerate() {
            let i = t * p + k;
            if i < padded_cols {
                let d = scaled[i] - v;
                group_err[i / g] += d * d;
            }
        }
    }
    group_err
        .iter()
        .zip(scales)
        .map(|(&e, s)| e as f64 * (s.to_f64() * s.to_f64()))
        .sum()
}

/// Codes and scales of one row back to `padded_cols` values in the original coordinates.
fn dequantize_row_into(
    prep: &Prepared,
    codes: &[u32],
    scales: &[f16],
    out: &mut [f32],
) -> Result<()> {
    let p = prep.spec.p;
    let g = prep.spec.group_size;
    let padded_cols = prep.layout.padded_cols;
    for (t, &code) in codes.iter().enumerate() {
        let point = &prep.grid.points[code as usize * p..code as usize * p + p];
        for (k, &v) in point.iter().enumerate() {
            let i = t * p + k;
            if i < padded_cols {
                out[i] = v * scales[i / g].to_f32();
            }
        }
    }
    hadamard::inverse(&mut out[..padded_cols], prep.layout.block)?;
    if let Some(signs) = &prep.signs {
        out.iter_mut().zip(signs).for_each(|(x, s)| *x *= s);
    }
    Ok(())
}

/// Dequantize to a row-major `rows × cols` f32 matrix.
pub fn dequantize(q: &QuantizedTensor) -> Result<Vec<f32>> {
    let layout = q.layout;
    check_parts(&q.spec, &layout, &q.codes, &q.scales)?;
    let prep = Prepared::new(&q.spec, layout.rows, layout.cols)?;
    let mut out = vec![0f32; layout.rows * layout.cols];
    out.par_chunks_mut(layout.cols)
        .zip(q.codes.par_chunks(layout.row_bytes))
        .zip(q.scales.par_chunks(layout.groups))
        .try_for_each_init(
            || (vec![0u32; layout.tuples], vec![0f32; layout.padded_cols]),
            |(codes, back), ((out_row, row_codes), row_scales)| {
                unpack_codes(row_codes, q.spec.code_bits(), codes);
                dequantize_row_into(&prep, codes, row_scales, back)?;
                out_row.copy_from_slice(&back[..layout.cols]);
                Ok::<(), HiggsError>(())
            },
        )?;
    Ok(out)
}

/// Check stored arrays against the layout (for tensors read from files or from Python).
pub fn check_parts(spec: &QuantSpec, layout: &Layout, codes: &[u8], scales: &[f16]) -> Result<()> {
    let expected = spec.layout(layout.rows, layout.cols)?;
    if expected != *layout {
        return Err(HiggsError::invalid(format!(
            "layout {layout:?} does not follow from the spec, which gives {expected:?}"
        )));
    }
    if codes.len() != layout.rows * layout.row_bytes {
        return Err(HiggsError::invalid(format!(
            "codes hold {} bytes; {} rows × {} bytes are needed",
            codes.len(),
            layout.rows,
            layout.row_bytes
        )));
    }
    if scales.len() != layout.rows * layout.groups {
        return Err(HiggsError::invalid(format!(
            "scales hold {} values; {} rows × {} groups are needed",
            scales.len(),
            layout.rows,
            layout.groups
        )));
    }
    Ok(())
}

/// Pack `codes` of `bits` bits each, LSB-first, into `out` (which is fully overwritten).
#[inline(always)]
pub fn pack_codes(codes: &[u32], bits: u32, out: &mut [u8]) {
    match bits {
        8 => out.iter_mut().zip(codes).for_each(|(o, &c)| *o = c as u8),
        4 => {
            out.fill(0);
            for (o, pair) in out.iter_mut().zip(codes.chunks(2)) {
                *o = pair[0] as u8 | (pair.get(1).copied().unwrap_or(0) as u8) << 4;
            }
        }
        _ => {
            out.fill(0);
            let mut acc = 0u64;
            let mut filled = 0u32;
            let mut pos = 0;
            for &c in codes {
                acc |= (c as u64) << filled;
                filled += bits;
                while filled >= 8 {
                    out[pos] = acc as u8;
                    pos += 1;
                    acc >>= 8;
                    filled -= 8;
                }
            }
            if filled > 0 {
                out[pos] = acc as u8;
            }
        }
    }
}

/// Inverse of [`pack_codes`]: fills all of `codes`.
pub fn unpack_codes(packed: &[u8], bits: u32, codes: &mut [u32]) {
    match bits {
        8 => codes
            .iter_mut()
            .zip(packed)
            .for_each(|(c, &b)| *c = b as u32),
        _ => {
            let mask = (1u64 << bits) - 1;
            let mut acc = 0u64;
            let mut filled = 0u32;
            let mut pos = 0;
            for c in codes.iter_mut() {
                while filled < bits {
                    acc |= (packed[pos] as u64) << filled;
                    pos += 1;
                    filled += 8;
                }
                *c = (acc & mask) as u32;
                acc >>= bits;
                filled -= bits;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn spec(p: usize, n: usize, h: Option<usize>, seed: Option<u64>) -> QuantSpec {
        QuantSpec {
            p,
            n,
            hadamard_size: h,
            group_size: 64,
            seed,
        }
    }

    fn gaussian(len: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0f32; len];
        SplitMix64::new(seed).fill_gaussian(&mut v);
        v
    }

    #[test]
    fn pack_roundtrip_all_widths() {
        let mut rng = SplitMix64::new(3);
        for bits in 1..=16u32 {
            for len in [1usize, 2, 3, 7, 64, 101] {
                let codes: Vec<u32> = (0..len)
                    .map(|_| (rng.next_u64() as u32) & ((1 << bits) - 1))
                    .collect();
                let mut packed = vec![0xAAu8; (len * bits as usize).div_ceil(8)];
                pack_codes(&codes, bits, &mut packed);
                let mut back = vec![0u32; len];
                unpack_codes(&packed, bits, &mut back);
                assert_eq!(codes, back, "bits {bits} len {len}");
            }
        }
    }

    #[test]
    fn gaussian_matrix_error_matches_grid_mse() {
        // A Gaussian matrix stays Gaussian after rotation, so the relative error is near the
        // grid's per-dimension MSE (0.00775 for p = 2, n = 256 with RMS scales); the per-group
        // scale search fits each group of 64 and brings it to about 0.0061.
        let (rows, cols) = (64, 1024);
        let w = gaussian(rows * cols, 11);
        let q = quantize(Source::F32(&w), rows, cols, &spec(2, 256, None, Some(1))).unwrap();
        let rel = q.relative_mse();
        assert!(rel > 0.0055 && rel < 0.0068, "relative MSE {rel}");
        assert!((q.bits_per_weight() - 4.25).abs() < 1e-12);
        let back = dequantize(&q).unwrap();
        let err: f64 = w
            .iter()
            .zip(&back)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let norm: f64 = w.iter().map(|&a| (a as f64).powi(2)).sum();
        assert!(
            (err / norm - rel).abs() < 1e-5 * rel,
            "{} vs {rel}",
            err / norm
        );
    }

    #[test]
    fn padding_counts_in_bits_and_error_is_exact() {
        let (rows, cols) = (5, 100);
        let w = gaussian(rows * cols, 5);
        let q = quantize(Source::F32(&w), rows, cols, &spec(2, 256, Some(64), None)).unwrap();
        assert_eq!(q.layout.padded_cols, 128);
        // 64 codes × 8 bits + 2 scales × 16 bits per row, over 100 weights.
        assert!((q.bits_per_weight() - (64.0 * 8.0 + 32.0) / 100.0).abs() < 1e-12);
        let back = dequantize(&q).unwrap();
        let err: f64 = w
            .iter()
            .zip(&back)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        assert!((err - q.squared_error).abs() <= 1e-9 * err.max(1.0));
    }

    #[test]
    fn deterministic_across_thread_counts() {
        let (rows, cols) = (37, 576);
        let w = gaussian(rows * cols, 9);
        let s = spec(2, 256, None, Some(42));
        let run = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| quantize(Source::F32(&w), rows, cols, &s).unwrap())
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(a.codes, b.codes);
        assert_eq!(a.scales, b.scales);
        assert_eq!(a.squared_error.to_bits(), b.squared_error.to_bits());
    }

    #[test]
    fn all_input_types_agree() {
        let (rows, cols) = (3, 256);
        let w: Vec<f32> = gaussian(rows * cols, 1)
            .iter()
            .map(|&x| bf16::from_f32(x).to_f32())
            .collect();
        let s = spec(1, 16, None, Some(0));
        let a = quantize(Source::F32(&w), rows, cols, &s).unwrap();
        let b16: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        let b = quantize(Source::Bf16(&b16), rows, cols, &s).unwrap();
        let bytes: Vec<u8> = b16.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        let c = quantize(Source::Bytes(ElemType::Bf16, &bytes), rows, cols, &s).unwrap();
        assert_eq!(a.codes, b.codes);
        assert_eq!(a.codes, c.codes);
        assert_eq!(a.scales, c.scales);
    }

    #[test]
    fn bad_input_is_named() {
        let mut w = gaussian(4 * 64, 2);
        w[2 * 64 + 5] = f32::NAN;
        let err = quantize(Source::F32(&w), 4, 64, &spec(2, 256, None, None)).unwrap_err();
        assert!(err.to_string().contains("row 2, column 5"), "{err}");
        let err = quantize(Source::F32(&w), 0, 64, &spec(2, 256, None, None)).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = quantize(Source::F32(&w), 5, 64, &spec(2, 256, None, None)).unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        let err =
            quantize(Source::F32(&w[..256]), 4, 64, &spec(2, 256, Some(44), None)).unwrap_err();
        assert!(err.to_string().contains("Hadamard size 44"), "{err}");
        assert!(QuantSpec::grid_size_for_bits(3.3, 2).is_err());
        assert_eq!(QuantSpec::grid_size_for_bits(3.25, 4).unwrap(), 8192);
    }

    /// Σ‖x − s·q‖² over a group with nearest points q for scale s.
    fn group_error(assigner: &Assigner, x: &[f32], s: f16) -> f64 {
        let p = assigner.grid.p;
        let scaled: Vec<f32> = x.iter().map(|&v| v / s.to_f32()).collect();
        let mut codes = vec![0u32; x.len() / p];
        assigner.assign(&scaled, &mut codes);
        x.chunks_exact(p)
            .zip(&codes)
            .map(|(t, &c)| {
                t.iter()
                    .zip(assigner.grid.point(c as usize))
                    .map(|(&v, &q)| (v as f64 - s.to_f64() * q as f64).powi(2))
                    .sum::<f64>()
            })
            .sum()
    }

    #[test]
    fn batched_scoring_matches_one_scale_at_a_time() {
        let mut rng = SplitMix64::new(31);
        for (p, n, g) in [(4usize, 8192usize, 64usize), (3, 4096, 48), (4, 256, 32)] {
            let assigner = Assigner::for_grid(p, n).unwrap();
            let mut batch = SearchScratch::new(g, p);
            let mut single = SearchScratch::new(g, p);
            for trial in 0..100 {
                let mut x = vec![0f32; g];
                rng.fill_gaussian(&mut x);
                x[trial % g] *= 1.0 + (trial % 7) as f32;
                let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / g as f64).sqrt();
                let mut scales = FAST_MULTIPLIERS.map(|m| f16::from_f64(rms * m));
                if trial % 10 == 0 {
                    scales[2] = f16::ZERO; // unusable: skipped, as one at a time
                }
                let fresh = || Best {
                    error: f64::INFINITY,
                    scale: f16::ONE,
                    refit: f16::ONE,
                };
                let (mut best_b, mut best_s) = (fresh(), fresh());
                let mut scores = [(0.0, f16::ZERO, 0.0); FAST_MULTIPLIERS.len()];
                score_scales(&assigner, &x, &scales, &mut batch, &mut best_b, &mut scores);
                for (&s, &got) in scales.iter().zip(&scores) {
                    let want = score_scale(&assigner, &x, s, &mut single, &mut best_s);
                    assert_eq!(
                        (got.0.to_bits(), got.1, got.2.to_bits()),
                        (want.0.to_bits(), want.1, want.2.to_bits()),
                        "p {p} n {n} trial {trial} scale {s}"
                    );
                }
                assert_eq!(best_b.error.to_bits(), best_s.error.to_bits());
                assert_eq!((best_b.scale, best_b.refit), (best_s.scale, best_s.refit));
                let tuples = g / p;
                assert_eq!(batch.best_codes[..tuples], single.best_codes[..tuples]);
            }
        }
    }

    #[test]
    fn scale_search_is_never_worse_than_rms_and_usually_better() {
        let mut rng = SplitMix64::new(21);
        for (p, n, g) in [
            (1, 16, 64),
            (2, 256, 64),
            (2, 64, 32),
            (2, 256, 128),
            (2, 256, 36),
            (4, 4096, 64),
        ] {
            let assigner = Assigner::for_grid(p, n).unwrap();
            let mut scratch = SearchScratch::new(g, p);
            let mut codes = vec![0u32; g / p];
            // Σ error over the groups for RMS, fast, full.
            let mut totals = [0f64; 3];
            for trial in 0..200 {
                let mut x = vec![0f32; g];
                rng.fill_gaussian(&mut x);
                if trial % 4 == 0 {
                    // Heavier tails than a Gaussian, as a group with an outlier.
                    x[trial % g] *= 6.0;
                }
                let xx: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
                let mut errors = [0f64; 3];
                for (k, search) in [ScaleSearch::Rms, ScaleSearch::Fast, ScaleSearch::Full]
                    .into_iter()
                    .enumerate()
                {
                    let (s, reported) =
                        choose_scale(&assigner, &x, xx, search, &mut scratch, &mut codes);
                    // The codes are the nearest points for the scale, and the error is theirs.
                    let exact = group_error(&assigner, &x, s);
                    assert!(
                        (reported - exact).abs() <= 1e-4 * exact,
                        "{search:?} p {p} n {n} g {g}: reported {reported}, exact {exact}"
                    );
                    let scaled: Vec<f32> = x.iter().map(|&v| v / s.to_f32()).collect();
                    let mut nearest = vec![0u32; g / p];
                    assigner.assign(&scaled, &mut nearest);
                    assert_eq!(codes, nearest, "{search:?} p {p} n {n} g {g}");
                    errors[k] = exact;
                    totals[k] += exact;
                }
                let rms = f16::from_f64((xx / g as f64).sqrt());
                assert_eq!(errors[0], group_error(&assigner, &x, rms));
                assert!(errors[1] <= errors[0], "p {p} n {n} g {g}: fast {errors:?}");
                assert!(errors[2] <= errors[0], "p {p} n {n} g {g}: full {errors:?}");
            }
            assert!(
                totals[1] < 0.95 * totals[0] && totals[2] < 0.95 * totals[0],
                "p {p} n {n} g {g}: {totals:?}"
            );
            // The full search is the better one over many groups (a little, by design).
            assert!(
                totals[2] <= totals[1] * 1.002,
                "p {p} n {n} g {g}: {totals:?}"
            );
        }
        // An all-zero group keeps a zero scale.
        let assigner = Assigner::for_grid(2, 256).unwrap();
        for search in [ScaleSearch::Rms, ScaleSearch::Fast, ScaleSearch::Full] {
            let mut codes = vec![0u32; 32];
            let chosen = choose_scale(
                &assigner,
                &[0.0; 64],
                0.0,
                search,
                &mut SearchScratch::new(64, 2),
                &mut codes,
            );
            assert_eq!(chosen, (f16::ZERO, 0.0));
        }
    }

    #[test]
    fn scale_searches_are_deterministic_and_ranked() {
        let (rows, cols) = (24, 576);
        let w = gaussian(rows * cols, 17);
        let s = spec(2, 256, None, Some(3));
        let run = |threads, search| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| quantize_with(Source::F32(&w), rows, cols, &s, search).unwrap())
        };
        let mut errors = Vec::new();
        for search in [ScaleSearch::Rms, ScaleSearch::Fast, ScaleSearch::Full] {
            let (a, b) = (run(1, search), run(2, search));
            assert_eq!(a.codes, b.codes);
            assert_eq!(a.scales, b.scales);
            assert_eq!(a.squared_error.to_bits(), b.squared_error.to_bits());
            // The reported error is the dequantized one.
            let back = dequantize(&a).unwrap();
            let err: f64 = w
                .iter()
                .zip(&back)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum();
            assert!((err - a.squared_error).abs() < 1e-4 * err, "{search:?}");
            errors.push(a.relative_mse());
        }
        assert!(errors[1] < 0.9 * errors[0], "{errors:?}");
        assert!(errors[2] <= errors[1], "{errors:?}");
        assert_eq!(
            quantize(Source::F32(&w), rows, cols, &s).unwrap().scales,
            run(1, ScaleSearch::default()).scales
        );
    }

    #[test]
    fn fast_paths_give_the_same_bytes() {
        // Whole-row group searches and the wide-SIMD row against the group-by-group path
        // compiled plainly: every grid dimension, search, padding and sign choice, outliers,
        // zero groups and a short last group.
        let mut rng = SplitMix64::new(55);
        for (p, n, cols, g) in [
            (2usize, 256usize, 576usize, 64usize),
            (2, 64, 300, 32),
            (2, 256, 200, 36),
            (1, 16, 256, 64),
            (3, 512, 192, 48),
            (4, 256, 256, 64),
        ] {
            let rows = 7;
            let mut w = gaussian(rows * cols, rng.next_u64());
            for (i, v) in w.iter_mut().enumerate() {
                match i % 101 {
                    3 => *v *= 20.0,
                    5 => *v *= 1e-3,
                    _ => {}
                }
            }
            w[cols..2 * cols].fill(0.0);
            for (h, seed) in [(None, Some(9)), (Some(64), None)] {
                let s = QuantSpec {
                    group_size: g,
                    ..spec(p, n, h, seed)
                };
                for search in [ScaleSearch::Rms, ScaleSearch::Fast, ScaleSearch::Full] {
                    let fast =
                        quantize_rows(Source::F32(&w), rows, cols, &s, search, true).unwrap();
                    let plain =
                        quantize_rows(Source::F32(&w), rows, cols, &s, search, false).unwrap();
                    let what = format!("p {p} n {n} cols {cols} g {g} h {h:?} {search:?}");
                    assert_eq!(fast.codes, plain.codes, "{what}");
                    assert_eq!(fast.scales, plain.scales, "{what}");
                    assert_eq!(
                        fast.squared_error.to_bits(),
                        plain.squared_error.to_bits(),
                        "{what}"
                    );
                    assert_eq!(fast.squared_norm.to_bits(), plain.squared_norm.to_bits());
                }
            }
        }
    }

    #[test]
    fn scale_search_names() {
        for search in [ScaleSearch::Rms, ScaleSearch::Fast, ScaleSearch::Full] {
            assert_eq!(ScaleSearch::parse(search.name()).unwrap(), search);
        }
        assert_eq!(ScaleSearch::default(), ScaleSearch::Fast);
        let err = ScaleSearch::parse("quick").unwrap_err().to_string();
        assert!(
            err.contains("\"quick\"") && err.contains("\"fast\""),
            "{err}"
        );
    }

    #[test]
    fn groups_that_cut_tuples_keep_the_rms_scale() {
        // p = 3 does not divide g = 64: tuples straddle groups, so no per-group search.
        let (rows, cols) = (3, 192);
        let w = gaussian(rows * cols, 4);
        let s = QuantSpec {
            group_size: 64,
            ..spec(3, 512, Some(64), None)
        };
        let q = quantize(Source::F32(&w), rows, cols, &s).unwrap();
        for r in 0..rows {
            let mut row = w[r * cols..(r + 1) * cols].to_vec();
            hadamard::forward(&mut row, 64).unwrap();
            for (j, group) in row.chunks(64).enumerate() {
                let rms = (group.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 64.0).sqrt();
                assert_eq!(q.scales[r * q.layout.groups + j], f16::from_f64(rms));
            }
        }
    }
}
