"""Sampling's numerical edge cases: temperatures near 0, NaN and infinite logits, bad parameter values.

Every case runs with the compiled kernels (``sample_filtered``, ``argmax``) and with the portable torch code
(what ``LLAMARUN_KERNELS=0`` and accelerators use), on a vocabulary large enough for the candidate path and
on one small enough that the full-vocabulary path runs.
"""

from __future__ import annotations

import pytest
import torch

from llamarun import SamplingParams, UsageError, kernels
from llamarun.errors import RuntimeFailure
from llamarun.sampling import CANDIDATES, NonFiniteLogits, apply_penalties, filtered_probs, sample

FILTERS = [dict(top_p=1.0), dict(top_p=0.9), dict(top_p=1.0, top_k=5), dict(top_p=0.95, top_k=40),
           dict(top_p=1.0, min_p=0.1)]


@pytest.fixture(params=["kernels", "torch"])
def kernel_mode(request, monkeypatch):
    """Run a test with the compiled kernels, then with the portable torch code."""
    if request.param == "kernels":
        if not kernels.available():
            pytest.skip(f"no CPU kernels: {kernels.reason()}")
    else:
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param


def _logits(vocab: int, rows: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(rows, vocab) * 3
    x[:, :10] += 6  # peaked, as a model's are: the candidate path takes them at ordinary temperatures
    if rows > 1:
        x[1] -= 40  # a row whose logits are all negative: x / t overflows to -inf, not +inf
    return x


@pytest.mark.parametrize("vocab", [40, 5000])
@pytest.mark.parametrize("temperature", [1e-45, 1e-320, 1e-38, 1e-30])
def test_a_temperature_near_zero_picks_the_most_likely_token(kernel_mode, vocab, temperature):
    """logits / 1e-45 overflowed to inf and softmax made NaN of it (RuntimeError from torch.multinomial);
    now any positive temperature samples, and one this small always picks the argmax."""
    assert 40 < CANDIDATES < 5000  # both paths
    x = _logits(vocab)
    for kw in FILTERS:
        params = SamplingParams(temperature=temperature, **kw)
        assert sample(x, params, torch.Generator().manual_seed(1)).tolist() == x.argmax(-1).tolist(), kw
        probs = filtered_probs(x, params)
        assert torch.equal(probs, torch.nn.functional.one_hot(x.argmax(-1), vocab).float()), kw


def test_a_temperature_near_zero_samples_among_tied_maxima():
    """The limit of a vanishing temperature is uniform over the tokens that tie for the maximum."""
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    probs = filtered_probs(x, SamplingParams(temperature=1e-320, top_p=1.0))
    assert probs.tolist() == [[0.0, 0.5, 0.5, 0.0]]


def test_penalties_that_overflow_the_logits_still_sample(kernel_mode):
    """A tiny repetition penalty divides a seen token's positive logit to +inf; it stays the most likely
    token (the largest float) instead of turning the softmax into NaN. With a temperature near 0 too."""
    x = _logits(5000, rows=1)
    seen = 4321  # not among the peaked tokens
    history = torch.tensor([[seen]])
    x[0, seen] = 1.0
    for temperature in (0.7, 1e-45):
        params = SamplingParams(temperature=temperature, top_p=0.9, repetition_penalty=1e-40)
        penalised = apply_penalties(x, history, torch.ones_like(history, dtype=torch.bool), params)
        assert sample(penalised, params, torch.Generator().manual_seed(0)).tolist() == [seen]
    params = SamplingParams(temperature=1e-45, top_p=0.9, frequency_penalty=2.0)  # lowers: no clamp needed
    penalised = apply_penalties(x, history, torch.ones_like(history, dtype=torch.bool), params)
    assert sample(penalised, params).tolist() == x.argmax(-1).tolist()


@pytest.mark.parametrize("vocab", [40, 5000])
def test_nan_or_infinite_logits_raise_a_runtime_failure(kernel_mode, vocab):
    """NaN logits (a model with damaged weights) gave torch.multinomial's RuntimeError when sampling and,
    greedy, whatever index argmax found first (token 0: often a stop token, an empty completion)."""
    x = _logits(vocab)
    nan = x.clone()
    nan[2, vocab // 2] = float("nan")
    inf = x.clone()
    inf[1, 3] = float("inf")
    for params in [SamplingParams(temperature=0), SamplingParams(temperature=0.7),
                   *(SamplingParams(temperature=1e-45, **kw) for kw in FILTERS)]:
        with pytest.raises(NonFiniteLogits, match=r"^the model produced NaN logits in row 2 \(damaged weights\?\)$"):
            sample(nan, params)
        with pytest.raises(RuntimeFailure, match="infinite logits in row 1"):
            sample(inf, params)
    whole_row = torch.full((1, vocab), float("nan"))  # NaN everywhere: argmax's pick is 0, itself NaN
    with pytest.raises(NonFiniteLogits, match="NaN logits"):
        sample(whole_row, SamplingParams(temperature=0))
    # -inf is no error: a token the model rules out.
    masked = x.clone()
    masked[:, 20:] = float("-inf")
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=1.0)):
        assert (sample(masked, params) < 20).all()


def test_bad_sampling_values_are_usage_errors():
    for kw, needle in [(dict(temperature="0.7"), "temperature must be a number, got '0.7'"),
                       (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
                       (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
                       (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0"),
                       (dict(frequency_penalty=float("nan")), "frequency_penalty must be a finite number, got nan"),
                       (dict(presence_penalty=None), "presence_penalty must be a number, got None")]:
        with pytest.raises(UsageError) as e:
            SamplingParams(**kw)
        assert needle in str(e.value), (kw, str(e.value))
    assert SamplingParams(temperature=1e-320, top_k=3).temperature == 1e-320


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no CPU kernels")


def _grid_picks(x: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """The kernel's picks for row x at n evenly spaced u in (0, 1): token i's count is then n times its
    probability to within 1 (inverse CDF: each token owns an interval of u as long as its probability)."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.ops.llamarun.sample_filtered(x.expand(n, -1).contiguous(), u, params.temperature,
                                              params.top_k or 0, params.top_p, params.min_p)


@needs_kernels
@pytest.mark.parametrize("shape", ["peaked", "flat"])
@pytest.mark.parametrize("kw", [*FILTERS, dict(temperature=1.3, top_p=0.95), dict(temperature=0.7, top_p=0.5),
                                dict(top_p=0.9, top_k=1000), dict(top_p=0.8, top_k=40, min_p=0.02),
                                dict(temperature=1.0, top_p=1.0)])
def test_the_sampling_kernel_draws_from_filtered_probs(shape, kw):
    """sample_filtered (one kernel: filters by selection, no sort, then the draw) picks each token with
    filtered_probs' probability: over a grid of u every token's count is n p to within 1.5, and no token
    outside the filters is ever picked. Peaked rows (a nucleus of a few tokens) and flat ones (thousands,
    which the candidate path handed to a sort of the whole vocabulary)."""
    torch.manual_seed(3)
    vocab, n = 3000, 4000
    x = torch.randn(1, vocab) * (3 if shape == "peaked" else 0.5)
    if shape == "peaked":
        x[0, :10] += 6
    params = SamplingParams(**{"temperature": 0.8, **kw})
    ref = filtered_probs(x.double(), params)[0]
    counts = torch.bincount(_grid_picks(x, params, n), minlength=vocab).double()
    assert counts.sum() == n
    assert (counts[ref == 0] == 0).all()
    assert (counts - n * ref).abs().max().item() <= 1.5


@needs_kernels
def test_the_sampling_kernel_keeps_ties_as_filtered_probs_does():
    """Ties at top-k's cut are all kept (torch's `probs < kth` rule); ties across top-p's cut keep as many
    tokens as Meta's rule does (which of the tied ones is the sort's choice, so the counts are compared as
    sorted values); -inf logits are never picked; u at 0 and just below 1 pick tokens within the filters."""
    x = torch.full((1, 600), float("-inf"))
    x[0, 50:53] = 2.0  # p 0.093 each
    x[0, 60:70] = 1.0  # 0.034
    x[0, 70:100] = 0.0  # 0.0126
    for params in (SamplingParams(temperature=1.0, top_p=1.0, top_k=4), SamplingParams(temperature=1.0, top_p=0.5),
                   SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0, top_p=0.3, top_k=20),
                   SamplingParams(temperature=0.5, top_p=1.0, min_p=0.2)):
        ref = filtered_probs(x.double(), params)[0]
        counts = torch.bincount(_grid_picks(x, params, 5000), minlength=600).double()
        assert (counts[:50] == 0).all() and (counts[100:] == 0).all()
        kept = ref[ref > 0].sort().values
        got = counts[counts > 0].sort().values
        assert len(got) == len(kept), params
        assert (got - 5000 * kept).abs().max().item() <= 1.5, params
        edges = torch.ops.llamarun.sample_filtered(x.expand(2, -1).contiguous(),
                                                   torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64),
                                                   params.temperature, params.top_k or 0, params.top_p, params.min_p)
        assert all(x[0, i] >= x[0, ref > 0].min() for i in edges.tolist()), params  # a kept token or its tie


@needs_kernels
def test_the_sampling_kernel_marks_rows_without_a_distribution():
    """A row with a NaN, an infinite maximum or nothing but -inf gets -1 (sample raises NonFiniteLogits), and
    the other rows of the batch are still drawn from their own logits."""
    x = torch.randn(5, 400)
    x[0, 7] = float("nan")
    x[1, 3] = float("inf")
    x[2] = float("-inf")
    x[3, 11] = 50.0  # certain
    ids = torch.ops.llamarun.sample_filtered(x, torch.rand(5, dtype=torch.float64), 0.7, 0, 0.9, 0.0)
    assert ids.tolist()[:4] == [-1, -1, -1, 11] and 0 <= ids[4] < 400
    with pytest.raises(RuntimeError, match="u must be float64"):
        torch.ops.llamarun.sample_filtered(x, torch.rand(5), 0.7, 0, 0.9, 0.0)


@needs_kernels
def test_sample_through_the_kernel_is_seeded_and_takes_any_layout():
    """sample() on CPU float32 logits draws with the kernel from the generator's uniforms: the same seed gives
    the same tokens, strided and grad-requiring logits work, and every pick is within the filters."""
    torch.manual_seed(0)
    x = torch.randn(6, 2 * 5000) * 2
    x[:, :20] += 5
    strided = x[:, ::2].requires_grad_()
    params = SamplingParams(temperature=1.1, top_p=0.8, top_k=50)
    a = sample(strided, params, torch.Generator().manual_seed(7))
    assert torch.equal(a, sample(strided, params, torch.Generator().manual_seed(7)))
    draws = torch.stack([sample(strided, params, torch.Generator().manual_seed(s)) for s in range(40)])
    allowed = filtered_probs(strided.detach(), params) > 0
    assert all(allowed[r, t] for row in draws.tolist() for r, t in enumerate(row))
    assert len(set(map(tuple, draws.tolist()))) > 1


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.3), dict(repetition_penalty=0.7),
                                dict(frequency_penalty=0.4, presence_penalty=-0.3),
                                dict(repetition_penalty=1.1, frequency_penalty=-0.2, presence_penalty=0.5)])
def test_penalties_touch_only_the_history_and_match_the_dense_rule(kw):
    """apply_penalties works on the history's [B, T] values: the result equals the rule applied over the
    whole [B, V] logits (counts per token, repetition penalty by sign, frequency x count, presence once),
    with repeated tokens, entries masked out (a masked entry's token changes only if it is also seen) and
    -1 padding; every other logit is untouched, and the input is not modified."""
    torch.manual_seed(5)
    B, V, T = 3, 500, 40
    x = torch.randn(B, V) * 4
    history = torch.randint(0, 60, (B, T))  # a narrow range: plenty of repeats
    mask = torch.rand(B, T) > 0.3
    history[0, :5] = -1  # padding
    mask[0, :5] = False
    params = SamplingParams(**kw)
    before = x.clone()
    got = apply_penalties(x, history, mask, params)
    assert torch.equal(x, before)
    counts = torch.zeros(B, V)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                counts[b, history[b, t]] += 1
    seen = counts > 0
    want = x.clone()
    rp = params.repetition_penalty
    want = torch.where(seen, torch.where(want > 0, want / rp, want * rp), want)
    want = want - params.frequency_penalty * counts - params.presence_penalty * seen.float()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got[~seen], x[~seen])
