"""GGUF checkpoints (llama.cpp's format), read with the ``gguf`` package's tables and dequantizers.

GGUF stores Meta's rotary layout for the q/k projections, so no permutation is needed here. Tensors are
read and dequantized one at a time on access: the types of the files people download (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q4_K, Q5_K, Q6_K that make up Q4_K_M / Q5_K_M / Q6_K
files) in torch, bit for bit what ``gguf.quants`` gives, on any slice of blocks (``quantize`` converts
them a few MiB at a time); the rarer ones (Q2_K, Q3_K, IQ*, TQ*) through ``gguf.quants``.

The ``gguf`` package itself is imported only for a file with one of those rarer types: importing it costs
~0.15 s (it pulls in ``yaml`` for its model-card code), a quarter of loading SmolLM2.
"""

from __future__ import annotations

import enum
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelArgs
from ..errors import FormatError
from . import Checkpoint, LazyTensors, to_meta_name


class QT(enum.IntEnum):
    """The tensor types handled in torch here, with ggml's ids (``gguf.GGMLQuantizationType``'s values:
    members of either enum compare and hash equal by id). Other types come from :func:`tensor_type`."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


# (elements, bytes) per block, as gguf.GGML_QUANT_SIZES has them.
_SIZES = {QT.F32: (1, 4), QT.F16: (1, 2), QT.BF16: (1, 2), QT.Q4_0: (32, 18), QT.Q4_1: (32, 20),
          QT.Q5_0: (32, 22), QT.Q5_1: (32, 24), QT.Q8_0: (32, 34),
          QT.Q4_K: (256, 144), QT.Q5_K: (256, 176), QT.Q6_K: (256, 210)}
GGUF_DEFAULT_ALIGNMENT = 32


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a hard dependency
        raise ImportError("llamarun needs the 'gguf' package: pip install gguf") from e
    return gguf


def tensor_type(type_id: int) -> tuple[enum.IntEnum, int, int]:
    """A ggml type id -> (its enum member, elements per block, bytes per block); ValueError if unknown."""
    if type_id in QT._value2member_map_:
        qt = QT(type_id)
        return (qt, *_SIZES[qt])
    gguf = _gguf()
    qt = gguf.GGMLQuantizationType(type_id)
    return (qt, *gguf.GGML_QUANT_SIZES[qt])


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

# Tensor types we can turn into floats (by name): the ones done in torch below plus gguf.quants' dequantizers.
SUPPORTED_TYPES = {
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0",
}


def gguf_to_meta_name(name: str) -> str | None:
    """Map a GGUF tensor name to Meta's, or None for tensors the model has no use for."""
    return to_meta_name(name, _GLOBAL_NAMES, _LAYER_RE, _LAYER_NAMES)


# GGUF value types -> struct format of one scalar (8 = string, 9 = array are handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class TensorInfo:
    """One tensor of a GGUF file: its type, torch-order shape and where its bytes are."""

    name: str
    shape: tuple[int, ...]  # torch order: [out, in]
    tensor_type: enum.IntEnum  # QT, or gguf.GGMLQuantizationType for the less common types
    path: Path
    offset: int
    nbytes: int

    @property
    def data(self) -> np.ndarray:
        """The raw bytes (uint8), read from the file on each access.

        Read rather than memory-mapped: pages of a mapping stay in this process's resident set after the
        tensor is converted, so loading a model would peak at model + file; a read copy is freed as soon
        as its converted tensor exists, and the page cache still makes a second load fast.
        """
        return self.read(0, self.nbytes)

    def read(self, start: int, nbytes: int) -> np.ndarray:
        """Bytes [start, start + nbytes) of the tensor's data (uint8), read from the file."""
        data = np.empty(nbytes, dtype=np.uint8)
        self.read_into(start, data)
        return data

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill ``out`` (a contiguous uint8 array) with the tensor's bytes from ``start`` on."""
        with open(self.path, "rb") as f:
            f.seek(self.offset + start)
            got = f.readinto(memoryview(out))
        if got != out.size:
            raise FormatError(f"{self.path}: tensor {self.name} is truncated")


@dataclass
class GGUFFile:
    path: Path
    meta: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    """Sequential little-endian reads from a bytes-like buffer."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, count: int) -> list[str]:
        """``count`` strings in a row: the vocabulary and merges, ~100k entries, so the loop is kept tight."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = length(buf, pos)
            pos += 8
            if pos + n > end:
                raise ValueError("string runs past the end of the file")
            out.append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 9:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _NUMPY:  # numeric arrays in one go (token types, scores)
                arr = np.frombuffer(self.buf, dtype=_NUMPY[itype], count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            if itype == 8:
                return self.strings(count)
            return [self.value(itype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


def open_reader(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; tensor data stays memory-mapped.

    Written here rather than using ``gguf.GGUFReader`` because that reader builds a numpy view per
    vocabulary entry and takes seconds on a 49k-token vocabulary; this takes milliseconds. Every parse
    failure becomes a one-line FormatError.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (bad magic {magic!r})")
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")  # only the header is read through this mapping
        cur = _Cursor(memoryview(mm))
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        align = int(meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // align) * align
        tensors = []
        for name, dims, qtype, offset in infos:
            qt, block_elems, block_bytes = tensor_type(qtype)
            n_elems = int(np.prod(dims))
            nbytes = n_elems // block_elems * block_bytes
            begin = data_start + offset
            if begin + nbytes > len(mm):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            tensors.append(TensorInfo(name, tuple(int(d) for d in reversed(dims)), qt, path, begin, nbytes))
    except FormatError:
        raise
    except Exception as e:  # struct.error, ValueError (bad enum), MemoryError on absurd counts...
        raise FormatError(f"{path}: corrupted or truncated GGUF file ({type(e).__name__}: {e})") from None
    return GGUFFile(path, meta, tensors)


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """All key/value metadata as plain Python values (strings, numbers, lists)."""
    return reader.meta


def _f16_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start+2) of each block as float32, shape [..., 1]."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16).float()


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch view of a (read-only, memory-mapped) numpy array, without copying it."""
    with warnings.catch_warnings():  # torch warns that it cannot protect read-only memory; we never write it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> [..., 2, n]: the low nibbles, then the high ones."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _bits(b: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 [..., n] -> [..., 8 // width, n]: fields of ``width`` bits, lowest first."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    return (b.unsqueeze(-2) >> shifts[:, None]) & ((1 << width) - 1)


def k_sub_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K super-blocks [B, bytes] -> each 32-element sub-block's scale d * sc and min dmin * m, two
    float32 [B, 8] (w = scale q - min). The 6-bit sc and m are in bytes 4..16: bytes 0-3 hold sc 0-3 (and
    bits 4-5 of sc 4-7 in their top two bits), bytes 4-7 the mins likewise, bytes 8-11 the low 4 bits of
    sc / m 4-7."""
    sc, mn, lo = raw[:, 4:8], raw[:, 8:12], raw[:, 12:16]
    scales = torch.cat([sc & 63, (lo & 0x0F) | ((sc >> 2) & 0x30)], dim=1)
    mins = torch.cat([mn & 63, (lo >> 4) | ((mn >> 2) & 0x30)], dim=1)
    return _f16_column(raw, 0) * scales.float(), _f16_column(raw, 2) * mins.float()


def _q_k_sub(raw: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K values q [B, 8, 32] -> floats (d * scale) * q - dmin * min per sub-block, as ggml does."""
    scale, low = k_sub_scales(raw)
    return scale[..., None] * q.float() - low[..., None]


def _dq_q8_0(raw: torch.Tensor) -> torch.Tensor:  # [d: f16][32 x int8]
    return raw[:, 2:].view(torch.int8).float() * _f16_column(raw, 0)


def _dq_q4_0(raw: torch.Tensor) -> torch.Tensor:  # [d: f16][16 bytes: elements 0..15 low nibbles, 16..31 high]
    return (_nibbles(raw[:, 2:]).flatten(1).float() - 8.0) * _f16_column(raw, 0)


def _dq_q4_1(raw: torch.Tensor) -> torch.Tensor:  # [d][m][16 bytes], w = q d + m
    return _nibbles(raw[:, 4:]).flatten(1).float() * _f16_column(raw, 0) + _f16_column(raw, 2)


def q5_values(raw: torch.Tensor, off: int) -> torch.Tensor:
    """Q5_0/Q5_1 5-bit values 0..31 [B, 32]: the fifth bits in 4 bytes at ``off`` (element e is bit e),
    the low four in 16 bytes after them, nibble-ordered like Q4_0."""
    high = _bits(raw[:, off : off + 4], 1).transpose(1, 2).flatten(1)  # byte e // 8, bit e % 8
    return _nibbles(raw[:, off + 4 :]).flatten(1) | (high << 4)


def _dq_q5_0(raw: torch.Tensor) -> torch.Tensor:  # [d][qh: 4][qs: 16], w = (q - 16) d
    return (q5_values(raw, 2).float() - 16.0) * _f16_column(raw, 0)


def _dq_q5_1(raw: torch.Tensor) -> torch.Tensor:  # [d][m][qh: 4][qs: 16], w = q d + m
    return q5_values(raw, 4).float() * _f16_column(raw, 0) + _f16_column(raw, 2)


def q4_k_values(raw: torch.Tensor) -> torch.Tensor:
    """Q4_K's 4-bit values [B, 8, 32]: 4 runs of 32 bytes after the scales, each run's low nibbles one
    sub-block and its high nibbles the next."""
    return _nibbles(raw[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)


def _dq_q4_k(raw: torch.Tensor) -> torch.Tensor:  # [d][dmin][scales: 12][qs: 128]
    return _q_k_sub(raw, q4_k_values(raw)).flatten(1)


def _dq_q5_k(raw: torch.Tensor) -> torch.Tensor:  # [d][dmin][scales: 12][qh: 32][qs: 128]
    low = _nibbles(raw[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = _bits(raw[:, 16:48], 1)  # [B, 8, 32]: bit i of byte e is sub-block i's element e
    return _q_k_sub(raw, low | (high << 4)).flatten(1)


def q6_k_values(raw: torch.Tensor) -> torch.Tensor:
    """Q6_K's signed 6-bit values (q - 32) [B, 16, 16], one row per 16-element sub-block. Each half of
    128 elements: 64 low-nibble bytes (elements 0..63 low nibbles, 64..127 high) and 32 bytes of 2-bit
    high parts (four fields per byte, element 32 f + e in field f of byte e)."""
    low = _nibbles(raw[:, :128].reshape(-1, 2, 64)).reshape(-1, 2, 128)
    high = _bits(raw[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 2, 128)
    return ((low | (high << 4)).view(torch.int8) - 32).reshape(-1, 16, 16)


def _dq_q6_k(raw: torch.Tensor) -> torch.Tensor:  # [ql: 128][qh: 64][scales: 16 x int8][d]
    d = (_f16_column(raw, 208) * raw[:, 192:208].view(torch.int8).float())[..., None]
    return (d * q6_k_values(raw).float()).flatten(1)


# Block dequantizers in torch: uint8 blocks [B, bytes] -> float32 [B, elements], bit for bit what ggml
# (and gguf.quants) compute.
_DEQUANT = {QT.Q8_0: _dq_q8_0, QT.Q4_0: _dq_q4_0, QT.Q4_1: _dq_q4_1, QT.Q5_0: _dq_q5_0, QT.Q5_1: _dq_q5_1,
            QT.Q4_K: _dq_q4_k, QT.Q5_K: _dq_q5_k, QT.Q6_K: _dq_q6_k}


# The quantized types dequantized in torch, by name -> (elements, bytes) per block.
BLOCK_TYPES = {qt.name: _SIZES[qt] for qt in _DEQUANT}


def dequantize_blocks(raw: torch.Tensor, qtype: enum.IntEnum) -> torch.Tensor | None:
    """Quantized blocks uint8 [B, bytes] of type ``qtype`` as float32 [B, elements] in torch; None for a
    type without a torch dequantizer here (``dequantize`` then uses gguf.quants)."""
    fn = _DEQUANT.get(qtype)
    return None if fn is None else fn(raw)


def dequantize(data: np.ndarray, qtype: enum.IntEnum, shape: tuple[int, ...]) -> torch.Tensor:
    """One GGUF tensor's raw bytes to a float tensor of ``shape`` (torch order, [out, in]).

    F32/F16/BF16 keep their dtype (a view of ``data``, no copy); quantized types become float32.
    """
    if qtype == QT.F32:
        return _tensor(data.view(np.float32)).reshape(shape)
    if qtype == QT.F16:
        return _tensor(data.view(np.float16)).reshape(shape)
    if qtype == QT.BF16:
        return _tensor(data.view(np.int16)).view(torch.bfloat16).reshape(shape)
    if qtype in _DEQUANT:
        return _DEQUANT[qtype](_tensor(data).reshape(-1, _SIZES[qtype][1])).reshape(shape)
    gguf = _gguf()
    return torch.from_numpy(gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType(qtype))).reshape(shape)


def load(path: str | Path, tokenizer_path: str | Path | None = None) -> Checkpoint:
    """Open a GGUF checkpoint: ModelArgs from its metadata, lazy Meta-named tensors, its tokenizer (or the
    one in ``tokenizer_path``, which overrides it)."""
    from ..tokenizer import load_tokenizer_file, tokenizer_from_gguf

    path = Path(path)
    if path.is_dir():
        path = sorted(path.glob("*.gguf"))[0]
    reader = open_reader(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: t.shape for name, t in tensors.items()}
    args = ModelArgs.from_gguf(meta, shapes)
    if "rope_freqs.weight" in tensors:  # Llama 3.1: per-frequency divisors precomputed by the converter
        rf = tensors["rope_freqs.weight"]
        factors = dequantize(rf.data, rf.tensor_type, (-1,))
        args.rope_scaling = {"freq_factors": factors.float().tolist()}

    loaders, types, native = {}, {}, {}
    for name, t in tensors.items():
        meta_name = gguf_to_meta_name(name)
        if meta_name is None:
            continue
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise FormatError(f"{path}: tensor {name} has unsupported type {t.tensor_type.name}")
        types[meta_name] = t.tensor_type.name
        native[meta_name] = t
        loaders[meta_name] = (lambda t=t, s=shapes[name]: dequantize(t.data, t.tensor_type, s))
    _check_complete(path, args, loaders)
    if tokenizer_path is not None:
        tokenizer = load_tokenizer_file(tokenizer_path)
    else:
        try:
            tokenizer = tokenizer_from_gguf(meta)
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
    return Checkpoint(args=args, tensors=LazyTensors(loaders), tokenizer=tokenizer, format="gguf",
                      path=path, tensor_types=types, native=native)


def _check_complete(path: Path, args: ModelArgs, names: dict) -> None:
    """Fail early, naming the tensor, if the file lacks a weight the model needs."""
    needed = ["tok_embeddings.weight", "norm.weight"] + ([] if args.tie_embeddings else ["output.weight"])
    for i in range(args.n_layers):
        needed += [f"layers.{i}.{n}" for n in _LAYER_NAMES.values()]
    missing = [n for n in needed if n not in names]
    if missing:
        raise FormatError(f"{path}: missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
