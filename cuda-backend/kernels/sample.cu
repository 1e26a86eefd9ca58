// Greedy sampling on the device: ids[r] = argmax of logits[r, :n_valid]
// (n_valid <= row width: padded vocabulary columns are never picked).
// Ties go to the lowest index. One block per row; blockDim.x a multiple of 32.
extern "C" __global__ void argmax_rows(const float* logits, u32* ids, u32 rows, u32 width, u32 n_valid) {
    const u64 r = blockIdx.x;
    if (r >= rows) return;
    const float* row = logits + r * width;
    float best = -__int_as_float(0x7f800000);  // -inf (no math.h under NVRTC)
    u32 best_i = 0xffffffffu;
#pragma unroll 4
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

// Temperature / top-k / min-p / top-p sampling on the device, the CPU
// sampler's algorithm (std-runtime/src/sampling.rs) without penalties:
// scale by 1/T; candidates in order (value desc, index asc); softmax over
// the top_k best (every one of them walked, however many), or over the whole
// row when top_k is 0 (or >= n_valid), so the probabilities are exact; min-p
// and top-p cut the sorted prefix; the pick is where the cumulative
// probability passes u. Only the first SAMPLE_MAX_CAND (256) candidates can
// be picked: with a min-p/top-p cut (or none) reaching past them, the CPU can
// pick further down the tail (rare: their mass is left out). One block per
// row; blockDim.x 256. params [rows, 4] = (temperature, top_k, top_p, min_p);
// u [rows] uniforms in [0, 1) from the host's seeded generators. Rows with
// temperature 0 or top_k 1 take the argmax. Cost: one pass over the row per
// candidate walked.
#define SAMPLE_MAX_CAND 256

// a before b in (value desc, index asc); invalid index 0xffffffff is last.
__device__ __forceinline__ bool cand_before(float va, u32 ia, float vb, u32 ib) {
    if (ia == 0xffffffffu) return false;
    if (ib == 0xffffffffu) return true;
    return va > vb || (va == vb && ia < ib);
}

extern "C" __global__ void sample_rows(const float* logits, const float* params, const double* u, u32* ids,
                                       u32 rows, u32 width, u32 n_valid) {
    const u64 r = blockIdx.x;
    if (r >= rows) return;
    const float* row = logits + r * width;
    const float temp = params[r * 4 + 0];
    const u32 top_k = (u32)params[r * 4 + 1];
    const float top_p = params[r * 4 + 2], min_p = params[r * 4 + 3];
    __shared__ float sv[256];
    __shared__ u32 si[256];
    __shared__ float cand_v[SAMPLE_MAX_CAND];
    __shared__ u32 cand_i[SAMPLE_MAX_CAND];
    __shared__ double cand_p[SAMPLE_MAX_CAND];
    __shared__ double total_s[256];
    const u32 tid = threadIdx.x;
    const bool greedy = temp == 0.0f || top_k == 1;
    const bool all = top_k == 0 || top_k >= n_valid;  // the softmax spans the whole row
    const u32 want = greedy ? 1u : (all ? SAMPLE_MAX_CAND : top_k);
    double top_sum = 0.0;  // thread 0: sum of exp(v - max) over the candidates walked
    // Candidates one by one: the best element strictly after the previous pick.
    float prev_v = 0.0f;
    u32 prev_i = 0xffffffffu, n_cand = 0;
    for (u32 c = 0; c < want; ++c) {
        float best = 0.0f;
        u32 best_i = 0xffffffffu;
        for (u32 i = tid; i < n_valid; i += blockDim.x) {
            const float v = greedy ? row[i] : row[i] / temp;
            if (v != v) continue;  // NaN is never a candidate
            const bool after = prev_i == 0xffffffffu || cand_before(prev_v, prev_i, v, i);
            if (after && cand_before(v, i, best, best_i)) { best = v; best_i = i; }
        }
        sv[tid] = best;
        si[tid] = best_i;
        __syncthreads();
        for (u32 o = blockDim.x / 2; o > 0; o /= 2) {
            if (tid < o && cand_before(sv[tid + o], si[tid + o], sv[tid], si[tid])) {
                sv[tid] = sv[tid + o];
                si[tid] = si[tid + o];
            }
            __syncthreads();
        }
        if (si[0] == 0xffffffffu) break;  // fewer valid entries than wanted
        prev_v = sv[0];
        prev_i = si[0];
        if (tid == 0) {
            if (c < SAMPLE_MAX_CAND) { cand_v[c] = prev_v; cand_i[c] = prev_i; }
            top_sum += exp((double)(prev_v - cand_v[0]));
        }
        n_cand = c + 1 < SAMPLE_MAX_CAND ? c + 1 : SAMPLE_MAX_CAND;
        __syncthreads();
    }
    if (n_cand == 0 || greedy) {
        if (tid == 0) ids[r] = n_cand == 0 ? 0u : cand_i[0];
        return;
    }
    const float max_v = cand_v[0];
    // Normaliser: over the whole row, or (thread 0's top_sum) over the top_k walked.
    double part = 0.0;
    if (all) {
        for (u32 i = tid; i < n_valid; i += blockDim.x) {
            const float v = row[i] / temp;
            if (v == v) part += exp((double)(v - max_v));
        }
    } else if (tid == 0) {
        part = top_sum;
    }
    total_s[tid] = part;
    __syncthreads();
    for (u32 o = blockDim.x / 2; o > 0; o /= 2) {
        if (tid < o) total_s[tid] += total_s[tid + o];
        __syncthreads();
    }
    if (tid != 0) return;
    const double total = total_s[0];
    u32 keep = n_cand;
    for (u32 c = 0; c < n_cand; ++c) cand_p[c] = exp((double)(cand_v[c] - max_v)) / total;
    if (min_p > 0.0f) {
        const double floor = cand_p[0] * (double)min_p;
        u32 k = 0;
        while (k < keep && cand_p[k] >= floor) ++k;
        keep = k > 0 ? k : 1;
        double t = 0.0;
        for (u32 c = 0; c < keep; ++c) t += cand_p[c];
        for (u32 c = 0; c < keep; ++c) cand_p[c] /= t;
    }
    if (top_p < 1.0f) {
        double acc = 0.0;
        u32 k = keep;
        for (u32 c = 0; c < keep; ++c) {
            acc += cand_p[c];
            if (acc >= (double)top_p) { k = c + 1; break; }
        }
        keep = k;
        double t = 0.0;
        for (u32 c = 0; c < keep; ++c) t += cand_p[c];
        for (u32 c = 0; c < keep; ++c) cand_p[c] /= t;
    }
    double acc = 0.0;
    u32 pick = cand_i[keep - 1];
    for (u32 c = 0; c < keep; ++c) {
        acc += cand_p[c];
        if (u[r] < acc) { pick = cand_i[c]; break; }
    }
    ids[r] = pick;
}
