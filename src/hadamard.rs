//! Orthonormal fast Walsh–Hadamard transforms. PLACEHOLDER: interface only (helper fills it in).
use crate::Result;

/// Largest transform order supported.
pub const MAX_ORDER: usize = 32768;

/// True for orders m·2^k (m in {1, 12, 20, 28, 144, 240, 336, 400, 560, 784}), 2 <= n <= MAX_ORDER.
pub fn is_supported_order(_n: usize) -> bool {
    unimplemented!()
}

/// Largest supported order that divides `n` (None if none >= 2 does).
pub fn largest_supported_divisor(_n: usize) -> Option<usize> {
    unimplemented!()
}

/// In place, on each contiguous block of `order` values: x <- (H / sqrt(order)) x.
pub fn forward(_data: &mut [f32], _order: usize) -> Result<()> {
    unimplemented!()
}

/// The inverse of [`forward`] (the transpose: Paley factors are not symmetric).
pub fn inverse(_data: &mut [f32], _order: usize) -> Result<()> {
    unimplemented!()
}

/// Seeded ±1.0 signs, identical on every platform (SplitMix64, bit k of successive outputs).
pub fn random_signs(_seed: u64, _len: usize) -> Vec<f32> {
    unimplemented!()
}

/// Which implementation `forward` dispatches to on this machine: "avx512", "avx2", "neon" or "scalar".
pub fn simd_path() -> &'static str {
    unimplemented!()
}
