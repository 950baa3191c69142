"""Tokenizers behind one small interface.

Every checkpoint format yields a :class:`Tokenizer`. Concrete tokenizers:

* ``BPETokenizer``: GPT-2-style byte-level BPE (GGUF ``gpt2`` vocabularies such as SmolLM2 and Llama 3,
  HF ``tokenizer.json``), built on the ``tokenizers`` library.
* ``SentencePieceTokenizer``: SentencePiece-style vocabularies with scores (GGUF ``llama`` vocabularies,
  llama2.c ``tokenizer.bin``, SentencePiece ``tokenizer.model``): greedy highest-score merges, dummy-prefix
  space and ``<0xXX>`` byte fallback.
* ``TiktokenTokenizer``: Meta's Llama 3 ``tokenizer.model`` (tiktoken BPE ranks), built on ``tiktoken``.

``StreamDecoder`` turns a stream of ids into text that never ends in half a UTF-8 character.
``load_tokenizer_file`` and ``tokenizer_from_gguf`` pick the right class for a file or GGUF metadata.
"""

from __future__ import annotations

import base64
import codecs
import heapq
import json
import re
import struct
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import FormatError, UsageError

# Token types, numbered as in GGUF's tokenizer.ggml.token_type and in SentencePiece's ModelProto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn or a document in the model families we know. They count as stops when the
# vocabulary marks them special (a plain-text "</s>" piece in some vocabulary must not stop generation).
STOP_TOKEN_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>", "</s>")

_SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


class Tokenizer(ABC):
    """The interface the engine uses. Ids are plain ints.

    Attributes:
        vocab_size: number of ids.
        bos_id / eos_id / pad_id: special ids, or None when the vocabulary has none.
        stop_ids: every id that ends generation (EOS, ``<|eot_id|>``, ``<|im_end|>``, ...).
        add_bos: whether ``encode`` prepends BOS by default (as the checkpoint's metadata says).
        chat_template: a Jinja chat template from the checkpoint, or None.
        exact_bytes: True when ``decode_bytes`` gives the raw bytes (not text re-encoded after U+FFFD
            replacement); ``StreamDecoder`` then tells an unfinished character from an invalid byte.

    Ids outside the vocabulary are skipped by ``decode`` (as the ``tokenizers`` library does), so a model
    whose embedding table is padded past the vocabulary cannot crash detokenization.
    """

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    stop_ids: frozenset[int] = frozenset()
    add_bos: bool = False
    chat_template: str | None = None
    exact_bytes: bool = False

    @abstractmethod
    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Text to ids. ``bos=None`` follows ``add_bos``. Special-token text (``<|im_start|>``) maps to its id."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special tokens are kept as their text, invalid UTF-8 becomes U+FFFD."""

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids to raw bytes (used to stream text without cutting a UTF-8 character)."""
        return self.decode(ids).encode("utf-8")

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry for one id, as the vocabulary spells it (``Ġthe``, ``▁the``, ``<0x0A>``)."""
        raise NotImplementedError

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.stop_ids

    def _with_specials(self, ids: list[int], bos: bool | None, eos: bool) -> list[int]:
        """Add BOS/EOS around ``ids`` as asked (``bos=None``: as ``add_bos`` says)."""
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids


def _encode_str(encode: Callable[[str], list[int]], text: Any, failures: tuple[type[Exception], ...]) -> list[int]:
    """``encode(text)`` for any str, UsageError for anything else.

    A str that UTF-8 cannot encode (lone surrogates: what ``surrogateescape``, with which the CLI reads
    argv and stdin, makes of invalid UTF-8) makes the libraries raise one of ``failures``; it is then
    encoded with U+FFFD in place of each lone surrogate (a surrogate pair becomes its character), as
    tiktoken does. Only that rare case pays for the copy.
    """
    if not isinstance(text, str):
        raise UsageError(f"text to encode must be a str, got {text!r:.60}")
    try:
        return encode(text)
    except failures:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if fixed == text:
            raise  # it failed for another reason
        return encode(fixed)


def _valid_id(token_id: Any, vocab_size: int) -> int | None:
    """An id from metadata or a config file, or None when it is absent or out of range (e.g. pad = -1)."""
    if isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < vocab_size:
        return token_id
    return None


def _stop_ids(eos_ids: Iterable[int | None], special_ids: dict[str, int]) -> frozenset[int]:
    """EOS and friends, plus every special token whose name says it ends a turn or a document."""
    stops = {i for i in eos_ids if i is not None}
    stops.update(special_ids[name] for name in STOP_TOKEN_NAMES if name in special_ids)
    return frozenset(stops)


def _ends_mid_character(data: bytes) -> bool:
    """True if ``data`` ends with the start of a UTF-8 character that more bytes could still complete.

    An incremental decoder keeps exactly those bytes buffered; anything invalid it has already replaced.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data[-4:], final=False)  # a character is at most 4 bytes, so its start is in the last 4
    return bool(decoder.getstate()[0])


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns the newly completed text (possibly "").

    Detokenization is not per-token: SentencePiece drops the dummy-prefix space of the first token, and a
    character can span several byte tokens. So each push decodes a small window twice -- the tokens
    already shown (``ids[prefix_offset:read_offset]``) and the same plus the new ones -- and returns the
    difference (the prefix_offset/read_offset scheme of HF's text streamer and vLLM). The window slides
    forward after every emission, so each push costs O(1) however long the generation.

    Text that ends in U+FFFD is held back while the bytes end mid-character: the next token may complete
    it. Concatenating every ``push`` result and ``flush()`` gives ``tokenizer.decode(ids)``; with
    ``prefix_ids`` (the prompt, which should end on a character boundary, as encoded text does) the output
    continues the prompt's text, so a first generated SentencePiece token keeps its leading space.
    """

    # Prompt tokens in the first window: one is enough for our tokenizers, a few more serve decoders whose
    # output depends on neighbouring tokens (vLLM uses 5 too).
    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prefix_ids)
        self.read_offset = len(self.ids)  # tokens before this are fully shown
        self.prefix_offset = max(0, self.read_offset - self.CONTEXT)  # where the decode window starts

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token_id)
        shown = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(text) <= len(shown) or self._unfinished(text):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(shown) :]

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character becomes U+FFFD)."""
        shown = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(shown) :]

    def _unfinished(self, text: str) -> bool:
        if not text.endswith("\ufffd"):
            return False
        if not self.tokenizer.exact_bytes:
            return True  # cannot tell an unfinished character from an invalid byte: wait (vLLM's rule)
        # Held-back tokens start on a character boundary, so their bytes alone tell whether the U+FFFD
        # is final (invalid bytes: show it) or a character in progress (wait for the rest).
        return _ends_mid_character(self.tokenizer.decode_bytes(self.ids[self.read_offset :]))


# ----------------------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2 family) on the `tokenizers` library

# Pre-tokenizer splits, by GGUF ``tokenizer.ggml.pre``. A name not listed gets GPT-2's own split (the
# ByteLevel pre-tokenizer's built-in regex), which is also what transformers does for such names.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3", "pixtral"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4"], _GPT4O_SPLIT),
    # "smollm", "starcoder", "refact": llama.cpp first splits every digit off (\p{N}), then GPT-2's split,
    # which is what SmolLM2's own tokenizer.json does. transformers' GGUF loader uses GPT-2's split alone;
    # we match transformers. The two differ only on a run of spaces before a digit ("a  1" is
    # [a, Ġ, Ġ, 1] here, [a, ĠĠ, 1] in llama.cpp). To follow llama.cpp, map these names to a split that
    # runs pre_tokenizers.Digits(individual_digits=True) first.
}
# Pre-tokenizers whose vocabulary came from tiktoken: a pre-token that is itself in the vocabulary is
# taken whole, without merging (tiktoken's rule; llama.cpp and Llama 3's tokenizer.json do the same).
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3", "gpt-4o", "llama4"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: byte-level vocabularies spell every byte this way."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:  # control bytes and space move up past U+00FF
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


class BPETokenizer(Tokenizer):
    """Byte-level BPE: a ``tokenizers.Tokenizer`` plus the ids and flags the engine needs.

    Build one with ``from_gguf_metadata`` or ``from_hf_file``. Added/special tokens of the backend
    (``<|im_start|>``) are matched whole inside the text.
    """

    def __init__(self, backend: Any, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 stop_ids: Iterable[int] = (), add_bos: bool = False, chat_template: str | None = None) -> None:
        from tokenizers import decoders

        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.stop_ids = frozenset(stop_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template
        # With a plain ByteLevel decoder every token is spelled in GPT-2's byte alphabet, so raw bytes are
        # recoverable; other decoders (Metaspace, ByteFallback...) only give text.
        self.exact_bytes = isinstance(backend.decoder, decoders.ByteLevel)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "BPETokenizer":
        """Build from a GGUF ``gpt2`` vocabulary: tokens, merges, token types and special ids."""
        from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, pre_tokenizers

        tokens = _require_list(meta, "tokenizer.ggml.tokens", str)
        merges = _require_list(meta, "tokenizer.ggml.merges", str)
        types = _optional_list(meta, "tokenizer.ggml.token_type", len(tokens), default=NORMAL)
        pre = meta.get("tokenizer.ggml.pre", "default")

        # Tokens are stored in GPT-2's byte alphabet, except added tokens, which llama.cpp stores as plain
        # text; spell those in the alphabet too so the BPE model can look them up (as transformers does).
        alphabet = set(_BYTE_DECODER)
        if set("".join(tokens)) <= alphabet:  # the usual case, checked in one pass (49k tokens: 11 vs 32 ms)
            spelled = tokens
        else:
            spelled = [t if set(t) <= alphabet else "".join(_BYTE_ENCODER[b] for b in t.encode("utf-8"))
                       for t in tokens]
        vocab = {}
        for i, t in enumerate(spelled):
            vocab.setdefault(t, i)
        try:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
            model = models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES)
        except Exception as e:
            raise FormatError(f"GGUF tokenizer.ggml.merges is not a valid BPE merge list ({e})") from None
        backend = Backend(model)
        split = PRE_TOKENIZER_SPLITS.get(pre)
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own regex
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        backend.decoder = decoders.ByteLevel()

        # Control tokens become special tokens and user-defined ones plain added tokens: both are matched
        # whole in the text. A "control" token spelled outside the byte alphabet is a converter mislabel,
        # skipped like transformers does (adding it would create an id past the vocabulary).
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types) if ty == USER_DEFINED and set(t) <= alphabet])

        n = len(tokens)
        ids = {key: _valid_id(meta.get(f"tokenizer.ggml.{key}_token_id"), n)
               for key in ("bos", "eos", "padding", "eot", "eom")}
        control = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL}
        return cls(backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"],
                   stop_ids=_stop_ids([ids["eos"], ids["eot"], ids["eom"]], control),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_file(cls, path: str | Path, tokenizer_config: str | Path | None = None,
                     generation_config: str | Path | None = None) -> "BPETokenizer":
        """Build from an HF ``tokenizer.json``.

        Special tokens, ``add_bos_token`` and the chat template come from ``tokenizer_config.json`` (and
        ``chat_template.jinja``), extra EOS ids from ``generation_config.json``; by default both are looked
        for next to ``path``.
        """
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not path.is_file():
            raise FormatError(f"{path}: no such file")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the library's messages can span lines: keep the first
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FormatError(f"{path}: not a valid tokenizer.json ({reason})") from None
        config = _read_json(Path(tokenizer_config) if tokenizer_config else path.parent / "tokenizer_config.json")
        gen = _read_json(Path(generation_config) if generation_config else path.parent / "generation_config.json")

        def token_id(value: Any) -> int | None:  # "<s>" or {"content": "<s>", ...} -> id
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        # The tokenizer config names the tokens; generation_config.json may list more EOS ids (Llama 3
        # Instruct stops on <|end_of_text|>, <|eom_id|> and <|eot_id|>).
        n = backend.get_vocab_size(with_added_tokens=True)
        bos_id = token_id(config.get("bos_token"))
        if bos_id is None:
            bos_id = _valid_id(gen.get("bos_token_id"), n)
        gen_eos = gen.get("eos_token_id")
        eos_ids = [token_id(config.get("eos_token"))]
        eos_ids += [_valid_id(i, n) for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos])]
        eos_id = next((i for i in eos_ids if i is not None), None)
        pad_id = token_id(config.get("pad_token"))
        if pad_id is None:
            pad_id = _valid_id(gen.get("pad_token_id"), n)

        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # no flag: BOS is added if the file's post-processor adds it (Llama 3's tokenizer.json does)
            with_specials = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(with_specials) and with_specials[0] == bos_id

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja = path.parent / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")

        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        return cls(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, stop_ids=_stop_ids(eos_ids, specials),
                   add_bos=add_bos, chat_template=template if isinstance(template, str) else None)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        # add_special_tokens=False: BOS/EOS are ours to add, not the file's post-processor's.
        # TypeError ("TextInputSequence must be str") is what `tokenizers` says about a lone surrogate.
        ids = _encode_str(lambda t: self.backend.encode(t, add_special_tokens=False).ids, text, (TypeError,))
        return self._with_specials(ids, bos, eos)

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if not self.exact_bytes:
            return super().decode_bytes(ids)
        out = bytearray()
        for i in ids:
            token = self.backend.id_to_token(i)
            if token is None:
                continue
            try:
                out += bytes(_BYTE_DECODER[c] for c in token)
            except KeyError:  # like the ByteLevel decoder: a token outside the alphabet is its own UTF-8
                out += token.encode("utf-8")
        return bytes(out)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            raise IndexError(f"token id {token_id} is not in the vocabulary (size {self.vocab_size})")
        return piece


# ----------------------------------------------------------------------------------------------------------
# SentencePiece BPE (Llama 1/2, Mistral, llama2.c)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece BPE vocabulary: pieces with scores and types, encoded by hand.

    Encoding (what sentencepiece and llama.cpp do): split the text on special tokens, turn spaces into
    ``▁`` and prepend a dummy ``▁`` to each text fragment, start from single characters, repeatedly merge
    the adjacent pair whose merged piece has the highest score (leftmost on ties), then map each piece to
    its id, falling back to ``<0xXX>`` byte tokens (or UNK) for characters outside the vocabulary.

    Decoding: ``▁`` becomes a space, byte tokens their raw byte; the dummy-prefix space is dropped from the
    token that starts the decode or follows BOS (llama2.c's rule). Special tokens keep their text.
    """

    def __init__(self, pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                 bos_id: int | None, eos_id: int | None, unk_id: int | None = None, pad_id: int | None = None,
                 add_bos: bool = True, add_eos: bool = False, add_space_prefix: bool = True,
                 chat_template: str | None = None, extra_stop_ids: Iterable[int | None] = ()) -> None:
        if not len(pieces) == len(scores) == len(types):
            raise FormatError(f"tokenizer has {len(pieces)} tokens but {len(scores)} scores and {len(types)} types")
        self.pieces, self.scores, self.types = list(pieces), [float(s) for s in scores], [int(t) for t in types]
        self.vocab_size = len(self.pieces)
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos, self.add_eos, self.add_space_prefix = add_bos, add_eos, add_space_prefix
        self.chat_template = chat_template
        self.exact_bytes = True
        self._sp: Any = None  # a sentencepiece.SentencePieceProcessor that encodes text, when built from a .model

        # Pieces that merges may produce and that text may map to (sentencepiece's rule: no control, byte
        # or unknown pieces). The first id wins if a vocabulary repeats a piece.
        self._piece_ids: dict[str, int] = {}
        for i, (p, t) in enumerate(zip(self.pieces, self.types)):
            if t in (NORMAL, USER_DEFINED):
                self._piece_ids.setdefault(p, i)
        self._byte_ids: dict[int, int] = {}
        self._piece_bytes: list[bytes] = []
        for i, (p, t) in enumerate(zip(self.pieces, self.types)):
            m = _BYTE_PIECE.fullmatch(p) if t == BYTE else None
            if m:
                self._byte_ids.setdefault(int(m.group(1), 16), i)
                self._piece_bytes.append(bytes([int(m.group(1), 16)]))
            elif t in (CONTROL, UNKNOWN):
                self._piece_bytes.append(p.encode("utf-8"))
            else:
                self._piece_bytes.append(p.replace(_SPM_SPACE, " ").encode("utf-8"))

        # Control, unknown and user-defined tokens are matched whole in the text, longest first.
        specials = {p: i for i, (p, t) in enumerate(zip(self.pieces, self.types))
                    if t in (CONTROL, UNKNOWN, USER_DEFINED) and p}
        self._specials = specials
        longest_first = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest_first))) if specials else None
        self.stop_ids = _stop_ids([eos_id, *extra_stop_ids],
                                  {p: i for p, i in specials.items() if self.types[i] == CONTROL})

    # -- constructors ------------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "SentencePieceTokenizer":
        """Build from a GGUF ``llama`` vocabulary (tokens, scores, token types, special ids and flags)."""
        tokens = _require_list(meta, "tokenizer.ggml.tokens", str)
        n = len(tokens)
        scores = _optional_list(meta, "tokenizer.ggml.scores", n, default=0.0)
        types = _optional_list(meta, "tokenizer.ggml.token_type", n, default=NORMAL)

        def get_id(key: str, default: int | None) -> int | None:
            return _valid_id(meta.get(f"tokenizer.ggml.{key}_token_id", default), n)

        return cls(tokens, scores, types, bos_id=get_id("bos", 1), eos_id=get_id("eos", 2),
                   unk_id=get_id("unknown", 0), pad_id=get_id("padding", None),
                   # llama.cpp's defaults for a sentencepiece vocabulary that does not say
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                   add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                   chat_template=meta.get("tokenizer.chat_template"),
                   extra_stop_ids=[get_id("eot", None), get_id("eom", None)])

    @classmethod
    def from_llama2c_file(cls, path: str | Path, vocab_size: int | None = None) -> "SentencePieceTokenizer":
        """Read llama2.c's ``tokenizer.bin``: int32 max_token_length, then per token f32 score, i32 length, bytes.

        The file has no token types or special ids; as in llama2.c's run.c, 0 is UNK, 1 BOS, 2 EOS and
        ``<0xXX>`` pieces are byte tokens. The exporter wrote ``▁`` as a plain space and BOS/EOS as
        ``"\\n<s>\\n"``/``"\\n</s>\\n"``; both are undone here. ``vocab_size`` (from the model's config) reads
        exactly that many tokens, as run.c does; None reads to the end of the file.
        """
        path = Path(path)
        data = _read_bytes(path)
        if len(data) < 4:
            raise FormatError(f"{path}: truncated llama2.c tokenizer (no header)")
        pieces, scores, off = [], [], 4
        while (off < len(data)) if vocab_size is None else (len(pieces) < vocab_size):
            if off + 8 > len(data):
                raise FormatError(f"{path}: truncated llama2.c tokenizer (token {len(pieces)} of {vocab_size or '?'})")
            score, length = struct.unpack_from("<fi", data, off)
            off += 8
            if length < 0 or off + length > len(data):
                raise FormatError(f"{path}: corrupted llama2.c tokenizer (token {len(pieces)} has length {length})")
            try:
                piece = data[off : off + length].decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"{path}: corrupted llama2.c tokenizer (token {len(pieces)} is not UTF-8)") from None
            off += length
            pieces.append(piece)
            scores.append(score)
        if len(pieces) < 3:
            raise FormatError(f"{path}: llama2.c tokenizer with only {len(pieces)} tokens")
        types = []
        for i, p in enumerate(pieces):
            if i in (1, 2):
                pieces[i], t = p.strip("\n"), CONTROL
            elif i == 0:
                t = UNKNOWN
            elif _BYTE_PIECE.fullmatch(p):
                t = BYTE
            else:
                pieces[i], t = p.replace(" ", _SPM_SPACE), NORMAL
            types.append(t)
        return cls(pieces, scores, types, bos_id=1, eos_id=2, unk_id=0, add_bos=True, add_space_prefix=True)

    @classmethod
    def from_sentencepiece_model(cls, path: str | Path) -> "SentencePieceTokenizer":
        """Load a SentencePiece ``tokenizer.model``; the ``sentencepiece`` library encodes text fragments.

        The library applies the model's own normalizer (NFKC, whitespace rules), which a hand encoder
        would have to reimplement; decoding, special tokens and streaming are shared with the other
        constructors. A pad id of -1 in the model means "none" and becomes ``pad_id=None``.
        """
        import sentencepiece as spm

        path = Path(path)
        _read_bytes(path, 0)  # a missing file gets our message, not the library's
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception:
            raise FormatError(f"{path}: not a valid SentencePiece model") from None
        n = sp.vocab_size()
        types = []
        for i in range(n):
            if sp.is_control(i):
                types.append(CONTROL)
            elif sp.is_unknown(i):
                types.append(UNKNOWN)
            elif sp.is_byte(i):
                types.append(BYTE)
            elif sp.is_unused(i):
                types.append(UNUSED)
            else:  # NORMAL or USER_DEFINED; the library matches user-defined pieces itself
                types.append(NORMAL)
        # The normalizer spec is a protobuf field we cannot read without protobuf; whether a dummy prefix
        # is added shows in how a lone letter is encoded.
        first = sp.encode("a", out_type=str)
        tok = cls([sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)], types,
                  bos_id=_valid_id(sp.bos_id(), n), eos_id=_valid_id(sp.eos_id(), n),
                  unk_id=_valid_id(sp.unk_id(), n), pad_id=_valid_id(sp.pad_id(), n), add_bos=True,
                  add_space_prefix=bool(first) and first[0].startswith(_SPM_SPACE))
        tok._sp = sp
        return tok

    def save_llama2c_tokenizer(self, path: str | Path) -> None:
        """Write this vocabulary as llama2.c's ``tokenizer.bin``, byte for byte as llama2.c's exporter does.

        run.c hard-codes BOS=1, EOS=2 and byte tokens at ids 3..258, so other layouts are refused.
        """
        if (self.bos_id, self.eos_id) != (1, 2) or any(self._byte_ids.get(b) != b + 3 for b in range(256)):
            raise FormatError(f"{path}: llama2.c needs BOS=1, EOS=2 and byte tokens <0x00>..<0xFF> at ids 3..258; "
                              "this vocabulary is laid out differently")
        entries = []
        for i, (piece, score) in enumerate(zip(self.pieces, self.scores)):
            if i == self.bos_id:
                piece = "\n<s>\n"  # the exporter's spelling, so run.c prints BOS/EOS on their own line
            elif i == self.eos_id:
                piece = "\n</s>\n"
            entries.append((score, piece.replace(_SPM_SPACE, " ").encode("utf-8")))
        with open(path, "wb") as f:
            f.write(struct.pack("<i", max(len(b) for _, b in entries)))
            for score, b in entries:
                f.write(struct.pack("<fi", score, len(b)))
                f.write(b)

    # -- encoding ----------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        # A lone surrogate: UnicodeEncodeError from byte fallback, RuntimeError from the sentencepiece library.
        return self._with_specials(_encode_str(self._encode, text, (UnicodeEncodeError, RuntimeError)), bos, eos)

    def _encode(self, text: str) -> list[int]:
        """Text to ids, without BOS/EOS."""
        ids: list[int] = []
        for part in self._split_specials(text):
            if isinstance(part, int):
                ids.append(part)
            elif self._sp is not None:
                ids += self._sp.encode(part)
            else:
                # Every fragment starts the text or follows a special token: llama.cpp (and Meta's Llama 2
                # chat code, which encodes each turn separately) gives each one a dummy prefix.
                prefix = _SPM_SPACE if self.add_space_prefix else ""
                ids += self._bpe(prefix + part.replace(" ", _SPM_SPACE))
        return ids

    def _split_specials(self, text: str) -> Iterator[str | int]:
        """Yield the text's non-empty plain fragments (str) and the ids of special tokens in it (int)."""
        if self._special_re is None:
            if text:
                yield text
            return
        start = 0
        for m in self._special_re.finditer(text):
            if m.start() > start:
                yield text[start : m.start()]
            yield self._specials[m.group()]
            start = m.end()
        if start < len(text):
            yield text[start:]

    def _bpe(self, text: str) -> list[int]:
        """SentencePiece BPE on one fragment (spaces already ``▁``).

        Symbols are a linked list over the characters; candidate merges sit in a heap keyed by
        (-score, left position), so the best pair, leftmost on ties, comes first. A merge leaves stale
        heap entries behind; they are recognised because their two symbols no longer add up to the
        merged piece's length. O(n log n), where run.c's rescanning loop is O(n^2).
        """
        symbols = list(text)
        n = len(symbols)
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, str]] = []

        def add_pair(left: int) -> None:
            right = nxt[left] if left >= 0 else -1
            if right < 0:
                return
            piece = symbols[left] + symbols[right]
            if piece in self._piece_ids:
                heapq.heappush(heap, (-self.scores[self._piece_ids[piece]], left, piece))

        for i in range(n - 1):
            add_pair(i)
        while heap:
            _, left, piece = heapq.heappop(heap)
            right = nxt[left]
            if right < 0 or not symbols[left] or len(symbols[left]) + len(symbols[right]) != len(piece):
                continue  # stale: one of the two symbols has merged with something else since
            symbols[left], symbols[right] = piece, ""
            nxt[left] = nxt[right]
            if nxt[left] >= 0:
                prv[nxt[left]] = left
            add_pair(prv[left])
            add_pair(left)

        ids = []
        i = 0 if n else -1
        while i >= 0:
            piece = symbols[i]
            if piece in self._piece_ids:
                ids.append(self._piece_ids[piece])
            else:  # not in the vocabulary: one token per UTF-8 byte, or UNK without byte tokens
                for b in piece.encode("utf-8"):
                    byte_id = self._byte_ids.get(b, self.unk_id)
                    if byte_id is not None:
                        ids.append(byte_id)
            i = nxt[i]
        return ids

    # -- decoding ----------------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = bytearray()
        prev = None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                continue
            piece = self._piece_bytes[i]
            starts_text = prev is None or prev == self.bos_id
            if self.add_space_prefix and starts_text and self.pieces[i].startswith(_SPM_SPACE):
                piece = piece[1:]  # the dummy prefix encode added
            out += piece
            prev = i
        return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        return self.pieces[token_id]


# ----------------------------------------------------------------------------------------------------------
# Llama 3's tiktoken tokenizer.model


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: tiktoken BPE ranks (``base64-token rank`` per line) plus 256 special tokens.

    Special tokens follow Meta's Llama 3.1+ ``tokenizer.py`` (the ranks file is the same for Llama 3 and
    3.1; 3.1 only names some reserved slots): ids start right after the ranks (128000 for Llama 3).
    """

    PATTERN = _LLAMA3_SPLIT
    NUM_SPECIAL_TOKENS = 256
    NAMED_SPECIAL_TOKENS = (
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>",  # end of message (a tool call)
        "<|eot_id|>",  # end of turn
        "<|python_tag|>",
    )

    def __init__(self, mergeable_ranks: dict[bytes, int], name: str = "llama3",
                 chat_template: str | None = None) -> None:
        import tiktoken

        n_base = len(mergeable_ranks)
        reserved = [f"<|reserved_special_token_{2 + i}|>"
                    for i in range(self.NUM_SPECIAL_TOKENS - len(self.NAMED_SPECIAL_TOKENS))]
        self.special_tokens = {t: n_base + i for i, t in enumerate([*self.NAMED_SPECIAL_TOKENS, *reserved])}
        try:
            self.model = tiktoken.Encoding(name=name, pat_str=self.PATTERN, mergeable_ranks=mergeable_ranks,
                                           special_tokens=self.special_tokens)
        except Exception as e:
            raise FormatError(f"{name}: invalid tiktoken ranks ({e})") from None
        self.vocab_size = n_base + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = _stop_ids([self.eos_id], self.special_tokens)  # end_of_text, eot_id, eom_id
        self.add_bos = True  # Meta's generation code and transformers' Llama 3 tokenizer both add BOS
        self.chat_template = chat_template
        self.exact_bytes = True

    @classmethod
    def from_file(cls, path: str | Path) -> "TiktokenTokenizer":
        """Read a tiktoken ranks file (``tiktoken.load.load_tiktoken_bpe``'s format)."""
        path = Path(path)
        ranks = {}
        for n, line in enumerate(_read_bytes(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise FormatError(f"{path}: line {n} is not a tiktoken 'base64-token rank' pair") from None
        if not ranks:
            raise FormatError(f"{path}: empty tiktoken tokenizer")
        return cls(ranks, name=path.name)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        # tiktoken replaces lone surrogates itself (today); _encode_str keeps that true for every version.
        ids = _encode_str(lambda t: self.model.encode(t, allowed_special="all"), text, (UnicodeEncodeError,))
        return self._with_specials(ids, bos, eos)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.model.decode_bytes([i for i in ids if 0 <= i < self.vocab_size])

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        return self.model.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------
# Picking a tokenizer


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (``tokenizer.ggml.model``: 'gpt2' or 'llama')."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        return BPETokenizer.from_gguf_metadata(meta)
    if model == "llama":
        return SentencePieceTokenizer.from_gguf_metadata(meta)
    if model is None:
        raise FormatError("GGUF metadata has no tokenizer (tokenizer.ggml.model is missing)")
    raise FormatError(f"unsupported tokenizer.ggml.model {model!r} (supported: 'gpt2', 'llama')")


_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+")


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """Load a tokenizer file, recognised by its content rather than its name.

    ``tokenizer.json`` (HF) -> BPETokenizer; a SentencePiece ``tokenizer.model`` -> SentencePieceTokenizer;
    a tiktoken ``tokenizer.model`` (Llama 3) -> TiktokenTokenizer; llama2.c's ``tokenizer.bin`` ->
    SentencePieceTokenizer. A directory is searched for those names in that order.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model", "tokenizer.bin") if (path / n).is_file()]
        if not found:
            raise FormatError(f"{path}: no tokenizer.json, tokenizer.model or tokenizer.bin in this directory")
        path = found[0]
    head = _read_bytes(path, 4096)
    first_line = head.split(b"\n", 1)[0]
    if head.lstrip().startswith(b"{"):
        return BPETokenizer.from_hf_file(path)
    if _TIKTOKEN_LINE.fullmatch(first_line.strip()):
        return TiktokenTokenizer.from_file(path)
    if _looks_like_llama2c(head):
        return SentencePieceTokenizer.from_llama2c_file(path)
    if head[:1] == b"\x0a":  # protobuf field 1 (the pieces), length-delimited: a SentencePiece ModelProto
        return SentencePieceTokenizer.from_sentencepiece_model(path)
    raise FormatError(f"{path}: not a tokenizer file (expected an HF tokenizer.json, a SentencePiece or "
                      "tiktoken tokenizer.model, or a llama2.c tokenizer.bin)")


def _looks_like_llama2c(head: bytes) -> bool:
    """llama2.c's header is a small max_token_length, then the first token (UNK) fits within it."""
    if len(head) < 12:
        return False
    max_len, _score, length = struct.unpack_from("<ifi", head)
    return 0 < max_len < 4096 and 0 < length <= max_len and 12 + length <= len(head)


# ----------------------------------------------------------------------------------------------------------
# Small helpers for reading files and metadata with one-line errors


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a config file, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def _require_list(meta: dict[str, Any], key: str, item: type | None = None) -> list:
    value = meta.get(key)
    if not isinstance(value, list) or not value:
        raise FormatError(f"GGUF metadata key {key!r} is missing or empty")
    if item is not None and set(map(type, value)) != {item}:
        raise FormatError(f"GGUF metadata key {key!r} must be a list of {item.__name__}")
    return value


def _optional_list(meta: dict[str, Any], key: str, n: int, default: Any) -> list:
    value = meta.get(key)
    if value is None:
        return [default] * n
    if not isinstance(value, list) or len(value) != n:
        raise FormatError(f"GGUF metadata key {key!r} has {len(value) if isinstance(value, list) else 'no'} "
                          f"entries for {n} tokens")
    return value
