// Causal depthwise conv1d (+ bias) + SiLU, each sequence from and into its
// own slot's conv state. Conv state of a channel: its last K pre-conv inputs,
// newest last ([d_inner, K] per (slot, layer)); tap K-1 multiplies the newest.
//
// Ragged batch on the device: seq_of_row [rows], offsets [n_seqs + 1],
// slots [n_seqs]. A slot's layer state starts at states + slot * slot_len + layer_off.
// xz [rows, 2*d_inner] (x in the first half); w [d_inner, K] f32; bias [d_inner] or null.

// Input j of a sequence (j < 0 reads the carried state).
__device__ __forceinline__ float conv_input(const float* xz, const float* state, u64 start, int j, u32 d,
                                            u32 d_inner, u32 k) {
    return j >= 0 ? xz[(start + (u64)j) * 2 * d_inner + d] : state[(u64)d * k + (u32)((int)k + j)];
}

// Outputs of a ragged prefill: one thread per (row, channel). Reads states only.
extern "C" __global__ void conv1d_prefill_out(const float* xz, const float* w, const float* bias,
                                              const float* states, float* out, const u32* seq_of_row,
                                              const u32* offsets, const u32* slots, u32 rows, u32 d_inner,
                                              u32 k, u64 slot_len, u64 layer_off) {
    const u64 total = (u64)rows * d_inner;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 t = i / d_inner;
        const u32 d = (u32)(i % d_inner);
        const u32 s = seq_of_row[t];
        const u64 start = offsets[s];
        const int pos = (int)(t - start);
        const float* state = states + (u64)slots[s] * slot_len + layer_off;
        float acc = bias ? bias[d] : 0.0f;
        for (u32 tap = 0; tap < k; ++tap) {
            const int j = pos + (int)tap - ((int)k - 1);
            acc += w[(u64)d * k + tap] * conv_input(xz, state, start, j, d, d_inner, k);
        }
        out[i] = silu(acc);
    }
}

// New conv states after a ragged prefill: one thread per (sequence, channel),
// run after conv1d_prefill_out. Column c takes input len - K + c; ascending c
// reads old column c + len before anything overwrites it.
extern "C" __global__ void conv1d_prefill_state(const float* xz, float* states, const u32* offsets,
                                                const u32* slots, u32 n_seqs, u32 d_inner, u32 k,
                                                u64 slot_len, u64 layer_off) {
    const u64 total = (u64)n_seqs * d_inner;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u32 s = (u32)(i / d_inner), d = (u32)(i % d_inner);
        const u64 start = offsets[s];
        const int len = (int)(offsets[s + 1] - start);
        if (len == 0) continue;
        float* state = states + (u64)slots[s] * slot_len + layer_off;
        for (u32 c = 0; c < k; ++c) {
            const int j = len - (int)k + (int)c;
            const float v = conv_input(xz, state, start, j, d, d_inner, k);
            state[(u64)d * k + c] = v;
        }
    }
}

// One token per sequence: row b of xz belongs to slots[b]. Shift the state
// left, append x, convolve. One thread per (row, channel).
extern "C" __global__ void conv1d_step(const float* xz, const float* w, const float* bias, float* states,
                                       float* out, const u32* slots, u32 batch, u32 d_inner, u32 k,
                                       u64 slot_len, u64 layer_off) {
    const u64 total = (u64)batch * d_inner;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 b = i / d_inner;
        const u32 d = (u32)(i % d_inner);
        float* s = states + (u64)slots[b] * slot_len + layer_off + (u64)d * k;
        const float* wd = w + (u64)d * k;
        float acc = bias ? bias[d] : 0.0f;
        const float x = xz[b * 2 * d_inner + d];
        if (k == 4 && ((u64)s & 15) == 0 && ((u64)wd & 15) == 0) {
            // The common d_conv 4: one 16-byte load and store of the state, one of the taps.
            const float4 o = *reinterpret_cast<const float4*>(s);
            const float4 t = *reinterpret_cast<const float4*>(wd);
            acc += t.x * o.y;
            acc += t.y * o.z;
            acc += t.z * o.w;
            acc += t.w * x;
            *reinterpret_cast<float4*>(s) = make_float4(o.y, o.z, o.w, x);
        } else {
            for (u32 c = 0; c + 1 < k; ++c) {
                const float v = s[c + 1];
                s[c] = v;
                acc += wd[c] * v;
            }
            s[k - 1] = x;
            acc += wd[k - 1] * x;
        }
        out[i] = silu(acc);
    }
}
