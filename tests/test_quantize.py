"""Weight-only quantization: accuracy on SmolLM2, GGUF block conversion, save/load, the CLI subcommand.

Accuracy: one teacher-forced forward over ~256 tokens of varied English, quantized vs float32 (the GGUF
dequantized): top-1 agreement and perplexity. Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import stat

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _ckpt_utils import random_weights, run_cli_in_process, tiny_args, train_sentencepiece, write_meta
from conftest import assert_one_line_error
from llamarun import kernels
from llamarun import quantize as Q
from llamarun.config import ModelArgs
from llamarun.errors import FormatError, RuntimeFailure
from llamarun.formats.gguf import dequantize as gguf_dequantize
from llamarun.formats.gguf import open_reader
from llamarun.model import Transformer

TEXT = """The history of the bicycle is a story of gradual refinement. Early designs, sometimes called hobby \
horses, had no pedals at all: riders pushed themselves along with their feet. By the 1870s the high-wheeler had \
appeared, with an enormous front wheel that made every fall dangerous. The safety bicycle, with two wheels of \
equal size and a chain driving the rear wheel, changed everything.
In the kitchen, a good stock begins with cold water. Bones, onions, carrots and celery are brought slowly to a \
simmer, never a rolling boil, and the foam that rises is skimmed away. After four or five hours the liquid is \
strained, cooled quickly and stored in the refrigerator, where the fat forms a protective layer on top.
Mathematics offers its own kind of beauty. Consider the prime numbers: there are infinitely many of them, as \
Euclid proved more than two thousand years ago, yet no simple formula produces them all.
"Where did you put the keys?" she asked, searching the pockets of her coat for the third time. He shrugged and \
pointed at the table by the door, where they had been all along, half hidden under a pile of unopened letters.
Modern computers store numbers in binary. A single bit can hold a zero or a one; eight bits make a byte, and a \
byte can represent any integer from 0 to 255. Floating-point formats trade precision for range, which is why \
adding a very small number to a very large one sometimes changes nothing at all."""

THRESHOLDS = {"int8": (0.95, 0.02), "int4": (0.85, 0.10)}  # top-1 agreement >=, perplexity increase <=


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------
# Accuracy on the real model


@pytest.fixture(scope="module")
def fp32(llm):
    """The float32 model (the GGUF dequantized): the reference. The session ``llm`` may itself be quantized
    (Llama.load keeps a Q4 GGUF in int4 by default), so build it here from the same checkpoint."""
    from llamarun.generation import build_model

    with torch.inference_mode():
        return build_model(llm.checkpoint, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def tokens(llm):
    ids = llm.tokenizer.encode(TEXT)[:257]
    assert len(ids) >= 200
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def reference(fp32, tokens):
    with torch.inference_mode():
        return fp32(tokens[:, :-1])[0]


def _forward(model, tokens, kernel_path: bool):
    """Teacher-forced logits. kernel_path: force the integer kernels (the decode path) for every layer
    instead of dequantize + GEMM, which a 256-token forward would otherwise take."""
    for m in model.modules():
        if isinstance(m, Q.QuantizedLinear):
            m.dense_min_rows = 1 << 30 if kernel_path else Q.DENSE_MIN_ROWS[m.mode]
    with torch.inference_mode():
        return model(tokens[:, :-1])[0]


def _agreement(logits, reference, tokens):
    target = tokens[0, 1:]
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    ppl_ref = F.cross_entropy(reference, target).exp().item()
    ppl = F.cross_entropy(logits, target).exp().item()
    return top1, ppl, ppl_ref


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_accuracy_vs_float32(llm, fp32, tokens, reference, mode):
    """Quantized straight from the GGUF (the loader path) and from the float32 model (quantize_model)."""
    min_top1, max_ppl = THRESHOLDS[mode]
    direct = Q.build_quantized_model(llm.checkpoint, mode)
    from_float = Q.quantize_model(copy.deepcopy(fp32), mode)
    # The integer kernels (decode) on both models; dequantize + GEMM (prefill) on one.
    runs = [("gguf-direct", direct, "kernel", True), ("from-float", from_float, "kernel", True)]
    if kernels.available():
        runs.append(("gguf-direct", direct, "dense", False))
    for name, model, path, force in runs:
        top1, ppl, ppl_ref = _agreement(_forward(model, tokens, force), reference, tokens)
        print(f"\n{mode} {name:11s} [{path:6s}]: top-1 agreement {top1:.1%}, perplexity {ppl:.3f} vs "
              f"{ppl_ref:.3f} float32 ({ppl / ppl_ref - 1:+.2%}), {Q.model_nbytes(model) / 2**20:.0f} MiB")
        assert top1 >= min_top1
        assert ppl / ppl_ref - 1 <= max_ppl


def test_int4_output_layer_numbers(llm, tokens, reference):
    """For the record (not a default): the output layer / tied embedding in int4 too."""
    model = Q.build_quantized_model(llm.checkpoint, "int4", output_mode="int4")
    top1, ppl, ppl_ref = _agreement(_forward(model, tokens, True), reference, tokens)
    print(f"\nint4 with int4 output: top-1 agreement {top1:.1%}, perplexity {ppl / ppl_ref - 1:+.2%}, "
          f"{Q.model_nbytes(model) / 2**20:.0f} MiB")
    assert top1 > 0.6


def test_fused_parameters_and_lossless_gguf_layers(llm, fp32):
    """GGUF Q4_1 layers -> int4 and the Q8_0 embedding -> int8 are exact, fused wqkv/w13 in the right order."""
    model = Q.build_quantized_model(llm.checkpoint, "int4")
    ref = fp32
    for name in ("layers.0.attention.wqkv", "layers.7.feed_forward.w13", "layers.29.feed_forward.w2", "output"):
        got = model.get_submodule(name).dequantize()
        assert torch.equal(got, ref.get_submodule(name).weight), name
    assert isinstance(model.tok_embeddings, Q.QuantizedEmbedding) and model.tok_embeddings.tied
    ids = torch.tensor([[1, 5, 49151, 300]])
    assert torch.equal(model.tok_embeddings(ids), ref.tok_embeddings(ids))
    assert model.tok_embeddings.weight.dtype == torch.float32 and model.tok_embeddings.weight.numel() == 0


# ---------------------------------------------------------------------------------------------------------
# GGUF blocks


@pytest.fixture(scope="module")
def gguf_tensors(default_model_path):
    return {t.name: t for t in open_reader(default_model_path).tensors}


def _shape(t):
    return tuple(int(d) for d in t.shape)


def test_real_file_conversions_are_lossless(gguf_tensors):
    seen = set()
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.3.ffn_down.weight", "blk.29.ffn_up.weight"):
        t = gguf_tensors[name]
        qt = Q.from_gguf(t.data, t.tensor_type, _shape(t), "int8" if t.tensor_type.name == "Q8_0" else "int4")
        assert qt.group_size == 32
        assert torch.equal(qt.dequantize(), gguf_dequantize(t.data, t.tensor_type, _shape(t)).float()), name
        seen.add(t.tensor_type.name)
    assert seen == {"Q8_0", "Q4_1"}


def test_real_file_direct_equals_requantized(gguf_tensors):
    """Quantizing the dequantized floats (plain min/max rounding) recovers the GGUF blocks' values."""
    t = gguf_tensors["token_embd.weight"]  # Q8_0
    shape = _shape(t)
    direct = Q.from_gguf_q8_0(t.data, shape)
    requant = Q.quantize_int8(gguf_dequantize(t.data, t.tensor_type, shape), 32)
    assert torch.equal(requant.dequantize(), direct.dequantize())
    t = gguf_tensors["blk.5.ffn_gate.weight"]  # Q4_1
    shape = _shape(t)
    direct = Q.from_gguf_q4_1(t.data, shape)
    requant = Q.quantize_int4(gguf_dequantize(t.data, t.tensor_type, shape), 32, search=False)
    err = (requant.dequantize() - direct.dequantize()).abs().max().item()
    step = direct.scales_f16().float().abs().max().item()
    assert err <= 1e-3 * step  # equal up to float16 rounding of a recomputed scale


def test_file_tensors_convert_in_pieces(gguf_tensors, monkeypatch):
    """A GGUF tensor converted block for block is read a piece at a time, into one buffer, and each piece
    converted straight into its rows of the result (loading never holds a whole raw table and its converted
    copy at once, nor a converted copy of each piece), with the same result."""
    import llamarun.memory as M

    piece = 64 << 10
    for name in ("token_embd.weight", "blk.3.ffn_down.weight"):  # Q8_0 [49152, 576], Q4_1 [576, 1536]
        t = gguf_tensors[name]
        mode = "int8" if t.tensor_type.name == "Q8_0" else "int4"
        whole = Q.from_gguf(t.data, t.tensor_type, _shape(t), mode)
        reads = []
        read_into = type(t).read_into
        with monkeypatch.context() as mp:
            mp.setattr(M, "GGUF_READ_BYTES", piece)
            mp.setattr(type(t), "read_into", lambda self, start, out: reads.append((start, out.size, out.ctypes.data))
                       or read_into(self, start, out))
            pieces = Q.from_gguf_file(t, _shape(t), mode)
        assert len(reads) > 1 and max(n for _, n, _ in reads) <= piece, name
        assert sum(n for _, n, _ in reads) == t.nbytes and reads[-1][0] + reads[-1][1] == t.nbytes
        assert len({address for _, _, address in reads}) == 1  # one buffer
        for a, b in ((whole.qweight, pieces.qweight), (whole.scales, pieces.scales), (whole.mins, pieces.mins)):
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
    # Loading (a weight arena) reads every tensor into the same buffer.
    reads = []
    with monkeypatch.context() as mp, M.weight_arena():
        mp.setattr(type(t), "read_into", lambda self, start, out: reads.append(out.ctypes.data)
                   or read_into(self, start, out))
        for name in ("token_embd.weight", "blk.3.ffn_down.weight", "blk.3.attn_q.weight"):
            t = gguf_tensors[name]
            Q.from_gguf_file(t, _shape(t), "int8" if t.tensor_type.name == "Q8_0" else "int4")
    assert len(reads) >= 3 and len(set(reads)) == 1
    # Another mode than the blocks' goes through float32, as from_gguf does.
    t = gguf_tensors["blk.3.ffn_down.weight"]
    assert torch.equal(Q.from_gguf_file(t, _shape(t), "int8").qweight,
                       Q.from_gguf(t.data, t.tensor_type, _shape(t), "int8").qweight)


def test_loading_hands_freed_memory_back(monkeypatch, default_model_path):
    """Llama.load returns the C heap's freed pages (tokenizer construction, read buffers) to the OS, after
    the tokenizer and again after the weights."""
    import llamarun.generation as G
    from llamarun.memory import release_free_memory

    calls = []
    monkeypatch.setattr(G, "release_free_memory", lambda: calls.append(1) or release_free_memory())
    G.Llama.load(default_model_path, max_seq_len=64)
    assert len(calls) == 2
    assert isinstance(release_free_memory(), bool)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_synthetic_blocks(qtype):
    """Blocks made by gguf.quants (Q4_1 by hand: gguf-py has no Q4_1 quantizer) convert exactly, and the
    kernels compute with them."""
    import gguf

    qt_enum = getattr(gguf.GGMLQuantizationType, qtype)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 96)) * rng.uniform(0.01, 2, (24, 1))).astype(np.float32)
    w[0, :32] = 0  # an all-zero block
    if qtype == "Q4_1":
        raw = _q4_1_blocks(w)
    else:
        raw = gguf.quants.quantize(w, qt_enum)
    mode = "int8" if qtype == "Q8_0" else "int4"
    qt = Q.from_gguf(raw, qt_enum, (24, 96), mode)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qt_enum)).reshape(24, 96)
    assert torch.equal(qt.dequantize(), ref)
    assert torch.equal(gguf_dequantize(raw, qt_enum, (24, 96)).float(), ref)
    x = torch.randn(3, 96)
    layer = Q.make_linear(qt)
    y = layer(x)
    exact = x.double() @ ref.double().t()
    assert ((y.double() - exact).abs() <= 1e-3 * x.double().norm(dim=-1, keepdim=True) * ref.double().norm(dim=-1)).all()
    other = Q.from_gguf(raw, qt_enum, (24, 96), "int4" if mode == "int8" else "int8")
    assert other.mode != mode
    if qtype == "Q4_0":  # Q4_0 as int8 (the output layer's mode) is lossless too
        assert torch.equal(other.dequantize(), ref) and other.group_size == 32
        y8 = Q.make_linear(other)(x).double()
        assert ((y8 - exact).abs() <= 1e-3 * x.double().norm(dim=-1, keepdim=True) * ref.double().norm(dim=-1)).all()
    else:  # a mode that does not match the block type goes through float32 (lossy but close)
        assert (other.dequantize() - ref).abs().max() <= 0.15 * ref.abs().max()


BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_torch_dequantizers_match_gguf_quants(qtype):
    """Every block type dequantized in torch gives gguf.quants' floats bit for bit (random bits with
    finite scales: every field's every value is exercised)."""
    import gguf

    from _ckpt_utils import random_gguf_blocks

    qt_enum = getattr(gguf.GGMLQuantizationType, qtype)
    raw = random_gguf_blocks(qt_enum, (8, 512), np.random.default_rng(1))
    want = torch.from_numpy(gguf.quants.dequantize(raw, qt_enum))
    assert torch.equal(gguf_dequantize(raw.reshape(-1), qt_enum, (8, 512)), want)


@pytest.mark.parametrize("qtype,mode", [("Q4_K", "int4"), ("Q5_0", "int8"), ("Q6_K", "int8"), ("Q5_K", "int8"),
                                        ("Q5_1", "int8"), ("Q4_K", "int8"), ("Q6_K", "int4")])
def test_k_quant_and_q5_blocks_convert(qtype, mode, tmp_path, monkeypatch):
    """Q4_K -> int4 keeps the 4-bit values and rounds only the sub-block scale and min products to float16;
    Q5_0 -> int8 is exact; the other types become int8 (or int4) with group size 32 within half a step of
    the new grid. A file's tensor read piece by piece converts to the same bits as the whole array."""
    import gguf

    from _ckpt_utils import random_gguf_blocks
    from llamarun.formats.gguf import q4_k_values

    qt_enum = getattr(gguf.GGMLQuantizationType, qtype)
    n, k = 48, 512
    raw = random_gguf_blocks(qt_enum, (n, k), np.random.default_rng(2))
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qt_enum))
    qt = Q.from_gguf(raw.reshape(-1), qt_enum, (n, k), mode)
    assert qt.mode == mode and qt.group_size == 32
    err = (qt.dequantize() - ref).abs().view(n, -1, 32)
    group_max = ref.abs().view(n, -1, 32).amax(-1, keepdim=True)
    if (qtype, mode) == ("Q4_K", "int4"):
        assert torch.equal(Q._unpack_int4(qt.qweight).view(-1, 8, 32), q4_k_values(torch.from_numpy(raw.reshape(-1, 144))))
        assert (err <= group_max * 2.0**-9).all()
    elif (qtype, mode) == ("Q5_0", "int8"):
        assert torch.equal(qt.dequantize(), ref)
    elif mode == "int8":  # (+ 1e-5: groups of tiny weights get float16 scales below its normal range)
        assert (err <= group_max * (0.5 / 127 + 2.0**-10) + 1e-5).all()
    else:  # 6 bits -> 4: lossy, within a step of the new grid
        rng = ref.view(n, -1, 32)
        assert (err <= (rng.amax(-1, keepdim=True) - rng.amin(-1, keepdim=True)) / 15 + 1e-5).all()

    from llamarun import memory

    path = tmp_path / "one.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("t.weight", raw, raw_dtype=qt_enum)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    monkeypatch.setattr(memory, "GGUF_READ_BYTES", 4096)  # many pieces, a few rows each
    piecewise = Q.from_gguf_file(open_reader(path).tensors[0], (n, k), mode, 32)
    for a, b in zip((piecewise.qweight, piecewise.scales, piecewise.mins), (qt.qweight, qt.scales, qt.mins)):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.skipif(not kernels.available(), reason="no compiled kernels")
@pytest.mark.parametrize("qtype,mode", [(t, "int8") for t in Q._KERNEL_FILLS["int8"]] +
                         [(t, "int4") for t in Q._KERNEL_FILLS["int4"]])
def test_compiled_gguf_conversions_give_the_torch_fills_bits(qtype, mode):
    """kernels/gguf.cpp converts GGUF blocks into int8 / int4 with exactly the bits of quantize.py's torch
    fills (dequantize in torch + quantize_int8, or _fill_q4_k), on random blocks with groups of zeros,
    of tiny weights (float16 scales under its normal range) and of a NaN."""
    import gguf

    from _ckpt_utils import random_gguf_blocks

    qt_enum = getattr(gguf.GGMLQuantizationType, qtype)
    elems, nbytes = gguf.GGML_QUANT_SIZES[qt_enum]
    n, k = 40, 1024
    raw = torch.from_numpy(random_gguf_blocks(qt_enum, (n, k), np.random.default_rng(3)).reshape(-1, nbytes))
    raw[0] = 0  # a block of zeros (d = 0)
    tiny = torch.tensor([1e-6], dtype=torch.float16).view(torch.uint8)
    f16_at = {"Q6_K": (208,)}.get(qtype, (0, 2) if qtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else (0,))
    for off in f16_at:
        raw[1, off : off + 2] = tiny
    if mode == "int8":
        raw[2, f16_at[0] : f16_at[0] + 2] = torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8)
    compiled, reference = Q._new(mode, n, k, torch.empty), Q._new(mode, n, k, torch.empty)
    Q._kernel_fill(qtype, mode, 32)(raw, compiled)
    torch_fill = Q._GGUF_FILL.get((qtype, mode)) or Q._requant_fill(qtype, mode, 32)
    torch_fill(raw, reference)
    for a, b in zip((compiled.qweight, compiled.scales, compiled.mins), (reference.qweight, reference.scales, reference.mins)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_q4_k_m_style_file_keeps_its_q6_k_modules_as_int8(tmp_path, capsys):
    """A file like llama.cpp's Q4_K_M (Q4_K, with Q6_K for attn_v, one ffn_down and the embedding) loads as
    int4 with int8 for every module that has a Q6_K part (the fused wqkv included), each within its
    conversion's rounding of the file's dequantized weights; when that does not fit, the plan makes those
    modules int4 too."""
    import gguf

    from llamarun.formats import load_checkpoint
    from llamarun.generation import Llama
    from llamarun.memory import make_plan, native_quantization
    from test_cli import write_tiny_gguf

    T = gguf.GGMLQuantizationType
    raw = {f"blk.{i}.{n}.weight": T.Q4_K for i in range(2)
           for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    raw.update({"blk.0.attn_v.weight": T.Q6_K, "blk.1.attn_v.weight": T.Q6_K, "blk.0.ffn_down.weight": T.Q6_K,
                "token_embd.weight": T.Q6_K})
    path = write_tiny_gguf(tmp_path / "m.gguf", n_layers=2, dim=256, hidden=512, raw_types=raw)
    mixed = {"layers.0.attention.wqkv": "int8", "layers.1.attention.wqkv": "int8", "layers.0.feed_forward.w2": "int8"}

    llm = Llama.load(path, max_seq_len=32)
    assert llm.plan.label == "int4+int8" and llm.plan.layer_modes == mixed
    assert "int8 for its 3 modules of more than 4 bits" in llm.plan.reason
    modes = {name: m.mode for name, m in llm.model.named_modules() if isinstance(m, Q.QuantizedLinear)}
    assert modes == {**{f"layers.{i}.{n}": "int4" for i in range(2) for n in
                        ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")},
                     **mixed, "output": "int8"}
    ref = Llama.load(path, quantize="none", dtype="float32", max_seq_len=32)  # the file dequantized
    for name, m in llm.model.named_modules():
        if isinstance(m, Q.QuantizedLinear):
            w = ref.model.get_submodule(name).weight
            err = (m.dequantize() - w).abs().view(w.shape[0], -1, 32)
            group_max = w.abs().view(w.shape[0], -1, 32).amax(-1, keepdim=True)
            bound = 2.0**-9 if modes[name] == "int4" else 0.5 / 127 + 2.0**-10  # Q4_K as it is; Q6_K rounded
            assert (err <= group_max * bound + 1e-5).all(), name
    # (Random weights make a chaotic model: how such a file computes is tested on SmolLM2 just below.)

    ckpt = load_checkpoint(path)
    native = native_quantization(ckpt)
    assert native["native_mode"] == "int4" and native["layer_modes"] == mixed
    cpu = torch.device("cpu")
    full = make_plan(ckpt.args, cpu, torch.float32, max_seq_len=32, memory=1 << 40, **native)
    uniform = make_plan(ckpt.args, cpu, torch.float32, max_seq_len=32, memory=1 << 40, quantize="int4")
    assert full.weights["int4"] < full.weights["int4+int8"] < full.weights["int8"]
    assert full.weights_on_device - uniform.weights_on_device == full.weights["int4+int8"] - full.weights["int4"]
    tight = make_plan(ckpt.args, cpu, torch.float32, max_seq_len=32, memory=full.total - 1, **native)
    assert tight.label == "int4" and tight.layer_modes == {} and tight.total <= full.total - 1
    assert "int4+int8 needs" in tight.reason and "but for its modules of more than 4 bits" in tight.reason
    # With --group-size the table's int4+int8 entry and the chosen plan still agree, byte for byte with the model.
    full64 = make_plan(ckpt.args, cpu, torch.float32, max_seq_len=32, memory=1 << 40, group_size=64, **native)
    assert full64.label == "int4+int8" and full64.weights["int4+int8"] == full64.weights_on_device
    llm64 = Llama.load(path, group_size=64, max_seq_len=32)
    rope = llm64.model.rope.numel() * llm64.model.rope.element_size()
    assert Q.model_nbytes(llm64.model) - rope == llm64.plan.weights_on_device == full64.weights_on_device
    plan = json.loads(run_cli_in_process(["plan", str(path), "--json"], capsys).stdout)
    assert plan["choice"] == "int4+int8" and plan["layer_modes"] == mixed


def _q4_k_blocks(w: np.ndarray) -> np.ndarray:
    """GGUF Q4_K bytes for float rows (K % 256 == 0): per 32-weight sub-block a min/max fit, its scale and
    min as 6-bit multiples of the super-block's d and dmin (llama.cpp searches; a plain fit will do)."""
    b = w.reshape(-1, 8, 32).astype(np.float32)
    low = np.maximum(0, -b.min(-1))  # subtracted: w = d sc q - dmin m with m >= 0
    scale = (b.max(-1) + low) / 15
    d16 = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    m16 = (low.max(-1, keepdims=True) / 63).astype(np.float16)
    d, dm = d16.astype(np.float32), m16.astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(low / np.where(dm > 0, dm, 1)), 0, 63).astype(np.uint8)
    a = (d * sc)[..., None]
    q = np.clip(np.round((b + (dm * mn)[..., None]) / np.where(a > 0, a, 1)), 0, 15).astype(np.uint8)
    packed = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4 << 6), mn[:, :4] | (mn[:, 4:] >> 4 << 6),
                             (sc[:, 4:] & 0x0F) | (mn[:, 4:] << 4)], axis=1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(len(b), 128)  # run r: sub-block 2r low, 2r + 1 high
    return np.concatenate([d16.view(np.uint8), m16.view(np.uint8), packed, qs], axis=1)


def _q6_k_blocks(w: np.ndarray) -> np.ndarray:
    """GGUF Q6_K bytes for float rows (K % 256 == 0): per 16-weight sub-block an int8 multiple of d as the
    scale of values -32..31 (see formats.gguf.q6_k_values for the layout)."""
    b = w.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(b).max(-1) / 31
    d16 = (scale.max(-1, keepdims=True) / 127).astype(np.float16)
    d = d16.astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)), 1, 127).astype(np.int8)
    s = (d * sc)[..., None]
    v = (np.clip(np.round(b / np.where(s > 0, s, 1)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    ql = (v[..., :64] & 0x0F) | ((v[..., 64:] & 0x0F) << 4)
    hi = v >> 4
    qh = hi[..., 0:32] | (hi[..., 32:64] << 2) | (hi[..., 64:96] << 4) | (hi[..., 96:] << 6)
    return np.concatenate([ql.reshape(len(b), 128), qh.reshape(len(b), 64), sc.view(np.uint8),
                           d16.view(np.uint8)], axis=1)


def test_untied_4_bit_embedding_stays_int4(tmp_path):
    """An untied embedding stored as Q4_K is a lookup table: it loads as int4 (its values as they are),
    while the output layer stays int8; the plan counts it so."""
    import gguf

    from llamarun.formats import load_checkpoint
    from llamarun.generation import Llama
    from llamarun.memory import make_plan, native_quantization, quantized_bytes
    from test_cli import write_tiny_gguf

    T = gguf.GGMLQuantizationType
    raw = {f"blk.0.{n}.weight": T.Q4_K for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                 "ffn_down")}
    raw.update({"token_embd.weight": T.Q4_K, "output.weight": T.Q6_K})
    path = write_tiny_gguf(tmp_path / "u.gguf", dim=256, hidden=512, raw_types=raw, untied=True)
    ckpt = load_checkpoint(path)
    native = native_quantization(ckpt)
    assert native["embedding_mode"] == "int4" and native["native_mode"] == "int4" and not native["layer_modes"]
    llm = Llama.load(path, max_seq_len=32)
    emb = llm.model.tok_embeddings
    assert emb.source.mode == "int4" and not emb.tied and llm.model.output.mode == "int8"
    assert llm.plan.embedding_mode == "int4"
    ref = Llama.load(path, quantize="none", dtype="float32", max_seq_len=32)
    tokens = torch.tensor([[3, 77, 256, 0]])
    with torch.inference_mode():
        got, want = emb(tokens), ref.model.tok_embeddings(tokens)
    assert ((got - want).abs() <= want.abs().amax() * 2.0**-9).all()
    args, cpu = ckpt.args, torch.device("cpu")
    as_int8 = make_plan(args, cpu, torch.float32, max_seq_len=32, memory=1 << 40, native_mode="int4")
    saved = quantized_bytes(args.vocab_size, args.dim, "int8") - quantized_bytes(args.vocab_size, args.dim, "int4")
    assert as_int8.weights_on_device - llm.plan.weights_on_device == saved


def test_smollm2_as_a_q4_k_m_file(llm, tmp_path, tokens, reference):
    """SmolLM2's weights written the way llama.cpp's Q4_K_M recipe writes them (ffn_down, the one width that
    splits into 256-blocks, Q4_K, or Q6_K in the layers that get more bits; the 576-wide rows in its
    fallbacks Q5_0 and Q8_0) load as int4+int8, keep the file's precision (top-1 agreement with the float32
    weights the file holds) and answer like the original."""
    import gguf

    from llamarun.convert import _gguf_metadata
    from llamarun.formats.gguf import _GLOBAL_NAMES, _LAYER_NAMES
    from llamarun.generation import Llama, build_model
    from llamarun.formats import load_checkpoint

    T = gguf.GGMLQuantizationType
    ckpt, n = llm.checkpoint, llm.args.n_layers
    names = {meta: g for g, meta in _GLOBAL_NAMES.items()}
    more_bits = {i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}
    path = tmp_path / "smollm2-q4_k_m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    _gguf_metadata(w, ckpt, "float32")
    for name in ckpt.tensors:
        t = ckpt.tensors[name].float().numpy()
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            gname = f"blk.{i}." + {meta: g for g, meta in _LAYER_NAMES.items()}[rest]
            high = int(i) in more_bits and rest in ("attention.wv.weight", "feed_forward.w2.weight")
        else:
            gname, high = names[name], True
        if t.ndim == 1:
            w.add_tensor(gname, t)
        elif t.shape[1] % 256:
            qt = T.Q8_0 if high else T.Q5_0
            w.add_tensor(gname, gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            blocks = _q6_k_blocks(t) if high else _q4_k_blocks(t)
            w.add_tensor(gname, blocks.reshape(len(t), -1), raw_dtype=T.Q6_K if high else T.Q4_K)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    kq = load_checkpoint(path)
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(kq.tensor_types.values())
    for name in ("layers.0.feed_forward.w2.weight", "layers.1.feed_forward.w2.weight"):  # the test's quantizers
        assert (kq.tensors[name] - ckpt.tensors[name].float()).abs().max() < 0.1 * ckpt.tensors[name].abs().max()
    model = Llama.load(path, max_seq_len=512)
    assert model.plan.label == "int4+int8"
    modes = {m.mode for name, m in model.model.named_modules() if name.endswith("feed_forward.w2")}
    assert modes == {"int4", "int8"}
    with torch.inference_mode():
        file_fp32 = build_model(kq, torch.device("cpu"), torch.float32)
        file_ref = file_fp32(tokens[:, :-1])[0]
    top1, ppl, ppl_ref = _agreement(_forward(model.model, tokens, True), file_ref, tokens)
    print(f"\nQ4_K_M-style file as int4+int8: top-1 agreement {top1:.1%} with its float32 weights, perplexity "
          f"{ppl:.3f} vs {ppl_ref:.3f}; the file's float32 against the original's: "
          f"{_agreement(file_ref, reference, tokens)[0]:.1%}")
    assert top1 >= 0.95 and ppl / ppl_ref - 1 <= 0.02
    out = model.text_completion(["The capital of France is"], max_gen_len=4, temperature=0)[0]["generation"]
    assert out.startswith(" Paris"), out


def _q4_1_blocks(w: np.ndarray) -> np.ndarray:
    """GGUF Q4_1 bytes as llama.cpp's quantize_row_q4_1_ref makes them."""
    b = w.reshape(-1, 32).astype(np.float32)
    lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
    d = (hi - lo) / 15
    idv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0)
    q = np.clip(np.floor((b - lo) * idv + 0.5), 0, 15).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8), qs], axis=1)


def test_bad_gguf_data_is_rejected():
    with pytest.raises(Exception, match="bytes"):
        Q.from_gguf_q8_0(np.zeros(33, np.uint8), (1, 32))
    with pytest.raises(Exception, match="32-blocks"):
        Q.from_gguf_q4_1(np.zeros(20, np.uint8), (1, 16))


# ---------------------------------------------------------------------------------------------------------
# Tiny models: quantize_model, devices/dtypes, save and load


def _tiny(tie: bool, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=128, max_seq_len=64,
                     tie_embeddings=tie)
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_tiny(mode, tie):
    model = _tiny(tie)
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, 96, (2, 9))
    with torch.inference_mode():
        ref_logits = ref(tokens)
    Q.quantize_model(model, mode)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.tok_embeddings, Q.QuantizedEmbedding) and model.tok_embeddings.tied == tie
    assert model.output.mode == "int8"  # the default output mode
    with torch.inference_mode():
        logits = model(tokens)
        # Incremental decoding through the KV cache matches the full forward.
        model.setup_cache(2, 16)
        step = [model(tokens[:, :5], 0)] + [model(tokens[:, i : i + 1], i) for i in range(5, 9)]
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.8
    torch.testing.assert_close(torch.cat(step, 1), logits, rtol=2e-2, atol=2e-2)
    # model.to(dtype) must not cast the scales (stored as int16 bits).
    model.to(torch.bfloat16)
    assert model.output.scales.dtype == torch.int16 and model.tok_embeddings.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        assert model(tokens).dtype == torch.float32  # the model returns float32 logits


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_embedding_one_token_lookup(mode):
    """A decode step's tokens (one, or one per row) are looked up through the dequantization kernel; the
    rows equal the general path's (also taken past _KERNEL_LOOKUP_MAX tokens), and an out-of-range id
    still fails as it does there."""
    model = Q.quantize_model(_tiny(True), mode)
    emb = model.tok_embeddings
    want = emb.source.qtensor.rows(torch.tensor([[5, 0, 95]]))
    for i, tok in enumerate((5, 0, 95)):
        torch.testing.assert_close(emb(torch.tensor([[tok]])), want[:, i : i + 1], rtol=0, atol=0)
    batch = torch.tensor([[5], [0], [95]])  # [B, 1]: a batched decode step
    torch.testing.assert_close(emb(batch), want.view(3, 1, -1), rtol=0, atol=0)
    many = torch.randint(0, 96, (2, Q._KERNEL_LOOKUP_MAX))
    torch.testing.assert_close(emb(many), emb.source.qtensor.rows(many), rtol=0, atol=0)
    with pytest.raises(IndexError):
        emb(torch.tensor([[96]]))
    with pytest.raises(IndexError):
        emb(torch.tensor([[3], [96]]))


def test_group_sizes_and_errors():
    w = torch.randn(16, 256)
    for g in (32, 64, 128, 256):
        qt = Q.quantize_int4(w, g)
        assert qt.scales.shape == (16, 256 // g) and qt.nbytes == 16 * 128 + 2 * 2 * 16 * (256 // g)
        err = (qt.dequantize() - w).abs().max() / w.abs().max()
        assert err < 0.15
    assert Q.quantize_int8(w).scales.shape == (16, 1)
    assert (Q.quantize_int8(w).dequantize() - w).abs().max() <= w.abs().max() / 127
    # The error search never does worse than plain min/max rounding.
    plain, searched = Q.quantize_int4(w, 32, search=False), Q.quantize_int4(w, 32)
    assert (searched.dequantize() - w).pow(2).sum() <= (plain.dequantize() - w).pow(2).sum()
    with pytest.raises(Exception, match="unknown quantization mode"):
        Q.quantize_tensor(w, "int3")
    with pytest.raises(ValueError, match="2-D"):
        Q.quantize_tensor(torch.randn(4), "int8")


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_tiny(tmp_path, tie):
    model = Q.quantize_model(_tiny(tie), "int4", output_mode="int4" if tie else None)
    out = Q.save_quantized(model, model.args, None, tmp_path / "tiny.safetensors")
    assert Q.is_quantized_checkpoint(out) and not Q.is_quantized_checkpoint(tmp_path)
    loaded = Q.load_quantized(out)
    assert loaded.tokenizer is None and loaded.args == model.args
    tokens = torch.randint(0, 96, (1, 12))
    with torch.inference_mode():
        assert torch.equal(loaded.model(tokens), model(tokens))
    assert Q.describe_quantization(loaded.model) == Q.describe_quantization(model)


def test_save_load_round_trip_smollm2(llm, fp32, tmp_path, default_model_path, monkeypatch):
    """The real model, int4 straight from the GGUF: identical logits, and the tokenizer comes along; on a
    CPU with native bf16 (simulated) it loads with float32 activations and bf16 prefill GEMMs."""
    model = Q.build_quantized_model(llm.checkpoint, "int4")
    out = Q.save_quantized(model, llm.args, default_model_path, tmp_path / "smol-int4.safetensors")
    loaded = Q.load_quantized(out)
    text = "The capital of France is"
    assert loaded.tokenizer.encode(text) == llm.tokenizer.encode(text)
    tokens = torch.tensor([llm.tokenizer.encode(text)])
    with torch.inference_mode():
        assert torch.equal(loaded.model(tokens), model(tokens))
    size = out.stat().st_size
    assert size < 0.2 * Q.model_nbytes(fp32), size  # vs float32
    from llamarun import Llama, device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert Llama.load(out).dense_dtype == torch.float32
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    bf16_cpu = Llama.load(out)
    want = (torch.float32, torch.bfloat16) if kernels.available() else (torch.bfloat16, torch.float32)
    assert (bf16_cpu.dtype, bf16_cpu.dense_dtype) == want  # without the kernels: bf16 activations, as before


def test_cli_subcommand(tmp_path, capsys, default_model_path):
    from llamarun.cli import build_parser

    parser = build_parser()
    out = tmp_path / "smol-int4.safetensors"
    args = parser.parse_args(["quantize", str(default_model_path), str(out), "--to", "int4"])
    assert Q.run(args) == 0
    assert "int4" in capsys.readouterr().out
    loaded = Q.load_quantized(out)
    assert {v["mode"] for v in loaded.layers.values()} == {"int4", "int8"}
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "a", "b", "--to", "int2"])


# ---------------------------------------------------------------------------------------------------------
# The output file: refused paths, failed writes, damaged files


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A tiny float32 Meta checkpoint with a SentencePiece tokenizer: a source quantized in milliseconds."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tiny_src")
    tok = train_sentencepiece(root)
    args = tiny_args(spm.SentencePieceProcessor(model_file=str(tok)).vocab_size())
    return write_meta(root / "src", args, random_weights(args), tokenizer=tok, dtype=torch.float32)


@pytest.fixture
def umask_022():
    """The usual umask while the test runs, so that the mode of a new file is known (0644)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_cli_output_checks(tiny_src, tmp_path, capsys, umask_022):
    """OUT is checked before any work, as ``llamarun convert`` checks it: an existing file needs --force,
    the source is never replaced, the parent must be a directory, the name must say .safetensors."""
    out = tmp_path / "q.safetensors"
    proc = run_cli_in_process(["quantize", tiny_src, out, "--to", "int8"], capsys)
    assert proc.returncode == 0, proc.stderr
    assert oct(stat.S_IMODE(out.stat().st_mode)) == "0o644"  # safetensors alone writes 0600
    written = out.read_bytes()
    assert_one_line_error(run_cli_in_process(["quantize", tiny_src, out, "--to", "int4"], capsys), 2,
                          f"{out} already exists (pass --force to replace it)")
    assert out.read_bytes() == written
    assert run_cli_in_process(["quantize", tiny_src, out, "--to", "int4", "--force"], capsys).returncode == 0
    assert {v["mode"] for v in Q.load_quantized(out).layers.values()} == {"int4", "int8"}

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF precious")
    (tmp_path / "text.gguf").write_text("a file")
    for target, force, needle in [
        (gguf, False, "model.gguf: the output would replace the checkpoint being read"),
        (gguf, True, "model.gguf: the output would replace the checkpoint being read"),
        (tmp_path / "out.gguf", False, "out.gguf: the output is a safetensors file"),
        (tmp_path / "text.gguf" / "a.safetensors", False, "text.gguf: not a directory"),
        (tmp_path / "nodir" / "a.safetensors", True, "nodir: no such directory"),
    ]:
        args = ["quantize", gguf, target, "--to", "int8"] + ["--force"] * force
        assert_one_line_error(run_cli_in_process(args, capsys), 2, needle)
    assert gguf.read_bytes() == b"GGUF precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "q.safetensors", "text.gguf"]


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """``ulimit -f``: writes past ``nbytes`` fail with EFBIG (SIGXFSZ ignored, as a shell's trap '' does)."""
    resource = pytest.importorskip("resource")
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_cli_write_failure(tiny_src, tmp_path, capsys, monkeypatch):
    """A failed write is one line naming OUT and why (exit 1), and leaves nothing behind."""
    import safetensors.torch

    out = tmp_path / "q.safetensors"
    with file_size_limit(32 << 10):  # the tiny model quantized: ~120 KiB
        proc = run_cli_in_process(["quantize", tiny_src, out, "--to", "int8"], capsys)
    assert_one_line_error(proc, 1, f"cannot write {out}: File too large")
    assert list(tmp_path.iterdir()) == []

    def disk_full(*args, **kwargs):  # what safetensors raises: Rust's io::Error in its message
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    model = Q.quantize_model(_tiny(True), "int8")
    with pytest.raises(RuntimeFailure, match=f"^cannot write {out}: {os.strerror(errno.ENOSPC)}$"):
        Q.save_quantized(model, model.args, None, out)
    assert list(tmp_path.iterdir()) == []


def _rewrite(src, dst, metadata=None, header=None):
    """A copy of the safetensors file ``src`` with its metadata or header edited."""
    blob = src.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    head = json.loads(blob[8 : 8 + n])
    if metadata:
        metadata(head["__metadata__"])
    if header:
        header(head)
    text = json.dumps(head).encode()
    dst.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + n :])
    return dst


def test_damaged_files_are_format_errors(tmp_path, capsys):
    """A quantized file cut short or with edited metadata is a one-line FormatError (exit 2), from
    is_quantized_checkpoint (which Llama.load asks first), load_quantized and ``llamarun generate``."""
    model = Q.quantize_model(_tiny(False), "int4")
    good = Q.save_quantized(model, model.args, None, tmp_path / "good.safetensors")
    blob = good.read_bytes()
    header_end = 8 + int.from_bytes(blob[:8], "little")

    def drop(key):
        return lambda d: d.pop(key)

    def edit(key, value):
        return lambda d: d.update({key: value})

    def qweight_shape(h):
        h["layers.0.attention.wo.qweight"]["shape"] = [32, 64]  # the same bytes as [64, 32]: only the shape is off

    wider = json.dumps({**model.args.to_dict(), "hidden_dim": 256})  # args the layers do not fit
    cases = {
        "cut.safetensors": ("bytes of tensor data, its header describes", lambda p: p.write_bytes(blob[:-5000])),
        "header.safetensors": ("the file ends inside its", lambda p: p.write_bytes(blob[: header_end - 10])),
        "version.safetensors": ("'version' is not an integer: 'x'", lambda p: _rewrite(good, p, edit("version", "x"))),
        "layers.safetensors": ("no 'layers' in its metadata", lambda p: _rewrite(good, p, drop("layers"))),
        "args.safetensors": ("no 'args' in its metadata", lambda p: _rewrite(good, p, drop("args"))),
        "json.safetensors": ("'args' is not valid JSON", lambda p: _rewrite(good, p, edit("args", "{bad"))),
        "config.safetensors": ("'args': dim 64 is not divisible by n_heads 5",
                               lambda p: _rewrite(good, p, edit("args", json.dumps({**model.args.to_dict(), "n_heads": 5,
                                                                                     "head_dim": None})))),
        "missing.safetensors": ("missing tensor layers.0.attention.wo.scales", lambda p: _rewrite(
            good, p, header=lambda h: h.update({"wo.scales": h.pop("layers.0.attention.wo.scales")}))),
        "gap.safetensors": ("data at byte", lambda p: _rewrite(good, p, header=lambda h: h.pop("norm.weight"))),
        "shape.safetensors": ("tensor layers.0.attention.wo.qweight is U8 [32, 64], expected",
                              lambda p: _rewrite(good, p, header=qweight_shape)),
        "model.safetensors": ("feed_forward.w13 has shape [256, 64], its args say [512, 64]",
                              lambda p: _rewrite(good, p, edit("args", wider))),
    }
    for name, (needle, make) in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(FormatError) as e:
            Q.load_quantized(path)
        assert str(e.value).startswith(f"{path}: corrupted or truncated llamarun quantized file ("), str(e.value)
        assert needle in str(e.value), (name, str(e.value))
        proc = run_cli_in_process(["generate", "-m", path, "-n", "2", "hi"], capsys)
        assert_one_line_error(proc, 2, "corrupted or truncated llamarun quantized file", needle)
    # A safetensors file cut inside its header, with nothing saying whose it was: not "unrecognised format".
    other = tmp_path / "other.safetensors"
    other.write_bytes(len(b'{"x": 1}' * 100).to_bytes(8, "little") + b'{"x": 1}')
    with pytest.raises(FormatError, match="truncated safetensors file"):
        Q.is_quantized_checkpoint(other)
    assert Q.is_quantized_checkpoint(good) and not Q.is_quantized_checkpoint(tmp_path / "missing.gguf")


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_path_dequantizes_large_weights_in_tiles(monkeypatch, mode, dtype):
    """The portable path (a GPU's, or without kernels) multiplies by the dequantized weight; one of more than
    PORTABLE_TILE_BYTES (in the activations' dtype) is dequantized a tile of rows at a time, never whole,
    with the same result."""
    torch.manual_seed(0)
    lin = Q.make_linear(Q.quantize_tensor(torch.randn(100, 64), mode, 32))
    lin.use_kernels(False)
    x = torch.randn(3, 5, 64).to(dtype)
    want = F.linear(x, lin.dequantize(dtype))
    made = []
    real = Q._dequantize

    def spy(mode, qweight, *rest):
        made.append(qweight.shape[0])
        return real(mode, qweight, *rest)

    monkeypatch.setattr(Q, "_dequantize", spy)
    assert torch.equal(lin(x), want) and made == [100]  # within a tile: whole, as before
    made.clear()
    monkeypatch.setattr(Q, "PORTABLE_TILE_BYTES", 30 * 64 * x.element_size())  # 30 rows a tile
    got = lin(x)
    assert made == [30, 30, 30, 10] and got.shape == (3, 5, 100) and got.dtype == dtype
    torch.testing.assert_close(got, want)  # float32: BLAS may block a 30-row product differently
