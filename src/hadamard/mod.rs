//! Orthonormal Hadamard transforms of orders m·2^k, in place, with SIMD dispatch.
//!
//! # The matrix (a checkpoint format depends on it: do not change)
//!
//! A supported order is `n = m·2^k`, `2 <= n <= MAX_ORDER`, with `m` in
//! {1, 12, 20, 28, 144, 240, 336, 400, 560, 784}. The transform of one block `x` of `n`
//! contiguous values is `x <- (H_n / sqrt(n)) x` with
//!
//! ```text
//! H_n = H_slow ⊗ H_fast ⊗ S_{2^k}
//! ```
//!
//! where `S_{2^k}` is the Sylvester matrix in natural order, `S[i][j] = (-1)^popcount(i & j)`,
//! and `H_slow`, `H_fast` are the Paley factors of `m` (either may be absent, i.e. 1×1):
//! 12 → (12), 20 → (20), 28 → (28), 144 → (12, 12), 240 → (12, 20), 336 → (12, 28),
//! 400 → (20, 20), 560 → (20, 28), 784 → (28, 28), listed as (slow, fast). So element
//! `i = (a_slow·m_fast + a_fast)·2^k + b` of a block: the power-of-two index `b` is the
//! fastest, a block is `m` contiguous sub-vectors of length `2^k`, and the Paley factors mix
//! those sub-vectors. [`dense_matrix`] builds `H_n` explicitly.
//!
//! Paley matrices (`q` prime, `χ` the quadratic character of GF(q), `χ(0) = 0`); index 0 is the
//! point at infinity and index `1 + x` the field element `x`:
//! - Paley I, `q ≡ 3 (mod 4)`, order `q + 1` (12 from q = 11, 20 from q = 19):
//!   `H = I + S`, `S[0][0] = 0`, `S[0][1+x] = 1`, `S[1+x][0] = -1`, `S[1+x][1+y] = χ(y - x)`.
//! - Paley II, `q ≡ 1 (mod 4)`, order `2(q + 1)` (28 from q = 13): `C` as `S` above but with
//!   `C[1+x][0] = +1` (symmetric conference matrix of order 14); entry `(2c + e, 2d + f)` is
//!   `C[c][d]·[[1, 1], [1, -1]][e][f]` where `C[c][d] != 0`, else `[[1, -1], [-1, -1]][e][f]`.
//!
//! [`inverse`] applies the transpose `H_nᵀ / sqrt(n)` (Paley I matrices are not symmetric).
//!
//! # Implementations
//!
//! `scalar` is the plain reference (dense Paley matrices, radix-2 butterflies); the SIMD paths
//! (`avx512`, `avx2`, `neon`) share one generic algorithm (`kernel`) and are tested against it:
//! - the data goes through in chunks of whole blocks of about 32 KiB, every stage on a chunk
//!   before the next, so it crosses the memory bus once;
//! - the power-of-two part: a first pass does all in-register stages (lane shuffles, then up
//!   to 8 or 16 registers), then radix-16/8/4/2 passes over larger strides;
//! - each Paley factor mixes its sub-vectors, vectorized along the contiguous axis, through
//!   the structure of the Paley matrix (quadratic-residue sums, about a third to a half of the
//!   operations of a dense product);
//! - when `2^k` is shorter than a register (but at least a quarter of one), a register holds
//!   several sub-vectors and the fast Paley factor multiplies broadcast sub-vectors by per-lane
//!   coefficients; below a quarter, `H_fast ⊗ S_{2^k}` is one dense matrix;
//! - the 1/sqrt(n) scale rides on the last stage.
//!
//! The path is chosen once per process by runtime CPU detection; the environment variable
//! `HIGGS_SIMD` (`scalar`, `avx2`, `avx512`, `neon`) forces a path the CPU supports, for tests
//! and benchmarks ([`forward_with`] picks one per call).
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod kernel;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;

use std::sync::OnceLock;

use crate::rng::SplitMix64;
use crate::{HiggsError, Result};

/// Largest transform order supported.
pub const MAX_ORDER: usize = 32768;

/// The non-power-of-two parts `m` of supported orders `m·2^k`.
pub const BASE_ORDERS: [usize; 10] = [1, 12, 20, 28, 144, 240, 336, 400, 560, 784];

/// The widest SIMD register in f32 lanes over all paths.
const WIDEST_LANES: usize = 16;
/// Below this power-of-two part a SIMD path applies `H_fast ⊗ S_{2^k}` as one dense matrix.
const DENSE_BELOW: usize = WIDEST_LANES / 4;

/// `(m, 2^k)` with `n = m·2^k` for a supported order, else None.
fn split_order(n: usize) -> Option<(usize, usize)> {
    if !(2..=MAX_ORDER).contains(&n) {
        return None;
    }
    // The odd parts of the base orders are distinct, so the odd part of n names m, and the
    // decomposition is unique. No divisions: this runs on every call.
    let twos = n.trailing_zeros();
    let m: usize = match n >> twos {
        1 => 1,
        3 => 12,
        5 => 20,
        7 => 28,
        9 => 144,
        15 => 240,
        21 => 336,
        25 => 400,
        35 => 560,
        49 => 784,
        _ => return None,
    };
    let m_twos = m.trailing_zeros();
    (twos >= m_twos).then(|| (m, 1 << (twos - m_twos)))
}

/// The Paley factors of a base order, slow index first.
fn paley_factors(m: usize) -> &'static [usize] {
    match m {
        12 => &[12],
        20 => &[20],
        28 => &[28],
        144 => &[12, 12],
        240 => &[12, 20],
        336 => &[12, 28],
        400 => &[20, 20],
        560 => &[20, 28],
        784 => &[28, 28],
        _ => &[],
    }
}

/// True for orders m·2^k (m in {1, 12, 20, 28, 144, 240, 336, 400, 560, 784}), 2 <= n <= MAX_ORDER.
pub fn is_supported_order(n: usize) -> bool {
    split_order(n).is_some()
}

/// Every supported order, ascending.
pub fn supported_orders() -> Vec<usize> {
    let mut orders: Vec<usize> = (2..=MAX_ORDER).filter(|&n| is_supported_order(n)).collect();
    orders.sort_unstable();
    orders
}

/// Largest supported order that divides `n` (None if none >= 2 does, and for n = 0).
pub fn largest_supported_divisor(n: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let mut best = None;
    for &m in &BASE_ORDERS {
        let mut order = m;
        while order <= MAX_ORDER {
            if order >= 2 && n.is_multiple_of(order) {
                best = best.max(Some(order));
            }
            order *= 2;
        }
    }
    best
}

/// Quadratic character of `a` modulo the prime `q`: 0, 1 (nonzero square) or -1.
fn quadratic_character(a: usize, q: usize) -> i8 {
    let a = a % q;
    if a == 0 {
        return 0;
    }
    if (1..q).any(|x| x * x % q == a) {
        1
    } else {
        -1
    }
}

/// The order-(q+1) core of both Paley constructions: `S` (Paley I, `antisymmetric`) or `C`.
fn paley_core(q: usize, antisymmetric: bool) -> Vec<i8> {
    let size = q + 1;
    let mut s = vec![0i8; size * size];
    for x in 0..q {
        s[1 + x] = 1;
        s[(1 + x) * size] = if antisymmetric { -1 } else { 1 };
        for y in 0..q {
            s[(1 + x) * size + 1 + y] = quadratic_character(y + q - x, q);
        }
    }
    s
}

/// The ±1 Paley Hadamard matrix of order 12, 20 or 28, row-major (see the module docs).
/// None for any other order.
pub fn paley_matrix(order: usize) -> Option<Vec<f32>> {
    matches!(order, 12 | 20 | 28).then(|| build_paley(order))
}

/// Paley I for orders 12 and 20, Paley II (q = order/2 - 1) for 28.
fn build_paley(order: usize) -> Vec<f32> {
    debug_assert!(matches!(order, 12 | 20 | 28));
    match order {
        12 | 20 => {
            let q = order - 1;
            let s = paley_core(q, true);
            let mut h: Vec<f32> = s.iter().map(|&v| v as f32).collect();
            for i in 0..order {
                h[i * order + i] += 1.0;
            }
            h
        }
        _ => {
            let q = order / 2 - 1;
            let core_size = q + 1;
            let c = paley_core(q, false);
            let mut h = vec![0f32; order * order];
            for row in 0..order {
                for col in 0..order {
                    let (cr, e) = (row / 2, row % 2);
                    let (cc, f) = (col / 2, col % 2);
                    let v = c[cr * core_size + cc] as f32;
                    h[row * order + col] = if v != 0.0 {
                        v * [[1.0, 1.0], [1.0, -1.0]][e][f]
                    } else {
                        [[1.0, -1.0], [-1.0, -1.0]][e][f]
                    };
                }
            }
            h
        }
    }
}

fn transpose(matrix: &[f32], size: usize) -> Vec<f32> {
    let mut t = vec![0f32; size * size];
    for i in 0..size {
        for j in 0..size {
            t[j * size + i] = matrix[i * size + j];
        }
    }
    t
}

/// Sylvester entry `(-1)^popcount(i & j)`.
fn sylvester(i: usize, j: usize) -> f32 {
    if (i & j).count_ones().is_multiple_of(2) {
        1.0
    } else {
        -1.0
    }
}

/// Largest order [`dense_matrix`] builds (its result has order² entries).
pub const MAX_DENSE_ORDER: usize = 4096;

/// The unnormalized ±1 matrix `H_n` of a supported order, row-major, built explicitly from its
/// Kronecker factors: the definition the fast transforms are tested against.
pub fn dense_matrix(order: usize) -> Result<Vec<f32>> {
    let (m, pow2) = split_order(order).ok_or_else(|| unsupported_order(order))?;
    if order > MAX_DENSE_ORDER {
        return Err(HiggsError::invalid(format!(
            "dense Hadamard matrix of order {order} has {} entries; at most order {MAX_DENSE_ORDER} is built",
            order * order
        )));
    }
    // Kronecker product, slow factor first: (A ⊗ B)[(i1, i2), (j1, j2)] = A[i1][j1] · B[i2][j2].
    let mut h = vec![1f32];
    let mut size = 1;
    let factors: Vec<(usize, Vec<f32>)> = paley_factors(m)
        .iter()
        .map(|&p| (p, build_paley(p)))
        .chain(std::iter::once((
            pow2,
            (0..pow2 * pow2)
                .map(|e| sylvester(e / pow2, e % pow2))
                .collect(),
        )))
        .collect();
    for (b_size, b) in &factors {
        let new_size = size * b_size;
        let mut k = vec![0f32; new_size * new_size];
        for i1 in 0..size {
            for j1 in 0..size {
                let a = h[i1 * size + j1];
                for i2 in 0..*b_size {
                    for j2 in 0..*b_size {
                        k[(i1 * b_size + i2) * new_size + j1 * b_size + j2] =
                            a * b[i2 * b_size + j2];
                    }
                }
            }
        }
        h = k;
        size = new_size;
    }
    debug_assert_eq!(size, order);
    Ok(h)
}

/// One Paley factor applied across `size` sub-vectors of length `inner`: within each group of
/// `size·inner` values, sub-vector `i` becomes `Σ_j matrix[i][j] · sub-vector j`.
pub(crate) struct MixStage {
    pub size: usize,
    pub inner: usize,
    /// ±1 entries, already transposed for the inverse.
    pub matrix: Vec<f32>,
    /// Whether `matrix` is the transposed Paley matrix (the inverse transform).
    pub transpose: bool,
    /// `matrix` times the plan's scale: used where this is the last stage.
    pub scaled: Vec<f32>,
}

/// `H_fast ⊗ S_{2^k}` as one dense matrix for short power-of-two parts, stored by columns
/// (`columns[r·size + c] = D[c][r]`) so a SIMD path broadcasts input `r` against a row.
pub(crate) struct DenseStage {
    pub size: usize,
    pub columns: Vec<f32>,
}

/// Everything a transform of one order and direction needs, built once per process.
pub(crate) struct Plan {
    pub order: usize,
    /// The power-of-two part `2^k`.
    pub pow2: usize,
    /// Paley stages in the order they are applied (fast factor first).
    pub stages: Vec<MixStage>,
    /// `1/sqrt(order)`.
    pub scale: f32,
    /// Present when `pow2 < DENSE_BELOW` and there is a Paley factor; it carries the scale
    /// when it is the last stage (one Paley factor).
    pub dense: Option<DenseStage>,
    /// Per register width (4, 8, 16 lanes), the fast Paley factor as per-lane coefficients for
    /// sub-vectors shorter than a register (see [`Plan::short_mix`]); built on first use.
    short_mix: [OnceLock<Vec<f32>>; 3],
}

impl Plan {
    fn new(m: usize, pow2: usize, inverse: bool) -> Plan {
        let order = m * pow2;
        let scale = (1.0 / (order as f64).sqrt()) as f32;
        let factors = paley_factors(m);
        let mut stages = Vec::new();
        let mut inner = pow2;
        for &p in factors.iter().rev() {
            let h = build_paley(p);
            let matrix = if inverse { transpose(&h, p) } else { h };
            let scaled = matrix.iter().map(|&v| v * scale).collect();
            stages.push(MixStage {
                size: p,
                inner,
                matrix,
                transpose: inverse,
                scaled,
            });
            inner *= p;
        }
        let dense = match stages.first() {
            Some(fast) if pow2 < DENSE_BELOW => {
                let size = fast.size * pow2;
                let factor = if stages.len() == 1 { scale } else { 1.0 };
                let mut columns = vec![0f32; size * size];
                for c in 0..size {
                    for r in 0..size {
                        columns[r * size + c] = fast.matrix[(c / pow2) * fast.size + r / pow2]
                            * sylvester(c % pow2, r % pow2)
                            * factor;
                    }
                }
                Some(DenseStage { size, columns })
            }
            _ => None,
        };
        Plan {
            order,
            pow2,
            stages,
            scale,
            dense,
            short_mix: [const { OnceLock::new() }; 3],
        }
    }

    /// The fast Paley factor `M` (size `P`, sub-vectors of `L = pow2` values) for registers of
    /// `lanes` lanes, `G = lanes / L` sub-vectors per register, `G` dividing `P`: output register
    /// `t` is `Σ_j C[t][j] ⊙ broadcast(sub-vector j)` with `C[t][j]` lane `g·L + b` equal to
    /// `M[t·G + g][j]` (times the scale when this is the last stage). Stored `C[t][j]` at
    /// `(t·P + j)·lanes`.
    pub fn short_mix(&self, lanes: usize) -> &[f32] {
        let slot = &self.short_mix[(lanes.trailing_zeros() as usize).saturating_sub(2).min(2)];
        slot.get_or_init(|| {
            let fast = &self.stages[0];
            let (size, len) = (fast.size, self.pow2);
            let per_register = lanes / len;
            debug_assert!(len < lanes && size % per_register == 0);
            let matrix = if self.stages.len() == 1 {
                &fast.scaled
            } else {
                &fast.matrix
            };
            let mut c = vec![0f32; size / per_register * size * lanes];
            for t in 0..size / per_register {
                for j in 0..size {
                    for lane in 0..lanes {
                        let g = lane / len;
                        c[(t * size + j) * lanes + lane] =
                            matrix[(t * per_register + g) * size + j];
                    }
                }
            }
            c
        })
    }
}

fn plan(order: usize, inverse: bool) -> Result<&'static Plan> {
    // One slot per (base order, power of two, direction): a lookup is one atomic load.
    const POW2_SLOTS: usize = MAX_ORDER.trailing_zeros() as usize + 1;
    static PLANS: [[[OnceLock<Plan>; POW2_SLOTS]; BASE_ORDERS.len()]; 2] =
        [const { [const { [const { OnceLock::new() }; POW2_SLOTS] }; BASE_ORDERS.len()] }; 2];
    let (m, pow2) = split_order(order).ok_or_else(|| unsupported_order(order))?;
    let base = BASE_ORDERS.iter().position(|&b| b == m).unwrap_or(0);
    let slot = &PLANS[inverse as usize][base][pow2.trailing_zeros() as usize];
    Ok(slot.get_or_init(|| Plan::new(m, pow2, inverse)))
}

fn unsupported_order(order: usize) -> HiggsError {
    HiggsError::invalid(format!(
        "Hadamard order {order} is not supported: use m·2^k with m in {{1, 12, 20, 28, 144, 240, 336, 400, 560, 784}}, 2 <= order <= {MAX_ORDER}"
    ))
}

/// An implementation of the transforms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimdPath {
    Scalar,
    Avx2,
    Avx512,
    Neon,
}

impl SimdPath {
    pub const ALL: [SimdPath; 4] = [
        SimdPath::Avx512,
        SimdPath::Avx2,
        SimdPath::Neon,
        SimdPath::Scalar,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Scalar => "scalar",
            SimdPath::Avx2 => "avx2",
            SimdPath::Avx512 => "avx512",
            SimdPath::Neon => "neon",
        }
    }

    pub fn from_name(name: &str) -> Option<SimdPath> {
        SimdPath::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            SimdPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            // NEON is part of the aarch64 baseline.
            #[cfg(target_arch = "aarch64")]
            SimdPath::Neon => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// The paths this CPU can run, fastest first (always ends with scalar).
pub fn available_paths() -> Vec<SimdPath> {
    SimdPath::ALL
        .into_iter()
        .filter(|p| p.is_available())
        .collect()
}

fn active_path() -> SimdPath {
    static ACTIVE: OnceLock<SimdPath> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let best = available_paths()[0];
        match std::env::var("HIGGS_SIMD") {
            Ok(name) if !name.trim().is_empty() => match SimdPath::from_name(&name) {
                Some(p) if p.is_available() => p,
                _ => {
                    eprintln!(
                        "higgs_rs: HIGGS_SIMD={name:?} is not a path this CPU runs (available: {}); using {}",
                        available_paths().iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
                        best.name()
                    );
                    best
                }
            },
            _ => best,
        }
    })
}

/// Which implementation `forward` dispatches to on this machine: "avx512", "avx2", "neon" or "scalar".
pub fn simd_path() -> &'static str {
    active_path().name()
}

/// In place, on each contiguous block of `order` values: x <- (H / sqrt(order)) x.
pub fn forward(data: &mut [f32], order: usize) -> Result<()> {
    transform_with(active_path(), data, order, false)
}

/// The inverse of [`forward`] (the transpose: Paley factors are not symmetric).
pub fn inverse(data: &mut [f32], order: usize) -> Result<()> {
    transform_with(active_path(), data, order, true)
}

/// [`forward`] through a chosen implementation (an error if this CPU cannot run it).
pub fn forward_with(path: SimdPath, data: &mut [f32], order: usize) -> Result<()> {
    transform_with(path, data, order, false)
}

/// [`inverse`] through a chosen implementation (an error if this CPU cannot run it).
pub fn inverse_with(path: SimdPath, data: &mut [f32], order: usize) -> Result<()> {
    transform_with(path, data, order, true)
}

fn transform_with(path: SimdPath, data: &mut [f32], order: usize, inverse: bool) -> Result<()> {
    let plan = plan(order, inverse)?;
    if !data.len().is_multiple_of(order) {
        return Err(HiggsError::invalid(format!(
            "Hadamard transform of order {order}: data length {} is not a multiple of {order}",
            data.len()
        )));
    }
    if !path.is_available() {
        return Err(HiggsError::Unsupported(format!(
            "Hadamard path {} is not available on this CPU (available: {})",
            path.name(),
            available_paths()
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if data.is_empty() {
        return Ok(());
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F was detected at run time (`path.is_available()` above), and
        // `data.len()` is a multiple of `plan.order` (checked above).
        SimdPath::Avx512 => unsafe { avx512::transform(data, plan) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected at run time (`path.is_available()` above), and
        // `data.len()` is a multiple of `plan.order` (checked above).
        SimdPath::Avx2 => unsafe { avx2::transform(data, plan) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is baseline on aarch64, and `data.len()` is a multiple of `plan.order`.
        SimdPath::Neon => unsafe { neon::transform(data, plan) },
        // Scalar, and (unreachable after the availability check) paths of other architectures.
        _ => scalar::transform(data, plan),
    }
    Ok(())
}

/// Seeded ±1.0 signs, identical on every platform: sign `i` is -1 where bit `i % 64` of
/// SplitMix64 output number `i / 64` (counting from 0) is 1.
pub fn random_signs(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(len);
    let mut bits = 0u64;
    for i in 0..len {
        if i % 64 == 0 {
            bits = rng.next_u64();
        }
        out.push(if (bits >> (i % 64)) & 1 == 1 {
            -1.0
        } else {
            1.0
        });
    }
    out
}

#[cfg(test)]
mod tests;
