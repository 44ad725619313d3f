//! Exact nearest-grid-point search.
//!
//! Contract: for every input tuple (finite or not) [`Assigner::assign`] returns exactly what
//! [`brute_force_nearest`] returns: the point with the smallest f32 squared distance, computed
//! coordinate by coordinate in order, ties to the lowest index.
//!
//! - p = 1: sorted distinct levels and midpoint thresholds; a branchless binary search gives a
//!   level, then its two neighbours are compared with the reference distance, so rounding near a
//!   threshold cannot change the answer.
//! - p ≥ 2: a grid of cells over a box (even for p = 2; for p ≥ 3 narrower where the points
//!   crowd, found through a per-axis look-up table); each cell holds every point that can be
//!   the reference answer for some input in the cell. A point is left out only when, at every
//!   input in the cell, some other point is closer by more than a margin that bounds the f32
//!   rounding of both distances, so the lists are exact: one point closer on the whole cell,
//!   or, at the finest level, several together (a small linear program whose Farkas
//!   certificate is checked). The outermost cells extend to `±far`; an input with a
//!   coordinate beyond `far` (or NaN) is answered by brute force. Lists are built coarse to fine
//!   (each cell refines its parent's list).
//!
//! SIMD (x86-64 AVX2, detected at run time, in `assign/x86.rs`): p = 1 compares 8 inputs at
//! once (levels in registers up to 16 levels, gathers beyond); p = 2 bins 8 pairs at once and
//! scans two pairs per register against 4-candidate cell records; p = 3, 4 scan 8 candidates
//! per register, finding the cells of 16 tuples first and prefetching their offsets, then
//! their lists, so the table loads overlap. Every SIMD path does the reference's arithmetic
//! lane by lane (no FMA), and tests compare it with the scalar path and with brute force.
#![deny(unsafe_code)]

#[cfg(target_arch = "x86_64")]
#[path = "assign/x86.rs"]
mod simd;
#[cfg(not(target_arch = "x86_64"))]
mod simd {
    //! No SIMD path on this architecture: the scalar code runs.
    pub fn avx2_available() -> bool {
        false
    }
    pub fn assign_pairs_avx2(
        _: &super::CellSearch,
        _: &super::Grid,
        _: &[f32],
        _: &mut [u32],
    ) -> bool {
        false
    }
    pub fn assign_cells_avx2<const P: usize>(
        _: &super::CellSearch,
        _: &super::Grid,
        _: &[f32],
        _: &mut [u32],
    ) -> bool {
        false
    }
    pub fn assign_cells_avx512<const P: usize>(
        _: &super::CellSearch,
        _: &super::Grid,
        _: &[f32],
        _: &mut [u32],
    ) -> bool {
        false
    }
    pub fn stats_p4_avx2(_: &[f32], _: &[f32], _: &[u32]) -> Option<super::AssignStats> {
        None
    }
    pub fn assign_line_avx2(_: &super::LineSearch, _: &[f32], _: &[f32], _: &mut [u32]) -> bool {
        false
    }
    pub fn assign_line_stats_avx2(
        _: &super::LineSearch,
        _: &[f32],
        _: &[f32],
        _: &mut [u32],
    ) -> Option<super::AssignStats> {
        None
    }
    pub fn assign_pairs_stats_avx2(
        _: &super::CellSearch,
        _: &super::Grid,
        _: &[f32],
        _: &mut [u32],
    ) -> Option<super::AssignStats> {
        None
    }
    pub fn assign_pairs_groups_avx512(
        _: &super::CellSearch,
        _: &super::Grid,
        _: &[f32],
        _: usize,
        _: &mut [u32],
        _: &mut [super::AssignStats],
    ) -> Option<()> {
        None
    }
    pub fn with_avx512<W: super::WideWork>(work: W) -> Result<W::Output, W> {
        Err(work)
    }
    pub fn scan_pairs_avx512(
        _: &super::PairTable,
        _: &[f32],
        _: &[f32],
        _: &mut [(f32, f32)],
    ) -> bool {
        false
    }
}

use crate::grid::Grid;
use crate::Result;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Work that [`with_wide_simd`] runs; `run` should be `#[inline(always)]` (and so should the
/// functions it calls that are worth vectorizing) so that it is compiled into the wide path.
pub trait WideWork {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `work` compiled for the widest SIMD registers the CPU has (AVX-512 on x86-64 when
/// present, through run-time detection), so its plain Rust loops vectorize wider; the same
/// results, as Rust never reassociates or contracts float arithmetic. Without such a path,
/// `work` runs as compiled.
pub fn with_wide_simd<W: WideWork>(work: W) -> W::Output {
    match simd::with_avx512(work) {
        Ok(output) => output,
        Err(work) => work.run(),
    }
}

/// Candidates per chunk of a cell's list (one AVX2 register of f32).
const LANES: usize = 8;

/// Words per cell of the p = 2 table (see `CellSearch::quads`).
const QUAD_WORDS: usize = 12;
/// Marks a p = 2 cell whose list does not fit in 4 lanes.
const QUAD_OVERFLOW: u32 = 1 << 31;

/// Bins of the per-axis cell look-up of p ≥ 3 (`CellSearch::axis_cells`).
const AXIS_BINS: usize = 4096;
/// p ≥ 3: each cell edge of an axis is this blend of the matching quantile of the points'
/// |coordinates| (cells holding equally many points) and the even edge. Pure quantiles make the
/// outer cells so wide that their lists get long; 0.6 measured best for p = 4, n = 8192
/// (candidates per Gaussian input: about 2.9 chunks of 8 against 6.5 with even cells; 14.5 per
/// cell on average against 11.2, so the build takes about 1.6 times as long). With
/// [`prune_by_lp`] (2.3 chunks, 12.0 per cell) 0.75–0.8 give 2.0 chunks but 13.5–14.3 per
/// cell, a larger table and a slower build, and measured no faster.
const AXIS_QUANTILE_WEIGHT: f64 = 0.6;

/// Unit roundoff of f32.
const UNIT_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;

/// Sums over the tuples of one [`Assigner::assign_stats`] call, x the inputs and q their
/// nearest points: what a scale search needs to score a scale and refit it by least squares.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AssignStats {
    /// Σ‖x − q‖².
    pub error: f32,
    /// Σ x·q.
    pub dot: f32,
    /// Σ‖q‖².
    pub norm: f32,
}

/// Tuple x with point q: its error, dot and norm terms (coordinates in order, multiply then add)
/// into accumulator `lane`.
#[inline(always)]
fn add_terms(acc: &mut [[f32; 8]; 3], lane: usize, x: &[f32], q: &[f32]) {
    let (mut err, mut dot, mut norm) = (0f32, 0f32, 0f32);
    for (&v, &g) in x.iter().zip(q) {
        let d = v - g;
        err += d * d;
        dot += v * g;
        norm += g * g;
    }
    acc[0][lane] += err;
    acc[1][lane] += dot;
    acc[2][lane] += norm;
}

/// The 8 accumulators added as ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)).
fn fold_stats(acc: &[[f32; 8]; 3]) -> AssignStats {
    let fold = |a: &[f32; 8]| ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
    AssignStats {
        error: fold(&acc[0]),
        dot: fold(&acc[1]),
        norm: fold(&acc[2]),
    }
}

/// [`Assigner::stats_of`] for a fixed dimension: blocks of 8 tuples, tuple k of a block into
/// accumulator k (the same order as tuple index mod 8).
fn stats_of_p<const P: usize>(points: &[f32], xs: &[f32], codes: &[u32]) -> AssignStats {
    let mut acc = [[0f32; 8]; 3];
    for (xb, cb) in xs.chunks(8 * P).zip(codes.chunks(8)) {
        for (lane, (x, &c)) in xb.chunks_exact(P).zip(cb).enumerate() {
            let q = &points[c as usize * P..c as usize * P + P];
            add_terms(&mut acc, lane, x, q);
        }
    }
    fold_stats(&acc)
}

/// Largest p = 2 grid the fused AVX2 assign-and-sum kernel takes (its gathers index the
/// points with i32).
const QUAD_STATS_MAX_N: usize = 1 << 20;

/// Search structure for one grid; exact (ties go to the lowest index).
pub struct Assigner {
    pub grid: Arc<Grid>,
    search: Search,
    /// p = 2 only: the table behind [`Assigner::scan_pairs`].
    pair_table: Option<PairTable>,
}

/// Cells per axis of the p = 2 scan table (a power of two).
const PAIR_TABLE_SIDE: usize = 256;
/// Accumulators of [`Assigner::scan_pairs`]: element i of the input adds to accumulator i mod 16.
const SCAN_LANES: usize = 16;
/// Scale factors one [`Assigner::scan_pairs`] call takes.
pub const SCAN_MAX_FACTORS: usize = 16;

/// A square table over the p = 2 grid's box: each cell holds the grid point nearest to the
/// cell's centre, so looking up an input's cell gives its nearest point, or (near a Voronoi
/// boundary, or beyond the box) a point whose squared distance is only slightly larger. Cheap
/// to read with gathers, for scoring many candidate scales; codes still come from the exact
/// search.
pub struct PairTable {
    /// Cell (k0, k1) at `points[k0 + k1 · side]`, as (x, y).
    points: Vec<[f32; 2]>,
    side: usize,
    /// Cells per unit of the input: an input v is in cell ⌊v · per_unit + side / 2⌋, clamped.
    per_unit: f32,
    /// The same table as grid codes, one byte per cell (grids of at most 256 points; empty
    /// otherwise), padded with 3 zero bytes so 4-byte gathers stay inside: 64 KB instead of
    /// 512 KB, so the cells that Gaussian inputs hit mostly stay in L1. Read with
    /// `code_points`, it gives the same points.
    codes: Vec<u8>,
    /// Grid point of each code, as (x, y); at least 256 entries (zeros past n).
    code_points: Vec<[f32; 2]>,
}

impl PairTable {
    fn new(grid: &Grid, search: &CellSearch) -> PairTable {
        let side = PAIR_TABLE_SIDE;
        let big = grid
            .points
            .iter()
            .fold(0f64, |m, &v| m.max((v as f64).abs()));
        let half_width = (big * 1.02).max(1e-3);
        let width = 2.0 * half_width / side as f64;
        let mut centres = Vec::with_capacity(2 * side * side);
        for k1 in 0..side {
            for k0 in 0..side {
                for k in [k0, k1] {
                    centres.push((-half_width + (k as f64 + 0.5) * width) as f32);
                }
            }
        }
        let mut codes = vec![0u32; side * side];
        search.assign_scalar(grid, &centres, &mut codes);
        // Padded to 256 entries for byte tables, so any byte is an index inside.
        let code_points: Vec<[f32; 2]> = (0..grid.n.max(256))
            .map(|c| match grid.points.get(2 * c..2 * c + 2) {
                Some(g) => [g[0], g[1]],
                None => [0.0; 2],
            })
            .collect();
        let byte_codes = if grid.n <= 256 {
            let mut bytes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
            bytes.extend_from_slice(&[0; 3]);
            bytes
        } else {
            Vec::new()
        };
        PairTable {
            points: codes.iter().map(|&c| code_points[c as usize]).collect(),
            side,
            per_unit: (1.0 / width) as f32,
            codes: byte_codes,
            code_points,
        }
    }

    /// The cell of a scaled input coordinate `x · a + side/2` (see `scan_pairs`), clamped.
    #[inline(always)]
    fn cell_axis(&self, x: f32, a: f32) -> usize {
        let u = x * a + (self.side / 2) as f32;
        u.max(0.0).min((self.side - 1) as f32) as usize
    }

    /// Scalar reference of [`Assigner::scan_pairs`] for one factor from element `start` on,
    /// into `acc`.
    fn scan_scalar(&self, xs: &[f32], a: f32, start: usize, acc: &mut [[f32; SCAN_LANES]; 2]) {
        let mut i = start;
        while i + 1 < xs.len() {
            let cell = self.cell_axis(xs[i], a) + self.cell_axis(xs[i + 1], a) * self.side;
            let q = self.points[cell];
            for d in 0..2 {
                let lane = (i + d) % SCAN_LANES;
                acc[0][lane] += xs[i + d] * q[d];
                acc[1][lane] += q[d] * q[d];
            }
            i += 2;
        }
    }
}

enum Search {
    Line(LineSearch),
    Cells(CellSearch),
}

impl Assigner {
    /// Builds the search structure for any grid (the shipped ones go through [`Assigner::for_grid`]).
    pub fn new(grid: Arc<Grid>) -> Assigner {
        let search = if grid.p == 1 {
            Search::Line(LineSearch::new(&grid.points))
        } else {
            Search::Cells(CellSearch::new(&grid))
        };
        let pair_table = match &search {
            Search::Cells(cells) if grid.p == 2 => Some(PairTable::new(&grid, cells)),
            _ => None,
        };
        Assigner {
            grid,
            search,
            pair_table,
        }
    }

    /// p = 2 only (None otherwise): for each `inv` of `invs` (at most [`SCAN_MAX_FACTORS`]),
    /// with q the point of each pair of `xs`·inv's cell in the scan table (its nearest grid
    /// point, or one almost as near), writes (Σ x·q, Σ‖q‖²) over the unscaled x to `out`. Then
    /// Σ‖x − s·q‖² = Σ‖x‖² − 2s·Σx·q + s²·Σ‖q‖² estimates the error of scale s = 1/inv, and
    /// Σx·q / Σ‖q‖² is its least-squares refit, with no exact assignment. The sums are f32 in a
    /// fixed order (element i adds to accumulator i mod 16, no FMA; then a fixed tree),
    /// bit-identical with or without SIMD.
    pub fn scan_pairs(&self, xs: &[f32], invs: &[f32], out: &mut [(f32, f32)]) -> Option<()> {
        let table = self.pair_table.as_ref()?;
        assert!(
            invs.len() <= SCAN_MAX_FACTORS && out.len() >= invs.len(),
            "scan_pairs: {} factors (at most {SCAN_MAX_FACTORS}), {} outputs",
            invs.len(),
            out.len()
        );
        let mut factors = [0f32; SCAN_MAX_FACTORS];
        for (f, &inv) in factors.iter_mut().zip(invs) {
            *f = inv * table.per_unit;
        }
        let factors = &factors[..invs.len()];
        if simd::scan_pairs_avx512(table, xs, factors, out) {
            return Some(());
        }
        for (&a, o) in factors.iter().zip(out.iter_mut()) {
            let mut acc = [[0f32; SCAN_LANES]; 2];
            table.scan_scalar(xs, a, 0, &mut acc);
            // Lanes j and j + width, halving the width: 16 → 8 → 4 → 2 → 1.
            let reduce = |v: &[f32; SCAN_LANES]| {
                let mut folded = *v;
                let mut width = SCAN_LANES / 2;
                while width > 0 {
                    for j in 0..width {
                        folded[j] += folded[j + width];
                    }
                    width /= 2;
                }
                folded[0]
            };
            *o = (reduce(&acc[0]), reduce(&acc[1]));
        }
        Some(())
    }

    /// Whether [`Assigner::scan_pairs`] is available (p = 2).
    pub fn scans_pairs(&self) -> bool {
        self.pair_table.is_some()
    }

    /// Built once per (p, n) and cached.
    pub fn for_grid(p: usize, n: usize) -> Result<Arc<Assigner>> {
        type Slot = Arc<OnceLock<Arc<Assigner>>>;
        static CACHE: OnceLock<Mutex<HashMap<(usize, usize), Slot>>> = OnceLock::new();
        let grid = Grid::load(p, n)?;
        let slot = CACHE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((p, n))
            .or_default()
            .clone();
        // Built outside the map's lock, so building one grid does not block users of another.
        Ok(slot.get_or_init(|| Arc::new(Assigner::new(grid))).clone())
    }

    /// `xs` holds `codes.len()` consecutive p-tuples; writes the index of the nearest point of each.
    ///
    /// # Panics
    /// If `xs.len() != codes.len() * p` (a caller bug, not bad data).
    pub fn assign(&self, xs: &[f32], codes: &mut [u32]) {
        let p = self.grid.p;
        assert_eq!(
            xs.len(),
            codes.len() * p,
            "assign: {} values for {} codes of {p}",
            xs.len(),
            codes.len()
        );
        match &self.search {
            Search::Line(line) => line.assign(&self.grid.points, xs, codes),
            Search::Cells(cells) => cells.assign(&self.grid, xs, codes),
        }
    }

    /// Like [`Assigner::assign`], and returns the summed squared error Σ‖x − point‖² (in f64).
    pub fn assign_with_error(&self, xs: &[f32], codes: &mut [u32]) -> f64 {
        self.assign(xs, codes);
        let p = self.grid.p;
        xs.chunks_exact(p)
            .zip(codes.iter())
            .map(|(x, &c)| {
                self.grid
                    .point(c as usize)
                    .iter()
                    .zip(x)
                    .map(|(&g, &v)| (g as f64 - v as f64).powi(2))
                    .sum::<f64>()
            })
            .sum()
    }

    /// Like [`Assigner::assign`], and returns the sums a scale search needs (see [`AssignStats`]).
    ///
    /// The sums are f32 in a fixed order, the same on every path: tuple t adds its terms
    /// (coordinates in order, separate multiply and add) into accumulator t mod 8, and the 8
    /// accumulators are then added as ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)). So the result is
    /// bit-identical with or without SIMD, whatever splits the caller uses.
    pub fn assign_stats(&self, xs: &[f32], codes: &mut [u32]) -> AssignStats {
        let p = self.grid.p;
        if let Search::Line(line) = &self.search {
            if line.avx2 {
                if let Some(stats) =
                    simd::assign_line_stats_avx2(line, &self.grid.points, xs, codes)
                {
                    return stats;
                }
            }
        }
        if p == 2 && self.grid.n <= QUAD_STATS_MAX_N {
            if let Search::Cells(cells) = &self.search {
                if cells.avx2 {
                    if let Some(stats) = simd::assign_pairs_stats_avx2(cells, &self.grid, xs, codes)
                    {
                        return stats;
                    }
                }
            }
        }
        self.assign(xs, codes);
        self.stats(xs, codes)
    }

    /// [`Assigner::assign_stats`] for each group of `group_len` consecutive values of `xs` (a
    /// multiple of p; the last group may be shorter): the codes of all of `xs`, and group j's
    /// sums in `out[j]`, bit-identical to one `assign_stats` call per group. One call for a
    /// whole row of groups lets the p = 2 AVX-512 path skip the per-call set-up.
    ///
    /// # Panics
    /// If `xs.len() != codes.len() * p`, `group_len` is not a positive multiple of p, or
    /// `out.len()` is not the number of groups (caller bugs, not bad data).
    pub fn assign_stats_groups(
        &self,
        xs: &[f32],
        group_len: usize,
        codes: &mut [u32],
        out: &mut [AssignStats],
    ) {
        let p = self.grid.p;
        assert!(
            xs.len() == codes.len() * p
                && group_len > 0
                && group_len.is_multiple_of(p)
                && out.len() == xs.len().div_ceil(group_len),
            "assign_stats_groups: {} values, {} codes of {p}, groups of {group_len}, {} outputs",
            xs.len(),
            codes.len(),
            out.len()
        );
        if let Search::Cells(cells) = &self.search {
            if p == 2
                && simd::assign_pairs_groups_avx512(
                    cells,
                    &self.grid,
                    xs,
                    group_len / 2,
                    codes,
                    out,
                )
                .is_some()
            {
                return;
            }
        }
        for ((x, c), o) in xs
            .chunks(group_len)
            .zip(codes.chunks_mut(group_len / p))
            .zip(out.iter_mut())
        {
            *o = self.assign_stats(x, c);
        }
    }

    /// [`Assigner::stats_of`], with SIMD where there is a path for it (p = 4; bit-identical).
    pub fn stats(&self, xs: &[f32], codes: &[u32]) -> AssignStats {
        if let Search::Cells(cells) = &self.search {
            if self.grid.p == 4 && cells.avx2 {
                if let Some(stats) = simd::stats_p4_avx2(&cells.points4, xs, codes) {
                    return stats;
                }
            }
        }
        self.stats_of(xs, codes)
    }

    /// The sums of [`Assigner::assign_stats`] for given codes (scalar, the canonical order).
    pub fn stats_of(&self, xs: &[f32], codes: &[u32]) -> AssignStats {
        let points = &self.grid.points;
        match self.grid.p {
            1 => stats_of_p::<1>(points, xs, codes),
            2 => stats_of_p::<2>(points, xs, codes),
            3 => stats_of_p::<3>(points, xs, codes),
            4 => stats_of_p::<4>(points, xs, codes),
            p => {
                let mut acc = [[0f32; 8]; 3];
                for (t, (x, &c)) in xs.chunks_exact(p).zip(codes).enumerate() {
                    let q = &points[c as usize * p..c as usize * p + p];
                    add_terms(&mut acc, t % 8, x, q);
                }
                fold_stats(&acc)
            }
        }
    }

    /// The scalar path only (reference for the SIMD paths; exact as well).
    pub fn assign_scalar(&self, xs: &[f32], codes: &mut [u32]) {
        let p = self.grid.p;
        assert_eq!(xs.len(), codes.len() * p);
        match &self.search {
            Search::Line(line) => line.assign_scalar(&self.grid.points, xs, codes),
            Search::Cells(cells) => cells.assign_scalar(&self.grid, xs, codes),
        }
    }

    /// Mean and largest number of candidates per cell (p ≥ 2); for tuning and reports.
    pub fn cell_stats(&self) -> Option<(f64, usize, usize)> {
        match &self.search {
            Search::Line(_) => None,
            Search::Cells(c) => {
                let cells = c.chunk_offsets.len() - 1;
                Some((c.listed as f64 / cells as f64, c.longest, cells))
            }
        }
    }
}

/// The reference squared distance: f32, coordinate by coordinate, in order.
#[inline(always)]
fn distance2(g: &[f32], x: &[f32]) -> f32 {
    let mut d = 0f32;
    for (a, b) in g.iter().zip(x) {
        d += (a - b) * (a - b);
    }
    d
}

/// Reference: nearest point by scanning all of them (ties to the lowest index).
pub fn brute_force_nearest(points: &[f32], p: usize, x: &[f32]) -> u32 {
    let mut best = (f32::INFINITY, 0u32);
    for (i, g) in points.chunks_exact(p).enumerate() {
        let d = distance2(g, x);
        if d < best.0 {
            best = (d, i as u32);
        }
    }
    best.1
}

// ---------------------------------------------------------------------------------------------
// p = 1

struct LineSearch {
    /// Distinct levels, ascending, with a +inf sentinel at each end (so the neighbours of any
    /// level exist and a sentinel never wins).
    levels: Vec<f32>,
    /// Lowest grid index holding each level (u32::MAX for the sentinels).
    index: Vec<u32>,
    /// `thresholds[k]` = midpoint of levels k and k+1 (unpadded numbering), then +inf padding.
    thresholds: Vec<f32>,
    /// Bins of width 1/inv_width over [-half_width, half_width] (the end bins extend to ±∞):
    /// `first[b]` thresholds lie below bin b, and at most `span` more can lie inside it.
    first: Vec<u32>,
    span: usize,
    half_width: f32,
    inv_width: f32,
    /// Inputs with |x| above this go to brute force (0 when the levels are too close for the
    /// neighbour check to be provably exact).
    far: f32,
    /// AVX2 is available (checked once at construction).
    avx2: bool,
    /// `first[b] + span <= thresholds.len()` for every bin and the tables fit i32 gather
    /// indices: verified once at construction, relied on by the SIMD gathers.
    tables_checked: bool,
}

impl LineSearch {
    fn new(points: &[f32]) -> LineSearch {
        let mut order: Vec<u32> = (0..points.len() as u32).collect();
        // -0.0 and 0.0 are one level (identical distances): compare them as equal.
        let key = |i: u32| points[i as usize] + 0.0;
        order.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
        let mut levels: Vec<f32> = Vec::new();
        let mut index = Vec::new();
        for &i in &order {
            let v = key(i);
            if levels.last() != Some(&v) {
                levels.push(v);
                index.push(i);
            }
        }
        let thresholds: Vec<f32> = levels
            .windows(2)
            .map(|w| ((w[0] as f64 + w[1] as f64) / 2.0) as f32)
            .collect();
        let big = levels.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        let gap = levels
            .windows(2)
            .map(|w| w[1] as f64 - w[0] as f64)
            .fold(f64::INFINITY, f64::min);
        let slack = |x: f64| {
            let rounding = 4.0 * 3.0 * UNIT_ROUNDOFF * (x + big).powi(2);
            2.0 * gap * gap + 4.0 * gap * (x - big).max(0.0) - rounding
        };
        let far = if levels.len() < 3 {
            f64::MAX // every level is always compared
        } else if slack(big) <= 0.0 {
            0.0 // levels too close for the neighbour check: brute force
        } else {
            let mut far = 1024f64.max(big);
            while slack(far) <= 0.0 {
                far = (far / 2.0).max(big);
            }
            far
        };
        // Bins: the thresholds that can lie in each (with a sliver of slack for the f32 binning).
        let bins = (4 * levels.len()).next_power_of_two().clamp(64, 1 << 14);
        let half_width = (big * 1.02).max(1e-6);
        let width = 2.0 * half_width / bins as f64;
        let slack = 0.01 * width;
        let below = |v: f64| thresholds.partition_point(|&t| (t as f64) < v);
        let upto = |v: f64| thresholds.partition_point(|&t| (t as f64) <= v);
        let mut first = Vec::with_capacity(bins);
        let mut span = 0;
        for b in 0..bins {
            let lo = -half_width + b as f64 * width - slack;
            let hi = -half_width + (b + 1) as f64 * width + slack;
            let start = if b == 0 { 0 } else { below(lo) };
            let end = if b == bins - 1 {
                thresholds.len()
            } else {
                upto(hi)
            };
            first.push(start as u32);
            span = span.max(end - start);
        }
        let mut padded_thresholds = thresholds;
        padded_thresholds.resize(padded_thresholds.len() + span.max(1), f32::INFINITY);
        let mut padded_levels = vec![f32::INFINITY];
        padded_levels.extend_from_slice(&levels);
        padded_levels.push(f32::INFINITY);
        let mut padded_index = vec![u32::MAX];
        padded_index.extend_from_slice(&index);
        padded_index.push(u32::MAX);
        let tables_checked = first
            .iter()
            .all(|&s| s as usize + span <= padded_thresholds.len())
            && padded_levels.len() == padded_index.len()
            && padded_levels.len() < i32::MAX as usize
            && padded_thresholds.len() < i32::MAX as usize;
        LineSearch {
            tables_checked,
            levels: padded_levels,
            index: padded_index,
            thresholds: padded_thresholds,
            first,
            span,
            half_width: half_width as f32,
            inv_width: (1.0 / width) as f32,
            far: far.min(f32::MAX as f64) as f32,
            avx2: simd::avx2_available(),
        }
    }

    #[inline(always)]
    fn nearest(&self, points: &[f32], x: f32) -> u32 {
        if x.is_nan() || x.abs() > self.far {
            return brute_force_nearest(points, 1, &[x]);
        }
        // k = number of thresholds <= x: those below the bin, plus a branchless count inside it.
        let last_bin = self.first.len() as i32 - 1;
        let bin = (((x + self.half_width) * self.inv_width) as i32).clamp(0, last_bin) as usize;
        let start = self.first[bin] as usize;
        let mut k = start;
        for &t in &self.thresholds[start..start + self.span] {
            k += (t <= x) as usize;
        }
        // Level k is nearest up to rounding; its neighbours k - 1 and k + 1 (padded positions
        // k, k + 1, k + 2) settle it with the reference distance, ties to the lower index.
        let mut best_d = f32::INFINITY;
        let mut best_i = u32::MAX;
        for j in k..k + 3 {
            let d = (self.levels[j] - x) * (self.levels[j] - x);
            let i = self.index[j];
            let better = d < best_d || (d == best_d && i < best_i);
            best_d = if better { d } else { best_d };
            best_i = if better { i } else { best_i };
        }
        best_i
    }

    fn assign(&self, points: &[f32], xs: &[f32], codes: &mut [u32]) {
        if !(self.avx2 && simd::assign_line_avx2(self, points, xs, codes)) {
            self.assign_scalar(points, xs, codes);
        }
    }

    fn assign_scalar(&self, points: &[f32], xs: &[f32], codes: &mut [u32]) {
        for (&x, c) in xs.iter().zip(codes.iter_mut()) {
            *c = self.nearest(points, x);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// p ≥ 2

struct CellSearch {
    p: usize,
    /// Cells per axis (a power of two).
    cells_per_axis: usize,
    /// The box is [-half_width, half_width]^p; cell k on an axis starts at -half_width + k·width.
    half_width: f32,
    inv_width: f32,
    /// Inputs with a coordinate beyond ±far (or NaN) go to brute force.
    far: f32,
    /// p ≥ 3 (empty otherwise, for uniform cells): the cells of an axis are uneven, narrow where
    /// the points are dense; the box is cut into `axis_cells.len()` equal bins and bin b lies in
    /// cell `axis_cells[b]` (see [`CellSearch::axis_edges`]).
    axis_cells: Vec<u8>,
    /// Bins of `axis_cells` per unit of the input.
    bins_per_unit: f32,
    /// Chunks of cell c: `chunk_offsets[c]..chunk_offsets[c + 1]`; a chunk holds `LANES`
    /// candidates. Cell index = Σ_i k_i · cells_per_axis^i.
    chunk_offsets: Vec<u32>,
    /// p = 3, 4 only: every point as 4 floats (p = 3 padded with 0, which adds an exact +0 to
    /// a distance), so SIMD code loads a point with one 16-byte load; empty otherwise.
    points4: Vec<f32>,
    /// Every entry of `indices` is below n and `points4` (when present) has 4·n floats:
    /// verified once at construction, relied on by the SIMD loads.
    tables_checked: bool,
    /// Per chunk: LANES point indices, ascending; a list is padded by repeating its last index
    /// (a repeated point never beats its first copy, so padding cannot change the answer).
    indices: Vec<u32>,
    /// Candidates before padding, summed over cells, and the longest list.
    listed: usize,
    longest: usize,
    /// AVX2 is available (checked once at construction).
    avx2: bool,
    /// p = 2 only: per cell, QUAD_WORDS words: 4 x-coordinates, 4 y-coordinates (f32 bits) and
    /// 4 indices of the cell's first 4 candidates (padded by repeating the last). A cell with
    /// more than 4 candidates has `QUAD_OVERFLOW` set in its first index and takes the chunk path.
    quads: Vec<u32>,
}

/// An axis-aligned box in f64.
#[derive(Clone, Copy)]
struct Bounds<const P: usize> {
    lo: [f64; P],
    hi: [f64; P],
}

impl CellSearch {
    fn new(grid: &Grid) -> CellSearch {
        match grid.p {
            2 => Self::build::<2>(grid),
            3 => Self::build::<3>(grid),
            4 => Self::build::<4>(grid),
            5 => Self::build::<5>(grid),
            6 => Self::build::<6>(grid),
            7 => Self::build::<7>(grid),
            8 => Self::build::<8>(grid),
            p => Self::brute_only(p, grid),
        }
    }

    /// No cells: every input goes to brute force (grids of more than 8 dimensions).
    fn brute_only(p: usize, grid: &Grid) -> CellSearch {
        CellSearch {
            p,
            cells_per_axis: 1,
            half_width: 1.0,
            inv_width: 0.5,
            far: -1.0,
            ..Self::pack(p, &grid.points, &[(0..grid.n as u32).collect()])
        }
    }

    /// Cells per axis for a grid: about `n` points in the box, a few candidates per cell,
    /// and a table that stays small.
    fn cells_per_axis(p: usize, n: usize) -> usize {
        let target_cells = match p {
            2 => 16 * n,
            3 => 8 * n,
            _ => 8 * n,
        }
        .clamp(1 << p, 1 << 18);
        let per_axis = (target_cells as f64).powf(1.0 / p as f64);
        (per_axis.round() as usize).next_power_of_two().max(2)
    }

    fn build<const P: usize>(grid: &Grid) -> CellSearch {
        let n = grid.n;
        let pts: Vec<[f64; P]> = (0..n)
            .map(|i| std::array::from_fn(|d| grid.points[i * P + d] as f64))
            .collect();
        let norms: Vec<f64> = pts.iter().map(|g| g.iter().map(|v| v * v).sum()).collect();
        let big = grid
            .points
            .iter()
            .fold(0f64, |m, &v| m.max((v as f64).abs()));
        let m = Self::cells_per_axis(P, n);
        // The box covers the points; the outer cells extend to ±far.
        let half_width = (big * 1.02).max(1e-3) as f32;
        let far = (64.0f64).max(4.0 * big) as f32;
        let width = 2.0 * half_width as f64 / m as f64;
        // p = 2 keeps even cells (its SIMD path bins by arithmetic); p ≥ 3 bins through
        // `axis_cells`, with cell k of an axis covering bins edges[k]..edges[k + 1].
        let (edges, bin_width) = if P >= 3 {
            let bin_width = 2.0 * half_width as f64 / AXIS_BINS as f64;
            (
                Self::axis_edges(&grid.points, m, half_width as f64),
                bin_width,
            )
        } else {
            ((0..=m).collect::<Vec<usize>>(), width)
        };
        // Inputs are binned in f32; a cell's list also covers a sliver of its neighbours.
        let slack = 1e-3 * bin_width;
        let levels = m.trailing_zeros() as usize;

        let bounds_of = |level: usize, cell: [usize; P]| -> Bounds<P> {
            let span = 1usize << (levels - level);
            let mut b = Bounds {
                lo: [0.0; P],
                hi: [0.0; P],
            };
            for (d, &k) in cell.iter().enumerate() {
                let start = k * span;
                let end = start + span;
                b.lo[d] = if start == 0 {
                    -(far as f64)
                } else {
                    -(half_width as f64) + edges[start] as f64 * bin_width - slack
                };
                b.hi[d] = if end == m {
                    far as f64
                } else {
                    -(half_width as f64) + edges[end] as f64 * bin_width + slack
                };
            }
            b
        };

        // Level 0: one cell, every point.
        let mut lists: Vec<Vec<u32>> = vec![(0..n as u32).collect()];
        for level in 1..=levels {
            let side = 1usize << level;
            let count = side.pow(P as u32);
            lists = (0..count)
                .into_par_iter()
                .map(|c| {
                    let cell: [usize; P] = std::array::from_fn(|d| (c >> (d * level)) & (side - 1));
                    let parent_side = side / 2;
                    let parent: usize = (0..P).map(|d| (cell[d] / 2) << (d * (level - 1))).sum();
                    debug_assert!(parent < parent_side.pow(P as u32));
                    refine(
                        &pts,
                        &norms,
                        big,
                        &lists[parent],
                        &bounds_of(level, cell),
                        level == levels,
                    )
                })
                .collect();
        }
        // Cells per axis stay below 256 for p ≥ 3 (at most 2^18 cells in all).
        debug_assert!(P < 3 || m <= 256);
        let axis_cells = if P >= 3 {
            (0..AXIS_BINS)
                .map(|b| (edges.partition_point(|&e| e <= b) - 1) as u8)
                .collect()
        } else {
            Vec::new()
        };
        CellSearch {
            cells_per_axis: m,
            half_width,
            inv_width: (1.0 / width) as f32,
            far,
            axis_cells,
            bins_per_unit: (1.0 / bin_width) as f32,
            ..Self::pack(P, &grid.points, &lists)
        }
    }

    /// Cell boundaries of an axis, as bin numbers (`AXIS_BINS` bins over the box): 0 = e_0 <
    /// e_1 < … < e_m = `AXIS_BINS`, symmetric about the middle, narrower where the points'
    /// coordinates are dense (see [`AXIS_QUANTILE_WEIGHT`]). The points of a Gaussian-optimal
    /// grid crowd the middle, where most inputs fall too, so even cells there hold long lists.
    fn axis_edges(points: &[f32], m: usize, half_width: f64) -> Vec<usize> {
        let mut magnitudes: Vec<f64> = points.iter().map(|&v| (v as f64).abs()).collect();
        magnitudes.sort_unstable_by(f64::total_cmp);
        let half = m / 2;
        let bin_of = |v: f64| {
            let b = ((v + half_width) / (2.0 * half_width) * AXIS_BINS as f64).round();
            b.clamp(1.0, (AXIS_BINS - 1) as f64) as usize
        };
        // Upper half: e_{half + k} at the (k / half)-quantile of |v|; the lower half mirrored.
        let mut upper = vec![AXIS_BINS / 2];
        for k in 1..half {
            let q = magnitudes[(k * magnitudes.len() / half).min(magnitudes.len() - 1)];
            let even = k as f64 / half as f64 * half_width;
            let q = AXIS_QUANTILE_WEIGHT * q + (1.0 - AXIS_QUANTILE_WEIGHT) * even;
            let b = bin_of(q)
                .max(upper[k - 1] + 1)
                .min(AXIS_BINS - 1 - (half - k));
            upper.push(b);
        }
        let mut edges: Vec<usize> = upper[1..].iter().rev().map(|&b| AXIS_BINS - b).collect();
        edges.insert(0, 0);
        edges.extend_from_slice(&upper);
        edges.push(AXIS_BINS);
        debug_assert_eq!(edges.len(), m + 1);
        debug_assert!(edges.windows(2).all(|w| w[0] < w[1]));
        edges
    }

    /// Lays the candidate lists out in chunks of `LANES` (fields other than the tables are
    /// placeholders that the caller overrides).
    fn pack(p: usize, points: &[f32], lists: &[Vec<u32>]) -> CellSearch {
        let mut chunk_offsets = Vec::with_capacity(lists.len() + 1);
        let mut indices = Vec::new();
        chunk_offsets.push(0u32);
        for list in lists {
            for chunk in list.chunks(LANES) {
                let last = *chunk.last().expect("non-empty list");
                let padded: Vec<u32> = (0..LANES)
                    .map(|l| chunk.get(l).copied().unwrap_or(last))
                    .collect();
                indices.extend_from_slice(&padded);
            }
            chunk_offsets.push((indices.len() / LANES) as u32);
        }
        let n = points.len() / p;
        let points4: Vec<f32> = if p == 3 || p == 4 {
            points
                .chunks_exact(p)
                .flat_map(|g| (0..4).map(move |d| g.get(d).copied().unwrap_or(0.0)))
                .collect()
        } else {
            Vec::new()
        };
        let tables_checked = indices.iter().all(|&i| (i as usize) < n)
            && (points4.is_empty() || points4.len() == 4 * n);
        CellSearch {
            p,
            cells_per_axis: 1,
            half_width: 1.0,
            inv_width: 0.5,
            far: -1.0,
            axis_cells: Vec::new(),
            bins_per_unit: 0.0,
            chunk_offsets,
            indices,
            points4,
            tables_checked,
            listed: lists.iter().map(Vec::len).sum(),
            longest: lists.iter().map(Vec::len).max().unwrap_or(0),
            avx2: simd::avx2_available(),
            quads: if p == 2 {
                Self::pack_quads(points, lists)
            } else {
                Vec::new()
            },
        }
    }

    fn pack_quads(points: &[f32], lists: &[Vec<u32>]) -> Vec<u32> {
        let mut quads = Vec::with_capacity(lists.len() * QUAD_WORDS);
        for list in lists {
            let last = *list.last().expect("non-empty list");
            let slot = |l: usize| list.get(l).copied().unwrap_or(last);
            for d in 0..2 {
                quads.extend((0..4).map(|l| points[slot(l) as usize * 2 + d].to_bits()));
            }
            let flag = if list.len() > 4 { QUAD_OVERFLOW } else { 0 };
            quads.extend((0..4).map(|l| slot(l) | if l == 0 { flag } else { 0 }));
        }
        quads
    }

    #[inline(always)]
    fn cell_of<const P: usize>(&self, x: &[f32]) -> Option<usize> {
        let mut cell = 0usize;
        let last = self.cells_per_axis as i32 - 1;
        let shift = self.cells_per_axis.trailing_zeros();
        for d in (0..P).rev() {
            let v = x[d];
            if v.is_nan() || v.abs() > self.far {
                return None;
            }
            let k = if self.axis_cells.is_empty() {
                (((v + self.half_width) * self.inv_width) as i32).clamp(0, last) as usize
            } else {
                let bin = ((v + self.half_width) * self.bins_per_unit) as i32;
                self.axis_cells[bin.clamp(0, AXIS_BINS as i32 - 1) as usize] as usize
            };
            cell = (cell << shift) | k;
        }
        Some(cell)
    }

    fn assign(&self, grid: &Grid, xs: &[f32], codes: &mut [u32]) {
        if self.avx2 {
            let done = match self.p {
                2 => simd::assign_pairs_avx2(self, grid, xs, codes),
                3 => simd::assign_cells_avx2::<3>(self, grid, xs, codes),
                4 => simd::assign_cells_avx2::<4>(self, grid, xs, codes),
                _ => false,
            };
            if done {
                return;
            }
        }
        self.assign_scalar(grid, xs, codes)
    }

    fn assign_scalar(&self, grid: &Grid, xs: &[f32], codes: &mut [u32]) {
        match self.p {
            2 => self.assign_scalar_p::<2>(grid, xs, codes),
            3 => self.assign_scalar_p::<3>(grid, xs, codes),
            4 => self.assign_scalar_p::<4>(grid, xs, codes),
            5 => self.assign_scalar_p::<5>(grid, xs, codes),
            6 => self.assign_scalar_p::<6>(grid, xs, codes),
            7 => self.assign_scalar_p::<7>(grid, xs, codes),
            8 => self.assign_scalar_p::<8>(grid, xs, codes),
            p => {
                for (x, c) in xs.chunks_exact(p).zip(codes.iter_mut()) {
                    *c = brute_force_nearest(&grid.points, p, x);
                }
            }
        }
    }

    /// Scalar scan of a cell's chunks; the same arithmetic as [`distance2`].
    #[inline(always)]
    fn nearest_in_cell<const P: usize>(&self, points: &[f32], cell: usize, x: &[f32]) -> u32 {
        let slots = self.chunk_offsets[cell] as usize * LANES
            ..self.chunk_offsets[cell + 1] as usize * LANES;
        let mut best = (f32::INFINITY, 0u32);
        for &i in &self.indices[slots] {
            let d = distance2(&points[i as usize * P..i as usize * P + P], x);
            if d < best.0 {
                best = (d, i);
            }
        }
        best.1
    }

    fn assign_scalar_p<const P: usize>(&self, grid: &Grid, xs: &[f32], codes: &mut [u32]) {
        let points = &grid.points;
        for (x, c) in xs.chunks_exact(P).zip(codes.iter_mut()) {
            *c = match self.cell_of::<P>(x) {
                Some(cell) => self.nearest_in_cell::<P>(points, cell, x),
                None => brute_force_nearest(points, P, x),
            };
        }
    }
}

/// The points of `parent` that can be the reference answer somewhere in `cell` (ascending).
///
/// A point g is dropped only when at every x in the cell some point h satisfies
/// ‖x−g‖² − ‖x−h‖² > margin, where `margin` exceeds twice the f32 rounding of either distance
/// there; then at every x the computed distance of g is larger than some other point's and g
/// never wins. At the coarse levels one h must do so on the whole cell (pairwise dominance);
/// at the final level, where the lists are searched, [`prune_by_lp`] also drops points that
/// only several h together beat, where that shortens a list by a chunk.
fn refine<const P: usize>(
    pts: &[[f64; P]],
    norms: &[f64],
    big: f64,
    parent: &[u32],
    cell: &Bounds<P>,
    final_level: bool,
) -> Vec<u32> {
    // Largest squared distance from the cell to any point; the rounding of an f32 distance of
    // P terms is below (P + 2)·u·d, so two of them are below 2(P + 2)·u·dmax; doubled for slack.
    let dmax: f64 = (0..P)
        .map(|d| (cell.lo[d].abs().max(cell.hi[d].abs()) + big).powi(2))
        .sum();
    let margin = 4.0 * (P as f64 + 3.0) * UNIT_ROUNDOFF * dmax;

    // Step 1: the point whose farthest distance over the cell is smallest bounds every point's
    // nearest distance from above.
    let min_d2 = |g: &[f64; P]| -> f64 {
        (0..P)
            .map(|d| (g[d].clamp(cell.lo[d], cell.hi[d]) - g[d]).powi(2))
            .sum()
    };
    let max_d2 = |g: &[f64; P]| -> f64 {
        (0..P)
            .map(|d| {
                (g[d] - cell.lo[d])
                    .abs()
                    .max((cell.hi[d] - g[d]).abs())
                    .powi(2)
            })
            .sum()
    };
    let upper = parent
        .iter()
        .map(|&i| max_d2(&pts[i as usize]))
        .fold(f64::INFINITY, f64::min);
    let mut kept: Vec<u32> = parent
        .iter()
        .copied()
        .filter(|&i| min_d2(&pts[i as usize]) <= upper + margin)
        .collect();

    // Step 2: pairwise dominance against the points nearest the cell's centre (the likeliest
    // to beat a far point on the whole cell). Any point may serve as the dominator, so this
    // heuristic choice only affects how short the lists get, never their exactness.
    // More at the coarse levels: their lists are long, and every finer level refines them
    // (48 rather than 12 built p = 4, n = 8192 in 0.77 s instead of 1.1 s, lists 6 % shorter).
    let dominator_count = if final_level { 32 } else { 48 };
    {
        let centre: [f64; P] = std::array::from_fn(|d| 0.5 * (cell.lo[d] + cell.hi[d]));
        let mut by_centre = squared_distances(pts, &kept, &centre);
        let order = |a: &(f64, u32), b: &(f64, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        if by_centre.len() > dominator_count {
            by_centre.select_nth_unstable_by(dominator_count, order);
            by_centre.truncate(dominator_count);
        }
        by_centre.sort_unstable_by(order);
        let dominators: Vec<u32> = by_centre.iter().map(|&(_, i)| i).collect();
        kept.retain(|&gi| {
            let g = &pts[gi as usize];
            !dominators.iter().any(|&hi| {
                if hi == gi {
                    return false;
                }
                let h = &pts[hi as usize];
                // ‖x−g‖² − ‖x−h‖² = ‖g‖² − ‖h‖² − 2 x·(g − h); its minimum over the box.
                let mut worst = norms[gi as usize] - norms[hi as usize];
                for d in 0..P {
                    let diff = g[d] - h[d];
                    worst -= 2.0 * (cell.lo[d] * diff).max(cell.hi[d] * diff);
                }
                worst > margin
            })
        });
    }
    if final_level {
        prune_by_lp(pts, norms, big, &mut kept, cell, margin);
    }
    kept.sort_unstable();
    kept
}

/// (‖g − centre‖², index) of the points `kept` (in their order).
fn squared_distances<const P: usize>(
    pts: &[[f64; P]],
    kept: &[u32],
    centre: &[f64; P],
) -> Vec<(f64, u32)> {
    kept.iter()
        .map(|&i| {
            let g = &pts[i as usize];
            ((0..P).map(|d| (g[d] - centre[d]).powi(2)).sum(), i)
        })
        .collect()
}

/// Competitors of each candidate in [`prune_by_lp`]'s linear programs: the points of the list
/// nearest the cell's centre (any subset gives valid exclusions; more drop a few more points,
/// 16 drops nearly all that the whole list does, at a fraction of the cost).
const LP_COMPETITORS: usize = 16;

/// Drops the points of `kept` whose region { x in the cell : ‖x−g‖² − ‖x−h‖² ≤ margin for
/// every competitor h } is empty (so g is never the reference answer in the cell; see
/// [`refine`]), proved by a Farkas certificate that [`region_is_empty`] checks. Pairwise
/// dominance keeps such points when no single h covers the cell; in 4 dimensions they are a
/// fifth to a third of the lists (p = 4, n = 8192: 14.5 candidates per cell on average, 12.0
/// after this). Only worth it where it removes a chunk: the candidates that their own nearest
/// spot in the cell does not already keep are tried, farthest from the cell first, while
/// enough are left to shorten the list by a chunk.
fn prune_by_lp<const P: usize>(
    pts: &[[f64; P]],
    norms: &[f64],
    big: f64,
    kept: &mut Vec<u32>,
    cell: &Bounds<P>,
    margin: f64,
) {
    let len = kept.len();
    if len <= LANES {
        return;
    }
    let centre: [f64; P] =
        std::array::from_fn(|d| (0.5 * (cell.lo[d] + cell.hi[d])).clamp(-big, big));
    let mut by_centre = squared_distances(pts, kept, &centre);
    by_centre.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    by_centre.truncate(LP_COMPETITORS);
    // Candidate g keeps x when 2x·(h − g) ≤ ‖h‖² − ‖g‖² + margin for every competitor h.
    let constraints = |gi: u32, out: &mut Vec<([f64; P], f64)>| {
        let g = &pts[gi as usize];
        out.clear();
        out.extend(by_centre.iter().filter(|&&(_, h)| h != gi).map(|&(_, hi)| {
            let h = &pts[hi as usize];
            (
                std::array::from_fn(|d| 2.0 * (h[d] - g[d])),
                norms[hi as usize] - norms[gi as usize] + margin,
            )
        }));
    };
    let mut cons = Vec::with_capacity(LP_COMPETITORS);
    // Candidates whose nearest spot in the cell does not show them nearest: the only ones an
    // LP can drop, most likely the farthest.
    let mut unsure: Vec<(f64, usize)> = Vec::new();
    for (pos, &gi) in kept.iter().enumerate() {
        let g = &pts[gi as usize];
        let spot: [f64; P] = std::array::from_fn(|d| g[d].clamp(cell.lo[d], cell.hi[d]));
        constraints(gi, &mut cons);
        let kept_there = cons
            .iter()
            .all(|(c, e)| (0..P).map(|d| c[d] * spot[d]).sum::<f64>() <= *e);
        if !kept_there {
            let dist: f64 = (0..P).map(|d| (g[d] - spot[d]).powi(2)).sum();
            unsure.push((dist, pos));
        }
    }
    unsure.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut dropped = vec![false; len];
    let mut removed = 0;
    let mut lp = SimplexScratch::default();
    for (j, &(_, pos)) in unsure.iter().enumerate() {
        let left = len - removed;
        let to_next_chunk = left - LANES * (left.div_ceil(LANES) - 1);
        if to_next_chunk > unsure.len() - j {
            break;
        }
        let gi = kept[pos];
        constraints(gi, &mut cons);
        let g = &pts[gi as usize];
        if region_is_empty(&cons, cell, g, &mut lp) {
            dropped[pos] = true;
            removed += 1;
        }
    }
    let mut pos = 0;
    kept.retain(|_| {
        pos += 1;
        !dropped[pos - 1]
    });
}

/// Reused buffers of [`region_is_empty`].
#[derive(Default)]
struct SimplexScratch {
    table: Vec<f64>,
    basis: Vec<usize>,
}

/// Whether { x in `cell` : c·x ≤ e for every (c, e) of `cons` } is empty, answered true only
/// with a checked Farkas certificate: weights λ ≥ 0 with Σλ(c·x − e) > 0 at every x of the box
/// (its minimum over the box is taken coordinate by coordinate). The weights come from a
/// phase-1 simplex (Bland's rule, f64), but only the check decides, so rounding in the simplex
/// can only keep a point, never drop one wrongly. The box's corner nearest `toward` is the
/// origin (fewest constraints violated there, so fewest pivots).
fn region_is_empty<const P: usize>(
    cons: &[([f64; P], f64)],
    cell: &Bounds<P>,
    toward: &[f64; P],
    lp: &mut SimplexScratch,
) -> bool {
    // x_d = o_d + s_d·y_d with y_d in [0, w_d]: o the chosen corner, s = ±1.
    let flip: [bool; P] =
        std::array::from_fn(|d| (toward[d] - cell.hi[d]).abs() < (toward[d] - cell.lo[d]).abs());
    let origin: [f64; P] = std::array::from_fn(|d| if flip[d] { cell.hi[d] } else { cell.lo[d] });
    let sign: [f64; P] = std::array::from_fn(|d| if flip[d] { -1.0 } else { 1.0 });
    let width: [f64; P] = std::array::from_fn(|d| cell.hi[d] - cell.lo[d]);
    let rows = cons.len();
    // Row h: a_h·y ≤ b_h with a_h = s ∘ c_h and b_h = e_h − c_h·o.
    let a_row = |h: usize| -> [f64; P] { std::array::from_fn(|d| sign[d] * cons[h].0[d]) };
    let b_row = |h: usize| cons[h].1 - (0..P).map(|d| cons[h].0[d] * origin[d]).sum::<f64>();
    let violated = (0..rows).filter(|&h| b_row(h) < 0.0).count();
    if violated == 0 {
        return false; // the corner itself is in the region
    }
    // Tableau: rows (constraints, then y_d ≤ w_d), columns y, one slack per row, right-hand
    // side; then the phase-1 cost row. A violated row (negated so its right-hand side is
    // positive) starts with an artificial variable in the basis; artificials get no column:
    // once one leaves the basis it is never needed again, and the certificate only reads the
    // slack columns. Basis entries of artificials are P + m + row (after every real column,
    // for Bland's order).
    let m = rows + P;
    let cols = P + m + 1;
    let rhs = cols - 1;
    lp.table.clear();
    lp.table.resize((m + 1) * cols, 0.0);
    lp.basis.clear();
    let t = &mut lp.table;
    for i in 0..m {
        let row = &mut t[i * cols..(i + 1) * cols];
        if i < rows {
            let (a, b) = (a_row(i), b_row(i));
            let s = if b < 0.0 { -1.0 } else { 1.0 };
            for d in 0..P {
                row[d] = s * a[d];
            }
            row[P + i] = s;
            row[rhs] = s * b;
            lp.basis.push(if b < 0.0 { P + m + i } else { P + i });
        } else {
            let d = i - rows;
            row[d] = 1.0;
            row[P + i] = 1.0;
            row[rhs] = width[d];
            lp.basis.push(P + i);
        }
    }
    // Cost row: Σ artificials, expressed in the non-basic columns.
    let (body, cost_row) = t.split_at_mut(m * cols);
    for (row, &basic) in body.chunks_exact(cols).zip(&lp.basis) {
        if basic >= P + m {
            cost_row.iter_mut().zip(row).for_each(|(c, &v)| *c -= v);
        }
    }
    const EPS: f64 = 1e-11;
    for _ in 0..64 * m {
        let cost = &t[m * cols..m * cols + rhs];
        let Some(enter) = cost.iter().position(|&r| r < -EPS) else {
            break;
        };
        let mut leave: Option<(f64, usize)> = None;
        for i in 0..m {
            let a = t[i * cols + enter];
            if a > EPS {
                let ratio = t[i * cols + rhs] / a;
                let better = match leave {
                    None => true,
                    Some((r, l)) => ratio < r || (ratio == r && lp.basis[i] < lp.basis[l]),
                };
                if better {
                    leave = Some((ratio, i));
                }
            }
        }
        let Some((_, leave)) = leave else {
            return false; // unbounded cannot happen in phase 1; keep the point
        };
        let (before, rest) = t.split_at_mut(leave * cols);
        let (pivot_row, after) = rest.split_at_mut(cols);
        let pivot = pivot_row[enter];
        pivot_row.iter_mut().for_each(|v| *v /= pivot);
        let pivot_row = &*pivot_row;
        for row in before
            .chunks_exact_mut(cols)
            .chain(after.chunks_exact_mut(cols))
        {
            let f = row[enter];
            if f != 0.0 {
                row.iter_mut()
                    .zip(pivot_row)
                    .for_each(|(v, &p)| *v -= f * p);
            }
        }
        lp.basis[leave] = enter;
    }
    // λ_h = reduced cost of row h's slack (the phase-1 duals); checked, not trusted.
    let cost = &t[m * cols..(m + 1) * cols];
    let mut v = [0f64; P];
    let (mut lb, mut scale) = (0f64, 0f64);
    for h in 0..rows {
        let lambda = cost[P + h].max(0.0);
        if lambda > 0.0 {
            let (a, b) = (a_row(h), b_row(h));
            for d in 0..P {
                v[d] += lambda * a[d];
            }
            lb += lambda * b;
            scale += lambda * (b.abs() + (0..P).map(|d| a[d].abs() * width[d]).sum::<f64>());
        }
    }
    // min over y in the box of Σλ(a·y − b), with a relative allowance for its own rounding.
    let lowest = (0..P).map(|d| v[d].min(0.0) * width[d]).sum::<f64>() - lb;
    scale > 0.0 && lowest > 1e-9 * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn check_against_brute(assigner: &Assigner, xs: &[f32]) {
        let p = assigner.grid.p;
        let mut fast = vec![0u32; xs.len() / p];
        let mut scalar = vec![0u32; xs.len() / p];
        assigner.assign(xs, &mut fast);
        assigner.assign_scalar(xs, &mut scalar);
        for (t, x) in xs.chunks_exact(p).enumerate() {
            let want = brute_force_nearest(&assigner.grid.points, p, x);
            assert_eq!(fast[t], want, "{}: x = {x:?}", assigner.grid.id());
            assert_eq!(
                scalar[t],
                want,
                "{} (scalar): x = {x:?}",
                assigner.grid.id()
            );
        }
    }

    /// Gaussian, wide, far-tail, huge and non-finite inputs.
    fn hard_inputs(p: usize, count: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let mut xs = vec![0f32; count * p];
        rng.fill_gaussian(&mut xs);
        for (i, x) in xs.iter_mut().enumerate() {
            match i % 16 {
                3 => *x *= 3.0,
                5 => *x *= 8.0,
                7 => *x = x.signum() * (6.0 + x.abs() * 20.0),
                9 if i % 64 == 9 => *x *= 1e4,
                _ => {}
            }
        }
        for special in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            0.0,
            -0.0,
            64.0,
            -64.0,
            64.0001,
        ] {
            xs.extend(std::iter::repeat_n(special, p));
            xs.extend(std::iter::repeat_n(0.5, p - 1));
            xs.push(special);
        }
        xs
    }

    /// Inputs exactly on ties: midpoints of pairs of points (and of their f32 neighbours).
    fn tie_inputs(grid: &Grid, count: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let p = grid.p;
        let mut xs = Vec::with_capacity(count * p);
        for _ in 0..count {
            let a = (rng.next_u64() % grid.n as u64) as usize;
            // A near neighbour is far more likely to share a Voronoi face.
            let b = (0..grid.n)
                .filter(|&b| b != a)
                .min_by(|&b, &c| {
                    let db = distance2(grid.point(b), grid.point(a));
                    let dc = distance2(grid.point(c), grid.point(a));
                    db.total_cmp(&dc).then(b.cmp(&c))
                })
                .unwrap_or(a);
            let nudge = (rng.next_u64() % 3) as i32 - 1;
            for d in 0..p {
                let mid = 0.5 * (grid.point(a)[d] + grid.point(b)[d]);
                xs.push(match nudge {
                    -1 => f32::from_bits(mid.to_bits().wrapping_sub(1)),
                    1 => f32::from_bits(mid.to_bits() + 1),
                    _ => mid,
                });
            }
        }
        xs
    }

    #[test]
    fn assign_stats_match_the_scalar_sums() {
        for (p, n) in [(1usize, 16usize), (2, 256), (2, 64), (3, 512), (4, 8192)] {
            let assigner = Assigner::for_grid(p, n).unwrap();
            // Lengths that do and do not fill whole SIMD blocks; inputs past ±far included.
            for (len, seed) in [(64usize, 1u64), (32, 2), (38, 3), (7, 4), (200, 5)] {
                // Finite inputs whose squares fit f32 (the sums are f32).
                let mut xs = hard_inputs(p, len, seed);
                xs.retain(|v| v.abs() < 1e6);
                xs.truncate(xs.len() / p * p);
                let tuples = xs.len() / p;
                let mut codes = vec![0u32; tuples];
                let stats = assigner.assign_stats(&xs, &mut codes);
                let mut want = vec![0u32; tuples];
                assigner.assign_scalar(&xs, &mut want);
                assert_eq!(codes, want, "p {p} n {n} len {len}");
                let reference = assigner.stats_of(&xs, &want);
                assert_eq!(
                    (
                        stats.error.to_bits(),
                        stats.dot.to_bits(),
                        stats.norm.to_bits()
                    ),
                    (
                        reference.error.to_bits(),
                        reference.dot.to_bits(),
                        reference.norm.to_bits()
                    ),
                    "p {p} n {n} len {len}: {stats:?} vs {reference:?}"
                );
                let exact = assigner.assign_with_error(&xs, &mut codes);
                assert!(
                    (stats.error as f64 - exact).abs() <= 1e-5 * exact.max(1e-30),
                    "{stats:?} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn grouped_stats_match_one_call_per_group() {
        for (p, n) in [(2usize, 256usize), (2, 64), (2, 16), (1, 16), (4, 8192)] {
            let assigner = Assigner::for_grid(p, n).unwrap();
            let mut rng = SplitMix64::new(13 + n as u64);
            for (group_len, groups) in [(64usize, 9usize), (32, 5), (36, 4), (16, 3), (128, 2)] {
                if !group_len.is_multiple_of(p) {
                    continue;
                }
                // Gaussian, uniform over the box (every cell, the long lists included), wide
                // and far inputs; finite, with squares that fit f32 (the sums are f32).
                let mut xs = hard_inputs(p, groups * group_len / p + 3, group_len as u64);
                xs.retain(|v| v.abs() < 1e6);
                for (i, v) in xs.iter_mut().enumerate() {
                    if i % 5 == 1 {
                        *v = (rng.next_f64() * 8.0 - 4.0) as f32;
                    }
                }
                if p == 2 {
                    // The centres of the cells whose lists are longer than 4, first.
                    let Search::Cells(cells) = &assigner.search else {
                        panic!("p = 2")
                    };
                    let m = cells.cells_per_axis;
                    let width = 2.0 * cells.half_width / m as f32;
                    let centre = |k: usize| -cells.half_width + (k as f32 + 0.5) * width;
                    let long: Vec<f32> = (0..m * m)
                        .filter(|&c| cells.quads[c * QUAD_WORDS + 8] & QUAD_OVERFLOW != 0)
                        .flat_map(|c| [centre(c % m), centre(c / m)])
                        .collect();
                    assert!(n != 256 || !long.is_empty());
                    let keep = long.len().min(xs.len() / 2);
                    xs[..keep].copy_from_slice(&long[..keep]);
                }
                // A shorter last group.
                let len = ((groups - 1) * group_len + group_len / 2) / p * p;
                let xs = &xs[..len];
                let tuples = len / p;
                let mut codes = vec![0u32; tuples];
                let mut stats = vec![
                    AssignStats {
                        error: 0.0,
                        dot: 0.0,
                        norm: 0.0
                    };
                    groups
                ];
                assigner.assign_stats_groups(xs, group_len, &mut codes, &mut stats);
                let mut want = vec![0u32; tuples];
                assigner.assign_scalar(xs, &mut want);
                assert_eq!(codes, want, "p {p} n {n} g {group_len}");
                for (j, (x, c)) in xs
                    .chunks(group_len)
                    .zip(want.chunks(group_len / p))
                    .enumerate()
                {
                    let reference = assigner.stats_of(x, c);
                    let got = stats[j];
                    assert_eq!(
                        (got.error.to_bits(), got.dot.to_bits(), got.norm.to_bits()),
                        (
                            reference.error.to_bits(),
                            reference.dot.to_bits(),
                            reference.norm.to_bits()
                        ),
                        "p {p} n {n} g {group_len} group {j}: {got:?} vs {reference:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn pair_scan_matches_its_reference_and_bounds_the_exact_error() {
        let assigner = Assigner::for_grid(2, 256).unwrap();
        let table = assigner.pair_table.as_ref().unwrap();
        // n = 256: the AVX-512 scan reads the byte table of codes; it must give the same points.
        assert_eq!(table.codes.len(), table.side * table.side + 3);
        for (cell, &code) in table.codes[..table.side * table.side].iter().enumerate() {
            assert_eq!(table.code_points[code as usize], table.points[cell]);
        }
        assert!(Assigner::for_grid(4, 8192)
            .unwrap()
            .scan_pairs(&[0.0; 16], &[1.0], &mut [(0.0, 0.0)])
            .is_none());
        let mut rng = SplitMix64::new(77);
        let invs: Vec<f32> = (0..SCAN_MAX_FACTORS)
            .map(|k| 0.5 + 0.1 * k as f32)
            .collect();
        for len in [64usize, 128, 16, 34, 2] {
            let mut xs = vec![0f32; len];
            rng.fill_gaussian(&mut xs);
            xs[len / 2] *= 9.0; // beyond the table's box for most factors
            let mut sums = vec![(0f32, 0f32); invs.len()];
            assigner.scan_pairs(&xs, &invs, &mut sums).unwrap();
            for (&inv, &(dot, norm)) in invs.iter().zip(&sums) {
                // The scalar reference, folded like `scan_pairs`.
                let mut acc = [[0f32; SCAN_LANES]; 2];
                table.scan_scalar(&xs, inv * table.per_unit, 0, &mut acc);
                let fold = |v: &[f32; SCAN_LANES]| {
                    let mut f = *v;
                    for width in [8, 4, 2, 1] {
                        for j in 0..width {
                            f[j] += f[j + width];
                        }
                    }
                    f[0]
                };
                assert_eq!(
                    dot.to_bits(),
                    fold(&acc[0]).to_bits(),
                    "len {len} inv {inv}"
                );
                assert_eq!(
                    norm.to_bits(),
                    fold(&acc[1]).to_bits(),
                    "len {len} inv {inv}"
                );
                // The estimate uses grid points, so it is never below the exact error.
                let s = 1.0 / inv as f64;
                let xx: f64 = xs.iter().map(|&v| (v as f64).powi(2)).sum();
                let estimate = xx - 2.0 * s * dot as f64 + s * s * norm as f64;
                let scaled: Vec<f32> = xs.iter().map(|&v| v * inv).collect();
                let mut codes = vec![0u32; len / 2];
                let exact = assigner.assign_with_error(&scaled, &mut codes) * s * s;
                assert!(
                    estimate >= exact * (1.0 - 1e-4) - 1e-6 * xx,
                    "len {len} inv {inv}: estimate {estimate} < exact {exact}"
                );
                assert!(estimate <= exact * 1.5 + 1e-6 * xx, "{estimate} vs {exact}");
            }
        }
    }

    /// Inputs on the cell edges of every axis (and one f32 step to either side), where the
    /// binning in f32 is closest to picking the neighbouring cell.
    fn edge_inputs(assigner: &Assigner, count: usize, seed: u64) -> Vec<f32> {
        let Search::Cells(cells) = &assigner.search else {
            panic!("p >= 2")
        };
        let p = assigner.grid.p;
        // Values where the cell look-up changes: the start of each bin whose cell differs
        // from its left neighbour's, as the binning computes them.
        let bin_width = 1.0 / cells.bins_per_unit as f64;
        let mut edges: Vec<f32> = (1..AXIS_BINS)
            .filter(|&b| cells.axis_cells[b] != cells.axis_cells[b - 1])
            .map(|b| (-(cells.half_width as f64) + b as f64 * bin_width) as f32)
            .collect();
        assert_eq!(edges.len(), cells.cells_per_axis - 1);
        let mut rng = SplitMix64::new(seed);
        let mut gauss = vec![0f32; count * p];
        rng.fill_gaussian(&mut gauss);
        edges.extend(edges.clone().iter().map(|&e| e.next_up()));
        edges.extend(edges.clone().iter().map(|&e| e.next_down()));
        for (i, v) in gauss.iter_mut().enumerate() {
            if i % 2 == 0 {
                *v = edges[(rng.next_u64() % edges.len() as u64) as usize];
            }
        }
        gauss
    }

    #[test]
    fn uneven_cells_are_exact_on_their_edges() {
        for (p, n) in [(3usize, 4096usize), (3, 512), (4, 8192), (4, 256)] {
            let assigner = Assigner::for_grid(p, n).unwrap();
            let Search::Cells(cells) = &assigner.search else {
                panic!("p >= 2")
            };
            // The look-up is monotone, covers every cell and is symmetric about the middle.
            let m = cells.cells_per_axis;
            assert_eq!(cells.axis_cells.len(), AXIS_BINS);
            assert!(cells
                .axis_cells
                .windows(2)
                .all(|w| w[1] == w[0] || w[1] == w[0] + 1));
            assert_eq!(cells.axis_cells[0], 0);
            assert_eq!(cells.axis_cells[AXIS_BINS - 1] as usize, m - 1);
            for b in 0..AXIS_BINS {
                let mirrored = m - 1 - cells.axis_cells[AXIS_BINS - 1 - b] as usize;
                assert_eq!(cells.axis_cells[b] as usize, mirrored, "{p} {n} bin {b}");
            }
            check_against_brute(&assigner, &edge_inputs(&assigner, 20_000, 17 + n as u64));
        }
        // p = 2 keeps even cells (its SIMD path bins by arithmetic).
        let Search::Cells(pairs) = &Assigner::for_grid(2, 256).unwrap().search else {
            panic!("p = 2")
        };
        assert!(pairs.axis_cells.is_empty());
    }

    /// Inputs spread evenly over the cells rather than by the Gaussian: each coordinate in a
    /// random cell of its axis (the outer cells' parts inside the box), uniform within it, so
    /// the corners of cells, where [`prune_by_lp`] drops candidates, are reached as often as
    /// the middles; every other input moved next to a point (near-ties and exact hits).
    fn cell_inputs(assigner: &Assigner, count: usize, seed: u64) -> Vec<f32> {
        let Search::Cells(cells) = &assigner.search else {
            panic!("p >= 2")
        };
        let p = assigner.grid.p;
        let m = cells.cells_per_axis;
        // Bin range of each cell of an axis.
        let mut ranges = vec![(usize::MAX, 0usize); m];
        for (b, &k) in cells.axis_cells.iter().enumerate() {
            let r = &mut ranges[k as usize];
            *r = (r.0.min(b), r.1.max(b + 1));
        }
        let bin_width = 1.0 / cells.bins_per_unit as f64;
        let mut rng = SplitMix64::new(seed);
        let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut xs = Vec::with_capacity(count * p);
        for t in 0..count {
            for _ in 0..p {
                let (lo, hi) = ranges[(uniform() * m as f64) as usize % m];
                let at = lo as f64 + uniform() * (hi - lo) as f64;
                xs.push((-(cells.half_width as f64) + at * bin_width) as f32);
            }
            if t % 2 == 1 {
                let g = (uniform() * assigner.grid.n as f64) as usize % assigner.grid.n;
                let x = &mut xs[t * p..];
                for (v, &c) in x.iter_mut().zip(assigner.grid.point(g)) {
                    *v = c + (*v - c) * 1e-3 * uniform() as f32;
                }
            }
        }
        xs
    }

    #[test]
    fn pruned_lists_are_exact_all_over_the_cells() {
        for (p, n) in [(4usize, 8192usize), (4, 4096), (3, 4096), (4, 256)] {
            let assigner = Assigner::for_grid(p, n).unwrap();
            check_against_brute(&assigner, &cell_inputs(&assigner, 60_000, 41 + n as u64));
        }
    }

    #[test]
    fn region_is_empty_only_with_a_certificate() {
        let cell = Bounds::<2> {
            lo: [-1.0, -1.0],
            hi: [1.0, 1.0],
        };
        let constraint = |g: [f64; 2], h: [f64; 2]| {
            let norm = |v: [f64; 2]| v[0] * v[0] + v[1] * v[1];
            (
                [2.0 * (h[0] - g[0]), 2.0 * (h[1] - g[1])],
                norm(h) - norm(g) + 1e-9,
            )
        };
        let (h1, h2) = ([1.0, 2.0], [1.0, -2.0]);
        let mut lp = SimplexScratch::default();
        // g = (3.5, 0) loses to h1 above the axis and to h2 below it, to neither on the whole
        // box alone: only the pair drops it.
        let g = [3.5, 0.0];
        let both = [constraint(g, h1), constraint(g, h2)];
        assert!(region_is_empty(&both, &cell, &g, &mut lp));
        assert!(!region_is_empty(&both[..1], &cell, &g, &mut lp));
        assert!(!region_is_empty(&both[1..], &cell, &g, &mut lp));
        // Closer in, g is nearest around (1, 0).
        let g = [1.5, 0.0];
        let both = [constraint(g, h1), constraint(g, h2)];
        assert!(!region_is_empty(&both, &cell, &g, &mut lp));
        // A tie on the box's edge keeps the point: g = (3, 0) ties with both at (1, 0).
        let g = [3.0, 0.0];
        let both = [constraint(g, h1), constraint(g, h2)];
        assert!(!region_is_empty(&both, &cell, &g, &mut lp));
        // Pruning shortens the shipped p = 4 lists (14.5 per cell without it).
        let assigner = Assigner::for_grid(4, 8192).unwrap();
        let (mean, _, _) = assigner.cell_stats().unwrap();
        assert!(mean < 12.5, "{mean}");
    }

    #[test]
    fn wide_cell_path_matches_the_scalar_reference() {
        for (p, n) in [(3usize, 4096usize), (3, 512), (4, 8192), (4, 256)] {
            let assigner = Assigner::for_grid(p, n).unwrap();
            let Search::Cells(cells) = &assigner.search else {
                panic!("p >= 2")
            };
            let mut xs = hard_inputs(p, 3000, 23 + n as u64);
            xs.extend(edge_inputs(&assigner, 3000, 29 + n as u64));
            xs.extend(tie_inputs(&assigner.grid, 300, 31));
            // Whole blocks of 16 tuples and tails of every length below 16.
            for tuples in [xs.len() / p, 16, 17, 31, 15, 1] {
                let xs = &xs[xs.len() - tuples * p..];
                let mut scalar = vec![0u32; tuples];
                assigner.assign_scalar(xs, &mut scalar);
                let mut wide = vec![u32::MAX; tuples];
                let ran = match p {
                    3 => simd::assign_cells_avx512::<3>(cells, &assigner.grid, xs, &mut wide),
                    _ => simd::assign_cells_avx512::<4>(cells, &assigner.grid, xs, &mut wide),
                };
                if !ran {
                    eprintln!("no AVX-512 on this CPU: the wide cell path is not tested");
                    return;
                }
                assert_eq!(wide, scalar, "p {p} n {n}, {tuples} tuples");
            }
        }
    }

    #[test]
    fn shipped_grids_match_brute_force() {
        for (p, n) in Grid::available() {
            let assigner = Assigner::for_grid(p, n).unwrap();
            let count = (2_000_000 / n).clamp(2_000, 200_000);
            check_against_brute(&assigner, &hard_inputs(p, count, 11 + n as u64));
            check_against_brute(&assigner, &tie_inputs(&assigner.grid, 500, 5));
        }
    }

    #[test]
    fn p2_n256_millions_of_points() {
        let assigner = Assigner::for_grid(2, 256).unwrap();
        check_against_brute(&assigner, &hard_inputs(2, 2_000_000, 99));
        check_against_brute(&assigner, &tie_inputs(&assigner.grid, 20_000, 6));
    }

    #[test]
    fn symmetric_and_degenerate_grids_tie_to_lowest_index() {
        // A square lattice with duplicates: many exact ties.
        let mut pts = Vec::new();
        for i in -3..=3 {
            for j in -3..=3 {
                pts.extend([i as f32 * 0.5, j as f32 * 0.5]);
            }
        }
        pts.extend([0.0, 0.0, 1.0, 1.0]);
        let grid = Arc::new(Grid::from_points(2, pts, 0).unwrap());
        let assigner = Assigner::new(grid);
        let mut xs = Vec::new();
        for i in -40..=40 {
            for j in -40..=40 {
                xs.extend([i as f32 * 0.125, j as f32 * 0.125]);
            }
        }
        check_against_brute(&assigner, &xs);
        check_against_brute(&assigner, &hard_inputs(2, 50_000, 3));

        let line = Assigner::new(Arc::new(
            Grid::from_points(1, vec![1.0, -1.0, 0.0, 1.0, -0.0], 0).unwrap(),
        ));
        let xs: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.125).collect();
        check_against_brute(&line, &xs);
        check_against_brute(&line, &hard_inputs(1, 10_000, 4));
        let two = Assigner::new(Arc::new(Grid::from_points(1, vec![0.5, -0.5], 0).unwrap()));
        check_against_brute(&two, &hard_inputs(1, 10_000, 4));
    }

    #[test]
    fn random_grids_of_every_dimension() {
        for p in 1..=5 {
            for n in [3usize, 17, 300] {
                let mut rng = SplitMix64::new(p as u64 * 1000 + n as u64);
                let mut pts = vec![0f32; n * p];
                rng.fill_gaussian(&mut pts);
                let assigner = Assigner::new(Arc::new(Grid::from_points(p, pts, 0).unwrap()));
                check_against_brute(&assigner, &hard_inputs(p, 20_000, 8));
                check_against_brute(&assigner, &tie_inputs(&assigner.grid, 300, 9));
            }
        }
    }
}
