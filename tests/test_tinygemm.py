"""The GPU int4 path (llamarun.tinygemm), checked through torch's CPU twin of the tinygemm kernel: the same
layout conversion and arithmetic, only the packer's input format differs (int32 codes here, codes two to
a byte on CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch

from test_quantize import _tiny as tiny_float

from llamarun import quantize as Q
from llamarun import tinygemm as T
from llamarun.bench import gemm_note
from llamarun.model import Transformer

pytestmark = pytest.mark.skipif(T.unsupported(Q.Int4Linear(Q.quantize_tensor(torch.zeros(16, 64), "int4")))
                                is not None, reason="this torch has no CPU tinygemm")


def _int4(n: int, k: int, group: int = 32, seed: int = 0) -> Q.Int4Linear:
    g = torch.Generator().manual_seed(seed)
    return Q.Int4Linear(Q.quantize_tensor(torch.randn(n, k, generator=g) * 0.02, "int4", group))


@pytest.mark.parametrize("n, k, group", [(960, 576, 32), (576, 1536, 32), (3072, 576, 64), (256, 512, 128)])
def test_layer_equals_the_dequantized_product(n, k, group):
    layer = _int4(n, k, group)
    fast = T.TinyGemmInt4Linear(layer)
    assert fast.inner_k_tiles == T.inner_k_tiles(k) and fast.weight.numel() * fast.weight.element_size() == n * k // 2
    assert fast.scales_and_zeros.shape == (k // group, n, 2) and fast.scales_and_zeros.dtype == torch.bfloat16
    x = torch.randn(2, 3, k)
    ref = x @ layer.dequantize().T
    y = fast(x)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    # bf16 activations, scales and zeros: ~3e-3 relative error; a wrong nibble order or zero point is ~1.
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2
    assert T.check(layer, fast) < 1e-2


def test_inner_k_tiles_and_unsupported_shapes():
    assert [T.inner_k_tiles(k) for k in (576, 1536, 4096, 11008, 96, 40)] == [4, 8, 8, 8, 2, None]
    assert T.unsupported(_int4(64, 576)) is None
    assert "shape [40, 576]" in T.unsupported(_int4(40, 576))  # outputs are packed 16 rows at a time here
    assert T.unsupported(_int4(64, 96)) is None  # 96 inputs: three tiles of 32


def _tiny(tie: bool, output_mode: str = "int8") -> Transformer:
    """test_quantize's tiny model (dim 64, 2 layers, vocabulary 96), quantized to int4."""
    return Q.quantize_model(tiny_float(tie), "int4", output_mode=output_mode)


@pytest.mark.parametrize("tie, output_mode, swapped", [(True, "int8", 8), (False, "int4", 9), (True, "int4", 8)])
def test_swap_keeps_the_model_function(tie, output_mode, swapped):
    model = _tiny(tie, output_mode)
    ref = copy.deepcopy(model)
    assert T.use_tinygemm(model) == (0, None)  # CUDA layers only by default: nothing to do on a CPU model
    n, why = T.use_tinygemm(model, devices=("cpu",))
    # 4 fused linears per layer; an int4 output layer too, unless the embedding reads its table.
    assert (n, why) == (swapped, None)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if "Linear" in type(m).__name__}
    assert kinds["layers.0.attention.wqkv"] == "TinyGemmInt4Linear"
    assert kinds["output"] == ("TinyGemmInt4Linear" if swapped == 9 else f"Int{output_mode[3:]}Linear")
    assert isinstance(model.tok_embeddings.source, Q.QuantizedLinear)
    tokens = torch.randint(0, 96, (2, 9))
    with torch.inference_mode():
        want, got = ref(tokens), model(tokens)
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_default_model_through_tinygemm(default_model_path):
    """SmolLM2's Q4_1 blocks (group 32, inputs 576 and 1536) converted to tinygemm's layout: the logits of a
    prompt stay those of the integer kernels."""
    from llamarun.formats import load_checkpoint

    ckpt = load_checkpoint(default_model_path)
    with torch.inference_mode():
        model = Q.build_quantized_model(ckpt, "int4", "cpu", torch.float32, max_seq_len=64)
        tokens = torch.tensor([ckpt.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
        want = model(tokens)
        n, why = T.use_tinygemm(model, devices=("cpu",))
        got = model(tokens)
    assert (n, why) == (4 * ckpt.args.n_layers, None)  # the int8 output layer keeps its own path
    assert ((got - want).norm() / want.norm()).item() < 3e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert got[0, -1].argmax() == want[0, -1].argmax()


def test_a_wrong_conversion_is_caught_and_nothing_swapped(monkeypatch):
    """The check that guards a GPU load: with the 32-blocks' nibble halves swapped, the products disagree,
    and every layer keeps the dequantizing path."""
    model = _tiny(True)
    real = T._unpack_int4
    monkeypatch.setattr(T, "_unpack_int4", lambda q: real(q).view(q.shape[0], -1, 2, 16).flip(2).reshape(q.shape[0], -1))
    n, why = T.use_tinygemm(model, devices=("cpu",))
    assert n == 0 and "differs from the dequantized one" in why
    assert not any(isinstance(m, T.TinyGemmInt4Linear) for m in model.modules())


def test_kernel_failure_keeps_the_layers(monkeypatch):
    model = _tiny(True)

    def fail(*args):
        raise RuntimeError("no kernel image is available for execution on the device\nmore")

    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", fail)
    n, why = T.use_tinygemm(model, devices=("cpu",))
    assert n == 0 and why == "tinygemm failed: no kernel image is available for execution on the device"


def test_speed_line_names_tinygemm():
    info = {"dtype": "bfloat16", "prefill_gemm_dtype": "bfloat16", "batch_rows": 0, "batch_product": None}
    assert gemm_note(info) == ""
    assert gemm_note({**info, "int4_kernel": "tinygemm"}) == " (tinygemm int4 products)"


def test_environment_switch_turns_it_off(monkeypatch):
    model = _tiny(True)
    monkeypatch.setenv("LLAMARUN_TINYGEMM", "0")
    assert T.use_tinygemm(model, devices=("cpu",)) == (0, "disabled by LLAMARUN_TINYGEMM=0")
    monkeypatch.delenv("LLAMARUN_TINYGEMM")
    assert T.use_tinygemm(model, devices=("cpu",))[0] == 8


@pytest.mark.slow
def test_compiled_decode_step_through_tinygemm():
    """The layers trace under torch.compile (what Llama.compile does with CUDA graphs on a GPU): the compiled
    step's greedy tokens are the eager step's."""
    from test_generation import IdTokenizer

    from llamarun import Llama

    model = tiny_float(False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # sharper distributions: greedy paths that rounding differences do not flip
    Q.quantize_model(model.to(torch.bfloat16), "int4")
    assert T.use_tinygemm(model, devices=("cpu",)) == (8, None)
    llm = Llama(model, IdTokenizer(96), max_seq_len=64, max_batch_size=1)
    eager, _ = llm.generate([[1, 2, 3, 4, 5]], 12, temperature=0, ignore_eos=True)
    llm.compile((1,))
    compiled, _ = llm.generate([[1, 2, 3, 4, 5]], 12, temperature=0, ignore_eos=True)
    assert compiled == eager


def test_each_old_layer_is_freed_as_it_is_replaced(monkeypatch):
    """On a GPU the int4 weights must not exist twice over: when a layer's replacement is made, the layers
    replaced before it are gone."""
    import weakref

    model = _tiny(False, "int4")
    old = [weakref.ref(m) for m in model.modules() if type(m) is Q.Int4Linear]
    alive_at_each = []
    real = T.TinyGemmInt4Linear

    def counting(layer):
        alive_at_each.append(sum(r() is not None for r in old))
        return real(layer)

    monkeypatch.setattr(T, "TinyGemmInt4Linear", counting)
    n, _ = T.use_tinygemm(model, devices=("cpu",))
    assert n == 9 and alive_at_each == list(range(len(old), len(old) - n, -1))
