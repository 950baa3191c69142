// The whole decoder stack for one decode step, in one op: what llamarun/model.py's TransformerBlock does
// for one new token per row, layer after layer, with the library's kernels.
//
// At batch 1 a layer's arithmetic is ~0.25 ms for SmolLM2 and ~0.1 ms for stories15M, while calling its
// ten ops from Python (module calls, argument parsing, dispatch) costs ~0.1 ms more: a third of the
// decode step. Here the layer loop runs in C++ and each op is a plain function call.
//
//   decode_layers(x [B, 1, D], weights, kinds, rope [1, hd/2, 2], k_caches, v_caches, pos, H, K, eps,
//                 k_scales, v_scales) -> [B, 1, D], or logits [B, 1, V] with the head
//   Per layer l (L = len(k_caches) layers), weights[14 l ...] holds
//       attention_norm.weight, ffn_norm.weight, then 3 tensors for each of wqkv, wo, w13, w2:
//       float32 or bfloat16 (weight, -, -), int8 (qweight, scales, -), int4 (qweight, scales, mins)
//   ("-": any tensor, unused), and kinds[12 l ...] holds (bits, group_size, batch_rows) for the same four
//   linears, bits 32, 8 or 4 (batch_rows: see q4_linear). The caches are written at `pos` (see attn_decode in
//   fused.cpp); int8 caches come with their scales, one per layer in k_scales and v_scales (else both empty).
//   Optionally the model's head follows the layers: 4 more weights (norm.weight, then output's 3 tensors
//   as above) and 3 more kinds. With it the op returns logits [B, 1, V] = output(norm(h)) instead of h:
//   the final norm and the output projection then cost no Python either (after a step has streamed the
//   weights through the caches, each small op called from Python costs ~30-40 us).
//
// Every op keeps its own checks; llamarun/fastpath.py decides when this path applies.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

using namespace llamarun_kernels;

constexpr int64_t kWeightsPerLayer = 14, kKindsPerLayer = 12, kKindsPerLinear = 3;

// The linear whose 3 tensors start at t and whose (bits, group size) start at k.
at::Tensor linear(const at::Tensor& x, const at::Tensor* t, const int64_t* k) {
  const int64_t bits = k[0], group = k[1], batch_rows = k[2];
  switch (bits) {
    case 4: return q4_linear(x, t[0], t[1], t[2], group, batch_rows);
    case 8: return q8_linear(x, t[0], t[1], group, batch_rows);
    case 32: return f32_linear(x, t[0]);
    default: TORCH_CHECK(false, "decode_layers: unknown linear kind ", bits);
  }
}

// linear j (0 wqkv, 1 wo, 2 w13, 3 w2) of the layer whose weights start at w and kinds at k.
at::Tensor linear(const at::Tensor& x, const at::Tensor* w, const int64_t* k, int j) {
  return linear(x, w + 2 + 3 * j, k + kKindsPerLinear * j);
}

at::Tensor decode_layers(const at::Tensor& x, at::TensorList weights, at::IntArrayRef kinds, const at::Tensor& rope,
                         at::TensorList k_caches, at::TensorList v_caches, int64_t pos, int64_t n_heads,
                         int64_t n_kv_heads, double eps, at::TensorList k_scales, at::TensorList v_scales) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  const int64_t nw = static_cast<int64_t>(weights.size()), nk = static_cast<int64_t>(kinds.size());
  const bool head = nw == kWeightsPerLayer * L + 4 && nk == kKindsPerLayer * L + kKindsPerLinear;
  TORCH_CHECK(static_cast<int64_t>(v_caches.size()) == L &&
                  (head || (nw == kWeightsPerLayer * L && nk == kKindsPerLayer * L)),
              "decode_layers: expected ", kWeightsPerLayer, " weights, ", kKindsPerLayer,
              " kinds and two caches per layer (and optionally 4 weights and 3 kinds for the head)");
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_layers: x must be [B, 1, dim]");
  const bool scaled = !k_scales.empty();
  TORCH_CHECK(static_cast<int64_t>(k_scales.size()) == (scaled ? L : 0) && v_scales.size() == k_scales.size(),
              "decode_layers: k_scales and v_scales hold one tensor per layer (int8 caches), or none");
  at::Tensor h = x.contiguous().clone();  // the residual stream, updated in place
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + kWeightsPerLayer * l;
    const int64_t* k = kinds.data() + kKindsPerLayer * l;
    // h = h + wo(attention(wqkv(norm(h))));  h = h + w2(silu(w1 .) * w3 .)(norm(h))
    const at::Tensor attn = attn_decode(linear(rms_norm(h, w[0], eps), w, k, 0), k_caches[l], v_caches[l], rope,
                                        pos, n_heads, n_kv_heads, scaled ? std::optional(k_scales[l]) : std::nullopt,
                                        scaled ? std::optional(v_scales[l]) : std::nullopt);
    h.add_(linear(attn, w, k, 1));
    h.add_(linear(silu_mul(linear(rms_norm(h, w[1], eps), w, k, 2)), w, k, 3));
  }
  if (head) return linear(rms_norm(h, weights[nw - 4], eps), weights.data() + nw - 3, kinds.data() + nk - kKindsPerLinear);
  return h;
}

}  // namespace

#ifndef LLAMARUN_OPS_NS
#define LLAMARUN_OPS_NS llamarun
#endif

TORCH_LIBRARY_FRAGMENT(LLAMARUN_OPS_NS, m) {
  m.def("decode_layers(Tensor x, Tensor[] weights, int[] kinds, Tensor rope, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, int pos, int n_heads, int n_kv_heads, float eps, Tensor(c!)[] k_scales, "
        "Tensor(d!)[] v_scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(LLAMARUN_OPS_NS, CPU, m) { m.impl("decode_layers", &decode_layers); }
