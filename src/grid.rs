//! Gaussian MSE-optimal grids, shipped as generated data.
//!
//! Each grid is a table of `n` points in `p` dimensions that (locally) minimizes the expected
//! squared error E‖x − nearest(x)‖² for x ~ N(0, I_p). The tables are produced by
//! `cargo run --release --example make_grids` (Lloyd–Max with exact Gaussian integrals for p = 1;
//! Lloyd on deterministic SplitMix64 Gaussian samples for p ≥ 2) and stored in
//! `grids/p{p}_n{n}_v{version}.bin` as little-endian f32, n × p row-major, no header.
//! `grids/README.md` lists every grid with its measured MSE.
#![forbid(unsafe_code)]

use crate::{HiggsError, Result};
use std::sync::{Arc, OnceLock};

/// A grid of `n` points in `p` dimensions, MSE-optimal for N(0, I_p); points row-major (n × p).
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub p: usize,
    pub n: usize,
    pub version: u32,
    pub points: Vec<f32>,
}

/// Version of the shipped tables; bump it (and the file names) whenever a table changes.
pub const GRID_VERSION: u32 = 1;

macro_rules! shipped {
    ($(($p:literal, $n:literal)),* $(,)?) => {
        &[$(($p, $n, include_bytes!(concat!("../grids/p", $p, "_n", $n, "_v1.bin")) as &[u8])),*]
    };
}

/// (p, n, little-endian f32 bytes) of every shipped grid.
static SHIPPED: &[(usize, usize, &[u8])] = shipped![
    (1, 4),
    (1, 8),
    (1, 16),
    (1, 32),
    (1, 64),
    (1, 128),
    (1, 256),
    (2, 16),
    (2, 64),
    (2, 256),
    (2, 1024),
    (3, 64),
    (3, 512),
    (3, 4096),
    (4, 256),
    (4, 4096),
    (4, 8192),
];

/// Decoded grids, one slot per entry of `SHIPPED`.
static CACHE: [OnceLock<Arc<Grid>>; 17] = [const { OnceLock::new() }; 17];

impl Grid {
    /// A grid from explicit points (n × p row-major); checks the shape and that every
    /// coordinate is finite.
    pub fn from_points(p: usize, points: Vec<f32>, version: u32) -> Result<Grid> {
        if p == 0 || points.is_empty() || !points.len().is_multiple_of(p) {
            return Err(HiggsError::invalid(format!(
                "a grid needs a whole number of {p}-dimensional points, got {} coordinates",
                points.len()
            )));
        }
        let n = points.len() / p;
        // Codes are u32 and the search tables use the top bit as a flag.
        if n >= 1 << 31 {
            return Err(HiggsError::invalid(format!(
                "a grid of {n} points is too large"
            )));
        }
        if let Some(i) = points.iter().position(|v| !v.is_finite()) {
            return Err(HiggsError::invalid(format!(
                "grid point {} has a non-finite coordinate {}",
                i / p,
                points[i]
            )));
        }
        Ok(Grid {
            p,
            n,
            version,
            points,
        })
    }

    /// The shipped grid for (p, n), decoded once and cached.
    pub fn load(p: usize, n: usize) -> Result<Arc<Grid>> {
        let Some(slot) = SHIPPED.iter().position(|&(sp, sn, _)| (sp, sn) == (p, n)) else {
            let list: Vec<String> = Self::available()
                .iter()
                .map(|(p, n)| format!("(p={p}, n={n})"))
                .collect();
            return Err(HiggsError::Unsupported(format!(
                "no grid with p = {p}, n = {n}; available grids: {}",
                list.join(", ")
            )));
        };
        if let Some(grid) = CACHE[slot].get() {
            return Ok(grid.clone());
        }
        let grid = Arc::new(Self::decode(p, n, SHIPPED[slot].2)?);
        Ok(CACHE[slot].get_or_init(|| grid).clone())
    }

    fn decode(p: usize, n: usize, bytes: &[u8]) -> Result<Grid> {
        let path = format!("grids/p{p}_n{n}_v{GRID_VERSION}.bin");
        if bytes.len() != n * p * 4 {
            return Err(HiggsError::format(
                &path,
                format!(
                    "{} bytes, expected {} ({n} points × {p} f32); regenerate it with \
                     `cargo run --release --example make_grids`",
                    bytes.len(),
                    n * p * 4
                ),
            ));
        }
        let points = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Self::from_points(p, points, GRID_VERSION)
            .map_err(|e| HiggsError::format(&path, e.to_string()))
    }

    /// Every shipped (p, n).
    pub fn available() -> Vec<(usize, usize)> {
        SHIPPED.iter().map(|&(p, n, _)| (p, n)).collect()
    }

    /// A stable name: "p2_n256_v1".
    pub fn id(&self) -> String {
        format!("p{}_n{}_v{}", self.p, self.n, self.version)
    }

    /// Bits per coordinate of a code: log2(n) / p.
    pub fn bits(&self) -> f64 {
        (self.n as f64).log2() / self.p as f64
    }

    /// Point `i` (p coordinates).
    pub fn point(&self, i: usize) -> &[f32] {
        &self.points[i * self.p..(i + 1) * self.p]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assign::Assigner;
    use crate::rng::SplitMix64;

    /// Per-dimension MSE of `grid` on `count` fresh N(0, I_p) tuples (seed unlike the generator's).
    fn measured_mse(p: usize, n: usize, count: usize) -> f64 {
        let assigner = Assigner::for_grid(p, n).unwrap();
        let mut rng = SplitMix64::new(0x7E57_5EED_0000_0000 ^ (p as u64 * 1_000_003 + n as u64));
        let mut xs = vec![0f32; count * p];
        rng.fill_gaussian(&mut xs);
        let mut codes = vec![0u32; count];
        let err = assigner.assign_with_error(&xs, &mut codes);
        err / (count * p) as f64
    }

    #[test]
    fn p2_n256_beats_the_published_grid() {
        let mse = measured_mse(2, 256, 1_000_000);
        println!("p2_n256 mse {mse:.6}");
        assert!(mse <= 0.00775 * 1.01, "p=2 n=256 MSE {mse}");
    }

    #[test]
    fn p1_n16_is_lloyd_max() {
        let mse = measured_mse(1, 16, 1_000_000);
        println!("p1_n16 mse {mse:.6}");
        assert!(mse <= 0.00950 * 1.005, "p=1 n=16 MSE {mse}");
        let grid = Grid::load(1, 16).unwrap();
        // Lloyd–Max levels are symmetric and increasing.
        for i in 0..16 {
            assert!((grid.points[i] + grid.points[15 - i]).abs() < 1e-5);
        }
        assert!(grid.points.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn every_grid_is_near_the_shannon_bound() {
        for (p, n) in Grid::available() {
            let grid = Grid::load(p, n).unwrap();
            assert_eq!((grid.p, grid.n, grid.points.len()), (p, n, p * n));
            let count = 1_000_000 / p;
            let mse = measured_mse(p, n, count);
            let shannon = (-2.0 * grid.bits()).exp2();
            println!(
                "{} mse {mse:.6} shannon {shannon:.6} ratio {:.3}",
                grid.id(),
                mse / shannon
            );
            // The best scalar quantizers stay within ~1.53x...2.7x of the bound at these sizes;
            // vector grids come closer. A grid beyond 3x is broken.
            assert!(
                mse > shannon && mse < 3.0 * shannon,
                "{}: mse {mse}",
                grid.id()
            );
        }
    }

    #[test]
    fn identity_and_errors() {
        let grid = Grid::load(2, 256).unwrap();
        assert_eq!(grid.id(), "p2_n256_v1");
        assert!(Arc::ptr_eq(&grid, &Grid::load(2, 256).unwrap()));
        let err = Grid::load(2, 100).unwrap_err();
        assert!(matches!(err, HiggsError::Unsupported(_)));
        let message = err.to_string();
        assert!(
            message.contains("available") && message.contains("(p=2, n=256)"),
            "{message}"
        );
        assert!(Grid::from_points(2, vec![0.0, 1.0, 2.0], 1).is_err());
        assert!(Grid::from_points(1, vec![0.0, f32::NAN], 1).is_err());
    }
}
