"""llamarun's own engine on a GPU: ``Llama.generate`` decode speed of a LLaMA-shaped model with random
weights, unquantized (bf16) and int4, where int4 runs through torch's tinygemm kernel (llamarun.tinygemm)
and without it (LLAMARUN_TINYGEMM=0: on a GPU, dequantize then F.linear) side by side; plus how far tinygemm's logits are
from the dequantizing path's on the same weights. Everything is made on the device: no download, no
checkpoint file; it needs llamarun's runtime imports (the GPU machine's image has them).

    python benchmarks/gpu_engine.py                          # llama-2-7b shape on CUDA, 64 tokens each
    python benchmarks/gpu_engine.py --layers 8 --tokens 32   # shorter
    python benchmarks/gpu_engine.py --device cpu --tiny      # the CPU smoke run the tests use (CPU tinygemm)

Decode is eager, as ``llamarun generate`` runs without ``--compile``: batch 1 at 7B shape is then bound by
kernel launches as much as by memory, so the int4 / bf16 ratio here is the engine's as users run it, not
the bandwidth bound (``gpu_bench.py`` measures that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llamarun import Llama  # noqa: E402
from llamarun.config import KNOWN_CONFIGS, ModelArgs  # noqa: E402
from llamarun.generation import meta_model, set_parameter  # noqa: E402
from llamarun.model import rope_cache  # noqa: E402
from llamarun.quantize import quantize_model  # noqa: E402
from llamarun.tinygemm import use_tinygemm  # noqa: E402
from llamarun.tokenizer import Tokenizer  # noqa: E402

TINY = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, hidden_dim=768)


class Ids(Tokenizer):
    """Token ids as text: the prompts are random ids, and nothing is decoded."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.stop_ids, self.eos_id = vocab_size, frozenset(), None

    def encode(self, text, bos=None, eos=False):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model with random weights made in ``dtype`` on ``device`` (no float32 copy of a 7B model):
    matrices ~ N(0, 1/in_features), norms 1."""
    model = meta_model(args)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in list(model.named_parameters()):
        if p.dim() == 1:
            value = torch.ones(p.shape, dtype=dtype, device=device)
        else:
            value = torch.empty(p.shape, dtype=dtype, device=device).normal_(0, p.shape[-1] ** -0.5, generator=gen)
        set_parameter(model, name, value)
    model.rope = rope_cache(args, args.max_seq_len).to(device)
    return model.eval()


def decode(llm: Llama, prompt: list[int], batch: int, tokens: int) -> float:
    """Aggregate greedy decode tok/s over ``batch`` copies of ``prompt`` (after a short warm-up)."""
    llm.generate([prompt] * batch, 4, temperature=0, ignore_eos=True)
    llm.generate([prompt] * batch, tokens, temperature=0, ignore_eos=True)
    return llm.stats.decode_tok_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help=f"a tiny shape for smoke runs: {TINY}")
    p.add_argument("--layers", type=int, help="layers (default: the shape's, 32 for 7B)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens timed per configuration (default 64)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    try:
        dev = torch.device(a.device)
    except RuntimeError as e:
        p.error(str(e))
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False (use --device cpu --tiny)")
    if min(a.batch, a.tokens, a.prompt) < 1 or (a.layers is not None and a.layers < 1):
        p.error("--batch, --tokens, --prompt and --layers must be >= 1")
    shape = dict(TINY if a.tiny else KNOWN_CONFIGS["llama-2-7b"])
    shape["max_seq_len"] = a.prompt + a.tokens + 8
    if a.layers:
        shape["n_layers"] = a.layers
    args = ModelArgs(**shape)
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    log(f"{name}, torch {torch.__version__}, dim {args.dim}, {args.n_layers} layers, batch {a.batch}")
    prompt = torch.randint(0, args.vocab_size, (a.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    rows: list[dict] = []

    def measure(label: str, model, note: str = "") -> torch.Tensor:
        llm = Llama(model, Ids(args.vocab_size), max_seq_len=args.max_seq_len, max_batch_size=a.batch)
        tok_s = decode(llm, prompt, a.batch, a.tokens)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt], device=dev)).float()
        sync(dev)
        rows.append({"mode": label, "tok_s": tok_s, "note": note or (llm.int4_kernel_note or "")})
        log(f"{label}: {tok_s:.1f} tok/s{'  (' + rows[-1]['note'] + ')' if rows[-1]['note'] else ''}")
        return logits

    model = random_model(args, dev, dtype)
    measure("bf16", model)
    with torch.inference_mode():
        quantize_model(model, "int4")  # in place: the bf16 layers go as their int4 ones arrive
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    log("quantized to int4 (output layer and embedding int8)")
    os.environ["LLAMARUN_TINYGEMM"] = "0"
    dequant = measure("int4 without tinygemm", model)  # on a GPU: dequantize, then F.linear
    del os.environ["LLAMARUN_TINYGEMM"]
    swapped, why = use_tinygemm(model, devices=(dev.type,))  # what Llama() does on a GPU, here on any device
    fast = measure("int4, tinygemm", model, f"{swapped} layers swapped" + (f"; {why}" if why else ""))
    err = ((fast - dequant).norm() / dequant.norm()).item()
    same = (fast.argmax(-1) == dequant.argmax(-1)).float().mean().item()
    log(f"tinygemm vs dequantize, prompt logits: relative error {err:.2e}, same argmax {100 * same:.1f}%")
    base = rows[0]["tok_s"]
    print("\n| device | mode | batch | tok/s | vs bf16 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {name} | {r['mode']} | {a.batch} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x |")
    if a.json:
        out = {"device": name, "torch": torch.__version__, "shape": shape, "batch": a.batch, "tokens": a.tokens,
               "results": rows, "tinygemm_rel_err": err, "tinygemm_same_argmax": same, "swapped": swapped}
        tmp = Path(a.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(a.json)
    return 0 if swapped and err < 5e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
