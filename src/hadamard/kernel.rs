//! The SIMD algorithm, written once over a register of `LANES` f32 values ([`Vector`]).
//! Each instruction-set file implements [`Vector`] with `#[inline(always)]` methods and wraps
//! [`transform`] in one `#[target_feature]` entry point, so everything below is compiled
//! (inlined) with that instruction set enabled.
//!
//! - Power-of-two part: a first pass transforms each run of up to `MAX_RADIX` registers
//!   entirely in registers (lane shuffles, then butterflies between registers); the remaining
//!   stages go in radix-16/8/4/2 passes over larger strides. The scale rides on the last pass.
//! - Paley factors: a dense `P×P` matrix (P = 12, 20, 28) applied across P sub-vectors,
//!   one register of columns at a time.
//! - Power-of-two parts `L` shorter than a register but at least a quarter of one: a register
//!   holds `G = LANES/L` sub-vectors (G divides P); the fast Paley factor multiplies broadcast
//!   sub-vectors by per-lane coefficients, then the in-lane stages of `S_L` finish each output
//!   register (the two factors commute), in one pass.
//! - Shorter still (L = 1, 2 on 8 or 16 lanes): `H_fast ⊗ S_L` as one dense matrix,
//!   broadcast-multiply-accumulate over four rows at a time.

use super::{scalar, DenseStage, MixStage, Plan};

/// One SIMD register of f32 lanes and the operations the transforms need.
///
/// # Safety (all methods)
/// The CPU supports the instruction set of the implementation; pointers are valid for
/// `LANES` consecutive f32 values (no alignment required).
pub(super) trait Vector {
    const LANES: usize;
    /// Registers one in-register pass may hold (half the register file).
    const MAX_RADIX: usize;
    type V: Copy;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c`.
    unsafe fn mul_add(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The unnormalized Sylvester transform across the lanes of one register.
    unsafe fn hadamard_lanes(v: Self::V) -> Self::V;
    /// The Sylvester stages of distance below `L` (a power of two <= LANES): `S_L` on each
    /// run of `L` lanes.
    unsafe fn hadamard_lanes_below<const L: usize>(v: Self::V) -> Self::V;
    /// `p[0..L]` repeated across the register (`L` a power of two below LANES).
    unsafe fn broadcast_run<const L: usize>(p: *const f32) -> Self::V;
}

/// Largest dense stage: a Paley factor of 28 times a power-of-two part below `DENSE_BELOW`.
const MAX_DENSE_SIZE: usize = 28 * (super::DENSE_BELOW / 2);

/// Apply `plan` to every block of `data`.
///
/// # Safety
/// The CPU supports `S`'s instruction set, and `data.len()` is a multiple of `plan.order`.
#[inline(always)]
pub(super) unsafe fn transform<S: Vector>(data: &mut [f32], plan: &Plan) {
    debug_assert!(data.len().is_multiple_of(plan.order));
    // All stages run on one cache-sized chunk of whole blocks before the next chunk, so the
    // data crosses the memory bus once however many stages there are.
    let chunk = plan.order * (CHUNK_VALUES / plan.order).max(1);
    for part in data.chunks_mut(chunk) {
        // SAFETY: the caller's contract; each part is a whole number of blocks.
        unsafe { transform_chunk::<S>(part, plan) };
    }
}

/// Values (f32) per chunk: 32 KiB, an L1 data cache.
const CHUNK_VALUES: usize = 8192;

/// # Safety
/// As [`transform`].
#[inline(always)]
unsafe fn transform_chunk<S: Vector>(data: &mut [f32], plan: &Plan) {
    let lanes = S::LANES;
    if plan.stages.is_empty() {
        if plan.pow2 >= lanes {
            // SAFETY: the caller's contract; pow2 is a power of two >= LANES dividing data.len().
            unsafe { fwht_blocks::<S>(data, plan.pow2, Some(plan.scale)) };
        } else {
            // Orders below one register: nothing to vectorize.
            scalar::transform(data, plan);
        }
        return;
    }
    let last = plan.stages.len() - 1;
    if plan.pow2 >= lanes {
        // SAFETY: the caller's contract; pow2 is a power of two >= LANES dividing data.len().
        unsafe { fwht_blocks::<S>(data, plan.pow2, None) };
        for (i, stage) in plan.stages.iter().enumerate() {
            let scale = (i == last).then_some(plan.scale);
            // SAFETY: the caller's contract; size·inner divides plan.order.
            unsafe { mix::<S>(data, stage, scale) };
        }
        return;
    }
    if plan.pow2 * 4 >= lanes {
        let fast = &plan.stages[0];
        // SAFETY: the caller's contract; LANES/pow2 <= 4 divides the Paley size (a multiple
        // of 4), and the coefficients are laid out for LANES.
        unsafe { mix_short::<S>(data, plan.short_mix(lanes), fast.size, plan.pow2) };
    } else if let Some(dense) = &plan.dense {
        // SAFETY: the caller's contract; dense.size divides plan.order.
        unsafe { dense_rows::<S>(data, dense) };
    } else {
        debug_assert!(
            false,
            "plans carry a dense stage for power-of-two parts below 4"
        );
        scalar::transform(data, plan);
        return;
    }
    for stage in &plan.stages[1..] {
        // SAFETY: the caller's contract; size·inner divides plan.order.
        unsafe { mix::<S>(data, stage, Some(plan.scale)) };
    }
}

/// Unnormalized transforms of every contiguous block of `len` values, times `scale` if given.
///
/// # Safety
/// CPU support for `S`; `len` a power of two, `len >= S::LANES`, `data.len()` a multiple of `len`.
#[inline(always)]
unsafe fn fwht_blocks<S: Vector>(data: &mut [f32], len: usize, scale: Option<f32>) {
    let lanes = S::LANES;
    let vectors = len / lanes;
    let first = vectors.min(S::MAX_RADIX);
    let later_stages = (vectors / first).trailing_zeros();
    let blocks = data.len() / len;
    let ptr = data.as_mut_ptr();
    for b in 0..blocks {
        // SAFETY: block b spans ptr[b·len .. (b+1)·len], inside data.
        let block = unsafe { ptr.add(b * len) };
        let first_scale = if later_stages == 0 { scale } else { None };
        // SAFETY: `block` holds `len` values, a multiple of first·LANES; CPU support for `S`.
        unsafe {
            match first {
                1 => first_pass::<S, 1>(block, len, first_scale),
                2 => first_pass::<S, 2>(block, len, first_scale),
                4 => first_pass::<S, 4>(block, len, first_scale),
                8 => first_pass::<S, 8>(block, len, first_scale),
                _ => first_pass::<S, 16>(block, len, first_scale),
            }
        }
        let mut stride = first * lanes;
        let mut left = later_stages;
        while left > 0 {
            // The largest radix, but never leave a lone radix-2 pass behind (5 = 3 + 2).
            let max_log = S::MAX_RADIX.trailing_zeros();
            let radix_log = if left <= max_log {
                left
            } else if left == max_log + 1 {
                left - 2
            } else {
                max_log
            };
            let pass_scale = if left == radix_log { scale } else { None };
            // SAFETY: stride·2^radix_log divides len, stride is a multiple of LANES.
            unsafe {
                match radix_log {
                    1 => pass::<S, 2>(block, len, stride, pass_scale),
                    2 => pass::<S, 4>(block, len, stride, pass_scale),
                    3 => pass::<S, 8>(block, len, stride, pass_scale),
                    _ => pass::<S, 16>(block, len, stride, pass_scale),
                }
            }
            stride <<= radix_log;
            left -= radix_log;
        }
    }
}

/// In-register butterflies between `R` registers: every stage of a transform of size R.
///
/// # Safety
/// CPU support for `S`.
#[inline(always)]
unsafe fn butterflies<S: Vector, const R: usize>(v: &mut [S::V; R]) {
    let mut half = 1;
    while half < R {
        let mut start = 0;
        while start < R {
            for u in start..start + half {
                let (a, b) = (v[u], v[u + half]);
                // SAFETY: CPU support for `S` (caller).
                unsafe {
                    v[u] = S::add(a, b);
                    v[u + half] = S::sub(a, b);
                }
            }
            start += 2 * half;
        }
        half *= 2;
    }
}

/// # Safety
/// CPU support for `S`.
#[inline(always)]
unsafe fn scale_all<S: Vector, const R: usize>(v: &mut [S::V; R], scale: Option<S::V>) {
    if let Some(s) = scale {
        for x in v.iter_mut() {
            // SAFETY: CPU support for `S` (caller).
            *x = unsafe { S::mul(*x, s) };
        }
    }
}

/// The first `log2(C·LANES)` stages of a block of `len` values, `C` registers at a time.
///
/// # Safety
/// CPU support for `S`; `block` valid for `len` values, `len` a multiple of `C·LANES`.
#[inline(always)]
unsafe fn first_pass<S: Vector, const C: usize>(block: *mut f32, len: usize, scale: Option<f32>) {
    let lanes = S::LANES;
    // SAFETY: CPU support for `S` (caller).
    let scale = scale.map(|s| unsafe { S::splat(s) });
    // SAFETY (whole loop): CPU support for `S`; every address is below base + C·LANES <= len.
    unsafe {
        let mut v = [S::splat(0.0); C];
        let mut base = 0;
        while base < len {
            for (t, x) in v.iter_mut().enumerate() {
                *x = S::hadamard_lanes(S::load(block.add(base + t * lanes)));
            }
            butterflies::<S, C>(&mut v);
            scale_all::<S, C>(&mut v, scale);
            for (t, x) in v.iter().enumerate() {
                S::store(block.add(base + t * lanes), *x);
            }
            base += C * lanes;
        }
    }
}

/// Stages with distances `stride, 2·stride, …, (R/2)·stride` of a block of `len` values.
///
/// # Safety
/// CPU support for `S`; `block` valid for `len` values; `R·stride` divides `len`;
/// `stride` a multiple of `LANES`.
#[inline(always)]
unsafe fn pass<S: Vector, const R: usize>(
    block: *mut f32,
    len: usize,
    stride: usize,
    scale: Option<f32>,
) {
    let lanes = S::LANES;
    // SAFETY: CPU support for `S` (caller).
    let scale = scale.map(|s| unsafe { S::splat(s) });
    // SAFETY (whole loop): CPU support for `S`; addresses base + j + t·stride + LANES - 1
    // < base + R·stride <= len.
    unsafe {
        let mut v = [S::splat(0.0); R];
        let mut base = 0;
        while base < len {
            let mut j = 0;
            while j < stride {
                let p = block.add(base + j);
                for (t, x) in v.iter_mut().enumerate() {
                    *x = S::load(p.add(t * stride));
                }
                butterflies::<S, R>(&mut v);
                scale_all::<S, R>(&mut v, scale);
                for (t, x) in v.iter().enumerate() {
                    S::store(p.add(t * stride), *x);
                }
                j += lanes;
            }
            base += R * stride;
        }
    }
}

/// A Paley factor: in each group of `size·inner` values, sub-vector `i` becomes
/// `Σ_j M[i][j] · sub-vector j` (`M` the stage's matrix, times `scale` if given).
///
/// # Safety
/// CPU support for `S`; `data.len()` a multiple of `stage.size·stage.inner`.
#[inline(always)]
unsafe fn mix<S: Vector>(data: &mut [f32], stage: &MixStage, scale: Option<f32>) {
    // SAFETY: the caller's contract, with P = stage.size.
    unsafe {
        match stage.size {
            12 => mix_sized::<S, 12>(data, stage, scale),
            20 => mix_sized::<S, 20>(data, stage, scale),
            28 => mix_sized::<S, 28>(data, stage, scale),
            _ => {
                let matrix = if scale.is_some() {
                    &stage.scaled
                } else {
                    &stage.matrix
                };
                scalar::mix(data, matrix, stage.size, stage.inner)
            }
        }
    }
}

/// # Safety
/// As [`mix`] with `stage.size = P`.
#[inline(always)]
unsafe fn mix_sized<S: Vector, const P: usize>(
    data: &mut [f32],
    stage: &MixStage,
    scale: Option<f32>,
) {
    let lanes = S::LANES;
    let inner = stage.inner;
    let full = inner / lanes * lanes;
    let group_len = P * inner;
    let groups = data.len() / group_len;
    let ptr = data.as_mut_ptr();
    // SAFETY (whole loop): CPU support for `S`; group g spans ptr[g·P·inner ..][.. P·inner],
    // columns col..col+LANES <= full <= inner. All inputs of a column are loaded before its
    // outputs are stored.
    unsafe {
        // Scratch registers live across the loop: a fresh array per column would be zeroed
        // (memset) each time.
        let mut x = [S::splat(0.0); P];
        let mut sums = [S::splat(0.0); 14];
        let mut differences = [S::splat(0.0); 14];
        for g in 0..groups {
            let gp = ptr.add(g * group_len);
            let mut col = 0;
            while col < full {
                for (j, xj) in x.iter_mut().enumerate() {
                    *xj = S::load(gp.add(j * inner + col));
                }
                let out = gp.add(col);
                match P {
                    12 => paley_one::<S, P, 11, 5>(
                        &x,
                        &NEIGHBOURS_11,
                        stage.transpose,
                        scale,
                        out,
                        inner,
                    ),
                    20 => paley_one::<S, P, 19, 9>(
                        &x,
                        &NEIGHBOURS_19,
                        stage.transpose,
                        scale,
                        out,
                        inner,
                    ),
                    // Symmetric: its own transpose.
                    _ => paley_two::<S, P>(&x, &mut sums, &mut differences, scale, out, inner),
                }
                col += lanes;
            }
        }
    }
    if full < inner {
        let matrix = if scale.is_some() {
            &stage.scaled
        } else {
            &stage.matrix
        };
        scalar::mix_columns(data, matrix, P, inner, full);
    }
}

/// For prime `Q`: row `i` lists `1 + (i + r) mod Q` over the quadratic residues `r` (the
/// nonzero squares mod `Q`), i.e. the positions of the +1 entries of row `i` of the Jacobsthal
/// matrix `Q[i][j] = χ(j − i)`, offset by the leading infinity index.
const fn residue_neighbours<const Q: usize, const K: usize>() -> [[usize; K]; Q] {
    let mut is_residue = [false; Q];
    let mut x = 1;
    while x < Q {
        is_residue[x * x % Q] = true;
        x += 1;
    }
    let mut residues = [0usize; K];
    let (mut k, mut r) = (0, 1);
    while r < Q {
        if is_residue[r] {
            residues[k] = r;
            k += 1;
        }
        r += 1;
    }
    assert!(k == K, "K must be (Q - 1) / 2");
    let mut table = [[0usize; K]; Q];
    let mut i = 0;
    while i < Q {
        let mut k = 0;
        while k < K {
            table[i][k] = 1 + (i + residues[k]) % Q;
            k += 1;
        }
        i += 1;
    }
    table
}

const NEIGHBOURS_11: [[usize; 5]; 11] = residue_neighbours::<11, 5>();
const NEIGHBOURS_19: [[usize; 9]; 19] = residue_neighbours::<19, 9>();
const NEIGHBOURS_13: [[usize; 6]; 13] = residue_neighbours::<13, 6>();

/// Sum of registers `x[first..last]`, two chains.
///
/// # Safety
/// CPU support for `S`; `last - first >= 2`.
#[inline(always)]
unsafe fn sum_range<S: Vector>(x: &[S::V], first: usize, last: usize) -> S::V {
    // SAFETY: CPU support for `S` (caller).
    unsafe {
        let (mut even, mut odd) = (x[first], x[first + 1]);
        let mut j = first + 2;
        while j + 1 < last {
            even = S::add(even, x[j]);
            odd = S::add(odd, x[j + 1]);
            j += 2;
        }
        if j < last {
            even = S::add(even, x[j]);
        }
        S::add(even, odd)
    }
}

/// Paley I of order `N = q + 1` (or its transpose) on `N` registers, times `scale` if given.
/// With `v = x[1..]`, `s = Σ v`, `t = x0 + s` and `P` the residue indicator (`Q = 2P − J + I`
/// on `v`, since `χ` is +1 on residues, −1 on the rest, 0 on the diagonal):
/// forward `y0 = t`, `y[1+i] = 2(v_i + (Pv)_i) − t`; transpose `y0 = x0 − s`,
/// `y[1+i] = t − 2(Pv)_i`. About `N·(K+2)` operations instead of `N²`. Output `i` is stored
/// at `out + i·stride`.
///
/// # Safety
/// CPU support for `S`; `neighbours` from [`residue_neighbours`] for `q = N − 1`; `out + i·stride`
/// valid for a register for every `i < N`.
#[inline(always)]
unsafe fn paley_one<S: Vector, const N: usize, const Q: usize, const K: usize>(
    x: &[S::V; N],
    neighbours: &[[usize; K]; Q],
    transpose: bool,
    scale: Option<f32>,
    out: *mut f32,
    stride: usize,
) {
    let sigma = scale.unwrap_or(1.0);
    // SAFETY: CPU support for `S` and valid outputs (caller); every index is below N.
    unsafe {
        let s = sum_range::<S>(x, 1, N);
        let t = S::add(x[0], s);
        if !transpose {
            let two = S::splat(2.0 * sigma);
            let minus_t = S::mul(t, S::splat(-sigma));
            S::store(out, S::mul(t, S::splat(sigma)));
            for (i, row) in neighbours.iter().enumerate() {
                let mut w = x[1 + i];
                for &j in row {
                    w = S::add(w, x[j]);
                }
                S::store(out.add((1 + i) * stride), S::mul_add(w, two, minus_t));
            }
        } else {
            let minus_two = S::splat(-2.0 * sigma);
            let ts = S::mul(t, S::splat(sigma));
            S::store(out, S::mul(S::sub(x[0], s), S::splat(sigma)));
            for (i, row) in neighbours.iter().enumerate() {
                let mut p = x[row[0]];
                for &j in &row[1..] {
                    p = S::add(p, x[j]);
                }
                S::store(out.add((1 + i) * stride), S::mul_add(p, minus_two, ts));
            }
        }
    }
}

/// Paley II of order 28 (q = 13) on 28 registers, times `scale` if given:
/// `H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]`. With `a = (x[2c] + x[2c+1])`,
/// `b = (x[2c] − x[2c+1])`: `y[2c] = (C a)_c + b_c`, `y[2c+1] = (C b)_c − a_c`. Output `i`
/// is stored at `out + i·stride`; `a` and `b` are scratch.
///
/// # Safety
/// CPU support for `S`; `N == 28`; `out + i·stride` valid for a register for every `i < N`.
#[inline(always)]
unsafe fn paley_two<S: Vector, const N: usize>(
    x: &[S::V; N],
    a: &mut [S::V; 14],
    b: &mut [S::V; 14],
    scale: Option<f32>,
    out: *mut f32,
    stride: usize,
) {
    const C: usize = 14;
    debug_assert_eq!(N, 2 * C);
    // SAFETY: CPU support for `S` and valid outputs (caller); every index is below N = 2·C.
    unsafe {
        for c in 0..C {
            a[c] = S::add(x[2 * c], x[2 * c + 1]);
            b[c] = S::sub(x[2 * c], x[2 * c + 1]);
        }
        conference_14::<S, false>(a, b, scale, out, 2 * stride);
        conference_14::<S, true>(b, a, scale, out.add(stride), 2 * stride);
    }
}

/// `(C a)_c ± extra_c` (minus when `SUBTRACT`), times `scale` if given, stored at
/// `out + c·stride`, for the symmetric conference matrix of order 14 (`C[0][1+j] = C[1+j][0]
/// = 1`, `C[1+i][1+j] = χ(j − i)` over GF(13)): `(Ca)_0 = s`,
/// `(Ca)_{1+i} = a_0 − s + a'_i + 2(Pa')_i` with `a' = a[1..]`, `s = Σ a'`.
///
/// # Safety
/// CPU support for `S`; `out + c·stride` valid for a register for every `c < 14`.
#[inline(always)]
unsafe fn conference_14<S: Vector, const SUBTRACT: bool>(
    a: &[S::V; 14],
    extra: &[S::V; 14],
    scale: Option<f32>,
    out: *mut f32,
    stride: usize,
) {
    // SAFETY: CPU support for `S` and valid outputs (caller); every index is below 14.
    unsafe {
        let finish = |v: S::V, e: S::V| {
            let v = if SUBTRACT { S::sub(v, e) } else { S::add(v, e) };
            match scale {
                Some(sigma) => S::mul(v, S::splat(sigma)),
                None => v,
            }
        };
        let s = sum_range::<S>(a, 1, 14);
        S::store(out, finish(s, extra[0]));
        let base = S::sub(a[0], s);
        let two = S::splat(2.0);
        for (i, row) in NEIGHBOURS_13.iter().enumerate() {
            let mut p = a[row[0]];
            for &j in &row[1..] {
                p = S::add(p, a[j]);
            }
            let v = S::mul_add(p, two, S::add(base, a[1 + i]));
            S::store(out.add((1 + i) * stride), finish(v, extra[1 + i]));
        }
    }
}

/// The fast Paley factor over sub-vectors of `len` values, `len` below a register but at least
/// a quarter of one, then `S_len` on each sub-vector; `coefficients` from `Plan::short_mix`.
///
/// # Safety
/// CPU support for `S`; `LANES / len` divides `size`; `data.len()` a multiple of `size·len`;
/// `coefficients.len() == size² · len`.
#[inline(always)]
unsafe fn mix_short<S: Vector>(data: &mut [f32], coefficients: &[f32], size: usize, len: usize) {
    // SAFETY: the caller's contract, with P = size and L = len.
    unsafe {
        match (size, len) {
            (12, 1) => mix_short_sized::<S, 12, 1>(data, coefficients),
            (12, 2) => mix_short_sized::<S, 12, 2>(data, coefficients),
            (12, 4) => mix_short_sized::<S, 12, 4>(data, coefficients),
            (12, 8) => mix_short_sized::<S, 12, 8>(data, coefficients),
            (20, 1) => mix_short_sized::<S, 20, 1>(data, coefficients),
            (20, 2) => mix_short_sized::<S, 20, 2>(data, coefficients),
            (20, 4) => mix_short_sized::<S, 20, 4>(data, coefficients),
            (20, 8) => mix_short_sized::<S, 20, 8>(data, coefficients),
            (28, 1) => mix_short_sized::<S, 28, 1>(data, coefficients),
            (28, 2) => mix_short_sized::<S, 28, 2>(data, coefficients),
            (28, 4) => mix_short_sized::<S, 28, 4>(data, coefficients),
            _ => mix_short_sized::<S, 28, 8>(data, coefficients),
        }
    }
}

/// # Safety
/// As [`mix_short`] with `size = P`, `len = L`.
#[inline(always)]
unsafe fn mix_short_sized<S: Vector, const P: usize, const L: usize>(
    data: &mut [f32],
    coefficients: &[f32],
) {
    let lanes = S::LANES;
    let outputs = P * L / lanes;
    debug_assert!(L < lanes && (P * L).is_multiple_of(lanes));
    debug_assert_eq!(coefficients.len(), outputs * P * lanes);
    let group_len = P * L;
    let groups = data.len() / group_len;
    let ptr = data.as_mut_ptr();
    let c = coefficients.as_ptr();
    // SAFETY (whole loop): CPU support for `S`; group g spans ptr[g·P·L ..][.. P·L], read as
    // P runs of L and written as `outputs` registers; coefficient indices
    // < outputs·P·LANES. All inputs are loaded before the group's first store.
    unsafe {
        let mut x = [S::splat(0.0); P];
        for g in 0..groups {
            let gp = ptr.add(g * group_len);
            for (j, xj) in x.iter_mut().enumerate() {
                *xj = S::broadcast_run::<L>(gp.add(j * L));
            }
            for t in 0..outputs {
                let ct = c.add(t * P * lanes);
                let mut even = S::mul(S::load(ct), x[0]);
                let mut odd = S::mul(S::load(ct.add(lanes)), x[1]);
                let mut j = 2;
                while j < P {
                    even = S::mul_add(S::load(ct.add(j * lanes)), x[j], even);
                    odd = S::mul_add(S::load(ct.add((j + 1) * lanes)), x[j + 1], odd);
                    j += 2;
                }
                let y = S::hadamard_lanes_below::<L>(S::add(even, odd));
                S::store(gp.add(t * lanes), y);
            }
        }
    }
}

/// Every contiguous row of `dense.size` values becomes `D · row`.
///
/// # Safety
/// CPU support for `S`; `data.len()` a multiple of `dense.size`.
#[inline(always)]
unsafe fn dense_rows<S: Vector>(data: &mut [f32], dense: &DenseStage) {
    let size = dense.size;
    debug_assert!(size <= MAX_DENSE_SIZE);
    let rows = data.len() / size;
    let ptr = data.as_mut_ptr();
    let mut out = [0f32; 4 * MAX_DENSE_SIZE];
    let mut r = 0;
    while r + 4 <= rows {
        // SAFETY: rows r..r+4 lie inside data; CPU support for `S`.
        unsafe { dense_group::<S, 4>(ptr.add(r * size), size, &dense.columns, &mut out) };
        r += 4;
    }
    while r < rows {
        // SAFETY: row r lies inside data; CPU support for `S`.
        unsafe { dense_group::<S, 1>(ptr.add(r * size), size, &dense.columns, &mut out) };
        r += 1;
    }
}

/// `ROWS` consecutive rows of `size` values at `x`, through the dense matrix (by columns).
///
/// # Safety
/// CPU support for `S`; `x` valid for `ROWS·size` values; `columns.len() == size²`;
/// `out.len() >= ROWS·size`.
#[inline(always)]
unsafe fn dense_group<S: Vector, const ROWS: usize>(
    x: *mut f32,
    size: usize,
    columns: &[f32],
    out: &mut [f32],
) {
    let lanes = S::LANES;
    let full = size / lanes * lanes;
    let cols = columns.as_ptr();
    let o = out.as_mut_ptr();
    // SAFETY (whole block): CPU support for `S`; x indices < ROWS·size; column indices
    // r·size + c + LANES - 1 < size²; out indices < ROWS·size.
    unsafe {
        let mut c = 0;
        while c < full {
            let mut acc = [S::splat(0.0); ROWS];
            for r in 0..size {
                let d = S::load(cols.add(r * size + c));
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = S::mul_add(S::splat(*x.add(k * size + r)), d, *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                S::store(o.add(k * size + c), *a);
            }
            c += lanes;
        }
        for k in 0..ROWS {
            for c in full..size {
                let mut sum = 0f32;
                for r in 0..size {
                    sum += *x.add(k * size + r) * *cols.add(r * size + c);
                }
                *o.add(k * size + c) = sum;
            }
        }
        std::ptr::copy_nonoverlapping(o, x, ROWS * size);
    }
}
