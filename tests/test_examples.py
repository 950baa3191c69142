"""The Meta-style example scripts, run as users run them: with python and with torchrun (one process)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _ckpt_utils import random_weights, tiny_args, train_sentencepiece, write_meta
from conftest import load_script

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Runs a script as __main__ inside torchrun's worker, then reports whether anything created a process
# group: llamarun must not (a world of one needs none, and this PyTorch may have no NCCL).
TORCHRUN_WRAPPER = """\
import runpy, sys
import torch.distributed as dist
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print(f"process_group_initialized={dist.is_initialized()}")
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny 2-shard Meta checkpoint (tokenizer.model beside params.json, as in Meta's downloads)."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("examples")
    # Trained on the examples' own text, so their prompts are short and the runs quick.
    text = "\n".join(p.read_text() for p in EXAMPLES.glob("example_*.py"))
    model = train_sentencepiece(root, vocab_size=1000, extra_text=text)
    args = tiny_args(spm.SentencePieceProcessor(model_file=str(model)).vocab_size())
    return write_meta(root / "llama-tiny", args, random_weights(args, seed=5), n_shards=2, tokenizer=model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=EXAMPLES.parent)


def test_examples_with_python_and_torchrun(ckpt, tmp_path):
    text, chat = EXAMPLES / "example_text_completion.py", EXAMPLES / "example_chat_completion.py"
    tok = ckpt / "tokenizer.model"
    runs = {
        # Meta's README spellings: "--flag value", and fire's "--flag=value" / positional paths.
        "text": _start([sys.executable, text, "--ckpt_dir", ckpt, "--tokenizer_path", tok, "--max_seq_len", 512,
                        "--max_gen_len", 8, "--max_batch_size", 4]),
        "chat": _start([sys.executable, chat, ckpt, tok, "--max_seq_len=512", "--max_gen_len=8", "--temperature=0"]),
    }
    torchrun = shutil.which("torchrun") or shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun:
        wrapper = tmp_path / "wrapper.py"
        wrapper.write_text(TORCHRUN_WRAPPER)
        for name, script, extra in (("torchrun text", text, ["--max_gen_len", "8", "--max_seq_len", "512"]),
                                    ("torchrun chat", chat, ["--max_gen_len", "8"])):
            runs[name] = _start([torchrun, "--nproc_per_node", 1, "--master_port", _free_port(), wrapper, script,
                                 "--ckpt_dir", ckpt, "--tokenizer_path", tok, *extra])
    results = {name: p.communicate(timeout=300) + (p.returncode,) for name, p in runs.items()}

    for name, (out, err, code) in results.items():
        assert code == 0, f"{name} failed:\n{err[-3000:]}"
        assert "Traceback" not in err, err
        kind = name.split()[-1]
        answers = [line for line in out.splitlines() if line.startswith("> ")]
        separators = out.count("==================================")
        if kind == "text":
            assert len(answers) == separators == 4, out
            assert "I believe the meaning of life is" in out and "cheese =>" in out
        else:
            assert len(answers) == separators == 6, out
            assert all(a.startswith("> Assistant: ") for a in answers), answers
            assert "User: what is the recipe of mayonnaise?" in out and "System: Always answer with Haiku" in out
            assert answers[-1] == "> Assistant: Error: special tags are not allowed as part of the prompt."
        if name.startswith("torchrun"):
            assert "process_group_initialized=False" in out, out
    if not torchrun:
        pytest.skip("torchrun is not installed: only the plain python runs were checked")


def test_example_arguments():
    """Meta's fire-style command lines parse; mistakes are argparse usage errors (exit 2)."""
    mod = load_script(EXAMPLES / "_args.py", "_args")
    defaults = dict(max_seq_len=128, max_batch_size=4, max_gen_len=64)
    a = mod.parse_args("x", argv=["--ckpt_dir", "d", "--tokenizer_path=t.model", "--max-seq-len", "256",
                                  "--temperature=0"], **defaults)
    assert (a.ckpt_dir, a.tokenizer_path, a.max_seq_len, a.temperature, a.max_gen_len) == ("d", "t.model", 256, 0.0, 64)
    a = mod.parse_args("x", argv=["d", "t.model", "--max_batch_size=2"], **defaults)
    assert (a.ckpt_dir, a.tokenizer_path, a.max_batch_size, a.top_p) == ("d", "t.model", 2, 0.9)
    for argv in (["--max_seq_len", "64"], ["--ckpt_dir", "d", "--bogus", "1"], ["d", "--ckpt_dir", "e"]):
        with pytest.raises(SystemExit) as e:
            mod.parse_args("x", argv=argv, **defaults)
        assert e.value.code == 2


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_example_errors_are_one_line(script, tmp_path):
    """A bad checkpoint path ends the example with one line and exit code 2, not a traceback."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--ckpt_dir", str(tmp_path / "nonexistent")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nonexistent'}: no such file or directory"]
