"""benchmarks/gguf_load.py: the llama.cpp-recipe file it writes (types per tensor, llama.cpp's fallback for
rows that do not split into 256-blocks) loads in llamarun with the plan the recipe implies. No timing is
checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from llamarun.formats import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gguf_load.py"


def test_q4_k_m_recipe_file_loads_as_int4_int8(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "stories15m", "--recipe", "q4_k_m",
                           "--dir", str(tmp_path), "--runs", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["plan"] == "int4+int8" and report["load_s"] > 0 and report["peak_rss_mib"] > 0
    ckpt = load_checkpoint(tmp_path / "stories15m.q4_k_m.gguf")
    types = ckpt.tensor_types
    # 6 layers: 2 and 5 get more bits. dim 288 does not split into 256-blocks: Q4_K -> Q5_0 and Q6_K -> Q8_0
    # there; ffn_down's 768 inputs do.
    assert types["layers.1.attention.wq.weight"] == "Q5_0" and types["layers.1.attention.wv.weight"] == "Q5_0"
    assert types["layers.2.attention.wv.weight"] == "Q8_0"
    assert types["layers.2.feed_forward.w2.weight"] == "Q6_K" and types["layers.1.feed_forward.w2.weight"] == "Q4_K"
    assert types["output.weight"] == "Q8_0"
