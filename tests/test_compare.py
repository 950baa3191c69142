"""benchmarks/compare.py: structure of its table and JSON, ratios derived from the numbers, and failing
engines reported in their column. Never asserts timings (only that they are positive numbers)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script
from llamarun import device, kernels
from test_cli import write_tiny_gguf

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare.py"


compare = load_script(SCRIPT, "llamarun_bench_compare")


def run_compare(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("compare") / "tiny.gguf")


def test_quick_run_llamarun_only(tiny_gguf, tmp_path):
    out = tmp_path / "out.json"
    # --quick gives batch 1 8; explicit --decode-tokens and --prefill win over it. The tiny model's context is
    # 64 tokens, so prefill 128 cannot run and must be noted, not fail.
    proc = run_compare("-m", str(tiny_gguf), "--quick", "--engines", "llamarun", "--modes", "auto,none",
                       "--threads", "1", "--prefill", "24", "128", "--decode-tokens", "4", "--json", str(out),
                       "--markdown", "--context", "20", "60")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(out.read_text())
    meta = report["meta"]
    assert meta["batch"] == [1, 8] and meta["prefill"] == [24, 128] and meta["decode_tokens"] == 4
    assert meta["context"] == [20, 60]
    assert meta["threads"] == 1 and meta["same_prompts"] == "yes"
    assert list(report["results"]) == ["llamarun auto", "llamarun none"]
    want_dtype = "bf16" if device.cpu_has_fast_bf16() or kernels.available() else "fp32"
    for name, r in report["results"].items():
        assert "error" not in r, (name, r)
        assert r["engine"] == "llamarun" and r["threads"] == 1
        assert r["load_to_ready_s"] > 0 and r["load_to_ready_s"] >= r["import_s"] and r["load_s"] > 0
        assert set(r["prefill"]) == {"24"} and r["prefill"]["24"] > 0
        assert any("prefill 128" in n and "context" in n for n in r["notes"]), r["notes"]
        assert set(r["decode"]) == {"1", "8"} and all(v > 0 for v in r["decode"].values())
        # 20 + 4 decode steps fit the 64-token context; 60 + 4 do not: noted, not failed
        assert set(r["context"]) == {"20"} and r["context"]["20"] > 0
        assert any("decode at 60 tokens of context" in n for n in r["notes"]), r["notes"]
        # The tiny model is float32 and unquantized: bf16 weights with the kernels (or native bf16)
        assert r["peak_rss_mib"] > 0 and r["weights"] == want_dtype and r["kernels"] == "n/a"
        assert set(r["engine_reported"]["decode"]) == {"1", "8"}
        assert r["cpu_wait"] is None or r["cpu_wait"] >= 0  # a share of time, whatever the machine's load
    assert report["ratios"] == {}  # no reference column ran
    assert [k for k, _, _ in report["rows"]] == ["weights", "load_to_ready_s", "prefill_24", "prefill_128",
                                                 "decode_1", "decode_8", "context_20", "context_60", "peak_rss_mib",
                                                 "cpu_wait"]
    lines = proc.stdout.splitlines()
    assert lines[0].replace(" ", "") == "||llamarunauto|llamarunnone|"
    table = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines if ln.startswith("| ")}
    assert table["prefill 128 tok (tok/s)"] == ["—", "—"]
    assert float(table["decode batch 8, aggregate (tok/s)"][1]) > 0
    assert float(table["decode batch 1 at 20 tokens of context (tok/s)"][0]) > 0
    assert "llama.cpp" not in proc.stdout  # not requested, so not even a skip note
    assert "[1/2] llamarun auto" in proc.stderr and "[2/2] llamarun none: ok" in proc.stderr


def _result(engine, load, p128, d1, d8, rss, **extra):
    return dict(engine=engine, weights="fp32", load_to_ready_s=load, prefill={"128": p128} if p128 else {},
                decode={"1": d1, "8": d8}, peak_rss_mib=rss, **extra)


def _report(results):
    rows = compare.table_rows([128], [1, 8])
    meta = dict(model="/m/x.gguf", threads=2, cpu="cpu", decode_tokens=16, same_prompts="yes",
                loadavg_before=[1.0, 1.0, 1.0], loadavg_after=[2.0, 1.0, 1.0], wall_s=12.0)
    return {"meta": meta, "rows": [list(r) for r in rows], "results": results,
            "ratios": compare.compute_ratios(results, rows), "notes": ["llama.cpp: skipped (not importable)"]}


def test_sources_are_byte_compiled_before_the_workers(tmp_path, monkeypatch):
    """The workers import llamarun compiled, as an installed package's is: _byte_compile writes the bytecode
    of every module that lacks it, PYTHONDONTWRITEBYTECODE or not, and run() does it for llamarun's columns."""
    import importlib.util

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for f in (pkg / "__init__.py", pkg / "sub" / "mod.py"):
        f.write_text("X = 1\n")
    compare._byte_compile(pkg)
    for f in (pkg / "__init__.py", pkg / "sub" / "mod.py"):
        assert Path(importlib.util.cache_from_source(str(f))).is_file(), f
    compiled = []
    monkeypatch.setattr(compare, "_byte_compile", compiled.append)
    monkeypatch.setattr(compare, "run_column", lambda col, args: {"error": "skipped", "wall_s": 0.0})
    compare.run(compare.parse_args(["--engines", "llamarun", "--modes", "auto", "-m", str(tmp_path / "m.gguf")]),
                log=io.StringIO())
    assert compiled == [compare.REPO / "llamarun"]


def test_ratios_are_computed_from_the_numbers():
    results = {
        "llamarun auto": _result("llamarun", 2.0, 300.0, 40.0, 200.0, 500.0),
        "llamarun none": _result("llamarun", 4.0, None, 20.0, 100.0, 900.0),
        "hf fp32": _result("hf", 8.0, 150.0, 10.0, 0.0, 1000.0),
        "hf bf16": {"engine": "hf", "error": "RuntimeError: boom", "load_to_ready_s": 5.0, "prefill": {}, "decode": {}},
    }
    report = _report(results)
    ratios = report["ratios"]
    assert list(ratios) == ["llamarun auto / hf fp32", "llamarun auto / hf bf16",
                            "llamarun none / hf fp32", "llamarun none / hf bf16"]
    for pair, got in ratios.items():
        a, b = (results[x] for x in pair.split(" / "))
        for key, _, better in compare.table_rows([128], [1, 8]):
            if better is None:
                assert key not in got
                continue
            x, y = compare.cell_value(a, key), compare.cell_value(b, key)
            want = round(x / y, 2) if x is not None and y else None  # missing or zero -> no ratio
            assert got[key] == want, (pair, key)
    assert ratios["llamarun auto / hf fp32"]["decode_1"] == 4.0
    assert ratios["llamarun auto / hf fp32"]["load_to_ready_s"] == 0.25
    assert ratios["llamarun auto / hf fp32"]["decode_8"] is None  # reference measured 0
    assert ratios["llamarun none / hf fp32"]["prefill_128"] is None  # llamarun value missing
    assert ratios["llamarun auto / hf bf16"]["load_to_ready_s"] == 0.4  # a failed column keeps what it measured

    text = compare.format_report(report)
    assert "FAILED: RuntimeError: boom" in text  # in its column (status row) and in the notes
    status = next(ln for ln in text.splitlines() if ln.startswith("status"))
    assert status.split()[1:4] == ["ok", "ok", "ok"]
    assert "4.00×" in text and "0.25×" in text and "llama.cpp: skipped" in text
    md = compare.format_report(report, markdown=True)
    assert md.splitlines()[0] == "|  | llamarun auto | llamarun none | hf fp32 | hf bf16 |"
    assert "| auto / hf fp32 | auto / hf bf16 | none / hf fp32 | none / hf bf16 |" in md
    assert "| decode batch 1 (tok/s) | 4.00× | — | 2.00× | — |" in md


def test_failures_become_one_line_errors(tmp_path):
    out = str(tmp_path / "r.json")
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    assert compare.run_subprocess(crash, out, timeout=30) == {"error": "crashed (SIGSEGV)"}

    stderr = [sys.executable, "-c", "import sys; sys.stderr.write('noise\\nValueError: bad thing\\n'); sys.exit(3)"]
    assert compare.run_subprocess(stderr, out, timeout=30)["error"] == "ValueError: bad thing"

    partial = [sys.executable, "-c", "import json, time; json.dump({'prefill': {'128': 5.0}}, open(%r, 'w')); "
               "time.sleep(60)" % out]
    res = compare.run_subprocess(partial, out, timeout=2)
    assert res == {"prefill": {"128": 5.0}, "error": "timed out after 2 s"}  # what it measured is kept


def test_missing_model_fails_in_its_column(tmp_path):
    out = tmp_path / "out.json"
    proc = run_compare("-m", str(tmp_path / "nope.gguf"), "--quick", "--engines", "llamarun", "--modes", "none",
                       "--json", str(out))
    assert proc.returncode == 1  # a llamarun column failed
    assert "Traceback" not in proc.stdout + proc.stderr
    r = json.loads(out.read_text())["results"]["llamarun none"]
    assert "nope.gguf" in r["error"] and "\n" not in r["error"]
    assert "FAILED:" in proc.stdout and "peak_rss_mib" not in r and r["peak_rss_mib_at_failure"] > 0


def test_rounds_keep_the_best_of_each_cell():
    a = dict(engine="hf", load_to_ready_s=3.0, prefill={"128": 10.0}, decode={"1": 5.0, "8": 30.0},
             context={"1000": 3.0}, peak_rss_mib=100.0, cpu_wait=0.5, wall_s=10.0)
    b = dict(engine="hf", load_to_ready_s=2.0, prefill={"128": 8.0}, decode={"1": 6.0, "8": 20.0},
             context={"1000": 4.0}, peak_rss_mib=110.0, cpu_wait=0.01, wall_s=9.0)
    m = compare.merge_rounds(a, b)
    assert m["load_to_ready_s"] == 2.0 and m["prefill"] == {"128": 10.0} and m["decode"] == {"1": 6.0, "8": 30.0}
    assert m["context"] == {"1000": 4.0}
    assert m["peak_rss_mib"] == 110.0 and m["cpu_wait_rounds"] == [0.5, 0.01] and m["wall_s"] == 19.0
    assert compare.cell_value(m, "cpu_wait") == "50%/1%"
    failed = compare.merge_rounds(m, {"engine": "hf", "error": "crashed (SIGSEGV)", "cpu_wait": None})
    assert failed["decode"] == m["decode"] and "error" not in failed
    assert failed["notes"] == ["a later round failed: crashed (SIGSEGV)"]
    assert compare.cell_value(failed, "cpu_wait") == "50%/1%/?"


def test_rounds_alternate_the_order_and_flag_busy_columns(monkeypatch):
    calls = []

    def fake_run_column(col, args):
        calls.append(col["name"])
        k = len(calls)
        return {"engine": col["engine"], "mode": col["mode"], "load_to_ready_s": 1.0 + k, "prefill": {"128": 10.0 * k},
                "decode": {"1": 1.0, "8": 8.0}, "peak_rss_mib": 100.0, "prompt_digest": "abc", "wall_s": 1.0,
                "cpu_wait": 0.5 if col["engine"] == "hf" else 0.0}

    monkeypatch.setattr(compare, "run_column", fake_run_column)
    args = compare.parse_args(["-m", "/x/m.gguf", "--engines", "llamarun,hf", "--modes", "auto", "none",
                               "--hf-dtypes", "fp32", "--rounds", "2", "--threads", "2", "--quick"])
    report = compare.run(args, log=io.StringIO())
    assert calls == ["llamarun auto", "llamarun none", "hf fp32", "hf fp32", "llamarun none", "llamarun auto"]
    res = report["results"]
    assert res["llamarun auto"]["prefill"] == {"128": 60.0} and res["llamarun auto"]["load_to_ready_s"] == 2.0
    assert res["hf fp32"]["cpu_wait_rounds"] == [0.5, 0.5] and report["meta"]["same_prompts"] == "yes"
    assert report["ratios"]["llamarun auto / hf fp32"]["prefill_128"] == 1.5  # 60 / best of hf (40)
    busy = [n for n in report["notes"] if "waited for a CPU" in n]
    assert len(busy) == 1 and busy[0].startswith("hf fp32: ") and "50%/50%" in busy[0]


def test_kv_dtype_columns(tiny_gguf, tmp_path):
    """--kv-dtypes: a llamarun column for each mode and KV cache dtype, the worker loading with it."""
    a = compare.parse_args(["--engines", "llamarun", "--modes", "auto", "none", "--kv-dtypes", "auto,int8"])
    assert [c["name"] for c in compare.columns(a)[0]] == ["llamarun auto", "llamarun auto kv int8", "llamarun none",
                                                          "llamarun none kv int8"]
    out = tmp_path / "out.json"
    proc = run_compare("-m", str(tiny_gguf), "--quick", "--engines", "llamarun", "--modes", "auto", "--kv-dtypes",
                       "int8", "--threads", "1", "--prefill", "24", "--batch", "2", "--decode-tokens", "2",
                       "--json", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = json.loads(out.read_text())["results"]["llamarun auto kv int8"]
    assert "error" not in r and r["kv_dtype"] == "int8" and r["decode"]["2"] > 0


def test_parse_args_defaults_quick_and_validation(capsys):
    a = compare.parse_args([])
    assert (a.prefill, a.batch, a.decode_tokens, a.context) == ([128, 512], [1, 8, 16], 32, [])
    assert a.engines == ["llamarun", "hf", "llama.cpp"] and a.modes == ["auto", "none"]
    # bf16 only where the CPU computes it natively, unless asked for
    assert a.hf_dtypes == (["float32", "bfloat16"] if compare._cpu_has_native_bf16() else ["float32"])
    assert compare.parse_args(["--hf-dtypes", "fp32", "bf16"]).hf_dtypes == ["float32", "bfloat16"]
    q = compare.parse_args(["--quick", "--batch", "2", "2", "--engines", "llamarun", "llamacpp", "--hf-dtypes", "bf16"])
    assert (q.prefill, q.batch, q.decode_tokens) == ([128], [2], 16)
    assert q.engines == ["llamarun", "llama.cpp"] and q.hf_dtypes == ["bfloat16"]
    for bad in (["--modes", "int3"], ["--engines", "vllm"], ["--batch", "0"], ["--hf-dtypes", "fp8"],
                ["--kv-dtypes", "int4"]):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)
    assert "unknown" in capsys.readouterr().err


def test_same_prompts_in_every_process():
    p = compare.make_prompts(49152, 2, 16)
    assert p == compare.make_prompts(49152, 2, 16) and len(p) == 2 and all(len(r) == 16 for r in p)
    assert all(0 <= t < 49152 for r in p for t in r) and p[0] != p[1]
    code = f"import importlib.util as u; s=u.spec_from_file_location('c', {str(SCRIPT)!r}); m=u.module_from_spec(s); " \
           "s.loader.exec_module(m); print(m.make_prompts(49152, 2, 16))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": "123"},
                           timeout=60)
    assert json.loads(other.stdout) == p


def test_llama_cpp_engine_runs_sequences_as_a_batch():
    """The llama.cpp column's batched decode (one llama_batch of one token per sequence, one shared KV cache)
    picks the same greedy tokens per row as one sequence at a time. Runs where llama-cpp-python is installed."""
    pytest.importorskip("llama_cpp")
    from llamarun.generation import default_model_path

    # Without llama.cpp's AMX / repacked-weight buffers: its AMX matmul segfaults on some machines (see
    # run_column), which would take pytest down with it; this test is about our batching.
    spec = {"model": str(default_model_path()), "batch": [1, 3], "prefill": [32], "decode_tokens": 4, "context": [],
            "threads": 2, "extra_bufts": False}
    eng = compare.LlamaCppEngine(spec)
    prompts = compare.make_prompts(eng.vocab, 3, compare.DECODE_PROMPT_LEN)
    together = eng._prefill(prompts)
    assert together == [eng._prefill([p])[0] for p in prompts]
    assert eng.decode(prompts, 4) > 0 and eng.prefill(prompts[0][:8]) > 0


def test_a_crashing_llama_cpp_column_runs_again_without_extra_buffers(monkeypatch):
    """llama.cpp's AMX path crashed (SIGSEGV) on a Sapphire Rapids VM: the column is run again without its
    extra CPU buffer types, and the table says so; other engines' crashes are reported as they are."""
    calls = []

    def fake(col, args, extra_bufts=True):
        calls.append((col["engine"], extra_bufts))
        return {"error": "crashed (SIGSEGV)"} if extra_bufts else {"weights": "gguf as stored", "decode": {"1": 9.0}}

    monkeypatch.setattr(compare, "_run_column", fake)
    out = compare.run_column({"engine": "llama.cpp", "mode": "gguf", "name": "llama.cpp"}, None)
    assert calls == [("llama.cpp", True), ("llama.cpp", False)]
    assert "error" not in out and out["decode"] == {"1": 9.0} and out["weights"].endswith("(no AMX/repack)")
    assert out["notes"][0].startswith("crashed (SIGSEGV) with its extra CPU buffer types")
    calls.clear()
    assert compare.run_column({"engine": "hf", "mode": "fp32", "name": "hf fp32"}, None)["error"] == "crashed (SIGSEGV)"
    assert calls == [("hf", True)]
