"""llamarun: run LLaMA-family models on the hardware you have.

    from llamarun import Llama
    llm = Llama.load()                      # the embedded SmolLM2-135M-Instruct, or any checkpoint path
    print(llm.text_completion(["The capital of France is"], temperature=0)[0]["generation"])

Names are imported lazily, so ``import llamarun.model`` needs nothing but torch.
"""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

# Before torch's OpenMP runtime starts (libgomp reads this once, when torch is first imported): its idle
# threads then sleep at once instead of spinning for a while after each parallel region. llamarun's heavy
# work runs in its kernels' own thread pool, and OpenMP threads left spinning by torch's small ops in between
# (adds, copies) took the cores from it: 512-token prefill 720-810 -> 1150-1240 tok/s on a 2-core Zen 4,
# decode unchanged. A value set in the environment wins; with torch imported first, nothing changes.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_EXPORTS = {
    "Llama": "generation", "TokenResult": "generation", "ModelArgs": "config", "SamplingParams": "sampling",
    "LlamarunError": "errors", "UsageError": "errors", "FormatError": "errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'llamarun' has no attribute {name!r}")
