//! AVX2 scan of the cell lists (x86-64). Lane by lane it does the scalar path's arithmetic,
//! (g − x)² summed over the axes in order with separate multiply and add (no FMA), so its
//! answers are bit-identical to [`super::brute_force_nearest`]; tests compare both.
#![allow(unsafe_code)]

use super::{
    add_terms, brute_force_nearest, fold_stats, AssignStats, CellSearch, LineSearch, LANES,
    QUAD_OVERFLOW, QUAD_WORDS,
};
use crate::grid::Grid;
use std::arch::x86_64::*;

pub fn avx2_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// p = 3 or 4 with AVX2: each cell's candidates, 8 at a time, loaded from the 4-float copy
/// of the points and transposed. Returns false (and does nothing) when AVX2 is missing.
pub fn assign_cells_avx2<const P: usize>(
    search: &CellSearch,
    grid: &Grid,
    xs: &[f32],
    codes: &mut [u32],
) -> bool {
    let tables_fit = (P == 3 || P == 4)
        && search.p == P
        && search.points4.len() == 4 * grid.n
        && search.tables_checked;
    if !avx2_available() || !tables_fit {
        return false;
    }
    if assign_cells_avx512::<P>(search, grid, xs, codes) {
        return true;
    }
    // SAFETY: the CPU supports AVX2, every index in `indices` is below n and `points4` holds
    // 4·n floats (all checked above), which is what the loads in `assign` rely on.
    unsafe { assign::<P>(search, grid, xs, codes) };
    true
}

/// Tuples per block of [`assign_cells_avx512`]: one 512-bit register of lanes.
const WIDE_BLOCK: usize = 16;

/// p = 3 or 4 with AVX-512: [`assign_cells_avx2`]'s answers, with the cells of 16 tuples found
/// at once in vector registers (the scalar `cell_of` lane by lane), the next block's cells and
/// list prefetches issued before this block's searches, and each search keeping per lane the
/// minimum of (distance bits << 32 | index), which is the lowest index at the smallest
/// distance (distances are finite and non-negative, so their bits order as the values), with
/// no compare-and-blend and no branch on the list length. Returns false (nothing done) without
/// AVX-512F or when the tables do not fit; a tail of fewer than 16 tuples takes the AVX2 path.
pub fn assign_cells_avx512<const P: usize>(
    search: &CellSearch,
    grid: &Grid,
    xs: &[f32],
    codes: &mut [u32],
) -> bool {
    let m = search.cells_per_axis;
    let tables_fit = (P == 3 || P == 4)
        && search.p == P
        && search.points4.len() == 4 * grid.n
        && search.tables_checked
        && search.axis_cells.len() == super::AXIS_BINS
        && m.is_power_of_two()
        && m <= 256
        && search.chunk_offsets.len() == m.pow(P as u32) + 1
        && search
            .chunk_offsets
            .last()
            .is_some_and(|&end| end as usize * LANES == search.indices.len())
        && xs.len() == codes.len() * P;
    if !tables_fit || !avx512_available() {
        return false;
    }
    let blocks = codes.len() / WIDE_BLOCK;
    if blocks > 0 {
        // SAFETY: AVX-512F and AVX2 are available; the tables are consistent (checked above:
        // cells are below m^P, so cell + 1 indexes `chunk_offsets`; every list lies inside
        // `indices`, whose entries are below n = points4.len() / 4), and `xs` holds P floats
        // per code.
        unsafe {
            assign_blocks_avx512::<P>(
                search,
                grid,
                &xs[..blocks * WIDE_BLOCK * P],
                &mut codes[..blocks * WIDE_BLOCK],
            )
        };
    }
    let done = blocks * WIDE_BLOCK;
    if done < codes.len() {
        // SAFETY: as in `assign_cells_avx2` (the same checks passed above).
        unsafe { assign::<P>(search, grid, &xs[done * P..], &mut codes[done..]) };
    }
    true
}

/// The cells of a block of 16 tuples: each tuple's list as (first chunk, end chunk), and
/// which tuples are inside ±far on every axis (the others go to brute force).
struct BlockLists {
    first: [u32; WIDE_BLOCK],
    end: [u32; WIDE_BLOCK],
    inside: u16,
}

/// `CellSearch::cell_of` for 16 tuples (`xb` holds 16·P floats): the bins in vector
/// registers (the scalar arithmetic lane by lane; the coordinates transposed by permutes),
/// then each tuple's cell and list offsets, with a prefetch of each list.
///
/// # Safety
/// AVX-512F; the tables as [`assign_cells_avx512`] checks them.
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn block_lists<const P: usize>(search: &CellSearch, xb: &[f32]) -> BlockLists {
    assert!(xb.len() == WIDE_BLOCK * P && (P == 3 || P == 4));
    // SAFETY: xb holds 16·P floats, so 16·P / 16 = P whole registers (P ≤ 4).
    let regs: [__m512; 4] =
        std::array::from_fn(|r| unsafe { _mm512_loadu_ps(xb.as_ptr().add(16 * r.min(P - 1))) });
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let tuple_start = _mm512_mullo_epi32(iota, _mm512_set1_epi32(P as i32));
    let half_width = _mm512_set1_ps(search.half_width);
    let bins_per_unit = _mm512_set1_ps(search.bins_per_unit);
    let far = _mm512_set1_ps(search.far);
    let zero = _mm512_setzero_ps();
    let top_bin = _mm512_set1_ps((super::AXIS_BINS - 1) as f32);
    let mut inside: u16 = 0xFFFF;
    let mut bins = [[0u32; WIDE_BLOCK]; 4];
    for (d, axis_bins) in bins.iter_mut().enumerate().take(P) {
        // Lane t: element t·P + d of the block, from registers 0–1 below 32, 2–3 above.
        let at = _mm512_add_epi32(tuple_start, _mm512_set1_epi32(d as i32));
        let low = _mm512_permutex2var_ps(regs[0], at, regs[1]);
        let high = _mm512_permutex2var_ps(regs[2], at, regs[3]);
        let v = _mm512_mask_blend_ps(
            _mm512_cmpge_epu32_mask(at, _mm512_set1_epi32(32)),
            low,
            high,
        );
        // |v| <= far is false for NaN, as `v.is_nan() || v.abs() > far` is true.
        inside &= _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_abs_ps(v), far);
        // The scalar `((v + hw) · bins) as i32` clamped to [0, AXIS_BINS − 1]: clamping
        // before the truncation gives the same bin (and keeps lanes that go to brute force,
        // NaN included, in range: max(NaN, 0) is 0).
        let u = _mm512_mul_ps(_mm512_add_ps(v, half_width), bins_per_unit);
        let bin = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(u, zero), top_bin));
        // SAFETY: `axis_bins` holds 16 u32.
        unsafe { _mm512_storeu_si512(axis_bins.as_mut_ptr().cast(), bin) };
    }
    let shift = search.cells_per_axis.trailing_zeros();
    let last = search.cells_per_axis - 1;
    let mut lists = BlockLists {
        first: [0; WIDE_BLOCK],
        end: [0; WIDE_BLOCK],
        inside,
    };
    for t in 0..WIDE_BLOCK {
        let mut cell = 0usize;
        for axis_bins in bins[..P].iter().rev() {
            // Bins are below AXIS_BINS = axis_cells.len() (clamped above); entries are below
            // m already, the min keeps the cell provably below m^P.
            let k = (search.axis_cells[axis_bins[t] as usize & (super::AXIS_BINS - 1)] as usize)
                .min(last);
            cell = (cell << shift) | k;
        }
        lists.first[t] = search.chunk_offsets[cell];
        lists.end[t] = search.chunk_offsets[cell + 1];
        let at = search
            .indices
            .as_ptr()
            .wrapping_add(lists.first[t] as usize * LANES);
        _mm_prefetch::<_MM_HINT_T0>(at.cast());
    }
    lists
}

#[target_feature(enable = "avx512f,avx2")]
unsafe fn assign_blocks_avx512<const P: usize>(
    search: &CellSearch,
    grid: &Grid,
    xs: &[f32],
    codes: &mut [u32],
) {
    let count = codes.len() / WIDE_BLOCK;
    // SAFETY (both calls): forwarded contract; block 0 exists (count > 0).
    let mut lists = unsafe { block_lists::<P>(search, &xs[..WIDE_BLOCK * P]) };
    for b in 0..count {
        let xb = &xs[b * WIDE_BLOCK * P..(b + 1) * WIDE_BLOCK * P];
        // The next block's cells and prefetches first: their loads overlap this block's
        // searches.
        let next = (b + 1 < count).then(|| unsafe {
            block_lists::<P>(
                search,
                &xs[(b + 1) * WIDE_BLOCK * P..(b + 2) * WIDE_BLOCK * P],
            )
        });
        let cb = &mut codes[b * WIDE_BLOCK..(b + 1) * WIDE_BLOCK];
        for (t, (x, code)) in xb.chunks_exact(P).zip(cb.iter_mut()).enumerate() {
            let (first, end) = (lists.first[t] as usize, lists.end[t] as usize);
            *code = if lists.inside & (1 << t) == 0 || end == first {
                brute_force_nearest(&grid.points, P, x)
            } else {
                let point: [__m256; 4] =
                    std::array::from_fn(|j| _mm256_set1_ps(x.get(j).copied().unwrap_or(0.0)));
                // SAFETY: the list lies inside `indices`, whose entries are below
                // points4.len() / 4 (caller).
                unsafe {
                    nearest_by_keys(
                        &search.points4,
                        &search.indices[first * LANES..end * LANES],
                        &point,
                    )
                }
            };
        }
        if let Some(next) = next {
            lists = next;
        }
    }
}

/// The lowest index at the smallest distance among the chunks of `indices`: per lane the
/// minimum of (distance bits << 32 | index) over the chunks, then over the lanes. Distances
/// are finite and non-negative (inputs within ±far), so their bits order as their values.
///
/// # Safety
/// As [`chunk_distances`] for every chunk of 8 in `indices` (at least one); AVX-512F.
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn nearest_by_keys(points4: &[f32], indices: &[u32], point: &[__m256; 4]) -> u32 {
    let mut best = _mm512_set1_epi64(-1);
    for idx in indices.chunks_exact(LANES) {
        // SAFETY: forwarded contract.
        let d = unsafe { chunk_distances(points4, idx, point) };
        // SAFETY: `idx` holds exactly LANES = 8 u32 (chunks_exact), 32 bytes, read unaligned.
        let i = unsafe { _mm256_loadu_si256(idx.as_ptr().cast()) };
        let key = _mm512_or_si512(
            _mm512_slli_epi64::<32>(_mm512_cvtepu32_epi64(_mm256_castps_si256(d))),
            _mm512_cvtepu32_epi64(i),
        );
        best = _mm512_min_epu64(best, key);
    }
    _mm512_reduce_min_epu64(best) as u32
}

/// p = 1 with AVX2, 8 inputs at once (the scalar `LineSearch::nearest` lane by lane, with
/// gathers for the table look-ups). Returns false (and does nothing) when AVX2 is missing.
pub fn assign_line_avx2(line: &LineSearch, points: &[f32], xs: &[f32], codes: &mut [u32]) -> bool {
    if !avx2_available() || !line.tables_checked {
        return false;
    }
    let distinct = line.levels.len() - 2;
    if distinct <= 16 {
        // SAFETY: AVX2 is available; `assign_line_small` reads only `levels`/`index` at padded
        // positions 1..=distinct (they have distinct + 2 entries) and the distinct − 1 real thresholds.
        unsafe { assign_line_small(line, points, xs, codes) };
        return true;
    }
    // SAFETY: AVX2 is available, and every gather index `assign_line` forms is in bounds:
    // bins are clamped to `first`'s length; `first[b] + j < thresholds.len()` for j < span
    // (`tables_checked`); k <= levels.len() - 3 because k counts at most the real thresholds,
    // which are levels.len() - 3 in number, so k + 2 < levels.len() = index.len().
    unsafe { assign_line(line, points, xs, codes) };
    true
}

/// Up to 16 distinct levels: thresholds are compared from registers and the levels looked up
/// with in-register permutes, so no memory gathers are needed.
#[target_feature(enable = "avx2")]
unsafe fn assign_line_small(line: &LineSearch, points: &[f32], xs: &[f32], codes: &mut [u32]) {
    let distinct = line.levels.len() - 2;
    debug_assert!((1..=16).contains(&distinct));
    let mut table_levels = [f32::INFINITY; 16];
    let mut table_index = [u32::MAX; 16];
    table_levels[..distinct].copy_from_slice(&line.levels[1..=distinct]);
    table_index[..distinct].copy_from_slice(&line.index[1..=distinct]);
    // On the stack: this runs once per call, and calls can be as short as one group.
    let mut threshold_table = [_mm256_setzero_ps(); 15];
    for (r, &t) in threshold_table
        .iter_mut()
        .zip(&line.thresholds[..distinct - 1])
    {
        *r = _mm256_set1_ps(t);
    }
    let thresholds = &threshold_table[..distinct - 1];
    // SAFETY: the tables are 16 entries, read as two halves of 8.
    let (levels_lo, levels_hi, index_lo, index_hi) = unsafe {
        (
            _mm256_loadu_ps(table_levels.as_ptr()),
            _mm256_loadu_ps(table_levels.as_ptr().add(8)),
            _mm256_loadu_si256(table_index.as_ptr().cast()),
            _mm256_loadu_si256(table_index.as_ptr().add(8).cast()),
        )
    };
    let far = _mm256_set1_ps(line.far);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let seven = _mm256_set1_epi32(7);
    let last = _mm256_set1_epi32(distinct as i32 - 1);
    let blocks = codes.len() / 8;
    for b in 0..blocks {
        let x_block = &xs[b * 8..b * 8 + 8];
        let out = &mut codes[b * 8..b * 8 + 8];
        // SAFETY: `x_block` holds 8 floats.
        let x = unsafe { _mm256_loadu_ps(x_block.as_ptr()) };
        let inside = _mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_and_ps(x, abs_mask), far);
        if _mm256_movemask_ps(inside) != 0xFF {
            line.assign_scalar(points, x_block, out);
            continue;
        }
        // k = number of thresholds <= x, as in the scalar path.
        let mut k = _mm256_setzero_si256();
        for &t in thresholds {
            k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(t, x)));
        }
        let mut best_d = _mm256_set1_ps(f32::INFINITY);
        let mut best_i = _mm256_set1_epi32(-1);
        for step in -1..=1 {
            // Levels k − 1, k, k + 1, clamped (a repeated level never beats its first look).
            let j = _mm256_min_epi32(
                _mm256_max_epi32(
                    _mm256_add_epi32(k, _mm256_set1_epi32(step)),
                    _mm256_setzero_si256(),
                ),
                last,
            );
            let high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(j, seven));
            let level = _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(levels_lo, j),
                _mm256_permutevar8x32_ps(levels_hi, j),
                high,
            );
            let i = _mm256_castps_si256(_mm256_blendv_ps(
                _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(index_lo, j)),
                _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(index_hi, j)),
                high,
            ));
            (best_d, best_i) = keep_nearer(best_d, best_i, _mm256_sub_ps(level, x), i);
        }
        // SAFETY: `out` holds 8 u32.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), best_i) };
    }
    let done = blocks * 8;
    line.assign_scalar(points, &xs[done..], &mut codes[done..]);
}

/// p = 1 with at most 16 grid points: [`assign_line_avx2`], then the sums of
/// [`super::Assigner::assign_stats`] in its canonical order, the points looked up from registers.
/// `None` (nothing done) when AVX2 is missing or the grid is larger.
pub fn assign_line_stats_avx2(
    line: &LineSearch,
    points: &[f32],
    xs: &[f32],
    codes: &mut [u32],
) -> Option<AssignStats> {
    if points.len() > 16 || xs.len() != codes.len() || !assign_line_avx2(line, points, xs, codes) {
        return None;
    }
    // SAFETY: AVX2 is available (assign_line_avx2 ran), every code is below points.len() <= 16.
    Some(unsafe { line_stats(points, xs, codes) })
}

#[target_feature(enable = "avx2")]
unsafe fn line_stats(points: &[f32], xs: &[f32], codes: &[u32]) -> AssignStats {
    let mut table = [0f32; 16];
    table[..points.len()].copy_from_slice(points);
    // SAFETY: `table` is 16 floats, read as two halves of 8.
    let (lo, hi) = unsafe {
        (
            _mm256_loadu_ps(table.as_ptr()),
            _mm256_loadu_ps(table.as_ptr().add(8)),
        )
    };
    let seven = _mm256_set1_epi32(7);
    let (mut err, mut dot, mut norm) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let blocks = codes.len() / 8;
    for b in 0..blocks {
        // SAFETY: 8 floats and 8 codes at b·8 (b < blocks).
        let (x, c) = unsafe {
            (
                _mm256_loadu_ps(xs.as_ptr().add(b * 8)),
                _mm256_loadu_si256(codes.as_ptr().add(b * 8).cast()),
            )
        };
        let q = _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(lo, c),
            _mm256_permutevar8x32_ps(hi, c),
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(c, seven)),
        );
        let d = _mm256_sub_ps(x, q);
        err = _mm256_add_ps(err, _mm256_mul_ps(d, d));
        dot = _mm256_add_ps(dot, _mm256_mul_ps(x, q));
        norm = _mm256_add_ps(norm, _mm256_mul_ps(q, q));
    }
    let mut acc = lane_sums(err, dot, norm);
    for t in blocks * 8..codes.len() {
        let c = codes[t] as usize;
        add_terms(&mut acc, t % 8, &xs[t..t + 1], &points[c..c + 1]);
    }
    fold_stats(&acc)
}

/// The three 8-lane sums as arrays, lane l into accumulator l: the scalar tail adds on, then
/// [`fold_stats`].
#[target_feature(enable = "avx2")]
fn lane_sums(err: __m256, dot: __m256, norm: __m256) -> [[f32; 8]; 3] {
    let mut acc = [[0f32; 8]; 3];
    // SAFETY: each array is 8 f32.
    unsafe {
        _mm256_storeu_ps(acc[0].as_mut_ptr(), err);
        _mm256_storeu_ps(acc[1].as_mut_ptr(), dot);
        _mm256_storeu_ps(acc[2].as_mut_ptr(), norm);
    }
    acc
}

/// The nearer of two candidates per lane, ties to the lower index (compared unsigned):
/// `diff` is the new candidate's level minus the input, `i` its index.
#[target_feature(enable = "avx2")]
fn keep_nearer(best_d: __m256, best_i: __m256i, diff: __m256, i: __m256i) -> (__m256, __m256i) {
    let sign = _mm256_set1_epi32(i32::MIN);
    let d = _mm256_mul_ps(diff, diff);
    let lower_index = _mm256_cmpgt_epi32(_mm256_xor_si256(best_i, sign), _mm256_xor_si256(i, sign));
    let better = _mm256_or_ps(
        _mm256_cmp_ps::<_CMP_LT_OQ>(d, best_d),
        _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_EQ_OQ>(d, best_d),
            _mm256_castsi256_ps(lower_index),
        ),
    );
    let best_i = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(best_i),
        _mm256_castsi256_ps(i),
        better,
    ));
    (_mm256_blendv_ps(best_d, d, better), best_i)
}

#[target_feature(enable = "avx2")]
unsafe fn assign_line(line: &LineSearch, points: &[f32], xs: &[f32], codes: &mut [u32]) {
    let blocks = codes.len() / 8;
    let offset = _mm256_set1_ps(line.half_width);
    let scale = _mm256_set1_ps(line.inv_width);
    let far = _mm256_set1_ps(line.far);
    let top = _mm256_set1_ps((line.first.len() - 1) as f32);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let one = _mm256_set1_epi32(1);
    for b in 0..blocks {
        let x_block = &xs[b * 8..b * 8 + 8];
        let out = &mut codes[b * 8..b * 8 + 8];
        // SAFETY: `x_block` holds 8 floats.
        let x = unsafe { _mm256_loadu_ps(x_block.as_ptr()) };
        let inside = _mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_and_ps(x, abs_mask), far);
        if _mm256_movemask_ps(inside) != 0xFF {
            line.assign_scalar(points, x_block, out);
            continue;
        }
        // Same arithmetic as the scalar path: (x + half_width) · inv_width, clamped.
        let u = _mm256_mul_ps(_mm256_add_ps(x, offset), scale);
        let bin = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(u, _mm256_setzero_ps()), top));
        // SAFETY (all gathers): indices are in bounds as argued in `assign_line_avx2`.
        let start = unsafe { _mm256_i32gather_epi32::<4>(line.first.as_ptr().cast(), bin) };
        let mut k = start;
        for j in 0..line.span as i32 {
            let at = _mm256_add_epi32(start, _mm256_set1_epi32(j));
            let t = unsafe { _mm256_i32gather_ps::<4>(line.thresholds.as_ptr(), at) };
            // (t <= x) is all ones, i.e. −1: subtracting it counts the threshold.
            k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(t, x)));
        }
        let mut best_d = _mm256_set1_ps(f32::INFINITY);
        let mut best_i = _mm256_set1_epi32(-1);
        for _ in 0..3 {
            let level = unsafe { _mm256_i32gather_ps::<4>(line.levels.as_ptr(), k) };
            let i = unsafe { _mm256_i32gather_epi32::<4>(line.index.as_ptr().cast(), k) };
            (best_d, best_i) = keep_nearer(best_d, best_i, _mm256_sub_ps(level, x), i);
            k = _mm256_add_epi32(k, one);
        }
        // SAFETY: `out` holds 8 u32.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), best_i) };
    }
    let done = blocks * 8;
    line.assign_scalar(points, &xs[done..], &mut codes[done..]);
}

/// p = 2 with AVX2: cells of 8 pairs at once, then two pairs per register against the 4-lane
/// candidate quads of their cells. Returns false (and does nothing) when AVX2 is missing.
pub fn assign_pairs_avx2(search: &CellSearch, grid: &Grid, xs: &[f32], codes: &mut [u32]) -> bool {
    if !avx2_available()
        || search.p != 2
        || search.quads.len() != (search.chunk_offsets.len() - 1) * QUAD_WORDS
    {
        return false;
    }
    // SAFETY: the CPU supports AVX2 (checked above) and `quads` has QUAD_WORDS words for every
    // cell (checked above), which is what `assign_pairs` relies on.
    unsafe { assign_pairs(search, grid, xs, codes) };
    true
}

/// p = 2 with AVX2, fused with the sums of [`super::Assigner::assign_stats`] in its canonical
/// order. `None` (and nothing done) when AVX2 is missing or the tables do not fit.
pub fn assign_pairs_stats_avx2(
    search: &CellSearch,
    grid: &Grid,
    xs: &[f32],
    codes: &mut [u32],
) -> Option<AssignStats> {
    if !avx2_available()
        || search.p != 2
        || search.quads.len() != (search.chunk_offsets.len() - 1) * QUAD_WORDS
        || grid.points.len() != 2 * grid.n
        || grid.n > super::QUAD_STATS_MAX_N
        || xs.len() != 2 * codes.len()
    {
        return None;
    }
    // SAFETY: AVX2 is available; `quads` has QUAD_WORDS words per cell; every code the search
    // writes is a grid index below n and `points` holds 2·n floats below i32::MAX (all checked
    // above), which is what the loads and gathers of `assign_pairs_stats` rely on.
    Some(unsafe { assign_pairs_stats(search, grid, xs, codes) })
}

/// Constants of the p = 2 block search.
struct PairConsts {
    shift: __m128i,
    offset: __m256,
    scale: __m256,
    far: __m256,
    top: __m256,
    abs_mask: __m256,
}

#[target_feature(enable = "avx2")]
fn pair_consts(search: &CellSearch) -> PairConsts {
    PairConsts {
        shift: _mm_cvtsi32_si128(search.cells_per_axis.trailing_zeros() as i32),
        offset: _mm256_set1_ps(search.half_width),
        scale: _mm256_set1_ps(search.inv_width),
        far: _mm256_set1_ps(search.far),
        top: _mm256_set1_ps((search.cells_per_axis - 1) as f32),
        abs_mask: _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF)),
    }
}

/// Nearest points of 8 pairs (`x` holds 16 floats, `out` 8 codes); returns the pairs' first
/// and second coordinates, deinterleaved, in pair order.
///
/// # Safety
/// AVX2; `search.quads` has QUAD_WORDS words per cell.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pair_block(
    search: &CellSearch,
    grid: &Grid,
    k: &PairConsts,
    x: &[f32],
    out: &mut [u32],
) -> (__m256, __m256) {
    debug_assert!(x.len() == 16 && out.len() == 8);
    let quads = search.quads.as_ptr();
    let cell_count = search.chunk_offsets.len() - 1;
    // SAFETY: `x` holds 16 floats; two unaligned loads of 8.
    let (v0, v1) = unsafe {
        (
            _mm256_loadu_ps(x.as_ptr()),
            _mm256_loadu_ps(x.as_ptr().add(8)),
        )
    };
    // Deinterleave into the 8 first and the 8 second coordinates, in pair order.
    let first = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
        _mm256_shuffle_ps::<0b10_00_10_00>(v0, v1),
    )));
    let second = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
        _mm256_shuffle_ps::<0b11_01_11_01>(v0, v1),
    )));
    let inside = _mm256_and_ps(
        _mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_and_ps(first, k.abs_mask), k.far),
        _mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_and_ps(second, k.abs_mask), k.far),
    );
    if _mm256_movemask_ps(inside) != 0xFF {
        // Some input is beyond ±far or NaN: this block goes through the scalar path.
        search.assign_scalar_p::<2>(grid, x, out);
        return (first, second);
    }
    // Same arithmetic as `CellSearch::cell_of`: (v + half_width) · inv_width, clamped.
    let axis = |v: __m256| {
        let u = _mm256_mul_ps(_mm256_add_ps(v, k.offset), k.scale);
        _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(u, _mm256_setzero_ps()), k.top))
    };
    let cells = _mm256_or_si256(axis(first), _mm256_sll_epi32(axis(second), k.shift));
    let mut cell = [0u32; 8];
    // SAFETY: `cell` is 32 bytes.
    unsafe { _mm256_storeu_si256(cell.as_mut_ptr().cast(), cells) };
    for j in 0..4 {
        let (a, b2) = (cell[2 * j] as usize, cell[2 * j + 1] as usize);
        debug_assert!(a < cell_count && b2 < cell_count);
        // SAFETY: cell indices are clamped to [0, cells_per_axis - 1] per axis, so they are
        // below cell_count, and `quads` has QUAD_WORDS words per cell (caller's contract).
        let (qa, qb) = unsafe { (quads.add(a * QUAD_WORDS), quads.add(b2 * QUAD_WORDS)) };
        // SAFETY: each quad is 12 words: x's at 0..4, y's at 4..8, indices at 8..12.
        let (gx, gy, ia, ib) = unsafe {
            (
                _mm256_loadu2_m128(qb.cast(), qa.cast()),
                _mm256_loadu2_m128(qb.add(4).cast(), qa.add(4).cast()),
                std::slice::from_raw_parts(qa.add(8), 4),
                std::slice::from_raw_parts(qb.add(8), 4),
            )
        };
        let pick = _mm256_setr_epi32(
            2 * j as i32,
            2 * j as i32,
            2 * j as i32,
            2 * j as i32,
            2 * j as i32 + 1,
            2 * j as i32 + 1,
            2 * j as i32 + 1,
            2 * j as i32 + 1,
        );
        let dx = _mm256_sub_ps(gx, _mm256_permutevar8x32_ps(first, pick));
        let dy = _mm256_sub_ps(gy, _mm256_permutevar8x32_ps(second, pick));
        let d = _mm256_add_ps(_mm256_mul_ps(dx, dx), _mm256_mul_ps(dy, dy));
        let m = _mm256_min_ps(d, _mm256_permute_ps::<0b01_00_11_10>(d));
        let m = _mm256_min_ps(m, _mm256_permute_ps::<0b10_11_00_01>(m));
        let at_min = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(d, m)) as u32;
        // Distances are finite, so each half has a lane at its minimum.
        out[2 * j] = ia[(at_min & 0xF).trailing_zeros().min(3) as usize];
        out[2 * j + 1] = ib[(at_min >> 4).trailing_zeros().min(3) as usize];
        if (ia[0] | ib[0]) & QUAD_OVERFLOW != 0 {
            out[2 * j] = search.nearest_in_cell::<2>(&grid.points, a, &x[4 * j..4 * j + 2]);
            out[2 * j + 1] =
                search.nearest_in_cell::<2>(&grid.points, b2, &x[4 * j + 2..4 * j + 4]);
        }
    }
    (first, second)
}

#[target_feature(enable = "avx2")]
unsafe fn assign_pairs(search: &CellSearch, grid: &Grid, xs: &[f32], codes: &mut [u32]) {
    let blocks = codes.len() / 8;
    let k = pair_consts(search);
    for b in 0..blocks {
        // SAFETY: forwarded contract (AVX2, quads per cell).
        unsafe {
            pair_block(
                search,
                grid,
                &k,
                &xs[b * 16..b * 16 + 16],
                &mut codes[b * 8..b * 8 + 8],
            )
        };
    }
    let done = blocks * 8;
    search.assign_scalar_p::<2>(grid, &xs[done * 2..], &mut codes[done..]);
}

#[target_feature(enable = "avx2")]
unsafe fn assign_pairs_stats(
    search: &CellSearch,
    grid: &Grid,
    xs: &[f32],
    codes: &mut [u32],
) -> AssignStats {
    let blocks = codes.len() / 8;
    let k = pair_consts(search);
    let points = grid.points.as_ptr();
    let one = _mm256_set1_epi32(1);
    let (mut err, mut dot, mut norm) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    for b in 0..blocks {
        let out = &mut codes[b * 8..b * 8 + 8];
        // SAFETY: forwarded contract (AVX2, quads per cell).
        let (first, second) =
            unsafe { pair_block(search, grid, &k, &xs[b * 16..b * 16 + 16], out) };
        // SAFETY: `out` holds 8 u32; every code is below n and points has 2·n < i32::MAX
        // floats (caller's contract), so 2c and 2c + 1 are in bounds.
        let (gx, gy) = unsafe {
            let c2 = _mm256_slli_epi32::<1>(_mm256_loadu_si256(out.as_ptr().cast()));
            (
                _mm256_i32gather_ps::<4>(points, c2),
                _mm256_i32gather_ps::<4>(points, _mm256_add_epi32(c2, one)),
            )
        };
        // The scalar order: per pair (x0 − g0)² + (x1 − g1)², x0·g0 + x1·g1, g0² + g1².
        let dx = _mm256_sub_ps(first, gx);
        let dy = _mm256_sub_ps(second, gy);
        err = _mm256_add_ps(
            err,
            _mm256_add_ps(_mm256_mul_ps(dx, dx), _mm256_mul_ps(dy, dy)),
        );
        dot = _mm256_add_ps(
            dot,
            _mm256_add_ps(_mm256_mul_ps(first, gx), _mm256_mul_ps(second, gy)),
        );
        norm = _mm256_add_ps(
            norm,
            _mm256_add_ps(_mm256_mul_ps(gx, gx), _mm256_mul_ps(gy, gy)),
        );
    }
    let mut acc = lane_sums(err, dot, norm);
    let done = blocks * 8;
    search.assign_scalar_p::<2>(grid, &xs[done * 2..], &mut codes[done..]);
    for (t, (x, &c)) in xs[done * 2..]
        .chunks_exact(2)
        .zip(&codes[done..])
        .enumerate()
    {
        // Tuple done + t goes to accumulator t mod 8 (done is a multiple of 8).
        add_terms(&mut acc, t % 8, x, grid.point(c as usize));
    }
    fold_stats(&acc)
}

#[target_feature(enable = "avx2")]
unsafe fn assign<const P: usize>(search: &CellSearch, grid: &Grid, xs: &[f32], codes: &mut [u32]) {
    const { assert!(LANES == 8) };
    const BLOCK: usize = 16;
    // Blocks of tuples: first every cell and a prefetch of its list's offsets, then the
    // offsets and a prefetch of each list, then the searches, so the table loads of a block
    // overlap instead of each waiting for the last. (A prefetch is only a hint and never
    // faults, whatever the address.)
    for (xb, cb) in xs.chunks(BLOCK * P).zip(codes.chunks_mut(BLOCK)) {
        let mut cells = [None; BLOCK];
        for (t, x) in xb.chunks_exact(P).enumerate() {
            cells[t] = search.cell_of::<P>(x);
            if let Some(cell) = cells[t] {
                let at = search.chunk_offsets.as_ptr().wrapping_add(cell);
                _mm_prefetch::<_MM_HINT_T0>(at.cast());
            }
        }
        let mut lists = [(0usize, 0usize); BLOCK];
        for (list, &cell) in lists.iter_mut().zip(&cells) {
            if let Some(cell) = cell {
                let first = search.chunk_offsets[cell] as usize;
                *list = (first, search.chunk_offsets[cell + 1] as usize);
                let at = search.indices.as_ptr().wrapping_add(first * LANES);
                _mm_prefetch::<_MM_HINT_T0>(at.cast());
            }
        }
        for ((x, code), &(first, end)) in xb.chunks_exact(P).zip(cb.iter_mut()).zip(&lists) {
            *code = if end == first {
                brute_force_nearest(&grid.points, P, x)
            } else {
                let indices = &search.indices[first * LANES..end * LANES];
                let point: [__m256; 4] =
                    std::array::from_fn(|j| _mm256_set1_ps(x.get(j).copied().unwrap_or(0.0)));
                // SAFETY: indices of `search` are below n and points4 has 4·n floats (caller).
                unsafe {
                    if end - first == 1 {
                        nearest_in_chunk(&search.points4, indices, &point)
                    } else {
                        nearest_in_chunks(&search.points4, indices, &point)
                    }
                }
            };
        }
    }
}

/// Squared distances from `point` to the 8 points `idx` names, lane l for idx[l]: the points
/// are loaded whole (4 floats each) and transposed to one register per axis. The sum runs over
/// the axes in order from 0, like the scalar reference.
///
/// # Safety
/// AVX2; `idx` holds at least 8 indices, each below `points4.len() / 4`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_distances(points4: &[f32], idx: &[u32], point: &[__m256; 4]) -> __m256 {
    debug_assert!(idx.len() >= 8 && idx[..8].iter().all(|&i| (i as usize) < points4.len() / 4));
    let base = points4.as_ptr();
    // SAFETY: per the contract, idx[l]·4 + 3 < points4.len() for l < 8.
    let load = |l: usize| unsafe { _mm_loadu_ps(base.add(*idx.get_unchecked(l) as usize * 4)) };
    let axes = transpose8(load);
    let mut d = _mm256_setzero_ps();
    for (g, x) in axes.iter().zip(point) {
        let diff = _mm256_sub_ps(*g, *x);
        d = _mm256_add_ps(d, _mm256_mul_ps(diff, diff));
    }
    d
}

/// 8 vectors of 4 floats (`load(l)` for l < 8) to one register per coordinate, lane l from
/// vector l.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8(load: impl Fn(usize) -> __m128) -> [__m256; 4] {
    let a0 = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(load(0)), load(4));
    let a1 = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(load(1)), load(5));
    let a2 = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(load(2)), load(6));
    let a3 = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(load(3)), load(7));
    let t0 = _mm256_unpacklo_ps(a0, a1);
    let t1 = _mm256_unpacklo_ps(a2, a3);
    let t2 = _mm256_unpackhi_ps(a0, a1);
    let t3 = _mm256_unpackhi_ps(a2, a3);
    [
        _mm256_shuffle_ps::<0b01_00_01_00>(t0, t1),
        _mm256_shuffle_ps::<0b11_10_11_10>(t0, t1),
        _mm256_shuffle_ps::<0b01_00_01_00>(t2, t3),
        _mm256_shuffle_ps::<0b11_10_11_10>(t2, t3),
    ]
}

/// p = 4 with AVX2: the sums of [`super::Assigner::assign_stats`] for given codes, 8 tuples per
/// register (tuple t in lane t mod 8, as the scalar reference accumulates them), with the
/// reference's arithmetic lane by lane. None when AVX2 is missing or the lengths or codes do
/// not fit.
pub fn stats_p4_avx2(points4: &[f32], xs: &[f32], codes: &[u32]) -> Option<AssignStats> {
    let n = points4.len() / 4;
    let fits = xs.len() == 4 * codes.len() && codes.iter().all(|&c| (c as usize) < n);
    if !avx2_available() || !fits {
        return None;
    }
    // SAFETY: AVX2 is available, `xs` holds 4 floats per code and every code is below
    // points4.len() / 4 (checked above).
    Some(unsafe { stats_p4(points4, xs, codes) })
}

#[target_feature(enable = "avx2")]
unsafe fn stats_p4(points4: &[f32], xs: &[f32], codes: &[u32]) -> AssignStats {
    let zero = _mm256_setzero_ps();
    let (mut err, mut dot, mut norm) = (zero, zero, zero);
    let blocks = codes.len() / 8;
    for b in 0..blocks {
        // SAFETY: codes b·8 + l (l < 8) exist and are below points4.len() / 4; tuple b·8 + l
        // is xs[(b·8 + l)·4 ..][..4] (b < blocks, xs.len() = 4·codes.len()).
        let (g, x) = unsafe {
            (
                transpose8(|l| {
                    let c = *codes.get_unchecked(b * 8 + l) as usize;
                    _mm_loadu_ps(points4.as_ptr().add(c * 4))
                }),
                transpose8(|l| _mm_loadu_ps(xs.as_ptr().add((b * 8 + l) * 4))),
            )
        };
        // Per tuple, coordinates in order from 0, multiply then add; then into its lane.
        let (mut e, mut d, mut q) = (zero, zero, zero);
        for axis in 0..4 {
            let diff = _mm256_sub_ps(x[axis], g[axis]);
            e = _mm256_add_ps(e, _mm256_mul_ps(diff, diff));
            d = _mm256_add_ps(d, _mm256_mul_ps(x[axis], g[axis]));
            q = _mm256_add_ps(q, _mm256_mul_ps(g[axis], g[axis]));
        }
        err = _mm256_add_ps(err, e);
        dot = _mm256_add_ps(dot, d);
        norm = _mm256_add_ps(norm, q);
    }
    let mut acc = lane_sums(err, dot, norm);
    for t in blocks * 8..codes.len() {
        let c = codes[t] as usize;
        add_terms(
            &mut acc,
            t % 8,
            &xs[t * 4..t * 4 + 4],
            &points4[c * 4..c * 4 + 4],
        );
    }
    fold_stats(&acc)
}

/// The minimum of the 8 lanes, in every lane.
#[inline]
#[target_feature(enable = "avx2")]
fn broadcast_min(d: __m256) -> __m256 {
    let m = _mm256_min_ps(d, _mm256_permute2f128_ps::<1>(d, d));
    let m = _mm256_min_ps(m, _mm256_permute_ps::<0b01_00_11_10>(m));
    _mm256_min_ps(m, _mm256_permute_ps::<0b10_11_00_01>(m))
}

/// One chunk: lanes hold ascending indices, so the first lane at the minimum is the answer.
///
/// # Safety
/// As [`chunk_distances`], with `indices` holding exactly 8.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nearest_in_chunk(points4: &[f32], indices: &[u32], point: &[__m256; 4]) -> u32 {
    // SAFETY: forwarded contract.
    let d = unsafe { chunk_distances(points4, indices, point) };
    let at_min = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(d, broadcast_min(d))) as u32;
    // Distances are finite (inputs are bounded), so some lane equals the minimum.
    indices[(at_min.trailing_zeros() as usize).min(LANES - 1)]
}

/// Several chunks: each lane keeps its first minimum (strict <, chunks in ascending index
/// order); then the lowest index among the lanes at the overall minimum wins.
///
/// # Safety
/// As [`chunk_distances`] for every chunk of 8 in `indices`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nearest_in_chunks(points4: &[f32], indices: &[u32], point: &[__m256; 4]) -> u32 {
    let mut best_d = _mm256_set1_ps(f32::INFINITY);
    let mut best_i = _mm256_setzero_si256();
    for idx in indices.chunks_exact(LANES) {
        // SAFETY: forwarded contract.
        let d = unsafe { chunk_distances(points4, idx, point) };
        // SAFETY: `idx` holds exactly LANES = 8 u32 (chunks_exact), 32 bytes, read unaligned.
        let i = unsafe { _mm256_loadu_si256(idx.as_ptr().cast()) };
        let closer = _mm256_cmp_ps::<_CMP_LT_OQ>(d, best_d);
        best_d = _mm256_blendv_ps(best_d, d, closer);
        best_i = _mm256_blendv_epi8(best_i, i, _mm256_castps_si256(closer));
    }
    let at_min = _mm256_cmp_ps::<_CMP_EQ_OQ>(best_d, broadcast_min(best_d));
    let i = _mm256_blendv_epi8(_mm256_set1_epi32(-1), best_i, _mm256_castps_si256(at_min));
    let i = _mm256_min_epu32(i, _mm256_permute2x128_si256::<1>(i, i));
    let i = _mm256_min_epu32(i, _mm256_shuffle_epi32::<0b01_00_11_10>(i));
    let i = _mm256_min_epu32(i, _mm256_shuffle_epi32::<0b10_11_00_01>(i));
    _mm256_cvtsi256_si32(i) as u32
}

/// AVX-512 version of [`super::Assigner::scan_pairs`] for inputs of whole blocks of 16
/// elements (8 pairs): for each scale factor `a` of `factors`, (Σ x·q, Σ‖q‖²) into `out`, with
/// the scalar reference's arithmetic (element i into accumulator i mod 16; multiply, then add;
/// clamp, truncate; the same folding of the accumulators). With a byte table of codes (grids
/// of at most 256 points) q is looked up as code, then point, with scalar loads from 66 KB that
/// mostly hit L1, instead of one gather from the 512 KB table of points (the same points). Returns
/// false (nothing written) without AVX-512F or when the lengths do not fit.
pub fn scan_pairs_avx512(
    table: &super::PairTable,
    xs: &[f32],
    factors: &[f32],
    out: &mut [(f32, f32)],
) -> bool {
    let side = table.side;
    let fits = side.is_power_of_two()
        && table.points.len() == side * side
        && side <= 1 << 15
        && out.len() >= factors.len()
        && xs.len().is_multiple_of(16);
    if !fits || !avx512_available() {
        return false;
    }
    // Any byte is below code_points.len() >= 256.
    let byte_codes_fit = table.codes.len() == side * side + 3 && table.code_points.len() >= 256;
    if byte_codes_fit {
        // SAFETY: AVX-512F is available; every cell index the kernel forms is below side²,
        // so its 4-byte read ends inside `codes` (side² + 3 bytes), and every byte is below
        // code_points.len() (checked above); `xs` is whole blocks of 16.
        unsafe { scan_pairs_codes(&table.codes, &table.code_points, side, xs, factors, out) };
        return true;
    }
    // SAFETY: AVX-512F is available; `points` has side² entries and every index the kernel
    // forms is k0 + k1·side with k0, k1 clamped to [0, side − 1]; `xs` is whole blocks of 16
    // (checked above).
    unsafe { scan_pairs(&table.points, side, xs, factors, out) };
    true
}

fn avx512_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Lanes j and j + width added, halving the width 16 → 8 → 4 → 2 → 1 (the reference's fold).
#[inline]
#[target_feature(enable = "avx512f")]
fn fold16(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let v8 = _mm256_add_ps(lo, hi);
    let v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps::<1>(v8));
    let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
    let v1 = _mm_add_ss(v2, _mm_shuffle_ps::<0b01_01_01_01>(v2, v2));
    _mm_cvtss_f32(v1)
}

#[target_feature(enable = "avx512f")]
unsafe fn scan_pairs(
    points: &[[f32; 2]],
    side: usize,
    xs: &[f32],
    factors: &[f32],
    out: &mut [(f32, f32)],
) {
    const { assert!(super::SCAN_LANES == 16) };
    let blocks = xs.len() / 16;
    let centre = _mm512_set1_ps((side / 2) as f32);
    let top = _mm512_set1_ps((side - 1) as f32);
    let zero = _mm512_setzero_ps();
    let low = _mm512_set1_epi64(0xFFFF_FFFF);
    let shift = _mm_cvtsi32_si128(side.trailing_zeros() as i32);
    let base = points.as_ptr().cast::<f64>();
    for (&a, o) in factors.iter().zip(out.iter_mut()) {
        let scale = _mm512_set1_ps(a);
        let mut dot = _mm512_setzero_ps();
        let mut norm = _mm512_setzero_ps();
        for b in 0..blocks {
            // SAFETY: elements b·16 .. b·16 + 16 are inside `xs` (b < blocks).
            let x = unsafe { _mm512_loadu_ps(xs.as_ptr().add(b * 16)) };
            let u = _mm512_add_ps(_mm512_mul_ps(x, scale), centre);
            let k = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(u, zero), top));
            // Pairs are (k0, k1) in the two halves of each 64-bit lane: index k0 + k1·side.
            let index = _mm512_add_epi64(
                _mm512_and_si512(k, low),
                _mm512_sll_epi64(_mm512_srli_epi64::<32>(k), shift),
            );
            // SAFETY: every index is below side² = points.len(), each entry 8 bytes.
            let q = _mm512_castpd_ps(unsafe { _mm512_i64gather_pd::<8>(index, base) });
            dot = _mm512_add_ps(dot, _mm512_mul_ps(x, q));
            norm = _mm512_add_ps(norm, _mm512_mul_ps(q, q));
        }
        *o = (fold16(dot), fold16(norm));
    }
}

/// [`scan_pairs`] through the byte table of codes: cell → code → point, with scalar loads (a
/// 64 KB byte table and 256 points stay in L1; vector gathers measured slower on Zen 4).
#[target_feature(enable = "avx512f")]
unsafe fn scan_pairs_codes(
    codes: &[u8],
    code_points: &[[f32; 2]],
    side: usize,
    xs: &[f32],
    factors: &[f32],
    out: &mut [(f32, f32)],
) {
    const { assert!(super::SCAN_LANES == 16) };
    let blocks = xs.len() / 16;
    let centre = _mm512_set1_ps((side / 2) as f32);
    let top = _mm512_set1_ps((side - 1) as f32);
    let zero = _mm512_setzero_ps();
    let low = _mm512_set1_epi64(0xFFFF_FFFF);
    let shift = _mm_cvtsi32_si128(side.trailing_zeros() as i32);
    let code_base = codes.as_ptr();
    let point_base = code_points.as_ptr().cast::<f64>();
    for (&a, o) in factors.iter().zip(out.iter_mut()) {
        let scale = _mm512_set1_ps(a);
        let mut dot = _mm512_setzero_ps();
        let mut norm = _mm512_setzero_ps();
        for b in 0..blocks {
            // SAFETY: elements b·16 .. b·16 + 16 are inside `xs` (b < blocks).
            let x = unsafe { _mm512_loadu_ps(xs.as_ptr().add(b * 16)) };
            let u = _mm512_add_ps(_mm512_mul_ps(x, scale), centre);
            let k = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(u, zero), top));
            let index = _mm512_add_epi64(
                _mm512_and_si512(k, low),
                _mm512_sll_epi64(_mm512_srli_epi64::<32>(k), shift),
            );
            let mut cells = [0u64; 8];
            // SAFETY: `cells` holds 8 u64.
            unsafe { _mm512_storeu_si512(cells.as_mut_ptr().cast(), index) };
            // SAFETY: every cell is below side² <= codes.len(), every byte below
            // code_points.len() (caller).
            let q = unsafe {
                let load = |l: usize| {
                    let code = *code_base.add(*cells.get_unchecked(l) as usize);
                    *point_base.add(code as usize)
                };
                _mm512_castpd_ps(_mm512_setr_pd(
                    load(0),
                    load(1),
                    load(2),
                    load(3),
                    load(4),
                    load(5),
                    load(6),
                    load(7),
                ))
            };
            dot = _mm512_add_ps(dot, _mm512_mul_ps(x, q));
            norm = _mm512_add_ps(norm, _mm512_mul_ps(q, q));
        }
        *o = (fold16(dot), fold16(norm));
    }
}

/// p = 2 with AVX-512: [`super::Assigner::assign_stats`] for every group of `group_pairs`
/// consecutive pairs of `xs` (the last group may be shorter), each group's sums into `out`,
/// bit-identical to one `assign_stats` call per group. Four pairs per register against the
/// 4-candidate cell records, the lowest index at the minimum picked by vector min, so no
/// per-pair scalar work. `None` (and nothing done) without AVX-512F or when the tables or
/// lengths do not fit.
pub fn assign_pairs_groups_avx512(
    search: &CellSearch,
    grid: &Grid,
    xs: &[f32],
    group_pairs: usize,
    codes: &mut [u32],
    out: &mut [AssignStats],
) -> Option<()> {
    let fits = search.p == 2
        && search.quads.len() == (search.chunk_offsets.len() - 1) * QUAD_WORDS
        && grid.points.len() == 2 * grid.n
        && grid.n <= super::QUAD_STATS_MAX_N
        && xs.len() == 2 * codes.len()
        && group_pairs > 0
        && out.len() == codes.len().div_ceil(group_pairs);
    if !fits || !avx512_available() {
        return None;
    }
    for ((group, group_codes), o) in xs
        .chunks(2 * group_pairs)
        .zip(codes.chunks_mut(group_pairs))
        .zip(out.iter_mut())
    {
        // SAFETY: AVX-512F is available; `quads` has QUAD_WORDS words per cell; every code the
        // search writes is below n and `points` holds 2·n floats, n <= 2^20 (all checked
        // above), which is what the loads and gathers of `pairs_group` rely on; the group
        // holds 2 floats per code (chunks of 2·group_pairs and group_pairs).
        *o = unsafe { pairs_group(search, grid, group, group_codes) };
    }
    Some(())
}

/// One group of [`assign_pairs_groups_avx512`]: blocks of 8 pairs (16 floats, interleaved),
/// then the tail pairs by the scalar path. Tuple t of the group adds into accumulator t mod 8.
///
/// A register holds 4 pairs × their cell's 4 candidates. Each lane's key is its candidate's
/// index · 4 + its lane in the group: the least key among the lanes at the minimum distance
/// names the lowest index there (the reference's answer) and the lane holding its point, so
/// the sums need no gather: the error term is the minimum distance itself (the reference
/// computes the same (x0 − g0)² + (x1 − g1)²), the point comes from a permute.
///
/// # Safety
/// AVX-512F; the contract checked by [`assign_pairs_groups_avx512`]; `xs.len() == 2·codes.len()`.
#[target_feature(enable = "avx512f,avx2")]
unsafe fn pairs_group(
    search: &CellSearch,
    grid: &Grid,
    xs: &[f32],
    codes: &mut [u32],
) -> AssignStats {
    let quads = search.quads.as_ptr();
    let offset = _mm512_set1_ps(search.half_width);
    let scale = _mm512_set1_ps(search.inv_width);
    let far = _mm512_set1_ps(search.far);
    let top = _mm512_set1_ps((search.cells_per_axis - 1) as f32);
    let zero = _mm512_setzero_ps();
    let low = _mm512_set1_epi64(0xFFFF_FFFF);
    let shift = _mm_cvtsi32_si128(search.cells_per_axis.trailing_zeros() as i32);
    let overflow = _mm512_set1_epi32(QUAD_OVERFLOW as i32);
    let none = _mm512_set1_epi32(-1);
    let lane_in_group = _mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
    let group_base = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
    // Lane l of register half h reads pair 4h + l/4: its first coordinate at 2(4h + l/4).
    let first_of = [
        _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6),
        _mm512_setr_epi32(8, 8, 8, 8, 10, 10, 10, 10, 12, 12, 12, 12, 14, 14, 14, 14),
    ];
    let one = _mm512_set1_epi32(1);
    let second_of = [
        _mm512_add_epi32(first_of[0], one),
        _mm512_add_epi32(first_of[1], one),
    ];
    // Lane 0 of each 4-lane group of two registers: the 8 codes in pair order.
    let collect = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0);
    // Per half, the 4 lanes of group j hold accumulator 4h + j.
    let mut acc = [[zero; 3]; 2];
    let blocks = codes.len() / 8;
    for b in 0..blocks {
        let x = &xs[b * 16..b * 16 + 16];
        let out = &mut codes[b * 8..b * 8 + 8];
        // SAFETY: `x` holds 16 floats.
        let v = unsafe { _mm512_loadu_ps(x.as_ptr()) };
        let inside = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_abs_ps(v), far);
        if inside != 0xFFFF {
            // Some input is beyond ±far or NaN: this block goes through the scalar path.
            acc = scalar_block(search, grid, x, out, acc);
            continue;
        }
        // Same arithmetic as `CellSearch::cell_of`: (v + half_width) · inv_width, clamped.
        let u = _mm512_mul_ps(_mm512_add_ps(v, offset), scale);
        let k = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(u, zero), top));
        // Pairs are (k0, k1) in the two halves of each 64-bit lane: cell k0 + k1·side.
        let cells64 = _mm512_add_epi64(
            _mm512_and_si512(k, low),
            _mm512_sll_epi64(_mm512_srli_epi64::<32>(k), shift),
        );
        let mut cell = [0u32; 8];
        // SAFETY: `cell` is 32 bytes.
        unsafe { _mm256_storeu_si256(cell.as_mut_ptr().cast(), _mm512_cvtepi64_epi32(cells64)) };
        let mut best = [_mm512_setzero_si512(); 2];
        let mut terms = [[zero; 3]; 2];
        let mut flagged = 0u32;
        for h in 0..2 {
            // SAFETY: cell indices are clamped to [0, cells_per_axis − 1] per axis, so they
            // are below the cell count, and `quads` has QUAD_WORDS words per cell: x's at
            // 0..4, y's at 4..8, indices at 8..12.
            let (gx, gy, gi) = unsafe {
                let q = |j: usize| quads.add(cell[4 * h + j] as usize * QUAD_WORDS);
                let row = |w: usize| {
                    let r = _mm512_castsi128_si512(_mm_loadu_si128(q(0).add(w).cast()));
                    let r = _mm512_inserti32x4::<1>(r, _mm_loadu_si128(q(1).add(w).cast()));
                    let r = _mm512_inserti32x4::<2>(r, _mm_loadu_si128(q(2).add(w).cast()));
                    _mm512_inserti32x4::<3>(r, _mm_loadu_si128(q(3).add(w).cast()))
                };
                (
                    _mm512_castsi512_ps(row(0)),
                    _mm512_castsi512_ps(row(4)),
                    row(8),
                )
            };
            let xb = _mm512_permutexvar_ps(first_of[h], v);
            let yb = _mm512_permutexvar_ps(second_of[h], v);
            let dx = _mm512_sub_ps(gx, xb);
            let dy = _mm512_sub_ps(gy, yb);
            let d = _mm512_add_ps(_mm512_mul_ps(dx, dx), _mm512_mul_ps(dy, dy));
            let m = _mm512_min_ps(d, _mm512_permute_ps::<0b01_00_11_10>(d));
            let m = _mm512_min_ps(m, _mm512_permute_ps::<0b10_11_00_01>(m));
            // Distances are finite, so each group of 4 has lanes at its minimum. Shifting the
            // index left by 2 drops the overflow flag (bit 31; indices are below 2^20).
            let at_min = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(d, m);
            let key = _mm512_or_si512(_mm512_slli_epi32::<2>(gi), lane_in_group);
            let key = _mm512_mask_mov_epi32(none, at_min, key);
            let key = _mm512_min_epu32(key, _mm512_shuffle_epi32::<0b01_00_11_10>(key));
            let key = _mm512_min_epu32(key, _mm512_shuffle_epi32::<0b10_11_00_01>(key));
            best[h] = _mm512_srli_epi32::<2>(key);
            // The winner's lane: key's low 2 bits, with group_base's others (0xCA: a ? b : c).
            let lane = _mm512_ternarylogic_epi32::<0xCA>(_mm512_set1_epi32(3), key, group_base);
            let qx = _mm512_permutexvar_ps(lane, gx);
            let qy = _mm512_permutexvar_ps(lane, gy);
            // The reference's order per pair: err (x0 − g0)² + (x1 − g1)² (= m, squares of
            // negated differences), dot x0·g0 + x1·g1, norm g0² + g1².
            let dot = _mm512_add_ps(_mm512_mul_ps(xb, qx), _mm512_mul_ps(yb, qy));
            let norm = _mm512_add_ps(_mm512_mul_ps(qx, qx), _mm512_mul_ps(qy, qy));
            terms[h] = [m, dot, norm];
            flagged |= (_mm512_test_epi32_mask(gi, overflow) as u32) << (16 * h);
        }
        if flagged != 0 {
            // A cell whose list is longer than 4 (rare for Gaussian inputs): the scalar path.
            acc = scalar_block(search, grid, x, out, acc);
            continue;
        }
        let found = _mm512_castsi512_si256(_mm512_permutex2var_epi32(best[0], collect, best[1]));
        // SAFETY: `out` holds 8 u32.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), found) };
        for (a, t) in acc.iter_mut().zip(&terms) {
            for (a, &t) in a.iter_mut().zip(t) {
                *a = _mm512_add_ps(*a, t);
            }
        }
    }
    // Lane 4j of half h holds accumulator 4h + j.
    let mut sums = [[0f32; 8]; 3];
    for (h, half) in acc.iter().enumerate() {
        for (which, r) in half.iter().enumerate() {
            let mut lanes = [0f32; 16];
            // SAFETY: `lanes` is 16 f32.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *r) };
            for j in 0..4 {
                sums[which][4 * h + j] = lanes[4 * j];
            }
        }
    }
    let done = blocks * 8;
    search.assign_scalar_p::<2>(grid, &xs[done * 2..], &mut codes[done..]);
    for (t, (x, &c)) in xs[done * 2..]
        .chunks_exact(2)
        .zip(&codes[done..])
        .enumerate()
    {
        // Tuple done + t goes to accumulator t mod 8 (done is a multiple of 8).
        add_terms(&mut sums, t % 8, x, grid.point(c as usize));
    }
    fold_stats(&sums)
}

/// One block of 8 pairs of [`pairs_group`] by the scalar path, its sums added into the lanes of
/// `acc` (accumulator 4h + j in the 4 lanes of group j of half h) with the same arithmetic.
#[cold]
#[inline(never)]
#[target_feature(enable = "avx512f")]
fn scalar_block(
    search: &CellSearch,
    grid: &Grid,
    x: &[f32],
    out: &mut [u32],
    mut acc: [[__m512; 3]; 2],
) -> [[__m512; 3]; 2] {
    search.assign_scalar_p::<2>(grid, x, out);
    let mut lanes = [[[0f32; 16]; 3]; 2];
    for (l, a) in lanes.iter_mut().zip(acc.iter()) {
        for (l, a) in l.iter_mut().zip(a) {
            // SAFETY: 16 f32.
            unsafe { _mm512_storeu_ps(l.as_mut_ptr(), *a) };
        }
    }
    for t in 0..8 {
        let (h, j) = (t / 4, t % 4);
        let mut one = [[0f32; 8]; 3];
        for (o, l) in one.iter_mut().zip(&lanes[h]) {
            o[0] = l[4 * j];
        }
        add_terms(
            &mut one,
            0,
            &x[2 * t..2 * t + 2],
            grid.point(out[t] as usize),
        );
        for (o, l) in one.iter().zip(lanes[h].iter_mut()) {
            l[4 * j..4 * j + 4].fill(o[0]);
        }
    }
    for (l, a) in lanes.iter().zip(acc.iter_mut()) {
        for (l, a) in l.iter().zip(a.iter_mut()) {
            // SAFETY: 16 f32.
            *a = unsafe { _mm512_loadu_ps(l.as_ptr()) };
        }
    }
    acc
}

/// Runs `work` inside a function compiled with AVX-512 (F, BW, DQ, VL) and AVX2 enabled, so
/// the plain Rust it inlines (its `#[inline(always)]` `run` and callees) is vectorized with
/// those registers; `Err(work)` (nothing run) when the CPU lacks them. Results do not change:
/// Rust never contracts or reassociates float arithmetic, whatever the target features.
pub fn with_avx512<W: super::WideWork>(work: W) -> Result<W::Output, W> {
    if !avx512_wide_available() {
        return Err(work);
    }
    // SAFETY: the CPU supports every feature `run_avx512` enables (checked above).
    Ok(unsafe { run_avx512(work) })
}

fn avx512_wide_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx2")
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2")]
fn run_avx512<W: super::WideWork>(work: W) -> W::Output {
    work.run()
}
