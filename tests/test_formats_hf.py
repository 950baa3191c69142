"""Hugging Face checkpoints: config.json + safetensors (single, sharded) or pytorch_model.bin."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from _ckpt_utils import (assert_load_fails_with_one_line, default_model_path, hf_state_dict, logits, random_weights, run_cli_in_process,
                         run_cli_parallel, sample_tokens, tiny_args, train_sentencepiece, write_hf, write_meta)
from conftest import assert_one_line_error
from llamarun.errors import FormatError
from llamarun.formats import detect_format, load_checkpoint
from llamarun.formats.hf import permute_qk, unpermute_qk


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def smollm_tokenizer_json(tmp_path_factory):
    """SmolLM2's real vocabulary as an HF tokenizer.json (+ tokenizer_config.json), from the GGUF."""
    from llamarun.convert import write_hf_tokenizer

    ckpt = load_checkpoint(default_model_path())
    d = tmp_path_factory.mktemp("smol_tok")
    write_hf_tokenizer(ckpt.tokenizer, ckpt.args, d)
    (d / "generation_config.json").unlink()
    return d


@pytest.fixture(scope="module")
def open_llama_style(spm_model, tmp_path_factory):
    """Untied, MHA, SentencePiece tokenizer.model, sharded bf16 safetensors; and the same weights as Meta."""
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(spm_model)).vocab_size()
    args = tiny_args(vocab, n_kv_heads=4)
    weights = {k: v.to(torch.bfloat16).float() for k, v in random_weights(args, seed=1).items()}
    root = tmp_path_factory.mktemp("hf")
    hf = write_hf(root / "open_llama", args, weights, n_shards=3, tokenizer=spm_model)
    meta = write_meta(root / "meta", args, weights, tokenizer=spm_model)
    return args, weights, hf, meta


def test_permutation_round_trip():
    w = torch.randn(8 * 16, 32)
    assert torch.equal(unpermute_qk(permute_qk(w, 8), 8), w)
    assert not torch.equal(permute_qk(w, 8), w)


def test_sharded_safetensors_match_meta(open_llama_style):
    """Same weights, HF layout vs Meta layout: equal logits proves the q/k permutation is undone."""
    args, _, hf, meta = open_llama_style
    assert detect_format(hf) == "hf"
    ckpt = load_checkpoint(hf)
    assert ckpt.format == "hf" and not ckpt.args.tie_embeddings
    assert set(ckpt.tensor_types.values()) == {"BF16"}
    assert type(ckpt.tokenizer).__name__ == "SentencePieceTokenizer"
    tokens = sample_tokens(args.vocab_size)
    assert torch.equal(logits(ckpt, tokens), logits(load_checkpoint(meta), tokens))


def test_pytorch_model_bin_and_generation_config(open_llama_style, tmp_path):
    args, weights, hf, meta = open_llama_style
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(hf / "config.json", d)
    shutil.copy(hf / "tokenizer.model", d)
    torch.save({k: v.to(torch.bfloat16) for k, v in hf_state_dict(args, weights).items()}, d / "pytorch_model.bin")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    ckpt = load_checkpoint(d)
    assert {2, 7} <= ckpt.tokenizer.stop_ids
    tokens = sample_tokens(args.vocab_size)
    assert torch.equal(logits(ckpt, tokens), logits(load_checkpoint(meta), tokens))


def test_smollm2_style_tied_gqa_tokenizer_json(smollm_tokenizer_json, tmp_path):
    """Tied embeddings (no lm_head), GQA, float32 single-file safetensors, tokenizer.json."""
    from llamarun.tokenizer import BPETokenizer

    args = tiny_args(49152, tie_embeddings=True, n_heads=4, n_kv_heads=1, rope_theta=100000.0)
    weights = random_weights(args, seed=2)
    d = write_hf(tmp_path / "smol", args, weights, n_shards=1, dtype=torch.float32)
    for f in smollm_tokenizer_json.iterdir():
        shutil.copy(f, d)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    ckpt = load_checkpoint(d)
    assert ckpt.args.tie_embeddings and ckpt.args.rope_theta == 100000.0 and ckpt.args.n_kv_heads == 1
    assert "output.weight" not in ckpt.tensors
    assert isinstance(ckpt.tokenizer, BPETokenizer) and 2 in ckpt.tokenizer.stop_ids
    assert ckpt.tokenizer.encode("<|im_start|>user", bos=False)[0] == 1

    # The same weights in Meta layout (untied copy of the embedding) give the same logits.
    meta_args = tiny_args(49152, n_heads=4, n_kv_heads=1, rope_theta=100000.0)
    m = write_meta(tmp_path / "meta", meta_args, {**weights, "output.weight": weights["tok_embeddings.weight"]},
                   dtype=torch.float32)
    params = json.loads((m / "params.json").read_text())
    (m / "params.json").write_text(json.dumps({**params, "rope_theta": 100000.0}))
    tokens = sample_tokens(49152)
    meta_ckpt = load_checkpoint(m, tokenizer_path=smollm_tokenizer_json / "tokenizer.json")
    torch.testing.assert_close(logits(ckpt, tokens), logits(meta_ckpt, tokens), rtol=0, atol=1e-5)


def test_mistral_without_sliding_window_is_llama(open_llama_style, tmp_path):
    args, _, hf, _ = open_llama_style
    d = tmp_path / "mistral"
    shutil.copytree(hf, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"],
                                               "model_type": "mistral", "sliding_window": None}))
    assert load_checkpoint(d).args.dim == args.dim
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"],
                                               "model_type": "mistral", "sliding_window": 16}))
    with pytest.raises(FormatError, match="MistralForCausalLM with a sliding attention window"):
        load_checkpoint(d)


def _bad_checkpoints(open_llama_style, root):
    _, _, hf, _ = open_llama_style
    cfg = json.loads((hf / "config.json").read_text())
    cases = []

    def variant(name: str):
        d = root / name
        shutil.copytree(hf, d)
        return d

    d = variant("gpt2")
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    cases.append((d, "architecture 'GPT2LMHeadModel' is not supported"))

    d = variant("missing_shard")
    next(d.glob("model-00002-of-*.safetensors")).unlink()
    cases.append((d, "model-00002-of-00003.safetensors: weight shard listed in the index is missing"))

    d = variant("wrong_shape")
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    cases.append((d, "config.json disagrees with the weights"))

    d = variant("no_tokenizer")
    (d / "tokenizer.model").unlink()
    cases.append((d, "no tokenizer.json or tokenizer.model"))

    d = variant("truncated")
    f = next(d.glob("model-00001-of-*.safetensors"))
    f.write_bytes(f.read_bytes()[:200])
    cases.append((d, "not a readable safetensors file"))

    d = variant("bias")
    (d / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    cases.append((d, "biases are not supported"))
    return cases


def test_bad_checkpoints_fail_with_one_line(open_llama_style, tmp_path, capsys):
    for d, needle in _bad_checkpoints(open_llama_style, tmp_path):
        assert_load_fails_with_one_line(d, needle, capsys)


def test_cli_info(open_llama_style, tmp_path, capsys):
    """`llamarun info` names the detected format; `python -m llamarun info` (a real process) rejects a
    GPT-2 config with one line and exit code 2."""
    _, _, hf, _ = open_llama_style
    ok = run_cli_in_process(["info", hf], capsys)
    assert ok.returncode == 0 and any(line.split()[:2] == ["format", "hf"] for line in ok.stdout.splitlines())
    gpt2 = next(d for d, _ in _bad_checkpoints(open_llama_style, tmp_path) if d.name == "gpt2")
    (bad,) = run_cli_parallel(["info", gpt2])
    assert_one_line_error(bad, 2, "GPT2LMHeadModel")
