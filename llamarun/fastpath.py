"""The CPU fast path: model modules that do their float32 math in fused C++ kernels.

At batch 1 a decode step of a small model is mostly dispatch overhead: RMSNorm, rotary embeddings, the
cache update, attention and SwiGLU are each chains of 5-20 tiny torch ops (about 60 per layer), against
one fused op each in :mod:`llamarun.kernels` (fused.cpp); and an unquantized model's matrix-vector
products stream their weights faster through the pool's threads than through MKL's gemv. Even then,
calling a layer's ten ops from Python costs about as much as a small layer's arithmetic, so a decode step
runs the whole layer stack in one op (``decode_layers``, layers.cpp; :class:`FastTransformer`).

:func:`accelerate` switches a model's modules to the subclasses below, in place (same parameters, same
buffers). ``model.py`` stays the definition: every subclass falls back to it for anything but float32 on
the CPU (and, for attention and the layer stack, anything but one new token per row with a cache), and
tests compare the two paths.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from . import kernels
from .model import Attention, FeedForward, RMSNorm, Transformer
from .quantize import QuantizedLinear

_BITS = {"int8": 8, "int4": 4}  # decode_layers' code for each quantized linear layer's kernel


def _cpu_f32(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.float32


def _kv_ok(cache) -> bool:
    """A KV cache the kernels' attention reads: float32, float16 or int8 (with its scales) on the CPU."""
    return cache.k.is_cpu and cache.k.dtype in (torch.float32, torch.float16, torch.int8)


class FastRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_f32(x) and self.weight.dtype == torch.float32:
            return torch.ops.llamarun.rms_norm(x if x.is_contiguous() else x.contiguous(), self.weight, self.eps)
        return super().forward(x)


def _own_prefill_attention(attn: Attention) -> bool:
    """Whether prefill attention runs as the kernels' ``attn_prefill`` (float32, causal, over the cache):
    everywhere but where it would replace torch's bf16 flash attention on a CPU with AMX tiles (0.9 ms for
    SmolLM2's 512 tokens x 9 heads on Sapphire Rapids, where AVX2 float32 cannot keep up)."""
    return attn.prefill_dtype is None or not kernels.bf16_tiles()


class FastAttention(Attention):
    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache is not None and isinstance(start_pos, int) and _cpu_f32(x) and _kv_ok(cache):
            if x.shape[1] == 1:
                # qkv [B, 1, (H + 2K) D] -> rotary, cache write at start_pos, attention over 0..start_pos: one op.
                out = torch.ops.llamarun.attn_decode(self.wqkv(x).contiguous(), cache.k, cache.v, rope, start_pos,
                                                     self.n_heads, self.n_kv_heads, cache.k_scale, cache.v_scale)
                return self.wo(out)
            if self.head_dim % 8 == 0 and _own_prefill_attention(self):
                # Prefill: the cache write (one op, converting as attn_decode does), then causal attention over
                # the cache in the kernels' own pool (torch's CPU flash attention is an OpenMP region, whose
                # spinning threads then compete with the pool's for the cores in the matrix products around it).
                q, k, v = self.project(x, rope)
                torch.ops.llamarun.kv_store(k, v, cache.k, cache.v, start_pos, cache.k_scale, cache.v_scale)
                return self.wo(torch.ops.llamarun.attn_prefill(q, cache.k, cache.v, start_pos, cache.k_scale,
                                                               cache.v_scale))
        return super().forward(x, rope, start_pos)

    def _rope(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        if _cpu_f32(x) and _cpu_f32(rope) and rope.is_contiguous() and x.stride(-1) == 1:
            return torch.ops.llamarun.rope(x, rope)  # one op instead of ten (prefill)
        return super()._rope(x, rope)


class FastFeedForward(FeedForward):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_f32(x):
            return self.w2(torch.ops.llamarun.silu_mul(self.w13(x).contiguous()))
        return super().forward(x)


class FastLinear(nn.Linear):
    """float32 weights on the CPU: ``f32_linear``, which makes a pass over the weight at memory bandwidth for
    1-4 rows (an unquantized model decoding) instead of MKL's gemv, and leaves more rows to MKL's GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if _cpu_f32(x) and w.dtype == torch.float32 and self.bias is None and w.is_contiguous():
            return torch.ops.llamarun.f32_linear(x if x.is_contiguous() else x.contiguous(), w)
        return super().forward(x)


class Bf16Linear(nn.Linear):
    """A bfloat16 weight under float32 activations (an unquantized model on a CPU with the kernels, dtype
    'auto'; see :func:`bf16_weights`): decode rows stream the weight through ``f32_linear`` at half float32's
    bytes, widened in registers (stories15M: 2.2x torch's bf16 decode on Zen 4, 2x float32 weights on Zen 3),
    and 5+ rows (prefill, batches) are bf16 GEMMs with x rounded to bf16, float32 out, as in the quantized
    layers' dense path, where the CPU has native bf16 (``kernels.bf16_gemm``); else up to 32 rows stay in
    the pool (decode batches) and more (prefill) are float32 GEMMs over the weight widened a tile at a
    time. Elsewhere (no kernels, another device or dtype) the weight is cast to the activations' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if _cpu_f32(x) and w.is_cpu and w.dtype == torch.bfloat16 and self.bias is None and w.is_contiguous():
            return torch.ops.llamarun.f32_linear(x if x.is_contiguous() else x.contiguous(), w)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Bf16Embedding(nn.Module):
    """Token embedding over a bfloat16 table (shared with a tied output layer), the looked-up rows widened to
    float32. ``weight`` is a zero-size float32 placeholder carrying the activations' device and dtype, as in
    :class:`~llamarun.quantize.QuantizedEmbedding`."""

    def __init__(self, table: nn.Parameter) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.shape
        self.register_buffer("weight", torch.empty(0, device=table.device), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.table).float()


def bf16_weights(model: Transformer) -> None:
    """Turn a model built in bfloat16 into bfloat16 weights under float32 activations, in place: the linear
    layers become :class:`Bf16Linear` and the embedding :class:`Bf16Embedding` (same tensors, a tied output
    keeps sharing the table), the norms' weights (a few KiB) float32. Decode then runs the fused float32
    path (one op for the layer stack) over half float32's weight bytes; the float32 activations and KV cache
    round less than bf16 ones. Prefill's attention follows the quantized models' (``Attention.prefill_dtype``:
    torch's bf16 flash attention with AMX, else the kernels' float32 ``attn_prefill``). Needs the kernels
    (:func:`llamarun.kernels.available`)."""
    if not kernels.available():
        raise RuntimeError(f"bf16_weights needs llamarun's CPU kernels ({kernels.reason()})")
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.weight = nn.Parameter(m.weight.detach().float(), requires_grad=False)
        elif type(m) in (nn.Linear, FastLinear):
            m.__class__ = Bf16Linear
        elif isinstance(m, Attention):  # prefill's attention products in bf16 too, as quantize.set_dense_dtype
            m.prefill_dtype = torch.bfloat16  # (torch's bf16 flash attention where AMX has it, else attn_prefill)
    model.rope = model.rope.float()  # (float32 already, unless the whole model was cast)
    emb = model.tok_embeddings
    if isinstance(emb, nn.Embedding):
        model.tok_embeddings = Bf16Embedding(emb.weight)
    if isinstance(model, FastTransformer):
        model._stacks = None


def _linear_spec(lin: nn.Module, rows: int) -> tuple[int, int, int, tuple[torch.Tensor, ...]] | None:
    """(bits, group size, bf16 tile rows, 3 weight tensors) of a linear layer for ``decode_layers``, or None
    if the op cannot run it as its own forward would (another dtype or device, a bias, the dense path)."""
    if isinstance(lin, QuantizedLinear) and lin.mode in _BITS:
        if not (lin.qweight.is_cpu and rows < lin.dense_min_rows and lin._kernel_ok()):
            return None
        # What the layer passes its own kernel: tensors, group size, tile rows.
        *tensors, group, tiles = lin._kernel_args()[1]
        return _BITS[lin.mode], group, tiles, tuple(tensors) + (tensors[0],) * (3 - len(tensors))
    if type(lin) in (FastLinear, Bf16Linear) and lin.bias is None:  # f32_linear: float32 or bf16 weights
        w = lin.weight
        if w.is_cpu and w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous():
            return 32, 0, 0, (w, w, w)
    return None


def torch_gemm_rows(model: nn.Module) -> int:
    """The fewest activation rows for which the layers' products are torch's GEMMs (OpenMP threads) rather
    than the kernels' pool: float weights past ``f32_linear``'s pool rows, quantized ones on their dense
    path (judged by the first layer's w13; 1 for plain torch layers, a huge number when never)."""
    lin = getattr(getattr(getattr(model, "layers", [None])[0], "feed_forward", None), "w13", None)
    if isinstance(lin, QuantizedLinear):
        return lin.dense_min_rows
    if type(lin) in (Bf16Linear, FastLinear):
        return kernels.f32_pool_rows(type(lin) is Bf16Linear) + 1
    return 1


class FastTransformer(Transformer):
    """A decode step (one new token per row, an int position, a cache) runs the whole layer stack in one
    C++ op, ``decode_layers`` (kernels/layers.cpp): no Python between the layers' ops. Anything else, or a
    model the op cannot run as is (other dtypes or devices, batches on the dense path), takes
    Transformer.forward; so does any step while a forward hook or pre-hook is registered on a layer or
    anything inside one (or globally), so hooks always fire.

    The op's argument lists are gathered once and kept until the KV cache is reallocated or the model is
    moved or cast (``_apply``); gathering costs ~40 us a layer, as much as a small layer's arithmetic.
    Replacing modules or parameters of an accelerated model in place is not tracked: call
    :func:`accelerate` again afterwards (it starts from a fresh gathering)."""

    _stacks: dict | None = None  # row count -> the op's lists, or None where it can't run

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, last_only: bool = False,
                logits: bool = True) -> torch.Tensor:
        if isinstance(start_pos, int) and tokens.shape[1] == 1 and tokens.is_cpu and logits:
            stack = self._decode_stack(tokens.shape[0])
            if stack is not None and not _hooked(stack[4]):
                h = self.tok_embeddings(tokens)
                if _cpu_f32(h):
                    a = self.args
                    h = torch.ops.llamarun.decode_layers(h, *stack[:2], self.rope[start_pos : start_pos + 1],
                                                         *stack[2:4], start_pos, a.n_heads, a.n_kv_heads, a.norm_eps,
                                                         *stack[6])
                    return h if stack[5] else self.head(h)  # stack[5]: the op ran the head
        return super().forward(tokens, start_pos, last_only, logits)

    def _apply(self, fn, *args, **kwargs):
        self._stacks = None
        return super()._apply(fn, *args, **kwargs)

    def setup_cache(self, batch: int, max_seq_len: int, dtype: torch.dtype | None = None,
                    zeros: Callable[..., torch.Tensor] = torch.zeros) -> None:
        if not self.cache_fits(batch, max_seq_len, dtype):
            self._stacks = None  # they hold the old cache: let it go before the new one is allocated
        super().setup_cache(batch, max_seq_len, dtype, zeros)

    def free_cache(self) -> None:
        self._stacks = None
        super().free_cache()

    def _decode_stack(self, rows: int) -> tuple | None:
        """The op's (weights, kinds, k_caches, v_caches) for ``rows`` rows, the hook dicts of the modules it
        runs (for the hook check), whether it runs the head (final norm and output) too, and the caches'
        (k_scales, v_scales) (int8 caches; else empty); or None if the op can't run the layers."""
        stacks = self._stacks
        if stacks is None:
            stacks = self._stacks = {}
        if rows not in stacks:
            stacks[rows] = _gather_stack(self, rows)
        return stacks[rows]


def _hooked(hook_dicts: list[dict]) -> bool:
    """Is a forward (pre-)hook registered globally, or in any of ``hook_dicts`` (the layers' modules'
    ``_forward_hooks`` and ``_forward_pre_hooks``, gathered once)? ``any`` over the dicts themselves tests
    each in C: ~5 us for SmolLM2's 600, against ~33 us for a generator over the modules."""
    return bool(_global_forward_hooks or _global_forward_pre_hooks or any(hook_dicts))


def _gather_stack(model: Transformer, rows: int) -> tuple | None:
    """Walk the layers once: the op's argument lists, or None at the first thing it can't run. The head
    (final norm and output) joins them when the op can run it too; else Python runs it after the op."""
    weights, kinds, kc, vc, ks, vs = [], [], [], [], [], []
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        cache = attn.cache
        if (cache is None or not _kv_ok(cache)
                or type(attn) is not FastAttention or type(ff) is not FastFeedForward):
            return None
        norms = (layer.attention_norm.weight, layer.ffn_norm.weight)
        if not (_cpu_f32(norms[0]) and _cpu_f32(norms[1])):
            return None
        weights += norms
        for lin in (attn.wqkv, attn.wo, ff.w13, ff.w2):
            spec = _linear_spec(lin, rows)
            if spec is None:
                return None
            kinds += spec[:3]
            weights += spec[3]
        kc.append(cache.k)
        vc.append(cache.v)
        if cache.k_scale is not None:
            ks.append(cache.k_scale)
            vs.append(cache.v_scale)
    modules = [m for layer in model.layers for m in layer.modules()]
    norm, out = model.norm, _linear_spec(model.output, rows)
    head = (type(norm) is FastRMSNorm and norm.eps == model.args.norm_eps and _cpu_f32(norm.weight)
            and out is not None)
    if head:
        weights += (norm.weight,) + out[3]
        kinds += out[:3]
        modules += [norm, model.output]
    hooks = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
    return weights, kinds, kc, vc, hooks, head, (ks, vs)


_FAST = {RMSNorm: FastRMSNorm, Attention: FastAttention, FeedForward: FastFeedForward, nn.Linear: FastLinear,
         Transformer: FastTransformer}


def accelerate(model: nn.Module) -> int:
    """Switch ``model``'s RMSNorm, Attention, FeedForward and float nn.Linear modules to their fused-kernel
    versions, when the kernels are available (see :func:`llamarun.kernels.reason`). Returns how many were
    switched."""
    if not kernels.available():
        return 0
    switched = 0
    for module in model.modules():
        fast = _FAST.get(type(module))
        if fast is not None:
            module.__class__ = fast  # same attributes, new forward: no copy, no re-registration
            switched += 1
        if isinstance(module, FastTransformer):
            module._stacks = None
    return switched


def reference(model: nn.Module) -> None:
    """Undo :func:`accelerate`: back to the plain torch code of model.py."""
    slow = {v: k for k, v in _FAST.items()}
    for module in model.modules():
        if type(module) in slow:
            module.__class__ = slow[type(module)]


