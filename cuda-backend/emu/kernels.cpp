// Every kernel of kernels/*.cu compiled for the host (with cuda_emu.h), and
// `emu_launch`, which runs one launch the way cuLaunchKernel would: `params[i]`
// points at argument i (device addresses are host addresses here).
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "../kernels/common.cuh"
#include "../kernels/embed.cu"
#include "../kernels/norm.cu"
#include "../kernels/linear.cu"
#include "../kernels/dt.cu"
#include "../kernels/conv.cu"
#include "../kernels/scan.cu"
#include "../kernels/sample.cu"

template <typename T>
static T arg(void** p, int i) {
    T v;
    std::memcpy(&v, p[i], sizeof(T));
    return v;
}
#define A(i, T) arg<T>(p, i)

using Entry = void (*)(void**);
struct Named {
    const char* name;
    Entry fn;
};

#define SCAN_ENTRY(N)                                                                                   \
    {"selective_scan_" #N, [](void** p) {                                                              \
         selective_scan_##N(A(0, const float*), A(1, const float*), A(2, const float*), A(3, const float*), \
                            A(4, const float*), A(5, const float*), A(6, float*), A(7, float*),           \
                            A(8, const u32*), A(9, const u32*), A(10, u32), A(11, u32), A(12, u32),      \
                            A(13, u32), A(14, u64), A(15, u64), A(16, u32));                             \
     }}
#define CHUNK_ENTRIES(N)                                                                                  \
    {"scan_chunk_end_" #N, [](void** p) {                                                              \
         scan_chunk_end_##N(A(0, const float*), A(1, const float*), A(2, const float*), A(3, const float*), \
                            A(4, const u32*), A(5, const u32*), A(6, float*), A(7, float*), A(8, u32),   \
                            A(9, u32), A(10, u32), A(11, u32), A(12, u32));                              \
     }},                                                                                                \
    {"scan_chunk_y_" #N, [](void** p) {                                                                \
         scan_chunk_y_##N(A(0, const float*), A(1, const float*), A(2, const float*), A(3, const float*),   \
                          A(4, const float*), A(5, const float*), A(6, float*), A(7, const u32*),          \
                          A(8, const u32*), A(9, const float*), A(10, u32), A(11, u32), A(12, u32),      \
                          A(13, u32), A(14, u32));                                                       \
     }}
#define GEMV_ENTRY(NAME, T, B)                                                                            \
    {"gemv_" #NAME "_" #B, [](void** p) {                                                               \
         gemv_##NAME##_##B(A(0, const T*), A(1, const float*), A(2, const float*), A(3, float*), A(4, u32), \
                           A(5, u32), A(6, u32), A(7, u32));                                             \
     }}
#define GEMV_ENTRIES(NAME, T)                                                                             \
    GEMV_ENTRY(NAME, T, 1), GEMV_ENTRY(NAME, T, 2), GEMV_ENTRY(NAME, T, 3), GEMV_ENTRY(NAME, T, 4),     \
        GEMV_ENTRY(NAME, T, 5), GEMV_ENTRY(NAME, T, 6), GEMV_ENTRY(NAME, T, 7), GEMV_ENTRY(NAME, T, 8)

static const Named KERNELS[] = {
    {"embed_f32", [](void** p) { embed_f32(A(0, const float*), A(1, const u32*), A(2, float*), A(3, u32), A(4, u32)); }},
    {"embed_f16", [](void** p) { embed_f16(A(0, const __half*), A(1, const u32*), A(2, float*), A(3, u32), A(4, u32)); }},
    {"embed_bf16",
     [](void** p) { embed_bf16(A(0, const __nv_bfloat16*), A(1, const u32*), A(2, float*), A(3, u32), A(4, u32)); }},
    {"rms_norm",
     [](void** p) { rms_norm(A(0, const float*), A(1, const float*), A(2, float*), A(3, u32), A(4, u32), A(5, float)); }},
    {"add_rms_norm",
     [](void** p) { add_rms_norm(A(0, float*), A(1, float*), A(2, const float*), A(3, u32), A(4, u32), A(5, float)); }},
    {"add_assign", [](void** p) { add_assign(A(0, float*), A(1, const float*), A(2, u64)); }},
    {"gather_rows",
     [](void** p) { gather_rows(A(0, const float*), A(1, const u32*), A(2, float*), A(3, u32), A(4, u32)); }},
    {"split_bf16", [](void** p) { split_bf16(A(0, const float*), A(1, __nv_bfloat16*), A(2, u64), A(3, u32)); }},
    {"split_f16", [](void** p) { split_f16(A(0, const float*), A(1, __half*), A(2, u64), A(3, u32)); }},
    {"combine_parts",
     [](void** p) {
         combine_parts(A(0, const float*), A(1, float*), A(2, const float*), A(3, u32), A(4, u32), A(5, u32));
     }},
    {"dt_proj_softplus",
     [](void** p) {
         dt_proj_softplus(A(0, const float*), A(1, const float*), A(2, const float*), A(3, float*), A(4, u32),
                          A(5, u32), A(6, u32), A(7, u32));
     }},
    {"conv1d_prefill_out",
     [](void** p) {
         conv1d_prefill_out(A(0, const float*), A(1, const float*), A(2, const float*), A(3, const float*),
                            A(4, float*), A(5, const u32*), A(6, const u32*), A(7, const u32*), A(8, u32), A(9, u32),
                            A(10, u32), A(11, u64), A(12, u64));
     }},
    {"conv1d_prefill_state",
     [](void** p) {
         conv1d_prefill_state(A(0, const float*), A(1, float*), A(2, const u32*), A(3, const u32*), A(4, u32),
                              A(5, u32), A(6, u32), A(7, u64), A(8, u64));
     }},
    {"conv1d_step",
     [](void** p) {
         conv1d_step(A(0, const float*), A(1, const float*), A(2, const float*), A(3, float*), A(4, float*),
                     A(5, const u32*), A(6, u32), A(7, u32), A(8, u32), A(9, u64), A(10, u64));
     }},
    SCAN_ENTRY(1), SCAN_ENTRY(2), SCAN_ENTRY(3), SCAN_ENTRY(4),
    SCAN_ENTRY(5), SCAN_ENTRY(6), SCAN_ENTRY(7), SCAN_ENTRY(8),
    CHUNK_ENTRIES(1), CHUNK_ENTRIES(2), CHUNK_ENTRIES(3), CHUNK_ENTRIES(4),
    CHUNK_ENTRIES(5), CHUNK_ENTRIES(6), CHUNK_ENTRIES(7), CHUNK_ENTRIES(8),
    {"chunk_carry",
     [](void** p) {
         chunk_carry(A(0, const float*), A(1, float*), A(2, const u32*), A(3, const u32*), A(4, float*),
                     A(5, const float*), A(6, u32), A(7, u32), A(8, u32), A(9, u64), A(10, u64));
     }},
    GEMV_ENTRIES(f32, float), GEMV_ENTRIES(f16, __half), GEMV_ENTRIES(bf16, __nv_bfloat16),
    {"argmax_rows",
     [](void** p) { argmax_rows(A(0, const float*), A(1, u32*), A(2, u32), A(3, u32), A(4, u32)); }},
    {"sample_rows",
     [](void** p) {
         sample_rows(A(0, const float*), A(1, const float*), A(2, const double*), A(3, u32*), A(4, u32), A(5, u32),
                     A(6, u32));
     }},
};

// Run kernel `name` over grid x block threads. Returns 0, or -1 for an unknown kernel.
// One launch at a time (the block state and __shared__ statics are global), as a stream would.
extern "C" int emu_launch(const char* name, unsigned grid, unsigned block, void** params) {
    static std::mutex one_at_a_time;
    std::lock_guard<std::mutex> lock(one_at_a_time);
    Entry fn = nullptr;
    for (const auto& k : KERNELS)
        if (std::strcmp(k.name, name) == 0) fn = k.fn;
    if (!fn) return -1;
    // blockDim.x host threads walk the blocks in order; a barrier between
    // blocks keeps one block's __shared__ statics from the next's.
    EmuBlock blk(block);
    emu_block = &blk;
    std::barrier<> block_done((std::ptrdiff_t)block);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&, t] {
            threadIdx.x = t;
            blockDim.x = block;
            gridDim.x = grid;
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx.x = b;
                fn(params);
                block_done.arrive_and_wait();
            }
        });
    }
    for (auto& th : threads) th.join();
    emu_block = nullptr;
    return 0;
}
