"""benchmarks/llama2c.py: the stories15M-shaped checkpoint it makes (loads in llamarun with the right shape,
generates, never greedily picks BOS, which would stop run.c early), its one-line usage errors, and its
table. run.c itself is never needed: the engines are replaced by stubs where timing is concerned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "llama2c.py"
bench = load_script(SCRIPT, "llamarun_bench_llama2c")
needs_tokenizer = pytest.mark.skipif(not bench.DEFAULT_TOKENIZER.is_file(),
                                     reason=f"{bench.DEFAULT_TOKENIZER} not present")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture(scope="module")
def stories_v0(tmp_path_factory) -> Path:
    return bench.make_checkpoint(tmp_path_factory.mktemp("l2c") / "stories15M.bin", bench.DEFAULT_TOKENIZER, 0)


@needs_tokenizer
def test_checkpoint_has_stories15m_shape(stories_v0):
    from llamarun.formats import load_checkpoint

    ckpt = load_checkpoint(stories_v0, bench.DEFAULT_TOKENIZER)
    a = ckpt.args
    assert ckpt.format == "llama2c" and a.extra["llama2c_version"] == 0
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.hidden_dim, a.vocab_size, a.max_seq_len) == (
        288, 6, 6, 6, 768, 32000, 256)
    assert a.tie_embeddings and a.rope_theta == 10000.0
    assert set(ckpt.tensor_types.values()) == {"F32"}
    # The file holds exactly the seeded weights (written losslessly), with BOS's row shrunk.
    emb = ckpt.tensors["tok_embeddings.weight"]
    assert torch.equal(emb, bench.random_weights(bench.stories15m_args())["tok_embeddings.weight"])
    assert emb[bench.BOS].norm() < 0.05 * emb[2:100].norm(dim=1).min()


@needs_tokenizer
def test_llamarun_generates_without_bos(stories_v0):
    from llamarun import Llama
    from llamarun.sampling import SamplingParams

    llm = Llama.load(stories_v0, tokenizer_path=bench.DEFAULT_TOKENIZER, device="cpu", dtype="float32",
                     quantize="none", threads=1)
    prompt = llm.tokenizer.encode(bench.PROMPT)
    assert prompt[0] == bench.BOS  # run.c starts from BOS too
    out = [r.token for r in llm.stream([prompt], 24, SamplingParams(temperature=0.0), ignore_eos=True)]
    assert len(out) == 24 and bench.BOS not in out and all(0 <= t < 32000 for t in out)


@needs_tokenizer
def test_q80_checkpoint_for_runq(tmp_path):
    from llamarun.formats import load_checkpoint

    path = bench.make_checkpoint(tmp_path / "stories15M_q80.bin", bench.DEFAULT_TOKENIZER, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stories15M_q80.bin"]  # no tokenizer.bin beside it
    ckpt = load_checkpoint(path, bench.DEFAULT_TOKENIZER)
    assert ckpt.args.extra["llama2c_version"] == 2 and ckpt.args.tie_embeddings
    assert path.read_bytes()[37:41] == (32).to_bytes(4, "little")  # 288 is no multiple of 64: group 32
    assert "Q8_0" in ckpt.tensor_types.values()


def test_decode_steps_fill_the_context_exactly():
    """The script sizes llamarun's decode run with llamarun bench's prompt length: prompt + decode tokens
    + the prefill's token = the steps run.c runs, which llamarun bench accepts for a 256-token context."""
    from types import SimpleNamespace

    from llamarun.bench import DECODE_PROMPT, check_fits
    from llamarun.errors import UsageError

    assert bench.DECODE_PROMPT_LEN == DECODE_PROMPT
    llm = SimpleNamespace(max_seq_len=bench.STORIES15M["max_seq_len"])
    steps = llm.max_seq_len
    check_fits(llm, SimpleNamespace(prefill=[8], decode_tokens=steps - bench.DECODE_PROMPT_LEN - 1))
    with pytest.raises(UsageError, match="does not fit the context of 256 tokens"):
        check_fits(llm, SimpleNamespace(prefill=[8], decode_tokens=steps - bench.DECODE_PROMPT_LEN))


@pytest.mark.parametrize("args, expected", [
    ((), "--runc PATH is required"),
    (("--runc", "/nonexistent/run"), "no such file"),
    (("--runc", str(SCRIPT.parent / "compare.py")), "not executable"),
])
def test_bad_runc_is_one_line_exit_2(args, expected):
    proc = run_script(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama2c.py: error: ") and expected in lines[0]
    assert proc.stdout == ""


def test_table_ratios_and_alternating_order():
    order = []

    def column(engine, weights, speeds):
        it = iter(speeds)
        return {"engine": engine, "weights": weights,
                "measure": lambda: order.append(engine) or {"tok_s": next(it)}}

    cols = [column("run.c", "fp32", [100.0, 120.0]), column("llamarun", "fp32", [150.0, 90.0])]
    bench.measure(cols, 2, log=lambda _: None)
    bench.ratios(cols)
    assert order == ["run.c", "llamarun", "llamarun", "run.c"]
    assert cols[0]["best_tok_s"] == 120.0 and cols[1]["best_tok_s"] == 150.0
    assert cols[1]["vs_run.c"] == 1.25 and cols[0]["vs_run.c"] == 1.0
    table = bench.format_table(cols, 2)
    assert "| llamarun | fp32 | 150.0 | 120.0 | 1.25x |" in table
