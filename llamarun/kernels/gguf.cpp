// GGUF blocks into llamarun's int4 / int8 layouts while a model loads. llamarun/quantize.py does the same
// conversions in torch (the fallback without a compiler); these give the same bits, ~10x faster: a
// llama-2-7b Q4_K_M file's 6.7 billion weights go through them.
//
//   gguf_to_int4(raw, type, qweight, scales, mins): Q4_K super-blocks [B, 144] -> int4 groups of 32. The
//     4-bit values are copied; each sub-block's scale d * sc and min -(dmin * m) are rounded to float16.
//   gguf_to_int8(raw, type, qweight, scales): Q4_1, Q5_1, Q4_K, Q5_K, Q6_K blocks -> int8 groups of 32:
//     each group dequantized to float32 as ggml does, then quantized like quantize.quantize_int8 (scale
//     max|w| / 127 rounded to float16, values rounded half to even by that scale, clamped to +-127).
//
// raw: uint8 [blocks, bytes per block], contiguous; the outputs: contiguous, written in place (rows of the
// weight being loaded). Products and sums are kept apart (no fused multiply-add): torch computes them as
// separate roundings, and the tests compare bit for bit.

#include <ATen/ATen.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace llamarun_kernels {
namespace {

constexpr int kQ4_1 = 3, kQ5_1 = 7, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;  // ggml's type ids

float f16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

uint16_t f16_bits(float x) { return c10::Half(x).x; }

// Q4_K/Q5_K: the 6-bit scale and min of sub-block j (0..7) from the 12 bytes at s.
void k_scale_min(const uint8_t* s, int j, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
    m = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
  }
}

// Elements and bytes per block of each type gguf_to_int8 takes.
void block_size(int64_t type, int64_t& elems, int64_t& bytes) {
  switch (type) {
    case kQ4_1: elems = 32, bytes = 20; return;
    case kQ5_1: elems = 32, bytes = 24; return;
    case kQ4_K: elems = 256, bytes = 144; return;
    case kQ5_K: elems = 256, bytes = 176; return;
    case kQ6_K: elems = 256, bytes = 210; return;
    default: TORCH_CHECK(false, "gguf_to_int8: unsupported GGUF type ", type);
  }
}

// Group g (32 elements) of block b, as floats (what formats/gguf.py's dequantizers compute). The loops are
// kept plain, with the nibble, bit-field and scale choices hoisted out, so that the compiler vectorizes them.
void dequant_group(int64_t type, const uint8_t* b, int g, float* w) {
  switch (type) {
    case kQ4_1:
    case kQ5_1: {  // [d][m]([fifth bits: 4 bytes, element e = bit e])[16 bytes: elements 0..15 low nibbles, 16..31 high]
      const float d = f16(b), m = f16(b + 2);
      const uint8_t* qs = b + (type == kQ4_1 ? 4 : 8);
      uint32_t qh = 0;
      if (type == kQ5_1) std::memcpy(&qh, b + 4, 4);
      for (int e = 0; e < 16; ++e) w[e] = static_cast<float>((qs[e] & 0x0F) | (((qh >> e) & 1) << 4)) * d + m;
      for (int e = 0; e < 16; ++e) w[16 + e] = static_cast<float>((qs[e] >> 4) | (((qh >> (16 + e)) & 1) << 4)) * d + m;
      return;
    }
    case kQ4_K:
    case kQ5_K: {  // [d][dmin][scales: 12]([fifth bits: 32])[qs: 128 = 4 runs of 32, low then high nibbles]
      uint8_t sc, mn;
      k_scale_min(b + 4, g, sc, mn);
      const float a = f16(b) * static_cast<float>(sc), c = f16(b + 2) * static_cast<float>(mn);
      const uint8_t* qs = b + (type == kQ4_K ? 16 : 48) + (g / 2) * 32;
      const int shift = g % 2 ? 4 : 0, five = type == kQ5_K;
      for (int e = 0; e < 32; ++e) {
        const int q = ((qs[e] >> shift) & 0x0F) | (five ? ((b[16 + e] >> g) & 1) << 4 : 0);
        w[e] = a * static_cast<float>(q) - c;
      }
      return;
    }
    case kQ6_K: {  // [ql: 128][qh: 64][scales: 16 x int8][d]; see formats/gguf.py q6_k_values
      // Group g: half g / 4 of the block; its low nibbles are 32 bytes of that half's 64 (byte run g % 2,
      // high nibbles for g % 4 >= 2), its 2-bit high parts field g % 4 of the half's 32 qh bytes.
      const float d = f16(b + 208);
      const uint8_t* ql = b + (g / 4) * 64 + (g % 2) * 32;
      const uint8_t* qh = b + 128 + (g / 4) * 32;
      const int shift_lo = g % 4 >= 2 ? 4 : 0, shift_hi = 2 * (g % 4);
      for (int half = 0; half < 2; ++half) {
        const float s = d * static_cast<float>(static_cast<int8_t>(b[192 + 2 * g + half]));
        for (int e = 16 * half; e < 16 * half + 16; ++e) {
          const int q = ((ql[e] >> shift_lo) & 0x0F) | (((qh[e] >> shift_hi) & 3) << 4);
          w[e] = s * static_cast<float>(q - 32);
        }
      }
      return;
    }
  }
}

// One int8 group of 32, as quantize.quantize_int8 makes it: the scale max|w| / 127 rounded to float16
// (returned as its bits), values w / scale rounded half to even and clamped to +-127; all zero when the
// scale is not > 0 (an all-zero group, or NaN).
uint16_t int8_group(const float* w, int8_t* q) {
  uint32_t amax_bits = 0;  // |w| compares like its bits with the sign cleared, and a NaN comes out on top
  for (int e = 0; e < 32; ++e) {
    uint32_t u;
    std::memcpy(&u, w + e, 4);
    amax_bits = std::max(amax_bits, u & 0x7FFFFFFFu);
  }
  float amax;
  std::memcpy(&amax, &amax_bits, 4);
  const uint16_t s16 = f16_bits(amax / 127.0f);
  const float sf = c10::detail::fp16_ieee_to_fp32_value(s16);
  if (!(sf > 0.0f)) {
    std::memset(q, 0, 32);
    return s16;
  }
#if defined(__AVX2__)
  const __m256 vs = _mm256_set1_ps(sf), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  __m256i r[4];
  for (int j = 0; j < 4; ++j) {
    const __m256 x = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(w + 8 * j), vs),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r[j] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, x)));
  }
  // The packs interleave 128-bit lanes: dwords of (r0 r1 r2 r3)[0..3] then [4..7]; put them back in order.
  const __m256i c = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
  for (int e = 0; e < 32; ++e) q[e] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(w[e] / sf))));
#endif
  return s16;
}

void gguf_to_int8(const at::Tensor& raw, int64_t type, const at::Tensor& qweight, const at::Tensor& scales) {
  int64_t elems, bytes;
  block_size(type, elems, bytes);
  TORCH_CHECK(raw.is_cpu() && raw.scalar_type() == at::kByte && raw.is_contiguous() && raw.dim() == 2 &&
                  raw.size(1) == bytes, "gguf_to_int8: raw must be contiguous uint8 [blocks, ", bytes, "]");
  const int64_t B = raw.size(0), groups = B * elems / 32;
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && qweight.numel() == groups * 32,
              "gguf_to_int8: qweight must be contiguous int8 with one value per weight");
  TORCH_CHECK(scales.scalar_type() == at::kShort && scales.is_contiguous() && scales.numel() == groups,
              "gguf_to_int8: scales must be contiguous int16 with one per 32 weights");
  const uint8_t* R = raw.data_ptr<uint8_t>();
  int8_t* Q = qweight.data_ptr<int8_t>();
  uint16_t* S = static_cast<uint16_t*>(scales.data_ptr());
  std::atomic<bool> overflow{false};
  parallel_rows(B, std::max<int64_t>(1, 2048 / elems), [&](int64_t b0, int64_t b1) {
    float w[32];
    for (int64_t b = b0; b < b1; ++b)
      for (int g = 0; g < elems / 32; ++g) {
        dequant_group(type, R + b * bytes, g, w);
        const int64_t k = b * (elems / 32) + g;
        S[k] = int8_group(w, Q + k * 32);
        if (std::isinf(c10::detail::fp16_ieee_to_fp32_value(S[k]))) overflow = true;
      }
  });
  TORCH_CHECK(!overflow.load(), "int8: weight magnitude too large for float16 scales");
}

void gguf_to_int4(const at::Tensor& raw, int64_t type, const at::Tensor& qweight, const at::Tensor& scales,
                  const at::Tensor& mins) {
  TORCH_CHECK(type == kQ4_K, "gguf_to_int4: unsupported GGUF type ", type);
  TORCH_CHECK(raw.is_cpu() && raw.scalar_type() == at::kByte && raw.is_contiguous() && raw.dim() == 2 &&
                  raw.size(1) == 144, "gguf_to_int4: raw must be contiguous uint8 [blocks, 144]");
  const int64_t B = raw.size(0);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.numel() == B * 128,
              "gguf_to_int4: qweight must be contiguous uint8 with one byte per two weights");
  TORCH_CHECK(scales.scalar_type() == at::kShort && scales.is_contiguous() && scales.numel() == B * 8 &&
                  mins.scalar_type() == at::kShort && mins.is_contiguous() && mins.numel() == B * 8,
              "gguf_to_int4: scales and mins must be contiguous int16 with one per 32 weights");
  const uint8_t* R = raw.data_ptr<uint8_t>();
  uint8_t* Q = qweight.data_ptr<uint8_t>();
  uint16_t* S = static_cast<uint16_t*>(scales.data_ptr());
  uint16_t* M = static_cast<uint16_t*>(mins.data_ptr());
  std::atomic<bool> overflow{false};
  parallel_rows(B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* blk = R + b * 144;
      const float d = f16(blk), dmin = f16(blk + 2);
      for (int g = 0; g < 8; ++g) {
        uint8_t sc, mn;
        k_scale_min(blk + 4, g, sc, mn);
        const uint16_t s16 = f16_bits(d * static_cast<float>(sc)), m16 = f16_bits(-(dmin * static_cast<float>(mn)));
        if (std::isinf(c10::detail::fp16_ieee_to_fp32_value(s16)) || std::isinf(c10::detail::fp16_ieee_to_fp32_value(m16)))
          overflow = true;
        S[b * 8 + g] = s16;
        M[b * 8 + g] = m16;
        // The run of 32 bytes holds sub-block 2r in its low nibbles and 2r+1 in its high ones; a 32-group
        // packs element i with element i + 16 (GGUF Q4_1's order).
        const uint8_t* run = blk + 16 + (g / 2) * 32;
        uint8_t* dst = Q + (b * 8 + g) * 16;
        for (int i = 0; i < 16; ++i) {
          const int lo = g % 2 ? run[i] >> 4 : run[i] & 0x0F, hi = g % 2 ? run[i + 16] >> 4 : run[i + 16] & 0x0F;
          dst[i] = static_cast<uint8_t>(lo | (hi << 4));
        }
      }
    }
  });
  TORCH_CHECK(!overflow.load(), "Q4_K scales too large to express in float16");
}

}  // namespace
}  // namespace llamarun_kernels

#ifndef LLAMARUN_OPS_NS
#define LLAMARUN_OPS_NS llamarun
#endif

TORCH_LIBRARY_FRAGMENT(LLAMARUN_OPS_NS, m) {
  m.def("gguf_to_int8(Tensor raw, int type, Tensor(a!) qweight, Tensor(b!) scales) -> ()");
  m.def("gguf_to_int4(Tensor raw, int type, Tensor(a!) qweight, Tensor(b!) scales, Tensor(c!) mins) -> ()");
}

TORCH_LIBRARY_IMPL(LLAMARUN_OPS_NS, CPU, m) {
  m.impl("gguf_to_int8", &llamarun_kernels::gguf_to_int8);
  m.impl("gguf_to_int4", &llamarun_kernels::gguf_to_int4);
}
