"""llamarun next to llama2.c's run.c (and runq.c) on a stories15M-shaped checkpoint, batch 1.

    python benchmarks/llama2c.py --runc ~/llama2.c/run                    # run.c fp32 vs llamarun fp32 + int8
    python benchmarks/llama2c.py --runc ~/llama2.c/run --runq ~/llama2.c/runq --rounds 5 --json out.json
    python benchmarks/llama2c.py --runc ~/llama2.c/run --quick --rounds 1   # smoke run

The target this checks (from the performance issue): on a stories15M-shaped llama2.c file at batch 1,
llamarun decodes at >= 1.0x the tok/s of run.c built with ``gcc -Ofast -fopenmp -march=native``.
Bring your own binaries: this script neither fetches nor builds llama2.c. Build them in a llama2.c
checkout with ``gcc -Ofast -fopenmp -march=native run.c -lm -o run`` (``runq.c`` -> ``runq`` likewise)
and pass their paths.

Method:
- The model: stories15M's shape (dim 288, 6 layers, 6 heads, 6 key/value heads, hidden 768, vocab 32000,
  context 256, classifier tied to the embedding) with seeded random weights (norms near 1, matrices
  randn / sqrt(fan_in), so activations stay finite). Speed does not depend on the values, and no
  trained weights are downloaded. The embedding row of BOS (id 1) is scaled down 100x: run.c stops
  generating when it samples BOS, and with a tied classifier this makes BOS's logit ~0 while the best of
  32000 random logits is ~4 sigma, so greedy decoding never picks it and every run is full length.
  The file is written by llamarun's own llama2.c exporter (``llamarun.convert.write_llama2c``): version 0
  float32 for run.c and, with ``--runq``, version 2 Q8_0 for runq.c (group size 32: 288 is not a multiple
  of 64, so the exporter backs off as llama2.c's export.py does).
- run.c: ``run FILE -z TOKENIZER -t 0 -n STEPS -i "Once upon a time"``: greedy, STEPS positions
  (256 = the whole context; 128 with ``--quick``); its own "achieved tok/s" (forwards after the first
  one, over wall time, printing included) is the number.
- llamarun: ``python -m llamarun bench`` on the same file and tokenizer, in its own subprocess, batch 1,
  ``--quantize none`` (float32 weights) and ``int8`` (quantized at load), float32 activations (``--dtype``);
  mode ``auto`` is what llamarun picks without options (``--quantize auto --dtype auto``: the file's float32
  weights, or on a CPU with native bf16 bf16 weights under float32 activations), labelled with its plan.
  Its decode prompt is 16 random tokens and it decodes STEPS - 17 greedy tokens ignoring end-of-sequence,
  so both engines cover positions up to STEPS; tok/s = decode steps / their time (the prefill step is
  excluded, as run.c excludes its first forward).
- Same threads for every engine: OMP_NUM_THREADS (and MKL_NUM_THREADS) = ``--threads`` (default: the
  physical cores), plus ``--threads`` for llamarun. Runs never overlap. ``--rounds R`` runs every column R
  times, alternating the order (A B C, C B A, ...) so a burst of other load hits one round rather than
  one engine, and reports each column's best (all samples and the median are in the JSON).

Output: a markdown table (engine, weights, best tok/s, ratio to run.c fp32 and to runq int8 when given)
and, with ``--json PATH``, every sample. Exit status: 2 for a usage error (missing binary, bad
tokenizer), 1 when an engine fails, else 0; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.bin"
PROMPT = "Once upon a time"
# stories15M.bin's header: llama2.c's smallest TinyStories model.
STORIES15M = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, vocab_size=32000,
                  max_seq_len=256)
BOS = 1  # run.c hard-codes it, and stops generating when it samples it
SEED = 0
DECODE_PROMPT_LEN = 16  # llamarun bench's decode prompt (tokens): llamarun.bench.DECODE_PROMPT
LLAMARUN_MODES = ("none", "int8", "int4", "auto")
MODE_LABEL = {"none": "fp32", "int8": "int8", "int4": "int4", "auto": "default"}


class BenchUsageError(Exception):
    """A problem with the arguments: reported in one line, exit status 2."""


class EngineError(Exception):
    """An engine failed or printed no speed: reported in one line, exit status 1."""


# ---- the checkpoint ----------------------------------------------------------------------------------


def stories15m_args():
    from llamarun.config import ModelArgs

    return ModelArgs(**STORIES15M, tie_embeddings=True, norm_eps=1e-5, rope_theta=10000.0)


def random_weights(args, seed: int = SEED) -> dict:
    """Meta-named float32 weights: norms ~1 and matrices randn / sqrt(fan_in), so activations keep unit
    scale through the layers; BOS's embedding row is shrunk so greedy decoding never ends early."""
    import torch

    from llamarun.formats.meta import tensor_shapes

    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in tensor_shapes(args).items():
        if name == "output.weight" and args.tie_embeddings:
            continue  # stories15M shares the classifier with the embedding
        if len(shape) == 1:
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            weights[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    weights["tok_embeddings.weight"][BOS] *= 0.01
    return weights


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass


def make_checkpoint(out: Path, tokenizer_path: Path, version: int = 0, seed: int = SEED) -> Path:
    """Write a stories15M-shaped llama2.c file at ``out``: version 0 (float32, run.c) or 2 (Q8_0, runq.c)."""
    from llamarun.convert import Staging, write_llama2c
    from llamarun.formats import Checkpoint

    args = stories15m_args()
    tok = load_tokenizer(tokenizer_path, args.vocab_size)
    ckpt = Checkpoint(args=args, tensors=random_weights(args, seed), tokenizer=tok, format="meta",
                      path=out, tensor_types={})
    # The exporter also writes tokenizer.bin beside the model: do it in a scratch directory, so that
    # only the model lands in ``out``'s directory (which may hold the user's own tokenizer.bin).
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".llama2c-bench-") as scratch:
        staged = Path(scratch) / out.name
        staging = Staging(force=True)
        write_llama2c(ckpt, staged, staging, "q8_0" if version == 2 else "float32", _NoProgress(), version)
        staging.commit()
        os.replace(staged, out)
    return out


def load_tokenizer(path: Path, vocab_size: int):
    """llama2.c's tokenizer.bin, which must hold exactly the model's vocabulary (run.c reads that many)."""
    from llamarun.errors import LlamarunError
    from llamarun.tokenizer import SentencePieceTokenizer

    if not path.is_file():
        raise BenchUsageError(f"{path}: no such tokenizer file (give llama2.c's tokenizer.bin with -z)")
    try:
        tok = SentencePieceTokenizer.from_llama2c_file(path)
    except LlamarunError as e:
        raise BenchUsageError(f"{path}: not a llama2.c tokenizer.bin ({e})") from None
    if tok.vocab_size != vocab_size:
        raise BenchUsageError(f"{path}: {tok.vocab_size} tokens; stories15M's shape needs Llama 2's {vocab_size}")
    return tok


# ---- running the engines -------------------------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def check_binary(path: str | None, flag: str, source: str) -> Path | None:
    """The binary behind ``--runc``/``--runq``, or a one-line usage error saying how to get it."""
    if path is None:
        return None
    p = Path(path).expanduser()
    how = f"build it in a llama2.c checkout: gcc -Ofast -fopenmp -march=native {source} -lm -o {Path(source).stem}"
    if not p.is_file():
        raise BenchUsageError(f"{flag} {path}: no such file ({how})")
    if not os.access(p, os.X_OK):
        raise BenchUsageError(f"{flag} {path}: not executable (chmod +x it, or {how})")
    return p.resolve()


def run_llama2c(binary: Path, ckpt: Path, tokenizer: Path, threads: int, steps: int, timeout: float) -> dict:
    """One greedy run of run.c/runq.c; its own 'achieved tok/s' line is the measurement."""
    cmd = [str(binary), str(ckpt), "-z", str(tokenizer), "-t", "0", "-n", str(steps), "-i", PROMPT]
    # Generated text goes to /dev/null: the cheapest sink, so printing costs run.c as little as possible.
    proc = _run(cmd, threads, timeout, stdout=subprocess.DEVNULL)
    found = re.search(r"achieved tok/s:\s*([0-9.eE+-]+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise EngineError(f"{binary.name} failed (exit {proc.returncode}): {_last_line(proc.stderr)}")
    return {"tok_s": float(found.group(1))}


def run_llamarun(mode: str, ckpt: Path, tokenizer: Path, threads: int, steps: int, dtype: str,
                 timeout: float) -> dict:
    """One ``llamarun bench`` in a fresh process (clean peak RSS and thread state); decode tok/s at batch 1."""
    decode_tokens = steps - DECODE_PROMPT_LEN - 1  # prompt + prefill token + decode steps = steps positions
    dtype = "auto" if mode == "auto" else dtype  # "auto": what `llamarun` picks by itself on this CPU
    cmd = [sys.executable, "-m", "llamarun", "bench", "-m", str(ckpt), "-z", str(tokenizer), "--quantize", mode,
           "--dtype", dtype, "--device", "cpu", "--threads", str(threads), "--batch", "1", "--prefill", "8",
           "--decode-tokens", str(decode_tokens), "--json"]
    proc = _run(cmd, threads, timeout, stdout=subprocess.PIPE)
    if proc.returncode != 0:
        raise EngineError(f"llamarun bench --quantize {mode} failed (exit {proc.returncode}): "
                          f"{_last_line(proc.stderr)}")
    try:
        report = json.loads(proc.stdout[proc.stdout.index("{"):])
        tok_s = float(report["decode"]["1"])
    except (ValueError, KeyError) as e:
        raise EngineError(f"llamarun bench --quantize {mode}: unreadable report ({e})") from None
    return {"tok_s": tok_s, "peak_rss_mib": report.get("peak_rss_mib"), "load_s": report.get("load_s"),
            "plan": report.get("mode"), "dtype": report.get("dtype"), "threads": report.get("threads")}


def _run(cmd: list[str], threads: int, timeout: float, stdout) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=thread_env(threads),
                              cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EngineError(f"{Path(cmd[0]).name}: no result within {timeout:g} s") from None


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


# ---- measuring and reporting ---------------------------------------------------------------------------


def columns(opts: argparse.Namespace, files: dict[str, Path]) -> list[dict]:
    """Every (engine, weights) column with the function that measures it once."""
    common = dict(tokenizer=opts.tokenizer, threads=opts.threads, steps=opts.steps, timeout=opts.timeout)
    cols = [{"engine": "run.c", "weights": "fp32", "binary": str(opts.runc),
             "measure": lambda: run_llama2c(opts.runc, files["v0"], **common)}]
    if opts.runq:
        cols.append({"engine": "runq.c", "weights": "int8 (Q8_0)", "binary": str(opts.runq),
                     "measure": lambda: run_llama2c(opts.runq, files["v2"], **common)})
    for mode in opts.modes:
        cols.append({"engine": "llamarun", "weights": MODE_LABEL[mode], "mode": mode,
                     "measure": lambda mode=mode: run_llamarun(mode, files["v0"], dtype=opts.dtype, **common)})
    return cols


def measure(cols: list[dict], rounds: int, log=print) -> None:
    """Run every column ``rounds`` times, order reversed every other round; samples go into each column."""
    for r in range(rounds):
        for col in cols if r % 2 == 0 else reversed(cols):
            result = col["measure"]()
            col.setdefault("samples", []).append(result)
            if col.get("mode") == "auto" and result.get("plan"):  # what the default turned out to be
                col["weights"] = f"default: {result['plan']}"
            log(f"round {r + 1}/{rounds}: {col['engine']} {col['weights']}: {result['tok_s']:.1f} tok/s")
    for col in cols:
        speeds = [s["tok_s"] for s in col["samples"]]
        col["best_tok_s"], col["median_tok_s"] = max(speeds), statistics.median(speeds)


def ratios(cols: list[dict]) -> None:
    """Each column's best tok/s over run.c's (fp32) and runq.c's (int8): > 1 means faster than llama2.c."""
    refs = {c["engine"]: c["best_tok_s"] for c in cols if c["engine"] in ("run.c", "runq.c")}
    for col in cols:
        for ref, speed in refs.items():
            col[f"vs_{ref}"] = round(col["best_tok_s"] / speed, 3) if speed > 0 else None


def format_table(cols: list[dict], rounds: int) -> str:
    refs = [e for e in ("run.c", "runq.c") if any(c["engine"] == e for c in cols)]
    head = ["engine", "weights", f"tok/s (best of {rounds})", "median"] + [f"x {r}" for r in refs]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for c in cols:
        cells = [c["engine"], c["weights"], f"{c['best_tok_s']:.1f}", f"{c['median_tok_s']:.1f}"]
        cells += [f"{c[f'vs_{r}']:.2f}x" if c.get(f"vs_{r}") is not None else "-" for r in refs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    """What the numbers were measured on, and how busy it was."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "loadavg": load}


def busy_note(info: dict, threads: int) -> str | None:
    """A warning when other work already wants the CPUs the engines will use: OpenMP's spinning barriers
    (run.c, runq.c) lose far more than llamarun's pool when one of their threads is descheduled, so the
    ratios would flatter llamarun."""
    if not info["loadavg"] or not info["logical_cpus"]:
        return None
    load, free = info["loadavg"][0], info["logical_cpus"] - threads
    if load <= free + 0.5:
        return None
    return (f"load average {load:.1f} on {info['logical_cpus']} CPUs before measuring, with {threads} threads per "
            "engine: other work competes for the cores, and run.c's OpenMP suffers most; do not publish these")


# ---- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Decode tok/s of llamarun vs llama2.c's run.c (and runq.c) on a "
                                            "stories15M-shaped checkpoint with random weights, batch 1.")
    p.add_argument("--runc", help="run.c binary you built (gcc -Ofast -fopenmp -march=native run.c -lm -o run)")
    p.add_argument("--runq", help="runq.c binary (int8); a version-2 Q8_0 file is made for it")
    p.add_argument("-z", "--tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="llama2.c's tokenizer.bin (default: ../shared/data/llama2-tokenizer/tokenizer.bin)")
    p.add_argument("--out", help="directory to write (and keep) the checkpoints in (default: a temporary one)")
    p.add_argument("--threads", type=int, help="threads for every engine (default: physical cores)")
    p.add_argument("--rounds", type=int, default=3, help="measurements per column; the best is reported (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: 128 positions instead of the whole 256")
    p.add_argument("--modes", nargs="+", default=["none", "int8"], choices=LLAMARUN_MODES,
                   help="llamarun --quantize modes (default: none int8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="llamarun activations (default float32, as run.c)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per engine run (default 600)")
    p.add_argument("--json", help="write every sample and the table's numbers to this file")
    opts = p.parse_args(argv)
    opts.runc = check_binary(opts.runc, "--runc", "run.c")
    if opts.runc is None:
        raise BenchUsageError("--runc PATH is required: the run.c binary you built (gcc -Ofast -fopenmp "
                              "-march=native run.c -lm -o run in a llama2.c checkout)")
    opts.runq = check_binary(opts.runq, "--runq", "runq.c")
    opts.tokenizer = Path(opts.tokenizer).expanduser().resolve()
    if not opts.tokenizer.is_file():  # checked here too, before seconds go into importing torch
        raise BenchUsageError(f"{opts.tokenizer}: no such tokenizer file (give llama2.c's tokenizer.bin with -z)")
    if opts.rounds < 1:
        raise BenchUsageError(f"--rounds must be >= 1, got {opts.rounds}")
    if opts.threads is not None and opts.threads < 1:
        raise BenchUsageError(f"--threads must be >= 1, got {opts.threads}")
    if opts.out and not Path(opts.out).is_dir():
        raise BenchUsageError(f"--out {opts.out}: no such directory")
    opts.steps = 128 if opts.quick else STORIES15M["max_seq_len"]
    return opts


def run(opts: argparse.Namespace, workdir: Path) -> dict:
    from llamarun.device import physical_cores

    opts.threads = opts.threads or physical_cores()
    t = time.perf_counter()
    files = {"v0": make_checkpoint(workdir / "stories15M.bin", opts.tokenizer, version=0)}
    if opts.runq:
        files["v2"] = make_checkpoint(workdir / "stories15M_q80.bin", opts.tokenizer, version=2)
    log(f"checkpoints written in {time.perf_counter() - t:.1f} s: {', '.join(str(f) for f in files.values())}")
    log(f"{opts.threads} threads, {opts.steps} positions, {opts.rounds} round(s)")
    before = machine()
    note = busy_note(before, opts.threads)
    if note:
        log(f"warning: {note}")
    cols = columns(opts, files)
    measure(cols, opts.rounds, log)
    ratios(cols)
    for c in cols:
        del c["measure"]
    return {"model": dict(STORIES15M, tie_embeddings=True, weights="random", seed=SEED),
            "files": {k: str(v) for k, v in files.items()}, "prompt": PROMPT, "steps": opts.steps,
            "threads": opts.threads, "rounds": opts.rounds, "llamarun_dtype": opts.dtype,
            "machine": dict(before, loadavg_after=machine()["loadavg"]), "notes": [note] if note else [],
            "columns": cols}


def log(message: str) -> None:
    print(f"llama2c.py: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
        if opts.out:
            results = run(opts, Path(opts.out).resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="llama2c-bench-") as tmp:
                results = run(opts, Path(tmp))
    except BenchUsageError as e:
        print(f"llama2c.py: error: {e}", file=sys.stderr)
        return 2
    except EngineError as e:
        print(f"llama2c.py: error: {e}", file=sys.stderr)
        return 1
    print(format_table(results["columns"], results["rounds"]))
    for note in results["notes"]:
        print(f"\nNote: {note}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
