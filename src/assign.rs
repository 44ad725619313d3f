//! Exact nearest-grid-point search. PLACEHOLDER: interface only (helper fills it in).
use crate::grid::Grid;
use crate::Result;
use std::sync::Arc;

/// Search structure for one grid; exact (ties go to the lowest index).
pub struct Assigner {
    pub grid: Arc<Grid>,
}

impl Assigner {
    pub fn new(grid: Arc<Grid>) -> Assigner {
        Assigner { grid }
    }
    /// Built once per (p, n) and cached.
    pub fn for_grid(_p: usize, _n: usize) -> Result<Arc<Assigner>> {
        unimplemented!()
    }
    /// `xs` holds `codes.len()` consecutive p-tuples; writes the index of the nearest point of each.
    pub fn assign(&self, _xs: &[f32], _codes: &mut [u32]) {
        unimplemented!()
    }
}

/// Reference: nearest point by scanning all of them (ties to the lowest index).
pub fn brute_force_nearest(points: &[f32], p: usize, x: &[f32]) -> u32 {
    let mut best = (f32::INFINITY, 0u32);
    for (i, g) in points.chunks_exact(p).enumerate() {
        let d: f32 = g.iter().zip(x).map(|(a, b)| (a - b) * (a - b)).sum();
        if d < best.0 {
            best = (d, i as u32);
        }
    }
    best.1
}
