//! AVX2 + FMA: 8 lanes. Reached only after `is_x86_feature_detected!` for both.

use std::arch::x86_64::*;

use super::kernel::{self, Vector};
use super::Plan;

pub(super) struct Avx2;

impl Vector for Avx2 {
    const LANES: usize = 8;
    const MAX_RADIX: usize = 8;
    type V = __m256;

    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: the trait contract: AVX present, p valid for 8 f32 (unaligned is fine).
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: the trait contract: AVX present, p valid for 8 f32 (unaligned is fine).
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        // SAFETY: the trait contract: AVX present.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        // SAFETY: the trait contract: AVX present.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        // SAFETY: the trait contract: AVX present.
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        // SAFETY: the trait contract: AVX present.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: the trait contract: FMA present.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn hadamard_lanes(v: __m256) -> __m256 {
        // SAFETY: the trait contract.
        unsafe { Self::hadamard_lanes_below::<8>(v) }
    }
    #[inline(always)]
    unsafe fn hadamard_lanes_below<const L: usize>(v: __m256) -> __m256 {
        // Stage with lane distance d: y = x[i ^ d] + sign·x[i] (see avx512.rs).
        // SAFETY: the trait contract: AVX and FMA present.
        unsafe {
            let mut v = v;
            if L > 1 {
                let s = _mm256_setr_ps(1., -1., 1., -1., 1., -1., 1., -1.);
                v = _mm256_fmadd_ps(v, s, _mm256_permute_ps::<0b10_11_00_01>(v));
            }
            if L > 2 {
                let s = _mm256_setr_ps(1., 1., -1., -1., 1., 1., -1., -1.);
                v = _mm256_fmadd_ps(v, s, _mm256_permute_ps::<0b01_00_11_10>(v));
            }
            if L > 4 {
                let s = _mm256_setr_ps(1., 1., 1., 1., -1., -1., -1., -1.);
                v = _mm256_fmadd_ps(v, s, _mm256_permute2f128_ps::<0x01>(v, v));
            }
            v
        }
    }
    #[inline(always)]
    unsafe fn broadcast_run<const L: usize>(p: *const f32) -> __m256 {
        // SAFETY: the trait contract: AVX present, p valid for L f32 (unaligned reads); runs
        // of 2 move as integers so every bit pattern survives.
        unsafe {
            match L {
                1 => _mm256_set1_ps(*p),
                2 => _mm256_castsi256_ps(_mm256_set1_epi64x(p.cast::<i64>().read_unaligned())),
                _ => {
                    let x = _mm_loadu_ps(p);
                    _mm256_set_m128(x, x)
                }
            }
        }
    }
}

/// # Safety
/// The CPU supports AVX2 and FMA, and `data.len()` is a multiple of `plan.order`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn transform(data: &mut [f32], plan: &Plan) {
    // SAFETY: forwarded contract; this function enables AVX2 and FMA for the inlined kernel.
    unsafe { kernel::transform::<Avx2>(data, plan) }
}
