// Rotate activations like the weights: x_rot = (H_n / sqrt(n)) (signs * zero-padded x) per block of
// n = HAD_ORDER values, H_n = H_slow (x) H_fast (x) S_{2^k} (see src/hadamard/mod.rs): element
// i = (a_slow * F_FAST + a_fast) * 2^k + b of a block. Needs common.cuh first and these defines,
// generated per order by src/cuda/source.rs:
//   HAD_ORDER, HAD_LOG2 (k), HAD_POW2 (2^k), HAD_FAST / HAD_SLOW (Paley factor sizes, 1 if absent),
//   HAD_TILE (values per block: whole transform blocks), HAD_THREADS,
//   paley_fast(float (&v)[HAD_FAST]) / paley_slow(float (&v)[HAD_SLOW]) when present.
// One CUDA block transforms one tile of one batch row in shared memory (f32) and writes
// out[b, :kp] in the activation dtype; positions in [padded, kp) come out as zeros because
// their inputs are zeros.
//
// A prologue may compute the rows to rotate (written to `pre_out` as well): with `norm_weight`
// (hadamard_rotate only) an RMSNorm of each row of x (norm_value), with `up` the SiLU-gated product
// silu(x) * up (gated_value). So a decoder layer's norm, or its MLP's activation, and the
// rotation for the layers that read the result run in one launch.
//
// With HAD_CLUSTER defined (sm_90, orders m * 2^k with k >= 8 whose outer factor is a Paley
// matrix or a Sylvester one) the module holds `hadamard_cluster` instead: a thread-block cluster
// of HAD_CLUSTER blocks per transform block, see there.

struct HadamardParams {
    const u16* x;        // batch x in_features
    u16* out;            // batch x kp
    const float* signs;  // padded, or null
    int in_features;
    int kp;
    float scale;         // 1 / sqrt(HAD_ORDER)
    const u16* norm_weight;  // in_features RMSNorm weights, or null
    const u16* up;           // batch x in_features: rotate silu(x) * up instead of x, or null
    u16* pre_out;            // batch x in_features: the prologue's rows (the normalized x, the product)
    float eps;               // the RMSNorm's epsilon
};

// The sum of every thread's `v` over the block, in a fixed order (warps by shuffles, then the warp
// sums in order), returned to all threads. Once per kernel (one shared array).
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[HAD_THREADS / 32];
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < HAD_THREADS / 32; ++w) total += warp_sums[w];
    return total;
}

// 1 / sqrt(ss / in_features + eps) for the row's sum of squares `ss`.
__device__ __forceinline__ float inv_rms(const HadamardParams& P, float ss) {
    return 1.f / sqrtf(ss / (float)P.in_features + P.eps);
}

// The row's sum of squares read from memory: for blocks whose tile is not the whole row (every
// block of the row computes the same value); a whole-row tile sums the values it loaded instead.
__device__ __forceinline__ float row_sum_of_squares(const HadamardParams& P, const u16* xrow) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < P.in_features; i += HAD_THREADS) {
        const float v = act_to_f32(xrow[i]);
        ss = fmaf(v, v, ss);
    }
    return block_sum(ss);
}

// An element of the normalized row, in transformers' Llama order: x * inv rounded to the
// activation type, then times the weight `w`, rounded again.
__device__ __forceinline__ u16 norm_value(float v, u16 w, float inv) {
    const float n = act_to_f32(f32_to_act(v * inv));
    return f32_to_act(n * act_to_f32(w));
}

// An element of silu(x) * up, rounded as PyTorch's two kernels do (silu(x) to the activation type,
// then the product).
__device__ __forceinline__ u16 gated_value(float g, u16 u) {
    const float s = act_to_f32(f32_to_act(g / (1.f + expf(-g))));
    return f32_to_act(s * act_to_f32(u));
}

// The 8 values of a row from gi0 (a multiple of 8): one 16-byte access where they all lie before
// `last` and the address is aligned, else one by one (loads clamped to `last`, stores up to it).
// A lane's 8 consecutive values one by one would make 8 accesses 16 bytes apart per warp each.
__device__ __forceinline__ bool whole_piece(const void* p, int gi0, int last) {
    return gi0 + 7 <= last && (reinterpret_cast<u64>(p) & 15) == 0;
}

__device__ __forceinline__ void load8(const u16* row, int gi0, int last, u16 (&out)[8]) {
    if (whole_piece(row + gi0, gi0, last)) {
        const U4 u = *(const U4*)(row + gi0);
        const u32 words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = (u16)(words[e >> 1] >> (16 * (e & 1)));
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = row[gi0 + e < last ? gi0 + e : last];
    }
}

__device__ __forceinline__ void load8(const float* row, int gi0, int last, float (&out)[8]) {
    if (whole_piece(row + gi0, gi0, last)) {
        const U4 a = *(const U4*)(row + gi0);
        const U4 b = *(const U4*)(row + gi0 + 4);
        out[0] = bits_float(a.x), out[1] = bits_float(a.y), out[2] = bits_float(a.z), out[3] = bits_float(a.w);
        out[4] = bits_float(b.x), out[5] = bits_float(b.y), out[6] = bits_float(b.z), out[7] = bits_float(b.w);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = row[gi0 + e < last ? gi0 + e : last];
    }
}

__device__ __forceinline__ void store8(u16* row, int gi0, int last, const u16 (&y)[8]) {
    if (whole_piece(row + gi0, gi0, last)) {
        U4 u;
        u.x = (u32)y[0] | ((u32)y[1] << 16);
        u.y = (u32)y[2] | ((u32)y[3] << 16);
        u.z = (u32)y[4] | ((u32)y[5] << 16);
        u.w = (u32)y[6] | ((u32)y[7] << 16);
        *(U4*)(row + gi0) = u;
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (gi0 + e <= last) row[gi0 + e] = y[e];
    }
}

#define PRE_NONE 0
#define PRE_NORM 1
#define PRE_GATE 2

// Stages [S, S + R_LOG) of the Sylvester transform over the whole tile, in registers: each
// thread takes groups of 2^R_LOG values that differ only in those index bits.
template <int R_LOG, int S>
__device__ __forceinline__ void sylvester_pass(float* buf) {
    constexpr int R = 1 << R_LOG;
    constexpr int GROUPS = HAD_TILE / R;
#pragma unroll
    for (int j = 0; j < (GROUPS + HAD_THREADS - 1) / HAD_THREADS; ++j) {
        const int q = threadIdx.x + j * HAD_THREADS;
        if (GROUPS % HAD_THREADS == 0 || q < GROUPS) {
            const int base = ((q >> S) << (S + R_LOG)) | (q & ((1 << S) - 1));
            float v[R];
            if (S == 0 && R >= 4) {
                // Contiguous: vector loads and stores (no bank conflicts between neighbours).
#pragma unroll
                for (int e = 0; e < R; e += 4) {
                    const U4 w = *(const U4*)(buf + base + e);
                    v[e] = bits_float(w.x);
                    v[e + 1] = bits_float(w.y);
                    v[e + 2] = bits_float(w.z);
                    v[e + 3] = bits_float(w.w);
                }
            } else {
#pragma unroll
                for (int e = 0; e < R; ++e) v[e] = buf[base + (e << S)];
            }
#pragma unroll
            for (int h = 1; h < R; h <<= 1)
#pragma unroll
                for (int e = 0; e < R; ++e)
                    if ((e & h) == 0) {
                        const float a = v[e], c = v[e + h];
                        v[e] = a + c;
                        v[e + h] = a - c;
                    }
            if (S == 0 && R >= 4) {
#pragma unroll
                for (int e = 0; e < R; e += 4) {
                    U4 w;
                    w.x = float_bits(v[e]);
                    w.y = float_bits(v[e + 1]);
                    w.z = float_bits(v[e + 2]);
                    w.w = float_bits(v[e + 3]);
                    *(U4*)(buf + base + e) = w;
                }
            } else {
#pragma unroll
                for (int e = 0; e < R; ++e) buf[base + (e << S)] = v[e];
            }
        }
    }
    __syncthreads();
}

template <int S>
__device__ __forceinline__ void sylvester_passes(float* buf) {
    if constexpr (S + 4 == HAD_LOG2) {
        sylvester_pass<4, S>(buf);
    } else if constexpr (S + 3 <= HAD_LOG2) {
        sylvester_pass<3, S>(buf);
        sylvester_passes<S + 3>(buf);
    } else if constexpr (S + 2 == HAD_LOG2) {
        sylvester_pass<2, S>(buf);
    } else if constexpr (S + 1 == HAD_LOG2) {
        sylvester_pass<1, S>(buf);
    }
}

#if HAD_LOG2 >= 8
// The HAD_TILE values of a row from `start` (signs applied, zero past in_features), stages 0-7
// of the Sylvester transform without shared memory or barriers: a thread loads 8 consecutive
// values (stages 0-2 in registers) and the lanes of a warp hold 256 consecutive values (stages
// 3-7 by shuffles); one store to shared memory. The caller syncs, then runs the other stages.
// PRE: the prologue (PRE_NORM: norm_value with the weights at `aux`; PRE_GATE: gated_value with
// the row of up at `aux`), whose rows go to `prow`. Every load of the block is issued before the
// first use.
template <int PRE>
__device__ __forceinline__ void front_stages(const HadamardParams& P, float* buf, const u16* xrow, int start,
                                             const u16* aux = nullptr, u16* prow = nullptr) {
    const int last = P.in_features - 1;
    const int lane = threadIdx.x & 31;
    constexpr int GROUPS = HAD_TILE / 8;  // a multiple of 32: the tests below are warp-uniform
    constexpr int J = (GROUPS + HAD_THREADS - 1) / HAD_THREADS;
    float v[J][8];
    float sg[J][8];
    u16 w[J][8];
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int gi0 = start + 8 * (threadIdx.x + j * HAD_THREADS);
        u16 x8[8];
        load8(xrow, gi0, last, x8);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[j][e] = act_to_f32(x8[e]);
        if constexpr (PRE != PRE_NONE) load8(aux, gi0, last, w[j]);
        // The signs with the values (a prologue would otherwise wait for them afterwards).
        if (P.signs) {
            load8(P.signs, gi0, last, sg[j]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) sg[j][e] = 1.f;
        }
    }
    if constexpr (PRE == PRE_GATE) {
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int q = threadIdx.x + j * HAD_THREADS;
            if (GROUPS % HAD_THREADS == 0 || q < GROUPS) {
                u16 y[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    y[e] = gated_value(v[j][e], w[j][e]);
                    v[j][e] = act_to_f32(y[e]);
                }
                store8(prow, start + 8 * q, last, y);
            }
        }
    }
    if constexpr (PRE == PRE_NORM) {
        float ss = 0.f;
        if (start == 0 && HAD_TILE >= P.in_features) {
            // The tile is the whole row: sum what was loaded.
#pragma unroll
            for (int j = 0; j < J; ++j) {
                const int q = threadIdx.x + j * HAD_THREADS;
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    if ((GROUPS % HAD_THREADS == 0 || q < GROUPS) && 8 * q + e <= last) ss = fmaf(v[j][e], v[j][e], ss);
            }
            ss = block_sum(ss);
        } else {
            ss = row_sum_of_squares(P, xrow);
        }
        const float inv = inv_rms(P, ss);
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int q = threadIdx.x + j * HAD_THREADS;
            if (GROUPS % HAD_THREADS == 0 || q < GROUPS) {
                u16 y[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    y[e] = norm_value(v[j][e], w[j][e], inv);
                    v[j][e] = act_to_f32(y[e]);
                }
                store8(prow, start + 8 * q, last, y);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int q = threadIdx.x + j * HAD_THREADS;
        if (GROUPS % HAD_THREADS == 0 || q < GROUPS) {
#pragma unroll
            for (int e = 0; e < 8; ++e) v[j][e] = start + 8 * q + e <= last ? v[j][e] * sg[j][e] : 0.f;
#pragma unroll
            for (int h = 1; h < 8; h <<= 1)
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    if ((e & h) == 0) {
                        const float a = v[j][e], c = v[j][e + h];
                        v[j][e] = a + c;
                        v[j][e + h] = a - c;
                    }
#pragma unroll
            for (int m = 1; m < 32; m <<= 1) {
                const bool upper = (lane & m) != 0;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float o = __shfl_xor_sync(0xffffffffu, v[j][e], m);
                    v[j][e] = upper ? o - v[j][e] : v[j][e] + o;
                }
            }
#pragma unroll
            for (int e = 0; e < 8; e += 4) {
                U4 u;
                u.x = float_bits(v[j][e]);
                u.y = float_bits(v[j][e + 1]);
                u.z = float_bits(v[j][e + 2]);
                u.w = float_bits(v[j][e + 3]);
                *(U4*)(buf + 8 * q + e) = u;
            }
        }
    }
}
#endif

#ifndef HAD_CLUSTER
extern "C" __global__ void __launch_bounds__(HAD_THREADS) hadamard_rotate(const HadamardParams P) {
    extern __shared__ float buf[];
#if __CUDA_ARCH__ >= 900
    // Let the LUT-GEMM launch now: it builds its table and fetches codes, then waits for this grid.
    asm volatile("griddepcontrol.launch_dependents;");
    // Launched as a programmatic dependent of the kernel before (which wrote x): wait for it
    // before reading anything. The launch itself and the block setup overlapped its tail.
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    const int b = blockIdx.y;
    const int start = blockIdx.x * HAD_TILE;
    const u16* xrow = P.x + (u64)b * P.in_features;
    const bool norm = P.norm_weight != nullptr;
    const bool gate = P.up != nullptr;
    u16* prow = P.pre_out + (u64)b * P.in_features;
    const u16* aux = gate ? P.up + (u64)b * P.in_features : P.norm_weight;
#if HAD_LOG2 >= 8
    if (norm) {
        front_stages<PRE_NORM>(P, buf, xrow, start, aux, prow);
    } else if (gate) {
        front_stages<PRE_GATE>(P, buf, xrow, start, aux, prow);
    } else {
        front_stages<PRE_NONE>(P, buf, xrow, start);
    }
    __syncthreads();
    sylvester_passes<8>(buf);
#else
    const int last = P.in_features - 1;
    // All loads first (clamped addresses, no branches around them: every thread's loads are in
    // flight together), then the stores to shared memory.
    constexpr int PER_THREAD = (HAD_TILE + HAD_THREADS - 1) / HAD_THREADS;
    float xv[PER_THREAD];
    float sv[PER_THREAD];
    u16 wv[PER_THREAD];
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
        const int gi = start + threadIdx.x + j * HAD_THREADS;
        xv[j] = act_to_f32(xrow[gi < last ? gi : last]);
        if (norm || gate) wv[j] = aux[gi < last ? gi : last];
        sv[j] = P.signs ? P.signs[gi < last ? gi : last] : 1.f;
    }
    if (gate) {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int i = threadIdx.x + j * HAD_THREADS;
            const int gi = start + i;
            if ((HAD_TILE % HAD_THREADS == 0 || i < HAD_TILE) && gi <= last) {
                const u16 y = gated_value(xv[j], wv[j]);
                prow[gi] = y;
                xv[j] = act_to_f32(y);
            }
        }
    }
    if (norm) {
        float ss = 0.f;
        if (start == 0 && HAD_TILE >= P.in_features) {
            // The tile is the whole row: sum what was loaded.
#pragma unroll
            for (int j = 0; j < PER_THREAD; ++j) {
                const int i = threadIdx.x + j * HAD_THREADS;
                if ((HAD_TILE % HAD_THREADS == 0 || i < HAD_TILE) && i <= last) ss = fmaf(xv[j], xv[j], ss);
            }
            ss = block_sum(ss);
        } else {
            ss = row_sum_of_squares(P, xrow);
        }
        const float inv = inv_rms(P, ss);
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int i = threadIdx.x + j * HAD_THREADS;
            const int gi = start + i;
            if ((HAD_TILE % HAD_THREADS == 0 || i < HAD_TILE) && gi <= last) {
                const u16 y = norm_value(xv[j], wv[j], inv);
                prow[gi] = y;
                xv[j] = act_to_f32(y);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
        const int i = threadIdx.x + j * HAD_THREADS;
        const int gi = start + i;
        if (HAD_TILE % HAD_THREADS == 0 || i < HAD_TILE) buf[i] = gi < P.in_features ? xv[j] * sv[j] : 0.f;
    }
    __syncthreads();

    // Sylvester part on the fastest index: radix-8 passes (three stages in registers each).
    sylvester_passes<0>(buf);
#endif

#if HAD_FAST > 1
#if 2 * (HAD_TILE / HAD_FAST) <= HAD_THREADS
    // Fast Paley factor: mixes the HAD_FAST sub-vectors of length 2^k inside each block of
    // HAD_FAST * 2^k values. Two threads per fiber, each writing half of the outputs after both
    // have read the inputs.
    {
        const int q = threadIdx.x >> 1;
        const bool active = q < HAD_TILE / HAD_FAST;
        float* base = buf + (q / HAD_POW2) * (HAD_FAST * HAD_POW2) + (q % HAD_POW2);
        float v[HAD_FAST];
        float o[HAD_FAST / 2];
        if (active) {
#pragma unroll
            for (int j = 0; j < HAD_FAST; ++j) v[j] = base[j * HAD_POW2];
        }
        __syncthreads();
        if (active) {
            const int half = threadIdx.x & 1;
            if (half) {
                paley_fast_hi(v, o);
            } else {
                paley_fast_lo(v, o);
            }
#pragma unroll
            for (int j = 0; j < HAD_FAST / 2; ++j) base[(half * (HAD_FAST / 2) + j) * HAD_POW2] = o[j];
        }
    }
    __syncthreads();
#else
    // Fast Paley factor, one thread per fiber (in place).
    for (int q = threadIdx.x; q < HAD_TILE / HAD_FAST; q += HAD_THREADS) {
        float* base = buf + (q / HAD_POW2) * (HAD_FAST * HAD_POW2) + (q % HAD_POW2);
        float v[HAD_FAST];
#pragma unroll
        for (int j = 0; j < HAD_FAST; ++j) v[j] = base[j * HAD_POW2];
        paley_fast(v);
#pragma unroll
        for (int j = 0; j < HAD_FAST; ++j) base[j * HAD_POW2] = v[j];
    }
    __syncthreads();
#endif
#endif
#if HAD_SLOW > 1
    for (int q = threadIdx.x; q < HAD_TILE / HAD_SLOW; q += HAD_THREADS) {
        const int stride = HAD_FAST * HAD_POW2;
        float* base = buf + (q / stride) * (HAD_SLOW * stride) + (q % stride);
        float v[HAD_SLOW];
#pragma unroll
        for (int j = 0; j < HAD_SLOW; ++j) v[j] = base[j * stride];
        paley_slow(v);
#pragma unroll
        for (int j = 0; j < HAD_SLOW; ++j) base[j * stride] = v[j];
    }
    __syncthreads();
#endif

    u16* orow = P.out + (u64)b * P.kp;
#pragma unroll
    for (int j = 0; j < (HAD_TILE + HAD_THREADS - 1) / HAD_THREADS; ++j) {
        const int i = threadIdx.x + j * HAD_THREADS;
        const int gi = start + i;
        if (i < HAD_TILE && gi < P.kp) orow[gi] = f32_to_act(buf[i] * P.scale);
    }
}
#endif

#ifdef HAD_CLUSTER
// One transform block of HAD_ORDER = HCL_M * L values (L = HAD_POW2 = 2^HAD_LOG2) is
// H = M (x) S_L: the Sylvester transform of each of the HCL_M contiguous segments of L values,
// then the outer matrix M (a Paley factor, or S_HCL_M) mixing the segments column by column
// (output a * L + b = sum_a' M[a][a'] y[a' * L + b]). A cluster of HAD_CLUSTER blocks on as many
// SMs shares it (before: one block on one SM): block `rank` transforms segments
// [rank * SPB, rank * SPB + SPB) (HAD_TILE = SPB * L values) into its shared memory; after a
// cluster barrier it takes the columns [rank * L / C, (rank + 1) * L / C), reads their HCL_M
// values from the blocks' shared memory (distributed shared memory: each value crosses once),
// and writes the outputs. HCL_Q threads share a column (each computes HCL_M / HCL_Q outputs
// through hcl_outer), HCL_NCOLP threads per part (columns rounded up to whole warps; a thread
// loops over several columns where that would exceed 1024 threads). Same
// arithmetic in the same order as hadamard_rotate: the same bits.
__device__ __forceinline__ u32 hcl_shared_address(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

extern "C" __global__ void __launch_bounds__(HAD_THREADS) hadamard_cluster(const HadamardParams P) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ float buf[];
    asm volatile("griddepcontrol.launch_dependents;");
    asm volatile("griddepcontrol.wait;" ::: "memory");  // as in hadamard_rotate
    constexpr int SPB = HCL_M / HAD_CLUSTER;
    constexpr int L = HAD_POW2;
    constexpr int PER_PART = HCL_M / HCL_Q;
    u32 rank;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    const int tile_start = (int)(blockIdx.x / HAD_CLUSTER) * HAD_ORDER;
    const u16* xrow = P.x + (u64)blockIdx.y * P.in_features;
    if (P.up) {
        front_stages<PRE_GATE>(P, buf, xrow, tile_start + (int)rank * HAD_TILE, P.up + (u64)blockIdx.y * P.in_features,
                               P.pre_out + (u64)blockIdx.y * P.in_features);
    } else {
        front_stages<PRE_NONE>(P, buf, xrow, tile_start + (int)rank * HAD_TILE);
    }
    __syncthreads();
    sylvester_passes<8>(buf);
    // Every block's segments are in its shared memory, visible to the cluster.
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    const int part = threadIdx.x / HCL_NCOLP;
    const int col_end = (int)((rank + 1) * L) / HAD_CLUSTER;
    for (int col = (int)(rank * L) / HAD_CLUSTER + threadIdx.x % HCL_NCOLP; part < HCL_Q && col < col_end;
         col += HCL_NCOLP) {
        const u32 local = hcl_shared_address(buf) + 4u * (u32)col;
        u32 base[HAD_CLUSTER];
#pragma unroll
        for (int r = 0; r < HAD_CLUSTER; ++r)
            asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(base[r]) : "r"(local), "r"(r));
        float v[HCL_M];
#pragma unroll
        for (int a = 0; a < HCL_M; ++a)
            asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v[a]) : "r"(base[a / SPB] + 4u * (u32)((a % SPB) * L)));
        float o[PER_PART];
        hcl_outer(part, v, o);
        u16* orow = P.out + (u64)blockIdx.y * P.kp;
#pragma unroll
        for (int j = 0; j < PER_PART; ++j) {
            const int gi = tile_start + (part * PER_PART + j) * L + col;
            if (gi < P.kp) orow[gi] = f32_to_act(o[j] * P.scale);
        }
    }
    // No block may leave while the others still read its shared memory.
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
#endif
