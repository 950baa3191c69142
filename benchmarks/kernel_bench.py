"""Quantized-matmul kernels and whole-model decode speed, every variant side by side in one process.

    python benchmarks/kernel_bench.py                    # kernels (M = 1, 8, 512) + model decode (batch 1, 8)
    python benchmarks/kernel_bench.py --no-model         # kernels only
    python benchmarks/kernel_bench.py --no-kernels -M 1  # model decode only, batch 1
    python benchmarks/kernel_bench.py --no-kernels --no-model --handoff  # the thread pool's hand-off cost

Kernels: for each SmolLM2-135M linear shape, y = x @ W^T at M activation rows (from 6 rows also the
int8-activation batch products, where the CPU has them), with the weights of every
variant in several copies (> 2x the L3 cache together) that the timing loop cycles through, so weights
stream from DRAM as they do in a real forward pass instead of sitting in cache. Variants run
interleaved (round-robin) and the best of several rounds is kept, which damps the noise of a shared
machine. GB/s = weight bytes read per call / time.

Model: the default SmolLM2 in float32, int8 and int4 as the engine runs it (``Llama.load``: the fused
fast path, the batch products, weights in 2 MiB pages, its KV cache dtype), decode steps timed on the
model's forward (KV cache, last_only, greedy argmax), the three models and the thread configurations
interleaved. On a shared machine, compare rows of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamarun import kernels, quantize as Q  # noqa: E402

SHAPES = {  # name: (out_features N, in_features K)
    "wqkv": (960, 576), "wo": (576, 576), "w13": (3072, 576), "w2": (576, 1536), "output": (49152, 576),
}
L3_BYTES = 32 << 20


def _timeit(fn, count: int, inner: int) -> float:
    t = time.perf_counter()
    for i in range(inner):
        fn(i % count)
    return (time.perf_counter() - t) / inner


def bench_variants(variants: dict, rounds: int, budget_s: float) -> dict:
    """variants: name -> (fn(i), copies, bytes). Returns name -> best seconds per call."""
    best = {}
    inner = {}
    for name, (fn, count, _) in variants.items():
        t = time.perf_counter()
        fn(0)  # warm-up (first-call costs, allocation)
        one = time.perf_counter() - t
        inner[name] = max(1, min(4 * count, int(budget_s / max(one, 1e-6))))
    for _ in range(rounds):
        for name, (fn, count, _) in variants.items():
            dt = _timeit(fn, count, inner[name])
            best[name] = min(best.get(name, float("inf")), dt)
    return best


def kernel_table(ms: list[int], shapes: list[str], rounds: int, baselines: bool) -> None:
    print(f"kernels: {kernels.reason()}")
    print(f"threads {torch.get_num_threads()}; times are the best of {rounds} interleaved rounds; "
          f"weights cycled over > {2 * L3_BYTES >> 20} MiB per variant")
    gen = torch.Generator().manual_seed(0)
    for sname in shapes:
        n, k = SHAPES[sname]
        copies = max(2, -(-2 * L3_BYTES // (n * k)))  # int8 bytes > 2x L3 (fp32 copies share the count)
        w = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(copies)]
        q8c = [Q.Int8Linear(Q.quantize_int8(x)) for x in w]
        q8g = [Q.Int8Linear(Q.quantize_int8(x, 32)) for x in w]
        q4 = [Q.Int4Linear(Q.quantize_int4(x, 32, search=False)) for x in w]
        for m in ms:
            x = torch.randn(m, k, generator=gen)
            v: dict = {}
            v["fp32 F.linear"] = (lambda i: F.linear(x, w[i]), copies, n * k * 4)
            if baselines:
                wt = [t.t().contiguous() for t in w]
                v["fp32 x@Wt"] = (lambda i: x @ wt[i], copies, n * k * 4)
            for label, mods in (("int8/ch", q8c), ("int8/g32", q8g), ("int4/g32", q4)):
                nbytes = mods[0].qtensor.nbytes
                v[f"{label} layer"] = (lambda i, mods=mods: mods[i](x), copies, nbytes)
                if m >= 16:  # the two paths the layer chooses between, each on its own
                    v[f"{label} int-kernel"] = (lambda i, mods=mods: mods[i]._kernel(x), copies, nbytes)
                    v[f"{label} dequant+mm"] = (lambda i, mods=mods: mods[i]._dense(x), copies, nbytes)
                if m >= Q.BATCH_MIN_ROWS and kernels.int8_batches() and not kernels.bf16_tiles():
                    # The int8-activation batch products (int8 GEMM), which Llama.load switches on for batches
                    # (quantize.set_int8_batches): the op called with a row threshold of 1.
                    ka = [t._kernel_args() for t in mods]
                    v[f"{label} int8-batch"] = (lambda i, ka=ka: ka[i][0](x, *ka[i][1][:-1], 1), copies, nbytes)
            if baselines:
                i8 = [t.qweight for t in q8c]
                s8 = [t.qtensor.scales_f16().float().reshape(-1) for t in q8c]
                xb, s8b = x.bfloat16(), [s.bfloat16() for s in s8]
                v["torch int8pack fp32"] = (lambda i: torch._weight_int8pack_mm(x, i8[i], s8[i]), copies, n * k)
                v["torch int8pack bf16"] = (lambda i: torch._weight_int8pack_mm(xb, i8[i], s8b[i]), copies, n * k)
                try:
                    q4v = [Q._unpack_int4(t.qweight).to(torch.int32) for t in q4]
                    pk = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(t, 1) for t in q4v]
                    sz = [torch.stack([t.qtensor.scales_f16().float().t(),
                                       (t.qtensor.mins_f16().float() + 8 * t.qtensor.scales_f16().float()).t()], -1)
                          .contiguous() for t in q4]
                    szb = [t.bfloat16() for t in sz]
                    f4 = torch.ops.aten._weight_int4pack_mm_for_cpu
                    v["torch int4pack fp32"] = (lambda i: f4(x, pk[i], 32, sz[i]), copies, n * k // 2)
                    v["torch int4pack bf16"] = (lambda i: f4(xb, pk[i], 32, szb[i]), copies, n * k // 2)
                except Exception as e:  # noqa: BLE001 - not in every torch build
                    print(f"  (torch int4pack unavailable: {type(e).__name__})")
            budget = 0.05 if m < 64 else 0.2
            res = bench_variants(v, rounds, budget)
            print(f"\n{sname} {n}x{k}  M={m}")
            base = res["fp32 F.linear"]
            for name, t in res.items():
                gbs = v[name][2] / t / 1e9
                print(f"  {name:24s} {t * 1e3:9.3f} ms  {gbs:6.1f} GB/s  {base / t:5.2f}x vs F.linear")
            sys.stdout.flush()


def load_models(modes: list[str]) -> dict:
    """{mode: (model, KV cache dtype)}: the default model loaded as the engine runs it (``Llama.load``);
    fp32 is its unquantized float32 form. A model built without the engine (``build_quantized_model``
    alone) lacks the fused fast path and decoded at a third of the engine's speed."""
    from llamarun import Llama

    models = {}
    for mode in modes:
        t = time.perf_counter()
        llm = Llama.load(None, device="cpu", dtype="float32" if mode == "fp32" else "auto",
                         quantize="none" if mode == "fp32" else mode)
        models[mode] = (llm.model, llm.kv_dtype)
        print(f"built {mode}: {Q.model_nbytes(llm.model) / 2**20:.0f} MiB in {time.perf_counter() - t:.1f} s")
    return models


def _parse_config(c: str) -> tuple[int, int]:
    torch_threads, _, kernel_threads = c.partition("x")
    return int(torch_threads), int(kernel_threads or torch_threads)


def model_decode(batches: list[int], modes: list[str], steps: int, rounds: int, configs: list[str],
                 prompt_len: int = 16) -> None:
    """Decode tok/s per mode and thread configuration ("TxK": T torch threads, K kernel threads), every
    (config, mode) run interleaved within each round."""
    models = load_models(modes)
    vocab = next(iter(models.values()))[0].args.vocab_size
    gen = torch.Generator().manual_seed(0)
    saved = torch.get_num_threads()
    print(f"\nwhole-model decode (SmolLM2-135M, {steps} steps after a {prompt_len}-token prefill, best / median "
          f"of {rounds} interleaved rounds; TxK = torch threads x kernel threads)")
    for b in batches:
        prompt = torch.randint(0, vocab, (b, prompt_len), generator=gen)
        times: dict[tuple, list[float]] = {}
        for _ in range(rounds):
            for cfg in configs:
                t_threads, k_threads = _parse_config(cfg)
                torch.set_num_threads(t_threads)
                kernels.set_num_threads(k_threads)
                for mode, (model, kv_dtype) in models.items():
                    with torch.inference_mode():
                        model.setup_cache(b, prompt_len + steps + 1, kv_dtype)
                        logits = model(prompt, 0, last_only=True)
                        t1 = time.perf_counter()
                        tok = logits[:, -1].argmax(-1, keepdim=True)
                        for i in range(steps):
                            logits = model(tok, prompt_len + i, last_only=True)
                            tok = logits[:, -1].argmax(-1, keepdim=True)
                        t2 = time.perf_counter()
                    times.setdefault((cfg, mode), []).append(t2 - t1)
        for (cfg, mode), ts in times.items():
            best, med = min(ts), statistics.median(ts)
            print(f"  batch {b:2d} {cfg:4s} {mode:5s}: {b * steps / best:7.1f} tok/s best, {b * steps / med:7.1f} "
                  f"median ({best / steps * 1e3:.2f} ms/step)")
    torch.set_num_threads(saved)
    kernels.set_num_threads(None)


def prefill_bench(lengths: list[int], modes: list[str], rounds: int) -> None:
    models = load_models(modes)
    vocab = next(iter(models.values()))[0].args.vocab_size
    gen = torch.Generator().manual_seed(1)
    print(f"\nprefill (one forward of the prompt, last_only, best of {rounds})")
    for n in lengths:
        prompt = torch.randint(0, vocab, (1, n), generator=gen)
        best = {m: float("inf") for m in models}
        for _ in range(rounds):
            for mode, (model, kv_dtype) in models.items():
                with torch.inference_mode():
                    model.setup_cache(1, n + 1, kv_dtype)
                    t = time.perf_counter()
                    model(prompt, 0, last_only=True)
                    best[mode] = min(best[mode], time.perf_counter() - t)
        print("  " + "  ".join(f"{m}: {n / t:7.1f} tok/s" for m, t in best.items()) + f"   ({n} tokens)")


def handoff_table(rounds: int) -> None:
    """What handing work to the pool's helper costs: a float32 product small enough to stay in L2, split in
    2 / 5 / 8 chunks, timed on 1 and 2 kernel threads. The call's own cost c (an 8-row product, which
    runs inline) is paid once either way and the work halves at best, so handoff = t2 - (c + (t1 - c) / 2)."""
    ops = kernels.ops()
    tiny_w, x = torch.randn(8, 288), torch.randn(1, 288)
    call = min(_timeit(lambda i: ops.f32_linear(x, tiny_w), 1, 2000) for _ in range(rounds)) * 1e6
    print("\npool hand-off (float32 x @ W^T, one row, hot weights, 2 threads vs 1)")
    print(f"call overhead (8 rows, inline): {call:.2f} us")
    print(f"{'rows x K':>10} {'chunks':>6} {'1 thread us':>12} {'2 threads us':>13} {'handoff us':>11}")
    for rows in (112, 288, 864):
        w = torch.randn(rows, 288)
        best = {}
        for _ in range(rounds):
            for t in (1, 2):
                kernels.set_num_threads(t)
                best[t] = min(best.get(t, float("inf")), _timeit(lambda i: ops.f32_linear(x, w), 1, 2000))
        kernels.set_num_threads(None)
        chunks = min(rows // (16384 // 288), 8)  # as qlinear.cpp's parallel_rows splits it
        t1, t2 = best[1] * 1e6, best[2] * 1e6
        print(f"{rows:>6} x 288 {chunks:>6} {t1:>12.2f} {t2:>13.2f} {t2 - (call + (t1 - call) / 2):>11.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-M", type=int, nargs="+", default=[1, 8, 512], help="activation rows for the kernel table")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    p.add_argument("--modes", nargs="+", default=["fp32", "int8", "int4"])
    p.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefill", type=int, nargs="*", default=[], help="also time prefill of these lengths")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the kernel table")
    p.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x2"],
                   help="thread configurations for model decode: TxK = torch threads x kernel threads")
    p.add_argument("--no-baselines", action="store_true", help="skip x@Wt and torch's packed kernels")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--handoff", action="store_true", help="also time the thread pool's hand-off on small products")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.no_kernels:
        kernel_table(a.M, a.shapes, a.rounds, not a.no_baselines)
    if not a.no_model:
        model_decode(a.batch, a.modes, a.steps, a.rounds, a.configs)
    if a.prefill:
        prefill_bench(a.prefill, a.modes, a.rounds)
    if a.handoff:
        handoff_table(a.rounds)


if __name__ == "__main__":
    main()
