"""The LLaMA transformer: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Parameter names follow Meta's reference code (``layers.0.attention.wq.weight`` ...), and so does the
rotary layout (adjacent pairs of a head's dimensions rotate together). Nothing here knows about file
formats, devices or processes: loaders produce Meta-named tensors, the engine places the model.

Shapes: B batch, S new tokens, T cached tokens, H query heads, K key/value heads, D head_dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference: bf16 sums of squares lose too much.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies [D/2], with Llama 3.1 scaling applied when the model asks for it."""
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    s = args.rope_scaling
    if not s:
        return freqs
    if "freq_factors" in s:  # GGUF files carry the divisors precomputed
        return freqs / torch.tensor(s["freq_factors"], dtype=torch.float64, device="cpu")
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freqs
    # Long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, the band between
    # interpolated smoothly: Meta's apply_scaling, vectorised.
    smooth = ((old_ctx / wavelen) - low) / (high - low)
    scaled = torch.where(wavelen > old_ctx / low, freqs / factor, freqs)
    mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(mid, (1 - smooth) * freqs / factor + smooth * freqs, scaled)


def rope_cache(args: ModelArgs, seq_len: int) -> torch.Tensor:
    """cos and sin for every position: [seq_len, D/2, 2] float32, computed on the CPU in float64 (callers move
    it where the model is)."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device="cpu"), rope_frequencies(args))
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, S, heads, D] by rope [S, D/2, 2] (Meta's complex-number layout)."""
    xp = x.float().unflatten(-1, (-1, 2))  # [B, S, h, D/2, 2]
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]  # [S, 1, D/2]
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scales [...]): each row scaled by its largest magnitude / 127 and
    rounded to nearest (an int8 KV cache's keys and values; the kernels' attn_decode writes the same)."""
    xf = x.float()
    scale = xf.abs().amax(-1) / 127
    # A row of zeros has scale 0: dividing by the smallest normal float instead keeps it zeros.
    q = torch.round(xf / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


class KVCache(nn.Module):
    """Static key/value cache for one layer: [B, K, max_seq_len, D], written in place. Its dtype may be
    narrower than the activations' (float16 under float32 math): values are rounded on the way in. With
    dtype int8, each cached row (one position of one head) is stored as int8 with a float32 scale,
    ``k_scale`` / ``v_scale`` [B, K, max_seq_len] (:func:`quantize_rows`): about half a float16 cache's
    bytes (llama.cpp's ``-ctk q8_0``), read back as float32. ``zeros`` (``torch.zeros``'s signature)
    allocates the tensors."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 zeros: Callable[..., torch.Tensor] = torch.zeros) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", zeros(shape, dtype=dtype, device=device), persistent=False)
        scales = dtype == torch.int8
        for name in ("k_scale", "v_scale"):
            self.register_buffer(name, zeros(shape[:3], dtype=torch.float32, device=device) if scales else None,
                                 persistent=False)

    def update(self, start_pos: int | torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, K, S, D] at positions start_pos.. and return all keys/values so far [B, K, T, D]
        (an int8 cache's dequantized to float32).

        With a tensor of positions [S] instead (the static-shape path), the whole cache [B, K, max_seq_len, D]
        is returned: shapes then never depend on the position, and the caller masks what is not written yet.
        """
        b, _, s, _ = k.shape
        if self.k_scale is not None:
            (k, ks), (v, vs) = quantize_rows(k), quantize_rows(v)
        else:
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if isinstance(start_pos, torch.Tensor):
            self.k[:b].index_copy_(2, start_pos, k)
            self.v[:b].index_copy_(2, start_pos, v)
            if self.k_scale is not None:
                self.k_scale[:b].index_copy_(2, start_pos, ks)
                self.v_scale[:b].index_copy_(2, start_pos, vs)
            return self._read(slice(None), b)
        end = start_pos + s
        self.k[:b, :, start_pos:end] = k
        self.v[:b, :, start_pos:end] = v
        if self.k_scale is not None:
            self.k_scale[:b, :, start_pos:end] = ks
            self.v_scale[:b, :, start_pos:end] = vs
        return self._read(slice(0, end), b)

    def _read(self, positions: slice, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 0..b-1's keys and values at ``positions`` [b, K, T, D], dequantized if int8."""
        k, v = self.k[:b, :, positions], self.v[:b, :, positions]
        if self.k_scale is None:
            return k, v
        return (k.float() * self.k_scale[:b, :, positions, None],
                v.float() * self.v_scale[:b, :, positions, None])


class Attention(nn.Module):
    """Grouped-query attention. wq, wk and wv are fused into one ``wqkv`` projection: one matrix
    product instead of three, which matters at batch 1 where each product is a pass over memory.

    ``prefill_dtype`` (None: the activations') is the dtype of the attention products of calls with
    several new tokens: bf16 under float32 activations on CPUs with native bf16, where torch's CPU flash
    attention in bf16 takes 0.36x float32's time at 512 tokens (measured, 2-core Sapphire Rapids)."""

    prefill_dtype: torch.dtype | None = None

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_size, self.kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wqkv = nn.Linear(args.dim, self.q_size + 2 * self.kv_size, bias=False)
        self.wo = nn.Linear(self.q_size, args.dim, bias=False)
        self.cache: KVCache | None = None

    def _rope(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, rope)  # a method: the CPU fast path swaps in its fused op

    def project(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, dim] -> q [B, S, n_heads, D], k and v [B, S, n_kv_heads, D]; q and k rotated."""
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self._rope(q.view(b, s, self.n_heads, self.head_dim), rope)
        k = self._rope(k.view(b, s, self.n_kv_heads, self.head_dim), rope)
        return q, k, v.view(b, s, self.n_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        """x [B, S, dim] at positions start_pos.. (an int, or a tensor of the S positions) -> [B, S, dim]."""
        b, s, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x, rope))  # [B, heads, S, D]
        if s > 1 and self.prefill_dtype is not None:
            q = q.to(self.prefill_dtype)  # k and v follow q below, after the cache has stored them as they are
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # [B, K, T, D]
        # A float16 cache under float32 math, or bf16 prefill attention (no-op otherwise).
        k, v = k.to(q.dtype), v.to(q.dtype)
        # enable_gqa: each key/value head serves n_heads / n_kv_heads query heads, without copies.
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(start_pos, torch.Tensor):  # static shapes: the whole cache, masked past each query
            mask = torch.arange(k.shape[2], device=x.device) <= start_pos[:, None]  # [S, max_seq_len]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif s == 1:  # one new token sees the whole cache: no mask needed
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        elif k.shape[2] == s:  # prefill from position 0: plain causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # a chunk after cached tokens: query i sees keys up to start_pos + i
            mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1).to(x.dtype))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one ``w13`` projection."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


# Fused parameters and the Meta-named checkpoint tensors they are made of, concatenated on dim 0.
FUSED = {
    "attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}


def checkpoint_names(param_name: str) -> tuple[str, ...]:
    """The Meta-named checkpoint tensors that make up a model parameter (one, or several if fused)."""
    for fused, parts in FUSED.items():
        if param_name.endswith("." + fused):
            base = param_name[: -len(fused)]
            return tuple(base + p for p in parts)
    return (param_name,)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A LLaMA model. Call ``setup_cache`` before incremental decoding; without a cache each call
    attends only to the tokens it is given (a full recompute)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        dev = torch.get_default_device()
        # On the meta device (loaders build the model there, then fill it in) there is nothing to compute.
        rope = (torch.empty(args.max_seq_len, args.head_dim // 2, 2, device=dev) if dev.type == "meta"
                else rope_cache(args, args.max_seq_len).to(dev))
        self.register_buffer("rope", rope, persistent=False)
        self.cache_shape: tuple[int, int] = (0, 0)  # (batch, max_seq_len) of the current KV cache
        self.cache_dtype: torch.dtype | None = None

    def cache_fits(self, batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> bool:
        """Does the current KV cache serve ``batch`` rows of ``max_seq_len`` tokens in ``dtype`` (default:
        the embedding's floating dtype)?"""
        return (batch <= self.cache_shape[0] and max_seq_len <= self.cache_shape[1]
                and self._cache_dtype(dtype) == self.cache_dtype)

    def _cache_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        ref = self.tok_embeddings.weight
        return dtype or (ref.dtype if ref.is_floating_point() else torch.float32)

    def setup_cache(self, batch: int, max_seq_len: int, dtype: torch.dtype | None = None,
                    zeros: Callable[..., torch.Tensor] = torch.zeros) -> None:
        """Allocate a static KV cache for ``batch`` rows of up to ``max_seq_len`` tokens (reused when big enough
        and of the same dtype). ``dtype`` defaults to the embedding's floating dtype; ``zeros`` allocates each
        tensor (the engine's allocates CPU caches in pages that become resident only when written)."""
        if self.cache_fits(batch, max_seq_len, dtype):
            return
        ref, dtype = self.tok_embeddings.weight, self._cache_dtype(dtype)
        for layer in self.layers:
            layer.attention.cache = None  # free the old cache before allocating the new one
            layer.attention.cache = KVCache(batch, self.args.n_kv_heads, max_seq_len, self.args.head_dim,
                                            dtype, ref.device, zeros)
        self.cache_shape, self.cache_dtype = (batch, max_seq_len), dtype
        if max_seq_len > self.rope.shape[0]:  # serve contexts beyond the trained length if asked to
            self.rope = rope_cache(self.args, max_seq_len).to(self.rope.device)

    def free_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None
        self.cache_shape, self.cache_dtype = (0, 0), None

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, last_only: bool = False,
                logits: bool = True) -> torch.Tensor:
        """tokens [B, S] at positions start_pos..start_pos+S-1 -> float32 logits [B, S, vocab]
        (or [B, 1, vocab] with ``last_only``, which skips the output layer for the other positions). With
        ``logits=False``, the final hidden states [B, S, dim] instead, for :meth:`head` later or never (a
        prompt's chunks before its last only fill the cache).

        ``start_pos`` may also be a tensor of the S positions (needs a cache): the static-shape path, where
        one compiled graph (torch.compile, CUDA graphs) serves every decode step because the position is
        data, not a Python int.
        """
        s = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        if isinstance(start_pos, torch.Tensor):
            rope = self.rope[start_pos]
        else:
            rope = self.rope[start_pos : start_pos + s]
        for layer in self.layers:
            h = layer(h, rope, start_pos)
        if not logits:
            return h
        return self.head(h[:, -1:] if last_only else h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, S, dim] -> float32 logits [B, S, vocab]: the last norm and the output layer."""
        return self.output(self.norm(h)).float()
