// A CPU emulation of the little of CUDA the kernels use, so tests/emulated.rs
// can run kernels/*.cu without a GPU: each block runs as blockDim.x host
// threads (blocks one after another), __syncthreads is a block barrier,
// __shfl_xor_sync a barrier among the lanes its mask names, and __shared__
// variables are statics (one block runs at a time). Test sizes only: it is
// slow, and it checks logic (indexing, reductions, masks), not speed.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct emu_dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned emu_bits(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }

struct __half { uint16_t bits; };
struct __half2 { __half x, y; };
struct __nv_bfloat16 { uint16_t bits; };

inline float __half2float(__half h) {
    _Float16 v; std::memcpy(&v, &h.bits, 2); return (float)v;
}
inline __half __float2half_rn(float f) {
    _Float16 v = (_Float16)f; __half h; std::memcpy(&h.bits, &v, 2); return h;
}
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned)b.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned u = emu_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

// ---- block-level synchronisation ----
struct EmuBlock {
    std::barrier<> sync;
    std::mutex m;
    std::map<std::pair<unsigned, unsigned>, std::unique_ptr<std::barrier<>>> shfl_barriers;
    float xchg[32][32];  // [warp][lane]
    explicit EmuBlock(unsigned n) : sync((std::ptrdiff_t)n) {}
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->sync.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    std::barrier<>* b;
    {
        std::lock_guard<std::mutex> g(emu_block->m);
        auto& slot = emu_block->shfl_barriers[{warp, mask}];
        if (!slot) slot = std::make_unique<std::barrier<>>((std::ptrdiff_t)__builtin_popcount(mask));
        b = slot.get();
    }
    emu_block->xchg[warp][lane] = v;
    b->arrive_and_wait();
    const unsigned src = (lane ^ (unsigned)lane_mask) % 32;
    const float r = ((unsigned)lane_mask < (unsigned)width) ? emu_block->xchg[warp][src] : v;
    b->arrive_and_wait();
    return r;
}
