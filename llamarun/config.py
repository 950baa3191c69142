"""ModelArgs: the one description of a LLaMA-family model, whatever file it came from.

Each ``from_*`` constructor reads one source of hyper-parameters (Meta's params.json, a Hugging Face
config.json, GGUF metadata, a llama2.c header) and fills the same dataclass, so the model code never
needs to know where its checkpoint came from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .errors import FormatError

# Hyper-parameters of common models, for planning before a download (Meta's params.json values).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=4096),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, max_seq_len=4096),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                        ffn_dim_multiplier=1.3, max_seq_len=4096),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                       ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                         ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=131072),
    "llama-3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                        ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                         ffn_dim_multiplier=1.5, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                         ffn_dim_multiplier=1.0, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True),
    "open-llama-3b": dict(dim=3200, n_layers=26, n_heads=32, vocab_size=32000, hidden_dim=8640, max_seq_len=2048),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                         rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "stories15m": dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, hidden_dim=768, max_seq_len=256,
                       tie_embeddings=True),
}


@dataclass
class ModelArgs:
    """Hyper-parameters of a LLaMA-architecture transformer.

    ``hidden_dim`` is the SwiGLU width; when a source only gives Meta's ``multiple_of`` and
    ``ffn_dim_multiplier``, it is derived exactly as Meta's model.py does.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    hidden_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1 style: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048  # the context the model was trained for
    tie_embeddings: bool = False
    head_dim: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads <= 0 or self.dim % self.n_heads:
                raise FormatError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = meta_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise FormatError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise FormatError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def num_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim
        return self.n_layers * per_layer + emb * (1 if self.tie_embeddings else 2) + self.dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    # ---- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_meta_params(cls, params: Mapping[str, Any], **overrides: Any) -> "ModelArgs":
        """From Meta's params.json (Llama 2 / 3 / 3.1 reference code)."""
        p = dict(params)
        vocab = int(p.get("vocab_size", -1))
        scaling = None
        if p.get("use_scaled_rope") or p.get("rope_scaling"):
            # Meta's 3.1 code hard-codes these values behind `use_scaled_rope: true`.
            scaling = dict(p.get("rope_scaling") or {})
            scaling.setdefault("factor", 8.0)
            scaling.setdefault("low_freq_factor", 1.0)
            scaling.setdefault("high_freq_factor", 4.0)
            scaling.setdefault("original_max_position_embeddings", 8192)
        args = dict(
            dim=int(p["dim"]),
            n_layers=int(p["n_layers"]),
            n_heads=int(p["n_heads"]),
            n_kv_heads=p.get("n_kv_heads"),
            vocab_size=vocab,
            multiple_of=int(p.get("multiple_of", 256)),
            ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(p.get("max_seq_len", 2048)),
            hidden_dim=p.get("hidden_dim"),
            tie_embeddings=bool(p.get("tie_embeddings", False)),
        )
        args.update(overrides)
        return cls(**args)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        """From a Hugging Face ``config.json`` of a LlamaForCausalLM-style model."""
        scaling = cfg.get("rope_scaling") or None
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise FormatError(f"config.json: rope_scaling type {kind!r} is not supported")
            scaling = None if kind == "default" else dict(scaling)
        n_heads = int(cfg["num_attention_heads"])
        return cls(
            dim=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=int(cfg["vocab_size"]),
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim"),
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> "ModelArgs":
        """From GGUF metadata (``llama.*`` keys) and the tensors' shapes (numpy order, [out, in])."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise FormatError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"llama.{key}", default)

        try:
            dim = int(get("embedding_length"))
            n_heads = int(get("attention.head_count"))
            n_layers = int(get("block_count"))
            hidden = int(get("feed_forward_length"))
        except (TypeError, ValueError) as e:
            raise FormatError(f"GGUF metadata is missing a llama.* hyper-parameter ({e})") from None
        n_kv = get("attention.head_count_kv", n_heads)
        if "token_embd.weight" not in tensor_shapes:
            raise FormatError("GGUF file has no token_embd.weight tensor")
        vocab = int(get("vocab_size") or tensor_shapes["token_embd.weight"][0])
        scaling = None
        if get("rope.scaling.type") not in (None, "none") and "rope_freqs.weight" not in tensor_shapes:
            raise FormatError(f"GGUF rope scaling {get('rope.scaling.type')!r} is not supported")
        key_len = get("attention.key_length")
        return cls(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            vocab_size=vocab,
            hidden_dim=hidden,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(get("context_length", 2048)),
            tie_embeddings="output.weight" not in tensor_shapes,
            head_dim=int(key_len) if key_len else None,
        )

    @classmethod
    def from_llama2c_header(
        cls, dim: int, hidden_dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab_size: int,
        seq_len: int, shared_classifier: bool,
    ) -> "ModelArgs":
        """From the seven int32 fields of a llama2.c checkpoint header (plus its shared-classifier flag)."""
        return cls(
            dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
            vocab_size=vocab_size, max_seq_len=seq_len, tie_embeddings=shared_classifier, norm_eps=1e-5,
        )


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width: 2/3 of 4*dim, scaled, rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
