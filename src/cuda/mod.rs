//! CUDA inference for HIGGS layers: the activation Hadamard transform and the LUT-GEMM on packed
//! codes, compiled with NVRTC on first use for the device's architecture and launched on the
//! caller's stream (no synchronization, no allocation: the caller passes a workspace).
//!
//! `y = x Wᵀ` for a layer quantized by [`crate::codec`] is computed as `x_rot Ŵ_rotᵀ` with
//! `x_rot = H (signs ⊙ pad(x))` per Hadamard block (`kernels/hadamard.cu`) and
//! `Ŵ_rot[r, k] = grid[code] · scale[r, k / group_size]` read straight from the packed codes
//! (`kernels/lut_gemm.cu`). Supported: p ∈ {1, 2} with 2, 3 or 4 bits per weight, group sizes
//! that are multiples of 32, every Hadamard order of [`crate::hadamard`], f16 and bf16
//! activations, compute capability 8.0 or newer.
//!
//! Everything here takes device addresses as integers (PyTorch's `data_ptr()`); they must point
//! at live device memory of the sizes the arguments imply, on the device named, for as long as
//! the stream runs the launch. See `benches/GPU_NOTES.md` for measurements.

mod device;
pub mod source;

use crate::codec::{Layout, QuantSpec};
use crate::{HiggsError, Result};
use device::{device, Kernel, ModuleKey};
pub use source::ActType;
use source::LutKernel;

/// k values per warp super-step of the LUT-GEMM (must match `KSTEP` in `lut_gemm.cu`).
const KSTEP: usize = 128;
/// Warps per LUT-GEMM block (`WARPS`).
const WARPS: usize = 8;
/// Batch columns per LUT-GEMM launch slice (`MAX_COLS`).
const MAX_COLS: usize = 64;
const MAX_SPLITS: usize = 16;

/// `Ok(description of device 0)` when the driver, NVRTC and a GPU are there; otherwise why not.
pub fn status() -> std::result::Result<String, String> {
    let count = device::device_count()?;
    let d = device(0).map_err(|e| e.to_string())?;
    Ok(format!(
        "{count} CUDA device(s); device 0: {}, compute capability {}.{}, {} multiprocessors",
        d.name, d.arch.0, d.arch.1, d.sm_count
    ))
}

/// Optional overrides of the launch heuristics (0 = automatic), for benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    /// m16 row tiles per warp: 1 or 2.
    pub mt: usize,
    /// Split-K factor across blocks.
    pub splits: usize,
}

/// What the kernels need to know about a quantized layer; checked against the codec's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    pub in_features: usize,
    pub out_features: usize,
    pub p: usize,
    pub n: usize,
    pub hadamard_size: usize,
    pub group_size: usize,
    pub row_bytes: usize,
    pub groups: usize,
}

impl LayerShape {
    /// The codec's layout for this shape, after checking that the stored sizes agree with it and
    /// that the kernels cover the grid and group size.
    pub fn layout(&self) -> Result<(Layout, u32)> {
        if !matches!(self.p, 1 | 2) {
            return Err(HiggsError::Unsupported(format!(
                "the CUDA kernels take grids of dimension p = 1 or 2; this layer has p = {}",
                self.p
            )));
        }
        let bits = if self.n.is_power_of_two()
            && (self.n.trailing_zeros() as usize).is_multiple_of(self.p)
        {
            self.n.trailing_zeros() / self.p as u32
        } else {
            0
        };
        if !(2..=4).contains(&bits) {
            return Err(HiggsError::Unsupported(format!(
                "the CUDA kernels take 2, 3 or 4 bits per weight (n = 2^(p·bits)); this layer has p = {}, n = {}",
                self.p, self.n
            )));
        }
        if self.group_size == 0 || !self.group_size.is_multiple_of(32) {
            return Err(HiggsError::Unsupported(format!(
                "the CUDA kernels need a group size that is a multiple of 32; this layer has {}",
                self.group_size
            )));
        }
        let spec = QuantSpec {
            p: self.p,
            n: self.n,
            hadamard_size: Some(self.hadamard_size),
            group_size: self.group_size,
            seed: None,
        };
        let layout = spec.layout(self.out_features, self.in_features)?;
        if layout.row_bytes != self.row_bytes || layout.groups != self.groups {
            return Err(HiggsError::invalid(format!(
                "a {}×{} layer with p = {}, n = {}, Hadamard {}, group {} stores {} code bytes and {} scales per row; \
                 got {} and {}",
                self.out_features,
                self.in_features,
                self.p,
                self.n,
                self.hadamard_size,
                self.group_size,
                layout.row_bytes,
                layout.groups,
                self.row_bytes,
                self.groups
            )));
        }
        if layout.padded_cols > i32::MAX as usize / MAX_COLS
            || self.out_features > i32::MAX as usize / MAX_COLS
        {
            return Err(HiggsError::invalid(format!(
                "layer {}×{} is too large for the CUDA kernels",
                self.out_features, self.in_features
            )));
        }
        Ok((layout, bits))
    }
}

/// How one LUT-GEMM call is cut up, and where its pieces live in the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearPlan {
    /// Row-tile multiplier (rows per block = 16·mt) and batch tiles of 8 per warp.
    pub mt: usize,
    pub nt: usize,
    /// Row blocks of `16 · mt · 8 / kslices` rows.
    pub row_tiles: usize,
    pub splits: usize,
    /// `lut_gemv`: warps of a block that share their rows, each taking a slice of the item's
    /// super-steps (summed in shared memory: no split-K tail). 1 elsewhere.
    pub kslices: usize,
    pub steps_per_split: usize,
    pub total_steps: usize,
    pub batch_chunks: usize,
    /// Width of the rotated activations (padded_cols rounded up to a super-step).
    pub kp: usize,
    /// Bytes of the split-K counters (their own buffer, see [`LinearCall::counters`]).
    pub counters_bytes: usize,
    /// Always 0: the rotated activations start the workspace, so a later call through another
    /// layer with the same rotation can reuse them ([`LinearCall::rotated`]).
    pub x_rot_offset: usize,
    pub partials_offset: usize,
    /// Batch columns per split in the partials (`min(batch, 64)`).
    pub partial_cols: usize,
    pub workspace_bytes: usize,
    pub shared_bytes: usize,
}

fn align256(x: usize) -> usize {
    x.next_multiple_of(256)
}

/// Dynamic shared memory of one LUT-GEMM block: the table, entries 256 bytes apart (32 copies,
/// then padding); `lut_mma` then stages its activations (`XS_STAGES` super-steps of `8·nt`
/// batch columns, 2 bytes per value).
fn lut_shared_bytes(bits: u32, kernel: LutKernel) -> usize {
    let table = (1usize << (2 * bits)) * 256;
    match kernel {
        // Then the in-block K slices' sums: 4 floats per lane.
        LutKernel::Gemv { .. } => table + WARPS * 32 * 4 * 4,
        LutKernel::Mma { nt, .. } => table + source::XS_STAGES * 8 * nt * KSTEP * 2,
        LutKernel::Dequantize => 0,
    }
}

/// Scale groups per 128-k super-step when `lut_gemv` takes this call (power-of-two group sizes,
/// batches of at most `8 / cpb` rows, no `mt` override), else `None`. `HIGGS_CUDA_GEMV=0` turns
/// it off.
fn gemv_cpb(group_size: usize, batch: usize, tuning: Tuning) -> Option<usize> {
    if device::switched_off("GEMV") || !group_size.is_power_of_two() || tuning.mt > 1 {
        return None;
    }
    let cpb = (KSTEP / group_size).clamp(1, 4);
    (batch <= 8 / cpb).then_some(cpb)
}

/// Row tiles per warp (`mt`) and batch tiles (`nt`) for a call of `batch` rows through a layer
/// of `rows` outputs: the kernel variant to use.
pub fn tile_shape(batch: usize, rows: usize, tuning: Tuning) -> Result<(usize, usize)> {
    if batch == 0 {
        return Err(HiggsError::invalid("batch must be at least 1"));
    }
    if !matches!(tuning.mt, 0..=2) || tuning.splits > MAX_SPLITS {
        return Err(HiggsError::invalid(format!(
            "tuning {tuning:?}: mt must be 0 (auto), 1 or 2 and splits at most {MAX_SPLITS}"
        )));
    }
    let nt = match batch {
        1..=8 => 1,
        9..=16 => 2,
        17..=32 => 4,
        _ => 8,
    };
    // Two row tiles per warp (each activation read from shared memory feeds twice the mma, one
    // block of 8 warps per SM) won on the H100 at batch 5-8 and, for layers of at least 2048
    // rows (enough row blocks to fill the GPU), at batch 17-64; see benches/GPU_NOTES.md.
    let mt = match tuning.mt {
        0 if nt == 1 || (nt >= 4 && rows >= 2048) => 2,
        0 => 1,
        m => m,
    };
    Ok((mt, nt))
}

/// The plan for `batch` rows through a layer of `rows` outputs and `padded` rotated inputs on a
/// GPU with `sm_count` multiprocessors, each holding `blocks_per_sm` blocks of the kernel.
/// `gemv`: the plan is for `lut_gemv` (one row tile per warp; in-block K slices allowed).
#[allow(clippy::too_many_arguments)]
pub fn plan_linear(
    batch: usize,
    rows: usize,
    padded: usize,
    bits: u32,
    sm_count: usize,
    blocks_per_sm: usize,
    tuning: Tuning,
    gemv: bool,
) -> Result<LinearPlan> {
    let (mt, nt) = tile_shape(batch, rows, tuning)?;
    let mt = if gemv { 1 } else { mt };
    let kp = padded.next_multiple_of(KSTEP);
    let total_steps = kp / KSTEP;
    let batch_chunks = batch.div_ceil(MAX_COLS);
    let slots = sm_count * blocks_per_sm.max(1);
    let row_tiles_of = |kslices: usize| rows.div_ceil(WARPS / kslices * 16 * mt);
    let (kslices, splits) = if batch_chunks > 1 {
        (1, 1)
    } else if tuning.splits > 0 {
        (1, tuning.splits)
    } else {
        // Fewest waves × (super-steps per warp + about two for filling the pipeline), plus about
        // three for a split-K tail: the critical path. Each warp keeps at least two super-steps;
        // ties go to fewer splits, then fewer slices.
        let max_splits = (total_steps / 2).clamp(1, MAX_SPLITS);
        // `HIGGS_CUDA_KSLICES=0`: no slices, and the split choice of before them.
        let sliced = gemv && !device::switched_off("KSLICES");
        let slice_counts: &[usize] = if sliced { &[1, 2, 4, 8] } else { &[1] };
        let mut options = Vec::new();
        for &k in slice_counts {
            for s in 1..=max_splits {
                let per_warp = total_steps.div_ceil(s).div_ceil(k);
                if per_warp >= 2 || (k == 1 && s == 1) {
                    options.push((k, s, per_warp));
                }
            }
        }
        options
            .into_iter()
            .min_by_key(|&(k, s, per_warp)| {
                let waves = (row_tiles_of(k) * s).div_ceil(slots);
                let tail = if s > 1 && sliced { 3 } else { 0 };
                ((waves * (per_warp + 2) + tail) * 64 + s) * 16 + k
            })
            .map_or((1, 1), |(k, s, _)| (k, s))
    };
    let row_tiles = row_tiles_of(kslices);
    let steps_per_split = total_steps.div_ceil(splits);
    let splits = total_steps.div_ceil(steps_per_split);
    // Four u32 per row block (split-K arrivals and give-ups, departures; see `lut_gemm.cu`).
    let counters_bytes = align256(row_tiles * 16);
    let x_rot_offset = 0;
    let partials_offset = x_rot_offset + align256(batch * kp * 2);
    let partial_cols = batch.min(MAX_COLS);
    let workspace_bytes = partials_offset
        + if splits > 1 {
            splits * partial_cols * rows * 4
        } else {
            0
        };
    Ok(LinearPlan {
        mt,
        nt,
        row_tiles,
        splits,
        kslices,
        steps_per_split,
        total_steps,
        batch_chunks,
        kp,
        counters_bytes,
        x_rot_offset,
        partials_offset,
        partial_cols,
        workspace_bytes,
        shared_bytes: lut_shared_bytes(bits, LutKernel::Mma { mt, nt }),
    })
}

/// A further layer computed by the same launch as a [`LinearCall`]'s layer (q/k/v, gate/up): the
/// same input, rotation, grid, widths and group size, its own `out_features` rows of codes and
/// scales, and its own output (`batch × out_features`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sibling {
    pub codes: u64,
    pub scales: u64,
    pub out: u64,
    pub out_features: usize,
}

/// Device addresses and sizes of one `y = layer(x)` call.
#[derive(Clone, Copy, Debug)]
pub struct LinearCall {
    pub shape: LayerShape,
    pub batch: usize,
    /// `batch × in_features` activations.
    pub x: u64,
    /// `batch × out_features` output, same dtype.
    pub out: u64,
    /// `out_features × row_bytes` codes, `out_features × groups` f16 scales, `n × p` f32 grid,
    /// `padded_cols` f32 signs (0: none).
    pub codes: u64,
    pub scales: u64,
    pub grid: u64,
    pub signs: u64,
    /// Scratch memory: the rotated activations (from offset 0), then the split-K partials.
    pub workspace: u64,
    pub workspace_bytes: usize,
    /// Split-K counters, a buffer of their own so the rotated activations sit at the same place
    /// for every layer: zero before the first call (calls leave them zero), at least
    /// `16 · ceil(out_features / 128)` bytes (rounded up to 256).
    pub counters: u64,
    pub counters_bytes: usize,
    /// The workspace already holds this call's rotated activations: written by the previous call
    /// on this stream, with the same activations, signs, `in_features`, `hadamard_size`, padded
    /// width, dtype and batch (and no call with another rotation in between). The Hadamard kernel
    /// is skipped.
    pub rotated: bool,
    /// With `rotated`: launch the LUT-GEMM as a programmatic dependent of whatever kernel runs
    /// before it on the stream anyway. Its table build and first code/scale loads then run
    /// before that kernel has finished, so the caller must know that no kernel still in flight
    /// writes this layer's codes, scales or grid (true inside a model's forward: they were last
    /// written long before, e.g. `higgs_rs.cuda` checks that they are the tensors and versions
    /// of the layer's previous call). `HIGGS_CUDA_PDLROT=0` ignores it.
    pub rotated_overlap: bool,
    pub act: ActType,
    pub stream: u64,
    pub device: usize,
    pub tuning: Tuning,
    /// The codes are in the tiled order of [`tiled_pitches`] (repacked on the device), not in
    /// the stored row order.
    pub tiled: bool,
    /// Up to two more layers computed by the same launch (`out_features` 0: none); their codes
    /// are tiled when `tiled` is set.
    pub siblings: [Sibling; 2],
    /// `batch × out_features` values (activation dtype) added to the output, rounded as
    /// `addend + layer(x)` is in PyTorch (0: none). Not with siblings.
    pub addend: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct LutParams {
    x_rot: u64,
    out: u64,
    codes: u64,
    scales: u64,
    grid: u64,
    partials: u64,
    counters: u64,
    batch: i32,
    rows: i32,
    kp: i32,
    padded: i32,
    row_bytes: i32,
    groups: i32,
    group_size: i32,
    p: i32,
    splits: i32,
    steps_per_split: i32,
    total_steps: i32,
    vector_codes: i32,
    row_tiles: i32,
    batch_chunks: i32,
    partial_cols: i32,
    group_shift: i32,
    full_chunks: i32,
    row_pitch: i32,
    step_pitch: i32,
    spin_reduce: i32,
    kslices: i32,
    codes1: u64,
    codes2: u64,
    scales1: u64,
    scales2: u64,
    out1: u64,
    out2: u64,
    seg1: i32,
    seg2: i32,
    addend: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct HadamardParams {
    x: u64,
    out: u64,
    signs: u64,
    in_features: i32,
    kp: i32,
    scale: f32,
    norm_weight: u64,
    up: u64,
    pre_out: u64,
    eps: f32,
}

/// What [`hadamard_rotate`] computes from `x` before rotating it; the computed rows (`batch ×
/// in_features`, activation type) are also written to `out`.
#[derive(Clone, Copy, Debug)]
pub enum Prologue {
    /// `weight ⊙ x / sqrt(mean(x²) + eps)` per row, in transformers' Llama order (`x · inv`
    /// rounded to the activation type, then times the `in_features` weights).
    RmsNorm { weight: u64, eps: f32, out: u64 },
    /// `silu(x) ⊙ up` (`up`: `batch × in_features`), rounded as PyTorch's two kernels do.
    SiluGate { up: u64, out: u64 },
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DequantParams {
    codes: u64,
    scales: u64,
    grid: u64,
    out: u64,
    rows: i32,
    padded: i32,
    row_bytes: i32,
    groups: i32,
    group_size: i32,
    p: i32,
    ld: i32,
    row_pitch: i32,
    step_pitch: i32,
    vector_out: i32,
    vector_codes: i32,
    group_shift: i32,
}

/// Whether a layer's codes can be repacked into the tiled order the LUT-GEMM reads best: whole
/// 16-row tiles and whole 128-value super-steps per row (no padding inside a tile).
pub fn tiled_layout_applies(shape: &LayerShape) -> bool {
    match shape.layout() {
        Ok((layout, bits)) => {
            shape.out_features.is_multiple_of(16)
                && layout.padded_cols.is_multiple_of(KSTEP)
                && layout.row_bytes == layout.padded_cols / KSTEP * 16 * bits as usize
        }
        Err(_) => false,
    }
}

/// `(row_pitch, step_pitch)` in bytes: the distance between two rows inside a 16-row tile, and
/// between two 128-value super-steps of a row. Stored (canonical) order: rows of `row_bytes`.
/// Tiled order (`higgs_rs.cuda` repacks the codes once on the device, see `code_row` in
/// `lut_gemm.cu`): tiles of 16 rows × 128 values stored contiguously, so a warp's loads of one
/// super-step are 512 contiguous bytes (4 bits).
fn tiled_pitches(shape: &LayerShape, bits: u32, tiled: bool) -> Result<(i32, i32)> {
    let chunk = 4 * bits as usize;
    if !tiled {
        return Ok((shape.row_bytes as i32, (4 * chunk) as i32));
    }
    if !tiled_layout_applies(shape) {
        return Err(HiggsError::invalid(format!(
            "a {}×{} layer cannot use tiled codes: the tiled order needs a multiple of 16 rows and a padded \
             width that is a multiple of {KSTEP}",
            shape.out_features, shape.in_features
        )));
    }
    Ok(((4 * chunk) as i32, (64 * chunk) as i32))
}

fn require_pointers(pointers: &[(&str, u64)]) -> Result<()> {
    for (name, ptr) in pointers {
        if *ptr == 0 {
            return Err(HiggsError::invalid(format!(
                "the {name} device pointer is null"
            )));
        }
    }
    Ok(())
}

/// The module's kernel for a call: the plain layers' own kernel where the module has one and
/// `plain`, else the general one.
fn lut_kernel(
    dev: &device::Device,
    bits: u32,
    act: ActType,
    kernel: LutKernel,
    segments: bool,
    plain: bool,
) -> Result<Kernel> {
    let name = match kernel.plain_name() {
        Some(name) if plain => name,
        _ => kernel.name(),
    };
    dev.kernel(
        ModuleKey::LutGemm {
            bits,
            act,
            kernel,
            segments,
        },
        name,
        || {
            let names = [Some(kernel.name()), kernel.plain_name()];
            Ok((
                source::lut_gemm(bits, act, kernel, segments),
                names.into_iter().flatten().map(str::to_string).collect(),
            ))
        },
    )
}

/// Whether a call's layers are plain (every Llama layer): `lut_mma` needs whole aligned chunks
/// in every super-step and power-of-two groups; `lut_gemv` also a multiple of 16 rows per layer,
/// `group_size · cpb = 128` with whole groups, and 4-byte aligned scale pairs (see
/// `gemv_refill_plain` in `lut_gemm.cu`). `HIGGS_CUDA_PLAIN=0`: never (for comparisons).
fn is_plain(
    variant: LutKernel,
    call: &LinearCall,
    siblings: &[Sibling],
    layout: &Layout,
    bits: u32,
    vector_codes: bool,
) -> bool {
    let whole_chunks = vector_codes
        && call.shape.group_size.is_power_of_two()
        && layout.padded_cols.is_multiple_of(KSTEP)
        && layout.row_bytes * 8 == layout.padded_cols * bits as usize
        && !device::switched_off("PLAIN");
    match variant {
        LutKernel::Mma { .. } => whole_chunks,
        LutKernel::Gemv { cpb } => {
            let pair_scales = cpb == 1
                || (layout.groups.is_multiple_of(2)
                    && call.scales.is_multiple_of(4)
                    && siblings.iter().all(|s| s.scales.is_multiple_of(4)));
            whole_chunks
                && call.shape.out_features.is_multiple_of(16)
                && siblings.iter().all(|s| s.out_features.is_multiple_of(16))
                && call.shape.group_size * cpb == KSTEP
                && layout.groups * call.shape.group_size == layout.padded_cols
                && pair_scales
        }
        LutKernel::Dequantize => false,
    }
}

fn hadamard_kernel(
    dev: &device::Device,
    shape: &source::HadamardShape,
    act: ActType,
) -> Result<Kernel> {
    dev.kernel(
        ModuleKey::Hadamard {
            order: shape.order,
            act,
            cluster: shape.cluster,
        },
        shape.kernel_name(),
        || {
            Ok((
                source::hadamard(shape, act)?,
                vec![shape.kernel_name().to_string()],
            ))
        },
    )
}

/// The outer factor size for power-of-two orders in `hadamard_cluster` (`HIGGS_CUDA_HADCL_POW2`,
/// read once; 2, 4 or 8). Default 0: powers of two keep the one-block kernel (4096 on an H100:
/// 4.2–4.3 µs alone, 4.3–4.5 µs as a cluster of 4; decode no faster, session 6b).
fn pow2_cluster_outer() -> usize {
    static OUTER: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *OUTER.get_or_init(|| {
        std::env::var("HIGGS_CUDA_HADCL_POW2")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// The Hadamard kernel layout for `transforms` transform blocks of an order on this device: a
/// thread-block cluster sharing each transform block where the order has one (sm_90;
/// `HIGGS_CUDA_HADCLUSTER=0` turns it off) and the transforms are few, else one block per tile.
/// With many rows the one-block kernel already fills the GPU and the cluster's extra exchange
/// costs more than it saves (H100, 14336 wide: batch 1 6.1 vs 11.1 µs, batch 16 9.5 vs 13.3,
/// batch 64 17.2 vs 13.4): clusters up to a quarter as many transforms as SMs.
fn hadamard_shape(
    dev: &device::Device,
    order: usize,
    transforms: usize,
) -> Result<source::HadamardShape> {
    if dev.arch >= (9, 0) && transforms <= dev.sm_count / 4 && !device::switched_off("HADCLUSTER") {
        if let Some(shape) = source::HadamardShape::clustered(order, pow2_cluster_outer())? {
            return Ok(shape);
        }
    }
    source::HadamardShape::new(order)
}

/// The kernel for a call: `lut_gemv` where it applies, else `lut_mma`.
fn prepare_variant(shape: &LayerShape, batch: usize, tuning: Tuning) -> LutKernel {
    match gemv_cpb(shape.group_size, batch, tuning) {
        Some(cpb) => LutKernel::Gemv { cpb },
        None => {
            let (mt, nt) = tile_shape(batch, shape.out_features, tuning).unwrap_or((1, 1));
            LutKernel::Mma { mt, nt }
        }
    }
}

/// The LUT-GEMM kernel variant for a call (`segments`: compiled for sibling layers), its plan,
/// and how many of its blocks fit per SM.
#[allow(clippy::too_many_arguments)]
fn prepare(
    dev: &device::Device,
    shape: &LayerShape,
    padded: usize,
    bits: u32,
    batch: usize,
    act: ActType,
    tuning: Tuning,
    segments: bool,
    plain: bool,
) -> Result<(Kernel, LinearPlan, usize)> {
    tile_shape(batch, shape.out_features, tuning)?;
    let variant = prepare_variant(shape, batch, tuning);
    let kernel = lut_kernel(dev, bits, act, variant, segments, plain)?;
    let shared = lut_shared_bytes(bits, variant);
    let resident = dev.blocks_per_sm(&kernel, (WARPS * 32) as u32, shared)?;
    // The plan's row blocks follow the kernel (`lut_gemv`: one row tile per warp).
    let (plan_tuning, gemv) = match variant {
        LutKernel::Mma { mt, .. } => (Tuning { mt, ..tuning }, false),
        _ => (tuning, true),
    };
    let mut plan = plan_linear(
        batch,
        shape.out_features,
        padded,
        bits,
        dev.sm_count,
        resident,
        plan_tuning,
        gemv,
    )?;
    plan.shared_bytes = shared;
    Ok((kernel, plan, resident))
}

/// Whether a batch of `batch` rows through layers of `group_size` can launch sibling layers
/// together ([`LinearCall::siblings`]): on the `lut_gemv` path (decode-sized batches) only. In
/// `lut_mma` the per-row layer lookup costs more than the saved launches (at 255 registers ptxas
/// recomputes the row pointers inside the main loop).
pub fn groups_launch(batch: usize, group_size: usize) -> bool {
    gemv_cpb(group_size, batch, Tuning::default()).is_some()
}

/// Bytes of workspace a call needs (compiles the kernel variant on first use).
pub fn workspace_bytes(
    shape: &LayerShape,
    batch: usize,
    act: ActType,
    device_index: usize,
    tuning: Tuning,
) -> Result<usize> {
    let (layout, bits) = shape.layout()?;
    let dev = device(device_index)?;
    Ok(prepare(
        &dev,
        shape,
        layout.padded_cols,
        bits,
        batch,
        act,
        tuning,
        false,
        // The plain kernels (most layers); a call that takes the general one and needs more
        // workspace says so (`lut_linear` returns the bytes it needs).
        true,
    )?
    .1
    .workspace_bytes)
}

/// Rotate `batch` activation rows into `out` (`batch × out_width`, `out_width >= padded_cols`,
/// zeros past `padded_cols`); with a `prologue`, the rows it computes from `x` are rotated (and
/// written to its `out`).
#[allow(clippy::too_many_arguments)]
pub fn hadamard_rotate(
    x: u64,
    out: u64,
    signs: u64,
    batch: usize,
    in_features: usize,
    hadamard_size: usize,
    out_width: usize,
    act: ActType,
    stream: u64,
    device_index: usize,
    prologue: Option<Prologue>,
) -> Result<()> {
    require_pointers(&[("activation", x), ("output", out)])?;
    let (norm_weight, up, pre_out, eps) = match prologue {
        None => (0, 0, 0, 0.0),
        Some(Prologue::RmsNorm { weight, eps, out }) => {
            require_pointers(&[("norm weight", weight), ("norm output", out)])?;
            if !(eps.is_finite() && eps >= 0.0) {
                return Err(HiggsError::invalid(format!(
                    "the RMSNorm epsilon must be finite and >= 0; got {eps}"
                )));
            }
            (weight, 0, out, eps)
        }
        Some(Prologue::SiluGate { up, out }) => {
            require_pointers(&[("up activations", up), ("gated output", out)])?;
            (0, up, out, 0.0)
        }
    };
    // Checks the order before anything touches the device.
    source::HadamardShape::new(hadamard_size)?;
    let padded = in_features.div_ceil(hadamard_size) * hadamard_size;
    if in_features == 0 || batch == 0 {
        return Err(HiggsError::invalid(
            "the Hadamard transform needs at least one row and one column",
        ));
    }
    if out_width < padded || out_width > i32::MAX as usize || batch > 65535 {
        return Err(HiggsError::invalid(format!(
            "Hadamard output width {out_width} must hold the {padded} padded columns (and batch {batch} <= 65535)"
        )));
    }
    let dev = device(device_index)?;
    // The norm runs in the one-block kernel only (a row's sum of squares stays in its block).
    let shape = if norm_weight != 0 {
        source::HadamardShape::new(hadamard_size)?
    } else {
        hadamard_shape(
            &dev,
            hadamard_size,
            batch * out_width.div_ceil(hadamard_size),
        )?
    };
    let kernel = hadamard_kernel(&dev, &shape, act)?;
    let params = HadamardParams {
        x,
        out,
        signs,
        in_features: in_features as i32,
        kp: out_width as i32,
        scale: (1.0 / (hadamard_size as f64).sqrt()) as f32,
        norm_weight,
        up,
        pre_out,
        eps,
    };
    // A programmatic dependent of whatever kernel runs before it on the stream: the kernels wait
    // (`griddepcontrol.wait`) before touching memory, so only the launch overlaps that kernel's
    // tail. `HIGGS_CUDA_PDLHAD=0` turns it off.
    let programmatic = !device::switched_off("PDLHAD");
    if shape.cluster > 0 {
        // One cluster per transform block (`hadamard_cluster`); blocks past `padded` transform
        // zeros, as the one-block kernel's extra tiles do.
        let clusters = out_width.div_ceil(shape.order);
        return dev.launch_ex(
            &kernel,
            ((clusters * shape.cluster) as u32, batch as u32, 1),
            shape.threads as u32,
            shape.shared_bytes(),
            stream,
            &params,
            programmatic,
            shape.cluster as u32,
        );
    }
    let tiles = out_width.div_ceil(shape.tile) as u32;
    dev.launch_with(
        &kernel,
        (tiles, batch as u32, 1),
        shape.threads as u32,
        shape.shared_bytes(),
        stream,
        &params,
        programmatic,
    )
}

/// `y = x Wᵀ` for one quantized layer: the Hadamard kernel, then the LUT-GEMM.
/// Returns `Ok(0)` once launched, or `Ok(bytes)` without launching anything when the workspace
/// is smaller than the `bytes` the call needs.
pub fn lut_linear(call: &LinearCall) -> Result<usize> {
    let siblings: Vec<Sibling> = call
        .siblings
        .iter()
        .copied()
        .filter(|s| s.out_features > 0)
        .collect();
    // The launch's rows: this layer's, then its siblings' (each checked as a layer of its own).
    let total_rows =
        call.shape.out_features + siblings.iter().map(|s| s.out_features).sum::<usize>();
    for sibling in &siblings {
        let own = LayerShape {
            out_features: sibling.out_features,
            ..call.shape
        };
        own.layout()?;
        require_pointers(&[
            ("sibling codes", sibling.codes),
            ("sibling scales", sibling.scales),
            ("sibling output", sibling.out),
        ])?;
        if call.tiled && !tiled_layout_applies(&own) {
            return Err(HiggsError::invalid(format!(
                "a sibling layer of {} rows cannot use tiled codes (it needs a multiple of 16 rows)",
                sibling.out_features
            )));
        }
    }
    let groupable =
        call.tuning == Tuning::default() && groups_launch(call.batch, call.shape.group_size);
    if !siblings.is_empty() && !groupable {
        return Err(HiggsError::invalid(format!(
            "sibling layers are launched together only for small batches without tuning overrides \
             (batch {}, group size {}, {:?})",
            call.batch, call.shape.group_size, call.tuning
        )));
    }
    if call.addend != 0 && !siblings.is_empty() {
        return Err(HiggsError::invalid(
            "an addend is added to one layer's output: launch the layer without siblings",
        ));
    }
    if call.tiled && !siblings.is_empty() && !tiled_layout_applies(&call.shape) {
        return Err(HiggsError::invalid(
            "a layer launched with siblings must have a multiple of 16 rows to use tiled codes",
        ));
    }
    let shape = &LayerShape {
        out_features: total_rows,
        ..call.shape
    };
    let (layout, bits) = shape.layout()?;
    require_pointers(&[
        ("activation", call.x),
        ("output", call.out),
        ("codes", call.codes),
        ("scales", call.scales),
        ("grid", call.grid),
    ])?;
    let alignment = match bits {
        4 => 16,
        2 => 8,
        _ => 4,
    };
    let vector_codes = call.codes.is_multiple_of(16)
        && siblings.iter().all(|s| s.codes.is_multiple_of(16))
        && layout.row_bytes.is_multiple_of(alignment);
    if call.tiled && !vector_codes {
        return Err(HiggsError::invalid(
            "tiled codes must start at a 16-byte aligned address",
        ));
    }
    let variant = prepare_variant(shape, call.batch, call.tuning);
    let plain = is_plain(variant, call, &siblings, &layout, bits, vector_codes);
    let dev = device(call.device)?;
    let (kernel, plan, resident) = prepare(
        &dev,
        shape,
        layout.padded_cols,
        bits,
        call.batch,
        call.act,
        call.tuning,
        !siblings.is_empty(),
        plain,
    )?;
    if call.workspace_bytes < plan.workspace_bytes {
        return Ok(plan.workspace_bytes);
    }
    require_pointers(&[("workspace", call.workspace), ("counters", call.counters)])?;
    if call.counters_bytes < plan.counters_bytes {
        return Err(HiggsError::invalid(format!(
            "the split-K counters buffer holds {} bytes; this call needs {}",
            call.counters_bytes, plan.counters_bytes
        )));
    }
    if !call.workspace.is_multiple_of(256) {
        return Err(HiggsError::invalid(
            "the workspace must be 256-byte aligned",
        ));
    }
    if plan.batch_chunks > 65535 || plan.splits > 65535 {
        return Err(HiggsError::invalid(format!(
            "batch {} is too large",
            call.batch
        )));
    }
    let (row_pitch, step_pitch) = tiled_pitches(shape, bits, call.tiled)?;
    let x_rot = call.workspace + plan.x_rot_offset as u64;
    if !call.rotated {
        hadamard_rotate(
            call.x,
            x_rot,
            call.signs,
            call.batch,
            shape.in_features,
            shape.hadamard_size,
            plan.kp,
            call.act,
            call.stream,
            call.device,
            None,
        )?;
    }
    let params = LutParams {
        x_rot,
        out: call.out,
        codes: call.codes,
        scales: call.scales,
        grid: call.grid,
        partials: call.workspace + plan.partials_offset as u64,
        counters: call.counters,
        batch: call.batch as i32,
        rows: shape.out_features as i32,
        kp: plan.kp as i32,
        padded: layout.padded_cols as i32,
        row_bytes: layout.row_bytes as i32,
        groups: layout.groups as i32,
        group_size: shape.group_size as i32,
        p: shape.p as i32,
        splits: plan.splits as i32,
        steps_per_split: plan.steps_per_split as i32,
        total_steps: plan.total_steps as i32,
        vector_codes: vector_codes as i32,
        row_tiles: plan.row_tiles as i32,
        batch_chunks: plan.batch_chunks as i32,
        partial_cols: plan.partial_cols as i32,
        group_shift: if shape.group_size.is_power_of_two() {
            shape.group_size.trailing_zeros() as i32
        } else {
            -1
        },
        full_chunks: (layout.row_bytes / (4 * bits as usize)) as i32,
        row_pitch,
        step_pitch,
        spin_reduce: 0,
        kslices: plan.kslices as i32,
        codes1: siblings.first().map_or(0, |s| s.codes),
        codes2: siblings.get(1).map_or(0, |s| s.codes),
        scales1: siblings.first().map_or(0, |s| s.scales),
        scales2: siblings.get(1).map_or(0, |s| s.scales),
        out1: siblings.first().map_or(0, |s| s.out),
        out2: siblings.get(1).map_or(0, |s| s.out),
        // First rows of layers 1 and 2 (the total where there is none).
        seg1: call.shape.out_features as i32,
        seg2: (call.shape.out_features + siblings.first().map_or(0, |s| s.out_features)) as i32,
        addend: call.addend,
    };
    // Persistent blocks: one wave of as many as fit, looping over the work items.
    let items = plan.row_tiles * plan.splits * plan.batch_chunks;
    let blocks = items.min(resident * dev.sm_count).max(1);
    // `lut_mma` with one item per block, all blocks resident together: the split blocks of a row
    // block wait for each other and share the reduction (`HIGGS_CUDA_SPIN=0`: the last block
    // reduces alone, as `lut_gemv` does).
    let params = LutParams {
        spin_reduce: (items <= blocks
            && matches!(variant, LutKernel::Mma { .. })
            && !device::switched_off("SPIN")) as i32,
        ..params
    };
    dev.launch_with(
        &kernel,
        (blocks as u32, 1, 1),
        (WARPS * 32) as u32,
        plan.shared_bytes,
        call.stream,
        &params,
        // The kernel waits (`griddepcontrol.wait`) for the kernel launched just before it: the
        // Hadamard kernel, or (rotated) the previous kernel on the stream, which for the k, v and
        // up projections is the previous call's LUT-GEMM (it lets dependents launch early).
        !call.rotated || (call.rotated_overlap && !device::switched_off("PDLROT")),
    )?;
    Ok(0)
}

/// Write the rotated-domain weights `Ŵ_rot` (`out_features × ld` in the activation dtype,
/// `ld >= padded_cols` even; columns past `padded_cols` are left as they are), for large batches
/// where one dequantization feeds a library GEMM on `x_rot`.
#[allow(clippy::too_many_arguments)]
pub fn dequantize_rotated(
    shape: &LayerShape,
    codes: u64,
    scales: u64,
    grid: u64,
    out: u64,
    ld: usize,
    act: ActType,
    stream: u64,
    device_index: usize,
    tiled: bool,
) -> Result<()> {
    let (layout, bits) = shape.layout()?;
    let (row_pitch, step_pitch) = tiled_pitches(shape, bits, tiled)?;
    require_pointers(&[
        ("codes", codes),
        ("scales", scales),
        ("grid", grid),
        ("output", out),
    ])?;
    if ld < layout.padded_cols
        || !ld.is_multiple_of(2)
        || ld > i32::MAX as usize
        || !out.is_multiple_of(4)
    {
        return Err(HiggsError::invalid(format!(
            "the rotated weights need an even row stride >= {} and a 4-byte aligned output; got {ld}",
            layout.padded_cols
        )));
    }
    let dev = device(device_index)?;
    let kernel = lut_kernel(&dev, bits, act, LutKernel::Dequantize, false, false)?;
    let params = DequantParams {
        codes,
        scales,
        grid,
        out,
        rows: shape.out_features as i32,
        padded: layout.padded_cols as i32,
        row_bytes: layout.row_bytes as i32,
        groups: layout.groups as i32,
        group_size: shape.group_size as i32,
        p: shape.p as i32,
        ld: ld as i32,
        row_pitch,
        step_pitch,
        vector_out: 0,
        vector_codes: 0,
        group_shift: if shape.group_size.is_power_of_two() {
            shape.group_size.trailing_zeros() as i32
        } else {
            -1
        },
    };
    // 16-byte stores of 8 values when every row starts 16-byte aligned (the kernel's unit index
    // is 32-bit); 4-byte (4 bits) or 2-byte (2 bits) code loads when every unit's bytes are aligned.
    // `HIGGS_CUDA_DEQUANT16=0`: pairs only (for comparisons).
    let units = shape.out_features * (layout.padded_cols / 8);
    let vector_out = out.is_multiple_of(16)
        && ld.is_multiple_of(8)
        && units < i32::MAX as usize
        && !device::switched_off("DEQUANT16");
    let code_align = match bits {
        4 => 4,
        2 => 2,
        _ => 1,
    };
    let params = DequantParams {
        vector_out: vector_out as i32,
        vector_codes: (codes.is_multiple_of(code_align)
            && layout.row_bytes.is_multiple_of(code_align as usize)) as i32,
        ..params
    };
    // Up to 8 blocks of 256 threads per multiprocessor (one wave), each thread 4 units in flight.
    let work = if vector_out {
        units.div_ceil(4)
    } else {
        shape.out_features * layout.padded_cols / 2
    };
    let blocks = work.div_ceil(256).clamp(1, dev.sm_count * 8) as u32;
    dev.launch(&kernel, (blocks, 1, 1), 256, 0, stream, &params)
}

/// One tensor of a [`RopeCall`]: `(batch, heads, seq, dim)` activations with element strides
/// `(b, h, s)` (dim contiguous), and its output, `(batch, seq, heads, dim)` contiguous.
#[derive(Clone, Copy, Debug)]
pub struct RopeTensor {
    pub x: u64,
    pub out: u64,
    pub heads: usize,
    pub strides: [i64; 3],
}

/// Rotary position embedding of queries and keys in one launch (transformers'
/// `apply_rotary_pos_emb`, the same bits): `out = x·cos + rotate_half(x)·sin`, rounded as PyTorch
/// rounds it. `cos` and `sin` are `(batch, seq, dim)` with element strides `(b, s)` (0 where
/// they broadcast), dim contiguous; all in the activation dtype.
#[derive(Clone, Copy, Debug)]
pub struct RopeCall {
    pub q: RopeTensor,
    pub k: RopeTensor,
    pub cos: u64,
    pub sin: u64,
    pub cos_strides: [i64; 2],
    pub sin_strides: [i64; 2],
    pub batch: usize,
    pub seq: usize,
    pub dim: usize,
    pub act: ActType,
    pub stream: u64,
    pub device: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RopeParams {
    x: [u64; 2],
    out: [u64; 2],
    stride_b: [i64; 2],
    stride_h: [i64; 2],
    stride_s: [i64; 2],
    heads: [i32; 2],
    cos: u64,
    sin: u64,
    cos_stride_b: i64,
    cos_stride_s: i64,
    sin_stride_b: i64,
    sin_stride_s: i64,
    batch: i32,
    seq: i32,
    dim: i32,
}

/// Launch [`RopeCall`] on its stream (nothing synchronized or allocated).
pub fn rope(call: &RopeCall) -> Result<()> {
    let (q, k) = (&call.q, &call.k);
    require_pointers(&[
        ("query", q.x),
        ("query output", q.out),
        ("key", k.x),
        ("key output", k.out),
        ("cos", call.cos),
        ("sin", call.sin),
    ])?;
    let values = (q.heads + k.heads).saturating_mul(call.dim);
    if call.dim == 0 || !call.dim.is_multiple_of(2) || q.heads == 0 || k.heads == 0 {
        return Err(HiggsError::invalid(format!(
            "rotary embedding needs an even head size and heads on both tensors; got head size {}, \
             {} query and {} key heads",
            call.dim, q.heads, k.heads
        )));
    }
    let positions = call.batch.saturating_mul(call.seq);
    if positions == 0 || positions > u32::MAX as usize / 2 || values > i32::MAX as usize / 2 {
        return Err(HiggsError::invalid(format!(
            "rotary embedding of {} positions × {values} values is empty or too large",
            positions
        )));
    }
    let params = RopeParams {
        x: [q.x, k.x],
        out: [q.out, k.out],
        stride_b: [q.strides[0], k.strides[0]],
        stride_h: [q.strides[1], k.strides[1]],
        stride_s: [q.strides[2], k.strides[2]],
        heads: [q.heads as i32, k.heads as i32],
        cos: call.cos,
        sin: call.sin,
        cos_stride_b: call.cos_strides[0],
        cos_stride_s: call.cos_strides[1],
        sin_stride_b: call.sin_strides[0],
        sin_stride_s: call.sin_strides[1],
        batch: call.batch as i32,
        seq: call.seq as i32,
        dim: call.dim as i32,
    };
    let dev = device(call.device)?;
    let act = call.act;
    let kernel = dev.kernel(ModuleKey::Rope { act }, "rope", || {
        Ok((source::rope(act), vec!["rope".to_string()]))
    })?;
    // A position's values over enough blocks that a decode step (one position, ~5000 values)
    // spreads over ~20 SMs instead of looping in one.
    const THREADS: usize = 256;
    let slices = values.div_ceil(THREADS).min(64) as u32;
    dev.launch(
        &kernel,
        (positions as u32, slices, 1),
        THREADS as u32,
        0,
        call.stream,
        &params,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(out: usize, inp: usize, p: usize, n: usize, h: usize, g: usize) -> LayerShape {
        let spec = QuantSpec {
            p,
            n,
            hadamard_size: Some(h),
            group_size: g,
            seed: None,
        };
        let l = spec.layout(out, inp).unwrap();
        LayerShape {
            in_features: inp,
            out_features: out,
            p,
            n,
            hadamard_size: h,
            group_size: g,
            row_bytes: l.row_bytes,
            groups: l.groups,
        }
    }

    #[test]
    fn shapes_are_checked_against_the_codec() {
        assert_eq!(shape(1000, 576, 2, 256, 576, 64).layout().unwrap().1, 4);
        assert_eq!(shape(8, 100, 1, 8, 64, 32).layout().unwrap().1, 3);
        let mut s = shape(8, 4096, 2, 256, 1024, 64);
        s.row_bytes += 1;
        assert!(s.layout().unwrap_err().to_string().contains("code bytes"));
        assert!(shape(8, 4096, 2, 256, 1024, 16).layout().is_err());
        assert!(shape(8, 4096, 1, 32, 1024, 64).layout().is_err());
        assert!(shape(8, 4096, 4, 256, 1024, 64).layout().is_err());
    }

    #[test]
    fn tiled_codes_need_whole_tiles() {
        let four = shape(4096, 4096, 2, 256, 1024, 64);
        assert!(tiled_layout_applies(&four));
        assert_eq!(tiled_pitches(&four, 4, false).unwrap(), (2048, 64));
        assert_eq!(tiled_pitches(&four, 4, true).unwrap(), (64, 1024));
        let three = shape(32, 256, 1, 8, 128, 32);
        assert_eq!(tiled_pitches(&three, 3, true).unwrap(), (48, 768));
        // 1000 rows (not whole 16-row tiles), a padded width of 576 (not whole super-steps).
        for bad in [
            shape(1000, 4096, 2, 256, 1024, 64),
            shape(16, 576, 2, 256, 576, 64),
        ] {
            assert!(!tiled_layout_applies(&bad));
            assert!(tiled_pitches(&bad, 4, true).is_err());
            assert!(tiled_pitches(&bad, 4, false).is_ok());
        }
    }

    #[test]
    fn small_batches_take_the_gemv_kernel_when_the_groups_allow() {
        let auto = Tuning::default();
        assert_eq!(gemv_cpb(64, 1, auto), Some(2));
        assert_eq!(gemv_cpb(64, 4, auto), Some(2));
        assert_eq!(gemv_cpb(64, 5, auto), None);
        assert_eq!(gemv_cpb(32, 2, auto), Some(4));
        assert_eq!(gemv_cpb(32, 3, auto), None);
        assert_eq!(gemv_cpb(1024, 8, auto), Some(1));
        assert_eq!(gemv_cpb(96, 1, auto), None);
        assert_eq!(gemv_cpb(64, 1, Tuning { mt: 2, splits: 0 }), None);
        assert!(groups_launch(1, 64) && groups_launch(4, 64) && !groups_launch(5, 64));
        assert!(groups_launch(8, 128) && !groups_launch(1, 96));
        assert_eq!(tile_shape(64, 4096, auto).unwrap(), (2, 8));
        assert_eq!(tile_shape(64, 1024, auto).unwrap(), (1, 8));
        assert_eq!(tile_shape(16, 14336, auto).unwrap(), (1, 2));
        assert_eq!(tile_shape(8, 100, auto).unwrap(), (2, 1));
        assert_eq!(
            tile_shape(8, 100, Tuning { mt: 1, splits: 0 }).unwrap(),
            (1, 1)
        );
        // The table, then the K slices' sums.
        assert_eq!(
            lut_shared_bytes(4, LutKernel::Gemv { cpb: 2 }),
            65536 + 4096
        );
        assert_eq!(
            lut_shared_bytes(4, LutKernel::Mma { mt: 1, nt: 1 }),
            65536 + source::XS_STAGES * 8 * 256
        );
        assert_eq!(
            lut_shared_bytes(2, LutKernel::Mma { mt: 1, nt: 8 }),
            4096 + source::XS_STAGES * 64 * 256
        );
    }

    #[test]
    fn rope_calls_are_checked_before_any_device_is_touched() {
        let tensor = |x: u64, heads: usize| RopeTensor {
            x,
            out: x + 0x100,
            heads,
            strides: [4096, 128, 4096],
        };
        let call = |q: RopeTensor, dim: usize, batch: usize| RopeCall {
            q,
            k: tensor(0x2000, 8),
            cos: 0x3000,
            sin: 0x4000,
            cos_strides: [0, 128],
            sin_strides: [0, 128],
            batch,
            seq: 1,
            dim,
            act: ActType::F16,
            stream: 0,
            device: 0,
        };
        let err = rope(&call(tensor(0, 32), 128, 1)).unwrap_err();
        assert!(
            err.to_string().contains("query device pointer is null"),
            "{err}"
        );
        let err = rope(&call(tensor(0x1000, 32), 127, 1)).unwrap_err();
        assert!(err.to_string().contains("even head size"), "{err}");
        let err = rope(&call(tensor(0x1000, 0), 128, 1)).unwrap_err();
        assert!(err.to_string().contains("0 query"), "{err}");
        let err = rope(&call(tensor(0x1000, 32), 128, 0)).unwrap_err();
        assert!(err.to_string().contains("empty or too large"), "{err}");
    }

    #[test]
    fn siblings_are_refused_where_they_cannot_share_a_launch() {
        let layer = shape(256, 1024, 2, 256, 1024, 64);
        let sibling = Sibling {
            codes: 0x1000,
            scales: 0x2000,
            out: 0x3000,
            out_features: 64,
        };
        let call = |batch: usize, tuning: Tuning, sibling: Sibling| LinearCall {
            shape: layer,
            batch,
            x: 0x100,
            out: 0x200,
            codes: 0x300,
            scales: 0x400,
            grid: 0x500,
            signs: 0,
            workspace: 0x600,
            workspace_bytes: 1 << 20,
            counters: 0x700,
            counters_bytes: 1 << 16,
            rotated: false,
            rotated_overlap: false,
            act: ActType::F16,
            stream: 0,
            device: 0,
            tuning,
            tiled: false,
            siblings: [sibling, Sibling::default()],
            addend: 0,
        };
        // Checked before any device is touched (this runs without a GPU).
        let err = lut_linear(&call(16, Tuning::default(), sibling)).unwrap_err();
        assert!(err.to_string().contains("small batches"), "{err}");
        let err = lut_linear(&call(1, Tuning { mt: 1, splits: 0 }, sibling)).unwrap_err();
        assert!(err.to_string().contains("tuning"), "{err}");
        let bad = Sibling {
            codes: 0,
            ..sibling
        };
        let err = lut_linear(&call(1, Tuning::default(), bad)).unwrap_err();
        assert!(err.to_string().contains("sibling codes"), "{err}");
        let odd = Sibling {
            out_features: 40,
            ..sibling
        };
        let err = lut_linear(&LinearCall {
            tiled: true,
            ..call(1, Tuning::default(), odd)
        })
        .unwrap_err();
        assert!(err.to_string().contains("multiple of 16"), "{err}");
        let err = lut_linear(&LinearCall {
            addend: 0x800,
            ..call(1, Tuning::default(), sibling)
        })
        .unwrap_err();
        assert!(err.to_string().contains("without siblings"), "{err}");
    }

    #[test]
    fn plans_cover_every_step_and_row() {
        for (batch, rows, padded, gemv) in [
            (1, 4096, 4096, true),
            (1, 1024, 4096, true),
            (1, 4096, 14336, true),
            (4, 28672, 4096, true),
            (1, 4096, 4096, false),
            (16, 14336, 4096, false),
            (64, 4096, 14336, false),
            (3, 1000, 576, true),
            (3, 1000, 576, false),
            (200, 100, 128, false),
        ] {
            let p = plan_linear(batch, rows, padded, 4, 132, 3, Tuning::default(), gemv).unwrap();
            assert!(p.row_tiles * WARPS / p.kslices * 16 * p.mt >= rows);
            assert!(p.splits * p.steps_per_split >= p.total_steps);
            assert!((p.splits - 1) * p.steps_per_split < p.total_steps, "{p:?}");
            assert!(p.kp >= padded && p.kp.is_multiple_of(KSTEP));
            assert!(
                p.batch_chunks * MAX_COLS >= batch
                    && p.nt * 8 * p.batch_chunks >= batch.min(MAX_COLS)
            );
            assert!(p.counters_bytes >= p.row_tiles * 16);
            // Python sizes the counters buffer by this bound.
            assert!(p.counters_bytes <= (rows.div_ceil(16) * 16).next_multiple_of(256));
            assert!(p.x_rot_offset == 0 && p.partials_offset >= batch * p.kp * 2);
            assert!(
                p.workspace_bytes
                    >= p.partials_offset
                        + (p.splits > 1) as usize * p.splits * p.partial_cols * rows * 4
            );
            if p.batch_chunks > 1 {
                assert_eq!(p.splits, 1);
            }
            assert!(gemv || p.kslices == 1);
            assert!(WARPS.is_multiple_of(p.kslices));
            // Every warp keeps at least two super-steps (unless the whole row has fewer).
            assert!(
                p.steps_per_split.div_ceil(p.kslices) >= 2.min(p.total_steps),
                "{p:?}"
            );
        }
        // Decode-sized layers of Llama-3-8B on an H100 (132 SMs, 2 lut_gemv blocks each): the
        // few-row layers fill the GPU with in-block slices instead of split-K.
        let h100 = |rows, padded| plan_linear(1, rows, padded, 4, 132, 2, Tuning::default(), true);
        let o = h100(4096, 4096).unwrap();
        assert_eq!((o.kslices, o.splits), (8, 1), "{o:?}");
        let down = h100(4096, 14336).unwrap();
        assert_eq!((down.kslices, down.splits), (8, 1), "{down:?}");
        let qkv = h100(6144, 4096).unwrap();
        assert_eq!((qkv.kslices, qkv.splits), (4, 1), "{qkv:?}");
        let gate_up = h100(28672, 4096).unwrap();
        assert_eq!((gate_up.kslices, gate_up.splits), (1, 1), "{gate_up:?}");
        // Few rows: split-K fills the GPU; many rows and few slots: no split.
        let few = plan_linear(1, 1024, 4096, 4, 132, 4, Tuning::default(), false).unwrap();
        assert!(few.splits > 1 && few.steps_per_split >= 2, "{few:?}");
        assert_eq!(
            plan_linear(1, 14336, 4096, 4, 8, 1, Tuning::default(), true)
                .unwrap()
                .splits,
            1
        );
        assert_eq!(
            plan_linear(1, 4096, 4096, 4, 132, 3, Tuning { mt: 1, splits: 5 }, true)
                .unwrap()
                .splits,
            5
        );
        assert!(plan_linear(0, 8, 128, 4, 132, 1, Tuning::default(), false).is_err());
        assert!(plan_linear(1, 8, 128, 4, 132, 1, Tuning { mt: 3, splits: 0 }, false).is_err());
    }
}
