"""Meta's native checkpoints: params.json + consolidated.NN.pth shards, merged lazily."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _ckpt_utils import (assert_load_fails_with_one_line, logits, meta_params, random_weights, run_cli_in_process, run_cli_parallel, sample_tokens,
                         tiny_args, train_sentencepiece, write_meta)
from conftest import assert_one_line_error
from llamarun.errors import FormatError
from llamarun.formats import detect_format, load_checkpoint


class Evil:
    """Unpickling this would create ``marker``: what a malicious checkpoint does with a real payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def setup(spm_model, tmp_path_factory):
    """One set of random weights written as 1, 2 and 4 shards."""
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(spm_model)).vocab_size()
    args = tiny_args(vocab)
    weights = random_weights(args)
    root = tmp_path_factory.mktemp("meta")
    dirs = {n: write_meta(root / f"shards{n}", args, weights, n_shards=n, tokenizer=spm_model) for n in (1, 2, 4)}
    dirs["llama3"] = write_meta(root / "llama3", args, weights, n_shards=2, tokenizer=spm_model, vocab_parallel=True)
    return args, weights, dirs, root


def test_shard_counts_give_identical_logits(setup):
    """1, 2 and 4 shards (and Llama 3's vocabulary-split embedding) merge to the same model."""
    args, _, dirs, _ = setup
    tokens = sample_tokens(args.vocab_size)
    ref = None
    for n, d in dirs.items():
        assert detect_format(d) == "meta"
        ckpt = load_checkpoint(d)
        assert ckpt.format == "meta"
        assert ckpt.args.vocab_size == args.vocab_size  # params.json says -1: taken from the embedding
        assert (ckpt.args.dim, ckpt.args.n_kv_heads, ckpt.args.hidden_dim) == (64, 2, 96)
        assert "rope.freqs" not in ckpt.tensors
        assert set(ckpt.tensor_types.values()) == {"BF16"}
        out = logits(ckpt, tokens)
        if ref is None:
            ref = out
        else:
            assert torch.equal(out, ref), f"{n} shards differ from 1"
    assert ckpt.tokenizer.vocab_size == args.vocab_size
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("the big lion", bos=False)) == "the big lion"


def test_params_honoured(setup, tmp_path):
    """ffn_dim_multiplier, rope_theta, use_scaled_rope and an explicit vocab_size reach ModelArgs."""
    args, weights, dirs, _ = setup
    d = tmp_path / "m"
    shutil.copytree(dirs[1], d)
    params = meta_params(args, vocab_size=args.vocab_size)
    params.update(rope_theta=500000.0, use_scaled_rope=True, multiple_of=16, ffn_dim_multiplier=0.5625)
    (d / "params.json").write_text(json.dumps(params))
    ckpt = load_checkpoint(d)
    assert ckpt.args.hidden_dim == 96 and ckpt.args.rope_theta == 500000.0
    assert ckpt.args.rope_scaling["factor"] == 8.0


def test_tokenizer_locations(setup, spm_model, tmp_path):
    args, weights, _, _ = setup
    # Meta's download layout: tokenizer.model beside the model folders.
    d = write_meta(tmp_path / "llama-2-7b", args, weights)
    shutil.copy(spm_model, tmp_path / "tokenizer.model")
    assert load_checkpoint(d).tokenizer.vocab_size == args.vocab_size
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(FormatError, match="no tokenizer.model.*-z/--tokenizer"):
        load_checkpoint(d)
    assert load_checkpoint(d, tokenizer_path=spm_model).tokenizer.vocab_size == args.vocab_size


def _bad_checkpoints(setup, spm_model, root):
    """(directory, text the error must contain) for each kind of broken Meta checkpoint."""
    args, weights, dirs, _ = setup
    cases = []

    def variant(name: str, src: Path) -> Path:  # a copy of a good checkpoint, to break
        shutil.copytree(src, root / name)
        return root / name

    d = variant("params_disagree", dirs[1])
    (d / "params.json").write_text(json.dumps({**meta_params(args), "dim": 128, "n_heads": 8}))
    cases.append((d, "params.json disagrees with the weights"))

    d = variant("gap", dirs[4])
    (d / "consolidated.01.pth").unlink()
    cases.append((d, "consolidated.01.pth is missing"))

    d = variant("last_missing", dirs[2])
    (d / "consolidated.01.pth").unlink()
    cases.append((d, "is a consolidated.NN.pth missing?"))

    d = variant("no_tokenizer", dirs[1])
    (d / "tokenizer.model").unlink()
    cases.append((d, "no tokenizer.model"))

    d = variant("bad_json", dirs[1])
    (d / "params.json").write_text("{'dim': 64,")
    cases.append((d, "params.json: unreadable"))

    d = variant("missing_key", dirs[1])
    (d / "params.json").write_text(json.dumps({"dim": 64}))
    cases.append((d, "params.json: missing or invalid hyper-parameter"))

    if args.n_layers > 1:  # weights for more layers than params.json says: the extra ones were ignored
        d = variant("fewer_layers", dirs[1])
        (d / "params.json").write_text(json.dumps({**meta_params(args), "n_layers": args.n_layers - 1}))
        cases.append((d, f"the weights hold layer {args.n_layers - 1} but the config says {args.n_layers - 1} layers"))

    d = root / "evil"
    d.mkdir()
    shutil.copy(dirs[1] / "params.json", d)
    shutil.copy(spm_model, d)
    marker = root / "pwned"
    torch.save({"tok_embeddings.weight": Evil(marker)}, d / "consolidated.00.pth")
    cases.append((d, "refused to load"))
    return cases, marker


def test_bad_checkpoints_fail_with_one_line(setup, spm_model, tmp_path, capsys):
    cases, marker = _bad_checkpoints(setup, spm_model, tmp_path)
    for d, needle in cases:
        assert_load_fails_with_one_line(d, needle, capsys)
    assert not marker.exists(), "the malicious pickle ran"


def test_cli_info(setup, spm_model, tmp_path, capsys):
    """`llamarun info` names the detected format; `python -m llamarun info` (a real process) refuses a
    malicious pickle with one line and exit code 2."""
    _, _, dirs, _ = setup
    ok = run_cli_in_process(["info", dirs[2]], capsys)
    assert ok.returncode == 0 and any(line.split()[:2] == ["format", "meta"] for line in ok.stdout.splitlines())
    cases, marker = _bad_checkpoints(setup, spm_model, tmp_path)
    (bad,) = run_cli_parallel(["info", next(d for d, _ in cases if d.name == "evil")])
    assert_one_line_error(bad, 2, "refused to load")
    assert not marker.exists()
