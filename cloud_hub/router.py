"""Routing: choose where a request runs within its budget.

`Router` is the plug-in point (one method); `BudgetRouter` is the first policy. For every
candidate placement (an online edge device x a model it serves, or the cloud backend) it predicts
TTFT, time per token and edge energy with the partitioner's cost model, scaled by the device's
queue (a busy device is slower by the requests ahead of it). Among placements that meet the budget
it prefers the edge (the cloud costs the operator money), and there the least edge energy, then
the lowest latency; the cloud serves when no edge placement fits. When nothing fits, the error
names the constraint that rules out the placement closest to fitting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from cloud_hub.errors import BudgetUnsatisfiable
from device_profiles import DeviceProfile
from partitioner.cost import Estimate, ModelCost, predict
from tandem.types import Budget  # the SDK's own value: what the caller states is what the router reads

__all__ = ["Budget", "BudgetRouter", "Candidate", "Choice", "Router", "queued_estimate"]


@dataclass(frozen=True)
class Candidate:
    kind: str
    """"edge" or "cloud"."""
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


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    estimate: Estimate
    within_budget: bool


class Router(ABC):
    @abstractmethod
    def choose(self, candidates: list[Candidate], prompt_tokens: int, max_tokens: int, budget: Budget) -> Choice:
        """The placement for one request. Raises BudgetUnsatisfiable when none meets the budget."""


def _violations(est: Estimate, budget: Budget) -> dict[str, float]:
    """Constraint name -> how far over budget, as a ratio (>1 means violated)."""
    pairs = {
        "ttft_ms": (est.ttft_ms, budget.ttft_ms),
        "tpot_ms": (est.tpot_ms, budget.tpot_ms),
        "energy_j": (est.edge_energy_j, budget.energy_j),
    }
    return {name: value / limit for name, (value, limit) in pairs.items() if limit > 0}


def queued_estimate(est: Estimate, queued: int) -> Estimate:
    """A device running one request at a time makes the next wait for those ahead of it."""
    if queued <= 0:
        return est
    wait = est.total_ms * queued
    return type(est)(**{**est.__dict__, "ttft_ms": est.ttft_ms + wait, "total_ms": est.total_ms + wait})


class BudgetRouter(Router):
    def choose(self, candidates: list[Candidate], prompt_tokens: int, max_tokens: int, budget: Budget) -> Choice:
        if not candidates:
            raise BudgetUnsatisfiable("no device is online and the hub has no cloud model", binding="availability")
        # Candidates alike in kind, device class, model and queue get the same estimate: a fleet of
        # like devices needs one prediction, not one per device (the cost model is most of routing's
        # time). Keyed by identity, which is stable while `candidates` holds them; equal copies miss.
        memo: dict[tuple[int, int, int, str], tuple[Estimate, dict[str, float], bool, tuple]] = {}
        scored = []
        best = None  # (rank, candidate, estimate) of the best that fits; the first of equals wins
        for c in candidates:
            key = (id(c.profile), id(c.cost), c.queued, c.kind)
            hit = memo.get(key)
            if hit is None:
                est = queued_estimate(predict(c.profile, c.cost, prompt_tokens, max_tokens), c.queued)
                v = _violations(est, budget)
                rank = (c.kind != "edge", est.edge_energy_j, est.total_ms)
                hit = memo[key] = (est, v, all(r <= 1.0 for r in v.values()), rank)
            est, v, fits, rank = hit
            scored.append((c, est, v))
            if fits and (best is None or rank < best[0]):
                best = (rank, c, est)
        if best is not None:
            return Choice(best[1], best[2], True)
        c, est, v = min(scored, key=lambda s: max(s[2].values()))
        binding = max(v, key=v.get)
        if budget.best_effort:
            return Choice(c, est, False)
        value = {"ttft_ms": est.ttft_ms, "tpot_ms": est.tpot_ms, "energy_j": est.edge_energy_j}[binding]
        limit = {"ttft_ms": budget.ttft_ms, "tpot_ms": budget.tpot_ms, "energy_j": budget.energy_j}[binding]
        where = c.device_id or "the cloud"
        raise BudgetUnsatisfiable(
            f"no placement meets the budget: binding constraint {binding} — the closest placement ({c.model} on "
            f"{where}, {c.profile.name}) predicts {binding} = {value:.1f} against a budget of {limit:.1f}",
            binding=binding,
        )
