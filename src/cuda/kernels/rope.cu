// Rotary position embedding of queries and keys, as transformers' `apply_rotary_pos_emb`
// (unsqueeze_dim 1) computes it: out = x * cos + rotate_half(x) * sin, rotate_half(x) =
// cat(-x2, x1). Each product and the sum are rounded to the activation dtype, as PyTorch's
// elementwise kernels round them (in float32, then to the dtype): the same bits, in one launch for
// q and k instead of ten small kernels. Needs common.cuh first.
//
// x[t] (t = 0: q, 1: k) is (batch, heads[t], seq, dim) with element strides stride_*[t] (dim
// contiguous); out[t] is (batch, seq, heads[t], dim) contiguous (the order of a transposed
// projection output). cos and sin are (batch, seq, dim), dim contiguous,
// stride 0 where they broadcast. Block (x: b * seq + s, y: a slice of that position's values).

struct RopeParams {
    const u16* x[2];
    u16* out[2];
    long long stride_b[2];
    long long stride_h[2];
    long long stride_s[2];
    int heads[2];
    const u16* cos;
    const u16* sin;
    long long cos_stride_b;
    long long cos_stride_s;
    long long sin_stride_b;
    long long sin_stride_s;
    int batch;
    int seq;
    int dim;
};

__device__ __forceinline__ float act_round(float v) { return act_to_f32(f32_to_act(v)); }

extern "C" __global__ void __launch_bounds__(256) rope(const RopeParams P) {
    const int b = blockIdx.x / P.seq;
    const int s = blockIdx.x % P.seq;
    const int half = P.dim >> 1;
    const int values = (P.heads[0] + P.heads[1]) * P.dim;
    const u16* cos = P.cos + b * P.cos_stride_b + s * P.cos_stride_s;
    const u16* sin = P.sin + b * P.sin_stride_b + s * P.sin_stride_s;
    for (int e = blockIdx.y * blockDim.x + threadIdx.x; e < values; e += gridDim.y * blockDim.x) {
        const int row = e / P.dim;
        const int d = e - row * P.dim;
        const int t = row >= P.heads[0];
        const int h = t ? row - P.heads[0] : row;
        const u16* x = P.x[t] + b * P.stride_b[t] + h * P.stride_h[t] + s * P.stride_s[t];
        const float xd = act_to_f32(x[d]);
        const float rot = d < half ? -act_to_f32(x[d + half]) : act_to_f32(x[d - half]);
        const float sum = act_round(xd * act_to_f32(cos[d])) + act_round(rot * act_to_f32(sin[d]));
        P.out[t][(((long long)b * P.seq + s) * P.heads[t] + h) * P.dim + d] = f32_to_act(sum);
    }
}
