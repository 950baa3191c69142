"""The GPU path for int4 layers: torch's tinygemm kernel (``torch._weight_int4pack_mm``) instead of
dequantizing the whole weight before every product.

A quantized layer's portable forward (:class:`llamarun.quantize.QuantizedLinear`) makes the bf16 weight
and then calls ``F.linear``: a decode step then reads 0.5 byte of int4 weight, writes 2 bytes of bf16 and
reads them again, ~4.5 bytes a weight where bf16 weights would cost 2. tinygemm reads the packed 4-bit
codes and their group scales directly (~0.56 byte a weight), which is what makes a 4-bit model worth
running on a GPU: a llama-2-7b Q4_0 file on a 12 GB card decodes from 3.5 GB of weights a token, not 16.

The layout conversion (our codes in GGUF's nibble order with ``w = q * scale + min`` per 32-block, to
tinygemm's ``w = (q - 8) * scale + zero``, codes two to a byte with column 2j in the high nibble, scales
and zeros as bf16 ``[K / G, N, 2]``) is shared with torch's CPU twin of the kernel
(``_weight_int4pack_mm_for_cpu``, whose packer takes the codes unpacked as int32), so the tests check it on
a CPU. On a GPU every load checks the first layer of each shape against the dequantized product before
using the kernel, and keeps the portable path if they disagree.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import Int4Linear, QuantizedEmbedding, _set_module, _unpack_int4

GROUP_SIZES = (32, 64, 128, 256)  # what tinygemm supports
CHECK_TOLERANCE = 2e-2  # relative error against the dequantized product (bf16 rounding of scales is ~4e-3)


def _ops(device: torch.device) -> tuple[str, str]:
    """The (packer, product) op names for ``device``."""
    if device.type == "cuda":
        return "_convert_weight_to_int4pack", "_weight_int4pack_mm"
    return "_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"


def inner_k_tiles(in_features: int) -> int | None:
    """The largest packing tile count (8, 4, 2) whose tiles (16 inputs each) divide ``in_features``."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    return None


def unsupported(layer: Int4Linear) -> str | None:
    """Why tinygemm cannot run ``layer`` where its weight is, or None if it can."""
    device = layer.qweight.device
    missing = [name for name in _ops(device) if not hasattr(torch, name)]
    if missing:
        return f"torch {torch.__version__} has no torch.{missing[0]}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm needs a GPU of compute capability 8.0 or later"
    n, k = layer.out_features, layer.in_features
    if layer.group_size not in GROUP_SIZES or k % layer.group_size:
        return f"group size {layer.group_size} (tinygemm: {', '.join(map(str, GROUP_SIZES))})"
    # Output rows are packed 8 at a time on CUDA and 16 on the CPU.
    if inner_k_tiles(k) is None or n % (8 if device.type == "cuda" else 16):
        return f"shape [{n}, {k}] (tinygemm packs inputs in 32s and outputs in 8s or 16s)"
    return None


class TinyGemmInt4Linear(nn.Module):
    """An int4 layer run by tinygemm: the same function as the :class:`Int4Linear` it is made from, with
    bf16 activations, scales and zeros. ``weight`` is the packed codes, ``scales_and_zeros`` bf16
    [in / group, out, 2]."""

    mode = "int4"

    def __init__(self, layer: Int4Linear) -> None:
        super().__init__()
        n, k = layer.out_features, layer.in_features
        self.out_features, self.in_features, self.group_size = n, k, layer.group_size
        self.inner_k_tiles = inner_k_tiles(k)
        device = layer.qweight.device
        pack, mm = _ops(device)
        self._mm = getattr(torch, mm)
        q = _unpack_int4(layer.qweight)  # uint8 [N, K] in input order, 0..15
        if device.type == "cuda":
            codes = (q[:, ::2] << 4) | q[:, 1::2]  # two to a byte, the even column in the high nibble
        else:
            codes = q.to(torch.int32)
        del q
        self.register_buffer("weight", getattr(torch, pack)(codes.contiguous(), self.inner_k_tiles))
        del codes
        # w = q * scale + min = (q - 8) * scale + zero with zero = min + 8 * scale (in float32, then bf16).
        scale = layer.scales.view(torch.float16).float()
        zero = layer.mins.view(torch.float16).float() + 8 * scale
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N]; tinygemm takes 2-D bf16 input.
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = self._mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"inner_k_tiles={self.inner_k_tiles}")


def check(layer: Int4Linear, fast: TinyGemmInt4Linear, rows: int = 512) -> float:
    """Relative error of ``fast`` against ``layer``'s dequantized product on random input (4 rows), over
    the first ``rows`` outputs (a 7B model's largest layer dequantized whole would take 360 MB)."""
    gen = torch.Generator(device=layer.qweight.device).manual_seed(0)
    x = torch.randn(4, layer.in_features, generator=gen, device=layer.qweight.device).to(torch.bfloat16)
    ref = F.linear(x.float(), layer.qtensor.map(lambda t: t[:rows]).dequantize(torch.float32))
    got = fast(x)[:, :rows].float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def use_tinygemm(model: nn.Module, devices: tuple[str, ...] = ("cuda",)) -> tuple[int, str | None]:
    """Swap ``model``'s :class:`Int4Linear` layers whose weights are on one of ``devices`` (CUDA by default;
    tests pass "cpu") for :class:`TinyGemmInt4Linear`, in place. Layers tinygemm cannot run stay as they
    are, and so does an int4 output layer whose table the embedding shares (swapping it would keep both
    copies). The first layer of each (in_features, group size) is checked against its dequantized product
    first; if they disagree, or the kernel fails, no layer of that kind is swapped. Returns the layers
    swapped and, if some were not, why (one reason). ``LLAMARUN_TINYGEMM=0`` turns the swap off."""
    if os.environ.get("LLAMARUN_TINYGEMM", "1") == "0":
        return 0, "disabled by LLAMARUN_TINYGEMM=0"
    shared = {id(m.source) for m in model.modules() if isinstance(m, QuantizedEmbedding)}
    checked: dict[tuple[int, int], bool] = {}
    swapped, reason = 0, None
    # Names, not modules: each old layer must be freed as soon as its replacement is in place (holding them
    # all until the end would need the model's int4 weights twice over on the GPU).
    names = [name for name, m in model.named_modules() if type(m) is Int4Linear and id(m) not in shared]
    for name in names:
        layer = model.get_submodule(name)
        if layer.qweight.device.type not in devices:
            continue
        key = (layer.in_features, layer.group_size)
        if checked.get(key) is False:  # its shape failed the check: the reason is recorded already
            continue
        why = unsupported(layer)
        if why is None:
            try:
                fast = TinyGemmInt4Linear(layer)
                if key not in checked:
                    err = check(layer, fast)
                    checked[key] = err < CHECK_TOLERANCE
                    if not checked[key]:
                        why = f"tinygemm's product differs from the dequantized one (relative error {err:.2g})"
            except RuntimeError as e:  # an op this torch build has but not for this device or dtype
                checked[key] = False
                why = f"tinygemm failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        if why is not None:
            reason = reason or why
            continue
        _set_module(model, name, fast)
        del layer, fast
        swapped += 1
    return swapped, reason
