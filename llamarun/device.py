"""Picking the device, dtype and thread count, so users never have to.

``auto`` means: cuda, then mps, then cpu; bf16 on GPUs that support it, fp16 on older ones; on CPU,
float32 unless the processor has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 is faster
(``Llama.load`` then keeps a quantized model's activations float32, for the decode kernels, and uses bf16
in its prefill GEMMs only).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from .errors import UsageError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """Resolve 'auto' (cuda > mps > cpu) or check that a named device exists."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but this PyTorch has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' requested but MPS is not available")
    return dev


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def pick_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Resolve 'auto' for a device, or parse a dtype name."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        # Measured: without native bf16 (AVX2-only CPUs) bf16 matmuls are several times slower than fp32.
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r} (use auto, float32, bfloat16 or float16)")
    return DTYPES[name]


KV_DTYPES = {**DTYPES, "int8": torch.int8}


def pick_kv_dtype(name: str | torch.dtype | None, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: 'auto' is float16 for float32 math on a CPU with llamarun's kernels (half the
    memory, and half the bytes attention reads per step, as llama.cpp's default), else the model's dtype.
    'int8' stores each cached row as int8 with a float32 scale (``model.KVCache``): about half of float16's
    bytes, as llama.cpp's ``-ctk q8_0 -ctv q8_0``."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        if device.type == "cpu" and dtype == torch.float32:
            from . import kernels

            if kernels.available():  # without the kernels, every step would convert the whole cache
                return torch.float16
        return dtype
    if name not in KV_DTYPES:
        raise UsageError(f"unknown KV cache dtype {name!r} (use auto, float32, bfloat16, float16 or int8)")
    return KV_DTYPES[name]


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share a core's matmul units)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return max(1, (os.cpu_count() or 2) // 2)
    cores, cpu, phys = set(), None, "0"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, value))
    except OSError:
        pass
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def max_threads() -> int:
    """The most threads llamarun accepts: 4 per logical CPU. More only slows a run down, and torch's pools
    spawn every thread asked for (tens of thousands hang or crash the process)."""
    return 4 * (os.cpu_count() or 1)


def check_threads(n: int, what: str = "threads") -> int:
    """``n`` if it is a usable thread count, else a UsageError naming ``what`` (the option or variable)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise UsageError(f"{what} must be an integer, got {n!r}")
    if not 1 <= n <= max_threads():
        raise UsageError(f"{what} must be between 1 and {max_threads()} (4 per CPU here), got {n}")
    return n


def set_threads(n: int | None = None) -> int:
    """Use ``n`` torch threads (default: OMP_NUM_THREADS if set, else physical cores); returns the number set."""
    what = "threads"
    if n is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n, what = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    n = check_threads(physical_cores() if n is None else n, what)
    torch.set_num_threads(n)
    return n
