// LUT-GEMM on HIGGS codes: y[b, r] = sum_k W_rot[r, k] * x_rot[b, k], where W_rot[r, k] is a grid
// point times the row's group scale, looked up from packed codes, and x_rot is the activation
// rotated like the weights were (hadamard.cu). Needs common.cuh first.
//
// Defines: BITS (2, 3, 4: bits per weight), ACT_BF16 (bfloat16 instead of float16).
//
// Every pair of consecutive weights (k, k+1) of a row is one "pair code" of 2*BITS bits: a p = 2
// code, or two p = 1 codes (LSB-first, so the lower code is the lower k). A shared table maps a
// pair code to the two values as one packed half2/bfloat162: for p = 2 the grid point, for p = 1
// (grid[c0], grid[c1]). The table is replicated 32 times (entry e of copy c at word 32e + c, lane
// c reads copy c) so lookups never conflict on shared-memory banks.
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
// items. Each warp keeps the codes of the next D super-steps in flight in a ring of registers;
// the activations are read through L1 (the block's warps walk the same super-steps). With
// several splits, blocks write f32 partials and the last block of a row block (a counter per row
// block, reset by that block) sums them in split order: deterministic, no atomics on data, no
// memset between calls. Launched as a programmatic dependent of the Hadamard kernel (sm_90): the
// table and the first codes load while that kernel runs.

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
    u32* counters;               // one per row tile, zero between launches (split mode only)
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
};

// Lane l of a warp computes entry base + l once (one load of the grid), then the warp writes the
// 32 copies of each of its 32 entries: 32 consecutive words per store, no bank conflicts.
// Entries are ENTRY_WORDS apart (32 for lut_mma; lut_gemv pads them to GEMV_ENTRY_BYTES).
template <int ENTRY_WORDS = 32>
__device__ __forceinline__ void build_lut(const LutParams& P, u32* lut) {
    const int lane = threadIdx.x & 31;
    for (int base = (threadIdx.x >> 5) * 32; base < LUT_N; base += THREADS) {
        const int e = base + lane;
        u32 v = 0;
        if (e < LUT_N) {
            float lo, hi;
            if (P.p == 2) {
                lo = P.grid[2 * e];
                hi = P.grid[2 * e + 1];
            } else {
                lo = P.grid[e & ((1 << BITS) - 1)];
                hi = P.grid[e >> BITS];
            }
            v = pack_act2(lo, hi);
        }
#pragma unroll 8
        for (int j = 0; j < 32; ++j) {
            const u32 vj = __shfl_sync(0xffffffffu, v, j);
            if (base + j < LUT_N) lut[(base + j) * ENTRY_WORDS + lane] = vj;
        }
    }
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

// Codes of row r. Canonical layout (as stored on disk): rows of row_bytes, row_pitch = row_bytes,
// step_pitch = 16 * BITS. Tiled layout (repacked at load time by higgs_rs.cuda when rows % 16 == 0
// and the padded width is a multiple of 128): 16-row x 128-k tiles of 64 * BITS contiguous bytes,
// ordered (row tile, super-step); inside a tile row r & 15, chunk c & 3 at (4 (r & 15) + (c & 3))
// * 4 * BITS, so a warp's 32 chunk loads of one row half are 512 contiguous bytes (4 bits):
// row_pitch = 16 * BITS, step_pitch = 256 * BITS. Both: chunk c of row r lies at
// 16 row_bytes (r >> 4) + row_pitch (r & 15) + step_pitch (c >> 2) + 4 BITS (c & 3); only the
// canonical layout has partial or unaligned chunks (read byte by byte from the row start).
__device__ __forceinline__ const unsigned char* code_row(const LutParams& P, int r) {
    return P.codes + (u64)(r >> 4) * (16 * (u64)P.row_bytes) + (u64)((r & 15) * P.row_pitch);
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
    } else {
        const U4 v = load_chunk_bytes(codes, c, P.row_bytes);
        w[0] = v.x;
        if (BITS > 1) w[1] = v.y;
        if (BITS > 2) w[2] = v.z;
        if (BITS > 3) w[3] = v.w;
    }
    s = load_cached_u16(scales + group_of(P, kl));
}

// Byte offset in the table of this lane's copy of the entry for pair code number i (0..15) of a
// chunk: code * 128 + lane * 4. `i` is a compile-time constant after unrolling, so this is a
// shift and a mask-or.
__device__ __forceinline__ u32 lut_offset(const u32 (&w)[BITS], int i, u32 lane4) {
    const int offset = i * PAIR_BITS;
    const int word = offset >> 5;
    const int shift = offset & 31;
    u32 v;
    if (shift + PAIR_BITS <= 32 || word + 1 >= BITS) {
        v = shift >= 7 ? w[word] >> (shift - 7) : w[word] << (7 - shift);
    } else {
        v = ((w[word] >> shift) | (w[word + 1] << (32 - shift))) << 7;
    }
    return (v & ((u32)(LUT_N - 1) << 7)) | lane4;
}

__device__ __forceinline__ u32 dequant_pair(const u32* lut, u32 lane4, const u32 (&w)[BITS], int i, u32 s2) {
    return mul_act2(*(const u32*)((const char*)lut + lut_offset(w, i, lane4)), s2);
}

template <int MT, int NT>
__device__ __forceinline__ void lut_mma_body(const LutParams& P) {
    constexpr int RT = 16 * MT;        // rows per warp
    constexpr int RB = WARPS * RT;     // rows per block
    constexpr int CT = 8 * NT;         // batch columns per item
    // Super-steps whose codes are in flight per warp (a ring of registers, indexed at compile
    // time): enough bytes in flight to cover DRAM latency.
    constexpr int D = NT <= 2 ? 3 : 2;
    // Activation slices loaded at once: all four of a super-step when few batch tiles.
    constexpr int BU = NT <= 2 ? 4 : 1;
    // The table in static shared memory: its address is a constant, so a lookup is one LDS with an
    // immediate offset.
    __shared__ u32 lut[LUT_N * 32];
    __shared__ int is_last_block;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const u32 lane4 = (u32)lane * 4;
    build_lut(P, lut);
    __syncthreads();
    bool waited = false;

    // Persistent blocks over work items (row block, split, batch chunk), row block fastest. Each
    // warp owns RT rows and walks the item's super-steps in the same order as its neighbours, so
    // the activation slices it reads are mostly L1 hits after the first warp's.
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

        // Activation row of this lane's first batch column; tile nt is 8 rows further (columns
        // past the batch are not read: B stays zero there).
        const u16* xbase = P.x_rot + (u64)(col0 + g) * P.kp + 32 * t;
        const int xtile = 8 * P.kp;

        // This lane's rows: code and scale pointers (null past the last row), chunk t of a step.
        const unsigned char* crow[MT][2];
        const u16* srow[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row0 + mt * 16 + g + 8 * h;
                crow[mt][h] = r < P.rows ? code_row(P, r) : (const unsigned char*)0;
                srow[mt][h] = P.scales + (u64)(r < P.rows ? r : 0) * P.groups;
            }

        u32 ring[D][MT][2][BITS];
        u32 sring[D][MT][2];
#pragma unroll
        for (int d = 0; d < D; ++d) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    if (step_begin + d < step_end) {
                        load_chunk(P, crow[mt][h], srow[mt][h], (step_begin + d) * 4 + t, ring[d][mt][h],
                                   sring[d][mt][h]);
                    } else {
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
        for (int step0 = step_begin; step0 < step_end; step0 += D) {
#pragma unroll
            for (int d = 0; d < D; ++d) {
                const int step = step0 + d;
                if (step >= step_end) break;
                const int k0 = step * KSTEP;
                u32 s2[MT][2];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) s2[mt][h] = scale_pair((u16)sring[d][mt][h]);
#pragma unroll
                for (int u0 = 0; u0 < 4; u0 += BU) {
                    U4 bq[BU][NT];
#pragma unroll
                    for (int du = 0; du < BU; ++du)
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
                            if (col0 + nt * 8 + g < P.batch) {
                                bq[du][nt] = load_cached_v4(xbase + (u64)(nt * xtile + k0 + 8 * (u0 + du)));
                            } else {
                                bq[du][nt].x = bq[du][nt].y = bq[du][nt].z = bq[du][nt].w = 0;
                            }
                        }
#pragma unroll
                    for (int du = 0; du < BU; ++du)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const int s = 2 * (u0 + du) + h;
#pragma unroll
                            for (int mt = 0; mt < MT; ++mt) {
                                const u32 a0 = dequant_pair(lut, lane4, ring[d][mt][0], 2 * s, s2[mt][0]);
                                const u32 a1 = dequant_pair(lut, lane4, ring[d][mt][1], 2 * s, s2[mt][1]);
                                const u32 a2 = dequant_pair(lut, lane4, ring[d][mt][0], 2 * s + 1, s2[mt][0]);
                                const u32 a3 = dequant_pair(lut, lane4, ring[d][mt][1], 2 * s + 1, s2[mt][1]);
#pragma unroll
                                for (int nt = 0; nt < NT; ++nt) {
                                    const u32 b0 = h ? bq[du][nt].z : bq[du][nt].x;
                                    const u32 b1 = h ? bq[du][nt].w : bq[du][nt].y;
                                    mma_16816(acc[mt][nt], a0, a1, a2, a3, b0, b1);
                                }
                            }
                        }
                }
                // Refill this ring slot with the super-step D ahead.
                const int ahead = step + D;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        if (ahead < step_end)
                            load_chunk(P, crow[mt][h], srow[mt][h], ahead * 4 + t, ring[d][mt][h], sring[d][mt][h]);
            }
        }

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
                            P.out[(u64)b * P.rows + r] = f32_to_act(acc[mt][nt][i]);
                        }
                    }
                }
        if (split_mode) {
            // The last block to finish this row block adds the splits up, in split order.
            __threadfence();
            __syncthreads();
            if (tid == 0) {
                const u32 before = atomicAdd(&P.counters[tile], 1u);
                is_last_block = before == (u32)(P.splits - 1);
            }
            __syncthreads();
            if (is_last_block) {
                __threadfence();
                const int rb0 = tile * RB;
                for (int e = tid; e < RB * CT; e += THREADS) {
                    const int r = rb0 + e % RB;
                    const int b = col0 + e / RB;
                    if (r < P.rows && b < P.batch) {
                        float sum = 0.f;
                        for (int sp = 0; sp < P.splits; ++sp)
                            sum += load_coherent_f32(P.partials + ((u64)sp * P.partial_cols + b) * P.rows + r);
                        P.out[(u64)b * P.rows + r] = f32_to_act(sum);
                    }
                }
                if (tid == 0) P.counters[tile] = 0;
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
#define GEMV_ENTRY_BYTES 256
#ifndef GEMV_D
#define GEMV_D 4  // super-steps of codes in flight per warp
#endif
#ifndef GEMV_MIN_BLOCKS
#define GEMV_MIN_BLOCKS 2
#endif
#ifndef GEMV_G
#define GEMV_G 1  // ring slots refilled together (divides GEMV_D)
#endif

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

template <int MT>
__device__ __forceinline__ void lut_gemv_body(const LutParams& P) {
    constexpr int RT = 16 * MT;
    constexpr int RB = WARPS * RT;
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
    build_lut<GEMV_ENTRY_BYTES / 4>(P, lut);
    __syncthreads();
    bool waited = false;

    // B operand: this lane supplies column g (batch item g / CPB, group slot g % CPB) for its chunk
    // t, which lies in slot t * CPB / 4; zero where they differ or past the batch.
    const int xb = g / GEMV_CPB;
    const bool x_active = xb < P.batch && (t * GEMV_CPB) / 4 == g % GEMV_CPB;
    // Accumulator columns 2t, 2t + 1 of this lane: batch item (2t) / CPB for both when CPB >= 2.
    const bool has_output = (2 * t) / GEMV_CPB < P.batch;

    const int items = P.row_tiles * P.splits;
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
        const int tile = item % P.row_tiles;
        const int split = item / P.row_tiles;
        const int row0 = tile * RB + warp * RT;
        const int step_begin = split * P.steps_per_split;
        const int step_end = step_begin + P.steps_per_split < P.total_steps ? step_begin + P.steps_per_split
                                                                            : P.total_steps;
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
                crow[mt][h] = r < P.rows ? code_row(P, r) : (const unsigned char*)0;
                srow[mt][h] = P.scales + (u64)(r < P.rows ? r : 0) * P.groups;
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
                    if (step_begin + d < step_end) {
                        load_chunk(P, crow[mt][h], srow[mt][h], (step_begin + d) * 4 + t, ring[d][mt][h], unused);
                        if (has_output) sring[d][mt][h] = gemv_scales(P, srow[mt][h], step_begin + d, t);
                    } else {
#pragma unroll
                        for (int i = 0; i < BITS; ++i) ring[d][mt][h][i] = 0;
                    }
                }
        if (!waited) {
            wait_for_previous_grid();
            waited = true;
        }
        for (int step0 = step_begin; step0 < step_end; step0 += D) {
#pragma unroll
            for (int d = 0; d < D; ++d) {
                const int step = step0 + d;
                if (step >= step_end) break;
                const int k0 = step * KSTEP;
                U4 bq[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    if (x_active) {
                        bq[u] = load_cached_v4(xrow + k0 + 8 * u);
                    } else {
                        bq[u].x = bq[u].y = bq[u].z = bq[u].w = 0;
                    }
                }
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
                                    u32 unused;
                                    load_chunk(P, crow[mt][h], srow[mt][h], ahead * 4 + t, ring[dd][mt][h],
                                               unused);
                                    if (has_output) sring[dd][mt][h] = gemv_scales(P, srow[mt][h], ahead, t);
                                }
                    }
                }
            }
        }

        // Lane (g, t) holds rows g, g + 8 for columns 2t, 2t + 1: batch items 2t, 2t + 1 (CPB 1), or
        // both slots of item t (CPB 2), or two of the four slots of item t / 2 (CPB 4: the other two
        // are on lane t ^ 1).
        const bool split_mode = P.splits > 1;
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
                    if (j < nv && r < P.rows && b < P.batch) {
                        if (split_mode) {
                            P.partials[((u64)split * P.partial_cols + b) * P.rows + r] = v[j];
                        } else {
                            P.out[(u64)b * P.rows + r] = f32_to_act(v[j]);
                        }
                    }
                }
            }
        if (split_mode) {
            __threadfence();
            __syncthreads();
            if (tid == 0) {
                const u32 before = atomicAdd(&P.counters[tile], 1u);
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
                        P.out[(u64)b * P.rows + r] = f32_to_act(sum);
                    }
                }
                if (tid == 0) P.counters[tile] = 0;
            }
            __syncthreads();
        }
    }
    if (!waited) wait_for_previous_grid();
}

extern "C" __global__ void __launch_bounds__(THREADS, GEMV_MIN_BLOCKS) lut_gemv(const LutParams P) {
    lut_gemv_body<1>(P);
}

#endif

// One instantiation per module (compiled on first use): LUT_MT row tiles x LUT_NT batch tiles.
// Few batch tiles: cap registers so three (batch <= 8) or two blocks fit per multiprocessor.
#define LUT_MIN_BLOCKS (LUT_MT > 1 ? 1 : LUT_NT == 1 ? 3 : LUT_NT <= 4 ? 2 : 1)
#ifdef LUT_MT
extern "C" __global__ void __launch_bounds__(THREADS, LUT_MIN_BLOCKS) lut_mma(const LutParams P) {
    lut_mma_body<LUT_MT, LUT_NT>(P);
}
#endif

// The rotated-domain weights W_rot (rows x ld, activation dtype; columns [padded, ld) untouched)
// for large batches, where one dequantization feeds a library GEMM. One thread per pair code.
#ifdef LUT_DEQUANT
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
};

// Byte `byte` of row r's codes in either layout (see code_row).
__device__ __forceinline__ u32 dequant_code_byte(const DequantParams& P, int r, int byte) {
    constexpr int CB = 4 * BITS;
    const int c = byte / CB;
    const u64 at = (u64)(r >> 4) * (16 * (u64)P.row_bytes) + (u64)((r & 15) * P.row_pitch) +
                   (u64)((c >> 2) * P.step_pitch + (c & 3) * CB + byte % CB);
    return P.codes[at];
}

extern "C" __global__ void __launch_bounds__(256) dequantize_rotated(const DequantParams P) {
    __shared__ u32 lut[LUT_N];
    for (int e = threadIdx.x; e < LUT_N; e += blockDim.x) {
        float lo, hi;
        if (P.p == 2) {
            lo = P.grid[2 * e];
            hi = P.grid[2 * e + 1];
        } else {
            lo = P.grid[e & ((1 << BITS) - 1)];
            hi = P.grid[e >> BITS];
        }
        lut[e] = pack_act2(lo, hi);
    }
    __syncthreads();
    const int pairs = P.padded >> 1;
    const long long total = (long long)P.rows * pairs;
    for (long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x; q < total;
         q += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(q / pairs);
        const int pair = (int)(q % pairs);
        const int bit = pair * PAIR_BITS;
        const int byte = bit >> 3;
        u32 v = dequant_code_byte(P, r, byte);
        if (byte + 1 < P.row_bytes) v |= dequant_code_byte(P, r, byte + 1) << 8;
        const u32 code = (v >> (bit & 7)) & (LUT_N - 1);
        const int k = 2 * pair;
        const u32 s2 = scale_pair(P.scales[(u64)r * P.groups + k / P.group_size]);
        *(u32*)(P.out + (u64)r * P.ld + k) = mul_act2(lut[code], s2);
    }
}
#endif
