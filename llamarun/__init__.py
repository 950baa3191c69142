"""llamarun: run LLaMA-family models on the hardware you have.

    from llamarun import Llama
    llm = Llama.load()                      # the embedded SmolLM2-135M-Instruct, or any checkpoint path
    print(llm.text_completion(["The capital of France is"], temperature=0)[0]["generation"])
"""

from .config import ModelArgs
from .errors import FormatError, LlamarunError, UsageError
from .generation import Llama, TokenResult
from .sampling import SamplingParams

__all__ = ["Llama", "ModelArgs", "SamplingParams", "TokenResult", "LlamarunError", "UsageError", "FormatError"]
__version__ = "0.1.0"
