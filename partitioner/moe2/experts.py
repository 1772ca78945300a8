"""MoE² data: the experts, a request's budget, the selection problem, and the subset's constraints.

An expert is a (device, model variant) pair; the cloud is one more expert. Its latency and edge
energy per request come from the calibrated cost model and live load (given here as data), its
quality from held-out text (mean bits per byte, lower is better).

Constraints of a subset S (both monotone nondecreasing in S, which the solver relies on: once S is
infeasible, so is every superset):

- latency(S): the slowest expert of S. The gate may send a request to any of them; with k > 1 a
  request waits for the slowest of its k, and some request's k may hold the slowest of S.
- energy(S): the most edge energy one request can spend: the sum of the k most energy-hungry experts
  of S that can ensemble (share a tokenizer: `objective.route` mixes only within the top expert's
  tokenizer), the largest such sum over tokenizers. With one tokenizer in S this is the sum of the
  k hungriest of S; with k = 1 it is the hungriest expert of S.

Units: milliseconds, joules, bits per byte. Subsets are tuples of indices into `Problem.experts`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from partitioner.moe2.objective import Objective

ExpertKind = Literal["edge", "cloud"]
CONSTRAINTS = ("energy_j", "latency_ms")
"""The budget's constraints, in the order a tie between binding constraints is broken."""


class SelectionError(ValueError):
    """No non-empty subset of the online experts meets the budget. `binding` names the constraint:
    "energy_j", "latency_ms", or "availability" (no expert is online)."""

    def __init__(self, message: str, binding: str) -> None:
        super().__init__(message)
        self.binding = binding


@dataclass(frozen=True)
class Expert:
    """One (device, model variant) pair that can answer a request."""

    id: str
    """Unique name in the fleet, e.g. "nano-1/smollm2-135m/int4"; ties between subsets break on it."""
    device: str
    """The device it runs on (an agent's id, or "cloud")."""
    model: str
    """The model's name in the registry, e.g. "smollm2-135m"."""
    variant: str
    """How the model is reduced: "fp32", "int8", "int4", "pruned-4", ..."""
    tokenizer: str
    """Tokenizer family: experts with the same one can ensemble (mix next-token distributions)."""
    kind: ExpertKind
    """"edge" or "cloud"."""
    latency_ms: float
    """Predicted latency of one request (calibrated cost model and live load)."""
    energy_j: float
    """Predicted edge energy of one request (0 for the cloud)."""
    quality: float
    """Mean bits per byte on held-out text: lower is better."""
    online: bool = True
    """Whether it can take requests now; offline experts are never selected."""

    def __post_init__(self) -> None:
        if self.kind not in ("edge", "cloud"):
            raise ValueError(f"expert {self.id!r}: kind must be 'edge' or 'cloud', got {self.kind!r}")
        for name in ("latency_ms", "energy_j", "quality"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"expert {self.id!r}: {name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class Budget:
    """What one request may spend, and how many experts answer it."""

    energy_j: float | None = None
    """Edge energy per request, J; None: unconstrained."""
    latency_ms: float | None = None
    """Latency per request, ms; None: unconstrained."""
    k: int = 1
    """Experts per request: the gate's top-k within the selected subset (k = 1 routes, k > 1 ensembles)."""

    def __post_init__(self) -> None:
        for name in CONSTRAINTS:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"budget {name} must be a finite number > 0 (or None: unconstrained), got {value!r}")
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"budget k must be an integer >= 1, got {self.k!r}")

    def limits(self) -> dict[str, float]:
        """The constraints that are set, by name."""
        return {name: v for name in CONSTRAINTS if (v := getattr(self, name)) is not None}


@dataclass(frozen=True, eq=False)
class Problem:
    """The fleet's experts and the objective over their subsets (index i of the objective is experts[i])."""

    experts: tuple[Expert, ...]
    """Every expert, online or not, in the objective's order."""
    objective: Objective
    """The set function to minimise (GatedObjective: the gate's calibration loss)."""
    version: int = 0
    """The fleet's version: bumped on every change (cost, online status), so cached selections expire."""

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("a problem needs at least one expert")
        ids = [e.id for e in self.experts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"expert ids must be unique, got {ids}")
        if self.objective.n_experts != len(self.experts):
            raise ValueError(f"the objective covers {self.objective.n_experts} experts, the problem has {len(ids)}")

    def index(self, expert_id: str) -> int:
        """Position of `expert_id`; raises KeyError for an unknown id."""
        for i, e in enumerate(self.experts):
            if e.id == expert_id:
                return i
        raise KeyError(f"no expert {expert_id!r} in the fleet")

    def with_expert(self, expert: Expert) -> Problem:
        """The problem with `expert` replacing the one of the same id (new costs, online status): the
        next version, so cached selections expire. Raises KeyError for an unknown id."""
        i = self.index(expert.id)
        experts = (*self.experts[:i], expert, *self.experts[i + 1 :])
        return replace(self, experts=experts, version=self.version + 1)

    def restricted(self, keep: Sequence[bool]) -> Problem:
        """The same problem with the experts where `keep` is false taken offline (the same version:
        a view for a policy, not a fleet change)."""
        experts = tuple(e if k else replace(e, online=False) for e, k in zip(self.experts, keep, strict=True))
        return replace(self, experts=experts)


# -- constraints of a subset ---------------------------------------------------------------------------


def latency_ms(experts: Sequence[Expert], subset: Sequence[int]) -> float:
    """The slowest expert of `subset` (non-empty)."""
    return max(experts[i].latency_ms for i in subset)


def energy_j(experts: Sequence[Expert], subset: Sequence[int], k: int) -> float:
    """One request's worst-case edge energy in `subset` (non-empty): over tokenizers, the largest sum
    of the k hungriest experts sharing it."""
    by_tokenizer: dict[str, list[float]] = {}
    for i in subset:
        by_tokenizer.setdefault(experts[i].tokenizer, []).append(experts[i].energy_j)
    return max(sum(sorted(group, reverse=True)[:k]) for group in by_tokenizer.values())


def fits(experts: Sequence[Expert], subset: Sequence[int], budget: Budget) -> bool:
    """Whether `subset` (non-empty) meets every set constraint of `budget`."""
    if budget.latency_ms is not None and latency_ms(experts, subset) > budget.latency_ms:
        return False
    return budget.energy_j is None or energy_j(experts, subset, budget.k) <= budget.energy_j


def refuse(experts: Sequence[Expert], budget: Budget) -> SelectionError:
    """The error for a budget no non-empty subset meets (no online expert meets it alone: the
    constraints are monotone, so a feasible subset's every member is feasible alone). Binding: a
    constraint no online expert meets alone (the one with the largest cheapest/limit ratio), else the
    worst-violated constraint of the expert closest to fitting (least largest value/limit ratio)."""
    online = [e for e in experts if e.online]
    if not online:
        return SelectionError("no expert subset fits: availability — no expert is online", "availability")
    limits = budget.limits()
    units = {"energy_j": "J", "latency_ms": "ms"}
    cheapest = {name: min(online, key=lambda e, n=name: (getattr(e, n), e.id)) for name in limits}
    alone = {name: getattr(e, name) / limits[name] for name, e in cheapest.items() if getattr(e, name) > limits[name]}
    if alone:
        binding = max(alone, key=lambda n: (alone[n], -CONSTRAINTS.index(n)))
        e = cheapest[binding]
        return SelectionError(
            f"no expert subset fits: {binding} — the cheapest online expert ({e.id}) needs "
            f"{getattr(e, binding):.4g} {units[binding]}, the budget is {limits[binding]:.4g} {units[binding]}",
            binding,
        )
    ratios = {e.id: {n: getattr(e, n) / v for n, v in limits.items()} for e in online}
    closest = min(online, key=lambda e: (max(ratios[e.id].values()), e.id))
    r = ratios[closest.id]
    binding = max(r, key=lambda n: (r[n], -CONSTRAINTS.index(n)))
    needs = ", ".join(f"{getattr(closest, n):.4g} {units[n]} (budget {v:.4g} {units[n]})" for n, v in limits.items())
    return SelectionError(
        f"no expert subset fits: {binding} — every online expert meets one budget but not both; the closest "
        f"({closest.id}) needs {needs}",
        binding,
    )
