"""The ``llamarun`` command line: generate, info, bench.

Every failure a user can cause ends in one line on stderr (``llamarun: error: ...``) and exit code 2
(usage: bad argument or input file) or 1 (runtime failure); set LLAMARUN_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections import Counter

from .config import KNOWN_CONFIGS
from .errors import LlamarunError, UsageError

# Parsing the command line imports no torch (~3 s on a slow machine): --help and usage errors are instant.
# These choices mirror convert.TARGETS / convert.DTYPES and quantize.MODES (a test keeps them equal).
CONVERT_TARGETS = ("meta", "hf", "llama2c", "gguf")
CONVERT_DTYPES = ("float32", "float16", "bfloat16", "q8_0")
QUANT_MODES = ("int8", "int4")


def _add_model_option(p: argparse.ArgumentParser) -> None:
    """``-m/--model`` beside a positional MODEL, as generate and bench spell it (see _merge_model_option)."""
    p.add_argument("-m", "--model", dest="model_option", metavar="MODEL", help="the same as MODEL")


def _merge_model_option(args: argparse.Namespace) -> None:
    """A command taking MODEL positionally also takes ``-m MODEL``; giving two different ones is an error."""
    option = getattr(args, "model_option", None)
    if option is not None:
        if args.model is not None and args.model != option:
            raise UsageError(f"two models given: {args.model!r} and -m {option!r}")
        args.model = option


def _add_model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", help="checkpoint: .gguf, llama2.c .bin, or a Meta/HF directory "
                                                "(default: the embedded SmolLM2-135M-Instruct)")
        _add_model_option(p)
    else:
        p.add_argument("-m", "--model", help="checkpoint: .gguf, llama2.c .bin, or a Meta/HF directory "
                                             "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("-z", "--tokenizer", help="tokenizer file, when the checkpoint has none beside it")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype (auto: bf16/fp16 on GPU; on a CPU float32 activations, with unquantized weights in bf16)")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--max-seq-len", type=int, help="context length to allow (default: the model's, at most 4096)")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="KV cache dtype (auto: float16 under float32 math on a CPU, else the model's dtype; "
                        "int8: a scale per cached row, about half of float16's memory)")
    if positional:
        return
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile; CUDA graphs on GPUs): slow the first time, "
                        "cached for later runs")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight quantization (auto: the checkpoint's own precision if it fits, else int8, "
                        "else int4, else offload some layers to the CPU)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], help="quantization group size")
    p.add_argument("--offload-layers", type=int, help="keep this many layers on the CPU (GPU runs)")
    p.add_argument("--gpu-memory", help="memory budget on the device, e.g. 10GiB (default: what it has free)")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors (a bad choice, an unknown option) as one line like every other error,
    instead of the whole usage block (subcommands' parsers are this class too)."""

    def error(self, message: str):
        print(f"llamarun: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="llamarun", description="Run LLaMA-family models on the hardware you have.")
    parser.add_argument("--version", action="version", version=f"llamarun {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="complete prompts (tokens stream as they are generated)",
                       description="Complete each PROMPT (or standard input). Stats go to stderr.")
    g.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text; several prompts run as one batch")
    _add_model_args(g)
    g.add_argument("-n", "--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    g.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1] (default 0.9)")
    g.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--echo", action="store_true", help="include the prompt in the output")
    g.add_argument("--logprobs", action="store_true", help="print each token's log-probability")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens")
    g.add_argument("--json", action="store_true", help="print one JSON object (texts, token ids, logprobs, stats)")

    i = sub.add_parser("info", help="describe a checkpoint: architecture, parameters, tensor types, tokenizer")
    _add_model_args(i, positional=True)
    i.add_argument("--json", action="store_true", help="machine-readable output")

    pl = sub.add_parser("plan", help="what a model needs in memory and how it would be loaded (reads no weights)",
                        description="Print the memory plan for MODEL (or a known --config) on a device: weights per "
                                    "choice (native dtype, int8, int4), KV cache, activations, runtime overhead, "
                                    "the memory available, and the configuration llamarun would load.")
    pl.add_argument("model", nargs="?", help="checkpoint path (default: the embedded SmolLM2)")
    _add_model_option(pl)
    pl.add_argument("--config", help="plan for a known model instead: " + ", ".join(KNOWN_CONFIGS))
    pl.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (a CUDA device needs no GPU "
                                                     "here when --memory is given)")
    pl.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    pl.add_argument("--memory", help="memory budget, e.g. 12GiB (default: what the device has free)")
    pl.add_argument("--max-seq-len", type=int,
                    help="context to plan for (default: the model's, at most 4096, as generate loads it)")
    pl.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                    help="KV cache dtype (auto: float16 under float32 math on a CPU, else the model's dtype; "
                         "int8: a scale per cached row, about half of float16's memory)")
    pl.add_argument("--batch", type=int, default=1, help="rows generated at once (default 1)")
    pl.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"])
    pl.add_argument("--group-size", type=int, choices=[32, 64, 128], help="int4 (and int8) group size")
    pl.add_argument("--offload-layers", type=int, help="keep this many layers on the CPU (accelerators)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")

    b = sub.add_parser("bench", help="measure load time, prefill and decode speed, peak memory")
    _add_model_args(b)
    b.add_argument("--prefill", type=int, nargs="+", default=[128, 512], help="prompt lengths to time")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16], help="batch sizes to time decode at")
    b.add_argument("--decode-tokens", type=int, default=64, help="tokens to decode per measurement")
    b.add_argument("--json", action="store_true", help="machine-readable output")

    c = sub.add_parser(
        "convert", help="convert a checkpoint to the Meta, Hugging Face, llama2.c or GGUF format",
        description="Convert SRC (.gguf, llama2.c .bin, Meta or HF directory) to another format at OUT. "
                    "Tensors are processed one at a time; OUT appears only once the conversion is complete.")
    c.add_argument("src", metavar="SRC", help="checkpoint to read")
    c.add_argument("out", metavar="OUT", help="output path: a directory for meta/hf, a file for llama2c/gguf")
    c.add_argument("--to", required=True, choices=CONVERT_TARGETS, help="output format")
    c.add_argument("--dtype", choices=CONVERT_DTYPES,
                   help="tensor type (default: the source's float type, float32 for a quantized source); "
                        "q8_0 for gguf and llama2c only")
    c.add_argument("-z", "--tokenizer", help="tokenizer file, when SRC has none beside it")
    c.add_argument("--llama2c-version", type=int, choices=[0, 1, 2],
                   help="llama2.c layout: 0 = run.c's legacy float32 (default), 1 = float32 with a header, "
                        "2 = Q8_0 for runq.c (default with --dtype q8_0)")
    c.add_argument("--force", action="store_true", help="replace OUT (and a differing tokenizer.bin) if present")
    c.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    q = sub.add_parser("quantize", help="write an int8/int4 weight-quantized copy of a checkpoint",
                       description="Quantize every linear layer of SRC (read one tensor at a time; GGUF "
                                   "Q8_0/Q4_0/Q4_1 blocks convert losslessly) and write OUT (.safetensors). "
                                   "OUT appears only once it is complete; an existing OUT is replaced "
                                   "only with --force.")
    q.add_argument("src", metavar="SRC", nargs="?", help="checkpoint to quantize (default: the embedded SmolLM2)")
    q.add_argument("out", metavar="OUT", help="output file (.safetensors)")
    q.add_argument("--to", dest="mode", required=True, choices=QUANT_MODES, help="weight format")
    q.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale (default: int8 per output channel, int4 32; GGUF blocks keep 32)")
    q.add_argument("--output-mode", choices=QUANT_MODES, default=None,
                   help="format of the output layer and a tied embedding (default: int8, the layer most "
                        "sensitive to 4-bit rounding)")
    q.add_argument("-z", "--tokenizer", help="tokenizer file, when the checkpoint has none beside it")
    q.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return parser


def _check_common(args: argparse.Namespace) -> None:
    """Reject bad values before spending seconds on loading a model."""
    from .device import check_threads, pick_device

    if getattr(args, "threads", None) is not None:
        check_threads(args.threads, "--threads")
    _check_max_seq_len(args.max_seq_len)
    pick_device(args.device)


def _check_max_seq_len(n: int | None) -> None:
    if n is not None and n < 1:
        raise UsageError(f"--max-seq-len must be >= 1, got {n}")


def _load(args: argparse.Namespace, batch: int = 1):
    """Load the model as the plan says and announce the configuration in one line on stderr."""
    from .generation import Llama
    from .memory import parse_size

    llm = Llama.load(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                     threads=args.threads, tokenizer_path=args.tokenizer, quantize=args.quantize,
                     group_size=args.group_size, offload_layers=args.offload_layers, max_batch_size=batch,
                     memory=parse_size(args.gpu_memory) if args.gpu_memory else None, kv_dtype=args.kv_dtype)
    _resume_gc(freeze=True)
    print(f"llamarun: {llm.checkpoint.path.name}: {plan_summary(llm.plan)}", file=sys.stderr)
    if args.compile:
        if llm.device.type == "cpu":
            print("llamarun: note: on a CPU the eager fused kernels decode several times faster than the compiled "
                  "step (--compile is meant for CUDA graphs)", file=sys.stderr)
        print("llamarun: compiling the decode step (minutes the first time, cached afterwards)...", file=sys.stderr)
        llm.compile(tuple(sorted(set(getattr(args, "batch", None) or [batch or 1]))))
        print(f"llamarun: compiled in {llm.compile_s:.1f} s", file=sys.stderr)
    return llm


def plan_summary(plan) -> str:
    """One line: what was loaded where, and why."""
    from .memory import _fmt

    split = f", {plan.offload_layers} layers on cpu" if plan.offload_layers else ""
    return (f"{plan.label} on {plan.device}{split}, {_fmt(plan.weights_on_device)} weights, "
            f"{_fmt(plan.total)} planned of {_fmt(plan.available)} ({plan.reason})")


def cmd_generate(args: argparse.Namespace) -> int:
    from .bench import gemm_note, products_info
    from .sampling import SamplingParams
    from .tokenizer import StreamDecoder

    if args.max_new_tokens < 0:
        raise UsageError(f"-n/--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    _check_common(args)
    if args.seed is not None:
        from .generation import check_seed

        check_seed(args.seed)  # before loading: torch's own check comes only when generating
    prompts = args.prompts
    if not prompts:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt: give PROMPT arguments or pipe text on standard input")
        prompts = [sys.stdin.read()]
        if not prompts[0].strip():
            raise UsageError("no prompt: standard input was empty")
    llm = _load(args, batch=len(prompts))
    tok = llm.tokenizer
    prompt_tokens = [tok.encode(p) for p in prompts]
    stream_live = len(prompts) == 1 and not args.json
    out = sys.stdout
    generated: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    finish = ["length"] * len(prompts)
    decoder = StreamDecoder(tok, prompt_tokens[0]) if stream_live else None
    if stream_live and args.echo:
        out.write(prompts[0])
        out.flush()
    for r in llm.stream(prompt_tokens, args.max_new_tokens, sampling, logprobs=args.logprobs or args.json,
                        ignore_eos=args.ignore_eos, seed=args.seed):
        is_stop = tok.is_stop(r.token) and not args.ignore_eos
        if is_stop:
            finish[r.row] = "stop"
        else:
            generated[r.row].append(r.token)
            if r.logprob is not None:
                logprobs[r.row].append(r.logprob)
            if decoder is not None:
                text = decoder.push(r.token)
                if args.logprobs and text:
                    text = f"{text}[{r.logprob:.3f}]"
                out.write(text)
                out.flush()
    if decoder is not None:
        out.write(decoder.flush() + "\n")
    elif not args.json:
        for i, p in enumerate(prompts):
            text = (p if args.echo else "") + tok.decode(generated[i])
            out.write(f"--- [{i}] ---\n{text}\n")
            if args.logprobs:
                out.write(json.dumps([round(x, 4) for x in logprobs[i]]) + "\n")
    stats = llm.stats
    summary = {
        "load_s": round(llm.load_s, 3),
        "prompt_tokens": stats.prompt_tokens, "prefill_s": round(stats.prefill_s, 4),
        "prefill_tok_s": round(stats.prefill_tok_s, 1),
        "generated_tokens": stats.generated_tokens, "decode_tokens": stats.decode_tokens,
        "decode_s": round(stats.decode_s, 4),
        "decode_tok_s": round(stats.decode_tok_s, 1),
        "device": str(llm.device), "dtype": str(llm.dtype).replace("torch.", ""),
        "weights": llm.plan.label if llm.plan else str(llm.dtype).replace("torch.", ""),
        "kv_dtype": str(llm.kv_dtype).replace("torch.", ""),
        **products_info(llm),
    }
    if args.json:
        results = [{"prompt": p, "text": tok.decode(generated[i]), "prompt_tokens": prompt_tokens[i],
                    "tokens": generated[i], "logprobs": logprobs[i], "finish_reason": finish[i]}
                   for i, p in enumerate(prompts)]
        out.write(json.dumps({"model": str(llm.checkpoint.path), "results": results, "stats": summary}) + "\n")
    print(f"load {llm.load_s:.2f} s | prefill {stats.prompt_tokens} tok at {stats.prefill_tok_s:.1f} tok/s | "
          f"decode {stats.decode_tokens} tok at {stats.decode_tok_s:.1f} tok/s | {summary['device']} "
          f"{summary['weights']} weights, {summary['dtype']} activations"
          f"{gemm_note(summary)}, {summary['kv_dtype']} KV cache", file=sys.stderr)
    return 0


def describe(ckpt) -> dict:
    """What ``llamarun info`` shows, as a dict."""
    a, tok = ckpt.args, ckpt.tokenizer
    return {
        "path": str(ckpt.path), "format": ckpt.format, "architecture": "llama",
        "parameters": a.num_params(), "layers": a.n_layers, "dim": a.dim, "heads": a.n_heads,
        "kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "ffn_dim": a.hidden_dim, "vocab_size": a.vocab_size,
        "context_length": a.max_seq_len, "rope_theta": a.rope_theta, "rope_scaling": bool(a.rope_scaling),
        "norm_eps": a.norm_eps, "tied_embeddings": a.tie_embeddings,
        "tensor_types": dict(Counter(ckpt.tensor_types.values())),
        "tokenizer": {"type": type(tok).__name__, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                      "eos_id": tok.eos_id, "stop_ids": sorted(tok.stop_ids), "add_bos": tok.add_bos,
                      "chat_template": tok.chat_template is not None},
    }


def _open_checkpoint(path, tokenizer=None):
    """A checkpoint for info and plan, weights unread: any format, or a ``llamarun quantize`` file."""
    from .formats import load_checkpoint
    from .generation import default_model_path
    from .quantize import is_quantized_checkpoint, quantized_file_info

    path = path or default_model_path()
    if is_quantized_checkpoint(path):
        return quantized_file_info(path, tokenizer)
    return load_checkpoint(path, tokenizer)


def cmd_info(args: argparse.Namespace) -> int:
    _check_common(args)
    ckpt = _open_checkpoint(args.model, args.tokenizer)
    d = describe(ckpt)
    from .device import pick_device
    from .generation import DEFAULT_MAX_SEQ_LEN, plan_load
    from .memory import native_quantization

    device = pick_device(args.device)
    try:
        plan = plan_load(ckpt.args, device, args.dtype, args.kv_dtype,
                         max_seq_len=args.max_seq_len or min(ckpt.args.max_seq_len, DEFAULT_MAX_SEQ_LEN),
                         **native_quantization(ckpt))[0]
        d["load_plan"] = plan_summary(plan)
    except LlamarunError as e:
        d["load_plan"] = f"does not fit: {e}"
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk}={vv}" for kk, vv in v.items())
        elif k == "parameters":
            v = f"{v:,} ({v / 1e6:.1f}M)"
        print(f"{k:16} {v}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from .device import pick_device, pick_dtype
    from .generation import DEFAULT_MAX_SEQ_LEN, plan_load
    from .memory import config_by_name, format_plan, native_quantization, parse_size

    memory = parse_size(args.memory) if args.memory else None
    _check_max_seq_len(args.max_seq_len)
    if memory is not None and str(args.device).startswith("cuda") and not torch.cuda.is_available():
        try:  # planning for a GPU this machine does not have
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"unknown device {args.device!r} (use auto, cpu, cuda, cuda:N or mps)") from None
        dtype = torch.float16 if args.dtype == "auto" else pick_dtype(args.dtype, device)
    else:
        device = pick_device(args.device)
        dtype = args.dtype  # "auto" resolved as Llama.load does (plan_load)
    if args.config:
        if args.model:
            raise UsageError("give a MODEL path or --config, not both")
        model_args, name, native = config_by_name(args.config), args.config, {}
    else:
        ckpt = _open_checkpoint(args.model)
        model_args, name, native = ckpt.args, str(ckpt.path), native_quantization(ckpt)
    seq = args.max_seq_len or min(model_args.max_seq_len, DEFAULT_MAX_SEQ_LEN)  # as Llama.load would
    plan = plan_load(model_args, device, dtype, args.kv_dtype, batch=args.batch, max_seq_len=seq, memory=memory,
                     quantize=args.quantize, group_size=args.group_size, offload_layers=args.offload_layers,
                     **native)[0]
    print(json.dumps(dict(plan.to_dict(), model=name), indent=2) if args.json else format_plan(plan, name))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run_bench

    for n in args.prefill + args.batch + [args.decode_tokens]:
        if n < 1:
            raise UsageError(f"bench sizes must be >= 1, got {n}")
    _check_common(args)
    report = run_bench(_load(args, batch=max(args.batch)), args)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from . import convert

    return convert.run(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import quantize

    return quantize.run(args)


COMMANDS = {"generate": cmd_generate, "info": cmd_info, "bench": cmd_bench, "plan": cmd_plan, "convert": cmd_convert,
            "quantize": cmd_quantize}


# Python's cyclic garbage collector is off from the start of ``main`` until the model is loaded. Importing
# torch alone sets off ~365 collections, two of them over all its objects (~170-210 ms of the command's
# start, measured), and loading adds another full one; none of what importing and loading make is cyclic
# garbage. Once loaded, everything that exists is frozen (``gc.freeze``: out of every later collection's
# reach, as it lives as long as the command) and collection resumes for what generation makes. ``main``
# leaves the collector as it found it (``gc.unfreeze``), for callers that run it in their own process.
_gc_state = {"paused": False, "frozen": False}


def _resume_gc(freeze: bool = False) -> None:
    """Switch the collector back on if ``main`` switched it off (once), freezing what exists if asked."""
    if _gc_state["paused"]:
        if freeze:
            gc.freeze()
            _gc_state["frozen"] = True
        gc.enable()
        _gc_state["paused"] = False


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    _gc_state.update(paused=gc.isenabled(), frozen=False)
    gc.disable()
    try:
        return _main(argv)
    finally:
        _resume_gc()
        if _gc_state["frozen"]:
            gc.unfreeze()


def run() -> int:
    """The ``llamarun`` program (the console script and ``python -m llamarun``): ``main`` on the command
    line, then everything is frozen before the interpreter exits. Python's shutdown otherwise collects
    over all of torch's objects: measured after ``import torch``, exit took 430-610 ms, frozen 144-168 ms,
    spent on memory the process is about to give back anyway."""
    code = main()
    gc.freeze()
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:  # a usage error: the help goes where errors go
        parser.print_help(sys.stderr)
        return 2
    try:
        _merge_model_option(args)
        return COMMANDS[args.command](args)
    except LlamarunError as e:
        print(f"llamarun: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nllamarun: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llamarun generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # never a traceback for the user, unless asked for
        if os.environ.get("LLAMARUN_DEBUG"):
            raise
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            print("llamarun: error: out of memory (try --dtype float16/bfloat16, a smaller --max-seq-len "
                  "or fewer prompts)", file=sys.stderr)
            return 1
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"llamarun: error: {type(e).__name__}: {msg} (set LLAMARUN_DEBUG=1 for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
