// Weight-only quantized linear layers for CPU: y = x @ W^T with W stored as int8 or int4.
//
// Built on first use by llamarun/kernels/__init__.py and loaded with torch.ops.load_library; the ops
// live in the ``llamarun`` namespace (torch.ops.llamarun.*).
//
// Weight formats (row n of W is output feature n; K = in_features; all tensors contiguous):
//   int8: qweight int8 [N, K], scales float16 [N, K/G]          w = q * scale
//   int4: qweight uint8 [N, K/2], scales, mins float16 [N, K/G]  w = q * scale + min, q in 0..15
//         each 32-element block uses 16 bytes, GGUF's nibble order: byte j holds element j (low
//         nibble) and element j+16 (high nibble), so GGUF Q4_0/Q4_1 blocks copy over unchanged.
//   G (group size) is a multiple of 32 that divides K; K is a multiple of 32. Scales and mins may be
//   passed as float16 or as int16 tensors holding the float16 bits.
//
// Method: each 32-block of an activation row is quantized to int16 with one float scale (llama.cpp
// quantizes activations to int8 instead; int16 costs the same instructions here - the weights are
// widened to 16 bits and multiplied with madd_epi16 - and its rounding error is 256x smaller, which on
// SmolLM2 is the difference between 93% and 98% top-1 agreement with float32). Every (weight block,
// activation block) pair is then an integer dot product scaled once by scale_w * scale_x, and int4's min
// term is min * sum(x) with the exact float sums. Weights are read once per call, row after row
// (sequential streams), and each weight row is applied to up to 4 activation rows while it is in
// registers / L1. Output rows are split across threads by a small pool with dynamic chunking (see Pool),
// at most at::get_num_threads() of them (torch.set_num_threads applies).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <unistd.h>
#include <chrono>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLAMARUN_AVX2 1
// AVX-512 with VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later): the block dot products in 512-bit
// registers, one vpdpwssd (int16 pairs multiplied and summed into int32) where AVX2 needs two madd and an
// add for the same 32 elements. The integer sums are the same; only the float accumulation order differs.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LLAMARUN_AVX512 1
#endif
#endif

namespace {

constexpr int64_t QK = 32;  // activation block: elements sharing one int8 scale
constexpr int64_t MB = 4;   // activation rows processed per pass over a weight row
constexpr float QMAX = 32767.0f;  // activations are quantized to int16 per 32-block

inline float h2f(uint16_t h) {
#ifdef LLAMARUN_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// ---- threads ----------------------------------------------------------------------------------------
// A small pool with dynamic chunking, instead of at::parallel_for's OpenMP region: the calling thread
// works through the chunks itself and helpers join in if and when they get a core. Nobody waits for a
// helper that has not started, so when other processes hold the cores (a shared machine) a call costs
// what one thread costs, instead of the OpenMP barrier's multi-millisecond stalls (measured: 10% of
// calls took ~8 ms with 2 OpenMP threads on a loaded 2-core machine). After a call, a helper spins for
// the next one for a short while (100 us by default), then sleeps on a condition variable. Waking a
// sleeping helper is cheap for the caller (~2 us) but slow for the helper: on a VM an idle vCPU takes tens
// of microseconds to run again, longer than a batch-1 layer's whole product, so without the spin the
// caller ends up doing most of the work alone. Measured on an idle 2-core VM (SmolLM2 int4 decode, batch
// 1): 0 us -> ~50 tok/s, 100 us -> ~70 tok/s. On a machine whose cores are all busy the spin costs
// instead (0.1 / 2 ms spins made decode 35% / 90% slower there): LLAMARUN_SPIN_US=0 turns it off.
int spin_default() {
  const char* v = std::getenv("LLAMARUN_SPIN_US");
  return v ? std::max(0, std::atoi(v)) : 100;
}
std::atomic<int> spin_micros{spin_default()};

class Pool {
 public:
  explicit Pool(int helpers) : pid_(getpid()) {
    for (int i = 0; i < helpers; ++i) std::thread([this] { helper(); }).detach();
    helpers_ = helpers;
  }
  int helpers() const { return helpers_; }
  pid_t pid() const { return pid_; }

  // Run fn(chunk) for chunk in [0, chunks), on this thread and any helper that is free.
  void run(int64_t chunks, const std::function<void(int64_t)>& fn) {
    if (chunks <= 0) return;
    fn_.store(&fn, std::memory_order_relaxed);
    total_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(gen << 32, std::memory_order_seq_cst);  // publishes fn_/total_ (seq_cst store after them)
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }
      cv_.notify_all();
    }
    const int64_t mine = work(gen);
    // Wait for chunks that helpers claimed (each is short); unclaimed ones do not exist any more.
    for (int spin = 0; done_.load(std::memory_order_acquire) + mine < chunks; ++spin) {
      if (spin < 4096) pause(); else std::this_thread::yield();  // a preempted helper needs a core
    }
  }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#endif
  }

  // Claim and run chunks of generation `gen`; returns how many this thread ran.
  int64_t work(uint64_t gen) {
    int64_t ran = 0;
    uint64_t s = state_.load(std::memory_order_acquire);
    while ((s >> 32) == gen && static_cast<int64_t>(s & 0xffffffffu) < total_.load(std::memory_order_relaxed)) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        (*fn_.load(std::memory_order_relaxed))(static_cast<int64_t>(s & 0xffffffffu));
        ++ran;
        s = state_.load(std::memory_order_acquire);
      }
    }
    return ran;
  }

  void helper() {
    uint64_t seen = state_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      uint64_t gen = state_.load(std::memory_order_acquire) >> 32;
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_micros.load(std::memory_order_relaxed));
      for (int spin = 1; gen == seen; ++spin) {
        pause();
        gen = state_.load(std::memory_order_acquire) >> 32;
        if ((spin & 255) == 0 && std::chrono::steady_clock::now() > until) break;
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait(lk, [&] { return (state_.load(std::memory_order_seq_cst) >> 32) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        gen = state_.load(std::memory_order_acquire) >> 32;
      }
      seen = gen;
      const int64_t ran = work(gen);
      if (ran) done_.fetch_add(ran, std::memory_order_acq_rel);
    }
  }

  // Three cache lines: the job (claimed chunk by chunk), the helpers' finished count (which the caller
  // spins on) and the sleepers. Sharing one line, every claim took the line from under the spinning
  // caller (stories15M fp32 decode step on 2 threads, 4 interleaved pairs: median 2.72 -> 2.48 ms).
  alignas(64) std::atomic<uint64_t> state_{0};  // generation << 32 | next chunk to claim
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> total_{0};
  alignas(64) std::atomic<int64_t> done_{0};  // chunks finished by helpers
  alignas(64) std::atomic<int> sleepers_{0};
  int helpers_ = 0;
  pid_t pid_;
  std::mutex mu_;
  std::condition_variable cv_;
};

thread_local bool in_pool_job = false;
std::mutex& run_mu() {  // one job at a time (two Python threads calling kernels share the pool)
  static std::mutex m;
  return m;
}
std::mutex pool_mu;
Pool* pool_ptr = nullptr;  // never freed: its detached threads live as long as the process

std::atomic<int> max_threads{0};  // 0: follow at::get_num_threads() (torch.set_num_threads)

}  // namespace

namespace llamarun_kernels {
// Parallel over [0, n) in chunks of at least `grain`, with at most at::get_num_threads() threads. Calls
// from inside a job (or with one thread) run inline. The pool is re-created after a fork.
void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  const int cap = max_threads.load(std::memory_order_relaxed);
  const int threads = cap > 0 ? cap : at::get_num_threads();
  if (threads <= 1 || n <= grain || in_pool_job) {
    body(0, n);
    return;
  }
  Pool* pool;
  {
    std::lock_guard<std::mutex> lk(pool_mu);
    if (pool_ptr == nullptr || pool_ptr->helpers() != threads - 1 || pool_ptr->pid() != getpid())
      pool_ptr = new Pool(threads - 1);  // an old pool (other size, or the parent's after fork) is abandoned
    pool = pool_ptr;
  }
  // Several chunks per thread, so a late helper still finds work and a descheduled one holds back little.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(n / grain, 4 * threads));
  const int64_t per = (n + chunks - 1) / chunks;
  std::lock_guard<std::mutex> call_lock(run_mu());
  pool->run((n + per - 1) / per, [&](int64_t c) {
    const bool was = in_pool_job;
    in_pool_job = true;
    body(c * per, std::min(n, (c + 1) * per));
    in_pool_job = was;
  });
}
}  // namespace llamarun_kernels

namespace {
using llamarun_kernels::parallel_rows;

// ---- activation quantization ---------------------------------------------------------------------
// One row of K floats -> K int16 (per 32-block: d = amax / 32767, q = round(x / d)), d per block, and
// the exact float sum of each block (the int4 format's min term needs sum(x)).
void quantize_row(const float* x, int64_t K, int16_t* q, float* d, float* s) {
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
#ifdef LLAMARUN_AVX2
    __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 am = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(am, 1), _mm256_castps256_ps128(am));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    __m256 sv = _mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3));
    __m128 s4 = _mm_add_ps(_mm256_extractf128_ps(sv, 1), _mm256_castps256_ps128(sv));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    const float id = amax > 0.0f ? QMAX / amax : 0.0f;
    const __m256 mul = _mm256_set1_ps(id);
    constexpr int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), R));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), R));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), R));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), R));
    // packs works within 128-bit lanes: [i0 lo, i1 lo, i0 hi, i1 hi] -> restore element order.
    i0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
    i2 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), i0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK + 16), i2);
    d[b] = amax / QMAX;
    s[b] = _mm_cvtss_f32(s4);
#else
    float amax = 0.0f, sum = 0.0f;
    for (int j = 0; j < QK; ++j) {
      amax = std::max(amax, std::fabs(xb[j]));
      sum += xb[j];
    }
    const float id = amax > 0.0f ? QMAX / amax : 0.0f;
    for (int j = 0; j < QK; ++j) q[b * QK + j] = static_cast<int16_t>(std::nearbyint(xb[j] * id));
    d[b] = amax / QMAX;
    s[b] = sum;
#endif
  }
}

struct QuantizedActivations {
  int64_t nbp = 0;        // blocks per row, rounded up to a multiple of 8 (the padding is zeros)
  std::vector<int16_t> q;  // [M, K]
  std::vector<float> d;   // [M, nbp]
  std::vector<float> s;   // [M, nbp]
  // AVX-512: q again, each pair of blocks (A, B) = (2i, 2i+1) reordered as A0..15 B0..15 A16..31 B16..31,
  // the order in which 32 bytes of int4 weights (two blocks) widen to low and high nibbles; an odd last
  // block stays as it is. The int4 kernel then multiplies two blocks with one widening and two vpdpwssd.
  std::vector<int16_t> qp;  // [M, K]
};

#ifdef LLAMARUN_AVX512
void pair_blocks(const int16_t* q, int64_t K, int16_t* out) {
  const int64_t nb = K / QK;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const int16_t* A = q + b * QK;
    int16_t* o = out + b * QK;
    std::memcpy(o, A, 16 * sizeof(int16_t));
    std::memcpy(o + 16, A + QK, 16 * sizeof(int16_t));
    std::memcpy(o + 32, A + 16, 16 * sizeof(int16_t));
    std::memcpy(o + 48, A + QK + 16, 16 * sizeof(int16_t));
  }
  if (b < nb) std::memcpy(out + b * QK, q + b * QK, QK * sizeof(int16_t));
}
#endif

void quantize_activations(const float* x, int64_t M, int64_t K, QuantizedActivations& a) {
  const int64_t nb = K / QK;
  a.nbp = (nb + 7) / 8 * 8;
  // Buffers are reused from call to call (thread_local in the ops): grow, never shrink or clear.
  if (static_cast<int64_t>(a.q.size()) < M * K) a.q.resize(M * K);
#ifdef LLAMARUN_AVX512
  if (static_cast<int64_t>(a.qp.size()) < M * K) a.qp.resize(M * K);
#endif
  if (static_cast<int64_t>(a.d.size()) < M * a.nbp) {
    a.d.resize(M * a.nbp);
    a.s.resize(M * a.nbp);
  }
  auto body = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* d = a.d.data() + m * a.nbp;
      float* s = a.s.data() + m * a.nbp;
      quantize_row(x + m * K, K, a.q.data() + m * K, d, s);
#ifdef LLAMARUN_AVX512
      pair_blocks(a.q.data() + m * K, K, a.qp.data() + m * K);
#endif
      for (int64_t b = nb; b < a.nbp; ++b) d[b] = s[b] = 0.0f;  // the padding the kernels read
    }
  };
  // Quantizing a row costs ~K/8 ns: only big batches (prefill) are worth a parallel region.
  parallel_rows(M, std::max<int64_t>(1, (1 << 14) / K), body);
}

#ifdef LLAMARUN_AVX2
inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
inline __m256 vadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
#ifdef LLAMARUN_AVX512
inline float hsum(__m512 v) {
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
inline __m512 vadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
#endif
#endif

// ---- the dot-product kernels ------------------------------------------------------------------------
// A weight row is processed 8 blocks (256 inputs) at a time: the 8 blocks' float16 scales (and mins)
// are converted with one instruction and multiplied by the 8 activation-block scales of each activation
// row at once; then each block is one integer dot product per activation row, scaled by its combined
// scale. The int4 min term, sum over blocks of min_b * sum(x in block b), is a vector FMA per 8 blocks.
// U: independent accumulators per activation row (2 when R is small, so the FMA latency chain does not
// bound a single row's dot product).

#ifdef LLAMARUN_AVX2
// The per-block values of a row's per-group float16 values h (blocks b0 .. b0+n-1, n <= 8; lanes past n
// are zero). bpg: blocks per group; end: the end of the whole scales tensor (a partial group of 8 may
// read the next row's values, then zeroed, but never past the tensor).
inline __m256 group_values8(const uint16_t* h, int64_t b0, int n, int64_t bpg, const uint16_t* end) {
  if (bpg == 1 && h + b0 + 8 <= end) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + b0)));
    if (n == 8) return v;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane)));
  }
  alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (bpg == 1) {
    std::memcpy(tmp, h + b0, n * sizeof(uint16_t));
  } else {
    int64_t g = b0 / bpg, rem = b0 % bpg;
    for (int j = 0; j < n; ++j) {
      tmp[j] = h[g];
      if (++rem == bpg) rem = 0, ++g;
    }
  }
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}
#endif

// The row kernels (decode steps and small batches) prefetch the weight row kPrefetchAhead bytes ahead of the
// one in hand, with its scales (and mins). A pool chunk is 16-32 KB of rows plus their scale rows: short
// streams, on which the hardware prefetcher ramps up late, and SmolLM2's layers are 0.2-1.1 MB. At one row
// on Zen 5, weights streamed from memory: wqkv, wo, w13, w2 0.76-0.92x the time (1, 2, 4, 8 and 16 KB ahead
// tried; 4-8 KB best), the output layer 0.87x; the int8-activation kernels 0.74-0.83x.
// The AVX2 build's int4 kernel does not (kInt4RowPrefetch): on Zen 3 its products took 1.04-1.23x the
// time with the prefetch at 1-4 rows (SmolLM2's and llama-2-7b's shapes; into L2 instead: no better), and
// SmolLM2's decode ran 5-15% faster at batch 1 and 4 without it, a llama-3.2-1b-shaped file's 2-5%. Its
// int8 kernel keeps it: SmolLM2's int8 output layer took 0.81-0.96x the time with it, and an int8 model
// decoded faster.
using llamarun_kernels::kPrefetchAhead;
using llamarun_kernels::prefetch_bytes;
#ifdef LLAMARUN_AVX512
constexpr bool kInt4RowPrefetch = true;
#else
constexpr bool kInt4RowPrefetch = false;
#endif

// y[m0 + r, n] for weight rows n in [n0, n1) and activation rows m0 .. m0+R-1.
template <int R>
void q8_rows(const int8_t* W, const uint16_t* S, int64_t K, int64_t G, const QuantizedActivations& a, int64_t m0,
             int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t nb = K / QK, ng = K / G, bpg = G / QK, nbp = a.nbp;
  const uint16_t* S_end = S + N * ng;
  const int16_t* xq[R];
  const float* xd[R];
  for (int r = 0; r < R; ++r) {
    xq[r] = a.q.data() + (m0 + r) * K;
    xd[r] = a.d.data() + (m0 + r) * nbp;
  }
  const int64_t ahead = std::max<int64_t>(1, kPrefetchAhead / K);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    const uint16_t* sc = S + n * ng;
    if (n + ahead < N) {
      prefetch_bytes(w + ahead * K, K);
      prefetch_bytes(sc + ahead * ng, 2 * ng);
    }
#ifdef LLAMARUN_AVX2
    constexpr int U = R <= 2 ? 2 : 1;
#ifdef LLAMARUN_AVX512
    __m512 acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
    alignas(32) float cs[R][8];
    auto block = [&](int64_t b, int j, int u) __attribute__((always_inline)) {
      const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * QK)));
      for (int r = 0; r < R; ++r) {
        const __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(xq[r] + b * QK));
        acc[r][u] = _mm512_fmadd_ps(_mm512_set1_ps(cs[r][j]), _mm512_cvtepi32_ps(p), acc[r][u]);
      }
    };
#else
    __m256 acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
    alignas(32) float cs[R][8];
    auto block = [&](int64_t b, int j, int u) __attribute__((always_inline)) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * QK)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * QK + 16)));
      for (int r = 0; r < R; ++r) {
        const __m256i* xv = reinterpret_cast<const __m256i*>(xq[r] + b * QK);
        const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                           _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1)));
        acc[r][u] = _mm256_fmadd_ps(_mm256_broadcast_ss(&cs[r][j]), _mm256_cvtepi32_ps(p), acc[r][u]);
      }
    };
#endif
    const __m256 row_scale = _mm256_set1_ps(h2f(sc[0]));  // per-channel (one group): the same for every block
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
      const int cnt = static_cast<int>(std::min<int64_t>(8, nb - b0));
      const __m256 wsv = ng == 1 ? row_scale : group_values8(sc, b0, cnt, bpg, S_end);
      for (int r = 0; r < R; ++r) _mm256_store_ps(cs[r], _mm256_mul_ps(wsv, _mm256_loadu_ps(xd[r] + b0)));
      int j = 0;
      for (; j + U <= cnt; j += U)
        for (int u = 0; u < U; ++u) block(b0 + j + u, j + u, u);
      for (; j < cnt; ++j) block(b0 + j, j, 0);
    }
    for (int r = 0; r < R; ++r) {
      auto t = acc[r][0];
      for (int u = 1; u < U; ++u) t = vadd(t, acc[r][u]);
      y[(m0 + r) * N + n] = hsum(t);
    }
#else
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t isum = 0;
        for (int j = 0; j < QK; ++j) isum += int32_t(w[b * QK + j]) * int32_t(xq[r][b * QK + j]);
        acc += h2f(sc[b / bpg]) * xd[r][b] * float(isum);
      }
      y[(m0 + r) * N + n] = acc;
    }
#endif
  }
}

template <int R>
void q4_rows(const uint8_t* W, const uint16_t* S, const uint16_t* Z, int64_t K, int64_t G,
             const QuantizedActivations& a, int64_t m0, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t nb = K / QK, ng = K / G, bpg = G / QK, nbp = a.nbp;
  const uint16_t *S_end = S + N * ng, *Z_end = Z + N * ng;
  const int16_t* xq[R];
  const float* xd[R];
  const float* xs[R];
  for (int r = 0; r < R; ++r) {
    xq[r] = a.q.data() + (m0 + r) * K;
    xd[r] = a.d.data() + (m0 + r) * nbp;
    xs[r] = a.s.data() + (m0 + r) * nbp;
  }
#ifdef LLAMARUN_AVX512
  const int16_t* xqp[R];
  for (int r = 0; r < R; ++r) xqp[r] = a.qp.data() + (m0 + r) * K;
  const __m512i low4z = _mm512_set1_epi16(0x0F);
  __m512i pidx[4];  // lanes (2k x 8, 2k + 1 x 8): a pair's two block scales
  for (int k = 0; k < 4; ++k)
    pidx[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(2 * k)), _mm256_set1_epi32(2 * k + 1), 1);
#endif
  const int64_t ahead = std::max<int64_t>(1, kPrefetchAhead / (K / 2));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * (K / 2);
    const uint16_t* sc = S + n * ng;
    const uint16_t* mn = Z + n * ng;
    if (kInt4RowPrefetch && n + ahead < N) {
      prefetch_bytes(w + ahead * (K / 2), K / 2);
      prefetch_bytes(sc + ahead * ng, 2 * ng);
      prefetch_bytes(mn + ahead * ng, 2 * ng);
    }
#ifdef LLAMARUN_AVX2
    constexpr int U = R <= 2 ? 2 : 1;
    const __m256i low4 = _mm256_set1_epi16(0x0F);
    alignas(32) float cs[R][8];
    __m256 macc[R];
#ifdef LLAMARUN_AVX512
    __m512 acc[R][U], csz[R];
    for (int r = 0; r < R; ++r) {
      macc[r] = _mm256_setzero_ps();
      for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
    }
    // Blocks b, b+1 (b even): 32 bytes widen to 32 words; the low nibbles are A0..15 B0..15, the high
    // ones A16..31 B16..31, as in a.qp. Lanes 0-7 of the sums are block A's, 8-15 block B's, scaled by
    // (cs[j] x 8, cs[j + 1] x 8).
    auto pair = [&](int64_t b, int j, int u) __attribute__((always_inline)) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * (QK / 2))));
      const __m512i lo = _mm512_and_si512(v, low4z), hi = _mm512_srli_epi16(v, 4);
      for (int r = 0; r < R; ++r) {
        const int16_t* xp = xqp[r] + b * QK;
        const __m512i p = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp)),
                                              hi, _mm512_loadu_si512(xp + 32));
        acc[r][u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pidx[j / 2], csz[r]), _mm512_cvtepi32_ps(p), acc[r][u]);
      }
    };
    auto block = [&](int64_t b, int j, int u) __attribute__((always_inline)) {
      // Each byte widened to 16 bits holds (element j+16) << 4 | element j: elements 0..15, then 16..31.
      const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * (QK / 2))));
      const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low4)), _mm256_srli_epi16(v, 4), 1);
      for (int r = 0; r < R; ++r) {
        const __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(xq[r] + b * QK));
        acc[r][u] = _mm512_fmadd_ps(_mm512_set1_ps(cs[r][j]), _mm512_cvtepi32_ps(p), acc[r][u]);
      }
    };
#else
    __m256 acc[R][U];
    for (int r = 0; r < R; ++r) {
      macc[r] = _mm256_setzero_ps();
      for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
    }
    auto block = [&](int64_t b, int j, int u) __attribute__((always_inline)) {
      // Each byte widened to 16 bits holds (element j+16) << 4 | element j.
      const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * (QK / 2))));
      const __m256i w0 = _mm256_and_si256(v, low4);  // elements 0..15
      const __m256i w1 = _mm256_srli_epi16(v, 4);    // elements 16..31
      for (int r = 0; r < R; ++r) {
        const __m256i* xv = reinterpret_cast<const __m256i*>(xq[r] + b * QK);
        const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                           _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1)));
        acc[r][u] = _mm256_fmadd_ps(_mm256_broadcast_ss(&cs[r][j]), _mm256_cvtepi32_ps(p), acc[r][u]);
      }
    };
#endif
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
      const int cnt = static_cast<int>(std::min<int64_t>(8, nb - b0));
      const __m256 wsv = group_values8(sc, b0, cnt, bpg, S_end);
      const __m256 wmv = group_values8(mn, b0, cnt, bpg, Z_end);
      for (int r = 0; r < R; ++r) {
        const __m256 csv = _mm256_mul_ps(wsv, _mm256_loadu_ps(xd[r] + b0));
        _mm256_store_ps(cs[r], csv);
#ifdef LLAMARUN_AVX512
        csz[r] = _mm512_castps256_ps512(csv);
#endif
        macc[r] = _mm256_fmadd_ps(wmv, _mm256_loadu_ps(xs[r] + b0), macc[r]);
      }
      int j = 0;
#ifdef LLAMARUN_AVX512
      for (; j + 2 * U <= cnt; j += 2 * U)
        for (int u = 0; u < U; ++u) pair(b0 + j + 2 * u, j + 2 * u, u);
      for (; j + 2 <= cnt; j += 2) pair(b0 + j, j, 0);
#else
      for (; j + U <= cnt; j += U)
        for (int u = 0; u < U; ++u) block(b0 + j + u, j + u, u);
#endif
      for (; j < cnt; ++j) block(b0 + j, j, 0);
    }
    for (int r = 0; r < R; ++r) {
      auto t = acc[r][0];
      for (int u = 1; u < U; ++u) t = vadd(t, acc[r][u]);
      y[(m0 + r) * N + n] = hsum(t) + hsum(macc[r]);
    }
#else
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t isum = 0;
        for (int j = 0; j < QK / 2; ++j) {
          const uint8_t v = w[b * (QK / 2) + j];
          isum += int32_t(v & 0x0F) * xq[r][b * QK + j] + int32_t(v >> 4) * xq[r][b * QK + j + QK / 2];
        }
        acc += h2f(sc[b / bpg]) * xd[r][b] * float(isum) + h2f(mn[b / bpg]) * xs[r][b];
      }
      y[(m0 + r) * N + n] = acc;
    }
#endif
  }
}

#ifdef LLAMARUN_AVX512
// ---- int8 activations for batches (AVX-512 VNNI) -----------------------------------------------------
// Batches of int4 products where the CPU has no AMX tiles: x rounded to int8 per 32-block (llama.cpp's
// Q8 activations) instead of int16, so that vpdpbusd multiplies 64 unsigned 4-bit weights by 64 int8
// inputs per instruction, where vpdpwssd multiplies 32 int16 pairs: half the instructions per weight, and
// one float conversion and FMA per 4 blocks instead of per 2. Rounding: each input to 1/254 of its
// block's largest magnitude (int16: 1/65534); relative error on a product ~5e-3 (bf16 tiles: ~2e-3).
// Layout of a row's int8 activations, per group of 4 blocks A-D (128 bytes, the last group zero-padded):
// A0..15 B0..15 C0..15 D0..15 | A16..31 B16..31 C16..31 D16..31, the order in which 64 bytes of int4
// weights (4 blocks) split into low and high nibbles. Lanes 4i..4i+3 of the sums then hold block i's.
struct Int8Activations {
  int64_t nbp = 0;         // blocks per row, rounded up to a multiple of 8 (the padding is zeros)
  std::vector<int8_t> q;   // [M, nbp * 32], in the layout above
  std::vector<float> d;    // [M, nbp] scales
  std::vector<float> s;    // [M, nbp] sums of the blocks' rounded inputs, scale * sum(q) (int4 min, int8 -128 term)
};

// Activation rows m0 .. m0+R-1 of a: their int8 inputs, block scales and block sums.
template <int R>
struct Int8Rows {
  const int8_t* q[R];
  const float* d[R];
  const float* s[R];
  Int8Rows(const Int8Activations& a, int64_t m0) {
    for (int r = 0; r < R; ++r) {
      q[r] = a.q.data() + (m0 + r) * a.nbp * QK;
      d[r] = a.d.data() + (m0 + r) * a.nbp;
      s[r] = a.s.data() + (m0 + r) * a.nbp;
    }
  }
};

// One 32-block of x rounded to int8: lo = elements 0..15, hi = 16..31 as bytes; d its scale (amax / 127) and
// s = d * the sum of the rounded inputs. The row kernels and the GEMM both round through here, so that their
// results agree (the tests compare them).
inline void quantize_block_i8(const float* x, __m128i& lo, __m128i& hi, float& d, float& s) {
  const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
  // NaN anywhere in the block makes d NaN (max would drop it), so that it reaches the products as it does in
  // float arithmetic.
  const float amax = _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q)
                         ? NAN
                         : _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const __m512 mul = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  // cvtps_epi32 rounds to nearest even (MXCSR default), as the int16 quantizer's round does.
  const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, mul)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, mul));
  lo = _mm512_cvtsepi32_epi8(i0);
  hi = _mm512_cvtsepi32_epi8(i1);
  d = amax / 127.0f;
  // The sum of the rounded inputs, not the exact one: the min term then pairs with the same x as the q term,
  // and w = q * scale + min sees the rounding of x as a whole (centred) weight does. With the exact sum,
  // min * sum(rounding errors) stays in: relative error 1.3e-2 instead of 5e-3 on a product.
  s = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)));
}

// nibble_order: the layout above (int4 weights); else each block's 32 inputs in order (int8 weights).
void quantize_activations_i8(const float* x, int64_t M, int64_t K, Int8Activations& a, bool nibble_order) {
  const int64_t nb = K / QK, hi_at = nibble_order ? 64 : 16;  // elements 16..31, relative to 0..15
  a.nbp = (nb + 7) / 8 * 8;
  if (static_cast<int64_t>(a.q.size()) < M * a.nbp * QK) a.q.resize(M * a.nbp * QK);
  if (static_cast<int64_t>(a.d.size()) < M * a.nbp) {
    a.d.resize(M * a.nbp);
    a.s.resize(M * a.nbp);
  }
  auto body = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int8_t* q = a.q.data() + m * a.nbp * QK;
      float* d = a.d.data() + m * a.nbp;
      float* s = a.s.data() + m * a.nbp;
      for (int64_t b = 0; b < a.nbp; ++b) {
        int8_t* lo = nibble_order ? q + (b / 4) * 128 + (b % 4) * 16 : q + b * QK;  // where elements 0..15 go
        if (b >= nb) {
          std::memset(lo, 0, 16);
          std::memset(lo + hi_at, 0, 16);
          d[b] = s[b] = 0.0f;
          continue;
        }
        __m128i q0, q1;
        quantize_block_i8(x + m * K + b * QK, q0, q1, d[b], s[b]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), q0);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + hi_at), q1);
      }
    }
  };
  parallel_rows(M, std::max<int64_t>(1, (1 << 14) / K), body);
}

// As q4_rows, with int8 activations: per 8 blocks, the 8 combined scales of each activation row go in one
// register; each 4 blocks are one 64-byte load, two vpdpbusd per activation row, one conversion, one
// permute (each block's scale to its 4 lanes) and one FMA.
template <int R>
void q4_rows_i8(const uint8_t* W, const uint16_t* S, const uint16_t* Z, int64_t K, int64_t G, const Int8Activations& a,
                int64_t m0, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t nb = K / QK, ng = K / G, bpg = G / QK;
  const uint16_t *S_end = S + N * ng, *Z_end = Z + N * ng;
  const Int8Rows<R> x(a, m0);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i idx0 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(4));
  const int64_t ahead = std::max<int64_t>(1, kPrefetchAhead / (K / 2));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * (K / 2);
    const uint16_t* sc = S + n * ng;
    const uint16_t* mn = Z + n * ng;
    if (n + ahead < N) {
      prefetch_bytes(w + ahead * (K / 2), K / 2);
      prefetch_bytes(sc + ahead * ng, 2 * ng);
      prefetch_bytes(mn + ahead * ng, 2 * ng);
    }
    __m512 acc[R], csz[R];
    __m256 macc[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_setzero_ps();
      macc[r] = _mm256_setzero_ps();
    }
    auto quad = [&](int64_t b, __mmask64 mask, const __m512i& idx) __attribute__((always_inline)) {
      // A full group loads unmasked: over rows streamed from memory, masked loads took Zen 5 2-3x as long.
      const uint8_t* p4 = w + b * (QK / 2);
      const __m512i v = mask == ~0ULL ? _mm512_loadu_si512(p4) : _mm512_maskz_loadu_epi8(mask, p4);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      for (int r = 0; r < R; ++r) {
        const int8_t* xp = x.q[r] + b * QK;  // b is a multiple of 4: its group's 128 bytes
        const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp)),
                                              hi, _mm512_loadu_si512(xp + 64));
        acc[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, csz[r]), _mm512_cvtepi32_ps(p), acc[r]);
      }
    };
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
      const int cnt = static_cast<int>(std::min<int64_t>(8, nb - b0));
      const __m256 wsv = group_values8(sc, b0, cnt, bpg, S_end);
      const __m256 wmv = group_values8(mn, b0, cnt, bpg, Z_end);
      for (int r = 0; r < R; ++r) {
        csz[r] = _mm512_castps256_ps512(_mm256_mul_ps(wsv, _mm256_loadu_ps(x.d[r] + b0)));
        macc[r] = _mm256_fmadd_ps(wmv, _mm256_loadu_ps(x.s[r] + b0), macc[r]);
      }
      // Blocks past the row's end are never loaded (masked); their inputs and scales are zeros.
      quad(b0, cnt >= 4 ? ~0ULL : (1ULL << (cnt * 16)) - 1, idx0);
      if (cnt > 4) quad(b0 + 4, cnt == 8 ? ~0ULL : (1ULL << ((cnt - 4) * 16)) - 1, idx1);
    }
    for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = hsum(acc[r]) + hsum(macc[r]);
  }
}

// As q8_rows, with int8 activations. vpdpbusd multiplies unsigned by signed bytes: the weights go in as
// w + 128 (their sign bit flipped) and each block's sum loses 128 * sum(q_x), a term like int4's min
// (-128 * scale_w * s, s = scale_x * sum(q_x)). Two blocks per 64-byte load, lanes 8i..8i+7 block i's.
template <int R>
void q8_rows_i8(const int8_t* W, const uint16_t* S, int64_t K, int64_t G, const Int8Activations& a, int64_t m0,
                int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t nb = K / QK, ng = K / G, bpg = G / QK;
  const uint16_t* S_end = S + N * ng;
  const Int8Rows<R> x(a, m0);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i idx[4];
  for (int k = 0; k < 4; ++k)
    idx[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(2 * k)), _mm256_set1_epi32(2 * k + 1), 1);
  const __m256 m128 = _mm256_set1_ps(-128.0f);
  const int64_t ahead = std::max<int64_t>(1, kPrefetchAhead / K);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    const uint16_t* sc = S + n * ng;
    if (n + ahead < N) {
      prefetch_bytes(w + ahead * K, K);
      prefetch_bytes(sc + ahead * ng, 2 * ng);
    }
    __m512 acc[R], csz[R];
    __m256 macc[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_setzero_ps();
      macc[r] = _mm256_setzero_ps();
    }
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
      const int cnt = static_cast<int>(std::min<int64_t>(8, nb - b0));
      const __m256 wsv = group_values8(sc, b0, cnt, bpg, S_end);
      const __m256 wcv = _mm256_mul_ps(wsv, m128);
      for (int r = 0; r < R; ++r) {
        csz[r] = _mm512_castps256_ps512(_mm256_mul_ps(wsv, _mm256_loadu_ps(x.d[r] + b0)));
        macc[r] = _mm256_fmadd_ps(wcv, _mm256_loadu_ps(x.s[r] + b0), macc[r]);
      }
      for (int j = 0; j < cnt; j += 2) {
        // Blocks past the row's end are never loaded (masked, while a full pair loads unmasked, as in
        // q4_rows_i8); their inputs and scales are zeros.
        const __m512i v = _mm512_xor_si512(cnt - j >= 2 ? _mm512_loadu_si512(w + (b0 + j) * QK)
                                                        : _mm512_maskz_loadu_epi8(0xFFFFFFFFULL, w + (b0 + j) * QK), flip);
        for (int r = 0; r < R; ++r) {
          const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, _mm512_loadu_si512(x.q[r] + (b0 + j) * QK));
          acc[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx[j / 2], csz[r]), _mm512_cvtepi32_ps(p), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = hsum(acc[r]) + hsum(macc[r]);
  }
}
#endif  // LLAMARUN_AVX512

// Whether the CPU runs 512-bit instructions at full width, as one operation: AMD Zen 5 (family 0x1A) and
// later. Zen 4 splits them in two halves; Intel's AVX-512 CPUs were not measured with what depends on
// this (gemm_min_rows below; quantize.int8_batch_rows on the Python side) and answer false.
bool wide_avx512() {
  static const bool wide = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) && ebx == 0x68747541 && edx == 0x69746e65 && ecx == 0x444d4163 &&
        __get_cpuid(1, &eax, &ebx, &ecx, &edx)) {  // "AuthenticAMD"; then the family, extended when 0xF
      const unsigned base = (eax >> 8) & 0xF, family = base == 0xF ? base + ((eax >> 20) & 0xFF) : base;
      return family >= 0x1A;
    }
#endif
    return false;
  }();
  return wide;
}

// Where the int8 GEMM below takes over from the row kernels (AVX-512). A tile costs the same at any row
// count (empty lanes are computed too) while a row kernel's cost grows with every row, so the crossing
// depends on how wide the core runs 512-bit instructions. On Zen 4, which splits them, the GEMM drew level
// near 16 rows (at 16: 0.55-0.8x the row kernels' time). On Zen 5 the GEMM leads from 10 rows: SmolLM2
// decode at batch 10/12/14 with the GEMM 1002-1188/1130-1390/1225-1568 tok/s, with the row kernels
// 959-993/1016-1046/950-1054 (at 6-8 rows the row kernels lead by 5-30%). LLAMARUN_GEMM_MIN_ROWS
// overrides it (for measuring another CPU's crossing).
int64_t gemm_min_rows() {
  static const int64_t rows = [] {
    if (const char* env = std::getenv("LLAMARUN_GEMM_MIN_ROWS")) {  // a positive count; anything else: ignored
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (end != env && *end == '\0' && v > 0) return static_cast<int64_t>(v);
    }
    return wide_avx512() ? int64_t{10} : int64_t{16};
  }();
  return rows;
}

#ifdef LLAMARUN_AVX2
#ifndef LLAMARUN_AVX512
// AVX2's form of the int8 rounding above (the GEMM's inputs): the same values, d, s, NaN included.
inline void quantize_block_i8(const float* x, __m128i& lo, __m128i& hi, float& d, float& s) {
  __m256 v[4], m = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int k = 0; k < 4; ++k) {
    v[k] = _mm256_loadu_ps(x + 8 * k);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[k]));
  }
  const __m256 nan = _mm256_or_ps(_mm256_cmp_ps(v[0], v[1], _CMP_UNORD_Q), _mm256_cmp_ps(v[2], v[3], _CMP_UNORD_Q));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm256_movemask_ps(nan) ? NAN : _mm_cvtss_f32(m4);
  const __m256 mul = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m256i i[4];
  for (int k = 0; k < 4; ++k) i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], mul));
  // The packs work within 128-bit lanes: each one is followed by a permute back to element order.
  const __m256i w0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i[0], i[1]), 0xD8);  // int16, elements 0..15
  const __m256i w1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i[2], i[3]), 0xD8);  // 16..31
  const __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi16(w0, w1), 0xD8);
  lo = _mm256_castsi256_si128(q);
  hi = _mm256_extracti128_si256(q, 1);
  d = amax / 127.0f;
  __m256i t = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
  s = d * static_cast<float>(_mm_cvtsi128_si32(t4));
}
#endif

// ---- int8 GEMM for batches (AVX-512 VNNI: from gemm_min_rows(); AVX2: int4 weights, every batch) -------
// From gemm_min_rows() activation rows the int8 products turn around: each 512-bit register holds one output
// column for 16 activation rows (its lanes), and vpdpbusd multiplies 4 inputs of each of the 16 rows
// (unsigned: the int8 value + 128) by the same 4 weights, broadcast from memory (signed bytes). A weight
// byte is then loaded once per 16 rows, not once per row, and no lane needs summing at the end; the
// conversion, scale and min FMAs come once per 32-block and 16 products. The inputs are rounded exactly
// as for q4_rows_i8 (so results match it to float rounding); the +128 comes off by starting each block's
// sum at -128 * sum(q_w). Weight rows are unpacked GEMM_NR at a time straight into the kernel's layout
// (GemmRows: int4 nibbles split, block sums, float scales and mins) and reused for every 16-row tile of
// activations (prefill's 512 rows: 32 tiles; at 16 rows the unpacking is about a third of the work).
constexpr int GEMM_NR = 8;           // weight rows per pass (8 int32 + 8 float accumulators)
constexpr int64_t GEMM_TILES = 8;    // activation tiles (of 16 rows) per pass over a weight row: 128 rows

// x's rows in tiles of 16: for tile t, block b, dword j (inputs 4j..4j+3), the 16 rows' 4 bytes side by side.
struct Int8Tiles {
  int64_t nb = 0, tiles = 0;
  std::vector<uint32_t> q;  // [tiles][nb * 8][16] the rows' int8 inputs (+ 128 for vpdpbusd: AVX-512; lanes past M: 0)
  std::vector<float> d;     // [tiles][nb][16] block scales (0 past M)
  std::vector<float> s;     // [tiles][nb][16] d * sum of the block's rounded inputs (int4's min term)
};

void quantize_tiles_i8(const float* x, int64_t M, int64_t K, Int8Tiles& a) {
  a.nb = K / QK;
  a.tiles = (M + 15) / 16;
  const int64_t nb = a.nb;
  if (static_cast<int64_t>(a.q.size()) < a.tiles * nb * 8 * 16) a.q.resize(a.tiles * nb * 8 * 16);
  if (static_cast<int64_t>(a.d.size()) < a.tiles * nb * 16) {
    a.d.resize(a.tiles * nb * 16);
    a.s.resize(a.tiles * nb * 16);
  }
#ifdef LLAMARUN_AVX512
  const __m128i bias = _mm_set1_epi8(static_cast<char>(0x80));  // vpdpbusd's unsigned operand
#else
  const __m128i bias = _mm_setzero_si128();  // vpmaddubsw's signed operand (the weights are the unsigned one)
#endif
  const uint32_t pad = static_cast<uint32_t>(_mm_cvtsi128_si32(bias));  // an input of 0
  parallel_rows(a.tiles * 16, std::max<int64_t>(16, (1 << 14) / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      uint32_t* q = a.q.data() + (m / 16) * nb * 8 * 16 + m % 16;
      float* d = a.d.data() + (m / 16) * nb * 16 + m % 16;
      float* s = a.s.data() + (m / 16) * nb * 16 + m % 16;
      for (int64_t b = 0; b < nb; ++b) {
        alignas(16) uint32_t w[8];
        if (m >= M) {
          std::fill(w, w + 8, pad);
          d[b * 16] = s[b * 16] = 0.0f;
        } else {
          __m128i q0, q1;
          quantize_block_i8(x + m * K + b * QK, q0, q1, d[b * 16], s[b * 16]);
          _mm_store_si128(reinterpret_cast<__m128i*>(w), _mm_xor_si128(q0, bias));
          _mm_store_si128(reinterpret_cast<__m128i*>(w + 4), _mm_xor_si128(q1, bias));
        }
        for (int j = 0; j < 8; ++j) q[(b * 8 + j) * 16] = w[j];
      }
    }
  });
}

// GEMM_NR weight rows in the kernel's layout: for block b, dword j (inputs 4j..4j+3, natural order), the 8
// rows' 4 bytes side by side (int8 values; int4: 0..15), so that the kernel broadcasts each from one pointer
// at constant offsets; -128 x each block's sum, block scales and mins, [nb][8] alike.
struct GemmRows {
  std::vector<uint32_t> wt;  // [nb * 8][GEMM_NR]
  std::vector<int32_t> c;    // [nb][GEMM_NR]
  std::vector<float> sc;     // [nb][GEMM_NR]
  std::vector<float> mn;     // [nb][GEMM_NR] (int4 only)
  std::vector<uint8_t> zeros;  // a weight row of zeros (K bytes): rows past N read it
  std::vector<uint16_t> zero_groups;  // and its scales / mins (K / 32 float16 zeros)
  void resize(int64_t K) {
    wt.resize(GEMM_NR * K / 4);
    c.resize(GEMM_NR * K / QK);
    sc.resize(GEMM_NR * K / QK);
    mn.resize(GEMM_NR * K / QK);
    zeros.assign(K, 0);
    zero_groups.assign(K / QK, 0);
  }
};
static_assert(GEMM_NR == 8, "the weight layout transposes 8 rows");

#ifdef LLAMARUN_AVX512
// c[b][r] = -128 x the sums of the block's 8 dwords of each row: v[j] holds dword j of the 8 rows. Signed
// weights (int8) go in as vpdpbusd's signed operand against ones, unsigned ones (int4) as the unsigned.
inline void block_sums8(const __m256i v[8], bool is_signed, int32_t* c) {
  const __m256i ones = _mm256_set1_epi8(1);
  __m256i s = _mm256_setzero_si256();
  for (int j = 0; j < 8; ++j) s = is_signed ? _mm256_dpbusd_epi32(s, ones, v[j]) : _mm256_dpbusd_epi32(s, v[j], ones);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(s, 7)));
}
#endif

// out[b][r] = the float16 group values (scales or mins) of rows row[0..7] for each block b: 8 blocks at a
// time through an 8 x 8 transpose where each block has its own group (G = 32), else one by one.
void group_values_rows8(const uint16_t* const row[8], int64_t nb, int64_t bpg, float* out) {
  int64_t b = 0;
  if (bpg == 1) {
    for (; b + 8 <= nb; b += 8) {
      __m256i r[8], t[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_castps_si256(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[i] + b))));
      llamarun_kernels::transpose8_epi32(r, t);
      for (int j = 0; j < 8; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (b + j) * 8), t[j]);
    }
  }
  for (; b < nb; ++b)
    for (int i = 0; i < 8; ++i) out[b * 8 + i] = h2f(row[i][b / bpg]);
}

// Prefetch rows n0..n0+7 (those past N: none) of a [N, row_bytes] array: the next pass's weights, fetched
// while this pass's are unpacked and multiplied. The unpacking reads 8 rows a block at a time, 8 short
// streams the hardware prefetcher does not pick up well (its loads were ~30% of the GEMM's samples at 16
// rows); batch 16 gained 0-14% (median of 8 alternating runs, 4 pairs), prefill-512 5%.
inline void prefetch_rows8(const void* base, int64_t row_bytes, int64_t n0, int64_t N) {
  const int64_t rows = std::min<int64_t>(8, N - n0);
  if (rows <= 0) return;
  prefetch_bytes(static_cast<const char*>(base) + n0 * row_bytes, rows * row_bytes);
}

// Rows n0..n0+7 of an int4 weight (rows past N: zeros) into g. A block of a row is 16 bytes, byte i holding
// elements i (low nibble) and i + 16 (high): the 8 rows' blocks are transposed as 4 dwords each, then dword
// j's low nibbles are elements 4j..4j+3 of every row, its high nibbles elements 16+4j..16+4j+3.
void unpack_q4_rows(const uint8_t* W, const uint16_t* S, const uint16_t* Z, int64_t K, int64_t G, int64_t n0,
                    int64_t N, GemmRows& g) {
  const int64_t nb = K / QK, ng = K / G;
  prefetch_rows8(W, K / 2, n0 + 8, N);
  prefetch_rows8(S, ng * 2, n0 + 8, N);
  prefetch_rows8(Z, ng * 2, n0 + 8, N);
  const uint8_t* src[8];
  const uint16_t *sr[8], *zr[8];
  for (int r = 0; r < 8; ++r) {
    const bool in = n0 + r < N;
    src[r] = in ? W + (n0 + r) * (K / 2) : g.zeros.data();
    sr[r] = in ? S + (n0 + r) * ng : g.zero_groups.data();
    zr[r] = in ? Z + (n0 + r) * ng : g.zero_groups.data();
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    __m128i x[8];
    for (int r = 0; r < 8; ++r) x[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[r] + b * 16));
    const __m256i p0 = _mm256_set_m128i(x[4], x[0]), p1 = _mm256_set_m128i(x[5], x[1]);
    const __m256i p2 = _mm256_set_m128i(x[6], x[2]), p3 = _mm256_set_m128i(x[7], x[3]);
    const __m256i t0 = _mm256_unpacklo_epi32(p0, p1), t1 = _mm256_unpackhi_epi32(p0, p1);
    const __m256i t2 = _mm256_unpacklo_epi32(p2, p3), t3 = _mm256_unpackhi_epi32(p2, p3);
    // Lanes: rows 0-3 | rows 4-7, each lane's dwords in row order.
    const __m256i d[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                          _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
    __m256i v[8];
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_and_si256(d[j], low4);
      v[j + 4] = _mm256_and_si256(_mm256_srli_epi16(d[j], 4), low4);
    }
    __m256i* out = reinterpret_cast<__m256i*>(g.wt.data() + b * 64);
    for (int j = 0; j < 8; ++j) _mm256_storeu_si256(out + j, v[j]);
#ifdef LLAMARUN_AVX512
    block_sums8(v, false, g.c.data() + b * 8);
#endif
  }
  group_values_rows8(sr, nb, G / QK, g.sc.data());
  group_values_rows8(zr, nb, G / QK, g.mn.data());
}

#ifdef LLAMARUN_AVX512
// Rows n0..n0+7 of an int8 weight (rows past N: zeros) into g: 8 x 8 dword transposes of the rows' blocks.
void unpack_q8_rows(const int8_t* W, const uint16_t* S, int64_t K, int64_t G, int64_t n0, int64_t N, GemmRows& g) {
  const int64_t nb = K / QK, ng = K / G;
  prefetch_rows8(W, K, n0 + 8, N);
  prefetch_rows8(S, ng * 2, n0 + 8, N);
  const int8_t* src[8];
  const uint16_t* sr[8];
  for (int r = 0; r < 8; ++r) {
    const bool in = n0 + r < N;
    src[r] = in ? W + (n0 + r) * K : reinterpret_cast<const int8_t*>(g.zeros.data());
    sr[r] = in ? S + (n0 + r) * ng : g.zero_groups.data();
  }
  for (int64_t b = 0; b < nb; ++b) {
    __m256i x[8], v[8];
    for (int r = 0; r < 8; ++r) x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[r] + b * QK));
    llamarun_kernels::transpose8_epi32(x, v);
    __m256i* out = reinterpret_cast<__m256i*>(g.wt.data() + b * 64);
    for (int j = 0; j < 8; ++j) _mm256_storeu_si256(out + j, v[j]);
    block_sums8(v, true, g.c.data() + b * 8);
  }
  group_values_rows8(sr, nb, G / QK, g.sc.data());
  std::fill(g.mn.begin(), g.mn.begin() + nb * 8, 0.0f);
}

// The GEMM_NR unpacked rows times activation tile t: out[r][lane] = row r's product with row 16t + lane
// (lanes: the tile's rows that exist).
template <bool kMin>
void gemm_i8_tile(const GemmRows& g, int64_t K, const Int8Tiles& a, int64_t t, int lanes, float* out) {
  const int64_t nb = K / QK;
  const uint32_t* xq = a.q.data() + t * nb * 8 * 16;
  const float* xd = a.d.data() + t * nb * 16;
  const float* xs = a.s.data() + t * nb * 16;
  __m512 f[GEMM_NR];
  for (int r = 0; r < GEMM_NR; ++r) f[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int32_t* c = g.c.data() + b * GEMM_NR;
    const float* sc = g.sc.data() + b * GEMM_NR;
    const float* mn = g.mn.data() + b * GEMM_NR;
    const uint32_t* w = g.wt.data() + b * 8 * GEMM_NR;
    __m512i acc[GEMM_NR];
    for (int r = 0; r < GEMM_NR; ++r) acc[r] = _mm512_set1_epi32(c[r]);
    for (int j = 0; j < 8; ++j) {
      const __m512i xv = _mm512_loadu_si512(xq + (b * 8 + j) * 16);
      for (int r = 0; r < GEMM_NR; ++r)
        acc[r] = _mm512_dpbusd_epi32(acc[r], xv, _mm512_set1_epi32(static_cast<int32_t>(w[j * GEMM_NR + r])));
    }
    const __m512 dv = _mm512_loadu_ps(xd + b * 16);
    for (int r = 0; r < GEMM_NR; ++r)
      f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_mul_ps(dv, _mm512_set1_ps(sc[r])), f[r]);
    if (kMin) {
      const __m512 sv = _mm512_loadu_ps(xs + b * 16);
      for (int r = 0; r < GEMM_NR; ++r) f[r] = _mm512_fmadd_ps(sv, _mm512_set1_ps(mn[r]), f[r]);
    }
  }
  for (int r = 0; r < GEMM_NR; ++r) _mm512_store_ps(out + r * 16, f[r]);
}

#else
// AVX2 (no VNNI): a 256-bit register holds one output column for 8 activation rows (half a tile), and
// vpmaddubsw multiplies a dword of 4 int4 weights (broadcast: its unsigned operand, 0..15) by 4 int8 inputs
// of each of the 8 rows (signed), summing pairs into int16. A block's 8 dwords add up in int16 without
// overflow (|sum| <= 8 x 2 x 15 x 127 = 30480); one vpmaddwd by ones then widens the pairs into the rows'
// int32 block sums. Per 32-block and 8 rows: 8 vpmaddubsw + 8 vpaddw per weight row, where the int16 row
// kernel spends 16 vpmaddwd + 8 vpaddd. The multiplies are the bound: Zen 3 issues one vpmaddubsw per cycle,
// 32 x 2.45 GHz = 78 GMAC/s per core, and this measured 74-77 at 512 rows, 61 at 16 (where the unpacking
// weighs more: one tile goes to q4_rows_direct instead); the int16 kernel 31-34. kTwo: both halves of the tile (16 rows), each broadcast weight used
// twice; else the first 8 rows only.
template <bool kTwo>
void gemm_i8_tile_avx2(const GemmRows& g, int64_t K, const Int8Tiles& a, int64_t t, float* out) {
  constexpr int H = kTwo ? 2 : 1;
  const int64_t nb = K / QK;
  const __m256i ones = _mm256_set1_epi16(1);
  // Plain pointers: with the vectors' own, GCC reloads them (a thread-local's address: a call) every block.
  const uint32_t* const wt = g.wt.data();
  const float *const gsc = g.sc.data(), *const gmn = g.mn.data();
  const uint8_t* xq = reinterpret_cast<const uint8_t*>(a.q.data() + t * nb * 8 * 16);
  const float* xd = a.d.data() + t * nb * 16;
  const float* xs = a.s.data() + t * nb * 16;
  for (int r = 0; r < GEMM_NR; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + r * 16 + 8 * h, _mm256_setzero_ps());
  // 4 weight rows at a time: 8 int16 sums (4 rows x 2 halves), the inputs and a broadcast fill 11 of the 16
  // registers; the float sums accumulate in `out` (L1).
  for (int r0 = 0; r0 < GEMM_NR; r0 += 4) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint32_t* w = wt + b * 8 * GEMM_NR + r0;
      const uint8_t* xb = xq + b * 8 * 64;
      __m256i acc[4][H];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        // In registers, loaded once: GCC otherwise folds the load into each of the 4 products that use it, and
        // the loads (not the products) become the bound. (Plain variables: an array would live in memory.)
        __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + j * 64)), x1 = x0;
        if (kTwo) x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + j * 64 + 32));
        __asm__("" : "+x"(x0), "+x"(x1));
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const __m256i wv = _mm256_set1_epi32(static_cast<int32_t>(w[j * GEMM_NR + r]));
#pragma GCC unroll 2
          for (int h = 0; h < H; ++h) {
            const __m256i p = _mm256_maddubs_epi16(wv, h ? x1 : x0);
            acc[r][h] = j ? _mm256_add_epi16(acc[r][h], p) : p;
            // Keeps each sum a chain: re-associated into trees, all 64 products would be live at once.
            __asm__("" : "+x"(acc[r][h]));
          }
        }
      }
      for (int h = 0; h < H; ++h) {
        const __m256 dv = _mm256_loadu_ps(xd + b * 16 + 8 * h), sv = _mm256_loadu_ps(xs + b * 16 + 8 * h);
        for (int r = 0; r < 4; ++r) {
          float* o = out + (r0 + r) * 16 + 8 * h;
          const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][h], ones));
          const __m256 f = _mm256_fmadd_ps(p, _mm256_mul_ps(dv, _mm256_broadcast_ss(gsc + b * GEMM_NR + r0 + r)), _mm256_loadu_ps(o));
          _mm256_storeu_ps(o, _mm256_fmadd_ps(sv, _mm256_broadcast_ss(gmn + b * GEMM_NR + r0 + r), f));
        }
      }
    }
  }
}

template <bool kMin>
void gemm_i8_tile(const GemmRows& g, int64_t K, const Int8Tiles& a, int64_t t, int lanes, float* out) {
  static_assert(kMin, "AVX2's GEMM takes int4 weights (unsigned) only");
  if (lanes > 8)
    gemm_i8_tile_avx2<true>(g, K, a, t, out);
  else
    gemm_i8_tile_avx2<false>(g, K, a, t, out);
}
#endif  // LLAMARUN_AVX512
#endif  // LLAMARUN_AVX2

// ---- checks and the ops ---------------------------------------------------------------------------
// Scales and mins are float16 values, passed as float16 or as int16 tensors holding float16 bits (the
// modules store them so, which keeps module.to(dtype) from casting them).
bool is_f16_storage(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kShort; }
const uint16_t* f16_bits(const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }

void check_common(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t K, int64_t G) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu(),
              "llamarun kernels run on CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "llamarun kernels take float32 activations, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "activation's last dimension (", x.dim() ? x.size(-1) : 0,
              ") does not match the weight's in_features (", K, ")");
  TORCH_CHECK(K % QK == 0, "in_features must be a multiple of 32 for the llamarun kernels, got ", K);
  TORCH_CHECK(G > 0 && G % QK == 0 && K % G == 0, "group_size must be a multiple of 32 dividing in_features (",
              K, "), got ", G);
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous(), "quantized weight tensors must be contiguous");
  TORCH_CHECK(is_f16_storage(scales) && scales.dim() == 2 && scales.size(0) == qweight.size(0) &&
                  scales.size(1) == K / G,
              "scales must be float16 (or int16 bits) [out_features, in_features / group_size]");
}

c10::SmallVector<int64_t, 6> out_shape(const at::Tensor& x, int64_t N) {
  c10::SmallVector<int64_t, 6> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// Rows per parallel chunk: at least ~16 KB of weights, so that handing a chunk to a helper (a cache line
// or two changing hands) is cheap next to the chunk's work.
int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, row_bytes)); }

template <typename RowsFn>
void run_rows(int64_t M, int64_t N, int64_t row_bytes, RowsFn&& rows) {
  parallel_rows(N, grain_rows(row_bytes), [&](int64_t n0, int64_t n1) {
    // Weight rows in tiles small enough to stay in L1/L2 while every activation row passes over them.
    const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(n1 - n0, (32 * 1024) / std::max<int64_t>(1, row_bytes)));
    for (int64_t t0 = n0; t0 < n1; t0 += tile) {
      const int64_t t1 = std::min(n1, t0 + tile);
      for (int64_t m0 = 0; m0 < M; m0 += MB) rows(m0, std::min<int64_t>(MB, M - m0), t0, t1);
    }
  });
}

// ---- bf16 tile products (AMX) -------------------------------------------------------------------------
// On CPUs with AMX (Sapphire Rapids and later), a linear with enough activation rows (the caller's
// batch_rows, 0 = never; llamarun sets it for the models it gives bf16 GEMMs) runs as bf16 tile products
// instead: x is rounded to bf16 once, each 16-row strip of W is dequantized to bf16 (w = q * scale
// [+ min], rounded once) into an L1/L2-resident buffer, and TDPBF16PS multiplies 16 weight rows x 32
// inputs by 32 inputs x 16 activation rows per instruction, accumulating in float32. This is the dense
// path's arithmetic (bf16 inputs, float32 sums) without its float32 copy of the weight, its conversions and
// its separate GEMM call; at 16 rows a product costs about what one pass over the weights costs.
// Layout: weights are the A operand in their natural row order (16 rows x 64 bytes per tile); x is the B
// operand, packed once per call as pairs of adjacent inputs ("VNNI" layout): for activation tile mt and
// input block kb, 16 rows (input pairs p) of 16 dwords (activation rows m), dword = (x[m][2p], x[m][2p+1]).
#if defined(LLAMARUN_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__linux__)
#define LLAMARUN_AMX 1
}  // namespace
#include <sys/syscall.h>
namespace {

bool amx_ready() {
  // Linux hands a process the (8 KiB) tile state only when asked for it, once.
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (16 weight rows x 16 activation rows, float32); 4, 5: A (weights); 6, 7: B (activations).
// The configuration is per thread and other libraries (oneDNN) load their own: set it for every job.
void configure_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// x [M, K] float32 -> the B layout above (activation rows past M are zeros).
void pack_x_bf16(const float* x, int64_t M, int64_t K, uint32_t* xp) {
  const int64_t nb = K / QK, mtiles = (M + 15) / 16;
  if (M % 16) std::memset(xp + (mtiles - 1) * nb * 256, 0, nb * 256 * sizeof(uint32_t));
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(16));
  parallel_rows(M, std::max<int64_t>(1, (1 << 14) / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      uint32_t* dst = xp + (m / 16) * nb * 256 + (m % 16);
      for (int64_t b = 0; b < nb; ++b) {
        const float* src = x + m * K + b * QK;
        const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
        _mm512_i32scatter_epi32(dst + b * 256, idx, v, 4);  // dword p (inputs 2p, 2p+1) to row p
      }
    }
  });
}

// Weight rows n0 .. n0+15 as bf16 [16, K] (row stride K).
void dequant_q4_bf16(const uint8_t* W, const uint16_t* S, const uint16_t* Z, int64_t K, int64_t G, int64_t n0,
                     uint16_t* out) {
  const int64_t ng = K / G, bpg = G / QK;
  // A block has 16 possible values, q * scale + min for q = 0..15: rounded to bf16 once into a 16-entry
  // table, then the 32 nibbles of the block index it (one vpermw) instead of each being converted.
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m256i low4 = _mm256_set1_epi16(0x0F);
  for (int64_t i = 0; i < 16; ++i) {
    const int64_t n = n0 + i;
    for (int64_t g = 0, b = 0; g < ng; ++g) {  // groups outside, blocks inside: no division per block
      const __m512 s = _mm512_set1_ps(h2f(S[n * ng + g])), z = _mm512_set1_ps(h2f(Z[n * ng + g]));
      const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(iota, s, z)));
      for (int64_t end = b + bpg; b < end; ++b) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(W + n * (K / 2) + b * (QK / 2))));
        const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low4)), _mm256_srli_epi16(v, 4), 1);
        _mm512_storeu_si512(out + i * K + b * QK, _mm512_permutexvar_epi16(idx, table));
      }
    }
  }
}

void dequant_q8_bf16(const int8_t* W, const uint16_t* S, int64_t K, int64_t G, int64_t n0, uint16_t* out) {
  const int64_t ng = K / G, bpg = G / QK;
  for (int64_t i = 0; i < 16; ++i) {
    const int64_t n = n0 + i;
    for (int64_t g = 0, b = 0; g < ng; ++g) {  // groups outside, blocks inside: no division per block
      const __m512 s = _mm512_set1_ps(h2f(S[n * ng + g]));
      for (int64_t end = b + bpg; b < end; ++b) {
        const int8_t* w = W + n * K + b * QK;
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)))), s);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)))), s);
        _mm512_storeu_si512(out + i * K + b * QK, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  }
}

// C tile (16 weight rows x 16 activation rows) -> y[m][n0 + i] for the activation rows that exist: a 16x16
// transpose in registers (4 rounds of lane shuffles), then one 64-byte store per activation row.
inline void store_c(const float* c, float* y, int64_t N, int64_t m0, int64_t mrows, int64_t n0) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(c + 16 * i);
  for (int i = 0; i < 16; i += 2) {  // 2x2 blocks of single elements
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 2x2 blocks of element pairs
    for (int j = 0; j < 2; ++j) {
      const __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + j + 2]);
      r[i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + j + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  for (int i = 0; i < 16; i += 8) {  // 2x2 blocks of 128-bit lanes
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  }
  for (int j = 0; j < 8; ++j) {  // 2x2 blocks of 256-bit halves
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
  // r[k] now holds column m of c for m = perm(k) (the rounds' lane order).
  static constexpr int kRow[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
  for (int k = 0; k < 16; ++k)
    if (kRow[k] < mrows) _mm512_storeu_ps(y + (m0 + kRow[k]) * N + n0, r[k]);
}

// y [M, N] = x W^T with W given by dequant(n0, out) for 16-row strips; N is a multiple of 16.
template <typename Dequant>
void amx_linear(const float* x, int64_t M, int64_t N, int64_t K, Dequant&& dequant, float* y) {
  const int64_t nb = K / QK, mtiles = (M + 15) / 16, strips = N / 16;
  thread_local std::vector<uint32_t> tls_xp;
  std::vector<uint32_t>& xpv = tls_xp;
  if (static_cast<int64_t>(xpv.size()) < mtiles * nb * 256) xpv.resize(mtiles * nb * 256);
  const uint32_t* xp = xpv.data();
  pack_x_bf16(x, M, K, xpv.data());
  const int64_t stride = K * static_cast<int64_t>(sizeof(uint16_t));
  // Strips per chunk: at least ~32 KB of int8-equivalent weights, as for the integer kernels.
  parallel_rows(strips, std::max<int64_t>(1, (32 * 1024) / (16 * K)), [&](int64_t s0, int64_t s1) {
    thread_local std::vector<uint16_t> tls_w;
    std::vector<uint16_t>& wv = tls_w;
    if (static_cast<int64_t>(wv.size()) < 32 * K) wv.resize(32 * K);
    uint16_t* w0 = wv.data();
    uint16_t* w1 = w0 + 16 * K;
    alignas(64) float c[4][256];
    configure_tiles();
    for (int64_t s = s0; s < s1; s += 2) {
      const bool two_n = s + 1 < s1;  // two weight strips: two A tiles against each B
      dequant(s * 16, w0);
      if (two_n) dequant(s * 16 + 16, w1);
      for (int64_t mt = 0; mt < mtiles; mt += 2) {
        const bool two_m = mt + 1 < mtiles;
        const uint32_t* b0 = xp + mt * nb * 256;
        const uint32_t* b1 = b0 + nb * 256;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t b = 0; b < nb; ++b) {
          _tile_loadd(4, w0 + b * QK, stride);
          _tile_loadd(6, b0 + b * 256, 64);
          _tile_dpbf16ps(0, 4, 6);
          if (two_m) {
            _tile_loadd(7, b1 + b * 256, 64);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (two_n) {
            _tile_loadd(5, w1 + b * QK, stride);
            _tile_dpbf16ps(2, 5, 6);
            if (two_m) _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c[0], 64);
        store_c(c[0], y, N, mt * 16, std::min<int64_t>(16, M - mt * 16), s * 16);
        if (two_m) {
          _tile_stored(1, c[1], 64);
          store_c(c[1], y, N, mt * 16 + 16, std::min<int64_t>(16, M - mt * 16 - 16), s * 16);
        }
        if (two_n) {
          _tile_stored(2, c[2], 64);
          store_c(c[2], y, N, mt * 16, std::min<int64_t>(16, M - mt * 16), s * 16 + 16);
          if (two_m) {
            _tile_stored(3, c[3], 64);
            store_c(c[3], y, N, mt * 16 + 16, std::min<int64_t>(16, M - mt * 16 - 16), s * 16 + 16);
          }
        }
      }
    }
    _tile_release();
  });
}

// The op around amx_linear: x [..., K] float32 -> y [..., N].
template <typename Dequant>
at::Tensor amx_op(const at::Tensor& x, int64_t N, int64_t K, Dequant&& dequant) {
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  amx_linear(xc.data_ptr<float>(), x.numel() / K, N, K, dequant, y.data_ptr<float>());
  return y;
}
#else
bool amx_ready() { return false; }
#endif

// Whether a product with M activation rows runs as bf16 tile products (see above).
bool use_amx(int64_t batch_rows, int64_t M, int64_t N) {
  return batch_rows > 0 && M >= batch_rows && N % 16 == 0 && amx_ready();
}

#ifdef LLAMARUN_AVX2
// The int8 ops' shared frame: y [..., N] for x [..., K], x's M rows rounded into int8 tiles (the calling
// thread's buffers), then body(tiles, M, y's data).
template <typename Body>
at::Tensor tiled_op(const at::Tensor& x, int64_t N, int64_t K, Body&& body) {
  const at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const int64_t M = K ? x.numel() / K : 0;
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  if (M == 0 || N == 0) return y;
  thread_local Int8Tiles tls_tiles;
  Int8Tiles& a = tls_tiles;  // a plain reference: the pool's helpers read the caller's tiles
  quantize_tiles_i8(xc.data_ptr<float>(), M, K, a);
  body(static_cast<const Int8Tiles&>(a), M, y.data_ptr<float>());
  return y;
}

// y [M, N] = x [M, K] @ W^T through the int8 GEMM; unpack(n0, rows) puts weight rows n0..n0+7 into rows.
template <bool kMin, typename Unpack>
at::Tensor gemm_i8_op(const at::Tensor& x, int64_t N, int64_t K, Unpack&& unpack) {
  return tiled_op(x, N, K, [&](const Int8Tiles& a, int64_t M, float* Y) {
    const int64_t passes = (N + GEMM_NR - 1) / GEMM_NR;
    // A chunk: enough passes that handing it over is cheap next to its work (~256K multiply-adds).
    const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, GEMM_NR * M * K));
    parallel_rows(passes, grain, [&](int64_t p0, int64_t p1) {
      thread_local GemmRows tls_rows;
      GemmRows& g = tls_rows;
      if (static_cast<int64_t>(g.zeros.size()) < K) g.resize(K);
      alignas(64) float out[GEMM_NR * 16];
      for (int64_t t0 = 0; t0 < a.tiles; t0 += GEMM_TILES) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n0 = p * GEMM_NR;
          const int rows = static_cast<int>(std::min<int64_t>(GEMM_NR, N - n0));
          unpack(n0, g);
          for (int64_t t = t0; t < std::min(a.tiles, t0 + GEMM_TILES); ++t) {
            const int lanes = static_cast<int>(std::min<int64_t>(16, M - t * 16));
            gemm_i8_tile<kMin>(g, K, a, t, lanes, out);
            for (int l = 0; l < lanes; ++l) {
              float* yr = Y + (t * 16 + l) * N + n0;
              for (int r = 0; r < rows; ++r) yr[r] = out[r * 16 + l];
            }
          }
        }
      }
    });
  });
}

#ifndef LLAMARUN_AVX512
// AVX2, one tile (up to 16 rows: decode batches): the same products as gemm_i8_tile_avx2, the int4 weights
// read in their own layout instead of unpacked, since with one tile there is nothing to reuse the unpacking
// for. Dword d of a 16-byte block holds elements 4d..4d+3 in its low nibbles and 16+4d..16+4d+3 in its
// high ones: one broadcast, an and and a shift give the weights for input dwords d and d + 4; the extra
// and/shift run beside the products, which are the bound. Two weight rows at a time, their float sums in
// registers. Side by side with the unpacking GEMM (SmolLM2's layers, 2 threads, Zen 3): 1.2-1.55x at 8
// and 16 rows; whole-model decode batch 8 424-465 vs 336-400 tok/s, batch 16 562-610 vs 443-539.
template <bool kTwo>
void q4_rows_direct(const uint8_t* W, const uint16_t* S, const uint16_t* Z, int64_t K, int64_t G,
                    const Int8Tiles& a, int64_t M, int64_t n0, int64_t n1, float* Y, int64_t N) {
  constexpr int H = kTwo ? 2 : 1;
  const int64_t nb = K / QK, ng = K / G, bpg = G / QK;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  const uint8_t* xq = reinterpret_cast<const uint8_t*>(a.q.data());  // tile 0: dword (b * 8 + j) * 16 + row
  const float *xd = a.d.data(), *xs = a.s.data();
  for (int64_t n = n0; n < n1; n += 2) {
    const bool two_rows = n + 1 < n1;
    const uint8_t* w0 = W + n * (K / 2);
    const uint8_t* w1 = two_rows ? w0 + K / 2 : w0;  // a lone last row is computed twice, stored once
    __m256 f[2][H];
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < H; ++h) f[r][h] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* xb = xq + b * 8 * 64;
      __m256i acc[2][H];
#pragma GCC unroll 4
      for (int d = 0; d < 4; ++d) {
        __m256i xl0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + d * 64)), xl1 = xl0;
        __m256i xh0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + (d + 4) * 64)), xh1 = xh0;
        if (kTwo) {
          xl1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + d * 64 + 32));
          xh1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + (d + 4) * 64 + 32));
        }
        __asm__("" : "+x"(xl0), "+x"(xl1), "+x"(xh0), "+x"(xh1));  // in registers (see gemm_i8_tile_avx2)
#pragma GCC unroll 2
        for (int r = 0; r < 2; ++r) {
          int32_t word;
          std::memcpy(&word, (r ? w1 : w0) + b * 16 + 4 * d, 4);
          const __m256i v = _mm256_set1_epi32(word);
          const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
#pragma GCC unroll 2
          for (int h = 0; h < H; ++h) {
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, h ? xl1 : xl0),
                                               _mm256_maddubs_epi16(hi, h ? xh1 : xh0));
            acc[r][h] = d ? _mm256_add_epi16(acc[r][h], p) : p;
            __asm__("" : "+x"(acc[r][h]));  // a chain, not a tree (see gemm_i8_tile_avx2)
          }
        }
      }
      for (int r = 0; r < 2; ++r) {
        const int64_t row = two_rows ? n + r : n;
        const __m256 sc = _mm256_set1_ps(h2f(S[row * ng + b / bpg])), mn = _mm256_set1_ps(h2f(Z[row * ng + b / bpg]));
        for (int h = 0; h < H; ++h) {
          const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][h], ones));
          f[r][h] = _mm256_fmadd_ps(p, _mm256_mul_ps(_mm256_loadu_ps(xd + b * 16 + 8 * h), sc), f[r][h]);
          f[r][h] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + b * 16 + 8 * h), mn, f[r][h]);
        }
      }
    }
    alignas(32) float out[2][16];
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < H; ++h) _mm256_store_ps(out[r] + 8 * h, f[r][h]);
    for (int64_t m = 0; m < M; ++m) {
      Y[m * N + n] = out[0][m];
      if (two_rows) Y[m * N + n + 1] = out[1][m];
    }
  }
}

// y [M, N] = x [M, K] @ W^T for M <= 16 (one tile) through q4_rows_direct.
at::Tensor q4_direct_op(const at::Tensor& x, const uint8_t* W, const uint16_t* S, const uint16_t* Z, int64_t N,
                        int64_t K, int64_t G) {
  return tiled_op(x, N, K, [&](const Int8Tiles& a, int64_t M, float* Y) {
    // A chunk: enough rows that handing it over is cheap next to its work (~256K multiply-adds), even.
    const int64_t grain = std::max<int64_t>(2, (1 << 18) / std::max<int64_t>(1, M * K)) & ~int64_t{1};
    parallel_rows(N, grain, [&](int64_t n0, int64_t n1) {
      if (M > 8)
        q4_rows_direct<true>(W, S, Z, K, G, a, M, n0, n1, Y, N);
      else
        q4_rows_direct<false>(W, S, Z, K, G, a, M, n0, n1, Y, N);
    });
  });
}

// AVX2 (no VNNI), int8 weights: the int4 kernels' layout and rounding (x in int8 per 32-block, a tile's 8 or
// 16 rows side by side per input dword), with llama.cpp's sign trick for two signed operands: vpmaddubsw
// takes |w| (a broadcast dword of 4 weights, 0..128) as its unsigned operand and x with w's signs applied
// (vpsignb) as its signed one. One pair of products stays within int16 (2 x 128 x 127 = 32512), two would
// not, so each vpmaddubsw is widened at once (vpmaddwd by ones) into the rows' int32 block sums: two
// multiplies per 4 inputs x 8 rows, where the int16 kernel spends two per 2 inputs x 4 rows and a float
// conversion and FMA per block and row. Zen 3, 2 threads, medians of alternating runs: SmolLM2's int8 output
// layer (49152 x 576) at 16 rows 1.15-1.5x the int16 kernel (whole-model decode batch 16 +13-18%), 0.8-0.95x
// at 6-8 rows before the prefetch in q8_direct_op; its 1536 x 576 and 576 x 1536 shapes 1.0-1.4x at 6-8
// rows, 1.5-1.7x at 16-64. Two weight rows
// at a time, their float sums in registers; every tile of x for each pair (which stays in L1), so
// prefill's chunks run here too.
template <bool kTwo>
void q8_tile_direct(const int8_t* w0, const int8_t* w1, const uint16_t* s0, const uint16_t* s1, int64_t K,
                    int64_t bpg, const uint8_t* xq, const float* xd, float out[2][16]) {
  constexpr int H = kTwo ? 2 : 1;
  const int64_t nb = K / QK;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 f[2][H];
  for (int r = 0; r < 2; ++r)
    for (int h = 0; h < H; ++h) f[r][h] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* xb = xq + b * 8 * 64;
    __m256i acc[2][H];
#pragma GCC unroll 8
    for (int d = 0; d < 8; ++d) {
      __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + d * 64)), x1 = x0;
      if (kTwo) x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + d * 64 + 32));
      __asm__("" : "+x"(x0), "+x"(x1));  // in registers (see gemm_i8_tile_avx2)
#pragma GCC unroll 2
      for (int r = 0; r < 2; ++r) {
        int32_t word;
        std::memcpy(&word, (r ? w1 : w0) + b * QK + 4 * d, 4);
        const __m256i v = _mm256_set1_epi32(word), av = _mm256_sign_epi8(v, v);  // |w| (-128: 128 unsigned)
#pragma GCC unroll 2
        for (int h = 0; h < H; ++h) {
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(h ? x1 : x0, v)), ones);
          acc[r][h] = d ? _mm256_add_epi32(acc[r][h], p) : p;
          __asm__("" : "+x"(acc[r][h]));  // a chain, not a tree (see gemm_i8_tile_avx2)
        }
      }
    }
    const __m256 sc0 = _mm256_set1_ps(h2f(s0[b / bpg])), sc1 = _mm256_set1_ps(h2f(s1[b / bpg]));
    for (int h = 0; h < H; ++h) {
      const __m256 dv = _mm256_loadu_ps(xd + b * 16 + 8 * h);
      f[0][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[0][h]), _mm256_mul_ps(dv, sc0), f[0][h]);
      f[1][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[1][h]), _mm256_mul_ps(dv, sc1), f[1][h]);
    }
  }
  for (int r = 0; r < 2; ++r)
    for (int h = 0; h < H; ++h) _mm256_store_ps(out[r] + 8 * h, f[r][h]);
}

// y [M, N] = x [M, K] @ W^T for int8 weights through q8_tile_direct, every tile of x for each pair of rows.
at::Tensor q8_direct_op(const at::Tensor& x, const int8_t* W, const uint16_t* S, int64_t N, int64_t K, int64_t G) {
  // Weight rows ~4 KB ahead are prefetched: the pair of rows in hand is two short streams, which the hardware
  // prefetcher leaves to memory latency at 8 rows (SmolLM2's int8 layers in turn, weights from memory, 8
  // rows: 0.98-1.04x the int16 kernel without, 1.07-1.26x with; 2 and 8 KB ahead alike).
  const int64_t PF = std::max<int64_t>(2, kPrefetchAhead / std::max<int64_t>(1, K)) & ~int64_t{1};
  return tiled_op(x, N, K, [&](const Int8Tiles& a, int64_t M, float* Y) {
    const int64_t nb = K / QK, ng = K / G, bpg = G / QK;
    const int64_t grain = std::max<int64_t>(2, (1 << 18) / std::max<int64_t>(1, M * K)) & ~int64_t{1};
    parallel_rows(N, grain, [&](int64_t n0, int64_t n1) {
      alignas(32) float out[2][16];
      for (int64_t n = n0; n < n1; n += 2) {
        const bool two_rows = n + 1 < n1;  // a lone last row is computed twice, stored once
        const int64_t n_1 = two_rows ? n + 1 : n;
        if (n + PF + 2 <= n1) prefetch_bytes(W + (n + PF) * K, 2 * K);
        for (int64_t t = 0; t < a.tiles; ++t) {
          const int lanes = static_cast<int>(std::min<int64_t>(16, M - t * 16));
          const uint8_t* xq = reinterpret_cast<const uint8_t*>(a.q.data() + t * nb * 8 * 16);
          const float* xd = a.d.data() + t * nb * 16;
          if (lanes > 8)
            q8_tile_direct<true>(W + n * K, W + n_1 * K, S + n * ng, S + n_1 * ng, K, bpg, xq, xd, out);
          else
            q8_tile_direct<false>(W + n * K, W + n_1 * K, S + n * ng, S + n_1 * ng, K, bpg, xq, xd, out);
          for (int l = 0; l < lanes; ++l) {
            Y[(t * 16 + l) * N + n] = out[0][l];
            if (two_rows) Y[(t * 16 + l) * N + n + 1] = out[1][l];
          }
        }
      }
    });
  });
}
#endif
#endif

// The shared body of the linear ops: quantize x's M rows once (quantize(x, M, K, act)), into buffers reused
// by the calling thread, then call rows(std::integral_constant<int, R>, act, m0, n0, n1, out) for every tile
// of up to MB activation rows (R = 1..4, a compile-time count) and weight rows [n0, n1).
template <typename Act, typename Quantize, typename Rows>
at::Tensor linear_op(const at::Tensor& x, int64_t N, int64_t K, int64_t row_bytes, Quantize&& quantize, Rows&& rows) {
  const at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const int64_t M = K ? x.numel() / K : 0;
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  if (M > 0 && N > 0) {
    // Bind a plain reference: a lambda naming a thread_local directly would read the *running* thread's
    // instance when a pool helper runs it.
    thread_local Act tls_act;
    Act& a = tls_act;
    quantize(xc.data_ptr<float>(), M, K, a);
    float* out = y.data_ptr<float>();
    run_rows(M, N, row_bytes, [&](int64_t m0, int64_t r, int64_t n0, int64_t n1) {
      switch (r) {
        case 4: rows(std::integral_constant<int, 4>{}, a, m0, n0, n1, out); break;
        case 3: rows(std::integral_constant<int, 3>{}, a, m0, n0, n1, out); break;
        case 2: rows(std::integral_constant<int, 2>{}, a, m0, n0, n1, out); break;
        default: rows(std::integral_constant<int, 1>{}, a, m0, n0, n1, out); break;
      }
    });
  }
  return y;
}

template <typename Rows>
at::Tensor linear_op(const at::Tensor& x, int64_t N, int64_t K, int64_t row_bytes, Rows&& rows) {
  return linear_op<QuantizedActivations>(x, N, K, row_bytes, quantize_activations, rows);
}

}  // namespace

// The two linear ops (declared in kernels.h: layers.cpp calls them directly). Products of at least
// batch_rows activation rows (0 = never) run as bf16 tile products where the CPU has AMX and N is a multiple
// of 16, else, with AVX-512 VNNI, with int8 activations (q4_rows_i8, q8_rows_i8; from gemm_min_rows() rows
// the int8 GEMM), and with AVX2 int4 ones as the int8 GEMM (one tile: q4_rows_direct), int8 ones through
// q8_tile_direct; anything else, and every product on other CPUs, with int16 activations.
namespace llamarun_kernels {

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_size,
                     int64_t batch_rows) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "int8 qweight must be int8 [out, in]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  check_common(x, qweight, scales, K, group_size);
  const int8_t* W = qweight.data_ptr<int8_t>();
  const uint16_t* S = f16_bits(scales);
#ifdef LLAMARUN_AMX
  if (use_amx(batch_rows, x.numel() / K, N))
    return amx_op(x, N, K, [&](int64_t n0, uint16_t* out) { dequant_q8_bf16(W, S, K, group_size, n0, out); });
#endif
#ifdef LLAMARUN_AVX512
  if (batch_rows > 0 && x.numel() / K >= std::max(batch_rows, gemm_min_rows()))
    return gemm_i8_op<false>(x, N, K, [&](int64_t n0, GemmRows& g) { unpack_q8_rows(W, S, K, group_size, n0, N, g); });
  if (batch_rows > 0 && x.numel() / K >= batch_rows)
    return linear_op<Int8Activations>(x, N, K, K,
                                      [](const float* x, int64_t M, int64_t K, Int8Activations& a) {
                                        quantize_activations_i8(x, M, K, a, false);
                                      },
                                      [&](auto R, const Int8Activations& a, int64_t m0, int64_t n0, int64_t n1,
                                          float* out) { q8_rows_i8<R>(W, S, K, group_size, a, m0, n0, n1, out, N); });
#elif defined(LLAMARUN_AVX2)
  if (batch_rows > 0 && x.numel() / K >= batch_rows) return q8_direct_op(x, W, S, N, K, group_size);
#endif
  return linear_op(x, N, K, K, [&](auto R, const QuantizedActivations& a, int64_t m0, int64_t n0, int64_t n1,
                                   float* out) { q8_rows<R>(W, S, K, group_size, a, m0, n0, n1, out, N); });
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                     int64_t group_size, int64_t batch_rows) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2, "int4 qweight must be uint8 [out, in / 2]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  check_common(x, qweight, scales, K, group_size);
  TORCH_CHECK(is_f16_storage(mins) && mins.sizes() == scales.sizes() && mins.is_contiguous(),
              "mins must be float16 and shaped like scales");
  const uint8_t* W = qweight.data_ptr<uint8_t>();
  const uint16_t* S = f16_bits(scales);
  const uint16_t* Z = f16_bits(mins);
#ifdef LLAMARUN_AMX
  if (use_amx(batch_rows, x.numel() / K, N))
    return amx_op(x, N, K, [&](int64_t n0, uint16_t* out) { dequant_q4_bf16(W, S, Z, K, group_size, n0, out); });
#endif
#ifdef LLAMARUN_AVX512
  if (batch_rows > 0 && x.numel() / K >= std::max(batch_rows, gemm_min_rows()))
    return gemm_i8_op<true>(x, N, K, [&](int64_t n0, GemmRows& g) { unpack_q4_rows(W, S, Z, K, group_size, n0, N, g); });
  if (batch_rows > 0 && x.numel() / K >= batch_rows)
    return linear_op<Int8Activations>(x, N, K, K / 2,
                                      [](const float* x, int64_t M, int64_t K, Int8Activations& a) {
                                        quantize_activations_i8(x, M, K, a, true);
                                      },
                                      [&](auto R, const Int8Activations& a, int64_t m0, int64_t n0, int64_t n1,
                                          float* out) { q4_rows_i8<R>(W, S, Z, K, group_size, a, m0, n0, n1, out, N); });
#elif defined(LLAMARUN_AVX2)
  if (batch_rows > 0 && x.numel() / K >= batch_rows) {
    if (x.numel() / K <= 16)  // one tile: nothing to reuse an unpacking for
      return q4_direct_op(x, W, S, Z, N, K, group_size);
    return gemm_i8_op<true>(x, N, K, [&](int64_t n0, GemmRows& g) { unpack_q4_rows(W, S, Z, K, group_size, n0, N, g); });
  }
#endif
  return linear_op(x, N, K, K / 2, [&](auto R, const QuantizedActivations& a, int64_t m0, int64_t n0, int64_t n1,
                                       float* out) { q4_rows<R>(W, S, Z, K, group_size, a, m0, n0, n1, out, N); });
}

}  // namespace llamarun_kernels

namespace {
using llamarun_kernels::q4_linear;
using llamarun_kernels::q8_linear;

// ---- dequantization (the large-batch path feeds the result to a float GEMM) -------------------------
// Rows [row0, row0 + rows) of W as float32 [rows, K].
at::Tensor q8_dequant(const at::Tensor& qweight, const at::Tensor& scales, int64_t group_size, int64_t row0, int64_t rows) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous(), "int8 qweight must be contiguous int8 [out, in]");
  const int64_t N = qweight.size(0), K = qweight.size(1), G = group_size;
  TORCH_CHECK(G > 0 && K % G == 0 && is_f16_storage(scales) && scales.is_contiguous() &&
                  scales.size(0) == N && scales.size(1) == K / G, "scales must be float16 [out, in / group_size]");
  if (rows < 0) rows = N - row0;
  TORCH_CHECK(row0 >= 0 && row0 + rows <= N, "row range out of bounds");
  at::Tensor out = at::empty({rows, K}, qweight.options().dtype(at::kFloat));
  const int8_t* W = qweight.data_ptr<int8_t>() + row0 * K;
  const uint16_t* S = f16_bits(scales) + row0 * (K / G);
  float* o = out.data_ptr<float>();
  parallel_rows(rows, grain_rows(K * 4), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < K / G; ++g) {
        const float s = h2f(S[n * (K / G) + g]);
        const int8_t* w = W + n * K + g * G;
        float* dst = o + n * K + g * G;
        for (int64_t j = 0; j < G; ++j) dst[j] = float(w[j]) * s;
      }
  });
  return out;
}

at::Tensor q4_dequant(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins, int64_t group_size,
                      int64_t row0, int64_t rows) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(), "int4 qweight must be contiguous uint8 [out, in / 2]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = group_size;
  TORCH_CHECK(K % QK == 0 && G > 0 && G % QK == 0 && K % G == 0, "int4 needs group_size a multiple of 32 dividing in_features");
  TORCH_CHECK(is_f16_storage(scales) && is_f16_storage(mins) && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.size(0) == N && scales.size(1) == K / G && mins.sizes() == scales.sizes(),
              "scales/mins must be float16 [out, in / group_size]");
  if (rows < 0) rows = N - row0;
  TORCH_CHECK(row0 >= 0 && row0 + rows <= N, "row range out of bounds");
  at::Tensor out = at::empty({rows, K}, qweight.options().dtype(at::kFloat));
  const uint8_t* W = qweight.data_ptr<uint8_t>() + row0 * (K / 2);
  const uint16_t* S = f16_bits(scales) + row0 * (K / G);
  const uint16_t* Z = f16_bits(mins) + row0 * (K / G);
  float* o = out.data_ptr<float>();
  const int64_t bpg = G / QK;
  parallel_rows(rows, grain_rows(K * 4), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < K / QK; ++b) {
        const float s = h2f(S[n * (K / G) + b / bpg]), z = h2f(Z[n * (K / G) + b / bpg]);
        const uint8_t* w = W + n * (K / 2) + b * (QK / 2);
        float* dst = o + n * K + b * QK;
#ifdef LLAMARUN_AVX2
        // Byte j holds element j (low nibble) and element j + 16 (high nibble): 8 elements per widening.
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w)), mask = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int i = 0; i < 4; ++i)
          _mm256_storeu_ps(dst + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), vs, vz));
#else
        for (int64_t j = 0; j < QK / 2; ++j) {
          dst[j] = float(w[j] & 0x0F) * s + z;
          dst[j + QK / 2] = float(w[j] >> 4) * s + z;
        }
#endif
      }
  });
  return out;
}

// ---- int4 quantization of float weights ------------------------------------------------------------
// The same search as llamarun.quantize._fit_int4 (llama.cpp's make_qkx2_quants): per group, plain
// min/max rounding, then `steps` scales (15 + delta) / (max - min), delta evenly in [-1, 1], each
// followed by a least-squares refit of (scale, min) to the integers it chose; the candidate with the least
// squared error (closed form from the fit's sums) wins. Then scale and min are rounded to float16 and the
// weights rounded with them. Sums run in a different order than torch's, so a near-tie may pick another
// candidate than the torch code does; both are never worse than min/max rounding.
struct Int4Group {
  float s, m;
};

#ifdef LLAMARUN_AVX2
inline float hmax8(__m256 v) {
  __m128 r = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}
inline float hmin8(__m256 v) {
  __m128 r = _mm_min_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  r = _mm_min_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_min_ss(r, _mm_movehdup_ps(r)));
}
#endif

Int4Group fit_int4_group(const float* w, int64_t G, int64_t steps) {
  float lo, hi, sw, sww;
#ifdef LLAMARUN_AVX2
  {
    __m256 vlo = _mm256_loadu_ps(w), vhi = vlo, vs = _mm256_setzero_ps(), vss = _mm256_setzero_ps();
    for (int64_t j = 0; j < G; j += 8) {
      const __m256 x = _mm256_loadu_ps(w + j);
      vlo = _mm256_min_ps(vlo, x);
      vhi = _mm256_max_ps(vhi, x);
      vs = _mm256_add_ps(vs, x);
      vss = _mm256_fmadd_ps(x, x, vss);
    }
    lo = hmin8(vlo), hi = hmax8(vhi), sw = hsum(vs), sww = hsum(vss);
  }
#else
  lo = w[0], hi = w[0], sw = 0.0f, sww = 0.0f;
  for (int64_t j = 0; j < G; ++j) {
    lo = std::min(lo, w[j]);
    hi = std::max(hi, w[j]);
    sw += w[j];
    sww += w[j] * w[j];
  }
#endif
  const float rng = hi - lo, safe = rng > 0.0f ? rng : 1.0f, g = static_cast<float>(G);
  float best_s = 0.0f, best_m = 0.0f, best_err = 0.0f;
  for (int64_t i = 0; i <= steps; ++i) {
    const float delta = i == 0 ? 0.0f : (steps > 1 ? -1.0f + 2.0f * static_cast<float>(i - 1) / static_cast<float>(steps - 1) : -1.0f);
    const float iscale = (15.0f + delta) / safe;
    float sq, sqq, sqw;
#ifdef LLAMARUN_AVX2
    {
      const __m256 vl = _mm256_set1_ps(lo), vi = _mm256_set1_ps(iscale), zero = _mm256_setzero_ps(),
                   fifteen = _mm256_set1_ps(15.0f);
      __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(), c = _mm256_setzero_ps();
      for (int64_t j = 0; j < G; j += 8) {
        const __m256 x = _mm256_loadu_ps(w + j);
        __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(x, vl), vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(fifteen, _mm256_max_ps(zero, q));
        a = _mm256_add_ps(a, q);
        b = _mm256_fmadd_ps(q, q, b);
        c = _mm256_fmadd_ps(q, x, c);
      }
      sq = hsum(a), sqq = hsum(b), sqw = hsum(c);
    }
#else
    sq = 0.0f, sqq = 0.0f, sqw = 0.0f;
    for (int64_t j = 0; j < G; ++j) {
      const float q = std::min(15.0f, std::max(0.0f, std::nearbyint((w[j] - lo) * iscale)));
      sq += q;
      sqq += q * q;
      sqw += q * w[j];
    }
#endif
    float s, m;
    if (i == 0) {
      s = rng / 15.0f;
      m = lo;
    } else {
      const float det = g * sqq - sq * sq;
      if (det > 0.0f) {
        s = std::max(0.0f, (g * sqw - sq * sw) / det);
        m = (sw - s * sq) / g;
      } else {
        s = best_s;
        m = best_m;
      }
    }
    const float err = sww - 2 * s * sqw - 2 * m * sw + s * s * sqq + 2 * s * m * sq + g * m * m;
    if (i == 0 || err < best_err) {
      best_s = s;
      best_m = m;
      best_err = err;
    }
  }
  return {best_s, best_m};
}

std::vector<at::Tensor> quantize_int4_op(const at::Tensor& w, int64_t group_size, int64_t steps) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2, "w must be float32 [N, K] on the CPU");
  const int64_t N = w.size(0), K = w.size(1), G = group_size;
  TORCH_CHECK(K % QK == 0 && G > 0 && G % QK == 0 && K % G == 0, "int4 needs group_size a multiple of 32 dividing in_features");
  const at::Tensor wc = w.contiguous();
  at::Tensor q = at::empty({N, K / 2}, w.options().dtype(at::kByte));
  at::Tensor sc = at::empty({N, K / G}, w.options().dtype(at::kShort));
  at::Tensor mn = at::empty({N, K / G}, w.options().dtype(at::kShort));
  const float* W = wc.data_ptr<float>();
  uint8_t* Q = q.data_ptr<uint8_t>();
  uint16_t* S = static_cast<uint16_t*>(sc.data_ptr());
  uint16_t* Z = static_cast<uint16_t*>(mn.data_ptr());
  std::atomic<bool> overflow{false};
  parallel_rows(N, std::max<int64_t>(1, 4096 / K), [&](int64_t n0, int64_t n1) {
    std::vector<uint8_t> qv(G);
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < K / G; ++g) {
        const float* wg = W + n * K + g * G;
        const Int4Group f = fit_int4_group(wg, G, steps);
        const c10::Half s16(f.s), m16(f.m);
        const float sf = static_cast<float>(s16), mf = static_cast<float>(m16);
        if (std::isinf(sf) || std::isinf(mf)) overflow = true;
        S[n * (K / G) + g] = s16.x;
        Z[n * (K / G) + g] = m16.x;
        if (sf > 0.0f) {
          for (int64_t j = 0; j < G; ++j)
            qv[j] = static_cast<uint8_t>(std::min(15.0f, std::max(0.0f, std::nearbyint((wg[j] - mf) / sf))));
        } else {
          std::fill(qv.begin(), qv.end(), 0);
        }
        uint8_t* dst = Q + n * (K / 2) + g * (G / 2);
        for (int64_t b = 0; b < G / QK; ++b)
          for (int64_t j = 0; j < QK / 2; ++j)
            dst[b * (QK / 2) + j] = static_cast<uint8_t>(qv[b * QK + j] | (qv[b * QK + j + QK / 2] << 4));
      }
  });
  TORCH_CHECK(!overflow.load(), "int4: weight magnitude too large for float16 scales");
  return {q, sc, mn};
}

// The int16 activation quantization on its own (for tests: the exact reference of what the dot products see).
std::vector<at::Tensor> quantize_act_op(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) % QK == 0, "x must be float32 [M, K], K % 32 == 0");
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  QuantizedActivations a;
  quantize_activations(xc.data_ptr<float>(), M, K, a);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kShort));
  at::Tensor d = at::empty({M, K / QK}, x.options());
  at::Tensor s = at::empty({M, K / QK}, x.options());
  std::memcpy(q.data_ptr<int16_t>(), a.q.data(), M * K * sizeof(int16_t));
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(d.data_ptr<float>() + m * (K / QK), a.d.data() + m * a.nbp, (K / QK) * sizeof(float));
    std::memcpy(s.data_ptr<float>() + m * (K / QK), a.s.data() + m * a.nbp, (K / QK) * sizeof(float));
  }
  return {q, d, s};
}

int64_t set_spin_us(int64_t us) { return spin_micros.exchange(static_cast<int>(std::max<int64_t>(0, us))); }

int64_t set_num_threads(int64_t n) {
  const int old = max_threads.exchange(static_cast<int>(std::max<int64_t>(0, n)));
  return old;
}

int64_t simd_level() {
#if defined(LLAMARUN_AVX512)
  return 3;
#elif defined(LLAMARUN_AVX2)
  return 2;
#else
  return 0;
#endif
}

}  // namespace

// The op namespace is a macro so that variants can be built side by side for A/B timing.
#ifndef LLAMARUN_OPS_NS
#define LLAMARUN_OPS_NS llamarun
#endif

TORCH_LIBRARY(LLAMARUN_OPS_NS, m) {
  m.def("q8_linear(Tensor x, Tensor qweight, Tensor scales, int group_size, int batch_rows=0) -> Tensor");
  m.def("q4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int group_size, int batch_rows=0) -> Tensor");
  m.def("bf16_tiles() -> bool", &amx_ready);
  m.def("q8_dequant(Tensor qweight, Tensor scales, int group_size, int row0=0, int rows=-1) -> Tensor");
  m.def("q4_dequant(Tensor qweight, Tensor scales, Tensor mins, int group_size, int row0=0, int rows=-1) -> Tensor");
  m.def("quantize_act(Tensor x) -> Tensor[]");
  m.def("quantize_int4(Tensor w, int group_size, int steps) -> Tensor[]");
  m.def("simd_level() -> int", &simd_level);
  m.def("gemm_min_rows() -> int", &gemm_min_rows);
  m.def("wide_avx512() -> bool", &wide_avx512);
  m.def("set_num_threads(int n) -> int", &set_num_threads);
  m.def("set_spin_us(int us) -> int", &set_spin_us);
}

TORCH_LIBRARY_IMPL(LLAMARUN_OPS_NS, CPU, m) {
  m.impl("q8_linear", &q8_linear);
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_dequant", &q8_dequant);
  m.impl("q4_dequant", &q4_dequant);
  m.impl("quantize_act", &quantize_act_op);
  m.impl("quantize_int4", &quantize_int4_op);
}
