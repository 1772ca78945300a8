"""A request on the hub's path: its values, the rules it must meet, and its translations to the wire.

`GenerateSpec` is one request as both edges make it (the gRPC servicer and the OpenAI API), `Limits`
the hub's bounds on it, and `validate_request` the rules every request meets before it is routed.
`Started` and `Final` (with cloud_hub.progress's `Chunk`) are the events it is answered with.
`placement_of` and `split_placements` make the Placement messages that report a routing decision, and
`agent_work` the Work an agent runs. They are apart from `cloud_hub.service.HubService`, which places,
dispatches and fails over: what a request is and how it goes on the wire, beside the path that carries it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from cloud_hub.candidates import Candidate
from cloud_hub.errors import InvalidRequest
from cloud_hub.placements import Placements
from cloud_hub.progress import Chunk, Progress
from cloud_hub.prompt import RequestPrompt
from cloud_hub.ratelimit import RateLimiter
from cloud_hub.router import Choice
from models.sampling import SamplingParams
from partitioner.cost import Estimate
from partitioner.split import Plan
from tandem.types import MAX_EXPERTS, Budget
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import sampling_message


@dataclass(frozen=True)
class Limits:
    max_prompt_bytes: int = 64 * 1024
    """Largest prompt (text, or all chat contents together) the hub accepts."""
    max_tokens: int = 4096
    """Largest max_tokens a request may ask for."""
    max_n: int = 8
    """Most choices (n) one request may ask for."""
    token_ttl_s: float = 3600.0
    """Default lifetime of an enrollment token."""
    max_inflight: int = 512
    """Requests served at once (held at the hub for a device's slot included); beyond it the hub answers
    RESOURCE_EXHAUSTED (HTTP 429) at once, with a retry-after of 1 s."""
    rate_per_s: float = 0.0
    """Requests each API key may start per second (a token bucket per key); 0: no rate limit."""
    rate_burst: int = 0
    """Requests a key may start at once from a full bucket; 0: one second's worth (at least 1)."""

    def __post_init__(self) -> None:
        for name in ("max_prompt_bytes", "max_tokens", "max_n", "max_inflight", "rate_per_s", "rate_burst"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Limits.{name} must be a non-negative number, got {getattr(self, name)}")

    def rate_limiter(self) -> RateLimiter | None:
        """The per-key limiter these limits ask for (None: no rate limit)."""
        if self.rate_per_s == 0:
            return None
        return RateLimiter(self.rate_per_s, self.rate_burst or max(1.0, math.ceil(self.rate_per_s)))


@dataclass(frozen=True)
class GenerateSpec:
    prompt: RequestPrompt
    params: SamplingParams
    budget: Budget
    model: str = ""
    arrived: float = 0.0
    """time.perf_counter() when the request reached the hub (0: when generate() starts); the hub's own
    time counts from here, so that authenticating and parsing the request are in it."""
    device: str = ""
    """Run only on this device id ("cloud": the hub's own model), or on a pinned split plan
    ("split:DEVICE:END[,DEVICE:END…]", split_plans.pinned_split); empty: the router chooses."""


@dataclass(frozen=True)
class Final:
    finish_reason: str
    placements: tuple[pb.Placement, ...]
    metrics: pb.Metrics
    finish_reasons: tuple[str, ...] = ()
    """Each choice's, by index (one for n = 1: finish_reason)."""


@dataclass(frozen=True)
class Started:
    placements: tuple[pb.Placement, ...]
    """Every placement so far; the last is the one starting now."""


Event = Started | Chunk | Final


def validate_request(spec: GenerateSpec, limits: Limits, placements: Placements) -> None:
    """The hub's rules for every request, gRPC and HTTP alike (each edge has made its prompt
    UTF-8-clean and its ids uint32 already). Raises InvalidRequest with a message that starts with
    the field it refuses."""
    size = spec.prompt.size_bytes
    if size == 0:
        raise InvalidRequest("prompt: must not be empty")
    if size > limits.max_prompt_bytes:
        raise InvalidRequest(f"prompt: {size} bytes exceeds the hub's limit of {limits.max_prompt_bytes}")
    if spec.params.max_tokens < 1:
        raise InvalidRequest(f"max_tokens: must be at least 1, got {spec.params.max_tokens}")
    if spec.params.max_tokens > limits.max_tokens:
        raise InvalidRequest(f"max_tokens: {spec.params.max_tokens} exceeds the hub's limit of {limits.max_tokens}")
    if spec.params.n > limits.max_n:
        raise InvalidRequest(f"n: {spec.params.n} exceeds the hub's limit of {limits.max_n} choices")
    b = spec.budget
    for name in ("ttft_ms", "tpot_ms", "energy_j"):
        value = getattr(b, name)
        if not value >= 0:  # NaN too
            raise InvalidRequest(f"budget.{name}: budget values must be non-negative numbers (0 means no limit)")
    if not 0 <= b.quality_floor <= 1:  # NaN too
        raise InvalidRequest(
            f"budget.quality_floor: the lowest greedy agreement accepted, in [0, 1], got {b.quality_floor}"
        )
    if not 0 <= b.experts <= MAX_EXPERTS:
        raise InvalidRequest(
            f"budget.experts: how many MoE² experts answer together, 0..{MAX_EXPERTS}, got {b.experts}"
        )
    if spec.prompt.kind == "tokens":  # models() walks the fleet: not for every text request
        spec.prompt.check_vocabulary(spec.model, placements.models())


def placement_of(choice: Choice, params: SamplingParams) -> pb.Placement:
    """The Placement message of `choice` on one device or the hub's own model (not a split, not an
    ensemble): what the router predicted and admitted, and the variant and MoE² experts it chose."""
    c, est = choice.candidate, choice.estimate
    adm = choice.admitted or est
    return pb.Placement(
        kind=c.kind,
        device_id=c.device_id,
        profile=c.profile.name,
        model=c.model,
        emulated=c.emulated,
        predicted_ttft_ms=est.ttft_ms,
        predicted_tpot_ms=est.tpot_ms,
        predicted_energy_j=est.edge_energy_j,
        admitted_ttft_ms=adm.ttft_ms,
        admitted_tpot_ms=adm.tpot_ms,
        quantile=choice.quantile,
        calibrated=c.tracker is not None and c.tracker.calibration is not None,
        kv_prediction=c.kv.depth if c.kv is not None and not params.kv_prediction else 0.0,  # the hub's
        skip_ratio=c.skip.ratio if c.skip is not None and not params.skip_ratio else 0.0,  # the hub's
        experts=[pb.ExpertWeight(expert=e, weight=w) for e, w in choice.experts],  # MoE²: the selected subset
    )


def split_placements(c: Candidate, plan: Plan, est: Estimate, adm: Estimate, quantile: float) -> list[pb.Placement]:
    """One Placement per stage of the split `c` runs for this request (`plan`), each with its layer
    range and the plan's predicted and admitted figures (its pipeline's corrections applied)."""
    assert c.split is not None
    names = [d for d, _ in c.split.agents] + [""]
    return [
        pb.Placement(
            kind="split",
            device_id=names[i] if i < len(names) - 1 else "",
            profile=stage.profile.name,
            model=c.model,
            layer_start=stage.start,
            layer_end=stage.end,
            emulated=c.emulated and i == 0,
            predicted_ttft_ms=est.ttft_ms,
            predicted_tpot_ms=est.tpot_ms,
            predicted_energy_j=est.edge_energy_j,
            admitted_ttft_ms=adm.ttft_ms,
            admitted_tpot_ms=adm.tpot_ms,
            quantile=quantile,
            calibrated=bool(c.split.timings) and all(t is not None for t in c.split.timings),
        )
        for i, stage in enumerate(plan.stages)
    ]


def agent_work(spec: GenerateSpec, model: str, p: SamplingParams, progress: Progress) -> pb.Work:
    """The Work an agent runs for `spec` on `model` with sampling `p`, going on from `progress`."""
    sampling = sampling_message(**vars(p))
    return pb.Work(
        work_id=os.urandom(16).hex(),  # random like a uuid4, a few times cheaper
        model=model,
        input=spec.prompt.wire,  # as the caller sent it (the OpenAI API made it once from JSON)
        sampling=sampling,
        continue_ids=progress.ids,
        continue_chars=progress.chars,
    )
