// dt = softplus(dbc[:, :dt_rank] dt_proj^T + dt_bias).
// dbc [rows, xp] (xp = dt_rank + 2*d_state); dt_proj [d_inner, dt_rank] f32;
// dt_bias [d_inner] f32; dt [rows, d_inner]. One thread per (row, channel):
// dt_rank is small (48..160), the dbc row stays in L1.
extern "C" __global__ void dt_proj_softplus(const float* dbc, const float* dt_proj, const float* dt_bias,
                                            float* dt, u32 rows, u32 d_inner, u32 dt_rank, u32 xp) {
    const u64 total = (u64)rows * d_inner;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 t = i / d_inner, d = i % d_inner;
        const float* in = dbc + t * xp;
        const float* w = dt_proj + d * dt_rank;
        float acc = 0.0f;
        for (u32 r = 0; r < dt_rank; ++r) acc += w[r] * in[r];
        dt[i] = softplus(acc + dt_bias[d]);
    }
}
