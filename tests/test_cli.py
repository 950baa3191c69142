"""The command line as a user runs it: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _ckpt_utils import run_cli_in_process
from conftest import REPO, assert_one_line_error, run_cli


def write_tiny_gguf(path: Path, arch: str = "llama", weight_type=None, n_layers: int = 1, dim: int = 32,
                    hidden: int = 64, raw_types: dict | None = None, untied: bool = False) -> Path:
    """A tiny random LLaMA GGUF with a byte-level gpt2 vocabulary (256 bytes + one merge). ``raw_types``
    (GGUF tensor name -> type) gives tensors random blocks of a type gguf.quants cannot quantize to;
    ``untied`` adds an output layer of its own."""
    import gguf
    from llamarun.tokenizer import bytes_to_unicode

    from _ckpt_utils import random_gguf_blocks

    vocab = 257
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(hidden)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(list(bytes_to_unicode().values()) + ["ab"])
    w.add_token_merges(["a b"])
    w.add_token_types([1] * vocab)
    w.add_eos_token_id(0)
    rng = np.random.default_rng(0)

    def tensor(name, shape):
        a = rng.standard_normal(shape).astype(np.float32)
        if raw_types and name in raw_types:
            w.add_tensor(name, random_gguf_blocks(raw_types[name], shape, rng), raw_dtype=raw_types[name])
        elif weight_type == gguf.GGMLQuantizationType.Q8_1:  # no quantizer for it: raw zero blocks will do
            raw = np.zeros(gguf.quants.quant_shape_to_byte_shape(shape, weight_type), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=weight_type)
        elif weight_type is not None and len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(a, weight_type), raw_dtype=weight_type)
        else:
            w.add_tensor(name, a)

    tensor("token_embd.weight", (vocab, dim))
    if untied:
        tensor("output.weight", (vocab, dim))
    tensor("output_norm.weight", (dim,))
    for i in range(n_layers):
        for n, shape in [("attn_norm", (dim,)), ("ffn_norm", (dim,)), ("attn_q", (dim, dim)), ("attn_k", (dim // 2, dim)),
                         ("attn_v", (dim // 2, dim)), ("attn_output", (dim, dim)), ("ffn_gate", (hidden, dim)),
                         ("ffn_up", (hidden, dim)), ("ffn_down", (dim, hidden))]:
            tensor(f"blk.{i}.{n}.weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_generate_paris():
    proc = run_cli("generate", "The capital of France is", "-n", "8", "-t", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(" Paris"), proc.stdout
    assert "decode" in proc.stderr and "tok/s" in proc.stderr and "load" in proc.stderr
    assert "cpu int4 weights, float32 activations" in proc.stderr  # the embedded Q4_1 model, kept 4-bit
    assert "float16 KV cache" in proc.stderr
    proc = run_cli("generate", "The capital of France is", "-n", "8", "-t", "0", "--kv-dtype", "float32")
    assert proc.returncode == 0 and proc.stdout.startswith(" Paris"), proc.stderr
    assert "float32 KV cache" in proc.stderr
    proc = run_cli("generate", "The capital of France is", "-n", "8", "-t", "0", "--kv-dtype", "int8")
    assert proc.returncode == 0 and proc.stdout.startswith(" Paris"), proc.stderr
    assert "int8 KV cache" in proc.stderr


def test_generate_json_batch_and_logprobs():
    proc = run_cli("generate", "The capital of France is", "def fibonacci(n):", "-n", "6", "-t", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["prompt"] for r in out["results"]] == ["The capital of France is", "def fibonacci(n):"]
    first = out["results"][0]
    assert first["text"].startswith(" Paris")
    assert len(first["tokens"]) == len(first["logprobs"]) <= 6
    assert all(lp <= 0 for lp in first["logprobs"])
    assert out["stats"]["generated_tokens"] >= 1 and out["stats"]["decode_tok_s"] >= 0
    assert out["stats"]["weights"] == "int4" and out["stats"]["dtype"] == "float32"


def test_tiny_model_stdin_echo_seed(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    args = ["generate", "-m", str(model), "-n", "5", "--seed", "7", "--echo", "-t", "1.0"]
    a = run_cli(*args, input="hello")
    b = run_cli(*args, input="hello")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("hello")


def test_generate_with_compiled_decode_step(tmp_path, monkeypatch, capsys):
    """--compile: same greedy text as eager, the compile announced (with the CPU note) on stderr; for a
    Q8_0 file (whose quantized embedding looks tokens up through the kernels, eagerly) and an int8 KV cache."""
    import gguf

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = write_tiny_gguf(tmp_path / "tiny.gguf", weight_type=gguf.GGMLQuantizationType.Q8_0)
    args = ["generate", "-m", str(model), "-n", "6", "-t", "0", "--max-seq-len", "32", "--kv-dtype", "int8", "hello"]
    eager, compiled = run_cli_in_process(args, capsys), run_cli(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout
    assert "compiled in" in compiled.stderr and "note: on a CPU" in compiled.stderr


def test_info_default_model():
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == "gguf" and info["layers"] == 30 and info["kv_heads"] == 3
    assert info["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert info["tokenizer"]["type"] == "BPETokenizer" and 2 in info["tokenizer"]["stop_ids"]
    text = run_cli("info").stdout
    assert "parameters" in text and "134." in text


@pytest.mark.parametrize("quant", [None, "Q8_0", "Q4_0"])
def test_tiny_quantized_models_run(tmp_path, quant, capsys):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    model = write_tiny_gguf(tmp_path / "t.gguf", weight_type=qtype)
    proc = run_cli_in_process(["generate", "-m", str(model), "ab", "-n", "3", "-t", "0", "--json"], capsys)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["results"][0]["tokens"]) <= 3


# ---- errors: one line, the right exit code, no traceback ----------------------------------------------
# (through cli.main in this process, which is what `python -m llamarun` runs: a process each cost ~3 s of
# importing torch; the tests of real processes are above and at the end)

def test_missing_model_file(tmp_path, capsys):
    proc = run_cli_in_process(["generate", "-m", str(tmp_path / "nope.gguf"), "hi"], capsys)
    assert_one_line_error(proc, 2, "nope.gguf")


def test_not_a_gguf(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a model at all")
    assert_one_line_error(run_cli_in_process(["generate", "-m", str(bad), "hi"], capsys), 2, "not a GGUF")
    assert_one_line_error(run_cli_in_process(["info", str(bad)], capsys), 2, "not a GGUF")


@pytest.mark.parametrize("keep", [100, 1_000_000, 50_000_000])
def test_truncated_gguf(tmp_path, default_model_path, keep, capsys):
    cut = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as f:
        cut.write_bytes(f.read(keep))
    assert_one_line_error(run_cli_in_process(["info", str(cut)], capsys), 2, "cut.gguf", "truncated")


def test_corrupted_gguf_header(tmp_path, capsys):
    model = write_tiny_gguf(tmp_path / "c.gguf")
    data = bytearray(model.read_bytes())
    data[8:16] = (2**62).to_bytes(8, "little")  # absurd tensor count
    model.write_bytes(bytes(data))
    assert_one_line_error(run_cli_in_process(["info", str(model)], capsys), 2, "c.gguf", "corrupted")


def test_unsupported_architecture(tmp_path, capsys):
    model = write_tiny_gguf(tmp_path / "g.gguf", arch="gpt2")
    assert_one_line_error(run_cli_in_process(["generate", "-m", str(model), "hi"], capsys), 2, "architecture", "gpt2")


def test_unsupported_tensor_type(tmp_path, capsys):
    import gguf

    model = write_tiny_gguf(tmp_path / "q.gguf", weight_type=gguf.GGMLQuantizationType.Q8_1)
    assert_one_line_error(run_cli_in_process(["info", str(model)], capsys), 2, "unsupported type Q8_1")


def test_directory_with_several_ggufs(tmp_path, capsys):
    for name in ("a.gguf", "b.gguf"):
        write_tiny_gguf(tmp_path / name)
    assert_one_line_error(run_cli_in_process(["info", tmp_path], capsys), 2, "directory holds 2 .gguf files")


def test_tokenizer_option_overrides_a_gguf_tokenizer(tmp_path, default_model_path, capsys):
    """-z replaces the tokenizer a GGUF carries; one with ids the model has no embedding for is refused
    (it used to run and drop every id past the model's vocabulary when decoding)."""
    from conftest import SHARED_TOKENIZERS
    from llamarun.formats import load_checkpoint

    spm = SHARED_TOKENIZERS / "tokenizer.model"  # Llama 2's: 32000 pieces
    if not spm.is_file():
        pytest.skip("no shared Llama 2 tokenizer")
    ckpt = load_checkpoint(default_model_path, spm)  # SmolLM2: 49152 embeddings
    assert type(ckpt.tokenizer).__name__ == "SentencePieceTokenizer" and ckpt.tokenizer.vocab_size == 32000
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")  # 257 embeddings
    assert_one_line_error(run_cli_in_process(["info", tiny, "-z", spm], capsys), 2,
                          "the tokenizer has 32000 tokens but the model's vocabulary only 257")


@pytest.mark.parametrize("args,needle", [
    (["-t", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["-n", "-3"], "max-new-tokens"),
    (["--top-k", "-2"], "top_k"),
    (["--device", "cuda:7"], "cuda"),
    (["--threads", "0"], "threads"),
    (["--threads", "99999"], "--threads must be between 1 and"),  # torch would spawn them all: hang or crash
    (["--max-seq-len", "0"], "--max-seq-len must be >= 1"),
    (["-z", "/nonexistent/tokenizer.model"], "no such tokenizer file"),
    (["--seed", str(2**64)], "seed must be in"),
])
def test_invalid_values(args, needle, capsys):
    # In-process (the same main() the console script calls): these fail before any model loads.
    from llamarun.cli import main

    code = main(["generate", "hello", *args])
    err = capsys.readouterr().err
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err), 2, needle)


@pytest.mark.parametrize("args,needle,help_cmd", [
    (["generate", "hello", "--kv-dtype", "int4"], "--kv-dtype: invalid choice: 'int4'", "llamarun generate --help"),
    (["generate", "hello", "--quantize", "int3"], "--quantize: invalid choice", "llamarun generate --help"),
    (["generate", "hello", "-n", "many"], "-n/--max-new-tokens: invalid int value", "llamarun generate --help"),
    (["generate", "hello", "--bogus"], "unrecognized arguments: --bogus", "llamarun --help"),
    (["bogus"], "invalid choice: 'bogus'", "llamarun --help"),
])
def test_argument_errors_are_one_line(args, needle, help_cmd):
    """What argparse rejects is one error line naming the option (and where help is), exit code 2."""
    assert_one_line_error(run_cli(*args), 2, needle, help_cmd)


@pytest.mark.parametrize("args,needle", [
    (["plan", "--max-seq-len", "0"], "--max-seq-len must be >= 1, got 0"),
    (["plan", "--device", "cuda:x", "--memory", "24GiB"], "unknown device 'cuda:x'"),
    (["plan", "--device", "cuda:-1", "--memory", "24GiB"], "unknown device 'cuda:-1'"),
    (["info", "--max-seq-len", "-1"], "--max-seq-len must be >= 1, got -1"),
    (["info", "--threads", "0"], "--threads must be between 1 and"),
])
def test_plan_and_info_check_their_options(args, needle, capsys):
    """plan and info reject what generate rejects (info used to report a bad --max-seq-len as "does not
    fit"; plan took --max-seq-len 0 for "not given")."""
    assert_one_line_error(run_cli_in_process(args, capsys), 2, needle)


def test_plan_defaults_to_the_context_generate_loads(capsys):
    """Without --max-seq-len, plan plans the context Llama.load would allow (the model's, at most 4096),
    so its verdict is the one generate acts on."""
    from llamarun.cli import main
    from llamarun.generation import DEFAULT_MAX_SEQ_LEN

    capsys.readouterr()
    assert main(["plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["max_seq_len"] == min(8192, DEFAULT_MAX_SEQ_LEN)  # SmolLM2's context is 8192
    assert main(["plan", "--json", "--config", "llama-3.2-1b", "--device", "cuda:0", "--memory", "8GiB"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["max_seq_len"] == DEFAULT_MAX_SEQ_LEN  # 131072 tokens would not fit in 8 GiB


def test_too_many_threads_from_the_environment(monkeypatch):
    from llamarun.device import max_threads, set_threads
    from llamarun.errors import UsageError

    monkeypatch.setenv("OMP_NUM_THREADS", str(max_threads() + 1))
    with pytest.raises(UsageError, match="OMP_NUM_THREADS must be between 1 and"):
        set_threads(None)


def test_version_and_no_command(capsys):
    from llamarun import __version__
    from llamarun.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"llamarun {__version__}"
    assert main([]) == 2  # no command: a usage error, the help on stderr
    out, err = capsys.readouterr()
    assert out == "" and "COMMAND" in err and "generate" in err


def test_invalid_value_from_a_real_process():
    assert_one_line_error(run_cli("generate", "hello", "--temperature", "nan"), 2, "temperature")


def test_no_prompt_is_a_usage_error():
    assert_one_line_error(run_cli("generate", input=""), 2, "prompt")


def test_prompt_longer_than_context(tmp_path, capsys):
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert_one_line_error(run_cli_in_process(["generate", "-m", str(model), "x" * 100], capsys), 2, "context length 64")


def test_bench_json_report(tmp_path):
    """``llamarun bench --json``: every requested prefill length and batch size is measured and reported."""
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    proc = run_cli("bench", "-m", str(model), "--prefill", "8", "24", "--batch", "1", "3", "--decode-tokens", "4",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert set(r["prefill"]) == {"8", "24"} and set(r["decode"]) == {"1", "3"}
    assert all(v > 0 for v in [*r["prefill"].values(), *r["decode"].values(), r["load_s"], r["peak_rss_mib"]])
    assert r["model"] == str(model) and r["device"] == "cpu"


def test_bench_text_report(tmp_path, capsys):
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    proc = run_cli_in_process(["bench", "-m", str(model), "--prefill", "8", "--batch", "2", "--decode-tokens", "3"],
                              capsys)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"model   {model}"
    assert any(line.startswith("prefill     8 tokens") for line in lines)
    assert any(line.startswith("decode  batch   2") for line in lines)
    assert lines[-1].startswith("peak RSS ")


@pytest.mark.parametrize("args,needle", [
    (["--prefill", "64"], "--prefill 64 does not fit the context of 64 tokens"),
    (["--prefill", "8", "--decode-tokens", "48"], "--decode-tokens 48 after a 16-token prompt does not fit"),
])
def test_bench_sizes_beyond_the_context(tmp_path, args, needle, capsys):
    """A length the context cannot hold is a usage error, not a line silently left out of the report."""
    model = write_tiny_gguf(tmp_path / "tiny.gguf")  # context 64
    assert_one_line_error(run_cli_in_process(["bench", "-m", str(model), *args], capsys), 2, needle)


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("generate", "info", "plan", "bench", "convert", "quantize"):
        assert cmd in proc.stdout


def test_parsing_imports_no_torch():
    """--help and usage errors answer before torch is imported (seconds on a slow machine), and the parser's
    choices are the ones convert and quantize accept."""
    code = ("import sys; from llamarun import cli; cli.build_parser().parse_args(['generate', '-n', '3']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    from llamarun import cli, convert, quantize

    assert cli.CONVERT_TARGETS == convert.TARGETS and cli.CONVERT_DTYPES == tuple(convert.DTYPES)
    assert cli.QUANT_MODES == quantize.MODES


def test_quantize_then_generate(tmp_path, capsys):
    out = tmp_path / "smollm2.int4.safetensors"
    proc = run_cli("quantize", str(out), "--to", "int4")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and not (tmp_path / (out.name + ".tmp")).exists()
    proc = run_cli("generate", "-m", str(out), "The capital of France is", "-n", "4", "-t", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(" Paris") and "int4 checkpoint" in proc.stderr
    # info and plan read it too (header and tokenizer only).
    info = run_cli_in_process(["info", out, "--json"], capsys)
    assert info.returncode == 0, info.stderr
    d = json.loads(info.stdout)
    assert d["format"] == "llamarun-quantized" and d["layers"] == 30 and d["tokenizer"]["vocab_size"] == 49152
    assert d["tensor_types"] == {"int4": 120, "int8": 1}  # 30 layers x (wqkv, wo, w13, w2), the output
    plan = run_cli_in_process(["plan", out, "--json"], capsys)
    assert plan.returncode == 0 and json.loads(plan.stdout)["choice"] == "int4", plan.stderr


def test_rare_gguf_types_go_through_gguf_quants(tmp_path):
    """Q3_K (no torch path here) is read with the gguf package's tables and dequantizer, and gives what
    gguf.quants gives; a file of only the types done in torch (here SmolLM2's Q4_1/Q8_0/F32, and Q4_K/Q6_K)
    never imports gguf."""
    import gguf

    from llamarun.formats import load_checkpoint

    T = gguf.GGMLQuantizationType
    path = write_tiny_gguf(tmp_path / "q3.gguf", dim=256, hidden=512, raw_types={"blk.0.attn_q.weight": T.Q3_K})
    ckpt = load_checkpoint(path)
    assert ckpt.tensor_types["layers.0.attention.wq.weight"] == "Q3_K"
    raw = ckpt.native["layers.0.attention.wq.weight"]
    want = gguf.quants.dequantize(raw.data, T.Q3_K).reshape(256, 256)
    np.testing.assert_array_equal(ckpt.tensors["layers.0.attention.wq.weight"].numpy(), want)
    kq = write_tiny_gguf(tmp_path / "k.gguf", dim=256, hidden=512,
                         raw_types={"blk.0.attn_q.weight": T.Q4_K, "blk.0.ffn_down.weight": T.Q6_K})
    code = ("import sys; from llamarun.formats import load_checkpoint; from llamarun.generation import default_model_path;"
            "c = load_checkpoint(default_model_path()); c.tensors['layers.0.attention.wq.weight'];"
            f"k = load_checkpoint({str(kq)!r}); k.tensors['layers.0.attention.wq.weight'];"
            "print(sorted(set(c.tensor_types.values())), sorted(set(k.tensor_types.values())), 'gguf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['F32',", "'Q4_1',", "'Q8_0']", "['F32',", "'Q4_K',", "'Q6_K']", "False"]


@pytest.mark.parametrize("compiled", [True, False])
def test_k_quant_block_with_scales_beyond_float16_is_one_line(tmp_path, capsys, monkeypatch, compiled):
    """A corrupted Q4_K block (super-block scale 65504 times 6-bit scales of 63) cannot become int4 scales:
    one line naming the file and the tensor, exit 2, from the compiled conversion and the torch one alike."""
    import gguf

    from llamarun import kernels
    from llamarun import quantize as Q
    from llamarun.formats.gguf import open_reader

    if compiled and not kernels.available():
        pytest.skip("no compiled kernels")
    if not compiled:
        monkeypatch.setattr(Q, "_kernel_fill", lambda *a: None)
    T = gguf.GGMLQuantizationType
    path = write_tiny_gguf(tmp_path / "k.gguf", dim=256, hidden=512,
                           raw_types={f"blk.0.{n}.weight": T.Q4_K for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                            "ffn_gate", "ffn_up", "ffn_down")})
    t = next(t for t in open_reader(path).tensors if t.name == "blk.0.attn_q.weight")
    data = bytearray(path.read_bytes())
    data[t.offset : t.offset + 2] = np.array([65504], np.float16).tobytes()
    data[t.offset + 4 : t.offset + 16] = b"\xff" * 12
    path.write_bytes(bytes(data))
    proc = run_cli_in_process(["generate", "-m", str(path), "-n", "2", "hi"], capsys)
    assert_one_line_error(proc, 2, str(path), "tensor blk.0.attn_q.weight", "scales too large")


def test_info_and_plan_take_the_model_as_m_too(tmp_path, capsys):
    """`info` and `plan` take the model positionally or with -m, as generate and bench spell it; two
    different ones are a one-line usage error."""
    path = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    for command, keys in (("info", ("path", "tensor_types")), ("plan", ("weights", "choice"))):
        positional = run_cli_in_process([command, path, "--json"], capsys)
        option = run_cli_in_process([command, "-m", path, "--json"], capsys)
        assert positional.returncode == option.returncode == 0, option.stderr
        a, b = json.loads(positional.stdout), json.loads(option.stdout)  # (memory figures move between calls)
        assert [a[k] for k in keys] == [b[k] for k in keys] and str(tmp_path) in json.dumps(a)
        assert_one_line_error(run_cli_in_process([command, path, "-m", path + "x", "--json"], capsys), 2,
                              "two models given")


def test_collector_paused_until_loaded_then_frozen_and_restored(tmp_path, monkeypatch, capsys):
    """main() runs imports and loading with Python's garbage collector off, freezes what exists once the
    model is loaded and collects again while generating; afterwards the collector is as it was."""
    import gc

    from llamarun import cli
    from llamarun.generation import Llama

    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    seen = {}
    load, stream = Llama.load.__func__, Llama.stream

    def recording_load(cls, *a, **k):
        seen["loading"] = gc.isenabled()
        return load(cls, *a, **k)

    def recording_stream(self, *a, **k):
        seen["generating"] = (gc.isenabled(), gc.get_freeze_count() > 0)
        return stream(self, *a, **k)

    monkeypatch.setattr(Llama, "load", classmethod(recording_load))
    monkeypatch.setattr(Llama, "stream", recording_stream)
    assert cli.main(["generate", "-m", str(model), "-n", "2", "-t", "0", "hello"]) == 0
    assert seen == {"loading": False, "generating": (True, True)}
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        assert cli.main(["generate", "-m", str(model), "-n", "2", "-t", "0", "hello"]) == 0
        assert not gc.isenabled() and gc.get_freeze_count() == 0  # left off, as it was
    finally:
        gc.enable()


def test_program_exit_leaves_objects_frozen():
    """The program entry point (console script, python -m llamarun) freezes what exists before the
    interpreter exits, so Python's shutdown does not collect over all of torch's objects."""
    code = ("import gc, sys; from llamarun.cli import run; sys.argv = ['llamarun', 'plan', '--config', 'stories15m']; "
            "status = run(); print(status, gc.get_freeze_count() > 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 True"
