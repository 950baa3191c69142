"""Chat templates: a dialog (list of {"role", "content"}) to prompt token ids.

Order of preference: the checkpoint's own Jinja template (GGUF ``tokenizer.chat_template``, HF
``tokenizer_config.json``), rendered in a sandbox like HF's ``apply_chat_template``; else the format its
tokenizer implies: Llama 3 headers for a tiktoken vocabulary, Llama 2 ``[INST]`` tags otherwise.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Mapping, Sequence

from .errors import UsageError
from .tokenizer import Tokenizer

Message = Mapping[str, str]
Dialog = Sequence[Message]

# Meta's Llama 2 chat markup.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def check_dialog(dialog: Dialog) -> None:
    """Raise UsageError unless every message has a known role and string content."""
    if not dialog:
        raise UsageError("a dialog needs at least one message")
    for i, m in enumerate(dialog):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise UsageError(f"message {i} must have 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise UsageError(f"message {i}: unknown role {m['role']!r} (system, user, assistant or tool)")
        if not isinstance(m["content"], str):
            raise UsageError(f"message {i}: content must be a string")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise UsageError(f"the model's chat template does not compile: {e}") from None


def render_template(template: str, dialog: Dialog, tokenizer: Tokenizer, add_generation_prompt: bool = True) -> str:
    """Render a Jinja chat template the way HF's apply_chat_template does."""
    from jinja2 import TemplateError

    def piece(i: int | None) -> str:
        return tokenizer.decode([i]) if i is not None else ""

    try:
        return _compile(template).render(messages=[dict(m) for m in dialog], add_generation_prompt=add_generation_prompt,
                                         bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id))
    except TemplateError as e:
        raise UsageError(f"chat template: {e}") from None


def is_llama3(tokenizer: Tokenizer) -> bool:
    return type(tokenizer).__name__ == "TiktokenTokenizer"


def encode_dialog(dialog: Dialog, tokenizer: Tokenizer) -> list[int]:
    """Prompt ids for a dialog that ends with a user (or tool) message, ready for the assistant's turn."""
    check_dialog(dialog)
    if tokenizer.chat_template:
        # The rendered text carries its own special tokens (BOS included where the template wants it).
        return tokenizer.encode(render_template(tokenizer.chat_template, dialog, tokenizer), bos=False)
    if is_llama3(tokenizer):
        return _encode_llama3(dialog, tokenizer)
    return _encode_llama2(dialog, tokenizer)


def _encode_llama3(dialog: Dialog, tok: Tokenizer) -> list[int]:
    """Meta's Llama 3 ChatFormat: header, content, <|eot_id|> per message, then an open assistant header."""
    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    text = "".join(header(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in dialog) + header("assistant")
    return [tok.bos_id] + tok.encode(text, bos=False) if tok.bos_id is not None else tok.encode(text, bos=False)


def _encode_llama2(dialog: Dialog, tok: Tokenizer) -> list[int]:
    """Meta's Llama 2 chat_completion markup: the system prompt folds into the first user turn, each
    (user, assistant) pair is ``<s>[INST] u [/INST] a </s>``, and the last user turn is left open."""
    msgs = list(dialog)
    if msgs[0]["role"] == "system":
        if len(msgs) < 2:
            raise UsageError("a system message must be followed by a user message")
        msgs = [{"role": msgs[1]["role"], "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}] + msgs[2:]
    roles = [m["role"] for m in msgs]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise UsageError("dialog roles must be system (optional), then user/assistant alternating")
    if roles[-1] != "user":
        raise UsageError("the last message of a dialog must be from the user")
    ids: list[int] = []
    for user, answer in zip(msgs[::2], msgs[1::2]):
        ids += tok.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True)
    ids += tok.encode(f"{B_INST} {msgs[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


def has_unsafe_tags(dialog: Dialog, tokenizer: Tokenizer) -> bool:
    """Meta refuses Llama 2 dialogs whose text contains its markup tags."""
    if tokenizer.chat_template or is_llama3(tokenizer):
        return False
    return any(tag in m["content"] for tag in SPECIAL_TAGS for m in dialog)
