// LUT-GEMM on HIGGS codes: y[b, r] = sum_k W_rot[r, k] * x_rot[b, k], where W_rot[r, k] is a grid
// point times the row's group scale, looked up from packed codes, and x_rot is the activation
// rotated like the weights were (hadamard.cu). Needs common.cuh first.
//
// Defines: BITS (2, 3, 4: bits per weight), ACT_BF16 (bfloat16 instead of float16); for timing
// experiments (HIGGS_CUDA_DEFINES): LUT_MIN_BLOCKS, MMA_D (lut_mma), GEMV_D, GEMV_G, ... (lut_gemv),
// LUT_NO_TRIGGER (no early launch of programmatic dependents, see allow_dependents), LUT_TRACE
// (phase timestamps, see TRACE), GEMV_NO_PREFETCH (see gemv_prefetch_first_steps).
//
// Every pair of consecutive weights (k, k+1) of a row is one "pair code" of 2*BITS bits: a p = 2
// code, or two p = 1 codes (LSB-first, so the lower code is the lower k). A shared table maps a
// pair code to the two values as one packed half2/bfloat162: for p = 2 the grid point, for p = 1
// (grid[c0], grid[c1]). The table is replicated 32 times (entry e of copy c at byte 256e + 4c,
// lane c reads copy c) so lookups never conflict on shared-memory banks.
//
// Tensor cores (mma.m16n8k16): A = 16 weight rows x 16 k, B = 16 k x 8 batch columns. The k order
// inside an mma is free as long as A and B agree, so each lane owns 32 consecutive k of its
// rows ("chunk": 4*BITS bytes, one coalesced load) and of its batch column:
//   lane (g = lane/4, t = lane%4), warp super-step of 128 k starting at k0, mma step s = 0..7:
//   logical k-pair t   <-> k0 + 32t + 4s + {0, 1}   (A regs a0a1 / a2a3, B regs b0b1)
//   logical k-pair t+4 <-> k0 + 32t + 4s + {2, 3}   (A regs a4a5 / a6a7, B regs b2b3)
// A lane's chunk lies inside one scale group (group_size is a multiple of 32), so one scale
// multiplies all its pairs.
//
// Work split: a block (8 warps) owns 8*16*MT rows (16*MT per warp) and a range of super-steps
// (split-K); blocks are persistent (one wave) and loop over (row block, split, batch chunk)
// items. Each warp keeps the codes of the next D super-steps in flight in a ring of registers.
// lut_mma stages the activations of each super-step once per block in shared memory (cp.async
// ring, one barrier per super-step); lut_gemv reads them through L1. With several splits, blocks
// write f32 partials that are summed in split order: by the split blocks of a row block together
// once all have arrived (lut_mma when the grid is one wave, see spin_reduce), else by the last
// block to arrive (a counter per row block, reset after use): deterministic, no atomics on data,
// no memset between calls. Launched as a programmatic dependent of the Hadamard kernel (sm_90):
// the table and the first codes load while that kernel runs.

#define WARPS 8
#define THREADS (WARPS * 32)
#define PAIR_BITS (2 * BITS)
#define LUT_N (1 << PAIR_BITS)
#define KSTEP 128
#define MAX_COLS 64

struct LutParams {
    const u16* x_rot;            // batch x kp, activation dtype, zero beyond `padded`
    u16* out;                    // batch x rows, activation dtype
    const unsigned char* codes;  // rows x row_bytes
    const u16* scales;           // rows x groups, float16
    const float* grid;           // n x p, float32
    float* partials;             // splits x partial_cols x rows (split mode only)
    u32* counters;               // four per row tile, zero between launches (split mode only)
    int batch;
    int rows;
    int kp;
    int padded;
    int row_bytes;
    int groups;
    int group_size;
    int p;
    int splits;
    int steps_per_split;
    int total_steps;
    int vector_codes;            // codes pointer and row_bytes aligned for vector loads
    int row_tiles;
    int batch_chunks;
    int partial_cols;            // batch columns per split in `partials`
    int group_shift;             // log2(group_size) when a power of two, else -1
    int full_chunks;             // whole 32-value chunks of codes in a row: row_bytes / (4 * BITS)
    int row_pitch;               // bytes between rows inside a 16-row tile (see code_row)
    int step_pitch;              // bytes between a row's 128-k super-steps
    int spin_reduce;             // lut_mma: every block holds one item, all resident (see below)
    int kslices;                 // lut_gemv: warps of a block sharing rows, each a slice of the
                                 // item's super-steps (1, 2, 4, 8; see lut_gemv_body)
    // Sibling layers computed by the same launch (same input, rotation and shape but their rows):
    // rows [seg1, seg2) and [seg2, rows) are layers 1 and 2 with their own codes, scales and
    // output (batch x their rows). Without siblings seg1 = seg2 = rows.
    const unsigned char* codes1;
    const unsigned char* codes2;
    const u16* scales1;
    const u16* scales2;
    u16* out1;
    u16* out2;
    int seg1;
    int seg2;
    // batch x rows (as `out`, no siblings) added to the outputs as a second rounding step, the
    // way `addend + layer(x)` rounds in PyTorch (a decoder layer's residual); null: none.
    const u16* addend;
};

// Which layer of the launch row r belongs to (0: the first), and its first row. Only modules
// compiled for grouped launches (LUT_SEGMENTS) look: elsewhere the per-row pointers stay as cheap
// as they were (under register pressure ptxas recomputes them inside the main loop).
__device__ __forceinline__ int segment_of(const LutParams& P, int r) {
#ifdef LUT_SEGMENTS
    return (r >= P.seg1) + (r >= P.seg2);
#else
    return 0;
#endif
}

__device__ __forceinline__ int segment_start(const LutParams& P, int seg) {
    return seg == 0 ? 0 : seg == 1 ? P.seg1 : P.seg2;
}

// Row r's f16 scales.
__device__ __forceinline__ const u16* scale_row(const LutParams& P, int r) {
    const int seg = segment_of(P, r);
    const u16* base = seg == 0 ? P.scales : seg == 1 ? P.scales1 : P.scales2;
    return base + (u64)(r - segment_start(P, seg)) * P.groups;
}

// Where output row r of batch column b goes (its layer's output: batch x its rows).
__device__ __forceinline__ u16* out_at(const LutParams& P, int b, int r) {
    const int seg = segment_of(P, r);
    u16* base = seg == 0 ? P.out : seg == 1 ? P.out1 : P.out2;
    const int rows = seg == 0 ? P.seg1 : seg == 1 ? P.seg2 - P.seg1 : P.rows - P.seg2;
    return base + (u64)b * rows + (r - segment_start(P, seg));
}

// The output value of row r, batch column b: the layer's sum rounded to the activation dtype,
// then (with an addend) the sum with the addend rounded again.
__device__ __forceinline__ u16 output_value(const LutParams& P, int b, int r, float sum) {
    const u16 y = f32_to_act(sum);
    if (P.addend == nullptr) return y;
    return f32_to_act(act_to_f32(y) + act_to_f32(P.addend[(u64)b * P.rows + r]));
}

// Table entry e (< LUT_N): the pair code's two values, packed (LutParams or DequantParams).
template <class Params>
__device__ __forceinline__ u32 lut_entry(const Params& P, int e) {
    float lo, hi;
    if (P.p == 2) {
        lo = P.grid[2 * e];
        hi = P.grid[2 * e + 1];
    } else {
        lo = P.grid[e & ((1 << BITS) - 1)];
        hi = P.grid[e >> BITS];
    }
    return pack_act2(lo, hi);
}

// The warp writes the 32 copies of entries base .. base + 31, lane j holding entry base + j (`v`):
// 32 consecutive words per store, no bank conflicts. Entries are ENTRY_WORDS apart
// (WIDE_ENTRY_BYTES / 4 = 64: 32 copies, then padding).
template <int ENTRY_WORDS>
__device__ __forceinline__ void store_lut_entries(u32* lut, int base, u32 v) {
    const int lane = threadIdx.x & 31;
#pragma unroll 8
    for (int j = 0; j < 32; ++j) {
        const u32 vj = __shfl_sync(0xffffffffu, v, j);
        if (base + j < LUT_N) lut[(base + j) * ENTRY_WORDS + lane] = vj;
    }
}

template <int ENTRY_WORDS = 32>
__device__ __forceinline__ void build_lut(const LutParams& P, u32* lut) {
    const int lane = threadIdx.x & 31;
    for (int base = (threadIdx.x >> 5) * 32; base < LUT_N; base += THREADS)
        store_lut_entries<ENTRY_WORDS>(lut, base, base + lane < LUT_N ? lut_entry(P, base + lane) : 0u);
}

// Scale group of the k-range starting at kl (clamped: k past `padded` only meets zero activations).
__device__ __noinline__ int divide_out_of_line(int a, int b) { return a / b; }

__device__ __forceinline__ int group_of_k(const LutParams& P, int kl) {
    const int group = P.group_shift >= 0 ? kl >> P.group_shift : divide_out_of_line(kl, P.group_size);
    return group < P.groups ? group : P.groups - 1;
}

// Programmatic dependent launch (sm_90): this kernel may start while the Hadamard kernel before it
// runs; everything that reads that kernel's output (or writes what later work reads) comes after.
__device__ __forceinline__ void wait_for_previous_grid() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Let a programmatic dependent (the next call's LUT-GEMM when it reuses this call's rotation)
// launch now: its blocks take the SMs this grid's blocks leave (this grid is one wave, all
// resident already), build their tables and fetch their codes, and wait (griddepcontrol.wait)
// for this grid's completion before they read anything it writes.
__device__ __forceinline__ void allow_dependents() {
#if __CUDA_ARCH__ >= 900
#ifndef LUT_NO_TRIGGER
    asm volatile("griddepcontrol.launch_dependents;");
#endif
#endif
}

// LUT_TRACE (benches/gpu_trace.py): lut_gemv's thread 0 records %globaltimer at the phases of its
// first item (TRACE(i)) and prints them at exit.
#ifdef LUT_TRACE
__device__ __forceinline__ u64 trace_now() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define TRACE(i) \
    if (tid == 0 && item == blockIdx.x) tr[i] = trace_now()
#else
#define TRACE(i)
#endif

__device__ __forceinline__ u32 scale_pair(u16 s) {
#ifdef ACT_BF16
    const u32 b = f32_to_bf16(f16_to_f32(s));
    return b | (b << 16);
#else
    return (u32)s | ((u32)s << 16);
#endif
}

__device__ __forceinline__ int group_of(const LutParams& P, int kl) { return group_of_k(P, kl); }

// Chunk `c` of a row read byte by byte (unaligned rows, a row's partial last chunk), never past
// the row. Out of line: the main loops stay small enough for the instruction cache.
__device__ __noinline__ U4 load_chunk_bytes(const unsigned char* codes, int c, int row_bytes) {
    u32 w[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < 4 * BITS; ++i) {
        const int b = c * (4 * BITS) + i;
        const u32 v = b < row_bytes ? (u32)codes[b] : 0u;
        w[i / 4] |= v << (8 * (i % 4));
    }
    U4 r;
    r.x = w[0];
    r.y = w[1];
    r.z = w[2];
    r.w = w[3];
    return r;
}

// A pointer the compiler cannot recompute (so it keeps it in a register instead of redoing its
// address arithmetic inside a loop).
__device__ __forceinline__ const void* opaque_pointer(const void* p) {
    u64 v;
    asm volatile("mov.b64 %0, %1;" : "=l"(v) : "l"(p));
    return (const void*)v;
}

// Codes of row r. Canonical layout (as stored on disk): rows of row_bytes, row_pitch = row_bytes,
// step_pitch = 16 * BITS. Tiled layout (repacked at load time by higgs_rs.cuda when rows % 16 == 0
// and the padded width is a multiple of 128): 16-row x 128-k tiles of 64 * BITS contiguous bytes,
// ordered (row tile, super-step); inside a tile row r & 15, chunk c & 3 at (4 (r & 15) + (c & 3))
// * 4 * BITS, so a warp's 32 chunk loads of one row half are 512 contiguous bytes (4 bits):
// row_pitch = 16 * BITS, step_pitch = 256 * BITS. Both: chunk c of row r lies at
// 16 row_bytes (r >> 4) + row_pitch (r & 15) + step_pitch (c >> 2) + 4 BITS (c & 3); only the
// canonical layout has partial or unaligned chunks (read byte by byte from the row start).
__device__ __forceinline__ const unsigned char* code_row(const LutParams& P, int r) {
    const int seg = segment_of(P, r);
    const unsigned char* base = seg == 0 ? P.codes : seg == 1 ? P.codes1 : P.codes2;
    r -= segment_start(P, seg);
    return base + (u64)(r >> 4) * (16 * (u64)P.row_bytes) + (u64)((r & 15) * P.row_pitch);
}

// One whole, aligned 32-value chunk of codes (4 * BITS bytes at `src`), streamed.
__device__ __forceinline__ void load_chunk_vector(const unsigned char* src, u32 (&w)[BITS]) {
#if BITS == 4
    const U4 v = load_stream_v4(src);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
#elif BITS == 2
    load_stream_v2(src, w[0], w[1]);
#else
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = load_stream_u32(src + 4 * i);
#endif
}

// Issue the loads of chunk `c` (the 32 k-values [32c, 32c + 32)) of a row: packed codes into w,
// the f16 scale into s. `codes` and `scales` point at the row (null: a row past the end, which
// gets zero codes and scale 0, so its values are 0). Chunks past `padded` get zeros too;
// unaligned or partial chunks are read byte by byte, never past the row.
__device__ __forceinline__ void load_chunk(const LutParams& P, const unsigned char* codes, const u16* scales, int c,
                                           u32 (&w)[BITS], u32& s) {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = 0;
    s = 0;
    const int kl = c * 32;
    if (!codes || kl >= P.padded) return;
    if (P.vector_codes && c < P.full_chunks) {
        const unsigned char* src = codes + (c >> 2) * P.step_pitch + (c & 3) * (4 * BITS);
        load_chunk_vector(src, w);
    } else {
        const U4 v = load_chunk_bytes(codes, c, P.row_bytes);
        w[0] = v.x;
        if (BITS > 1) w[1] = v.y;
        if (BITS > 2) w[2] = v.z;
        if (BITS > 3) w[3] = v.w;
    }
    s = load_cached_u16(scales + group_of(P, kl));
}

// Table entries 256 bytes apart (32 copies, then padding), so a lane's byte offset code * 256 +
// lane * 4 is one PRMT of the code byte and the lane offset (4-bit codes). Used by `lut_mma` and
// `lut_gemv` (both keep the table in dynamic shared memory, LUT_N * WIDE_ENTRY_BYTES bytes).
#define WIDE_ENTRY_BYTES 256

__device__ __forceinline__ u32 wide_offset(const u32 (&w)[BITS], int i, u32 lane4) {
#if BITS == 4
    u32 d;
    // Result bytes: lane4's low byte, code byte i % 4 of word i / 4, then zeros (lane4's byte 1).
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(w[i >> 2]), "r"(lane4), "r"(0x5504u | ((u32)(i & 3) << 4)));
    return d;
#else
    const int offset = i * PAIR_BITS;
    const int word = offset >> 5;
    const int shift = offset & 31;
    u32 v;
    if (shift + PAIR_BITS <= 32 || word + 1 >= BITS) {
        v = shift >= 8 ? w[word] >> (shift - 8) : w[word] << (8 - shift);
    } else {
        v = ((w[word] >> shift) | (w[word + 1] << (32 - shift))) << 8;
    }
    return (v & ((u32)(LUT_N - 1) << 8)) | lane4;
#endif
}

__device__ __forceinline__ u32 wide_lookup(const u32* lut, const u32 (&w)[BITS], int i, u32 lane4) {
    return *(const u32*)((const char*)lut + wide_offset(w, i, lane4));
}

// Activations of `lut_mma`: the item's CT batch columns of XS_STAGES super-steps in a ring of
// shared-memory stages (after the table), filled by cp.async (one 16-byte piece per copy)
// XS_STAGES - 1 super-steps ahead and read by all 8 warps (before: each warp re-read them
// through L1). Column n of a stage is 256 bytes (128 k); its 16-byte piece j sits at piece
// j ^ ((j >> 3) & 1) ^ ((n & 1) << 1), so a quarter-warp's 16-byte reads (columns g, g + 1;
// pieces 4t + u) hit 8 distinct bank quads.
#ifndef XS_STAGES
#define XS_STAGES 3
#endif
#define XS_COL_BYTES (2 * KSTEP)

struct __align__(16) SharedV4 {
    u32 x, y, z, w;
};

__device__ __forceinline__ u32 shared_address(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

// 16 bytes global -> shared, zero-filled when src_bytes is 0 (columns past the batch).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Where this thread's copies of a stage go and come from: thread tid copies piece j = tid % 16 of
// columns n0 + 16 i (n0 = tid / 16), i < PER = CT * 16 / THREADS (or just column n0 when CT = 8).
template <int CT>
struct Stager {
    static constexpr int PER = CT * 16 >= THREADS ? CT * 16 / THREADS : 1;
    const unsigned char* src;  // piece j of column n0, super-step 0
    u64 col_stride;            // bytes between columns n and n + 16
    u32 dst;                   // shared address of piece j of column n0 in stage 0
    int live;                  // columns n0 + 16 i < batch for i < live
    bool active;               // this thread copies anything (CT = 8: half of the threads)

    __device__ __forceinline__ Stager(const LutParams& P, u32 stage0, int col0) {
        const int tid = threadIdx.x;
        const int n0 = tid >> 4;
        const int j = tid & 15;
        active = n0 < CT;
        const int left = P.batch - col0 - n0;
        live = left <= 0 ? 0 : (left + 15) / 16;
        src = (const unsigned char*)(P.x_rot + (u64)(col0 + (live > 0 ? n0 : 0)) * P.kp) + 16 * j;
        col_stride = (u64)16 * P.kp * 2;
        dst = stage0 + (u32)(n0 * XS_COL_BYTES + ((j ^ ((j >> 3) & 1) ^ ((n0 & 1) << 1)) << 4));
    }

    // Copies of super-step `step` (nothing past step_end) into stage `slot`; always commits one
    // group, so the wait counts stay uniform.
    __device__ __forceinline__ void issue(int slot, int step, int step_end) const {
        if (step < step_end && active) {
            const unsigned char* s = src + (u64)step * XS_COL_BYTES;
            const u32 d = dst + (u32)(slot * CT * XS_COL_BYTES);
#pragma unroll
            for (int i = 0; i < PER; ++i)
                cp_async16(d + i * 16 * XS_COL_BYTES, i < live ? s + i * col_stride : src, i < live ? 16u : 0u);
        }
        cp_async_commit();
    }
};

// Partial sums written by other blocks: 16 bytes, bypassing L1.
__device__ __forceinline__ void load_coherent_f32x4(const float* p, float (&v)[4]) {
    asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];"
                 : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3])
                 : "l"(p)
                 : "memory");
}

// Rows r..r+3 of batch column b: the sum of the splits' partials in split order, as activations.
__device__ __forceinline__ void reduce_splits4(const LutParams& P, int b, int r) {
    const float* p = P.partials + (u64)b * P.rows + r;
    const u64 stride = (u64)P.partial_cols * P.rows;
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
    int sp = 0;
    for (; sp + 8 <= P.splits; sp += 8) {
        float v[8][4];
#pragma unroll
        for (int k = 0; k < 8; ++k) load_coherent_f32x4(p + (sp + k) * stride, v[k]);
#pragma unroll
        for (int k = 0; k < 8; ++k)
#pragma unroll
            for (int q = 0; q < 4; ++q) sum[q] += v[k][q];
    }
    for (; sp < P.splits; ++sp) {
        float v[4];
        load_coherent_f32x4(p + sp * stride, v);
#pragma unroll
        for (int q = 0; q < 4; ++q) sum[q] += v[q];
    }
    const u32 lo = output_value(P, b, r, sum[0]) | ((u32)output_value(P, b, r + 1, sum[1]) << 16);
    const u32 hi = output_value(P, b, r + 2, sum[2]) | ((u32)output_value(P, b, r + 3, sum[3]) << 16);
    asm volatile("st.global.v2.u32 [%0], {%1,%2};" ::"l"(out_at(P, b, r)), "r"(lo), "r"(hi) : "memory");
}

// Row r of batch column b: the sum of the splits' partials in split order, as an activation.
__device__ __forceinline__ void reduce_splits1(const LutParams& P, int b, int r) {
    float sum = 0.f;
    for (int sp = 0; sp < P.splits; ++sp)
        sum += load_coherent_f32(P.partials + ((u64)sp * P.partial_cols + b) * P.rows + r);
    *out_at(P, b, r) = output_value(P, b, r, sum);
}

__device__ __forceinline__ u32 load_acquire_u32(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Share `sh` (of P.splits) of row block `tile`'s outputs, columns col0..: each output the sum of
// the splits' partials in split order. The shares interleave in units of THREADS outputs (four
// rows each when rows % 4 == 0).
template <int RB, int CT>
__device__ __forceinline__ void reduce_share(const LutParams& P, int tile, int sh, int col0) {
    const int rb0 = tile * RB;
    if (((P.rows | P.seg1 | P.seg2) & 3) == 0) {
        for (int e = sh * THREADS + (int)threadIdx.x; e < (RB / 4) * CT; e += P.splits * THREADS) {
            const int r = rb0 + 4 * (e % (RB / 4));
            const int b = col0 + e / (RB / 4);
            if (r < P.rows && b < P.batch) reduce_splits4(P, b, r);
        }
    } else {
        for (int e = sh * THREADS + (int)threadIdx.x; e < RB * CT; e += P.splits * THREADS) {
            const int r = rb0 + e % RB;
            const int b = col0 + e / RB;
            if (r < P.rows && b < P.batch) reduce_splits1(P, b, r);
        }
    }
}

template <int MT, int NT, bool PLAIN>
__device__ __forceinline__ void lut_mma_body(const LutParams& P) {
    constexpr int RT = 16 * MT;        // rows per warp
    constexpr int RB = WARPS * RT;     // rows per block
    constexpr int CT = 8 * NT;         // batch columns per item
    constexpr int S = XS_STAGES;
    constexpr int STAGE_BYTES = CT * XS_COL_BYTES;
    // Super-steps whose codes are in flight per warp (a ring of registers, indexed at compile
    // time): enough bytes in flight to cover DRAM latency.
#ifdef MMA_D
    constexpr int D = MMA_D;
#else
    constexpr int D = 3;
#endif
    // Dynamic shared memory: the table (LUT_N * WIDE_ENTRY_BYTES), then S activation stages.
    extern __shared__ __align__(16) u32 lut[];
    unsigned char* const xs = (unsigned char*)lut + LUT_N * WIDE_ENTRY_BYTES;
    __shared__ int is_last_block;
    __shared__ u32 claimed_shares;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const u32 lane4 = (u32)lane * 4;
    build_lut<WIDE_ENTRY_BYTES / 4>(P, lut);
    __syncthreads();
    bool waited = false;
    // This lane's B pieces in a stage: column g of each n-tile, pieces 4t + u (swizzled).
    const int swz = (t >> 1) ^ ((g & 1) << 1);
    int xoff[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) xoff[u] = g * XS_COL_BYTES + ((4 * t + (u ^ swz)) << 4);
    // PLAIN (`lut_mma_plain`: whole rows of aligned, full chunks and power-of-two groups, every
    // Llama layer): codes and scales are loaded without the bounds and byte-path checks of
    // load_chunk.
    constexpr bool plain = PLAIN;

    // Persistent blocks over work items (row block, split, batch chunk), row block fastest. All
    // warps of a block walk the item's super-steps together (one barrier per super-step).
    const int items = P.row_tiles * P.splits * P.batch_chunks;
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
        const int tile = item % P.row_tiles;
        const int split = (item / P.row_tiles) % P.splits;
        const int chunk = item / (P.row_tiles * P.splits);
        const int row0 = tile * RB + warp * RT;
        const int col0 = chunk * MAX_COLS;
        const int step_begin = split * P.steps_per_split;
        const int step_end = step_begin + P.steps_per_split < P.total_steps ? step_begin + P.steps_per_split
                                                                            : P.total_steps;

        float acc[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

        // This lane's rows: code and scale pointers, chunk t of a step. load_chunk takes a null
        // code pointer past the last row; the plain path reads the last row instead (its results
        // are never stored).
        const unsigned char* crow[MT][2];
        const u16* srow[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row0 + mt * 16 + g + 8 * h;
                const int rc = r < P.rows ? r : P.rows - 1;
                if (plain) {
                    // Opaque: kept in registers, not recomputed from P at every refill.
                    crow[mt][h] = (const unsigned char*)opaque_pointer(code_row(P, rc) + t * (4 * BITS));
                    srow[mt][h] = (const u16*)opaque_pointer(scale_row(P, rc));
                } else {
                    crow[mt][h] = r < P.rows ? code_row(P, rc) : (const unsigned char*)0;
                    srow[mt][h] = scale_row(P, rc);
                }
            }
        u32 ring[D][MT][2][BITS];
        u32 sring[D][MT][2];
        // Codes and scale of chunk (step * 4 + t) of each of this lane's rows into ring slot d.
        auto fetch = [&](int d, int step) {
            if (plain) {
                const int gi = (step * KSTEP + 32 * t) >> P.group_shift;
                const int group = gi < P.groups ? gi : P.groups - 1;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        load_chunk_vector(crow[mt][h] + step * P.step_pitch, ring[d][mt][h]);
                        sring[d][mt][h] = load_cached_u16(srow[mt][h] + group);
                    }
            } else {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        load_chunk(P, crow[mt][h], srow[mt][h], step * 4 + t, ring[d][mt][h], sring[d][mt][h]);
            }
        };

#pragma unroll
        for (int d = 0; d < D; ++d) {
            if (step_begin + d < step_end) {
                fetch(d, step_begin + d);
            } else {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
#pragma unroll
                        for (int i = 0; i < BITS; ++i) ring[d][mt][h][i] = 0;
                        sring[d][mt][h] = 0;
                    }
            }
        }
        if (!waited) {
            // Programmatic launch: the codes above do not depend on the kernel before this one;
            // the activations below do.
            wait_for_previous_grid();
            waited = true;
        }
        const Stager<CT> stager(P, shared_address(xs), col0);
        // Every warp is done with the previous item's stages before they are refilled.
        __syncthreads();
#pragma unroll
        for (int i = 0; i < S - 1; ++i) stager.issue(i, step_begin + i, step_end);
        int slot = 0;
        for (int step0 = step_begin; step0 < step_end; step0 += D) {
#pragma unroll
            for (int d = 0; d < D; ++d) {
                const int step = step0 + d;
                if (step >= step_end) break;
                // This step's stage has landed (this thread's copies), and every thread's (barrier);
                // the barrier also frees the stage read last step, which is refilled now.
                cp_async_wait<S - 2>();
                __syncthreads();
                stager.issue(slot == 0 ? S - 1 : slot - 1, step + S - 1, step_end);
                const unsigned char* stage = xs + slot * STAGE_BYTES;
                slot = slot + 1 == S ? 0 : slot + 1;
                u32 s2[MT][2];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) s2[mt][h] = scale_pair((u16)sring[d][mt][h]);
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    // Mma steps s = 2u, 2u + 1: the A fragments of both, then per n-tile one
                    // 16-byte B read (both steps' halves) and two mma.
                    u32 a[2][MT][4];
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            const int s = 2 * u + h;
                            a[h][mt][0] = mul_act2(wide_lookup(lut, ring[d][mt][0], 2 * s, lane4), s2[mt][0]);
                            a[h][mt][1] = mul_act2(wide_lookup(lut, ring[d][mt][1], 2 * s, lane4), s2[mt][1]);
                            a[h][mt][2] = mul_act2(wide_lookup(lut, ring[d][mt][0], 2 * s + 1, lane4), s2[mt][0]);
                            a[h][mt][3] = mul_act2(wide_lookup(lut, ring[d][mt][1], 2 * s + 1, lane4), s2[mt][1]);
                        }
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const SharedV4 bq = *(const SharedV4*)(stage + nt * 8 * XS_COL_BYTES + xoff[u]);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma_16816(acc[mt][nt], a[0][mt][0], a[0][mt][1], a[0][mt][2], a[0][mt][3], bq.x, bq.y);
                            mma_16816(acc[mt][nt], a[1][mt][0], a[1][mt][1], a[1][mt][2], a[1][mt][3], bq.z, bq.w);
                        }
                    }
                }
                // Refill this ring slot with the super-step D ahead.
                if (step + D < step_end) fetch(d, step + D);
            }
        }
        // Only empty groups (super-steps past the item) can be pending here.
        cp_async_wait<0>();

        // Each warp's accumulators are complete for its rows over this split's k range.
        const bool split_mode = P.splits > 1;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int r = row0 + mt * 16 + g + 8 * (i >> 1);
                    const int b = col0 + nt * 8 + 2 * t + (i & 1);
                    if (r < P.rows && b < P.batch) {
                        if (split_mode) {
                            P.partials[((u64)split * P.partial_cols + b) * P.rows + r] = acc[mt][nt][i];
                        } else {
                            *out_at(P, b, r) = output_value(P, b, r, acc[mt][nt][i]);
                        }
                    }
                }
        if (split_mode) {
            __threadfence();
            __syncthreads();
            if (P.spin_reduce) {
                // One item per block and the whole grid meant to be resident at once (one wave):
                // the split blocks of this row block each add up their share of the outputs once
                // all have arrived (each output in split order: deterministic), so no single SM
                // reads all the partials. state[0] of the row block counts arrivals (low 16 bits)
                // and holds a mask of the blocks that gave up waiting (high 16 bits: the grid was
                // not all resident after all); the last block to arrive sums its own share and
                // those of the blocks that gave up before it arrived. state[1] counts departures;
                // the last to depart zeroes both.
                u32* const state = P.counters + 4 * tile;
                if (tid == 0) {
                    const u32 before = atomicAdd(&state[0], 1u);
                    u32 shares = 1u << split;
                    if ((before & 0xffffu) == (u32)(P.splits - 1)) {
                        shares |= before >> 16;
                    } else {
                        bool all = false;
                        for (int i = 0; !all && i < (1 << 14); ++i) {
                            __nanosleep(64);
                            all = (load_acquire_u32(&state[0]) & 0xffffu) >= (u32)P.splits;
                        }
                        // Giving up is recorded atomically: if the last block arrived meanwhile,
                        // this block still sums its share (the last one did not count it).
                        if (!all && (atomicOr(&state[0], (1u << split) << 16) & 0xffffu) < (u32)P.splits)
                            shares = 0;
                    }
                    claimed_shares = shares;
                }
                __syncthreads();
                const u32 shares = claimed_shares;
                if (shares) {
                    __threadfence();
                    for (int sh = 0; sh < P.splits; ++sh)
                        if (shares & (1u << sh)) reduce_share<RB, CT>(P, tile, sh, col0);
                }
                __syncthreads();
                if (tid == 0 && atomicAdd(&state[1], 1u) == (u32)(P.splits - 1)) {
                    state[0] = 0;
                    state[1] = 0;
                }
            } else {
                // The last block to finish this row block adds the splits up, in split order.
                if (tid == 0) {
                    const u32 before = atomicAdd(&P.counters[4 * tile], 1u);
                    is_last_block = before == (u32)(P.splits - 1);
                }
                __syncthreads();
                if (is_last_block) {
                    __threadfence();
                    for (int sh = 0; sh < P.splits; ++sh) reduce_share<RB, CT>(P, tile, sh, col0);
                    if (tid == 0) P.counters[4 * tile] = 0;
                }
            }
            // `is_last_block` is rewritten by the next item.
            __syncthreads();
        }
    }
    if (!waited) wait_for_previous_grid();
}

// ---------------------------------------------------------------------------------------------
// Small batches (GEMV): `lut_gemv`. The same mma tiling and chunk ownership as `lut_mma`, with two
// changes that halve the instructions per pair code:
// - No scale multiply per pair. The batch has at most 8 / CPB rows, so the mma's 8 B columns are
//   spent on (batch item, scale group) pairs instead: column n = b * CPB + h holds activation b
//   masked to the chunks of super-step group slot h (CPB = 128 / group_size slots, 1 to 4, per
//   128-k super-step). After a super-step's 8 mma the accumulator column n holds the unscaled dot
//   product of that group; it is multiplied by its row's scale once, in f32.
// - The table's entries are 256 bytes apart (32 copies, then padding), so a lane's byte offset
//   code * 256 + lane * 4 is one PRMT of the code byte and the lane offset (4-bit codes).
#ifdef LUT_GEMV
#define GEMV_ENTRY_BYTES WIDE_ENTRY_BYTES
#ifndef GEMV_D
#define GEMV_D 4  // super-steps of codes in flight per warp
#endif
#ifndef GEMV_MIN_BLOCKS
#define GEMV_MIN_BLOCKS 2
#endif
#ifndef GEMV_G
#define GEMV_G 1  // ring slots refilled together (divides GEMV_D)
#endif

// The two f16 scales of a row for this lane's accumulator columns j = 0, 1 at super-step `step`
// (low half: column 2t, high half: column 2t + 1).
__device__ __forceinline__ u32 gemv_scales(const LutParams& P, const u16* srow, int step, int t) {
    // lut_gemv takes power-of-two group sizes only: a shift, clamped for k past `padded`.
    const int k0 = step * KSTEP + (KSTEP / GEMV_CPB) * ((2 * t) % GEMV_CPB);
    const int g0 = k0 >> P.group_shift;
    const u32 s0 = load_cached_u16(srow + (g0 < P.groups ? g0 : P.groups - 1));
    if (GEMV_CPB == 1) return s0 | (s0 << 16);
    const int g1 = (k0 + KSTEP / GEMV_CPB) >> P.group_shift;
    const u32 s1 = load_cached_u16(srow + (g1 < P.groups ? g1 : P.groups - 1));
    return s0 | (s1 << 16);
}

// Plain layers (`lut_gemv_plain`): every layer of the launch has a multiple of 16 rows, every chunk
// of every super-step is whole and vector-aligned, group_size is 128 / GEMV_CPB with groups *
// group_size == padded, and (GEMV_CPB >= 2) each lane's scale pair is 4-byte aligned, so a refill
// is one address step and one load per row half.
// A plain warp's refill of super-step `step` for one row half: `codes` points at the lane's chunk
// of super-step 0 (row start + 4 * BITS * t), `scales` at its first scale of super-step 0 (row
// start + (2t) % CPB): the scale groups of a super-step are consecutive, CPB of them.
__device__ __forceinline__ void gemv_refill_plain(const LutParams& P, const unsigned char* codes, const u16* scales,
                                                  int step, bool has_output, u32 (&w)[BITS], u32& s) {
    load_chunk_vector(codes + (u64)step * P.step_pitch, w);
    if (has_output) {
        if (GEMV_CPB == 1) {
            const u32 s0 = load_cached_u16(scales + step);
            s = s0 | (s0 << 16);
        } else {
            s = load_cached_u32(scales + step * GEMV_CPB);
        }
    }
}

// Ask L2 for the codes and scales of this warp's first GEMV_D super-steps before the table is
// built: the first data of a launch otherwise arrives ~3 µs after the ring loads that follow the
// table (H100). Tiled plain layers only, where a warp's super-step is 256 * BITS contiguous bytes.
// The warp's rows and steps are those of its first item in lut_gemv_body's loop (same formulas,
// written out here: sharing one helper with the loop changed the loop's SASS, 105 -> 103
// registers, and that version was never timed).
__device__ __forceinline__ void gemv_prefetch_first_steps(const LutParams& P) {
#ifndef GEMV_NO_PREFETCH
    if (P.step_pitch != 256 * BITS || (int)blockIdx.x >= P.row_tiles * P.splits) return;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int tile = blockIdx.x % P.row_tiles;
    const int split = blockIdx.x / P.row_tiles;
    const int kslices = P.kslices;
    const int row0 = tile * (WARPS / kslices) * 16 + (warp / kslices) * 16;
    if (row0 >= P.rows) return;
    const int item_begin = split * P.steps_per_split;
    const int item_end = min(item_begin + P.steps_per_split, P.total_steps);
    const int per_slice = (item_end - item_begin + kslices - 1) / kslices;
    const int begin = item_begin + (warp % kslices) * per_slice;
    const int steps = min(min(per_slice, item_end - begin), GEMV_D);
    constexpr int LINES = 2 * BITS;  // 128-byte lines per super-step
    const unsigned char* codes = code_row(P, row0) + (u64)begin * P.step_pitch;
    for (int i = lane; i < steps * LINES; i += 32) asm volatile("prefetch.global.L2 [%0];" ::"l"(codes + i * 128));
    // The 16 rows' scales of those steps (CPB per step: within one or two lines per row).
    if (lane < 16 && steps > 0)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(scale_row(P, row0 + lane) + begin * GEMV_CPB));
#endif
}

// In-block K slices (P.kslices = KS > 1): the block's 8 warps are 8 / KS row tiles times KS
// slices of the item's super-steps; after the loop each warp leaves its sums in shared memory (after
// the table) and the slice-0 warp of each row tile adds the others' in slice order. For layers with
// few rows this fills the GPU without global split-K, whose tail (partials, fence, counter, the
// last block's pass) costs ~2 µs on an H100.
template <int MT, bool PLAIN>
__device__ __forceinline__ void lut_gemv_body(const LutParams& P) {
    constexpr int RT = 16 * MT;
    constexpr int D = GEMV_D;
    constexpr int NB = 8 / GEMV_CPB;  // batch items per launch
    extern __shared__ u32 lut[];      // LUT_N * GEMV_ENTRY_BYTES bytes
    __shared__ int is_last_block;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const u32 lane4 = (u32)lane * 4;
#ifdef LUT_TRACE
    u64 tr[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int item = blockIdx.x;
    TRACE(0);
#endif
    // One table entry per thread: its grid values are asked for before the prefetch, which would
    // otherwise queue ahead of them (the table build took 2.3-2.9 µs instead of ~1.1 µs).
    static_assert(LUT_N <= THREADS, "one table entry per thread");
    const u32 entry = tid < LUT_N ? lut_entry(P, tid) : 0u;
    if (PLAIN) gemv_prefetch_first_steps(P);
    store_lut_entries<GEMV_ENTRY_BYTES / 4>(lut, warp * 32, entry);
    __syncthreads();
    TRACE(1);
    bool waited = false;

    // B operand: this lane supplies column g (batch item g / CPB, group slot g % CPB) for its chunk
    // t, which lies in slot t * CPB / 4; zero where they differ or past the batch.
    const int xb = g / GEMV_CPB;
    const bool x_active = xb < P.batch && (t * GEMV_CPB) / 4 == g % GEMV_CPB;
    // Accumulator columns 2t, 2t + 1 of this lane: batch item (2t) / CPB for both when CPB >= 2.
    const bool has_output = (2 * t) / GEMV_CPB < P.batch;

    const int kslices = P.kslices;
    const int kslice = warp % kslices;
    const int RB = (WARPS / kslices) * RT;  // rows per block
    float* slice_sums = (float*)(lut + LUT_N * (GEMV_ENTRY_BYTES / 4));  // WARPS x 4 x 32

    const int items = P.row_tiles * P.splits;
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
        const int tile = item % P.row_tiles;
        const int split = item / P.row_tiles;
        const int row0 = tile * RB + (warp / kslices) * RT;
        const int item_begin = split * P.steps_per_split;
        const int item_end = item_begin + P.steps_per_split < P.total_steps ? item_begin + P.steps_per_split
                                                                            : P.total_steps;
        const int per_slice = (item_end - item_begin + kslices - 1) / kslices;
        const int step_begin = item_begin + kslice * per_slice;
        const int step_end = step_begin + per_slice < item_end ? step_begin + per_slice : item_end;
        const u16* xrow = P.x_rot + (u64)(x_active ? xb : 0) * P.kp + 32 * t;

        float acc[MT][2][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) acc[mt][h][0] = acc[mt][h][1] = 0.f;

        const unsigned char* crow[MT][2];
        const u16* srow[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row0 + mt * 16 + g + 8 * h;
                if (PLAIN) {
                    // The lane's pointers of gemv_refill_plain. A warp past the last row (the
                    // layer has a multiple of 16 rows) reads rows of the first tile; it writes
                    // nothing.
                    const int rr = r < P.rows ? r : r & 15;
                    // Opaque copies: kept in registers, not recomputed from P at every refill.
                    crow[mt][h] = (const unsigned char*)opaque_pointer(code_row(P, rr) + 4 * BITS * t);
                    srow[mt][h] = (const u16*)opaque_pointer(scale_row(P, rr) + (GEMV_CPB == 1 ? 0 : (2 * t) % GEMV_CPB));
                } else {
                    crow[mt][h] = r < P.rows ? code_row(P, r) : (const unsigned char*)0;
                    srow[mt][h] = scale_row(P, r < P.rows ? r : 0);
                }
            }

        u32 ring[D][MT][2][BITS];
        u32 sring[D][MT][2];
#pragma unroll
        for (int d = 0; d < D; ++d)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    u32 unused;
                    sring[d][mt][h] = 0;
                    if (PLAIN && step_begin + d < step_end) {
                        gemv_refill_plain(P, crow[mt][h], srow[mt][h], step_begin + d, has_output, ring[d][mt][h],
                                          sring[d][mt][h]);
                    } else if (step_begin + d < step_end) {
                        load_chunk(P, crow[mt][h], srow[mt][h], (step_begin + d) * 4 + t, ring[d][mt][h], unused);
                        if (has_output) sring[d][mt][h] = gemv_scales(P, srow[mt][h], step_begin + d, t);
                    } else {
#pragma unroll
                        for (int i = 0; i < BITS; ++i) ring[d][mt][h][i] = 0;
                    }
                }
        TRACE(2);
        if (!waited) {
            wait_for_previous_grid();
            waited = true;
        }
        TRACE(3);
        U4 bq[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) bq[u].x = bq[u].y = bq[u].z = bq[u].w = 0;
        for (int step0 = step_begin; step0 < step_end; step0 += D) {
#pragma unroll
            for (int d = 0; d < D; ++d) {
                const int step = step0 + d;
                if (step >= step_end) break;
                const int k0 = step * KSTEP;
                // Inactive lanes keep the zeros set once per item (no per-step zeroing).
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    if (x_active) bq[u] = load_cached_v4(xrow + k0 + 8 * u);
                float c[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) c[mt][0] = c[mt][1] = c[mt][2] = c[mt][3] = 0.f;
#pragma unroll
                for (int s = 0; s < 8; ++s) {
                    const u32 b0 = (s & 1) ? bq[s >> 1].z : bq[s >> 1].x;
                    const u32 b1 = (s & 1) ? bq[s >> 1].w : bq[s >> 1].y;
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        const u32 a0 = wide_lookup(lut, ring[d][mt][0], 2 * s, lane4);
                        const u32 a1 = wide_lookup(lut, ring[d][mt][1], 2 * s, lane4);
                        const u32 a2 = wide_lookup(lut, ring[d][mt][0], 2 * s + 1, lane4);
                        const u32 a3 = wide_lookup(lut, ring[d][mt][1], 2 * s + 1, lane4);
                        mma_16816(c[mt], a0, a1, a2, a3, b0, b1);
                    }
                }
#ifdef LUT_TRACE
                if (step == step_begin) TRACE(4);
#endif
                // Column j of row half h: scale of its group, applied once per super-step.
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const u32 sp = sring[d][mt][h];
                        acc[mt][h][0] += f16_to_f32((u16)(sp & 0xffffu)) * c[mt][2 * h];
                        acc[mt][h][1] += f16_to_f32((u16)(sp >> 16)) * c[mt][2 * h + 1];
                    }
                // Refill slots in groups of G: the G super-steps ahead of a row are asked for
                // together (G * 16 * BITS contiguous bytes per row), which DRAM serves better.
                if (d % GEMV_G == GEMV_G - 1) {
#pragma unroll
                    for (int dd = d - (GEMV_G - 1); dd <= d; ++dd) {
                        const int ahead = step0 + dd + D;
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                            for (int h = 0; h < 2; ++h)
                                if (ahead < step_end) {
                                    if (PLAIN) {
                                        gemv_refill_plain(P, crow[mt][h], srow[mt][h], ahead, has_output,
                                                          ring[dd][mt][h], sring[dd][mt][h]);
                                    } else {
                                        u32 unused;
                                        load_chunk(P, crow[mt][h], srow[mt][h], ahead * 4 + t, ring[dd][mt][h],
                                                   unused);
                                        if (has_output) sring[dd][mt][h] = gemv_scales(P, srow[mt][h], ahead, t);
                                    }
                                }
                    }
                }
            }
        }

        static_assert(MT == 1, "slice_sums holds one row tile per warp");
        if (kslices > 1) {
#pragma unroll
            for (int j = 0; j < 4; ++j) slice_sums[(warp * 4 + j) * 32 + lane] = acc[0][j >> 1][j & 1];
            __syncthreads();
            if (kslice == 0) {
                for (int sl = 1; sl < kslices; ++sl)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[0][j >> 1][j & 1] += slice_sums[((warp + sl) * 4 + j) * 32 + lane];
            }
            // The next item's sums overwrite these.
            __syncthreads();
        }
        // Lane (g, t) holds rows g, g + 8 for columns 2t, 2t + 1: batch items 2t, 2t + 1 (CPB 1), or
        // both slots of item t (CPB 2), or two of the four slots of item t / 2 (CPB 4: the other two
        // are on lane t ^ 1). With K slices only slice 0 holds the row tile's sums.
        const bool split_mode = P.splits > 1;
        TRACE(5);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row0 + mt * 16 + g + 8 * h;
                float v[2];
                int nv;
                int b0;
                if (GEMV_CPB == 1) {
                    v[0] = acc[mt][h][0];
                    v[1] = acc[mt][h][1];
                    nv = 2;
                    b0 = 2 * t;
                } else {
                    v[0] = acc[mt][h][0] + acc[mt][h][1];
                    if (GEMV_CPB == 4) v[0] += __shfl_xor_sync(0xffffffffu, v[0], 1);
                    v[1] = 0.f;
                    nv = (GEMV_CPB == 4 && (t & 1)) ? 0 : 1;
                    b0 = (2 * t) / GEMV_CPB;
                }
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int b = b0 + j;
                    if (j < nv && kslice == 0 && r < P.rows && b < P.batch) {
                        if (split_mode) {
                            P.partials[((u64)split * P.partial_cols + b) * P.rows + r] = v[j];
                        } else {
                            *out_at(P, b, r) = output_value(P, b, r, v[j]);
                        }
                    }
                }
            }
        if (split_mode) {
            __threadfence();
            __syncthreads();
            if (tid == 0) {
                const u32 before = atomicAdd(&P.counters[4 * tile], 1u);
                is_last_block = before == (u32)(P.splits - 1);
            }
            __syncthreads();
            if (is_last_block) {
                __threadfence();
                const int rb0 = tile * RB;
                const int cols = P.batch < NB ? P.batch : NB;
                for (int e = tid; e < RB * cols; e += THREADS) {
                    const int r = rb0 + e % RB;
                    const int b = e / RB;
                    if (r < P.rows) {
                        float sum = 0.f;
                        for (int sp = 0; sp < P.splits; ++sp)
                            sum += load_coherent_f32(P.partials + ((u64)sp * P.partial_cols + b) * P.rows + r);
                        *out_at(P, b, r) = output_value(P, b, r, sum);
                    }
                }
                if (tid == 0) P.counters[4 * tile] = 0;
            }
            __syncthreads();
        }
        TRACE(6);
    }
    if (!waited) wait_for_previous_grid();
#ifdef LUT_TRACE
    if (tid == 0) {
        u32 smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        printf("LT %d %d %d %d %u %llu %llu %llu %llu %llu %llu %llu\n", P.rows, P.splits, (int)gridDim.x,
               (int)blockIdx.x, smid, tr[0], tr[1], tr[2], tr[3], tr[4], tr[5], tr[6]);
    }
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS, GEMV_MIN_BLOCKS) lut_gemv(const LutParams P) {
    allow_dependents();
    lut_gemv_body<1, false>(P);
}

// Plain layers (chosen by the host, see gemv_refill_plain): their own kernel, as lut_mma_plain.
extern "C" __global__ void __launch_bounds__(THREADS, GEMV_MIN_BLOCKS) lut_gemv_plain(const LutParams P) {
    allow_dependents();
    lut_gemv_body<1, true>(P);
}

#endif

// One instantiation per module (compiled on first use): LUT_MT row tiles x LUT_NT batch tiles.
// Few batch tiles: cap registers so three (batch <= 8) or two blocks fit per multiprocessor.
#ifndef LUT_MIN_BLOCKS
#define LUT_MIN_BLOCKS (LUT_MT > 1 ? 1 : LUT_NT == 1 ? 3 : LUT_NT <= 4 ? 2 : 1)
#endif
#ifdef LUT_MT
extern "C" __global__ void __launch_bounds__(THREADS, LUT_MIN_BLOCKS) lut_mma(const LutParams P) {
    allow_dependents();
    lut_mma_body<LUT_MT, LUT_NT, false>(P);
}

// Plain layers (chosen by the host): a kernel of its own, so that neither loop carries the other's
// address math or registers (a run-time choice inside one loop leaves the general path's address
// math in the plain one).
extern "C" __global__ void __launch_bounds__(THREADS, LUT_MIN_BLOCKS) lut_mma_plain(const LutParams P) {
    allow_dependents();
    lut_mma_body<LUT_MT, LUT_NT, true>(P);
}
#endif

// The rotated-domain weights W_rot (rows x ld, activation dtype; columns [padded, ld) untouched)
// for large batches, where one dequantization feeds a library GEMM. Bandwidth-bound: a thread
// decodes 8 consecutive values of a row (BITS code bytes, 4 pair codes) into one 16-byte store,
// so a warp reads 32*BITS contiguous code bytes and writes 512 contiguous output bytes; each
// thread keeps DQ_UNROLL such units in flight. Rows whose padded width is not a multiple of 8
// end in 1-3 pairs written one pair (4 bytes) at a time; an output that is not 16-byte aligned
// row by row (vector_out = 0) takes the pair path for everything.
#ifdef LUT_DEQUANT
#ifndef DQ_UNROLL
#define DQ_UNROLL 4
#endif
struct DequantParams {
    const unsigned char* codes;
    const u16* scales;
    const float* grid;
    u16* out;
    int rows;
    int padded;
    int row_bytes;
    int groups;
    int group_size;
    int p;
    int ld;
    int row_pitch;   // as LutParams (canonical or tiled codes)
    int step_pitch;
    int vector_out;  // out 16-byte aligned, ld a multiple of 8, rows * padded / 8 < 2^31
    int vector_codes;  // every unit's BITS code bytes aligned for one 4-byte (BITS 4) / 2-byte (BITS 2) load
    int group_shift;   // log2(group_size) when a power of two, else -1
};

// Offset of byte `byte` of row r's codes in either layout (see code_row).
__device__ __forceinline__ u64 dequant_code_offset(const DequantParams& P, int r, int byte) {
    constexpr int CB = 4 * BITS;
    const int c = byte / CB;
    return (u64)(r >> 4) * (16 * (u64)P.row_bytes) + (u64)((r & 15) * P.row_pitch) +
           (u64)((c >> 2) * P.step_pitch + (c & 3) * CB + byte % CB);
}

__device__ __forceinline__ u32 dequant_code_byte(const DequantParams& P, int r, int byte) {
    return P.codes[dequant_code_offset(P, r, byte)];
}

// One pair (k, k+1) of row r: a 4-byte store.
__device__ __forceinline__ void dequant_pair(const DequantParams& P, const u32* lut, int r, int pair) {
    const int bit = pair * PAIR_BITS;
    const int byte = bit >> 3;
    u32 v = dequant_code_byte(P, r, byte);
    if (byte + 1 < P.row_bytes) v |= dequant_code_byte(P, r, byte + 1) << 8;
    const u32 code = (v >> (bit & 7)) & (LUT_N - 1);
    const int k = 2 * pair;
    const u32 s2 = scale_pair(P.scales[(u64)r * P.groups + k / P.group_size]);
    *(u32*)(P.out + (u64)r * P.ld + k) = mul_act2(lut[code], s2);
}

extern "C" __global__ void __launch_bounds__(256) dequantize_rotated(const DequantParams P) {
    __shared__ u32 lut[LUT_N];
    for (int e = threadIdx.x; e < LUT_N; e += blockDim.x) lut[e] = lut_entry(P, e);
    __syncthreads();
    const int pairs = P.padded >> 1;
    const long long threads = (long long)gridDim.x * blockDim.x;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (!P.vector_out) {
        const long long total = (long long)P.rows * pairs;
        for (long long q = tid; q < total; q += threads) dequant_pair(P, lut, (int)(q / pairs), (int)(q % pairs));
        return;
    }
    // Whole 8-value units: unit u of row r covers k = 8u .. 8u + 7 (code bytes BITS*u ..).
    const unsigned units = (unsigned)(P.padded >> 3);
    const unsigned total = (unsigned)P.rows * units;
    const unsigned stride = (unsigned)threads;
    for (unsigned q0 = (unsigned)tid; q0 < total; q0 += DQ_UNROLL * stride) {
        u32 w[DQ_UNROLL], s[DQ_UNROLL];
        int row[DQ_UNROLL], k[DQ_UNROLL];
#pragma unroll
        for (int j = 0; j < DQ_UNROLL; ++j) {
            const unsigned q = q0 + j * stride;
            w[j] = 0;
            s[j] = 0;
            row[j] = -1;
            k[j] = 0;
            if (q < total) {
                const int r = (int)(q / units);
                const int u = (int)(q - (unsigned)r * units);
                row[j] = r;
                k[j] = 8 * u;
                const unsigned char* src = P.codes + dequant_code_offset(P, r, BITS * u);
#if BITS == 4
                if (P.vector_codes) {
                    w[j] = __ldg((const u32*)src);
                } else {
                    w[j] = (u32)src[0] | ((u32)src[1] << 8) | ((u32)src[2] << 16) | ((u32)src[3] << 24);
                }
#elif BITS == 2
                if (P.vector_codes) {
                    w[j] = __ldg((const unsigned short*)src);
                } else {
                    w[j] = (u32)src[0] | ((u32)src[1] << 8);
                }
#else
                // A unit's 3 bytes stay inside one chunk (12 bytes, 4 units) in both layouts.
                w[j] = (u32)src[0] | ((u32)src[1] << 8) | ((u32)src[2] << 16);
#endif
                const int g = P.group_shift >= 0 ? (k[j] >> P.group_shift) : k[j] / P.group_size;
                s[j] = __ldg(P.scales + (u64)r * P.groups + g);
            }
        }
#pragma unroll
        for (int j = 0; j < DQ_UNROLL; ++j) {
            if (row[j] < 0) continue;
            const u32 s2 = scale_pair((u16)s[j]);
            const u32 v0 = mul_act2(lut[w[j] & (LUT_N - 1)], s2);
            const u32 v1 = mul_act2(lut[(w[j] >> PAIR_BITS) & (LUT_N - 1)], s2);
            const u32 v2 = mul_act2(lut[(w[j] >> (2 * PAIR_BITS)) & (LUT_N - 1)], s2);
            const u32 v3 = mul_act2(lut[(w[j] >> (3 * PAIR_BITS)) & (LUT_N - 1)], s2);
            // U4 is only 4-byte aligned to the compiler: the 16-byte store is spelled out.
            asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(P.out + (u64)row[j] * P.ld + k[j]),
                         "r"(v0), "r"(v1), "r"(v2), "r"(v3)
                         : "memory");
        }
    }
    // The last 1-3 pairs of each row when the padded width is not a multiple of 8.
    const int tail = (P.padded & 7) >> 1;
    if (tail) {
        const long long total_tail = (long long)P.rows * tail;
        for (long long q = tid; q < total_tail; q += threads)
            dequant_pair(P, lut, (int)(q / tail), (int)(4 * units + q % tail));
    }
}
#endif
