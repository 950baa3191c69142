"""Hugging Face checkpoints: ``config.json`` + safetensors (single or sharded) or ``pytorch_model.bin``.

Two things differ from Meta's checkpoints besides the names:

* HF's LLaMA rotates the two *halves* of each head (``rotate_half``) where Meta rotates adjacent
  *pairs*, so ``convert_llama_weights_to_hf.py`` permuted the rows of wq and wk. :func:`unpermute_qk`
  undoes that (and :func:`permute_qk` redoes it when writing), the only place the layouts meet.
* The output layer may be tied to the embedding (``tie_word_embeddings``, or simply no ``lm_head``).

Safetensors are memory-mapped and read one tensor at a time; ``pytorch_model.bin`` goes through the
same weights-only, memory-mapped ``torch.load`` as Meta's shards.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelArgs
from ..errors import FormatError
from . import Checkpoint, LazyTensors, to_meta_name
from .meta import DTYPE_NAMES, check_tensors, find_tokenizer, load_tokenizer, load_torch_file, read_json

# Architectures that are LLaMA under another name. Mistral is LLaMA plus a sliding attention window, so
# it is accepted only when the window is off or no shorter than the context (then the two coincide).
LLAMA_ARCHITECTURES = {"LlamaForCausalLM", "LLaMAForCausalLM"}
MISTRAL_ARCHITECTURES = {"MistralForCausalLM"}

# HF name -> Meta name; per-layer names are matched below.
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_META_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def hf_to_meta_name(name: str) -> str | None:
    """Map an HF tensor name to Meta's, or None for tensors the model has no use for (rotary caches...)."""
    return to_meta_name(name, _GLOBAL_NAMES, _LAYER_RE, LAYER_NAMES)


def meta_to_hf_name(name: str) -> str:
    """The inverse of :func:`hf_to_meta_name`."""
    for hf, meta in _GLOBAL_NAMES.items():
        if name == meta:
            return hf
    m = _META_LAYER_RE.fullmatch(name)
    if m:
        for hf, meta in LAYER_NAMES.items():
            if m.group(2) == meta:
                return f"model.layers.{m.group(1)}.{hf}"
    raise KeyError(name)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary layout -> HF's half-split layout (``convert_llama_weights_to_hf.py``).

    Within each head, rows (0, 1), (2, 3)... are rotation pairs for Meta; HF wants row i paired with
    row i + head_dim/2. For wk pass the number of key/value heads.
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split rotary layout -> Meta's interleaved one: the inverse of :func:`permute_qk`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def read_config(directory: Path) -> tuple[dict[str, Any], ModelArgs]:
    """config.json, checked to describe a LLaMA-architecture model, and the ModelArgs it gives."""
    path = directory / "config.json"
    cfg = read_json(path)
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    arch = archs[0] if archs else model_type
    if set(archs) & MISTRAL_ARCHITECTURES or (not archs and model_type == "mistral"):
        window = cfg.get("sliding_window")
        if window is not None and int(window) < int(cfg.get("max_position_embeddings", 0) or 0):
            raise FormatError(f"{path}: {arch} with a sliding attention window ({window} tokens) is not "
                              "supported (only LLaMA-architecture models)")
    elif not (set(archs) & LLAMA_ARCHITECTURES or (not archs and model_type == "llama")):
        raise FormatError(f"{path}: architecture {arch!r} is not supported (only LlamaForCausalLM-style models)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise FormatError(f"{path}: attention/MLP biases are not supported (LLaMA has none)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise FormatError(f"{path}: activation {cfg['hidden_act']!r} is not supported (LLaMA uses silu)")
    try:
        args = ModelArgs.from_hf_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: missing or invalid hyper-parameter ({type(e).__name__}: {e})") from None
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    return cfg, args


def _open_weights(directory: Path) -> dict[str, tuple[Path, Callable[[], torch.Tensor], torch.dtype, tuple[int, ...]]]:
    """HF name -> (file, loader, dtype, shape) over whichever weight files the directory has."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "torch")):
        index_file = directory / index_name
        if index_file.is_file():
            weight_map = read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise FormatError(f"{index_file}: has no weight_map")
            files = sorted(set(weight_map.values()))
            break
    else:
        if (directory / "model.safetensors").is_file():
            kind, files, weight_map = "safetensors", ["model.safetensors"], None
        elif (directory / "pytorch_model.bin").is_file():
            kind, files, weight_map = "torch", ["pytorch_model.bin"], None
        else:
            raise FormatError(f"{directory}: no model.safetensors(.index.json) or pytorch_model.bin weights")

    found: dict[str, Any] = {}
    for name in files:
        file = directory / name
        if not file.is_file():
            raise FormatError(f"{file}: weight shard listed in the index is missing")
        found.update(_open_safetensors(file) if kind == "safetensors" else _open_torch(file))
    for name, file in (weight_map or {}).items():
        if name not in found:
            raise FormatError(f"{directory / file}: lacks tensor {name}, which the index places there")
    return found


def _open_safetensors(file: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt")
        names = list(handle.keys())
        slices = {n: handle.get_slice(n) for n in names}
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers, truncation...
        raise FormatError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    out = {}
    for n in names:
        s = slices[n]
        dtype = dtypes.get(s.get_dtype())
        if dtype is None:
            raise FormatError(f"{file}: tensor {n} has unsupported dtype {s.get_dtype()}")
        out[n] = (file, lambda n=n: handle.get_tensor(n), dtype, tuple(s.get_shape()))
    return out


def _open_torch(file: Path) -> dict[str, tuple]:
    state = load_torch_file(file)
    return {n: (file, lambda t=t: t, t.dtype, tuple(t.shape)) for n, t in state.items()}


def load(path: str | Path, tokenizer_path: str | Path | None = None) -> Checkpoint:
    """Open a Hugging Face LLaMA directory: lazy Meta-named tensors (q/k un-permuted), args, tokenizer."""
    directory = Path(path)
    cfg, args = read_config(directory)
    weights = _open_weights(directory)

    loaders, shapes, types = {}, {}, {}
    for hf_name, (file, get, dtype, shape) in weights.items():
        if hf_name.endswith(".bias"):
            raise FormatError(f"{file}: has bias tensor {hf_name}; LLaMA layers have no biases")
        name = hf_to_meta_name(hf_name)
        if name is None:
            continue
        if name.endswith("attention.wq.weight"):
            get = lambda get=get: unpermute_qk(get(), args.n_heads)
        elif name.endswith("attention.wk.weight"):
            get = lambda get=get: unpermute_qk(get(), args.n_kv_heads)
        loaders[name], shapes[name], types[name] = get, shape, DTYPE_NAMES[dtype]
    if "output.weight" not in loaders:  # HF drops lm_head when it is tied (or the config says so)
        args.tie_embeddings = True
    check_tensors(directory, args, shapes, "config.json")

    tok_file = find_tokenizer(tokenizer_path, [directory / "tokenizer.json", directory / "tokenizer.model"],
                              f"{directory}: no tokenizer.json or tokenizer.model")
    tokenizer = load_tokenizer(tok_file)
    add_generation_config(tokenizer, directory)
    return Checkpoint(args=args, tensors=LazyTensors(loaders), tokenizer=tokenizer, format="hf",
                      path=directory, tensor_types=types)


def add_generation_config(tokenizer, directory: Path) -> None:
    """Take extra stop ids (``eos_token_id``: an int or a list) from generation_config.json, and the chat
    template from tokenizer_config.json when the tokenizer file itself had none."""
    gen_file = directory / "generation_config.json"
    if gen_file.is_file():
        eos = read_json(gen_file).get("eos_token_id")
        ids = {i for i in (eos if isinstance(eos, list) else [eos])
               if isinstance(i, int) and 0 <= i < tokenizer.vocab_size}
        tokenizer.stop_ids = frozenset(tokenizer.stop_ids | ids)
    cfg_file = directory / "tokenizer_config.json"
    if tokenizer.chat_template is None and cfg_file.is_file():
        template = read_json(cfg_file).get("chat_template")
        if isinstance(template, str):
            tokenizer.chat_template = template
