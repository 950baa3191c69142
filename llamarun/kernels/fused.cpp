// Fused float32 ops for decoding (and prefill's attention) on the CPU: what the model does between its
// matrix products.
//
// At batch 1 each of these is a few microseconds of arithmetic, but in eager PyTorch it is a chain of 5-20
// small ops of 2-10 us each (dispatch, allocation, OpenMP fork/join): for SmolLM2's 30 layers about half
// of a decode step. One op call here costs ~1.5 us. Each op is checked against the reference code of
// llamarun/model.py in tests/test_kernels.py.
//
//   rms_norm(x [..., D], weight [D], eps) -> [..., D]          x * rsqrt(mean(x^2) + eps) * weight
//   silu_mul(x [..., 2F]) -> [..., F]                          silu(x[..., :F]) * x[..., F:]
//   rope(x [B, S, h, D], rope [S, D/2, 2]) -> [B, S, h, D]     model.apply_rope (prefill)
//   f32_linear(x [..., K], weight [N, K]) -> [..., N]          x @ weight^T (a few rows: the pool; more: MKL)
//   argmax(x [B, V]) -> int64 [B]                              greedy decoding's pick, as torch.argmax
//   attn_decode(qkv [B, 1, (H + 2K) D], k_cache, v_cache [Bc, K, T, D], rope [1, D/2, 2], pos, H, K)
//       -> [B, 1, H D]: rotary embedding of q and k at position `pos`, k and v written into the caches at
//       `pos`, then each query head attends to cache positions 0..pos of its key/value head (GQA).
//   attn_prefill(q [B, S, H, D], k_cache, v_cache [Bc, K, T, D], start) -> [B, S, H D]: prefill's causal
//       attention over the cache (query i sees positions 0..start+i), flash-attention style in the pool.
//   kv_store(k, v [B, S, K, D], k_cache, v_cache, start): prefill's cache write, converted as attn_decode's.
//
// All tensors float32, CPU, contiguous; except the attention ops' caches, which may also be float16 (half
// the memory and the bytes read per step; the arithmetic stays float32) or int8 with a float32 scale per
// cached row (k_scale, v_scale [Bc, K, T]: model.py's KVCache and quantize_rows).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace {

using llamarun_kernels::parallel_rows;

#if defined(__AVX2__) && defined(__FMA__)
#define FUSED_AVX2 1

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats: x = n ln2 + r with |r| <= ln2/2, exp(r) by Cephes' degree-6 polynomial (relative
// error ~2e-7, like expf), 2^n built in the exponent bits. Inputs are clamped to [-87.3, 88.3], where
// the result is a normal float (softmax and silu only ever need exp of values <= 0 or moderate ones).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// Cache elements: float32, or float16 (converted 8 at a time with F16C where the CPU has it). Weights:
// float32 or bfloat16 (a bfloat16 is a float32's upper half: widened with a shift).
inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }
#ifdef FUSED_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {  // an int8 cache's values, unscaled
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#ifdef __F16C__
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#else
inline __m256 load8(const c10::Half* p) {
  alignas(32) float f[8];
  for (int j = 0; j < 8; ++j) f[j] = static_cast<float>(p[j]);
  return _mm256_load_ps(f);
}
#endif
#endif

// a . b, with b float32 or float16 (a cached key).
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#ifdef FUSED_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

#if defined(FUSED_AVX2) && defined(__AVX512F__)
// 16 weights as float32: loaded, or bfloat16 widened (a bfloat16 is a float32's upper half).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// float32 . float32 or bfloat16 in 512-bit registers (f32_linear's rows, float32 caches): half the
// instructions of the 256-bit loop above, which matters where the weights come from cache (stories15M
// fits in L2/L3).
template <typename T>
inline float dot512(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), load16(b + i + 16), acc1);
  }
  if (i + 16 <= n) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
    i += 16;
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}
inline float dot(const float* a, const float* b, int64_t n) { return dot512(a, b, n); }
inline float dot(const float* a, const c10::BFloat16* b, int64_t n) { return dot512(a, b, n); }
#endif

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef FUSED_AVX2
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

// In place: p[i] = exp(p[i] - max); returns the sum.
float exp_shifted(float* p, int64_t n, float max) {
  int64_t i = 0;
  float sum = 0.0f;
#ifdef FUSED_AVX2
  const __m256 vm = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), vm));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum8(acc);
#endif
  for (; i < n; ++i) {
    p[i] = std::exp(p[i] - max);
    sum += p[i];
  }
  return sum;
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

// The maximum of r[0..n) (n >= 1), and in *nan whether any value is NaN (the maximum is then meaningless):
// 4 independent vector accumulators, so the loop is not one chain of dependent instructions.
float row_max(const float* r, int64_t n, bool* nan) {
  float m = r[0];
  bool any_nan = false;
  int64_t i = 0;
#ifdef FUSED_AVX2
  if (n >= 32) {
    __m256 vm[4], un = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) vm[j] = _mm256_loadu_ps(r + 8 * j);
    for (; i + 32 <= n; i += 32) {
      for (int j = 0; j < 4; ++j) {
        const __m256 v = _mm256_loadu_ps(r + i + 8 * j);
        vm[j] = _mm256_max_ps(vm[j], v);
        un = _mm256_or_ps(un, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
    }
    any_nan = _mm256_movemask_ps(un) != 0;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(vm[0], vm[1]), _mm256_max_ps(vm[2], vm[3])));
    for (int j = 0; j < 8; ++j) m = std::max(m, lanes[j]);
  }
#endif
  for (; i < n; ++i) {
    any_nan |= std::isnan(r[i]);
    m = std::max(m, r[i]);
  }
  *nan = any_nan;
  return m;
}

// Rows per parallel chunk: enough work (~16K elements) that handing it to a helper pays off.
int64_t grain_for(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

}  // namespace

namespace llamarun_kernels {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "weight must have ", D, " elements");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const float* X = x.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  parallel_rows(x.numel() / D, grain_for(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = X + r * D;
      float* yr = Y + r * D;
      const float scale = 1.0f / std::sqrt(dot(xr, xr, D) / static_cast<float>(D) + static_cast<float>(eps));
      int64_t i = 0;
#ifdef FUSED_AVX2
      const __m256 vs = _mm256_set1_ps(scale);
      for (; i + 8 <= D; i += 8)
        _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), vs), _mm256_loadu_ps(W + i)));
#endif
      for (; i < D; ++i) yr[i] = xr[i] * scale * W[i];
    }
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& x) {
  check_f32(x, "x");
  const int64_t F2 = x.size(-1), F = F2 / 2;
  TORCH_CHECK(F2 % 2 == 0, "the last dimension must be even");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = F;
  at::Tensor out = at::empty(shape, x.options());
  const float* X = x.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  parallel_rows(x.numel() / F2, grain_for(F2), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = X + r * F2;  // gate
      const float* u = g + F;       // up
      float* y = Y + r * F;
      int64_t i = 0;
#ifdef FUSED_AVX2
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; i + 8 <= F; i += 8) {
        const __m256 vg = _mm256_loadu_ps(g + i);
        const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), vg))));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(vg, sig), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < F; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// y [..., N] = x [..., K] @ w [N, K]^T, x float32, w float32 or bfloat16 (float32 out). Up to kF32PoolRows
// rows of x (decode): one pass over w, its rows split across the pool's threads, each weight row applied to
// every x row while it is in L1, bfloat16 widened to float32 on the way. At batch 1 an unquantized model is
// a stream of weights from memory; MKL's gemv reaches 12-14 GB/s on these shapes, this ~17 (and torch's
// bf16 F.linear 8-10). More rows (prefill, big batches) go to torch's GEMM, which reuses each weight tile
// across them: float32 (MKL), or bfloat16 for a bfloat16 weight (x rounded to bf16: oneDNN's AVX512-BF16
// or AMX GEMM). Without native bf16 (AVX2), where torch's bf16 GEMM is emulated and several times slower,
// a bfloat16 weight stays in the pool up to kWidenRows rows (decode batches), and beyond (prefill) it is
// widened to float32 a few MiB of rows at a time for MKL's float32 GEMM: widening costs a pass over the
// weight in float32, twice its bytes, which a step of a decode batch does not repay (SmolLM2 unquantized,
// on Zen 3: batch 16 96 tok/s widened, 144-163 in the pool, 110-159 with float32 weights; batch 8 160 in
// the pool, 86-90 float32).
constexpr int64_t kF32PoolRows = 4;
constexpr int64_t kWidenRows = 32;

#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
constexpr bool kNativeBf16 = true;
#else
constexpr bool kNativeBf16 = false;
#endif

bool bf16_gemm() { return kNativeBf16; }

// The most rows of x that f32_linear keeps in the pool for a weight of that dtype (bfloat16 or float32);
// more go to torch's GEMMs (fastpath.torch_gemm_rows reads it).
int64_t f32_pool_rows(bool bf16_weight) { return bf16_weight && !kNativeBf16 ? kWidenRows : kF32PoolRows; }

// x [M, K] @ w [N, K]^T for a bfloat16 w on a CPU without native bf16: w's rows widened in tiles (~4 MiB of
// float32), each tile's product written straight into its columns of y (BLAS takes y's row stride).
at::Tensor widened_linear(const at::Tensor& x, const at::Tensor& w, int64_t M, int64_t N, int64_t K) {
  const at::Tensor x2 = x.reshape({M, K});
  at::Tensor y = at::empty({M, N}, x.options());
  const int64_t tile = std::max<int64_t>(16, (int64_t{4} << 20) / (4 * std::max<int64_t>(1, K)));
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t n = std::min(tile, N - n0);
    at::Tensor out = y.narrow(1, n0, n);
    at::mm_out(out, x2, w.narrow(0, n0, n).to(at::kFloat).t());
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape);
}

#ifdef FUSED_AVX2
// Y[m0 + i][n + j] for MR rows of X and 3 rows of W, in registers: per 8 inputs 3 weight loads (bfloat16
// widened once, not once per x row) and MR x loads feed 3 MR FMAs, where dot() spends a weight load, an x
// load and a widening per FMA, plus a horizontal sum per output. (K a multiple of 8.)
template <int MR, typename W>
inline void tile_linear(const float* X, const W* w, float* Y, int64_t m0, int64_t n, int64_t N, int64_t K) {
  __m256 acc[MR][3];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 3; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* x = X + m0 * K;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 w0 = load8(w + k), w1 = load8(w + K + k), w2 = load8(w + 2 * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * K + k);
      acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
      acc[i][2] = _mm256_fmadd_ps(xv, w2, acc[i][2]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 3; ++j) Y[(m0 + i) * N + n + j] = hsum8(acc[i][j]);
}
#endif

// Y [M, N] = X [M, K] @ Wt [N, K]^T in the pool, weight rows split across threads. One row of X (decode):
// a dot product per weight row, which streams the weights. Several (a decode batch of an unquantized
// model): tiles of 4 x rows x 3 weight rows in registers, the 3 weight rows in L1 while every x row passes
// (SmolLM2 with bf16 weights on Zen 3, llamarun bench, alternating runs: batch 8 106-138 -> 129-179 tok/s,
// batch 16 109-132 -> 175-239; the layers' products alone 2-2.4x at 8-16 rows).
template <typename W>
void rows_linear(const float* X, const W* Wt, float* Y, int64_t M, int64_t N, int64_t K) {
  parallel_rows(N, grain_for(K), [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
#ifdef FUSED_AVX2
    if (M > 1 && K % 8 == 0) {
      for (; n + 3 <= n1; n += 3) {
        const W* w = Wt + n * K;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) tile_linear<4>(X, w, Y, m, n, N, K);
        switch (M - m) {
          case 3: tile_linear<3>(X, w, Y, m, n, N, K); break;
          case 2: tile_linear<2>(X, w, Y, m, n, N, K); break;
          case 1: tile_linear<1>(X, w, Y, m, n, N, K); break;
        }
      }
    }
#endif
    // The weight row kPrefetchAhead bytes ahead is prefetched, as in the quantized row kernels (qlinear.cpp).
    const int64_t row_bytes = K * static_cast<int64_t>(sizeof(W));
    const int64_t ahead = std::max<int64_t>(1, kPrefetchAhead / std::max<int64_t>(1, row_bytes));
    for (; n < n1; ++n) {
      if (n + ahead < N) prefetch_bytes(Wt + (n + ahead) * K, row_bytes);
      for (int64_t m = 0; m < M; ++m) Y[m * N + n] = dot(X + m * K, Wt + n * K, K);
    }
  });
}

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w) {
  check_f32(x, "x");
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && (bf16 || w.scalar_type() == at::kFloat),
              "weight must be a contiguous float32 or bfloat16 CPU tensor");
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "x [..., K] and weight [N, K] do not match");
  const int64_t N = w.size(0), K = w.size(1), M = K ? x.numel() / K : 0;
  if (M > f32_pool_rows(bf16)) {
    if (!bf16) return at::linear(x, w);
    return kNativeBf16 ? at::linear(x.to(at::kBFloat16), w).to(at::kFloat) : widened_linear(x, w, M, N, K);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  if (bf16)
    rows_linear(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), out.data_ptr<float>(), M, N, K);
  else
    rows_linear(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), M, N, K);
  return out;
}

#ifdef FUSED_AVX2
// The 8 scores q . k[j*D ..] of 8 consecutive cached keys (D a multiple of 8): one accumulator per key, so
// the FMAs are independent, then one transposing reduction instead of 8 horizontal sums.
template <typename T>
inline __m256 dot8(const float* q, const T* k, int64_t D) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, load8(k + j * D + d), a[j]);
  }
  // hadd works within 128-bit halves: s0123 = [sums of a0..a3 over lanes 0-3 | the same over lanes 4-7].
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif

// y[0..n) = x[0..n) converted to the cache's element type (round to nearest even, as torch converts).
inline void store_row(float* y, const float* x, int64_t n) { std::copy(x, x + n, y); }
inline void store_row(c10::Half* y, const float* x, int64_t n) {
  int64_t i = 0;
#if defined(FUSED_AVX2) && defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) y[i] = static_cast<c10::Half>(x[i]);
}

// An int8 cache's element type: its rows carry a float32 scale each, kept beside the cache.
template <typename T>
constexpr bool kScaled = std::is_same_v<T, int8_t>;

// y[0..n) = x rounded to int8 at scale max|x| / 127, to nearest even (as model.quantize_rows); returns the
// scale (0 for a row of zeros).
inline float store_row_q8(int8_t* y, const float* x, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / 127.0f, div = scale > 0.0f ? scale : std::numeric_limits<float>::min();
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<int8_t>(std::clamp(std::nearbyint(x[i] / div), -127.0f, 127.0f));
  return scale;
}

// o[0..D) = sum over t < len of p[t] * v[t*D .. t*D+D): the values weighted by the softmax numerators,
// accumulated in registers 64 floats at a time (an axpy per position would load and store o each time).
constexpr int64_t kChunk = 128;  // positions per attention task (also p's size)

template <typename T>
void weighted_sum(const float* p, const T* v, int64_t len, int64_t D, float* o) {
  int64_t d0 = 0;
#ifdef FUSED_AVX2
  for (; d0 + 64 <= D; d0 += 64) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      const __m256 w = _mm256_set1_ps(p[t]);
      const T* vt = v + t * D + d0;
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(w, load8(vt + 8 * j), acc[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(o + d0 + 8 * j, acc[j]);
  }
  for (; d0 + 8 <= D; d0 += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; ++t) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), load8(v + t * D + d0), acc);
    _mm256_storeu_ps(o + d0, acc);
  }
#endif
  for (; d0 < D; ++d0) {
    float acc = 0.0f;
    for (int64_t t = 0; t < len; ++t) acc += p[t] * to_float(v[t * D + d0]);
    o[d0] = acc;
  }
}

// Rotate adjacent pairs (x[2i], x[2i+1]) by the angle whose cos, sin are cs[2i], cs[2i+1] (Meta's layout).
template <typename T>
void rotate(const float* x, const float* cs, T* y, int64_t D) {
  for (int64_t i = 0; i < D; i += 2) {
    const float x0 = x[i], x1 = x[i + 1], c = cs[i], s = cs[i + 1];
    y[i] = static_cast<T>(x0 * c - x1 * s);
    y[i + 1] = static_cast<T>(x0 * s + x1 * c);
  }
}

// attn_decode for cache element type T (float, c10::Half, or int8_t with the rows' scales KS, VS; else
// those are null); the arguments are checked by attn_decode.
template <typename T>
void attn_decode_impl(const float* QKV, T* KC, T* VC, float* KS, float* VS, const float* CS, float* O, int64_t B,
                      int64_t H, int64_t K, int64_t T_len, int64_t D, int64_t pos) {
  const int64_t row = (H + 2 * K) * D, n = pos + 1;

  // The new token's keys (rotated) and values go into the caches first: every query head reads them.
  std::vector<float> rotated(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < K; ++g) {
      const float* kx = QKV + b * row + (H + g) * D;
      const int64_t at = (b * K + g) * T_len + pos;  // the cached row
      rotate(kx, CS, rotated.data(), D);
      if constexpr (kScaled<T>) {
        KS[at] = store_row_q8(KC + at * D, rotated.data(), D);
        VS[at] = store_row_q8(VC + at * D, kx + K * D, D);
      } else {
        store_row(KC + at * D, rotated.data(), D);
        store_row(VC + at * D, kx + K * D, D);
      }
    }

  // Attention, split like flash-decoding: a task is one (row, key/value head, chunk of kChunk positions),
  // for all the query heads sharing that key/value head (GQA), so each cached key and value is read from
  // memory once per step rather than once per query head; the chunks keep long contexts spread over the
  // threads. A task leaves, per query head, its softmax max m, sum l and unnormalised output o [D]; the
  // merge below rescales them by exp(m - max over chunks).
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t G = H / K, C = (n + kChunk - 1) / kChunk, part = D + 2;  // part: o [D], m, l
  std::unique_ptr<float[]> parts(new float[B * H * C * part]);  // every entry is written by one task: no zeroing
  parallel_rows(B * K * C, std::max<int64_t>(1, grain_for(2 * G * kChunk * D)), [&](int64_t i0, int64_t i1) {
    std::vector<float> q(D), p(kChunk);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i % C, g = (i / C) % K, b = i / (C * K);
      const int64_t t0 = c * kChunk, len = std::min(n, t0 + kChunk) - t0;
      const T* kc = KC + ((b * K + g) * T_len + t0) * D;
      const T* vc = VC + ((b * K + g) * T_len + t0) * D;
      // An int8 cache's scales: a key's multiplies its score, a value's its softmax weight.
      const float* ks = kScaled<T> ? KS + (b * K + g) * T_len + t0 : nullptr;
      const float* vs = kScaled<T> ? VS + (b * K + g) * T_len + t0 : nullptr;
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        rotate(QKV + b * row + h * D, CS, q.data(), D);
        for (int64_t j = 0; j < D; ++j) q[j] *= scale;
        int64_t t = 0;
#ifdef FUSED_AVX2
        // The first query head reads the chunk from memory (the others find it in cache): its keys
        // kPrefetchAhead bytes ahead and the values of the positions in hand are prefetched, so that
        // weighted_sum finds them too.
        const bool first = h == g * G;
        const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
        const int64_t ahead = std::max<int64_t>(8, kPrefetchAhead / row_bytes);
        if (D % 8 == 0)
          for (; t + 8 <= len; t += 8) {
            if (first) {
              if (t + ahead + 8 <= len) prefetch_bytes(kc + (t + ahead) * D, 8 * row_bytes);
              prefetch_bytes(vc + t * D, 8 * row_bytes);
            }
            _mm256_storeu_ps(p.data() + t, dot8(q.data(), kc + t * D, D));
          }
#endif
        for (; t < len; ++t) p[t] = dot(q.data(), kc + t * D, D);
        if constexpr (kScaled<T>)
          for (int64_t j = 0; j < len; ++j) p[j] *= ks[j];
        const float max = *std::max_element(p.begin(), p.begin() + len);
        float* r = parts.get() + ((b * H + h) * C + c) * part;
        r[D] = max;
        r[D + 1] = exp_shifted(p.data(), len, max);
        if constexpr (kScaled<T>)
          for (int64_t j = 0; j < len; ++j) p[j] *= vs[j];
        weighted_sum(p.data(), vc, len, D, r);
      }
    }
  });
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const float* r = parts.get() + bh * C * part;
    float max = -INFINITY, sum = 0.0f;
    for (int64_t c = 0; c < C; ++c) max = std::max(max, r[c * part + D]);
    float* o = O + bh * D;
    std::fill(o, o + D, 0.0f);
    for (int64_t c = 0; c < C; ++c) {
      const float w = std::exp(r[c * part + D] - max);
      sum += w * r[c * part + D + 1];
      axpy(w, r + c * part, o, D);
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < D; ++j) o[j] *= inv;
  }
}

// An int8 cache's scales: [Bc, K, T] float32 beside the cache's [Bc, K, T, D], rows of T contiguous (both
// present for an int8 cache, both absent otherwise). Returns whether the cache is int8.
bool check_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k_scale,
              const std::optional<at::Tensor>& v_scale) {
  const auto kv = k_cache.scalar_type();
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu() && v_cache.scalar_type() == kv &&
                  (kv == at::kFloat || kv == at::kHalf || kv == at::kChar),
              "k_cache and v_cache must be CPU tensors, both float32, float16 or int8");
  const bool int8 = kv == at::kChar;
  TORCH_CHECK(k_scale.has_value() == int8 && v_scale.has_value() == int8,
              "an int8 cache needs k_scale and v_scale, and only an int8 cache takes them");
  if (int8)
    for (const at::Tensor* s : {&*k_scale, &*v_scale}) {
      TORCH_CHECK(s->device().is_cpu() && s->scalar_type() == at::kFloat,
                  "k_scale and v_scale must be float32 on the CPU");
      TORCH_CHECK(s->dim() == 3 && s->sizes() == k_cache.sizes().slice(0, 3) && s->stride(2) == 1,
                  "k_scale and v_scale must be [B, K, T] like the caches, positions contiguous");
    }
  return int8;
}

// f(k, v) with the caches' data as their element type: int8_t, c10::Half or float (as check_kv allows).
template <typename F>
void with_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, F&& f) {
  switch (k_cache.scalar_type()) {
    case at::kChar: f(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>()); break;
    case at::kHalf: f(k_cache.data_ptr<c10::Half>(), v_cache.data_ptr<c10::Half>()); break;
    default: f(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  }
}

// An int8 cache's scales' data (else null).
inline float* scale_data(const std::optional<at::Tensor>& s) { return s ? s->data_ptr<float>() : nullptr; }

at::Tensor attn_decode(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& rope, int64_t pos, int64_t n_heads, int64_t n_kv_heads,
                       const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  check_f32(qkv, "qkv");
  check_f32(rope, "rope");
  const bool int8 = check_kv(k_cache, v_cache, k_scale, v_scale);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  (!int8 || (k_scale->is_contiguous() && v_scale->is_contiguous())),
              "attn_decode's caches (and scales) must be contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must be [B, K, T, D]");
  const int64_t B = qkv.size(0), H = n_heads, K = n_kv_heads, T = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(1) == 1 && qkv.size(2) == (H + 2 * K) * D,
              "qkv must be [B, 1, (n_heads + 2 n_kv_heads) head_dim]");
  TORCH_CHECK(k_cache.size(0) >= B && k_cache.size(1) == K && H % K == 0 && D % 2 == 0, "cache shape mismatch");
  TORCH_CHECK(pos >= 0 && pos < T, "position ", pos, " outside the cache (", T, ")");
  TORCH_CHECK(rope.numel() == D, "rope must hold head_dim/2 (cos, sin) pairs");
  at::Tensor out = at::empty({B, 1, H * D}, qkv.options());
  with_cache(k_cache, v_cache, [&](auto* kc, auto* vc) {
    attn_decode_impl(qkv.data_ptr<float>(), kc, vc, scale_data(k_scale), scale_data(v_scale), rope.data_ptr<float>(),
                     out.data_ptr<float>(), B, H, K, T, D, pos);
  });
  return out;
}

// attn_prefill: causal attention of S new queries over the cache, flash-attention style. A task is one
// (row b, key/value head g, block of kQB query positions), for all G query heads of the group: G * kQB query
// vectors share every key and value block read (GQA), converted to float32 once per block (keys transposed,
// so that 8 consecutive keys' scores are one FMA per dimension). Scores, the online softmax (running max m,
// sum l, output o rescaled when the max grows) and the weighted values are float32 throughout.
constexpr int64_t kQB = 32;  // query positions per task
#if defined(__AVX512F__)
constexpr int64_t kKB = 64;  // keys per block: 4 registers of scores per query row
#else
constexpr int64_t kKB = 32;  // keys per block: 4 registers of scores per query row
#endif

#ifdef FUSED_AVX2
// 8 elements of cached row t at p, as float32: an int8 cache's times the row's scale s[t].
template <typename T>
inline __m256 load8_row(const T* p, const float* s, int64_t t) {
  if constexpr (kScaled<T>) return _mm256_mul_ps(load8(p), _mm256_set1_ps(s[t]));
  return load8(p);
}

// The block's nk keys (rows of D at k; an int8 cache's scaled by ks) as float32 columns kt [D][kKB], zeros
// past nk; its values (scaled by vs) as float32 rows vb [nk][D]. 8 x 8 transposes: 8 keys' 8 dimensions
// loaded as rows, stored as columns.
template <typename T>
void load_block(const T* k, const T* v, const float* ks, const float* vs, int64_t nk, int64_t D, float* kt,
                float* vb) {
  for (int64_t t0 = 0; t0 < kKB; t0 += 8)
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      __m256i r[8], c[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_castps_si256(t0 + i < nk ? load8_row(k + (t0 + i) * D + d0, ks, t0 + i) : _mm256_setzero_ps());
      llamarun_kernels::transpose8_epi32(r, c);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kt + (d0 + i) * kKB + t0, _mm256_castsi256_ps(c[i]));
    }
  for (int64_t t = 0; t < nk; ++t)
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(vb + t * D + d, load8_row(v + t * D + d, vs, t));
}

// s0[t], s1[t] = q0 . kt[:, t], q1 . kt[:, t] for the block's kKB keys (kt: [D][kKB] floats).
inline void scores2(const float* q0, const float* q1, const float* kt, int64_t D, float* s0, float* s1) {
  __m256 a[4], b[4];
  for (int j = 0; j < 4; ++j) a[j] = b[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 x0 = _mm256_broadcast_ss(q0 + d), x1 = _mm256_broadcast_ss(q1 + d);
    for (int j = 0; j < 4; ++j) {
      const __m256 k = _mm256_loadu_ps(kt + d * kKB + 8 * j);
      a[j] = _mm256_fmadd_ps(x0, k, a[j]);
      b[j] = _mm256_fmadd_ps(x1, k, b[j]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(s0 + 8 * j, a[j]);
    _mm256_storeu_ps(s1 + 8 * j, b[j]);
  }
}

// o0[0..8W) = o0 * c0 + sum_t p0[t] v[t], the same for row 1 (v: rows of stride D floats): 2W accumulators.
template <int W>
inline void weigh2_cols(const float* p0, const float* p1, const float* v, int64_t n, int64_t D, float c0, float c1,
                        float* o0, float* o1) {
  __m256 a[W], b[W];
  for (int j = 0; j < W; ++j) {
    a[j] = _mm256_mul_ps(_mm256_loadu_ps(o0 + 8 * j), _mm256_set1_ps(c0));
    b[j] = _mm256_mul_ps(_mm256_loadu_ps(o1 + 8 * j), _mm256_set1_ps(c1));
  }
  for (int64_t t = 0; t < n; ++t) {
    const __m256 x0 = _mm256_broadcast_ss(p0 + t), x1 = _mm256_broadcast_ss(p1 + t);
    for (int j = 0; j < W; ++j) {
      const __m256 vv = _mm256_loadu_ps(v + t * D + 8 * j);
      a[j] = _mm256_fmadd_ps(x0, vv, a[j]);
      b[j] = _mm256_fmadd_ps(x1, vv, b[j]);
    }
  }
  for (int j = 0; j < W; ++j) {
    _mm256_storeu_ps(o0 + 8 * j, a[j]);
    _mm256_storeu_ps(o1 + 8 * j, b[j]);
  }
}

// o0 = o0 * c0 + sum_t p0[t] v[t], the same for row 1 (v: [n][D] floats), 32 dimensions at a time.
inline void weigh2(const float* p0, const float* p1, const float* v, int64_t n, int64_t D, float c0, float c1,
                   float* o0, float* o1) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) weigh2_cols<4>(p0, p1, v + d0, n, D, c0, c1, o0 + d0, o1 + d0);
  switch ((D - d0) / 8) {
    case 3: weigh2_cols<3>(p0, p1, v + d0, n, D, c0, c1, o0 + d0, o1 + d0); break;
    case 2: weigh2_cols<2>(p0, p1, v + d0, n, D, c0, c1, o0 + d0, o1 + d0); break;
    case 1: weigh2_cols<1>(p0, p1, v + d0, n, D, c0, c1, o0 + d0, o1 + d0); break;
    default: break;
  }
}
#else
template <typename T>
void load_block(const T* k, const T* v, const float* ks, const float* vs, int64_t nk, int64_t D, float* kt,
                float* vb) {
  for (int64_t t = 0; t < kKB; ++t)
    for (int64_t d = 0; d < D; ++d)
      kt[d * kKB + t] = t < nk ? to_float(k[t * D + d]) * (kScaled<T> ? ks[t] : 1.0f) : 0.0f;
  for (int64_t t = 0; t < nk; ++t)
    for (int64_t d = 0; d < D; ++d) vb[t * D + d] = to_float(v[t * D + d]) * (kScaled<T> ? vs[t] : 1.0f);
}

inline void scores2(const float* q0, const float* q1, const float* kt, int64_t D, float* s0, float* s1) {
  for (int64_t t = 0; t < kKB; ++t) {
    float a = 0.0f, b = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      a += q0[d] * kt[d * kKB + t];
      b += q1[d] * kt[d * kKB + t];
    }
    s0[t] = a;
    s1[t] = b;
  }
}

inline void weigh2(const float* p0, const float* p1, const float* v, int64_t n, int64_t D, float c0, float c1,
                   float* o0, float* o1) {
  for (int64_t d = 0; d < D; ++d) {
    float a = o0[d] * c0, b = o1[d] * c1;
    for (int64_t t = 0; t < n; ++t) {
      a += p0[t] * v[t * D + d];
      b += p1[t] * v[t * D + d];
    }
    o0[d] = a;
    o1[d] = b;
  }
}
#endif

// Query rows handled together: their scores share each key load, their weighted sums each value load.
#if defined(FUSED_AVX2) && defined(__AVX512F__)
constexpr int kRB = 4;

// s[i][t] = q[i] . kt[:, t] for the 4 rows and the block's kKB keys: 16 accumulators of 16 keys.
inline void scores_rows(const float* const q[kRB], const float* kt, int64_t D, float* s) {
  constexpr int KV = kKB / 16;
  __m512 a[kRB][KV];
  for (int i = 0; i < kRB; ++i)
    for (int j = 0; j < KV; ++j) a[i][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 k[KV];
    for (int j = 0; j < KV; ++j) k[j] = _mm512_loadu_ps(kt + d * kKB + 16 * j);
    for (int i = 0; i < kRB; ++i) {
      const __m512 x = _mm512_set1_ps(q[i][d]);
      for (int j = 0; j < KV; ++j) a[i][j] = _mm512_fmadd_ps(x, k[j], a[i][j]);
    }
  }
  for (int i = 0; i < kRB; ++i)
    for (int j = 0; j < KV; ++j) _mm512_storeu_ps(s + i * kKB + 16 * j, a[i][j]);
}

// o[i][0..16W) = o[i] * c[i] + sum_t p[i][t] v[t] (v: rows of stride D): 4W accumulators.
template <int W>
inline void weigh_cols(const float* p, const float* v, int64_t n, int64_t D, const float c[kRB], float* const o[kRB],
                       int64_t d0) {
  __m512 a[kRB][W];
  for (int i = 0; i < kRB; ++i)
    for (int j = 0; j < W; ++j) a[i][j] = _mm512_mul_ps(_mm512_loadu_ps(o[i] + d0 + 16 * j), _mm512_set1_ps(c[i]));
  for (int64_t t = 0; t < n; ++t) {
    __m512 vv[W];
    for (int j = 0; j < W; ++j) vv[j] = _mm512_loadu_ps(v + t * D + d0 + 16 * j);
    for (int i = 0; i < kRB; ++i) {
      const __m512 x = _mm512_set1_ps(p[i * kKB + t]);
      for (int j = 0; j < W; ++j) a[i][j] = _mm512_fmadd_ps(x, vv[j], a[i][j]);
    }
  }
  for (int i = 0; i < kRB; ++i)
    for (int j = 0; j < W; ++j) _mm512_storeu_ps(o[i] + d0 + 16 * j, a[i][j]);
}

// o[i] = o[i] * c[i] + sum_t p[i][t] v[t] for the 4 rows (v: [n][D] floats), 64 dimensions at a time.
inline void weigh_rows(const float* p, const float* v, int64_t n, int64_t D, const float c[kRB], float* const o[kRB]) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weigh_cols<4>(p, v, n, D, c, o, d0);
  switch ((D - d0) / 16) {
    case 3: weigh_cols<3>(p, v, n, D, c, o, d0); break;
    case 2: weigh_cols<2>(p, v, n, D, c, o, d0); break;
    case 1: weigh_cols<1>(p, v, n, D, c, o, d0); break;
    default: break;
  }
  d0 += (D - d0) / 16 * 16;
  if (d0 < D)  // 8 dimensions left (D % 8 == 0): the 2-row version, twice
    for (int i = 0; i < kRB; i += 2)
      weigh2_cols<1>(p + i * kKB, p + (i + 1) * kKB, v + d0, n, D, c[i], c[i + 1], o[i] + d0, o[i + 1] + d0);
}
#else
constexpr int kRB = 2;

inline void scores_rows(const float* const q[kRB], const float* kt, int64_t D, float* s) {
  static_assert(kKB == 32, "scores2 covers 32 keys");
  scores2(q[0], q[1], kt, D, s, s + kKB);
}

inline void weigh_rows(const float* p, const float* v, int64_t n, int64_t D, const float c[kRB], float* const o[kRB]) {
  weigh2(p, p + kKB, v, n, D, c[0], c[1], o[0], o[1]);
}
#endif

// One query's online-softmax step over a block: s[0..n) its scores (n >= 1: the keys it may see), m and l its
// running max and sum; s becomes the weights exp(s - new max), p[n..kKB) zeros. Returns the factor that
// rescales the output so far.
inline float softmax_step(float* s, int64_t n, float& m, float& l) {
  float mx = m;
  int64_t t = 0;
#ifdef FUSED_AVX2
  if (n == kKB) {
    __m256 a = _mm256_loadu_ps(s);
    for (int64_t j = 8; j < kKB; j += 8) a = _mm256_max_ps(a, _mm256_loadu_ps(s + j));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    mx = std::max(mx, _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))));
    t = n;
  }
#endif
  for (; t < n; ++t) mx = std::max(mx, s[t]);
  const float c = std::exp(m - mx);  // m = -inf on the first block: 0
  std::fill(s + n, s + kKB, 0.0f);
  l = l * c + exp_shifted(s, n, mx);
  m = mx;
  return c;
}

// T: float, c10::Half, or int8_t with the rows' scales KS, VS (strides s_sb, s_sh; else null).
template <typename T>
void attn_prefill_impl(const float* Q, const T* KC, const T* VC, const float* KS, const float* VS, float* O,
                       int64_t B, int64_t S, int64_t H, int64_t K, int64_t D, int64_t start, int64_t kv_sb,
                       int64_t kv_sh, int64_t s_sb, int64_t s_sh) {
  const int64_t G = H / K, nq = (S + kQB - 1) / kQB, R = G * kQB;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // The last query blocks see the most keys: hand them out first.
  parallel_rows(B * K * nq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> kt(D * kKB), vb(kKB * D), q(R * D), o(R * D), m(R), l(R), s(kRB * kKB), spare(kRB * D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t qb = nq - 1 - i % nq, g = (i / nq) % K, b = i / (nq * K);
      const int64_t q0 = qb * kQB, rows = std::min(kQB, S - q0), n_rows = G * rows;
      // Query r = (position q0 + r / G, head g * G + r % G), scaled: consecutive r share a position.
      for (int64_t r = 0; r < n_rows; ++r) {
        const float* src = Q + ((b * S + q0 + r / G) * H + g * G + r % G) * D;
        for (int64_t d = 0; d < D; ++d) q[r * D + d] = src[d] * scale;
      }
      std::fill(o.begin(), o.begin() + n_rows * D, 0.0f);
      std::fill(m.begin(), m.begin() + n_rows, -INFINITY);
      std::fill(l.begin(), l.begin() + n_rows, 0.0f);
      const int64_t end = start + q0 + rows;  // keys 0..end-1: what the block's last query sees
      const T* kc = KC + b * kv_sb + g * kv_sh;
      const T* vc = VC + b * kv_sb + g * kv_sh;
      const float* ks = kScaled<T> ? KS + b * s_sb + g * s_sh : nullptr;
      const float* vs = kScaled<T> ? VS + b * s_sb + g * s_sh : nullptr;
      for (int64_t t0 = 0; t0 < end; t0 += kKB) {
        const int64_t nk = std::min(kKB, end - t0);
        load_block(kc + t0 * D, vc + t0 * D, kScaled<T> ? ks + t0 : nullptr, kScaled<T> ? vs + t0 : nullptr, nk, D,
                   kt.data(), vb.data());
        for (int64_t r = 0; r < n_rows; r += kRB) {
          // Rows r..r+kRB-1 (past the last: the last again, its results going to spare); query r sees keys up
          // to start + q0 + r / G: n[i] of this block's (0 or less: none). Positions grow with r.
          int64_t n[kRB];
          const float* qp[kRB];
          float* op[kRB];
          float c[kRB];
          for (int j = 0; j < kRB; ++j) {
            const int64_t rj = std::min<int64_t>(r + j, n_rows - 1);
            n[j] = r + j < n_rows ? std::min(nk, start + q0 + rj / G + 1 - t0) : 0;
            qp[j] = q.data() + rj * D;
            op[j] = r + j < n_rows ? o.data() + rj * D : spare.data() + j * D;
          }
          const int64_t most = *std::max_element(n, n + kRB);
          if (most <= 0) continue;
          scores_rows(qp, kt.data(), D, s.data());
          for (int j = 0; j < kRB; ++j) {
            float* sj = s.data() + j * kKB;
            if (n[j] > 0) {
              c[j] = softmax_step(sj, n[j], m[r + j], l[r + j]);
            } else {
              std::fill(sj, sj + kKB, 0.0f);
              c[j] = 1.0f;
            }
          }
          weigh_rows(s.data(), vb.data(), most, D, c, op);
        }
      }
      for (int64_t r = 0; r < n_rows; ++r) {
        float* dst = O + ((b * S + q0 + r / G) * H + g * G + r % G) * D;
        const float inv = 1.0f / l[r];
        for (int64_t d = 0; d < D; ++d) dst[d] = o[r * D + d] * inv;
      }
    }
  });
}

// kv_store(k, v [B, S, K, D] float32 (rows contiguous, any other strides), k_cache, v_cache [Bc, K, T, D]
// contiguous, start, k_scale, v_scale): the S new positions' keys and values into the caches at start..,
// converted as attn_decode writes its one (float16: rounded to nearest even; int8: store_row_q8 and the
// row's scale). Prefill's cache write, one op where torch takes a conversion and a strided copy per tensor
// (and an int8 cache eight small ops more).
void kv_store(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
              int64_t start, const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const bool int8 = check_kv(k_cache, v_cache, k_scale, v_scale);
  TORCH_CHECK(k.device().is_cpu() && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  v.device().is_cpu() && k.dim() == 4 && k.sizes() == v.sizes() && k.stride(3) == 1 && v.stride(3) == 1,
              "k and v must be float32 CPU tensors [B, S, K, D] alike, rows contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.sizes() == v_cache.sizes() &&
                  (!int8 || (k_scale->is_contiguous() && v_scale->is_contiguous())),
              "kv_store's caches (and scales) must be contiguous, [B, K, T, D] alike");
  const int64_t B = k.size(0), S = k.size(1), K = k.size(2), D = k.size(3), T = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) >= B && k_cache.size(1) == K && k_cache.size(3) == D && start >= 0 && start + S <= T,
              "cache shape mismatch: positions ", start, "..", start + S - 1, " in a cache of ", T);
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *ks = scale_data(k_scale), *vs = scale_data(v_scale);
  // Row r = ((b * S) + s) * K + g: its key and value, and the cache row they go to.
  with_cache(k_cache, v_cache, [&](auto* kc, auto* vc) {
    parallel_rows(B * S * K, grain_for(2 * D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t g = r % K, s = (r / K) % S, b = r / (K * S);
        const float* kx = kp + b * k.stride(0) + s * k.stride(1) + g * k.stride(2);
        const float* vx = vp + b * v.stride(0) + s * v.stride(1) + g * v.stride(2);
        const int64_t at = (b * K + g) * T + start + s;
        if constexpr (kScaled<std::remove_pointer_t<decltype(kc)>>) {
          ks[at] = store_row_q8(kc + at * D, kx, D);
          vs[at] = store_row_q8(vc + at * D, vx, D);
        } else {
          store_row(kc + at * D, kx, D);
          store_row(vc + at * D, vx, D);
        }
      }
    });
  });
}

// attn_prefill(q [B, S, H, D] float32 contiguous (rotated), k_cache, v_cache [Bc, K, T, D] (float32, float16,
// or int8 with k_scale, v_scale [Bc, K, T]; any batch/head strides, rows contiguous) holding positions
// 0..start+S-1, start) -> [B, S, H D]: query i of head h attends to positions 0..start+i of key/value head
// h / (H / K).
at::Tensor attn_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start,
                        const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  check_f32(q, "q");
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.strides() == v_cache.strides(), "q must be [B, S, H, D], the caches [B, K, T, D] alike");
  const bool int8 = check_kv(k_cache, v_cache, k_scale, v_scale);
  TORCH_CHECK(!int8 || k_scale->strides() == v_scale->strides(), "k_scale and v_scale must have the same strides");
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3), K = k_cache.size(1);
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == D && k_cache.size(3) == D,
              "the caches' rows must be contiguous, of head_dim ", D);
  TORCH_CHECK(k_cache.size(0) >= B && K > 0 && H % K == 0 && start >= 0 && start + S <= k_cache.size(2),
              "cache shape mismatch: positions ", start, "..", start + S - 1, " in a cache of ", k_cache.size(2));
  TORCH_CHECK(D % 8 == 0, "head_dim must be a multiple of 8, got ", D);
  at::Tensor out = at::empty({B, S, H * D}, q.options());
  with_cache(k_cache, v_cache, [&](const auto* kc, const auto* vc) {
    attn_prefill_impl(q.data_ptr<float>(), kc, vc, scale_data(k_scale), scale_data(v_scale), out.data_ptr<float>(),
                      B, S, H, K, D, start, k_cache.stride(0), k_cache.stride(1), int8 ? k_scale->stride(0) : 0,
                      int8 ? k_scale->stride(1) : 0);
  });
  return out;
}

// rope(x [B, S, h, D], rope [S, D/2, 2]) -> [B, S, h, D] (contiguous): model.apply_rope in float32, each
// adjacent pair (x0, x1) of a head turned by its position's (cos, sin) into (x0 c - x1 s, x0 s + x1 c).
// x may be a view (q or k of the fused qkv product): any strides but the last. For prefill, where the
// Python version's ten ops over [S, h, D/2] tensors cost ~45 ms of SmolLM2's 512-token prefill.
at::Tensor rope(const at::Tensor& x, const at::Tensor& rope) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 && x.stride(3) == 1,
              "x must be a float32 CPU tensor [B, S, heads, head_dim] with a contiguous last dimension");
  check_f32(rope, "rope");
  const int64_t B = x.size(0), S = x.size(1), h = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0 && rope.dim() == 3 && rope.size(0) == S && rope.size(1) == D / 2 && rope.size(2) == 2,
              "rope must be [S, head_dim/2, 2]");
  at::Tensor out = at::empty({B, S, h, D}, x.options());
  const float* X = x.data_ptr<float>();
  const float* R = rope.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  const int64_t sb = x.stride(0), ss = x.stride(1), sh = x.stride(2);
  parallel_rows(B * S, grain_for(h * D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* cs = R + (r % S) * D;  // (cos, sin) pairs of this position
      for (int64_t j = 0; j < h; ++j) {
        const float* xi = X + (r / S) * sb + (r % S) * ss + j * sh;
        float* yo = Y + (r * h + j) * D;
        int64_t i = 0;
#ifdef FUSED_AVX2
        for (; i + 8 <= D; i += 8) {
          const __m256 v = _mm256_loadu_ps(xi + i), t = _mm256_loadu_ps(cs + i);
          const __m256 swapped = _mm256_permute_ps(v, 0xB1);  // (x1, x0) in each pair
          // even lanes x0 c - x1 s, odd lanes x1 c + x0 s
          _mm256_storeu_ps(yo + i, _mm256_fmaddsub_ps(v, _mm256_moveldup_ps(t),
                                                      _mm256_mul_ps(swapped, _mm256_movehdup_ps(t))));
        }
#endif
        for (; i < D; i += 2) {
          const float x0 = xi[i], x1 = xi[i + 1];
          yo[i] = x0 * cs[i] - x1 * cs[i + 1];
          yo[i + 1] = x0 * cs[i + 1] + x1 * cs[i];
        }
      }
    }
  });
  return out;
}

// torch.argmax(x, -1) for float32 rows: the first index of the maximum, or of the first NaN (torch treats
// NaN as the maximum). torch's CPU argmax is scalar: ~70-100 us for a 32-49K vocabulary, ~4% of a small
// model's decode step. Here: a vectorized max (row_max), then a vectorized scan for its first position:
// ~3 us for 32K.
at::Tensor argmax(const at::Tensor& x) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "argmax takes [B, V] with V > 0");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* O = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const float* r = x.data_ptr<float>() + b * V;
    bool nan;
    const float m = row_max(r, V, &nan);
    int64_t at = 0;
    if (nan) {
      while (!std::isnan(r[at])) ++at;
    } else {
#ifdef FUSED_AVX2
      const __m256 target = _mm256_set1_ps(m);
      for (; at + 8 <= V; at += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(r + at), target, _CMP_EQ_OQ));
        if (hit) {
          at += __builtin_ctz(static_cast<unsigned>(hit));
          break;
        }
      }
#endif
      while (r[at] != m) ++at;  // the tail (or the whole row without AVX2); m is in the row, so this stops
    }
    O[b] = at;
  }
  return out;
}

// One token per row drawn from softmax(x[b] / temperature) after llamarun.sampling.filtered_probs' filters
// (top-k, min-p, then top-p by Meta's rule: a token is kept while the mass of the more likely tokens before
// it is at most top_p), by inverse CDF with u[b] in [0, 1): ids [B] int64, -1 for a row with a NaN or an
// infinite (or all -inf) maximum. No sort of the vocabulary and no second full-size probability array:
//   1. e = exp((x - max) / t) (e of the most likely token is 1; underflow is exactly 0, as softmax gives),
//      Z = sum(e);
//   2. the tokens that can survive are gathered: e >= min_p (min-p's floor: min_p x the largest probability),
//      and with top_p < 1 only p >= (1 - top_p) / (2 V): a token below (1 - top_p) / V has more than top_p
//      of the mass above it (the V tokens at or below it hold less than 1 - top_p), so the nucleus never
//      reaches it; on a model's peaked rows this leaves tens to thousands of tokens out of 49K; with top-k,
//      only the float binades of e down to the one holding the k-th largest;
//   3. top-k: the k-th largest e by selection (nth_element), ties with it kept (as torch.topk's cut);
//   4. top-p: a weighted quickselect finds where the sorted cumulative mass crosses top_p (expected linear
//      time: partition around a pivot, keep the side holding the crossing);
//   5. the draw walks the kept tokens, in whatever order the selection left them, to u x their mass.
// Masses add up in double where torch's cumsum is float32: at most a token whose preceding mass is within
// float rounding of top_p can land on the other side. At batch 16 on SmolLM2's 49K vocabulary (one thread,
// Zen 3) the torch path took 33 ms a step with top_p = 1 (multinomial over the vocabulary) and ~100 ms with
// top_p = 0.95 at temperature 1 (a sort of every row); torch.topk over 256 candidates for
// peaked rows (the previous kernel path) 3.3 ms; this kernel 0.8-3.4 ms.
namespace {

struct Cand {
  float e;
  int32_t i;
};

// The draw: walk e(0..n), skipping tokens without a share, to the first whose running mass exceeds target
// (u x the total); past the end through rounding, the last token with a share. id(j): the token at j.
template <typename E, typename Id>
int64_t draw(int64_t n, double target, E&& e, Id&& id) {
  double acc = 0.0;
  int64_t pick = -1;
  for (int64_t j = 0; j < n; ++j) {
    if (e(j) <= 0.0f) continue;
    pick = id(j);
    acc += e(j);
    if (acc > target) break;
  }
  return pick;
}

// Rows' buffers, reused between calls (grow, never shrink).
struct SampleScratch {
  std::vector<float> e;
  std::vector<Cand> c;
};

// The end of the kept prefix of c[0, n) in descending order of e: the first position whose preceding mass
// exceeds P (Meta's cumsum - p > top_p), found without sorting. c is reordered: c[0, end) is the kept set.
int64_t nucleus_end(Cand* c, int64_t n, double P) {
  double A = 0.0;  // the mass of c[0, lo): all kept, so A <= P at the top of the loop
  int64_t lo = 0, hi = n;
  uint64_t rng = 0x9E3779B97F4A7C15ull ^ static_cast<uint64_t>(n);
  auto next = [&rng](int64_t range) {  // xorshift64: pivots, deterministic from call to call
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return static_cast<int64_t>(rng % static_cast<uint64_t>(range));
  };
  while (hi > lo) {
    if (hi - lo <= 32) {  // a few left: in order, one by one
      std::sort(c + lo, c + hi, [](const Cand& a, const Cand& b) { return a.e > b.e; });
      for (int64_t j = lo; j < hi; ++j) {
        if (A > P) return j;
        A += c[j].e;
      }
      return hi;
    }
    float a = c[lo + next(hi - lo)].e, b = c[lo + next(hi - lo)].e, d = c[lo + next(hi - lo)].e;
    const float v = std::max(std::min(a, b), std::min(std::max(a, b), d));  // median of three
    Cand* gt_end = std::partition(c + lo, c + hi, [v](const Cand& x) { return x.e > v; });
    Cand* eq_end = std::partition(gt_end, c + hi, [v](const Cand& x) { return x.e == v; });
    double G = 0.0;
    for (Cand* x = c + lo; x < gt_end; ++x) G += x->e;
    const int64_t gt = gt_end - c, eq = eq_end - c;
    if (A + G > P) {  // the crossing is among the larger ones (or right after them): drop the rest
      hi = gt;
      continue;
    }
    A += G;  // every larger one kept; then the ties with v, one by one while A <= P
    for (int64_t j = gt; j < eq; ++j) {
      if (A > P) return j;
      A += v;
    }
    if (A > P) return eq;
    lo = eq;
  }
  return lo;
}

}  // namespace

at::Tensor sample_filtered(const at::Tensor& x, const at::Tensor& u, double temperature, int64_t top_k, double top_p,
                           double min_p) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.size(1) < (int64_t{1} << 31), "sample_filtered takes [B, V]");
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.dim() == 1 && u.size(0) == x.size(0) && u.is_contiguous(),
              "sample_filtered: u must be float64 [B]");
  TORCH_CHECK(temperature > 0 && top_p > 0 && top_p <= 1 && min_p >= 0 && min_p <= 1 && top_k >= 0,
              "sample_filtered: temperature > 0, 0 < top_p <= 1, 0 <= min_p <= 1, top_k >= 0");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* O = out.data_ptr<int64_t>();
  const double* U = u.data_ptr<double>();
  // As filtered_probs: the divisor at least float32's smallest normal number (x - max is then -inf, not NaN).
  const float t = std::max(static_cast<float>(temperature), std::numeric_limits<float>::min());
  thread_local SampleScratch tls;
  SampleScratch& sc = tls;
  if (static_cast<int64_t>(sc.e.size()) < V) sc.e.resize(V);
  if (static_cast<int64_t>(sc.c.size()) < V) sc.c.resize(V);
  float* e = sc.e.data();
  for (int64_t b = 0; b < B; ++b) {
    const float* r = x.data_ptr<float>() + b * V;
    bool nan;
    const float m = row_max(r, V, &nan);
    if (nan || !std::isfinite(m)) {
      O[b] = -1;
      continue;
    }
    // 1. e and Z (float partial sums of 256 terms, added in double).
    double Z = 0.0;
    int64_t i = 0;
#ifdef FUSED_AVX2
    const __m256 vt = _mm256_set1_ps(t), vm = _mm256_set1_ps(m), lowest = _mm256_set1_ps(-87.3f);
    while (i + 8 <= V) {
      __m256 acc = _mm256_setzero_ps();
      for (const int64_t end = std::min(V - V % 8, i + 256); i < end; i += 8) {
        const __m256 z = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(r + i), vm), vt);
        // exp8 clamps its input: below -87.3 the true value is a denormal or 0; 0 it is.
        const __m256 ev = _mm256_andnot_ps(_mm256_cmp_ps(z, lowest, _CMP_LT_OQ), exp8(z));
        _mm256_storeu_ps(e + i, ev);
        acc = _mm256_add_ps(acc, ev);
      }
      Z += hsum8(acc);
    }
#endif
    for (; i < V; ++i) {
      const float z = (r[i] - m) / t;
      e[i] = z < -87.3f ? 0.0f : std::exp(z);
      Z += e[i];
    }
    if (top_p >= 1.0 && min_p <= 0.0 && (top_k <= 0 || top_k >= V)) {  // no filter: the draw over e itself
      O[b] = draw(V, U[b] * Z, [e](int64_t j) { return e[j]; }, [](int64_t j) { return j; });
      continue;
    }
    // 2. The tokens that can survive every filter.
    float floor = static_cast<float>(min_p);  // min-p: e < min_p x e_max (= 1) is cut
    if (top_p < 1.0) floor = std::max(floor, static_cast<float>((1.0 - top_p) * Z / (2.0 * V)));
    if (top_k > 0 && top_k < V) {
      // top-k's floor by binade: count the tokens per float exponent of e (e in [0, 1]: bits 23-30); the
      // k-th largest is in the highest binade where the count from the top reaches k (nth_element over all
      // 49K tokens took ~0.6 ms a row).
      int64_t count[256] = {0};
      for (int64_t j = 0; j < V; ++j) {
        uint32_t bits;
        std::memcpy(&bits, e + j, 4);
        ++count[bits >> 23];
      }
      uint32_t bin = 255;
      for (int64_t seen = 0; bin > 0; --bin)
        if ((seen += count[bin]) >= top_k) break;
      const uint32_t low = bin << 23;  // the smallest float of that binade (0 for the lowest one)
      float binade;
      std::memcpy(&binade, &low, 4);
      floor = std::max(floor, binade);
    }
    Cand* c = sc.c.data();
    int64_t n = 0;
    i = 0;
#ifdef FUSED_AVX2
    const __m256 vf = _mm256_set1_ps(floor);
    for (; i + 8 <= V; i += 8) {
      int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(e + i), vf, _CMP_GE_OQ));
      for (; hit; hit &= hit - 1) {
        const int64_t j = i + __builtin_ctz(static_cast<unsigned>(hit));
        c[n++] = {e[j], static_cast<int32_t>(j)};
      }
    }
#endif
    for (; i < V; ++i)
      if (e[i] >= floor) c[n++] = {e[i], static_cast<int32_t>(i)};
    // (n >= 1: the most likely token has e = 1 >= floor, as min_p <= 1 and (1 - top_p) Z / 2V < 1.)
    // 3. top-k: the k-th largest overall is among c when c holds at least k tokens; otherwise every token
    //    in c is within the k largest.
    if (top_k > 0 && top_k < n) {
      std::nth_element(c, c + top_k - 1, c + n, [](const Cand& a, const Cand& b) { return a.e > b.e; });
      const float kth = c[top_k - 1].e;
      n = std::partition(c, c + n, [kth](const Cand& a) { return a.e >= kth; }) - c;
    }
    // 4. top-p.
    if (top_p < 1.0) n = nucleus_end(c, n, top_p * Z);
    // 5. The draw.
    double T = 0.0;
    for (int64_t j = 0; j < n; ++j) T += c[j].e;
    O[b] = draw(n, U[b] * T, [c](int64_t j) { return c[j].e; }, [c](int64_t j) { return int64_t{c[j].i}; });
  }
  return out;
}

}  // namespace llamarun_kernels

#ifndef LLAMARUN_OPS_NS
#define LLAMARUN_OPS_NS llamarun
#endif

TORCH_LIBRARY_FRAGMENT(LLAMARUN_OPS_NS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("rope(Tensor x, Tensor rope) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("bf16_gemm() -> bool", &llamarun_kernels::bf16_gemm);
  m.def("f32_pool_rows(bool bf16_weight) -> int", &llamarun_kernels::f32_pool_rows);
  m.def("argmax(Tensor x) -> Tensor");
  m.def("sample_filtered(Tensor x, Tensor u, float temperature, int top_k, float top_p, float min_p) -> Tensor");
  m.def("kv_store(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, Tensor(c!)? k_scale=None, "
        "Tensor(d!)? v_scale=None) -> ()");
  m.def("attn_prefill(Tensor q, Tensor k_cache, Tensor v_cache, int start, Tensor? k_scale=None, "
        "Tensor? v_scale=None) -> Tensor");
  m.def("attn_decode(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rope, int pos, int n_heads, "
        "int n_kv_heads, Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(LLAMARUN_OPS_NS, CPU, m) {
  m.impl("rms_norm", &llamarun_kernels::rms_norm);
  m.impl("silu_mul", &llamarun_kernels::silu_mul);
  m.impl("rope", &llamarun_kernels::rope);
  m.impl("f32_linear", &llamarun_kernels::f32_linear);
  m.impl("argmax", &llamarun_kernels::argmax);
  m.impl("sample_filtered", &llamarun_kernels::sample_filtered);
  m.impl("attn_decode", &llamarun_kernels::attn_decode);
  m.impl("attn_prefill", &llamarun_kernels::attn_prefill);
  m.impl("kv_store", &llamarun_kernels::kv_store);
}
