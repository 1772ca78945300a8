"""MoE² in the hub: a `Router` that places each request on the experts the exact subset selection and
the gate pick.

`Moe2Router` (HubConfig.router_policy "moe2") turns the hub's live candidates into MoE² experts
(partitioner.moe2.experts.Expert) for each request:

- an expert is a candidate of kind "edge" (an online device x a model it serves) or "cloud" (the
  hub's own model) whose variant the gate knows: the model's name and served precision, joined as
  "<model>/<quant>" (partitioner.moe2.table.variant_id), is a column of the gate's `ExpertTable`.
  Its id is "<device id, or cloud>/<model>/<quant>". Candidates the table does not know (another
  model, a pruned variant, a split) are not experts: the router weighs only the others, and hands a
  request none of whose candidates is an expert to the BudgetRouter unchanged;
- its latency is the admitted TTFT and its energy the admitted edge energy, predicted exactly as
  BudgetRouter predicts them (estimates.weigh: calibrated, queue-aware, scaled by the admission
  quantile); a candidate whose admitted time per token misses the budget's tpot_ms is offline;
- its quality, and the objective, come from the table: the full-set gate's weights and the variant's
  losses over the calibration requests (GatedObjective over the live experts' columns, the weights
  restricted and renormalised: MoE²'s premise, no retraining).

Two levels, as MoE² has them. First the subset: exact selection (partitioner.moe2.select.select)
within the request's budget: ttft_ms is the latency budget, energy_j the energy budget (0:
unconstrained), k = Budget.experts (0 or 1: one expert). At k > 1 the energy of a subset is what its
hungriest ensemble spends, the sum of its members' (experts.energy_j). Then, within the subset, the
gate's weights for this request's prompt (cloud_hub.moe2_gate.PromptGate: its features and the gate,
HubConfig.moe2_gate) pick its experts as objective.route defines: the top expert by weight answers,
with up to k - 1 more of the subset sharing its tokenizer, next in the gate's order, their weights
renormalised (Choice.ensemble, the answering one first; empty at k = 1 or when no other shares the
tokenizer). Without a gate, or for a prompt without features (token ids), the gate's prior stands in
for the prompt's weights: its mean weights over the calibration requests (ExpertTable.prior). The
answer names the subset's experts with the prompt's weights renormalised over the subset, the
answering one first (Choice.experts).

Overhead: each MoE² choice's time, from the router's call to its choice (candidates weighed,
selection through the cache, features and gate), goes to `observe` (the hub's
tandem_moe2_overhead_seconds histogram, cloud_hub.metrics) with the weights' source: the gate's
feature kind, or "prior".

Cache: selections (and refusals) are kept by (budget with k, the experts' ids, predicted figures and
online state); a change in the set of expert ids (a device online or offline, a model added)
empties it, and a queue or calibration that moves a prediction is a different key. So a device
going offline is re-selected without at its next request. The prompt's weights are computed per
request and never cached. A budget no subset meets raises BudgetUnsatisfiable naming the binding
constraint, as BudgetRouter words it (a subset fits only if each member fits alone, so no subset
fits exactly when no single candidate does). On a failover (best_effort budget) with nothing
feasible, the BudgetRouter's closest placement serves.

Not weighed: KV-prediction and layer-skipping variants (Budget.quality_floor) and split placements.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from cloud_hub.candidates import Candidate
from cloud_hub.errors import BudgetUnsatisfiable
from cloud_hub.estimates import violations, weigh
from cloud_hub.prompt import RequestPrompt
from cloud_hub.router import Budget, BudgetRouter, Choice, Router, Scored
from partitioner.cost import Estimate
from partitioner.moe2.experts import Budget as MoeBudget
from partitioner.moe2.experts import Expert, Problem, SelectionError
from partitioner.moe2.objective import GatedObjective, column_objective, route
from partitioner.moe2.select import Selection, select
from partitioner.moe2.table import ExpertTable, variant_id

if TYPE_CHECKING:
    from cloud_hub.moe2_gate import PromptGate

Observe = Callable[[float, str], None]
"""(seconds from the router's call to its choice, the weights' source: a feature kind or "prior")."""

__all__ = ["Moe2Router", "expert_id"]

_BINDING = {"latency_ms": "ttft_ms", "energy_j": "energy_j", "availability": "availability"}
"""MoE²'s constraint names as the hub's budget names them."""


def expert_id(c: Candidate) -> str:
    """The MoE² expert a candidate is: "<device id, or cloud>/<model>/<quant>"."""
    return f"{c.device_id or 'cloud'}/{variant_id(c.model, c.quant)}"


class Moe2Router(Router):
    def __init__(
        self,
        table: ExpertTable,
        quantile: float = 0.95,
        maxsize: int = 1024,
        gate: PromptGate | None = None,
        observe: Observe | None = None,
    ) -> None:
        self.table = table
        """The gate's weights and the variants' losses on the calibration requests."""
        self.gate = gate
        """Each prompt's gate weights over the table's columns; None: the gate's prior for every prompt."""
        self.observe = observe
        """Called with each MoE² choice's overhead (module docstring); None: not measured."""
        self._prepared: dict[int, float] = {}  # prepare()'s seconds, by id(prompt), until its choice
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
            t = self.table
            obj = self._objectives[columns] = column_objective(t.weights, t.losses, t.tokenizers, t.n_bytes, columns)
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
        start = time.perf_counter()
        weighed, scored = self.experts(candidates, prompt_tokens, max_tokens, budget, template_tokens)
        if not weighed:  # no candidate is an expert the gate knows
            return self.fallback.choose(candidates, prompt_tokens, max_tokens, budget, template_tokens)
        experts = tuple(e for _, e, _, _, _ in weighed)
        columns = tuple(col for *_, col in weighed)
        problem = Problem(experts, self.objective(columns))
        k = max(1, budget.experts)
        limits = MoeBudget(budget.energy_j or None, budget.ttft_ms or None, k)
        try:
            chosen = self.select(problem, limits)
        except SelectionError as exc:
            return self._refuse(exc, [c for c, *_ in weighed], prompt_tokens, max_tokens, budget, template_tokens)
        index = {e.id: i for i, e in enumerate(experts)}
        members = [index[i] for i in chosen.subset]
        w, source = self.prompt_weights(prompt, columns)
        picked, mixed = route(w, [e.tokenizer for e in experts], members, k)  # the top first
        # the whole subset in route's order, renormalised: route with one tokenizer for all and k = |S|
        order, shares = route(w, [""] * len(experts), members, len(members))
        c, _, est, adm, _ = weighed[picked[0]]
        ensemble = tuple((weighed[i][0], m) for i, m in zip(picked, mixed, strict=True)) if len(picked) > 1 else ()
        tracked = c.tracker is not None
        choice = Choice(c, est, True, adm if tracked else None, self.quantile if tracked else 0.0, tuple(scored),
                        tuple((experts[i].id, s) for i, s in zip(order, shares, strict=True)), ensemble)  # fmt: skip
        if self.observe is not None:  # with the features' time if prepare() computed them
            self.observe(time.perf_counter() - start + self._prepared.pop(id(prompt), 0.0), source)
        return choice

    def prepare(self, prompt: RequestPrompt) -> None:
        """The gate's features and weights for `prompt`, off the event loop (Router.prepare); their
        time is added to the choice's in the overhead `observe` records."""
        if self.gate is not None:
            start = time.perf_counter()
            self.gate.prepare(prompt)
            self._prepared[id(prompt)] = time.perf_counter() - start
            if len(self._prepared) > 256:
                self._prepared.pop(next(iter(self._prepared)))

    def prompt_weights(self, prompt: RequestPrompt | None, columns: tuple[int, ...]) -> tuple[np.ndarray, str]:
        """(n,) the gate's weights for the prompt over the experts of `columns` (table columns), not
        renormalised, and their source: the gate's feature kind, or "prior" without a gate or for a
        prompt without features (module docstring)."""
        cols = list(columns)
        if self.gate is not None and prompt is not None:
            weights = self.gate.weights(prompt)
            if weights is not None:
                return weights[cols], self.gate.kind
        return self._prior[cols], "prior"

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
