"""The CPU fast path: model modules that do their float32 math in fused C++ kernels.

At batch 1 a decode step of a small model is mostly dispatch overhead: RMSNorm, rotary embeddings, the
cache update, attention and SwiGLU are each chains of 5-20 tiny torch ops (about 60 per layer), against
one fused op each in :mod:`llamarun.kernels` (fused.cpp); and an unquantized model's matrix-vector
products stream their weights faster through the pool's threads than through MKL's gemv. :func:`accelerate` switches a model's modules
to the subclasses below, in place (same parameters, same buffers). ``model.py`` stays the definition:
every subclass falls back to it for anything but float32 on the CPU (and, for attention, anything but
one new token per row with a cache), and tests compare the two paths.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .model import Attention, FeedForward, RMSNorm


def _cpu_f32(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.float32


class FastRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_f32(x) and self.weight.dtype == torch.float32:
            return torch.ops.llamarun.rms_norm(x if x.is_contiguous() else x.contiguous(), self.weight, self.eps)
        return super().forward(x)


class FastAttention(Attention):
    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if (x.shape[1] == 1 and cache is not None and isinstance(start_pos, int) and _cpu_f32(x)
                and cache.k.dtype == torch.float32):
            # qkv [B, 1, (H + 2K) D] -> rotary, cache write at start_pos, attention over 0..start_pos: one op.
            out = torch.ops.llamarun.attn_decode(self.wqkv(x).contiguous(), cache.k, cache.v, rope, start_pos,
                                                 self.n_heads, self.n_kv_heads)
            return self.wo(out)
        return super().forward(x, rope, start_pos)


class FastFeedForward(FeedForward):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_f32(x):
            return self.w2(torch.ops.llamarun.silu_mul(self.w13(x).contiguous()))
        return super().forward(x)


class FastLinear(nn.Linear):
    """float32 weights at batch 1-4 (an unquantized model decoding): a pass over the weight at memory
    bandwidth instead of MKL's gemv; larger inputs (prefill) stay with MKL's GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (_cpu_f32(x) and w.dtype == torch.float32 and self.bias is None and x.numel() <= 4 * self.in_features
                and w.is_contiguous()):
            return torch.ops.llamarun.f32_linear(x if x.is_contiguous() else x.contiguous(), w)
        return super().forward(x)


_FAST = {RMSNorm: FastRMSNorm, Attention: FastAttention, FeedForward: FastFeedForward, nn.Linear: FastLinear}


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
    return switched


def reference(model: nn.Module) -> None:
    """Undo :func:`accelerate`: back to the plain torch code of model.py."""
    slow = {v: k for k, v in _FAST.items()}
    for module in model.modules():
        if type(module) in slow:
            module.__class__ = slow[type(module)]
