"""``llamarun convert``: every target format, checked by loading the result back.

The real default model (SmolLM2-135M, Q4_1 GGUF) goes to GGUF F32, Meta, HF and llama2.c v1 once per
module; each must reproduce the GGUF path's logits (1e-4) and greedy continuations. Tiny random models
cover the rest: dtypes, llama2.c versions, tokenizers, transformers as an independent reader of the HF
output, interrupted conversions and --force.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat

import pytest
import torch

from _ckpt_utils import (SHARED_TOKENIZERS, default_model_path, logits, random_weights, sample_tokens, tiny_args,
                         train_sentencepiece, write_meta)
from conftest import PROMPTS
from llamarun import convert as convert_mod
from llamarun.convert import convert
from llamarun.errors import RuntimeFailure, UsageError
from llamarun.formats import load_checkpoint
from llamarun.formats.gguf import open_reader, read_metadata


# ---- the real default model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """SmolLM2 converted to each format. The Q4_1 source is dequantized once, into a float32 GGUF; the
    other formats are converted from that (float32 to float32 is exact, and saves dequantizing 4 times)."""
    root = tmp_path_factory.mktemp("smollm2")
    src = default_model_path()
    out = {"gguf": convert(src, root / "f32.gguf", "gguf", "float32", progress=False)}
    out["meta"] = convert(out["gguf"], root / "meta", "meta", progress=False)
    out["hf"] = convert(out["gguf"], root / "hf", "hf", progress=False)
    out["llama2c"] = convert(out["gguf"], root / "model.bin", "llama2c", progress=False, llama2c_version=1)
    return out


def _load_float(path, tokenizer_path=None):
    """Llama.load in float32 on the CPU, weights dequantized: the numbers a float conversion holds.

    (With ``quantize="auto"`` a Q4 GGUF keeps 4-bit kernels, whose results a float file cannot match.)
    """
    import inspect

    from llamarun import Llama

    extra = {"quantize": "none"} if "quantize" in inspect.signature(Llama.load).parameters else {}
    return Llama.load(path, device="cpu", dtype="float32", tokenizer_path=tokenizer_path, **extra)


@pytest.fixture(scope="module")
def reference():
    """The original GGUF: the five prompts' tokens, their greedy continuations and logits."""
    llm = _load_float(default_model_path())
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    continuations, _ = llm.generate(prompts, max_gen_len=16, temperature=0, ignore_eos=True)
    return llm, prompts, continuations, _logits(llm, prompts, continuations)


def _logits(llm, prompts, continuations):
    """Logits at every position of each prompt + continuation, from one batched forward pass.

    Rows are right-padded: with causal attention, padding after a row's last token cannot change the
    logits before it, so each row's valid positions are exact.
    """
    rows = [p + c for p, c in zip(prompts, continuations)]
    width = max(map(len, rows))
    batch = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    llm.model.free_cache()  # without a cache, a call attends to exactly the tokens it is given
    with torch.inference_mode():
        out = llm.model(batch)
    return [out[i, : len(r)] for i, r in enumerate(rows)]


@pytest.mark.parametrize("fmt", ["gguf", "meta", "hf", "llama2c"])
def test_real_model_round_trip(fmt, converted, reference):
    """Logits within 1e-4 of the GGUF path at every position, and the same greedy continuation: at each
    of the 16 generated positions the converted model's argmax is the reference's next token (so greedy
    decoding cannot diverge); for the Meta copy, Llama.generate is also run end to end."""
    llm, prompts, continuations, ref_logits = reference
    # llama2.c's tokenizer.bin cannot hold SmolLM2's byte-level BPE: take the tokenizer from the GGUF.
    other = _load_float(converted[fmt], default_model_path() if fmt == "llama2c" else None)
    assert other.checkpoint.format == fmt
    if fmt != "llama2c":
        assert [other.tokenizer.encode(p) for p in PROMPTS] == prompts
        assert other.tokenizer.stop_ids >= llm.tokenizer.stop_ids
        assert other.tokenizer.chat_template == llm.tokenizer.chat_template
    for p, c, got, ref in zip(prompts, continuations, _logits(other, prompts, continuations), ref_logits):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
        assert got[len(p) - 1 : -1].argmax(dim=-1).tolist() == c
    if fmt == "meta":
        got, _ = other.generate(prompts, max_gen_len=16, temperature=0, ignore_eos=True)
        assert got == continuations


def test_gguf_source_tokenizer_metadata_copied(converted):
    src = read_metadata(open_reader(default_model_path()))
    out = read_metadata(open_reader(converted["gguf"]))
    keys = [k for k in src if k.startswith("tokenizer.")]
    assert keys and all(out[k] == src[k] for k in keys)
    assert out["general.file_type"] == 0 and out["llama.rope.freq_base"] == src["llama.rope.freq_base"]


def test_real_model_outputs(converted):
    meta = json.loads((converted["meta"] / "params.json").read_text())
    assert meta == {"dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "vocab_size": 49152,
                    "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": pytest.approx(1e-5),
                    "rope_theta": 100000.0}
    hf = json.loads((converted["hf"] / "config.json").read_text())
    assert hf["tie_word_embeddings"] and hf["architectures"] == ["LlamaForCausalLM"]
    assert (converted["hf"] / "tokenizer.json").is_file()
    assert not (converted["llama2c"].parent / "tokenizer.bin").exists()  # BPE: none written (with a warning)


# ---- tiny models ---------------------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    """The usual umask while the test runs, so that the modes outputs get are known (0644 for a file)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """``ulimit -f``: writes past ``nbytes`` fail with EFBIG (SIGXFSZ ignored, as a shell's trap '' does)."""
    resource = pytest.importorskip("resource")
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float32 Meta checkpoint with a SentencePiece tokenizer (tied output, to exercise untying)."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tiny")
    model = train_sentencepiece(root)
    vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
    args = tiny_args(vocab)
    weights = random_weights(args, seed=4)
    src = write_meta(root / "src", args, weights, tokenizer=model, dtype=torch.float32)
    return src, vocab, root


@pytest.mark.parametrize("to,dtype,version,atol", [
    ("meta", None, None, 0), ("meta", "bfloat16", None, 0.05), ("hf", None, None, 0), ("hf", "float16", None, 0.01),
    ("llama2c", None, 0, 0), ("llama2c", None, 1, 0), ("llama2c", "q8_0", None, 0.15),
    ("gguf", None, None, 0), ("gguf", "float16", None, 0.01), ("gguf", "bfloat16", None, 0.05), ("gguf", "q8_0", None, 0.15),
])
def test_tiny_targets(tiny, tmp_path, umask_022, to, dtype, version, atol):
    src, vocab, _ = tiny
    name = {"meta": "out", "hf": "out", "llama2c": "out.bin", "gguf": "out.gguf"}[to]
    out = convert(src, tmp_path / name, to, dtype, progress=False, llama2c_version=version)
    ckpt = load_checkpoint(out)
    assert ckpt.format == to
    tokens = sample_tokens(vocab)
    ref = logits(load_checkpoint(src), tokens)
    torch.testing.assert_close(logits(ckpt, tokens), ref, rtol=0, atol=atol)
    text = "the big lion is blue"
    assert ckpt.tokenizer.encode(text) == load_checkpoint(src).tokenizer.encode(text)
    if to == "llama2c":
        assert ckpt.args.extra["llama2c_version"] == (2 if dtype == "q8_0" else version)
        assert (tmp_path / "tokenizer.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no leftovers
    # Every output gets a new file's usual mode (safetensors alone would write model.safetensors 0600).
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in tmp_path.rglob("*") if f.is_file()}
    assert set(modes.values()) == {"0o644"}, modes


def test_hf_output_matches_transformers(tiny, tmp_path):
    """transformers reads the HF output independently: same logits proves the q/k permutation."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    src, vocab, _ = tiny
    out = convert(src, tmp_path / "hf", "hf", progress=False)
    model = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = sample_tokens(vocab)
    with torch.inference_mode():
        theirs = model(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(logits(load_checkpoint(src), tokens), theirs, rtol=0, atol=1e-4)


def test_sentencepiece_model_rebuilt_from_tokenizer_bin(tmp_path):
    """Llama 2's tokenizer.bin has no protobuf; the tokenizer.model written from it encodes like Meta's."""
    if not (SHARED_TOKENIZERS / "tokenizer.bin").is_file():
        pytest.skip(f"Llama 2 tokenizer files not found in {SHARED_TOKENIZERS}")
    import sentencepiece as spm

    from llamarun.convert import sentencepiece_model_bytes
    from llamarun.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer.from_llama2c_file(SHARED_TOKENIZERS / "tokenizer.bin")
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model_bytes(tok))
    ours = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    meta = spm.SentencePieceProcessor(model_file=str(SHARED_TOKENIZERS / "tokenizer.model"))
    assert ours.vocab_size() == meta.vocab_size() == 32000
    for text in PROMPTS + ["  two  spaces", "naïve café 日本語 🦙", "line\nbreak\ttab", ""]:
        assert ours.encode(text) == meta.encode(text), text
    assert (ours.bos_id(), ours.eos_id(), ours.unk_id(), ours.pad_id()) == (1, 2, 0, -1)


def test_gguf_sentencepiece_tokenizer_metadata(tiny, tmp_path):
    src, _, _ = tiny
    out = convert(src, tmp_path / "m.gguf", "gguf", progress=False)
    meta = read_metadata(open_reader(out))
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.bos_token_id"] == 1
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.scores"]) == len(meta["tokenizer.ggml.token_type"])


# ---- safety: interrupted conversions, --force ----------------------------------------------------------


@pytest.mark.parametrize("to,patch", [("gguf", "_gguf_array"), ("llama2c", "_write_array"), ("hf", "permute_qk")])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_convert_leaves_nothing(tiny, tmp_path, monkeypatch, to, patch, exc):
    src, _, _ = tiny
    calls = []
    original = getattr(convert_mod, patch)

    def fail_midway(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # mid-way: the tiny model has 2 layers (4 wq/wk permutations, 20+ arrays)
            raise exc("interrupted")
        return original(*a, **k)

    monkeypatch.setattr(convert_mod, patch, fail_midway)
    out = tmp_path / ("out.gguf" if to == "gguf" else "out.bin" if to == "llama2c" else "out")
    with pytest.raises(exc):
        convert(src, out, to, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny, tmp_path):
    src, _, _ = tiny
    out = tmp_path / "m.gguf"
    out.write_text("precious")
    with pytest.raises(UsageError, match="already exists.*--force"):
        convert(src, out, "gguf", progress=False)
    assert out.read_text() == "precious"
    convert(src, out, "gguf", progress=False, force=True)
    assert load_checkpoint(out).format == "gguf"
    d = tmp_path / "hf"
    d.mkdir()
    (d / "stale.txt").write_text("old")
    convert(src, d, "hf", progress=False, force=True)
    assert not (d / "stale.txt").exists() and (d / "config.json").is_file()


def test_bad_requests(tiny, tmp_path):
    src, _, _ = tiny
    for to, dtype, match in [("meta", "q8_0", "q8_0 is for --to gguf or llama2c"),
                             ("llama2c", "float16", "llama2.c files hold float32"),
                             ("onnx", None, "unknown target format")]:
        with pytest.raises(UsageError, match=match):
            convert(src, tmp_path / "x", to, dtype, progress=False)
    with pytest.raises(UsageError, match="no such directory"):
        convert(src, tmp_path / "missing" / "x.gguf", "gguf", progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file.gguf").write_text("not a directory")
    with pytest.raises(UsageError, match="file.gguf: not a directory"):
        convert(src, tmp_path / "file.gguf" / "x.gguf", "gguf", progress=False)
    # Neither the source itself nor a directory holding it is replaced, even with --force.
    for out in (src, src.parent):
        with pytest.raises(UsageError, match="would replace the checkpoint being read"):
            convert(src, out, "hf", progress=False, force=True)
    assert (src / "params.json").is_file()


@pytest.mark.parametrize("to", ["gguf", "meta", "hf", "llama2c"])
def test_write_failure_is_one_line(tiny, tmp_path, to):
    """A write that fails (here: the file size limit, as `ulimit -f` sets it) is a RuntimeFailure naming the
    output and the reason, whichever library wrote (numpy, torch.save, safetensors), with nothing left."""
    src, _, _ = tiny
    out = tmp_path / "out"
    with file_size_limit(64 << 10), pytest.raises(RuntimeFailure) as e:  # the tiny model: ~400 KiB
        convert(src, out, to, progress=False)
    assert str(e.value) == f"cannot write {out}: File too large"
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    """ENOSPC: ``cannot write OUT: No space left on device``, exit 1, one line; other errors stay as they are."""
    from conftest import assert_one_line_error

    from _ckpt_utils import run_cli_in_process

    src, _, _ = tiny
    out = tmp_path / "out.bin"

    def disk_full(f, arr):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(convert_mod, "_write_array", disk_full)
    proc = run_cli_in_process(["convert", src, out, "--to", "llama2c", "--no-progress"], capsys)
    assert_one_line_error(proc, 1, f"cannot write {out}: No space left on device")
    assert list(tmp_path.iterdir()) == []
    staging = convert_mod.Staging(force=False)
    tmp = staging.path(out)
    assert staging.write_error(OSError(errno.ENOENT, "gone", str(tmp))) == "gone"  # about the output
    assert staging.write_error(OSError(errno.ENOENT, "gone", str(src))) is None  # about something else
    rust = RuntimeError(f"I/O error: Disk quota exceeded (os error {errno.EDQUOT})")  # safetensors, tokenizers
    assert staging.write_error(rust) == os.strerror(errno.EDQUOT)
    assert staging.write_error(RuntimeError("interrupted")) is None


def test_command_line(tiny, tmp_path, capsys):
    """cli.py's ``convert`` parser and ``convert.run``: progress bar on stderr, one-line errors."""
    from llamarun.cli import build_parser, main

    src, _, _ = tiny
    args = build_parser().parse_args(["convert", str(src), str(tmp_path / "m.gguf"), "--to", "gguf", "--dtype", "q8_0"])
    assert convert_mod.run(args) == 0
    err = capsys.readouterr().err
    assert "convert to gguf" in err and "wrote" in err
    assert load_checkpoint(tmp_path / "m.gguf").tensor_types["layers.0.attention.wq.weight"] == "Q8_0"
    code = main(["convert", str(src), str(tmp_path / "m.gguf"), "--to", "gguf"])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_tiktoken_vocabulary_to_every_format(tmp_path):
    """A Llama 3-style Meta checkpoint (tiktoken tokenizer.model) keeps its tokenization everywhere."""
    import base64

    ranks = {bytes([b]): b for b in range(256)}
    for merged in [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world", b"\xe4\xb8", b"\xe4\xb8\xad"]:
        ranks[merged] = len(ranks)
    tok_file = tmp_path / "tokenizer.model"
    tok_file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    args = tiny_args(len(ranks) + 256)  # Meta's Llama 3 tokenizer adds 256 special tokens after the ranks
    src = write_meta(tmp_path / "src", args, random_weights(args), tokenizer=tok_file, dtype=torch.float32)
    ref = load_checkpoint(src)
    assert type(ref.tokenizer).__name__ == "TiktokenTokenizer"
    texts = ["hello world", "hello  wor ld\n中文", "<|begin_of_text|>hi<|eot_id|>", "12345 !?"]
    tokens = sample_tokens(args.vocab_size)
    for to, name in (("meta", "meta"), ("hf", "hf"), ("gguf", "m.gguf")):
        ckpt = load_checkpoint(convert(src, tmp_path / name, to, progress=False))
        assert [ckpt.tokenizer.encode(t) for t in texts] == [ref.tokenizer.encode(t) for t in texts], to
        assert ckpt.tokenizer.decode(ref.tokenizer.encode(texts[1], bos=False)) == texts[1]
        assert ckpt.tokenizer.stop_ids >= ref.tokenizer.stop_ids, to
        assert torch.equal(logits(ckpt, tokens), logits(ref, tokens))
