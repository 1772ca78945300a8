"""Plain types of the SDK."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_EXPERTS = 64
"""The most MoE² experts one request may mix (Budget.experts): the SDK, the hub and the OpenAI API hold it."""


@dataclass(frozen=True)
class Budget:
    """Limits one request must meet; 0 means no limit."""

    ttft_ms: float = 0.0
    """Longest acceptable time to first token."""
    tpot_ms: float = 0.0
    """Longest acceptable mean time per output token."""
    energy_j: float = 0.0
    """Most edge energy the request may spend."""
    best_effort: bool = False
    """Serve on the closest placement when none meets the budget (instead of BudgetUnsatisfiable)."""
    quality_floor: float = 0.0
    """The lowest measured greedy agreement with the unmodified model (0..1) accepted for a faster
    variant: with it, the hub may turn KV prediction or early layer skipping on where the unmodified
    model would miss the budget (Placement.kv_prediction, Placement.skip_ratio say so; the answer's
    skipped_layers which layers); 0 = the unmodified model only."""
    experts: int = 0
    """MoE² (a hub with router_policy "moe2"): how many experts answer together (k); 0 or 1 = one. With
    k > 1 the hub mixes the next-token distributions of the selected subset's top k experts sharing a
    tokenizer, step by step, with the gate's weights (Placement.experts names them)."""


@dataclass(frozen=True)
class EnrollmentToken:
    """A one-time enrollment token a hub issued (Client.create_enrollment_token)."""

    token: str
    """The secret a new device enrolls with, once (`tandem agent run --token`)."""
    expires_unix: float
    """When the hub stops accepting it (Unix time)."""


@dataclass(frozen=True)
class ExpertWeight:
    """One MoE² expert of the subset the hub selected for a request, and the gate's weight for it."""

    expert: str
    """Its id, "<device id, or cloud>/<model>/<quant>": a (device, model variant) pair."""
    weight: float
    """The gate's weight, renormalised over the selected subset (0..1)."""


@dataclass(frozen=True)
class Placement:
    """Where (part of) a request ran, and what the hub predicted for it."""

    kind: str
    device_id: str
    profile: str
    model: str
    emulated: bool = False
    predicted_ttft_ms: float = 0.0
    predicted_tpot_ms: float = 0.0
    predicted_energy_j: float = 0.0
    admitted_ttft_ms: float = 0.0
    """What admission held against the budget: the prediction times a high quantile of this device's
    measured/predicted ratios (0: admitted on the mean prediction)."""
    admitted_tpot_ms: float = 0.0
    quantile: float = 0.0
    """Which quantile admission used (the hub's setting); 0 when none was."""
    calibrated: bool = False
    """Predicted from the device's measured calibration rather than its profile's roofline."""
    layer_start: int = 0
    """A split's stage: the first layer it ran (both 0: the whole model)."""
    layer_end: int = 0
    """One past its last layer."""
    kv_prediction: float = 0.0
    """The hub turned KV prediction on here at this auxiliary depth (Budget.quality_floor); 0 = it did
    not (a request's own kv_prediction is not repeated here)."""
    skip_ratio: float = 0.0
    """The hub turned early layer skipping on here at this trained ratio (Budget.quality_floor; the
    answer's skipped_layers say which layers); 0 = it did not (a request's own skip_ratio is not
    repeated here)."""
    experts: tuple[ExpertWeight, ...] = ()
    """MoE² routing (a hub with router_policy "moe2"): the selected experts with the gate's weights
    renormalised over them, this placement's own expert first; empty under other policies."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (its raw distribution, before sampling
    settings), and the most likely tokens' at that position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) of the k most likely tokens, most likely first."""


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed answer."""

    text: str
    token_ids: tuple[int, ...] = ()
    index: int = 0
    """The choice it belongs to (generate's n)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """One a token of token_ids, when generate was asked for logprobs."""


@dataclass
class Choice:
    """One of several answers to the same prompt (generate's n)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""


@dataclass
class GenerateResult:
    text: str = ""
    finish_reason: str = ""
    placements: list[Placement] = field(default_factory=list)
    ttft_ms: float = 0.0
    """Measured at the hub: request arrival to first token."""
    tpot_ms: float = 0.0
    """Measured mean time between tokens after the first."""
    energy_j: float = 0.0
    """Edge energy: measured by a power sensor when energy_measured, else estimated from the profile."""
    energy_measured: bool = False
    prefill_ms: float = 0.0
    """The engine's prefill alone (no queueing, no network)."""
    decode_ms: float = 0.0
    """The engine's mean decode step alone."""
    queue_ms: float = 0.0
    """Time waiting for a slot on the device (and at the hub for it)."""
    engine_ttft_ms: float = 0.0
    """The serving engine's own time to first token; ttft_ms minus this is network and hub overhead."""
    engine_tpot_ms: float = 0.0
    """The serving engine's own mean time per token."""
    hub_route_ms: float = 0.0
    """Time in the hub before the work left it (authentication, validation, routing, dispatch)."""
    hub_relay_ms: float = 0.0
    """Time in the hub relaying tokens and the end of the answer, each from its arrival from the
    device to its hand-off to this stream, summed."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Choice 0's tokens' log-probabilities, when asked for (generate's logprobs=k)."""
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    """The prompt's tokens', teacher-forced (generate's prompt_logprobs=k; None for the first)."""
    choices: list[Choice] = field(default_factory=list)
    """Every choice by index, choice 0 included (text, token_ids and logprobs above are choice 0's)."""
    skipped_layers: list[int] = field(default_factory=list)
    """With generate's skip_ratio: the layers decode skipped, chosen for this prompt by the model's
    routers (in the lossless mode, the layers the drafts skipped); empty without layer skipping."""
    lossless: bool = False
    """The answer came from the lossless mode: drafted with those layers skipped, verified by the
    whole model, so its tokens are the whole model's."""
    drafted: int = 0
    """Lossless mode: tokens the skipping model drafted (speculation's cost)."""
    accepted: int = 0
    """Lossless mode: of those, tokens the whole model accepted (accepted / drafted: how well the
    skipping model predicts the whole one)."""
    kv_depth: float = 0.0
    """KV prediction: the auxiliary depth that prefilled the prompt (generate's kv_prediction, or the
    hub's choice under Budget.quality_floor: see the placement's kv_prediction); 0 = not predicted."""
    kv_predicted: int = 0
    """KV prediction: prompt slots whose cache was predicted (0: the prompt was too short, and the whole
    model prefilled it)."""
    kv_repaired_at: int | None = None
    """With kv_repair: generated tokens after which the cache was the whole model's; None: not
    repaired by the end (or no repair asked for)."""

    @property
    def placement(self) -> Placement | None:
        """The last placement used (the only one unless the request failed over)."""
        return self.placements[-1] if self.placements else None
