"""What a candidate placement is predicted to cost, and how that stands against a budget.

`estimate` is the cost model's mean prediction for one candidate (calibrated where it has a
`Tracker`; a split's from its plan, `split_plan`), `queued_estimate` adds the requests ahead of it,
`admitted_estimate` scales it by a quantile of measured-over-predicted ratios, and `weigh` combines
them into what every routing policy holds against a budget (`violations`). They are apart from the
router classes (cloud_hub.router) because the MoE² router, ensembles, the request path and the fleet
page predict with them too.
"""

from __future__ import annotations

import functools
import itertools

from cloud_hub.candidates import Candidate, SplitSpec
from device_profiles import LinkSpec
from partitioner import predict as calibrated
from partitioner.cost import Estimate, ModelCost, predict
from partitioner.split import TOKEN_ID_BYTES, Plan, evaluate, single_cut, transfer_ms
from tandem.types import Budget

__all__ = [
    "admitted_estimate",
    "estimate",
    "queued_estimate",
    "split_estimate",
    "split_plan",
    "violations",
    "weigh",
]


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
