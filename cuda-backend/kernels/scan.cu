// Selective scan fused with the D skip and the SiLU(z) gate, over a ragged
// batch, each sequence starting from its slot's SSM state and leaving its
// final state there. The single-token step is the same kernel with
// offsets = 0, 1, ..., B.
//
// Per channel d and state n:
//   h[d,n] = exp(dt[d] A[d,n]) h[d,n] + dt[d] x[d] B[n]
//   y[d]   = (sum_n h[d,n] C[n] + D[d] x[d]) * silu(z[d])
//
// A group of G lanes (a power of two <= 32, inside one warp) owns one
// (sequence, channel); lane l keeps states n = l, l + G, ... (NPT of them)
// in registers, so any d_state <= 32 * 8 = 256 fits. Groups are independent:
// parallel over sequences and channels, sequential over a sequence's tokens.
// Nothing of size [tokens, d_inner, d_state] is materialised.
//
// x, dt [rows, d_inner]; dbc [rows, xp] (B at dt_rank, C after it);
// xz [rows, 2*d_inner] (z in the second half); A [d_inner, d_state] f32
// (= -exp(A_log)); D [d_inner] f32; y [rows, d_inner].
// SSM state of (slot, layer): states + slot * slot_len + ssm_off, [d_inner, d_state].

// The lanes of one group: which (sequence or chunk, channel) they own, their
// states' indices, and the shuffle mask of their group.
struct ScanLane {
    u64 chan;  // (unit, channel) index: unit * d_inner + d
    u32 lane, group;
    unsigned mask;
};

__device__ __forceinline__ ScanLane scan_lane(u32 group) {
    const u64 g = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    const u32 warp_lane = threadIdx.x & 31;
    const unsigned mask = group == 32 ? 0xffffffffu : (((1u << group) - 1u) << (warp_lane & ~(group - 1)));
    return ScanLane{g / group, (u32)(g % group), group, mask};
}

// Run tokens [start, end) of channel d through the recurrence, h[] (this
// lane's states) in registers; write the gated y when y is not null.
// Returns the sum of dt over the tokens (for the chunked scan's decay).
// Token t + 1's inputs are loaded before token t is computed, so each
// step's loads overlap the previous step's arithmetic instead of stalling it
// (y[t] is written after t + 1 is read, so y may even alias x).
template <int NPT>
__device__ float scan_tokens(const float* x, const float* dt, const float* dbc, const float* xz, const float dd,
                             float* y, u64 start, u64 end, u32 d, ScanLane L, u32 d_inner, u32 d_state, u32 dt_rank,
                             float* h, const float* a) {
    const u32 xp = dt_rank + 2 * d_state;
    const bool write = y && L.lane == 0;
    float sum_dt = 0.0f;
    float nx = 0.0f, ndt = 0.0f, nz = 0.0f, nb[NPT], nc[NPT];
    auto load = [&](u64 t) {
        nx = x[t * d_inner + d];
        ndt = dt[t * d_inner + d];
        if (write) nz = xz[t * 2 * d_inner + d_inner + d];
        const float* bc = dbc + t * xp + dt_rank;
#pragma unroll
        for (int i = 0; i < NPT; ++i) {
            const u32 n = L.lane + L.group * i;
            nb[i] = n < d_state ? bc[n] : 0.0f;
            nc[i] = n < d_state ? bc[d_state + n] : 0.0f;
        }
    };
    if (start < end) load(start);
    for (u64 t = start; t < end; ++t) {
        const float xv = nx, dtv = ndt, zv = nz;
        float bv[NPT], cv[NPT];
#pragma unroll
        for (int i = 0; i < NPT; ++i) {
            bv[i] = nb[i];
            cv[i] = nc[i];
        }
        if (t + 1 < end) load(t + 1);
        const float dtx = dtv * xv;
        sum_dt += dtv;
        float part = 0.0f;
#pragma unroll
        for (int i = 0; i < NPT; ++i) {
            const u32 n = L.lane + L.group * i;
            if (n < d_state) {
                h[i] = expf(dtv * a[i]) * h[i] + dtx * bv[i];
                part += h[i] * cv[i];
            }
        }
        for (u32 o = L.group / 2; o > 0; o /= 2) part += __shfl_xor_sync(L.mask, part, o, L.group);
        if (write) y[t * d_inner + d] = (part + dd * xv) * silu(zv);
    }
    return sum_dt;
}

template <int NPT>
__device__ void load_a(const float* A, u32 d, ScanLane L, u32 d_state, float* a) {
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
        const u32 n = L.lane + L.group * i;
        a[i] = n < d_state ? A[(u64)d * d_state + n] : 0.0f;
    }
}

// Whole sequences: from and into each slot's state.
template <int NPT>
__device__ void scan_impl(const float* x, const float* dt, const float* dbc, const float* xz, const float* A,
                          const float* Dskip, float* states, float* y, const u32* offsets, const u32* slots,
                          u32 n_seqs, u32 d_inner, u32 d_state, u32 dt_rank, u64 slot_len, u64 ssm_off,
                          u32 group) {
    const ScanLane L = scan_lane(group);
    if (L.chan >= (u64)n_seqs * d_inner) return;  // whole groups leave together
    const u32 s = (u32)(L.chan / d_inner), d = (u32)(L.chan % d_inner);
    float* h_ptr = states + (u64)slots[s] * slot_len + ssm_off + (u64)d * d_state;
    float h[NPT], a[NPT];
    load_a<NPT>(A, d, L, d_state, a);
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
        const u32 n = L.lane + group * i;
        h[i] = n < d_state ? h_ptr[n] : 0.0f;
    }
    scan_tokens<NPT>(x, dt, dbc, xz, Dskip[d], y, offsets[s], offsets[s + 1], d, L, d_inner, d_state, dt_rank, h, a);
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
        const u32 n = L.lane + group * i;
        if (n < d_state) h_ptr[n] = h[i];
    }
}

// The chunked scan of long sequences, in three launches:
//  1. scan_chunk_end: each chunk of each sequence from a zero state, in
//     parallel: its end state into chunk_h [n_chunks, d_inner, d_state] and
//     the sum of its dt into chunk_dt [n_chunks, d_inner];
//  2. chunk_carry: per (sequence, channel, state), along the chunks: the
//     state entering chunk c replaces chunk_h[c], using
//     h_in[c+1] = exp(A * sum(dt over c)) * h_in[c] + h_end[c]; the final
//     state goes to the slot;
//  3. scan_chunk_y: each chunk again from its entering state, writing y.
// Chunks: chunk_start/chunk_end [n_chunks] token rows; seq_chunk0 [n_seqs+1]
// the first chunk of each sequence.
template <int NPT>
__device__ void chunk_end_impl(const float* x, const float* dt, const float* dbc, const float* A,
                               const u32* chunk_start, const u32* chunk_end, float* chunk_h, float* chunk_dt,
                               u32 n_chunks, u32 d_inner, u32 d_state, u32 dt_rank, u32 group) {
    const ScanLane L = scan_lane(group);
    if (L.chan >= (u64)n_chunks * d_inner) return;
    const u32 c = (u32)(L.chan / d_inner), d = (u32)(L.chan % d_inner);
    float h[NPT], a[NPT];
    load_a<NPT>(A, d, L, d_state, a);
#pragma unroll
    for (int i = 0; i < NPT; ++i) h[i] = 0.0f;
    const float sdt = scan_tokens<NPT>(x, dt, dbc, nullptr, 0.0f, nullptr, chunk_start[c], chunk_end[c], d, L,
                                       d_inner, d_state, dt_rank, h, a);
    float* out = chunk_h + L.chan * d_state;
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
        const u32 n = L.lane + group * i;
        if (n < d_state) out[n] = h[i];
    }
    if (L.lane == 0) chunk_dt[L.chan] = sdt;
}

template <int NPT>
__device__ void chunk_y_impl(const float* x, const float* dt, const float* dbc, const float* xz, const float* A,
                             const float* Dskip, float* y, const u32* chunk_start, const u32* chunk_end,
                             const float* chunk_h, u32 n_chunks, u32 d_inner, u32 d_state, u32 dt_rank, u32 group) {
    const ScanLane L = scan_lane(group);
    if (L.chan >= (u64)n_chunks * d_inner) return;
    const u32 c = (u32)(L.chan / d_inner), d = (u32)(L.chan % d_inner);
    float h[NPT], a[NPT];
    load_a<NPT>(A, d, L, d_state, a);
    const float* in = chunk_h + L.chan * d_state;
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
        const u32 n = L.lane + group * i;
        h[i] = n < d_state ? in[n] : 0.0f;
    }
    scan_tokens<NPT>(x, dt, dbc, xz, Dskip[d], y, chunk_start[c], chunk_end[c], d, L, d_inner, d_state, dt_rank, h,
                     a);
}

// Step 2: one thread per (sequence, channel, state).
extern "C" __global__ void chunk_carry(const float* A, float* states, const u32* slots, const u32* seq_chunk0,
                                       float* chunk_h, const float* chunk_dt, u32 n_seqs, u32 d_inner,
                                       u32 d_state, u64 slot_len, u64 ssm_off) {
    const u64 total = (u64)n_seqs * d_inner * d_state;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u32 n = (u32)(i % d_state);
        const u64 sd = i / d_state;
        const u32 d = (u32)(sd % d_inner), s = (u32)(sd / d_inner);
        const float a = A[(u64)d * d_state + n];
        float* st = states + (u64)slots[s] * slot_len + ssm_off + (u64)d * d_state + n;
        float h = *st;
        for (u32 c = seq_chunk0[s]; c < seq_chunk0[s + 1]; ++c) {
            const u64 at = ((u64)c * d_inner + d) * d_state + n;
            const float end = chunk_h[at];
            chunk_h[at] = h;
            h = expf(a * chunk_dt[(u64)c * d_inner + d]) * h + end;
        }
        *st = h;
    }
}

#define SCAN_KERNEL(NPT)                                                                                     \
    extern "C" __global__ void selective_scan_##NPT(                                                        \
        const float* x, const float* dt, const float* dbc, const float* xz, const float* A, const float* D, \
        float* states, float* y, const u32* offsets, const u32* slots, u32 n_seqs, u32 d_inner,             \
        u32 d_state, u32 dt_rank, u64 slot_len, u64 ssm_off, u32 group) {                                   \
        scan_impl<NPT>(x, dt, dbc, xz, A, D, states, y, offsets, slots, n_seqs, d_inner, d_state, dt_rank,  \
                       slot_len, ssm_off, group);                                                           \
    }                                                                                                       \
    extern "C" __global__ void scan_chunk_end_##NPT(                                                        \
        const float* x, const float* dt, const float* dbc, const float* A, const u32* chunk_start,          \
        const u32* chunk_end, float* chunk_h, float* chunk_dt, u32 n_chunks, u32 d_inner, u32 d_state,      \
        u32 dt_rank, u32 group) {                                                                           \
        chunk_end_impl<NPT>(x, dt, dbc, A, chunk_start, chunk_end, chunk_h, chunk_dt, n_chunks, d_inner,    \
                            d_state, dt_rank, group);                                                       \
    }                                                                                                       \
    extern "C" __global__ void scan_chunk_y_##NPT(                                                          \
        const float* x, const float* dt, const float* dbc, const float* xz, const float* A, const float* D, \
        float* y, const u32* chunk_start, const u32* chunk_end, const float* chunk_h, u32 n_chunks,         \
        u32 d_inner, u32 d_state, u32 dt_rank, u32 group) {                                                 \
        chunk_y_impl<NPT>(x, dt, dbc, xz, A, D, y, chunk_start, chunk_end, chunk_h, n_chunks, d_inner,      \
                          d_state, dt_rank, group);                                                         \
    }

SCAN_KERNEL(1)
SCAN_KERNEL(2)
SCAN_KERNEL(3)
SCAN_KERNEL(4)
SCAN_KERNEL(5)
SCAN_KERNEL(6)
SCAN_KERNEL(7)
SCAN_KERNEL(8)
