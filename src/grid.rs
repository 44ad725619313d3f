//! Gaussian MSE-optimal grids. PLACEHOLDER: interface only (helper fills it in).
use crate::Result;
use std::sync::Arc;

/// A grid of `n` points in `p` dimensions, MSE-optimal for N(0, I_p); points row-major (n × p).
#[derive(Debug, Clone)]
pub struct Grid {
    pub p: usize,
    pub n: usize,
    pub version: u32,
    pub points: Vec<f32>,
}

impl Grid {
    /// The shipped grid for (p, n), decoded once and cached.
    pub fn load(_p: usize, _n: usize) -> Result<Arc<Grid>> {
        unimplemented!()
    }
    /// Every shipped (p, n).
    pub fn available() -> Vec<(usize, usize)> {
        unimplemented!()
    }
    /// A stable name: "p2_n256_v1".
    pub fn id(&self) -> String {
        format!("p{}_n{}_v{}", self.p, self.n, self.version)
    }
}
