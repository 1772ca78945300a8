"""MoE² in the hub: a `Router` that places each request on the expert the exact subset selection picks.

`Moe2Router` (HubConfig.router_policy "moe2") turns the hub's live candidates into MoE² experts
(partitioner.moe2.experts.Expert) for each request:

- an expert is a candidate of kind "edge" (an online device x a model it serves) or "cloud" (the
  hub's own model) whose variant the gate knows: the model's name and served precision, joined as
  "<model>/<quant>" (partitioner.moe2.table.variant_id), is a column of the gate's `ExpertTable`.
  Its id is "<device id, or cloud>/<model>/<quant>". Candidates the table does not know (another
  model, a pruned variant, a split) are not experts: the router weighs only the others, and hands a
  request none of whose candidates is an expert to the BudgetRouter unchanged;
- its latency is the admitted TTFT and its energy the admitted edge energy, predicted exactly as
  BudgetRouter predicts them (router.weigh: calibrated, queue-aware, scaled by the admission
  quantile); a candidate whose admitted time per token misses the budget's tpot_ms is offline;
- its quality, and the objective, come from the table: the full-set gate's weights and the variant's
  losses over the calibration requests (GatedObjective over the live experts' columns, the weights
  restricted and renormalised: MoE²'s premise, no retraining).

Selection is exact (partitioner.moe2.select.select) within the request's budget: ttft_ms is the
latency budget, energy_j the energy budget (0: unconstrained), k = 1. The request is placed on the
selected subset's top expert by the gate's weights. The gate's weights for the prompt: the gate reads
features the hub does not compute (SmolLM2's pooled hidden state, or a MiniLM sentence embedding:
a forward pass of a model per request), so the router uses the gate's prior, its mean weights over
the calibration requests (ExpertTable.prior), restricted to the subset and renormalised. The answer
names the subset's experts with those weights, the answering one first (Choice.experts).

Cache: selections (and refusals) are kept by (budget, the experts' ids, predicted figures and
online state); a change in the set of expert ids (a device online or offline, a model added)
empties it, and a queue or calibration that moves a prediction is a different key. So a device
going offline is re-selected without at its next request. A budget no subset meets raises
BudgetUnsatisfiable naming the binding constraint, as BudgetRouter words it (the constraints are
per expert at k = 1, so no subset fits exactly when no single candidate does). On a failover
(best_effort budget) with nothing feasible, the BudgetRouter's closest placement serves.

Not weighed: KV-prediction and layer-skipping variants (Budget.quality_floor), split placements, and
k > 1 ensembles (each request is answered by one expert).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import numpy as np

from cloud_hub.errors import BudgetUnsatisfiable
from cloud_hub.prompt import RequestPrompt
from cloud_hub.router import Budget, BudgetRouter, Candidate, Choice, Router, Scored, violations, weigh
from partitioner.cost import Estimate
from partitioner.moe2.experts import Budget as MoeBudget
from partitioner.moe2.experts import Expert, Problem, SelectionError
from partitioner.moe2.objective import GatedObjective
from partitioner.moe2.select import Selection, select
from partitioner.moe2.table import ExpertTable, variant_id

__all__ = ["Moe2Router", "expert_id"]

_BINDING = {"latency_ms": "ttft_ms", "energy_j": "energy_j", "availability": "availability"}
"""MoE²'s constraint names as the hub's budget names them."""


def expert_id(c: Candidate) -> str:
    """The MoE² expert a candidate is: "<device id, or cloud>/<model>/<quant>"."""
    return f"{c.device_id or 'cloud'}/{variant_id(c.model, c.quant)}"


class Moe2Router(Router):
    def __init__(self, table: ExpertTable, quantile: float = 0.95, maxsize: int = 1024) -> None:
        self.table = table
        """The gate's weights and the variants' losses on the calibration requests."""
        self.fallback = BudgetRouter(quantile)
        """Serves requests no expert can, and words refusals (module docstring)."""
        self.quantile = quantile
        self.maxsize = maxsize
        """Selections kept; the oldest go first."""
        self.hits = 0
        """Selections answered from the cache."""
        self.misses = 0
        """Selections computed."""
        self._fleet: tuple[str, ...] | None = None  # the expert ids the cached selections are of
        self._cache: OrderedDict[tuple, Selection | SelectionError] = OrderedDict()
        self._objectives: OrderedDict[tuple[int, ...], GatedObjective] = OrderedDict()
        self._prior = table.prior
        self._quality = table.quality

    def objective(self, columns: tuple[int, ...]) -> GatedObjective:
        """The gated objective over experts of the table's `columns` (one per expert, repeats allowed):
        the gate's weights restricted to them and renormalised, their losses."""
        obj = self._objectives.get(columns)
        if obj is None:
            t, cols = self.table, list(columns)
            w = t.weights[:, cols]
            obj = GatedObjective(w / w.sum(axis=1, keepdims=True), t.losses[:, cols],
                                 tuple(t.tokenizers[c] for c in cols), t.n_bytes)  # fmt: skip
            self._objectives[columns] = obj
            if len(self._objectives) > 64:
                self._objectives.popitem(last=False)
        return obj

    def experts(
        self, candidates: list[Candidate], prompt_tokens: int, max_tokens: int, budget: Budget, template_tokens: int = 0
    ) -> tuple[list[tuple[Candidate, Expert, Estimate, Estimate, int]], list[Scored]]:
        """The request's experts, each with its candidate, mean and admitted estimates and table column,
        and every candidate weighed (for the journal)."""
        out: list[tuple[Candidate, Expert, Estimate, Estimate, int]] = []
        scored: list[Scored] = []
        seen: set[str] = set()
        for c in candidates:
            col = self.table.column(c.model, c.quant) if c.kind in ("edge", "cloud") else None
            if col is None or c.split is not None:
                continue
            est, adm = weigh(c, prompt_tokens, max_tokens, template_tokens, self.quantile)
            v = violations(adm, budget)
            scored.append((c, est, adm, v))
            eid = expert_id(c)
            if eid in seen or not (math.isfinite(adm.ttft_ms) and math.isfinite(adm.edge_energy_j)):
                continue
            seen.add(eid)
            online = not (budget.tpot_ms > 0 and adm.tpot_ms > budget.tpot_ms)
            e = Expert(eid, c.device_id or "cloud", c.model, c.quant, self.table.tokenizers[col],
                       "cloud" if c.kind == "cloud" else "edge", adm.ttft_ms, max(0.0, adm.edge_energy_j),
                       float(self._quality[col]), online)  # fmt: skip
            out.append((c, e, est, adm, col))
        return out, scored

    def select(self, problem: Problem, limits: MoeBudget) -> Selection:
        """`select` through the cache (module docstring). Raises SelectionError as select does."""
        fleet = tuple(e.id for e in problem.experts)
        if fleet != self._fleet:
            self._cache.clear()
            self._fleet = fleet
        key = (limits, tuple((e.id, e.latency_ms, e.energy_j, e.online) for e in problem.experts))
        hit = self._cache.get(key)
        if hit is None:
            self.misses += 1
            try:
                hit = select(problem, limits)
            except SelectionError as exc:
                hit = exc
            self._cache[key] = hit
            if len(self._cache) > self.maxsize:
                self._cache.popitem(last=False)
        else:
            self.hits += 1
            self._cache.move_to_end(key)
        if isinstance(hit, SelectionError):
            raise SelectionError(str(hit), hit.binding)
        return hit

    def choose(
        self,
        candidates: list[Candidate],
        prompt_tokens: int,
        max_tokens: int,
        budget: Budget,
        template_tokens: int = 0,
        prompt: RequestPrompt | None = None,
    ) -> Choice:
        weighed, scored = self.experts(candidates, prompt_tokens, max_tokens, budget, template_tokens)
        if not weighed:  # no candidate is an expert the gate knows
            return self.fallback.choose(candidates, prompt_tokens, max_tokens, budget, template_tokens)
        experts = tuple(e for _, e, _, _, _ in weighed)
        columns = tuple(col for *_, col in weighed)
        problem = Problem(experts, self.objective(columns))
        limits = MoeBudget(budget.energy_j or None, budget.ttft_ms or None, 1)
        try:
            chosen = self.select(problem, limits)
        except SelectionError as exc:
            return self._refuse(exc, [c for c, *_ in weighed], prompt_tokens, max_tokens, budget, template_tokens)
        index = {e.id: i for i, e in enumerate(experts)}
        members = [index[i] for i in chosen.subset]
        prior = np.array([self._prior[col] for col in columns])
        order = sorted(members, key=lambda i: (-prior[i], i))  # objective.route's order at k = 1
        total = float(prior[order].sum())
        weights = tuple((experts[i].id, float(prior[i]) / total if total > 0 else 1.0 / len(order)) for i in order)
        c, _, est, adm, _ = weighed[order[0]]
        tracked = c.tracker is not None
        return Choice(c, est, True, adm if tracked else None, self.quantile if tracked else 0.0, tuple(scored),
                      weights)  # fmt: skip

    def _refuse(
        self,
        exc: SelectionError,
        candidates: list[Candidate],
        prompt_tokens: int,
        max_tokens: int,
        budget: Budget,
        template_tokens: int,
    ) -> Choice:
        """No subset of the experts meets the budget: BudgetRouter's refusal over the same candidates
        (or, best effort, its closest placement)."""
        plain = dataclasses.replace(budget, quality_floor=0.0)  # MoE² weighs no variants
        choice = self.fallback.choose(candidates, prompt_tokens, max_tokens, plain, template_tokens)
        if budget.best_effort:
            return choice
        binding = _BINDING.get(exc.binding, exc.binding)  # unreachable unless rounding parts the two
        raise BudgetUnsatisfiable(f"no expert subset meets the budget: binding constraint {binding} — {exc}", binding)
