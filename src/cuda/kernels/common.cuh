// Shared by every higgs_rs kernel. Compiled with NVRTC at run time, so no CUDA headers are
// used: conversions, vector loads and tensor-core instructions are inline PTX.
// ACT_BF16 selects bfloat16 activations; otherwise float16.
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

struct U4 {
    u32 x, y, z, w;
};

__device__ __forceinline__ u32 float_bits(float f) {
    u32 u;
    asm("mov.b32 %0, %1;" : "=r"(u) : "f"(f));
    return u;
}

__device__ __forceinline__ float bits_float(u32 u) {
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(u));
    return f;
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

#ifdef ACT_BF16
__device__ __forceinline__ float act_to_f32(u16 h) { return bits_float((u32)h << 16); }
__device__ __forceinline__ u16 f32_to_act(float f) { return f32_to_bf16(f); }
#else
__device__ __forceinline__ float act_to_f32(u16 h) { return f16_to_f32(h); }
__device__ __forceinline__ u16 f32_to_act(float f) { return f32_to_f16(f); }
#endif

// Two activation-typed values in one register, `lo` in the low half (lower k index).
__device__ __forceinline__ u32 pack_act2(float lo, float hi) {
    return (u32)f32_to_act(lo) | ((u32)f32_to_act(hi) << 16);
}

// Elementwise product of two packed pairs, rounded once (fma with -0 keeps +0 products +0).
__device__ __forceinline__ u32 mul_act2(u32 a, u32 b) {
    u32 d;
    const u32 negative_zero = 0x80008000u;
#ifdef ACT_BF16
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(negative_zero));
#else
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(negative_zero));
#endif
    return d;
}

// D += A·B for one m16n8k16 tile, f32 accumulators.
__device__ __forceinline__ void mma_16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#ifdef ACT_BF16
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Streamed once: read-only path, not kept in L1 (L1 is left to the activations).
__device__ __forceinline__ U4 load_stream_v4(const void* p) {
    U4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

__device__ __forceinline__ void load_stream_v2(const void* p, u32& a, u32& b) {
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}

__device__ __forceinline__ u32 load_stream_u32(const void* p) {
    u32 a;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(a) : "l"(p));
    return a;
}

// Read-only data reused by many warps (activations, scales): cached in L1.
__device__ __forceinline__ U4 load_cached_v4(const void* p) {
    U4 r;
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ u16 load_cached_u16(const u16* p) {
    u16 r;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ u32 load_cached_u32(const void* p) {
    u32 r;
    asm("ld.global.nc.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

// Written by other blocks of this launch: bypass L1, after a fence.
__device__ __forceinline__ float load_coherent_f32(const float* p) {
    float r;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p) : "memory");
    return r;
}
