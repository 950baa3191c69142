// What the library's source files share: the thread pool (defined in qlinear.cpp), an 8 x 8 transpose, and
// the ops that layers.cpp chains into a whole decode step (defined in qlinear.cpp and fused.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace llamarun_kernels {

#if defined(__AVX2__)
// 8 x 8 dwords (or floats, cast): out[j] = dword j of r[0..7], lanes in row order.
inline void transpose8_epi32(const __m256i r[8], __m256i out[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    u[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);          // dwords 0, 4 of rows h..h+3
    u[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);      // 1, 5
    u[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);  // 2, 6
    u[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);  // 3, 7
  }
  for (int j = 0; j < 4; ++j) {
    out[j] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x20);
    out[j + 4] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x31);
  }
}
#endif

// How far ahead of the row in hand the kernels prefetch what they stream (weights, a KV cache's chunk): a
// thread's share of a product is 16-32 KB of rows, short streams the hardware prefetcher picks up late
// (measurements: qlinear.cpp's row kernels, q8_direct_op, fused.cpp's rows_linear and attn_decode).
constexpr int64_t kPrefetchAhead = 4096;

// [p, p + bytes) into L1, a cache line at a time (nothing without AVX2's headers).
inline void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__AVX2__)
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
#endif
}

// Run body(begin, end) over [0, n) in chunks of at least `grain` items, on the calling thread and the
// pool's helpers (at most llamarun.set_num_threads / torch.set_num_threads threads in all).
void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

// The ops, callable from C++ without the dispatcher (their contracts: the comments where they are defined).
// batch_rows > 0: products with at least that many activation rows use bf16 tiles (AMX) where the CPU has
// them, else int8 activations where it has AVX-512 VNNI or AVX2 (see q4_linear).
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_size,
                     int64_t batch_rows = 0);
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                     int64_t group_size, int64_t batch_rows = 0);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& x);
at::Tensor rope(const at::Tensor& x, const at::Tensor& rope);
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight);
at::Tensor attn_decode(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& rope, int64_t pos, int64_t n_heads, int64_t n_kv_heads,
                       const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale);

}  // namespace llamarun_kernels
