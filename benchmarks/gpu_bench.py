"""Decode speed of a llama-2-7b-shaped model on one GPU, against the memory-bandwidth bound. Needs only torch.

    python benchmarks/gpu_bench.py                         # 7B shape, bf16/int8/int4 at batch 1, bf16 at 8 and 32
    python benchmarks/gpu_bench.py --json out.json --peak-gbps 3350
    python benchmarks/gpu_bench.py --layers 4 --modes bf16 int4 --batches 1 --steps 50
    python benchmarks/gpu_bench.py --device cpu --tiny     # the CPU smoke run the tests use

Method. The model (RMSNorm, rotary embeddings, grouped-query attention over a static KV cache, SwiGLU
feed-forward; dim 4096, 32 layers, 32 heads, hidden 11008, vocabulary 32000 by default) gets random
weights made directly on the device in their stored format: nothing is downloaded and no float copy of
a quantized model ever exists. Formats, applied to every linear layer including the output layer:
- bf16: ``F.linear``.
- int8: per-output-channel int8 weights with bf16 scales. On CUDA ``F.linear(x, w.to(bf16)) * scale``,
  which torch.compile with coordinate-descent tuning turns, at batch 1, into one reduction kernel that
  reads the int8 bytes (gpt-fast's recipe); on CPU ``torch._weight_int8pack_mm``.
- int4: 4-bit codes in groups of 128 along the input dimension, each group with a bf16 scale and zero
  (w = (q - 8) * scale + zero), run by torch's tinygemm kernel ``torch._weight_int4pack_mm`` on CUDA and
  by ``torch._weight_int4pack_mm_for_cpu`` on CPU, each with its own packed layout.
Before any timing, every format's linear layer is checked against x @ dequantized(W)^T in float32 on a
random input, so a wrong packing shows up as a failed check (and exit code 1), not as a fast wrong number.

One decode step (embedding, all layers, output layer, greedy argmax, KV-cache write, position + 1) is a
single function whose state (current tokens, position, caches) lives in module buffers, so it has no
inputs that change between calls. On CUDA it is compiled with ``mode="reduce-overhead"`` (CUDA graphs)
and ``fullgraph=True``, one compilation per (format, batch); ``--eager`` skips compilation (the CPU
default). After ``--warmup`` steps (which include compilation and graph capture), ``--steps`` steps are
timed between two device synchronisations: tok/s = steps * batch / seconds.

Bandwidth. A decode step reads every stored weight byte once (linear weights with their scales, norms,
one embedding row per sequence), whatever the batch, so weight GB/s = weight bytes per step * steps/s,
and at batch 1 the fraction of the bound is weight bytes per token * tok/s / peak bandwidth. The peak
is the card's specification (table below, by ``torch.cuda.get_device_name()``, or ``--peak-gbps``), and
the script also measures what a large device-to-device copy achieves (bytes read + written) and reports
the fraction of that too. The attention reads the whole static cache (prompt + warmup + steps positions,
rounded up to a multiple of 16, those beyond the current one masked off); those bytes are reported
apart as KV GB/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

BF16 = torch.bfloat16

# Memory bandwidth from the vendor's specification, bytes/s. First substring match wins, so the more
# specific names come first.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H800 PCIe", 2.0e12),
    ("H800", 3.35e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),  # 40 GB, SXM4 and PCIe
    ("A800", 2.039e12),
    ("L40S", 0.864e12),
    ("L40", 0.864e12),
    ("L4", 0.3e12),
    ("A10G", 0.6e12),
    ("A10", 0.6e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
    ("V100", 0.9e12),
    ("T4", 0.32e12),
]


@dataclass
class Shape:
    dim: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    hidden: int = 11008
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


# hidden 768 rather than llama's 8/3 * 256 = 688, and vocabulary 1024, so that every dimension fits the
# int4 group size and packing tiles; 2 kv heads for 4 query heads exercise grouped-query attention.
TINY = Shape(dim=256, layers=2, heads=4, kv_heads=2, hidden=768, vocab=1024)


# --- linear layers in the three formats -------------------------------------------------------------

class BF16Linear(nn.Module):
    path = "F.linear"

    def __init__(self, n: int, k: int, device: torch.device):
        super().__init__()
        self.register_buffer("weight", torch.randn(n, k, dtype=BF16, device=device).mul_(0.02))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scale, q int8 [n, k], scale bf16 [n]."""

    def __init__(self, n: int, k: int, device: torch.device):
        super().__init__()
        self.register_buffer("weight", torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device))
        # std of q is ~74; this scale gives weights of std ~0.02 like the bf16 model
        self.register_buffer("scales", torch.empty(n, dtype=BF16, device=device).uniform_(2e-4, 3.5e-4))

    @staticmethod
    def path_on(device: torch.device) -> str:
        if device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            return "torch._weight_int8pack_mm"
        return "F.linear(x, w.to(bf16)) * scale"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
            return y.view(*x.shape[:-1], -1)
        # On CUDA, torch's _weight_int8pack_mm gives one thread to each output element (pytorch#190529),
        # far from the bandwidth bound; compiled, this expression reads the int8 weight once.
        return F.linear(x, self.weight.to(x.dtype)) * self.scales

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]


def int4_support(device: torch.device) -> str | None:
    """None when this torch has the int4 ops for the device, else why not."""
    names = (("_convert_weight_to_int4pack", "_weight_int4pack_mm") if device.type == "cuda" else
             ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"))
    missing = [n for n in names if not hasattr(torch, n)]
    if missing:
        return f"torch {torch.__version__} lacks torch.{', torch.'.join(missing)}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm int4 needs compute capability 8.0+"
    return None


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k/2] with column 2j in the high nibble and 2j+1 in the low one -> int32 [n, k] in 0..15."""
    return torch.stack([codes >> 4, codes & 15], dim=-1).flatten(1).to(torch.int32)


class Int4Linear(nn.Module):
    """y = x @ W^T, W[n, i] = (q[n, i] - 8) * scale[i // group, n] + zero[i // group, n], q in 0..15."""

    def __init__(self, n: int, k: int, device: torch.device, group: int, inner_k_tiles: int,
                 keep_codes: bool = False):
        super().__init__()
        self.group = group
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        if device.type == "cuda":
            # tinygemm's packer takes the codes two to a byte (uint8 [n, k/2], the layout since torch 2.5)
            packed = torch._convert_weight_to_int4pack(codes, inner_k_tiles)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(codes), inner_k_tiles)
        self.register_buffer("weight", packed)
        # scale * 4.6 (std of q - 8) ~ 0.02; scale and zero of one group sit side by side: [k/group, n, 2]
        scale = torch.empty(k // group, n, dtype=BF16, device=device).uniform_(3e-3, 6e-3)
        zero = torch.randn(k // group, n, dtype=BF16, device=device).mul_(2e-3)
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).contiguous())
        self.codes = codes if keep_codes else None  # only for the correctness check

    @staticmethod
    def path_on(device: torch.device) -> str:
        return "torch._weight_int4pack_mm (tinygemm)" if device.type == "cuda" else "torch._weight_int4pack_mm_for_cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x.device.type == "cuda":
            y = torch._weight_int4pack_mm(x2, self.weight, self.group, self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group, self.scales_and_zeros)
        return y.view(*x.shape[:-1], -1)

    def dequantized(self) -> torch.Tensor:
        sz = self.scales_and_zeros.float().repeat_interleave(self.group, dim=0)  # [k, n, 2]
        return (unpack_int4(self.codes).float() - 8) * sz[..., 0].T + sz[..., 1].T


def make_linear(mode: str, n: int, k: int, device: torch.device, args, keep_codes: bool = False) -> nn.Module:
    if mode == "bf16":
        return BF16Linear(n, k, device)
    if mode == "int8":
        return Int8Linear(n, k, device)
    return Int4Linear(n, k, device, args.group_size, args.inner_k_tiles, keep_codes)


def linear_path(mode: str, device: torch.device) -> str:
    return {"bf16": BF16Linear.path, "int8": Int8Linear.path_on(device), "int4": Int4Linear.path_on(device)}[mode]


# --- the model ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, device: torch.device, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim, dtype=BF16, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (even, odd) pairs of x [B, 1, H, head_dim]; cos/sin [1, head_dim/2]."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.view(1, 1, 1, -1), sin.view(1, 1, 1, -1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, s: Shape, mode: str, device: torch.device, args):
        super().__init__()
        self.s = s
        # q, k and v in one product: one weight read, one kernel
        self.wqkv = make_linear(mode, (s.heads + 2 * s.kv_heads) * s.head_dim, s.dim, device, args)
        self.wo = make_linear(mode, s.dim, s.heads * s.head_dim, device, args)

    def setup_cache(self, batch: int, max_seq: int, device: torch.device) -> None:
        shape = (batch, self.s.kv_heads, max_seq, self.s.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=BF16, device=device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=BF16, device=device))

    def forward(self, x, pos, cos, sin, mask):
        s, b = self.s, x.shape[0]
        q, k, v = self.wqkv(x).split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        q = rotate(q.view(b, 1, s.heads, s.head_dim), cos, sin).transpose(1, 2)
        k = rotate(k.view(b, 1, s.kv_heads, s.head_dim), cos, sin).transpose(1, 2)
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v.view(b, 1, s.kv_heads, s.head_dim).transpose(1, 2)
        keys, values = self.k_cache, self.v_cache
        if s.kv_heads != s.heads:
            keys = keys.repeat_interleave(s.heads // s.kv_heads, dim=1)
            values = values.repeat_interleave(s.heads // s.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, 1, s.heads * s.head_dim))


class FeedForward(nn.Module):
    def __init__(self, s: Shape, mode: str, device: torch.device, args):
        super().__init__()
        self.w13 = make_linear(mode, 2 * s.hidden, s.dim, device, args)  # gate and up in one product
        self.w2 = make_linear(mode, s.dim, s.hidden, device, args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, s: Shape, mode: str, device: torch.device, args):
        super().__init__()
        self.attention_norm = RMSNorm(s.dim, device)
        self.attention = Attention(s, mode, device, args)
        self.ffn_norm = RMSNorm(s.dim, device)
        self.feed_forward = FeedForward(s, mode, device, args)

    def forward(self, x, pos, cos, sin, mask):
        h = x + self.attention(self.attention_norm(x), pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, s: Shape, mode: str, device: torch.device, args):
        super().__init__()
        self.s, self.mode, self.device = s, mode, device
        self.register_buffer("tok_embeddings", torch.randn(s.vocab, s.dim, dtype=BF16, device=device).mul_(0.02))
        self.layers = nn.ModuleList(Block(s, mode, device, args) for _ in range(s.layers))
        self.norm = RMSNorm(s.dim, device)
        self.output = make_linear(mode, s.vocab, s.dim, device, args)

    def setup_cache(self, batch: int, max_seq: int, start_pos: int) -> None:
        """Caches for `batch` sequences of `max_seq` positions; decoding starts at `start_pos` (the
        positions before it stand for a prompt already in the cache)."""
        dev = self.device
        for layer in self.layers:
            layer.attention.setup_cache(batch, max_seq, dev)
        freqs = 1.0 / 10000.0 ** (torch.arange(0, self.s.head_dim, 2, device=dev).float() / self.s.head_dim)
        angles = torch.outer(torch.arange(max_seq, device=dev).float(), freqs)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.register_buffer("tokens", torch.randint(0, self.s.vocab, (batch, 1), device=dev))
        self.register_buffer("pos", torch.tensor([start_pos], device=dev))
        if dev.type == "cuda":
            # CUDA graphs must not copy weights or caches into private buffers before every replay
            for t in self.buffers():
                torch._dynamo.mark_static_address(t)

    def decode_step(self) -> None:
        """One greedy token for every sequence; reads and advances the state held in the buffers."""
        pos = self.pos
        mask = (torch.arange(self.k_len, device=pos.device) <= pos).view(1, 1, 1, -1)
        cos, sin = self.cos[pos], self.sin[pos]
        x = F.embedding(self.tokens, self.tok_embeddings)
        for layer in self.layers:
            x = layer(x, pos, cos, sin, mask)
        logits = self.output(self.norm(x))
        self.tokens.copy_(logits[:, -1].argmax(dim=-1, keepdim=True))
        self.pos.add_(1)

    @property
    def k_len(self) -> int:
        return self.cos.shape[0]


def weight_bytes_per_step(model: Transformer, batch: int) -> int:
    """Stored weight bytes a decode step reads: everything but the embedding table, of which it reads
    one row per sequence."""
    skip = {"tok_embeddings", "cos", "sin", "tokens", "pos"}
    total = sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                if name not in skip and not name.endswith(("k_cache", "v_cache")))
    return total + batch * model.s.dim * model.tok_embeddings.element_size()


def kv_bytes_per_step(model: Transformer) -> int:
    return sum(layer.attention.k_cache.nbytes + layer.attention.v_cache.nbytes for layer in model.layers)


# --- measurements ------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_linear(mode: str, n: int, k: int, device: torch.device, args) -> dict:
    """Relative error of the format's linear layer against x @ dequantized(W)^T in float32."""
    torch.manual_seed(1)
    lin = make_linear(mode, n, k, device, args, keep_codes=True)
    x = torch.randn(4, k, dtype=BF16, device=device)
    ref = x.float() @ lin.dequantized().T
    err = ((lin(x).float() - ref).norm() / ref.norm()).item()
    ok = math.isfinite(err) and err < args.check_tol
    return {"mode": mode, "shape": [n, k], "rel_err": err, "ok": ok}


def measure_copy_bandwidth(device: torch.device, mib: int) -> float:
    """Best of 5 device-to-device copies of `mib` MiB; bytes/s counting the read and the write."""
    n = mib << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n / best


def run_config(model: Transformer, mode: str, batch: int, args) -> dict:
    """Compile (unless eager), warm up, then time `args.steps` decode steps of `batch` sequences."""
    from torch._dynamo.utils import counters

    device = model.device
    start = args.prompt_len
    # a cache length that is a multiple of 16 keeps the attention mask aligned for the fused SDPA kernels
    model.setup_cache(batch, -(-(start + args.warmup + args.steps) // 16) * 16, start)
    torch._dynamo.reset()  # one compiled graph at a time, and the previous one's CUDA graph memory freed
    counters.clear()
    cuda = device.type == "cuda"
    step = model.decode_step if args.eager else torch.compile(
        model.decode_step, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t1

    end = int(model.pos.item())
    if end != start + args.warmup + args.steps:  # a replayed graph that lost its state update would show here
        raise RuntimeError(f"position {end} after {args.warmup + args.steps} steps from {start}")
    path = linear_path(mode, device)
    if counters["inductor"]["woq_matcher_count"]:
        path += " (inductor rewrote to torch._weight_int8pack_mm)"
    graphs = ("eager" if args.eager else "no (cpu)" if not cuda else
              "skipped" if counters["inductor"]["cudagraph_skips"] else "yes")
    return {
        "mode": mode, "batch": batch, "steps": args.steps, "seconds": seconds,
        "tok_s": args.steps * batch / seconds, "compile_warmup_s": t1 - t0,
        "weight_bytes_per_step": weight_bytes_per_step(model, batch), "kv_bytes_per_step": kv_bytes_per_step(model),
        "linear_path": path, "cuda_graphs": graphs,
    }


def add_bandwidth(r: dict, peak: float | None, copy_bw: float) -> None:
    steps_s = r["steps"] / r["seconds"]
    r["weight_gbps"] = r["weight_bytes_per_step"] * steps_s / 1e9
    r["kv_gbps"] = r["kv_bytes_per_step"] * steps_s / 1e9
    r["frac_spec"] = r["weight_gbps"] * 1e9 / peak if peak else None
    r["frac_copy"] = r["weight_gbps"] * 1e9 / copy_bw


# --- report ------------------------------------------------------------------------------------------

def peak_bandwidth(name: str, override_gbps: float | None) -> tuple[float | None, str]:
    if override_gbps:
        return override_gbps * 1e9, "--peak-gbps"
    for key, bw in PEAK_BANDWIDTH:
        if key.lower() in name.lower():
            return bw, f"spec table ({key})"
    return None, "unknown card: pass --peak-gbps"


def markdown_table(card: str, results: list[dict]) -> str:
    bf16 = {r["batch"]: r["tok_s"] for r in results if r["mode"] == "bf16"}
    pct = lambda f: f"{100 * f:.1f}%" if f is not None else "n/a"  # noqa: E731
    rows = ["| card | mode | batch | tok/s | weights GB/s | % of spec bound | % of measured copy | KV GB/s "
            "| vs bf16 | linear | CUDA graphs |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['tok_s'] / bf16[r['batch']]:.2f}x" if r["batch"] in bf16 else "n/a"
        rows.append(f"| {card} | {r['mode']} | {r['batch']} | {r['tok_s']:.1f} | {r['weight_gbps']:.4g} "
                    f"| {pct(r['frac_spec'])} | {pct(r['frac_copy'])} | {r['kv_gbps']:.4g} | {ratio} "
                    f"| {r['linear_path']} | {r['cuda_graphs']} |")
    return "\n".join(rows)


# --- arguments ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help=f"tiny shape for smoke runs: {TINY}")
    for name, default in asdict(Shape()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name,
                       help=f"model shape (default {default}, or {getattr(TINY, name)} with --tiny)")
    p.add_argument("--modes", nargs="+", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4"],
                   help="weight formats, all run at batch 1 (default: all three)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32], help="batch sizes (default 1 8 32)")
    p.add_argument("--batched-modes", nargs="+", default=["bf16"], choices=["bf16", "int8", "int4"],
                   help="the modes that also run at the batches above 1 (default bf16)")
    p.add_argument("--steps", type=int, default=200, help="timed decode steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, graph capture)")
    p.add_argument("--prompt-len", type=int, default=16, help="cache positions taken before decoding starts")
    p.add_argument("--eager", action="store_true", help="no torch.compile (always so on CPU unless --compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile on CPU too")
    p.add_argument("--no-coord-tune", action="store_true",
                   help="leave inductor's coordinate-descent tuning off (faster compiles, slower batch-1 kernels)")
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256], help="int4 group size")
    p.add_argument("--inner-k-tiles", type=int, default=8, choices=[2, 4, 8], help="tinygemm int4 packing")
    p.add_argument("--peak-gbps", type=float, help="peak memory bandwidth in GB/s (default: spec table by card)")
    p.add_argument("--copy-mib", type=int, help="size of the copy that measures bandwidth (2048 on CUDA, 64 on CPU)")
    p.add_argument("--check-tol", type=float, default=0.03, help="max relative error of the linear-layer checks")
    p.add_argument("--budget-s", type=float, default=420,
                   help="start no further configuration once the run would likely pass this many seconds")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    error = finish_args(args)
    if error:
        print(f"gpu_bench.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    return args


def finish_args(args: argparse.Namespace) -> str | None:
    """Fill in the device-dependent defaults; the reason the arguments cannot run, if any."""
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        return str(e)
    if args.device.type not in ("cuda", "cpu"):
        return f"--device {args.device}: only cuda and cpu are supported"
    if args.device.type == "cuda":
        if not torch.cuda.is_available():
            return "--device cuda, but torch.cuda.is_available() is False (use --device cpu --tiny)"
        if args.device.index is None:
            args.device = torch.device("cuda", torch.cuda.current_device())
    args.eager = args.eager or (args.device.type == "cpu" and not args.compile)
    args.copy_mib = args.copy_mib or (2048 if args.device.type == "cuda" else 64)
    base = TINY if args.tiny else Shape()
    args.shape = Shape(**{k: getattr(args, k) or v for k, v in asdict(base).items()})
    s = args.shape
    if min(args.batches) < 1 or args.steps < 1 or args.warmup < 0 or args.prompt_len < 0:
        return "batches and --steps must be >= 1, --warmup and --prompt-len >= 0"
    if s.dim % s.heads or s.heads % s.kv_heads or s.head_dim % 2:
        return f"--dim {s.dim} / --heads {s.heads} / --kv-heads {s.kv_heads} do not give an even head size"
    if "int4" in args.modes:
        # inputs split into whole groups and packing tiles; outputs in tiles of 8 (CUDA) or 16 (CPU) rows
        align = math.lcm(args.group_size, 16 * args.inner_k_tiles)
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        if s.dim % align or s.hidden % align or s.vocab % 16 or qkv % 16:
            return (f"int4 needs --dim and --hidden multiples of {align}, --vocab and the q+k+v width multiples "
                    f"of 16 (got {s.dim}, {s.hidden}, {s.vocab}, {qkv})")
    return None


# --- main --------------------------------------------------------------------------------------------

def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    dev, s = args.device, args.shape
    coord_tune = dev.type == "cuda" and not args.eager and not args.no_coord_tune
    if coord_tune:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    card = card_name(dev)
    peak, peak_source = peak_bandwidth(card, args.peak_gbps)
    log(t0, f"{card}, torch {torch.__version__}, shape {asdict(s)}, "
            f"{'eager' if args.eager else 'torch.compile reduce-overhead'}")

    copy_bw = measure_copy_bandwidth(dev, args.copy_mib)
    free(dev)
    if peak:
        log(t0, f"peak bandwidth {peak / 1e9:.0f} GB/s ({peak_source}); measured copy {copy_bw / 1e9:.0f} GB/s "
                f"({100 * copy_bw / peak:.0f}% of peak)")
    else:
        log(t0, f"peak bandwidth: {peak_source}; measured copy {copy_bw / 1e9:.1f} GB/s")

    modes, skipped = list(args.modes), []
    reason = int4_support(dev)
    if "int4" in modes and reason:
        modes.remove("int4")
        skipped.append({"mode": "int4", "batch": None, "reason": reason})
        log(t0, f"int4 skipped: {reason}")

    checks = []
    for mode in list(modes):
        for n, k in ((2 * s.hidden, s.dim), (s.dim, s.hidden)):  # w13 and w2: both input dimensions
            try:
                c = check_linear(mode, n, k, dev, args)
            except (RuntimeError, TypeError) as e:  # an op whose signature or layout differs in this torch
                reason = f"{linear_path(mode, dev)} failed: {type(e).__name__}: {str(e).splitlines()[0]}"
                modes.remove(mode)
                skipped.append({"mode": mode, "batch": None, "reason": reason})
                log(t0, f"{mode} skipped: {reason}")
                break
            checks.append(c)
            log(t0, f"check {mode} linear [{n} x {k}] ({linear_path(mode, dev)}) vs float32 dequantized: "
                    f"rel err {c['rel_err']:.2e} {'OK' if c['ok'] else 'FAIL'}")
        free(dev)

    configs = [(m, b) for b in args.batches for m in modes if b == 1 or m in args.batched_modes]
    results, model, durations = [], None, []
    for mode, batch in configs:
        elapsed = time.perf_counter() - t0
        if durations and elapsed + max(durations) > args.budget_s:
            skipped.append({"mode": mode, "batch": batch, "reason": f"time budget ({args.budget_s:.0f} s)"})
            log(t0, f"{mode} batch {batch} skipped: would pass --budget-s {args.budget_s:.0f}")
            continue
        c0 = time.perf_counter()
        if model is None or model.mode != mode:
            model = None
            torch._dynamo.reset()
            free(dev)
            torch.manual_seed(0)
            model = Transformer(s, mode, dev, args)
        r = run_config(model, mode, batch, args)
        add_bandwidth(r, peak, copy_bw)
        results.append(r)
        durations.append(time.perf_counter() - c0)
        spec = f", {100 * r['frac_spec']:.1f}% of spec" if r["frac_spec"] is not None else ""
        log(t0, f"{mode} batch {batch}: {r['tok_s']:.1f} tok/s, weights {r['weight_gbps']:.4g} GB/s{spec}, "
                f"{100 * r['frac_copy']:.1f}% of copy; compile+warmup {r['compile_warmup_s']:.1f} s, "
                f"CUDA graphs {r['cuda_graphs']}")

    print()
    print(markdown_table(card, results))
    for sk in skipped:
        print(f"skipped: {sk['mode']}" + (f" batch {sk['batch']}" if sk["batch"] else "") + f": {sk['reason']}")
    failed = [c for c in checks if not c["ok"]]
    if failed:
        print(f"FAILED checks: {', '.join(c['mode'] + str(c['shape']) for c in failed)}")
    if args.json:
        report = {
            "card": card, "torch": torch.__version__, "device": str(dev), "shape": asdict(s),
            "eager": args.eager, "coordinate_descent_tuning": coord_tune,
            "peak_bytes_s": peak, "peak_source": peak_source, "copy_bytes_s": copy_bw,
            "checks": checks, "results": results, "skipped": skipped,
            "elapsed_s": time.perf_counter() - t0, "argv": sys.argv[1:],
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    log(t0, "done")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
