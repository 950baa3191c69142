"""Meta's generate semantics, on the default model and on tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import PROMPTS
from llamarun import Llama, SamplingParams, UsageError
from llamarun.config import ModelArgs
from llamarun.model import Transformer
from llamarun.sampling import filtered_probs, sample
from llamarun.tokenizer import Tokenizer


class IdTokenizer(Tokenizer):
    """Ids are their own text ("5 17 3"); stop ids configurable. Enough to drive a tiny model."""

    def __init__(self, vocab_size: int, stop_ids=()) -> None:
        self.vocab_size = vocab_size
        self.stop_ids = frozenset(stop_ids)
        self.eos_id = min(stop_ids) if stop_ids else None

    def encode(self, text, bos=None, eos=False):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def tiny_llama(stop_ids=(), seed: int = 0, vocab: int = 50) -> Llama:
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=64, max_seq_len=64)
    model = Transformer(args).eval()
    # Larger weights than the default init: sharper distributions, so greedy paths are stable.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return Llama(model, IdTokenizer(vocab, stop_ids))


def test_batch_of_different_lengths_equals_each_alone(llm):
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[1:4]]  # 12, 5 and 6 tokens
    batch, _ = llm.generate(prompts, 10, temperature=0, ignore_eos=True)
    for p, row in zip(prompts, batch):
        alone, _ = llm.generate([p], 10, temperature=0, ignore_eos=True)
        assert row == alone[0]


def test_echo_logprobs_equal_minus_cross_entropy(llm):
    """Prompt scoring: logprob of token t comes from the logits at t-1 (Meta's off-by-one fixed)."""
    prompt = llm.tokenizer.encode(PROMPTS[1])
    tokens, logprobs = llm.generate([prompt], 0, logprobs=True, echo=True)
    assert tokens[0] == prompt
    with torch.inference_mode():
        logits = llm.model(torch.tensor([prompt]), 0)[0]
    ce = F.cross_entropy(logits[:-1], torch.tensor(prompt[1:]), reduction="none")
    assert logprobs[0][0] == 0.0  # the first token has no context to be scored from
    assert torch.allclose(torch.tensor(logprobs[0][1:]), -ce, atol=1e-4)
    # And generated tokens carry the logprob the model gave them, when echoed after the prompt.
    tokens, logprobs = llm.generate([prompt], 4, temperature=0, logprobs=True, echo=True, ignore_eos=True)
    with torch.inference_mode():
        logits = llm.model(torch.tensor([tokens[0]]), 0)[0]
    ce = F.cross_entropy(logits[:-1], torch.tensor(tokens[0][1:]), reduction="none")
    # Decode steps and this recompute round slightly different keys/values into the float16 KV cache (the
    # kernels and the GEMMs of 16 and 20 rows sum in other orders; a float16 rounding that flips moves a
    # logprob by up to ~2e-3, measured), hence 5e-3; an off-by-one is off by ~1.
    assert torch.allclose(torch.tensor(logprobs[0][1:]), -ce, atol=5e-3)


def test_prefill_in_chunks_equals_one_pass(monkeypatch):
    """A prompt longer than the prefill chunk (CPU_PREFILL_CHUNK on a CPU) goes through the model in pieces
    that attend to the cached earlier ones: every position's logprob and the greedy continuation are what
    one pass over the whole prompt gives."""
    from llamarun import generation

    llm = tiny_llama()
    prompt = torch.randint(0, 50, (23,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = llm.generate([prompt], 4, temperature=0, logprobs=True, echo=True)
    monkeypatch.setattr(generation, "CPU_PREFILL_CHUNK", 7)  # 7 + 7 + 7 + 2
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 7)
    pieces = llm.generate([prompt], 4, temperature=0, logprobs=True, echo=True)
    assert pieces[0] == whole[0]
    torch.testing.assert_close(torch.tensor(pieces[1]), torch.tensor(whole[1]), atol=1e-4, rtol=0)


def test_prefill_chunks_run_the_output_layer_once(monkeypatch):
    """Unscored, a prompt's chunks before its last skip the output layer (their logits were never read), and
    it runs once, on the last position: the tokens are one pass's."""
    from llamarun import generation

    llm = tiny_llama()
    prompt = torch.randint(0, 50, (23,), generator=torch.Generator().manual_seed(5)).tolist()
    whole = llm.generate([prompt], 4, temperature=0, ignore_eos=True)
    monkeypatch.setattr(generation, "CPU_PREFILL_CHUNK", 7)  # 7 + 7 + 7 + 2
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 7)
    inputs = []
    hook = llm.model.output.register_forward_pre_hook(lambda mod, args: inputs.append(tuple(args[0].shape)))
    pieces = llm.generate([prompt], 4, temperature=0, ignore_eos=True)
    hook.remove()
    assert pieces == whole
    assert inputs == [(1, 1, llm.args.dim)] * 4  # the prefill's last position, then each of 3 decode steps


def test_cpu_prefill_chunks_count_positions_over_rows(monkeypatch):
    """On a CPU a batch's prefill chunk is CPU_PREFILL_CHUNK positions over all its rows (3 prompts, 21: 7
    tokens of each at a time), with the same result as one pass."""
    from llamarun import generation

    llm = tiny_llama()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (23, 19, 23)]
    whole = llm.generate(prompts, 3, temperature=0, logprobs=True)
    shapes = []
    hook = llm.model.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    monkeypatch.setattr(generation, "CPU_PREFILL_CHUNK", 21)
    pieces = llm.generate(prompts, 3, temperature=0, logprobs=True)
    hook.remove()
    assert shapes[:3] == [(3, 7), (3, 7), (3, 5)]  # min(lengths) = 19 tokens of prefill, then one at a time
    assert pieces[0] == whole[0]
    torch.testing.assert_close(torch.tensor(pieces[1]), torch.tensor(whole[1]), atol=1e-4, rtol=0)


def test_cpu_generation_cache_and_heap(monkeypatch):
    """On a CPU the KV cache comes from memory.lazy_zeros (resident only where written); each generation hands
    the heap's free pages back after its prefill and at its end, and the cache's pages at its end (also when
    the consumer stops early), and the next generation, on the same cache, is the same."""
    import math

    from llamarun import generation, memory

    def lazy(shape, dtype, device=None):  # as lazy_zeros, small tensors included (a tiny model's cache is)
        made.append(shape)
        return memory._mapped(math.prod(shape) * dtype.itemsize, dtype, memory._LAZY_MAPPINGS).view(shape)

    llm = tiny_llama()
    made, trims, released = [], [], []
    monkeypatch.setattr(generation, "lazy_zeros", lazy)
    monkeypatch.setattr(generation, "release_free_memory", lambda: trims.append(1) or memory.release_free_memory())
    monkeypatch.setattr(generation, "release_pages", lambda t: released.append(t.data_ptr()) or memory.release_pages(t))
    first = llm.generate([[3, 7, 11], [2, 9]], 5, temperature=0)
    a = llm.args
    assert made == [(2, a.n_kv_heads, 3 + 5, a.head_dim)] * (2 * a.n_layers) and len(trims) == 2
    caches = [c for layer in llm.model.layers for c in (layer.attention.cache.k, layer.attention.cache.v)]
    assert sorted(released) == sorted(c.data_ptr() for c in caches)
    assert not any(c.any() for c in caches)  # given back: zeros again
    assert llm.generate([[3, 7, 11], [2, 9]], 5, temperature=0) == first  # the cache fits: kept
    assert len(made) == 2 * a.n_layers and len(trims) == 4 and len(released) == 2 * len(caches)
    stream = llm.stream([[3, 7, 11]], 4)
    next(stream)
    stream.close()
    assert len(released) == 3 * len(caches)


def test_kv_cache_dtype(monkeypatch):
    """On a CPU with the kernels, the KV cache defaults to float16 under float32 math (half the memory) and
    decodes like a float32 cache; kv_dtype picks it explicitly; a changed dtype reallocates the cache."""
    from llamarun import kernels

    prompt = [3, 7, 11, 2, 9]
    half, full = tiny_llama(), tiny_llama()
    full.kv_dtype = torch.float32
    assert half.kv_dtype == (torch.float16 if kernels.available() else torch.float32)
    half.kv_dtype = torch.float16
    a, lp_a = half.generate([prompt], 12, temperature=0, logprobs=True)
    b, lp_b = full.generate([prompt], 12, temperature=0, logprobs=True)
    assert half.model.layers[0].attention.cache.k.dtype == torch.float16
    assert full.model.layers[0].attention.cache.k.dtype == torch.float32
    assert a == b
    torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), atol=2e-3, rtol=0)
    half.kv_dtype = torch.float32
    half.generate([prompt], 2, temperature=0)
    assert half.model.layers[0].attention.cache.k.dtype == torch.float32
    assert Llama(tiny_llama().model, IdTokenizer(50), kv_dtype="bfloat16").kv_dtype == torch.bfloat16
    with pytest.raises(UsageError, match="KV cache dtype"):
        Llama(tiny_llama().model, IdTokenizer(50), kv_dtype="int4")
    monkeypatch.setattr(kernels, "available", lambda: False)  # without the kernels: the model's dtype
    assert Llama(tiny_llama().model, IdTokenizer(50)).kv_dtype == torch.float32


@pytest.mark.parametrize("kernels_on", [True, False])
def test_int8_kv_cache_generates_like_float32(monkeypatch, kernels_on):
    """kv_dtype int8 (a scale per cached row), through the kernels (prefill's kv_store and attn_prefill,
    decode_layers' attn_decode) and without them (model.py's KVCache): the same greedy tokens as a float32
    cache and log-probabilities close, for a batch of different lengths."""
    from llamarun import kernels

    if kernels_on and not kernels.available():
        pytest.skip(kernels.reason())
    if not kernels_on:
        monkeypatch.setenv("LLAMARUN_KERNELS", "0")
    prompts = [[3, 7, 11, 2, 9], [4, 1]]
    i8, full = tiny_llama(), tiny_llama()
    i8.kv_dtype, full.kv_dtype = torch.int8, torch.float32
    a, lp_a = i8.generate(prompts, 12, temperature=0, logprobs=True)
    b, lp_b = full.generate(prompts, 12, temperature=0, logprobs=True)
    cache = i8.model.layers[0].attention.cache
    assert cache.k.dtype == torch.int8 and cache.k_scale.shape == cache.k.shape[:3]
    assert type(i8.model.layers[0].attention).__name__ == ("FastAttention" if kernels_on else "Attention")
    assert a == b
    torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), atol=0.05, rtol=0)


@pytest.mark.skipif(not __import__("llamarun").kernels.available(), reason="needs the CPU kernels")
def test_bf16_cpu_keeps_float32_activations_and_bf16_prefill_gemms(monkeypatch):
    """On a CPU with native bf16 (simulated here), dtype 'auto' gives the quantized default model float32
    activations (the decode kernels and the one-op layer stack still run) and bf16 GEMMs on the prefill
    path only, whose logits stay close to float32's; an explicit dtype is kept as asked."""
    from llamarun import device
    from llamarun.quantize import QuantizedLinear

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    llm = Llama.load(None)
    assert (llm.dtype, llm.dense_dtype, llm.kv_dtype) == (torch.float32, torch.bfloat16, torch.float16)
    assert (llm.plan.dtype, llm.plan.kv_dtype) == ("float32", "float16")
    from llamarun import kernels
    from llamarun.quantize import BATCH_MIN_ROWS, int8_batch_rows

    # Batches: the bf16 tiles with AMX, else int8 products (VNNI; AVX2: the int4 layers; from 2 rows on Zen 5).
    assert llm.batch_rows == (BATCH_MIN_ROWS if kernels.bf16_tiles() else
                              int8_batch_rows() if kernels.int8_batches() else 0)
    prompt = llm.tokenizer.encode("The capital of France is Paris. The capital of Germany is Berlin. " * 6)
    assert len(prompt) >= 64  # the int4 layers' dense (GEMM) path
    tokens = torch.tensor([prompt])
    int8 = llm.batch_product == "int8"
    with torch.inference_mode():
        llm.model.setup_cache(1, len(prompt) + 1)
        bf16 = llm.model(tokens, 0)[0]
        for m in llm.model.modules():
            if isinstance(m, QuantizedLinear):
                m.dense_dtype = torch.float32
        fp32 = llm.model(tokens, 0)[0]
    assert not torch.equal(bf16, fp32)  # the GEMMs did change
    assert torch.equal(bf16.argmax(-1)[-8:], fp32.argmax(-1)[-8:])
    # Without AMX the int8 products take prefill too (x rounded to int8, as llama.cpp does): measured
    # max 1.63, cosine 0.992 on this prompt, where bf16 GEMMs give 0.47 and 0.998.
    assert (bf16 - fp32).abs().max() < (2.5 if int8 else 1.0)
    assert F.cosine_similarity(bf16, fp32, dim=-1).min() > (0.985 if int8 else 0.995)
    out = llm.generate([prompt[:5]], 3, temperature=0)
    assert len(out[0][0]) == 3 and llm.model._decode_stack(1) is not None  # decode: the fused float32 path
    assert Llama.load(None, dtype="float32").dense_dtype == torch.float32
    from llamarun.bench import gemm_note

    assert gemm_note({"dtype": "float32", "prefill_gemm_dtype": "bfloat16"}) == " (bfloat16 prefill GEMMs)"
    assert gemm_note({"dtype": "float32", "prefill_gemm_dtype": "float32"}) == ""
    assert gemm_note({"dtype": "float32", "prefill_gemm_dtype": "bfloat16", "batch_rows": 6,
                      "batch_product": "amx"}) == " (bfloat16 GEMMs for prefill and batches of 6+ rows, AMX tiles)"
    assert gemm_note({"dtype": "float32", "prefill_gemm_dtype": "int8", "batch_rows": 6,
                      "batch_product": "int8"}) == " (int8 activations for prefill and batches of 6+ rows)"
    assert Llama.load(None, dtype="bfloat16").dtype == torch.bfloat16
    # Unquantized: bf16 weights under float32 activations, decoding through the one-op layer stack; an
    # explicit bfloat16 keeps bf16 activations.
    none = Llama.load(None, quantize="none")
    assert (none.dtype, none.dense_dtype, none.kv_dtype, none.plan.label) == (
        torch.float32, torch.bfloat16, torch.float16, "bfloat16")
    assert none.generate([prompt[:5]], 3, temperature=0)[0][0][0] == out[0][0][0]  # int4's first token
    assert none.model._decode_stack(1) is not None
    assert Llama.load(None, quantize="none", dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.skipif(not __import__("llamarun").kernels.int8_batches(), reason="needs int8 batch products")
def test_batches_use_int8_products_without_bf16(monkeypatch):
    """On a CPU with int8 batch products (VNNI, or AVX2 for int4 weights) and no native bf16 (simulated),
    dtype 'auto' gives the quantized default model's batches of 6+ rows (2+ on Zen 5) int8-activation
    products; their logits stay close to the int16 kernels' (which an explicit float32 keeps), and the
    generate speed line says which products ran."""
    from llamarun import device
    from llamarun.quantize import int8_batch_rows, set_int8_batches

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    llm = Llama.load(None)
    assert (llm.dtype, llm.dense_dtype, llm.batch_rows, llm.batch_product) == (
        torch.float32, torch.float32, int8_batch_rows(), "int8")
    assert Llama.load(None, dtype="float32").batch_rows == 0
    prompt = llm.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    tokens = torch.tensor([prompt] * 2)  # 2 x ~12 rows: over the threshold, under the dense path's
    assert int8_batch_rows() <= tokens.numel() < 64
    with torch.inference_mode():
        llm.model.setup_cache(2, len(prompt))
        int8 = llm.model(tokens, 0)[0]
        set_int8_batches(llm.model, 0)
        int16 = llm.model(tokens, 0)[0]
    assert not torch.equal(int8, int16)
    assert F.cosine_similarity(int8, int16, dim=-1).min() > 0.99
    assert (int8.argmax(-1) == int16.argmax(-1)).float().mean() >= 0.9
    out = llm.generate([prompt] * 8, 4, temperature=0)[0]
    assert all(row == out[0] for row in out)  # rows are computed independently: same prompt, same tokens


@pytest.mark.skipif(not __import__("llamarun").kernels.available(), reason="needs the CPU kernels")
@pytest.mark.parametrize("bf16_cpu", [False, True])
def test_plan_and_info_print_the_plan_load_follows(monkeypatch, capsys, bf16_cpu):
    """`plan` and `info` show the activations and KV cache ``Llama.load`` will use: on a CPU with native
    bf16 a quantized model keeps float32 activations (and a float16 KV cache), an unquantized one has bf16
    weights under them."""
    import json

    from llamarun import cli, device
    from llamarun.memory import _fmt

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: bf16_cpu)
    llm = Llama.load(None)
    assert cli.main(["plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # (the totals include the runtime's measured overhead, which moves between calls)
    keys = ("dtype", "kv_dtype", "kv_cache", "activations", "weights_on_device", "choice")
    assert [plan[k] for k in keys] == [llm.plan.to_dict()[k] for k in keys]
    assert (plan["dtype"], plan["kv_dtype"]) == ("float32", "float16")
    assert plan["weights"]["int4"] < plan["weights"]["int8"] < plan["weights"]["float32"]
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["load_plan"].startswith(
        f"int4 on cpu, {_fmt(llm.plan.weights_on_device)} weights, ")
    assert cli.main(["plan", "--json", "--quantize", "none"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # Unquantized: bf16 weights (the plan's dtype) under float32 activations, float16 KV cache (with the
    # kernels, whether or not the CPU has native bf16).
    from llamarun import kernels

    assert (plan["dtype"], plan["kv_dtype"]) == ("bfloat16" if bf16_cpu or kernels.available() else "float32",
                                                 "float16")


def test_temperature_zero_is_argmax():
    llm = tiny_llama()
    prompt = [3, 7, 11]
    out, _ = llm.generate([prompt], 8, temperature=0)
    seq = list(prompt)
    for _ in range(8):
        with torch.inference_mode():
            seq.append(int(llm.model(torch.tensor([seq]), 0)[0, -1].argmax()))
    assert out[0] == seq[len(prompt):]


def test_seeded_sampling_is_reproducible():
    llm = tiny_llama()
    a, _ = llm.generate([[1, 2, 3], [4, 5]], 16, temperature=1.0, top_p=1.0, seed=123)
    b, _ = llm.generate([[1, 2, 3], [4, 5]], 16, temperature=1.0, top_p=1.0, seed=123)
    c, _ = llm.generate([[1, 2, 3], [4, 5]], 16, temperature=1.0, top_p=1.0, seed=124)
    assert a == b and a != c


def test_top_p_never_samples_outside_the_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(4, 40) * 3
    params = SamplingParams(temperature=0.8, top_p=0.5)
    probs = torch.softmax(logits / 0.8, dim=-1)
    # The nucleus, computed the slow way: most likely first, until the mass before a token reaches top_p.
    nucleus = []
    for row in probs:
        order = row.argsort(descending=True).tolist()
        keep, mass = set(), 0.0
        for t in order:
            if mass > 0.5:
                break
            keep.add(t)
            mass += row[t].item()
        nucleus.append(keep)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        picks = sample(logits, params, gen).tolist()
        assert all(p in nucleus[i] for i, p in enumerate(picks))
    filtered = filtered_probs(logits, params)
    assert torch.allclose(filtered.sum(-1), torch.ones(4))


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.5),
                                    SamplingParams(temperature=0.7, top_p=1.0, top_k=40),
                                    SamplingParams(temperature=1.3, top_p=0.95, min_p=0.05),
                                    SamplingParams(temperature=0.8, top_p=0.9, top_k=1000)])
def test_candidate_sampling_equals_the_full_vocabulary(params):
    """Large vocabularies sample among the 256 most likely tokens when the filters keep nothing else: the
    probabilities are filtered_probs' exactly, and where a candidate set can't be sure (flat logits,
    top_p=1) it declines and the full path runs."""
    from llamarun.sampling import CANDIDATES, candidate_probs

    torch.manual_seed(0)
    logits = torch.randn(3, 5000) * 2
    logits[:, :20] += 8  # peaked rows: the nucleus is a few dozen tokens
    cand = candidate_probs(logits, params)
    assert cand is not None
    p, idx = cand
    full = torch.zeros_like(logits).scatter_(-1, idx, p / p.sum(-1, keepdim=True))
    torch.testing.assert_close(full, filtered_probs(logits, params), rtol=1e-5, atol=1e-7)
    picks = sample(logits, params, torch.Generator().manual_seed(1))
    assert all(filtered_probs(logits, params)[i, t] > 0 for i, t in enumerate(picks.tolist()))
    flat = torch.randn(2, 5000) * 0.1  # the 0.9 nucleus holds thousands of tokens
    if not params.top_k or params.top_k > CANDIDATES:
        assert candidate_probs(flat, params) is None
    assert sample(flat, params, torch.Generator().manual_seed(1)).shape == (2,)


def test_top_k_and_min_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert (filtered_probs(logits, SamplingParams(temperature=1, top_p=1, top_k=2)) > 0).sum() == 2
    p = filtered_probs(logits, SamplingParams(temperature=1, top_p=1, min_p=0.3))
    assert (p > 0).tolist() == [[True, True, False, False, False]]


def test_each_row_stops_at_its_own_eos():
    free = tiny_llama()
    prompts = [[1, 2, 3], [9, 8], [5, 5, 5, 5]]
    runs, _ = free.generate(prompts, 12, temperature=0)
    # Make a token that row 0 generates late (not before) a stop token: row 0 must end there, the others go on.
    j = next(j for j in range(2, 12) if runs[0][j] not in runs[0][:j])
    stop = runs[0][j]
    stopping = tiny_llama(stop_ids={stop})
    out, _ = stopping.generate(prompts, 12, temperature=0)
    assert out[0] == runs[0][:j]
    for i in (1, 2):
        cut = runs[i].index(stop) if stop in runs[i] else 12
        assert out[i] == runs[i][:cut]
    events = list(stopping.stream(prompts, 12, SamplingParams(temperature=0)))
    finished = [e for e in events if e.finished]
    assert sorted(e.row for e in finished) == [0, 1, 2]
    assert [e.token for e in events if e.row == 0] == runs[0][: j + 1]  # the stop token itself is streamed


def test_stop_token_in_echoed_prompt_does_not_cut_it():
    llm = tiny_llama(stop_ids={7})
    out, _ = llm.generate([[1, 7, 2]], 3, temperature=0, echo=True)
    assert out[0][:3] == [1, 7, 2]


def test_ignore_eos_keeps_generating():
    llm = tiny_llama()
    first, _ = llm.generate([[1, 2]], 10, temperature=0)
    stopping = tiny_llama(stop_ids={first[0][0]})
    assert stopping.generate([[1, 2]], 10, temperature=0)[0] == [[]]
    assert stopping.generate([[1, 2]], 10, temperature=0, ignore_eos=True)[0] == first


def test_prompt_longer_than_context_is_an_error():
    llm = tiny_llama()
    with pytest.raises(UsageError, match="context length 64"):
        llm.generate([list(range(1, 50)) * 2], 4)
    with pytest.raises(UsageError, match="vocabulary"):
        llm.generate([[1, 999]], 4)
    with pytest.raises(UsageError, match="max_gen_len"):
        llm.generate([[1]], -1)
    with pytest.raises(UsageError, match="temperature"):
        llm.generate([[1]], 4, temperature=-0.5)
    with pytest.raises(UsageError, match="top_p"):
        llm.generate([[1]], 4, top_p=0)


def test_generation_stops_at_the_context_end():
    llm = tiny_llama()
    out, _ = llm.generate([[i % 49 + 1 for i in range(60)]], 100, temperature=0)
    assert len(out[0]) == 4  # 60 prompt tokens + 4 = max_seq_len 64


def test_text_completion_shape(llm):
    res = llm.text_completion(["The capital of France is"], temperature=0, max_gen_len=8)
    assert set(res[0]) == {"generation"} and res[0]["generation"].startswith(" Paris")
    res = llm.text_completion(["The capital of France is"], temperature=0, max_gen_len=4, logprobs=True)
    assert set(res[0]) == {"generation", "tokens", "logprobs"}
    assert len(res[0]["tokens"]) == len(res[0]["logprobs"]) == 4
    assert "".join(res[0]["tokens"]) == res[0]["generation"]
    assert all(lp <= 0 for lp in res[0]["logprobs"])


def test_chat_completion_uses_the_chat_template(llm):
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    res = llm.chat_completion([dialog], temperature=0, max_gen_len=24)
    answer = res[0]["generation"]
    assert answer["role"] == "assistant" and "Paris" in answer["content"]
    assert "<|im_end|>" not in answer["content"]


def test_penalties_change_sampling():
    llm = tiny_llama()
    plain, _ = llm.generate([[1, 2, 3]], 20, temperature=0)
    rep, _ = llm.generate([[1, 2, 3]], 20, sampling=SamplingParams(temperature=0, repetition_penalty=5.0))
    assert plain != rep
    # With a huge presence penalty no generated token repeats a token seen before.
    seen_once, _ = llm.generate([[1, 2, 3]], 20, sampling=SamplingParams(temperature=0, presence_penalty=1e4))
    assert len(set(seen_once[0] + [1, 2, 3])) == len(seen_once[0]) + 3


def test_inputs_on_another_device_are_moved():
    """Token ids arrive as plain lists; whatever device the model is on, the engine creates tensors there."""
    llm = tiny_llama()
    assert llm.device.type == "cpu"
    out, _ = llm.generate([torch.tensor([1, 2, 3])], 3, temperature=0)
    assert len(out[0]) == 3


def test_compiled_decode_step_matches_eager(tmp_path, monkeypatch):
    """Llama.compile: the static-shape step (tensor positions, whole-cache masked attention) under
    torch.compile gives the same tokens and log-probabilities as the eager path, rows of different lengths
    included; a second compile in the same cache directory reuses the artifacts."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    prompts = [[1, 2, 3, 4], [9, 8], [5, 5, 5]]
    eager = tiny_llama()
    want, want_lp = eager.generate(prompts, 10, temperature=0, logprobs=True)
    compiled = tiny_llama()
    compiled.compile(batch_sizes=(3,))
    import torch._dynamo

    # The warm-up's graph serves all. (config.patch, not monkeypatch: monkeypatch's undo deletes an attribute
    # it did not see in the module's __dict__, and a deleted dynamo option is hidden: reading it then raises,
    # which the next recompilation in this process does.)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, got_lp = compiled.generate(prompts, 10, temperature=0, logprobs=True)
        again = compiled.generate([[1, 2], [3], [4]], 17, temperature=0)[0]
    assert got == want
    for a, b in zip(got_lp, want_lp):
        assert a == pytest.approx(b, abs=1e-4)
    assert again == eager.generate([[1, 2], [3], [4]], 17, temperature=0)[0]
    assert any(tmp_path.iterdir())  # artifacts written where the next process will look

    from llamarun import kernels

    if kernels.available():  # on a CPU the kernels' helpers sleep through each compiled step (OpenMP's turn)
        step, seen, n = compiled._decode_step, [], torch.get_num_threads()

        def spy(*args):
            spin = kernels.set_spin_us(0)
            kernels.set_spin_us(spin)
            seen.append(spin)
            return step(*args)

        compiled._decode_step = spy
        torch.set_num_threads(2)
        old = kernels.set_spin_us(77)
        try:
            compiled.generate(prompts, 3, temperature=0)
            # A 2-token prefill (eager), then 4 compiled steps to the longest prompt (4) + 3 tokens; restored after.
            assert seen == [0] * 4 and kernels.set_spin_us(77) == 77
        finally:
            kernels.set_spin_us(old)
            torch.set_num_threads(n)


def test_static_shape_forward_equals_dynamic():
    """model(tokens, tensor positions) over the whole masked cache == model(tokens, int start_pos)."""
    llm = tiny_llama()
    model = llm.model
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    with torch.inference_mode():
        model.setup_cache(2, 16)
        want = [model(prompt, 0)[:, -1]] + [model(torch.tensor([[7], [8]]), 5 + i)[:, -1] for i in range(3)]
        model.free_cache()
        model.setup_cache(2, 16)
        got = [model(prompt, torch.arange(5))[:, -1]]
        got += [model(torch.tensor([[7], [8]]), torch.tensor([5 + i]))[:, -1] for i in range(3)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_load_runs_no_garbage_collection_and_restores_the_collector():
    """Loading the default model makes ~150k short-lived Python objects, which would set off a full
    collection over everything torch imported (~90 ms); the collector is paused while loading, then
    switched back on (or left off, if it was off)."""
    import gc

    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        Llama.load(device="cpu")
        during = list(collections)
        assert gc.isenabled()
        gc.disable()
        try:
            Llama.load(device="cpu")
            assert not gc.isenabled()
        finally:
            gc.enable()
    finally:
        gc.callbacks.remove(count)
    assert 2 not in during and 1 not in during  # at most the young generation, right after it is back on


def test_nan_logits_are_a_runtime_failure_naming_the_position(monkeypatch):
    """A model with a NaN weight: sampling raised torch.multinomial's bare RuntimeError, and greedy decoding
    returned argmax's pick of a NaN (an empty completion when it was a stop token); both now raise
    RuntimeFailure at the first position whose logits are NaN, with or without the CPU kernels."""
    from llamarun import kernels
    from llamarun.errors import RuntimeFailure

    llm = tiny_llama(stop_ids={3})
    with torch.no_grad():
        llm.model.output.weight[3, 0] = float("nan")  # token 3's logit is NaN at every position
    for _ in range(2):
        for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.8),
                       SamplingParams(temperature=0, presence_penalty=0.5)):
            with pytest.raises(RuntimeFailure, match=r"^the model produced NaN logits at position 3 \(damaged"):
                llm.generate([[1, 2, 3, 4]], 4, sampling=params)
        with pytest.raises(RuntimeFailure, match="NaN logits at position 1 in row 0"):
            llm.generate([[5, 6, 7], [1, 2]], 4, temperature=0)
        monkeypatch.setattr(kernels, "available", lambda: False)  # the portable path, as on accelerators


def test_a_temperature_near_zero_generates_the_greedy_tokens():
    """`llamarun generate -t 1e-45` crashed with torch.multinomial's RuntimeError; such a temperature now
    samples the argmax, like temperature 0, through top-p, top-k and penalties alike."""
    llm = tiny_llama()
    greedy, _ = llm.generate([[3, 7, 11]], 8, temperature=0)
    for kw in (dict(top_p=1.0), dict(top_p=0.9), dict(top_k=5), dict(repetition_penalty=1.0 + 1e-9)):
        for t in (1e-45, 1e-320):
            params = SamplingParams(temperature=t, **{"top_p": 1.0, **kw})
            assert llm.generate([[3, 7, 11]], 8, sampling=params, seed=0)[0] == greedy, (t, kw)


def test_seed_outside_torch_range_is_a_usage_error():
    """torch.Generator.manual_seed takes -2**63 .. 2**64-1; beyond, a bare ValueError ("Overflow when
    unpacking long long") escaped."""
    llm = tiny_llama()
    for seed in (2**70, 2**64, -(2**63) - 1):
        with pytest.raises(UsageError, match=rf"seed must be in -2\*\*63 \.\. 2\*\*64-1 .*got {seed}$"):
            list(llm.stream([[1, 2]], 2, seed=seed))
    with pytest.raises(UsageError, match="seed must be an integer, got 1.5"):
        llm.generate([[1, 2]], 2, seed=1.5)
    with pytest.raises(UsageError, match="got 1180591620717411303424"):
        Llama.build("unused", seed=2**70)
    for seed in (2**64 - 1, -(2**63)):  # the ends of the range are accepted
        assert len(llm.generate([[1, 2]], 2, temperature=1.0, seed=seed)[0][0]) == 2


def test_api_misuse_is_a_usage_error():
    """Wrong types reached the user as TypeError / AttributeError from deep inside, or were silently
    misread (a str of 3 characters as 3 prompts); each is now a one-line UsageError naming the value."""
    llm = tiny_llama()
    cases = [
        (lambda: llm.text_completion([1]), "each prompt must be a str, got 1"),
        (lambda: llm.text_completion("1 2 3"), "text_completion takes a list of prompts, got '1 2 3': pass [prompt]"),
        (lambda: llm.chat_completion([{"role": "user", "content": "hi"}]), "each a list of messages: pass [dialog]"),
        (lambda: llm.chat_completion("hi"), "chat_completion takes a list of dialogs, got 'hi'"),
        (lambda: llm.generate([1, 2], 2), "each prompt must be a list of token ids, got 1"),
        (lambda: llm.generate("1 2", 2), "prompt_tokens must be a list of prompts"),
        (lambda: llm.generate([[1.5, 2]], 2), "token ids must be integers, got 1.5"),
        (lambda: llm.generate([[1, 2]], "2"), "max_gen_len must be an integer, got '2'"),
        (lambda: llm.generate([[1, 2]], 2, temperature="0.5"), "temperature must be a number, got '0.5'"),
        (lambda: list(llm.stream([[1, 2]], 2, sampling=0.5)), "sampling must be a SamplingParams, got 0.5"),
        (lambda: Llama.load(123), "path must be a file or directory path, got 123"),
        (lambda: Llama.load(max_seq_len="x"), "max_seq_len must be an integer, got 'x'"),
        (lambda: Llama.load(max_batch_size=0), "max_batch_size must be >= 1, got 0"),
        (lambda: Llama.load(memory="1G"), "memory must be a number of bytes > 0, got '1G'"),
        (lambda: Llama(llm.model, llm.tokenizer, max_batch_size=0), "max_batch_size must be >= 1, got 0"),
    ]
    for call, message in cases:
        with pytest.raises(UsageError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    # What still works: tuples of prompts, numpy ids, a 2-D tensor of prompts.
    import numpy as np

    assert len(llm.text_completion(("1 2",), max_gen_len=2)) == 1
    want = llm.generate([[1, 2]], 2, temperature=0)
    assert llm.generate([np.array([1, 2])], 2, temperature=0) == want
    assert llm.generate(torch.tensor([[1, 2]]), 2, temperature=0) == want


@pytest.mark.skipif(not __import__("llamarun").kernels.available(), reason="needs the compiled kernels")
def test_kernel_helpers_sleep_through_steps_of_torch_gemms():
    """A step whose products are torch's GEMMs (a float model's prefill, its decode batches past the kernels'
    pool rows) runs with the kernels' helpers sleeping after each call (spin 0: a spinning helper held a core
    an OpenMP worker waited for); the spin is restored after each such step, and batch-1 decode steps, which
    stay in the pool, keep it. A model whose products are all the kernels' (int8 batches) is left alone."""
    from llamarun import kernels
    from llamarun.fastpath import torch_gemm_rows

    llm = Llama.load(None, dtype="float32", quantize="none")
    pool_rows = kernels.f32_pool_rows(False)
    assert pool_rows == 4 and kernels.f32_pool_rows(True) == (4 if kernels.bf16_gemm() else 32)
    assert torch_gemm_rows(llm.model) == pool_rows + 1
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    hook = llm.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(kernels.set_spin_us(77)))
    old = kernels.set_spin_us(77)
    try:
        prompt = llm.tokenizer.encode("The capital of France is")
        llm.generate([prompt], 3, temperature=0)
        assert seen == [0, 77, 77]  # the prefill, then two batch-1 decode steps
        seen.clear()
        llm.generate([prompt] * (pool_rows + 1), 3, temperature=0)
        assert seen == [0, 0, 0] and kernels.set_spin_us(77) == 77
        if kernels.int8_batches():
            quantized = Llama.load(None)
            if quantized.batch_product == "int8":
                assert torch_gemm_rows(quantized.model) > 1 << 40
    finally:
        hook.remove()
        kernels.set_spin_us(old)
        torch.set_num_threads(n)


@pytest.mark.skipif(not __import__("llamarun").kernels.int8_batches(), reason="needs int8 batch products")
def test_prefill_in_the_kernels_runs_torch_on_one_thread():
    """Where a prefill's products and attention all run in the kernels' pool (int8 batch products, the
    kernels' attention), torch runs on one thread meanwhile (its OpenMP workers would spin and take the
    cores from the pool) while the pool keeps torch's count; both are restored afterwards, and a count set
    for the kernels themselves is kept. Decode steps and models without int8 batches are left alone."""
    from llamarun import kernels

    llm = Llama.load(None)
    if llm.batch_product != "int8":
        pytest.skip("this CPU takes batches to the bf16 tiles")
    assert llm._prefill_in_kernels() and not Llama.load(None, dtype="float32")._prefill_in_kernels()
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    hook = llm.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    try:
        prompt = llm.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
        llm.generate([prompt], 3, temperature=0)
        assert seen == [1, 2, 2] and torch.get_num_threads() == 2  # the prefill, then two decode steps
        assert kernels.set_num_threads(3) == 0
        llm.generate([prompt], 1, temperature=0)
        assert kernels.set_num_threads(None) == 3
    finally:
        hook.remove()
        torch.set_num_threads(n)
