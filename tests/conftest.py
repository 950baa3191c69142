"""Shared fixtures: the embedded default model, loaded once, and HF transformers as the reference."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str):
    """Import a script that is not part of a package (benchmarks/, examples/) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SHARED_TOKENIZERS = REPO.parent / "shared" / "data" / "llama2-tokenizer"

# The five prompts every parity check uses.
PROMPTS = [
    "What is the largest animal?",
    "Once upon a time, a big lion and a small rabbit",
    "The capital of France is",
    "def fibonacci(n):",
    "Explain why the sky is blue in one sentence.",
]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's torch ops on one thread: on a shared, loaded machine OpenMP's barriers stall
    (milliseconds per op) and would make kernel and quantization tests take minutes; nothing there
    measures speed, and the kernels' own threading is tested explicitly
    (test_kernels.test_threads_and_repeated_calls_agree). Use with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from llamarun.generation import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llm():
    """SmolLM2-135M-Instruct dequantized to float32 on the CPU (shared: tests must not change its settings)."""
    from llamarun import Llama

    return Llama.load(device="cpu", dtype="float32", quantize="none")


_GGUF_READERS: dict = {}


@contextlib.contextmanager
def hf_gguf_memoized():
    """transformers' GGUF loading without its repeated work, which took ~25 s of the suite on a 2-core VM:
    it parses a file's metadata with a new ``gguf.GGUFReader`` for the config, the weights and the
    tokenizer (~5 s each for SmolLM2's 49k-token vocabulary), and rebuilds gguf's tensor-name map for
    every tensor (~14 s). Both are pure functions of their arguments (the reader is only read from), so
    memoizing them changes nothing that is loaded."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def cached_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in _GGUF_READERS:
            _GGUF_READERS[key] = reader(path, mode)
        return _GGUF_READERS[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


@pytest.fixture(scope="session")
def hf_model(default_model_path):
    """HF transformers loading the same GGUF in float32: the reference implementation."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    p = default_model_path
    with hf_gguf_memoized():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                                  dtype=torch.float32)
    return model.eval()


def run_cli(*args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m llamarun ARGS`` as a user would, capturing text output."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("LLAMARUN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llamarun", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env=env, cwd=REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """The CLI failed the way users should see failures: exit code, no traceback, one error line (after
    at most the one-line announcement of what was loaded, for failures that happen after loading)."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert 1 <= len(lines) <= 2, proc.stderr
    if len(lines) == 2:
        assert lines[0].startswith("llamarun: ") and " on " in lines[0] and "error" not in lines[0], lines[0]
    assert lines[-1].startswith("llamarun: error:"), lines[-1]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
