"""Weight-only quantization of the model's linear layers: int8 and int4, from float weights or GGUF blocks.

Formats (one 2-D weight [N = out_features, K = in_features]; G = group size, a divisor of K):

- **int8**: symmetric, ``w = q * scale``; ``qweight`` int8 [N, K], ``scales`` [N, K/G]; G = 32 by default
  (GGUF Q8_0's layout: those blocks convert losslessly); ``G = K`` is one scale per output channel.
- **int4**: asymmetric, ``w = q * scale + min`` with q in 0..15; ``qweight`` uint8 [N, K/2] (each 32-element
  block takes 16 bytes in GGUF's nibble order: byte j holds element j in its low nibble and element j+16
  in its high nibble), ``scales`` and ``mins`` [N, K/G]; G = 32 by default (G must be a multiple of 32).
  GGUF Q4_1 (d, m) and Q4_0 (d, -8 d) blocks convert losslessly, Q4_K sub-blocks with their scale and min
  products rounded to float16; Q5_0 becomes int8 losslessly, Q5_1/Q5_K/Q6_K int8 by rounding (see
  :func:`from_gguf_file`; ``kernels/gguf.cpp`` compiles the same conversions).

Scales and mins are float16 values stored as **int16 tensors holding the float16 bits**, so that
``model.to(dtype)`` or ``model.half()`` cannot cast (and round) them; :meth:`QuantizedTensor.scales_f16`
gives the float16 view.

On CPU the layers call the compiled kernels of :mod:`llamarun.kernels` (integer dot products with the
activations quantized to int16 per 32-block) for small batches, and dequantize-then-MKL-GEMM for large
ones (prefill); without the kernels, and on every other device, they dequantize and call ``F.linear``
(correct everywhere, not fast). The output layer (and a tied embedding) defaults to int8 in both modes.

Entry points: :func:`quantize_model` (float model in place), :func:`build_quantized_model` (straight from a
checkpoint, one tensor at a time; GGUF blocks converted directly), :func:`save_quantized` /
:func:`load_quantized`, and the ``llamarun quantize`` subcommand's :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import FormatError, UsageError
from .formats.gguf import BLOCK_TYPES, QT, dequantize_blocks, k_sub_scales, q4_k_values, q5_values
from .model import Attention

MODES = ("int8", "int4")
FORMAT_NAME = "llamarun-quantized"
FORMAT_VERSION = 1
QK = 32  # the kernels' activation block; int4 groups are made of 32-element blocks

# Activation rows at or above which a CPU layer dequantizes its weight and calls MKL's float GEMM instead
# of the integer kernel (measured on AVX2; see benchmarks/kernel_bench.py).
DENSE_MIN_ROWS = {"int8": 32, "int4": 64}
# Products of at least this many activation rows run as the kernels' batch products, for every size above
# it (faster than the dense path too, prefill's 512 rows included): with bf16 GEMMs on a CPU with AMX, bf16
# tile products; else, on a CPU with AVX-512 VNNI, int8-activation products (from 16 rows an int8 GEMM), and
# with AVX2 an int8 GEMM for int4 layers (vpmaddubsw) and the sign-trick kernel for int8 ones.
# Measured on 2-core VMs, SmolLM2's layers: at 6 rows tiles cost 0.8-1.0x the integer kernel, at 16
# 0.2-0.3x, at 512 rows 0.3x the dense path (Sapphire Rapids); int8 activations 0.7-0.8x at 6 rows,
# 0.6-0.7x at 16 (a Xeon with VNNI but no AMX), at 32-512 rows 0.3-0.5x the int16 kernel and 0.6-0.9x
# dequantize + bf16 GEMM (Zen 4); AVX2's GEMM 0.9-1.2x the int16 kernel at 6-8 rows, 1.3-1.6x at 16,
# 1.7-2.4x at 64-512 and 1.3-1.9x dequantize + float32 GEMM at 512 (Zen 3); its int8 kernel 1.0-1.3x at 8
# rows, 1.3-1.5x at 16 (SmolLM2's int8 layers with their weights streamed from memory, Zen 3).
BATCH_MIN_ROWS = 6
# ... except int8-activation products on a CPU that runs 512-bit instructions whole (Zen 5,
# kernels.wide_avx512): there they lead the int16 kernel from 2 rows (weights prefetched in both; SmolLM2
# decode batch 2/3/4/5 578-616/748-768/702-708/679-689 -> 687-701/868-936/940-1074/889-1014 tok/s).
WIDE_INT8_MIN_ROWS = 2
# Dequantize at most this much float32 weight at a time on the dense path (bigger tiles: no faster, more
# peak memory).
_DENSE_TILE_BYTES = 4 << 20
# The portable path (a GPU, or no kernels) dequantizes weights of more than this many bytes (in the
# activations' dtype) a tile of rows at a time: a 128k-vocabulary output layer is 1 GiB in bf16, more than a
# memory plan can leave free beside an 8B model on a 12 GB card.
PORTABLE_TILE_BYTES = 64 << 20
# The output layer (and a tied embedding, which shares its table) is the layer most hurt by 4-bit rounding:
# on SmolLM2-135M an int4 output costs ~20% top-1 agreement (97.7% -> 80.9%), int8 nothing measurable.
# Like llama.cpp's Q4 files, keep it int8 unless asked otherwise (output_mode="int4").
DEFAULT_OUTPUT_MODE = "int8"


# ---------------------------------------------------------------------------------------------------------
# The quantized tensor


@dataclass
class QuantizedTensor:
    """One quantized 2-D weight [N, K] (see the module docstring for the layouts)."""

    mode: str  # "int8" | "int4"
    qweight: torch.Tensor  # int8 [N, K] | uint8 [N, K/2]
    scales: torch.Tensor  # int16 (float16 bits) [N, K/G]
    mins: torch.Tensor | None  # int4 only, like scales
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.qweight.shape
        return (n, k * 2 if self.mode == "int4" else k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def scales_f16(self) -> torch.Tensor:
        return self.scales.view(torch.float16)

    def mins_f16(self) -> torch.Tensor | None:
        return None if self.mins is None else self.mins.view(torch.float16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] (portable torch code)."""
        return _dequantize(self.mode, self.qweight, self.scales, self.mins, self.group_size, dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows ``index`` (any shape) -> [*index.shape, K]: an embedding lookup."""
        flat = index.reshape(-1)
        out = _dequantize(self.mode, self.qweight[flat], self.scales[flat],
                          None if self.mins is None else self.mins[flat], self.group_size, dtype)
        return out.view(*index.shape, self.shape[1])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QuantizedTensor":
        """The same weight with ``fn`` applied to each of its tensors (rows of all three, a move, a copy)."""
        return QuantizedTensor(self.mode, fn(self.qweight), fn(self.scales),
                               None if self.mins is None else fn(self.mins), self.group_size)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        return self.map(lambda t: t.to(device))

    @staticmethod
    def cat(parts: Sequence["QuantizedTensor"]) -> "QuantizedTensor":
        """Concatenate on dim 0 (fused projections); the parts must share mode, group size and K."""
        p0 = parts[0]
        if len(parts) == 1:
            return p0
        if any(p.mode != p0.mode or p.group_size != p0.group_size or p.shape[1] != p0.shape[1] for p in parts):
            raise ValueError("cannot concatenate quantized tensors of different modes, group sizes or widths")
        cat = lambda ts: None if ts[0] is None else torch.cat(ts, 0)  # noqa: E731
        return QuantizedTensor(p0.mode, cat([p.qweight for p in parts]), cat([p.scales for p in parts]),
                               cat([p.mins for p in parts]), p0.group_size)


def _f16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.int16)


def _unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (GGUF nibble order per 32-block) -> uint8 values 0..15 [N, K]."""
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, QK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(n, -1)


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] (K % 32 == 0) -> uint8 [N, K/2] in GGUF nibble order."""
    n = q.shape[0]
    blocks = q.reshape(n, -1, QK).to(torch.uint8)
    return (blocks[..., : QK // 2] | (blocks[..., QK // 2 :] << 4)).reshape(n, -1).contiguous()


def _dequantize(mode: str, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                group_size: int, dtype: torch.dtype) -> torch.Tensor:
    n = qweight.shape[0]
    if mode == "int8":
        q = qweight.to(dtype)
    else:
        q = _unpack_int4(qweight).to(dtype)
    k = q.shape[1]
    # In place: the dequantized weight is the only full-size tensor made (a GPU's portable path makes one
    # per product, see QuantizedLinear._portable).
    w = q.view(n, k // group_size, group_size).mul_(scales.view(torch.float16).to(dtype)[..., None])
    if mins is not None:
        w.add_(mins.view(torch.float16).to(dtype)[..., None])
    return q


# ---------------------------------------------------------------------------------------------------------
# Quantizing float weights


class QuantizationError(UsageError, ValueError):
    """A weight or setting that cannot be quantized as asked (a UsageError for the CLI, a ValueError too)."""


def default_group_size(mode: str, in_features: int) -> int:
    """32 for both modes (int8 falls back to one scale per output channel when in_features % 32 != 0).

    Measured on SmolLM2-135M (teacher-forced, vs float32): int8 with G = 32 keeps 97.3% top-1 agreement
    (+0.42% perplexity) against 94.9% (+0.60%) with one scale per channel, for 6% more bytes, at the
    same kernel speed; it is also GGUF Q8_0's layout (lossless conversion).
    """
    if mode == "int8" and in_features % QK:
        return in_features
    return QK


def fit_group_size(mode: str, in_features: int, group_size: int | None) -> int:
    """The group size to use for one layer: the default if None; else ``group_size`` if it divides
    ``in_features``, or the largest multiple of 32 below it that does (SmolLM2's 576 inputs take 64 or
    96, not 128)."""
    if group_size is None:
        return default_group_size(mode, in_features)
    if group_size <= 0 or group_size % QK:
        raise QuantizationError(f"group size must be a positive multiple of 32, got {group_size}")
    g = group_size
    while g > QK and in_features % g:
        g -= QK
    if in_features % g:
        if mode == "int8":
            return in_features  # per channel: any width
        raise QuantizationError(f"int4 needs in_features divisible by 32, got {in_features}")
    return g


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown quantization mode {mode!r} (use int8 or int4)")


def _check_groups(mode: str, k: int, group_size: int) -> None:
    if group_size <= 0 or k % group_size:
        raise QuantizationError(f"{mode}: group_size {group_size} does not divide in_features {k}")
    if mode == "int4" and group_size % QK:
        raise QuantizationError(f"int4: group_size must be a multiple of 32, got {group_size}")


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> QuantizedTensor:
    """Symmetric int8 with one float16 scale per ``group_size`` inputs (default: per output channel).

    Values are rounded with the float16 scale actually stored, so the stored scale and the integers agree.
    """
    w = w.detach().float()
    n, k = w.shape
    g = group_size or k
    _check_groups("int8", k, g)
    wg = w.reshape(n, k // g, g)
    s = (wg.abs().amax(-1) / 127.0).to(torch.float16)
    if torch.isinf(s).any():
        raise QuantizationError("int8: weight magnitude too large for float16 scales")
    sf = s.float()[..., None]
    q = torch.where(sf > 0, torch.round(wg / torch.where(sf > 0, sf, 1.0)), 0.0).clamp_(-127, 127)
    return QuantizedTensor("int8", q.to(torch.int8).reshape(n, k).contiguous(), s.view(torch.int16).contiguous(),
                           None, g)


_INT4_SEARCH_STEPS = 9


def _fit_int4(wg: torch.Tensor, steps: int = _INT4_SEARCH_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (last dim) a (scale, min) with a small squared error of 4-bit rounding.

    Like llama.cpp's ``make_qkx2_quants``: try ``steps`` scales around (max - min) / 15; for each, round,
    then refit scale and min by least squares to the integers chosen; keep the candidate with the least
    squared error, computed in closed form from the sums the fit already has (no extra pass over the
    weights). Re-rounding with the chosen (scale, min) can only lower that error, and plain min/max
    rounding is the first candidate, so the result is never worse than it.
    """
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    g = wg.shape[-1]
    sw, sww = wg.sum(-1, keepdim=True), (wg * wg).sum(-1, keepdim=True)
    rng = hi - lo
    safe_rng = torch.where(rng > 0, rng, 1.0)
    centered = wg - lo
    best_s, best_m, best_err = None, None, None

    def error(s, m, sq, sqq, sqw):  # sum over the group of (q s + m - w)^2
        return sww - 2 * s * sqw - 2 * m * sw + s * s * sqq + 2 * s * m * sq + g * m * m

    for i, delta in enumerate([0.0] + torch.linspace(-1.0, 1.0, steps).tolist()):
        q = torch.round(centered * ((15.0 + delta) / safe_rng)).clamp_(0, 15)
        sq, sqq, sqw = q.sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True), (q * wg).sum(-1, keepdim=True)
        if i == 0:  # plain min/max rounding, as it is
            s, m = rng / 15.0, lo
        else:  # least-squares refit of scale and min to these integers
            det = g * sqq - sq * sq
            ok = det > 0
            s = torch.where(ok, (g * sqw - sq * sw) / torch.where(ok, det, 1.0), best_s).clamp_(min=0)
            m = torch.where(ok, (sw - s * sq) / g, best_m)
        err = error(s, m, sq, sqq, sqw)
        if best_err is None:
            best_s, best_m, best_err = s, m, err
        else:
            better = err < best_err
            best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
            best_err = torch.minimum(err, best_err)
    return best_s.squeeze(-1), best_m.squeeze(-1)


def quantize_int4(w: torch.Tensor, group_size: int = QK, *, search: bool = True) -> QuantizedTensor:
    """Asymmetric 4-bit: per group a float16 scale and min, ``w ~ q * scale + min`` (GGUF Q4_1's form).

    ``search`` picks (scale, min) by minimising the rounding error (see :func:`_fit_int4`; on CPU the
    compiled kernels run the same search); without it, plain ``scale = (max - min) / 15, min = min``. The
    torch code processes rows in chunks to bound temporary memory.
    """
    w = w.detach().float()
    n, k = w.shape
    _check_groups("int4", k, group_size)
    if search and w.device.type == "cpu" and kernels.available():  # the same search, compiled: ~50x faster
        try:
            q, s, m = torch.ops.llamarun.quantize_int4(w.contiguous(), group_size, _INT4_SEARCH_STEPS)
        except RuntimeError as e:
            raise QuantizationError(str(e).splitlines()[0]) from None
        return QuantizedTensor("int4", q, s, m, group_size)
    qs, ss, ms = [], [], []
    chunk = max(1, (1 << 22) // k)
    for r0 in range(0, n, chunk):
        wg = w[r0 : r0 + chunk].reshape(-1, k // group_size, group_size)
        if search:
            s, m = _fit_int4(wg)
        else:
            s, m = (wg.amax(-1) - wg.amin(-1)) / 15.0, wg.amin(-1)
        s16, m16 = s.to(torch.float16), m.to(torch.float16)
        if torch.isinf(s16).any() or torch.isinf(m16).any():
            raise QuantizationError("int4: weight magnitude too large for float16 scales")
        sf, mf = s16.float()[..., None], m16.float()[..., None]
        q = torch.where(sf > 0, torch.round((wg - mf) / torch.where(sf > 0, sf, 1.0)), 0.0).clamp_(0, 15)
        qs.append(_pack_int4(q.reshape(-1, k)))
        ss.append(s16.view(torch.int16))
        ms.append(m16.view(torch.int16))
    return QuantizedTensor("int4", torch.cat(qs).contiguous(), torch.cat(ss).contiguous(), torch.cat(ms).contiguous(),
                           group_size)


def quantize_tensor(w: torch.Tensor, mode: str, group_size: int | None = None) -> QuantizedTensor:
    """Quantize a float weight [N, K] to ``mode`` (group size default: :func:`default_group_size`; an
    explicit one must divide K - the model-level functions adapt it per layer with :func:`fit_group_size`)."""
    _check_mode(mode)
    if w.dim() != 2:
        raise QuantizationError(f"only 2-D weights can be quantized, got shape {tuple(w.shape)}")
    g = group_size or default_group_size(mode, w.shape[1])
    return quantize_int8(w, g) if mode == "int8" else quantize_int4(w, g)


# ---------------------------------------------------------------------------------------------------------
# GGUF blocks -> quantized tensors, without going through float32


def _blocks(raw: Any, block_bytes: int, shape: tuple[int, int], block_elems: int = QK) -> torch.Tensor:
    """Raw GGUF tensor data (numpy array or tensor, any dtype view) as uint8 [N * K/block_elems, block_bytes]."""
    n, k = shape
    if k % block_elems:
        raise FormatError(f"GGUF quantized tensor rows must hold whole {block_elems}-blocks, got in_features {k}")
    if isinstance(raw, torch.Tensor):
        t = raw.contiguous().view(torch.uint8)
    else:
        with warnings.catch_warnings():  # memory-mapped, read-only: only read here (the blocks are copied below)
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))
    t = t.reshape(-1)
    if t.storage_offset() % 4:  # the fills read whole words (a slice of a larger byte tensor may be misaligned)
        t = t.clone()
    if t.numel() != n * (k // block_elems) * block_bytes:
        raise FormatError(f"GGUF tensor data has {t.numel()} bytes, shape {shape} needs "
                          f"{n * (k // block_elems) * block_bytes}")
    return t.reshape(n * (k // block_elems), block_bytes)


# The fills copy whole int16/int32 words: a block's fields start on even (Q4_1: 4-byte) offsets, and
# strided byte copies ran at half the speed (the default model's weights, converted within one process:
# 0.164 -> 0.139 s).
def _fill_q8_0(b: torch.Tensor, out: QuantizedTensor) -> None:
    """Q8_0 blocks b [N * K/32, 34] ([d: f16][32 x int8]) into int8 ``out`` [N, K]."""
    w = b.view(torch.int16)  # [blocks, 17]
    out.scales.view(-1).copy_(w[:, 0])
    out.qweight.view(torch.int16).view(-1, QK // 2).copy_(w[:, 1:])


def _fill_q4_0(b: torch.Tensor, out: QuantizedTensor) -> None:
    """Q4_0 blocks b [N * K/32, 18] ([d: f16][16 bytes]; w = (q - 8) d) into int4 ``out``, min = -8 d
    (multiplying a float16 by 8 is exact unless it overflows, which is checked)."""
    w = b.view(torch.int16)  # [blocks, 9]
    d = w[:, 0].view(torch.float16)
    m = d.float() * -8.0
    if torch.isinf(m.to(torch.float16)).any():
        raise FormatError("Q4_0 scale too large to express as an int4 minimum")
    out.qweight.view(torch.int16).view(-1, QK // 4).copy_(w[:, 1:])
    out.scales.view(-1).copy_(w[:, 0])
    out.mins.view(-1).copy_(_f16_bits(m))


def _fill_q4_0_int8(b: torch.Tensor, out: QuantizedTensor) -> None:
    """Q4_0 blocks b [N * K/32, 18] into int8 ``out`` (values q - 8 in -8..7, the block's d as scale)."""
    out.scales.view(-1).copy_(b.view(torch.int16)[:, 0])
    out.qweight.view(-1, QK).copy_(_unpack_int4(b[:, 2:]).to(torch.int8) - 8)


def _fill_q4_1(b: torch.Tensor, out: QuantizedTensor) -> None:
    """Q4_1 blocks b [N * K/32, 20] ([d: f16][m: f16][16 bytes]; w = q d + m) into int4 ``out``."""
    h = b.view(torch.int16)  # [blocks, 10]
    out.qweight.view(torch.int32).view(-1, QK // 8).copy_(b.view(torch.int32)[:, 1:])
    out.scales.view(-1).copy_(h[:, 0])
    out.mins.view(-1).copy_(h[:, 1])


def _fill_q5_0(b: torch.Tensor, out: QuantizedTensor) -> None:
    """Q5_0 blocks b [N * K/32, 22] ([d: f16][5th bits: 4 bytes][16 bytes]; w = (q - 16) d) into int8
    ``out``: values q - 16 in -16..15, the block's d as scale."""
    out.qweight.view(-1, QK).copy_(q5_values(b, 2).view(torch.int8) - 16)
    out.scales.view(-1).copy_(b[:, :2].contiguous().view(torch.int16)[:, 0])


def _fill_q4_k(b: torch.Tensor, out: QuantizedTensor) -> None:
    """Q4_K super-blocks b [N * K/256, 144] into int4 ``out`` (group size 32). Each 32-element sub-block is
    ``w = (d * scale) q - dmin * min`` with 6-bit scale and min: its int4 scale and min are those products
    rounded to float16, so a weight moves by at most 2^-11 of (q scale + |min|) (the 4-bit values are copied
    as they are). Dequantizing and quantizing again re-rounded every weight, at ~10x the time."""
    q = q4_k_values(b)  # [B, 8, 32], values 0..15
    out.qweight.view(-1, 8, QK // 2).copy_(q[..., : QK // 2] | (q[..., QK // 2 :] << 4))
    scale, low = k_sub_scales(b)
    low = -low
    if not (torch.isfinite(scale.half()).all() and torch.isfinite(low.half()).all()):
        raise FormatError("Q4_K scales too large to express in float16")
    out.scales.view(-1, 8).copy_(_f16_bits(scale))
    out.mins.view(-1, 8).copy_(_f16_bits(low))


# (GGUF type, mode) -> the block-for-block fill (lossless, but for Q4_K's float16 products). The other block
# types of BLOCK_TYPES convert through _requant_fill.
_GGUF_FILL = {("Q8_0", "int8"): _fill_q8_0, ("Q4_0", "int4"): _fill_q4_0, ("Q4_0", "int8"): _fill_q4_0_int8,
              ("Q4_1", "int4"): _fill_q4_1, ("Q5_0", "int8"): _fill_q5_0, ("Q4_K", "int4"): _fill_q4_k}


def _requant_fill(type_name: str, mode: str, group_size: int) -> Callable[[torch.Tensor, QuantizedTensor], None]:
    """The fill for GGUF blocks without a block-for-block one into ``mode`` (Q6_K, Q5_K, Q5_1 -> int8, or
    any type into the other mode): dequantized in torch, then quantized, a few MiB of rows at a time."""
    def fill(b: torch.Tensor, out: QuantizedTensor) -> None:
        w = dequantize_blocks(b, QT[type_name]).view(out.shape[0], -1)
        q = quantize_tensor(w, mode, group_size)
        for dst, src in zip((out.qweight, out.scales, out.mins), (q.qweight, q.scales, q.mins)):
            if dst is not None:
                dst.copy_(src)

    fill.float_pieces = True  # each piece has a float32 copy: from_gguf_file keeps pieces small
    return fill


def _convert(type_name: str, mode: str, raw: Any, shape: tuple[int, int]) -> QuantizedTensor:
    """GGUF blocks of type ``type_name`` as a new ``mode`` tensor [N, K], through their fill."""
    n, k = shape
    elems, nbytes = BLOCK_TYPES[type_name]
    b = _blocks(raw, nbytes, shape, elems)
    out = _new(mode, n, k, torch.empty)
    _GGUF_FILL[type_name, mode](b, out)
    return out


def from_gguf_q8_0(raw: Any, shape: tuple[int, int]) -> QuantizedTensor:
    """Q8_0 blocks -> int8, group size 32. Lossless."""
    return _convert("Q8_0", "int8", raw, shape)


def from_gguf_q4_0(raw: Any, shape: tuple[int, int]) -> QuantizedTensor:
    """Q4_0 blocks -> int4 with min = -8 d, group size 32. Lossless."""
    return _convert("Q4_0", "int4", raw, shape)


def from_gguf_q4_0_int8(raw: Any, shape: tuple[int, int]) -> QuantizedTensor:
    """Q4_0 blocks as int8, group size 32. Lossless: the output layer and embedding of a Q4_0 file load as
    int8 without a float32 round trip (~6 s of a 7B load)."""
    return _convert("Q4_0", "int8", raw, shape)


def from_gguf_q4_1(raw: Any, shape: tuple[int, int]) -> QuantizedTensor:
    """Q4_1 blocks -> int4, group size 32. Lossless."""
    return _convert("Q4_1", "int4", raw, shape)


def from_gguf(raw: Any, qtype: Any, shape: tuple[int, int], mode: str, group_size: int | None = None) -> QuantizedTensor:
    """A GGUF tensor as ``mode``: block-for-block when its type maps onto ``mode`` with group size 32
    (Q8_0 and Q5_0 -> int8, Q4_0 -> int8 or int4, Q4_1 and Q4_K -> int4), else dequantized to float32 and
    quantized."""
    from .formats.gguf import dequantize

    _check_mode(mode)
    direct = _direct(qtype, mode, group_size)
    if direct:
        return _convert(*direct, raw, shape)
    return quantize_tensor(dequantize(raw, qtype, shape).float(), mode, group_size)


def _type_name(qtype: Any) -> str:
    """A GGUF tensor type's name: gguf's enum, or llamarun's reader's string."""
    return getattr(qtype, "name", str(qtype))


def _direct(qtype: Any, mode: str, group_size: int | None) -> tuple[str, str] | None:
    """The (type name, mode) key of GGUF type ``qtype``'s block-for-block conversion to ``mode`` in
    ``_GGUF_FILL``, or None if there is none."""
    key = (_type_name(qtype), mode)
    return key if group_size in (None, QK) and key in _GGUF_FILL else None


# The GGUF types the compiled kernels convert into each mode with group size 32 (kernels/gguf.cpp: the
# same bits as the torch fills, ~10x faster).
_KERNEL_FILLS = {"int4": ("Q4_K",), "int8": ("Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q6_K")}


def _kernel_fill(name: str, mode: str, group_size: int | None) -> Callable | None:
    """The compiled conversion of GGUF type ``name`` into ``mode``, or None where there is none."""
    if group_size not in (None, QK) or name not in _KERNEL_FILLS[mode] or not kernels.available():
        return None
    type_id = QT[name].value
    if mode == "int8":
        return lambda b, out: torch.ops.llamarun.gguf_to_int8(b, type_id, out.qweight, out.scales)
    return lambda b, out: torch.ops.llamarun.gguf_to_int4(b, type_id, out.qweight, out.scales, out.mins)


def _gguf_fill(qtype: Any, mode: str, group_size: int | None) -> Callable | None:
    """How blocks of GGUF type ``qtype`` become ``mode`` piece by piece: the compiled conversion where the
    kernels have one, else the block-for-block fill, else dequantized in torch and quantized with
    ``group_size`` (the block types of ``BLOCK_TYPES``); None for the other types (float, and the rare
    ones only gguf.quants dequantizes)."""
    name = _type_name(qtype)
    fill = _kernel_fill(name, mode, group_size)
    if fill is not None:
        return fill
    key = _direct(qtype, mode, group_size)
    if key is not None:
        return _GGUF_FILL[key]
    return _requant_fill(name, mode, group_size or QK) if name in BLOCK_TYPES else None


def _new(mode: str, n: int, k: int, empty: Callable[..., torch.Tensor], group_size: int = QK) -> QuantizedTensor:
    """An uninitialised ``mode`` tensor [N, K] (group size 32 unless given: what the block conversions
    make), its parts allocated by ``empty(shape, dtype)``."""
    g = k // group_size
    q = empty((n, k), dtype=torch.int8) if mode == "int8" else empty((n, k // 2), dtype=torch.uint8)
    mins = None if mode == "int8" else empty((n, g), dtype=torch.int16)
    return QuantizedTensor(mode, q, empty((n, g), dtype=torch.int16), mins, group_size)


def _empty(mode: str, n: int, k: int, group_size: int = QK) -> QuantizedTensor:
    """:func:`_new` for a weight: in the loading model's ``memory.weight_arena`` if there is one, else in
    ``memory.huge_empty`` mappings."""
    from .memory import weight_empty

    return _new(mode, n, k, weight_empty, group_size)


def from_gguf_file(t: Any, shape: tuple[int, int], mode: str, group_size: int | None = None,
                   out: QuantizedTensor | None = None) -> QuantizedTensor:
    """A tensor of a GGUF file (``formats.gguf.TensorInfo``) as ``mode``, like :func:`from_gguf`. Quantized
    blocks are read a few MiB of rows at a time into one buffer and each piece is converted straight into
    its rows of the result (``out``, rows of a fused layer, when given; else allocated once): reading
    whole tensors held their raw bytes beside the converted copy (and a dequantized tensor its float32
    copy), and converting each piece into tensors of its own before copying those raised the default
    model's loading peak by 15-30 MiB of heap that only ``malloc_trim`` gave back."""
    from .memory import GGUF_READ_BYTES, read_buffer

    fill = _gguf_fill(t.tensor_type, mode, group_size)
    if fill is None:
        return from_gguf(t.data, t.tensor_type, shape, mode, group_size)
    n, k = shape
    elems, block_bytes = BLOCK_TYPES[_type_name(t.tensor_type)]
    if k % elems:
        raise FormatError(f"GGUF quantized tensor rows must hold whole {elems}-blocks, got in_features {k}")
    row_bytes = k // elems * block_bytes
    if row_bytes * n != t.nbytes:
        raise FormatError(f"GGUF tensor data has {t.nbytes} bytes, shape {shape} needs {row_bytes * n}")
    step = max(1, min(n, GGUF_READ_BYTES // row_bytes))
    if getattr(fill, "float_pieces", False):  # requantized in torch: a piece's float32 copy within the limit too
        step = max(1, min(step, GGUF_READ_BYTES // (4 * k)))
    if out is None:
        out = _empty(mode, n, k, group_size or QK)
    buf = read_buffer(step * row_bytes)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        piece = buf[: (r1 - r0) * row_bytes]
        t.read_into(r0 * row_bytes, piece.numpy())
        try:
            fill(piece.view(-1, block_bytes), out.map(lambda f: f[r0:r1]))
        except (RuntimeError, UsageError) as e:  # a corrupted block (scales beyond float16), from torch or C++
            raise FormatError(f"{t.path}: tensor {t.name}: {str(e).splitlines()[0]}") from None
    return out


def _torch_shape(shape: Any) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch order: gguf.GGUFReader gives numpy arrays innermost-first,
    llamarun's own reader tuples already in [out, in] order."""
    if isinstance(shape, np.ndarray):
        return tuple(int(d) for d in reversed(shape.tolist()))
    return tuple(int(d) for d in shape)


def _fused_from_gguf_file(files: list[Any], mode: str, group_size: int | None) -> QuantizedTensor | None:
    """The parts of a fused layer (GGUF file tensors of one width that all convert piece by piece, see
    :func:`from_gguf_file`), each converted straight into its rows of the result; None where that does not
    apply. Concatenating the converted parts afterwards copied every byte of the model once more (~5 s of
    a 7B load)."""
    if not all(t is not None and hasattr(t, "read") and _gguf_fill(t.tensor_type, mode, group_size)
               for t in files):
        return None
    shapes = [_torch_shape(t.shape) for t in files]
    if len({k for _, k in shapes}) != 1:
        return None
    qt = _empty(mode, sum(n for n, _ in shapes), shapes[0][1], group_size or QK)
    r0 = 0
    for t, (n, k) in zip(files, shapes):
        from_gguf_file(t, (n, k), mode, group_size, qt.map(lambda f: f[r0 : r0 + n]))
        r0 += n
    return qt


def load_quantized_weight(ckpt: Any, name: str, shape: tuple[int, int], mode: str,
                          group_size: int | None = None) -> QuantizedTensor:
    """The checkpoint tensor(s) behind the weight ``name`` of one linear layer, quantized to ``mode``.

    Fused parameters (``checkpoint_names``) are built part by part and concatenated. GGUF parts whose type
    maps onto ``mode`` are converted block-for-block (lossless); anything else is dequantized one tensor at
    a time and quantized, so the whole model never exists in float32.
    """
    from .memory import weight_copy
    from .model import checkpoint_names

    _check_mode(mode)
    group_size = fit_group_size(mode, shape[1], group_size)
    raw = getattr(ckpt, "native", None) or {}  # GGUF blocks that may convert without dequantizing
    names = checkpoint_names(name)
    qt = _fused_from_gguf_file([raw.get(part) for part in names], mode, group_size) if len(names) > 1 else None
    if qt is None:
        parts = []
        for part in names:
            t = raw.get(part)
            if t is not None:
                pshape = _torch_shape(t.shape)
                if hasattr(t, "read"):  # llamarun's own GGUF reader: read in pieces
                    parts.append(from_gguf_file(t, pshape, mode, group_size))
                else:
                    parts.append(from_gguf(t.data, t.tensor_type, pshape, mode, group_size))
                continue
            try:
                w = ckpt.tensors[part]
            except KeyError:
                raise FormatError(f"{ckpt.path}: missing tensor {part}") from None
            parts.append(quantize_tensor(w, mode, group_size))
        try:
            qt = QuantizedTensor.cat(parts)
        except ValueError:  # parts of different source types: requantize the concatenation
            qt = quantize_tensor(torch.cat([p.dequantize() for p in parts]), mode, group_size)
        qt = qt.map(weight_copy)  # into the arena
    if qt.shape != tuple(shape):
        raise FormatError(f"{ckpt.path}: tensor {name} has shape {qt.shape}, the config implies {tuple(shape)}")
    return qt


# ---------------------------------------------------------------------------------------------------------
# Modules


def _register_qt(module: nn.Module, qt: QuantizedTensor) -> None:
    module.register_buffer("qweight", qt.qweight)
    module.register_buffer("scales", qt.scales)
    if qt.mins is not None:
        module.register_buffer("mins", qt.mins)
    else:
        module.mins = None


class QuantizedLinear(nn.Module):
    """A bias-free linear layer with a quantized weight; ``forward`` takes any leading shape."""

    mode = ""
    _dense_dtype = torch.float32

    def __init__(self, qt: QuantizedTensor) -> None:
        super().__init__()
        if qt.mode != self.mode:
            raise ValueError(f"{type(self).__name__} needs an {self.mode} tensor, got {qt.mode}")
        self.out_features, self.in_features = qt.shape
        self.group_size = qt.group_size
        _register_qt(self, qt)
        self._fast: bool | None = None  # CPU kernels usable (decided on the first CPU call)
        self._kargs: tuple | None = None  # (op, its weight arguments): buffers fetched once, not per call
        self.batch_rows = 0  # > 0: batches of at least this many rows use the kernels' batch products

    @property
    def dense_dtype(self) -> torch.dtype:
        """The large-batch path's GEMM dtype (:func:`set_dense_dtype`); activations stay float32. bfloat16
        on a CPU with AMX: batches of ``BATCH_MIN_ROWS`` rows or more run as the kernels' bf16 tile products
        (``batch_rows``) instead of the dense path."""
        return self._dense_dtype

    @dense_dtype.setter
    def dense_dtype(self, dtype: torch.dtype) -> None:
        self._dense_dtype = dtype
        self.batch_rows = BATCH_MIN_ROWS if dtype == torch.bfloat16 and kernels.bf16_tiles() else 0

    # The cached kernel arguments hold the buffer tensors themselves and batch_rows: drop them whenever the
    # buffers may be replaced (module.to(), .cuda(), assignment) or batch_rows changes; load_state_dict
    # copies in place and keeps them valid.
    def _apply(self, fn, *args, **kwargs):
        self.__dict__["_kargs"] = None
        return super()._apply(fn, *args, **kwargs)

    def __setattr__(self, name: str, value) -> None:
        if name in ("qweight", "scales", "mins", "batch_rows"):
            self.__dict__["_kargs"] = None
        if name == "batch_rows":
            # The kernels' batch products (AMX tiles, int8 GEMM) beat dequantize + GEMM at every batch size,
            # prefill's included: with them on, the dense path is never taken.
            self.__dict__["dense_min_rows"] = 1 << 62 if value else DENSE_MIN_ROWS[self.mode]
        super().__setattr__(name, value)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int | None = None) -> "QuantizedLinear":
        return cls(quantize_tensor(weight, cls.mode, group_size))

    @property
    def qtensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.mode, self.qweight, self.scales, self.mins, self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qtensor.dequantize(dtype)

    def use_kernels(self, enabled: bool | None = None) -> None:
        """Force (False) the portable path, or (True/None) re-decide on the next CPU call."""
        self._fast = False if enabled is False else None

    def _kernel_ok(self) -> bool:
        if self._fast is None:
            self._fast = (kernels.available() and self.in_features % QK == 0 and self.group_size % QK == 0
                          and self.qweight.is_contiguous())
        return self._fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kept lean: at batch 1 a layer's whole job takes tens of microseconds.
        if x.is_cpu and (self._fast or (self._fast is None and self._kernel_ok())):
            xf = x if x.dtype == torch.float32 else x.float()
            if xf.numel() >= self.dense_min_rows * self.in_features:
                y = self._dense(xf)
            else:
                y = self._kernel(xf)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        return self._portable(x)

    def _portable(self, x: torch.Tensor) -> torch.Tensor:
        """No kernels, or a GPU: dequantize, then a float matmul in the activations' dtype; a weight of more
        than ``PORTABLE_TILE_BYTES`` a tile of rows at a time, so what a product holds beside the model stays
        within what the memory plan reserves (``memory.dequant_bytes``)."""
        n, k = self.out_features, self.in_features
        tile = max(1, PORTABLE_TILE_BYTES // (k * x.element_size()))
        if tile >= n:
            return F.linear(x, self.dequantize(x.dtype))
        qt = self.qtensor
        y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
        for r0 in range(0, n, tile):
            rows = qt.map(lambda t: t[r0 : r0 + tile]).dequantize(x.dtype)
            y[..., r0 : r0 + rows.shape[0]] = F.linear(x, rows)
        return y

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The integer kernel (any number of rows): ``x`` float32 [..., K] on the CPU."""
        ka = self._kargs
        if ka is None:
            ka = self._kargs = self._kernel_args()
        return ka[0](x, *ka[1])

    def _kernel_args(self) -> tuple:
        raise NotImplementedError

    def _dequant_rows(self, row0: int, rows: int) -> torch.Tensor:
        raise NotImplementedError

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """Large batches: dequantize (tiles of) the weight with the kernels, then a float GEMM: MKL's
        float32 one, or bfloat16 (inputs and products rounded to bf16, float32 out) when ``dense_dtype``
        says so (:func:`set_dense_dtype`; ``Llama.load`` does it on CPUs with native bf16 arithmetic)."""
        n, k = self.out_features, self.in_features
        x2 = x.reshape(-1, k)
        tile = max(1, _DENSE_TILE_BYTES // (4 * k))
        if self.dense_dtype != torch.float32:
            xb, dt = x2.to(self.dense_dtype), self.dense_dtype
            y = torch.empty(x2.shape[0], n, dtype=x2.dtype)
            for r0 in range(0, n, tile):
                rows = min(tile, n - r0)
                y[:, r0 : r0 + rows] = torch.mm(xb, self._dequant_rows(r0, rows).to(dt).t())  # CPU mm: bf16 out
        elif tile >= n:
            y = torch.mm(x2, self._dequant_rows(0, n).t())
        else:
            y = torch.empty(x2.shape[0], n, dtype=x2.dtype)
            for r0 in range(0, n, tile):
                rows = min(tile, n - r0)
                # Straight into the column slice (row stride n): BLAS writes it in place, no temporary + copy.
                torch.mm(x2, self._dequant_rows(r0, rows).t(), out=y[:, r0 : r0 + rows])
        return y.view(*x.shape[:-1], n)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Linear(QuantizedLinear):
    """int8 weight, float16 scale per group (G = in_features: per output channel)."""

    mode = "int8"

    def _kernel_args(self) -> tuple:
        return torch.ops.llamarun.q8_linear.default, (self.qweight, self.scales, self.group_size, self.batch_rows)

    def _dequant_rows(self, row0: int, rows: int) -> torch.Tensor:
        return torch.ops.llamarun.q8_dequant(self.qweight, self.scales, self.group_size, row0, rows)


class Int4Linear(QuantizedLinear):
    """4-bit weight, float16 scale and min per group of 32 (or 64, 96, ...) inputs."""

    mode = "int4"

    def _kernel_args(self) -> tuple:
        return (torch.ops.llamarun.q4_linear.default,
                (self.qweight, self.scales, self.mins, self.group_size, self.batch_rows))

    def _dequant_rows(self, row0: int, rows: int) -> torch.Tensor:
        return torch.ops.llamarun.q4_dequant(self.qweight, self.scales, self.mins, self.group_size, row0, rows)


LINEAR_CLASSES = {"int8": Int8Linear, "int4": Int4Linear}


def set_dense_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Run the quantized layers' large-batch path (prefill, big batches on the CPU kernels) in ``dtype``
    GEMMs: bfloat16 where the CPU has native bf16 arithmetic (AVX512-BF16, AMX), where it is ~1.7x float32's
    speed (with AMX, batches from ``BATCH_MIN_ROWS`` rows run as the kernels' bf16 tile products), while
    single-row decode steps keep float32 activations and the integer kernels. Prefill's attention products
    follow (``Attention.prefill_dtype``). Returns the quantized layer count."""
    layers = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.dense_dtype = dtype
            layers += 1
        elif isinstance(m, Attention):  # and the attention products of prefill
            m.prefill_dtype = None if dtype == torch.float32 else dtype
        elif hasattr(m, "_stacks"):  # fastpath.FastTransformer: its decode op's arguments include batch_rows
            m._stacks = None
    return layers


def int8_batch_rows() -> int:
    """The rows from which :func:`set_int8_batches` sends products to the int8 kernels by default:
    ``WIDE_INT8_MIN_ROWS`` on a CPU that runs AVX-512 whole (Zen 5), else ``BATCH_MIN_ROWS``."""
    return WIDE_INT8_MIN_ROWS if kernels.wide_avx512() else BATCH_MIN_ROWS


def set_int8_batches(model: nn.Module, rows: int | None = None) -> int:
    """Run the quantized layers' batches of ``rows`` or more activation rows (decode batches and prefill:
    the dense path is then never taken) as the kernels' int8-activation products, where the CPU has them
    (``kernels.int8_batches``: AVX-512 VNNI or AVX2): x rounded to int8 per 32-block, as llama.cpp does
    throughout (relative error ~5e-3 on a product, against ~5e-5 for the int16 rounding of single rows and
    ~3e-3 for bf16 GEMMs), for 1.3-3x the int16 kernel's speed; from ``kernels.gemm_min_rows()`` rows
    (16, 10 on Zen 5; with AVX2 and int4 weights from ``rows``) they run as an int8 GEMM; int8 weights on
    AVX2 without VNNI multiply through llama.cpp's sign trick (SmolLM2 int8, 2-core Zen 3: batch 16
    +22-50%, prefill-512 +32-43% over the int16 kernel).
    ``Llama.load`` does it with ``dtype='auto'`` on such CPUs when the batches have no bf16 tiles; rows=0
    turns it off (large batches dequantize + GEMM again), None is :func:`int8_batch_rows`. Returns the
    layers switched (0 without batch products)."""
    rows = int8_batch_rows() if rows is None else rows
    if rows and not kernels.int8_batches():
        return 0
    layers = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.batch_rows = rows
            layers += 1
        elif hasattr(m, "_stacks"):  # fastpath.FastTransformer: its decode op's arguments include batch_rows
            m._stacks = None
    return layers


def make_linear(qt: QuantizedTensor) -> QuantizedLinear:
    return LINEAR_CLASSES[qt.mode](qt)


_KERNEL_LOOKUP_MAX = 64  # tokens looked up one kernel call each; a prompt's many go through the torch gather


class QuantizedEmbedding(nn.Module):
    """Token embedding read from a quantized table: only the looked-up rows are dequantized.

    ``tied=True`` shares the output layer's quantized weight (tied embeddings: one copy of the table, not a
    float32 one plus a quantized one). ``weight`` is a zero-size placeholder carrying the compute device and
    dtype (code that asks ``tok_embeddings.weight.device/dtype`` keeps working); use :meth:`dequantize` for
    the values.
    """

    def __init__(self, table: QuantizedLinear, tied: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.tied = tied
        if tied:
            self._table = [table]  # a plain list: not a submodule, so the weight is saved once (as output.*)
        else:
            self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=table.qweight.device), persistent=False)

    @property
    def source(self) -> QuantizedLinear:
        return self._table[0] if self.tied else self.table

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.source.dequantize(dtype or self.weight.dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        src = self.source
        if (tokens.numel() <= _KERNEL_LOOKUP_MAX and tokens.is_cpu and self.weight.dtype == torch.float32
                and src._kernel_ok() and not torch.compiler.is_compiling()):
            # A decode step's tokens (one per row): a kernel call per token instead of ~10 small torch ops over
            # the table (~100 us at batch 1, ~1.6 ms at batch 16: torch's row gather). Not in a compiled step,
            # whose graph cannot branch on the ids' values.
            ids = tokens.reshape(-1).tolist()
            if all(0 <= t < self.num_embeddings for t in ids):
                rows = [src._dequant_rows(t, 1) for t in ids]
                out = rows[0] if len(rows) == 1 else torch.cat(rows)
                return out.view(*tokens.shape, self.embedding_dim)
        return src.qtensor.rows(tokens, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.source.mode}, tied={self.tied}"


# ---------------------------------------------------------------------------------------------------------
# Whole models


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's nn.Linear modules (the tied ``output`` included)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_model(model: nn.Module, mode: str, group_size: int | None = None, *, output_mode: str | None = None,
                   quantize_embedding: bool = True) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place) by its ``mode`` quantized version; returns the model.

    ``output`` uses ``output_mode`` (default int8, see ``DEFAULT_OUTPUT_MODE``). The token embedding: tied to ``output`` -> a
    :class:`QuantizedEmbedding` sharing output's quantized table; untied -> quantized on its own (with
    ``output_mode``); ``quantize_embedding=False`` keeps it as it is (float, plus a second, quantized
    copy in ``output`` when tied).
    """
    _check_mode(mode)
    output_mode = output_mode or DEFAULT_OUTPUT_MODE
    _check_mode(output_mode)
    out_gs = group_size if output_mode == mode else None  # group_size is for `mode`'s layers
    tied = getattr(model, "output", None) is not None and getattr(model, "tok_embeddings", None) is not None and \
        model.output.weight is model.tok_embeddings.weight
    for name in linear_names(model):
        lin = model.get_submodule(name)
        if lin.bias is not None:
            raise QuantizationError(f"{name}: linear layers with a bias are not supported")
        m, g = (output_mode, out_gs) if name == "output" else (mode, group_size)
        _set_module(model, name, make_linear(quantize_tensor(lin.weight, m, fit_group_size(m, lin.in_features, g))))
    emb = getattr(model, "tok_embeddings", None)
    if quantize_embedding and isinstance(emb, nn.Embedding):
        dtype = emb.weight.dtype
        if tied:
            model.tok_embeddings = QuantizedEmbedding(model.output, tied=True, dtype=dtype)
        else:
            table = make_linear(quantize_tensor(emb.weight, output_mode,
                                                fit_group_size(output_mode, emb.weight.shape[1], out_gs)))
            model.tok_embeddings = QuantizedEmbedding(table, tied=False, dtype=dtype)
    return model


def build_quantized_model(ckpt: Any, mode: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          group_size: int | None = None, output_mode: str | None = None,
                          max_seq_len: int | None = None, layer_modes: dict[str, str] | None = None,
                          embedding_mode: str | None = None):
    """Like ``generation.build_model``, with every linear layer quantized straight from the checkpoint.

    One checkpoint tensor is materialised at a time; GGUF blocks are converted a few MiB at a time, block
    for block where the type maps onto the mode (Q8_0, Q5_0 -> int8; Q4_0, Q4_1, Q4_K -> int4; group size
    32). ``layer_modes`` (module name -> mode) overrides ``mode`` for some modules (a Q4_K_M file's Q6_K
    ones kept as int8; ``memory.native_quantization`` finds them). Norms stay in ``dtype``. The embedding
    is a :class:`QuantizedEmbedding` (sharing ``output``'s table when tied; else in ``embedding_mode``,
    default ``output_mode``). The rotary table covers ``max_seq_len`` positions (default: the model's
    context).
    """
    from .memory import weight_arena

    _check_mode(mode)
    output_mode = output_mode or DEFAULT_OUTPUT_MODE
    _check_mode(output_mode)
    device = torch.device(device)
    # On a CPU the weights are made in place, side by side in 2 MiB pages (see memory.WeightArena).
    with weight_arena(device):
        return _build_quantized_model(ckpt, mode, device, dtype, group_size, output_mode, max_seq_len,
                                      layer_modes or {}, embedding_mode or output_mode)


def _build_quantized_model(ckpt: Any, mode: str, device: torch.device, dtype: torch.dtype, group_size: int | None,
                           output_mode: str, max_seq_len: int | None, layer_modes: dict[str, str],
                           embedding_mode: str) -> nn.Module:
    from .generation import load_parameters, meta_model

    out_gs = group_size if output_mode == mode else None  # group_size is for `mode`'s layers
    args = ckpt.args
    model = meta_model(args)
    for name in linear_names(model):
        lin = model.get_submodule(name)
        m, g = (output_mode, out_gs) if name == "output" else (layer_modes.get(name, mode), group_size)
        if m != mode and name != "output":
            _check_mode(m)
            g = None  # group_size is for `mode`'s layers
        wname = f"{name}.weight"
        if name == "output" and args.tie_embeddings:
            wname = "tok_embeddings.weight"
        qt = load_quantized_weight(ckpt, wname, tuple(lin.weight.shape), m, g)
        _set_module(model, name, make_linear(qt.to(device)))
    if args.tie_embeddings:
        model.tok_embeddings = QuantizedEmbedding(model.output, tied=True, dtype=dtype)
    else:
        _check_mode(embedding_mode)
        qt = load_quantized_weight(ckpt, "tok_embeddings.weight", (args.vocab_size, args.dim), embedding_mode,
                                   group_size if embedding_mode == mode else None)
        model.tok_embeddings = QuantizedEmbedding(make_linear(qt.to(device)), tied=False, dtype=dtype)
    load_parameters(model, ckpt, device, dtype, max_seq_len)  # what is left: the norms
    return model.eval()


def describe_quantization(model: nn.Module) -> dict[str, Any]:
    """Per quantized linear layer: mode and group size (what the saved file's metadata records)."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            layers[name] = {"mode": m.mode, "group_size": m.group_size, "shape": [m.out_features, m.in_features]}
    return layers


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------
# Saving and loading


def _tokenizer_payload(tokenizer_source: str | Path | None) -> tuple[str | None, bytes | None]:
    """(source path as recorded, embedded tokenizer metadata) - GGUF tokenizers are embedded whole."""
    if tokenizer_source is None:
        return None, None
    src = Path(tokenizer_source)
    if src.is_file():
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from .formats.gguf import open_reader, read_metadata

            meta = read_metadata(open_reader(src))
            tok = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
            return str(src.resolve()), json.dumps(tok).encode()
    return str(src.resolve()) if src.exists() else str(src), None


_TOKENIZER_KEY = "__tokenizer_gguf_json__"  # the tensor holding an embedded GGUF tokenizer's metadata (JSON bytes)


def save_quantized(model: nn.Module, args: Any, tokenizer_source: str | Path | None, out_path: str | Path, *,
                   force: bool = True) -> Path:
    """Write a quantized model as one safetensors file: its state dict (quantized layers as
    ``<name>.qweight/.scales/.mins``) plus JSON metadata (``ModelArgs``, per-layer mode and group size, the
    tokenizer's source; a GGUF tokenizer is embedded, so the file is self-contained).

    The file is written under a temporary name and renamed, so ``out_path`` is never half-written; its
    directory must exist, and an existing file is replaced only with ``force``. A failed write (disk full,
    file too large) raises RuntimeFailure ``cannot write OUT: reason``.
    """
    from safetensors.torch import save_file

    from .convert import check_output, staged

    out_path = check_output(out_path, force, tokenizer=tokenizer_source)
    layers = describe_quantization(model)
    if not layers:
        raise UsageError("save_quantized: the model has no quantized layers")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    emb = getattr(model, "tok_embeddings", None)
    embedding = {"kind": "float"}
    if isinstance(emb, QuantizedEmbedding):
        embedding = {"kind": "quantized", "tied": emb.tied}
    src, tok_blob = _tokenizer_payload(tokenizer_source)
    if tok_blob is not None:
        state[_TOKENIZER_KEY] = torch.frombuffer(bytearray(tok_blob), dtype=torch.uint8)
    meta = {
        "format": FORMAT_NAME, "version": str(FORMAT_VERSION),
        "args": json.dumps(args.to_dict()),
        "layers": json.dumps(layers),
        "embedding": json.dumps(embedding),
        "tokenizer_source": src or "",
        "compute_dtype": str(getattr(getattr(emb, "weight", None), "dtype", torch.float32)).replace("torch.", ""),
    }
    with staged(out_path, force) as staging:
        save_file(state, str(staging.path(out_path)), metadata=meta)
    return out_path


# safetensors' dtype names -> bytes per element (what a header's data_offsets must agree with)
_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                   "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def _corrupted(path: Path, why: str) -> FormatError:
    return FormatError(f"{path}: corrupted or truncated llamarun quantized file ({why})")


def is_quantized_checkpoint(path: str | Path) -> bool:
    """True for a file written by :func:`save_quantized`, False for anything else.

    A file that is one but is damaged (cut short, or its metadata edited) raises FormatError
    ``PATH: corrupted or truncated llamarun quantized file (...)``, as does a safetensors file that ends
    inside its header: callers (``Llama.load``) then say what is wrong instead of "unrecognised format".
    The header is checked whole (metadata, tensor shapes and offsets, file size), so what passes can be
    read with safetensors and its metadata parsed without further checks.
    """
    p = Path(path)
    if not p.is_file():
        return False
    try:
        found = _read_header(p)
        if found is None:
            return False
        header, header_bytes = found
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            return False
        _check_header(p, header, p.stat().st_size - 8 - header_bytes)
    except OSError:
        return False
    return True


def _read_header(p: Path) -> tuple[dict, int] | None:
    """(the parsed JSON header, its length in bytes) of a safetensors file, or None if ``p`` is not one."""
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if len(head) < 8 or not 0 < n < _MAX_HEADER_BYTES:
            return None
        text = f.read(n)
    if not text.startswith(b'{"'):
        return None
    ours = FORMAT_NAME.encode() in text
    if len(text) < n:
        if ours:
            raise _corrupted(p, f"the file ends inside its {n}-byte header")
        raise FormatError(f"{p}: truncated safetensors file (it ends inside its {n}-byte header)")
    try:
        header = json.loads(text)
    except ValueError:  # UnicodeDecodeError included
        if ours:
            raise _corrupted(p, "its header is not valid JSON") from None
        return None
    return (header, n) if isinstance(header, dict) else None


def _check_header(p: Path, header: dict, data_bytes: int) -> None:
    """Raise FormatError unless ``header`` (of a file whose format says llamarun-quantized) is what
    :func:`save_quantized` writes, describing exactly ``data_bytes`` bytes of tensor data."""
    from .config import ModelArgs

    meta = header["__metadata__"]

    def metadata_json(key: str, kind: type) -> Any:
        if key not in meta:
            raise _corrupted(p, f"no {key!r} in its metadata")
        try:
            value = json.loads(meta[key])
        except (TypeError, ValueError):
            raise _corrupted(p, f"metadata {key!r} is not valid JSON") from None
        if not isinstance(value, kind):
            raise _corrupted(p, f"metadata {key!r} is not a JSON {kind.__name__}")
        return value

    if "version" not in meta:
        raise _corrupted(p, "no 'version' in its metadata")
    try:
        version = int(meta["version"])
    except (TypeError, ValueError):
        raise _corrupted(p, f"metadata 'version' is not an integer: {meta['version']!r}") from None
    if version > FORMAT_VERSION:
        raise FormatError(f"{p}: quantized format version {version} is newer than this llamarun")
    try:
        ModelArgs(**metadata_json("args", dict))
    except (TypeError, ValueError, FormatError) as e:
        raise _corrupted(p, f"metadata 'args': {e}") from None
    layers = metadata_json("layers", dict)
    embedding = metadata_json("embedding", dict)
    if embedding.get("kind") not in ("float", "quantized") or \
            (embedding["kind"] == "quantized" and not isinstance(embedding.get("tied"), bool)):
        raise _corrupted(p, f"metadata 'embedding' is not one llamarun writes: {embedding}")
    if meta.get("compute_dtype", "float32") not in _COMPUTE_DTYPES:
        raise _corrupted(p, f"unknown compute_dtype {meta['compute_dtype']!r}")

    # Every tensor's entry, and the data they cover: back to back from 0 to the end of the file.
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    spans = []
    for name, info in tensors.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            size = _ST_DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int) and end - begin == size
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok:
            raise _corrupted(p, f"tensor {name}: bad entry {info}")
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise _corrupted(p, f"tensor {name}: data at byte {begin}, expected {pos}")
        pos = end
    if data_bytes != pos:
        raise _corrupted(p, f"{data_bytes} bytes of tensor data, its header describes {pos}")

    # The quantized layers: their tensors present, with the types and shapes their metadata implies.
    for name, info in layers.items():
        try:
            mode, g, (n, k) = info["mode"], info["group_size"], info["shape"]
            ok = mode in MODES and isinstance(g, int) and isinstance(n, int) and isinstance(k, int) and \
                n > 0 and g > 0 and k > 0 and k % g == 0 and (mode == "int8" or g % QK == 0)
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok:
            raise _corrupted(p, f"layer {name}: bad metadata {info}")
        want = {"qweight": ("I8", [n, k]) if mode == "int8" else ("U8", [n, k // 2]), "scales": ("I16", [n, k // g])}
        if mode == "int4":
            want["mins"] = ("I16", [n, k // g])
        for part, (dtype, shape) in want.items():
            t = tensors.get(f"{name}.{part}")
            if t is None:
                raise _corrupted(p, f"missing tensor {name}.{part}")
            if (t["dtype"], list(t["shape"])) != (dtype, shape):
                raise _corrupted(p, f"tensor {name}.{part} is {t['dtype']} {t['shape']}, expected {dtype} {shape}")


@dataclass
class QuantizedCheckpoint:
    model: nn.Module
    args: Any
    tokenizer: Any  # a llamarun Tokenizer, or None if the recorded source is gone
    metadata: dict[str, str]
    path: Path

    @property
    def layers(self) -> dict[str, dict]:
        """Per quantized layer: mode, group size, shape."""
        return json.loads(self.metadata["layers"])


def load_quantized(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   tokenizer_path: str | Path | None = None) -> QuantizedCheckpoint:
    """Load a :func:`save_quantized` file: the model (eval mode, on ``device``), its args and tokenizer."""
    from safetensors import SafetensorError, safe_open

    from .config import ModelArgs
    from .generation import meta_model, set_parameter
    from .model import rope_cache

    path = Path(path)
    if not is_quantized_checkpoint(path):  # raises FormatError for a damaged one
        raise FormatError(f"{path}: not a llamarun quantized checkpoint")
    device = torch.device(device)
    try:  # the header was checked; what is left to fail is the data (the file changed since?)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise _corrupted(path, str(e)) from None
    args = ModelArgs(**json.loads(meta["args"]))
    layers = json.loads(meta["layers"])
    embedding = json.loads(meta["embedding"])
    dtype = dtype or getattr(torch, meta.get("compute_dtype", "float32"))
    tok_blob = state.pop(_TOKENIZER_KEY, None)

    model = meta_model(args)
    # The layers the metadata lists must be the model's: every linear layer, plus an untied quantized
    # embedding's table (a layer of its own), each of the shape its args give.
    linears = {name: [model.get_submodule(name).out_features, model.get_submodule(name).in_features]
               for name in linear_names(model)}
    if embedding["kind"] == "quantized" and not embedding["tied"]:
        linears["tok_embeddings.table"] = [args.vocab_size, args.dim]
    missing = sorted(linears.keys() - layers.keys())
    if missing:
        raise _corrupted(path, f"no quantized layer {missing[0]}")
    for name, info in layers.items():
        want = linears.get(name)
        if want is None:
            raise _corrupted(path, f"layer {name} is not in a model of its args")
        if info["shape"] != want:
            raise _corrupted(path, f"layer {name} has shape {info['shape']}, its args say {want}")
        mode = info["mode"]
        qt = QuantizedTensor(mode, state.pop(f"{name}.qweight"), state.pop(f"{name}.scales"),
                             state.pop(f"{name}.mins") if mode == "int4" else None, int(info["group_size"]))
        _set_module(model, name, make_linear(qt.to(device)))
    if embedding["kind"] == "quantized":
        if embedding["tied"]:
            model.tok_embeddings = QuantizedEmbedding(model.output, tied=True, dtype=dtype)
        else:
            table = model.get_submodule("tok_embeddings.table")  # registered above via layers
            model.tok_embeddings = QuantizedEmbedding(table, tied=False, dtype=dtype)
    for name, param in list(model.named_parameters()):
        if name not in state:
            raise _corrupted(path, f"missing tensor {name}")
        if state[name].shape != param.shape:
            raise _corrupted(path, f"tensor {name} has shape {list(state[name].shape)}, expected {list(param.shape)}")
        set_parameter(model, name, state.pop(name).to(device=device, dtype=dtype))
    model.rope = rope_cache(args, args.max_seq_len).to(device)

    tokenizer = _quantized_file_tokenizer(path, meta, tok_blob, tokenizer_path)
    return QuantizedCheckpoint(model.eval(), args, tokenizer, meta, path)


def _quantized_file_tokenizer(path: Path, meta: dict, tok_blob: torch.Tensor | None, tokenizer_path: str | Path | None):
    """A quantized file's tokenizer: ``tokenizer_path`` if given, else the GGUF tokenizer embedded in the
    file (``tok_blob``), else the file it was made from if it still exists; None if there is none."""
    from .tokenizer import load_tokenizer_file, tokenizer_from_gguf

    if tokenizer_path is not None:
        return load_tokenizer_file(tokenizer_path)
    if tok_blob is not None:
        try:
            tok_meta = json.loads(bytes(tok_blob.numpy()).decode())
        except ValueError:  # UnicodeDecodeError included
            raise _corrupted(path, "its embedded tokenizer is not valid JSON") from None
        return tokenizer_from_gguf(tok_meta)
    if meta.get("tokenizer_source") and Path(meta["tokenizer_source"]).exists():
        src = Path(meta["tokenizer_source"])
        try:
            return load_tokenizer_file(src)
        except FormatError:
            from .formats import load_checkpoint

            return load_checkpoint(src).tokenizer
    return None


def quantized_file_info(path: str | Path, tokenizer_path: str | Path | None = None):
    """A :func:`save_quantized` file described without reading its weights, as a ``formats.Checkpoint``
    with no tensors (for ``llamarun info`` and ``plan``): its args, its tokenizer (see
    :func:`load_quantized`) and, as tensor types, each quantized layer's mode."""
    from safetensors import SafetensorError, safe_open

    from .config import ModelArgs
    from .formats import Checkpoint

    path = Path(path)
    if not is_quantized_checkpoint(path):  # raises FormatError for a damaged one
        raise FormatError(f"{path}: not a llamarun quantized checkpoint")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata()
            blob = f.get_tensor(_TOKENIZER_KEY) if _TOKENIZER_KEY in f.keys() else None
    except SafetensorError as e:
        raise _corrupted(path, str(e)) from None
    layers = json.loads(meta["layers"])
    tokenizer = _quantized_file_tokenizer(path, meta, blob, tokenizer_path)
    if tokenizer is None:
        raise FormatError(f"{path}: the tokenizer it was made with is gone; pass one with -z/--tokenizer")
    return Checkpoint(args=ModelArgs(**json.loads(meta["args"])), tensors={}, tokenizer=tokenizer,
                      format="llamarun-quantized", path=path,
                      tensor_types={f"{name}.weight": info["mode"] for name, info in layers.items()})


# ---------------------------------------------------------------------------------------------------------
# `llamarun quantize SRC OUT --to int8|int4`


def run(args: argparse.Namespace) -> int:
    """Run ``llamarun quantize``: prints one summary line; returns the exit code."""
    from .convert import check_output
    from .formats import load_checkpoint
    from .generation import default_model_path

    if args.group_size is not None and args.group_size <= 0:
        raise UsageError(f"--group-size must be positive, got {args.group_size}")
    src = Path(args.src) if args.src else default_model_path()
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"{out} is a directory: give an output file name")
    # Before the work: an output that cannot be written, or must not be (an existing file, the input).
    check_output(out, args.force, src, args.tokenizer)
    if out.suffix.lower() != ".safetensors":  # another name (.gguf, .bin) promises a format it is not
        raise UsageError(f"{out}: the output is a safetensors file: give it a .safetensors name")
    t0 = time.perf_counter()
    ckpt = load_checkpoint(src, args.tokenizer)
    try:
        with torch.inference_mode():
            model = build_quantized_model(ckpt, args.mode, "cpu", torch.float32, args.group_size, args.output_mode)
    except ValueError as e:
        raise UsageError(f"cannot quantize {src} to {args.mode}: {e}") from None
    save_quantized(model, ckpt.args, args.tokenizer or src, out, force=args.force)
    size = out.stat().st_size
    print(f"quantized {src} -> {out} ({args.mode}, {size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0
