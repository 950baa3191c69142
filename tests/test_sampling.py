"""Sampling's numerical edge cases: temperatures near 0, NaN and infinite logits, bad parameter values.

Every case runs with the compiled kernels (``top_candidates``, ``argmax``) and with the portable torch code
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
