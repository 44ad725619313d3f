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
// Work split: a block (8 warps) owns 16*MT rows and a range of super-steps (split-K over
// gridDim.y); warps take super-steps round-robin and are reduced in shared memory in a fixed
// order. With gridDim.y > 1, blocks write f32 partials and the last block of a row tile (a
// counter per tile, reset by that block) sums them in split order: deterministic, no atomics on
// data, no memset between calls.

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
    float* partials;             // splits x MAX_COLS x rows (split mode only)
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
};

__device__ __forceinline__ void build_lut(const LutParams& P, u32* lut) {
    for (int i = threadIdx.x; i < LUT_N * 32; i += THREADS) {
        const int e = i >> 5;
        float lo, hi;
        if (P.p == 2) {
            lo = P.grid[2 * e];
            hi = P.grid[2 * e + 1];
        } else {
            lo = P.grid[e & ((1 << BITS) - 1)];
            hi = P.grid[e >> BITS];
        }
        lut[i] = pack_act2(lo, hi);
    }
}

__device__ __forceinline__ u32 scale_pair(u16 s) {
#ifdef ACT_BF16
    const u32 b = f32_to_bf16(f16_to_f32(s));
    return b | (b << 16);
#else
    return (u32)s | ((u32)s << 16);
#endif
}

// The 32 k-values [kl, kl + 32) of `row`: packed codes into w, scale pair into s2.
// Rows past the end get scale 0 (so their values are 0); k past `padded` reads no code bytes
// past the row (the activations there are 0, and the clamped scale keeps the values finite).
__device__ __forceinline__ void load_chunk(const LutParams& P, int row, int kl, u32 (&w)[BITS], u32& s2) {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = 0;
    s2 = 0;
    if (row >= P.rows || kl >= P.padded) return;
    const unsigned char* base = P.codes + (u64)row * P.row_bytes;
    const int byte0 = (kl >> 5) * (4 * BITS);
    if (P.vector_codes && byte0 + 4 * BITS <= P.row_bytes) {
#if BITS == 4
        const U4 v = load_stream_v4(base + byte0);
        w[0] = v.x;
        w[1] = v.y;
        w[2] = v.z;
        w[3] = v.w;
#elif BITS == 2
        load_stream_v2(base + byte0, w[0], w[1]);
#else
#pragma unroll
        for (int i = 0; i < BITS; ++i) w[i] = load_stream_u32(base + byte0 + 4 * i);
#endif
    } else {
#pragma unroll
        for (int i = 0; i < 4 * BITS; ++i) {
            const int b = byte0 + i;
            const u32 v = b < P.row_bytes ? (u32)base[b] : 0u;
            w[i / 4] |= v << (8 * (i % 4));
        }
    }
    int group = kl / P.group_size;
    if (group >= P.groups) group = P.groups - 1;
    s2 = scale_pair(load_cached_u16(P.scales + (u64)row * P.groups + group));
}

// Pair code number i (0..15) of a chunk; i is a compile-time constant after unrolling.
__device__ __forceinline__ u32 pair_code(const u32 (&w)[BITS], int i) {
    const int offset = i * PAIR_BITS;
    const int word = offset >> 5;
    const int shift = offset & 31;
    u32 v = w[word] >> shift;
    if (shift + PAIR_BITS > 32 && word + 1 < BITS) v |= w[word + 1] << (32 - shift);
    return v & (LUT_N - 1);
}

__device__ __forceinline__ u32 dequant_pair(const u32* lut, int lane, const u32 (&w)[BITS], int i, u32 s2) {
    return mul_act2(lut[(pair_code(w, i) << 5) | lane], s2);
}

template <int MT, int NT>
__device__ __forceinline__ void lut_mma_body(const LutParams& P) {
    extern __shared__ u32 smem[];
    __shared__ int is_last_block;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const u32* lut = smem;
    build_lut(P, smem);
    __syncthreads();

    const int row0 = blockIdx.x * (16 * MT);
    const int split = blockIdx.y;
    const int col0 = blockIdx.z * MAX_COLS;
    const int step_begin = split * P.steps_per_split;
    const int step_end = step_begin + P.steps_per_split < P.total_steps ? step_begin + P.steps_per_split : P.total_steps;

    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

    // Activation rows of this lane's batch columns (null past the batch: B stays zero).
    const u16* xcol[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int col = col0 + nt * 8 + g;
        xcol[nt] = col < P.batch ? P.x_rot + (u64)col * P.kp + 32 * t : (const u16*)0;
    }

    u32 cw[MT][2][BITS];
    u32 cs[MT][2];
    int step = step_begin + warp;
    if (step < step_end) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                load_chunk(P, row0 + mt * 16 + g + 8 * h, step * KSTEP + 32 * t, cw[mt][h], cs[mt][h]);
    }
    for (; step < step_end; step += WARPS) {
        // Prefetch the next super-step's codes while this one computes.
        u32 nw[MT][2][BITS];
        u32 ns[MT][2];
        const int next = step + WARPS;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (next < step_end) {
                    load_chunk(P, row0 + mt * 16 + g + 8 * h, next * KSTEP + 32 * t, nw[mt][h], ns[mt][h]);
                } else {
#pragma unroll
                    for (int i = 0; i < BITS; ++i) nw[mt][h][i] = 0;
                    ns[mt][h] = 0;
                }
            }
        const int k0 = step * KSTEP;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            U4 bq[NT];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                if (xcol[nt]) {
                    bq[nt] = load_cached_v4(xcol[nt] + k0 + 8 * u);
                } else {
                    bq[nt].x = bq[nt].y = bq[nt].z = bq[nt].w = 0;
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int s = 2 * u + h;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const u32 a0 = dequant_pair(lut, lane, cw[mt][0], 2 * s, cs[mt][0]);
                    const u32 a1 = dequant_pair(lut, lane, cw[mt][1], 2 * s, cs[mt][1]);
                    const u32 a2 = dequant_pair(lut, lane, cw[mt][0], 2 * s + 1, cs[mt][0]);
                    const u32 a3 = dequant_pair(lut, lane, cw[mt][1], 2 * s + 1, cs[mt][1]);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const u32 b0 = h ? bq[nt].z : bq[nt].x;
                        const u32 b1 = h ? bq[nt].w : bq[nt].y;
                        mma_16816(acc[mt][nt], a0, a1, a2, a3, b0, b1);
                    }
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
                for (int i = 0; i < BITS; ++i) cw[mt][h][i] = nw[mt][h][i];
                cs[mt][h] = ns[mt][h];
            }
    }

    // Reduce the warps' accumulators in shared memory (the table is no longer needed).
    constexpr int RT = 16 * MT;
    constexpr int CT = 8 * NT;
    constexpr int RS = RT + 4;  // padded stride: the fragment stores hit distinct banks
    __syncthreads();
    float* red = (float*)smem;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = mt * 16 + g + 8 * (i >> 1);
                const int col = nt * 8 + 2 * t + (i & 1);
                red[(warp * CT + col) * RS + row] = acc[mt][nt][i];
            }
    __syncthreads();
    const bool split_mode = P.splits > 1;
    for (int e = tid; e < RT * CT; e += THREADS) {
        const int row = e % RT;
        const int col = e / RT;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += red[(w * CT + col) * RS + row];
        const int r = row0 + row;
        const int b = col0 + col;
        if (r < P.rows && b < P.batch) {
            if (split_mode) {
                P.partials[((u64)split * MAX_COLS + b) * P.rows + r] = sum;
            } else {
                P.out[(u64)b * P.rows + r] = f32_to_act(sum);
            }
        }
    }
    if (!split_mode) return;

    // The last block of this row tile to finish adds the splits up, in split order.
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const u32 before = atomicAdd(&P.counters[blockIdx.x], 1u);
        is_last_block = before == (u32)(P.splits - 1);
    }
    __syncthreads();
    if (!is_last_block) return;
    __threadfence();
    for (int e = tid; e < RT * CT; e += THREADS) {
        const int row = e % RT;
        const int col = e / RT;
        const int r = row0 + row;
        const int b = col0 + col;
        if (r < P.rows && b < P.batch) {
            float sum = 0.f;
            for (int sp = 0; sp < P.splits; ++sp)
                sum += load_coherent_f32(P.partials + ((u64)sp * MAX_COLS + b) * P.rows + r);
            P.out[(u64)b * P.rows + r] = f32_to_act(sum);
        }
    }
    if (tid == 0) P.counters[blockIdx.x] = 0;
}

// One instantiation per module (compiled on first use): LUT_MT row tiles x LUT_NT batch tiles.
#ifdef LUT_MT
extern "C" __global__ void __launch_bounds__(THREADS) lut_mma(const LutParams P) {
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
};

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
        const unsigned char* row = P.codes + (u64)r * P.row_bytes;
        const int bit = pair * PAIR_BITS;
        const int byte = bit >> 3;
        u32 v = row[byte];
        if (byte + 1 < P.row_bytes) v |= (u32)row[byte + 1] << 8;
        const u32 code = (v >> (bit & 7)) & (LUT_N - 1);
        const int k = 2 * pair;
        const u32 s2 = scale_pair(P.scales[(u64)r * P.groups + k / P.group_size]);
        *(u32*)(P.out + (u64)r * P.ld + k) = mul_act2(lut[code], s2);
    }
}
#endif
