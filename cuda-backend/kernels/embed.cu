// Embedding gather: out[t, :] = table[ids[t], :] widened to f32.
// table [vocab, d_model] (f32, f16 or bf16); ids [n_tokens], checked < vocab on
// the host before launch; out [n_tokens, d_model].

template <typename T>
__device__ void embed_rows(const T* table, const u32* ids, float* out, u32 n_tokens, u32 d_model) {
    const u64 total = (u64)n_tokens * d_model;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 t = i / d_model, c = i % d_model;
        out[i] = to_f32(table[(u64)ids[t] * d_model + c]);
    }
}

extern "C" __global__ void embed_f32(const float* table, const u32* ids, float* out, u32 n, u32 d) {
    embed_rows(table, ids, out, n, d);
}
extern "C" __global__ void embed_f16(const __half* table, const u32* ids, float* out, u32 n, u32 d) {
    embed_rows(table, ids, out, n, d);
}
extern "C" __global__ void embed_bf16(const __nv_bfloat16* table, const u32* ids, float* out, u32 n, u32 d) {
    embed_rows(table, ids, out, n, d);
}
