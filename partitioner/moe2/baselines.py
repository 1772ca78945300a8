"""MoE² and the baselines it is measured against, each a `Policy` (registry.py names them).

Every policy returns a selection that meets the budget in the worst case per request (experts.py's
constraints) or raises SelectionError naming the binding constraint; its objective is the gated
objective of its subset at the budget's k (the threshold router: the calibration loss of its own
routing). None can beat MoE²'s exact optimum: each returns a feasible subset (or, the threshold
router, a singleton's routing), which `select` considers too.
"""

from __future__ import annotations

import random

import numpy as np

from partitioner.moe2.experts import Budget, Problem, fits
from partitioner.moe2.objective import GatedObjective
from partitioner.moe2.policy import Policy
from partitioner.moe2.select import Selection, candidates, select, selection

MIN_ENERGY_J = 1e-9
"""Energy a zero-energy expert (the cloud) counts as in greedy's gain per joule."""


class MoE2(Policy):
    """The exact subset (select.select)."""

    def choose(self, problem: Problem, budget: Budget) -> Selection:
        return select(problem, budget)


class BestSingle(Policy):
    """The single expert with the best objective among those within budget (ties: id)."""

    def choose(self, problem: Problem, budget: Budget) -> Selection:
        cands = candidates(problem, budget)
        values = {i: problem.objective.value((i,), budget.k) for i in cands}
        best = min(cands, key=lambda i: (values[i], problem.experts[i].id))
        return selection(problem, (best,), budget.k, len(cands), values[best])


class Greedy(Policy):
    """Greedy by quality per joule: add the expert with the largest objective gain per joule of its
    energy while the subset stays within budget and the gain is positive. The first expert's gain is
    measured from the worst single candidate."""

    def choose(self, problem: Problem, budget: Budget) -> Selection:
        cands, k, es = candidates(problem, budget), budget.k, problem.experts
        current = max(problem.objective.value((i,), k) for i in cands)
        subset: list[int] = []
        evaluated = len(cands)
        while True:
            scored = []
            for x in cands:
                if x in subset or not fits(es, (*subset, x), budget):
                    continue
                v = problem.objective.value((*subset, x), k)
                evaluated += 1
                gain = current - v
                scored.append((gain / max(es[x].energy_j, MIN_ENERGY_J), gain, es[x].id, x, v))
            if not scored:
                break
            _, gain, _, x, v = min(scored, key=lambda s: (-s[0], -s[1], s[2]))  # best ratio, gain, then id
            if subset and gain <= 0:
                break
            subset.append(x)
            current = v
        return selection(problem, subset, k, evaluated, current)


class RandomSubset(Policy):
    """A random feasible subset: the candidates in a seeded random order, each kept with probability
    1/2 when it fits with those kept; the first candidate when none is kept."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        """Seeds the order and the coin flips: the same seed, the same subset."""

    def choose(self, problem: Problem, budget: Budget) -> Selection:
        rng = random.Random(self.seed)
        order = candidates(problem, budget)
        rng.shuffle(order)
        subset: list[int] = []
        for x in order:
            if rng.random() < 0.5 and fits(problem.experts, (*subset, x), budget):
                subset.append(x)
        return selection(problem, subset or order[:1], budget.k, 1)


class EdgeOnly(Policy):
    """The exact subset among the edge experts (select with the cloud taken offline)."""

    def choose(self, problem: Problem, budget: Budget) -> Selection:
        return select(problem.restricted([e.kind == "edge" for e in problem.experts]), budget)


class CloudOnly(Policy):
    """The exact subset among the cloud experts (usually the one cloud expert)."""

    def choose(self, problem: Problem, budget: Budget) -> Selection:
        return select(problem.restricted([e.kind == "cloud" for e in problem.experts]), budget)


class Threshold(Policy):
    """A two-model router in the style of RouteLLM: one edge expert and the cloud expert (the best by
    quality that fit alone); a request goes to the cloud when its gate weight for the cloud exceeds
    a threshold t, chosen as the lowest that meets the budget on every calibration request (each
    request spends its own expert's cost). Of the edge experts, the one whose routing has the least
    calibration loss. With per-expert costs and per-request budgets a routed request fits exactly
    when its expert does, so the lowest threshold sends everything to the cloud when the cloud fits,
    and nothing when it does not: the router reduces to "the cloud if it fits, else an edge expert".
    Needs a GatedObjective (TypeError otherwise)."""

    def choose(self, problem: Problem, budget: Budget) -> Selection:
        obj = problem.objective
        if not isinstance(obj, GatedObjective):
            raise TypeError("the threshold router needs the gate's weights: a GatedObjective")
        cands, es = candidates(problem, budget), problem.experts
        clouds = [i for i in cands if es[i].kind == "cloud"]
        edges = [i for i in cands if es[i].kind == "edge"] or [None]
        best = None
        for e in edges:
            routed = self._route(problem, budget, e, clouds[0] if clouds else None)
            if best is None or (routed.objective, routed.subset) < (best.objective, best.subset):
                best = routed
        return best

    @staticmethod
    def _route(problem: Problem, budget: Budget, edge: int | None, cloud: int | None) -> Selection:
        """The lowest feasible threshold for (edge, cloud), and its routing as a Selection."""
        obj: GatedObjective = problem.objective  # type: ignore[assignment]
        if cloud is None or edge is None:
            only = edge if cloud is None else cloud
            return _routed(problem, budget, edge, cloud, np.full(obj.n_requests, only == cloud), only == cloud)
        w = obj.weights[:, cloud]
        for t in (-np.inf, *np.unique(w)):  # ascending: the lowest threshold that fits wins
            to_cloud = w > t
            used = (cloud,) * bool(to_cloud.any()) + (edge,) * bool((~to_cloud).any())
            if fits(problem.experts, used, Budget(budget.energy_j, budget.latency_ms, 1)):
                return _routed(problem, budget, edge, cloud, to_cloud, t)
        raise AssertionError("unreachable: the largest threshold routes to the edge expert alone, which fits")


def _routed(
    problem: Problem, budget: Budget, edge: int | None, cloud: int | None, to_cloud: np.ndarray, t: float | bool
) -> Selection:
    """The Selection of a threshold routing: the experts used, the calibration loss of the routing."""
    obj: GatedObjective = problem.objective  # type: ignore[assignment]
    rows = np.arange(obj.n_requests)
    chosen = np.where(to_cloud, -1 if cloud is None else cloud, -1 if edge is None else edge)
    used = tuple(sorted({int(c) for c in chosen}))
    base = selection(problem, used, 1, 1, float(obj.losses[rows, chosen].mean()))
    threshold = float(t) if not isinstance(t, bool) else (-np.inf if t else np.inf)
    return Selection(base.subset, base.objective, base.latency_ms, base.energy_j, base.evaluated, threshold)


class Preference(Policy):
    """Today's router rule (cloud_hub.router.BudgetRouter): one expert, the first that fits by edge
    before cloud, then least energy, then lowest latency (then id)."""

    def choose(self, problem: Problem, budget: Budget) -> Selection:
        es = problem.experts
        rank = lambda i: (es[i].kind != "edge", es[i].energy_j, es[i].latency_ms, es[i].id)  # noqa: E731
        best = min(candidates(problem, budget), key=rank)
        return selection(problem, (best,), budget.k, 1)
