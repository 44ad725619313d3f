//! The AVX-512 (F + BW + VL + VBMI) LUT kernels, tested against the scalar path in `cpu_kernels`.
//!
//! Codes are processed in chunks of 64. Two front ends turn a chunk into f32 grid coordinates:
//! - byte planes (p ∈ {1, 2} with n ≤ 256, and p = 4 with n = 256): every coordinate's 4 bytes
//!   are looked up in 4 byte tables of n entries (1, 2 or 4 zmm registers each) with `vpermb` /
//!   `vpermt2b`, 64 codes per instruction, then put back together into floats with two rounds of
//!   unpacks. Sub-byte codes are first spread to one byte each with `vpermb` + `vpmultishiftqb`.
//!   When every grid value is exactly a bf16 (p ≥ 2), only the two high bytes are looked up.
//!   When the grid is centrally symmetric in code order (n = 256 and point `c + 128` is exactly
//!   `-point c`, as the shipped p = 2 and p = 4 grids are), the tables hold the first 128 points
//!   only (one `vpermt2b` per plane instead of two and a blend, and all tables fit in registers);
//!   the code's top bit is then xor-ed into the sign byte.
//! - nibbles (p = 1, n = 16, the 4-bit scalar grid): `vpermps` looks a 16-float table up with the
//!   low 4 bits of each dword index, so zero-extended code bytes index with their low nibble
//!   directly and with their high nibble after one shift.
//!
//! Both produce their floats in a fixed order that is not the code order (unpacks interleave
//! within 128-bit lanes); the activations are laid out in that same order once per call
//! ([`Plan::prepare_activations`]), which makes the permutation free. In both, each 128-bit lane
//! of a register holds codes of one run of 16 consecutive codes, so one scale per lane is
//! correct whenever groups hold whole runs (`group_size % (16·p) == 0`); the scales of a row are
//! expanded to one f32 per run before the row ([`Plan::expand_lane_scales`]).
//!
//! bf16 activations on a bf16 grid with p = 2 ([`Plan::rows_bf16_dots`], where the CPU has
//! AVX-512 BF16): the rotated activations are rounded to bf16, and each code's two looked-up bf16
//! coordinates meet its two activations in one `vdpbf16ps` lane (4 fewer unpacks and half the
//! multiply instructions per 64 codes; 1.1–1.3× on SmolLM2's layers).
//!
//! The batched path's dequantization ([`Plan::dequantize_rows`], byte planes with p ≤ 2) runs the
//! same lookups on code bytes permuted first (`Plan::natural`), so that the floats come out in
//! code order, then interleaves the coordinates and writes grid point × scale as f32 or bf16.
//!
//! Safety: [`Plan::new`] is the only constructor and checks the CPU features at run time, so
//! holding a `Plan` proves the `target_feature` functions may run. Every pointer read stays in
//! its slice: code loads past a row's end are masked (masked-off bytes are never read), and the
//! activation and lane-scale buffers are sized in whole chunks.
#![allow(unsafe_code)]

use super::LutWeights;
use crate::codec::Layout;
use half::f16;
use std::arch::x86_64::*;

/// Codes per chunk.
const CHUNK: usize = 64;
/// Activation rows processed per pass over a row's codes.
const BATCH_BLOCK: usize = 8;

/// Whether this CPU has the instructions the kernels use.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Front {
    /// Byte-plane lookups; tables of 64 · `table_regs` entries. With `bf16`, every grid value is
    /// a bf16 (its low 16 bits are zero), so only its two high bytes are looked up. With
    /// `symmetric`, n = 256 and point c + 128 = −point c: tables of the first 128 points.
    BytePlanes {
        table_regs: usize,
        bf16: bool,
        symmetric: bool,
    },
    /// p = 1, n = 16, 4-bit codes.
    Nibbles,
}

/// Everything a call needs, resolved once: tables in registers' layout, unpack constants.
pub(super) struct Plan {
    front: Front,
    p: usize,
    bits: u32,
    row_bytes: usize,
    groups: usize,
    /// 64-code chunks per row (the last one may be partial).
    chunks: usize,
    /// Runs of 16 codes per group.
    lanes_per_group: usize,
    /// Prepared activation floats per batch row: `chunks · 64 · p`.
    stride: usize,
    /// Codes per row.
    tuples: usize,
    /// Byte planes: `4p` planes × `table_regs` registers; nibbles: one register of 16 floats.
    tables: Vec<__m512i>,
    /// Sub-byte unpacking: which source byte each output byte's qword window starts from,
    /// the bit offset of each code in its qword, and the code mask.
    spread: __m512i,
    shifts: __m512i,
    code_mask: __m512i,
    /// Dequantization: the byte permutation that makes the lookups come out in code order.
    natural: __m512i,
    /// bf16 grid, p = 2 and AVX-512 BF16: bf16 activations may take `vdpbf16ps` (see
    /// [`Plan::rows_bf16_dots`]).
    bf16_dots: bool,
}

/// Per-thread buffers.
pub(super) struct Scratch {
    lane_scales: Vec<f32>,
}

impl Plan {
    /// The plan for these weights, or why the kernels cannot take them.
    pub(super) fn new(w: &LutWeights<'_>, layout: &Layout) -> Result<Plan, String> {
        if !available() {
            return Err("this CPU lacks AVX-512 F/BW/VL/VBMI".into());
        }
        // p = 4 only with n = 256 (the 2-bit vector grid); p = 3 is left to the other paths.
        if w.n > 256 || !(w.p <= 2 || (w.p == 4 && w.n == 256)) {
            return Err(format!(
                "it takes p ≤ 2 with n ≤ 256, or p = 4 with n = 256 (got p = {}, n = {})",
                w.p, w.n
            ));
        }
        if !w.group_size.is_multiple_of(16 * w.p) {
            return Err(format!(
                "it needs group_size to be a multiple of 16·p = {} (got {})",
                16 * w.p,
                w.group_size
            ));
        }
        let bits = w.n.trailing_zeros();
        let front = if w.p == 1 && w.n == 16 {
            Front::Nibbles
        } else {
            let symmetric = w.n == 256
                && (0..128 * w.p)
                    .all(|i| w.grid[128 * w.p + i].to_bits() == (-w.grid[i]).to_bits());
            Front::BytePlanes {
                table_regs: if symmetric { 2 } else { w.n.div_ceil(64) },
                symmetric,
                // Two planes instead of four (about 1.45× faster for p = 2, n = 256 here); the
                // p = 1 grids keep four (few instantiations, and n = 16 has its own front end).
                bf16: w.p >= 2 && w.grid.iter().all(|v| v.to_bits() & 0xFFFF == 0),
            }
        };
        let tables = match front {
            Front::Nibbles => {
                let mut t = [0f32; 16];
                t.copy_from_slice(w.grid);
                vec![f32s_to_m512i(&t)]
            }
            Front::BytePlanes {
                table_regs, bf16, ..
            } => {
                let bytes = if bf16 { 2..4 } else { 0..4 };
                let mut regs = Vec::with_capacity(bytes.len() * w.p * table_regs);
                for component in 0..w.p {
                    for byte in bytes.clone() {
                        let mut plane = vec![0u8; 64 * table_regs];
                        for (c, entry) in
                            plane.iter_mut().enumerate().take(w.n.min(64 * table_regs))
                        {
                            *entry = w.grid[c * w.p + component].to_le_bytes()[byte];
                        }
                        regs.extend(plane.chunks_exact(64).map(bytes_to_m512i));
                    }
                }
                regs
            }
        };
        // Sub-byte codes: the 8 codes of qword q occupy bits [q·8·bits, (q+1)·8·bits) of the
        // chunk, i.e. start in byte q·bits; the window of qword q is bytes q·bits .. q·bits + 8.
        let b = bits as usize;
        let mut spread = [0u8; 64];
        let mut shifts = [0u8; 64];
        for q in 0..8 {
            for i in 0..8 {
                spread[8 * q + i] = (q * b + i).min(63) as u8;
                shifts[8 * q + i] = (i * b) as u8;
            }
        }
        let chunks = layout.tuples.div_ceil(CHUNK);
        // Lookups put the code at byte 16L + 4i + e into register i, lane L, element e; reading
        // code 16i + 4L + e there puts codes 16i .. 16i + 16 into register i, in order.
        let mut natural = [0u8; 64];
        for (q, byte) in natural.iter_mut().enumerate() {
            let (lane, i, e) = (q / 16, q % 16 / 4, q % 4);
            *byte = (16 * i + 4 * lane + e) as u8;
        }
        Ok(Plan {
            front,
            p: w.p,
            bits,
            row_bytes: layout.row_bytes,
            groups: layout.groups,
            chunks,
            lanes_per_group: w.group_size / (16 * w.p),
            stride: chunks * CHUNK * w.p,
            tuples: layout.tuples,
            tables,
            spread: bytes_to_m512i(&spread),
            shifts: bytes_to_m512i(&shifts),
            code_mask: bytes_to_m512i(&[((1u32 << bits.min(8)) - 1) as u8; 64]),
            natural: bytes_to_m512i(&natural),
            bf16_dots: w.p == 2
                && matches!(front, Front::BytePlanes { bf16: true, .. })
                && is_x86_feature_detected!("avx512bf16"),
        })
    }

    /// The path and its front end: "avx512/planes", "avx512/planes-bf16" (each with "-sym" for
    /// symmetric grids) or "avx512/nibbles".
    pub(super) fn name(&self) -> &'static str {
        match self.front {
            Front::BytePlanes {
                bf16, symmetric, ..
            } => match (bf16, symmetric) {
                (false, false) => "avx512/planes",
                (true, false) => "avx512/planes-bf16",
                (false, true) => "avx512/planes-sym",
                (true, true) => "avx512/planes-bf16-sym",
            },
            Front::Nibbles => "avx512/nibbles",
        }
    }

    pub(super) fn scratch(&self) -> Scratch {
        Scratch {
            lane_scales: vec![0.0; self.chunks * 4],
        }
    }

    /// Whether [`Plan::dequantize_rows`] takes these weights (byte planes, p ≤ 2).
    pub(super) fn can_dequantize(&self) -> bool {
        matches!(self.front, Front::BytePlanes { .. }) && self.p <= 2
    }

    /// Ŵ_rot for the rows of `codes` / `scales`: grid point × scale per rotated value, in code
    /// order, `tuples · p` values per row of `out` (f32, or bf16 rounded to nearest even), the
    /// same values as the scalar dequantization. Values past the padded row are left to the
    /// caller. Needs [`Plan::can_dequantize`].
    pub(super) fn dequantize_rows(
        &self,
        codes: &[u8],
        scales: &[f16],
        scratch: &mut Scratch,
        out: super::Outputs<'_>,
    ) {
        assert!(
            self.can_dequantize(),
            "dequantize_rows needs byte planes and p ≤ 2"
        );
        let width = self.tuples * self.p;
        let rows = codes.len() / self.row_bytes;
        assert_eq!(codes.len(), rows * self.row_bytes);
        assert_eq!(scales.len(), rows * self.groups);
        let (out_ptr, bf16_out) = match out {
            super::Outputs::F32(y) => {
                assert_eq!(y.len(), rows * width);
                (y.as_mut_ptr() as *mut u8, false)
            }
            super::Outputs::Bf16(y) => {
                assert_eq!(y.len(), rows * width);
                (y.as_mut_ptr() as *mut u8, true)
            }
        };
        let value_bytes = if bf16_out { 2 } else { 4 };
        let kernel = self.dequantize_kernel(bf16_out);
        let lane_scales = &mut scratch.lane_scales;
        for (r, (row, row_scales)) in codes
            .chunks_exact(self.row_bytes)
            .zip(scales.chunks_exact(self.groups))
            .enumerate()
        {
            self.expand_lane_scales(row_scales, lane_scales);
            // SAFETY: holding a `Plan` proves the CPU features; row r of `out` holds `width`
            // values of `value_bytes` (asserted above); `lane_scales` holds 4 · chunks.
            unsafe {
                kernel(
                    self,
                    row,
                    lane_scales.as_slice(),
                    out_ptr.add(r * width * value_bytes),
                )
            };
        }
    }

    /// The monomorphized dequantization kernel for this plan (byte planes, p ≤ 2).
    fn dequantize_kernel(&self, bf16_out: bool) -> DequantizeKernel {
        let Front::BytePlanes {
            table_regs,
            bf16,
            symmetric,
        } = self.front
        else {
            unreachable!("checked by can_dequantize")
        };
        macro_rules! by_output {
            ($($consts:tt),*) => {
                if bf16_out {
                    dequantize_row::<$($consts,)* true>
                } else {
                    dequantize_row::<$($consts,)* false>
                }
            };
        }
        match (self.p, table_regs, bf16, symmetric) {
            (1, 1, false, false) => by_output!(1, 1, false, false),
            (1, 2, false, false) => by_output!(1, 2, false, false),
            (1, 4, false, false) => by_output!(1, 4, false, false),
            (2, 1, false, false) => by_output!(2, 1, false, false),
            (2, 2, false, false) => by_output!(2, 2, false, false),
            (2, 4, false, false) => by_output!(2, 4, false, false),
            (2, 1, true, false) => by_output!(2, 1, true, false),
            (2, 2, true, false) => by_output!(2, 2, true, false),
            (2, 4, true, false) => by_output!(2, 4, true, false),
            (1, 2, false, true) => by_output!(1, 2, false, true),
            (2, 2, false, true) => by_output!(2, 2, false, true),
            (2, 2, true, true) => by_output!(2, 2, true, true),
            (p, t, b, sym) => unreachable!(
                "no dequantization kernel for p = {p}, {t} table registers, bf16 {b}, symmetric {sym}"
            ),
        }
    }

    /// Whether bf16 activations can take [`Plan::rows_bf16_dots`].
    pub(super) fn takes_bf16_dots(&self) -> bool {
        self.bf16_dots
    }

    /// Rotated activations (`batch` rows of `tuples · 2`, zero past the padding) rounded to bf16
    /// as one dword per code (coordinate 0 in the low half), in the kernels' order: per batch
    /// row, per chunk, 64 dwords at [`Plan::position`].
    pub(super) fn prepare_activations_bf16(&self, x_rot: &[f32], batch: usize) -> Vec<u32> {
        debug_assert!(self.bf16_dots);
        let width = x_rot.len() / batch;
        let tuples = width / 2;
        let stride = self.chunks * CHUNK;
        let mut out = vec![0u32; batch * stride];
        for (dst, src) in out.chunks_exact_mut(stride).zip(x_rot.chunks_exact(width)) {
            for (k, chunk) in dst.chunks_exact_mut(CHUNK).enumerate() {
                for c in 0..CHUNK.min(tuples.saturating_sub(k * CHUNK)) {
                    let t = k * CHUNK + c;
                    let low = super::round_to_bf16(src[2 * t]).to_bits() as u32;
                    let high = super::round_to_bf16(src[2 * t + 1]).to_bits() as u32;
                    chunk[self.position(c)] = low | high << 16;
                }
            }
        }
        out
    }

    /// [`Plan::rows`] for bf16 activations from [`Plan::prepare_activations_bf16`]: each code's
    /// two bf16 grid coordinates times its two activations in one `vdpbf16ps` lane (products
    /// exact, summed in f32), per 16 codes × scale accumulated in f32. Needs
    /// [`Plan::takes_bf16_dots`].
    pub(super) fn rows_bf16_dots(
        &self,
        codes: &[u8],
        scales: &[f16],
        x: &[u32],
        batch: usize,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        assert!(
            self.bf16_dots,
            "rows_bf16_dots needs a bf16 grid, p = 2 and AVX-512 BF16"
        );
        let stride = self.chunks * CHUNK;
        assert_eq!(
            x.len(),
            batch * stride,
            "activations not prepared for this plan"
        );
        assert_eq!(codes.len(), out.len() / batch * self.row_bytes);
        assert_eq!(scales.len(), out.len() / batch * self.groups);
        let Front::BytePlanes {
            table_regs,
            symmetric,
            ..
        } = self.front
        else {
            unreachable!("bf16 dots need byte planes")
        };
        let lane_scales = &mut scratch.lane_scales;
        for ((row, row_scales), y) in codes
            .chunks_exact(self.row_bytes)
            .zip(scales.chunks_exact(self.groups))
            .zip(out.chunks_exact_mut(batch))
        {
            self.expand_lane_scales(row_scales, lane_scales);
            for b0 in (0..batch).step_by(BATCH_BLOCK) {
                let nb = BATCH_BLOCK.min(batch - b0);
                let xb = &x[b0 * stride..(b0 + nb) * stride];
                macro_rules! by_batch {
                    ($t:literal, $sym:literal) => {
                        match nb {
                            1 => dot_kernel::<$t, $sym, 1>,
                            2 => dot_kernel::<$t, $sym, 2>,
                            3 => dot_kernel::<$t, $sym, 3>,
                            4 => dot_kernel::<$t, $sym, 4>,
                            5 => dot_kernel::<$t, $sym, 5>,
                            6 => dot_kernel::<$t, $sym, 6>,
                            7 => dot_kernel::<$t, $sym, 7>,
                            8 => dot_kernel::<$t, $sym, 8>,
                            _ => unreachable!("batch blocks hold 1 to {BATCH_BLOCK} rows"),
                        }
                    };
                }
                let kernel: DotKernel = match (table_regs, symmetric) {
                    (1, false) => by_batch!(1, false),
                    (2, false) => by_batch!(2, false),
                    (4, false) => by_batch!(4, false),
                    (2, true) => by_batch!(2, true),
                    (t, sym) => unreachable!("no bf16 dot kernel for {t} tables, symmetric {sym}"),
                };
                // SAFETY: `bf16_dots` proves the CPU features (`Plan::new` checked AVX-512
                // F/BW/VL/VBMI and BF16); the slices have the lengths the kernel reads.
                unsafe { kernel(self, row, lane_scales.as_slice(), xb, &mut y[b0..b0 + nb]) };
            }
        }
    }

    /// Where code `c` (0..64) of a chunk sits among one coordinate's 64 floats.
    fn position(&self, c: usize) -> usize {
        match self.front {
            // Register i = (c % 16) / 4 of the unpacks holds, in lane L = c / 16, element c % 4.
            Front::BytePlanes { .. } => (c % 16 / 4) * 16 + (c / 16) * 4 + c % 4,
            // Half h = c / 32 of the chunk: even codes (low nibbles) first, then odd ones.
            Front::Nibbles => (c / 32) * 32 + (c % 2) * 16 + (c % 32) / 2,
        }
    }

    /// Rotated activations (`batch` rows of `tuples · p`, zero past the padding) in the
    /// kernels' order: per batch row, per chunk, per coordinate j, 64 floats.
    pub(super) fn prepare_activations(&self, x_rot: &[f32], batch: usize) -> Vec<f32> {
        let p = self.p;
        let width = x_rot.len() / batch;
        let tuples = width / p;
        let mut out = vec![0f32; batch * self.stride];
        for (dst, src) in out
            .chunks_exact_mut(self.stride)
            .zip(x_rot.chunks_exact(width))
        {
            for (k, chunk) in dst.chunks_exact_mut(CHUNK * p).enumerate() {
                for c in 0..CHUNK.min(tuples.saturating_sub(k * CHUNK)) {
                    let pos = self.position(c);
                    for j in 0..p {
                        chunk[j * CHUNK + pos] = src[(k * CHUNK + c) * p + j];
                    }
                }
            }
        }
        out
    }

    /// One f32 scale per run of 16 codes (4 per chunk). Runs that start past the padded row have
    /// zero activations, so any finite scale does for them (0 or the last group's).
    fn expand_lane_scales(&self, scales: &[f16], out: &mut [f32]) {
        let m = self.lanes_per_group;
        match m {
            // The common layouts (one, two or four runs per group: 16·p, 32·p or 64·p values per
            // scale) in SIMD.
            // SAFETY: `Plan` exists, so AVX-512F/BW and F16C are available (see `Plan::new`).
            1 | 2 | 4 => unsafe { expand_lane_scales_simd(bytemuck::cast_slice(scales), m, out) },
            _ => {
                let last = self.groups - 1;
                for (lane, o) in out.iter_mut().enumerate() {
                    *o = scales[(lane / m).min(last)].to_f32();
                }
            }
        }
    }

    /// `out` (rows × batch, row-major) for the rows of `codes` / `scales`; `x` from
    /// [`Plan::prepare_activations`] for `batch` rows.
    pub(super) fn rows(
        &self,
        codes: &[u8],
        scales: &[f16],
        x: &[f32],
        batch: usize,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        assert_eq!(
            x.len(),
            batch * self.stride,
            "activations not prepared for this plan"
        );
        assert_eq!(codes.len(), out.len() / batch * self.row_bytes);
        assert_eq!(scales.len(), out.len() / batch * self.groups);
        let lane_scales = &mut scratch.lane_scales;
        for ((row, row_scales), y) in codes
            .chunks_exact(self.row_bytes)
            .zip(scales.chunks_exact(self.groups))
            .zip(out.chunks_exact_mut(batch))
        {
            self.expand_lane_scales(row_scales, lane_scales);
            for b0 in (0..batch).step_by(BATCH_BLOCK) {
                let nb = BATCH_BLOCK.min(batch - b0);
                let xb = &x[b0 * self.stride..(b0 + nb) * self.stride];
                // SAFETY: holding a `Plan` proves the CPU features (`Plan::new`); the slices
                // have the lengths the kernels read (asserted above and in `kernel_for`).
                unsafe {
                    self.kernel_for(nb)(self, row, lane_scales.as_slice(), xb, &mut y[b0..b0 + nb])
                };
            }
        }
    }

    /// The monomorphized kernel for this plan's front end and a batch block of `nb` rows.
    fn kernel_for(&self, nb: usize) -> Kernel {
        macro_rules! by_batch {
            ($f:ident, $($consts:tt),*) => {
                match nb {
                    1 => $f::<$($consts,)* 1>,
                    2 => $f::<$($consts,)* 2>,
                    3 => $f::<$($consts,)* 3>,
                    4 => $f::<$($consts,)* 4>,
                    5 => $f::<$($consts,)* 5>,
                    6 => $f::<$($consts,)* 6>,
                    7 => $f::<$($consts,)* 7>,
                    8 => $f::<$($consts,)* 8>,
                    _ => unreachable!("batch blocks hold 1 to {BATCH_BLOCK} rows"),
                }
            };
        }
        match (self.front, self.p) {
            (Front::Nibbles, _) => by_batch!(nibble_kernel,),
            (
                Front::BytePlanes {
                    table_regs,
                    bf16,
                    symmetric,
                },
                p,
            ) => match (p, table_regs, bf16, symmetric) {
                (1, 1, false, false) => by_batch!(plane_kernel, 1, 1, false, false),
                (1, 2, false, false) => by_batch!(plane_kernel, 1, 2, false, false),
                (1, 4, false, false) => by_batch!(plane_kernel, 1, 4, false, false),
                (2, 1, false, false) => by_batch!(plane_kernel, 2, 1, false, false),
                (2, 2, false, false) => by_batch!(plane_kernel, 2, 2, false, false),
                (2, 4, false, false) => by_batch!(plane_kernel, 2, 4, false, false),
                (4, 4, false, false) => by_batch!(plane_kernel, 4, 4, false, false),
                (2, 1, true, false) => by_batch!(plane_kernel, 2, 1, true, false),
                (2, 2, true, false) => by_batch!(plane_kernel, 2, 2, true, false),
                (2, 4, true, false) => by_batch!(plane_kernel, 2, 4, true, false),
                (4, 4, true, false) => by_batch!(plane_kernel, 4, 4, true, false),
                (1, 2, false, true) => by_batch!(plane_kernel, 1, 2, false, true),
                (2, 2, false, true) => by_batch!(plane_kernel, 2, 2, false, true),
                (4, 2, false, true) => by_batch!(plane_kernel, 4, 2, false, true),
                (2, 2, true, true) => by_batch!(plane_kernel, 2, 2, true, true),
                (4, 2, true, true) => by_batch!(plane_kernel, 4, 2, true, true),
                _ => unreachable!(
                    "no kernel for p = {p}, {table_regs} table registers, bf16 {bf16}, \
                     symmetric {symmetric}"
                ),
            },
        }
    }
}

/// A row kernel: (plan, one row's codes, its lane scales, `B` rows of prepared activations,
/// `B` outputs).
type Kernel = unsafe fn(&Plan, &[u8], &[f32], &[f32], &mut [f32]);

/// A bf16-dot row kernel: (plan, one row's codes, its lane scales, `B` rows of prepared bf16
/// activation pairs, `B` outputs).
type DotKernel = unsafe fn(&Plan, &[u8], &[f32], &[u32], &mut [f32]);

/// A dequantization row kernel: (plan, one row's codes, its lane scales, where the row's
/// `tuples · p` f32 or bf16 values go).
type DequantizeKernel = unsafe fn(&Plan, &[u8], &[f32], *mut u8);

fn bytes_to_m512i(bytes: &[u8]) -> __m512i {
    let mut a = [0u8; 64];
    a.copy_from_slice(bytes);
    // SAFETY: [u8; 64] and __m512i have the same size and every bit pattern is valid for both.
    unsafe { std::mem::transmute::<[u8; 64], __m512i>(a) }
}

fn f32s_to_m512i(values: &[f32; 16]) -> __m512i {
    // SAFETY: [f32; 16] and __m512i have the same size and every bit pattern is valid for both.
    unsafe { std::mem::transmute::<[f32; 16], __m512i>(*values) }
}

/// Lane scales for `m` ∈ {1, 2, 4} runs per group, 16 lanes per step; lanes past the last
/// group get 0.
///
/// # Safety
/// Needs AVX-512F/BW/VL and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn expand_lane_scales_simd(scales: &[u16], m: usize, out: &mut [f32]) {
    let groups_per_step = 16 / m;
    // Lane l of a step takes scale l / m of the step's groups.
    let index = match m {
        1 => _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        2 => _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
        _ => _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
    };
    let mut lanes = 0;
    let mut group = 0;
    while lanes < out.len() {
        let groups_left = scales.len().saturating_sub(group).min(16);
        let lanes_left = (out.len() - lanes).min(16);
        // SAFETY: the masked load reads only the `groups_left` scales from `group` (none when
        // past the end; the pointer is then not dereferenced), the masked store writes only the
        // `lanes_left` lanes from `lanes`.
        unsafe {
            let from = scales.as_ptr().wrapping_add(group) as *const i16;
            let halves = _mm256_maskz_loadu_epi16(((1u32 << groups_left) - 1) as u16, from);
            let values = _mm512_permutexvar_ps(index, _mm512_cvtph_ps(halves));
            let to = out.as_mut_ptr().add(lanes);
            _mm512_mask_storeu_ps(to, ((1u32 << lanes_left) - 1) as u16, values);
        }
        group += groups_per_step;
        lanes += 16;
    }
}

/// 64 codes of chunk `k` of `row` as bytes (zero past the row's end).
///
/// # Safety
/// Needs AVX-512F/BW/VL/VBMI; chunk `k` must start inside the row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn load_codes(plan: &Plan, row: &[u8], k: usize) -> __m512i {
    if plan.bits == 8 {
        let start = k * CHUNK;
        let avail = row.len() - start;
        // SAFETY: `start < row.len()`; the full load reads 64 bytes only when they are in the
        // row, the masked load reads only the `avail` in-row bytes (masked-off bytes are not
        // accessed and cannot fault).
        unsafe {
            let ptr = row.as_ptr().add(start);
            if avail >= CHUNK {
                _mm512_loadu_si512(ptr as *const __m512i)
            } else {
                _mm512_maskz_loadu_epi8((1u64 << avail) - 1, ptr as *const i8)
            }
        }
    } else {
        let chunk_bytes = 8 * plan.bits as usize;
        let start = k * chunk_bytes;
        let avail = (row.len() - start).min(chunk_bytes);
        // SAFETY: as above, only the `avail` in-row bytes from `start` are read.
        let raw = unsafe {
            _mm512_maskz_loadu_epi8((1u64 << avail) - 1, row.as_ptr().add(start) as *const i8)
        };
        let windows = _mm512_permutexvar_epi8(plan.spread, raw);
        _mm512_and_si512(
            _mm512_multishift_epi64_epi8(plan.shifts, windows),
            plan.code_mask,
        )
    }
}

/// One coordinate's bytes, looked up in a table of `T` registers.
///
/// # Safety
/// Needs AVX-512F/BW/VL/VBMI; `table` points at `T` registers.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn lookup_plane<const T: usize>(
    table: *const __m512i,
    idx: __m512i,
    high: __mmask64,
) -> __m512i {
    // SAFETY: `table` holds T registers (caller).
    unsafe {
        match T {
            1 => _mm512_permutexvar_epi8(idx, *table),
            2 => _mm512_permutex2var_epi8(*table, idx, *table.add(1)),
            _ => {
                let low = _mm512_permutex2var_epi8(*table, idx, *table.add(1));
                let upper = _mm512_permutex2var_epi8(*table.add(2), idx, *table.add(3));
                _mm512_mask_blend_epi8(high, low, upper)
            }
        }
    }
}

/// The byte-plane front end: chunk `k`'s codes to `[coordinate][register]` floats.
///
/// # Safety
/// Needs AVX-512F/BW/VL/VBMI; chunk `k` must start inside `row`; `plan.tables` holds
/// `4·P·T` registers (`2·P·T` with `BF16`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn plane_front<const P: usize, const T: usize, const BF16: bool, const SYM: bool>(
    plan: &Plan,
    row: &[u8],
    k: usize,
) -> [[__m512; 4]; P] {
    // SAFETY: forwarded from the caller's contract.
    unsafe { plane_lookup::<P, T, BF16, SYM>(plan, load_codes(plan, row, k)) }
}

/// The byte-plane lookups of 64 code bytes `idx`: register i of coordinate j holds, in 128-bit
/// lane L, the values of the codes at byte positions 16L + 4i .. 16L + 4i + 4.
///
/// # Safety
/// Needs AVX-512F/BW/VL/VBMI; `plan.tables` holds `4·P·T` registers (`2·P·T` with `BF16`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn plane_lookup<const P: usize, const T: usize, const BF16: bool, const SYM: bool>(
    plan: &Plan,
    idx: __m512i,
) -> [[__m512; 4]; P] {
    let high = _mm512_movepi8_mask(idx);
    let tables = plan.tables.as_ptr();
    let sign_bit = _mm512_set1_epi8(0x80u8 as i8);
    // Symmetric grids: the tables hold points 0..128 (`vpermt2b` ignores index bit 7), and
    // codes from 128 on are their negations: bit 7 of the code is xor-ed into the sign byte
    // (ternary-logic 0x78: a ^ (b & c)).
    let signed = |sign_byte: __m512i| {
        if SYM {
            _mm512_ternarylogic_epi32::<0x78>(sign_byte, idx, sign_bit)
        } else {
            sign_byte
        }
    };
    let mut out = [[_mm512_setzero_ps(); 4]; P];
    if BF16 {
        let zero = _mm512_setzero_si512();
        for (j, coordinate) in out.iter_mut().enumerate() {
            // SAFETY: planes 2j and 2j + 1 of T registers each are within the 2·P·T tables.
            let (b2, b3) = unsafe {
                (
                    lookup_plane::<T>(tables.add(2 * j * T), idx, high),
                    lookup_plane::<T>(tables.add((2 * j + 1) * T), idx, high),
                )
            };
            let b3 = signed(b3);
            // bf16 words (codes 16L + 0..7 and 16L + 8..15 in lane L), then each word as the
            // high half of a dword: the same register order as the four-plane path.
            let low = _mm512_unpacklo_epi8(b2, b3);
            let upper = _mm512_unpackhi_epi8(b2, b3);
            *coordinate = [
                _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, low)),
                _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, low)),
                _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, upper)),
                _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, upper)),
            ];
        }
        return out;
    }
    for (j, coordinate) in out.iter_mut().enumerate() {
        let mut planes = [_mm512_setzero_si512(); 4];
        for (q, plane) in planes.iter_mut().enumerate() {
            // SAFETY: planes 4j .. 4j + 4 of T registers each are within the 4·P·T tables.
            *plane = unsafe { lookup_plane::<T>(tables.add((4 * j + q) * T), idx, high) };
        }
        let [b0, b1, b2, b3] = planes;
        let b3 = signed(b3);
        let l01 = _mm512_unpacklo_epi8(b0, b1);
        let h01 = _mm512_unpackhi_epi8(b0, b1);
        let l23 = _mm512_unpacklo_epi8(b2, b3);
        let h23 = _mm512_unpackhi_epi8(b2, b3);
        *coordinate = [
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(l01, l23)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(l01, l23)),
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(h01, h23)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(h01, h23)),
        ];
    }
    out
}

/// The 4 run scales of chunk `k`, each broadcast over its 128-bit lane.
///
/// # Safety
/// Needs AVX-512F; `lane_scales` holds at least `4k + 4` values.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn chunk_scales(lane_scales: &[f32], k: usize) -> __m128 {
    debug_assert!(lane_scales.len() >= 4 * k + 4);
    // SAFETY: 4 floats from 4k are in bounds (caller).
    unsafe { _mm_loadu_ps(lane_scales.as_ptr().add(4 * k)) }
}

/// Byte-plane row kernel for `B` batch rows.
///
/// # Safety
/// Needs AVX-512F/BW/VL/VBMI and FMA (a `Plan` proves it); `row` is one row's codes,
/// `lane_scales` holds `4 · chunks`, `x` holds `B · stride`, `out` holds `B`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,fma")]
unsafe fn plane_kernel<
    const P: usize,
    const T: usize,
    const BF16: bool,
    const SYM: bool,
    const B: usize,
>(
    plan: &Plan,
    row: &[u8],
    lane_scales: &[f32],
    x: &[f32],
    out: &mut [f32],
) {
    assert!(lane_scales.len() >= 4 * plan.chunks && x.len() >= B * plan.stride && out.len() >= B);
    let per_lane = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let mut acc = [_mm512_setzero_ps(); B];
    for k in 0..plan.chunks {
        // SAFETY: chunk k < chunks starts inside the row; tables per `Plan::new`.
        let f = unsafe { plane_front::<P, T, BF16, SYM>(plan, row, k) };
        // SAFETY: lane_scales holds 4·chunks (asserted).
        let sv = _mm512_permutexvar_ps(
            per_lane,
            _mm512_castps128_ps512(unsafe { chunk_scales(lane_scales, k) }),
        );
        // The same operations in the same order for every batch row, so a row's result does not
        // depend on the batch it came in.
        for (b, acc_b) in acc.iter_mut().enumerate() {
            let xb = x.as_ptr().wrapping_add(b * plan.stride + k * CHUNK * P);
            let mut part = [_mm512_setzero_ps(); 2];
            for (j, coordinate) in f.iter().enumerate() {
                for (i, &fi) in coordinate.iter().enumerate() {
                    // SAFETY: batch row b < B of x, chunk k's P·64 floats (asserted length).
                    let xv = unsafe { _mm512_loadu_ps(xb.add(j * CHUNK + 16 * i)) };
                    part[i & 1] = _mm512_fmadd_ps(fi, xv, part[i & 1]);
                }
            }
            *acc_b = _mm512_fmadd_ps(_mm512_add_ps(part[0], part[1]), sv, *acc_b);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(a);
    }
}

/// Nibble row kernel (p = 1, n = 16) for `B` batch rows.
///
/// # Safety
/// As [`plane_kernel`]; `plan.tables[0]` holds the 16 grid values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,fma")]
unsafe fn nibble_kernel<const B: usize>(
    plan: &Plan,
    row: &[u8],
    lane_scales: &[f32],
    x: &[f32],
    out: &mut [f32],
) {
    assert!(lane_scales.len() >= 4 * plan.chunks && x.len() >= B * plan.stride && out.len() >= B);
    let table = _mm512_castsi512_ps(plan.tables[0]);
    // Half h of a chunk holds runs 2h and 2h + 1: lanes 0-1 of its registers are run 2h.
    let half_lanes = [
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
        _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
    ];
    let mut acc = [[_mm512_setzero_ps(); 2]; B];
    let full_chunks = row.len() / 32;
    for k in 0..plan.chunks {
        // SAFETY: chunk k starts inside the row (k < chunks); a full chunk's 32 bytes are in
        // the row, a partial one's bytes are loaded masked to the row's end.
        let bytes = unsafe {
            let ptr = row.as_ptr().add(32 * k);
            if k < full_chunks {
                _mm256_loadu_si256(ptr as *const __m256i)
            } else {
                _mm256_maskz_loadu_epi8((1u32 << (row.len() - 32 * k)) - 1, ptr as *const i8)
            }
        };
        // SAFETY: lane_scales holds 4·chunks (asserted).
        let scales4 = _mm512_castps128_ps512(unsafe { chunk_scales(lane_scales, k) });
        let xk = x.as_ptr().wrapping_add(k * CHUNK);
        for h in 0..2 {
            let idx = _mm512_cvtepu8_epi32(if h == 0 {
                _mm256_castsi256_si128(bytes)
            } else {
                _mm256_extracti128_si256::<1>(bytes)
            });
            let even = _mm512_permutexvar_ps(idx, table);
            let odd = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(idx), table);
            let sv = _mm512_permutexvar_ps(half_lanes[h], scales4);
            for (b, acc_b) in acc.iter_mut().enumerate() {
                let xb = xk.wrapping_add(b * plan.stride);
                // SAFETY: batch row b < B of x, chunk k's 64 floats (asserted length).
                let (xe, xo) = unsafe {
                    (
                        _mm512_loadu_ps(xb.add(32 * h)),
                        _mm512_loadu_ps(xb.add(32 * h + 16)),
                    )
                };
                let part = _mm512_fmadd_ps(odd, xo, _mm512_mul_ps(even, xe));
                acc_b[h] = _mm512_fmadd_ps(part, sv, acc_b[h]);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
    }
}

/// Store the first `count` (≤ 16) values of `v` at `to`: as f32, or rounded to nearest even
/// bf16 (the scalar path's `finite_to_bf16`, exact for finite values).
///
/// # Safety
/// Needs AVX-512F/BW/VL; `to` holds `count` values of the output type.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store_values<const BF16_OUT: bool>(v: __m512, to: *mut u8, count: usize) {
    let mask = ((1u32 << count) - 1) as u16;
    if BF16_OUT {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
        // SAFETY: the masked store writes only the `count` values `to` holds (caller).
        unsafe { _mm256_mask_storeu_epi16(to as *mut i16, mask, _mm512_cvtepi32_epi16(rounded)) }
    } else {
        // SAFETY: as above.
        unsafe { _mm512_mask_storeu_ps(to as *mut f32, mask, v) }
    }
}

/// Dequantize one row (byte planes, `P` ≤ 2): code c's `P` values × its run's scale at values
/// `P·c ..`, f32 or (with `BF16_OUT`) bf16.
///
/// # Safety
/// Needs AVX-512F/BW/VL/VBMI (a `Plan` proves it); `row` is one row's codes, `lane_scales`
/// holds `4 · chunks`, `out` holds `tuples · P` values of the output type.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn dequantize_row<
    const P: usize,
    const T: usize,
    const BF16: bool,
    const SYM: bool,
    const BF16_OUT: bool,
>(
    plan: &Plan,
    row: &[u8],
    lane_scales: &[f32],
    out: *mut u8,
) {
    assert!(P <= 2 && lane_scales.len() >= 4 * plan.chunks);
    let value_bytes = if BF16_OUT { 2 } else { 4 };
    // Pairs (coordinate 0, coordinate 1) of codes 0..8 and 8..16 of a run, from the unpacks.
    let first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    let second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for k in 0..plan.chunks {
        // SAFETY: chunk k < chunks starts inside the row; tables per `Plan::new`.
        let f = unsafe {
            let idx = _mm512_permutexvar_epi8(plan.natural, load_codes(plan, row, k));
            plane_lookup::<P, T, BF16, SYM>(plan, idx)
        };
        for run in 0..4 {
            let code = k * CHUNK + 16 * run;
            if code >= plan.tuples {
                break;
            }
            let values = (plan.tuples - code).min(16) * P;
            let scale = _mm512_set1_ps(lane_scales[4 * k + run]);
            let to = out.wrapping_add(code * P * value_bytes);
            if P == 1 {
                // SAFETY: the row's values from code · P on are in `out` (caller).
                unsafe { store_values::<BF16_OUT>(_mm512_mul_ps(f[0][run], scale), to, values) };
            } else {
                let lo = _mm512_unpacklo_ps(f[0][run], f[P - 1][run]);
                let hi = _mm512_unpackhi_ps(f[0][run], f[P - 1][run]);
                let a = _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), scale);
                let b = _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), scale);
                // SAFETY: as above; the second store only when values reach past 16.
                unsafe {
                    store_values::<BF16_OUT>(a, to, values.min(16));
                    if values > 16 {
                        store_values::<BF16_OUT>(b, to.add(16 * value_bytes), values - 16);
                    }
                }
            }
        }
    }
}

/// Byte-plane row kernel on a bf16 grid, p = 2, with bf16 activation pairs, for `B` batch rows:
/// the two high bytes of each coordinate looked up (as in [`plane_front`] with `BF16`), put
/// together as one (coordinate 0, coordinate 1) bf16 pair per code, `vdpbf16ps` against the
/// activation pairs.
///
/// # Safety
/// Needs AVX-512F/BW/VL/VBMI, FMA and AVX-512 BF16 (`Plan::bf16_dots` proves them); `row` is one
/// row's codes, `lane_scales` holds `4 · chunks`, `x` holds `B · chunks · 64`, `out` holds `B`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,fma,avx512bf16")]
unsafe fn dot_kernel<const T: usize, const SYM: bool, const B: usize>(
    plan: &Plan,
    row: &[u8],
    lane_scales: &[f32],
    x: &[u32],
    out: &mut [f32],
) {
    let stride = plan.chunks * CHUNK;
    assert!(lane_scales.len() >= 4 * plan.chunks && x.len() >= B * stride && out.len() >= B);
    let per_lane = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let sign_bit = _mm512_set1_epi8(0x80u8 as i8);
    let tables = plan.tables.as_ptr();
    let mut acc = [_mm512_setzero_ps(); B];
    for k in 0..plan.chunks {
        // SAFETY: chunk k < chunks starts inside the row; the tables hold 2 planes × 2
        // coordinates × T registers (`Plan::new` with a bf16 grid, p = 2).
        let (idx, b2_0, b3_0, b2_1, b3_1) = unsafe {
            let idx = load_codes(plan, row, k);
            let high = _mm512_movepi8_mask(idx);
            (
                idx,
                lookup_plane::<T>(tables, idx, high),
                lookup_plane::<T>(tables.add(T), idx, high),
                lookup_plane::<T>(tables.add(2 * T), idx, high),
                lookup_plane::<T>(tables.add(3 * T), idx, high),
            )
        };
        let signed = |sign_byte: __m512i| {
            if SYM {
                _mm512_ternarylogic_epi32::<0x78>(sign_byte, idx, sign_bit)
            } else {
                sign_byte
            }
        };
        let (b3_0, b3_1) = (signed(b3_0), signed(b3_1));
        // bf16 words of each coordinate (codes 16L + 0..8 and 16L + 8..16 of lane L), then
        // (coordinate 0, coordinate 1) dwords: register r holds code 16L + 4r + e.
        let (w0lo, w0hi) = (
            _mm512_unpacklo_epi8(b2_0, b3_0),
            _mm512_unpackhi_epi8(b2_0, b3_0),
        );
        let (w1lo, w1hi) = (
            _mm512_unpacklo_epi8(b2_1, b3_1),
            _mm512_unpackhi_epi8(b2_1, b3_1),
        );
        let pairs = [
            _mm512_unpacklo_epi16(w0lo, w1lo),
            _mm512_unpackhi_epi16(w0lo, w1lo),
            _mm512_unpacklo_epi16(w0hi, w1hi),
            _mm512_unpackhi_epi16(w0hi, w1hi),
        ];
        // SAFETY: lane_scales holds 4·chunks (asserted).
        let sv = _mm512_permutexvar_ps(
            per_lane,
            _mm512_castps128_ps512(unsafe { chunk_scales(lane_scales, k) }),
        );
        // The same operations in the same order for every batch row.
        for (b, acc_b) in acc.iter_mut().enumerate() {
            let xb = x.as_ptr().wrapping_add(b * stride + k * CHUNK);
            let mut part = [_mm512_setzero_ps(); 2];
            for (r, &w) in pairs.iter().enumerate() {
                // SAFETY: batch row b < B of x, chunk k's 64 dwords (asserted length).
                let xv = unsafe { _mm512_loadu_si512(xb.add(16 * r) as *const __m512i) };
                // SAFETY: __m512i and __m512bh are 64 bytes, any bit pattern valid for both.
                let (w, xv) = unsafe {
                    (
                        std::mem::transmute::<__m512i, __m512bh>(w),
                        std::mem::transmute::<__m512i, __m512bh>(xv),
                    )
                };
                part[r & 1] = _mm512_dpbf16_ps(part[r & 1], w, xv);
            }
            *acc_b = _mm512_fmadd_ps(_mm512_add_ps(part[0], part[1]), sv, *acc_b);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(a);
    }
}
