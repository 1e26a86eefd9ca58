// dt = softplus(dbc[:, :dt_rank] dt_proj^T + dt_bias).
// dbc [rows, xp] (xp = dt_rank + 2*d_state); wt = dt_proj transposed,
// [dt_rank, d_inner] f32; dt_bias [d_inner] f32; dt [rows, d_inner].
//
// A block (256 threads) owns DT_CH channels x DT_ROWS rows (block index =
// row tile * channel blocks + channel block). Warp g reads ranks r = g, g + 8,
// ... of wt, a coalesced 128-byte line per r, so a decode row's 160 ranks
// (2.8b) are 20 loads per thread, all in flight, not 160 in a row; each
// weight serves DT_ROWS rows, whose dbc values sit in shared memory. The
// eight partial sums of a (row, channel) are added in warp order.
#define DT_CH 32
#define DT_ROWS 8
#define DT_WARPS 8
#define DT_RMAX 256  // ranks staged in shared memory per pass
extern "C" __global__ void dt_proj_softplus(const float* dbc, const float* wt, const float* dt_bias, float* dt,
                                            u32 rows, u32 d_inner, u32 dt_rank, u32 xp) {
    __shared__ float in[DT_ROWS][DT_RMAX];
    __shared__ float part[DT_WARPS][DT_ROWS][DT_CH];
    const u32 c_blocks = (d_inner + DT_CH - 1) / DT_CH;
    const u32 lane = threadIdx.x & 31, g = threadIdx.x >> 5;
    const u32 d = (blockIdx.x % c_blocks) * DT_CH + lane;
    const u64 t0 = (u64)(blockIdx.x / c_blocks) * DT_ROWS;
    float acc[DT_ROWS];
#pragma unroll
    for (int j = 0; j < DT_ROWS; ++j) acc[j] = 0.0f;
    for (u32 r0 = 0; r0 < dt_rank; r0 += DT_RMAX) {
        const u32 n = dt_rank - r0 < DT_RMAX ? dt_rank - r0 : DT_RMAX;
        __syncthreads();  // the previous pass's in[] has been read
        for (u32 i = threadIdx.x; i < DT_ROWS * n; i += blockDim.x) {
            const u32 j = i / n, r = i % n;
            in[j][r] = t0 + j < rows ? dbc[(t0 + j) * xp + r0 + r] : 0.0f;
        }
        __syncthreads();
        if (d < d_inner) {
#pragma unroll 4
            for (u32 r = g; r < n; r += DT_WARPS) {
                const float w = wt[(u64)(r0 + r) * d_inner + d];
#pragma unroll
                for (int j = 0; j < DT_ROWS; ++j) acc[j] += w * in[j][r];
            }
        }
    }
#pragma unroll
    for (int j = 0; j < DT_ROWS; ++j) part[g][j][lane] = acc[j];
    __syncthreads();
    // Warp g now finishes row t0 + g (DT_WARPS == DT_ROWS), lane its channel d.
    const u64 t = t0 + g;
    if (d >= d_inner || t >= rows) return;
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < DT_WARPS; ++w) s += part[w][g][lane];
    dt[t * d_inner + d] = softplus(s + dt_bias[d]);
}
