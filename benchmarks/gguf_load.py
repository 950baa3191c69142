"""Load time of a large GGUF file by quantization recipe: a known model shape (llama-2-7b, llama-3.2-1b...)
written with random blocks in llama.cpp's Q4_K_M, Q5_K_M, Q6_K, Q8_0 or Q4_0 recipe, then loaded by
``llamarun`` in fresh processes (imports included), with the plan chosen and the peak RSS.

    python benchmarks/gguf_load.py --config llama-3.2-1b --recipe q4_k_m --dir /tmp/gguf-bench --runs 2

The file is written once per (config, recipe) under ``--dir`` and reused. Random blocks (with small
float16 scales) cost what real ones cost to convert; they do not make a model worth generating with.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# llama.cpp's recipes (llama_tensor_get_type, simplified to the tensors a LLaMA has): the bulk type, and the
# type of attn_v / ffn_down in the layers that get more bits, and of the output layer.
RECIPES = {"q4_k_m": ("Q4_K", "Q6_K", "Q6_K"), "q5_k_m": ("Q5_K", "Q6_K", "Q6_K"), "q6_k": ("Q6_K", "Q6_K", "Q6_K"),
           "q8_0": ("Q8_0", "Q8_0", "Q8_0"), "q4_0": ("Q4_0", "Q4_0", "Q6_K")}


# llama.cpp's types for rows that do not split into 256-element super-blocks.
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def write(path: Path, config: str, recipe: str) -> None:
    """A GGUF file of ``config``'s shapes with random blocks in ``recipe``'s types, written to a temporary
    name and renamed."""
    import gguf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _ckpt_utils import random_gguf_blocks
    from llamarun.convert import add_gguf_hparams
    from llamarun.memory import config_by_name
    from llamarun.tokenizer import bytes_to_unicode

    a = config_by_name(config)
    bulk, more, out = (getattr(gguf.GGMLQuantizationType, t) for t in RECIPES[recipe])
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    add_gguf_hparams(w, a)
    byte_tokens = list(bytes_to_unicode().values())
    w.add_tokenizer_model("gpt2")
    w.add_token_list(byte_tokens + ["ab"] + [f"<extra_{i}>" for i in range(a.vocab_size - 257)])
    w.add_token_merges(["a b"])
    w.add_token_types([1] * a.vocab_size)
    w.add_eos_token_id(0)
    rng = np.random.default_rng(0)
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    tensors = [("token_embd.weight", (a.vocab_size, a.dim), bulk), ("output.weight", (a.vocab_size, a.dim), out)]
    for i in range(a.n_layers):
        hi = more if _more_bits(i, a.n_layers) else bulk
        tensors += [(f"blk.{i}.attn_q.weight", (q, a.dim), bulk), (f"blk.{i}.attn_k.weight", (kv, a.dim), bulk),
                    (f"blk.{i}.attn_v.weight", (kv, a.dim), hi), (f"blk.{i}.attn_output.weight", (a.dim, q), bulk),
                    (f"blk.{i}.ffn_gate.weight", (a.hidden_dim, a.dim), bulk),
                    (f"blk.{i}.ffn_up.weight", (a.hidden_dim, a.dim), bulk),
                    (f"blk.{i}.ffn_down.weight", (a.dim, a.hidden_dim), hi)]
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(a.n_layers) for n in ("attn", "ffn")]
    for name in norms:
        w.add_tensor(name, np.ones(a.dim, np.float32))
    for name, shape, qtype in tensors:
        if shape[1] % 256 and qtype.name in FALLBACK:
            qtype = getattr(gguf.GGMLQuantizationType, FALLBACK[qtype.name])
        w.add_tensor(name, random_gguf_blocks(qtype, shape, rng, scale=0.0005), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=sys.stderr.isatty())
    w.close()
    os.replace(tmp, path)


CHILD = """
import json, resource, sys, time
t = time.perf_counter()
from llamarun import Llama
llm = Llama.load(sys.argv[1], max_seq_len=256)
ready = time.perf_counter() - t
print(json.dumps({"ready_s": round(ready, 2), "load_s": round(llm.load_s, 2), "plan": llm.plan.label,
                  "reason": llm.plan.reason,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-3.2-1b")
    ap.add_argument("--recipe", default="q4_k_m", choices=sorted(RECIPES))
    ap.add_argument("--dir", default="/tmp/llamarun-gguf-bench")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--pythonpath", help="load with the llamarun found here (an older checkout, for comparisons)")
    args = ap.parse_args()
    path = Path(args.dir) / f"{args.config}.{args.recipe}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write(path, args.config, args.recipe)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s")
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    for _ in range(args.runs):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path.resolve())], capture_output=True, text=True, env=env,
                              cwd="/")  # not the checkout: --pythonpath must win
        if proc.returncode:
            print(proc.stderr.strip().splitlines()[-1])
            return 1
        print(proc.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
