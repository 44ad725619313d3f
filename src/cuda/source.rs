//! CUDA C++ sources of the kernels, assembled per configuration for NVRTC: the shared prelude,
//! the kernel file, and (for the Hadamard transform) the order's constants and its Paley factors
//! unrolled into straight-line adds, generated from [`crate::hadamard::paley_matrix`] so the GPU
//! applies exactly the matrix the CPU quantizer used.
#![forbid(unsafe_code)]

use crate::hadamard;
use crate::{HiggsError, Result};
use std::fmt::Write;

const COMMON: &str = include_str!("kernels/common.cuh");
const LUT_GEMM: &str = include_str!("kernels/lut_gemm.cu");
const HADAMARD: &str = include_str!("kernels/hadamard.cu");
const ROPE: &str = include_str!("kernels/rope.cu");

/// The `rope` module for one activation dtype (see `kernels/rope.cu`).
pub fn rope(act: ActType) -> String {
    format!("{}{COMMON}\n{ROPE}", act.define())
}

/// Activation (and output) element type of a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActType {
    F16,
    Bf16,
}

impl ActType {
    pub fn parse(name: &str) -> Result<ActType> {
        match name {
            "f16" | "float16" => Ok(ActType::F16),
            "bf16" | "bfloat16" => Ok(ActType::Bf16),
            other => Err(HiggsError::invalid(format!(
                "activation dtype {other:?} is not supported by the CUDA kernels: use \"f16\" or \"bf16\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ActType::F16 => "f16",
            ActType::Bf16 => "bf16",
        }
    }

    fn define(self) -> &'static str {
        match self {
            ActType::F16 => "",
            ActType::Bf16 => "#define ACT_BF16 1\n",
        }
    }
}

/// What a LUT-GEMM module holds besides the shared helpers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LutKernel {
    /// `lut_mma` with `mt` m16 row tiles and `nt` n8 batch tiles per warp.
    Mma { mt: usize, nt: usize },
    /// `lut_gemv` for batches of at most `8 / cpb` rows, `cpb` = scale groups per 128-k
    /// super-step (1, 2 or 4: group sizes ≥ 128, 64, 32).
    Gemv { cpb: usize },
    /// `dequantize_rotated`.
    Dequantize,
}

impl LutKernel {
    pub fn name(self) -> &'static str {
        match self {
            LutKernel::Mma { .. } => "lut_mma",
            LutKernel::Gemv { .. } => "lut_gemv",
            LutKernel::Dequantize => "dequantize_rotated",
        }
    }

    /// The kernel for plain layers (whole aligned chunks, power-of-two groups: see
    /// `lut_gemm.cu`), where the module has one.
    pub fn plain_name(self) -> Option<&'static str> {
        match self {
            LutKernel::Mma { .. } => Some("lut_mma_plain"),
            LutKernel::Gemv { .. } => Some("lut_gemv_plain"),
            LutKernel::Dequantize => None,
        }
    }
}

/// Extra `#define`s for the LUT-GEMM modules from `HIGGS_CUDA_DEFINES` (`NAME=VALUE,...`), read
/// once: a hook for timing kernel variants without rebuilding.
fn extra_defines() -> &'static str {
    static DEFINES: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DEFINES.get_or_init(|| {
        let raw = std::env::var("HIGGS_CUDA_DEFINES").unwrap_or_default();
        raw.split(',')
            .filter(|d| !d.trim().is_empty())
            .map(|d| match d.split_once('=') {
                Some((name, value)) => format!("#define {} {}\n", name.trim(), value.trim()),
                None => format!("#define {} 1\n", d.trim()),
            })
            .collect()
    })
}

/// Shared-memory stages of activations in `lut_mma` (the launch sizes its dynamic shared memory
/// from this; `XS_STAGES` in `lut_gemm.cu`).
pub const XS_STAGES: usize = 3;

/// A LUT-GEMM module for `bits` per weight (2, 3 or 4); `segments`: for launches that compute
/// sibling layers too (`LinearCall::siblings`).
pub fn lut_gemm(bits: u32, act: ActType, kernel: LutKernel, segments: bool) -> String {
    let select = match kernel {
        LutKernel::Mma { mt, nt } => {
            format!("#define LUT_MT {mt}\n#define LUT_NT {nt}\n#define XS_STAGES {XS_STAGES}\n")
        }
        LutKernel::Gemv { cpb } => format!("#define LUT_GEMV 1\n#define GEMV_CPB {cpb}\n"),
        LutKernel::Dequantize => "#define LUT_DEQUANT 1\n".to_string(),
    };
    let segments = if segments {
        "#define LUT_SEGMENTS 1\n"
    } else {
        ""
    };
    format!(
        "#define BITS {bits}\n{select}{segments}{}{}{COMMON}\n{LUT_GEMM}",
        extra_defines(),
        act.define()
    )
}

/// How one Hadamard order is cut into factors, and the tile a CUDA block transforms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HadamardShape {
    pub order: usize,
    pub log2: u32,
    pub fast: usize,
    pub slow: usize,
    /// Values per CUDA block: a whole number of transform blocks.
    pub tile: usize,
    pub threads: usize,
    /// `hadamard_cluster` (sm_90): blocks per cluster (one cluster per transform block), else 0.
    pub cluster: usize,
    /// Cluster kernel: the outer factor's size m (segments of `2^log2` values), the threads
    /// sharing one column of the outer mix, and the threads per part (columns per block rounded
    /// up to whole warps).
    pub outer: usize,
    pub parts: usize,
    pub col_pad: usize,
}

/// Tiles of at least this many values keep a block busy for small orders.
const MIN_TILE: usize = 2048;

impl HadamardShape {
    pub fn new(order: usize) -> Result<HadamardShape> {
        if !hadamard::is_supported_order(order) {
            return Err(HiggsError::invalid(format!(
                "Hadamard order {order} is not supported: use m·2^k with m in {:?}, 2 <= order <= {}",
                hadamard::BASE_ORDERS,
                hadamard::MAX_ORDER
            )));
        }
        // The base order m of order = m·2^k (unique: the base orders have distinct odd parts).
        let m = hadamard::BASE_ORDERS
            .iter()
            .copied()
            .find(|&m| order.is_multiple_of(m) && (order / m).is_power_of_two())
            .unwrap_or(order);
        let log2 = (order / m).trailing_zeros();
        let (slow, fast) = match m {
            1 => (1, 1),
            12 | 20 | 28 => (1, m),
            144 => (12, 12),
            240 => (12, 20),
            336 => (12, 28),
            400 => (20, 20),
            560 => (20, 28),
            784 => (28, 28),
            _ => {
                return Err(HiggsError::Unsupported(format!(
                    "Hadamard order {order}: no CUDA factorization of its odd part {m}"
                )))
            }
        };
        let tile = order * (MIN_TILE / order).max(1);
        // Radix-8 passes want tile/8 threads; a Paley factor wants two per fiber.
        let threads = if fast > 1 { 2 * tile / fast } else { tile / 8 };
        let threads = threads.clamp(64, 1024).next_multiple_of(32).min(1024);
        Ok(HadamardShape {
            order,
            log2,
            fast,
            slow,
            tile,
            threads,
            cluster: 0,
            outer: 1,
            parts: 1,
            col_pad: 0,
        })
    }

    /// The cluster layout of `hadamard_cluster` for this order, where it has one: order =
    /// m · 2^k with k >= 8, the outer factor m a Paley matrix (28, 20, 12: clusters of 7, 5, 6
    /// blocks) or, for powers of two, `pow2_outer` (S_m ⊗ S_(order/m) = S_order; 0: none) with
    /// one segment per block. Each block transforms (m / cluster) segments of 2^k values.
    pub fn clustered(order: usize, pow2_outer: usize) -> Result<Option<HadamardShape>> {
        let base = HadamardShape::new(order)?;
        if base.slow != 1 {
            return Ok(None);
        }
        let (outer, seg_log2, cluster) = if base.fast > 1 {
            let cluster = (2..=8)
                .rev()
                .find(|c| base.fast.is_multiple_of(*c))
                .unwrap_or(1);
            (base.fast, base.log2, cluster)
        } else {
            if pow2_outer < 2 || !pow2_outer.is_power_of_two() || pow2_outer > 8 {
                return Ok(None);
            }
            let outer_log2 = pow2_outer.trailing_zeros();
            if base.log2 < outer_log2 + 8 {
                return Ok(None);
            }
            (pow2_outer, base.log2 - outer_log2, pow2_outer)
        };
        let seg = 1usize << seg_log2;
        let tile = outer / cluster * seg;
        if cluster < 2 || seg_log2 < 8 || tile / 8 > 1024 {
            return Ok(None);
        }
        let parts = if outer >= 8 && outer.is_multiple_of(2) {
            2
        } else {
            1
        };
        // Threads per part: the block's columns rounded up to whole warps, fewer (each thread
        // then loops over several columns) where that would pass 1024 threads.
        let columns = seg.div_ceil(cluster).next_multiple_of(32);
        let threads = (tile / 8)
            .max(parts * columns)
            .next_multiple_of(32)
            .min(1024);
        let col_pad = columns.min(threads / parts / 32 * 32);
        Ok(Some(HadamardShape {
            order,
            log2: seg_log2,
            fast: 1,
            slow: 1,
            tile,
            threads,
            cluster,
            outer,
            parts,
            col_pad,
        }))
    }

    /// The outer factor of the cluster layout (row-major ±1, m × m): the Paley matrix the CPU
    /// uses, or Sylvester's.
    fn outer_matrix(&self) -> Result<Vec<f32>> {
        let m = self.outer;
        if m.is_power_of_two() {
            return Ok((0..m * m)
                .map(|e| {
                    if ((e / m) & (e % m)).count_ones().is_multiple_of(2) {
                        1.0
                    } else {
                        -1.0
                    }
                })
                .collect());
        }
        hadamard::paley_matrix(m)
            .ok_or_else(|| HiggsError::Unsupported(format!("no Paley matrix of order {m}")))
    }

    /// The kernel this shape runs.
    pub fn kernel_name(&self) -> &'static str {
        if self.cluster > 0 {
            "hadamard_cluster"
        } else {
            "hadamard_rotate"
        }
    }

    pub fn shared_bytes(&self) -> usize {
        self.tile * 4
    }
}

/// `Σ_j sign_j · v[j]` as a balanced tree of adds (depth log2(n) instead of n − 1: the sums
/// of a Paley factor are latency-bound otherwise). Returns (negated, expression).
fn signed_sum(terms: &[(bool, String)]) -> (bool, String) {
    if terms.len() == 1 {
        return terms[0].clone();
    }
    let (left, right) = terms.split_at(terms.len() / 2);
    let ((ln, l), (rn, r)) = (signed_sum(left), signed_sum(right));
    match (ln, rn) {
        (false, false) => (false, format!("({l} + {r})")),
        (false, true) => (false, format!("({l} - {r})")),
        (true, false) => (false, format!("({r} - {l})")),
        (true, true) => (true, format!("({l} + {r})")),
    }
}

/// Output `i` of a Paley factor: `Σ_j H[i][j] v[j]`.
fn paley_row(h: &[f32], size: usize, i: usize) -> String {
    let terms: Vec<(bool, String)> = (0..size)
        .map(|j| (h[i * size + j] < 0.0, format!("v[{j}]")))
        .collect();
    match signed_sum(&terms) {
        (false, e) => e,
        (true, e) => format!("-{e}"),
    }
}

/// One Paley factor as straight-line code: `name(float (&v)[size])` in place
/// (`v_i <- Σ_j H[i][j] v_j`), and `name_lo` / `name_hi` writing the first / second half of the
/// outputs to `o` (two threads share a fiber).
fn paley_functions(name: &str, size: usize) -> Result<String> {
    let h = hadamard::paley_matrix(size)
        .ok_or_else(|| HiggsError::Unsupported(format!("no Paley matrix of order {size}")))?;
    let mut s = format!("__device__ __forceinline__ void {name}(float (&v)[{size}]) {{\n");
    for i in 0..size {
        let _ = writeln!(s, "    const float o{i} = {};", paley_row(&h, size, i));
    }
    for i in 0..size {
        let _ = writeln!(s, "    v[{i}] = o{i};");
    }
    s.push_str("}\n");
    let half = size / 2;
    for (suffix, rows) in [("lo", 0..half), ("hi", half..size)] {
        let _ = writeln!(
            s,
            "__device__ __forceinline__ void {name}_{suffix}(const float (&v)[{size}], float (&o)[{half}]) {{"
        );
        for i in rows {
            let _ = writeln!(s, "    o[{}] = {};", i % half, paley_row(&h, size, i));
        }
        s.push_str("}\n");
    }
    Ok(s)
}

/// `hcl_outer(part, v, o)`: outputs [part · m/q, (part + 1) · m/q) of the outer factor applied
/// to `v`, as straight-line balanced sums (`part` is warp-uniform in the kernel).
fn outer_function(shape: &HadamardShape) -> Result<String> {
    let h = shape.outer_matrix()?;
    let (m, q) = (shape.outer, shape.parts);
    let per = m / q;
    let mut s = format!(
        "__device__ __forceinline__ void hcl_outer(int part, const float (&v)[{m}], float (&o)[{per}]) {{\n"
    );
    for part in 0..q {
        let _ = writeln!(
            s,
            "    {}if (part == {part}) {{",
            if part == 0 { "" } else { "else " }
        );
        for j in 0..per {
            let _ = writeln!(s, "        o[{j}] = {};", paley_row(&h, m, part * per + j));
        }
        s.push_str("    }\n");
    }
    s.push_str("}\n");
    Ok(s)
}

/// The Hadamard module for one order and activation type.
pub fn hadamard(shape: &HadamardShape, act: ActType) -> Result<String> {
    let mut s = String::new();
    s.push_str(act.define());
    s.push_str(COMMON);
    // The cluster kernel mixes its outer factor itself (`outer_function`): no Paley factors.
    let (fast, slow) = if shape.cluster > 0 {
        (1, 1)
    } else {
        (shape.fast, shape.slow)
    };
    let _ = write!(
        s,
        "\n#define HAD_ORDER {}\n#define HAD_LOG2 {}\n#define HAD_POW2 {}\n#define HAD_FAST {}\n#define HAD_SLOW {}\n#define HAD_TILE {}\n#define HAD_THREADS {}\n",
        shape.order,
        shape.log2,
        1usize << shape.log2,
        fast,
        slow,
        shape.tile,
        shape.threads
    );
    if shape.cluster > 0 {
        let _ = write!(
            s,
            "#define HAD_CLUSTER {}\n#define HCL_M {}\n#define HCL_Q {}\n#define HCL_NCOLP {}\n",
            shape.cluster, shape.outer, shape.parts, shape.col_pad
        );
        s.push_str(&outer_function(shape)?);
    }
    if fast > 1 {
        s.push_str(&paley_functions("paley_fast", fast)?);
    }
    if slow > 1 {
        s.push_str(&paley_functions("paley_slow", slow)?);
    }
    s.push_str(HADAMARD);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unnormalized Sylvester (Walsh–Hadamard) transform of a power-of-two block, in f64.
    fn sylvester_f64(v: &mut [f64]) {
        let mut d = 1;
        while d < v.len() {
            for i in 0..v.len() {
                if i & d == 0 {
                    let (a, b) = (v[i], v[i + d]);
                    v[i] = a + b;
                    v[i + d] = a - b;
                }
            }
            d *= 2;
        }
    }

    /// The factorization and index layout the kernel uses, replayed on the CPU in f64:
    /// Sylvester stages on the fastest index, then the fast and slow Paley factors.
    fn emulate(shape: &HadamardShape, x: &[f32]) -> Vec<f32> {
        let n = shape.order;
        let pow2 = 1usize << shape.log2;
        let mut v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
        for segment in v.chunks_mut(pow2) {
            sylvester_f64(segment);
        }
        for (size, stride) in [(shape.fast, pow2), (shape.slow, shape.fast * pow2)] {
            if size == 1 {
                continue;
            }
            let h = hadamard::paley_matrix(size).unwrap();
            for q in 0..n / size {
                let base = (q / stride) * size * stride + q % stride;
                let old: Vec<f64> = (0..size).map(|j| v[base + j * stride]).collect();
                for i in 0..size {
                    v[base + i * stride] = (0..size).map(|j| h[i * size + j] as f64 * old[j]).sum();
                }
            }
        }
        let scale = 1.0 / (n as f64).sqrt();
        v.iter().map(|&a| (a * scale) as f32).collect()
    }

    #[test]
    fn kernel_factorization_matches_cpu_transform() {
        for order in [
            2,
            64,
            12,
            48,
            20,
            28 * 4,
            144,
            240 * 2,
            336,
            400,
            560,
            784,
            28 * 512,
        ] {
            let shape = HadamardShape::new(order).unwrap();
            let mut x = vec![0f32; order];
            crate::rng::SplitMix64::new(order as u64).fill_gaussian(&mut x);
            let expected = {
                let mut y = x.clone();
                hadamard::forward(&mut y, order).unwrap();
                y
            };
            let got = emulate(&shape, &x);
            let err = expected
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "order {order}: max error {err}");
        }
    }

    /// `hadamard_cluster`'s data flow replayed on the CPU: Sylvester on each segment of 2^k
    /// values, then the outer factor across segments, column by column; every column is owned
    /// by exactly one block and every value of a block's tile is loaded by one thread.
    #[test]
    fn cluster_layout_matches_cpu_transform() {
        for (order, pow2_outer) in [
            (28 * 512, 4),
            (4096, 4),
            (4096, 8),
            (2048, 8),
            (32768, 4),
            (12 * 256, 4),
            (20 * 1024, 4),
        ] {
            let shape = HadamardShape::clustered(order, pow2_outer)
                .unwrap()
                .unwrap_or_else(|| panic!("order {order} has a cluster layout"));
            let seg = 1usize << shape.log2;
            assert_eq!(shape.outer * seg, order);
            assert!(shape.cluster <= 8 && shape.outer.is_multiple_of(shape.cluster));
            assert_eq!(shape.tile, shape.outer / shape.cluster * seg);
            assert!(
                shape.tile / 8 <= shape.threads && shape.parts * shape.col_pad <= shape.threads
            );
            assert!(shape.threads <= 1024 && shape.threads.is_multiple_of(32));
            let mut owners = vec![0usize; seg];
            for rank in 0..shape.cluster {
                let (begin, end) = (rank * seg / shape.cluster, (rank + 1) * seg / shape.cluster);
                assert!(shape.col_pad >= 32 && shape.col_pad.is_multiple_of(32));
                assert!(end > begin);
                owners[begin..end].iter_mut().for_each(|o| *o += 1);
            }
            assert!(
                owners.iter().all(|&o| o == 1),
                "order {order}: columns owned once"
            );
            let mut x = vec![0f32; order];
            crate::rng::SplitMix64::new(order as u64 + 7).fill_gaussian(&mut x);
            let mut expected = x.clone();
            hadamard::forward(&mut expected, order).unwrap();
            let mut v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
            for segment in v.chunks_mut(seg) {
                sylvester_f64(segment);
            }
            let h = shape.outer_matrix().unwrap();
            let m = shape.outer;
            let scale = 1.0 / (order as f64).sqrt();
            for col in 0..seg {
                for a in 0..m {
                    let y: f64 = (0..m).map(|j| h[a * m + j] as f64 * v[j * seg + col]).sum();
                    let err = (y * scale - expected[a * seg + col] as f64).abs();
                    assert!(
                        err < 1e-4,
                        "order {order} m {m}: output {} off by {err}",
                        a * seg + col
                    );
                }
            }
            let src = hadamard(&shape, ActType::F16).unwrap();
            assert!(src.contains(&format!("#define HAD_CLUSTER {}", shape.cluster)));
            assert!(src.contains("void hcl_outer(int part"));
        }
        // Orders without a cluster layout keep the one-block kernel.
        assert!(HadamardShape::clustered(784 * 16, 4).unwrap().is_none());
        assert!(HadamardShape::clustered(4096, 0).unwrap().is_none());
        assert!(HadamardShape::clustered(512, 4).unwrap().is_none());
        assert!(HadamardShape::clustered(28 * 64, 4).unwrap().is_none());
    }

    #[test]
    fn balanced_sums_keep_every_sign() {
        let terms: Vec<(bool, String)> = [false, true, true, false, true]
            .iter()
            .enumerate()
            .map(|(j, &neg)| (neg, format!("v{j}")))
            .collect();
        let (neg, e) = signed_sum(&terms);
        // Evaluate with v_j = 10^j: the digits must be +1, -1, -1, +1, -1.
        let value: f64 = {
            let mut expr = e.clone();
            for j in 0..5 {
                expr = expr.replace(&format!("v{j}"), &format!("{}", 10f64.powi(j)));
            }
            eval(&expr)
        };
        let expected = 1.0 - 10.0 - 100.0 + 1000.0 - 10000.0;
        assert_eq!(if neg { -value } else { value }, expected, "{e}");
    }

    /// A tiny evaluator for the sums `signed_sum` writes: numbers, + and -, parentheses.
    fn eval(expr: &str) -> f64 {
        fn term(tokens: &[char], pos: &mut usize) -> f64 {
            if tokens[*pos] == '(' {
                *pos += 1;
                let v = sum(tokens, pos);
                *pos += 1; // ')'
                v
            } else {
                let start = *pos;
                while *pos < tokens.len() && (tokens[*pos].is_ascii_digit() || tokens[*pos] == '.')
                {
                    *pos += 1;
                }
                tokens[start..*pos]
                    .iter()
                    .collect::<String>()
                    .parse()
                    .unwrap()
            }
        }
        fn sum(tokens: &[char], pos: &mut usize) -> f64 {
            let mut v = term(tokens, pos);
            while *pos < tokens.len() && matches!(tokens[*pos], '+' | '-') {
                let op = tokens[*pos];
                *pos += 1;
                let r = term(tokens, pos);
                v = if op == '+' { v + r } else { v - r };
            }
            v
        }
        let tokens: Vec<char> = expr.chars().filter(|c| !c.is_whitespace()).collect();
        sum(&tokens, &mut 0)
    }

    #[test]
    fn shapes_tile_whole_blocks() {
        for order in [
            2,
            64,
            1024,
            4096,
            16384,
            32768,
            12 * 1024,
            28 * 512,
            784 * 32,
        ] {
            let s = HadamardShape::new(order).unwrap();
            assert!(s.tile.is_multiple_of(order));
            assert_eq!(s.order, (s.slow * s.fast) << s.log2);
            assert!(s.threads.is_multiple_of(32) && s.threads <= 1024);
        }
        assert!(HadamardShape::new(44).is_err());
    }

    #[test]
    fn generated_sources_name_their_pieces() {
        let src = hadamard(&HadamardShape::new(28 * 512).unwrap(), ActType::Bf16).unwrap();
        assert!(src.contains("#define ACT_BF16"));
        assert!(src.contains("paley_fast(float (&v)[28])"));
        assert!(!src.contains("void paley_slow"));
        let src = lut_gemm(3, ActType::F16, LutKernel::Mma { mt: 2, nt: 8 }, false);
        assert!(src.starts_with(
            "#define BITS 3\n#define LUT_MT 2\n#define LUT_NT 8\n#define XS_STAGES 3\n"
        ));
        assert!(!src.contains("#define ACT_BF16") && !src.contains("LUT_SEGMENTS 1"));
        let grouped = lut_gemm(4, ActType::F16, LutKernel::Gemv { cpb: 2 }, true);
        assert!(grouped.contains("#define LUT_SEGMENTS 1\n"));
        assert!(lut_gemm(2, ActType::Bf16, LutKernel::Dequantize, false)
            .contains("#define LUT_DEQUANT 1"));
    }
}
