//! NEON (aarch64 baseline): 4 lanes.

use std::arch::aarch64::*;

use super::kernel::{self, Vector};
use super::Plan;

pub(super) struct Neon;

impl Vector for Neon {
    const LANES: usize = 4;
    const MAX_RADIX: usize = 16;
    type V = float32x4_t;

    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: the trait contract: p valid for 4 f32 (no alignment needed); NEON is baseline.
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: the trait contract: p valid for 4 f32 (no alignment needed); NEON is baseline.
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> float32x4_t {
        // SAFETY: NEON is baseline on aarch64.
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is baseline on aarch64.
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is baseline on aarch64.
        unsafe { vsubq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is baseline on aarch64.
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is baseline on aarch64.
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    unsafe fn hadamard_lanes(v: float32x4_t) -> float32x4_t {
        // SAFETY: the trait contract.
        unsafe { Self::hadamard_lanes_below::<4>(v) }
    }
    #[inline(always)]
    unsafe fn hadamard_lanes_below<const L: usize>(v: float32x4_t) -> float32x4_t {
        // Stage with lane distance d: y = x[i ^ d] + sign·x[i] (see avx512.rs).
        const S1: [f32; 4] = [1., -1., 1., -1.];
        const S2: [f32; 4] = [1., 1., -1., -1.];
        // SAFETY: NEON is baseline on aarch64; the constant arrays hold 4 f32 each.
        unsafe {
            let mut v = v;
            if L > 1 {
                v = vfmaq_f32(vrev64q_f32(v), v, vld1q_f32(S1.as_ptr()));
            }
            if L > 2 {
                v = vfmaq_f32(vextq_f32::<2>(v, v), v, vld1q_f32(S2.as_ptr()));
            }
            v
        }
    }
    #[inline(always)]
    unsafe fn broadcast_run<const L: usize>(p: *const f32) -> float32x4_t {
        // SAFETY: the trait contract: p valid for L f32 (no alignment needed); NEON is baseline.
        unsafe {
            match L {
                1 => vld1q_dup_f32(p),
                _ => {
                    let x = vld1_f32(p);
                    vcombine_f32(x, x)
                }
            }
        }
    }
}

/// # Safety
/// `data.len()` is a multiple of `plan.order`.
pub(super) unsafe fn transform(data: &mut [f32], plan: &Plan) {
    // SAFETY: forwarded contract; NEON is baseline on aarch64.
    unsafe { kernel::transform::<Neon>(data, plan) }
}
