"""GGUF checkpoints (llama.cpp's format), read with the ``gguf`` package.

GGUF stores Meta's rotary layout for the q/k projections, so no permutation is needed here. Tensors are
memory-mapped and dequantized one at a time on access: Q8_0, Q4_0 and Q4_1 in torch (fast), every other
type through ``gguf.quants``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelArgs
from ..errors import FormatError
from . import Checkpoint, LazyTensors

try:
    import gguf
    from gguf import GGMLQuantizationType as QT
except ImportError as e:  # pragma: no cover - gguf is a hard dependency
    raise ImportError("llamarun needs the 'gguf' package: pip install gguf") from e

# GGUF name -> Meta name. Per-layer names are matched with a regex below.
_GLOBAL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# Tensor types we can turn into floats: the ones done in torch below plus gguf.quants' dequantizers.
SUPPORTED_TYPES = {
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
    QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ1_S, QT.IQ1_M, QT.IQ4_NL, QT.IQ4_XS,
    QT.TQ1_0, QT.TQ2_0,
}


def gguf_to_meta_name(name: str) -> str | None:
    """Map a GGUF tensor name to Meta's, or None for tensors the model has no use for."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def open_reader(path: str | Path) -> "gguf.GGUFReader":
    """Open a GGUF file, turning every parse failure into a one-line FormatError."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (bad magic {magic!r})")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors...
        raise FormatError(f"{path}: corrupted or truncated GGUF file ({type(e).__name__}: {e})") from None


def read_metadata(reader: "gguf.GGUFReader") -> dict[str, Any]:
    """All key/value metadata as plain Python values (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise FormatError(f"GGUF metadata key {key!r} is corrupted ({e})") from None
    return meta


def _f16_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start+2) of each block as float32, shape [..., 1]."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16).float()


def dequantize(data: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    """One GGUF tensor's raw data to a float tensor of ``shape`` (numpy order, [out, in]).

    F32/F16/BF16 keep their dtype (no copy beyond the mmap); quantized types become float32.
    """
    if qtype == QT.F32:
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(shape)
    if qtype == QT.F16:
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float16)).reshape(shape)
    if qtype == QT.BF16:
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.int16))
        return raw.view(torch.bfloat16).reshape(shape)
    if qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8)).reshape(-1, block_bytes)
        if qtype == QT.Q8_0:  # [d: f16][32 x int8]
            q = raw[:, 2:].view(torch.int8).float()
            out = q * _f16_column(raw, 0)
        else:  # [d: f16]([m: f16])[16 bytes: low nibbles = elements 0..15, high nibbles = 16..31]
            off = 2 if qtype == QT.Q4_0 else 4
            qs = raw[:, off:]
            q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
            d = _f16_column(raw, 0)
            out = (q - 8.0) * d if qtype == QT.Q4_0 else q * d + _f16_column(raw, 2)
        return out.reshape(shape)
    return torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(shape)


def load(path: str | Path) -> Checkpoint:
    """Open a GGUF checkpoint: ModelArgs from its metadata, lazy Meta-named tensors, its tokenizer."""
    from ..tokenizer import tokenizer_from_gguf

    path = Path(path)
    if path.is_dir():
        path = sorted(path.glob("*.gguf"))[0]
    reader = open_reader(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    # numpy order: GGUF lists dims innermost-first, torch wants [out, in].
    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in tensors.items()}
    args = ModelArgs.from_gguf(meta, shapes)
    if "rope_freqs.weight" in tensors:  # Llama 3.1: per-frequency divisors precomputed by the converter
        factors = dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type, (-1,))
        args.rope_scaling = {"freq_factors": factors.float().tolist()}

    loaders, types = {}, {}
    for name, t in tensors.items():
        meta_name = gguf_to_meta_name(name)
        if meta_name is None:
            continue
        if t.tensor_type not in SUPPORTED_TYPES:
            raise FormatError(f"{path}: tensor {name} has unsupported type {t.tensor_type.name}")
        types[meta_name] = t.tensor_type.name
        loaders[meta_name] = (lambda t=t, s=shapes[name]: dequantize(t.data, t.tensor_type, s))
    _check_complete(path, args, loaders)
    try:
        tokenizer = tokenizer_from_gguf(meta)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    return Checkpoint(args=args, tensors=LazyTensors(loaders), tokenizer=tokenizer, format="gguf",
                      path=path, tensor_types=types)


def _check_complete(path: Path, args: ModelArgs, names: dict) -> None:
    """Fail early, naming the tensor, if the file lacks a weight the model needs."""
    needed = ["tok_embeddings.weight", "norm.weight"] + ([] if args.tie_embeddings else ["output.weight"])
    for i in range(args.n_layers):
        needed += [f"layers.{i}.{n}" for n in _LAYER_NAMES.values()]
    missing = [n for n in needed if n not in names]
    if missing:
        raise FormatError(f"{path}: missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
