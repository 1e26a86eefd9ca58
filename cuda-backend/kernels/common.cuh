// Shared by every kernel file: the NVRTC program of each .cu is this text
// followed by the file (NVRTC gets no include path for our own headers).
//
// Numerics follow mamba-core's CPU kernels (core/src/kernels): f32
// accumulation, softplus passes values above 20 through, SiLU = x*sigmoid(x).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// torch's softplus with threshold 20.
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// Sum over the `width` lanes of an aligned group of a warp (width a power of two <= 32).
__device__ __forceinline__ float group_sum(float v, int width) {
    for (int o = width / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o, width);
    return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[32];
    v = group_sum(v, 32);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // part[] may still be read by a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < warps ? part[lane] : 0.0f;
    return group_sum(v, 32);
}
