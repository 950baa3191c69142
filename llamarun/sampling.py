"""Choosing the next token from logits: temperature, top-k, top-p (nucleus), min-p and penalties.

Everything works on a batch: logits [B, V] float32 -> token ids [B]. Temperature 0 is greedy argmax.
Nucleus sampling keeps the smallest set of most likely tokens whose probability mass reaches top_p,
exactly like Meta's ``sample_top_p`` (the token that crosses the threshold is kept).

Any positive temperature works, however small: logits are divided by it only after their row's maximum is
subtracted (where the fast path's plain division overflows, it hands the row over). Logits with a NaN, or
with an infinite maximum, raise :class:`NonFiniteLogits`, greedy decoding included.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch

from . import kernels
from .errors import RuntimeFailure, UsageError

_F32_MAX = torch.finfo(torch.float32).max
_F32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, ~1.2e-38


class NonFiniteLogits(RuntimeFailure):
    """Logits holding a NaN, or whose largest value is infinite: there is no distribution to sample and no
    token to pick. A model with damaged weights gives them (or one whose activations overflow its dtype).
    ``position``: where in the sequence the logits come from, when the caller knows it."""

    def __init__(self, logits: torch.Tensor, position: int | None = None) -> None:
        x = logits.detach().float().reshape(-1, logits.shape[-1])
        nan = torch.isnan(x).any(dim=-1)
        self.rows = (nan | ~torch.isfinite(x.amax(dim=-1))).nonzero().flatten().tolist()
        what = "NaN" if bool(nan.any()) else "infinite"
        where = f" at position {position}" if position is not None else ""
        row = f" in row {self.rows[0]}" if x.shape[0] > 1 and self.rows else ""
        super().__init__(f"the model produced {what} logits{where}{row} (damaged weights?)")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Defaults are Meta's (temperature 0.6, top_p 0.9)."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None  # None or 0: no top-k cut
    min_p: float = 0.0  # drop tokens whose probability is below min_p * p(most likely)
    repetition_penalty: float = 1.0  # CTRL-style: >1 discourages tokens already present
    frequency_penalty: float = 0.0  # OpenAI-style: subtract count * penalty
    presence_penalty: float = 0.0  # OpenAI-style: subtract penalty once a token has appeared

    def __post_init__(self) -> None:
        check_sampling_values(self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty,
                              self.frequency_penalty, self.presence_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def check_sampling_values(temperature: float, top_p: float, top_k: int | None = None, min_p: float = 0.0,
                          repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0) -> None:
    """Raise UsageError naming the first invalid value (a wrong type included)."""
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                        ("repetition_penalty", repetition_penalty), ("frequency_penalty", frequency_penalty),
                        ("presence_penalty", presence_penalty)):
        if not isinstance(value, numbers.Real):  # "0.7" from a config file would fail deep in torch
            raise UsageError(f"{name} must be a number, got {value!r}")
    if not (0 <= temperature < math.inf):  # also rejects NaN; an infinite one makes -inf / inf = NaN
        raise UsageError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None:
        try:
            top_k = operator.index(top_k)
        except TypeError:
            raise UsageError(f"top_k must be an integer, got {top_k!r}") from None
        if top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {top_k}")
    if not (0 <= min_p <= 1):
        raise UsageError(f"min_p must be in [0, 1], got {min_p}")
    if not (0 < repetition_penalty < math.inf):
        raise UsageError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not math.isfinite(value):
            raise UsageError(f"{name} must be a finite number, got {value}")


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor,
                    params: SamplingParams) -> torch.Tensor:
    """Penalise tokens already seen. history [B, T] ids, history_mask [B, T] which of them count.

    Only the history's tokens change, so the arithmetic runs on their [B, T] values, gathered and scattered
    back, instead of on [B, V] (a 49K vocabulary at batch 16: 13 -> ~1 ms a step). Every history entry of a
    token gets that token's one new value (entries masked out included), so the scatter's duplicates agree."""
    if not params.uses_penalties:
        return logits
    ids = history.clamp(min=0)
    counts = torch.zeros_like(logits).scatter_add_(1, ids, history_mask.to(logits.dtype))
    count = counts.gather(1, ids)  # [B, T]: how often each entry's token counts
    value = logits.gather(1, ids)
    seen = count > 0
    if params.repetition_penalty != 1.0:
        penalised = torch.where(value > 0, value / params.repetition_penalty, value * params.repetition_penalty)
        value = torch.where(seen, penalised, value)
    value = value - params.frequency_penalty * count - params.presence_penalty * seen.to(value.dtype)
    if params.repetition_penalty < 1.0 or params.frequency_penalty < 0.0 or params.presence_penalty < 0.0:
        # Penalties that raise logits can overflow them to +inf, and sampling subtracts the row's maximum:
        # inf - inf would be NaN. The largest float keeps such a token the most likely one.
        value = value.clamp(max=_F32_MAX)
    return logits.clone().scatter_(1, ids, value)


def _cut_min_p(probs: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities below ``floor`` (min_p times the row's largest)."""
    return torch.where(probs < floor, 0.0, probs)


def _cut_top_p(sorted_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero, in probabilities sorted most likely first, each token whose preceding mass already exceeds
    top_p (Meta's rule: cumsum - p > top_p)."""
    return sorted_p.masked_fill((sorted_p.cumsum(dim=-1) - sorted_p) > top_p, 0.0)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [B, V] after temperature, top-k, min-p and top-p; renormalised, zeros outside.
    Raises NonFiniteLogits when a row has a NaN or an infinite maximum."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    top = x.amax(dim=-1, keepdim=True)  # NaN when the row has one
    if not bool(torch.isfinite(top).all()):
        raise NonFiniteLogits(logits)
    # Logits / temperature overflows to inf for a temperature near 0 (1e-45), and softmax then computes
    # inf - inf = NaN. After subtracting the maximum, x / temperature is 0 for the best tokens and at worst
    # -inf for the others. The divisor stays at least float32's smallest normal number, which cannot round
    # to 0 (0 / 0 = NaN); below it only logits within ~1e-36 of the maximum (possible only near 0) keep a share.
    probs = torch.softmax((x - top) / max(params.temperature, _F32_TINY), dim=-1)
    if params.top_k:
        kth = torch.topk(probs, min(params.top_k, probs.shape[-1]), dim=-1).values[..., -1:]
        probs = torch.where(probs < kth, 0.0, probs)
    if params.min_p > 0:
        probs = _cut_min_p(probs, params.min_p * probs.max(dim=-1, keepdim=True).values)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        probs = torch.zeros_like(probs).scatter_(-1, idx, _cut_top_p(sorted_p, params.top_p))
    return probs / probs.sum(dim=-1, keepdim=True)


CANDIDATES = 256  # sample among the top-256 tokens when they are sure to hold every token the filters keep


def candidate_probs(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`filtered_probs` restricted to the CANDIDATES most likely tokens: (probabilities [B, k], not
    renormalised, and their token ids [B, k]), or None when the filters might keep a token outside them.
    Sorting a 49K vocabulary for top-p costs ~4 ms on a CPU and a multinomial draw over it ~1.5 ms; torch.topk
    and logsumexp ~0.33 ms. (On a CPU with the kernels, :func:`sample` draws in one kernel instead.)"""
    k = min(CANDIDATES, params.top_k) if params.top_k else CANDIDATES
    scaled = logits.float() / params.temperature
    vals, idx = torch.topk(scaled, k, dim=-1)  # [B, k], most likely first
    logz = torch.logsumexp(scaled, dim=-1, keepdim=True)
    # logz is NaN or infinite when a logit is NaN, or when x / temperature overflows float32 (a temperature
    # near 0): filtered_probs, which scales safely and reports NaN, takes such rows.
    finite = torch.isfinite(logz[:, 0])
    p = torch.exp(vals - logz)  # the candidates' true probabilities
    covered = torch.full(p.shape[:1], bool(params.top_k) and params.top_k <= k)  # top-k keeps only these
    if params.min_p > 0:
        floor = params.min_p * p[:, :1]
        covered |= p[:, -1] < floor[:, 0]  # every other token is <= the last candidate: below the floor too
        p = _cut_min_p(p, floor)
    if params.top_p < 1.0:
        covered |= p.sum(dim=-1) > params.top_p  # the mass before any other token already exceeds top_p
        p = _cut_top_p(p, params.top_p)
    return (p, idx) if bool((covered & finite).all()) else None


def _kernel_rows(logits: torch.Tensor) -> bool:
    """Whether the compiled kernels (``argmax``, ``sample_filtered``) take these logits: [B, V] float32 on a CPU."""
    return logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 and kernels.available()


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits [B, V] -> [B] (int64). Raises NonFiniteLogits for a row with a NaN
    or an infinite maximum."""
    if params.greedy:
        # argmax picks a row's first NaN if it has one (the kernel does as torch.argmax), so one look at each
        # picked logit finds NaN logits, and an infinite maximum, without another pass over the vocabulary.
        if _kernel_rows(logits):
            rows = logits.contiguous()
            ids = torch.ops.llamarun.argmax(rows)  # torch's CPU argmax is scalar: ~20x slower
            # Through numpy the look costs ~3 us a step (gather + isfinite + all: ~15-20 us).
            values = (rows.detach() if rows.requires_grad else rows).numpy()
            finite = all(math.isfinite(values.item(r, c)) for r, c in enumerate(ids.tolist()))
        else:
            ids = logits.argmax(dim=-1)
            finite = bool(torch.isfinite(logits.gather(-1, ids.unsqueeze(-1))).all())
        if not finite:
            raise NonFiniteLogits(logits)
        return ids
    if _kernel_rows(logits):
        # One kernel: filtered_probs' filters by selection instead of a sort, and the draw (see fused.cpp).
        u = torch.rand(logits.shape[0], dtype=torch.float64, generator=generator)
        ids = torch.ops.llamarun.sample_filtered(logits.detach().contiguous(), u, params.temperature,
                                                 params.top_k or 0, params.top_p, params.min_p)
        if bool((ids < 0).any()):
            raise NonFiniteLogits(logits)
        return ids
    if logits.dim() == 2 and logits.shape[-1] > CANDIDATES:
        cand = candidate_probs(logits, params)
        if cand is not None:  # the usual case: the nucleus is a few dozen tokens
            p, idx = cand
            pick = torch.multinomial(p / p.sum(dim=-1, keepdim=True), num_samples=1, generator=generator)
            return idx.gather(-1, pick).squeeze(-1)
    probs = filtered_probs(logits, params)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
