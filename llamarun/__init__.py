"""llamarun: run LLaMA-family models on the hardware you have.

    from llamarun import Llama
    llm = Llama.load()                      # the embedded SmolLM2-135M-Instruct, or any checkpoint path
    print(llm.text_completion(["The capital of France is"], temperature=0)[0]["generation"])

Names are imported lazily, so ``import llamarun.model`` needs nothing but torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Llama": "generation", "TokenResult": "generation", "ModelArgs": "config", "SamplingParams": "sampling",
    "LlamarunError": "errors", "UsageError": "errors", "FormatError": "errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'llamarun' has no attribute {name!r}")
