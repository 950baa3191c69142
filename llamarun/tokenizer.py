"""Tokenizers behind one small interface.

Every checkpoint format yields a :class:`Tokenizer`. Concrete tokenizers:

* ``BPETokenizer``: GPT-2-style byte-level BPE (GGUF ``gpt2`` vocabularies such as SmolLM2 and Llama 3,
  HF ``tokenizer.json``), built on the ``tokenizers`` library.
* ``SentencePieceTokenizer``: SentencePiece-style vocabularies with scores (GGUF ``llama`` vocabularies,
  llama2.c ``tokenizer.bin``): greedy highest-score merges, dummy-prefix space and ``<0xXX>`` byte fallback.

``StreamDecoder`` turns a stream of ids into text that never ends in half a UTF-8 character.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Sequence


class Tokenizer(ABC):
    """The interface the engine uses. Ids are plain ints.

    Attributes:
        vocab_size: number of ids.
        bos_id / eos_id / pad_id: special ids, or None when the vocabulary has none.
        stop_ids: every id that ends generation (EOS, ``<|eot_id|>``, ``<|im_end|>``, ...).
        add_bos: whether ``encode`` prepends BOS by default (as the checkpoint's metadata says).
        chat_template: a Jinja chat template from the checkpoint, or None.
    """

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    stop_ids: frozenset[int] = frozenset()
    add_bos: bool = False
    chat_template: str | None = None

    @abstractmethod
    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Text to ids. ``bos=None`` follows ``add_bos``. Special-token text (``<|im_start|>``) maps to its id."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special tokens are kept as their text, invalid UTF-8 becomes U+FFFD."""

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids to raw bytes (used to stream text without cutting a UTF-8 character)."""
        return self.decode(ids).encode("utf-8")

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.stop_ids


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns the newly completed text (possibly "")."""

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prefix_ids)
        self.emitted = len(self.tokenizer.decode(self.ids))

    def push(self, token_id: int) -> str:
        raise NotImplementedError

    def flush(self) -> str:
        raise NotImplementedError
