"""Choosing the next token from logits: temperature, top-k, top-p (nucleus), min-p and penalties.

Everything works on a batch: logits [B, V] float32 -> token ids [B]. Temperature 0 is greedy argmax.
Nucleus sampling keeps the smallest set of most likely tokens whose probability mass reaches top_p,
exactly like Meta's ``sample_top_p`` (the token that crosses the threshold is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .errors import UsageError


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
        check_sampling_values(self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def check_sampling_values(temperature: float, top_p: float, top_k: int | None = None, min_p: float = 0.0,
                          repetition_penalty: float = 1.0) -> None:
    """Raise UsageError naming the first invalid value."""
    if not (temperature >= 0):  # also rejects NaN
        raise UsageError(f"temperature must be >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise UsageError(f"top_k must be >= 0, got {top_k}")
    if not (0 <= min_p <= 1):
        raise UsageError(f"min_p must be in [0, 1], got {min_p}")
    if not (repetition_penalty > 0):
        raise UsageError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor,
                    params: SamplingParams) -> torch.Tensor:
    """Penalise tokens already seen. history [B, T] ids, history_mask [B, T] which of them count."""
    if not params.uses_penalties:
        return logits
    counts = torch.zeros_like(logits)
    counts.scatter_add_(1, history.clamp(min=0), history_mask.to(logits.dtype))
    seen = counts > 0
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    return logits - params.frequency_penalty * counts - params.presence_penalty * seen.to(logits.dtype)


def _cut_min_p(probs: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities below ``floor`` (min_p times the row's largest)."""
    return torch.where(probs < floor, 0.0, probs)


def _cut_top_p(sorted_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero, in probabilities sorted most likely first, each token whose preceding mass already exceeds
    top_p (Meta's rule: cumsum - p > top_p)."""
    return sorted_p.masked_fill((sorted_p.cumsum(dim=-1) - sorted_p) > top_p, 0.0)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [B, V] after temperature, top-k, min-p and top-p; renormalised, zeros outside."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
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
    Sorting a 49K vocabulary for top-p costs ~4 ms and a multinomial draw over it ~1.5 ms, half of a small
    model's decode step; the candidates cost ~0.1 ms (the ``top_candidates`` kernel; torch.topk +
    logsumexp, without the kernels, ~0.33 ms)."""
    k = min(CANDIDATES, params.top_k) if params.top_k else CANDIDATES
    if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 and kernels.available():
        # One kernel: ~0.1 ms instead of torch.topk + logsumexp's ~0.33 ms on a 49K vocabulary.
        vals, idx, logz = torch.ops.llamarun.top_candidates(logits.contiguous(), k, params.temperature)
        logz = logz[:, None]
    else:
        scaled = logits.float() / params.temperature
        vals, idx = torch.topk(scaled, k, dim=-1)  # [B, k], most likely first
        logz = torch.logsumexp(scaled, dim=-1, keepdim=True)
    p = torch.exp(vals - logz)  # the candidates' true probabilities
    covered = torch.full(p.shape[:1], bool(params.top_k) and params.top_k <= k)  # top-k keeps only these
    if params.min_p > 0:
        floor = params.min_p * p[:, :1]
        covered |= p[:, -1] < floor[:, 0]  # every other token is <= the last candidate: below the floor too
        p = _cut_min_p(p, floor)
    if params.top_p < 1.0:
        covered |= p.sum(dim=-1) > params.top_p  # the mass before any other token already exceeds top_p
        p = _cut_top_p(p, params.top_p)
    return (p, idx) if bool(covered.all()) else None


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits [B, V] -> [B] (int64)."""
    if params.greedy:
        if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 and kernels.available():
            return torch.ops.llamarun.argmax(logits.contiguous())  # torch's CPU argmax is scalar: ~20x slower
        return logits.argmax(dim=-1)
    if logits.dim() == 2 and logits.shape[-1] > CANDIDATES:
        cand = candidate_probs(logits, params)
        if cand is not None:  # the usual case: the nucleus is a few dozen tokens
            p, idx = cand
            pick = torch.multinomial(p / p.sum(dim=-1, keepdim=True), num_samples=1, generator=generator)
            return idx.gather(-1, pick).squeeze(-1)
    probs = filtered_probs(logits, params)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
