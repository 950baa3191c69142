"""benchmarks/kernel_bench.py: the thread pool's hand-off table runs, prints one row per product size, and leaves
the kernels following torch's thread count again. Timings themselves are never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_script
from llamarun import kernels

bench = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py", "llamarun_bench_kernels")


@pytest.mark.skipif(not kernels.available(), reason="llamarun kernels not built here")
def test_handoff_table_rows_and_thread_reset(capsys):
    bench.handoff_table(rounds=1)
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("call overhead")
    rows = [line.split() for line in out if "x 288" in line]
    assert [r[0] for r in rows] == ["112", "288", "864"]
    assert [int(r[3]) for r in rows] == [2, 5, 8]  # the table restates qlinear.cpp's rule (64 KB a chunk, <= 8)
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    # Left following torch's thread count (0), not pinned to the 1 or 2 threads it measured with.
    assert torch.ops.llamarun.set_num_threads(0) == 0


@pytest.mark.skipif(not kernels.available(), reason="llamarun kernels not built here")
def test_model_rows_time_the_engines_model(capsys):
    """The whole-model rows time the default model as the engine runs it (the fused fast path and its KV
    cache dtype), not a model built without it, and print one row per batch, configuration and mode."""
    from llamarun.fastpath import FastTransformer

    models = bench.load_models(["int4"])
    model, kv_dtype = models["int4"]
    assert isinstance(model, FastTransformer) and kv_dtype == torch.float16
    bench.model_decode([1, 2], ["int4"], steps=2, rounds=1, configs=["1x1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("batch")]
    assert [(r[1], r[2], r[3]) for r in rows] == [("1", "1x1", "int4"), ("2", "1x1", "int4")]
    assert all(float(r[5]) > 0 for r in rows)
