"""Checkpoint formats: each module turns files into a :class:`Checkpoint`.

A checkpoint's tensors use Meta's names (``tok_embeddings.weight``, ``layers.0.attention.wq.weight``,
..., ``output.weight``) and Meta's rotary layout for wq/wk, so the model never sees a format's quirks.
Tensors are produced lazily, one at a time, so a loader can fill a model layer by layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..config import ModelArgs
from ..errors import FormatError
from ..tokenizer import Tokenizer


def to_meta_name(name: str, global_names: Mapping[str, str], layer_re: re.Pattern,
                 layer_names: Mapping[str, str]) -> str | None:
    """Map a format's tensor name to Meta's: whole-model tensors through ``global_names``, per-layer ones
    through ``layer_re`` (capturing the layer index and the rest) and ``layer_names``; None for tensors
    the model has no use for (rotary caches...)."""
    if name in global_names:
        return global_names[name]
    m = layer_re.fullmatch(name)
    if m and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}"
    return None


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping whose values are built on access by a per-name loader function."""

    def __init__(self, loaders: Mapping[str, Callable[[], torch.Tensor]]) -> None:
        self._loaders = dict(loaders)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


@dataclass
class Checkpoint:
    """What every format loader returns."""

    args: ModelArgs
    tensors: Mapping[str, torch.Tensor]  # Meta names -> tensors (built lazily)
    tokenizer: Tokenizer
    format: str  # "gguf", "meta", "hf", "llama2c"
    path: Path
    tensor_types: dict[str, str] = field(default_factory=dict)  # name -> storage type ("Q4_1", "F32", ...)
    # Meta name -> the format's own entry for a tensor, for loaders that convert stored blocks without
    # dequantizing (GGUF: a TensorInfo with .data, .tensor_type, .shape).
    native: Mapping[str, Any] = field(default_factory=dict)


def detect_format(path: str | Path) -> str:
    """Which format a path holds: 'gguf', 'meta', 'hf' or 'llama2c'. Raises FormatError if none."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / "params.json").is_file():
            return "meta"
        if (p / "config.json").is_file():
            return "hf"
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        if ggufs:
            raise FormatError(f"{p}: directory holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs[:3])}"
                              f"{', ...' if len(ggufs) > 3 else ''}): give the one to load")
        raise FormatError(f"{p}: directory has neither params.json (Meta) nor config.json (Hugging Face)")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if p.suffix == ".gguf":
        raise FormatError(f"{p}: not a GGUF file (bad magic {magic!r})")
    if p.suffix == ".bin" or magic == b"24ka":  # llama2.c v1/v2: uint32 0x616b3432 ("ak42") little-endian
        return "llama2c"
    raise FormatError(f"{p}: unrecognised checkpoint format (expected .gguf, a llama2.c .bin or a directory)")


def load_checkpoint(path: str | Path, tokenizer_path: str | Path | None = None) -> Checkpoint:
    """Open a checkpoint of any supported format (auto-detected) without materialising its weights.

    ``tokenizer_path`` overrides the tokenizer the checkpoint carries (a GGUF's own, or the file beside a
    Meta/HF/llama2.c checkpoint). The result is checked for what no format checks alone: the tokenizer
    must fit the model's vocabulary, and the weights must not hold more layers than the config says."""
    fmt = detect_format(path)
    if tokenizer_path is not None and not Path(tokenizer_path).exists():
        raise FormatError(f"{tokenizer_path}: no such tokenizer file")
    if fmt == "gguf":
        from . import gguf

        ckpt = gguf.load(path, tokenizer_path)
    elif fmt == "meta":
        from . import meta

        ckpt = meta.load(path, tokenizer_path)
    elif fmt == "hf":
        from . import hf

        ckpt = hf.load(path, tokenizer_path)
    else:
        from . import llama2c

        ckpt = llama2c.load(path, tokenizer_path)
    _check_consistent(ckpt)
    return ckpt


_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def _check_consistent(ckpt: Checkpoint) -> None:
    """A tokenizer with ids the model has no embedding for, or weights for layers past the config's
    ``n_layers``, mean the files do not belong together: refuse instead of generating garbage. (A model
    vocabulary larger than the tokenizer's is normal: embeddings are often padded.)"""
    a, tok = ckpt.args, ckpt.tokenizer
    if tok is not None and tok.vocab_size > a.vocab_size:
        raise FormatError(f"{ckpt.path}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary only "
                          f"{a.vocab_size}: they do not belong together (check -z/--tokenizer)")
    extra = sorted({int(m.group(1)) for m in map(_LAYER_INDEX.match, ckpt.tensors) if m and int(m.group(1)) >= a.n_layers})
    if extra:
        raise FormatError(f"{ckpt.path}: the weights hold layer {extra[0]} but the config says {a.n_layers} layers "
                          f"(n_layers / num_hidden_layers / block_count is wrong)")
