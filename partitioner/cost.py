"""A first analytic cost model: TTFT, time per output token and energy of a request on one device.

Pure functions over plain data (a `DeviceProfile` and a `ModelCost`), so the hub's router can score
candidate placements without touching a model or a server. The model is the usual roofline for
batch-1 decoder inference:

- prefill is compute-bound: FLOPs / (peak TFLOPS x efficiency.prefill), but never faster than reading
  the weights once from memory;
- each decoded token is memory-bound: it reads every layer weight, the output head and the KV cache
  once, at (bandwidth x efficiency.decode); it is never faster than its own FLOPs allow;
- the link adds one round trip and the prompt's transfer before the first token, and each streamed
  token's share of the link after it.

Units: bytes, FLOPs, milliseconds, joules. Direction follows the device: `downlink` is hub to device
(the prompt travels that way), `uplink` is device to hub (generated tokens travel that way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from device_profiles import DeviceProfile
from models.config import ModelConfig

BYTES_PER_PROMPT_TOKEN = 4.0
"""Prompt text bytes per token when the caller does not give the size (English BPE averages ~4)."""
BYTES_PER_STREAMED_TOKEN = 32.0
"""Wire bytes per generated token sent back (token id, text piece, message framing); an estimate."""
MEMORY_HEADROOM = 0.2
"""Fraction of a device's memory `fits` leaves free for the runtime, activations and the OS."""


@dataclass(frozen=True)
class ModelCost:
    """Sizes of a decoder-only model that set its cost; build it with `from_config`.

    Every block has the same shape, so per-layer numbers are given once. Parameter counts are
    elements; bytes follow from `bits_per_weight` (weights) and `kv_bits` (KV cache).
    """

    n_layers: int
    """Transformer blocks."""
    layer_params: int
    """Parameters of one block: attention and MLP matrices plus its norm vectors."""
    layer_matmul_params: int
    """Parameters of one block that take part in matrix products (all but the norms)."""
    embed_params: int
    """Token embedding table, vocab x dim."""
    head_params: int
    """Output projection, vocab x dim; the same tensor as the embedding when tied."""
    tied: bool
    """The output projection reuses the embedding (stored once)."""
    final_norm_params: int
    """The norm before the output projection."""
    attn_width: int
    """n_heads x head_dim: width of the q.k and attention.v products per token and key."""
    kv_width: int
    """n_kv_heads x head_dim: elements of K (and of V) stored per token per layer."""
    bits_per_weight: float
    """Average stored bits per weight (32 fp32, 16 fp16, about 4.5-5 for 4-bit formats with scales)."""
    kv_bits: float
    """Bits per element of the KV cache."""
    sliding_window: int = 0
    """Keys a sliding-window layer attends to at most (0: no sliding layers)."""
    sliding_layers: int = 0
    """How many of the n_layers blocks slide (Gemma 3: five in six); the rest attend to everything."""

    n_params: int = field(init=False)
    """Total parameters, the embedding counted once if tied."""
    weight_bytes: float = field(init=False)
    """Bytes of all stored weights (what must fit in memory)."""
    weight_bytes_per_token: float = field(init=False)
    """Weight bytes read per decoded token: every block, the final norm and the output head
    (an untied embedding table is not read; only one row of it is looked up)."""
    kv_bytes_per_token: float = field(init=False)
    """KV cache bytes per token of context, all layers, K and V."""

    def __post_init__(self) -> None:
        if self.bits_per_weight <= 0 or self.kv_bits <= 0:
            raise ValueError(
                f"bits_per_weight and kv_bits must be positive, got {self.bits_per_weight}, {self.kv_bits}"
            )
        layers = self.n_layers * self.layer_params
        n_params = layers + self.embed_params + self.final_norm_params + (0 if self.tied else self.head_params)
        read = layers + self.final_norm_params + self.head_params
        object.__setattr__(self, "n_params", n_params)
        object.__setattr__(self, "weight_bytes", n_params * self.bits_per_weight / 8)
        object.__setattr__(self, "weight_bytes_per_token", read * self.bits_per_weight / 8)
        object.__setattr__(self, "kv_bytes_per_token", 2 * self.n_layers * self.kv_width * self.kv_bits / 8)

    @classmethod
    def from_config(cls, cfg: ModelConfig, bits_per_weight: float = 32.0, kv_bits: float | None = None) -> ModelCost:
        """Cost sizes of `cfg` stored at `bits_per_weight`.

        `kv_bits` defaults to 32 for fp32 weights and 16 otherwise (quantized runtimes keep an fp16 cache).
        The counts mirror `models.transformer.Transformer`, norms included.
        """
        q = cfg.n_heads * cfg.head_dim
        kv = cfg.n_kv_heads * cfg.head_dim
        attn = cfg.dim * q + 2 * cfg.dim * kv + q * cfg.dim  # wq, wk, wv, wo
        mlp = 3 * cfg.dim * cfg.ffn_dim  # gate, up, down
        norms = 2 * cfg.dim + (2 * cfg.head_dim if cfg.qk_norm else 0) + (2 * cfg.dim if cfg.sandwich_norm else 0)
        return cls(
            n_layers=cfg.n_layers,
            layer_params=attn + mlp + norms,
            layer_matmul_params=attn + mlp,
            embed_params=cfg.vocab_size * cfg.dim,
            head_params=cfg.vocab_size * cfg.dim,
            tied=cfg.tied_embeddings,
            final_norm_params=cfg.dim,
            attn_width=q,
            kv_width=kv,
            bits_per_weight=bits_per_weight,
            kv_bits=kv_bits if kv_bits is not None else (32.0 if bits_per_weight >= 32 else 16.0),
            sliding_window=cfg.sliding_window,
            sliding_layers=sum(cfg.is_sliding(i) for i in range(cfg.n_layers)),
        )

    @property
    def layer_weight_bytes(self) -> float:
        """Bytes of one block's weights (what a split moves between devices)."""
        return self.layer_params * self.bits_per_weight / 8

    def keys_read(self, context: float) -> float:
        """Keys one decode step attends to, summed over the layers: every position on a global layer,
        at most sliding_window on a sliding one."""
        window = min(context, self.sliding_window) if self.sliding_window else context
        return (self.n_layers - self.sliding_layers) * context + self.sliding_layers * window

    def prompt_keys(self, tokens: float) -> float:
        """Keys a causal prefill of `tokens` attends to, summed over its tokens and the layers (token t
        sees t + 1 keys, at most sliding_window of them on a sliding layer)."""
        full = tokens * (tokens + 1) / 2
        w = self.sliding_window
        slid = full if not w or tokens <= w else w * (w + 1) / 2 + (tokens - w) * w
        return (self.n_layers - self.sliding_layers) * full + self.sliding_layers * slid

    def flops_per_token(self, context: int) -> float:
        """FLOPs to decode one token attending to `context` positions: 2 per matmul weight (multiply and
        add), plus q.k and attention.v over the keys it reads (2 x 2 x attn_width per key and layer)."""
        matmul = 2.0 * (self.n_layers * self.layer_matmul_params + self.head_params)
        return matmul + 4.0 * self.attn_width * self.keys_read(context)

    def prefill_flops(self, prompt_tokens: int) -> float:
        """FLOPs to prefill `prompt_tokens`: every block for every token, causal attention (see
        `prompt_keys`), and the output head for the last position only (as `models.generate` does)."""
        blocks = 2.0 * self.n_layers * self.layer_matmul_params * prompt_tokens
        return blocks + 4.0 * self.attn_width * self.prompt_keys(prompt_tokens) + 2.0 * self.head_params

    def memory_bytes(self, context_tokens: int) -> float:
        """Weights plus a KV cache of `context_tokens` positions."""
        return self.weight_bytes + self.kv_bytes_per_token * context_tokens


def served_model_cost(cfg: ModelConfig, weight_bytes: int = 0) -> ModelCost:
    """The one cost rule for a model as a server holds it: the hub's router and an emulating agent's
    pacer both call this, so what the router predicts is what the agent paces to.

    `weight_bytes` is what the server's weights really take in memory (ModelInfo.weight_bytes; an int4
    bundle stores about 5 bits a weight with its scales and minima, int8 about 8.5); 0 means unknown and
    costs the model as fp32. The KV cache follows `ModelCost.from_config`: fp16 for quantized weights,
    fp32 otherwise, as our engines keep it. Raises ValueError for negative `weight_bytes`.
    """
    if weight_bytes < 0:
        raise ValueError(f"weight_bytes must be >= 0, got {weight_bytes}")
    if weight_bytes == 0:
        return ModelCost.from_config(cfg, bits_per_weight=32.0)
    n_params = ModelCost.from_config(cfg, bits_per_weight=32.0).n_params
    return ModelCost.from_config(cfg, bits_per_weight=8 * weight_bytes / n_params)


@dataclass(frozen=True)
class Estimate:
    """Predicted cost of one request on one device."""

    ttft_ms: float
    """Time to first token: link round trip, prompt transfer, prefill."""
    tpot_ms: float
    """Mean time per output token after the first: decode step plus its share of the link."""
    total_ms: float
    """Whole request: ttft_ms + (max_new_tokens - 1) x tpot_ms."""
    energy_j: float
    """Device energy while computing the request (power_active_w x busy time), whatever its kind."""
    edge_energy_j: float
    """`energy_j` for an edge device, 0 for cloud: the energy the router budgets."""
    prefill_ms: float
    """Prefill compute alone (no link)."""
    decode_ms: float
    """One decode step's compute alone (no link), at the request's mean context."""


def _ms(amount: float, rate_per_s: float) -> float:
    return 1e3 * amount / rate_per_s


def prefill_ms(profile: DeviceProfile, cost: ModelCost, prompt_tokens: int) -> float:
    """Compute-bound prefill time, floored by one read of the weights at decode bandwidth."""
    flops = _ms(cost.prefill_flops(prompt_tokens), profile.compute_tflops * 1e12 * profile.efficiency.prefill)
    memory = _ms(cost.weight_bytes_per_token, profile.memory_bandwidth_gbs * 1e9 * profile.efficiency.decode)
    return max(flops, memory)


KV_PREDICTOR_SOURCES = 1.5
"""Source layers a KV predictor reads on average (models.kvpred: one for a kept layer, two for a
dropped one)."""


def kv_predictor_layers(cost: ModelCost) -> float:
    """The KV predictors' matmuls in layers' worth of prefill: per token, every base layer maps its
    sources' keys and values (2 x kv_width each) to its own (2 x kv_width)."""
    macs = cost.n_layers * (2 * cost.kv_width * KV_PREDICTOR_SOURCES) * (2 * cost.kv_width)
    return macs / cost.layer_matmul_params


def kv_prefill_ms(profile: DeviceProfile, cost: ModelCost, prompt_tokens: int, layers: int) -> float:
    """Prefill with KV prediction (models.kvpred): the prompt through an auxiliary model of `layers`
    of the layers and the predictors (`kv_predictor_layers`), each at a layer's share of the whole
    prefill, then the whole model takes the prompt's last token as one decode step."""
    share = (layers + kv_predictor_layers(cost)) / cost.n_layers
    return prefill_ms(profile, cost, prompt_tokens) * share + decode_ms(profile, cost, prompt_tokens)


def decode_ms(profile: DeviceProfile, cost: ModelCost, context: float) -> float:
    """Memory-bound time of one decode step at `context` positions, floored by its compute time."""
    bytes_read = cost.weight_bytes_per_token + cost.kv_bytes_per_token * cost.keys_read(context) / cost.n_layers
    memory = _ms(bytes_read, profile.memory_bandwidth_gbs * 1e9 * profile.efficiency.decode)
    flops = _ms(cost.flops_per_token(round(context)), profile.compute_tflops * 1e12 * profile.efficiency.prefill)
    return max(memory, flops)


def link_ms(profile: DeviceProfile, bytes_in: float) -> float:
    """The profile's link before the first token: one round trip and `bytes_in` hub to device (the
    first token's trip back is inside the round trip)."""
    return profile.link.rtt_ms + _ms(8 * bytes_in, profile.link.downlink_mbps * 1e6)


def assemble(
    profile: DeviceProfile, link: float, prefill: float, decode: float, max_new_tokens: int, power_w: float
) -> Estimate:
    """The Estimate of a request whose link before the first token takes `link`, whose prefill takes
    `prefill` and each decode step `decode` (ms), on a device drawing `power_w` while computing."""
    ttft = link + prefill
    tpot = decode + _ms(8 * BYTES_PER_STREAMED_TOKEN, profile.link.uplink_mbps * 1e6)
    steps = max_new_tokens - 1  # the first token comes out of prefill
    energy = power_w * (prefill + steps * decode) / 1e3
    return Estimate(
        ttft_ms=ttft,
        tpot_ms=tpot,
        total_ms=ttft + steps * tpot,
        energy_j=energy,
        edge_energy_j=energy if profile.kind == "edge" else 0.0,
        prefill_ms=prefill,
        decode_ms=decode,
    )


def predict(
    profile: DeviceProfile,
    model_cost: ModelCost,
    prompt_tokens: int,
    max_new_tokens: int,
    context_bytes_in: float | None = None,
    kv_layers: int | None = None,
) -> Estimate:
    """Predict TTFT, TPOT, total time and energy of generating `max_new_tokens` after a prompt.

    `context_bytes_in` is the size of what the hub sends the device (prompt text); by default
    prompt_tokens x BYTES_PER_PROMPT_TOKEN. `kv_layers`: with KV prediction, the auxiliary model's
    layer count (kv_prefill_ms); None: the whole model prefills. Raises ValueError for prompt_tokens
    or max_new_tokens < 1 or negative context_bytes_in.
    """
    if prompt_tokens < 1 or max_new_tokens < 1:
        raise ValueError(f"prompt_tokens and max_new_tokens must be >= 1, got {prompt_tokens}, {max_new_tokens}")
    if context_bytes_in is None:
        context_bytes_in = prompt_tokens * BYTES_PER_PROMPT_TOKEN
    if context_bytes_in < 0:
        raise ValueError(f"context_bytes_in must be >= 0, got {context_bytes_in}")
    prefill = (
        prefill_ms(profile, model_cost, prompt_tokens)
        if kv_layers is None
        else kv_prefill_ms(profile, model_cost, prompt_tokens, kv_layers)
    )
    # Mean context over the decode steps: the prompt plus half the new tokens.
    decode = decode_ms(profile, model_cost, prompt_tokens + max_new_tokens / 2)
    link = link_ms(profile, context_bytes_in)
    return assemble(profile, link, prefill, decode, max_new_tokens, profile.power_active_w)


def fits(profile: DeviceProfile, model_cost: ModelCost, context_tokens: int) -> bool:
    """Whether the weights and a KV cache of `context_tokens` fit in the device's memory, leaving
    MEMORY_HEADROOM of it free."""
    return model_cost.memory_bytes(context_tokens) <= (1 - MEMORY_HEADROOM) * profile.memory_gb * 1e9
