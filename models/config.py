"""Model configuration, built from GGUF metadata.

One frozen dataclass covers both supported families; the per-architecture differences are fields
(`act`, `qk_norm`, `sandwich_norm`, `embed_scale`, sliding-window settings) rather than subclasses,
so the transformer reads them and never branches on the architecture name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from models.errors import GGUFError, UnsupportedArchitecture


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    """GGUF `general.architecture`: "llama" or "gemma3"."""
    n_layers: int
    """Number of transformer blocks."""
    dim: int
    """Width of the residual stream."""
    ffn_dim: int
    """Inner width of the gated MLP."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (grouped-query attention when fewer than `n_heads`)."""
    head_dim: int
    """Width of one attention head."""
    vocab_size: int
    """Rows of the embedding table."""
    context_length: int
    """Longest sequence the model was trained for; prompts beyond it are refused."""
    norm_eps: float
    """RMSNorm epsilon."""
    rope_base: float
    """RoPE base frequency of global-attention layers."""
    rope_local_base: float
    """RoPE base frequency of sliding-window layers (equal to `rope_base` when there are none)."""
    sliding_window: int = 0
    """Keys further back than this many positions are masked on sliding layers; 0 means none."""
    sliding_window_pattern: int = 0
    """Every `pattern`-th layer (1-based) is global, the rest slide; 0 means all layers global."""
    act: str = "silu"
    """Gate activation of the MLP: "silu" or "gelu_tanh"."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Gemma 3)."""
    sandwich_norm: bool = False
    """Extra RMSNorm after attention and after the MLP, before the residual add (Gemma 3)."""
    embed_scale: float = 1.0
    """Multiplier applied to token embeddings (sqrt(dim) for Gemma)."""
    query_scale: float = 0.0
    """Softmax scale of attention scores; derived as head_dim**-0.5 when left 0."""
    final_logit_softcap: float = 0.0
    """tanh soft-capping of output logits; 0 disables it."""
    attn_logit_softcap: float = 0.0
    """tanh soft-capping of attention scores; 0 disables it."""
    tied_embeddings: bool = True
    """The output projection reuses the token embedding (no `output.weight` tensor)."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "dim", "ffn_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise GGUFError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise GGUFError(f"model config: n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.act not in ("silu", "gelu_tanh"):
            raise UnsupportedArchitecture(f"model config: unknown activation {self.act!r}")
        if self.query_scale == 0.0:
            object.__setattr__(self, "query_scale", self.head_dim**-0.5)

    def is_sliding(self, layer: int) -> bool:
        """Whether global layer index `layer` uses sliding-window attention."""
        if self.sliding_window <= 0 or self.sliding_window_pattern <= 0:
            return False
        return (layer + 1) % self.sliding_window_pattern != 0


def _get(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    if key in meta:
        return meta[key]
    if default is None:
        raise GGUFError(f"GGUF metadata lacks required key {key!r}")
    return default


def _llama(meta: Mapping[str, Any], has_output: bool) -> ModelConfig:
    p = "llama."
    dim = int(_get(meta, p + "embedding_length"))
    n_heads = int(_get(meta, p + "attention.head_count"))
    return ModelConfig(
        arch="llama",
        n_layers=int(_get(meta, p + "block_count")),
        dim=dim,
        ffn_dim=int(_get(meta, p + "feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(_get(meta, p + "attention.head_count_kv", n_heads)),
        head_dim=int(_get(meta, p + "rope.dimension_count", dim // n_heads)),
        vocab_size=int(_get(meta, p + "vocab_size", len(meta.get("tokenizer.ggml.tokens", ())) or -1)),
        context_length=int(_get(meta, p + "context_length")),
        norm_eps=float(_get(meta, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(_get(meta, p + "rope.freq_base", 10000.0)),
        rope_local_base=float(_get(meta, p + "rope.freq_base", 10000.0)),
        tied_embeddings=not has_output,
    )


def _gemma3(meta: Mapping[str, Any], has_output: bool) -> ModelConfig:
    p = "gemma3."
    dim = int(_get(meta, p + "embedding_length"))
    head_dim = int(_get(meta, p + "attention.key_length", 256))
    return ModelConfig(
        arch="gemma3",
        n_layers=int(_get(meta, p + "block_count")),
        dim=dim,
        ffn_dim=int(_get(meta, p + "feed_forward_length")),
        n_heads=int(_get(meta, p + "attention.head_count")),
        n_kv_heads=int(_get(meta, p + "attention.head_count_kv", 1)),
        head_dim=head_dim,
        vocab_size=int(_get(meta, p + "vocab_size", len(meta.get("tokenizer.ggml.tokens", ())) or -1)),
        context_length=int(_get(meta, p + "context_length")),
        norm_eps=float(_get(meta, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_base=float(_get(meta, p + "rope.freq_base", 1_000_000.0)),
        # llama.cpp and transformers both fix the local base at 10k for Gemma 3; GGUF does not store it.
        rope_local_base=10_000.0,
        sliding_window=int(_get(meta, p + "attention.sliding_window", 512)),
        sliding_window_pattern=6,
        act="gelu_tanh",
        qk_norm=True,
        sandwich_norm=True,
        embed_scale=math.sqrt(dim),
        # Gemma 3 scales queries by query_pre_attn_scalar**-0.5, equal to head_dim for the sizes we run.
        query_scale=head_dim**-0.5,
        final_logit_softcap=float(meta.get(p + "final_logit_softcapping", 0.0) or 0.0),
        attn_logit_softcap=float(meta.get(p + "attn_logit_softcapping", 0.0) or 0.0),
        tied_embeddings=not has_output,
    )


CONFIG_BUILDERS: dict[str, Callable[[Mapping[str, Any], bool], ModelConfig]] = {
    "llama": _llama,
    "gemma3": _gemma3,
}


def config_from_metadata(meta: Mapping[str, Any], has_output: bool) -> ModelConfig:
    """Build the config for the architecture the metadata names.

    Raises UnsupportedArchitecture for an architecture not in CONFIG_BUILDERS, GGUFError for
    missing keys.
    """
    arch = meta.get("general.architecture")
    if arch not in CONFIG_BUILDERS:
        raise UnsupportedArchitecture(
            f"architecture {arch!r} is not supported; supported: {', '.join(sorted(CONFIG_BUILDERS))}"
        )
    return CONFIG_BUILDERS[arch](meta, has_output)
