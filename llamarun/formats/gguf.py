"""GGUF checkpoints (llama.cpp's format), read with the ``gguf`` package's tables and dequantizers.

GGUF stores Meta's rotary layout for the q/k projections, so no permutation is needed here. Tensors are
read and dequantized one at a time on access: Q8_0, Q4_0 and Q4_1 in torch (fast), every other type
through ``gguf.quants``.

The ``gguf`` package itself is imported only for a file with a tensor type outside the common six below:
importing it costs ~0.15 s (it pulls in ``yaml`` for its model-card code), a quarter of loading SmolLM2.
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
    Q8_0 = 8
    BF16 = 30


# (elements, bytes) per block, as gguf.GGML_QUANT_SIZES has them.
_SIZES = {QT.F32: (1, 4), QT.F16: (1, 2), QT.Q4_0: (32, 18), QT.Q4_1: (32, 20), QT.Q8_0: (32, 34), QT.BF16: (1, 2)}
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
    if qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
        raw = _tensor(data).reshape(-1, _SIZES[qtype][1])
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
