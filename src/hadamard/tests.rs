use super::*;
use crate::rng::SplitMix64;

fn gaussian(len: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; len];
    SplitMix64::new(seed).fill_gaussian(&mut v);
    v
}

/// `y = M x / sqrt(n)` for every block, in f64, from the explicit dense matrix.
fn dense_apply(matrix: &[f32], order: usize, data: &[f32], transpose: bool) -> Vec<f32> {
    let scale = 1.0 / (order as f64).sqrt();
    let mut out = vec![0f32; data.len()];
    for (x, y) in data.chunks_exact(order).zip(out.chunks_exact_mut(order)) {
        for (i, yi) in y.iter_mut().enumerate() {
            let sum: f64 = (0..order)
                .map(|j| {
                    let m = if transpose {
                        matrix[j * order + i]
                    } else {
                        matrix[i * order + j]
                    };
                    m as f64 * x[j] as f64
                })
                .sum();
            *yi = (sum * scale) as f32;
        }
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn rms(a: &[f32]) -> f32 {
    (a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / a.len() as f64).sqrt() as f32
}

#[test]
fn supported_orders_follow_the_rule() {
    for n in [
        2, 4, 8, 1024, 32768, 12, 24, 48, 576, 1536, 3584, 14336, 20, 28, 144, 784, 25088,
    ] {
        assert!(is_supported_order(n), "{n} should be supported");
    }
    // 44 = 4·11, 52 = 4·13, 6 and 18 are not m·2^k with an integer power, 1 is too small.
    for n in [
        0,
        1,
        3,
        6,
        18,
        44,
        52,
        100,
        65536,
        12 * 4096,
        784 * 64,
        18944,
    ] {
        assert!(!is_supported_order(n), "{n} should not be supported");
    }
    // The rule, literally, for every n up to past the limit.
    for n in 0..MAX_ORDER + 100 {
        let by_rule = (2..=MAX_ORDER).contains(&n)
            && BASE_ORDERS
                .iter()
                .any(|&m| n % m == 0 && (n / m).is_power_of_two());
        assert_eq!(is_supported_order(n), by_rule, "n = {n}");
    }
    let all = supported_orders();
    assert!(all.iter().all(|&n| (2..=MAX_ORDER).contains(&n)));
    for n in &all {
        let (m, pow2) = split_order(*n).unwrap();
        assert!(BASE_ORDERS.contains(&m) && pow2.is_power_of_two() && m * pow2 == *n);
    }
}

#[test]
fn largest_supported_divisor_is_the_largest() {
    let all = supported_orders();
    for n in (0..5000).chain([18944, 14336, 11008, 65536, 3 * 65536, 1 << 40]) {
        let brute = all.iter().copied().filter(|&d| n > 0 && n % d == 0).max();
        assert_eq!(largest_supported_divisor(n), brute, "n = {n}");
    }
    assert_eq!(largest_supported_divisor(576), Some(576));
    assert_eq!(largest_supported_divisor(18944), Some(512)); // 18944 = 2^9 · 37
    assert_eq!(largest_supported_divisor(7), None);
}

#[test]
fn paley_matrices_are_hadamard() {
    for p in [12, 20, 28] {
        let h = paley_matrix(p).unwrap();
        assert!(h.iter().all(|&v| v == 1.0 || v == -1.0));
        for i in 0..p {
            for j in 0..p {
                let dot: f32 = (0..p).map(|k| h[i * p + k] * h[j * p + k]).sum();
                assert_eq!(
                    dot,
                    if i == j { p as f32 } else { 0.0 },
                    "H_{p} rows {i}, {j}"
                );
            }
        }
    }
    // Paley I matrices are not symmetric, so the inverse must transpose.
    for p in [12, 20] {
        let h = paley_matrix(p).unwrap();
        assert_ne!(h, transpose(&h, p));
    }
    assert!(paley_matrix(16).is_none());
}

#[test]
fn paley_12_first_rows_are_pinned() {
    // The layout is part of the checkpoint format: row 0 is all ones (1 + S[0][·]), row 1 is
    // -1 at the infinity column then 1 + χ(y) over GF(11) (squares 1, 3, 4, 5, 9).
    let h = paley_matrix(12).unwrap();
    assert_eq!(&h[..12], &[1.0; 12]);
    let chi = [0, 1, -1, 1, 1, 1, -1, -1, -1, 1, -1];
    let mut row1 = vec![-1.0f32];
    row1.extend(
        chi.iter()
            .enumerate()
            .map(|(y, &c)| c as f32 + if y == 0 { 1.0 } else { 0.0 }),
    );
    assert_eq!(&h[12..24], row1.as_slice());
}

#[test]
fn dense_matrices_are_hadamard() {
    for order in [2, 8, 12, 24, 40, 56, 48, 144, 240, 336, 400] {
        let h = dense_matrix(order).unwrap();
        for i in 0..order {
            for j in 0..order {
                let dot: f32 = (0..order)
                    .map(|k| h[i * order + k] * h[j * order + k])
                    .sum();
                let want = if i == j { order as f32 } else { 0.0 };
                assert_eq!(dot, want, "order {order}, rows {i} {j}");
            }
        }
    }
    assert!(dense_matrix(44).is_err());
    assert!(dense_matrix(8192).is_err());
}

#[test]
fn every_path_matches_the_dense_definition() {
    let orders = [
        2, 4, 8, 16, 32, 64, 128, 12, 24, 40, 56, 48, 96, 192, 20, 28, 112, 224, 144, 288, 576,
        240, 480, 336, 400, 560, 784,
    ];
    for path in available_paths() {
        for &order in &orders {
            let h = dense_matrix(order).unwrap();
            let x = gaussian(order * 3, order as u64);
            let mut y = x.clone();
            forward_with(path, &mut y, order).unwrap();
            let want = dense_apply(&h, order, &x, false);
            let err = max_abs_diff(&y, &want);
            assert!(
                err < 2e-5,
                "{} forward order {order}: max error {err}",
                path.name()
            );

            let mut z = x.clone();
            inverse_with(path, &mut z, order).unwrap();
            let want = dense_apply(&h, order, &x, true);
            let err = max_abs_diff(&z, &want);
            assert!(
                err < 2e-5,
                "{} inverse order {order}: max error {err}",
                path.name()
            );
        }
    }
}

#[test]
fn every_path_is_orthonormal_and_invertible_at_every_order() {
    for path in available_paths() {
        for order in supported_orders() {
            let blocks = if order <= 1024 { 3 } else { 1 };
            let x = gaussian(order * blocks, 7 + order as u64);
            let mut y = x.clone();
            forward_with(path, &mut y, order).unwrap();
            for (xb, yb) in x.chunks_exact(order).zip(y.chunks_exact(order)) {
                let (nx, ny) = (rms(xb), rms(yb));
                assert!(
                    (nx - ny).abs() <= 1e-5 * nx,
                    "{} order {order}: norm {nx} -> {ny}",
                    path.name()
                );
            }
            inverse_with(path, &mut y, order).unwrap();
            let err = max_abs_diff(&x, &y);
            assert!(
                err < 5e-6 * rms(&x).max(1.0),
                "{} order {order}: round trip error {err}",
                path.name()
            );
        }
    }
}

#[test]
fn simd_paths_match_the_scalar_reference() {
    let simd: Vec<SimdPath> = available_paths()
        .into_iter()
        .filter(|&p| p != SimdPath::Scalar)
        .collect();
    for order in supported_orders() {
        let blocks = if order <= 256 { 9 } else { 2 };
        let x = gaussian(order * blocks, 1000 + order as u64);
        let mut reference = x.clone();
        forward_with(SimdPath::Scalar, &mut reference, order).unwrap();
        let mut reference_inv = x.clone();
        inverse_with(SimdPath::Scalar, &mut reference_inv, order).unwrap();
        let tol = 1e-5 * rms(&reference);
        for &path in &simd {
            let mut y = x.clone();
            forward_with(path, &mut y, order).unwrap();
            let err = max_abs_diff(&y, &reference);
            assert!(
                err <= tol,
                "{} forward order {order}: {err} > {tol}",
                path.name()
            );
            let mut z = x.clone();
            inverse_with(path, &mut z, order).unwrap();
            let err = max_abs_diff(&z, &reference_inv);
            assert!(
                err <= tol,
                "{} inverse order {order}: {err} > {tol}",
                path.name()
            );
        }
    }
}

#[test]
fn dispatch_is_consistent() {
    let paths = available_paths();
    assert_eq!(paths.last(), Some(&SimdPath::Scalar));
    let active = simd_path();
    assert!(
        paths.iter().any(|p| p.name() == active),
        "{active} not in {paths:?}"
    );
    for p in SimdPath::ALL {
        assert_eq!(SimdPath::from_name(p.name()), Some(p));
        if !p.is_available() {
            let err = forward_with(p, &mut [0.0; 8], 8).unwrap_err();
            assert!(err.to_string().contains("not available"), "{err}");
        }
    }
    // The public entry points agree with the path they report.
    let x = gaussian(1536 * 2, 3);
    let (mut a, mut b) = (x.clone(), x.clone());
    forward(&mut a, 1536).unwrap();
    forward_with(SimdPath::from_name(active).unwrap(), &mut b, 1536).unwrap();
    assert_eq!(a, b);
    inverse(&mut a, 1536).unwrap();
    assert!(max_abs_diff(&a, &x) < 1e-5);
}

#[test]
fn bad_input_is_named() {
    let mut data = vec![0f32; 100];
    let err = forward(&mut data, 64).unwrap_err();
    assert!(matches!(err, HiggsError::InvalidArgument(_)));
    assert!(
        err.to_string()
            .contains("data length 100 is not a multiple of 64"),
        "{err}"
    );
    let err = inverse(&mut data, 44).unwrap_err();
    assert!(matches!(err, HiggsError::InvalidArgument(_)));
    assert!(
        err.to_string()
            .contains("Hadamard order 44 is not supported"),
        "{err}"
    );
    for order in [0, 1, 65536] {
        assert!(forward(&mut data, order).is_err(), "order {order}");
    }
    // An empty slice is a whole number (zero) of blocks.
    assert!(forward(&mut [], 64).is_ok());
}

#[test]
fn random_signs_follow_splitmix_bits() {
    // Reference SplitMix64 outputs for seed 1234567 (see rng.rs).
    let words = [6457827717110365317u64, 3203168211198807973u64];
    let signs = random_signs(1234567, 128);
    for (i, &s) in signs.iter().enumerate() {
        let bit = (words[i / 64] >> (i % 64)) & 1;
        assert_eq!(s, if bit == 1 { -1.0 } else { 1.0 }, "sign {i}");
    }
    // 6457827717110365317 is odd, so sign 0 is -1; a prefix is the shorter call's output.
    assert_eq!(signs[0], -1.0);
    assert_eq!(random_signs(1234567, 70), signs[..70]);
    assert!(random_signs(5, 0).is_empty());
    let many = random_signs(99, 100_000);
    let negatives = many.iter().filter(|&&s| s < 0.0).count();
    assert!(
        (49_000..51_000).contains(&negatives),
        "{negatives} negatives"
    );
}

/// The shared SIMD algorithm on a plain-array "register" of N lanes (radix up to R), so its
/// decisions for every register width (NEON's 4 included) run on any machine.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod portable {
    use super::super::kernel::{self, Vector};
    use super::super::Plan;

    pub struct Lanes<const N: usize, const R: usize>;

    impl<const N: usize, const R: usize> Vector for Lanes<N, R> {
        const LANES: usize = N;
        const MAX_RADIX: usize = R;
        type V = [f32; N];
        unsafe fn load(p: *const f32) -> [f32; N] {
            // SAFETY: the trait contract: p valid for N f32.
            unsafe { p.cast::<[f32; N]>().read_unaligned() }
        }
        unsafe fn store(p: *mut f32, v: [f32; N]) {
            // SAFETY: the trait contract: p valid for N f32.
            unsafe { p.cast::<[f32; N]>().write_unaligned(v) }
        }
        unsafe fn splat(x: f32) -> [f32; N] {
            [x; N]
        }
        unsafe fn add(a: [f32; N], b: [f32; N]) -> [f32; N] {
            std::array::from_fn(|i| a[i] + b[i])
        }
        unsafe fn sub(a: [f32; N], b: [f32; N]) -> [f32; N] {
            std::array::from_fn(|i| a[i] - b[i])
        }
        unsafe fn mul(a: [f32; N], b: [f32; N]) -> [f32; N] {
            std::array::from_fn(|i| a[i] * b[i])
        }
        unsafe fn mul_add(a: [f32; N], b: [f32; N], c: [f32; N]) -> [f32; N] {
            std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
        }
        unsafe fn hadamard_lanes(v: [f32; N]) -> [f32; N] {
            // SAFETY: no preconditions beyond the trait's.
            unsafe { Self::hadamard_lanes_below::<N>(v) }
        }
        unsafe fn hadamard_lanes_below<const L: usize>(v: [f32; N]) -> [f32; N] {
            let mut v = v;
            let mut d = 1;
            while d < L {
                v = std::array::from_fn(|i| {
                    if i & d == 0 {
                        v[i] + v[i ^ d]
                    } else {
                        v[i ^ d] - v[i]
                    }
                });
                d *= 2;
            }
            v
        }
        unsafe fn broadcast_run<const L: usize>(p: *const f32) -> [f32; N] {
            // SAFETY: the trait contract: p valid for L f32.
            std::array::from_fn(|i| unsafe { *p.add(i % L) })
        }
    }

    pub fn transform<const N: usize, const R: usize>(data: &mut [f32], plan: &Plan) {
        // SAFETY: plain Rust "registers" need no CPU support; callers pass whole blocks.
        unsafe { kernel::transform::<Lanes<N, R>>(data, plan) }
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn the_simd_algorithm_matches_the_reference_at_every_register_width() {
    type Run = fn(&mut [f32], &Plan);
    let widths: [(&str, Run); 4] = [
        ("4 lanes, radix 16 (NEON)", portable::transform::<4, 16>),
        ("4 lanes, radix 8", portable::transform::<4, 8>),
        ("8 lanes, radix 8 (AVX2)", portable::transform::<8, 8>),
        (
            "16 lanes, radix 16 (AVX-512)",
            portable::transform::<16, 16>,
        ),
    ];
    for order in supported_orders() {
        let x = gaussian(order * 2, 77 + order as u64);
        for inverse in [false, true] {
            let plan = plan(order, inverse).unwrap();
            let mut reference = x.clone();
            scalar::transform(&mut reference, plan);
            let tol = 1e-5 * rms(&reference);
            for (name, run) in widths {
                let mut y = x.clone();
                run(&mut y, plan);
                let err = max_abs_diff(&y, &reference);
                assert!(
                    err <= tol,
                    "{name}, order {order}, inverse {inverse}: {err} > {tol}"
                );
            }
        }
    }
}
