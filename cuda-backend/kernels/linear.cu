// The glue around cuBLAS for half-precision weights. cublasGemmEx has no
// (bf16 A, f32 B) combination, so f32 activations are cut into half-precision
// parts: x ~= hi + lo with hi = round(x), lo = round(x - hi). Both parts go
// through one GEMM as 2*rows columns (the weight is read once), and
// combine_parts adds the two products (and the bias) in f32. With two parts
// the activation keeps ~16 significant bits, so the error is the weights'
// own rounding, as on the CPU; with one part it is bf16/f16 rounding of x.

// x [n] f32 -> parts [n_parts, n]: parts[0] = hi, parts[1] = lo.
extern "C" __global__ void split_bf16(const float* x, __nv_bfloat16* parts, u64 n, u32 n_parts) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = x[i];
        const __nv_bfloat16 hi = __float2bfloat16_rn(v);
        parts[i] = hi;
        if (n_parts > 1) parts[n + i] = __float2bfloat16_rn(v - __bfloat162float(hi));
    }
}

extern "C" __global__ void split_f16(const float* x, __half* parts, u64 n, u32 n_parts) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = x[i];
        const __half hi = __float2half_rn(v);
        parts[i] = hi;
        if (n_parts > 1) parts[n + i] = __float2half_rn(v - __half2float(hi));
    }
}

// out[r, o] = sum_p c[p, r, o] + bias[o] (bias may be null). c [n_parts, rows, n_out].
// In place (c == out) is fine for n_parts == 1.
extern "C" __global__ void combine_parts(const float* c, float* out, const float* bias, u32 rows, u32 n_out,
                                         u32 n_parts) {
    const u64 total = (u64)rows * n_out;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        float v = c[i];
        for (u32 p = 1; p < n_parts; ++p) v += c[p * total + i];
        if (bias) v += bias[i % n_out];
        out[i] = v;
    }
}

// Decode-sized products (B <= 8 rows of x) without cuBLAS: out[b, o] =
// sum_k W[o, k] x[b, k] (+ bias[o]), weights widened to f32 in registers, f32
// accumulation (the CPU backend's numerics; no activation rounding). Each
// lane reads 8 consecutive weights per pass (16 bytes of bf16/f16), so a warp
// reads a row in coalesced 512-byte sweeps and every weight byte is read once
// for all B rows. A block is 8 warps: with split 1 each warp owns one output
// row (8 rows per block); with split 2, 4 or 8 that many warps share a row,
// each a slice of k, and add their sums through shared memory (matrices with
// few rows, such as x_proj or out_proj, which would otherwise keep too few
// warps reading).
// `vec` (host-checked: k % 8 == 0, W and x 16-byte aligned) selects 16-byte
// loads of weights and x; else element loads.
// W [n_out, k]; x [B, k] f32; bias [n_out] f32 or null; out [B, n_out].

__device__ __forceinline__ void widen8(const float* p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void widen8(const __nv_bfloat16* p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void widen8(const __half* p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

// Chunks of 8 weights a lane has in flight per pass of the vector loop:
// with one, a warp waits out a full memory latency per 512 bytes of a row.
#define GEMV_UNROLL 4

template <typename T, int B>
__device__ void gemv_rows(const T* W, const float* x, const float* bias, float* out, u32 n_out, u32 k, u32 vec,
                          u32 split) {
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u64 row = (u64)blockIdx.x * (8 / split) + warp / split;
    const u32 sub = warp % split;
    // A warp past the last row still reaches the block barrier below.
    const bool live = row < n_out;
    const T* w = W + (live ? row : 0) * k;
    float acc[B];
#pragma unroll
    for (int b = 0; b < B; ++b) acc[b] = 0.0f;
    const u32 step = 32 * 8 * split;
    u32 i = live ? (sub * 32 + lane) * 8 : k;
    if (vec) {
        // All GEMV_UNROLL weight chunks are loaded before the first is used.
        for (; i + (GEMV_UNROLL - 1) * step < k; i += GEMV_UNROLL * step) {
            float wv[GEMV_UNROLL][8];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) widen8(w + i + u * step, wv[u]);
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) {
#pragma unroll
                for (int b = 0; b < B; ++b) {
                    float xv[8];
                    widen8(x + (u64)b * k + i + u * step, xv);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[b] += wv[u][j] * xv[j];
                }
            }
        }
        for (; i < k; i += step) {
            float wv[8];
            widen8(w + i, wv);
#pragma unroll
            for (int b = 0; b < B; ++b) {
                float xv[8];
                widen8(x + (u64)b * k + i, xv);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[b] += wv[j] * xv[j];
            }
        }
    } else {
        for (; i < k; i += step) {
            float wv[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) wv[j] = i + j < k ? to_f32(w[i + j]) : 0.0f;
#pragma unroll
            for (int b = 0; b < B; ++b) {
                const float* xb = x + (u64)b * k + i;
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    if (i + j < k) acc[b] += wv[j] * xb[j];
            }
        }
    }
    __shared__ float part[8][8];  // [warp][b]
#pragma unroll
    for (int b = 0; b < B; ++b) {
        const float s = group_sum(acc[b], 32);
        if (split == 1) {
            if (live && lane == 0) out[(u64)b * n_out + row] = s + (bias ? bias[row] : 0.0f);
        } else if (lane == 0) {
            part[warp][b] = s;
        }
    }
    if (split > 1) {
        __syncthreads();
        // Thread (row of the block, b) adds its row's `split` warp sums in warp order.
        const u32 per_block = 8 / split;
        if (threadIdx.x < per_block * B) {
            const u32 rb = threadIdx.x / B, b = threadIdx.x % B;
            const u64 r = (u64)blockIdx.x * per_block + rb;
            if (r < n_out) {
                float s = 0.0f;
                for (u32 v = 0; v < split; ++v) s += part[rb * split + v][b];
                out[(u64)b * n_out + r] = s + (bias ? bias[r] : 0.0f);
            }
        }
    }
}

#define GEMV_KERNEL(NAME, T, B)                                                                         \
    extern "C" __global__ void gemv_##NAME##_##B(const T* W, const float* x, const float* bias, float* out, \
                                                 u32 n_out, u32 k, u32 vec, u32 split) {                \
        gemv_rows<T, B>(W, x, bias, out, n_out, k, vec, split);                                         \
    }
#define GEMV_ALL(NAME, T) \
    GEMV_KERNEL(NAME, T, 1) GEMV_KERNEL(NAME, T, 2) GEMV_KERNEL(NAME, T, 3) GEMV_KERNEL(NAME, T, 4) \
    GEMV_KERNEL(NAME, T, 5) GEMV_KERNEL(NAME, T, 6) GEMV_KERNEL(NAME, T, 7) GEMV_KERNEL(NAME, T, 8)
GEMV_ALL(f32, float)
GEMV_ALL(f16, __half)
GEMV_ALL(bf16, __nv_bfloat16)
