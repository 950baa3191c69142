"""The fused CPU kernels (fused.cpp) and the fast-path modules against model.py's reference code."""

from __future__ import annotations

import pytest
import torch

from llamarun import fastpath, kernels
from llamarun.config import ModelArgs
from llamarun.model import Attention, KVCache, RMSNorm, Transformer, quantize_rows, rope_cache
from llamarun.quantize import quantize_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.reason()}")


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 64), (2, 40)])
def test_rms_norm_matches_reference(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5)
    norm.weight.data.normal_()
    x = torch.randn(shape) * 3
    got = torch.ops.llamarun.rms_norm(x, norm.weight, norm.eps)
    torch.testing.assert_close(got, norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 2 * 1536), (4, 3, 2 * 20)])
def test_silu_mul_matches_reference(shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * 6  # reaches into exp's tails both ways
    x[..., 0] = -100.0
    x[..., 1] = 100.0
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(torch.ops.llamarun.silu_mul(x), torch.nn.functional.silu(gate) * up,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 2, 64), (3, 2, 64), (1, 40), (3, 72), (2, 36)])  # 4 rows: the pool; 6: MKL
@pytest.mark.parametrize("n", [960, 7])
def test_f32_linear_matches_torch(shape, n):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(n, shape[-1])
    torch.testing.assert_close(torch.ops.llamarun.f32_linear(x, w), torch.nn.functional.linear(x, w),
                               rtol=1e-5, atol=1e-4)


# Rows: 1 and 4 the pool; 6 a bf16 GEMM with native bf16, else the pool (up to 32 rows: tiles of 4 x rows and
# 3 weight rows, the remainders on their own, K not a multiple of 8 as dot products); 40 a GEMM either way.
@pytest.mark.parametrize("shape", [(1, 1, 576), (4, 288), (2, 3, 64), (1, 40), (2, 20, 64), (16, 576), (7, 72),
                                   (5, 36)])
@pytest.mark.parametrize("n", [960, 7, 20000])  # 20000 x 64: the widening's 4 MiB tiles, the last one partial
def test_f32_linear_with_bf16_weights(shape, n):
    """bfloat16 weights: decode rows widen them exactly (float32 products and sums); more rows are a bf16 GEMM
    where the CPU has native bf16 (x rounded to bf16, bf16 out, as torch's bf16 linear), else the pool up to
    32 rows and beyond a float32 GEMM over the weight widened a tile of rows at a time, straight into the
    output's columns."""
    if n == 20000 and shape[-1] != 64:
        pytest.skip("the tiles need a narrow, tall weight")
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(n, shape[-1]).bfloat16()
    got = torch.ops.llamarun.f32_linear(x, w)
    assert got.dtype == torch.float32 and got.shape == (*shape[:-1], n)
    if x.numel() // shape[-1] <= 4 or not kernels.bf16_gemm():
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w.float()), rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(got, torch.nn.functional.linear(x.bfloat16(), w).float())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.llamarun.f32_linear(x, w.half())


def test_bf16_weights_model_decodes_like_its_reference():
    """fastpath.bf16_weights: bf16 linear and embedding weights (a tied output shares the table) under
    float32 activations. Prefill + 10 decode steps (the one-op layer stack with the head) match the same
    model computing in float32 from the bf16-rounded weights: exactly for the decode rows' products, to bf16
    rounding for the prefill GEMMs."""
    model = _tiny_model()
    model.tok_embeddings.weight = model.output.weight  # tied, as SmolLM2
    model.to(torch.bfloat16)
    ref = _tiny_model()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref.output.weight = ref.tok_embeddings.weight
    fastpath.accelerate(model)
    fastpath.bf16_weights(model)
    assert model.output.weight.dtype == torch.bfloat16 and model.output.weight is model.tok_embeddings.table
    assert model.tok_embeddings.weight.dtype == torch.float32  # the activations' dtype, for the engine
    assert isinstance(model.layers[0].feed_forward.w13, fastpath.Bf16Linear)
    assert model.layers[0].attention.prefill_dtype == torch.bfloat16  # as the quantized models' bf16 GEMMs
    prompt = torch.randint(0, 50, (2, 7))
    with torch.inference_mode():
        got, want = _decode(model, prompt), _decode(ref, prompt)
        assert model._decode_stack(2) is not None and model._decode_stack(2)[5]  # decode_layers with the head
        assert model.layers[0].attention.cache.k.dtype == torch.float32
    torch.testing.assert_close(got[1:], want[1:], rtol=0.05, atol=0.05)  # decode after a bf16-GEMM prefill
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # Off the fast path (another device or dtype): the weight is cast to the activations'.
    lin = model.layers[0].attention.wo
    x = torch.randn(3, lin.in_features, dtype=torch.float64)
    torch.testing.assert_close(lin(x), x @ lin.weight.double().t())


@pytest.mark.parametrize("heads,kv_heads,head_dim,batch,pos", [(9, 3, 64, 1, 0), (9, 3, 64, 1, 37),
                                                                 (4, 4, 16, 3, 5), (8, 2, 128, 2, 300),
                                                                 (6, 6, 48, 1, 511), (4, 1, 64, 2, 128)])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16, torch.int8])
def test_attn_decode_matches_reference(heads, kv_heads, head_dim, batch, pos, kv):
    """One new token per row: rotary, cache write and GQA attention equal model.py's Attention (positions
    0..pos in chunks of 128 per task: one, several, and one past a chunk boundary), with a float32, a
    float16 or an int8 cache (rows and scales)."""
    torch.manual_seed(0)
    args = ModelArgs(dim=heads * head_dim, n_layers=1, n_heads=heads, n_kv_heads=kv_heads, vocab_size=10,
                     hidden_dim=32, max_seq_len=512)
    rope = rope_cache(args, 512)
    ref = Attention(args)
    T = 512
    cache = ref.cache = KVCache(batch + 1, kv_heads, T, head_dim, kv)  # cache batch larger than the input
    for name in ("k", "v"):  # what earlier positions left
        rows = torch.randn(batch + 1, kv_heads, T, head_dim)
        if kv == torch.int8:
            rows, scale = quantize_rows(rows)
            getattr(cache, name + "_scale").copy_(scale)
        getattr(cache, name).copy_(rows)
    names = [n for n, t in cache.named_buffers()]  # k, v (and k_scale, v_scale)
    before = {n: getattr(cache, n).clone() for n in names}
    x = torch.randn(batch, 1, args.dim)
    with torch.inference_mode():
        want = ref(x, rope[pos : pos + 1], pos)
        written = {n: getattr(cache, n).clone() for n in names}
        for n in names:
            getattr(cache, n).copy_(before[n])
        got = torch.ops.llamarun.attn_decode(ref.wqkv(x), cache.k, cache.v, rope[pos : pos + 1], pos,
                                             heads, kv_heads, cache.k_scale, cache.v_scale)
        got = ref.wo(got)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The rotated key went in at pos (in float16: the same value, give or take one rounding step; in int8 the
    # same codes but where the two rotations' last bits fall either side of a rounding boundary).
    if kv == torch.int8:
        for n in names:
            torch.testing.assert_close(getattr(cache, n).float(), written[n].float(), rtol=1e-6, atol=1)
        assert (cache.k != written["k"]).sum() <= 2 and torch.equal(cache.v, written["v"])
    else:
        torch.testing.assert_close(cache.k, written["k"], rtol=1e-6 if kv == torch.float32 else 1e-3, atol=1e-6)
        torch.testing.assert_close(cache.v, written["v"])


def test_attn_decode_rejects_bad_input():
    cache = torch.zeros(1, 2, 8, 16)
    qkv = torch.zeros(1, 1, (4 + 4) * 16)
    rope = torch.zeros(1, 8, 2)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.llamarun.attn_decode(qkv, cache, cache.clone(), rope, 8, 4, 2)
    with pytest.raises(RuntimeError, match="qkv must be"):
        torch.ops.llamarun.attn_decode(qkv[..., :-16], cache, cache.clone(), rope, 0, 4, 2)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.llamarun.attn_decode(qkv.double(), cache, cache.clone(), rope, 0, 4, 2)
    with pytest.raises(RuntimeError, match="both float32, float16 or int8"):
        torch.ops.llamarun.attn_decode(qkv, cache, cache.half(), rope, 0, 4, 2)
    with pytest.raises(RuntimeError, match="both float32, float16 or int8"):
        torch.ops.llamarun.attn_decode(qkv, cache.bfloat16(), cache.bfloat16(), rope, 0, 4, 2)


def _tiny_model(seed: int = 0, mode: str = "none") -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=96, max_seq_len=64)
    model = Transformer(args).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    if mode != "none":
        quantize_model(model, mode)
    return model


def _decode(model: Transformer, prompt: torch.Tensor, steps: int = 10, kv: torch.dtype | None = None) -> torch.Tensor:
    """Logits of a prefill and ``steps`` greedy decode steps [steps + 1, B, vocab], from a fresh cache."""
    model.free_cache()
    model.setup_cache(prompt.shape[0], 32, kv)
    out = [model(prompt, 0)[:, -1]]
    tok = out[-1].argmax(-1, keepdim=True)
    for i in range(steps):
        out.append(model(tok, prompt.shape[1] + i)[:, -1])
        tok = out[-1].argmax(-1, keepdim=True)
    return torch.stack(out)


@pytest.mark.parametrize("mode,batch,kv", [("none", 2, None), ("none", 6, None), ("int8", 1, None), ("int4", 3, None),
                                           ("none", 2, torch.float16), ("int4", 3, torch.float16),
                                           ("none", 2, torch.int8), ("int4", 1, torch.int8)])
def test_accelerated_model_generates_like_reference(mode, batch, kv):
    """Prefill + 10 decode steps: logits of the fast path (decode steps through the one-op layer stack,
    decode_layers) equal the reference's, for float32 weights (6 rows: the GEMM branch), int8 and int4,
    with a float32, a float16 or an int8 KV cache."""
    model = _tiny_model(mode=mode)
    prompt = torch.randint(0, 50, (batch, 7))
    with torch.inference_mode():
        want = _decode(model, prompt, kv=kv)
        # Per layer: two norms, attention, ffn and 4 linears (float only: wqkv, wo, w13, w2); the final norm,
        # the output layer (float only) and the Transformer.
        assert fastpath.accelerate(model) == 2 * (4 + (4 if mode == "none" else 0)) + 2 + (mode == "none")
        got = _decode(model, prompt, kv=kv)
        assert model._decode_stack(batch) is not None  # the steps went through decode_layers
        assert model._decode_stack(batch)[5]  # ... and the head
        assert model.layers[0].attention.cache.k.dtype == (kv or torch.float32)
        fastpath.reference(model)
        again = _decode(model, prompt, kv=kv)
    # float32 sums in another order; in a float16 cache such a difference can move a key or value to the
    # neighbouring float16 value (one part in 2048), hence the looser bound there.
    tol = dict(rtol=1e-4, atol=3e-4) if kv is None else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(again, want)


def test_decode_stack_follows_the_cache_and_model():
    """The gathered op arguments are dropped when the cache is reallocated or the model cast, and the
    stack is not used where the op can't run the model as it is (hooked layers, big batches)."""
    model = _tiny_model(mode="int4")
    fastpath.accelerate(model)
    prompt = torch.randint(0, 50, (1, 5))
    with torch.inference_mode():
        want = _decode(model, prompt)
        model.setup_cache(1, 48)  # bigger: new cache tensors
        assert model._decode_stack(1)[2][0] is model.layers[0].attention.cache.k
        model.setup_cache(1, 48, torch.float16)  # same shape, another dtype: new cache tensors too
        assert model._decode_stack(1)[2][0] is model.layers[0].attention.cache.k
        assert model.layers[0].attention.cache.k.dtype == torch.float16
        torch.testing.assert_close(_decode(model, prompt), want)
        assert model._decode_stack(model.layers[0].attention.wqkv.dense_min_rows) is None
        model.to(torch.float32)  # _apply: gathered again
        assert model._stacks is None and model._decode_stack(1) is not None


def test_old_cache_is_freed_before_the_new_one_is_allocated(monkeypatch):
    """Growing the cache drops the gathered op arguments (which hold the old cache) first, so the old and
    the new cache are never alive together: a batch-16 cache after a batch-8 one costs 16 rows, not 24."""
    import weakref

    from llamarun import model as model_mod

    model = _tiny_model()
    fastpath.accelerate(model)
    with torch.inference_mode():
        _decode(model, torch.randint(0, 50, (2, 5)))  # gathers the stack, which holds the cache tensors
        old = [weakref.ref(layer.attention.cache.k) for layer in model.layers]
        alive_at_alloc = []

        class Recording(KVCache):
            def __init__(self, *args, **kwargs):
                alive_at_alloc.append(old[len(alive_at_alloc)]() is not None)
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(model_mod, "KVCache", Recording)
        model.setup_cache(4, 32)
    assert alive_at_alloc == [False, False]  # each layer's old cache was gone when its new one was made


def test_hooks_fire_on_the_fast_path():
    """A forward hook anywhere inside the layers (or a global one) sends decode steps through the module
    calls, so it fires every step; without hooks the one-op stack runs again."""
    model = _tiny_model(mode="int8")
    fastpath.accelerate(model)
    prompt = torch.randint(0, 50, (1, 5))
    calls = []
    with torch.inference_mode():
        want = _decode(model, prompt, steps=4)
        handle = model.layers[1].feed_forward.w2.register_forward_hook(lambda m, args, out: calls.append(1))
        torch.testing.assert_close(_decode(model, prompt, steps=4), want)
        assert len(calls) == 5  # the prefill and 4 decode steps
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: calls.append(2))
        _decode(model, prompt, steps=4)
        handle.remove()
        assert calls.count(2) > 5 * 2 * 8  # every module of every step
        calls.clear()
        torch.testing.assert_close(_decode(model, prompt, steps=4), want)
        assert calls == []
        # The head (final norm, output layer) runs inside the op too: its hooks count as well.
        for module in (model.norm, model.output):
            handle = module.register_forward_hook(lambda m, args, out: calls.append(3))
            torch.testing.assert_close(_decode(model, prompt, steps=4), want)
            handle.remove()
            assert calls == [3] * 5
            calls.clear()


def test_decode_layers_rejects_bad_input():
    x = torch.zeros(1, 1, 64)
    with pytest.raises(RuntimeError, match="per layer"):
        torch.ops.llamarun.decode_layers(x, [x], [32, 0], torch.zeros(1, 8, 2), [x], [x], 0, 4, 2, 1e-5, [], [])
    with pytest.raises(RuntimeError, match="for the head"):  # 14 + 4 weights, but not 12 + 3 kinds
        torch.ops.llamarun.decode_layers(x, [x] * 18, [32, 0, 0] * 4, torch.zeros(1, 8, 2), [x], [x], 0, 4, 2, 1e-5,
                                         [], [])
    with pytest.raises(RuntimeError, match="one tensor per layer"):  # scales for none of the 1 layer's caches
        torch.ops.llamarun.decode_layers(x, [x] * 14, [32, 0, 0] * 4, torch.zeros(1, 8, 2), [x], [x], 0, 4, 2, 1e-5,
                                         [x, x], [x, x])


def test_fast_modules_fall_back_off_the_fast_path():
    """bfloat16 activations (and no cache) take model.py's code."""
    model = _tiny_model().to(torch.bfloat16)
    fastpath.accelerate(model)
    tokens = torch.randint(0, 50, (1, 5))
    with torch.inference_mode():
        got = model(tokens)
        fastpath.reference(model)
        want = model(tokens)
    assert torch.equal(got, want)


def test_accelerate_is_a_no_op_without_kernels(monkeypatch):
    monkeypatch.setenv("LLAMARUN_KERNELS", "0")
    model = _tiny_model()
    assert fastpath.accelerate(model) == 0
    assert type(model.layers[0].attention) is Attention


@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 33, 40, 49152])
def test_argmax_matches_torch(vocab):
    """Greedy decoding's argmax: first index of the maximum, and NaN counts as the maximum, as in torch."""
    torch.manual_seed(vocab)
    x = torch.randn(4, vocab)
    x[1, vocab // 2] = float("nan")
    x[2, :] = 1.0  # ties: the first one
    x[3, vocab - 1] = float("inf")
    torch.testing.assert_close(torch.ops.llamarun.argmax(x), x.argmax(-1), rtol=0, atol=0)


def test_greedy_sample_uses_the_argmax_kernel():
    from llamarun.sampling import SamplingParams, sample

    x = torch.randn(3, 1000)
    assert torch.equal(sample(x, SamplingParams(temperature=0.0)), x.argmax(-1))
    assert torch.equal(sample(x[:, ::2], SamplingParams(temperature=0.0)), x[:, ::2].argmax(-1))  # strided
