"""Meta's native checkpoints: ``params.json`` plus ``consolidated.NN.pth`` model-parallel shards.

Meta's reference code splits every matrix across N shards (one per GPU of the model-parallel group) and
replicates the norms. Merging them back follows the layers' kinds of parallelism:

* ColumnParallelLinear (wq, wk, wv, w1, w3, output) split their output rows: concatenate on dim 0;
* RowParallelLinear (wo, w2) split their input columns: concatenate on dim 1;
* the embedding: Llama 2's ParallelEmbedding splits the embedding dim (dim 1), Llama 3's
  VocabParallelEmbedding the vocabulary (dim 0); the shapes tell which;
* RMSNorm weights are replicated (shard 0 is used); ``rope.freqs`` (Llama 1) is recomputed, so ignored.

Shards are opened with ``torch.load(weights_only=True, mmap=True)``: nothing is read until a tensor is
asked for, and a pickle that tries to run code is refused. Each merged tensor is built on access, so a
model is filled with roughly one tensor's worth of extra memory.

This module also holds what every format shares about Meta's names: :func:`tensor_shapes`.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..config import ModelArgs
from ..errors import FormatError
from . import Checkpoint, LazyTensors

SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")

# Per-layer Meta names, in the order Meta's model defines them.
LAYER_TENSORS = (
    "attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
    "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
    "feed_forward.w3.weight",
)

# Storage type names (as ``Checkpoint.tensor_types`` reports them) of the float dtypes.
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def tensor_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a model with these hyper-parameters needs, by Meta name, with its shape.

    ``output.weight`` is listed even for tied embeddings (it then equals ``tok_embeddings.weight``).
    """
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    per_layer = {
        "attention_norm.weight": (args.dim,),
        "attention.wq.weight": (q_dim, args.dim),
        "attention.wk.weight": (kv_dim, args.dim),
        "attention.wv.weight": (kv_dim, args.dim),
        "attention.wo.weight": (args.dim, q_dim),
        "ffn_norm.weight": (args.dim,),
        "feed_forward.w1.weight": (args.hidden_dim, args.dim),
        "feed_forward.w2.weight": (args.dim, args.hidden_dim),
        "feed_forward.w3.weight": (args.hidden_dim, args.dim),
    }
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
    shapes["norm.weight"] = (args.dim,)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def check_tensors(path: Path, args: ModelArgs, shapes: Mapping[str, tuple[int, ...]], config_name: str) -> None:
    """Fail with one line naming the first tensor that is missing or disagrees with the config."""
    for name, expected in tensor_shapes(args).items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        if name not in shapes:
            raise FormatError(f"{path}: missing tensor {name}")
        if tuple(shapes[name]) != expected:
            raise FormatError(f"{path}: {config_name} disagrees with the weights: {name} has shape "
                              f"{tuple(shapes[name])}, {config_name} implies {expected}")


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d dict of tensors, memory-mapped, refusing any pickle that would run code.

    ``weights_only=True`` makes torch's unpickler accept only tensors and plain containers; a file that
    asks for anything else (``os.system``, ``builtins.exec``...) raises instead of executing it.
    """
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zipfile" not in str(e) and "mmap" not in str(e):
                raise
            # Files from torch < 1.6 (not zip archives) cannot be mapped: read them, still weights-only.
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        raise FormatError(f"{path}: refused to load: the file's pickle wants to run code, not just store tensors"
                          + (f" ({detail})" if detail else "")) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise FormatError(f"{path}: expected a dict of tensors (a model state_dict)")
    return data


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a config file, with one-line errors."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def find_shards(directory: Path) -> list[Path]:
    """``consolidated.00.pth`` .. ``consolidated.NN.pth``, checked to be numbered without gaps."""
    found = {}
    for p in directory.iterdir():
        m = SHARD_RE.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise FormatError(f"{directory}: no consolidated.NN.pth weight files next to params.json")
    for i in range(max(found) + 1):
        if i not in found:
            raise FormatError(f"{directory}: shard consolidated.{i:02d}.pth is missing "
                              f"(found {len(found)} shards numbered up to {max(found):02d})")
    return [found[i] for i in range(len(found))]


def _split_dim(name: str, shard_shape: tuple[int, ...], dim: int) -> int | None:
    """The dim along which Meta's model-parallel code split ``name`` across shards (None: replicated)."""
    if len(shard_shape) == 1:
        return None  # norms (and rope.freqs)
    if name == "tok_embeddings.weight":
        return 1 if shard_shape[1] != dim else 0  # Llama 2 splits the embedding dim, Llama 3 the vocabulary
    return 1 if name.endswith((".wo.weight", ".w2.weight")) else 0


def merge_shards(shards: list[dict[str, torch.Tensor]], files: list[Path], dim: int
                 ) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, tuple[int, ...]], dict[str, str]]:
    """Lazy loaders, merged shapes and storage types of the tensors spread over ``shards``."""
    loaders, shapes, types = {}, {}, {}
    for name, first in shards[0].items():
        if name == "rope.freqs":
            continue
        parts = []
        for shard, file in zip(shards, files):
            if name not in shard:
                raise FormatError(f"{file}: lacks tensor {name} (which {files[0].name} has)")
            parts.append(shard[name])
        axis = _split_dim(name, tuple(first.shape), dim) if len(parts) > 1 else None
        shape = list(first.shape)
        if axis is not None:
            for part, file in zip(parts[1:], files[1:]):
                other = [s for i, s in enumerate(part.shape) if i != axis]
                if part.dim() != first.dim() or other != [s for i, s in enumerate(first.shape) if i != axis]:
                    raise FormatError(f"{file}: tensor {name} has shape {tuple(part.shape)}, which does not "
                                      f"fit {files[0].name}'s {tuple(first.shape)}")
            shape[axis] = sum(p.shape[axis] for p in parts)
            loaders[name] = lambda parts=parts, axis=axis: torch.cat(parts, dim=axis)
        else:
            loaders[name] = lambda t=first: t
        shapes[name] = tuple(shape)
        types[name] = DTYPE_NAMES.get(first.dtype, str(first.dtype).removeprefix("torch.").upper())
    return loaders, shapes, types


def find_tokenizer(tokenizer_path: str | Path | None, candidates: list[Path], missing: str) -> Path:
    """The tokenizer file to use: ``tokenizer_path`` when given, else the first candidate that exists.

    ``missing`` is the error message (without the hint) when neither is there.
    """
    if tokenizer_path is not None:
        p = Path(tokenizer_path)
        if not p.exists():
            raise FormatError(f"{p}: no such tokenizer file")
        return p
    for p in candidates:
        if p.is_file():
            return p
    raise FormatError(f"{missing}; pass -z/--tokenizer PATH")


def load_tokenizer(path: Path):
    """Load a tokenizer file with any of llamarun's readers, naming the file in errors."""
    from ..tokenizer import load_tokenizer_file

    try:
        return load_tokenizer_file(path)
    except FormatError as e:
        raise FormatError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def load(path: str | Path, tokenizer_path: str | Path | None = None) -> Checkpoint:
    """Open a Meta checkpoint directory: merged lazy tensors, ModelArgs from params.json, its tokenizer."""
    directory = Path(path)
    params_file = directory / "params.json"
    params = read_json(params_file)
    files = find_shards(directory)
    shards = [load_torch_file(f) for f in files]
    try:
        dim = int(params["dim"])
        loaders, shapes, types = merge_shards(shards, files, dim)
        overrides: dict[str, Any] = {}
        if int(params.get("vocab_size", -1)) <= 0:  # Llama 1/2 write -1: the tokenizer decides
            if "tok_embeddings.weight" not in shapes:
                raise FormatError(f"{directory}: missing tensor tok_embeddings.weight")
            overrides["vocab_size"] = shapes["tok_embeddings.weight"][0]
        if "output.weight" not in shapes:
            overrides["tie_embeddings"] = True
        args = ModelArgs.from_meta_params(params, **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{params_file}: missing or invalid hyper-parameter ({type(e).__name__}: {e})") from None
    except FormatError as e:
        raise FormatError(str(e) if str(directory) in str(e) else f"{params_file}: {e}") from None
    try:
        check_tensors(directory, args, shapes, "params.json")
    except FormatError as e:
        raise FormatError(f"{e}{_missing_shard_hint(args, shapes, len(files))}") from None

    # Meta's downloads keep tokenizer.model beside the model folders (llama-2-7b/, ...); a converted
    # checkpoint may carry an HF tokenizer.json instead (llamarun convert writes one for BPE vocabularies).
    tok_file = find_tokenizer(tokenizer_path, [directory / "tokenizer.model", directory / "tokenizer.json",
                                               directory.resolve().parent / "tokenizer.model"],
                              f"{directory}: no tokenizer.model in the checkpoint directory or its parent")
    tokenizer = load_tokenizer(tok_file)
    return Checkpoint(args=args, tensors=LazyTensors(loaders), tokenizer=tokenizer, format="meta",
                      path=directory, tensor_types=types)


def _missing_shard_hint(args: ModelArgs, shapes: Mapping[str, tuple[int, ...]], n_files: int) -> str:
    """When wq has a whole fraction of the rows params.json implies, say that shards are missing."""
    name = "layers.0.attention.wq.weight"
    expected, got = tensor_shapes(args)[name], shapes.get(name)
    if got and len(got) == 2 and got[1] == expected[1] and got[0] < expected[0] and expected[0] % got[0] == 0:
        return (f" ({n_files} shard(s) present, the shapes imply {n_files * expected[0] // got[0]}: "
                "is a consolidated.NN.pth missing?)")
    return ""
