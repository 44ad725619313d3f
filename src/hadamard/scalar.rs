//! The reference implementation: plain loops, no SIMD. The vector paths are tested against it.
#![forbid(unsafe_code)]

use super::Plan;

/// Apply the plan to every block of `data` (`data.len()` a multiple of `plan.order`).
pub(super) fn transform(data: &mut [f32], plan: &Plan) {
    for block in data.chunks_exact_mut(plan.order) {
        for sub in block.chunks_exact_mut(plan.pow2) {
            fwht(sub);
        }
        for stage in &plan.stages {
            mix(block, &stage.matrix, stage.size, stage.inner);
        }
        for x in block.iter_mut() {
            *x *= plan.scale;
        }
    }
}

/// Unnormalized Sylvester–Hadamard transform of a power-of-two length, natural order.
pub(super) fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut half = 1;
    while half < n {
        for start in (0..n).step_by(2 * half) {
            for j in start..start + half {
                let (a, b) = (x[j], x[j + half]);
                x[j] = a + b;
                x[j + half] = a - b;
            }
        }
        half *= 2;
    }
}

/// Largest Paley factor.
const MAX_FACTOR: usize = 28;

/// Within each group of `size·inner` values, sub-vector `i` (length `inner`) becomes
/// `Σ_j matrix[i][j] · sub-vector j`, for the columns `start..inner` only.
pub(super) fn mix_columns(
    data: &mut [f32],
    matrix: &[f32],
    size: usize,
    inner: usize,
    start: usize,
) {
    debug_assert!(size <= MAX_FACTOR);
    let mut column = [0f32; MAX_FACTOR];
    for group in data.chunks_exact_mut(size * inner) {
        for col in start..inner {
            for (j, c) in column[..size].iter_mut().enumerate() {
                *c = group[j * inner + col];
            }
            for i in 0..size {
                let row = &matrix[i * size..(i + 1) * size];
                group[i * inner + col] = row.iter().zip(&column[..size]).map(|(m, x)| m * x).sum();
            }
        }
    }
}

pub(super) fn mix(data: &mut [f32], matrix: &[f32], size: usize, inner: usize) {
    mix_columns(data, matrix, size, inner, 0);
}
