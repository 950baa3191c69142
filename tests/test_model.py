"""The transformer against HF transformers (the reference), and its own invariants."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import PROMPTS
from llamarun.config import ModelArgs, meta_ffn_hidden_dim
from llamarun.model import KVCache, Transformer, quantize_rows, rope_frequencies


def _ids(llm, prompt: str) -> torch.Tensor:
    return torch.tensor([llm.tokenizer.encode(prompt)])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(llm, hf_model, prompt):
    ids = _ids(llm, prompt)
    llm.model.free_cache()  # no cache: attention over the prompt in float32, as transformers does it
    with torch.inference_mode():
        ours = llm.model(ids, 0)
        ref = hf_model(ids).logits.float()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-3


def test_greedy_continuations_match_transformers(llm, hf_model):
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    ours, _ = llm.generate(prompts, 32, temperature=0, ignore_eos=True)
    for prompt, mine in zip(prompts, ours):
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    eos_token_id=None, pad_token_id=0)
        assert mine == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("kv,atol", [(torch.float32, 5e-4), (torch.float16, 3e-2), (torch.int8, 0.75)])
def test_kv_cache_decoding_equals_full_recompute(llm, kv, atol):
    """Prefill, one-token steps and a chunk after cached tokens, through a float32 cache (equal to a full
    recompute up to float32 summation order: one-row and many-row products sum in different orders, and 30
    layers carry that to the logits, up to 1.3e-4 on a Zen 5 CPU), a float16 one (the CPU default: keys
    and values rounded to 11 bits move SmolLM2's logits, which reach ~25, by ~1e-2 at most) and an int8 one
    (a scale per row of 64: 0.47 at most, 0.08 on average, which can swap two near-equal top tokens)."""
    ids = _ids(llm, PROMPTS[1])
    n = ids.shape[1]
    model = llm.model
    model.free_cache()
    with torch.inference_mode():
        full = model(ids, 0)
        model.setup_cache(1, n, kv)
        step = [model(ids[:, :4], 0)]
        step += [model(ids[:, i : i + 1], i) for i in range(4, n - 3)]
        step.append(model(ids[:, n - 3 :], n - 3))  # a chunk after cached tokens (masked attention)
    got = torch.cat(step, dim=1)
    assert torch.allclose(got, full, rtol=0, atol=atol)
    if kv == torch.int8:
        assert (got - full).abs().mean() < 0.15
    else:
        assert torch.equal(got.argmax(-1), full.argmax(-1))


def test_int8_kv_cache_round_trip_and_static_path():
    """model.py's own int8 cache (any device: no kernels): rows come back within half a step of their scale,
    zeros stay zeros, and the static-shape path (a tensor of positions, as compiled decoding runs) stores
    and reads what the int path does."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]
    x[0, 0, 0] = 0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == x.shape[:-1] and q.abs().max() == 127
    assert torch.all((q.float() * scale[..., None] - x).abs() <= scale[..., None] / 2 * 1.0001)
    assert scale[0, 0, 0] == 0 and not q[0, 0, 0].any()
    a, b = KVCache(2, 3, 8, 16, torch.int8), KVCache(2, 3, 8, 16, torch.int8)
    ka, va = a.update(2, x, -x)
    kb, vb = b.update(torch.arange(2, 7), x, -x)
    assert ka.dtype == torch.float32 and ka.shape == (2, 3, 7, 16) and kb.shape == (2, 3, 8, 16)
    assert torch.equal(kb[:, :, :7], ka) and torch.equal(vb[:, :, :7], va)
    for name, t in a.named_buffers():
        assert torch.equal(getattr(b, name), t), name
    torch.testing.assert_close(ka[:, :, 2:], x, rtol=0, atol=scale.max().item())


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
    base.update(kw)
    return ModelArgs(**base)


def test_tied_embeddings_share_storage():
    torch.manual_seed(0)
    m = Transformer(tiny_args(tie_embeddings=True))
    assert m.output.weight is m.tok_embeddings.weight
    assert Transformer(tiny_args()).output.weight is not None


def test_hidden_states_then_head_equal_the_logits():
    """forward(logits=False) gives the final hidden states [B, S, dim] (the output layer skipped), and head()
    turns them into the logits forward gives, or last_only's from the last position."""
    torch.manual_seed(0)
    m = Transformer(tiny_args()).eval()
    tokens = torch.randint(0, 97, (2, 5))
    with torch.inference_mode():
        logits = m(tokens)
        h = m(tokens, logits=False)
        assert h.shape == (2, 5, 64)
        torch.testing.assert_close(m.head(h), logits)
        torch.testing.assert_close(m.head(h[:, -1:]), m(tokens, last_only=True))


def test_gqa_equals_repeated_heads():
    """n_kv_heads < n_heads must equal a full multi-head model whose k/v heads are repeated."""
    torch.manual_seed(0)
    gqa = Transformer(tiny_args(n_kv_heads=2)).eval()
    mha = Transformer(tiny_args(n_kv_heads=4)).eval()
    sd = gqa.state_dict()
    d, hd = 64, 16
    for i in range(2):
        w = sd[f"layers.{i}.attention.wqkv.weight"]
        q, k, v = w.split([64, 32, 32])
        rep = lambda t: t.view(2, hd, d).repeat_interleave(2, dim=0).reshape(64, d)
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 9))
    with torch.inference_mode():
        assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_rope_scaling_matches_meta_reference():
    """Vectorised Llama 3.1 scaling equals Meta's loop (apply_scaling in llama3 model.py)."""
    args = tiny_args(dim=512, n_heads=4, rope_theta=500000.0, rope_scaling={
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    expected = []
    for freq in base.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            expected.append(freq)
        elif wavelen > 8192 / 1:
            expected.append(freq / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            expected.append((1 - smooth) * freq / 8 + smooth * freq)
    assert torch.allclose(rope_frequencies(args), torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(rope_frequencies(tiny_args()), 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)))


def test_meta_ffn_dim():
    assert meta_ffn_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert meta_ffn_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert meta_ffn_hidden_dim(5120, 256, None) == 13824  # Llama 2 13B


def test_default_model_config(llm):
    a = llm.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size) == (576, 30, 9, 3, 49152)
    assert a.rope_theta == 100000.0 and a.tie_embeddings
    assert 134_000_000 < a.num_params() < 135_000_000


def test_prefill_dtype_rounds_attention_not_the_cache():
    """With ``prefill_dtype`` (bf16 prefill attention on CPUs with native bf16) the attention products of a
    multi-token call change, but the KV cache stores keys and values rounded once into its own dtype, as
    without it: decode steps later read the same cache."""
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    tokens = torch.randint(0, model.args.vocab_size, (1, 12))
    caches, logits = [], []
    with torch.inference_mode():
        for dtype in (None, torch.bfloat16):
            for layer in model.layers:
                layer.attention.prefill_dtype = dtype
            model.free_cache()
            model.setup_cache(1, 16, torch.float16)
            logits.append(model(tokens, 0))
            cache = model.layers[0].attention.cache
            caches.append((cache.k.clone(), cache.v.clone()))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert not torch.equal(logits[0], logits[1])
    torch.testing.assert_close(logits[1], logits[0], rtol=0.05, atol=0.05)
