"""llama2.c checkpoints: legacy v0 (run.c), v1 (header, float32) and v2 (Q8_0, runq.c)."""

from __future__ import annotations

import shutil
import struct

import pytest
import torch

from _ckpt_utils import (assert_load_fails_with_one_line, logits, random_weights, run_cli_in_process, run_cli_parallel, sample_tokens, tiny_args,
                         train_sentencepiece, write_llama2c, write_llama2c_tokenizer, write_meta)
from conftest import assert_one_line_error
from llamarun.errors import FormatError
from llamarun.formats import detect_format, load_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random weights written in every llama2.c version, tied and untied, with a tokenizer.bin beside them."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("llama2c")
    model = train_sentencepiece(root)
    write_llama2c_tokenizer(model, root / "tokenizer.bin")
    vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
    files = {}
    for tied in (False, True):
        args = tiny_args(vocab, tie_embeddings=tied)
        weights = random_weights(args, seed=3)
        for version in (0, 1, 2):
            files[version, tied] = write_llama2c(root / f"v{version}{'_tied' if tied else ''}.bin", args, weights, version)
    untied = tiny_args(vocab)
    meta = write_meta(root / "meta", untied, random_weights(untied, seed=3), tokenizer=model, dtype=torch.float32)
    return vocab, files, meta, root


def test_versions_agree_with_meta(setup):
    vocab, files, meta, _ = setup
    tokens = sample_tokens(vocab)
    ref = logits(load_checkpoint(meta), tokens)  # same float32 weights, Meta layout
    for version in (0, 1):
        ckpt = load_checkpoint(files[version, False])
        assert detect_format(files[version, False]) == "llama2c" and ckpt.format == "llama2c"
        assert not ckpt.args.tie_embeddings and ckpt.args.n_kv_heads == 2 and ckpt.args.max_seq_len == 64
        assert ckpt.args.rope_theta == 10000.0
        assert set(ckpt.tensor_types.values()) == {"F32"}
        assert torch.equal(logits(ckpt, tokens), ref), f"v{version}"


def test_tied_classifier(setup):
    vocab, files, _, _ = setup
    tokens = sample_tokens(vocab)
    v0, v1 = load_checkpoint(files[0, True]), load_checkpoint(files[1, True])
    assert v0.args.tie_embeddings and v1.args.tie_embeddings and "output.weight" not in v1.tensors
    assert torch.equal(logits(v0, tokens), logits(v1, tokens))


@pytest.mark.parametrize("tied", [False, True])
def test_v2_q8_within_quantization_error(setup, tied):
    vocab, files, _, _ = setup
    v1, v2 = load_checkpoint(files[1, tied]), load_checkpoint(files[2, tied])
    assert v2.tensor_types["layers.0.attention.wq.weight"] == "Q8_0"
    assert v2.tensor_types["layers.0.attention_norm.weight"] == "F32"
    for name in v1.tensors:
        a, b = v1.tensors[name], v2.tensors[name]
        # Symmetric int8: each value is off by at most half a step, step = max|group| / 127.
        bound = a.abs().reshape(-1, 32).amax(dim=1, keepdim=True) / 127 / 2 if a.dim() == 2 else 0
        assert ((a - b).reshape(-1, 32 if a.dim() == 2 else a.numel()).abs() <= bound + 1e-6).all(), name
    tokens = sample_tokens(vocab)
    a, b = logits(v2, tokens), logits(v1, tokens)
    # Rounding to int8 costs ~0.6% rms per Gaussian weight, compounding over the layers to ~2% here; a
    # misplaced tensor or scale would give errors of order 100%.
    assert (a - b).norm() / b.norm() < 0.05


def test_rope_theta_recovered_from_v0_table(setup, tmp_path):
    vocab, _, _, root = setup
    args = tiny_args(vocab, rope_theta=100000.0)
    path = write_llama2c(tmp_path / "theta.bin", args, random_weights(args), version=0)
    shutil.copy(root / "tokenizer.bin", tmp_path)
    assert load_checkpoint(path).args.rope_theta == 100000.0


def test_tokenizer(setup, tmp_path):
    vocab, files, _, root = setup
    ckpt = load_checkpoint(files[1, False])
    assert ckpt.tokenizer.vocab_size == vocab
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("the big lion", bos=False)) == "the big lion"
    lonely = tmp_path / "model.bin"
    shutil.copy(files[1, False], lonely)
    with pytest.raises(FormatError, match="no tokenizer.bin beside the model.*-z/--tokenizer"):
        load_checkpoint(lonely)
    assert load_checkpoint(lonely, tokenizer_path=root / "tokenizer.bin").tokenizer.vocab_size == vocab


def _bad_files(setup, root):
    _, files, _, tok_dir = setup
    shutil.copy(tok_dir / "tokenizer.bin", root)
    good = files[1, False].read_bytes()
    cases = []
    (root / "magic.bin").write_bytes(b"XXXX" + good[4:])
    cases.append((root / "magic.bin", "not a llama2.c checkpoint (bad magic"))
    (root / "truncated.bin").write_bytes(good[:-1000])
    cases.append((root / "truncated.bin", "truncated"))
    (root / "version.bin").write_bytes(good[:4] + struct.pack("<i", 7) + good[8:])
    cases.append((root / "version.bin", "version 7 is not supported"))
    (root / "header.bin").write_bytes(good[:20])
    cases.append((root / "header.bin", "truncated llama2.c checkpoint"))
    (root / "legacy_truncated.bin").write_bytes(files[0, False].read_bytes()[:-4])
    cases.append((root / "legacy_truncated.bin", "truncated: the version-0 header"))
    return cases


def test_bad_files_fail_with_one_line(setup, tmp_path, capsys):
    for path, needle in _bad_files(setup, tmp_path):
        assert_load_fails_with_one_line(path, needle, capsys)


def test_cli_info(setup, tmp_path, capsys):
    """`llamarun info` names the detected format; `python -m llamarun info` (a real process) rejects a
    file with a wrong magic with one line and exit code 2."""
    _, files, _, _ = setup
    ok = run_cli_in_process(["info", files[2, True]], capsys)
    assert ok.returncode == 0 and any(line.split()[:2] == ["format", "llama2c"] for line in ok.stdout.splitlines())
    magic = next(p for p, _ in _bad_files(setup, tmp_path) if p.name == "magic.bin")
    (bad,) = run_cli_parallel(["info", magic])
    assert_one_line_error(bad, 2, "bad magic")
