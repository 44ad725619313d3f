//! AVX-512F: 16 lanes. Reached only after `is_x86_feature_detected!("avx512f")`.

use std::arch::x86_64::*;

use super::kernel::{self, Vector};
use super::Plan;

pub(super) struct Avx512;

impl Vector for Avx512 {
    const LANES: usize = 16;
    const MAX_RADIX: usize = 16;
    type V = __m512;

    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the trait contract: AVX-512F present, p valid for 16 f32 (unaligned is fine).
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: the trait contract: AVX-512F present, p valid for 16 f32 (unaligned is fine).
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        // SAFETY: the trait contract: AVX-512F present.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: the trait contract: AVX-512F present.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        // SAFETY: the trait contract: AVX-512F present.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: the trait contract: AVX-512F present.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: the trait contract: AVX-512F present.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn hadamard_lanes(v: __m512) -> __m512 {
        // SAFETY: the trait contract.
        unsafe { Self::hadamard_lanes_below::<16>(v) }
    }
    #[inline(always)]
    unsafe fn hadamard_lanes_below<const L: usize>(v: __m512) -> __m512 {
        // Stage with lane distance d: y = x[i ^ d] + sign·x[i], sign = -1 where bit d of i is
        // set, i.e. (a, b) -> (a + b, a - b); ±1 products are exact, so this matches a plain
        // butterfly bit for bit. Shuffles swap neighbours, pairs, 128-bit quarters, halves.
        // SAFETY: the trait contract: AVX-512F present.
        unsafe {
            let mut v = v;
            if L > 1 {
                let s = _mm512_setr_ps(
                    1., -1., 1., -1., 1., -1., 1., -1., 1., -1., 1., -1., 1., -1., 1., -1.,
                );
                v = _mm512_fmadd_ps(v, s, _mm512_permute_ps::<0b10_11_00_01>(v));
            }
            if L > 2 {
                let s = _mm512_setr_ps(
                    1., 1., -1., -1., 1., 1., -1., -1., 1., 1., -1., -1., 1., 1., -1., -1.,
                );
                v = _mm512_fmadd_ps(v, s, _mm512_permute_ps::<0b01_00_11_10>(v));
            }
            if L > 4 {
                let s = _mm512_setr_ps(
                    1., 1., 1., 1., -1., -1., -1., -1., 1., 1., 1., 1., -1., -1., -1., -1.,
                );
                v = _mm512_fmadd_ps(v, s, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
            }
            if L > 8 {
                let s = _mm512_setr_ps(
                    1., 1., 1., 1., 1., 1., 1., 1., -1., -1., -1., -1., -1., -1., -1., -1.,
                );
                v = _mm512_fmadd_ps(v, s, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v));
            }
            v
        }
    }
    #[inline(always)]
    unsafe fn broadcast_run<const L: usize>(p: *const f32) -> __m512 {
        // SAFETY: the trait contract: AVX-512F present, p valid for L f32 (unaligned reads);
        // runs of 2 and 8 move as integers so every bit pattern survives.
        unsafe {
            match L {
                1 => _mm512_set1_ps(*p),
                2 => _mm512_castsi512_ps(_mm512_set1_epi64(p.cast::<i64>().read_unaligned())),
                4 => _mm512_broadcast_f32x4(_mm_loadu_ps(p)),
                _ => _mm512_castsi512_ps(_mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast()))),
            }
        }
    }
}

/// # Safety
/// The CPU supports AVX-512F, and `data.len()` is a multiple of `plan.order`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transform(data: &mut [f32], plan: &Plan) {
    // SAFETY: forwarded contract; this function enables AVX-512F for the inlined kernel.
    unsafe { kernel::transform::<Avx512>(data, plan) }
}
