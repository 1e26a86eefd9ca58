// RMSNorm and the residual add.

// One block per row: out = x / sqrt(mean(x^2) + eps) * w. x, out [rows, d]; w [d] f32.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, u32 rows, u32 d, float eps) {
    const u64 row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + row * d;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)d + eps);
    float* orow = out + row * d;
    for (u32 i = threadIdx.x; i < d; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}

// A layer's residual add and the next norm, one block per row: acc += x,
// then x = acc / sqrt(mean(acc^2) + eps) * w. The same arithmetic, in the
// same order per thread, as add_assign then rms_norm with this block size.
// acc, x [rows, d]; w [d] f32.
extern "C" __global__ void add_rms_norm(float* acc, float* x, const float* w, u32 rows, u32 d, float eps) {
    const u64 row = blockIdx.x;
    if (row >= rows) return;
    float* ar = acc + row * d;
    float* xr = x + row * d;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = ar[i] + xr[i];
        ar[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)d + eps);
    for (u32 i = threadIdx.x; i < d; i += blockDim.x) xr[i] = ar[i] * inv * w[i];
}

// acc[i] += x[i] for i < n.
extern "C" __global__ void add_assign(float* acc, const float* x, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        acc[i] += x[i];
}

// out[i, :] = x[rows[i], :] for n_rows rows of `width` values.
extern "C" __global__ void gather_rows(const float* x, const u32* rows, float* out, u32 n_rows, u32 width) {
    const u64 total = (u64)n_rows * width;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / width, c = i % width;
        out[i] = x[(u64)rows[r] * width + c];
    }
}
