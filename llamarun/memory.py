"""The memory plan: what a model needs in each configuration, what the device has, and what to load.

Everything is computed from ``ModelArgs`` alone, before a single weight is read, so ``llamarun plan`` also
works for a model the user has not downloaded yet (``--config llama-2-7b``). The same plan is applied when
loading (``--quantize auto``): native dtype if it fits, else int8, else int4, else int4 with some layers kept
on the CPU; and if even that cannot fit, a one-line error says how much is missing before anything is
allocated.

Byte counts follow the formats of :mod:`llamarun.quantize`: int8 is one byte per weight plus a float16
scale per output channel (per 32-block for GGUF Q8_0 sources); int4 is half a byte per weight plus a
float16 scale and minimum per 32-block; the output layer (and a tied embedding, which shares it) stays
int8 in both quantized modes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import re
import sys
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from .config import KNOWN_CONFIGS, ModelArgs
from .errors import RuntimeFailure, UsageError

GiB = 1 << 30
MiB = 1 << 20

QUANT_CHOICES = ("none", "int8", "int4")
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
# What a process holds besides weights and caches: Python, torch and llamarun's imports plus a tokenizer on
# a CPU (measured on a Zen 3 VM: 224 MiB RSS after importing torch, ~250 MiB with SmolLM2's 49k-token
# tokenizer; cpu_runtime_bytes measures it, this is its floor); on a GPU, the CUDA context, cuBLAS
# workspaces and the caching allocator's slack.
CPU_RUNTIME_BYTES = 240 * MiB
GPU_RUNTIME_BYTES = 600 * MiB
PREFILL_CHUNK = 512  # the engine feeds long prompts in chunks of this many tokens (bounds activations)
# On a CPU, a quarter of that, counted over all rows of a batch (16 prompts: 8 tokens of each at a time):
# a chunk's activations, and the heap they leave, are most of a prefill's peak over its KV cache. The
# default model (Zen 3, same process alternating with 256): the batch-16 prefill's peak over the cache
# 12.4 -> 7.4 MiB, the 512-token prompt's 23 -> 18 MiB (compare.py's peak 383-384 -> 378-380 MiB), for
# 0-5% of prefill speed (medians; the int4 GEMM unpacks each weight tile once per chunk). A quarter of the
# logits when every position is scored (49K vocabulary: 25 instead of 100 MB). The plan keeps
# PREFILL_CHUNK's larger estimate.
CPU_PREFILL_CHUNK = 128
GGUF_READ_BYTES = 4 << 20  # a GGUF tensor converted block for block is read this much at a time


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, because ru_maxrss carries the high-water mark
    of the parent across fork and exec (a child of a big process would report the parent's peak)."""
    return _proc_status("VmHWM:") or _ru_maxrss()


def rss_bytes() -> int:
    """This process's resident memory now (Linux: VmRSS; elsewhere the peak, the closest there is)."""
    return _proc_status("VmRSS:") or _ru_maxrss()


def _proc_status(key: str) -> int:
    """A size from /proc/self/status in bytes, or 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere a no-op returning
    False). Loading frees a lot in small pieces (the vocabulary's strings, the tokenizer's construction,
    read buffers), which glibc keeps for reuse and the tensors made afterwards never reuse: ~10 MiB of the
    default model's resident memory. It takes ~2 ms."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if os.name == "posix":
            import ctypes

            try:
                _malloc_trim = ctypes.CDLL(None).malloc_trim
            except (AttributeError, OSError):  # not glibc (musl, macOS)
                pass
    return bool(_malloc_trim and _malloc_trim(0))


_malloc_trim: Any = None


HUGE_PAGE = 2 * MiB


@functools.lru_cache(maxsize=None)
def huge_pages_available() -> bool:
    """Whether this process can ask for transparent huge pages (Linux with THP in "always" or "madvise");
    read once (loading asks for every big tensor)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in mode


# huge_empty's and lazy_zeros' live mappings, by the address of their first byte (a weak reference to each:
# the tensor's storage keeps its mapping alive, and a dead entry's address may be reused).
_HUGE_MAPPINGS: dict[int, weakref.ref] = {}
_LAZY_MAPPINGS: dict[int, weakref.ref] = {}


def _mapped(nbytes: int, dtype: torch.dtype, registry: dict[int, weakref.ref],
            advice: int | None = None) -> torch.Tensor:
    """A 1-D CPU tensor of ``nbytes`` in a private anonymous mapping of its own (given ``advice`` before its
    first touch), recorded in ``registry``."""
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if advice is not None:
        buf.madvise(advice)
    t = torch.frombuffer(buf, dtype=dtype)  # the tensor's storage keeps the mapping alive
    for addr in [a for a, ref in registry.items() if ref() is None]:
        del registry[addr]
    registry[t.data_ptr()] = weakref.ref(buf)
    return t


def huge_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in a mapping of its own that asks for 2 MiB pages before its first touch
    (torch.empty where huge pages are unavailable or the tensor is under 2 MiB). Loading fills the big
    weights once: a 7B model's 7 GB first touched in 4 KiB pages spent ~10 s in page faults on a 2-core VM."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not huge_pages_available():
        return torch.empty(shape, dtype=dtype)
    return _mapped(nbytes, dtype, _HUGE_MAPPINGS, mmap.MADV_HUGEPAGE).view(shape)


class WeightArena:
    """Where a CPU model's weights go while it loads (:func:`weight_arena`): tensors side by side in chunks
    of 2 MiB pages (:func:`huge_empty`), each starting on a cache line; tensors of half a chunk or more get a
    mapping of their own.

    Why: loading put every tensor under 2 MiB (all of SmolLM2's per-layer weights) in the C heap, and
    :func:`pack_weights` then copied them into 2 MiB pages. The copy raised the load's peak, and the tensors
    copied from left 81 MiB of holes in the heap, which the activations of every later prefill and decode
    step, allocated wherever glibc found room, brought back into the resident set a few hundred KiB at a
    time. With the weights made in place (and GGUF blocks converted straight into them,
    ``quantize.from_gguf_file``), the default model's load peaks at 352 MiB instead of 360-385.
    """

    CHUNK = 64 * MiB

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None
        self._offset = self._end = 0
        self._chunks: set[int] = set()  # their storages' addresses
        self._scratch: torch.Tensor | None = None

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in one of the arena's chunks."""
        return t.untyped_storage().data_ptr() in self._chunks

    def scratch(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of ``nbytes`` for reading the checkpoint, the same memory for every tensor of the load
        (at least GGUF_READ_BYTES): a buffer of its own per tensor was memory the kernel had to fault in and
        zero again for each, the whole file over (with the word copies of ``quantize``'s fills, the default
        model's weights load in 0.245 s instead of 0.305: medians of 6 fresh processes)."""
        if self._scratch is None or self._scratch.numel() < nbytes:
            self._scratch = None  # the old one goes first
            self._scratch = torch.empty(max(nbytes, GGUF_READ_BYTES), dtype=torch.uint8)
        return self._scratch[:nbytes]

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the arena."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes >= self.CHUNK // 2:
            return huge_empty(shape, dtype)
        if self._chunk is None or self._offset + nbytes > self._end:
            self._chunk = huge_empty((self.CHUNK + HUGE_PAGE,), torch.uint8)
            self._chunks.add(self._chunk.untyped_storage().data_ptr())
            self._offset = -self._chunk.data_ptr() % HUGE_PAGE  # the first tensor starts a 2 MiB page
            self._end = self._offset + self.CHUNK
        t = self._chunk[self._offset : self._offset + nbytes].view(dtype).view(shape)
        self._offset += -(-nbytes // 64) * 64
        return t


_ARENA: WeightArena | None = None


@contextlib.contextmanager
def weight_arena(device: torch.device | str = "cpu") -> Iterator[WeightArena | None]:
    """Within it, :func:`weight_empty` allocates from one :class:`WeightArena`, for a model loading on
    ``device``: on a CPU (elsewhere it does nothing and gives None)."""
    global _ARENA
    if torch.device(device).type != "cpu":
        yield None
        return
    outer, _ARENA = _ARENA, WeightArena()
    try:
        yield _ARENA
    finally:
        _ARENA = outer


def weight_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for a weight: in the active :func:`weight_arena`, else :func:`huge_empty`."""
    return _ARENA.empty(shape, dtype) if _ARENA is not None else huge_empty(shape, dtype)


def read_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` to read checkpoint data into: the active :func:`weight_arena`'s reused one
    (:meth:`WeightArena.scratch`), else a new one."""
    return _ARENA.scratch(nbytes) if _ARENA is not None else torch.empty(nbytes, dtype=torch.uint8)


def weight_copy(t: torch.Tensor) -> torch.Tensor:
    """CPU tensor ``t`` in the active :func:`weight_arena`: a copy made by :func:`weight_empty`, or ``t``
    itself when it is in one of the arena's or :func:`huge_empty`'s mappings already, is empty, or no arena
    is active."""
    if (t.device.type != "cpu" or _ARENA is None or not t.numel() or _ARENA.holds(t)
            or in_huge_mapping(t.untyped_storage())):
        return t
    out = weight_empty(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


def lazy_zeros(shape: tuple[int, ...], *, dtype: torch.dtype,
               device: torch.device | str | None = None) -> torch.Tensor:
    """A zero-filled tensor (``torch.zeros``'s signature) that, on a CPU, is resident only where it is
    written: a private anonymous mapping of its own, whose untouched pages are the kernel's shared zero page.

    For KV caches: ``torch.zeros`` writes every byte, so a cache sized for the longest generation held all
    of it from the start (the static cache of ``Llama.compile``: rows x the whole context, 92 MiB a row for
    SmolLM2 at 4096 tokens, of which a short chat touches a few MiB). Being a mapping of its own, it also
    goes back to the system when freed, where a cache in the C heap left holes that the next allocations
    did not fill: the default model's peak over compare.py's workload 385-386 -> 381-382 MiB. Elsewhere,
    and under 64 KiB, ``torch.zeros``. :func:`release_pages` makes it zeros again, resident nowhere."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device or "cpu").type != "cpu" or nbytes < 64 * 1024:
        return torch.zeros(shape, dtype=dtype, device=device)
    return _mapped(nbytes, dtype, _LAZY_MAPPINGS).view(shape)


# Linux's MADV_DONTNEED drops a private anonymous page, which then reads as zeros; elsewhere it is a hint.
_ZERO_ON_DONTNEED = sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")


def release_pages(t: torch.Tensor) -> bool:
    """Give the pages of a :func:`lazy_zeros` tensor (all of it, also through a view) back to the system: it
    reads as zeros again and is resident nowhere until written, at the same address. A no-op returning False
    for any other tensor, or off Linux.

    For the KV cache between generations (each starts again from position 0): a long prompt's pages would
    otherwise stay resident under every later, shorter generation."""
    if not _ZERO_ON_DONTNEED:
        return False
    buf = _mapping_of(t.untyped_storage(), _LAZY_MAPPINGS) if t.device.type == "cpu" else None
    if buf is None:
        return False
    buf.madvise(mmap.MADV_DONTNEED)  # a private anonymous mapping: the next read finds the zero page
    return True


def _mapping_of(storage: Any, registry: dict[int, weakref.ref]) -> mmap.mmap | None:
    """The live mapping of ``registry`` that is exactly ``storage``, or None."""
    ref = registry.get(storage.data_ptr())
    buf = ref() if ref is not None else None
    return buf if buf is not None and len(buf) == storage.nbytes() else None


def in_huge_mapping(storage: Any) -> bool:
    """Whether a storage is one of :func:`huge_empty`'s mappings (its 2 MiB pages asked for already)."""
    return _mapping_of(storage, _HUGE_MAPPINGS) is not None


def _tensors_by_storage(model: torch.nn.Module) -> dict[int, tuple[Any, list]] | None:
    """The model's non-empty parameters and buffers grouped by storage: data_ptr -> (storage, [(module,
    name, tensor, is_parameter), ...]); None if any is off the CPU."""
    groups: dict[int, tuple[Any, list]] = {}
    for mod in model.modules():
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in table.items():
                if t is None:
                    continue
                if t.device.type != "cpu":
                    return None
                if t.numel():
                    st = t.untyped_storage()
                    groups.setdefault(st.data_ptr(), (st, []))[1].append((mod, name, t, is_param))
    return groups


def pack_weights(model: torch.nn.Module) -> int:
    """Move a CPU model's parameters and buffers into one arena of 2 MiB transparent huge pages, in place;
    returns the bytes moved (0 where huge pages are unavailable, or the model is not on the CPU).

    Why: decoding streams every weight once per token, and with 4 KiB pages that is a TLB miss every 4 KiB
    (for SmolLM2's int4 weights ~24k a token), each a page walk that is twice as deep under a VM's nested
    paging. Measured on the 2-core Zen 4 VM, the same process alternating two copies of a model: batch-1
    decode 149 -> 178 tok/s for SmolLM2 int4, 413 -> 537 for stories15M in float32 (batch 16, which is
    compute-bound, did not change).

    Each storage is copied, then every tensor on it is replaced by a view of the copy (ties and views are
    kept), so the old storage is freed before the next is copied, and the heap's freed pages are handed back
    every 8 MiB: the peak stays near the weights plus 8 MiB (the last few MiB are left to the caller's
    :func:`release_free_memory`, which ``Llama.load`` calls next). The arena is one private anonymous
    mapping (:func:`huge_empty`), rounded up to 2 MiB at most once. Storages that loading already put in
    mappings of their own (``huge_empty``: the big tables, a 7B model's every weight) stay where they are:
    copying them would cost a second pass over them and, while one is copied, its size in peak memory
    (SmolLM2's 28 MiB embedding table: the load's peak RSS 393 -> 381 MiB).
    """
    groups = _tensors_by_storage(model)
    if not groups or not huge_pages_available():
        return 0
    groups = {k: v for k, v in groups.items() if not in_huge_mapping(v[0])}
    if not groups:
        return 0
    for mod in model.modules():
        if hasattr(mod, "_stacks"):  # fastpath.FastTransformer's gathered decode arguments hold the tensors
            mod._stacks = None
    align = 64  # each storage starts on a cache line
    total = sum(-(-st.nbytes() // align) * align for st, _ in groups.values())
    moved = freed = 0
    with torch.inference_mode():
        arena = huge_empty((total + HUGE_PAGE,), torch.uint8)  # its views keep the mapping alive
        offset = -arena.data_ptr() % HUGE_PAGE  # bytes into the arena's storage
        while groups:  # popped one by one: no reference to an old storage may outlive its copy
            _, (old, users) = groups.popitem()
            n = old.nbytes()
            arena[offset : offset + n].copy_(torch.empty(0, dtype=torch.uint8).set_(old, 0, (n,), (1,)))
            _replace(users, arena.untyped_storage(), offset)
            del old, users
            moved, freed, offset = moved + n, freed + n, offset + -(-n // align) * align
            if freed >= 8 * MiB:  # hand the freed heap pages back as we go: else they add up to a second copy
                release_free_memory()
                freed = 0
    return moved


def _replace(users: list, storage: Any, byte_offset: int) -> None:
    """Point every (module, name, tensor, is_parameter) of one old storage at the same place in ``storage``,
    whose bytes from ``byte_offset`` are a copy of the old storage's: a tensor seen twice (a tied weight)
    gets one replacement."""
    replaced: dict[int, torch.Tensor] = {}
    for mod, name, t, is_param in users:
        new = replaced.get(id(t))
        if new is None:
            new = torch.empty(0, dtype=t.dtype).set_(storage, byte_offset // t.element_size() + t.storage_offset(),
                                                     t.shape, t.stride())
            if is_param:
                new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
            replaced[id(t)] = new
        setattr(mod, name, new)  # QuantizedLinear drops its cached kernel arguments here


def cpu_runtime_bytes() -> int:
    """What this process holds now (Python, torch, the tokenizer: measured, since it varies with the
    environment; not its peak, which building the tokenizer raises by ~13 MiB for nothing that stays) plus
    16 MiB for what running adds (code pages touched by the first prefill: ~8 MiB), or the typical figure
    when the process is still smaller than that."""
    return max(CPU_RUNTIME_BYTES, rss_bytes() + 16 * MiB)


def parse_size(text: str) -> int:
    """'12GiB', '12 GB', '800MiB', '1.5G', '123456' -> bytes (GB and GiB both mean 2**30: what users mean)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UsageError(f"cannot read memory size {text!r} (try 12GiB, 800MiB)")
    unit = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def config_by_name(name: str) -> ModelArgs:
    """ModelArgs of a known model name (``llama-2-7b``, ...)."""
    key = name.lower()
    if key not in KNOWN_CONFIGS:
        raise UsageError(f"unknown config {name!r}; known: {', '.join(KNOWN_CONFIGS)}")
    return ModelArgs(**KNOWN_CONFIGS[key])


# ---- sizes ------------------------------------------------------------------------------------------------

def linear_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    """[out, in] of one block's linear layers (fused as the model holds them)."""
    return list(block_linears(args).values())


def block_linears(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """One block's linear modules (names under ``layers.N.``, fused as the model holds them) -> [out, in]."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"attention.wqkv": (q + 2 * kv, args.dim), "attention.wo": (args.dim, q),
            "feed_forward.w13": (2 * args.hidden_dim, args.dim), "feed_forward.w2": (args.dim, args.hidden_dim)}


def override_bytes(args: ModelArgs, mode: str, layer_modes: dict[str, str], layers: range,
                   group_size: int | None = None) -> int:
    """Bytes that the modes of ``layer_modes`` (module name -> mode, as :func:`native_quantization` gives)
    add to ``mode``'s layers, over the blocks in ``layers``."""
    shapes = block_linears(args)
    extra = 0
    for name, other in layer_modes.items():
        _, index, linear = name.split(".", 2)
        if int(index) in layers:
            n, k = shapes[linear]
            extra += quantized_bytes(n, k, other) - quantized_bytes(n, k, mode, group_size)
    return extra


def quantized_bytes(n: int, k: int, mode: str, group_size: int | None = None) -> int:
    """Bytes of one [n, k] weight in llamarun's int8 / int4 formats (see llamarun.quantize), with the group
    size the quantizer takes for it (``group_size``, else the default: 32)."""
    from .quantize import QuantizationError, fit_group_size

    try:
        g = fit_group_size(mode, k, group_size)
    except QuantizationError:  # int4 cannot take this width (loading it so fails): an estimate for the table
        g = group_size or 32
    if mode == "int8":
        return n * k + n * (k // g) * 2  # int8 values, a float16 scale per group
    return n * k // 2 + 2 * n * (k // g) * 2  # two 4-bit values a byte, a float16 scale and minimum per group


def layer_bytes(args: ModelArgs, mode: str, dtype_bytes: int, group_size: int | None = None) -> int:
    """One transformer block's weights: linears in ``mode`` ('none' = float), norms in the float dtype."""
    norms = 2 * args.dim * dtype_bytes
    if mode == "none":
        return sum(n * k for n, k in linear_shapes(args)) * dtype_bytes + norms
    return sum(quantized_bytes(n, k, mode, group_size) for n, k in linear_shapes(args)) + norms


def edge_bytes(args: ModelArgs, mode: str, dtype_bytes: int, embedding_mode: str = "int8",
               group_size: int | None = None) -> int:
    """Embedding, output layer and final norm: float when mode is 'none', else the output layer int8 and an
    untied embedding in ``embedding_mode`` (a tied one shares the output's table). ``group_size`` is the
    layers': the output's and the embedding's too where they are in the layers' ``mode``, as
    ``quantize.build_quantized_model`` makes them."""
    table = args.vocab_size * args.dim
    if mode == "none":
        return table * dtype_bytes * (1 if args.tie_embeddings else 2) + args.dim * dtype_bytes
    embedding = 0 if args.tie_embeddings else quantized_bytes(args.vocab_size, args.dim, embedding_mode,
                                                              group_size if embedding_mode == mode else None)
    output = quantized_bytes(args.vocab_size, args.dim, "int8", group_size if mode == "int8" else None)
    return output + embedding + args.dim * dtype_bytes


def weight_bytes(args: ModelArgs, mode: str, dtype_bytes: int, group_size: int | None = None,
                 embedding_mode: str = "int8") -> int:
    return (args.n_layers * layer_bytes(args, mode, dtype_bytes, group_size)
            + edge_bytes(args, mode, dtype_bytes, embedding_mode, group_size))


def dequant_bytes(args: ModelArgs, dtype_bytes: int) -> int:
    """What a quantized product holds on an accelerator, where it dequantizes its weight (int8 layers, the
    output layer, int4 ones tinygemm cannot take): the largest weight in the activations' dtype, in tiles
    of at most ``quantize.PORTABLE_TILE_BYTES``, plus as much again for the int4 codes being unpacked."""
    from .quantize import PORTABLE_TILE_BYTES

    largest = max([n * k for n, k in linear_shapes(args)] + [args.vocab_size * args.dim]) * dtype_bytes
    return 2 * min(largest, PORTABLE_TILE_BYTES)


def kv_cache_bytes(args: ModelArgs, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for ``batch`` rows of ``seq_len`` tokens, in ``dtype`` (int8: a byte a
    value and a float32 scale per cached row of head_dim values, as ``model.KVCache`` stores them)."""
    row = args.head_dim * dtype.itemsize + (4 if dtype == torch.int8 else 0)
    return 2 * args.n_layers * batch * seq_len * args.n_kv_heads * row


def kv_read_bytes(args: ModelArgs, batch: int, seq_len: int, kv_dtype: torch.dtype, dtype_bytes: int) -> int:
    """Transient memory of reading an int8 KV cache without the CPU kernels (model.KVCache on an accelerator):
    one layer's keys and values dequantized to float32, then cast to the activations' dtype. 0 otherwise."""
    if kv_dtype != torch.int8:
        return 0
    return 2 * batch * seq_len * args.n_kv_heads * args.head_dim * (4 + dtype_bytes)


def loading_bytes(args: ModelArgs, mode: str, native_mode: str, edge_native_mode: str = "none") -> int:
    """Transient memory while loading: the largest tensor on its way in. A lossless block conversion holds
    the parts of a fused layer (w1 and w3 of w13) until they are joined, and reads one tensor
    ``GGUF_READ_BYTES`` at a time (each piece's raw bytes and its converted copy). Dequantizing into a float model holds about one float32 copy of the tensor above
    the final footprint; quantizing again from float32 about three (the float tensor, its absolute values
    and the scaled copy), measured on a 7B-shaped model. The embedding/output table is int8 in both
    quantized modes: GGUF blocks convert into it a few MiB at a time (``edge_native_mode``), requantized ones
    through float32 pieces of ``GGUF_READ_BYTES`` and their quantizer's copies."""
    table = args.vocab_size * args.dim
    layer = 2 * args.hidden_dim * args.dim  # the fused w13
    if mode == "none":
        # A tied table is converted first (build_model follows the parameters' order), when nothing else is
        # loaded: its float32 copy then stays under the model's final size (SmolLM2: 108 MiB beside 257 MiB
        # of bf16 weights), and the largest transient on top of the weights is a layer's.
        return (layer if args.tie_embeddings else max(table, layer)) * 4
    layer_t = quantized_bytes(2 * args.hidden_dim, args.dim, mode) if mode == native_mode else 3 * layer * 4
    table_t = (min(quantized_bytes(args.vocab_size, args.dim, "int8"), 4 * GGUF_READ_BYTES)
               if edge_native_mode == "int8" else 3 * table * 4)
    return max(layer_t, table_t)


def activation_bytes(args: ModelArgs, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """Peak working memory of one forward pass: a prefill chunk of ``batch`` x min(seq_len, PREFILL_CHUNK)
    tokens through the widest layer (the fused w13 output and its SwiGLU product), attention scores for one
    chunk, the logits of the last position, and dequantization tiles."""
    tokens = batch * min(seq_len, PREFILL_CHUNK)
    q = args.n_heads * args.head_dim
    hidden = tokens * (4 * args.dim + q + 2 * args.n_kv_heads * args.head_dim + 3 * args.hidden_dim)
    scores = batch * args.n_heads * min(seq_len, PREFILL_CHUNK) * seq_len
    logits = batch * args.vocab_size * 3  # logits, softmax and filtered probabilities, float32
    return (hidden + scores) * max(dtype_bytes, 4) + logits * 4 + 32 * MiB


# ---- the device -------------------------------------------------------------------------------------------

def available_bytes(device: torch.device) -> tuple[int, str]:
    """Free memory on ``device`` and where the number comes from."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"torch.cuda.mem_get_info({device})"
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()), "MPS recommended max"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "free physical pages"


# GGUF tensor types by the quantized mode that holds their precision: more than 4 bits per weight -> int8;
# 4 bits or fewer -> int4 (Q4_0, Q4_1 and Q4_K convert into it as they are, the rarer types are the
# nearest int4). A llamarun-quantized file names its layers' modes (int4, int8) as their types.
_INT8_TYPES = {"int8", "Q8_0", "Q8_1", "Q8_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}
_INT4_TYPES = {"int4", "Q4_0", "Q4_1", "Q4_K", "Q2_K", "Q3_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S",
               "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"}


def _types_mode(types: list[str]) -> str:
    """The mode that holds tensors of these types: int4 if all fit it, int8 if all fit that, else none."""
    if types and all(t in _INT4_TYPES for t in types):
        return "int4"
    if types and all(t in _INT4_TYPES | _INT8_TYPES for t in types):
        return "int8"
    return "none"


def native_quantization(ckpt) -> dict[str, Any]:
    """The quantized modes a checkpoint is stored in, as make_plan's keyword arguments.

    ``native_mode`` for the layers: 'int4' from 4-bit GGUF types, 'int8' from 5-8-bit ones, else 'none'.
    Files that mix them (Q4_K_M: Q4_K, with Q6_K for attn_v and half the ffn_down; Q5_K_M likewise) get
    'int4' and ``layer_modes``: int8 for each linear module (a fused one included) with a part of more than
    4 bits. ``edge_native_mode`` is 'int8' when the output table (or the embedding it is tied to) converts
    to int8 a few MiB at a time (GGUF block types; Q8_0, Q5_0 and Q4_0 without loss). ``embedding_mode`` is
    'int4' for an untied embedding stored in 4 bits or fewer (a lookup table needs no more), else 'int8'.
    """
    from .model import checkpoint_names
    from .formats.gguf import BLOCK_TYPES

    tt = ckpt.tensor_types
    layers = [t for n, t in tt.items() if n.startswith("layers.") and not n.endswith("norm.weight")]
    edge = tt.get("output.weight", tt.get("tok_embeddings.weight"))
    edge_mode = "int8" if edge in BLOCK_TYPES or edge == "int8" else "none"
    mode, layer_modes = _types_mode(layers), {}
    if mode == "int8" and any(t in _INT4_TYPES for t in layers):  # a mix: int4 where every part allows it
        mode = "int4"
        for i in range(ckpt.args.n_layers):
            for linear in block_linears(ckpt.args):
                name = f"layers.{i}.{linear}"
                if _types_mode([tt.get(p, "none") for p in checkpoint_names(name + ".weight")]) == "int8":
                    layer_modes[name] = "int8"
    # An untied embedding is a lookup table: kept 4-bit when the file has it so (the output layer stays int8).
    emb = tt.get("tok_embeddings.weight")
    embedding_mode = "int4" if not ckpt.args.tie_embeddings and emb in _INT4_TYPES else "int8"
    return {"native_mode": mode, "edge_native_mode": edge_mode, "layer_modes": layer_modes,
            "embedding_mode": embedding_mode}


# ---- the plan ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """A configuration and the arithmetic behind it (bytes)."""

    device: str
    dtype: str
    batch: int
    max_seq_len: int
    available: int
    available_source: str
    weights: dict[str, int]  # whole-model weights per choice: the float dtype, "int8", "int4"
    kv_cache: int  # on the device (offloaded layers keep theirs on the CPU)
    kv_dtype: str
    activations: int
    overhead: int
    loading: int = 0  # transient while loading (freed before the KV cache and activations exist)
    quantize: str = "none"  # chosen: "none" | "int8" | "int4"
    layer_modes: dict[str, str] = field(default_factory=dict)  # modules kept in another mode than ``quantize``
    embedding_mode: str = "int8"  # an untied embedding's table, when quantized (the output layer is int8)
    group_size: int | None = None
    weights_on_device: int = 0
    offload_layers: int = 0  # layers kept on the CPU (accelerators only)
    reason: str = ""

    @property
    def total(self) -> int:
        """Peak bytes the chosen configuration needs on the device: weights and runtime, plus the larger of
        the loading transient and the KV cache with activations (the first is gone before the others exist)."""
        return self.weights_on_device + self.overhead + max(self.loading, self.kv_cache + self.activations)

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    @property
    def label(self) -> str:
        if self.quantize == "none":
            return self.dtype
        return "+".join([self.quantize] + sorted(set(self.layer_modes.values()) - {self.quantize}))

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), total=self.total, fits=self.fits, choice=self.label)


def make_plan(args: ModelArgs, device: torch.device, dtype: torch.dtype, *, batch: int = 1,
              max_seq_len: int | None = None, memory: int | None = None, quantize: str = "auto",
              group_size: int | None = None, offload_layers: int | None = None,
              native_mode: str = "none", edge_native_mode: str = "none", layer_modes: dict[str, str] | None = None,
              embedding_mode: str = "int8", kv_dtype: torch.dtype | None = None) -> Plan:
    """Decide how to load a model on ``device`` within ``memory`` bytes (default: what the device has free).

    ``native_mode`` is the quantization the checkpoint is stored in ("int4" for a Q4_0/Q4_1/Q4_K GGUF,
    "int8" for Q8_0/Q6_K...): with ``quantize='auto'`` it comes first, since dequantizing it would only
    cost memory and speed. ``layer_modes`` (module name -> mode) are a mixed file's modules stored with more
    bits (a Q4_K_M file's Q6_K ones as int8): ``quantize='auto'`` keeps them if that fits, else makes them
    ``native_mode`` too. ``embedding_mode`` is an untied embedding's in a quantized model. ``kv_dtype`` is the
    KV cache's (default: ``dtype``). Raises RuntimeFailure, before anything is allocated, when nothing fits.
    """
    seq = max_seq_len or args.max_seq_len
    if batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}")
    if seq < 1:
        raise UsageError(f"max_seq_len must be >= 1, got {seq}")
    if quantize not in ("auto",) + QUANT_CHOICES:
        raise UsageError(f"--quantize must be auto, none, int8 or int4, got {quantize!r}")
    if group_size is not None and group_size not in (32, 64, 128):
        raise UsageError(f"--group-size must be 32, 64 or 128, got {group_size}")
    if offload_layers is not None and not 0 <= offload_layers <= args.n_layers:
        raise UsageError(f"--offload-layers must be between 0 and {args.n_layers}, got {offload_layers}")
    if offload_layers and device.type == "cpu":
        raise UsageError("--offload-layers needs an accelerator device: on the CPU every layer is already there")
    nbytes = DTYPE_BYTES[dtype]
    kv_dtype = kv_dtype or dtype
    avail, source = (memory, "--memory") if memory is not None else available_bytes(device)
    dtype_name = str(dtype).replace("torch.", "")
    activations = activation_bytes(args, batch, seq, nbytes)
    plan = Plan(device=str(device), dtype=dtype_name, batch=batch, max_seq_len=seq, available=avail,
                available_source=source,
                weights={dtype_name: weight_bytes(args, "none", nbytes),
                         "int8": weight_bytes(args, "int8", nbytes, group_size, embedding_mode),
                         "int4": weight_bytes(args, "int4", nbytes, group_size, embedding_mode)},
                kv_cache=kv_cache_bytes(args, batch, seq, kv_dtype),
                kv_dtype=str(kv_dtype).replace("torch.", ""), activations=activations,
                overhead=GPU_RUNTIME_BYTES if device.type != "cpu" else cpu_runtime_bytes(), group_size=group_size,
                embedding_mode=embedding_mode)
    # (mode, modules kept in another mode) in the order tried
    if quantize != "auto":
        order = [(quantize, {})]
    elif native_mode != "none":
        order = [(native_mode, layer_modes or {})] + [(m, {}) for m in ("int8", "int4") if m != native_mode]
        if layer_modes:
            kept = override_bytes(args, native_mode, layer_modes, range(args.n_layers), group_size)
            uniform = weight_bytes(args, native_mode, nbytes, group_size, embedding_mode)
            plan.weights[f"{native_mode}+int8"] = uniform + kept
            order.insert(1, (native_mode, {}))
    else:
        order = [("none", {}), ("int8", {}), ("int4", {})]
    full_kv = plan.kv_cache
    read_kv = kv_read_bytes(args, batch, seq, kv_dtype, nbytes)

    def choose(mode: str, n_cpu: int, modes: dict[str, str] | None = None) -> Plan:
        plan.quantize, plan.offload_layers, plan.layer_modes = mode, n_cpu, dict(modes or {})
        on_dev = args.n_layers - n_cpu
        plan.weights_on_device = (on_dev * layer_bytes(args, mode, nbytes, group_size)
                                  + edge_bytes(args, mode, nbytes, embedding_mode, group_size)
                                  + override_bytes(args, mode, plan.layer_modes, range(on_dev), group_size))
        plan.kv_cache = full_kv * on_dev // args.n_layers
        # On an accelerator a quantized model's products dequantize their weights (see dequant_bytes), and
        # an int8 KV cache is dequantized a layer at a time (kv_read_bytes).
        plan.activations = activations
        if device.type != "cpu":
            plan.activations += (dequant_bytes(args, nbytes) if mode != "none" else 0) + read_kv
        # Tensors are converted on the host and then moved: the transient is on the device only for a CPU.
        plan.loading = loading_bytes(args, mode, native_mode, edge_native_mode) if device.type == "cpu" else 0
        return plan

    tried = []
    for mode, modes in order:
        if choose(mode, offload_layers or 0, modes).fits:
            plan.reason = (f"--quantize {quantize} requested" if quantize != "auto" else
                           "; ".join(tried + [f"{plan.label} fits"]))
            if mode == native_mode != "none" and quantize == "auto":
                if modes:
                    plan.reason += (f" (the checkpoint's precision: {mode}, int8 for its {len(modes)} modules of "
                                    "more than 4 bits)")
                elif layer_modes:  # the mix did not fit
                    plan.reason += " (the checkpoint's precision but for its modules of more than 4 bits)"
                else:
                    plan.reason += f" (the checkpoint's precision: {mode})"
            return plan
        tried.append(f"{plan.label} needs {_fmt(plan.total)}")

    mode = quantize if quantize != "auto" else "int4"  # the smallest: named in the error, or offloaded
    choose(mode, offload_layers or 0)
    if device.type == "cpu" or offload_layers is not None:
        raise RuntimeFailure(f"the model does not fit: {plan.label} needs {_fmt(plan.total)} (weights "
                             f"{_fmt(plan.weights_on_device)}, KV cache {_fmt(plan.kv_cache)}) but {_fmt(avail)} is "
                             f"available on {device}: {_fmt(plan.total - avail)} missing; "
                             "try a smaller --max-seq-len or --batch" +
                             ("" if device.type == "cpu" else ", or more --offload-layers"))
    # An accelerator: keep as many layers as fit on it, the rest on the CPU.
    per_layer = layer_bytes(args, mode, nbytes, group_size) + full_kv // args.n_layers
    room = avail - edge_bytes(args, mode, nbytes, embedding_mode, group_size) - plan.activations - plan.overhead
    on_dev = max(0, min(args.n_layers - 1, room // per_layer))
    choose(mode, args.n_layers - on_dev)
    if on_dev == 0:
        raise RuntimeFailure(f"not even one layer fits on {device}: {_fmt(plan.total + per_layer)} needed, "
                             f"{_fmt(avail)} available ({_fmt(plan.total + per_layer - avail)} missing); "
                             "use --device cpu or a smaller --max-seq-len")
    plan.reason = "; ".join(tried) + f": {on_dev} of {args.n_layers} {mode} layers on {device}, {plan.offload_layers} on the CPU"
    return plan


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


def format_plan(plan: Plan, name: str) -> str:
    """The human-readable table ``llamarun plan`` prints."""
    rows = [f"model        {name}", f"device       {plan.device} ({plan.dtype}), batch {plan.batch} x "
            f"{plan.max_seq_len} tokens",
            f"available    {_fmt(plan.available)} ({plan.available_source})", "weights"]
    rows += [f"  {k:10} {_fmt(v):>12}" for k, v in plan.weights.items()]
    rows += [f"kv cache     {_fmt(plan.kv_cache):>14}   (batch {plan.batch} x {plan.max_seq_len} tokens, {plan.kv_dtype})",
             f"activations  {_fmt(plan.activations):>14}",
             f"runtime      {_fmt(plan.overhead):>14}",
             f"loading      {_fmt(plan.loading):>14}   (transient, before the KV cache exists)",
             f"total        {_fmt(plan.total):>14}   ({plan.label}"
             + (f", {plan.offload_layers} layers on the CPU" if plan.offload_layers else "") + ")",
             f"verdict      {plan.label}{' with offload' if plan.offload_layers else ''}: {plan.reason}"]
    return "\n".join(rows)
