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

struct HadamardParams {
    const u16* x;        // batch x in_features
    u16* out;            // batch x kp
    const float* signs;  // padded, or null
    int in_features;
    int kp;
    float scale;         // 1 / sqrt(HAD_ORDER)
};

extern "C" __global__ void __launch_bounds__(HAD_THREADS) hadamard_rotate(const HadamardParams P) {
    extern __shared__ float buf[];
#if __CUDA_ARCH__ >= 900
    // Let the LUT-GEMM launch now: it builds its table and fetches codes, then waits for this grid.
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    const int b = blockIdx.y;
    const int start = blockIdx.x * HAD_TILE;
    const u16* xrow = P.x + (u64)b * P.in_features;
    // Compile-time trip counts, so every thread's loads are in flight together.
#pragma unroll
    for (int j = 0; j < (HAD_TILE + HAD_THREADS - 1) / HAD_THREADS; ++j) {
        const int i = threadIdx.x + j * HAD_THREADS;
        if (i < HAD_TILE) {
            const int gi = start + i;
            float v = 0.f;
            if (gi < P.in_features) {
                v = act_to_f32(xrow[gi]);
                if (P.signs) v *= P.signs[gi];
            }
            buf[i] = v;
        }
    }
    __syncthreads();

    // Sylvester part on the fastest index: radix-4 passes (two stages each), then radix-2.
#pragma unroll
    for (int s = 0; s + 2 <= HAD_LOG2; s += 2) {
#pragma unroll
        for (int j = 0; j < (HAD_TILE / 4 + HAD_THREADS - 1) / HAD_THREADS; ++j) {
            const int q = threadIdx.x + j * HAD_THREADS;
            if (q >= HAD_TILE / 4) break;
            const int low = q & ((1 << s) - 1);
            const int base = ((q >> s) << (s + 2)) | low;
            const int d = 1 << s;
            const float a0 = buf[base], a1 = buf[base + d], a2 = buf[base + 2 * d], a3 = buf[base + 3 * d];
            const float b0 = a0 + a1, b1 = a0 - a1, b2 = a2 + a3, b3 = a2 - a3;
            buf[base] = b0 + b2;
            buf[base + d] = b1 + b3;
            buf[base + 2 * d] = b0 - b2;
            buf[base + 3 * d] = b1 - b3;
        }
        __syncthreads();
    }
#if HAD_LOG2 % 2 == 1
    {
        const int s = HAD_LOG2 - 1;
        for (int q = threadIdx.x; q < HAD_TILE / 2; q += HAD_THREADS) {
            const int low = q & ((1 << s) - 1);
            const int base = ((q >> s) << (s + 1)) | low;
            const float a0 = buf[base], a1 = buf[base + (1 << s)];
            buf[base] = a0 + a1;
            buf[base + (1 << s)] = a0 - a1;
        }
        __syncthreads();
    }
#endif

#if HAD_FAST > 1
    // Fast Paley factor: mixes the HAD_FAST sub-vectors of length 2^k inside each block of
    // HAD_FAST * 2^k values. One thread owns one fiber, so the update is in place.
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
