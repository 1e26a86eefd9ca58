// Greedy sampling on the device: ids[r] = argmax of logits[r, :n_valid]
// (n_valid <= row width: padded vocabulary columns are never picked).
// Ties go to the lowest index. One block per row; blockDim.x a multiple of 32.
extern "C" __global__ void argmax_rows(const float* logits, u32* ids, u32 rows, u32 width, u32 n_valid) {
    const u64 r = blockIdx.x;
    if (r >= rows) return;
    const float* row = logits + r * width;
    float best = -__int_as_float(0x7f800000);  // -inf (no math.h under NVRTC)
    u32 best_i = 0xffffffffu;
    for (u32 i = threadIdx.x; i < n_valid; i += blockDim.x) {
        const float v = row[i];
        // NaN never wins; the first of equal values does.
        if (v > best || (best_i == 0xffffffffu && v == v)) { best = v; best_i = i; }
    }
    __shared__ float sv[1024];
    __shared__ u32 si[1024];
    sv[threadIdx.x] = best;
    si[threadIdx.x] = best_i;
    __syncthreads();
    for (u32 o = blockDim.x / 2; o > 0; o /= 2) {
        if (threadIdx.x < o) {
            const float v = sv[threadIdx.x + o];
            const u32 i = si[threadIdx.x + o];
            const bool take = i != 0xffffffffu &&
                              (si[threadIdx.x] == 0xffffffffu || v > sv[threadIdx.x] ||
                               (v == sv[threadIdx.x] && i < si[threadIdx.x]));
            if (take) { sv[threadIdx.x] = v; si[threadIdx.x] = i; }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) ids[r] = si[0] == 0xffffffffu ? 0u : si[0];
}
