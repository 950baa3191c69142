"""benchmarks/gpu_bench.py on CPU with the tiny shape: every mode runs, its linear-layer check passes, the
JSON holds a positive speed for every mode and batch; bad arguments exit 2 with one line. No timings asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_bench.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_tiny_cpu_run(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--device", "cpu", "--tiny", "--steps", "3", "--warmup", "1", "--batches", "1", "4",
                     "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())

    assert report["shape"]["dim"] == 256 and report["eager"]
    assert {c["mode"] for c in report["checks"]} == {"bf16", "int8", "int4"}
    assert all(c["ok"] and c["rel_err"] < 0.03 for c in report["checks"]), report["checks"]
    runs = {(r["mode"], r["batch"]): r for r in report["results"]}
    assert set(runs) == {("bf16", 1), ("int8", 1), ("int4", 1), ("bf16", 4)}
    for r in runs.values():
        assert r["tok_s"] > 0 and r["weight_gbps"] > 0 and r["kv_bytes_per_step"] > 0
        assert r["frac_copy"] > 0 and r["frac_spec"] is None  # no spec bandwidth for a CPU
    # quantized formats store fewer weight bytes than bf16
    bf16, int8, int4 = (runs[m, 1]["weight_bytes_per_step"] for m in ("bf16", "int8", "int4"))
    assert int4 < int8 < bf16
    assert "| int4 | 1 |" in proc.stdout and "check int4" in proc.stdout


def test_bad_shape_exits_2():
    proc = run_bench("--device", "cpu", "--tiny", "--hidden", "700")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "int4 needs" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exits_2():
    proc = run_bench("--device", "cuda")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "cuda" in proc.stderr


ENGINE = REPO / "benchmarks" / "gpu_engine.py"


def test_engine_script_tiny_cpu_run(tmp_path):
    """benchmarks/gpu_engine.py's CPU smoke run: bf16, int4 without and with tinygemm (its CPU twin) through
    Llama.generate, tinygemm's logits near the other path's."""
    out = tmp_path / "engine.json"
    proc = subprocess.run([sys.executable, str(ENGINE), "--device", "cpu", "--tiny", "--tokens", "6", "--json",
                           str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["results"]] == ["bf16", "int4 without tinygemm", "int4, tinygemm"]
    assert all(r["tok_s"] > 0 for r in report["results"])
    assert report["results"][1]["note"] == "disabled by LLAMARUN_TINYGEMM=0"
    assert report["swapped"] == 8 and report["tinygemm_rel_err"] < 5e-2  # 2 layers x 4 int4 linears
    assert "| CPU | int4, tinygemm | 1 |" in proc.stdout


def test_engine_script_bad_arguments():
    proc = subprocess.run([sys.executable, str(ENGINE), "--device", "cpu", "--tokens", "0"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("must be >= 1")
