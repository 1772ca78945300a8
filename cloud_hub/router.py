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

This module holds the policies and their result (`Choice`, `Scored`). The candidates they weigh are
cloud_hub.candidates'; the predictions and the budget test (`weigh`, `violations`) are
cloud_hub.estimates', shared with the MoE² router, ensembles and the request path.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass

from cloud_hub.candidates import Candidate
from cloud_hub.errors import BudgetUnsatisfiable
from cloud_hub.estimates import violations, weigh
from cloud_hub.prompt import RequestPrompt
from partitioner.cost import Estimate
from partitioner.split import PlanError
from tandem.types import Budget  # the SDK's own value: what the caller states is what the router reads

__all__ = [
    "Budget",
    "BudgetRouter",
    "Choice",
    "Router",
    "Scored",
]


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
