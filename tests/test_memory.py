"""The memory plan: its arithmetic, its verdicts, and that it tells the truth about real loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from _ckpt_utils import run_cli_in_process
from conftest import REPO, assert_one_line_error
from llamarun.config import ModelArgs
from llamarun.errors import RuntimeFailure, UsageError
from llamarun.memory import GiB, config_by_name, make_plan, parse_size


def test_llama2_7b_fp16_does_not_fit_12gib_but_int8_does(capsys):
    proc = run_cli_in_process(["plan", "--config", "llama-2-7b", "--device", "cuda:0", "--memory", "12GiB",
                               "--max-seq-len", "2048", "--dtype", "float16", "--json"], capsys)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["weights"]["float16"] > 12 * GiB  # 13.5 GB of fp16 weights alone
    assert plan["choice"] == "int8" and plan["fits"] and plan["offload_layers"] == 0
    assert "float16 needs" in plan["reason"]
    text = run_cli_in_process(["plan", "--config", "llama-2-7b", "--device", "cuda:0", "--memory", "12GiB",
                               "--max-seq-len", "2048"], capsys).stdout
    assert "verdict      int8" in text and "kv cache" in text


def test_kv_cache_dtype_sizes_the_cache(capsys):
    """The plan counts the KV cache in its own dtype: float16 under float32 math on a CPU (auto) is half of
    float32's; int8 a byte a value and a float32 scale per row of head_dim."""
    from llamarun.device import pick_kv_dtype

    args = config_by_name("smollm2-135m")
    cpu = torch.device("cpu")
    f32 = make_plan(args, cpu, torch.float32, max_seq_len=4096, memory=8 * GiB, kv_dtype=torch.float32)
    f16 = make_plan(args, cpu, torch.float32, max_seq_len=4096, memory=8 * GiB, kv_dtype=torch.float16)
    assert f32.kv_cache == 2 * f16.kv_cache == 2 * 30 * 4096 * 3 * 64 * 4  # K and V, 30 layers, 3 heads of 64
    assert (f16.kv_dtype, f32.kv_dtype) == ("float16", "float32")
    assert make_plan(args, cpu, torch.float32, max_seq_len=4096, memory=8 * GiB).kv_cache == f32.kv_cache
    assert pick_kv_dtype("auto", torch.device("cuda"), torch.bfloat16) == torch.bfloat16  # the model's on GPUs
    assert pick_kv_dtype("float32", cpu, torch.float32) == torch.float32
    i8 = make_plan(args, cpu, torch.float32, max_seq_len=4096, memory=8 * GiB, kv_dtype=torch.int8)
    assert i8.kv_cache == 2 * 30 * 4096 * 3 * (64 + 4) and i8.kv_dtype == "int8"
    assert i8.activations == f16.activations  # the CPU kernels read it as it is
    # On an accelerator model.py dequantizes one layer's cache at a time: float32, then the activations' dtype.
    gpu = {kv: make_plan(args, torch.device("cuda"), torch.bfloat16, max_seq_len=4096, memory=8 * GiB, kv_dtype=kv)
           for kv in (torch.bfloat16, torch.int8)}
    assert gpu[torch.int8].activations - gpu[torch.bfloat16].activations == 2 * 4096 * 3 * 64 * (4 + 2)
    assert pick_kv_dtype("int8", torch.device("cuda"), torch.bfloat16) == torch.int8
    with pytest.raises(UsageError, match="KV cache dtype"):
        pick_kv_dtype("int4", cpu, torch.float32)
    out = run_cli_in_process(["plan", "--kv-dtype", "float32", "--max-seq-len", "1024"], capsys).stdout
    assert "(batch 1 x 1024 tokens, float32)" in out
    out = run_cli_in_process(["plan", "--kv-dtype", "int8", "--max-seq-len", "1024"], capsys).stdout
    assert "(batch 1 x 1024 tokens, int8)" in out


def test_meta_default_batch_is_a_trap():
    """Meta's example defaults (max_batch_size 32 x max_seq_len 2048) reserve 32 GiB of KV cache for 7B."""
    args = config_by_name("llama-2-7b")
    plan = make_plan(args, torch.device("cuda"), torch.float16, batch=32, max_seq_len=2048, memory=80 * GiB)
    assert plan.kv_cache == 32 * GiB
    with pytest.raises(RuntimeFailure, match="missing"):
        make_plan(args, torch.device("cpu"), torch.float16, batch=32, max_seq_len=2048, memory=12 * GiB)


def test_a_native_int4_model_that_does_not_fit_is_planned_int4():
    """A 4-bit checkpoint tries int4 before int8; when nothing fits, the error names int4 (the smallest)
    on a CPU, and an accelerator offloads int4 layers, not int8 ones."""
    args = config_by_name("llama-2-7b")
    with pytest.raises(RuntimeFailure, match="int4 needs"):
        make_plan(args, torch.device("cpu"), torch.float32, max_seq_len=2048, memory=3 * GiB, native_mode="int4")
    plan = make_plan(args, torch.device("cuda"), torch.float16, max_seq_len=2048, memory=3 * GiB, native_mode="int4")
    assert plan.quantize == "int4" and 0 < plan.offload_layers < args.n_layers and plan.fits


def test_accelerator_too_small_offloads_layers():
    args = config_by_name("llama-2-7b")
    plan = make_plan(args, torch.device("cuda"), torch.float16, max_seq_len=2048, memory=4 * GiB)
    assert plan.quantize == "int4" and 0 < plan.offload_layers < 32 and plan.fits
    forced = make_plan(args, torch.device("cuda"), torch.float16, max_seq_len=2048, memory=40 * GiB,
                       quantize="none", offload_layers=8)
    assert forced.offload_layers == 8 and forced.kv_cache == forced.kv_cache // 24 * 24
    with pytest.raises(RuntimeFailure, match="not even one layer"):
        make_plan(args, torch.device("cuda"), torch.float16, max_seq_len=2048, memory=600 * 2**20)


def test_plan_errors_are_one_line(capsys):
    proc = run_cli_in_process(["plan", "--config", "llama-2-70b", "--device", "cpu", "--memory", "8GiB"], capsys)
    assert_one_line_error(proc, 1, "missing")
    assert_one_line_error(run_cli_in_process(["plan", "--config", "llama-9"], capsys), 2, "unknown config")
    assert_one_line_error(run_cli_in_process(["plan", "--memory", "lots"], capsys), 2, "memory size")
    with pytest.raises(UsageError):
        parse_size("12 parsecs")
    assert parse_size("12GiB") == parse_size("12 GB") == 12 * GiB


def test_default_model_plan_prefers_lossless_int4(capsys):
    proc = run_cli_in_process(["plan", "--json"], capsys)
    plan = json.loads(proc.stdout)
    assert plan["choice"] == "int4" and "the checkpoint's precision: int4" in plan["reason"]
    assert plan["weights"]["int4"] < plan["weights"]["int8"] < plan["weights"]["float32"]


def test_offload_split_gives_the_same_tokens(llm):
    """A split model (hooks move the hidden state to and from the offloaded layers) generates exactly
    what the whole model does. On this CPU-only machine both sides are the CPU, but the mechanism, the
    hooks and the KV cache placement are the same ones a GPU run uses."""
    from llamarun import Llama
    from llamarun.generation import place_layers

    split = Llama.load(device="cpu", dtype="float32", quantize="none")
    place_layers(split.model, torch.device("cpu"), first_cpu_layer=20)
    assert split.model.offload == (20, 30)
    prompt = [llm.tokenizer.encode("The capital of France is")]
    assert split.generate(prompt, 8, temperature=0)[0] == llm.generate(prompt, 8, temperature=0)[0]


RSS_SCRIPT = """
import json, sys
from llamarun import Llama
from llamarun.memory import peak_rss_bytes
llm = Llama.load(sys.argv[1] if sys.argv[1] != '-' else None, quantize=sys.argv[2], max_seq_len=256)
llm.generate([[1, 2, 3, 4]], 2, temperature=0, ignore_eos=True)
print(json.dumps({"rss": peak_rss_bytes(), "plan": llm.plan.total}))
"""


def measured_vs_plan(model: str, quantize: str) -> float:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", RSS_SCRIPT, model, quantize], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["rss"] / out["plan"]


@pytest.mark.parametrize("quantize", ["auto", "none"])  # int4 (lossless from Q4_1) and float32
def test_plan_is_honest_for_the_default_model(quantize):
    ratio = measured_vs_plan("-", quantize)
    print(f"SmolLM2 {quantize}: peak RSS / plan = {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15


@pytest.mark.parametrize("quantize,group_size", [("auto", None), ("auto", 64), ("int8", None), ("int8", 128),
                                                 ("int4", 128)])
def test_plan_counts_the_weights_byte_for_byte(tmp_path, quantize, group_size):
    """The plan's weights are the bytes the loaded model holds (the rotary table aside): int8 layers with
    their default 32-wide groups, ``--group-size`` for the layers, for the output layer where it is in the
    layers' mode and for an untied embedding stored in 4 bits (kept int4, at the layers' group size when they
    are int4 too)."""
    import gguf

    from llamarun.generation import Llama
    from llamarun.quantize import model_nbytes
    from test_cli import write_tiny_gguf

    T = gguf.GGMLQuantizationType
    raw = {f"blk.0.{n}.weight": T.Q4_K for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                 "ffn_down")}
    raw.update({"token_embd.weight": T.Q4_K, "output.weight": T.Q6_K})
    path = write_tiny_gguf(tmp_path / "u.gguf", dim=256, hidden=512, raw_types=raw, untied=True)
    llm = Llama.load(path, quantize=quantize, group_size=group_size, max_seq_len=32)
    emb = llm.model.tok_embeddings.source
    assert emb.mode == "int4"  # as stored, whatever the layers' mode
    assert emb.group_size == (group_size or 32 if quantize != "int8" else 32)
    rope = llm.model.rope.numel() * llm.model.rope.element_size()
    assert model_nbytes(llm.model) - rope == llm.plan.weights_on_device


def write_random_quantized_gguf(path, args, qtype, vocab_dir) -> None:
    """A llama GGUF of ``args``'s shape whose weights are random Q8_0 / Q4_0 blocks, streamed to disk one
    tensor at a time (no float copy of the model ever exists), with Meta's Llama 2 vocabulary."""
    import gguf
    import numpy as np
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(vocab_dir / "tokenizer.model"))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    w.add_token_types([3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1
                       for i in range(sp.vocab_size())])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    d, h, kv = args.dim, args.hidden_dim, args.n_kv_heads * args.head_dim
    shapes = {"token_embd.weight": (args.vocab_size, d), "output_norm.weight": (d,), "output.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (kv, d),
                       f"blk.{i}.attn_v.weight": (kv, d), f"blk.{i}.attn_output.weight": (d, d),
                       f"blk.{i}.ffn_gate.weight": (h, d), f"blk.{i}.ffn_up.weight": (h, d),
                       f"blk.{i}.ffn_down.weight": (d, h)})
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            byte_shape = (shape[0], shape[1] // block_elems * block_bytes)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # One pool of random blocks, repeated: drawing 7 GB of random bytes took longer than the rest of the test.
    pool = np.random.default_rng(0).integers(0, 256, size=(1 << 20, block_bytes), dtype=np.uint8)
    pool[:, :2] = np.array([0.01], dtype=np.float16).view(np.uint8)  # a sane float16 scale in every block
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
            continue
        w.write_tensor_data(np.resize(pool, (shape[0] * shape[1] // block_elems, block_bytes)).reshape(shape[0], -1))
    w.close()


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_plan_is_honest_for_a_7b_model(tmp_path, qtype):
    """llama-2-7b-shaped, random weights written directly as 4-bit / 8-bit blocks; loading and generating
    two tokens on the CPU peaks within 15% of the plan."""
    import gguf

    from conftest import SHARED_TOKENIZERS

    if not (SHARED_TOKENIZERS / "tokenizer.model").is_file():
        pytest.skip(f"no Llama 2 tokenizer at {SHARED_TOKENIZERS}")
    path = tmp_path / f"llama-2-7b.{qtype}.gguf"
    write_random_quantized_gguf(path, config_by_name("llama-2-7b"), getattr(gguf.GGMLQuantizationType, qtype),
                                SHARED_TOKENIZERS)
    try:
        ratio = measured_vs_plan(str(path), "auto")
    finally:  # pytest keeps the last three runs' temporary files: 11 GB of disk each
        path.unlink()
    print(f"7B {qtype}: peak RSS / plan = {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15


def _storage_range(model: torch.nn.Module) -> tuple[int, int]:
    """The lowest and highest addresses the model's parameters and buffers (contiguous here) occupy."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.numel()]
    return min(t.data_ptr() for t in tensors), max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)


def test_huge_empty():
    """Loading's big buffers: a tensor of the asked shape and dtype that can be written and read, on a mapping
    of its own (2 MiB-page advice) where huge pages exist and it is at least 2 MiB, else torch.empty."""
    from llamarun import memory

    big = memory.huge_empty((1024, 4096), torch.int16)  # 8 MiB
    small = memory.huge_empty((3, 5), torch.int8)
    for t in (big, small):
        t.fill_(7)
        assert t.is_contiguous() and int(t.sum()) == 7 * t.numel()
    assert big.shape == (1024, 4096) and big.dtype == torch.int16 and small.shape == (3, 5)
    if memory.huge_pages_available():  # frombuffer's storage is exactly the mapping
        assert big.untyped_storage().nbytes() == 8 << 20


def test_weight_arena():
    """Within memory.weight_arena, weight_empty places tensors side by side (each on a cache line, the
    first on a 2 MiB page) in chunks; a tensor that does not fit starts a new chunk, one of half a chunk or
    more gets its own mapping; weight_copy copies into the arena what is not there yet. Outside it:
    huge_empty, and no copy."""
    from llamarun import memory

    chunk = memory.WeightArena.CHUNK
    with memory.weight_arena():
        a = memory.weight_empty((3, 5), torch.int16)
        b = memory.weight_empty((1000,), torch.float32)
        c = memory.weight_copy(torch.arange(6.0).reshape(2, 3))
        big = memory.weight_empty((chunk // 2,), torch.uint8)
        x1 = memory.weight_empty((chunk // 2 - 64,), torch.uint8)
        x2 = memory.weight_empty((chunk // 2 - 64,), torch.uint8)  # does not fit after a, b, c, x1
        assert memory.weight_copy(b) is b  # in the arena already: no second copy
        assert memory.weight_copy(big) is big or not memory.huge_pages_available()  # in a huge mapping
    for t in (a, b, x1, x2):
        t.fill_(1)
    assert a.shape == (3, 5) and a.dtype == torch.int16 and int(a.sum()) == 15 and int(b.sum()) == 1000
    assert torch.equal(c, torch.arange(6.0).reshape(2, 3))
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()
    assert b.data_ptr() == a.data_ptr() + 64 and c.data_ptr() == b.data_ptr() + 4032  # 4000 bytes, cache-aligned
    assert x1.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() != x2.untyped_storage().data_ptr()
    assert big.untyped_storage().nbytes() == chunk // 2
    if memory.huge_pages_available():
        assert a.data_ptr() % memory.HUGE_PAGE == 0 and x2.data_ptr() % memory.HUGE_PAGE == 0
        assert a.untyped_storage().nbytes() == chunk + memory.HUGE_PAGE
    t = torch.ones(3)
    assert memory.weight_copy(t) is t  # outside the arena
    with memory.weight_arena("meta") as arena:  # a model loading elsewhere: no arena
        assert arena is None and memory.weight_copy(t) is t
    outside = memory.weight_empty((3, 5), torch.int16)
    assert outside.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _mapping_rss_mib(address: int) -> float:
    """Resident MiB of the mapping holding ``address`` (/proc/self/smaps): unlike the process's resident set,
    not moved by what other code allocates or frees meanwhile."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_lazy_zeros_is_resident_only_where_written():
    """The KV cache's allocator: zeros of the asked shape and dtype, whose memory becomes resident only as it
    is written (torch.zeros writes all of it), and returns to the system when freed; small or non-CPU
    tensors come from torch.zeros."""
    from llamarun import memory

    before = _rss_mib()
    t = memory.lazy_zeros((64, 1024, 1024), dtype=torch.float32)  # 256 MiB
    assert t.shape == (64, 1024, 1024) and t.dtype == torch.float32
    address = t.data_ptr()
    assert _mapping_rss_mib(address) < 4
    read = bool(t[::8].any())  # reading maps the zero page: still not resident
    assert not read and _mapping_rss_mib(address) < 4
    t[:4] = 1.5  # 16 MiB written
    mean, rest = float(t[:4].mean()), bool(t[4:].any())
    assert 15 < _mapping_rss_mib(address) < 20 and mean == 1.5 and not rest
    del t
    assert _rss_mib() - before < 16  # the mapping is gone
    small = memory.lazy_zeros((2, 3), dtype=torch.float16)
    assert small.dtype == torch.float16 and not small.any()
    assert memory.lazy_zeros((2, 3), dtype=torch.float32, device="meta").device.type == "meta"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_release_pages():
    """memory.release_pages: a lazy_zeros tensor's written pages go back to the system, and it reads as zeros
    again at the same address (still writable); any other tensor is left as it is."""
    from llamarun import memory

    t = memory.lazy_zeros((16, 1024, 1024), dtype=torch.float32)  # 64 MiB
    address = t.data_ptr()
    t.fill_(2.0)
    assert _mapping_rss_mib(address) >= 64
    assert memory.release_pages(t)
    assert _mapping_rss_mib(address) < 1 and t.data_ptr() == address and not t.any()
    t[0] = 1.0
    assert float(t[0].mean()) == 1.0 and not t[1:].any()
    dense, small = torch.ones(1024, 1024), memory.lazy_zeros((2, 3), dtype=torch.float32) + 1
    assert not memory.release_pages(dense) and not memory.release_pages(small)
    assert bool(dense.all()) and bool(small.all())


@pytest.mark.skipif(not __import__("llamarun").memory.huge_pages_available(), reason="no transparent huge pages")
@pytest.mark.parametrize("mode", ["none", "int4"])
def test_pack_weights_moves_every_tensor_into_one_huge_page_arena(mode):
    """memory.pack_weights: every parameter and buffer ends up in one 2 MiB-aligned arena, in 2 MiB pages
    where the kernel grants them; the model computes the same logits (the fast path's gathered arguments
    and the quantized layers' cached ones are dropped and gathered again from the new tensors), and a tied
    output layer still shares the embedding's table."""
    from llamarun import fastpath, memory
    from llamarun.quantize import quantize_model

    torch.manual_seed(0)
    from llamarun.config import ModelArgs
    from llamarun.model import Transformer

    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=128,
                                  max_seq_len=64, tie_embeddings=True)).eval()
    if mode != "none":
        quantize_model(model, mode)
    fastpath.accelerate(model)
    prompt = torch.randint(0, 96, (2, 9))

    def run() -> torch.Tensor:
        model.free_cache()
        model.setup_cache(2, 16)
        out = [model(prompt, 0)]
        for i in range(3):  # decode steps through decode_layers (its gathered arguments)
            out.append(model(out[-1][:, -1:].argmax(-1), prompt.shape[1] + i))
        return torch.cat(out, dim=1)

    with torch.inference_mode():
        want = run()
        model.free_cache()
        nbytes = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                      for t in list(model.parameters()) + list(model.buffers()) if t.numel()}.values())
        assert memory.pack_weights(model) == nbytes
        lo, hi = _storage_range(model)
        assert hi - lo < nbytes + 64 * 64 and lo % memory.HUGE_PAGE == 0  # one arena, packed from its start
        assert model._stacks is None
        if mode == "none":
            assert model.output.weight is model.tok_embeddings.weight
        else:
            assert all(m._kargs is None for m in model.modules() if hasattr(m, "_kargs"))
        got = run()
    assert torch.equal(got, want)


@pytest.mark.parametrize("quantize", ["auto", "int8", "none"])
def test_load_places_cpu_weights_in_an_arena(quantize, monkeypatch):
    """Llama.load on the CPU makes the weights in place, side by side in 2 MiB-page chunks
    (memory.WeightArena): the int4 default model's ~96 MiB in two chunks, the int8 (converted through
    float32) and unquantized ones too, so pack_weights has nothing left to copy but what the bf16 path
    remakes in float32 (the norms, a few KiB); the rotary table only as long as the context."""
    from llamarun import Llama, generation, memory

    if not memory.huge_pages_available():
        pytest.skip("no transparent huge pages")
    moved = []
    pack = generation.pack_weights
    monkeypatch.setattr(generation, "pack_weights", lambda model: moved.append(pack(model)) or moved[-1])
    llm = Llama.load(None, max_seq_len=64, quantize=quantize)
    tensors = [t for t in list(llm.model.parameters()) + list(llm.model.buffers()) if t.numel()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}
    assert all(memory.in_huge_mapping(st) for st in storages.values())
    assert len(moved) == 1 and moved[0] < (1 << 20)
    if quantize == "auto":
        assert sorted(st.nbytes() for st in storages.values()) == [memory.WeightArena.CHUNK + memory.HUGE_PAGE] * 2
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in
                   {(t.data_ptr(), t.numel()): t for t in tensors}.values())
    assert all(a % 64 == 0 for a, _ in spans) and all(e <= a for (_, e), (a, _) in zip(spans, spans[1:]))
    assert llm.model.rope.shape[0] == 64


@pytest.mark.skipif(not __import__("llamarun").memory.huge_pages_available(), reason="no transparent huge pages")
def test_pack_weights_leaves_huge_mappings_in_place():
    """A weight already in a huge_empty mapping stays where it is (no second copy, no transient of its size);
    the others move into the arena."""
    from llamarun import memory

    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.Linear(64, 64, bias=False))
    big = memory.huge_empty((1024, 1024), torch.float32)
    big.copy_(model[0].weight.detach())
    model[0].weight = torch.nn.Parameter(big, requires_grad=False)
    assert memory.in_huge_mapping(big.untyped_storage())
    assert not memory.in_huge_mapping(model[1].weight.untyped_storage())
    small = model[1].weight.detach().clone()
    assert memory.pack_weights(model) == 64 * 64 * 4
    assert model[0].weight.data_ptr() == big.data_ptr() and torch.equal(model[1].weight, small)
    assert model[1].weight.data_ptr() % memory.HUGE_PAGE == 0


def test_plan_with_a_group_size_int4_cannot_take():
    """A model whose width int4 cannot quantize (40 inputs: not a multiple of 32) still gets a plan with
    --group-size: its int4 entry is an estimate, and the float model it fits as is chosen."""
    args = ModelArgs(dim=40, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=72, max_seq_len=64)
    plan = make_plan(args, torch.device("cpu"), torch.float32, memory=1 << 40, group_size=64)
    assert plan.label == "float32" and 0 < plan.weights["int4"] < plan.weights["int8"] < plan.weights["float32"]


def test_accelerator_plans_hold_room_for_dequantized_tiles():
    """On an accelerator a quantized model's products dequantize their weights (the output layer's always),
    at most quantize.PORTABLE_TILE_BYTES at a time: the plan counts that, for quantized modes only, and a
    CPU plan (kernels read the codes directly) does not."""
    from llamarun.memory import activation_bytes, dequant_bytes
    from llamarun.quantize import PORTABLE_TILE_BYTES

    args = config_by_name("llama-3-8b")
    base = activation_bytes(args, 1, 2048, 2)
    # The 128k x 4096 output layer is 1 GiB in float16: two tiles' worth are counted, not the whole of it.
    assert dequant_bytes(args, 2) == 2 * PORTABLE_TILE_BYTES
    assert dequant_bytes(config_by_name("stories15m"), 2) == 2 * 32000 * 288 * 2  # smaller than a tile
    cuda = torch.device("cuda")
    for mode in ("int8", "int4"):
        plan = make_plan(args, cuda, torch.float16, max_seq_len=2048, memory=40 * GiB, quantize=mode)
        assert plan.activations == base + 2 * PORTABLE_TILE_BYTES
    fp16 = make_plan(args, cuda, torch.float16, max_seq_len=2048, memory=40 * GiB, quantize="none")
    assert fp16.activations == base
    cpu = make_plan(args, torch.device("cpu"), torch.float16, max_seq_len=2048, memory=40 * GiB, quantize="int8")
    assert cpu.activations == base
    # Offloading leaves room for the tiles too: no layer is placed in it.
    tight = make_plan(args, cuda, torch.float16, max_seq_len=2048, memory=5 * GiB)
    assert tight.quantize == "int4" and tight.offload_layers and tight.total <= 5 * GiB
