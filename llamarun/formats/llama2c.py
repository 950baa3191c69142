"""llama2.c checkpoints (Karpathy's ``run.c`` / ``runq.c`` ``.bin`` files), read through a numpy memmap.

Three layouts exist, all little-endian, all in Meta's rotary layout (llama2.c's model.py rotates adjacent
pairs), so no permutation is needed:

* version 0 (legacy, what ``run.c`` reads): 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, seq_len`` (a negative vocab_size means the classifier is not shared with the embedding),
  then float32 tensors in run.c's order: token_embedding, rms_att (all layers), wq, wk, wv, wo, rms_ffn,
  w1, w2, w3, rms_final, freq_cis_real and freq_cis_imag ([seq_len, head_dim/2] each), [wcls];
* version 1: a 256-byte header (uint32 magic 0x616b3432 "ak42", int32 version, the 7 ints, uint8
  shared_classifier, zero padding), then float32 in export.py's ``version1_export`` order: the norms
  (attention*L, ffn*L, final), tok_embeddings, wq*L, wk*L, wv*L, wo*L, w1*L, w2*L, w3*L, [output];
* version 2 (``runq.c``): the v1 header plus int32 group_size, the float32 norms as in v1, then for each
  of tok_embeddings, wq*L, ..., w3*L, [output]: int8 values followed by their float32 group scales
  (symmetric Q8_0: value = q * scale, one scale per ``group_size`` consecutive values).

The format has no field for rope_theta or the norm epsilon (run.c hard-codes 10000 and 1e-5). Version 0
files carry the rotary table, from which theta is recovered; for versions 1 and 2, llamarun's exporter
records both in the header's zero padding (see :data:`EXT_OFFSET`), which llama2.c never reads.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ModelArgs
from ..errors import FormatError
from . import Checkpoint, LazyTensors
from .meta import find_tokenizer, load_tokenizer

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32: the bytes b"24ka" on disk
HEADER_SIZE = 256  # versions 1 and 2
# llamarun's extension in the v1/v2 header padding: b"lrun", uint32 1, float64 rope_theta, float64 norm_eps.
EXT_OFFSET, EXT_FORMAT, EXT_TAG = 128, "<4sIdd", b"lrun"
DEFAULT_THETA, DEFAULT_EPS = 10000.0, 1e-5  # what run.c assumes

_MATRICES = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
             "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")


@dataclass
class Header:
    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    group_size: int = 0  # version 2 only
    rope_theta: float | None = None  # from llamarun's header extension, when present
    norm_eps: float | None = None

    @property
    def data_offset(self) -> int:
        return 28 if self.version == 0 else HEADER_SIZE


def read_header(path: Path, data: np.ndarray) -> Header:
    """Parse whichever header the file has; FormatError when it is neither a v1/v2 magic nor a sane v0."""
    raw = data[:HEADER_SIZE].tobytes()
    if len(raw) < 28:
        raise FormatError(f"{path}: truncated llama2.c checkpoint ({len(raw)} bytes, no complete header)")
    (magic,) = struct.unpack_from("<I", raw)
    if magic == MAGIC:
        if len(raw) < HEADER_SIZE:
            raise FormatError(f"{path}: truncated llama2.c checkpoint (header cut at {len(raw)} bytes)")
        version, *params = struct.unpack_from("<i7i", raw, 4)
        if version not in (1, 2):
            raise FormatError(f"{path}: llama2.c checkpoint version {version} is not supported (only 0, 1 and 2)")
        h = Header(version, *params, shared_classifier=bool(raw[36]))
        if version == 2:
            (h.group_size,) = struct.unpack_from("<i", raw, 37)
            if h.group_size <= 0:
                raise FormatError(f"{path}: invalid Q8_0 group size {h.group_size}")
        tag, ext_version, theta, eps = struct.unpack_from(EXT_FORMAT, raw, EXT_OFFSET)
        if tag == EXT_TAG and ext_version == 1:
            h.rope_theta, h.norm_eps = theta, eps
    else:
        params = list(struct.unpack_from("<7i", raw))
        shared = params[5] > 0
        params[5] = abs(params[5])
        h = Header(0, *params, shared_classifier=shared)
        if not _plausible(h):
            raise FormatError(f"{path}: not a llama2.c checkpoint (bad magic 0x{magic:08x}, and not a legacy "
                              "version-0 header either)")
    if not _plausible(h):
        raise FormatError(f"{path}: llama2.c header has impossible sizes ({_describe(h)})")
    return h


def _plausible(h: Header) -> bool:
    sizes = (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len)
    return (all(0 < s < 1 << 24 for s in sizes) and h.dim % h.n_heads == 0 and h.n_kv_heads <= h.n_heads
            and h.n_heads % h.n_kv_heads == 0 and (h.dim // h.n_heads) % 2 == 0)


def _describe(h: Header) -> str:
    return (f"dim={h.dim} hidden_dim={h.hidden_dim} n_layers={h.n_layers} n_heads={h.n_heads} "
            f"n_kv_heads={h.n_kv_heads} vocab_size={h.vocab_size} seq_len={h.seq_len}")


def layout(h: Header) -> list[tuple[str, tuple[int, ...], str]]:
    """(Meta name, shape, storage) of every tensor in file order; storage is 'f32', 'q8' or 'skip'."""
    head_dim = h.dim // h.n_heads
    kv_dim = h.n_kv_heads * head_dim
    L = range(h.n_layers)
    shape = {
        "attention.wq.weight": (h.dim, h.dim), "attention.wk.weight": (kv_dim, h.dim),
        "attention.wv.weight": (kv_dim, h.dim), "attention.wo.weight": (h.dim, h.dim),
        "feed_forward.w1.weight": (h.hidden_dim, h.dim), "feed_forward.w2.weight": (h.dim, h.hidden_dim),
        "feed_forward.w3.weight": (h.hidden_dim, h.dim),
    }
    emb = ("tok_embeddings.weight", (h.vocab_size, h.dim))
    out = [] if h.shared_classifier else [("output.weight", (h.vocab_size, h.dim))]

    def per_layer(name: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"layers.{i}.{name}", shape.get(name, (h.dim,))) for i in L]

    if h.version == 0:
        order = [emb, *per_layer("attention_norm.weight"), *per_layer("attention.wq.weight"),
                 *per_layer("attention.wk.weight"), *per_layer("attention.wv.weight"),
                 *per_layer("attention.wo.weight"), *per_layer("ffn_norm.weight"),
                 *per_layer("feed_forward.w1.weight"), *per_layer("feed_forward.w2.weight"),
                 *per_layer("feed_forward.w3.weight"), ("norm.weight", (h.dim,))]
        rope = [("freq_cis_real", (h.seq_len, head_dim // 2)), ("freq_cis_imag", (h.seq_len, head_dim // 2))]
        return [(n, s, "f32") for n, s in order] + [(n, s, "skip") for n, s in rope] + [(n, s, "f32") for n, s in out]
    norms = [*per_layer("attention_norm.weight"), *per_layer("ffn_norm.weight"), ("norm.weight", (h.dim,))]
    matrices = [emb] + [t for name in _MATRICES for t in per_layer(name)] + out
    return [(n, s, "f32") for n, s in norms] + [(n, s, "f32" if h.version == 1 else "q8") for n, s in matrices]


def _nbytes(shape: tuple[int, ...], storage: str, group_size: int) -> int:
    n = math.prod(shape)
    return n + 4 * (n // group_size) if storage == "q8" else 4 * n


def load(path: str | Path, tokenizer_path: str | Path | None = None) -> Checkpoint:
    """Open a llama2.c ``.bin``: memory-mapped lazy tensors, ModelArgs from the header, a tokenizer."""
    path = Path(path)
    try:
        # Copy-on-write: tensors can wrap the map without torch warning about read-only memory, and
        # nothing is ever written back to the file.
        data = np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read ({e})") from None
    h = read_header(path, data)

    tensors = layout(h)
    expected = h.data_offset + sum(_nbytes(s, st, h.group_size) for _, s, st in tensors)
    if data.size != expected:
        what = "truncated" if data.size < expected else "has trailing data"
        raise FormatError(f"{path}: {what}: the version-{h.version} header ({_describe(h)}) implies "
                          f"{expected} bytes, the file has {data.size}")
    if h.version == 2:
        bad = next((n for n, s, st in tensors if st == "q8" and math.prod(s) % h.group_size), None)
        if bad:
            raise FormatError(f"{path}: {bad} does not divide into Q8_0 groups of {h.group_size}")

    loaders, types, rope_table, offset = {}, {}, {}, h.data_offset
    for name, shape, storage in tensors:
        n = math.prod(shape)
        if storage == "q8":
            q = data[offset : offset + n].view(np.int8)
            scales = data[offset + n : offset + n + 4 * (n // h.group_size)].view(np.float32)
            loaders[name] = lambda q=q, s=scales, shape=shape: _dequantize_q8(q, s, h.group_size, shape)
            types[name] = "Q8_0"
        else:
            arr = data[offset : offset + 4 * n].view(np.float32).reshape(shape)
            if storage == "skip":
                rope_table[name] = arr
            else:
                loaders[name] = lambda arr=arr: torch.from_numpy(arr)
                types[name] = "F32"
        offset += _nbytes(shape, storage, h.group_size)

    theta = h.rope_theta
    if theta is None and rope_table:
        theta = rope_theta_from_table(rope_table["freq_cis_real"], rope_table["freq_cis_imag"])
    args = ModelArgs.from_llama2c_header(h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size,
                                         h.seq_len, h.shared_classifier)
    args.rope_theta = theta or DEFAULT_THETA
    args.norm_eps = h.norm_eps or DEFAULT_EPS
    args.extra["llama2c_version"] = h.version

    # run.c's default is ./tokenizer.bin; look beside the model, where exporters put it.
    tok_file = find_tokenizer(tokenizer_path, [path.parent / "tokenizer.bin"],
                              f"{path}: no tokenizer.bin beside the model (llama2.c files carry no tokenizer)")
    tokenizer = _load_tokenizer(tok_file, h.vocab_size)
    return Checkpoint(args=args, tensors=LazyTensors(loaders), tokenizer=tokenizer, format="llama2c",
                      path=path, tensor_types=types)


def _load_tokenizer(path: Path, vocab_size: int):
    """llama2.c's tokenizer.bin (exactly ``vocab_size`` tokens, as run.c reads it), any other tokenizer file
    llamarun knows, or a ``.gguf``'s embedded tokenizer (for models converted from GGUF)."""
    from ..tokenizer import SentencePieceTokenizer, tokenizer_from_gguf

    try:
        if path.suffix == ".gguf":
            from .gguf import open_reader, read_metadata

            return tokenizer_from_gguf(read_metadata(open_reader(path)))
        if path.suffix == ".bin":
            return SentencePieceTokenizer.from_llama2c_file(path, vocab_size)
    except FormatError as e:
        raise FormatError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    return load_tokenizer(path)


def _dequantize_q8(q: np.ndarray, scales: np.ndarray, group_size: int, shape: tuple[int, ...]) -> torch.Tensor:
    """llama2.c's Q8_0: int8 values times one float32 scale per group of ``group_size``."""
    values = torch.from_numpy(q).view(-1, group_size).float()
    return (values * torch.from_numpy(scales)[:, None]).reshape(shape)


def rope_theta_from_table(cos: np.ndarray, sin: np.ndarray) -> float | None:
    """Recover rope_theta from a v0 file's rotary table (position 1 holds angle = freq_k = theta^(-2k/D)).

    Every pair k > 0 gives an estimate; their median is snapped to two significant digits when within
    0.1% (10000, 500000...), since float32 angles only give theta to a few parts per million.
    """
    if cos.shape[0] < 2 or cos.shape[1] < 2:
        return None
    half = cos.shape[1]
    angles = np.arctan2(sin[1].astype(np.float64), cos[1].astype(np.float64))
    k = np.arange(1, half)
    valid = angles[1:] > 0
    if not valid.any():
        return None
    estimates = np.exp(-np.log(angles[1:][valid]) * half / k[valid])
    theta = float(np.median(estimates))
    nice = float(f"{theta:.2g}")
    return nice if abs(theta - nice) <= 1e-3 * nice else theta
