"""``llamarun convert``: rewrite any checkpoint llamarun reads as a Meta, Hugging Face, llama2.c or GGUF one.

The source is opened with :func:`~llamarun.formats.load_checkpoint`, so every writer sees the same thing:
ModelArgs, Meta-named tensors in Meta's rotary layout (produced one at a time) and a Tokenizer. Each
writer only has to lay those out the way its format wants:

* ``meta``: ``params.json``, ``consolidated.00.pth`` and the tokenizer (``tokenizer.model`` when the
  vocabulary is SentencePiece or tiktoken, else an HF ``tokenizer.json``);
* ``hf``: ``config.json``, ``model.safetensors`` (sharded with an index past 2 GiB) with wq/wk permuted
  to HF's layout, ``tokenizer.json`` or ``tokenizer.model``, ``tokenizer_config.json`` and
  ``generation_config.json``;
* ``llama2c``: a ``.bin`` (version 0 by default: the one ``run.c`` reads; version 2 is Q8_0 for
  ``runq.c``) plus ``tokenizer.bin`` beside it when the vocabulary is SentencePiece;
* ``gguf``: one file written with ``gguf.GGUFWriter``, tensor by tensor (F32, F16, BF16 or Q8_0), with
  the tokenizer as ``tokenizer.ggml.*`` metadata (copied verbatim from a GGUF source).

Everything is written under temporary names next to OUT and renamed into place at the very end, so an
interrupted or failed conversion leaves nothing at OUT. An existing OUT is replaced only with ``force``.
:func:`check_output` and :func:`staged` are shared with ``llamarun quantize``.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import math
import os
import re
import shutil
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .config import ModelArgs, meta_ffn_hidden_dim
from .errors import FormatError, RuntimeFailure, UsageError
from .formats import Checkpoint, load_checkpoint
from .formats import llama2c
from .formats.hf import meta_to_hf_name, permute_qk
from .formats.meta import tensor_shapes
from .model import rope_cache, rope_frequencies

TARGETS = ("meta", "hf", "llama2c", "gguf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "q8_0": None}
_TYPE_TO_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
HF_SHARD_BYTES = 2 << 30  # safetensors shard size: bounds the memory a conversion holds at once

# Token types shared by SentencePiece's ModelProto and GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def warn(message: str) -> None:
    print(f"llamarun: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# The entry point


def convert(src: str | Path, out: str | Path, to: str, dtype: str | None = None, progress: bool = True, *,
            force: bool = False, tokenizer_path: str | Path | None = None,
            llama2c_version: int | None = None) -> Path:
    """Convert the checkpoint at ``src`` to format ``to``, written at ``out``; returns ``out``.

    ``dtype`` (float32, float16, bfloat16, q8_0) defaults to the source's own float type, or float32 for a
    quantized source: a conversion is lossless unless asked otherwise. ``q8_0`` exists for ``gguf`` and
    ``llama2c`` (version 2). ``llama2c_version`` is 0 (run.c's legacy layout, the default), 1 or 2.
    """
    if to not in TARGETS:
        raise UsageError(f"unknown target format {to!r} (use one of: {', '.join(TARGETS)})")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (use one of: {', '.join(DTYPES)})")
    out = check_output(out, force, src, tokenizer_path)
    ckpt = load_checkpoint(src, tokenizer_path)
    dtype = _resolve_dtype(ckpt, to, dtype, llama2c_version)

    with staged(out, force) as staging, _progress_bar(ckpt, to, progress) as bar:
        WRITERS[to](ckpt, out, staging, dtype, bar, llama2c_version)
    return out


def check_output(out: str | Path, force: bool, src: str | Path | None = None,
                 tokenizer: str | Path | None = None) -> Path:
    """Refuse, before any work, an output path that must not or cannot be written; returns it as a Path.

    Refused (UsageError): ``out`` that is (or is a directory holding) ``src`` or ``tokenizer``, the files
    being read; an existing ``out`` unless ``force``; a parent that is missing or not a directory.
    """
    out = Path(out)
    target = out.resolve()
    for what, path in (("checkpoint", src), ("tokenizer", tokenizer)):
        if path is None:
            continue
        path = Path(path)
        read = path.resolve()
        # A directory holding the input is replaced whole; samefile: a hard link to the input is the input.
        if read == target or target in read.parents or \
                (out.exists() and path.exists() and os.path.samefile(out, path)):
            raise UsageError(f"{out}: the output would replace the {what} being read")
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError(f"{out} already exists (pass --force to replace it)")
    if not out.parent.exists():
        raise UsageError(f"{out.parent}: no such directory")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: not a directory")
    return out


def _resolve_dtype(ckpt: Checkpoint, to: str, dtype: str | None, llama2c_version: int | None) -> str:
    """The output tensor type: as asked (if the format stores it), else lossless: the source's float type,
    float32 for a quantized source (and for llama2.c, whose only other type is its own Q8_0)."""
    if dtype is None:
        if to == "llama2c":
            dtype = "q8_0" if llama2c_version == 2 else "float32"
        else:
            dtype = _TYPE_TO_DTYPE.get(ckpt.tensor_types.get("tok_embeddings.weight", ""), "float32")
    if dtype == "q8_0" and to in ("meta", "hf"):
        raise UsageError(f"--dtype q8_0 is for --to gguf or llama2c; the {to} format stores float tensors")
    if to == "llama2c":
        if dtype not in ("float32", "q8_0"):
            raise UsageError(f"llama2.c files hold float32 (versions 0, 1) or q8_0 (version 2), not {dtype}")
        if llama2c_version is not None and (llama2c_version == 2) != (dtype == "q8_0"):
            raise UsageError(f"llama2.c version {llama2c_version} does not store {dtype} "
                             "(version 2 is q8_0, versions 0 and 1 float32)")
    return dtype


def _progress_bar(ckpt: Checkpoint, to: str, enabled: bool):
    """A tqdm bar on stderr counting the tensors written (disabled: a silent no-op)."""
    from tqdm import tqdm

    n = len(tensor_shapes(ckpt.args))
    if ckpt.args.tie_embeddings and to != "meta":  # only Meta's format stores a tied output separately
        n -= 1
    return tqdm(total=n, desc=f"convert to {to}", unit="tensor", file=sys.stderr, disable=not enabled, leave=False)


@contextmanager
def staged(out: Path, force: bool) -> Iterator["Staging"]:
    """A :class:`Staging` for the outputs of one command whose result is ``out``: committed when the block
    completes; on any failure what was written is removed, and a failed write (disk full, file too large,
    no permission) is raised as RuntimeFailure ``cannot write OUT: reason``."""
    staging = Staging(force)
    try:
        yield staging
        staging.commit()
    except BaseException as e:
        reason = staging.write_error(e)  # before abort: it needs the temporary paths
        staging.abort()
        if reason is not None:
            raise RuntimeFailure(f"cannot write {out}: {reason}") from e
        raise


# errnos that only a write gives: an OSError with one of these is the output's, wherever it was raised
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}
# Rust's io::Error (safetensors, tokenizers) has no errno attribute, only "... (os error 28)" in its text
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class Staging:
    """Outputs written under hidden temporary names beside their final paths, moved in by ``commit``."""

    def __init__(self, force: bool) -> None:
        self.force = force
        self.moves: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        """A temporary path to write what will become ``final``."""
        tmp = final.parent / f".{final.name}.llamarun-partial-{os.getpid()}"
        _remove(tmp)
        self.moves.append((tmp, final))
        return tmp

    def commit(self) -> None:
        """Move every temporary output to its final path (replaced only with ``force``, or when equal)."""
        for tmp, final in self.moves:  # check everything before moving anything
            if final.exists() and not self.force and not _same_file_content(tmp, final):
                raise UsageError(f"{final} already exists and differs (pass --force to replace it)")
        mode = _new_file_mode()
        for tmp, _ in self.moves:
            # Some writers (safetensors) create 0600 files; outputs get what any new file gets under the umask.
            for f in ([tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]):
                os.chmod(f, mode)
        for tmp, final in self.moves:
            if final.exists() or final.is_symlink():
                _remove(final)
            os.replace(tmp, final)
        self.moves.clear()

    def abort(self) -> None:
        """Remove every temporary output."""
        for tmp, _ in self.moves:
            _remove(tmp)
        self.moves.clear()

    def write_error(self, exc: BaseException) -> str | None:
        """Why writing failed (``No space left on device``...) if ``exc`` is a failed write of an output,
        else None (a failure of something else, raised as it is)."""
        if isinstance(exc, OSError) and exc.errno is not None:
            names = {Path(n) for n in (exc.filename, exc.filename2) if isinstance(n, (str, os.PathLike))}
            ours = any(n == tmp or tmp in n.parents for n in names for tmp, _ in self.moves)
            if exc.errno in _WRITE_ERRNOS or ours:
                return exc.strerror or os.strerror(exc.errno)
            return None
        match = _RUST_OS_ERROR.search(str(exc)) if isinstance(exc, Exception) else None
        if match and int(match.group(1)) in _WRITE_ERRNOS | {errno.EACCES, errno.EPERM}:
            return os.strerror(int(match.group(1)))
        return None


def _new_file_mode() -> int:
    """0666 less the process's umask: the mode ``open`` gives a new file."""
    mask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _same_file_content(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def _tensors(ckpt: Checkpoint, untie: bool, bar) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors in Meta order, each produced only when needed.

    ``untie`` yields ``output.weight`` (a copy of the embedding) for tied models, for formats that always
    store an output layer.
    """
    for name in tensor_shapes(ckpt.args):
        if name == "output.weight" and ckpt.args.tie_embeddings:
            if not untie:
                continue
            tensor = ckpt.tensors["tok_embeddings.weight"]
        else:
            tensor = ckpt.tensors[name]
        yield name, tensor
        bar.update(1)


# ----------------------------------------------------------------------------------------------------------
# Meta


def meta_params(args: ModelArgs) -> dict[str, Any]:
    """params.json for these args, with only keys Meta's own ModelArgs accepts (Llama 3.1 style).

    Meta derives the FFN width from ``multiple_of`` and ``ffn_dim_multiplier``; pick values that give
    back ``hidden_dim`` exactly. max_seq_len is not a params.json key: Meta passes it at build time.
    """
    if args.head_dim * args.n_heads != args.dim:
        raise FormatError(f"Meta's params.json cannot express head_dim {args.head_dim} != dim / n_heads")
    multiple_of, multiplier = _ffn_params(args.dim, args.hidden_dim)
    params: dict[str, Any] = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
        "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
    }
    scaling = _llama3_scaling(args)
    if scaling == _META_SCALING:
        params["use_scaled_rope"] = True
    elif scaling is not None:  # not Meta's hard-coded values: a key only llamarun reads
        params["rope_scaling"] = scaling
    return params


_META_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def _ffn_params(dim: int, hidden: int) -> tuple[int, float | None]:
    base = int(2 * (4 * dim) / 3)
    candidates = [(m, None) for m in (256, 128, 64, 32, 16, 8, 4, 2, 1)]
    candidates += [(m, hidden / base) for m in (256, 128, 64, 32, 16, 8, 4, 2, 1)]
    candidates.append((hidden, None if base <= hidden else hidden / base))
    for multiple_of, multiplier in candidates:
        if meta_ffn_hidden_dim(dim, multiple_of, multiplier) == hidden:
            return multiple_of, multiplier
    raise FormatError(f"Meta's params.json cannot express hidden_dim {hidden} for dim {dim}")


def _llama3_scaling(args: ModelArgs) -> dict[str, float] | None:
    """Llama 3.1 rope scaling parameters, also recognised when a GGUF source only had the factors."""
    s = args.rope_scaling
    if not s:
        return None
    if "freq_factors" not in s:
        return {k: float(s[k]) for k in _META_SCALING}
    candidate = ModelArgs(**{**args.to_dict(), "rope_scaling": dict(_META_SCALING)})
    plain = ModelArgs(**{**args.to_dict(), "rope_scaling": None})
    factors = (rope_frequencies(plain) / rope_frequencies(candidate)).tolist()
    if np.allclose(factors, s["freq_factors"], rtol=1e-4):
        return dict(_META_SCALING)
    raise FormatError("the source's rope frequency factors are not Llama 3.1's scaling; only GGUF can store them")


def write_meta(ckpt: Checkpoint, out: Path, staging: Staging, dtype: str, bar, _version: int | None) -> None:
    """A Meta directory: params.json, one consolidated.00.pth (a tied output is stored as a copy, since
    Meta's model always has one) and the tokenizer. torch.save needs the whole state dict at once, so this
    holds the model in memory; the other writers hold one tensor (HF: one shard)."""
    params = meta_params(ckpt.args)
    tmp = staging.path(out)
    tmp.mkdir()
    state = {name: t.to(DTYPES[dtype]).contiguous() for name, t in _tensors(ckpt, untie=True, bar=bar)}
    _torch_save(state, tmp / "consolidated.00.pth")
    (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    tok = ckpt.tokenizer
    if _is_sentencepiece(tok):
        (tmp / "tokenizer.model").write_bytes(sentencepiece_model_bytes(tok))
    elif _is_tiktoken(tok):
        (tmp / "tokenizer.model").write_bytes(tiktoken_ranks_bytes(tok))
    else:  # byte-level BPE: Meta has no file for it; the loader also accepts an HF tokenizer.json
        write_hf_tokenizer(tok, ckpt.args, tmp)


class _KeepWriteError:
    """A file's ``write`` that remembers the OSError it raised: torch.save turns a failed write into
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, which says neither disk full
    nor file too large."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save, raising a failed write as its OSError (with the errno that says why)."""
    with open(path, "wb") as f:
        sink = _KeepWriteError(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


# ----------------------------------------------------------------------------------------------------------
# Hugging Face


def hf_config(args: ModelArgs, tok, dtype: str) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM with these hyper-parameters."""
    scaling = _llama3_scaling(args)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": {**scaling, "rope_type": "llama3"} if scaling else None,
        "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1,
        "use_cache": True, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "torch_dtype": dtype,
    }


def write_hf(ckpt: Checkpoint, out: Path, staging: Staging, dtype: str, bar, _version: int | None,
             shard_bytes: int = HF_SHARD_BYTES) -> None:
    """An HF directory: config.json, safetensors in HF names and rotary layout, tokenizer files."""
    from safetensors.torch import save_file

    args = ckpt.args
    tmp = staging.path(out)
    tmp.mkdir()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[Path] = []

    def flush(final: bool) -> None:
        # Shards are written as they fill, so at most one shard is in memory; names get their final
        # "-of-N" count at the end, once N is known.
        nonlocal size
        if shards[-1]:
            files.append(tmp / f"part-{len(files):05d}.safetensors")
            save_file(shards[-1], str(files[-1]), metadata={"format": "pt"})
        if not final:
            shards[-1] = {}
            size = 0

    weight_map = {}
    for name, t in _tensors(ckpt, untie=False, bar=bar):
        t = t.to(DTYPES[dtype])
        if name.endswith("attention.wq.weight"):
            t = permute_qk(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_qk(t, args.n_kv_heads)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush(final=False)
        hf_name = meta_to_hf_name(name)
        shards[-1][hf_name] = t.contiguous()
        weight_map[hf_name] = len(files)
        size += nbytes
    flush(final=True)

    if len(files) == 1:
        files[0].rename(tmp / "model.safetensors")
    else:
        names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        for f, n in zip(files, names):
            f.rename(tmp / n)
        total = sum((tmp / n).stat().st_size for n in names)
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(hf_config(args, ckpt.tokenizer, dtype), indent=2) + "\n")
    write_hf_tokenizer(ckpt.tokenizer, args, tmp)


def write_hf_tokenizer(tok, args: ModelArgs, directory: Path) -> None:
    """tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece), tokenizer_config.json and
    generation_config.json: what transformers and llamarun's HF loader read."""
    def piece(i: int | None) -> str | None:
        return tok.id_to_piece(i) if i is not None else None

    if _is_sentencepiece(tok):
        (directory / "tokenizer.model").write_bytes(sentencepiece_model_bytes(tok))
        tokenizer_class = "LlamaTokenizer"
    else:
        backend = tok.backend if hasattr(tok, "backend") else _bpe_backend(tok)
        backend.save(str(directory / "tokenizer.json"))
        tokenizer_class = "PreTrainedTokenizerFast"
    config = {
        "tokenizer_class": tokenizer_class, "add_bos_token": bool(tok.add_bos), "add_eos_token": False,
        "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id), "pad_token": piece(tok.pad_id),
        "model_max_length": args.max_seq_len, "clean_up_tokenization_spaces": False,
    }
    if getattr(tok, "unk_id", None) is not None:
        config["unk_token"] = piece(tok.unk_id)
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    stops = sorted(tok.stop_ids | ({tok.eos_id} if tok.eos_id is not None else set()))
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else (stops or None)}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# llama2.c


def quantize_q80(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama2.c's symmetric Q8_0 (export.py's ``quantize_q80``): int8 in [-127, 127] and one float32 scale
    per group of ``group_size`` values. An all-zero group gets scale 0 (export.py would divide by zero)."""
    w = w.float().reshape(-1, group_size)
    scale = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / torch.where(scale == 0, 1.0, scale)[:, None]).to(torch.int8)
    return q, scale


def write_llama2c(ckpt: Checkpoint, out: Path, staging: Staging, dtype: str, bar, version: int | None) -> None:
    """A llama2.c .bin in the layout :func:`llama2c.layout` describes, plus tokenizer.bin beside it.

    What run.c cannot represent is refused (head_dim != dim / n_heads, rope scaling) or warned about
    (rope_theta, norm_eps: run.c hard-codes 10000 and 1e-5; llamarun's loader reads them back)."""
    args = ckpt.args
    version = (2 if dtype == "q8_0" else 0) if version is None else version
    if args.head_dim * args.n_heads != args.dim:
        raise FormatError(f"llama2.c cannot express head_dim {args.head_dim} != dim / n_heads")
    if args.rope_scaling:
        raise FormatError("llama2.c has no rope scaling (Llama 3.1-style models cannot be converted to it)")
    if args.rope_theta != llama2c.DEFAULT_THETA:
        where = "the rotary table" if version == 0 else "the header padding"
        warn(f"llama2.c's run.c assumes rope_theta 10000; this model uses {args.rope_theta:g} (recorded in "
             f"{where} for llamarun; run.c/runq.c will compute wrong positions)")
    if not math.isclose(args.norm_eps, llama2c.DEFAULT_EPS, rel_tol=1e-3):
        warn(f"llama2.c's run.c assumes norm_eps 1e-5; this model uses {args.norm_eps:g}"
             + (" (version 0 cannot record it)" if version == 0 else ""))
    group_size = 64
    while version == 2 and args.dim % group_size:  # export.py's back-off
        group_size //= 2
    h = llama2c.Header(version, args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
                       args.vocab_size, args.max_seq_len, args.tie_embeddings, group_size if version == 2 else 0,
                       args.rope_theta, args.norm_eps)

    tmp = staging.path(out)
    with open(tmp, "wb") as f:
        f.write(_llama2c_header(h))
        for name, shape, storage in llama2c.layout(h):  # tensors produced one by one, in the file's order
            if storage == "skip":  # v0's rotary table: run.c (before Sept 2023) reads positions from it
                cos_sin = rope_cache(args, args.max_seq_len)  # [seq_len, head_dim / 2, (cos, sin)]
                _write_array(f, cos_sin[..., 0 if name == "freq_cis_real" else 1].numpy())
                continue
            t = ckpt.tensors[name].float()
            if storage == "f32":
                _write_array(f, t.numpy())
            else:
                q, scale = quantize_q80(t, group_size)
                _write_array(f, q.numpy())
                _write_array(f, scale.numpy())
            bar.update(1)

    tok = ckpt.tokenizer
    if _is_sentencepiece(tok):
        tok.save_llama2c_tokenizer(staging.path(out.parent / "tokenizer.bin"))
    else:
        warn(f"llama2.c's tokenizer.bin cannot hold this {type(tok).__name__} vocabulary (run.c merges "
             "SentencePiece-style pieces); no tokenizer.bin written: load the model with -z pointing at the "
             "source's tokenizer (a tokenizer.json, tokenizer.model or the .gguf)")


def _write_array(f, arr: np.ndarray) -> None:
    """Raw little-endian bytes of ``arr`` (float32 stays float32, int8 int8), without an extra copy.

    Through ``f.write``, not ``ndarray.tofile``: tofile reports a short write (disk full, file too large)
    as "N requested and M written", without the errno that says which."""
    f.write(memoryview(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))).cast("B"))


class _WrittenByFile(np.ndarray):
    """An array whose ``tofile`` (what GGUFWriter.write_tensor_data calls) is :func:`_write_array`."""

    def tofile(self, fid, *args, **kwargs) -> None:
        if args or kwargs or not hasattr(fid, "write"):
            return super().tofile(fid, *args, **kwargs)
        _write_array(fid, self.view(np.ndarray))


def _llama2c_header(h: llama2c.Header) -> bytes:
    sizes = [h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len]
    if h.version == 0:
        sizes[5] = h.vocab_size if h.shared_classifier else -h.vocab_size
        return struct.pack("<7i", *sizes)
    header = bytearray(llama2c.HEADER_SIZE)
    struct.pack_into("<Ii7iB", header, 0, llama2c.MAGIC, h.version, *sizes, int(h.shared_classifier))
    if h.version == 2:
        struct.pack_into("<i", header, 37, h.group_size)
    struct.pack_into(llama2c.EXT_FORMAT, header, llama2c.EXT_OFFSET, llama2c.EXT_TAG, 1, h.rope_theta, h.norm_eps)
    return bytes(header)


# ----------------------------------------------------------------------------------------------------------
# GGUF


def write_gguf(ckpt: Checkpoint, out: Path, staging: Staging, dtype: str, bar, _version: int | None) -> None:
    """A GGUF file in llama.cpp's names (Meta's rotary layout, as llama.cpp's converters write it)."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    from .formats.gguf import _GLOBAL_NAMES, _LAYER_NAMES

    to_gguf = {meta: g for g, meta in _GLOBAL_NAMES.items()}
    layer_to_gguf = {meta: g for g, meta in _LAYER_NAMES.items()}

    def gguf_name(name: str) -> str:
        if name in to_gguf:
            return to_gguf[name]
        _, i, rest = name.split(".", 2)
        return f"blk.{i}.{layer_to_gguf[rest]}"

    args = ckpt.args
    wanted = {"float32": QT.F32, "float16": QT.F16, "bfloat16": QT.BF16, "q8_0": QT.Q8_0}[dtype]

    def qtype(shape: tuple[int, ...]) -> QT:
        if len(shape) == 1:
            return QT.F32  # norms stay float32, as llama.cpp wants
        if wanted == QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0]:
            return QT.F16  # rows that do not split into blocks of 32 (llama.cpp's fallback too)
        return wanted

    tmp = staging.path(out)
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _gguf_metadata(writer, ckpt, dtype)
        # Tensor infos go first (the header needs them all), then data is streamed tensor by tensor.
        plan = []
        shapes = tensor_shapes(args)
        if args.rope_scaling:
            factors = _rope_factors(args)
            plan.append(("rope_freqs.weight", factors.shape, QT.F32, lambda: factors))
        for name in shapes:
            if name == "output.weight" and args.tie_embeddings:
                continue
            plan.append((gguf_name(name), shapes[name], qtype(shapes[name]), lambda name=name: ckpt.tensors[name]))
        for name, shape, qt, _ in plan:
            nbytes = math.prod(gguf.quant_shape_to_byte_shape(shape, qt))
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, qt, get in plan:
            writer.write_tensor_data(_gguf_array(get(), qt).view(_WrittenByFile))
            if name != "rope_freqs.weight":
                bar.update(1)
    finally:
        writer.close()


def _gguf_array(t: torch.Tensor, qt) -> np.ndarray:
    import gguf
    from gguf import GGMLQuantizationType as QT

    if qt == QT.F32:
        return t.float().contiguous().numpy()
    if qt == QT.F16:
        return t.half().contiguous().numpy()
    if qt == QT.BF16:
        return t.bfloat16().contiguous().view(torch.int16).numpy()
    return gguf.quants.quantize(t.float().contiguous().numpy(), qt)


def _rope_factors(args: ModelArgs) -> torch.Tensor:
    """llama.cpp's rope_freqs tensor: per-pair divisors of the base frequencies (Llama 3.1 scaling)."""
    if "freq_factors" in args.rope_scaling:
        return torch.tensor(args.rope_scaling["freq_factors"], dtype=torch.float32)
    plain = ModelArgs(**{**args.to_dict(), "rope_scaling": None})
    return (rope_frequencies(plain) / rope_frequencies(args)).float()


def add_gguf_hparams(writer, args: ModelArgs) -> None:
    """The llama architecture's hyper-parameter keys of a GGUF file (``gguf.GGUFWriter``), from ``args``."""
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_dimension_count(args.head_dim)
    if args.head_dim * args.n_heads != args.dim:
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
    writer.add_vocab_size(args.vocab_size)


def _gguf_metadata(writer, ckpt: Checkpoint, dtype: str) -> None:
    import gguf

    args = ckpt.args
    writer.add_name(Path(ckpt.path).stem if Path(ckpt.path).is_file() else Path(ckpt.path).name)
    add_gguf_hparams(writer, args)
    file_type = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                 "bfloat16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer.add_file_type(int(file_type))
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    if ckpt.format == "gguf":  # copy the tokenizer keys as they were, whichever the source used
        from .formats.gguf import open_reader, read_metadata

        meta = read_metadata(open_reader(ckpt.path))
        tokenizer_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    else:
        tokenizer_meta = gguf_tokenizer_metadata(ckpt.tokenizer)
    for key, value in tokenizer_meta.items():
        _add_gguf_value(writer, key, value)


def _add_gguf_value(writer, key: str, value: Any) -> None:
    """One metadata value, typed as llama.cpp's converters type it (ids uint32, token types int32...)."""
    from gguf import GGUFValueType as VT

    def vtype(v: Any) -> VT:
        if isinstance(v, bool):
            return VT.BOOL
        if isinstance(v, int):
            return VT.INT32 if v < 0 or key.endswith("token_type") else VT.UINT32
        if isinstance(v, float):
            return VT.FLOAT32
        return VT.STRING

    if isinstance(value, list):
        if not value:
            return  # GGUF has no empty arrays
        writer.add_key_value(key, value, VT.ARRAY, sub_type=vtype(value[0]))
    else:
        writer.add_key_value(key, value, vtype(value))


# ----------------------------------------------------------------------------------------------------------
# Tokenizers: serializing a loaded Tokenizer into each format's files


def _is_sentencepiece(tok) -> bool:
    return type(tok).__name__ == "SentencePieceTokenizer"


def _is_tiktoken(tok) -> bool:
    return type(tok).__name__ == "TiktokenTokenizer"


def gguf_tokenizer_metadata(tok) -> dict[str, Any]:
    """``tokenizer.*`` GGUF metadata describing ``tok``: a 'llama' (SentencePiece) or 'gpt2' (BPE) vocabulary."""
    meta: dict[str, Any] = {}
    if _is_sentencepiece(tok):
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.tokens"] = list(tok.pieces)
        meta["tokenizer.ggml.scores"] = list(tok.scores)
        meta["tokenizer.ggml.token_type"] = list(tok.types)
        meta["tokenizer.ggml.add_space_prefix"] = bool(tok.add_space_prefix)
    else:
        tokens, types, merges, pre = _bpe_vocabulary(tok)
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = pre
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.token_type"] = types
        meta["tokenizer.ggml.merges"] = merges
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", tok.pad_id),
                       ("unknown", getattr(tok, "unk_id", None))):
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(value)
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = bool(getattr(tok, "add_eos", False))
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def _bpe_vocabulary(tok) -> tuple[list[str], list[int], list[str], str]:
    """(tokens spelled in GPT-2's byte alphabet, token types, "a b" merges, pre-tokenizer name)."""
    from .tokenizer import bytes_to_unicode

    if _is_tiktoken(tok):
        byte_enc = bytes_to_unicode()
        ranks = tok.model._mergeable_ranks  # bytes -> rank (= id)
        spell = {b: "".join(byte_enc[x] for x in b) for b in ranks}
        tokens = [""] * tok.vocab_size
        for b, r in ranks.items():
            tokens[r] = spell[b]
        types = [NORMAL] * tok.vocab_size
        for text, i in tok.special_tokens.items():
            tokens[i], types[i] = text, CONTROL
        return tokens, types, [f"{spell[a]} {spell[b]}" for a, b in _tiktoken_merges(ranks)], "llama-bpe"

    backend = tok.backend
    spec = json.loads(backend.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(tok.vocab_size):
        tokens.append(backend.id_to_token(i) or f"[PAD{i}]")
        types.append(NORMAL if i not in added else CONTROL if added[i].get("special") else USER_DEFINED)
    return tokens, types, merges, _pre_tokenizer_name(spec.get("pre_tokenizer"))


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for an HF pre-tokenizer, from its structure (what llamarun's GGUF reader knows)."""
    from .tokenizer import PRE_TOKENIZER_SPLITS

    text = json.dumps(pre or {})
    for name, split in PRE_TOKENIZER_SPLITS.items():
        if json.dumps(split)[1:-1] in text:
            return name
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    return "default"


def _tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list equivalent to tiktoken's ranks (as transformers' TikTokenConverter derives it):
    each multi-byte token comes from the split whose halves are both tokens, best-ranked first."""
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((a, b, rank) for a, b in local)
    merges.sort(key=lambda m: m[2])
    return [(a, b) for a, b, _ in merges]


def _bpe_backend(tok):
    """A ``tokenizers`` backend for a tiktoken vocabulary, built through the GGUF 'gpt2' description."""
    from .tokenizer import BPETokenizer

    return BPETokenizer.from_gguf_metadata(gguf_tokenizer_metadata(tok)).backend


def tiktoken_ranks_bytes(tok) -> bytes:
    """Meta's Llama 3 tokenizer.model: one ``base64(token) rank`` line per mergeable token."""
    ranks = tok.model._mergeable_ranks
    return b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def sentencepiece_model_bytes(tok) -> bytes:
    """A SentencePiece ``tokenizer.model`` for ``tok``: the original bytes when it was loaded from one,
    else a BPE ModelProto built from its pieces, scores and types (hand-encoded protobuf: the fields
    sentencepiece needs to encode and decode like Llama 2's tokenizer)."""
    if getattr(tok, "_sp", None) is not None:
        return tok._sp.serialized_model_proto()

    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1  # negative int32 ids (pad -1) are 10-byte two's complement varints
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def field(num: int, value: Any) -> bytes:
        if isinstance(value, bytes):
            return varint(num << 3 | 2) + varint(len(value)) + value
        if isinstance(value, float):
            return varint(num << 3 | 5) + struct.pack("<f", value)
        return varint(num << 3) + varint(int(value))

    pieces = b"".join(field(1, field(1, p.encode("utf-8")) + field(2, float(s)) + field(3, t))
                      for p, s, t in zip(tok.pieces, tok.scores, tok.types))

    def special(i: int | None) -> int:
        return -1 if i is None else i

    trainer = (field(3, 2)  # model_type: BPE
               + field(4, tok.vocab_size)
               + field(35, int(BYTE in tok.types))  # byte_fallback
               + field(40, special(tok.unk_id)) + field(41, special(tok.bos_id))
               + field(42, special(tok.eos_id)) + field(43, special(tok.pad_id)))
    normalizer = (field(1, b"identity") + field(3, int(tok.add_space_prefix))  # add_dummy_prefix
                  + field(4, 0)  # remove_extra_whitespaces: Llama keeps runs of spaces
                  + field(5, 1))  # escape_whitespaces: " " -> "▁"
    return pieces + field(2, trainer) + field(3, normalizer)


WRITERS: dict[str, Callable] = {"meta": write_meta, "hf": write_hf, "llama2c": write_llama2c, "gguf": write_gguf}


# ----------------------------------------------------------------------------------------------------------
# Command line (wired into ``llamarun`` by cli.py)


def run(args: argparse.Namespace) -> int:
    """Run ``llamarun convert`` from parsed arguments; returns the exit code."""
    out = convert(args.src, args.out, args.to, args.dtype, progress=not args.no_progress, force=args.force,
                  tokenizer_path=args.tokenizer, llama2c_version=args.llama2c_version)
    print(f"wrote {out}", file=sys.stderr)
    return 0
