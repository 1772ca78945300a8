"""Routing: choose where a request runs within its budget.

`Router` is the plug-in point (one method); `BudgetRouter` is the first policy. For every
candidate placement (an online edge device x a model it serves, or the cloud backend) it predicts
TTFT, time per token and edge energy with the partitioner's cost model, scaled by the device's
queue (a busy device is slower by the requests ahead of it). A candidate with a `Tracker`
(cloud_hub.calibrations) is predicted from its device's calibration and online corrections
(partitioner.predict), and admitted on a high quantile of that device's measured-over-predicted
ratios rather than on the mean: the prediction times `Tracker.multipliers(quantile)` must fit the
budget. One without is predicted by the profile's roofline and admitted on it. Among placements that meet the budget
it prefers the edge (the cloud costs the operator money), and there the least edge energy, then
the lowest latency; the cloud serves when no edge placement fits. When nothing fits, the error
names the constraint that rules out the placement closest to fitting.

KV prediction (models.kvpred) is a faster, slightly different variant of a model: a candidate with
`kv` set runs with it, its TTFT predicted from the auxiliary layers' prefill (partitioner.predict's
`kv_layers`). A request naming a depth reaches the router as such candidates only (cloud_hub.service).
A budget with a `quality_floor` lets the router weigh, beside each edge candidate, the same one with
its fastest variant whose measured agreement meets the floor; within a kind it ranks after every
unmodified placement that fits, so a variant serves only where the unmodified model would miss.

Early layer skipping (models.skip) is weighed the same way: with a `quality_floor`, beside each edge
candidate (not an emulated one: it paces decode to its profile's whole-model step), the same one with
each trained skip ratio whose measured agreement meets the floor (`skip` set: its decode step
predicted for the layers that run, partitioner.predict's `skip_layers`; its prefill runs them all).
Among variants that fit, KV prediction ranks first, then skipping the fewest layers.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from cloud_hub.calibrations import Tracker
from cloud_hub.errors import BudgetUnsatisfiable
from cloud_hub.prompt import RequestPrompt
from device_profiles import DeviceProfile, LinkSpec
from partitioner import predict as calibrated
from partitioner.cost import Estimate, ModelCost, predict
from partitioner.split import TOKEN_ID_BYTES, Plan, PlanError, Timings, evaluate, single_cut, transfer_ms
from tandem.types import Budget  # the SDK's own value: what the caller states is what the router reads

__all__ = [
    "Budget",
    "BudgetRouter",
    "Candidate",
    "Choice",
    "KVOption",
    "Router",
    "Scored",
    "SkipOption",
    "queued_estimate",
    "violations",
    "weigh",
]


@dataclass(frozen=True)
class KVOption:
    """A KV-prediction variant a candidate's model serves (ModelInfo.kv_variants; models.kvpred.KVVariant
    on the device): the hub's plain copy of what it costs and how close it stays."""

    depth: float
    """The auxiliary model's share of the layers (Sampling.kv_prediction)."""
    aux_layers: tuple[int, ...]
    """The base's layers the auxiliary model keeps: its prefill runs through these alone."""
    agreement: float
    """Greedy agreement with the unmodified model on held-out text, 0..1 (Budget.quality_floor)."""
    bpb_ratio: float = 1.0
    """Bits per byte relative to the unmodified model."""
    prefill_share: float = 1.0
    """The auxiliary prefill's measured cost as a share of the whole model's (where it was trained)."""


@dataclass(frozen=True)
class SkipOption:
    """A layer-skipping variant a candidate's model serves (ModelInfo.skip_variants; models.skip.SkipVariant
    on the device): the hub's plain copy of what it saves and how close it stays."""

    ratio: float
    """The trained skip ratio (Sampling.skip_ratio)."""
    layers: int
    """Layers decode skips at that ratio."""
    agreement: float
    """Greedy agreement with the unmodified model on held-out text, 0..1 (Budget.quality_floor)."""


@dataclass(frozen=True)
class SplitSpec:
    """A split placement: agents' stages in pipeline order, then the hub's own model."""

    agents: tuple[tuple[str, DeviceProfile], ...]
    """(device id, profile) of each agent stage, the first embedding the prompt."""
    cloud: DeviceProfile
    """The hub's hardware, which runs the last layers and the head."""
    cuts: tuple[int, ...] = ()
    """Pinned boundaries, one per agent (agent i ends at cuts[i]); empty: the partitioner's single cut."""
    timings: tuple[Timings | None, ...] = ()
    """Per agent, then the cloud: measured per-block times (partitioner.predict.stage_parts); None or
    empty: the profile's roofline."""
    links: tuple[LinkSpec, ...] = ()
    """Per agent, its link to the hub as measured (the work channel's round trips); empty: its profile's."""


@dataclass(frozen=True)
class Candidate:
    kind: str
    """One of "edge", "cloud" or "split"."""
    device_id: str
    """Empty for the cloud."""
    profile: DeviceProfile
    """The device class, for the cost model."""
    model: str
    """Zoo name of the model it would run."""
    cost: ModelCost
    """Per-token cost of that model."""
    queued: int = 0
    """Requests already running or waiting there."""
    emulated: bool = False
    """The device is paced to its profile."""
    tracker: Tracker | None = None
    """The device's calibration and measured corrections (None: the profile's roofline alone)."""
    chat_tokens: int = 0
    """Tokens its model's chat template adds (ModelInfo.chat_template_tokens); 0: unknown, the hub's
    default (cloud_hub.prompt.CHAT_TEMPLATE_TOKENS) stands."""
    split: SplitSpec | None = None
    """A split placement's stages (kind "split")."""
    skip_ratios: tuple[float, ...] = ()
    """The skip ratios its model's layer-skipping routers were trained for (ModelInfo.skip_ratios);
    empty: it cannot serve a request with a skip_ratio."""
    kv_variants: tuple[KVOption, ...] = ()
    """The KV-prediction variants its model serves (ModelInfo.kv_variants); empty: none."""
    kv: KVOption | None = None
    """Run with KV prediction at this variant (one of kv_variants); None: the unmodified model."""
    skip_variants: tuple[SkipOption, ...] = ()
    """The layer-skipping variants its model serves, measured (ModelInfo.skip_variants); empty: none."""
    skip: SkipOption | None = None
    """Run with layer skipping at this variant (one of skip_variants), as the router chose it; None: not."""
    quant: str = ""
    """The precision its model is served at (ModelInfo.quant); empty: unknown. The MoE² router maps
    (model, quant) to the gate's expert variant (partitioner.moe2.table)."""


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    estimate: Estimate
    """The prediction (mean), queue included."""
    within_budget: bool
    admitted: Estimate | None = None
    """What admission compared with the budget: the prediction scaled by the quantiles (None: the
    estimate itself)."""
    quantile: float = 0.0
    """The quantile of measured/predicted ratios admission used (0: none, the mean prediction)."""
    considered: tuple[Scored, ...] = ()
    """Every candidate the router weighed, for the fleet page's account of the decision."""
    experts: tuple[tuple[str, float], ...] = ()
    """MoE² (cloud_hub.moe2_router): the selected experts' ids with the gate's weights renormalised
    over them, the answering one (`candidate`) first; empty for other policies."""
    ensemble: tuple[tuple[Candidate, float], ...] = ()
    """MoE² with Budget.experts = k > 1: the k (or fewer) candidates whose next-token distributions
    are mixed step by step, with their mixing weights (summing to 1), `candidate` first; empty: the
    request runs on `candidate` alone."""


Scored = tuple[Candidate, Estimate, Estimate, dict[str, float]]
"""(candidate, mean estimate, admitted estimate, constraint -> ratio to its limit) as the router weighed it."""


class Router(ABC):
    @abstractmethod
    def choose(
        self,
        candidates: list[Candidate],
        prompt_tokens: int,
        max_tokens: int,
        budget: Budget,
        template_tokens: int = 0,
        prompt: RequestPrompt | None = None,
    ) -> Choice:
        """The placement for one request. Raises BudgetUnsatisfiable when none meets the budget.
        `template_tokens`: the chat template's tokens counted in prompt_tokens by default, which a
        candidate knowing its own (Candidate.chat_tokens) replaces with those. `prompt`: the request's
        prompt, for a router that reads it (MoE²'s per-prompt gate); None where unknown."""

    def prepare(self, prompt: RequestPrompt) -> None:  # noqa: B027 (a hook: most routers need none)
        """Work on `prompt` that `choose` will need, done before it in a worker thread (the hub calls
        it only where a router overrides it): a forward pass must not hold the hub's event loop."""


def violations(est: Estimate, budget: Budget) -> dict[str, float]:
    """Constraint name -> how far over budget, as a ratio (>1 means violated)."""
    pairs = {
        "ttft_ms": (est.ttft_ms, budget.ttft_ms),
        "tpot_ms": (est.tpot_ms, budget.tpot_ms),
        "energy_j": (est.edge_energy_j, budget.energy_j),
    }
    return {name: value / limit for name, (value, limit) in pairs.items() if limit > 0}


def _relayed(a: LinkSpec, b: LinkSpec) -> LinkSpec:
    """Agent a to agent b through the hub (which relays between stages): both round trips, the
    slower of a's uplink and b's downlink each way."""
    return LinkSpec(a.rtt_ms + b.rtt_ms, min(a.uplink_mbps, b.downlink_mbps), min(b.uplink_mbps, a.downlink_mbps))


@functools.lru_cache(maxsize=1024)
def split_plan(spec: SplitSpec, cost: ModelCost, prompt_tokens: int, max_tokens: int) -> Plan:
    """The plan a split candidate runs for this request: its pinned cuts, or the partitioner's
    interior single cut of least TTFT (partitioner.split). Raises PlanError (binding "memory") when
    no cut fits, ValueError for pinned cuts that are not a plan."""
    profiles = [p for _, p in spec.agents]
    own = spec.links or tuple(p.link for p in profiles)
    links = [_relayed(a, b) for a, b in itertools.pairwise(own)] + [own[-1]]
    devices = [*spec.agents, ("cloud", spec.cloud)]
    names = [d for d, _ in devices]
    timings = {n: t for n, t in zip(names, spec.timings, strict=True) if t is not None} if spec.timings else {}
    cuts = spec.cuts
    if not cuts:
        pair = {k: timings[n] for k, n in (("edge", names[0]), ("cloud", "cloud")) if n in timings}
        cuts = single_cut(
            profiles[0], spec.cloud, cost, prompt_tokens, max_tokens, link=links[0], interior=True, timings=pair
        ).cuts
    return evaluate(devices, links, cost, prompt_tokens, max_tokens, cuts, timings=timings)  # stages by device id


def split_estimate(spec: SplitSpec, cost: ModelCost, prompt_tokens: int, max_tokens: int) -> Estimate:
    """A split's prediction from its plan alone (no online correction). Raises PlanError for a split
    that fits nowhere."""
    plan = split_plan(spec, cost, prompt_tokens, max_tokens)
    first = spec.links[0] if spec.links else spec.agents[0][1].link
    # the plan starts at its first device; the prompt's ids go there from the hub first
    ttft = plan.ttft_ms + transfer_ms(first, prompt_tokens * TOKEN_ID_BYTES, "down")
    total = ttft + (max_tokens - 1) * plan.tpot_ms
    return Estimate(ttft, plan.tpot_ms, total, plan.edge_energy_j, plan.edge_energy_j, ttft, plan.tpot_ms)


def estimate(c: Candidate, prompt_tokens: int, max_tokens: int) -> Estimate:
    """The mean prediction for `c`, before its queue. Raises PlanError for a split that fits nowhere."""
    if c.split is not None:
        est = split_estimate(c.split, c.cost, prompt_tokens, max_tokens)
        if c.tracker is None:
            return est
        # the pipeline's own corrections (calibrations.Tracker.observe_split): TTFT and step as a whole
        ttft, tpot = c.tracker.prefill.correct(est.ttft_ms), c.tracker.decode.correct(est.tpot_ms)
        total = ttft + (max_tokens - 1) * tpot
        return Estimate(ttft, tpot, total, est.energy_j, est.edge_energy_j, ttft, tpot)
    t, kv_layers = c.tracker, len(c.kv.aux_layers) if c.kv is not None else None
    skip_layers = c.skip.layers if c.skip is not None else None
    if t is None and skip_layers is None:
        return predict(c.profile, c.cost, prompt_tokens, max_tokens, kv_layers=kv_layers)
    if t is None:  # the roofline too: partitioner.predict without a calibration or corrections is it
        return calibrated.predict(
            c.profile, c.cost, prompt_tokens, max_tokens, kv_layers=kv_layers, skip_layers=skip_layers
        )
    return calibrated.predict(
        c.profile,
        c.cost,
        prompt_tokens,
        max_tokens,
        t.calibration,
        t.corrections(),
        c.emulated,
        kv_layers=kv_layers,
        skip_layers=skip_layers,
    )


def with_kv_variants(candidates: list[Candidate], quality_floor: float) -> list[Candidate]:
    """`candidates`, each edge one followed by itself with its fastest KV-prediction variant (fewest
    auxiliary layers) whose agreement meets `quality_floor`, where it has one; 0: unchanged."""
    if quality_floor <= 0:
        return candidates
    out = []
    for c in candidates:
        out.append(c)
        able = [v for v in c.kv_variants if v.agreement >= quality_floor] if c.kind == "edge" and c.kv is None else []
        if able:
            out.append(dataclasses.replace(c, kv=min(able, key=lambda v: (len(v.aux_layers), v.depth))))
    return out


def with_skip_variants(candidates: list[Candidate], quality_floor: float) -> list[Candidate]:
    """`candidates`, each edge one that is not emulated and runs no other variant followed by itself
    with each of its layer-skipping variants whose agreement meets `quality_floor` (fewest layers
    first; empty `skip_variants`: none); 0: unchanged."""
    if quality_floor <= 0:
        return candidates
    out = []
    for c in candidates:
        out.append(c)
        if c.kind != "edge" or c.emulated or c.kv is not None or c.skip is not None:
            continue
        able = [v for v in c.skip_variants if v.layers > 0 and v.agreement >= quality_floor]
        able.sort(key=lambda v: (v.layers, v.ratio))
        out.extend(dataclasses.replace(c, skip=v) for v in able)
    return out


def admitted_estimate(est: Estimate, multipliers: tuple[float, float], steps: int) -> Estimate:
    """`est` (queue-free) scaled for admission: TTFT by the first multiplier, each token after it by
    the second, energy by the time-weighted mix of both."""
    m_ttft, m_tpot = multipliers
    busy = est.prefill_ms + steps * est.decode_ms
    scale = (est.prefill_ms * m_ttft + steps * est.decode_ms * m_tpot) / busy if busy > 0 else m_ttft
    ttft, tpot = est.ttft_ms * m_ttft, est.tpot_ms * m_tpot
    return type(est)(
        **{
            **est.__dict__,
            "ttft_ms": ttft,
            "tpot_ms": tpot,
            "total_ms": ttft + steps * tpot,
            "energy_j": est.energy_j * scale,
            "edge_energy_j": est.edge_energy_j * scale,
        }
    )


def queued_estimate(est: Estimate, queued: int) -> Estimate:
    """A device running one request at a time makes the next wait for those ahead of it."""
    if queued <= 0:
        return est
    wait = est.total_ms * queued
    return type(est)(**{**est.__dict__, "ttft_ms": est.ttft_ms + wait, "total_ms": est.total_ms + wait})


def weigh(
    c: Candidate, prompt_tokens: int, max_tokens: int, template_tokens: int, quantile: float
) -> tuple[Estimate, Estimate]:
    """(mean, admitted) predictions for `c`, its queue included: what every policy holds against a
    budget. The mean is the cost model's (calibrated where `c` has a tracker); the admitted one scales
    it by the tracker's `quantile` of measured/predicted ratios (no tracker: the mean itself). The
    chat template's `template_tokens` in prompt_tokens are replaced by the candidate's own count where
    it knows it. Raises PlanError for a split that fits nowhere."""
    tokens = prompt_tokens - template_tokens + c.chat_tokens if template_tokens and c.chat_tokens else prompt_tokens
    alone = estimate(c, max(1, tokens), max_tokens)
    est = queued_estimate(alone, c.queued)
    if c.tracker is None:
        return est, est
    return est, queued_estimate(admitted_estimate(alone, c.tracker.multipliers(quantile), max_tokens - 1), c.queued)


_KIND_RANK = {"edge": 0, "split": 1, "cloud": 2}
"""The router's first preference: the edge alone, then a split (part of the work in the cloud), then
the cloud alone (the cloud costs the operator money)."""
_NOWHERE = Estimate(float("inf"), float("inf"), float("inf"), 0.0, 0.0, 0.0, 0.0)
"""What a split that fits in no memory is weighed at."""


class BudgetRouter(Router):
    def __init__(self, quantile: float = 0.95) -> None:
        if not 0.5 <= quantile < 1:
            raise ValueError(f"the admission quantile must be in [0.5, 1), got {quantile}")
        self.quantile = quantile
        """Which quantile of measured/predicted ratios admission multiplies predictions by (HubConfig)."""

    def choose(
        self,
        candidates: list[Candidate],
        prompt_tokens: int,
        max_tokens: int,
        budget: Budget,
        template_tokens: int = 0,
        prompt: RequestPrompt | None = None,
    ) -> Choice:
        if not candidates:
            raise BudgetUnsatisfiable("no device is online and the hub has no cloud model", binding="availability")
        # Candidates alike in kind, device class, model and queue get the same estimate: a fleet of
        # like devices needs one prediction, not one per device (the cost model is most of routing's
        # time). Keyed by identity, which is stable while `candidates` holds them; equal copies miss.
        memo: dict[tuple, tuple] = {}
        scored: list[Scored] = []
        best = None  # (rank, candidate, estimate, admitted) of the best that fits; the first of equals wins
        for c in with_skip_variants(with_kv_variants(candidates, budget.quality_floor), budget.quality_floor):
            key = (
                id(c.profile),
                id(c.cost),
                c.queued,
                c.kind,
                id(c.tracker),
                c.emulated,
                c.chat_tokens,
                id(c.split),
                c.kv,
                c.skip,
            )
            hit = memo.get(key)
            if hit is None:
                try:
                    est, adm = weigh(c, prompt_tokens, max_tokens, template_tokens, self.quantile)
                except PlanError as exc:  # a split whose stages hold the model nowhere: ruled out by it
                    hit = memo[key] = (None, None, {exc.binding: float("inf")}, False, ())
                    scored.append((c, _NOWHERE, _NOWHERE, hit[2]))
                    continue
                v = violations(adm, budget)
                # a variant (KV prediction, then skipping the fewest layers) only after every unmodified
                # placement of its kind that fits
                modified = c.kv is not None or c.skip is not None
                skipped = c.skip.layers if c.skip is not None else 0
                rank = (_KIND_RANK.get(c.kind, 2), modified, skipped, est.edge_energy_j, est.total_ms)
                hit = memo[key] = (est, adm, v, all(r <= 1.0 for r in v.values()), rank)
            est, adm, v, fits, rank = hit
            if est is None:  # a split that fits nowhere, met again in this loop
                scored.append((c, _NOWHERE, _NOWHERE, v))
                continue
            scored.append((c, est, adm, v))
            if fits and (best is None or rank < best[0]):
                best = (rank, c, est, adm)
        if best is not None:
            return self._choice(best[1], best[2], best[3], True, scored)
        c, est, adm, v = min(scored, key=lambda s: max(s[3].values()))
        binding = max(v, key=v.get)
        if budget.best_effort:
            return self._choice(c, est, adm, False, scored)
        if binding == "memory":
            exc = BudgetUnsatisfiable(
                f"no placement fits: binding constraint memory — the closest placement ({c.model} split over "
                f"{c.device_id} and the cloud) fits in no device's memory",
                binding=binding,
            )
            exc.considered = tuple(scored)
            raise exc
        value = {"ttft_ms": adm.ttft_ms, "tpot_ms": adm.tpot_ms, "energy_j": adm.edge_energy_j}[binding]
        limit = {"ttft_ms": budget.ttft_ms, "tpot_ms": budget.tpot_ms, "energy_j": budget.energy_j}[binding]
        where = f"a split over {c.device_id} and the cloud" if c.split is not None else c.device_id or "the cloud"
        where += f" with KV prediction at depth {c.kv.depth:g}" if c.kv is not None else ""
        where += f" skipping {c.skip.layers} layers (ratio {c.skip.ratio:g})" if c.skip is not None else ""
        how = f"at the {self.quantile:g} quantile of its measured/predicted ratios " if c.tracker is not None else ""
        exc = BudgetUnsatisfiable(
            f"no placement meets the budget: binding constraint {binding} — the closest placement ({c.model} on "
            f"{where}, {c.profile.name}) predicts {binding} = {value:.1f} {how}against a budget of {limit:.1f}",
            binding=binding,
        )
        exc.considered = tuple(scored)  # the hub's journal shows what ruled each one out
        exc.quantile = self.quantile if any(s[0].tracker is not None for s in scored) else 0.0
        raise exc

    def _choice(self, c: Candidate, est: Estimate, adm: Estimate, fits: bool, scored: list[Scored]) -> Choice:
        if c.tracker is None:
            return Choice(c, est, fits, considered=tuple(scored))
        return Choice(c, est, fits, adm, self.quantile, tuple(scored))
