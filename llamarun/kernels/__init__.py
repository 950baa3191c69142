"""Fast CPU kernels for weight-only quantized linear layers (int8 and int4), built on first use.

The C++ sources (``qlinear.cpp``, ``fused.cpp``, ``layers.cpp``, ``gguf.cpp`` beside this file) are compiled
once per machine with the system C++ compiler (``$CXX``, else ``c++``/``g++``) against this torch's headers,
``-O3 -march=native``, into
``~/.cache/llamarun/kernels/<key>/`` (``$LLAMARUN_CACHE`` overrides the root), where ``key`` hashes the
source, the flags, the torch version, the compiler and the CPU's feature flags. Builds happen under a file lock, so
concurrent processes wait for one compiler run instead of racing; the library is written to a temporary
name and renamed into place, so a crashed build never leaves a half-written file behind. No ninja, no
pybind11, no Python headers: the library registers plain torch ops (``torch.ops.llamarun.*``), whose
per-call overhead is about 1.5 us.

If anything fails (no compiler, a compile error, an unsupported platform) :func:`available` is False,
:func:`reason` says why, and :mod:`llamarun.quantize` uses portable torch code instead: dequantize,
then a float matmul. ``LLAMARUN_KERNELS=0`` forces that fallback (tests use it to cover both paths).

Ops (all CPU, float32 activations of any leading shape ``[..., K]``):

- ``q8_linear(x, qweight int8 [N, K], scales f16 [N, K/G], G) -> [..., N]``
- ``q4_linear(x, qweight uint8 [N, K/2], scales f16 [N, K/G], mins f16 [N, K/G], G) -> [..., N]``
  (scales/mins may also be int16 tensors holding float16 bits, which is how llamarun.quantize stores them)
- ``q8_dequant(qweight, scales, G, row0=0, rows=-1)`` / ``q4_dequant(qweight, scales, mins, G, row0, rows)``:
  rows of the weight as float32 (the large-batch path feeds them to MKL's GEMM).
- ``quantize_int4(w float32 [N, K], G, steps) -> [qweight, scales, mins]``: the error-minimising int4
  quantizer of llamarun.quantize, compiled (~6x faster than the torch code on one thread).
- ``quantize_act(x [M, K]) -> [q int16, d f32, s f32]``: the per-32-block int16 activation quantization
  the integer dot products use (for tests).
- ``set_num_threads(n)``: threads for the ops above (0: follow ``torch.set_num_threads``); see
  :func:`set_num_threads`. ``set_spin_us(us)``: how long idle helper threads wait for the next call before
  sleeping (default 100, or ``$LLAMARUN_SPIN_US``; 0 on a machine whose cores are all busy).
- Fused float32 glue for decoding (``fused.cpp``, used by :mod:`llamarun.fastpath`): ``rms_norm(x, weight,
  eps)``, ``silu_mul(x [..., 2F]) -> [..., F]``, ``f32_linear(x, weight)``, ``attn_decode(qkv, k_cache,
  v_cache, rope, pos, n_heads, n_kv_heads, k_scale=None, v_scale=None)`` (rotary embedding, cache write and
  attention for one new token per row), prefill's ``kv_store(k, v, k_cache, v_cache, start, k_scale,
  v_scale)`` (the cache write) and ``attn_prefill(q, k_cache, v_cache, start, k_scale, v_scale)`` (causal
  attention over the cache), and ``argmax(x [B, V]) -> [B]`` (greedy decoding). Caches are float32, float16,
  or int8 with a float32 scale per cached row (``k_scale``, ``v_scale``; see ``model.KVCache``).
- ``decode_layers(x, weights, kinds, rope, k_caches, v_caches, pos, n_heads, n_kv_heads, eps, k_scales,
  v_scales)`` (``layers.cpp``): a whole decode step's layer stack in one call, chaining the ops above with no Python
  between them (see :class:`llamarun.fastpath.FastTransformer`); with the head's weights appended it also
  runs the final norm and the output layer and returns the logits.
- ``gguf_to_int8(raw, type, qweight, scales)`` / ``gguf_to_int4(raw, type, qweight, scales, mins)``
  (``gguf.cpp``): GGUF blocks (Q4_1, Q5_1, Q4_K, Q5_K, Q6_K; Q4_K for int4) written into rows of a weight
  being loaded, the same bits as :mod:`llamarun.quantize`'s torch conversions.

Threads: a small pool of helper threads with dynamic chunking (not OpenMP): the caller never waits for a
helper that has not started, so a loaded machine costs single-thread speed rather than OpenMP barrier
stalls of milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

_SOURCES = ("qlinear.cpp", "fused.cpp", "layers.cpp", "gguf.cpp")  # compiled together into one library
_HEADERS = ("kernels.h",)
_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")  # threads: our own pool, no OpenMP
_LIB_NAME = "llamarun_kernels.so"
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "reason": str, "path": Path


def cache_root() -> Path:
    """llamarun's cache directory: ``$LLAMARUN_CACHE``, else ``~/.cache/llamarun`` (kernels, compiled graphs)."""
    root = os.environ.get("LLAMARUN_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "llamarun"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001 - any failure just weakens the cache key
        return cxx


def _command(cxx: str, srcs: list[Path], out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [*map(str, srcs), "-o", str(out)]
    for p in library_paths():
        cmd += [f"-L{p}", f"-Wl,-rpath,{p}"]
    cmd += ["-lc10", "-ltorch_cpu"]
    return cmd


def _build() -> Path:
    """Compile (or find in the cache) the kernel library; raise RuntimeError with a one-line reason."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        raise RuntimeError(f"no kernel build for {sys.platform}/{platform.machine()}")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        h.update((here / name).read_bytes())
    for part in (torch.__version__, _compiler_version(cxx), _cpu_flags(), sys.version, " ".join(_FLAGS)):
        h.update(part.encode())
    build_dir = cache_root() / "kernels" / h.hexdigest()[:20]
    lib = build_dir / _LIB_NAME
    if lib.is_file():
        return lib
    build_dir.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(build_dir / "build.lock"), timeout=900):
            if lib.is_file():  # another process built it while we waited
                return lib
            tmp = build_dir / f".{_LIB_NAME}.{os.getpid()}.tmp"
            proc = subprocess.run(_command(cxx, [here / n for n in _SOURCES], tmp), capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                (build_dir / "build.log").write_text(proc.stderr)
                first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
                raise RuntimeError(f"kernel build failed ({first.strip()}); log: {build_dir / 'build.log'}")
            os.replace(tmp, lib)
    except Timeout:
        raise RuntimeError(f"timed out waiting for another process's kernel build ({build_dir})") from None
    return lib


def _disabled() -> bool:
    return os.environ.get("LLAMARUN_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def _load() -> None:
    with _lock:
        if "ok" in _state:
            return
        try:
            lib = _build()
            if not hasattr(torch.ops.llamarun, "q8_linear"):  # not already loaded in this process
                torch.ops.load_library(str(lib))
            _register_fakes()
            tiles = ", bf16 tiles" if torch.ops.llamarun.bf16_tiles() else ""
            _state.update(ok=True, reason=f"compiled kernels (simd level {torch.ops.llamarun.simd_level()}{tiles}): "
                                          f"{lib}", path=lib)
        except Exception as e:  # noqa: BLE001 - any failure means: use the portable path
            _state.update(ok=False, reason=f"{type(e).__name__}: {e}".splitlines()[0])


def _register_fakes() -> None:
    """Shape functions so torch.compile / meta tensors can trace through the ops."""
    lib = "llamarun::"

    def linear_fake(x, weight, *rest):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    def silu_mul_fake(x):
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    fakes = {"q8_linear": linear_fake, "q4_linear": linear_fake, "silu_mul": silu_mul_fake,
             "rms_norm": lambda x, weight, eps: torch.empty_like(x), "f32_linear": linear_fake,
             "rope": lambda x, rope: x.new_empty(x.shape)}
    for op, fake in fakes.items():
        try:
            torch.library.register_fake(lib + op)(fake)
        except Exception:  # noqa: BLE001 - already registered, or an old torch without register_fake
            pass


def available() -> bool:
    """True if the compiled kernels can be used: not disabled by ``LLAMARUN_KERNELS=0``, and built and
    loaded (the first call builds them, or finds them in the cache)."""
    if _disabled():
        return False
    _load()
    return bool(_state["ok"])


def reason() -> str:
    """Why the kernels are (not) in use: the library path, or the failure."""
    if _disabled():
        return "disabled by LLAMARUN_KERNELS=0 (portable torch path)"
    _load()
    return str(_state["reason"]) + ("" if _state["ok"] else " (portable torch path)")


def ops():
    """``torch.ops.llamarun`` (raises RuntimeError with the reason if the kernels are unavailable)."""
    if not available():
        raise RuntimeError(f"llamarun kernels unavailable: {reason()}")
    return torch.ops.llamarun


def bf16_tiles() -> bool:
    """True if the kernels can run bf16 tile products (AMX: built for a CPU with it, and the OS grants
    the tile state): the quantized linears with bf16 GEMMs then use them for batches (see qlinear.cpp)."""
    return available() and bool(torch.ops.llamarun.bf16_tiles())


def bf16_gemm() -> bool:
    """True if the kernels were built for a CPU with native bf16 arithmetic (AVX512-BF16 or AMX): a bfloat16
    weight's large products (``f32_linear``) are then bf16 GEMMs, else float32 GEMMs over the weight widened
    a tile at a time."""
    return available() and bool(torch.ops.llamarun.bf16_gemm())


def f32_pool_rows(bf16_weight: bool) -> int:
    """The most activation rows ``f32_linear`` runs in the kernels' pool for a bfloat16 (or float32)
    weight; more go to torch's GEMMs (0 without the kernels)."""
    return int(torch.ops.llamarun.f32_pool_rows(bool(bf16_weight))) if available() else 0


def int8_batches() -> bool:
    """True if the kernels have int8-activation products for batches of int4 and int8 weights (see
    ``quantize.set_int8_batches``): with AVX-512 VNNI, and with AVX2 (vpmaddubsw: the 4-bit weights as its
    unsigned operand; int8 weights through llama.cpp's sign trick)."""
    if not available():
        return False
    return torch.ops.llamarun.simd_level() >= 2


def gemm_min_rows() -> int:
    """Activation rows from which the int8 batch products (``int8_batches``) run as a GEMM rather than row
    by row: with AVX-512 16, or 10 on a CPU that runs 512-bit instructions at full width (:func:`wide_avx512`),
    or ``LLAMARUN_GEMM_MIN_ROWS``; with AVX2 every batch (1); 0 without int8 batch products (see qlinear.cpp's
    ``gemm_min_rows``)."""
    if not int8_batches():
        return 0
    return int(torch.ops.llamarun.gemm_min_rows()) if torch.ops.llamarun.simd_level() >= 3 else 1


def wide_avx512() -> bool:
    """True if the kernels run AVX-512 on a core that executes 512-bit instructions whole (AMD Zen 5 and
    later; see qlinear.cpp's ``wide_avx512``): their int8 products then take batches from fewer rows
    (``quantize.int8_batch_rows``, :func:`gemm_min_rows`)."""
    return available() and torch.ops.llamarun.simd_level() >= 3 and bool(torch.ops.llamarun.wide_avx512())


def set_num_threads(n: int | None) -> int:
    """Threads the kernels use: ``n``, or (None / 0) torch's setting (``torch.set_num_threads``). Returns
    the previous setting (0: torch's)."""
    if available():
        return int(torch.ops.llamarun.set_num_threads(int(n or 0)))
    return 0


def set_spin_us(us: int) -> int:
    """How long (microseconds) idle helper threads wait for the next call before sleeping; returns the old
    value. 100 by default (``$LLAMARUN_SPIN_US``): keeps helpers warm between the matrix products of a
    decode step. 0 suits a machine whose cores are all busy with other work."""
    return int(ops().set_spin_us(int(us)))
