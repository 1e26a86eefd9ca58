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
