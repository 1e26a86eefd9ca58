// dt = softplus(dbc[:, :dt_rank] dt_proj^T + dt_bias).
// dbc [rows, xp] (xp = dt_rank + 2*d_state); wt = dt_proj transposed,
// [dt_rank, d_inner] f32, so a warp's 32 channels read 128 contiguous bytes
// per r; dt_bias [d_inner] f32; dt [rows, d_inner].
// A block is blockDim.x channels x DT_ROWS rows (block index = row tile *
// channel blocks + channel block): each weight read serves DT_ROWS rows, and
// the rows' dbc values come through shared memory DT_R at a time. Each
// (row, channel) sums r = 0, 1, ... in order, as the CPU does.
#define DT_ROWS 8
#define DT_R 32
extern "C" __global__ void dt_proj_softplus(const float* dbc, const float* wt, const float* dt_bias, float* dt,
                                            u32 rows, u32 d_inner, u32 dt_rank, u32 xp) {
    __shared__ float in[DT_ROWS][DT_R];
    const u32 d_blocks = (d_inner + blockDim.x - 1) / blockDim.x;
    const u32 d = (blockIdx.x % d_blocks) * blockDim.x + threadIdx.x;
    const u64 t0 = (u64)(blockIdx.x / d_blocks) * DT_ROWS;
    float acc[DT_ROWS];
#pragma unroll
    for (int j = 0; j < DT_ROWS; ++j) acc[j] = 0.0f;
    for (u32 r0 = 0; r0 < dt_rank; r0 += DT_R) {
        __syncthreads();  // the previous chunk of in[] has been read
        for (u32 i = threadIdx.x; i < DT_ROWS * DT_R; i += blockDim.x) {
            const u32 j = i / DT_R, r = r0 + i % DT_R;
            in[j][i % DT_R] = t0 + j < rows && r < dt_rank ? dbc[(t0 + j) * xp + r] : 0.0f;
        }
        __syncthreads();
        if (d < d_inner) {
            const u32 n = dt_rank - r0 < DT_R ? dt_rank - r0 : DT_R;
            for (u32 r = 0; r < n; ++r) {
                const float w = wt[(u64)(r0 + r) * d_inner + d];
#pragma unroll
                for (int j = 0; j < DT_ROWS; ++j) acc[j] += w * in[j][r];
            }
        }
    }
    if (d >= d_inner) return;
    const float bias = dt_bias[d];
#pragma unroll
    for (int j = 0; j < DT_ROWS; ++j)
        if (t0 + j < rows) dt[(t0 + j) * d_inner + d] = softplus(acc[j] + bias);
}
