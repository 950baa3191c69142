"""``llamarun bench``: load time, prefill and decode throughput, peak memory, for one model and mode.

Prompts are random token ids (fixed seed), so any model can be measured without a prompt set. Decode
runs the real generation loop (greedy, ignoring end-of-generation) and reports aggregate tok/s.
"""

from __future__ import annotations

import platform

import torch

from . import kernels


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    from .memory import peak_rss_bytes

    return peak_rss_bytes() / 2**20


DECODE_PROMPT = 16  # tokens of prompt per row before the timed decode


def prefill_gemm_dtype(llm) -> str:
    """What the model's prefill matrix products multiply in: "int8" where the kernels' int8 products take
    the batches (``Llama.batch_product``), else the dtype name of its ``dense_dtype`` (or activations)."""
    if llm.batch_product == "int8":
        return "int8"
    if llm.bf16_weights and not kernels.bf16_gemm():
        return "float32"  # bf16 weights widened into float32 GEMMs: no native bf16
    return str(llm.dense_dtype or llm.dtype).replace("torch.", "")


def products_info(llm) -> dict:
    """What the speed line's note (:func:`gemm_note`) is made from, for a bench report and ``generate``'s
    stats alike: the prefill products' dtype, the kernels' batch products and the GPU int4 kernel."""
    return {"prefill_gemm_dtype": prefill_gemm_dtype(llm), "batch_rows": llm.batch_rows,
            "batch_product": llm.batch_product, "int4_kernel": llm.int4_kernel}


def gemm_note(info: dict) -> str:
    """What the speed line says about the matrix products, e.g. ' (bfloat16 prefill GEMMs)' where prefill's
    run in another dtype than the activations, ' (bfloat16 GEMMs for prefill and batches of 6+ rows, AMX
    tiles)' where the kernels' tile products take the batches too, ' (int8 activations for prefill and
    batches of 6+ rows)' where the kernels' int8 products do, ' (tinygemm int4 products)' where a GPU's int4
    layers run tinygemm (``info``: a bench report or ``generate``'s stats, with ``dtype`` and
    :func:`products_info`'s keys)."""
    gemm, rows, kind = info["prefill_gemm_dtype"], info.get("batch_rows"), info.get("batch_product")
    if info.get("int4_kernel") == "tinygemm":
        return " (tinygemm int4 products)"
    if rows and kind == "int8":
        return f" (int8 activations for prefill and batches of {rows}+ rows)"
    if gemm == info["dtype"]:
        return ""
    if rows and kind == "amx":
        return f" ({gemm} GEMMs for prefill and batches of {rows}+ rows, AMX tiles)"
    return f" ({gemm} prefill GEMMs)"


def check_fits(llm, args) -> None:
    """Refuse (UsageError) a prefill length or decode run the loaded model's context cannot hold, instead
    of leaving its line out of the report."""
    from .errors import UsageError

    ctx = llm.max_seq_len
    for n in args.prefill:
        if n + 1 > ctx:  # the prompt and the one token it is timed up to
            raise UsageError(f"--prefill {n} does not fit the context of {ctx} tokens (raise --max-seq-len "
                             f"or use a shorter length)")
    if DECODE_PROMPT + args.decode_tokens + 1 > ctx:
        raise UsageError(f"--decode-tokens {args.decode_tokens} after a {DECODE_PROMPT}-token prompt does not "
                         f"fit the context of {ctx} tokens (raise --max-seq-len or decode fewer)")


def run_bench(llm, args) -> dict:
    """Measure a loaded model with the options of ``llamarun bench`` (an argparse namespace)."""
    from .sampling import SamplingParams

    check_fits(llm, args)

    report: dict = {
        "model": str(llm.checkpoint.path), "device": str(llm.device), "dtype": str(llm.dtype).replace("torch.", ""),
        "mode": llm.plan.label if llm.plan else "none", "kv_dtype": str(llm.kv_dtype).replace("torch.", ""),
        **products_info(llm),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "load_s": round(llm.load_s, 3), "prefill": {}, "decode": {},
    }
    gen = torch.Generator().manual_seed(0)
    vocab = llm.args.vocab_size
    greedy = SamplingParams(temperature=0.0)

    def random_prompts(batch: int, length: int) -> list[list[int]]:
        return torch.randint(0, vocab, (batch, length), generator=gen).tolist()

    llm.generate(random_prompts(1, 8), 2, sampling=greedy, ignore_eos=True)  # warm-up
    for n in args.prefill:
        llm.generate(random_prompts(1, n), 1, sampling=greedy, ignore_eos=True)
        report["prefill"][str(n)] = round(llm.stats.prefill_tok_s, 1)
    for b in args.batch:
        llm.generate(random_prompts(b, DECODE_PROMPT), args.decode_tokens + 1, sampling=greedy, ignore_eos=True)
        report["decode"][str(b)] = round(llm.stats.decode_tok_s, 1)
    report["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return report


def format_report(r: dict) -> str:
    """A few human-readable lines."""
    lines = [f"model   {r['model']}",
             f"device  {r['device']} {r['mode']}, activations {r['dtype']}{gemm_note(r)}, KV cache {r['kv_dtype']} "
             f"({r['threads']} threads, {r['cpu']})",
             f"load    {r['load_s']:.2f} s"]
    lines += [f"prefill {n:>5} tokens  {v:8.1f} tok/s" for n, v in r["prefill"].items()]
    lines += [f"decode  batch {b:>3}   {v:8.1f} tok/s" for b, v in r["decode"].items()]
    lines.append(f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)
